"""The hot path runs compiled under ``make test``, as ``make run`` and a wheel run it."""

from __future__ import annotations

import os

import pytest

from .compiled import SRC, compiled_module_names, extensions, loaded_from_extension


@pytest.mark.skipif(
    not os.environ.get("MODEL_GATEWAY_EXPECT_COMPILED"),
    reason="for `make test`, which sets MODEL_GATEWAY_EXPECT_COMPILED",
)
def test_every_hot_path_module_runs_compiled() -> None:
    names = compiled_module_names()
    assert "model_gateway.proxy" in names
    plain = [name for name in names if not loaded_from_extension(name)]
    assert plain == [], f"built by setup.py but imported as plain Python: {plain}"


@pytest.mark.skipif(
    not os.environ.get("MODEL_GATEWAY_EXPECT_PURE"),
    reason="for `make test-pure`, which sets MODEL_GATEWAY_EXPECT_PURE",
)
def test_every_hot_path_module_runs_as_plain_python_under_make_test_pure() -> None:
    names = compiled_module_names()
    built = [name for name in names if loaded_from_extension(name)]
    assert built == [], f"imported compiled where plain Python was asked for: {built}"


def test_no_extension_outlives_its_place_in_setup_py() -> None:
    # an extension left beside a module setup.py no longer compiles would still be imported
    # in place of that module's source
    compiled = {name.removeprefix("model_gateway.") for name in compiled_module_names()}
    package = SRC / "model_gateway"
    built = {
        ".".join(path.relative_to(package).with_name(path.name.split(".")[0]).parts)
        for path in extensions()
        if path.parent != SRC  # mypyc's shared library for the group, beside the package
    }
    assert built - compiled == set()
