"""A serving process settles its heap once it has started: frozen survivors, a larger young
threshold. Checked in fresh interpreters, since the settings are process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from model_gateway.heap import YOUNG_THRESHOLD

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STARTUP = """
import asyncio, gc, json, sys
from model_gateway.app import GatewayApp
from model_gateway.config import load_config

async def main(settle):
    default = gc.get_threshold()[0]
    app = GatewayApp(load_config(sys.argv[1]), settle_heap=settle)
    await app.startup()
    try:
        threshold, frozen = gc.get_threshold()[0], gc.get_freeze_count()
        return {"default": default, "threshold": threshold, "frozen": frozen}
    finally:
        await app.shutdown()

print(json.dumps(asyncio.run(main(sys.argv[2] == "settle"))))
"""


def started(config: Path, mode: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", STARTUP, str(config), mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_a_serving_gateway_freezes_its_heap_and_an_embedded_one_does_not(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"""
storage: {{url: "sqlite:///{tmp_path / "log.db"}"}}
routes:
  - name: r
    path: /r
    variants: [{{name: a, url: "http://127.0.0.1:9", model_version: "1", weight: 1}}]
"""
    )
    settled = started(config, "settle")
    assert settled["threshold"] == YOUNG_THRESHOLD
    assert settled["frozen"] > 10_000  # the imports and the configuration
    embedded = started(config, "embedded")
    assert embedded["threshold"] == embedded["default"] != YOUNG_THRESHOLD
    assert embedded["frozen"] == 0
