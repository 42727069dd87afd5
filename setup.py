"""The hot path's modules compiled to C extensions with mypyc; everything else in pyproject.toml.

Each request runs the code of these modules and little else of the gateway's own, so they are
compiled (benchmarks/README.md, tenth round: 15 % fewer instructions per request in the
gateway's process, 15 % less CPU per request under load). mypyc compiles the same source that
``mypy --strict`` checks, and checks at run time the types that source declares. Every other
module runs as plain Python, and so do these where no extension was built:
``MODEL_GATEWAY_PURE=1 pip install .`` builds none.
"""

from __future__ import annotations

import os

from setuptools import setup

# The modules a proxied request runs through. Left out: modules whose classes tests or other
# code extend or patch at run time (a compiled class takes neither), the SQLite log process's
# script (run by its path), and the configuration's pydantic models.
COMPILED = (
    "active",
    "answers",
    "app",
    "features",
    "headers",
    "health",
    "metrics",
    "proxy",
    "records",
    "redaction",
    "routing",
    "serving/signals",
    "state",
    "store/writer",
    "upstream",
    "usage",
    "wheel",
)
SOURCES = [os.path.join("src", "model_gateway", f"{name}.py") for name in COMPILED]

if __name__ == "__main__":
    if os.environ.get("MODEL_GATEWAY_PURE"):
        setup()
    else:
        from mypyc.build import mypycify

        setup(ext_modules=mypycify(SOURCES, opt_level="3", group_name="model_gateway"))
