"""Running the gateway (and the demo model servers) under uvicorn."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn

from . import serving
from .app import CONFIG_ENV, GatewayApp
from .config import LoadedConfig, ShadowConfig, VariantConfig
from .demo import create_model_server
from .metrics import MULTIPROC_ENV

log = logging.getLogger("model_gateway")

DEMO_START_SECONDS = 10


def gateway_server_config(
    app: object,
    host: str,
    port: int,
    *,
    shutdown_timeout: float,
    workers: int = 1,
    edge: str = "tuned",
) -> uvicorn.Config:
    """uvicorn's configuration for the gateway, on the edge ``edge`` (``server.edge``) asks
    for, unless the environment or the installed uvicorn says otherwise."""
    return serving.server_config(
        app,
        host,
        port,
        edge=serving.choose_edge(edge),
        shutdown_timeout=shutdown_timeout,
        workers=workers,
    )


def serve(loaded: LoadedConfig, host: str, port: int, workers: int) -> None:
    """Run until SIGINT/SIGTERM, then finish requests in flight and flush the log."""
    server = loaded.config.server
    edge = serving.choose_edge(server.edge)
    app: object
    if workers > 1:
        # Each worker process builds its own app from the same file, and writes its metrics
        # where every worker's /metrics can read them all.
        os.environ[CONFIG_ENV] = os.path.abspath(loaded.source)
        os.environ[MULTIPROC_ENV] = prepare_metrics_dir(os.environ.get(MULTIPROC_ENV))
        app = "model_gateway.app:app_from_env"
    else:
        app = GatewayApp(loaded, settle_heap=True)
    config = serving.server_config(
        app, host, port, edge=edge, shutdown_timeout=server.shutdown_timeout, workers=workers
    )
    sockets, url = serving.listen(config, edge=edge)
    log.info(
        "model-gateway listening on %s (%d worker%s, %s edge)",
        url,
        workers,
        "s"[: workers - 1],
        edge,
    )
    serving.run(config, sockets, edge=edge)


def prepare_metrics_dir(path: str | None) -> str:
    """An empty directory for prometheus-client's multiprocess files: the given one emptied
    (values of an earlier run would otherwise be added in), else a new temporary one."""
    if not path:
        return tempfile.mkdtemp(prefix="model-gateway-metrics-")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    return str(directory)


def demo_upstreams(loaded: LoadedConfig) -> list[tuple[str, int, str, str]]:
    """(host, port, model name, version) for each variant and shadow served on this machine."""
    seen: dict[tuple[str, int], tuple[str, int, str, str]] = {}
    for route in loaded.config.routes:
        upstreams: list[VariantConfig | ShadowConfig] = [*route.variants, *route.shadows]
        for variant in upstreams:
            parts = urlsplit(variant.url)
            if parts.hostname in ("127.0.0.1", "localhost") and parts.port:
                name = route.model_name or route.name
                seen.setdefault(
                    (parts.hostname, parts.port),
                    (parts.hostname, parts.port, name, variant.model_version),
                )
    return list(seen.values())


def run_demo(loaded: LoadedConfig, host: str, port: int) -> None:
    """Start a demo model server for every local variant and shadow, then the gateway in front
    of them."""
    servers: list[uvicorn.Server] = []
    for up_host, up_port, model, version in demo_upstreams(loaded):
        server = uvicorn.Server(
            uvicorn.Config(
                create_model_server(model, version),
                host=up_host,
                port=up_port,
                log_level="warning",
                access_log=False,
            )
        )
        threading.Thread(target=server.run, name=f"demo-{up_port}", daemon=True).start()
        deadline = time.monotonic() + DEMO_START_SECONDS
        while not server.started:
            if time.monotonic() > deadline:
                raise SystemExit(f"demo model server on {up_host}:{up_port} did not start")
            time.sleep(0.02)
        servers.append(server)
        print(f"demo model server: {model} version {version} on http://{up_host}:{up_port}")
    edge = serving.choose_edge(loaded.config.server.edge)
    grace = loaded.config.server.shutdown_timeout
    config = serving.server_config(
        GatewayApp(loaded), host, port, edge=edge, shutdown_timeout=grace
    )
    sockets, url = serving.listen(config, edge=edge)
    route = loaded.config.routes[0]
    gateway = uvicorn.Server(config)

    def announce() -> None:
        # only once the gateway answers, so that the line works when it is read
        while not gateway.started:
            if gateway.should_exit:
                return
            time.sleep(0.02)
        print(
            f"\nmodel-gateway listening on {url}; try it:\n"
            f"  curl -s -i -X POST {url}{route.path}/infer \\\n"
            "    -H 'Content-Type: application/json' -H 'X-User-Id: alice' \\\n"
            '    -d \'{"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", '
            '"data": [1.2, 0.4, 2.0, 0.1]}]}\'\n',
            flush=True,
        )

    threading.Thread(target=announce, name="announce", daemon=True).start()
    try:
        gateway.run(sockets=sockets)
    finally:
        for server in servers:
            server.should_exit = True
