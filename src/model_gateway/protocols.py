"""What the model-serving protocols ask of a gateway in front of their servers.

- The Open Inference Protocol (KServe V2, Triton, MLServer) and KServe V1 carry an error as
  ``{"error": "<text>"}``: on their paths the gateway's own errors take that shape
  (:meth:`.errors.GatewayError.body`).
- V2's server-level endpoints (``/v2/health/live``, ``/v2/health/ready``, ``/v2``) are about
  the server the client talks to, which is the gateway: unless a route claims those paths, the
  gateway answers them itself: live while it runs, ready when every route has a variant that
  can take traffic, and its own metadata.
- A V2 path that names a model version (``/v2/models/NAME/versions/V/...``) asks for that
  version: :func:`requested_version` reads it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import orjson

from .routing import Route

_VERSIONED = re.compile(r"^/v2/models/[^/]+/versions/([^/]+)(?:/|$)")


def requested_version(path: str) -> str | None:
    """The model version a V2 path names, if it names one."""
    found = _VERSIONED.match(path)
    return None if found is None else found.group(1)


def server_answer(
    path: str,
    method: str,
    routes: tuple[Route, ...],
    down: Mapping[str, frozenset[str]],
    version: str,
) -> tuple[int, bytes] | None:
    """The gateway's answer to a V2 server-level call no route claimed, or None when ``path``
    is not one. Readiness names the routes that have no variant up, as a reason to read."""
    if method not in ("GET", "HEAD"):
        return None
    if path == "/v2/health/live":
        return 200, b""
    if path == "/v2/health/ready":
        unready = [r.name for r in routes if not _has_variant_up(r, down.get(r.name))]
        if not unready:
            return 200, b""
        return 503, orjson.dumps({"error": f"no variant up in route(s) {', '.join(unready)}"})
    if path == "/v2":
        return 200, orjson.dumps({"name": "model-gateway", "version": version, "extensions": []})
    return None


def _has_variant_up(route: Route, down: frozenset[str] | None) -> bool:
    return any(v.weight > 0 and (not down or v.name not in down) for v in route.variants)
