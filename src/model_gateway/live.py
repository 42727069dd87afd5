"""The one live configuration: what the control plane reads, and what a reload replaces."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from .config import LoadedConfig

#: makes a configuration live at an instant: routing tables, health checks, the history
Activation = Callable[[LoadedConfig, float], Awaitable[None]]


class LiveConfig:
    """Holds the configuration in force. The gateway gives it the :data:`Activation` that
    puts a configuration to work; :meth:`replace` runs it, and only then does the new one
    become what everybody reads."""

    def __init__(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        self._activation: Activation | None = None

    def activate_with(self, activation: Activation) -> None:
        self._activation = activation

    async def replace(self, loaded: LoadedConfig, at: float) -> None:
        if self._activation is not None:
            await self._activation(loaded, at)
        self.loaded = loaded
