"""The tuned edge's uvicorn server and worker supervisor: a drain before the graceful stop,
and one listening socket per worker.

Built on uvicorn's internals (``Server.main_loop``, ``Multiprocess``, ``Process``,
``STARTUP_FAILURE``), within the releases pyproject.toml allows and CI tests at both ends.
"""

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
import time
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from .limits import ClientLimits
from .signals import LIMITS_STATE

log = logging.getLogger("model_gateway")


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
        limits = self.lifespan.state.get(LIMITS_STATE)
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
        log.info("drained: refusing new connections, then closing the listeners")
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
