"""Per-task active masks for every MTL strategy, checked against the sub-problem.

For every loss weighting (``weighting._WEIGHTINGS``) and per-task-gradient method
(``gradients._METHODS``): the strategy on T tasks with a traced mask ``active`` must give the
inactive tasks weight 0 (and no gradient, and no state change) and, on the active tasks, what the
same strategy returns when it is built for the active tasks alone (same hparams, the sub-vector of
``task_ids``, the sub-Gram matrix / sub-vector of losses, the active tasks' part of the state).
The references are those independent sub-problem runs; nothing here is a stored output.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hisd_jax.mtl import gradients as gm
from hisd_jax.mtl import weighting as wl

IDS = (101, 7, 4242, 9)  # stable task ids (not 0..T-1, so that the ids matter)
STATIC = (0.7, 1.3, 0.4, 2.0)
STRATEGIES = [("w", n) for n in wl._WEIGHTINGS] + [("g", n) for n in gm._METHODS]

# (T, mask): one task masked out of 3, one out of 4 (three active: random orders matter), two of 4
CASES = [(3, (1, 0, 1)), (4, (1, 1, 0, 1)), (4, (1, 0, 1, 0))]
# a schedule over 6 steps of a 3-task problem: task 1 enters at step 2, leaves at 4, returns at 5
SCHEDULE = [(1, 0, 1), (1, 0, 1), (1, 1, 1), (1, 1, 1), (1, 0, 1), (1, 1, 1)]
TOL = {"rtol": 1e-5, "atol": 1e-6}
SOLVER_TOL = {"rtol": 1e-4, "atol": 1e-5}  # iterative solvers (rounding order differs)
SOLVERS = {"mgda", "cagrad", "nashmtl", "imtlg"}


def tol(name):
    return SOLVER_TOL if name in SOLVERS else TOL


def hparams(kind, name, idx):
    """Hyper-parameters of the (sub-)problem on the tasks ``idx`` (static: the sub-vector)."""
    if kind == "w" and name == "static":
        return {"weights": tuple(STATIC[i] for i in idx)}
    if kind == "w" and name == "dwa":
        return {"steps_per_epoch": 1}  # an epoch per step, so that 6 steps use the ratios
    if kind == "g" and name == "gradvac":
        return {"beta": 0.3}
    if kind == "g" and name == "nashmtl":
        return {"ridge": 1e-2}  # large enough that the ridge's scale (the mean diagonal) matters
    return {}


@functools.cache
def strategy(kind, name, idx, masked=True):
    """(strategy, jitted apply/weights) for the problem on the tasks ``idx`` of ``IDS``; a
    separate jitted function serves the calls without a mask (``masked=False``)."""
    del masked  # only a part of the cache key
    ids = tuple(IDS[i] for i in idx)
    if kind == "w":
        s = wl.get_weighting(name, len(idx), task_ids=ids, **hparams(kind, name, idx))
        return s, jax.jit(s.apply)
    s = gm.get_gradient_method(name, len(idx), task_ids=ids, **hparams(kind, name, idx))
    return s, jax.jit(s.weights)


def init(kind, name, num):
    """(params, state) of the full problem; UW's log-variances are made nonzero."""
    s, _ = strategy(kind, name, tuple(range(num)))
    if kind == "w":
        params, state = s.init(num)
        if "log_var" in params:
            params = {"log_var": jnp.asarray(np.linspace(-0.6, 0.8, num), jnp.float32)}
        return params, state
    return {}, s.init(num)


def call(kind, name, idx, gram, losses, params, state, step, rng, active=None):
    """(w, total (None for gradient methods), new_state) of the jitted strategy on ``idx``."""
    _, fn = strategy(kind, name, idx, active is not None)
    kw = {"step": step, "rng": rng}
    if active is not None:
        kw["active"] = jnp.asarray(active, jnp.float32)
    if kind == "w":
        total, new_state, w = fn(jnp.asarray(losses, jnp.float32), params, state, **kw)
        return np.asarray(w), np.asarray(total), new_state
    w, new_state = fn(jnp.asarray(gram, jnp.float32), jnp.asarray(losses, jnp.float32), state, **kw)
    return np.asarray(w), None, new_state


# ------------------------------------------------------------ task-indexed pytree sub-problems
def _task_index(shape, idx, num):
    return np.ix_(*[np.asarray(idx) if s == num else np.arange(s) for s in shape])


def take(tree, idx, num):
    """The sub-problem's part of a params/state pytree: every axis of size T indexed by idx."""

    def leaf(x):
        x = np.asarray(x)
        return jnp.asarray(x if x.ndim == 0 else x[_task_index(x.shape, idx, num)])

    return jax.tree.map(leaf, tree)


def put(full, sub, idx, num):
    """``full`` with the sub-problem's entries written back (scalars are the sub-problem's)."""

    def leaf(x, y):
        x, y = np.array(x), np.asarray(y)
        if x.ndim == 0:
            return y
        x[_task_index(x.shape, idx, num)] = y
        return x

    return jax.tree.map(leaf, full, sub)


def touches(shape, inactive, num):
    """bool mask of the entries of a leaf that belong to (any) inactive task."""
    out = np.zeros(shape, bool)
    for axis, size in enumerate(shape):
        if size == num:
            out |= np.expand_dims(inactive, [a for a in range(len(shape)) if a != axis])
    return out


def assert_trees_close(actual, expected, **kw):
    flat_a, tree_a = jax.tree.flatten(actual)
    flat_e, tree_e = jax.tree.flatten(expected)
    assert tree_a == tree_e
    for a, e in zip(flat_a, flat_e):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64), **kw)


# ----------------------------------------------------------------------------------- inputs
def make_problem(num, seed, dim=12):
    """A well-conditioned Gram matrix of random (partly conflicting) gradients and losses."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=dim)
    g = rng.uniform(-1.5, 1.5, size=(num, 1)) * base + rng.normal(size=(num, dim))
    g = g * np.exp(rng.uniform(-0.7, 0.7, size=(num, 1)))
    gram = (g @ g.T).astype(np.float32)
    losses = rng.uniform(0.5, 2.0, size=num).astype(np.float32)
    return gram, losses


def sub_gram(gram, idx):
    return gram[np.ix_(idx, idx)]


def ids_of(mask):
    return tuple(int(i) for i in np.flatnonzero(mask))


# ----------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind,name", STRATEGIES)
def test_one_step_matches_sub_problem(kind, name):
    for case, (num, mask) in enumerate(CASES):
        gram, losses = make_problem(num, case)
        params, state = init(kind, name, num)
        idx = ids_of(mask)
        rng = jax.random.key(case)
        w, total, new_state = call(
            kind, name, tuple(range(num)), gram, losses, params, state, 0, rng, mask
        )
        inactive = np.asarray(mask) == 0
        assert (w[inactive] == 0.0).all(), (name, mask, w)
        assert np.isfinite(w).all()
        w_ref, total_ref, state_ref = call(
            kind,
            name,
            idx,
            sub_gram(gram, idx),
            losses[list(idx)],
            take(params, idx, num),
            take(state, idx, num),
            0,
            rng,
        )
        np.testing.assert_allclose(w[list(idx)], w_ref, **tol(name), err_msg=f"{name} {mask}")
        if kind == "w":
            np.testing.assert_allclose(total, total_ref, **tol(name))
        assert_trees_close(new_state, put(state, state_ref, idx, num), **tol(name))
        for leaf_new, leaf_old in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
            t = touches(np.shape(leaf_old), inactive, num)
            np.testing.assert_array_equal(np.asarray(leaf_new)[t], np.asarray(leaf_old)[t])


@pytest.mark.parametrize("kind,name", STRATEGIES)
def test_inactive_inputs_are_never_read(kind, name):
    """inf / nan in an inactive task's loss (and its Gram row and column): the same result."""
    num, mask = CASES[0]
    gram, losses = make_problem(num, 0)
    params, state = init(kind, name, num)
    full = tuple(range(num))
    rng = jax.random.key(0)
    w, total, new_state = call(kind, name, full, gram, losses, params, state, 0, rng, mask)
    for bad in (np.nan, np.inf, -np.inf):
        bad_gram, bad_losses = gram.copy(), losses.copy()
        bad_losses[1] = bad
        bad_gram[1, :] = bad_gram[:, 1] = bad
        w_bad, total_bad, state_bad = call(
            kind, name, full, bad_gram, bad_losses, params, state, 0, rng, mask
        )
        np.testing.assert_array_equal(w_bad, w)
        assert np.isfinite(w_bad).all()
        if kind == "w":
            assert np.isfinite(total_bad) and total_bad == total
        assert_trees_close(state_bad, new_state, rtol=0, atol=0)


@functools.cache
def total_grad(name, idx):
    s, _ = strategy("w", name, idx)

    def total(losses, params, state, active):
        kw = {} if active is None else {"active": active}
        return s.apply(losses, params, state, step=0, rng=jax.random.key(3), **kw)[0]

    return jax.jit(jax.grad(total, argnums=(0, 1)))


@pytest.mark.parametrize("name", list(wl._WEIGHTINGS))
def test_loss_weighting_gradients_of_inactive_tasks_are_zero(name):
    num, mask = CASES[0]
    _, losses = make_problem(num, 0)
    params, state = init("w", name, num)
    idx = ids_of(mask)
    ref_dl, ref_dp = total_grad(name, idx)(
        jnp.asarray(losses[list(idx)]), take(params, idx, num), take(state, idx, num), None
    )
    for bad in (1.3, np.nan, np.inf):
        bad_losses = losses.copy()
        bad_losses[1] = bad
        dl, dp = total_grad(name, tuple(range(num)))(
            jnp.asarray(bad_losses), params, state, jnp.asarray(mask, jnp.float32)
        )
        dl = np.asarray(dl)
        assert dl[1] == 0.0 and np.isfinite(dl).all(), (bad, dl)
        np.testing.assert_allclose(dl[list(idx)], ref_dl, **TOL)
        for leaf in jax.tree.leaves(dp):  # UW's log-variances
            assert np.asarray(leaf)[1] == 0.0 and np.isfinite(leaf).all()
        assert_trees_close(dp, put(jax.tree.map(jnp.zeros_like, params), ref_dp, idx, num), **TOL)


@pytest.mark.parametrize("kind,name", STRATEGIES)
def test_changing_masks_over_steps_match_sub_problem_runs(kind, name):
    """One compiled function, the mask changing every few steps; the reference keeps a full
    state and advances, at each step, only its active tasks' part with the sub-problem."""
    num = len(SCHEDULE[0])
    full = tuple(range(num))
    params, state = init(kind, name, num)
    ref_state = state
    _, fn = strategy(kind, name, full)
    cache_size = None
    for step, mask in enumerate(SCHEDULE):
        gram, losses = make_problem(num, 10 + step)
        losses = losses * np.float32(0.9**step)  # decreasing, so DWA's ratios differ from 1
        rng = jax.random.key(100 + step)
        w, total, new_state = call(kind, name, full, gram, losses, params, state, step, rng, mask)
        cache_size = cache_size or fn._cache_size()
        idx = ids_of(mask)
        inactive = np.asarray(mask) == 0
        sub = full if len(idx) == num else idx
        w_ref, total_ref, sub_state = call(
            kind,
            name,
            sub,
            sub_gram(gram, idx),
            losses[list(idx)],
            take(params, idx, num),
            take(ref_state, idx, num),
            step,
            rng,
        )
        msg = f"{name} step {step} mask {mask}"
        assert (w[inactive] == 0.0).all(), msg
        np.testing.assert_allclose(w[list(idx)], w_ref, **tol(name), err_msg=msg)
        if kind == "w":
            np.testing.assert_allclose(total, total_ref, **tol(name), err_msg=msg)
        ref_state = put(ref_state, sub_state, idx, num)
        assert_trees_close(new_state, ref_state, **tol(name), err_msg=msg)
        for leaf_new, leaf_old in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
            t = touches(np.shape(leaf_old), inactive, num)  # an inactive task's state is frozen
            np.testing.assert_array_equal(np.asarray(leaf_new)[t], np.asarray(leaf_old)[t], msg)
        if name == "gradnorm" and step == 2:  # task 1's L(0) is its loss when it enters
            assert np.asarray(new_state["initial_losses"])[1] == losses[1]
        state = new_state
    assert fn._cache_size() == cache_size  # the masks did not cause recompilations


@pytest.mark.parametrize("kind,name", [("w", "dwa"), ("w", "rlw"), ("g", "pcgrad"), ("g", "mgda")])
def test_one_compilation_serves_every_mask(kind, name):
    num = 3
    s = (wl.get_weighting if kind == "w" else gm.get_gradient_method)(
        name, num, **hparams(kind, name, range(num))
    )
    fn = jax.jit(s.apply if kind == "w" else s.weights)
    gram, losses = make_problem(num, 0)
    params, state = init(kind, name, num)
    for mask in [(1, 0, 1), (0, 1, 1), (1, 1, 1), (0, 0, 0), (0, 1, 0)]:
        kw = {"step": 0, "rng": jax.random.key(0), "active": jnp.asarray(mask, jnp.float32)}
        if kind == "w":
            total, _, w = fn(jnp.asarray(losses), params, state, **kw)
            assert np.isfinite(total) and (sum(mask) > 0 or total == 0.0)
        else:
            w, _ = fn(jnp.asarray(gram), jnp.asarray(losses), state, **kw)
        w = np.asarray(w)
        assert np.isfinite(w).all() and (w[np.asarray(mask) == 0] == 0.0).all(), (mask, w)
    assert fn._cache_size() == 1


@pytest.mark.parametrize("kind,name", STRATEGIES)
def test_all_ones_mask_is_no_mask(kind, name):
    num = 3
    gram, losses = make_problem(num, 5)
    params, state = init(kind, name, num)
    full = tuple(range(num))
    rng = jax.random.key(5)
    masked = call(kind, name, full, gram, losses, params, state, 0, rng, (1, 1, 1))
    plain = call(kind, name, full, gram, losses, params, state, 0, rng)
    np.testing.assert_allclose(masked[0], plain[0], rtol=1e-6, atol=1e-7)  # ulps (XLA fusion)
    if kind == "w":
        np.testing.assert_allclose(masked[1], plain[1], rtol=1e-6, atol=1e-7)
    assert_trees_close(masked[2], plain[2], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(gm._METHODS))
def test_gradient_method_weights_carry_no_gradient(name):
    """Differentiating through ``weights`` with a traced mask works and gives exactly 0."""
    num, mask = CASES[0]
    gram, losses = make_problem(num, 0)
    _, state = init("g", name, num)
    s, _ = strategy("g", name, tuple(range(num)))

    def f(gram, losses, active):
        w, _ = s.weights(gram, losses, state, step=0, rng=jax.random.key(0), active=active)
        return jnp.sum(w * jnp.arange(1.0, num + 1.0))

    dg, dl = jax.jit(jax.grad(f, argnums=(0, 1)))(
        jnp.asarray(gram), jnp.asarray(losses), jnp.asarray(mask, jnp.float32)
    )
    assert not np.asarray(dg).any() and not np.asarray(dl).any()


def np_dwa(loss_rows, masks, steps_per_epoch, temp):
    """DWA with tasks entering/leaving, in numpy: each task's epoch averages over its active
    steps; an active task with two finished epochs uses r_t = last / previous, else r_t = 1;
    w = n softmax(r / temp) over the n active tasks (w = 1 while none has two)."""
    num = len(masks[0])
    seen = [{} for _ in range(num)]  # task -> {epoch: [losses while active]}
    out = []
    for step, (row, mask) in enumerate(zip(loss_rows, masks)):
        epoch = step // steps_per_epoch
        active = [t for t in range(num) if mask[t]]
        ratios, ready = np.ones(num), False
        for t in active:
            done = [np.mean(v) for e, v in sorted(seen[t].items()) if e < epoch]
            if len(done) >= 2:
                ratios[t], ready = done[-1] / done[-2], True
        w = np.zeros(num)
        e = np.exp(ratios[active] / temp)
        w[active] = len(active) * e / e.sum() if ready else 1.0
        out.append(w)
        for t in active:
            seen[t].setdefault(epoch, []).append(row[t])
    return out


def test_dwa_task_entering_late_uses_its_own_epochs():
    weighting = wl.get_weighting("dwa", 3, steps_per_epoch=2, temp=2.0)
    params, state = weighting.init(3)
    apply = jax.jit(weighting.apply)
    rng = np.random.default_rng(0)
    masks = [(1, 1, 0)] * 5 + [(1, 1, 1)] * 5 + [(1, 0, 1)] * 3 + [(1, 1, 1)] * 5
    loss_rows = [rng.uniform(0.5, 2.0, size=3).astype(np.float32) for _ in masks]
    expected = np_dwa(loss_rows, masks, 2, 2.0)
    for step, (row, mask, w_ref) in enumerate(zip(loss_rows, masks, expected)):
        _, state, w = apply(
            jnp.asarray(row), params, state, step=step, rng=None, active=jnp.asarray(mask, "f4")
        )
        np.testing.assert_allclose(w, w_ref, rtol=1e-5, err_msg=f"step {step}")
    assert not np.allclose(expected[-1], 1.0)


# ---------------------------------------------------------------------------------- randomness
_orders = jax.jit(gm.random_task_orders, static_argnums=(1, 2))


def test_random_task_orders_restrict_to_the_sub_problem():
    for seed in range(3):
        rng = jax.random.key(seed)
        orders = np.asarray(_orders(rng, 4, IDS))
        for i, row in enumerate(orders):
            assert sorted(row) == [j for j in range(4) if j != i]
        for idx in [(0, 1, 3), (0, 2), (1, 2, 3)]:
            sub = np.asarray(_orders(rng, len(idx), tuple(IDS[i] for i in idx)))
            for k, i in enumerate(idx):
                restricted = [idx.index(j) for j in orders[i] if j in idx]
                np.testing.assert_array_equal(restricted, sub[k])
    # the orders depend on the ids and on rng
    assert not np.array_equal(
        _orders(jax.random.key(0), 4, IDS), _orders(jax.random.key(1), 4, IDS)
    )
    assert not np.array_equal(
        _orders(jax.random.key(0), 4, IDS), _orders(jax.random.key(0), 4, (1, 2, 3, 4))
    )


def test_random_task_orders_are_uniform():
    """Each of the 3! orders of row 0 (T = 4) appears with frequency ~1/6."""
    rows = jax.vmap(lambda k: gm.random_task_orders(k, 4, IDS)[0])(
        jax.random.split(jax.random.key(0), 3000)
    )
    codes = np.asarray(rows) @ np.array([16, 4, 1])
    _, counts = np.unique(codes, return_counts=True)
    assert len(counts) == 6 and np.abs(counts / 3000 - 1 / 6).max() < 0.03


def test_rlw_draws_per_task_from_its_id():
    """z_t ~ N(0, 1) from fold_in(rng, task_ids[t]): w = softmax over the active tasks."""
    num, mask = CASES[1]
    _, losses = make_problem(num, 1)
    params, state = init("w", "rlw", num)
    for seed in range(3):
        rng = jax.random.key(seed)
        w, _, _ = call("w", "rlw", tuple(range(num)), None, losses, params, state, 0, rng, mask)
        z = np.array([float(jax.random.normal(jax.random.fold_in(rng, i), ())) for i in IDS])
        e = np.where(np.asarray(mask) > 0, np.exp(z - z.max()), 0.0)
        np.testing.assert_allclose(w, e / e.sum(), rtol=1e-5, atol=1e-7)


def test_task_ids_are_validated():
    for get, name in [(wl.get_weighting, "ew"), (gm.get_gradient_method, "mean")]:
        with pytest.raises(ValueError, match="entries"):
            get(name, 3, task_ids=(1, 2))
        with pytest.raises(ValueError, match="distinct"):
            get(name, 3, task_ids=(1, 2, 1))
        with pytest.raises(ValueError, match="2\\^32"):
            get(name, 3, task_ids=(1, 2, -1))
    with pytest.raises(ValueError, match="shape"):
        wl.get_weighting("ew", 3).apply(jnp.ones(3), {}, {}, step=0, rng=None, active=jnp.ones(2))
