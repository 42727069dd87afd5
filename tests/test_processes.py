"""The real command under signals: SIGTERM under load loses nothing, with 1 or 2 workers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from .conftest import Upstream, wait_until, wait_until_async

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

INFER = {
    "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]
}


class GatewayProcess:
    def __init__(self, config: Path, workers: int = 1, *, wait: bool = True) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "model_gateway",
                "serve",
                "--config",
                str(config),
                "--port",
                "0",
                "--workers",
                str(workers),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.url = ""
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r"listening on (http://[\d.]+:\d+)", line)
            if found:
                self.url = found.group(1)
                break
        assert self.url, "".join(self.lines)
        self.drain = threading.Thread(target=self._drain, daemon=True)
        self.drain.start()
        if wait:
            wait_until(self.healthy, "the workers to start")  # after the socket is bound

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def terminate_and_wait(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (SIGTERM: a graceful stop), wait for the end, close the pipe."""
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        self.drain.join(timeout=10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code


def started_count(gw: GatewayProcess) -> int:
    """Workers that logged their start. They share one pipe, so two lines can meet on one:
    occurrences are counted, not lines."""
    return sum(line.count("model-gateway started") for line in gw.lines)


INFER_BYTES = orjson.dumps(INFER)


def write_config(
    tmp_path: Path, upstreams: dict[str, Upstream], **server: Any
) -> tuple[Path, Path]:
    db = tmp_path / "log.db"
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": server,
                "storage": {"url": f"sqlite:///{db}"},
                "routes": [
                    {
                        "name": "slow",
                        "path": "/slow",
                        "variants": [
                            {"name": "a", "url": upstreams["a"].url, "model_version": "1"},
                            {"name": "b", "url": upstreams["b"].url, "model_version": "2"},
                        ],
                    },
                    {
                        "name": "fraud",
                        "path": "/v2/models/fraud",
                        "variants": [
                            {"name": "a", "url": upstreams["a"].url, "model_version": "1"}
                        ],
                    },
                ],
            }
        )
    )
    return config, db


def count_records(db: Path) -> dict[str, tuple[str, int]]:
    conn = sqlite3.connect(db)
    try:
        return {
            pid: (variant, status)
            for pid, variant, status in conn.execute(
                "SELECT prediction_id, variant, status FROM predictions"
            )
        }
    finally:
        conn.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_load_finishes_requests_and_flushes_every_record(
    tmp_path: Path, upstreams: dict[str, Upstream], workers: int
) -> None:
    """1. Start `model-gateway serve` as a real process (1 or 2 workers).
    2. 200 fast requests complete; then 40 slow ones (0.5 s upstream) are put in flight.
    3. SIGTERM arrives while the slow ones are in flight.
    4. Every in-flight request still gets its 200; the process ends.
    5. The store holds exactly one record per response, no duplicates, no gaps.
    """
    config, db = write_config(tmp_path, upstreams)
    gw = GatewayProcess(config, workers)

    async def load() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as client:
            fast = await asyncio.gather(
                *(client.post(f"{gw.url}/v2/models/fraud/infer", json=INFER) for _ in range(200))
            )
            slow = [
                asyncio.ensure_future(client.get(f"{gw.url}/slow?seconds=0.5")) for _ in range(40)
            ]
            await wait_until_async(
                lambda: upstreams["a"].control.requests + upstreams["b"].control.requests >= 40,
                "40 requests waiting on the upstreams",
            )
            exit_code = asyncio.ensure_future(asyncio.to_thread(gw.terminate_and_wait))
            results = await asyncio.gather(*slow)
            # uvicorn re-raises the signal once shut down, so the parent sees "killed by SIGTERM"
            assert await exit_code in (0, -signal.SIGTERM), "".join(gw.lines)
            return [*fast, *results]

    responses = asyncio.run(load())
    assert [r.status_code for r in responses] == [200] * 240
    records = count_records(db)
    assert len(records) == 240
    for r in responses:
        assert records[r.headers["x-prediction-id"]] == (r.headers["x-model-variant"], 200)
    if workers == 2:
        assert started_count(gw) == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_the_port_takes_connections_as_soon_as_listening_is_logged(
    tmp_path: Path, upstreams: dict[str, Upstream], workers: int
) -> None:
    """The moment `listening on` is printed, connections are taken: 16 of them, opened at
    once, each get an answer, however long the workers take to start (before, the port
    refused connections until each worker had started its server)."""
    config, _ = write_config(tmp_path, upstreams)
    gw = GatewayProcess(config, workers, wait=False)
    try:
        host, port = gw.url.removeprefix("http://").split(":")
        sockets = [socket.create_connection((host, int(port)), timeout=60) for _ in range(16)]
        for sock in sockets:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for sock in sockets:
            assert sock.recv(12) == b"HTTP/1.1 200"
            sock.close()
    finally:
        gw.terminate_and_wait()


@pytest.mark.tuned_edge
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_keep_alive_clients_without_a_reset(
    tmp_path: Path, upstreams: dict[str, Upstream], workers: int
) -> None:
    """32 keep-alive clients send requests back to back while SIGTERM arrives. During the
    drain each is answered with ``Connection: close`` and reconnects; once the listeners
    close, a new connection is refused (the client knows nothing was sent). No request sent
    is left without an answer (before: 32-36 were reset per run), and every answered one
    is in the log. The drain is long enough for each client's next request to come on a
    machine busy with other work too."""
    config, db = write_config(tmp_path, upstreams, drain_time=5)
    gw = GatewayProcess(config, workers)
    host, port = gw.url.removeprefix("http://").split(":")
    request = (
        b"POST /v2/models/fraud/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(INFER_BYTES), INFER_BYTES)
    )
    answered: list[str] = []
    unanswered = 0
    refused = 0
    closes = 0

    async def client(stop: asyncio.Event) -> None:
        nonlocal unanswered, refused, closes
        streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while True:
            if streams is None:
                try:
                    streams = await asyncio.open_connection(host, int(port))
                except OSError:
                    refused += 1
                    return
            reader, writer = streams
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError):
                unanswered += 1
                writer.close()
                streams = None
                if stop.is_set():
                    return
                continue
            answered.append(re.search(rb"x-prediction-id: ([\w-]+)", head).group(1).decode())  # type: ignore[union-attr]
            if b"connection: close" in head.lower():
                closes += 1
                writer.close()
                streams = None

    async def run() -> None:
        stop = asyncio.Event()
        clients = [asyncio.ensure_future(client(stop)) for _ in range(32)]
        await wait_until_async(lambda: len(answered) >= 500, "500 answers before the stop")
        code = await asyncio.to_thread(gw.terminate_and_wait)
        stop.set()
        assert code in (0, -signal.SIGTERM), "".join(gw.lines)
        await asyncio.wait_for(asyncio.gather(*clients), 30)

    asyncio.run(run())
    records = count_records(db)
    print(
        f"\n{workers} worker(s): answered {len(answered)}, closes {closes}, "
        f"unanswered {unanswered}, refused {refused}, logged {len(records)}"
    )
    # what the gateway said, should it have dropped a request
    said = "".join(gw.lines)
    assert unanswered == 0, said
    assert closes >= 32, said  # every connection was told to close, then reconnected
    assert refused == 32  # each client ended on a connection refused, nothing sent
    assert len(records) == len(answered)
    assert set(records) == set(answered)


@pytest.mark.tuned_edge
def test_every_worker_holds_its_clients_to_the_limits(
    tmp_path: Path, upstreams: dict[str, Upstream]
) -> None:
    """With 2 workers (each builds its app from the file), 8 connections that send half a
    head, spread over both by the kernel, are each answered 408 once the file's 0.5 s
    client_header_timeout has passed, and /metrics counts all 8 across the workers."""
    config, _ = write_config(tmp_path, upstreams)
    doc = yaml.safe_load(config.read_text())
    doc["server"] = {"client_header_timeout": 0.5}
    config.write_text(yaml.safe_dump(doc))
    gw = GatewayProcess(config, workers=2)
    try:
        port = int(gw.url.rsplit(":", 1)[1])
        conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        for conn in conns:
            conn.sendall(b"GET /slow HTTP/1.1\r\nHost")
        for conn in conns:
            with conn:
                conn.settimeout(20)  # a guard against a worker that never answers, not a timing
                assert conn.recv(65536).startswith(b"HTTP/1.1 408 ")
        closed = 'model_gateway_client_connections_closed_total{reason="header_timeout"} 8.0'
        assert closed in httpx.get(f"{gw.url}/metrics").text.splitlines()
        assert started_count(gw) == 2
    finally:
        gw.terminate_and_wait()


def test_serve_refuses_an_invalid_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: []\n")
    proc = subprocess.run(
        [sys.executable, "-m", "model_gateway", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ},
    )
    assert proc.returncode == 1
    assert "routes: must have at least 1 item(s)" in proc.stderr


NOT_A_DATABASE = b"not a database" * 300


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_exits_with_an_error_when_the_store_cannot_be_opened(
    tmp_path: Path, upstreams: dict[str, Upstream], workers: int
) -> None:
    # A file that is not a database: the open fails after aiosqlite's (non-daemon) thread
    # started, which once kept the process alive after the error.
    config, db = write_config(tmp_path, upstreams)
    db.write_bytes(NOT_A_DATABASE)
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "model_gateway", "serve", "--config", str(config)),
            *("--port", "0", "--workers", str(workers)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr  # uvicorn's status for a failed startup
    assert f"cannot open the SQLite store {db}: file is not a database" in proc.stderr
    assert db.read_bytes() == NOT_A_DATABASE  # left as it was


@pytest.mark.parametrize(
    ("where", "why"),
    [("log.db", "file is not a database"), ("missing/log.db", "unable to open database file")],
)
def test_the_cli_names_a_store_it_cannot_open(
    tmp_path: Path, upstreams: dict[str, Upstream], where: str, why: str
) -> None:
    config, _ = write_config(tmp_path, upstreams)
    db = tmp_path / where
    if db.parent.exists():
        db.write_bytes(NOT_A_DATABASE)
    settings = yaml.safe_load(config.read_text())
    settings["storage"]["url"] = f"sqlite:///{db}"
    config.write_text(yaml.safe_dump(settings))
    proc = subprocess.run(
        [sys.executable, "-m", "model_gateway", "migrate", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # one line, and nothing else: no traceback, from aiosqlite's thread either
    assert (proc.returncode, proc.stderr) == (
        1,
        f"model-gateway: cannot open the SQLite store {db}: {why}\n",
    )


# the stock edge's supervisor restarts its workers on SIGHUP instead
@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.tuned_edge)])
def test_sighup_reloads_every_worker(
    tmp_path: Path, upstreams: dict[str, Upstream], workers: int
) -> None:
    """1. Start `model-gateway serve` with file watching off.
    2. Point the route at upstream b only and send SIGHUP to the (parent) process.
    3. Every worker answers with the new version; an invalid file then changes nothing.
    """
    config, _ = write_config(tmp_path, upstreams)
    doc = yaml.safe_load(config.read_text())
    doc["server"] = {"config_poll_interval": 0}
    doc["routes"][0]["variants"][1]["weight"] = 0
    config.write_text(yaml.safe_dump(doc))
    gw = GatewayProcess(config, workers)
    try:
        with httpx.Client(timeout=10) as client:

            def versions() -> set[str]:
                # fresh connections, so that both workers are asked
                return {httpx.get(f"{gw.url}/healthz").json()["config_version"] for _ in range(20)}

            (v1,) = versions()
            doc["routes"][0]["variants"][0]["weight"] = 0
            doc["routes"][0]["variants"][1]["weight"] = 1
            config.write_text(yaml.safe_dump(doc))
            gw.proc.send_signal(signal.SIGHUP)
            seen: set[str] = set()

            def reloaded() -> bool:  # every worker on one new version
                seen.clear()
                seen.update(versions())
                return len(seen) == 1 and v1 not in seen

            wait_until(reloaded, "every worker to reload")
            (v2,) = seen
            assert client.get(f"{gw.url}/slow?seconds=0").json()["upstream"] == "b"

            config.write_text("routes: {broken")
            gw.proc.send_signal(signal.SIGHUP)
            wait_until(
                lambda: sum(line.count("failed; version") for line in gw.lines) >= workers,
                "every worker to refuse the broken file",
            )
            assert versions() == {v2}
            assert gw.proc.poll() is None
    finally:
        gw.terminate_and_wait()


@pytest.mark.slow
def test_a_worker_starved_of_cpu_for_seconds_is_not_taken_for_hung(
    tmp_path: Path, upstreams: dict[str, Upstream]
) -> None:
    """A worker that cannot answer the supervisor's ping for a while (on a loaded host, a
    worker starting up starved of CPU; here, stopped for 8 s) is not killed as hung, which
    would reset every client it has: it serves again once it runs."""
    config, _ = write_config(tmp_path, upstreams)
    gw = GatewayProcess(config, 2)
    try:
        wait_until(lambda: started_count(gw) == 2, "both workers to start")
        worker = min(
            pid
            for pid in child_pids(gw.proc.pid)
            if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        )
        with httpx.Client(base_url=gw.url, timeout=30) as client:
            os.kill(worker, signal.SIGSTOP)
            try:
                time.sleep(8)  # the starving itself: longer than uvicorn's 5 s ping timeout
            finally:
                os.kill(worker, signal.SIGCONT)
            assert all(client.get("/healthz").status_code == 200 for _ in range(10))
        assert worker in child_pids(gw.proc.pid)
        assert not any("died" in line for line in gw.lines), "".join(gw.lines)
    finally:
        gw.terminate_and_wait()


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes  # gone meanwhile
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def child_pids(parent: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = stat.read_text().rsplit(")", 1)[1].split()[1]
        except OSError:
            continue  # gone meanwhile
        if ppid == str(parent):
            pids.append(int(stat.parent.name))
    return pids


def _tcp_sockets(port: int) -> dict[str, str]:
    """inode -> state ("0A" listening, "01" established) of IPv4 sockets on local ``port``."""
    found = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            found[fields[9]] = fields[3]
    return found


@pytest.mark.tuned_edge
def test_each_worker_listens_on_its_own_socket_and_connections_spread(
    tmp_path: Path, upstreams: dict[str, Upstream]
) -> None:
    """1. Start `model-gateway serve --workers 2` and wait for both workers.
    2. Each worker holds a listening socket of its own on the one port (SO_REUSEPORT); a
       worker killed is replaced on the same socket.
    3. 32 keep-alive connections opened at once land on both workers (with one shared socket,
       the worker that woke first could take them all), and a request on each is answered.
    """
    config, _ = write_config(tmp_path, upstreams)
    gw = GatewayProcess(config, 2)
    try:
        wait_until(
            lambda: started_count(gw) == 2,
            "both workers to start",
        )
        port = int(gw.url.rsplit(":", 1)[1])
        workers = child_pids(gw.proc.pid)
        listening = {inode for inode, state in _tcp_sockets(port).items() if state == "0A"}
        held = {pid: _socket_inodes(pid) & listening for pid in workers}
        serving = {pid: inodes for pid, inodes in held.items() if inodes}
        assert len(serving) == 2 and len(listening) == 2
        assert all(len(inodes) == 1 for inodes in serving.values())  # one each, not shared

        # a worker that dies is replaced on its own socket
        dead, inodes = next(iter(serving.items()))
        os.kill(dead, signal.SIGKILL)

        def replaced() -> bool:
            return any(
                pid != dead and _socket_inodes(pid) >= inodes for pid in child_pids(gw.proc.pid)
            )

        wait_until(replaced, "a new worker on the dead one's socket")
        wait_until(
            lambda: started_count(gw) == 3,
            "the new worker to start",
        )
        serving = {
            pid: _socket_inodes(pid) & listening
            for pid in child_pids(gw.proc.pid)
            if _socket_inodes(pid) & listening
        }
        assert len(serving) == 2 and dead not in serving

        host = gw.url.removeprefix("http://").rsplit(":", 1)[0]
        connections = [socket.create_connection((host, port), timeout=10) for _ in range(32)]
        try:
            for conn in connections:
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            for conn in connections:
                assert conn.recv(65536).startswith(b"HTTP/1.1 200")
            established = {i for i, state in _tcp_sockets(port).items() if state == "01"}
            per_worker = {pid: len(_socket_inodes(pid) & established) for pid in serving}
            assert sum(per_worker.values()) == 32
            assert min(per_worker.values()) > 0, per_worker  # all on one: 2 in 2^32
        finally:
            for conn in connections:
                conn.close()
    finally:
        gw.terminate_and_wait()
