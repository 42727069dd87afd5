"""The gateway's cost, measured side by side: wrk against a direct call, nginx, and the gateway.

Run with ``make bench``. Targets run alternately (A B A B …) in each round so that drift of
the machine affects them alike; each figure is the median over rounds. Results go to
``benchmarks/results/latest.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
V2_BODY = (
    '{"model_name":"fraud","model_version":"1","outputs":[{"name":"score","datatype":"FP32",'
    '"shape":[1],"data":[0.42]},{"name":"label","datatype":"INT64","shape":[1],"data":[0]}]}'
)
PATH = "/v2/models/fraud/infer"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"  # root's PATH may lack /usr/sbin
# Debian's libnginx-mod-http-echo: echo_sleep makes nginx a 20 ms model server that costs
# almost no CPU, so the gateway, not a busy upstream, is what the 20 ms case measures.
ECHO_MODULE = "/usr/lib/nginx/modules/ngx_http_echo_module.so"
SLOW_SECONDS = 0.020


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def cpu_by_process(pid: int) -> dict[int, float]:
    """User + system CPU seconds of a process and of each of its descendants (the workers and
    their SQLite log processes)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents, cpu = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        proc_pid = int(stat.parent.name)
        parents[proc_pid] = int(fields[1])
        cpu[proc_pid] = (int(fields[11]) + int(fields[12])) / tick
    found = {}
    for proc_pid in cpu:
        ancestor = proc_pid
        while ancestor > 1 and ancestor != pid:
            ancestor = parents.get(ancestor, 0)
        if ancestor == pid:
            found[proc_pid] = cpu[proc_pid]
    return found


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, every core summed, from the first
    line of /proc/stat: busy is user, nice, system, irq and softirq time; steal is time the
    hypervisor gave the virtual CPUs to someone else."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) / tick, steal / tick


class Service:
    def __init__(
        self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None
    ) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        wait_for_port(port)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def nginx(
    workdir: Path, name: str, server_block: str, modules: tuple[str, ...] = ()
) -> tuple[list[str], Path]:
    prefix = workdir / name
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    load = "".join(f"load_module {module};\n" for module in modules)
    conf.write_text(
        f"""
{load}worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    {server_block}
}}
"""
    )
    return [NGINX, "-p", str(prefix), "-c", str(conf)], prefix


def fast_upstream(workdir: Path, fast: int, fast2: int) -> Service:
    """nginx answering every request at once with the V2 body, on two ports (two variants)."""
    cmd, _ = nginx(
        workdir,
        "upstream",
        f"""
    access_log off;
    server {{
        listen 127.0.0.1:{fast}; listen 127.0.0.1:{fast2};
        location / {{ default_type application/json; return 200 '{V2_BODY}'; }}
    }}""",
    )
    return Service("fast upstream (nginx)", cmd, fast)


def nginx_proxy(workdir: Path, name: str, port: int, first: int, second: int) -> Service:
    """nginx as the reference proxy: a 90/10 weighted split over two upstream ports (the same
    port twice for the 20 ms model), keep-alive to them, an access log on every request."""
    cmd, _ = nginx(
        workdir,
        name,
        f"""
    log_format main '$remote_addr [$time_local] "$request" $status $body_bytes_sent $request_time $upstream_addr';
    access_log {workdir}/{name}/logs/access.log main;
    upstream models {{ server 127.0.0.1:{first} weight=90; server 127.0.0.1:{second} weight=10; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://models; proxy_http_version 1.1; proxy_set_header Connection "";
        }}
    }}""",
    )
    return Service(f"nginx {name}", cmd, port)


def gateway_command(config: Path, port: int, workers: int = 1) -> list[str]:
    return [
        *(sys.executable, "-m", "model_gateway", "serve", "--config", str(config)),
        *("--port", str(port), "--workers", str(workers)),
    ]


def bare_proxy_command(
    port: int, upstream_url: str, kind: str = "lean", workers: int = 1
) -> list[str]:
    """``kind``: "lean" (the floor: the gateway's upstream client and nothing else), "asgi"
    (the same on aiohttp's ``ClientSession``), "starlette" (that behind Starlette) or "raw"
    (uvicorn in front of a raw httptools upstream connection, no aiohttp)."""
    command = [sys.executable, str(HERE / "bare_proxy.py"), str(port), upstream_url, kind]
    return [*command, str(workers)]


def start_workers(name: str, command: list[str], port: int, workers: int, marker: bytes) -> Service:
    """A server on ``port`` once every one of its workers has logged ``marker`` and it answers.

    Every worker, not the first: connections opened while only one worker listens all stay
    with it, and a first round measured so is one worker's figure under a two-worker name.
    """
    service = Service(name, command, port)
    started = threading.Semaphore(0)
    lines: list[bytes] = []

    def read_log() -> None:  # and keep reading, so that the pipe never fills
        assert service.proc.stderr is not None
        for line in service.proc.stderr:
            lines.append(line)
            # workers share the pipe: two writes can meet on one line, so count occurrences
            for _ in range(line.count(marker)):
                started.release()

    threading.Thread(target=read_log, daemon=True).start()
    deadline = time.monotonic() + 60
    for _ in range(workers):
        if not started.acquire(timeout=max(0.0, deadline - time.monotonic())):
            log = b"".join(lines[-40:]).decode(errors="replace")
            raise RuntimeError(f"{name}: not every worker started; its log ends:\n{log}")
    return service


def start_gateway(name: str, config: Path, workers: int) -> Service:
    """`model-gateway serve` on a free port, every worker started and /healthz answering."""
    port = free_port()
    command = gateway_command(config, port, workers)
    service = start_workers(name, command, port, workers, b"model-gateway started")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{service.url}/healthz", timeout=1).status_code == 200:
                return service
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not become healthy")


def start_bare_proxy(name: str, upstream_url: str, kind: str, workers: int) -> Service:
    port = free_port()
    command = bare_proxy_command(port, upstream_url, kind, workers)
    return start_workers(name, command, port, workers, b"bare proxy started")


def start_callback_proxy(upstream_port: int, mode: str = "callbacks") -> Service:
    """``mode``: "callbacks", "task" or "client" (``callback_proxy.py``)."""
    port = free_port()
    script = str(HERE / "callback_proxy.py")
    command = [sys.executable, script, str(port), "127.0.0.1", str(upstream_port), mode]
    return start_workers(f"callback proxy ({mode})", command, port, 1, b"callback proxy started")


@dataclass
class Run:
    target: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    cpu_ms_per_request: float | None = None
    #: the busiest process's share of the CPU the run took: ~1/N when N workers share the
    #: load evenly, ~1 when one worker served every connection
    busiest_share: float | None = None
    #: cores the whole machine kept busy during the run (gateway, wrk, upstream and the rest)
    machine_busy_cores: float | None = None
    #: cores' worth of time the hypervisor took away during the run
    machine_steal_cores: float | None = None


@dataclass
class Target:
    name: str
    url: str
    pid: int | None = None
    db: Path | None = None
    completed: int = 0
    connections_used: int = 0
    workers: int = 1
    runs: list[Run] = field(default_factory=list)


def wrk(url: str, connections: int, duration: float) -> tuple[float, float, float, int]:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            "-s",
            str(HERE / "post.lua"),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]

    def percentile(p: str) -> float:
        value, unit = re.search(rf"{p}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} error responses\n{out}")
    return rps, percentile("50"), percentile("99"), requests


#: a rollout at its first step that looks at its gates every second (it never advances: the
#: benchmark's step lasts longer than its runs), to count what its looks cost the gateway
ROLLOUT = """
    rollout:
      id: bench
      challenger: challenger
      steps: [10, 100]
      step_seconds: 3600
      interval: 1
      gates:
        error_ratio: {max: 0.05}
        p99_latency: {max_ms: 500, max_ratio: 2}
        score_shift: {max_psi: 0.25}
        quality: true
"""


#: ten features read from each request (the benchmark's V2 body: its four columns, and six
#: values by pointer) and the score, their statistics over two windows at the default
#: interval: what monitoring costs the gateway
MONITORING = """
    monitoring:
      interval: 60
      windows: [5m, 1h]
      features:
        - {name: f0, input: features, column: 0, range: [-5, 5]}
        - {name: f1, input: features, column: 1, range: [-5, 5]}
        - {name: f2, input: features, column: 2, range: [-5, 5]}
        - {name: f3, input: features, column: 3, range: [-5, 5]}
        - {name: rows, pointer: /inputs/0/shape/0}
        - {name: width, pointer: /inputs/0/shape/1}
        - {name: first, pointer: /inputs/0/data/0}
        - {name: last, pointer: /inputs/0/data/3}
        - {name: input, pointer: /inputs/0/name, kind: categorical}
        - {name: datatype, pointer: /inputs/0/datatype, kind: categorical}
"""


#: a delivery every ten seconds (360 times the default's hour), a CSV of the ten seconds'
#: predictions and a labelling sample beside it: what deliveries cost the gateway
DELIVERIES = """
deliveries:
  - name: bench
    route: fraud
    directory: {directory}
    every: 10s
    sample: {{n: 20}}
"""


def gateway_config(
    workdir: Path,
    name: str,
    fast: int,
    fast2: int,
    durability: str = "buffered",
    rollout: bool = False,
    monitoring: bool = False,
    deliveries: bool = False,
    costs: bool = False,
) -> tuple[Path, Path]:
    db = workdir / f"{name}.db"
    config = workdir / f"{name}.yaml"
    spool = workdir / f"{name}-spool"
    # a miss costing the amount read from each request (its first value, as the benchmark's
    # body has no amount): what reading a cost from the request costs
    amount = ", costs: {false_positive: 5, false_negative: {pointer: /inputs/0/data/0}}"
    config.write_text(
        f"""
server: {{config_poll_interval: 0}}
storage: {{url: "sqlite:///{db}", durability: {durability}, spool_path: "{spool}"}}
routes:
  - name: fraud
    path: /v2/models/fraud
    evaluation: {{task: binary, prediction: /outputs/1/data/0, score: /outputs/0/data/0{amount if costs else ""}}}
    variants:
      - {{name: champion, url: "http://127.0.0.1:{fast}", model_version: "1", weight: 90}}
      - {{name: challenger, url: "http://127.0.0.1:{fast2}", model_version: "2", weight: 10}}
"""
        + (ROLLOUT if rollout else "")
        + (MONITORING if monitoring else "")
        + (DELIVERIES.format(directory=workdir / f"{name}-deliveries") if deliveries else "")
    )
    return config, db


def records(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        return {
            str(status): int(count)
            for status, count in conn.execute(
                "SELECT status, COUNT(*) FROM predictions GROUP BY status"
            )
        }
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="A B A B rounds")
    parser.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    args = parser.parse_args()

    services: list[Service] = []
    gateways: list[tuple[Service, Target]] = []
    with tempfile.TemporaryDirectory(prefix="model-gateway-bench-") as tmp:
        workdir = Path(tmp)
        try:
            fast, fast2, slow, proxy = free_port(), free_port(), free_port(), free_port()
            services.append(fast_upstream(workdir, fast, fast2))
            cmd, _ = nginx(
                workdir,
                "slow",
                f"""
    access_log off;
    server {{
        listen 127.0.0.1:{slow};
        location / {{ echo_sleep {SLOW_SECONDS}; echo_exec /answer; }}
        location = /answer {{ internal; default_type application/json; return 200 '{V2_BODY}'; }}
    }}""",
                modules=(ECHO_MODULE,),
            )
            services.append(Service("20 ms upstream (nginx echo_sleep)", cmd, slow))
            services.append(nginx_proxy(workdir, "proxy", proxy, fast, fast2))

            targets = [
                Target("direct", f"http://127.0.0.1:{fast}{PATH}"),
                Target("nginx", f"http://127.0.0.1:{proxy}{PATH}"),
            ]
            # the floors: the same stack with nothing else, one worker and two; and the usual
            # ways to write such a proxy, on aiohttp's session, plain and behind Starlette
            for kind, workers, name in (
                ("lean", 1, "bare-proxy"),
                ("asgi", 1, "session-proxy"),
                ("starlette", 1, "starlette-proxy"),
                ("lean", 2, "bare-proxy-2w"),
            ):
                url = f"http://127.0.0.1:{fast}"
                services.append(
                    start_bare_proxy(f"bare {kind} proxy x{workers}", url, kind, workers)
                )
                pid = services[-1].proc.pid
                targets.append(Target(name, services[-1].url + PATH, pid, workers=workers))
            for workers in (1, 2):
                config, db = gateway_config(workdir, f"gw{workers}", fast, fast2)
                service = start_gateway(f"gateway x{workers}", config, workers)
                target = Target(
                    f"gateway-{workers}w", service.url + PATH, service.proc.pid, db, workers=workers
                )
                gateways.append((service, target))
                targets.append(target)
            # the same gateway with every record on disk before its answer leaves
            config, db = gateway_config(workdir, "gw1-durable", fast, fast2, "answered")
            service = start_gateway("gateway x1 (durability answered)", config, 1)
            target = Target("gateway-1w-durable", service.url + PATH, service.proc.pid, db)
            gateways.append((service, target))
            targets.append(target)
            slow_targets = [Target("direct-20ms", f"http://127.0.0.1:{slow}{PATH}")]
            # the same gateway with a rollout looking at its gates every second
            config, db = gateway_config(workdir, "gw1-rollout", fast, fast2, rollout=True)
            service = start_gateway("gateway x1 (a rollout looking each second)", config, 1)
            target = Target("gateway-1w-rollout", service.url + PATH, service.proc.pid, db)
            gateways.append((service, target))
            targets.append(target)
            # the same gateway monitoring ten features and the score
            config, db = gateway_config(workdir, "gw1-monitoring", fast, fast2, monitoring=True)
            service = start_gateway("gateway x1 (monitoring ten features)", config, 1)
            target = Target("gateway-1w-monitoring", service.url + PATH, service.proc.pid, db)
            gateways.append((service, target))
            targets.append(target)
            # the same gateway delivering a file of predictions every ten seconds
            config, db = gateway_config(workdir, "gw1-deliveries", fast, fast2, deliveries=True)
            service = start_gateway("gateway x1 (a delivery each ten seconds)", config, 1)
            target = Target("gateway-1w-deliveries", service.url + PATH, service.proc.pid, db)
            gateways.append((service, target))
            targets.append(target)
            # what a proxy in C and a proxy of bare callbacks on the same loop make of the
            # 20 ms case: the stack's share of the gap, apart from the gateway's
            services.append(nginx_proxy(workdir, "proxy-20ms", free_port(), slow, slow))
            slow_targets.append(Target("nginx-20ms", services[-1].url + PATH))
            services.append(start_callback_proxy(slow))
            pid = services[-1].proc.pid
            slow_targets.append(Target("callback-proxy-20ms", services[-1].url + PATH, pid))
            # the bare proxy's two halves apart: a task per request on bare callbacks, then
            # with aiohttp behind (the gateway's upstream client), then uvicorn in front
            for mode in ("task", "client"):
                services.append(start_callback_proxy(slow, mode))
                pid = services[-1].proc.pid
                name = f"callback-{mode}-proxy-20ms"
                slow_targets.append(Target(name, services[-1].url + PATH, pid))
            url = f"http://127.0.0.1:{slow}"
            services.append(start_bare_proxy("uvicorn raw proxy (20 ms upstream)", url, "raw", 1))
            pid = services[-1].proc.pid
            slow_targets.append(Target("uvicorn-raw-proxy-20ms", services[-1].url + PATH, pid))
            for workers in (1, 2):
                url = f"http://127.0.0.1:{slow}"
                name = f"bare proxy x{workers} (20 ms upstream)"
                services.append(start_bare_proxy(name, url, "lean", workers))
                slow_targets.append(
                    Target(
                        f"bare-proxy-{workers}w-20ms",
                        services[-1].url + PATH,
                        services[-1].proc.pid,
                        workers=workers,
                    )
                )
            for workers in (1, 2):
                config, db = gateway_config(workdir, f"gw{workers}-slow", slow, slow)
                service = start_gateway(f"gateway x{workers} (20 ms upstream)", config, workers)
                target = Target(
                    f"gateway-{workers}w-20ms",
                    service.url + PATH,
                    service.proc.pid,
                    db,
                    workers=workers,
                )
                gateways.append((service, target))
                slow_targets.append(target)

            plan = [(t, c) for c in (1, 32) for t in targets] + [(t, 64) for t in slow_targets]
            for target, _ in plan:  # warm pools and caches
                target.completed += wrk(target.url, 8, min(1.0, args.duration))[3]
                target.connections_used += 8
            for round_no in range(args.rounds):
                for target, connections in plan:
                    before = cpu_by_process(target.pid) if target.pid else {}
                    machine_before, started = machine_cpu(), time.monotonic()
                    rps, p50, p99, n = wrk(target.url, connections, args.duration)
                    elapsed = time.monotonic() - started
                    machine_after = machine_cpu()
                    busy_cores = (machine_after[0] - machine_before[0]) / elapsed
                    steal_cores = (machine_after[1] - machine_before[1]) / elapsed
                    cpu = busiest = None
                    if target.pid and n:
                        after = cpu_by_process(target.pid)
                        spent = [after[p] - before.get(p, 0.0) for p in after]
                        cpu = sum(spent) * 1000 / n
                        busiest = max(spent) / sum(spent) if sum(spent) > 0 else None
                    target.completed += n
                    target.connections_used += connections
                    run = Run(
                        *(target.name, connections, rps, p50, p99, n, cpu, busiest),
                        *(busy_cores, steal_cores),
                    )
                    target.runs.append(run)
                    # with several connections per worker, the load should be shared
                    spread = target.workers > 1 and connections >= 8 * target.workers
                    if spread and busiest is not None and busiest > 0.75:
                        print(
                            f"warning: {target.name} c={connections}: one process did "
                            f"{busiest:.0%} of the work (workers unevenly loaded)",
                            file=sys.stderr,
                        )
                    print(
                        f"round {round_no + 1} {target.name:>16} c={connections:<3} {rps:>9.0f} req/s  p50 {p50:.3f} ms  p99 {p99:.3f} ms",
                        file=sys.stderr,
                    )
        finally:
            for service, _ in gateways:
                service.stop()
            for service in services:
                service.stop()
        # every gateway was stopped gracefully: its log must hold every request wrk completed
        # wrk counts the responses it read before its timer ran out; the requests still in
        # flight then (at most one per connection per run) reach the log but not wrk's count.
        completeness = {}
        for _, target in gateways:
            assert target.db is not None
            by_status = records(target.db)
            completeness[target.name] = {
                "wrk_completed": target.completed,
                "records": sum(by_status.values()),
                "records_by_status": by_status,
                "in_flight_at_wrk_stops_at_most": target.connections_used,
            }

    results = summarise([*targets, *slow_targets], completeness, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return 0


def median_run(target: Target, connections: int) -> dict[str, Any] | None:
    runs = [r for r in target.runs if r.connections == connections]
    if not runs:
        return None
    cpu = [r.cpu_ms_per_request for r in runs if r.cpu_ms_per_request is not None]
    busiest = [r.busiest_share for r in runs if r.busiest_share is not None]
    busy = [r.machine_busy_cores for r in runs if r.machine_busy_cores is not None]
    return {
        "rps": statistics.median(r.rps for r in runs),
        "p50_ms": statistics.median(r.p50_ms for r in runs),
        "p99_ms": statistics.median(r.p99_ms for r in runs),
        "cpu_ms_per_request": statistics.median(cpu) if cpu else None,
        # the most uneven run: ~0.5 with two workers sharing the load, ~1 with one doing it all
        "busiest_process_share_max": max(busiest) if busiest else None,
        "machine_busy_cores": statistics.median(busy) if busy else None,
        "runs": [r.__dict__ for r in runs],
    }


def summarise(
    targets: list[Target], completeness: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {}
    for target in targets:
        for c in (1, 32, 64):
            m = median_run(target, c)
            if m:
                table[f"{target.name} c={c}"] = m
    ratios = {}
    for gw, bare in (("gateway-1w", "bare-proxy"), ("gateway-2w", "bare-proxy-2w")):
        for c in (1, 32):
            g, d, n = table[f"{gw} c={c}"], table[f"direct c={c}"], table[f"nginx c={c}"]
            ratios[f"{gw} c={c}"] = {
                "rps_vs_direct": g["rps"] / d["rps"],
                "rps_vs_nginx": g["rps"] / n["rps"],
                # against the bare proxy with as many workers
                "rps_vs_bare_proxy": g["rps"] / table[f"{bare} c={c}"]["rps"],
                "rps_vs_session_proxy": g["rps"] / table[f"session-proxy c={c}"]["rps"],
                "rps_vs_starlette_proxy": g["rps"] / table[f"starlette-proxy c={c}"]["rps"],
                "added_p50_ms_vs_direct": g["p50_ms"] - d["p50_ms"],
            }
    d, n = table["direct-20ms c=64"], table["nginx-20ms c=64"]
    callbacks = table["callback-proxy-20ms c=64"]
    for workers in (1, 2):
        bare = table[f"bare-proxy-{workers}w-20ms c=64"]
        for name in (f"gateway-{workers}w-20ms", f"bare-proxy-{workers}w-20ms"):
            g = table[f"{name} c=64"]
            ratios[f"{name} c=64"] = {
                "rps_vs_direct": g["rps"] / d["rps"],
                "rps_vs_nginx": g["rps"] / n["rps"],
                "rps_vs_bare_proxy": g["rps"] / bare["rps"],
                "rps_vs_callback_proxy": g["rps"] / callbacks["rps"],
                "added_p50_ms_vs_direct": g["p50_ms"] - d["p50_ms"],
            }
    for name in (
        "nginx-20ms",
        "callback-proxy-20ms",
        "callback-task-proxy-20ms",
        "callback-client-proxy-20ms",
        "uvicorn-raw-proxy-20ms",
    ):
        g = table[f"{name} c=64"]
        ratios[f"{name} c=64"] = {
            "rps_vs_direct": g["rps"] / d["rps"],
            "added_p50_ms_vs_direct": g["p50_ms"] - d["p50_ms"],
        }
    # durability answered (a spool synced before each answer) against buffered, same run
    for c in (1, 32):
        durable, buffered = table[f"gateway-1w-durable c={c}"], table[f"gateway-1w c={c}"]
        ratios[f"gateway-1w-durable c={c}"] = {
            "rps_vs_buffered": durable["rps"] / buffered["rps"],
            "added_p50_ms_vs_buffered": durable["p50_ms"] - buffered["p50_ms"],
        }
    # a rollout looking at its gates every second, monitoring ten features (read by the
    # log, statistics each minute), and a delivery each ten seconds, each against the same
    # gateway without, same run
    for feature in ("rollout", "monitoring", "deliveries"):
        for c in (1, 32):
            on, off = table[f"gateway-1w-{feature} c={c}"], table[f"gateway-1w c={c}"]
            ratios[f"gateway-1w-{feature} c={c}"] = {
                "rps_vs_none": on["rps"] / off["rps"],
                "added_p50_ms_vs_none": on["p50_ms"] - off["p50_ms"],
            }
    # How far a second worker carries each on these shared cores, and how far it could: if
    # every request costs the machine as much CPU (gateway, wrk, upstream) as it did with one
    # worker, all the cores serve at most cores / (cores busy with one worker) times as many.
    cores = os.cpu_count() or 1
    ratios["2 workers vs 1 c=32"] = {
        "gateway": table["gateway-2w c=32"]["rps"] / table["gateway-1w c=32"]["rps"],
        "bare_proxy": table["bare-proxy-2w c=32"]["rps"] / table["bare-proxy c=32"]["rps"],
    }
    for name, one in (("gateway", "gateway-1w c=32"), ("bare_proxy", "bare-proxy c=32")):
        busy = table[one]["machine_busy_cores"]
        if busy:
            ratios["2 workers vs 1 c=32"][f"{name}_cpu_ceiling"] = cores / busy
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "settings": {"duration_s": args.duration, "rounds": args.rounds, "wrk_threads": 1},
        "results": table,
        "ratios": ratios,
        "log_completeness": completeness,
    }


NAME_WIDTH = 34  # the longest case name, "callback-client-proxy-20ms c=64", and a gap


def print_table(results: dict[str, Any]) -> None:
    print(
        f"{'case':<{NAME_WIDTH}}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'CPU ms/req':>12}"
        f"{'machine cores busy':>20}"
    )
    for name, r in results["results"].items():
        cpu = f"{r['cpu_ms_per_request']:.3f}" if r["cpu_ms_per_request"] is not None else "-"
        busy = f"{r['machine_busy_cores']:.2f}" if r["machine_busy_cores"] is not None else "-"
        print(
            f"{name:<{NAME_WIDTH}}{r['rps']:>10.0f}{r['p50_ms']:>10.3f}{r['p99_ms']:>10.3f}{cpu:>12}"
            f"{busy:>20}"
        )
    print()
    for name, r in results["ratios"].items():
        print(f"{name:<{NAME_WIDTH}}" + "  ".join(f"{k} {v:.3f}" for k, v in r.items()))
    print()
    for name, c in results["log_completeness"].items():
        print(
            f"log {name:<22} wrk completed {c['wrk_completed']}, records {c['records']} "
            f"{c['records_by_status']} (in flight at wrk stops <= {c['in_flight_at_wrk_stops_at_most']})"
        )


if __name__ == "__main__":
    sys.exit(main())
