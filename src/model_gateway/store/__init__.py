"""Where prediction records and configuration history are kept.

:class:`Store` is the interface; :func:`open_store` picks the implementation from
``storage.url``. Every implementation shares the schema in :mod:`.schema`.
"""

from __future__ import annotations

from .base import Store, open_store

__all__ = ["Store", "open_store"]
