"""Always-valid decisions: the mixture SPRT against the paper's formula, Holm against
statsmodels, the F1 variance against a simulation, and the error rates of the decisions in
seeded simulated experiments looked at 20 times each."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import optimize
from statsmodels.stats.multitest import multipletests

from model_gateway.estimates import Estimate, hanley_mcneil_se, proportion_difference
from model_gateway.experiments import (
    BETTER,
    KEEP_RUNNING,
    NO_DIFFERENCE,
    WORSE,
    Measure,
    Settings,
    f1_measure,
    judge,
    measures,
)
from model_gateway.sequential import (
    MIN_UNITS,
    always_valid_p,
    half_width,
    holm_adjusted,
    mixture_sprt,
    samples_needed,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def settings(
    primary: str, guardrails: tuple[str, ...] = (), effect: Any = None, alpha: float = 0.05
) -> Settings:
    return Settings(
        id="e",
        start=0.0,
        champion="a",
        champion_named=True,
        primary=primary,
        guardrails=guardrails,
        effects=effect,
        alpha=alpha,
    )


# -- the formulas ----------------------------------------------------------------------------


@given(
    difference=st.floats(-1, 1),
    sigma=st.floats(0.05, 5),
    n=st.integers(2, 1_000_000),
    tau=st.floats(0.001, 2),
)
def test_the_p_value_is_johari_et_al_mixture_sprt(
    difference: float, sigma: float, n: int, tau: float
) -> None:
    """Johari, Pekelis and Walsh (2017), eq. (11) for two streams of n observations each with
    variance sigma**2, written out in their terms: Lambda_n = sqrt(2 s2 / (2 s2 + n tau2)) *
    exp(n**2 tau2 d**2 / (4 s2 (2 s2 + n tau2))), the p-value min(1, 1 / Lambda_n)."""
    s2, tau2 = sigma * sigma, tau * tau
    log_lambda = 0.5 * math.log(2 * s2 / (2 * s2 + n * tau2)) + n * n * tau2 * difference**2 / (
        4 * s2 * (2 * s2 + n * tau2)
    )
    expected = min(1.0, math.exp(-log_lambda)) if log_lambda < 700 else 0.0
    assert always_valid_p(difference, 2 * s2 / n, tau2) == pytest.approx(expected, abs=1e-9)


@given(
    difference=st.floats(-0.5, 0.5),
    variance=st.floats(1e-6, 1e-2),
    tau=st.floats(0.005, 0.5),
    alpha=st.sampled_from([0.01, 0.05, 0.1]),
)
def test_the_interval_is_where_the_p_value_stays_above_alpha(
    difference: float, variance: float, tau: float, alpha: float
) -> None:
    """The confidence sequence is the inverted test: its ends are the effects theta at which
    the p-value of (d - theta) equals alpha, found here by root finding."""
    tau2 = tau * tau
    found = mixture_sprt(difference, variance, tau2, alpha)

    def excess(theta: float) -> float:
        return always_valid_p(difference - theta, variance, tau2) - alpha

    reach = 1.0
    while excess(difference + reach) > 0 or excess(difference - reach) > 0:
        reach *= 2
    high = optimize.brentq(excess, difference, difference + reach, xtol=1e-14)
    low = optimize.brentq(excess, difference - reach, difference, xtol=1e-14)
    assert found.high == pytest.approx(high, abs=1e-9)
    assert found.low == pytest.approx(low, abs=1e-9)
    assert found.high - difference == pytest.approx(half_width(variance, tau2, alpha), abs=1e-12)


@given(st.lists(st.floats(0, 1), min_size=1, max_size=30))
def test_holm_equals_statsmodels(p_values: list[float]) -> None:
    expected = multipletests(p_values, alpha=0.05, method="holm")[1]
    assert holm_adjusted(p_values) == pytest.approx(list(expected), abs=1e-12)


def test_the_f1_variance_matches_a_simulation() -> None:
    """Seed 11, 20,000 samples of 2,000 labelled predictions (tp 20 %, fp 5 %, fn 10 %): the
    variance of F1 across them is the delta method's within 5 %."""
    rng = np.random.default_rng(11)
    shares = np.array([0.20, 0.05, 0.10, 0.65])
    counts = rng.multinomial(2_000, shares, size=20_000)
    f1 = 2 * counts[:, 0] / (2 * counts[:, 0] + counts[:, 1] + counts[:, 2])
    found = f1_measure(400, 100, 200, 2_000)
    assert found is not None
    assert found.value == pytest.approx(800 / 1100)
    assert found.variance == pytest.approx(float(f1.var()), rel=0.05)


def test_samples_needed_gives_the_planned_power() -> None:
    """Seed 5: accuracy 0.85 against 0.80, minimum detectable effect 0.05. At the number of
    predictions per arm ``samples_needed`` names for their variances, the difference is seen
    at that one look (1,750) in 80 % of 2,000 simulated experiments (measured 79.2 %), give
    or take 3 points. The report plans with the arms' observed variances: two arms at 0.80
    after 100 predictions each still need what their variances ask for, less the 100."""
    effect = 0.05
    n = samples_needed(0.85 * 0.15 + 0.8 * 0.2, effect**2, 0.05, effect)
    rng = np.random.default_rng(5)
    seen = 0
    for _ in range(2_000):
        k1, k0 = rng.binomial(n, 0.85), rng.binomial(n, 0.80)
        p1, p0 = k1 / n, k0 / n
        variance = p1 * (1 - p1) / n + p0 * (1 - p0) / n
        seen += always_valid_p(p1 - p0, variance, effect**2) <= 0.05
    assert seen / 2_000 == pytest.approx(0.80, abs=0.03)
    base = Measure(0.8, 0.8 * 0.2 / 100, 100, 100)
    judged = judge({"accuracy": base}, [("b", {"accuracy": base})], settings("accuracy", (), 0.05))
    needed = judged["b"]["metrics"][0]["samples_needed"]
    planned = samples_needed(2 * 0.8 * 0.2, effect**2, 0.05, effect)
    assert needed == planned - 100


# -- decisions -------------------------------------------------------------------------------


def rate_measure(successes: int, n: int) -> Measure:
    return Measure(successes / n, (successes / n) * (1 - successes / n) / n, n, n)


def test_a_lower_is_better_metric_decides_the_other_way() -> None:
    """More errors in the challenger is worse, more precision better; a worse guardrail makes
    the whole comparison worse whatever its primary metric says."""
    champion = {"precision": rate_measure(800, 1000), "error_ratio": rate_measure(10, 1000)}
    challenger = {"precision": rate_measure(900, 1000), "error_ratio": rate_measure(90, 1000)}
    judged = judge(champion, [("b", challenger)], settings("precision", ("error_ratio",)))["b"]
    by_metric = {m["metric"]: m for m in judged["metrics"]}
    assert by_metric["precision"]["decision"] == BETTER
    assert by_metric["error_ratio"]["decision"] == WORSE
    assert by_metric["error_ratio"]["lower_is_better"]
    assert judged["decision"] == WORSE
    same = judge(champion, [("b", champion)], settings("precision"))["b"]["metrics"][0]
    assert same["decision"] in (NO_DIFFERENCE, KEEP_RUNNING)
    assert same["difference"] == 0


def test_nothing_is_concluded_from_too_few_observations() -> None:
    few = {"accuracy": rate_measure(MIN_UNITS - 1, MIN_UNITS - 1)}
    none = {"accuracy": rate_measure(0, MIN_UNITS - 1)}
    judged = judge(none, [("b", few)], settings("accuracy"))["b"]
    assert judged["decision"] == KEEP_RUNNING
    assert judged["metrics"][0]["p_value"] is None


def test_holm_adjusts_across_challengers_and_guardrails() -> None:
    """Two challengers, two guardrails: four guardrail tests, whose adjusted p-values are
    Holm's of their always-valid ones; the primary family has two."""
    champion = {m: rate_measure(700, 1000) for m in ("accuracy", "precision", "recall")}
    b = {m: rate_measure(740, 1000) for m in ("accuracy", "precision", "recall")}
    c = {m: rate_measure(690, 1000) for m in ("accuracy", "precision", "recall")}
    judged = judge(champion, [("b", b), ("c", c)], settings("accuracy", ("precision", "recall")))
    guardrails = [m for key in ("b", "c") for m in judged[key]["metrics"] if m["role"] != "primary"]
    raw = [m["p_value"] for m in guardrails]
    assert [m["adjusted_p_value"] for m in guardrails] == pytest.approx(
        list(multipletests(raw, method="holm")[1]), abs=1e-12
    )
    primaries = [judged[key]["metrics"][0] for key in ("b", "c")]
    assert [m["adjusted_p_value"] for m in primaries] == pytest.approx(
        list(multipletests([m["p_value"] for m in primaries], method="holm")[1]), abs=1e-12
    )


# -- error rates -----------------------------------------------------------------------------

LEVELS = 20
# a classifier with 30 % positives: tp, fp, fn, tn
SHARES = np.array([0.24, 0.07, 0.06, 0.63])
UP, DOWN = np.linspace(1, 3, LEVELS), np.linspace(3, 1, LEVELS)


def binary_arm(confusion: np.ndarray, positives: np.ndarray, negatives: np.ndarray,
               requests: int, errors: int) -> dict[str, Measure]:  # fmt: skip
    """An arm's measures as the report makes them, from counts: the confusion matrix, the
    histograms of the scores of positives and negatives (AUC by Mann-Whitney with ties
    halved, written out here), the experiment's requests and errors."""
    tp, fp, fn, tn = (int(v) for v in confusion)
    quality: dict[str, Any] = {
        "labelled": tp + fp + fn + tn,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "experiment_requests": requests,
        "experiment_errors": errors,
    }
    n_pos, n_neg = int(positives.sum()), int(negatives.sum())
    below = np.concatenate([[0], np.cumsum(negatives)[:-1]])
    auc = float((positives * (below + negatives / 2)).sum() / (n_pos * n_neg))
    quality["auc"], quality["auc_se"] = Estimate(auc), hanley_mcneil_se(auc, n_pos, n_neg)
    return measures(quality, "binary")


def test_an_aa_experiment_looked_at_20_times_rarely_concludes() -> None:
    """Seed 1: 1,000 A/A experiments (both arms the same classifier, 1 % errors), looked at
    every 250 labelled predictions per arm up to 5,000, alpha 0.05, primary precision and
    five guardrails (recall, accuracy, F1, AUC, error ratio). A decision better or worse on
    the primary metric at any look: at most 5 % (measured 0.2 %); on any guardrail: at most
    5 % (measured 0.3 %). The fixed-horizon test of the same data, checked at each look,
    "finds" a difference in about 25 % (measured 25 %)."""
    rng = np.random.default_rng(1)
    plan = settings("precision", ("recall", "accuracy", "f1", "auc", "error_ratio"))
    primary_alarms = guardrail_alarms = fixed_alarms = 0
    for _ in range(1_000):
        confusion = np.zeros((2, 4), dtype=int)
        positives = np.zeros((2, LEVELS), dtype=int)
        negatives = np.zeros((2, LEVELS), dtype=int)
        requests, errors = [0, 0], [0, 0]
        primary = guardrail = fixed = False
        for _look in range(20):
            for arm in range(2):
                step = rng.multinomial(250, SHARES)
                confusion[arm] += step
                positives[arm] += rng.multinomial(step[0] + step[2], UP / UP.sum())
                negatives[arm] += rng.multinomial(step[1] + step[3], DOWN / DOWN.sum())
                requests[arm] += 500
                errors[arm] += rng.binomial(500, 0.01)
            a, b = (
                binary_arm(confusion[i], positives[i], negatives[i], requests[i], errors[i])
                for i in range(2)
            )
            found = judge(a, [("b", b)], plan)["b"]["metrics"]
            primary |= found[0]["decision"] in (BETTER, WORSE)
            guardrail |= any(m["decision"] in (BETTER, WORSE) for m in found[1:])
            (tp1, fp1, _, _), (tp0, fp0, _, _) = confusion[1], confusion[0]
            p_value = proportion_difference("precision", tp1, tp1 + fp1, tp0, tp0 + fp0).p_value
            fixed |= p_value is not None and p_value < 0.05
        primary_alarms += primary
        guardrail_alarms += guardrail
        fixed_alarms += fixed
    assert primary_alarms / 1_000 <= 0.05
    assert guardrail_alarms / 1_000 <= 0.05
    assert fixed_alarms / 1_000 >= 0.15  # the simulation can tell a peeking test apart


def first_decision(rng: np.random.Generator, p_challenger: float, p_champion: float,
                   total: int, plan: Settings) -> str:  # fmt: skip
    """Precision of two arms looked at 20 times up to ``total`` predicted positives each;
    the first decision other than keep_running, as a user acting on it would stop there."""
    step = total // 20
    hits = [0, 0]
    for look in range(1, 21):
        hits[0] += rng.binomial(step, p_champion)
        hits[1] += rng.binomial(step, p_challenger)
        n = step * look
        arms = [
            measures({"labelled": n, "confusion": {"tp": k, "fp": n - k, "fn": 0, "tn": 0}},
                     "binary")
            for k in hits
        ]  # fmt: skip
        decision = judge(arms[0], [("b", arms[1])], plan)["b"]["metrics"][0]["decision"]
        if decision != KEEP_RUNNING:
            return str(decision)
    return KEEP_RUNNING


@pytest.mark.parametrize(
    ("challenger", "champion", "expected", "wrong"),
    [(0.85, 0.80, BETTER, WORSE), (0.80, 0.85, WORSE, BETTER)],
)
def test_a_five_point_precision_gain_is_found_by_2500_predicted_positives(
    challenger: float, champion: float, expected: str, wrong: str
) -> None:
    """Seed 2: precision 0.80 against 0.85, minimum detectable effect 0.05, alpha 0.05,
    looked at every 125 predicted positives per arm. By 2,500, the right decision in at least
    80 % of 500 experiments (measured 96 %), the wrong one in at most 1 % (measured 0)."""
    rng = np.random.default_rng(2)
    plan = settings("precision", (), 0.05)
    found = [first_decision(rng, challenger, champion, 2_500, plan) for _ in range(500)]
    assert found.count(expected) / 500 >= 0.80
    assert found.count(wrong) / 500 <= 0.01


def test_equal_arms_end_in_no_difference() -> None:
    """Seed 3: precision 0.80 in both arms, minimum detectable effect 0.05: by 5,000
    predicted positives per arm at least 90 % of 300 experiments end in no_difference
    (measured 98.7 %), and at most 5 % in a difference (measured 1.3 %)."""
    rng = np.random.default_rng(3)
    plan = settings("precision", (), 0.05)
    found = [first_decision(rng, 0.80, 0.80, 5_000, plan) for _ in range(300)]
    assert found.count(NO_DIFFERENCE) / 300 >= 0.90
    assert (found.count(BETTER) + found.count(WORSE)) / 300 <= 0.05


# -- the cases an independent review found over the level -----------------------------------


def confusion_arm(counts: np.ndarray) -> dict[str, Measure]:
    tp, fp, fn, tn = (int(v) for v in counts)
    return measures(
        {"labelled": tp + fp + fn + tn, "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn}},
        "binary",
    )


def test_f1_of_rare_positives_keeps_its_level() -> None:
    """Seed 313: 400 A/A experiments, 2 % positives (tp, fp, fn 1 % each of the labelled),
    F1 primary, MDE 0.1, read every 20 labelled predictions per arm up to 2,000. A decision
    better or worse in at most 5 % (measured 0 %). Before, F1's variance was 0 for an arm
    with no true positive yet, and 30 labelled predictions were enough whatever F1 rested
    on: 11 % (an independent review measured 10 %)."""
    rng = np.random.default_rng(313)
    plan = settings("f1", (), 0.1)
    shares = [0.01, 0.01, 0.01, 0.97]
    alarms = 0
    for _ in range(400):
        counts = np.zeros((2, 4), dtype=int)
        for _look in range(100):
            counts[0] += rng.multinomial(20, shares)
            counts[1] += rng.multinomial(20, shares)
            judged = judge(confusion_arm(counts[0]), [("b", confusion_arm(counts[1]))], plan)
            if judged["b"]["metrics"][0]["decision"] in (BETTER, WORSE):
                alarms += 1
                break
    assert alarms / 400 <= 0.05


def test_a_small_arm_near_a_rate_of_one_keeps_its_level() -> None:
    """Seed 205: 1,000 A/A experiments of a canary taking 5 % of the traffic, accuracy 0.98
    in both arms, read every 25 canary predictions up to 2,000. A decision better or worse
    in at most 5 % (measured 2.3 %). Before, each arm's own variance was used: the canary's,
    far too small a guess when it had made no error yet, "was better" in 6.9 %."""
    rng = np.random.default_rng(205)
    plan = settings("accuracy")
    alarms = 0
    for _ in range(1_000):
        hits, seen = [0, 0], [0, 0]
        for _look in range(80):
            for arm, n in ((0, 475), (1, 25)):
                hits[arm] += rng.binomial(n, 0.98)
                seen[arm] += n
            arms = [confusion_arm(np.array([hits[i], seen[i] - hits[i], 0, 0])) for i in range(2)]
            if judge(arms[0], [("b", arms[1])], plan)["b"]["metrics"][0]["decision"] in (
                BETTER,
                WORSE,
            ):
                alarms += 1
                break
    assert alarms / 1_000 <= 0.05


def test_better_waits_until_no_guardrail_can_be_worse() -> None:
    """Seed 7: precision 0.85 against 0.80, and recall 0.75 against 0.80 (worse by the full
    MDE, 0.05), read every 100 labelled predictions per arm. The first decision is better in
    at most 5 % of 300 experiments (measured 0.7 %). Before, better came as soon as the
    primary metric was better and no guardrail was yet shown worse: 49 %."""
    rng = np.random.default_rng(7)
    plan = settings("precision", ("recall",), 0.05)
    better = 0
    for _ in range(300):
        counts = np.zeros((2, 4), dtype=int)
        for _look in range(30):
            for arm, (precision, recall) in enumerate(((0.80, 0.80), (0.85, 0.75))):
                positives = rng.binomial(100, 0.5)
                tp = rng.binomial(positives, recall)
                fp = rng.binomial(100, tp * (1 - precision) / precision / 100) if tp else 0
                counts[arm] += [tp, fp, positives - tp, max(100 - positives - fp, 0)]
            decision = judge(confusion_arm(counts[0]), [("b", confusion_arm(counts[1]))], plan)
            if decision["b"]["decision"] != KEEP_RUNNING:
                better += decision["b"]["decision"] == BETTER
                break
    assert better / 300 <= 0.05
