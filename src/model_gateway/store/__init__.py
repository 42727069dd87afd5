"""Where prediction records and configuration history are kept.

:class:`Store` is the interface (:mod:`.base`); :func:`open_store` picks the implementation
from ``storage.url``, importing only the one it needs. Every implementation shares the schema
in :mod:`.schema`.
"""

from __future__ import annotations

from .base import Store, sqlite_path

__all__ = ["Store", "open_store"]


def open_store(url: str) -> Store:
    """The store for a ``storage.url``; call :meth:`Store.open` before use."""
    if url.startswith("sqlite://"):
        from .sqlite import SQLiteStore

        return SQLiteStore(sqlite_path(url))
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(f"unsupported storage url {url!r}: use sqlite:// or postgresql://")
