"""The gateway's own log lines on stderr (not the prediction log): one format for every
process."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """Set up the root logger once per process; worker processes call it too."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format=FORMAT)
