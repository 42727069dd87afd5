"""The one live configuration: what the control plane reads, and what a reload replaces.

The live configuration is the file's, with what a rollout overlays on it (the weights it
moves): :attr:`LiveConfig.file` is the operator's file as last read, :attr:`LiveConfig.loaded`
what serves. A reload replaces the file's and keeps the overlay; a rollout's move changes
the overlay and keeps the file's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from .config import LoadedConfig

#: makes a configuration live at an instant, for a reason (the file's path for a reload, a
#: rollout's move for one): routing tables, health checks, the history
Activation = Callable[[LoadedConfig, float, str], Awaitable[None]]
#: the live configuration made from the file's
Overlay = Callable[[LoadedConfig], LoadedConfig]


class LiveConfig:
    """Holds the configuration in force. The gateway gives it the :data:`Activation` that
    puts a configuration to work; :meth:`replace` and :meth:`refresh` run it, and only then
    does the new one become what everybody reads."""

    def __init__(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        self.file = loaded
        self._activation: Activation | None = None
        self._overlay: Overlay | None = None
        self._lock = asyncio.Lock()

    def activate_with(self, activation: Activation) -> None:
        self._activation = activation

    def overlay_with(self, overlay: Overlay) -> None:
        self._overlay = overlay

    def overlaid(self, loaded: LoadedConfig) -> LoadedConfig:
        return loaded if self._overlay is None else self._overlay(loaded)

    async def replace(self, loaded: LoadedConfig, at: float) -> None:
        """The file's new configuration (a reload), under the overlay in force."""
        async with self._lock:
            effective = self.overlaid(loaded)
            if self._activation is not None:
                await self._activation(effective, at, loaded.source)
            self.file, self.loaded = loaded, effective

    async def refresh(self, at: float, reason: str) -> bool:
        """The file's configuration under the overlay as it is now, made live for ``reason``
        when that changes what serves; whether it did."""
        async with self._lock:
            effective = self.overlaid(self.file)
            if effective.version == self.loaded.version:
                return False
            if self._activation is not None:
                await self._activation(effective, at, reason)
            self.loaded = effective
            return True
