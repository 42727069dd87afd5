"""model-gateway: an async reverse proxy for model servers.

It routes each request to a model version by A/B weights, logs every prediction, exports
Prometheus metrics, and answers which model version made a decision.
"""

from __future__ import annotations

from .app import GatewayApp, create_app
from .config import GatewayConfig, LoadedConfig, load_config, parse_config
from .errors import ConfigError, GatewayError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "GatewayApp",
    "GatewayConfig",
    "GatewayError",
    "LoadedConfig",
    "create_app",
    "load_config",
    "parse_config",
]
