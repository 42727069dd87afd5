"""Rollouts: the configuration's rules, the weights a state gives, the moves a look makes, the
gates on constructed reports, the score shift against its formula written out, and seeded
simulations of whole rollouts that measure how often the quality gate rolls back a
challenger as good as the champion, and how often it promotes a better one."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from model_gateway.config import parse_config
from model_gateway.errors import ConfigError
from model_gateway.experiments import judge, measures, settings_of
from model_gateway.rollouts import (
    ABORTED,
    PAUSED,
    PROMOTED,
    ROLLED_BACK,
    RUNNING,
    RolloutState,
    Verdict,
    act,
    judge_gates,
    label_free,
    look,
    overlaid,
    psi,
    weights,
)

URL = "http://127.0.0.1:9"


def config(rollout: dict[str, Any], **route: Any) -> Any:
    doc = {
        "routes": [
            {
                "name": "fraud",
                "path": "/v2/models/fraud",
                "evaluation": {"task": "binary", "prediction": "/p", "score": "/s"},
                "variants": [
                    {"name": "champion", "url": URL, "model_version": "1", "weight": 80},
                    {"name": "challenger", "url": URL, "model_version": "2", "weight": 20},
                    {"name": "other", "url": URL, "model_version": "3", "weight": 5},
                ],
                "rollout": {"id": "r1", "challenger": "challenger", **rollout},
                **route,
            }
        ]
    }
    return parse_config(yaml.safe_dump(doc))


def problems(rollout: dict[str, Any], **route: Any) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        config(rollout, **route)
    return refused.value.problems


def test_check_refuses_a_rollout_that_cannot_run() -> None:
    assert problems({"challenger": "nobody"}) == [
        "routes[0].rollout.challenger: 'nobody' is not a variant of this route"
        " (one of champion, challenger, other)"
    ]
    assert "steps must rise" in problems({"steps": [5, 5, 100]})[0]
    assert "the last step must be 100" in problems({"steps": [5, 50]})[0]
    assert "must be > 0 and <= 100" in problems({"steps": [0, 100]})[0]
    assert problems({"gates": {"quality": True}}, evaluation=None) == [
        "routes[0].rollout.gates.quality: needs the route's evaluation section"
    ]
    assert problems({"gates": {"disagreement": {"max": 0.2, "shadow": "ghost"}}}) == [
        "routes[0].rollout.gates.disagreement.shadow: 'ghost' is no shadow of this route"
    ]
    assert problems({"step_seconds": 60, "max_step_seconds": 30}) == [
        "routes[0].rollout.max_step_seconds: must be >= step_seconds"
    ]


def state(status: str = RUNNING, step: int = 0, started: float = 0.0) -> RolloutState:
    return RolloutState("r1", "fraud", status, step, started, started, started, "started")


def test_the_champion_and_challenger_share_what_the_file_gives_them() -> None:
    route = config({"steps": [10, 50, 100]}).config.routes[0]
    assert weights(route, state(step=0)) == pytest.approx({"champion": 90, "challenger": 10})
    assert weights(route, state(step=1)) == pytest.approx({"champion": 50, "challenger": 50})
    assert weights(route, state(PROMOTED)) == pytest.approx({"champion": 0, "challenger": 100})
    for gone in (ROLLED_BACK, ABORTED):
        assert weights(route, state(gone)) == pytest.approx({"champion": 100, "challenger": 0})


def test_the_overlay_keeps_the_file_and_shows_the_moved_weights_in_its_text() -> None:
    file = config({})
    moved = overlaid(file, {"fraud": {"champion": 95.0, "challenger": 5.0}})
    variants = {v.name: v.weight for v in moved.config.routes[0].variants}
    assert variants == {"champion": 95.0, "challenger": 5.0, "other": 5}
    assert moved.text.startswith(file.text.rstrip())
    assert yaml.safe_load(moved.text)["rollout_weights"] == {
        "fraud": {"champion": 95.0, "challenger": 5.0}
    }
    assert moved.version != file.version and moved.source == file.source
    assert overlaid(file, {}) is file


PASS, FAIL, WAIT = (
    Verdict("pass", ()),
    Verdict("fail", ("error_ratio 0.2 > 0.05",)),
    Verdict("wait", ("3 of 50 requests in the step",)),
)


def test_a_look_advances_promotes_rolls_back_or_pauses() -> None:
    rollout = config({"steps": [5, 50, 100], "step_seconds": 10, "min_labelled": 5,
                      "max_step_seconds": 60}).config.routes[0].rollout  # fmt: skip
    assert rollout is not None
    now = 100.0
    # too soon, or too few labels: nothing moves
    assert look(rollout, state(started=95), PASS, 10, now).decision is None
    assert look(rollout, state(started=80), PASS, 4, now).decision is None
    moved = look(rollout, state(started=80), PASS, 5, now)
    assert (moved.decision, moved.state.step, moved.state.step_started_at) == ("advance", 1, now)
    assert look(rollout, state(step=2, started=80), PASS, 5, now).state.status == PROMOTED
    back = look(rollout, state(started=99), FAIL, 0, now)
    assert (back.decision, back.state.status) == ("rollback", ROLLED_BACK)
    assert back.state.reason == "error_ratio 0.2 > 0.05"
    assert look(rollout, state(started=50), WAIT, 0, now).decision is None
    paused = look(rollout, state(started=30), WAIT, 0, now)
    assert (paused.decision, paused.state.status) == ("pause", PAUSED)
    assert "inconclusive after 70 s at step 1: 3 of 50 requests" in paused.state.reason
    # a rollout that does not run moves only by hand
    for status in (PAUSED, ROLLED_BACK, PROMOTED, ABORTED):
        assert look(rollout, state(status, started=0), FAIL, 0, now).decision is None


def test_operators_act_only_where_the_state_allows() -> None:
    rollout = config({}).config.routes[0].rollout
    assert rollout is not None
    assert act(rollout, state(), "pause", "admin", 5).state.status == PAUSED
    resumed = act(rollout, state(PAUSED), "resume", "cli", 9)
    assert (resumed.state.status, resumed.state.step_started_at) == (RUNNING, 9)
    assert resumed.state.reason == "cli: resume"
    assert act(rollout, state(PAUSED), "promote", "admin", 5).state.status == PROMOTED
    assert act(rollout, state(), "abort", "admin", 5).state.status == ABORTED
    with pytest.raises(ValueError, match="cannot resume a rollout that is running"):
        act(rollout, state(), "resume", "admin", 5)
    with pytest.raises(ValueError, match="cannot promote a rollout that is rolled_back"):
        act(rollout, state(ROLLED_BACK), "promote", "admin", 5)
    with pytest.raises(ValueError, match="unknown action"):
        act(rollout, state(), "explode", "admin", 5)


def report(variants: dict[str, dict[str, Any]], comparisons: list[Any] | None = None) -> Any:
    return {"variants": variants, "comparisons": comparisons or []}


def arm(requests: int, errors: int, p99: float, labelled: int = 0) -> dict[str, Any]:
    return {
        "requests": requests,
        "error_ratio": {"value": errors / requests if requests else None},
        "latency_ms": {"p99": p99},
        "labelled": labelled,
    }


def test_operational_gates_absolute_and_against_the_champion() -> None:
    route = config({"gates": {"error_ratio": {"max": 0.05, "max_over_champion": 0.01},
                              "p99_latency": {"max_ms": 500, "max_ratio": 2},
                              "min_requests": 20}}).config.routes[0]  # fmt: skip
    fine = report({"champion": arm(400, 4, 100), "challenger": arm(40, 0, 150)})
    assert judge_gates(route, fine, {}) == Verdict("pass", ())
    few = report({"champion": arm(400, 4, 100), "challenger": arm(19, 19, 9000)})
    assert judge_gates(route, few, {}).outcome == "wait"
    failing = report({"champion": arm(400, 0, 100), "challenger": arm(40, 8, 250)})
    verdict = judge_gates(route, failing, {})
    assert verdict.outcome == "fail"
    assert verdict.reasons == (
        "error_ratio 0.2 > 0.05",
        "error_ratio 0.2 > the champion's 0 + 0.01",
        "p99_latency 250 ms > 2 x the champion's 100 ms",
    )


def psi_written_out(expected: list[float], actual: list[float]) -> float:
    """The index as the textbooks write it: deciles of the expected sample as bin edges,
    sum of (a - e) * ln(a / e) over the bins, an empty bin counted as 0.0001."""
    edges = sorted(set(np.quantile(expected, [i / 10 for i in range(1, 10)])))
    total = 0.0
    for low, high in zip([-math.inf, *edges], [*edges, math.inf], strict=True):
        e = max(sum(1 for x in expected if low <= x < high) / len(expected), 1e-4)
        a = max(sum(1 for x in actual if low <= x < high) / len(actual), 1e-4)
        total += (a - e) * math.log(a / e)
    return total


@settings(max_examples=60, deadline=None)
@given(
    expected=st.lists(st.floats(0, 1), min_size=10, max_size=80),
    actual=st.lists(st.floats(0, 1), min_size=10, max_size=80),
)
def test_the_score_shift_is_the_population_stability_index(
    expected: list[float], actual: list[float]
) -> None:
    found = psi(expected, actual)
    assert found is not None
    assert found == pytest.approx(psi_written_out(expected, actual), abs=1e-9)
    assert found >= 0


def test_the_score_shift_is_small_for_the_same_scores_and_large_for_moved_ones() -> None:
    rng = np.random.default_rng(11)
    same = psi(list(rng.beta(2, 5, 5000)), list(rng.beta(2, 5, 5000)))
    moved = psi(list(rng.beta(2, 5, 5000)), list(rng.beta(5, 2, 5000)))
    assert same is not None and same < 0.01
    assert moved is not None and moved > 1.0
    assert psi([0.1] * 9, [0.2] * 50) is None  # too few to bin


def test_disagreement_pair_by_pair_with_a_shadow_or_by_class_shares_without() -> None:
    live = [{"variant": "champion", "predicted": "1" if i % 2 else "0", "score": 0.5,
             "shadow": 0} for i in range(20)]  # fmt: skip
    live += [{"variant": "challenger", "predicted": "1", "score": 0.5, "shadow": 0}] * 20
    found = label_free(live, "champion", "challenger", None)
    assert found["disagreement"] == pytest.approx(0.5)  # half the champion's are "1"
    copies = [
        {
            "variant": "ghost",
            "predicted": "1",
            "shadow": 1,
            "score": None,
            "live_predicted": r["predicted"],
            "live_variant": "champion",
        }
        for r in live[:20]
    ]
    found = label_free(live + copies, "champion", "challenger", "ghost")
    assert found["disagreement"] == pytest.approx(0.5)


# -- seeded simulations of whole rollouts, gated on labelled precision alone -----------------

SIM_ROLLOUT = {
    "steps": [5, 25, 50, 100],
    "step_seconds": 3,
    "max_step_seconds": 150,
    "interval": 1,
    "gates": {"quality": True, "min_requests": 1},
}
SIM_EXPERIMENT = {
    "id": "sim",
    "start": "2026-01-01T00:00:00Z",
    "champion": "champion",
    "primary_metric": "precision",
    "minimum_detectable_effect": 0.05,
}
#: predictions per look, their share predicted positive, and how often a negative is wrong
PER_LOOK, POSITIVE_SHARE, MISSED = 2000, 0.3, 0.05


def simulate(precision: float, rng: np.random.Generator) -> tuple[str, int]:
    """One rollout of a challenger with ``precision`` against a champion with 0.85, labels at
    once: how it ended (promoted, rolled back, paused) and the challenger's predictions."""
    route = config(SIM_ROLLOUT, experiment=SIM_EXPERIMENT).config.routes[0]
    rollout = route.rollout
    plan = settings_of(route)
    counts = {name: np.zeros(4, dtype=int) for name in ("champion", "challenger")}  # tp fp fn tn
    current, now = state(), 0.0
    while current.status == RUNNING:
        now += rollout.interval
        routed = rng.binomial(PER_LOOK, rollout.steps[current.step] / 100)
        for name, n, p in (
            ("challenger", routed, precision),
            ("champion", PER_LOOK - routed, 0.85),
        ):
            positives = rng.binomial(n, POSITIVE_SHARE)
            tp = rng.binomial(positives, p)
            fn = rng.binomial(n - positives, MISSED)
            counts[name] += (tp, positives - tp, fn, n - positives - fn)
        found = {}
        for name, (tp, fp, fn, tn) in counts.items():
            quality = {"labelled": int(tp + fp + fn + tn),
                       "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn}}  # fmt: skip
            found[name] = measures(quality, "binary")
        judged = judge(found["champion"], [("challenger", found["challenger"])], plan)
        comparison = {"challenger": "challenger", "shadow": False,
                      "sequential": judged["challenger"]["metrics"]}  # fmt: skip
        variants = {"challenger": {"requests": 1}}
        verdict = judge_gates(route, report(variants), report(variants, [comparison]))
        current = look(rollout, current, verdict, 0, now).state
    return current.status, int(counts["challenger"].sum())


@pytest.mark.slow
def test_a_challenger_as_good_as_the_champion_is_rarely_rolled_back_and_mostly_promoted() -> None:
    """A/A, 100 rollouts (seed 20261206): measured 1 rolled back and 99 promoted, against
    bounds of at most 5 and at least 90."""
    rng = np.random.default_rng(20261206)
    ends = [simulate(0.85, rng)[0] for _ in range(100)]
    assert ends.count(ROLLED_BACK) <= 5, ends.count(ROLLED_BACK)
    assert ends.count(PROMOTED) >= 90, ends.count(PROMOTED)


@pytest.mark.slow
def test_a_better_challenger_is_promoted_and_a_worse_one_rolled_back_early() -> None:
    """Precision 0.90 against 0.85, 100 rollouts (seed 7): measured 100 promoted (bound: at
    least 80). Precision 0.70 against 0.85, 100 rollouts: all rolled back, after at most 617
    challenger predictions (median 297; bound: before 3,000)."""
    rng = np.random.default_rng(7)
    better = [simulate(0.90, rng)[0] for _ in range(100)]
    assert better.count(PROMOTED) >= 80, better.count(PROMOTED)
    worse = [simulate(0.70, rng) for _ in range(100)]
    assert all(end == ROLLED_BACK for end, _ in worse), [e for e, _ in worse]
    assert max(n for _, n in worse) < 3000, max(n for _, n in worse)
