"""Which of the gateway's modules run compiled (setup.py's COMPILED), and whether any
extension is older than the sources it was built from."""

from __future__ import annotations

import importlib
import importlib.util
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

ROOT = Path(__file__).parent.parent
SRC = ROOT / "src"


def compiled_module_names() -> list[str]:
    """The dotted names of the modules setup.py compiles."""
    spec = importlib.util.spec_from_file_location("model_gateway_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # defines COMPILED; builds only when run as a script
    return [f"model_gateway.{name.replace('/', '.')}" for name in setup.COMPILED]


def extensions() -> list[Path]:
    return sorted({path for suffix in EXTENSION_SUFFIXES for path in SRC.rglob(f"*{suffix}")})


def stale_extensions() -> list[Path]:
    """Extensions built before the newest source under src/: Python would import them
    instead of the changed code (``make build`` builds them again)."""
    newest = max(path.stat().st_mtime for path in SRC.rglob("*.py"))
    return [path for path in extensions() if path.stat().st_mtime < newest]


def loaded_from_extension(name: str) -> bool:
    module = importlib.import_module(name)
    return str(module.__file__).endswith(tuple(EXTENSION_SUFFIXES))
