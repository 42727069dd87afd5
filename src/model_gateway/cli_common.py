"""What the ``model-gateway`` commands share: the file, the store, times on the command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .config import LoadedConfig, load_config
from .errors import ConfigError
from .store import Store, open_store


def load_or_exit(path: str) -> LoadedConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(1) from None


def time_arg(text: str) -> float:
    from .control_answers import parse_rfc3339

    try:
        return parse_rfc3339(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


T = TypeVar("T")


def with_store(loaded: LoadedConfig, work: Callable[[Store], Awaitable[T]]) -> T:
    """Run ``work`` against the configured store, opened (and migrated) for it."""

    async def run() -> T:
        store = open_store(loaded.config.storage.url)
        await store.open()
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())
