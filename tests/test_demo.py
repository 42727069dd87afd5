"""`make run`'s command: the demo starts, and the curl line it prints works as printed."""

from __future__ import annotations

import re
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_prints_a_curl_line_that_works(tmp_path: Path) -> None:
    """1. Take the shipped example config, moved to free ports and a temporary log.
    2. Run `model-gateway demo`; it starts both demo model servers and the gateway.
    3. Run the curl command it printed, as printed: a V2 answer with the gateway's headers.
    """
    example = yaml.safe_load((Path(__file__).parent.parent / "config" / "gateway.yaml").read_text())
    example["storage"]["url"] = f"sqlite:///{tmp_path / 'demo.db'}"
    for variant in [*example["routes"][0]["variants"], *example["routes"][0]["shadows"]]:
        variant["url"] = f"http://127.0.0.1:{free_port()}"
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(example))

    proc = subprocess.Popen(
        [sys.executable, "-m", "model_gateway", "demo", "--config", str(config), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        printed = []
        for line in proc.stdout:
            printed.append(line)
            if line.strip().startswith("-d "):
                break
        text = "".join(printed)
        assert text.count("demo model server: fraud version") == 3, text  # and the shadow
        command = text[text.index("curl") :]
        answer = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout.startswith("HTTP/1.1 200")
        headers = answer.stdout.lower()
        assert re.search(r"x-model-variant: (champion|challenger)", headers)
        assert re.search(r"x-model-version: [12]", headers)
        assert '"model_name":"fraud"' in answer.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()
    # the shadow answered a copy of that request; its record names the live prediction
    prediction_id = re.search(r"x-prediction-id: (\S+)", headers)
    assert prediction_id is not None
    db = sqlite3.connect(tmp_path / "demo.db")
    try:
        copies = db.execute(
            "SELECT variant, configured_version FROM predictions WHERE shadow_of = ?",
            (prediction_id.group(1),),
        ).fetchall()
    finally:
        db.close()
    assert copies == [("candidate", "3")]
