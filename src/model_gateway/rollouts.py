"""Progressive delivery: a rollout moves a route's traffic to a challenger step by step, and
takes it back the moment a gate fails (Flagger's and Argo Rollouts' canary analysis, gated on
the model's labelled quality too).

A rollout is a state (:class:`RolloutState`, kept in the store) and a rule that turns it into
the weights of the route's champion and challenger (:func:`weights`). At each look
(:func:`look`) the gates judge the challenger:

- operational, over the current step: its error ratio and p99 latency, absolute or against
  the champion's in the same window;
- quality, since the rollout began: the experiment's always-valid comparison
  (:mod:`.experiments`): any metric found worse fails; every measured metric shown no worse
  than its minimum detectable effect passes;
- label-free, over the current step: the shift of its score distribution from the
  champion's (population stability index) and how often it disagrees with the champion
  (with a shadow answering as the challenger, pair by pair; else the distance between the
  two arms' shares of each predicted class).

A failed gate rolls back at once (the challenger's weight to 0). All gates passed, the step's
minimum time spent and its labelled sample collected: the next step, or promotion after the
last. Anything else waits; a step inconclusive past ``max_step_seconds`` pauses, and an alert
fires. Operators pause, resume, abort and promote by hand.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import yaml

from .config import LoadedConfig, RolloutConfig, RouteConfig, config_version
from .drift import psi
from .experiments import WORSE, no_worse
from .splits import is_request

RUNNING = "running"
PAUSED = "paused"
ROLLED_BACK = "rolled_back"
PROMOTED = "promoted"
ABORTED = "aborted"
#: the states in which the rollout still moves weights by itself
MOVING = (RUNNING,)
#: what an operator may ask, and from which states
ACTIONS: dict[str, tuple[str, ...]] = {
    "pause": (RUNNING,),
    "resume": (PAUSED,),
    "abort": (RUNNING, PAUSED),
    "promote": (RUNNING, PAUSED),
}
#: the decisions counted by model_gateway_rollout_decisions_total
DECISIONS = ("advance", "promote", "rollback", "pause", "resume", "abort")

#: the key under which a configuration's text (in the history) carries the weights rollouts
#: set, appended to the file's own text
WEIGHTS_KEY = "rollout_weights"

#: the fewest values on each side a label-free figure is told from
MIN_VALUES = 10


@dataclass(frozen=True, slots=True)
class RolloutState:
    id: str
    route: str
    status: str
    #: the index of the current step in the rollout's ``steps``
    step: int
    started_at: float
    step_started_at: float
    updated_at: float
    #: why the state is what it is: the last move's reason
    reason: str

    @classmethod
    def begin(cls, rollout: RolloutConfig, route: str, now: float) -> RolloutState:
        return cls(rollout.id, route, RUNNING, 0, now, now, now, "started")

    def as_row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "route": self.route,
            "status": self.status,
            "step": self.step,
            "started_at": self.started_at,
            "step_started_at": self.step_started_at,
            "updated_at": self.updated_at,
            "reason": self.reason,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RolloutState:
        return cls(
            str(row["id"]),
            str(row["route"]),
            str(row["status"]),
            int(row["step"]),
            float(row["started_at"]),
            float(row["step_started_at"]),
            float(row["updated_at"]),
            str(row["reason"]),
        )


def champion_of(route: RouteConfig) -> str:
    """The variant a rollout moves traffic from: the experiment's champion, else the first
    variant that is not the challenger."""
    if route.experiment is not None:
        return route.experiment.champion
    assert route.rollout is not None
    return next(v.name for v in route.variants if v.name != route.rollout.challenger)


def challenger_percent(rollout: RolloutConfig, state: RolloutState) -> float:
    """The challenger's share of the two variants' traffic, in percent."""
    if state.status in (ROLLED_BACK, ABORTED):
        return 0.0
    if state.status == PROMOTED:
        return 100.0
    return rollout.steps[min(state.step, len(rollout.steps) - 1)]


def weights(route: RouteConfig, state: RolloutState) -> dict[str, float]:
    """The champion's and the challenger's weights under ``state``: the two share what the
    file gives them together (other variants keep theirs), the challenger its step's part."""
    rollout = route.rollout
    assert rollout is not None
    champion = champion_of(route)
    by_name = {v.name: v.weight for v in route.variants}
    total = by_name[champion] + by_name[rollout.challenger]
    if total <= 0:
        total = 1.0
    share = challenger_percent(rollout, state) / 100.0
    return {champion: total * (1.0 - share), rollout.challenger: total * share}


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the gates say at one look: ``fail`` (roll back), ``pass`` (every gate passed) or
    ``wait``; ``reasons`` say which gate and by how much."""

    outcome: Literal["fail", "pass", "wait"]
    reasons: tuple[str, ...]


def judge_gates(
    route: RouteConfig, step_report: dict[str, Any], rollout_report: dict[str, Any]
) -> Verdict:
    """The gates of ``route``'s rollout on the reports of the current step and of the whole
    rollout (:func:`~model_gateway.quality.build_report` over each window)."""
    rollout = route.rollout
    assert rollout is not None
    gates = rollout.gates
    champion, challenger = champion_of(route), rollout.challenger
    failed: list[str] = []
    waiting: list[str] = []
    variants = step_report["variants"]
    ours, theirs = variants.get(challenger, {}), variants.get(champion, {})
    requests = int(ours.get("requests", 0))
    if requests < gates.min_requests:
        waiting.append(f"{requests} of {gates.min_requests} requests in the step")
    else:
        failed += _operational(gates, ours, theirs)
        if gates.score_shift is not None:
            index = step_report.get("score_psi")
            if index is None:
                waiting.append("score_shift: too few scores")
            elif index > gates.score_shift.max_psi:
                failed.append(f"score_shift: psi {index:.3g} > {gates.score_shift.max_psi:g}")
        if gates.disagreement is not None:
            rate = step_report.get("disagreement")
            if rate is None:
                waiting.append("disagreement: too few predictions to compare")
            elif rate > gates.disagreement.max:
                failed.append(f"disagreement: {rate:.3g} > {gates.disagreement.max:g}")
    if gates.quality:
        verdict, why = _quality(rollout_report, challenger)
        if verdict == "fail":
            failed.append(why)
        elif verdict == "wait":
            waiting.append(why)
    if failed:
        return Verdict("fail", tuple(failed))
    return Verdict("wait", tuple(waiting)) if waiting else Verdict("pass", ())


def _operational(gates: Any, ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    failed = []
    if gates.error_ratio is not None:
        ratio = _value(ours.get("error_ratio"))
        base = _value(theirs.get("error_ratio"))
        limit = gates.error_ratio.max
        if ratio is not None and limit is not None and ratio > limit:
            failed.append(f"error_ratio {ratio:.3g} > {limit:g}")
        over = gates.error_ratio.max_over_champion
        if ratio is not None and base is not None and over is not None and ratio > base + over:
            failed.append(f"error_ratio {ratio:.3g} > the champion's {base:.3g} + {over:g}")
    if gates.p99_latency is not None:
        p99 = (ours.get("latency_ms") or {}).get("p99")
        base = (theirs.get("latency_ms") or {}).get("p99")
        most = gates.p99_latency.max_ms
        if p99 is not None and most is not None and p99 > most:
            failed.append(f"p99_latency {p99:.4g} ms > {most:g} ms")
        times = gates.p99_latency.max_ratio
        if p99 is not None and base is not None and times is not None and p99 > base * times:
            failed.append(f"p99_latency {p99:.4g} ms > {times:g} x the champion's {base:.4g} ms")
    return failed


def _value(estimate: Any) -> float | None:
    if isinstance(estimate, dict):
        value = estimate.get("value")
        return None if value is None else float(value)
    return None


def _quality(report: dict[str, Any], challenger: str) -> tuple[str, str]:
    """The quality gate on the rollout's report: fail when a comparison of the challenger
    (any of its served versions) finds it worse; pass when each shows every measured metric
    no worse than its minimum detectable effect; else wait."""
    found = [
        c
        for c in report.get("comparisons", [])
        if c["challenger"] == challenger and not c["shadow"] and "sequential" in c
    ]
    if not found:
        return "wait", "quality: no labelled comparison yet"
    for comparison in found:
        for metric in comparison["sequential"]:
            if metric["decision"] == WORSE:
                return "fail", (
                    f"quality: {metric['metric']} worse by {-_signed(metric):.3g}"
                    f" (always-valid interval {metric['low']:.3g} to {metric['high']:.3g})"
                )
    for comparison in found:
        for metric in comparison["sequential"]:
            if metric["measured"] and not no_worse(metric):
                return "wait", f"quality: {metric['metric']} not yet shown no worse"
    return "pass", ""


def _signed(metric: dict[str, Any]) -> float:
    """The difference with its sign turned so that above 0 is better."""
    difference = float(metric["difference"])
    return -difference if metric["lower_is_better"] else difference


def step_figures(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """The operational figures of a step's live requests, per variant in ``names``: requests,
    the share answered 5xx and the p99 latency, in the shape of a report's ``variants``
    (:func:`~model_gateway.quality.build_report` computes far more than a look needs)."""
    variants: dict[str, Any] = {}
    for name in names:
        ours = [r for r in rows if r["variant"] == name and not r.get("shadow") and is_request(r)]
        errors = sum(1 for r in ours if r["status"] >= 500)
        latencies = np.asarray([r["latency_ms"] for r in ours], dtype=float)
        variants[name] = {
            "requests": len(ours),
            "error_ratio": {"value": errors / len(ours) if ours else None},
            "latency_ms": {"p99": float(np.percentile(latencies, 99)) if ours else None},
        }
    return {"variants": variants}


def label_free(
    rows: Sequence[dict[str, Any]], champion: str, challenger: str, shadow: str | None
) -> dict[str, float | None]:
    """The label-free figures of a step's rows: the score shift (PSI of the challenger's
    scores against the champion's) and the disagreement: with ``shadow`` (answering as the
    challenger does), the share of the champion's predictions it answered otherwise; else the
    total variation distance between the two arms' predicted classes."""
    live = [r for r in rows if not r.get("shadow")]
    scores = {
        name: [float(r["score"]) for r in live if r["variant"] == name and r["score"] is not None]
        for name in (champion, challenger)
    }
    out: dict[str, float | None] = {"score_psi": psi(scores[champion], scores[challenger])}
    if shadow is not None:
        pairs = [
            (r["predicted"], r.get("live_predicted"))
            for r in rows
            if r.get("shadow") and r["variant"] == shadow and r.get("live_variant") == champion
        ]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        out["disagreement"] = (
            sum(1 for a, b in pairs if a != b) / len(pairs) if len(pairs) >= MIN_VALUES else None
        )
        return out
    counts = {
        name: Counter(
            r["predicted"] for r in live if r["variant"] == name and r["predicted"] is not None
        )
        for name in (champion, challenger)
    }
    sizes = {name: sum(c.values()) for name, c in counts.items()}
    if min(sizes.values()) < MIN_VALUES:
        out["disagreement"] = None
        return out
    classes = set(counts[champion]) | set(counts[challenger])
    out["disagreement"] = 0.5 * sum(
        abs(counts[champion][c] / sizes[champion] - counts[challenger][c] / sizes[challenger])
        for c in classes
    )
    return out


@dataclass(frozen=True, slots=True)
class Move:
    """A look's outcome: the new state, and the decision it records (None: nothing moved)."""

    state: RolloutState
    decision: str | None


def look(
    rollout: RolloutConfig, state: RolloutState, verdict: Verdict, labelled: int, now: float
) -> Move:
    """The rollout's next state after a look: ``verdict`` from the gates, ``labelled`` the
    challenger's labelled predictions made in the current step."""
    if state.status not in MOVING:
        return Move(state, None)
    if verdict.outcome == "fail":
        reason = "; ".join(verdict.reasons)
        return Move(replace(state, status=ROLLED_BACK, updated_at=now, reason=reason), "rollback")
    in_step = now - state.step_started_at
    ready = (
        verdict.outcome == "pass"
        and in_step >= rollout.step_seconds
        and labelled >= rollout.min_labelled
    )
    if ready:
        percent = rollout.steps[state.step]
        if state.step + 1 >= len(rollout.steps):
            reason = f"every gate passed at {percent:g} %: promoted"
            return Move(replace(state, status=PROMOTED, updated_at=now, reason=reason), "promote")
        step = state.step + 1
        reason = f"every gate passed at {percent:g} %: {rollout.steps[step]:g} %"
        moved = replace(state, step=step, step_started_at=now, updated_at=now, reason=reason)
        return Move(moved, "advance")
    if in_step >= rollout.max_step_seconds:
        why = "; ".join(verdict.reasons) or (
            f"{labelled} of {rollout.min_labelled} labelled predictions"
        )
        reason = f"inconclusive after {in_step:.0f} s at step {state.step + 1}: {why}"
        return Move(replace(state, status=PAUSED, updated_at=now, reason=reason), "pause")
    return Move(state, None)


def act(rollout: RolloutConfig, state: RolloutState, action: str, who: str, now: float) -> Move:
    """An operator's ``action`` (pause, resume, abort, promote) on the rollout; ValueError
    when the state does not allow it."""
    allowed = ACTIONS.get(action)
    if allowed is None:
        raise ValueError(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")
    if state.status not in allowed:
        raise ValueError(f"cannot {action} a rollout that is {state.status}")
    reason = f"{who}: {action}"
    if action == "pause":
        return Move(replace(state, status=PAUSED, updated_at=now, reason=reason), "pause")
    if action == "resume":
        # the step's clock starts again: the pause's time says nothing of the challenger
        moved = replace(state, status=RUNNING, step_started_at=now, updated_at=now, reason=reason)
        return Move(moved, "resume")
    if action == "abort":
        return Move(replace(state, status=ABORTED, updated_at=now, reason=reason), "abort")
    return Move(replace(state, status=PROMOTED, updated_at=now, reason=reason), "promote")


def describe(route: RouteConfig, state: RolloutState, now: float) -> dict[str, Any]:
    """A rollout as ``/admin/rollouts`` answers it."""
    rollout = route.rollout
    assert rollout is not None
    return {
        "id": state.id,
        "route": route.name,
        "champion": champion_of(route),
        "challenger": rollout.challenger,
        "status": state.status,
        "step": state.step + 1,
        "steps": list(rollout.steps),
        "challenger_percent": challenger_percent(rollout, state),
        "weights": weights(route, state),
        "started_at": state.started_at,
        "step_started_at": state.step_started_at,
        "seconds_in_step": max(0.0, now - state.step_started_at),
        "updated_at": state.updated_at,
        "reason": state.reason,
    }


def overlaid(file: LoadedConfig, moved: dict[str, dict[str, float]]) -> LoadedConfig:
    """The file's configuration with the weights rollouts set (``moved``: by route, by
    variant). Its text is the file's with those weights appended under WEIGHTS_KEY, so that
    the history shows what served and why, and its version is that text's."""
    if not moved:
        return file
    routes = []
    for route in file.config.routes:
        weights = moved.get(route.name)
        if weights is None:
            routes.append(route)
            continue
        variants = [
            v.model_copy(update={"weight": weights[v.name]}) if v.name in weights else v
            for v in route.variants
        ]
        routes.append(route.model_copy(update={"variants": variants}))
    config = file.config.model_copy(update={"routes": routes})
    block = yaml.safe_dump({WEIGHTS_KEY: moved}, sort_keys=True)
    text = f"{file.text.rstrip()}\n# the weights rollouts set, over the file's:\n{block}"
    return LoadedConfig(config=config, text=text, version=config_version(text), source=file.source)
