"""Running the gateway (and the demo model servers) under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from .app import CONFIG_ENV, GatewayApp
from .client_limits import ClientLimits
from .config import LoadedConfig, ShadowConfig, VariantConfig
from .demo import create_model_server
from .http import CoalescingHttpToolsProtocol
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
) -> uvicorn.Config:
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
        # SIGTERM lets requests in flight finish for this long, then cancels them (the proxy
        # answers and logs those), and the log is flushed. Declared int, used as
        # asyncio.wait_for's timeout: a float works.
        timeout_graceful_shutdown=shutdown_timeout,  # type: ignore[arg-type]
        log_level="info",
    )


def serve(loaded: LoadedConfig, host: str, port: int, workers: int) -> None:
    """Run until SIGINT/SIGTERM, then finish requests in flight and flush the log."""
    grace = loaded.config.server.shutdown_timeout
    if workers > 1:
        # Each worker process builds its own app from the same file, and writes its metrics
        # where every worker's /metrics can read them all.
        os.environ[CONFIG_ENV] = os.path.abspath(loaded.source)
        os.environ[MULTIPROC_ENV] = prepare_metrics_dir(os.environ.get(MULTIPROC_ENV))
        config = gateway_server_config(
            "model_gateway.app:app_from_env", host, port, shutdown_timeout=grace, workers=workers
        )
        sockets, url = bind_one_per_worker(config, workers)
    else:
        config = gateway_server_config(
            GatewayApp(loaded, settle_heap=True), host, port, shutdown_timeout=grace
        )
        sock, url = _bind(config)
        sockets = [sock]
    log.info("model-gateway listening on %s (%d worker%s)", url, workers, "s"[: workers - 1])
    if workers > 1:
        supervisor = Supervisor(config, sockets=sockets)
        supervisor.run()
        if supervisor.failed_to_start:
            # the status one worker's server exits with, so that a service manager sees it
            raise SystemExit(STARTUP_FAILURE)
    else:
        GatewayServer(config).run(sockets=sockets)


class GatewayServer(uvicorn.Server):
    """uvicorn's server, with a drain before its graceful stop, as Envoy's: for
    ``server.drain_time`` after SIGTERM the listeners stay open and every answer carries
    ``Connection: close``, so a keep-alive client's next request is answered rather than
    reset by a connection closed under it; then uvicorn's own stop (listeners closed,
    requests in flight finished within ``shutdown_timeout``). A second Ctrl+C ends it."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # A socket this worker took over from one that drained (a worker replaced after a
        # SIGTERM of its own) still carries that one's filter, which refuses every new
        # connection: it is taken off.
        for server in self.servers:
            for sock in server.sockets:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, _SO_DETACH_FILTER, 0)

    async def main_loop(self) -> None:
        await super().main_loop()
        limits = getattr(self.config.loaded_app, "client_limits", None)
        if not isinstance(limits, ClientLimits) or self.force_exit:
            return
        seconds = limits.server.drain_time
        if seconds <= 0:
            return
        limits.draining = True
        for connection in list(self.server_state.connections):
            cycle = getattr(connection, "cycle", None)
            if cycle is not None and not cycle.response_complete:
                cycle.keep_alive = False
        log.info("draining for %g s: answering with Connection: close", seconds)
        deadline = time.monotonic() + seconds
        # force_exit is a flag uvicorn's signal handler sets, not an event to wait on
        while time.monotonic() < deadline and not self.force_exit:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        # Closing a listener resets the connections the kernel completed but nobody has
        # accepted yet, each with a request on its way. New ones are refused first, and
        # those queued are taken and answered; then uvicorn closes the listeners.
        listeners = [sock for server in self.servers for sock in server.sockets]
        if all(refuse_new_connections(sock) for sock in listeners):
            give_up = time.monotonic() + ACCEPT_QUEUE_SECONDS
            # the kernel's queue, which nothing signals: looked at until it is empty
            while any(accept_queue(s) for s in listeners) and time.monotonic() < give_up:  # noqa: ASYNC110
                await asyncio.sleep(0.01)


#: at the drain's end, the longest wait for the connections queued to be accepted
ACCEPT_QUEUE_SECONDS = 1.0
_SO_ATTACH_FILTER = 26  # Linux, <asm-generic/socket.h>
_SO_DETACH_FILTER = 27
# A classic BPF program for a listening socket that drops each SYN without ACK (a new
# connection: its client retries, and is refused once the listener closes) and keeps every
# other packet, so that a handshake already under way completes and is queued. The filter
# sees a TCP packet from its header on: its flags are byte 13.
_DROP_NEW_CONNECTIONS = b"".join(
    struct.pack("HBBI", code, jump_true, jump_false, k)
    for code, jump_true, jump_false, k in (
        (0x30, 0, 0, 13),  # ldb [13]: the flags
        (0x54, 0, 0, 0x12),  # and #(SYN | ACK)
        (0x15, 0, 1, 0x02),  # jeq #SYN: drop, else keep
        (0x06, 0, 0, 0),  # ret #0: drop
        (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1: keep the whole packet
    )
)


def refuse_new_connections(sock: Any) -> bool:
    """Stop the kernel completing new connections on a listening socket; False where it
    cannot (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    program = ctypes.create_string_buffer(_DROP_NEW_CONNECTIONS, len(_DROP_NEW_CONNECTIONS))
    fprog = struct.pack("HL", len(_DROP_NEW_CONNECTIONS) // 8, ctypes.addressof(program))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError:
        return False
    return True


def accept_queue(sock: Any) -> int:
    """Connections completed on a listening socket and not yet accepted (``tcpi_unacked``
    of its TCP_INFO, which a listener uses for its accept queue)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    except OSError:
        return 0
    unacked: int = struct.unpack_from("I", info, 24)[0]
    return unacked


class WorkerProcess(Process):
    """uvicorn's worker process, running a :class:`GatewayServer`."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = GatewayServer(config=self.config)
        return self._server


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
    """uvicorn's worker supervisor, except that

    - each worker listens on a socket of its own (``sockets[i]`` for worker ``i``, all bound
      to one port with ``SO_REUSEPORT``), and a worker that dies is replaced on the same one;
    - SIGHUP reloads the configuration in each worker (which keeps its connections and its
      queued records) instead of restarting the workers;
    - the worker count is fixed (SIGTTIN and SIGTTOU are ignored): it is the socket count.
    """

    #: set when a worker could not start (its store, say): the others are stopped too
    failed_to_start = False

    def init_processes(self) -> None:
        for sock in self.sockets:
            self.processes.append(self._start([sock]))

    def keep_subprocess_alive(self) -> None:
        # uvicorn's own, with the dead worker's socket handed to its replacement
        if self.should_exit.is_set():
            return
        for idx, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # hung, or already gone
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                log.error("worker %s failed to start; stopping", process.pid)
                self.failed_to_start = True
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            log.warning("worker %s died; starting another on its socket", process.pid)
            self.processes[idx] = self._start([self.sockets[idx]])

    def _start(self, sockets: list[socket.socket]) -> Process:
        process = WorkerProcess(self.config, sockets)
        process.start()
        return process

    def handle_hup(self) -> None:
        log.info("SIGHUP: asking %d workers to reload the configuration", len(self.processes))
        for worker in self.processes:
            if worker.process.pid is not None and worker.is_alive():
                os.kill(worker.process.pid, signal.SIGHUP)

    def handle_ttin(self) -> None:
        log.warning("SIGTTIN ignored: the number of workers is set by --workers")

    def handle_ttou(self) -> None:
        log.warning("SIGTTOU ignored: the number of workers is set by --workers")


def _bind(config: uvicorn.Config) -> tuple[socket.socket, str]:
    """Bind before serving, so that ``--port 0`` can be reported as the port really taken."""
    sock = config.bind_socket()
    # listening before the app has started: connections made once the address is logged
    # wait in the kernel's queue, never refused
    sock.listen(config.backlog)
    bound_host, bound_port = sock.getsockname()[:2]
    return sock, f"http://{bound_host}:{bound_port}"


def bind_one_per_worker(config: uvicorn.Config, workers: int) -> tuple[list[socket.socket], str]:
    """A listening socket per worker, all on one port with ``SO_REUSEPORT`` (as nginx's
    ``listen ... reuseport``): the kernel spreads new connections over the sockets by a hash
    of their addresses. With one socket shared by every worker, the worker that wakes first
    accepts every connection waiting, so a burst of new keep-alive connections could all land
    on one worker and stay there (two workers served as one in 2 of 8 runs of wrk here).
    ``--port 0`` takes a free port for the first and the same port for the rest."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sockets: list[socket.socket] = []
    port = config.port
    try:
        if port:
            # SO_REUSEPORT would let a second gateway of the same user share the port
            # silently; a plain bind first fails, as one socket would, if anything holds it
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((config.host, port))
        for _ in range(workers):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((config.host, port))
            # listening from now on: connections that come before the workers are up wait
            # in the kernel's queue rather than being refused
            sock.listen(config.backlog)
            port = sock.getsockname()[1]
            sock.set_inheritable(True)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise SystemExit(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from exc
    bound_host, bound_port = sockets[0].getsockname()[:2]
    return sockets, f"http://{bound_host}:{bound_port}"


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
    grace = loaded.config.server.shutdown_timeout
    config = gateway_server_config(GatewayApp(loaded), host, port, shutdown_timeout=grace)
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
