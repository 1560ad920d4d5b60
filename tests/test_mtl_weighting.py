"""Loss-weighting strategies on hand-made loss sequences (under jit), and Delta_m."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hisd_jax.mtl.delta_m import delta_m
from hisd_jax.mtl.weighting import get_weighting

LOSSES = jnp.array([1.0, 2.0, 4.0])


def jit_apply(weighting):
    return jax.jit(weighting.apply)


def grad_wrt_losses(weighting, losses, params, state, **kw):
    return jax.grad(lambda losses_: weighting.apply(losses_, params, state, **kw)[0])(losses)


def test_registry_errors():
    with pytest.raises(ValueError, match="allowed: .*dwa"):
        get_weighting("nope", 3)
    with pytest.raises(ValueError, match="shape"):
        get_weighting("static", 3, weights=[1.0, 2.0])


def test_ew_and_static():
    cases = [("ew", {}, [1.0, 1.0, 1.0]), ("static", {"weights": [0.2, 0.5, 0.3]}, [0.2, 0.5, 0.3])]
    for name, hp, w in cases:
        weighting = get_weighting(name, 3, **hp)
        params, state = weighting.init(3)
        total, _, weights = jit_apply(weighting)(LOSSES, params, state, step=0, rng=None)
        np.testing.assert_allclose(weights, w, rtol=1e-6)
        np.testing.assert_allclose(total, np.dot(w, LOSSES), rtol=1e-6)
        g = grad_wrt_losses(weighting, LOSSES, params, state, step=0, rng=None)
        np.testing.assert_allclose(g, w, rtol=1e-6)


def test_uw_formula_and_gradients():
    weighting = get_weighting("uw", 3)
    params, state = weighting.init(3)
    np.testing.assert_array_equal(params["log_var"], np.zeros(3))
    params = {"log_var": jnp.array([0.0, math.log(4.0), -math.log(2.0)])}
    total, _, weights = jit_apply(weighting)(LOSSES, params, state, step=0, rng=None)
    # w = exp(-s)/2 = [1/2, 1/8, 1]; total = sum w L + s/2 = 0.5 + 0.25 + 4 + (ln4 - ln2)/2
    np.testing.assert_allclose(weights, [0.5, 0.125, 1.0], rtol=1e-6)
    np.testing.assert_allclose(total, 4.75 + 0.5 * math.log(2.0), rtol=1e-6)
    # d total / d s = 1/2 - exp(-s) L / 2 = [0, 0.25, -3.5]
    grads = jax.grad(lambda p: weighting.apply(LOSSES, p, state, step=0, rng=None)[0])(params)
    np.testing.assert_allclose(grads["log_var"], [0.0, 0.25, -3.5], atol=1e-6)


def dwa_weights(r, temp=2.0):
    e = np.exp(np.asarray(r) / temp)
    return len(r) * e / e.sum()


def test_dwa_over_five_epochs():
    weighting = get_weighting("dwa", 2, steps_per_epoch=2, temp=2.0)
    params, state = weighting.init(2)
    apply = jit_apply(weighting)
    # two steps per epoch; epoch averages: e0 [2, 2], e1 [1, 2], e2 [0.5, 4], e3 [0.5, 1]
    losses = [
        [1.0, 2.0],
        [3.0, 2.0],
        [1.0, 3.0],
        [1.0, 1.0],
        [0.5, 3.0],
        [0.5, 5.0],
        [1.0, 1.0],
        [0.0, 1.0],
        [2.0, 2.0],
        [2.0, 2.0],
    ]
    expected = (
        [[1.0, 1.0]] * 4  # epochs 0 and 1
        + [dwa_weights([1 / 2, 2 / 2])] * 2  # epoch 2: e1 / e0
        + [dwa_weights([0.5 / 1, 4 / 2])] * 2  # epoch 3: e2 / e1
        + [dwa_weights([0.5 / 0.5, 1 / 4])] * 2
    )  # epoch 4: e3 / e2
    for step, (loss_row, w_ref) in enumerate(zip(losses, expected)):
        row = jnp.asarray(loss_row)
        total, new_state, w = apply(row, params, state, step=step, rng=None)
        np.testing.assert_allclose(w, w_ref, rtol=1e-5, err_msg=f"step {step}")
        np.testing.assert_allclose(total, np.dot(w_ref, row), rtol=1e-5)
        g = grad_wrt_losses(weighting, row, params, state, step=step, rng=None)
        np.testing.assert_allclose(g, w_ref, rtol=1e-5)  # the weights carry no gradient
        state = new_state


def test_rlw_weights_sum_to_one_and_vary_with_rng():
    weighting = get_weighting("rlw", 3)
    params, state = weighting.init(3)
    apply = jit_apply(weighting)
    ws = []
    for seed in range(3):
        rng = jax.random.key(seed)
        total, _, w = apply(LOSSES, params, state, step=0, rng=rng)
        np.testing.assert_allclose(np.sum(w), 1.0, rtol=1e-6)
        assert (np.asarray(w) > 0).all()
        np.testing.assert_allclose(total, np.dot(w, LOSSES), rtol=1e-6)
        g = grad_wrt_losses(weighting, LOSSES, params, state, step=0, rng=rng)
        np.testing.assert_allclose(g, w, rtol=1e-6)  # the weights carry no gradient
        ws.append(np.asarray(w))
    assert not np.allclose(ws[0], ws[1]) and not np.allclose(ws[1], ws[2])


def test_gls_is_the_geometric_mean():
    weighting = get_weighting("gls", 3)
    params, state = weighting.init(3)
    total, _, w = jit_apply(weighting)(LOSSES, params, state, step=0, rng=None)
    np.testing.assert_allclose(total, 2.0, rtol=1e-6)  # (1 * 2 * 4)^(1/3)
    np.testing.assert_allclose(w, [2 / 3, 1 / 3, 1 / 6], rtol=1e-6)  # total / (T L_t)
    g = grad_wrt_losses(weighting, LOSSES, params, state, step=0, rng=None)
    np.testing.assert_allclose(g, w, rtol=1e-6)


# ---------------------------------------------------------------------------------------- delta_m
METRICS = {"seg": {"miou": 0.55, "pix_acc": 0.80}, "depth": {"abs_err": 0.40}}
BASELINES = {"seg": {"miou": 0.50, "pix_acc": 0.80}, "depth": {"abs_err": 0.50}}
HIGHER = {"seg": {"miou": True, "pix_acc": True}, "depth": {"abs_err": False}}


def test_delta_m_hand_computed():
    # terms: +0.05/0.5 = +0.1, 0, -(0.40 - 0.50)/0.50 = +0.2  ->  100 * 0.3 / 3 = 10
    assert delta_m(METRICS, BASELINES, HIGHER) == pytest.approx(10.0)
    worse = {"seg": {"miou": 0.45, "pix_acc": 0.80}, "depth": {"abs_err": 0.60}}
    assert delta_m(worse, BASELINES, HIGHER) == pytest.approx(-10.0)


def test_delta_m_missing_baseline_or_direction_raises():
    with pytest.raises(ValueError, match="abs_err"):
        delta_m(METRICS, {"seg": BASELINES["seg"]}, HIGHER)
    with pytest.raises(ValueError, match="pix_acc"):
        delta_m(METRICS, BASELINES, {"seg": {"miou": True}, "depth": {"abs_err": False}})
    with pytest.raises(ValueError, match="is 0"):
        delta_m(METRICS, {"seg": {"miou": 0.0, "pix_acc": 0.8}, "depth": {"abs_err": 0.5}}, HIGHER)


@pytest.mark.parametrize(
    "name,hparams",
    [
        ("ew", {}),
        ("static", {"weights": [0.2, 0.5, 0.3]}),
        ("uw", {}),
        ("dwa", {"steps_per_epoch": 1}),
        ("rlw", {}),
        ("gls", {}),
    ],
)
def test_a_task_loss_of_exactly_zero(name, hparams):
    """Every weighting with one task's loss exactly 0.0 over several epochs (DWA's loss ratio
    then has 0 on both sides): finite total, weights and gradients; the weights of EW, static,
    UW and RLW do not depend on the loss values, DWA's ratio of the zero task counts as 1."""
    weighting = get_weighting(name, 3, **hparams)
    params, state = weighting.init(3)
    apply = jit_apply(weighting)
    for step in range(5):
        losses = jnp.array([0.0, 2.0 / (step + 1), 4.0])
        kw = dict(step=step, rng=jax.random.key(step))
        total, new_state, weights = apply(losses, params, state, **kw)
        grads = grad_wrt_losses(weighting, losses, params, state, **kw)
        for x in (total, weights, grads):
            assert np.isfinite(np.asarray(x)).all(), (name, step, total, weights, grads)
        state = new_state
    if name == "dwa":  # after two finished epochs: r = [1 (0/0), 0.5/0.667, 1.0]
        r = [1.0, (2.0 / 4) / (2.0 / 3), 1.0]
        np.testing.assert_allclose(weights, dwa_weights(r), rtol=1e-5)


def test_delta_m_averages_over_pairs_or_over_tasks_first():
    """Task a has two metrics, task b one. Pairs: (10 + 20 + (-30)) / 3 = 0; tasks first
    (LibMTL): ((10 + 20) / 2 + (-30)) / 2 = -7.5 (by hand)."""
    metrics = {"a": {"acc": 1.1, "f1": 1.2}, "b": {"mae": 1.3}}
    base = {"a": {"acc": 1.0, "f1": 1.0}, "b": {"mae": 1.0}}
    higher = {"a": {"acc": True, "f1": True}, "b": {"mae": False}}
    assert delta_m(metrics, base, higher) == pytest.approx(0.0, abs=1e-9)
    assert delta_m(metrics, base, higher, average="tasks") == pytest.approx(-7.5)
    single = {"a": {"acc": 1.1}, "b": {"mae": 1.3}}
    assert delta_m(single, base, higher) == pytest.approx(delta_m(single, base, higher, "tasks"))
    with pytest.raises(ValueError, match="average='x' is not one of pairs, tasks"):
        delta_m(metrics, base, higher, average="x")
