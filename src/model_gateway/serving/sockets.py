"""Listening sockets, bound before the server starts: ``--port 0`` is reported as the port
really taken, and connections made once the address is logged wait in the kernel's queue
rather than being refused."""

from __future__ import annotations

import socket

import uvicorn


def bind(config: uvicorn.Config) -> tuple[socket.socket, str]:
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
    on one worker and stay there (docs/design.md).
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
