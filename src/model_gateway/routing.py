"""Which route answers a request, which variant of it (weighted, sticky or forced), and
which shadows get a copy.

Pure functions over precomputed tables; no I/O, no clock, no process-random hashing, so the
same routing key lands on the same variant on every replica and after every restart.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Literal

from .answers import AnswerReader
from .config import GatewayConfig, RouteConfig, ShadowConfig, VariantConfig
from .errors import NoHealthyVariantError, UnknownVariantError, UnknownVersionError
from .features import FeatureSpec, feature_spec
from .records import model_name_from_path
from .redaction import Redactor

#: how a request's variant was chosen: by the weights (``random``), by its routing key
#: (``sticky``), by the client (``forced``, ``X-Model-Variant``), by the model version its
#: path names (``version``), or, its variant refusing the connection, by a retry among the
#: others (``fallback``)
Assignment = Literal["random", "sticky", "forced", "version", "fallback"]
#: the methods of calls that ask for no prediction (readiness, metadata, CORS)
NOT_INFERENCE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# A prefix route matches at a path-segment boundary, so /v2/models/fraud matches
# /v2/models/fraud/infer (and /v1/models/fraud matches KServe V1 /v1/models/fraud:predict),
# but /v2/models/fraud does not match /v2/models/fraudster.
_BOUNDARIES = ("/", ":")


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    url: str
    model_version: str
    weight: float


@dataclass(frozen=True, slots=True)
class Shadow:
    name: str
    url: str
    model_version: str
    #: share of requests copied, in [0, 1]
    fraction: float
    max_in_flight: int


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    path: str
    match: Literal["exact", "prefix"]
    methods: frozenset[str] | None
    variants: tuple[Variant, ...]
    routing_key: str | None
    allow_override: bool
    config: RouteConfig
    shadows: tuple[Shadow, ...] = ()
    cumulative: tuple[float, ...] = field(init=False)
    total_weight: float = field(init=False)
    last_weighted: int = field(init=False)
    by_name: dict[str, Variant] = field(init=False)
    #: the configured model name, else the one the route's own path names (/v2/models/NAME);
    #: ``None`` when only each request's path can tell
    model_name: str | None = field(init=False)
    # The settings a request reads, copied out of the pydantic model: every attribute read
    # on one goes through its __getattr__ hook, several times slower than a field's.
    #: the routing key's header as the server gives it (lower-cased bytes)
    routing_header: bytes | None = field(init=False)
    max_body_bytes: int = field(init=False)
    connect_retries: int = field(init=False)
    hash_routing_key: bool = field(init=False)
    #: what is kept of requests and answers in the log
    redactor: Redactor = field(init=False)
    #: what is read from the answers: served version, prediction, score
    answers: AnswerReader = field(init=False)
    #: the features the log reads from each request (monitored ones, and amounts mistakes
    #: cost); None where the route reads none
    features: FeatureSpec | None = field(init=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        config = self.config
        set_(self, "model_name", config.model_name or model_name_from_path(self.path))
        key = self.routing_key
        set_(self, "routing_header", None if key is None else key.encode())
        set_(self, "max_body_bytes", config.max_body_bytes)
        set_(self, "connect_retries", config.connect_retries)
        set_(self, "hash_routing_key", config.hash_routing_key)
        set_(self, "redactor", Redactor(config.capture))
        set_(self, "answers", AnswerReader(config))
        monitoring = config.monitoring
        spec = feature_spec(monitoring) if monitoring is not None else ()
        costs = config.evaluation.costs if config.evaluation is not None else None
        if costs is not None:
            # amounts a mistake costs, read from each request as a feature is
            spec += tuple(
                (name, False, amount.pointer, None, 0) for name, amount in costs.pointers().items()
            )
        set_(self, "features", spec or None)
        cumulative = tuple(accumulate(v.weight for v in self.variants))
        set_(self, "cumulative", cumulative)
        set_(self, "total_weight", cumulative[-1])
        set_(self, "last_weighted", max(i for i, v in enumerate(self.variants) if v.weight > 0))
        set_(self, "by_name", {v.name: v for v in self.variants})

    @classmethod
    def from_config(cls, rc: RouteConfig) -> Route:
        return cls(
            name=rc.name,
            path=rc.path,
            match=rc.match,
            methods=frozenset(rc.methods) if rc.methods else None,
            variants=tuple(_variant(v) for v in rc.variants),
            routing_key=rc.routing_key.lower() if rc.routing_key else None,
            allow_override=rc.allow_override,
            config=rc,
            shadows=tuple(_shadow(s) for s in rc.shadows),
        )

    def model_name_for(self, path: str) -> str | None:
        """The model a request to ``path`` is for. When the route's path names one, every path
        the route matches names the same (the name ends where a segment boundary does)."""
        return self.model_name if self.model_name is not None else model_name_from_path(path)

    def matches_path(self, path: str) -> bool:
        if self.match == "exact" or path == self.path:
            return path == self.path
        if not path.startswith(self.path):
            return False
        return self.path.endswith("/") or path[len(self.path)] in _BOUNDARIES


def _variant(vc: VariantConfig) -> Variant:
    return Variant(name=vc.name, url=vc.url, model_version=vc.model_version, weight=vc.weight)


def _shadow(sc: ShadowConfig) -> Shadow:
    return Shadow(sc.name, sc.url, sc.model_version, sc.percent / 100.0, sc.max_in_flight)


def shadows_for(route: Route, rand: float) -> list[Shadow]:
    """The shadows that get a copy of one request, for a uniform draw ``rand`` in [0, 1).

    One draw for all of a route's shadows: a shadow at a smaller share sees a subset of the
    requests one at a larger share sees, so their answers can be compared request by request.
    """
    return [shadow for shadow in route.shadows if rand < shadow.fraction]


class RoutingTable:
    """Routes indexed for matching: exact paths by dict, prefixes longest first."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        self._exact: dict[str, list[Route]] = {}
        for route in self.routes:
            if route.match == "exact":
                self._exact.setdefault(route.path, []).append(route)
        self._prefixes = sorted(
            (r for r in self.routes if r.match == "prefix"), key=lambda r: len(r.path), reverse=True
        )

    @classmethod
    def from_config(cls, config: GatewayConfig) -> RoutingTable:
        return cls(Route.from_config(rc) for rc in config.routes)

    def match(self, path: str, method: str) -> Route | None:
        for route in self._exact.get(path, ()):
            if route.methods is None or method in route.methods:
                return route
        for route in self._prefixes:
            if route.matches_path(path) and (route.methods is None or method in route.methods):
                return route
        return None


def sticky_point(route_name: str, key: str) -> float:
    """A stable point in [0, 1) for a routing key: the same on every machine, forever."""
    digest = hashlib.blake2b(f"{route_name}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def variant_at(route: Route, point: float) -> Variant:
    """The variant whose weight interval holds ``point`` (in [0, 1)); zero weights hold none."""
    index = bisect_right(route.cumulative, point * route.total_weight)
    # point * total can round up to total; the last variant with weight takes that edge.
    return route.variants[min(index, route.last_weighted)]


def choose_variant(
    route: Route,
    *,
    key: str | None,
    forced: str | None,
    rand: float,
    down: frozenset[str] | None = None,
    version: str | None = None,
) -> tuple[Variant, Assignment]:
    """Pick the variant for one request.

    ``rand`` is a uniform draw in [0, 1) supplied by the caller, so this stays pure. ``down``
    names the variants that may not take traffic now; a key whose variant is down is
    re-placed among the up ones by weight, deterministically, and every key whose variant is
    up stays where it was.

    ``version``: the model version the request's path names; only the variants serving it
    may answer, chosen among them by weight (or evenly, when none has weight: a version kept
    for the clients that ask for it by name).

    Raises :class:`UnknownVariantError` for a forced name the route lacks,
    :class:`UnknownVersionError` for a version no variant serves, and
    :class:`NoHealthyVariantError` when nothing with weight is up.
    """
    if version is not None:
        return _variant_of_version(route, version, rand, down), "version"
    if forced is not None and route.allow_override:
        variant = route.by_name.get(forced)
        if variant is None:
            raise UnknownVariantError(f"route {route.name!r} has no variant {forced!r}")
        if down and forced in down:
            raise NoHealthyVariantError(f"variant {forced!r} of route {route.name!r} is down")
        return variant, "forced"
    sticky = key is not None and route.routing_key is not None
    point = sticky_point(route.name, key) if sticky and key is not None else rand
    assignment: Assignment = "sticky" if sticky else "random"
    chosen = variant_at(route, point)
    if not down or chosen.name not in down:
        return chosen, assignment
    up = [v for v in route.variants if v.weight > 0 and v.name not in down]
    if not up:
        raise NoHealthyVariantError(f"no variant of route {route.name!r} is up")
    # Where the point fell inside the down variant's interval is again uniform in [0, 1);
    # spreading that over the up variants by weight keeps the split proportional.
    index = route.variants.index(chosen)
    start = route.cumulative[index] - chosen.weight
    within = min(max((point * route.total_weight - start) / chosen.weight, 0.0), 1.0)
    target = within * sum(v.weight for v in up)
    for variant in up:
        target -= variant.weight
        if target < 0:
            return variant, assignment
    return up[-1], assignment


def _variant_of_version(
    route: Route, version: str, rand: float, down: frozenset[str] | None
) -> Variant:
    serving = [v for v in route.variants if v.model_version == version]
    if not serving:
        versions = ", ".join(sorted({v.model_version for v in route.variants}))
        raise UnknownVersionError(
            f"route {route.name!r} serves no model version {version!r} (it serves {versions})"
        )
    up = [v for v in serving if not down or v.name not in down]
    if not up:
        raise NoHealthyVariantError(
            f"no variant of route {route.name!r} serving version {version!r} is up"
        )
    weights = [v.weight for v in up] if any(v.weight > 0 for v in up) else [1.0] * len(up)
    target = rand * sum(weights)
    for variant, weight in zip(up, weights, strict=True):
        target -= weight
        if target < 0:
            return variant
    return up[-1]
