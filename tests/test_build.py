"""The hot path runs compiled under ``make test``, as ``make run`` and a wheel run it."""

from __future__ import annotations

import os

import pytest

from .compiled import compiled_module_names, loaded_from_extension


@pytest.mark.skipif(
    not os.environ.get("MODEL_GATEWAY_EXPECT_COMPILED"),
    reason="the suite runs on plain Python here (make test sets MODEL_GATEWAY_EXPECT_COMPILED)",
)
def test_every_hot_path_module_runs_compiled() -> None:
    names = compiled_module_names()
    assert "model_gateway.proxy" in names
    plain = [name for name in names if not loaded_from_extension(name)]
    assert plain == [], f"built by setup.py but imported as plain Python: {plain}"
