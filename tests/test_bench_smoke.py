"""The benchmark harness still runs end to end (one short round); no timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

ROOT = Path(__file__).parent.parent


def test_benchmark_harness_runs_and_the_log_is_complete(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--duration",
            "1",
            "--rounds",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    for case in (
        "direct c=1",
        "nginx c=32",
        "bare-proxy c=32",
        "bare-proxy-2w c=32",
        "bare-proxy-1w-20ms c=64",
        "bare-proxy-2w-20ms c=64",
        "session-proxy c=32",
        "starlette-proxy c=32",
        "gateway-1w c=32",
        "gateway-1w-deliveries c=32",
        "gateway-2w c=1",
        "gateway-1w-20ms c=64",
        "gateway-2w-20ms c=64",
        "nginx-20ms c=64",
        "callback-proxy-20ms c=64",
        "callback-task-proxy-20ms c=64",
        "callback-client-proxy-20ms c=64",
        "uvicorn-raw-proxy-20ms c=64",
    ):
        assert results["results"][case]["rps"] > 0, case
    assert results["results"]["gateway-1w c=32"]["cpu_ms_per_request"] > 0
    # how the work was shared between processes is measured (not asserted: one short run)
    assert 0 < results["results"]["gateway-2w c=32"]["busiest_process_share_max"] <= 1
    assert {
        "rps_vs_direct",
        "rps_vs_nginx",
        "rps_vs_bare_proxy",
        "rps_vs_session_proxy",
        "rps_vs_starlette_proxy",
    } <= set(results["ratios"]["gateway-1w c=32"])
    assert {
        "rps_vs_direct",
        "rps_vs_nginx",
        "rps_vs_bare_proxy",
        "rps_vs_callback_proxy",
    } <= set(results["ratios"]["gateway-1w-20ms c=64"])
    assert "rps_vs_none" in results["ratios"]["gateway-1w-deliveries c=32"]
    for name in (
        "callback-proxy-20ms",
        "callback-task-proxy-20ms",
        "callback-client-proxy-20ms",
        "uvicorn-raw-proxy-20ms",
    ):
        assert results["results"][f"{name} c=64"]["cpu_ms_per_request"] > 0, name
        assert "rps_vs_direct" in results["ratios"][f"{name} c=64"], name
    for name, log in results["log_completeness"].items():
        # every response wrk read is logged; the surplus is what was in flight when wrk stopped
        surplus = log["records"] - log["wrk_completed"]
        assert 0 <= surplus <= log["in_flight_at_wrk_stops_at_most"], (name, log)
    # the whole machine's busy cores during each run, and the second worker's ceiling from them
    busy = results["results"]["gateway-1w c=32"]["machine_busy_cores"]
    assert 0 < busy <= (os.cpu_count() or 1) * 1.1  # /proc/stat counts in 10 ms ticks
    scaling = results["ratios"]["2 workers vs 1 c=32"]
    assert {"gateway", "bare_proxy", "gateway_cpu_ceiling", "bare_proxy_cpu_ceiling"} <= set(
        scaling
    )
    assert scaling["gateway_cpu_ceiling"] == (os.cpu_count() or 1) / busy
    assert "gateway-1w c=32" in done.stdout
