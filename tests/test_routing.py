"""Routing is pure: weights honoured, sticky keys stable, zero weights get nothing."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_gateway.config import RouteConfig, VariantConfig
from model_gateway.errors import NoHealthyVariantError, UnknownVariantError
from model_gateway.records import model_name_from_path
from model_gateway.routing import Route, RoutingTable, choose_variant, sticky_point

# starts servers or processes, or simulates: not in make test-fast
pytestmark = pytest.mark.slow

weights_st = st.lists(st.integers(min_value=0, max_value=100), min_size=1, max_size=6).filter(
    lambda ws: sum(ws) > 0
)


def make_route(
    weights: list[float], *, key: str | None = None, override: bool = False, name: str = "r"
) -> Route:
    return Route.from_config(
        RouteConfig(
            name=name,
            path="/p",
            routing_key=key,
            allow_override=override,
            variants=[
                VariantConfig(name=f"v{i}", url="http://up", model_version=str(i), weight=w)
                for i, w in enumerate(weights)
            ],
        )
    )


def assert_split_matches(counts: Counter[str], weights: list[int], n: int) -> None:
    total = sum(weights)
    for i, w in enumerate(weights):
        seen = counts[f"v{i}"]
        if w == 0:
            assert seen == 0, f"zero-weight v{i} got {seen}"
            continue
        p = w / total
        # 5 standard deviations of the binomial: a false failure about once in 3.5 million
        bound = 5 * math.sqrt(n * p * (1 - p)) + 1
        assert abs(seen - n * p) <= bound, (i, seen, n * p, bound)


@settings(max_examples=60, deadline=None)
@given(weights=weights_st, seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_random_split_follows_weights(weights: list[int], seed: int) -> None:
    route = make_route(weights)
    rng = random.Random(seed)
    n = 4000
    counts = Counter(
        choose_variant(route, key=None, forced=None, rand=rng.random())[0].name for _ in range(n)
    )
    assert_split_matches(counts, weights, n)


@settings(max_examples=40, deadline=None)
@given(weights=weights_st, salt=st.text(max_size=8))
def test_sticky_split_over_many_keys_follows_weights(weights: list[int], salt: str) -> None:
    route = make_route(weights, key="X-User-Id")
    n = 4000
    counts = Counter(
        choose_variant(route, key=f"{salt}user-{i}", forced=None, rand=0.0)[0].name
        for i in range(n)
    )
    assert_split_matches(counts, weights, n)


@given(
    weights=weights_st,
    key=st.text(min_size=1),
    r1=st.floats(0, 1, exclude_max=True),
    r2=st.floats(0, 1, exclude_max=True),
)
def test_sticky_key_always_gets_the_same_variant(
    weights: list[int], key: str, r1: float, r2: float
) -> None:
    first = choose_variant(make_route(weights, key="X-User-Id"), key=key, forced=None, rand=r1)
    # a route built afresh (a restart, another replica) and another random draw
    again = choose_variant(make_route(weights, key="X-User-Id"), key=key, forced=None, rand=r2)
    assert first[0].name == again[0].name
    assert first[1] == again[1] == "sticky"


def test_sticky_point_is_stable_across_processes_and_releases() -> None:
    # Fixed vectors: changing the hash would move users between variants on upgrade.
    assert sticky_point("fraud", "alice") == 0.6732864745493723
    assert sticky_point("fraud", "bob") == 0.9994914321426689
    code = (
        "from model_gateway.routing import sticky_point; "
        "print(repr(sticky_point('fraud', 'alice')))"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        assert float(out) == sticky_point("fraud", "alice")


@given(weights=weights_st, forced_index=st.integers(0, 5))
def test_forced_variant_only_when_route_allows(weights: list[int], forced_index: int) -> None:
    forced_index %= len(weights)
    name = f"v{forced_index}"
    allowed = choose_variant(make_route(weights, override=True), key=None, forced=name, rand=0.5)
    assert allowed[0].name == name and allowed[1] == "forced"
    ignored = choose_variant(make_route(weights, override=False), key=None, forced=name, rand=0.5)
    assert ignored[1] == "random"
    with pytest.raises(UnknownVariantError):
        choose_variant(make_route(weights, override=True), key=None, forced="nope", rand=0.5)
    with pytest.raises(NoHealthyVariantError):
        choose_variant(
            make_route(weights, override=True),
            key=None,
            forced=name,
            rand=0.5,
            down=frozenset({name}),
        )


def test_edge_of_unit_interval_lands_on_a_weighted_variant() -> None:
    route = make_route([1, 0])
    assert choose_variant(route, key=None, forced=None, rand=0.9999999999999999)[0].name == "v0"
    assert choose_variant(make_route([0, 3, 0]), key=None, forced=None, rand=0.0)[0].name == "v1"


def test_route_matching_exact_prefix_and_methods() -> None:
    def rc(
        name: str, path: str, match: str = "prefix", methods: list[str] | None = None
    ) -> RouteConfig:
        return RouteConfig.model_validate(
            {
                "name": name,
                "path": path,
                "match": match,
                "methods": methods,
                "variants": [{"name": "v", "url": "http://up", "model_version": "1"}],
            }
        )

    table = RoutingTable(
        Route.from_config(c)
        for c in (
            rc("models", "/v2/models"),
            rc("fraud", "/v2/models/fraud"),
            rc("fraud-v1", "/v1/models/fraud"),
            rc("exact", "/v2/models/fraud/ready", match="exact", methods=["GET"]),
            rc("root", "/"),
        )
    )

    def name(path: str, method: str = "POST") -> str | None:
        found = table.match(path, method)
        return found.name if found else None

    assert name("/v2/models/fraud/infer") == "fraud"
    assert name("/v2/models/fraud") == "fraud"
    assert name("/v2/models/fraudster/infer") == "models"
    assert name("/v1/models/fraud:predict") == "fraud-v1"
    assert name("/v2/models/fraud/ready", "GET") == "exact"
    assert name("/v2/models/fraud/ready", "POST") == "fraud"
    assert name("/other") == "root"


@settings(max_examples=40, deadline=None)
@given(weights=weights_st, down_mask=st.lists(st.booleans(), min_size=6, max_size=6))
def test_down_variants_get_nothing_and_sticky_keys_of_up_variants_stay(
    weights: list[int], down_mask: list[bool]
) -> None:
    route = make_route(weights, key="X-User-Id")
    down = frozenset(f"v{i}" for i in range(len(weights)) if down_mask[i])
    up_weights = [0 if down_mask[i] else w for i, w in enumerate(weights)]
    if sum(up_weights) == 0:
        with pytest.raises(NoHealthyVariantError):
            choose_variant(route, key="k", forced=None, rand=0.3, down=down)
        return
    n = 4000
    counts: Counter[str] = Counter()
    for i in range(n):
        key = f"user-{i}"
        healthy_choice, _ = choose_variant(route, key=key, forced=None, rand=0.0)
        chosen, _ = choose_variant(route, key=key, forced=None, rand=0.0, down=down)
        assert chosen.name not in down
        if healthy_choice.name not in down:
            assert chosen.name == healthy_choice.name  # a key on an up variant never moves
        counts[chosen.name] += 1
    # the down variants' share is spread over the up ones by weight
    assert_split_matches(counts, up_weights, n)


_path_text = st.text(alphabet="abv12:/-._", max_size=10)


@settings(max_examples=200, deadline=None)
@given(
    weights=weights_st,
    down_mask=st.lists(st.booleans(), min_size=6, max_size=6),
    key=st.one_of(st.none(), st.text(max_size=12)),
    rand=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_connect_retries_visit_each_weighted_up_variant_once_then_stop(
    weights: list[int], down_mask: list[bool], key: str | None, rand: float
) -> None:
    """What a retry chain does (the proxy's connect retries choose again with the variants
    tried added to those down): every weighted variant that is up is tried exactly once, no
    down or zero-weight variant ever, and the chain ends with no healthy variant left. The
    same key or draw gives the same chain."""
    route = make_route(weights, key="x-user")
    down = frozenset(f"v{i}" for i, is_down in enumerate(down_mask[: len(weights)]) if is_down)

    def chain() -> list[str]:
        tried: list[str] = []
        while True:
            try:
                variant, _ = choose_variant(
                    route, key=key, forced=None, rand=rand, down=down | frozenset(tried)
                )
            except NoHealthyVariantError:
                return tried
            assert variant.name not in tried
            tried.append(variant.name)

    visited = chain()
    up_weighted = {f"v{i}" for i, w in enumerate(weights) if w > 0} - down
    assert sorted(visited) == sorted(up_weighted)
    assert chain() == visited


@settings(max_examples=300, deadline=None)
@given(
    route_path=st.sampled_from(["/v2/models/", "/v1/models/", "/v2/", "/", "/x/"]).flatmap(
        lambda head: _path_text.map(lambda tail: head + tail)
    ),
    match=st.sampled_from(["prefix", "exact"]),
    rest=st.one_of(
        st.just(""), st.sampled_from(["/", ":"]).flatmap(lambda b: _path_text.map(b.__add__))
    ),
    configured=st.sampled_from([None, "configured"]),
)
def test_model_name_is_what_the_request_path_names(
    route_path: str, match: str, rest: str, configured: str | None
) -> None:
    """Whatever the route's path and whatever request path it matches: the model name read once
    from the route's path equals the one read from the request's own path (or the configured
    one), so the hot path need not run the pattern per request."""
    route = Route.from_config(
        RouteConfig(
            name="r",
            path=route_path,
            match=match,
            model_name=configured,
            variants=[VariantConfig(name="v", url="http://up", model_version="1")],
        )
    )
    path = route_path + rest
    if not route.matches_path(path):
        return
    assert route.model_name_for(path) == (configured or model_name_from_path(path))
