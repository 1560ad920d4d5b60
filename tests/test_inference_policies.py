"""Early-exit policies, calibration and threshold fitting (hisd_jax.inference)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from hisd_jax.inference.calibration import (
    calibration_report,
    ece,
    fit_temperature,
    fit_temperatures,
)
from hisd_jax.inference.policies import (
    apply_exits,
    confidence,
    patience_exit,
    summarize,
    threshold_exit,
)
from hisd_jax.inference.thresholds import fit_thresholds, tradeoff_curve

INF = np.inf
# Columns: exits at 0; reaches exit 1 on a tie; never confident (final); exits at 0 on a tie; final.
CONF = np.array([[0.9, 0.5, 0.2, 0.6, 0.1], [0.1, 0.7, 0.3, 0.8, 0.2], [0.0, 0.0, 0.0, 0.0, 0.0]])
THRESHOLD_CASES = [
    ([0.6, 0.7, 0.99], [0, 1, 2, 0, 2]),  # the final exit takes the rest whatever its threshold
    ([INF, 0.7, 0.5], [2, 1, 2, 1, 2]),  # +inf never exits
    ([-INF, 0.7, 0.5], [0, 0, 0, 0, 0]),  # -inf always exits
    ([INF, INF, INF], [2, 2, 2, 2, 2]),
]


def synthetic(seed, num_exits=4, n=3000, grid=None):
    """Multi-exit data: deeper exits are more accurate, confidence correlates with correctness.

    Example n at exit e has margin skill_e - difficulty_n + noise; it is right when the margin is
    positive and its confidence is a noisy sigmoid of the margin (rounded to 1/grid if given).
    """
    rng = np.random.default_rng(seed)
    skill = np.linspace(-0.3, 1.2, num_exits)[:, None]
    margin = skill - rng.normal(size=n) + 0.7 * rng.normal(size=(num_exits, n))
    conf = special.expit(margin + 0.7 * rng.normal(size=(num_exits, n)))
    if grid is not None:
        conf = np.round(conf * grid) / grid
    return conf, margin > 0, np.linspace(0.35, 1.05, num_exits)


def evaluate(conf, correct, cost, thresholds):
    """Accuracy and average cost of ``thresholds``, computed directly."""
    exit_idx = threshold_exit(conf, np.asarray(thresholds, dtype=np.float64))
    return correct[exit_idx, np.arange(conf.shape[1])].mean(), cost[exit_idx].mean()


def objective(acc, avg_cost, goal):
    """Lexicographic objective to minimise (the one fit_thresholds documents)."""
    return tuple(np.round((avg_cost, -acc) if goal == "tolerance" else (-acc, avg_cost), 12))


# ----------------------------------------------------------------------------- policies


@pytest.mark.parametrize("thresholds,expected", THRESHOLD_CASES)
def test_threshold_exit_numpy_and_jit(thresholds, expected):
    np.testing.assert_array_equal(threshold_exit(CONF, np.array(thresholds)), expected)
    got = jax.jit(threshold_exit)(jnp.asarray(CONF), jnp.asarray(thresholds))
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_confidence_kinds_against_hand_values():
    probs = np.array([[[0.5, 0.3, 0.2]], [[0.25, 0.25, 0.5]]])  # [E=2, N=1, C=3]
    logits = np.log(probs) + 3.0  # a shift must not matter
    expected = {
        "max_softmax": [[0.5], [0.5]],
        "margin": [[0.2], [0.25]],
        "neg_entropy": np.sum(probs * np.log(probs), axis=-1),
    }
    for kind, want in expected.items():
        got = confidence(logits, kind)
        assert got.dtype == np.float64 and got.shape == (2, 1)
        np.testing.assert_allclose(got, want, rtol=1e-12)
        got_jit = jax.jit(confidence, static_argnames="kind")(jnp.asarray(logits), kind=kind)
        np.testing.assert_allclose(np.asarray(got_jit), want, rtol=1e-5)


def test_confidence_unknown_kind_lists_allowed():
    with pytest.raises(ValueError, match="max_softmax, margin, neg_entropy"):
        confidence(np.zeros((1, 1, 2)), "entropy")


def test_neg_entropy_ignores_masked_classes():
    logits = np.array([[[0.0, 0.0, -np.inf]]])
    np.testing.assert_allclose(confidence(logits, "neg_entropy"), [[np.log(0.5)]])


def test_confidence_then_threshold_under_jit_matches_numpy():
    logits = np.random.default_rng(0).normal(size=(3, 64, 5)) * 2
    thresholds = np.array([0.4, 0.3, 0.0])
    want = threshold_exit(confidence(logits, "margin"), thresholds)
    rule = jax.jit(lambda z, th: threshold_exit(confidence(z, "margin"), th))
    np.testing.assert_array_equal(
        np.asarray(rule(jnp.asarray(logits), jnp.asarray(thresholds))), want
    )


def test_patience_exit_hand_table():
    preds = np.array([[1, 1, 1, 3, 0], [1, 2, 2, 3, 1], [1, 2, 1, 0, 2], [1, 2, 2, 0, 2]])
    np.testing.assert_array_equal(patience_exit(preds, 1), [0, 0, 0, 0, 0])
    np.testing.assert_array_equal(patience_exit(preds, 2), [1, 2, 3, 1, 3])
    np.testing.assert_array_equal(patience_exit(preds, 3), [2, 3, 3, 3, 3])
    np.testing.assert_array_equal(patience_exit(preds, 5), [3, 3, 3, 3, 3])
    jitted = jax.jit(patience_exit, static_argnums=1)(jnp.asarray(preds), 2)
    np.testing.assert_array_equal(np.asarray(jitted), [1, 2, 3, 1, 3])
    with pytest.raises(ValueError):
        patience_exit(preds, 0)


def test_apply_exits_and_summarize():
    logits = np.array(
        [[[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]], [[0.0, 2.0], [2.0, 0.0], [0.0, 3.0]]]
    )  # [E=2, N=3, C=2]
    exit_idx = np.array([1, 0, 0])
    preds, chosen = apply_exits(logits, exit_idx)
    np.testing.assert_array_equal(preds, [1, 1, 0])
    np.testing.assert_array_equal(chosen, [[0.0, 2.0], [0.0, 1.0], [3.0, 0.0]])
    jit_preds, _ = jax.jit(apply_exits)(jnp.asarray(logits), jnp.asarray(exit_idx))
    np.testing.assert_array_equal(np.asarray(jit_preds), [1, 1, 0])
    report = summarize(exit_idx, preds, np.array([1, 0, 0]), np.array([0.4, 1.1]))
    assert report["accuracy"] == pytest.approx(2 / 3)
    np.testing.assert_allclose(report["exit_rates"], [2 / 3, 1 / 3])
    assert report["avg_cost"] == pytest.approx((0.4 * 2 + 1.1) / 3)


# ----------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize("search", ["shared", "per_exit"])
@pytest.mark.parametrize("tolerance", [0.0, 0.01, 0.03])
def test_tolerance_fit_meets_tolerance(search, tolerance):
    conf, correct, cost = synthetic(0)
    assert np.all(np.diff(correct.mean(axis=1)) > 0)  # the data is what the test assumes
    fit = fit_thresholds(conf, correct, cost, goal="tolerance", value=tolerance, search=search)
    acc, avg_cost = evaluate(conf, correct, cost, fit["thresholds"])
    assert fit["feasible"]
    assert fit["accuracy"] == acc and fit["avg_cost"] == pytest.approx(avg_cost)
    assert acc >= correct[-1].mean() - tolerance - 1e-12
    assert fit["thresholds"].shape == (4,) and fit["exit_rates"].sum() == pytest.approx(1.0)
    if tolerance > 0:
        assert avg_cost < cost[-1] - 0.05  # early exits actually save compute


@pytest.mark.parametrize("search", ["shared", "per_exit"])
@pytest.mark.parametrize("budget", [0.4, 0.6, 0.8])
def test_budget_fit_meets_budget(search, budget):
    conf, correct, cost = synthetic(1)
    fit = fit_thresholds(conf, correct, cost, goal="budget", value=budget, search=search)
    acc, avg_cost = evaluate(conf, correct, cost, fit["thresholds"])
    assert fit["feasible"] and avg_cost <= budget + 1e-12
    assert fit["accuracy"] == acc and acc > correct[0].mean()


@pytest.mark.parametrize(
    "goal,value", [("tolerance", 0.005), ("tolerance", 0.02), ("budget", 0.5), ("budget", 0.7)]
)
def test_per_exit_never_worse_than_shared(goal, value):
    for seed in range(3):
        conf, correct, cost = synthetic(seed, n=1500)
        fits = {
            s: fit_thresholds(conf, correct, cost, goal=goal, value=value, search=s)
            for s in ("shared", "per_exit")
        }
        keys = {s: objective(f["accuracy"], f["avg_cost"], goal) for s, f in fits.items()}
        assert fits["per_exit"]["feasible"] and keys["per_exit"] <= keys["shared"]


def test_searches_match_brute_force_on_tiny_problem():
    """With confidences on a 0.1 grid every distinct setting is a pair of grid values (or +inf):
    the shared search must find the best diagonal setting and the per-exit search (exhaustive
    over its candidates when E = 3) the best setting overall."""
    for seed in range(6):
        conf, correct, cost = synthetic(seed, num_exits=3, n=40, grid=10)
        values = np.append(np.unique(conf[:-1]), INF)
        for goal, value in [
            ("tolerance", 0.0),
            ("tolerance", 0.05),
            ("budget", 0.6),
            ("budget", 0.8),
        ]:
            reference = correct[-1].mean()
            best = {"shared": None, "per_exit": None}
            for a, b in itertools.product(values, values):
                acc, avg_cost = evaluate(conf, correct, cost, [a, b, -INF])
                ok = (
                    acc >= reference - value - 1e-12
                    if goal == "tolerance"
                    else avg_cost <= value + 1e-12
                )
                if not ok:
                    continue
                key = objective(acc, avg_cost, goal)
                for search in ["shared", "per_exit"] if a == b else ["per_exit"]:
                    best[search] = key if best[search] is None else min(best[search], key)
            for search, want in best.items():
                fit = fit_thresholds(conf, correct, cost, goal=goal, value=value, search=search)
                assert fit["feasible"] == (want is not None)
                if want is not None:
                    got = objective(fit["accuracy"], fit["avg_cost"], goal)
                    assert got == want, (seed, goal, value, search)


def test_infeasible_goals_return_closest_setting():
    conf, correct, cost = synthetic(2, n=500)
    cheap = fit_thresholds(conf, correct, cost, goal="budget", value=cost[0] / 2)
    assert not cheap["feasible"] and cheap["avg_cost"] == pytest.approx(cost[0])
    np.testing.assert_array_equal(cheap["exit_rates"], [1, 0, 0, 0])
    strict = fit_thresholds(
        conf, correct, cost, goal="tolerance", value=0.0, reference_accuracy=1.01
    )
    curve = tradeoff_curve(conf, correct, cost)
    assert not strict["feasible"] and strict["accuracy"] >= curve["accuracy"].max()


def test_tradeoff_curve_matches_direct_evaluation():
    conf, correct, cost = synthetic(3, n=800)
    curve = tradeoff_curve(conf, correct, cost, num_points=21)
    assert curve["thresholds"].shape == (21,) and curve["thresholds"][-1] == INF
    for tau, acc, avg_cost in zip(curve["thresholds"], curve["accuracy"], curve["avg_cost"]):
        want_acc, want_cost = evaluate(conf, correct, cost, np.full(4, tau))
        assert acc == pytest.approx(want_acc) and avg_cost == pytest.approx(want_cost)
    assert curve["avg_cost"][0] == pytest.approx(cost[0]) and curve["avg_cost"][
        -1
    ] == pytest.approx(cost[-1])
    np.testing.assert_allclose(curve["exit_rates"].sum(axis=1), 1.0)


def test_fit_thresholds_rejects_unknown_options():
    conf, correct, cost = synthetic(0, n=50)
    with pytest.raises(ValueError, match="tolerance, budget"):
        fit_thresholds(conf, correct, cost, goal="accuracy", value=0.1)
    with pytest.raises(ValueError, match="shared, per_exit"):
        fit_thresholds(conf, correct, cost, goal="budget", value=0.5, search="global")


# ----------------------------------------------------------------------------- calibration


def sample_labels(rng, probs):
    return (probs.cumsum(axis=-1) > rng.random((probs.shape[0], 1))).argmax(axis=-1)


def test_fit_temperature_recovers_known_temperature():
    rng = np.random.default_rng(0)
    logits = 4.0 * rng.normal(size=(20000, 10))
    labels = sample_labels(rng, special.softmax(logits / 2.5, axis=-1))
    assert abs(fit_temperature(logits, labels) - 2.5) < 0.1


def test_ece_hand_computed_and_calibrated():
    probs = np.array([[0.85, 0.15], [0.85, 0.15], [0.35, 0.65], [0.65, 0.35]])
    labels = np.array(
        [0, 1, 1, 0]
    )  # bin (0.8, 0.9]: acc 1/2, conf 0.85; bin (0.6, 0.7]: acc 1, conf 0.65
    assert ece(probs, labels, num_bins=10) == pytest.approx(0.5 * 0.35 + 0.5 * 0.35)
    rng = np.random.default_rng(1)
    probs = special.softmax(3.0 * rng.normal(size=(20000, 10)), axis=-1)
    assert ece(probs, sample_labels(rng, probs)) < 0.02


def test_per_exit_temperatures_and_report():
    rng = np.random.default_rng(2)
    logits = 3.0 * rng.normal(size=(5000, 5))
    labels = sample_labels(rng, special.softmax(logits, axis=-1))
    per_exit = np.stack([logits * 2.0, logits * 0.5])  # over- and under-confident exits
    temps = fit_temperatures(per_exit, labels)
    np.testing.assert_allclose(temps, [2.0, 0.5], rtol=0.1)
    report = calibration_report(per_exit, labels)
    np.testing.assert_array_equal(report["temperatures"], temps)
    assert np.all(report["ece_after"] < 0.03) and np.all(report["ece_before"] > 0.05)


def test_host_decisions_equal_the_cascades_float32_decisions_at_exact_thresholds():
    """Exit-0 logits scaled x3000 (top-1 probabilities that are exactly 1.0 in float32 and just
    below it in float64) and thresholds [1.0, inf, -inf]: the host's reference policy
    (`cascade.mask_policy`, which fits and reports) and the cascade's float32 arithmetic
    (the same `policies.confidence` under JAX in float32) exit the same examples: agreement
    1.0 (it was 0.939 with float64 confidences)."""
    import jax.numpy as jnp  # noqa: PLC0415

    from hisd_jax.inference import cascade, policies  # noqa: PLC0415

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 512, 10)).astype(np.float32)
    logits[0] *= 3000.0
    thresholds = np.array([1.0, np.inf, -np.inf])
    host_exit, _, _ = cascade.mask_policy(logits, "max_softmax", thresholds)
    conf32 = policies.confidence(jnp.asarray(logits), "max_softmax")  # as `_stage` computes it
    device_exit = policies.threshold_exit(conf32, jnp.asarray(thresholds, jnp.float32))
    np.testing.assert_array_equal(host_exit, np.asarray(device_exit))
    float64_exit = policies.threshold_exit(
        policies.confidence(logits.astype(np.float64), "max_softmax"), thresholds
    )
    assert (float64_exit != host_exit).any()  # the case is one where float64 would disagree


def test_float32_ceiling_keeps_every_decision():
    from hisd_jax.inference import cascade  # noqa: PLC0415

    rng = np.random.default_rng(1)
    conf = rng.uniform(0, 1, 20000).astype(np.float32)
    thresholds = np.concatenate([rng.uniform(0, 1, 50), conf[:50].astype(np.float64), [1.0]])
    thresholds[10] = np.nextafter(np.float64(conf[3]), 0.0)  # just below a float32 value
    ceiled = cascade.float32_ceiling(thresholds)
    assert ceiled.dtype == np.float32
    for t, c in zip(thresholds, ceiled):
        np.testing.assert_array_equal(conf >= t, conf >= c)
