"""Running the gateway (and the demo model servers) under uvicorn."""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn
from uvicorn.supervisors import Multiprocess

from .app import CONFIG_ENV, GatewayApp
from .config import LoadedConfig
from .demo import create_model_server
from .http import CoalescingHttpToolsProtocol
from .metrics import MULTIPROC_ENV

log = logging.getLogger("model_gateway")

# How long SIGTERM waits for requests in flight before the log is flushed and the process exits.
GRACEFUL_SHUTDOWN_SECONDS = 30
DEMO_START_SECONDS = 10


def gateway_server_config(app: object, host: str, port: int, workers: int = 1) -> uvicorn.Config:
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        workers=workers,
        factory=isinstance(app, str),
        loop="uvloop",
        # uvicorn's httptools protocol, writing a busy server's responses once per loop turn
        http=CoalescingHttpToolsProtocol,
        lifespan="on",
        # The gateway writes X-Forwarded-For itself; uvicorn must not rewrite the client address.
        proxy_headers=False,
        server_header=False,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        log_level="info",
    )


def serve(loaded: LoadedConfig, host: str, port: int, workers: int) -> None:
    """Run until SIGINT/SIGTERM, then finish requests in flight and flush the log."""
    if workers > 1:
        # Each worker process builds its own app from the same file, and writes its metrics
        # where every worker's /metrics can read them all.
        os.environ[CONFIG_ENV] = os.path.abspath(loaded.source)
        os.environ[MULTIPROC_ENV] = prepare_metrics_dir(os.environ.get(MULTIPROC_ENV))
        config = gateway_server_config("model_gateway.app:app_from_env", host, port, workers)
    else:
        config = gateway_server_config(GatewayApp(loaded, settle_heap=True), host, port)
    sock, url = _bind(config)
    log.info("model-gateway listening on %s (%d worker%s)", url, workers, "s"[: workers - 1])
    if workers > 1:
        Supervisor(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run(sockets=[sock])


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


class Supervisor(Multiprocess):
    """uvicorn's worker supervisor, except that SIGHUP reloads the configuration in each worker
    (which keeps its connections and its queued records) instead of restarting the workers."""

    def handle_hup(self) -> None:
        log.info("SIGHUP: asking %d workers to reload the configuration", len(self.processes))
        for worker in self.processes:
            if worker.process.pid is not None and worker.is_alive():
                os.kill(worker.process.pid, signal.SIGHUP)


def _bind(config: uvicorn.Config) -> tuple[socket.socket, str]:
    """Bind before serving, so that ``--port 0`` can be reported as the port really taken."""
    sock = config.bind_socket()
    bound_host, bound_port = sock.getsockname()[:2]
    return sock, f"http://{bound_host}:{bound_port}"


def demo_upstreams(loaded: LoadedConfig) -> list[tuple[str, int, str, str]]:
    """(host, port, model name, version) for each variant served on this machine."""
    seen: dict[tuple[str, int], tuple[str, int, str, str]] = {}
    for route in loaded.config.routes:
        for variant in route.variants:
            parts = urlsplit(variant.url)
            if parts.hostname in ("127.0.0.1", "localhost") and parts.port:
                name = route.model_name or route.name
                seen.setdefault(
                    (parts.hostname, parts.port),
                    (parts.hostname, parts.port, name, variant.model_version),
                )
    return list(seen.values())


def run_demo(loaded: LoadedConfig, host: str, port: int) -> None:
    """Start a demo model server for every local variant, then the gateway in front of them."""
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
    config = gateway_server_config(GatewayApp(loaded), host, port)
    sock, url = _bind(config)
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
        gateway.run(sockets=[sock])
    finally:
        for server in servers:
            server.should_exit = True
