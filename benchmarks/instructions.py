"""Instructions per proxied request, counted by callgrind: the gateway against the bare proxies.

Run with ``make bench-instructions``. Wall-clock figures on a shared two-core machine drift by
tens of percent from one minute to the next; an instruction count does not. Each server runs
under ``valgrind --tool=callgrind`` with instrumentation off while it starts and warms up,
then on for exactly ``--requests`` requests (a fixed-count client at concurrency 16), then off
again after the gateway's log writer has caught up. Every thread of the server is counted, and
its SQLite log process: the event loop, the log, everything. What this leaves out is the
kernel's share (system calls, context switches), which ``make bench`` sees as CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # the wrk benchmark's helpers: nginx, ports, the gateway's config

CONCURRENCY = 16
WARM_UP_REQUESTS = 300
BODY = b'{"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1.2, 0.4, 2.0, 0.1]}]}'


async def send_requests(url: str, count: int) -> None:
    left = count

    async with aiohttp.ClientSession() as session:

        async def one_connection() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(
                    url, data=BODY, headers={"Content-Type": "application/json"}
                ) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{url} answered {response.status}")

        await asyncio.gather(*(one_connection() for _ in range(CONCURRENCY)))


def callgrind_control(*args: str) -> None:
    subprocess.run(
        ["callgrind_control", *args],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def count(
    name: str, command: list[str], port: int, ready_path: str, requests: int, out: Path
) -> float:
    """Instructions per request of one server started by ``command``."""
    server = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            "--trace-children=yes",  # the SQLite store's log process
            f"--callgrind-out-file={out}.%p",
            *command,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # starting under valgrind is slow
        while True:
            try:
                httpx.get(url + ready_path, timeout=5)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"{name} did not start under valgrind") from None
                time.sleep(0.5)
        asyncio.run(send_requests(url + run.PATH, WARM_UP_REQUESTS))  # pools and caches
        pids = [str(p) for p in run.cpu_by_process(server.pid)]  # with its log process
        for pid in pids:
            callgrind_control("--instr=on", pid)
        asyncio.run(send_requests(url + run.PATH, requests))
        time.sleep(2)  # the log writer takes what is queued
        for pid in pids:
            callgrind_control("--instr=off", pid)
            callgrind_control("--dump", pid)
    finally:
        server.terminate()
        server.wait(timeout=120)
    total = 0
    for dump in sorted(out.parent.glob(out.name + "*")):
        for line in dump.read_text().splitlines():
            if line.startswith("totals:"):
                part = int(line.split()[1])
                if part:  # a process's share: the server's own, its log process's
                    print(f"  {name} {dump.name}: {part / requests / 1000:.1f} k", flush=True)
                total += part
    return total / requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--out", default=str(run.HERE / "results" / "instructions.json"))
    parser.add_argument(
        "--gateway-only",
        action="store_true",
        help="count the gateway alone and print it, writing nothing (to compare two builds)",
    )
    parser.add_argument(
        "--monitoring",
        action="store_true",
        help="the gateway monitoring ten features (run.MONITORING), to count what it costs",
    )
    parser.add_argument(
        "--costs",
        action="store_true",
        help="the gateway reading what a miss costs from each request, to count what it costs",
    )
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="model-gateway-instructions-") as tmp:
        workdir = Path(tmp)
        fast, fast2 = run.free_port(), run.free_port()
        upstream = run.fast_upstream(workdir, fast, fast2)
        try:
            bare_proxies = (
                ("lean", "bare-proxy"),
                ("asgi", "session-proxy"),
                ("starlette", "starlette-proxy"),
            )
            for kind, name in () if args.gateway_only else bare_proxies:
                port = run.free_port()
                bare = run.bare_proxy_command(port, f"http://127.0.0.1:{fast}", kind)
                results[name] = count(name, bare, port, "/", args.requests, workdir / f"{name}.cg")
            config, db = run.gateway_config(
                workdir, "gw", fast, fast2, monitoring=args.monitoring, costs=args.costs
            )
            port = run.free_port()
            gateway = run.gateway_command(config, port)
            results["gateway-1w"] = count(
                "gateway", gateway, port, "/healthz", args.requests, workdir / "gw.cg"
            )
            # the counted run must have done all its work: every request is in the log
            logged = sum(run.records(db).values())
            if logged != WARM_UP_REQUESTS + args.requests:
                raise RuntimeError(
                    f"{logged} records for {WARM_UP_REQUESTS + args.requests} requests"
                )
        finally:
            upstream.stop()
    if args.gateway_only:
        print(f"gateway-1w {results['gateway-1w'] / 1000:8.1f} k instructions per request")
        return 0
    summary = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "requests": args.requests,
        "instructions_per_request": results,
        "gateway_vs_bare_proxy": results["gateway-1w"] / results["bare-proxy"],
        "gateway_vs_session_proxy": results["gateway-1w"] / results["session-proxy"],
        "gateway_vs_starlette_proxy": results["gateway-1w"] / results["starlette-proxy"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    for name, value in results.items():
        print(f"{name:<16} {value / 1000:8.1f} k instructions per request")
    print(f"gateway / bare proxy: {summary['gateway_vs_bare_proxy']:.2f}")
    print(f"gateway / session proxy: {summary['gateway_vs_session_proxy']:.2f}")
    print(f"gateway / Starlette proxy: {summary['gateway_vs_starlette_proxy']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
