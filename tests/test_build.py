"""The hot path runs compiled under ``make test``, as ``make run`` and a wheel run it, and as
plain Python under ``make test-pure``, as a ``MODEL_GATEWAY_PURE=1`` install runs it."""

from __future__ import annotations

import os

import pytest

from .compiled import SRC, compiled_module_names, extensions, loaded_from_extension

#: what the make target running the suite asks for: `make test` compiled, `make test-pure` plain
EXPECTED = (
    "compiled"
    if os.environ.get("MODEL_GATEWAY_EXPECT_COMPILED")
    else "plain"
    if os.environ.get("MODEL_GATEWAY_EXPECT_PURE")
    else None
)


@pytest.mark.skipif(EXPECTED is None, reason="run by `make test` or `make test-pure`")
def test_every_hot_path_module_runs_as_the_make_target_asked() -> None:
    names = compiled_module_names()
    assert "model_gateway.proxy" in names
    wrong = [name for name in names if loaded_from_extension(name) != (EXPECTED == "compiled")]
    assert wrong == [], f"asked for {EXPECTED} modules, imported otherwise: {wrong}"


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
