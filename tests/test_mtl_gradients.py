"""Per-task-gradient MTL methods against independent float64 numpy/scipy references on G."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from hisd_jax.mtl import gradients as gm
from hisd_jax.mtl import strategy as strategy_lib

SHAPES = [(2, 10), (3, 24), (5, 50)]
SEEDS = [0, 1]


# ------------------------------------------------------------------------------------ helpers
def make_grads(num_tasks, dim, seed):
    """Task gradients with a shared direction of random sign (so some pairs conflict) and
    norms spread over ~e^{+-1}."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=dim)
    g = rng.uniform(-1.5, 1.5, size=(num_tasks, 1)) * base + rng.normal(size=(num_tasks, dim))
    g = g * np.exp(rng.uniform(-1, 1, size=(num_tasks, 1)))
    return g.astype(np.float32).astype(np.float64)  # exactly representable in float32


def as_tree(g):
    """Split G [T, P] into a two-leaf pytree of different shapes."""
    g = jnp.asarray(g, jnp.float32)
    return {"a": g[:, :3], "b": {"c": g[:, 3:].reshape(g.shape[0], -1, 1)}}


@functools.cache
def jitted(name, num_tasks, hparams=()):
    method = gm.get_gradient_method(name, num_tasks, **dict(hparams))
    return method.init, jax.jit(method.weights)


def run(name, g, losses=None, state=None, seed=0, **hparams):
    """(w float64 [T], new_state) from the jitted method on gram_matrix(G)."""
    num_tasks = g.shape[0]
    init, weights = jitted(name, num_tasks, tuple(sorted(hparams.items())))
    losses = np.ones(num_tasks) if losses is None else losses
    state = init(num_tasks) if state is None else state
    w, new_state = weights(
        gm.gram_matrix(as_tree(g)),
        jnp.asarray(losses, jnp.float32),
        state,
        step=0,
        rng=jax.random.key(seed),
    )
    return np.asarray(w, np.float64), new_state


_orders = jax.jit(gm.random_task_orders, static_argnums=1)


def orders_for(seed, num_tasks):
    return np.asarray(_orders(jax.random.key(seed), num_tasks))


def unit(v):
    return v / np.linalg.norm(v)


def cos(a, b):
    return unit(a) @ unit(b)


# --------------------------------------------------------------------- float64 references on G
def np_pcgrad(g, orders):
    out = g.copy()
    for i in range(len(g)):
        gi = g[i].copy()
        for j in orders[i]:
            dot = gi @ g[j]
            if dot < 0:
                gi = gi - dot / (g[j] @ g[j]) * g[j]
        out[i] = gi
    return out


def np_gradvac(g, orders, targets, beta):
    out, targets = g.copy(), targets.copy()
    for i in range(len(g)):
        gi = g[i].copy()
        for j in orders[i]:
            rho, phi = cos(gi, g[j]), targets[i, j]
            if rho < phi:
                sin_rho, sin_phi = np.sqrt(1 - rho**2), np.sqrt(1 - phi**2)
                num = np.linalg.norm(gi) * (phi * sin_rho - rho * sin_phi)
                gi = gi + num / (np.linalg.norm(g[j]) * sin_phi) * g[j]
            targets[i, j] = (1 - beta) * phi + beta * rho
        out[i] = gi
    return out, targets


def np_min_norm(g):
    """Min-norm point of conv{g_t} by brute force over supports (exact, float64)."""
    best = None
    for size in range(1, len(g) + 1):
        for support in itertools.combinations(range(len(g)), size):
            k = g[list(support)] @ g[list(support)].T
            kkt = np.block([[k, np.ones((size, 1))], [np.ones((1, size)), np.zeros((1, 1))]])
            lam = np.linalg.lstsq(kkt, np.r_[np.zeros(size), 1.0], rcond=None)[0][:size]
            if lam.min() < -1e-12:
                continue
            point = lam @ g[list(support)]
            if best is None or point @ point < best @ best:
                best = point
    return best


def np_cagrad(g, c, divisor):
    """CAGrad's primal, max_d min_i g_i.d s.t. ||d - g0|| <= c ||g0||, by SLSQP in (d, t)."""
    g0 = g.mean(0)
    radius = c * np.linalg.norm(g0)
    cons = [
        {
            "type": "ineq",
            "fun": lambda z: g @ z[:-1] - z[-1],
            "jac": lambda z: np.c_[g, -np.ones(len(g))],
        },
        {
            "type": "ineq",
            "fun": lambda z: radius**2 - np.sum((z[:-1] - g0) ** 2),
            "jac": lambda z: np.r_[-2 * (z[:-1] - g0), 0.0],
        },
    ]
    z0 = np.r_[g0, (g @ g0).min()]
    res = optimize.minimize(
        lambda z: -z[-1],
        z0,
        jac=lambda z: np.r_[np.zeros(len(g0)), -1.0],
        constraints=cons,
        method="SLSQP",
        options={"ftol": 1e-10, "maxiter": 1000},
    )
    assert res.success, res.message
    return res.x[:-1] / divisor


def np_imtlg(g):
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    d_mat, u_mat = g[0] - g[1:], u[0] - u[1:]
    alpha = g[0] @ u_mat.T @ np.linalg.inv(d_mat @ u_mat.T)
    return np.r_[1 - alpha.sum(), alpha] @ g


def np_nash(k):
    """Root of K a - 1/a from a = 1/sqrt(diag K), in float64."""
    res = optimize.root(lambda a: k @ a - 1 / a, 1 / np.sqrt(np.diag(k)))
    assert (res.x > 0).all() and np.abs(res.x * (k @ res.x) - 1).max() < 1e-8, res.message
    return res.x


# ------------------------------------------------------------------------------- pytree helpers
def test_gram_matrix_and_combine_on_pytrees():
    g = make_grads(3, 20, 0)
    gram = np.asarray(gm.gram_matrix(as_tree(g)))
    np.testing.assert_allclose(gram, g @ g.T, rtol=1e-5, atol=1e-5)
    w = np.array([0.3, -1.2, 2.0])
    out = gm.combine(jnp.asarray(w, jnp.float32), as_tree(g))
    flat = np.concatenate([np.asarray(out["a"]), np.asarray(out["b"]["c"]).ravel()])
    np.testing.assert_allclose(flat, w @ g, rtol=1e-5, atol=1e-5)


def test_registry_errors():
    with pytest.raises(ValueError, match="allowed: .*pcgrad"):
        gm.get_gradient_method("nope", 3)
    with pytest.raises(ValueError, match="normalize"):
        gm.get_gradient_method("mgda", 3, normalize="l1")
    with pytest.raises(ValueError, match="num_tasks"):
        gm.get_gradient_method("pcgrad", 1)


@pytest.mark.parametrize("name,expected", [("ew", 1.0), ("mean", None)])
def test_ew_and_mean(name, expected):
    g = make_grads(3, 12, 0)
    w, _ = run(name, g)
    np.testing.assert_allclose(w, np.full(3, expected or 1 / 3))


# --------------------------------------------------------------------------------------- PCGrad
def test_random_task_orders_are_permutations_of_the_other_tasks():
    orders = orders_for(3, 5)
    for i, row in enumerate(orders):
        assert sorted(row) == [j for j in range(5) if j != i]
    assert not np.array_equal(orders, orders_for(4, 5))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_pcgrad_matches_reference(shape, seed):
    g = make_grads(*shape, seed)
    w, _ = run("pcgrad", g, seed=seed)
    projected = np_pcgrad(g, orders_for(seed, shape[0]))
    np.testing.assert_allclose(w @ g, projected.sum(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_pcgrad_projections_reduce_conflict(shape):
    num_tasks = shape[0]
    for seed in range(4):
        g = make_grads(*shape, seed)
        orders = orders_for(seed, num_tasks)
        zeros = jnp.zeros((num_tasks, num_tasks))
        coefs, _ = jax.jit(gm.surgery_coefficients)(gm.gram_matrix(as_tree(g)), orders, zeros, 0.0)
        projected = np.asarray(coefs, np.float64) @ g
        for i in range(num_tasks):
            # the last projection leaves no conflict with the last visited (original) gradient
            assert projected[i] @ g[orders[i, -1]] >= -1e-4 * np.linalg.norm(g[orders[i, -1]]) ** 2
        if num_tasks == 2:  # pairwise guarantee of the paper (does not hold pairwise for T > 2)
            assert cos(projected[0], projected[1]) >= min(cos(g[0], g[1]), 0.0) - 1e-5


# -------------------------------------------------------------------------------------- GradVac
@pytest.mark.parametrize("shape", SHAPES)
def test_gradvac_matches_reference_over_steps(shape):
    num_tasks, beta = shape[0], 0.3
    # start from nonzero targets so that GradVac's rule differs from PCGrad's
    targets = np.random.default_rng(0).uniform(-0.3, 0.6, size=(num_tasks, num_tasks))
    state = {"targets": jnp.asarray(targets, jnp.float32)}
    for step in range(3):
        g = make_grads(*shape, step)
        w, state = run("gradvac", g, state=state, seed=step, beta=beta)
        ref, targets = np_gradvac(g, orders_for(step, num_tasks), targets, beta)
        np.testing.assert_allclose(w @ g, ref.sum(0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(state["targets"]), targets, atol=1e-5)


def test_gradvac_with_zero_targets_is_pcgrad():
    g = make_grads(5, 50, 3)
    w_vac, _ = run("gradvac", g, seed=7)
    w_pc, _ = run("pcgrad", g, seed=7)
    np.testing.assert_allclose(w_vac, w_pc, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- MGDA
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_mgda_is_min_norm_point_of_hull(shape, seed):
    g = make_grads(*shape, seed)
    w, _ = run("mgda", g)
    point, ref = w @ g, np_min_norm(g)
    assert (w >= 0).all() and abs(w.sum() - 1) < 1e-5  # in the hull
    scale = np.linalg.norm(g, axis=1).max()
    np.testing.assert_allclose(point, ref, atol=1e-4 * scale)
    assert np.linalg.norm(point) <= np.linalg.norm(ref) * (1 + 1e-5) + 1e-6 * scale
    # optimality: g_t . g* >= ||g*||^2 for every t
    assert (g @ point >= point @ point - 1e-4 * scale**2).all()


@pytest.mark.parametrize("normalize", ["l2", "loss", "loss+"])
def test_mgda_normalised_hull(normalize):
    g = make_grads(3, 24, 5)
    losses = np.array([0.5, 2.0, 1.3])
    w, _ = run("mgda", g, losses=losses, normalize=normalize)
    norms = np.linalg.norm(g, axis=1)
    n = {"l2": norms, "loss": losses, "loss+": losses * norms}[normalize]
    ref = np_min_norm(g / n[:, None])
    np.testing.assert_allclose(w @ g, ref, atol=1e-4 * np.linalg.norm(ref) + 1e-6)
    np.testing.assert_allclose((w * n).sum(), 1.0, rtol=1e-5)


def test_mgda_two_tasks_closed_form_and_dominated_case():
    g = make_grads(2, 10, 4)
    gamma = np.clip((g[1] - g[0]) @ g[1] / np.sum((g[0] - g[1]) ** 2), 0, 1)
    w, _ = run("mgda", g)
    np.testing.assert_allclose(w, [gamma, 1 - gamma], atol=1e-5)
    g = np.stack([g[0], 3 * g[0]])  # collinear: the shorter one is the min-norm point
    w, _ = run("mgda", g)
    np.testing.assert_allclose(w @ g, g[0], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------- CAGrad
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("c,rescale,divisor", [(0.5, 1, 1.25), (0.9, 0, 1.0), (0.4, 2, 1.4)])
def test_cagrad_matches_primal_reference(shape, c, rescale, divisor):
    g = make_grads(*shape, 0)
    w, _ = run("cagrad", g, c=c, rescale=rescale)
    ref = np_cagrad(g, c, divisor)
    np.testing.assert_allclose(w @ g, ref, atol=2e-4 * np.linalg.norm(ref))


def test_cagrad_c_zero_is_the_mean():
    g = make_grads(5, 50, 2)
    w, _ = run("cagrad", g, c=0.0)
    np.testing.assert_array_equal(w, np.full(5, np.float32(0.2)))
    np.testing.assert_allclose(w @ g, g.mean(0), rtol=1e-6)


# ---------------------------------------------------------------------------------------- IMTL-G
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_imtlg_matches_reference_and_equal_projections(shape, seed):
    g = make_grads(*shape, seed)
    w, _ = run("imtlg", g)
    ref = np_imtlg(g)
    np.testing.assert_allclose(w @ g, ref, atol=1e-4 * np.linalg.norm(ref))
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)
    projections = (g / np.linalg.norm(g, axis=1, keepdims=True)) @ (w @ g)
    np.testing.assert_allclose(projections, projections.mean(), rtol=1e-4)


# -------------------------------------------------------------------------------------- Nash-MTL
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", ["none", "frobenius"])
def test_nash_matches_root_and_solves_bargaining_equation(shape, normalize):
    g = make_grads(*shape, 1)
    k = g @ g.T
    if normalize == "frobenius":
        k = k / np.linalg.norm(k)
    alpha, _ = run("nashmtl", g, normalize=normalize)
    assert (alpha > 0).all()
    np.testing.assert_allclose(alpha * (k @ alpha), 1.0, rtol=1e-3)  # K a = 1/a
    ref = np_nash(k)
    np.testing.assert_allclose(alpha @ g, ref @ g, atol=1e-3 * np.linalg.norm(ref @ g))


def _hard_cases():
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=20), rng.normal(size=20)
    return {
        "nearly_collinear": np.stack([a, a + 1e-3 * b]),
        "collinear": np.stack([a, 2 * a, 0.5 * a]),
        "opposed": np.stack([a, -a]),
        "conflicting": np.stack([a, -a + 0.1 * b, b]),
        "zero_task": np.stack([a, b, np.zeros(20)]),
        "all_zero": np.zeros((3, 20)),
    }


@pytest.mark.parametrize("case", list(_hard_cases()))
def test_nash_is_robust(case):
    g = _hard_cases()[case]
    zero = np.linalg.norm(g, axis=1) == 0  # no alpha solves alpha_t * 0 = 1 / alpha_t
    for normalize in ["none", "frobenius"]:
        alpha, _ = run("nashmtl", g, normalize=normalize)
        assert np.isfinite(alpha).all() and (alpha[~zero] > 0).all(), (normalize, alpha)
        assert (alpha[zero] == 0).all(), (normalize, alpha)
    if case in ("nearly_collinear", "collinear", "conflicting"):  # a minimiser exists without ridge
        alpha, _ = run("nashmtl", g, normalize="none")
        np.testing.assert_allclose(alpha * (g @ g.T @ alpha), 1.0, rtol=1e-2)


@pytest.mark.parametrize("case", list(_hard_cases()))
@pytest.mark.parametrize("name", ["mgda", "pcgrad", "gradvac", "cagrad", "imtlg", "gradnorm"])
def test_all_methods_finite_on_degenerate_gradients(name, case):
    g = _hard_cases()[case]
    w, _ = run(name, g)
    assert np.isfinite(w).all()


# -------------------------------------------------------------------------------------- GradNorm
def np_gradnorm_step(w, norms, losses, initial, alpha, lr, min_weight):
    gw = w * norms
    ratio = losses / initial
    target = gw.mean() * (ratio / ratio.mean()) ** alpha
    new = np.maximum(w - lr * np.sign(gw - target) * norms / gw.mean(), min_weight)
    return new * len(w) / new.sum()


def test_gradnorm_matches_reference_over_steps():
    alpha, lr = 1.5, 0.025
    losses_seq = [np.array([1.0, 2.0, 0.5]), np.array([0.9, 1.0, 0.45]), np.array([0.5, 1.2, 0.4])]
    w_ref, state = np.ones(3), None
    for step, losses in enumerate(losses_seq):
        g = make_grads(3, 24, step)
        w, state = run("gradnorm", g, losses=losses, state=state, alpha=alpha, lr=lr)
        np.testing.assert_allclose(w, w_ref, rtol=1e-5)
        w_ref = np_gradnorm_step(
            w_ref, np.linalg.norm(g, axis=1), losses, losses_seq[0], alpha, lr, 1e-3
        )
        np.testing.assert_allclose(np.asarray(state["weights"]), w_ref, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(state["initial_losses"]), losses_seq[0], rtol=1e-6)
    np.testing.assert_allclose(w_ref.sum(), 3.0)
    assert not np.allclose(w_ref, 1.0)


def test_gcosine_uses_auxiliary_gradients_whose_cosine_with_the_target_is_positive():
    g = np.array([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.1], [0.0, 0.0]])  # target first; g3 = 0
    gram = jnp.asarray(g @ g.T, jnp.float32)
    key = jax.random.key(0)
    plain = gm.get_gradient_method("gcosine", 4)
    w, _ = plain.weights(gram, jnp.ones(4), plain.init(4), step=0, rng=key)
    np.testing.assert_array_equal(w, [1.0, 1.0, 0.0, 0.0])
    weighted = gm.get_gradient_method("gcosine", 4, weighted=True)
    w, _ = weighted.weights(gram, jnp.ones(4), weighted.init(4), step=0, rng=key)
    np.testing.assert_allclose(w, [1.0, 1 / np.sqrt(2), 0.0, 0.0], rtol=1e-6)
    assert np.all(np.isfinite(w))
    # The target by name; every other task measured against it.
    s = strategy_lib.build_strategy("gcosine", ("a", "b", "c", "d"), target="b")
    w, _ = s.method.weights(gram, jnp.ones(4), s.method.init(4), step=0, rng=key)
    np.testing.assert_array_equal(w, [1.0, 1.0, 0.0, 0.0])  # cos(g1, g0) > 0, cos(g1, g2) < 0
    with pytest.raises(ValueError, match="target='x' is not one of"):
        strategy_lib.build_strategy("gcosine", ("a", "b"), target="x")


# ------------------------------------------------------------------ numerics at the edges (#14)
def weights_on_gram(name, gram, losses=None, **hparams):
    """w float64 from the jitted method on a given Gram matrix (float32 input)."""
    num = gram.shape[0]
    init, weights = jitted(name, num, tuple(sorted(hparams.items())))
    losses = np.ones(num) if losses is None else losses
    w, _ = weights(
        jnp.asarray(gram, jnp.float32),
        jnp.asarray(losses, jnp.float32),
        init(num),
        step=0,
        rng=jax.random.key(0),
    )
    return np.asarray(w, np.float64)


def test_mgda_l2_with_a_zero_or_tiny_gradient():
    """A zero gradient normalises to the zero vector: the min-norm point is 0 (no update, finite
    weights; before, the floor 1e-30 was squared, underflowed and gave NaN). A gradient of norm
    1e-18 is a unit vector after normalisation: the hull of two orthogonal unit vectors has its
    min-norm point at (1/2, 1/2) (float64 by hand)."""
    w = weights_on_gram("mgda", np.array([[1.0, 0.0], [0.0, 0.0]]), normalize="l2")
    np.testing.assert_array_equal(w, [0.0, 0.0])
    # K_22 = 1e-38 is subnormal in float32, which XLA flushes to zero: the same as a zero
    # gradient (no update, finite weights).
    w = weights_on_gram("mgda", np.array([[1.0, 0.0], [0.0, 1e-38]]), normalize="l2")
    np.testing.assert_array_equal(w, [0.0, 0.0])
    w = weights_on_gram("mgda", np.array([[1.0, 0.0], [0.0, 1e-36]]), normalize="l2")
    np.testing.assert_allclose(w * np.array([1.0, 1e-18]), [0.5, 0.5], rtol=1e-5)
    # a zero loss puts g / L infinitely far: the task is left out of the hull
    w = weights_on_gram("mgda", np.array([[1.0, 0.2], [0.2, 1.0]]), [0.0, 2.0], normalize="loss")
    np.testing.assert_allclose(w, [0.0, 0.5], rtol=1e-6)


def test_nash_is_scale_free():
    """alpha does not depend on the overall scale (Frobenius normalisation) and follows each
    task's own scale exactly (per-task ridge): diag(1, 1e-6) -> alpha = [1, 1000]."""
    k = np.array([[1.0, 0.6], [0.6, 1.0]])
    base = weights_on_gram("nashmtl", k)
    np.testing.assert_allclose(base, np.sqrt(np.linalg.norm(k)) * np_nash(k), rtol=1e-5)
    np.testing.assert_allclose(weights_on_gram("nashmtl", 1e20 * k), base, rtol=1e-5)
    np.testing.assert_allclose(weights_on_gram("nashmtl", 1e-20 * k), base, rtol=1e-3)
    np.testing.assert_array_equal(weights_on_gram("nashmtl", np.zeros((2, 2))), [0.0, 0.0])
    for normalize in ("none", "frobenius"):
        w = weights_on_gram("nashmtl", np.diag([1.0, 1e-6]), normalize=normalize)
        np.testing.assert_allclose(w, [1.0, 1000.0], rtol=1e-5)


def test_imtlg_projections_equal_with_gradients_1000x_apart():
    g = np.array([[1000.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    update = weights_on_gram("imtlg", g @ g.T) @ g
    projections = g @ update / np.linalg.norm(g, axis=1)
    np.testing.assert_allclose(projections, np.full(3, 2.411795), rtol=1e-5)
    np.testing.assert_allclose(update, np_imtlg(g), rtol=1e-5)


def test_cagrad_with_gradients_1e4_apart_has_no_epsilon_in_its_update():
    g = np.array([[1.0, 0.0], [0.0, 1e-4]])
    w = weights_on_gram("cagrad", g @ g.T, c=0.5, rescale=0)
    np.testing.assert_allclose(w @ g, np_cagrad(g, 0.5, 1.0), rtol=1e-4)
    np.testing.assert_allclose(w @ g, [0.5, 0.25005], rtol=1e-4)


def test_gradnorm_follows_one_trajectory_at_any_gradient_scale():
    """The weights after 30 steps are the same whether the gradients are 1e-4, 1 or 1e4 in
    size (the raw-unit step of the paper's loss would thrash at lr ||g|| >> 1)."""
    rng = np.random.default_rng(0)
    losses = np.exp(-np.linspace(0, 2, 30)[:, None] * np.array([1.0, 0.3, 2.0]))
    grads = [make_grads(3, 24, s) for s in range(30)]
    finals = []
    for scale in (1e-4, 1.0, 1e4):
        state = None
        for g, loss in zip(grads, losses):
            _, state = run("gradnorm", scale * g, losses=loss * rng.uniform(0.9, 1.1), state=state)
        rng = np.random.default_rng(0)
        finals.append(np.asarray(state["weights"]))
    np.testing.assert_allclose(finals[0], finals[1], rtol=1e-4)
    np.testing.assert_allclose(finals[2], finals[1], rtol=1e-4)
    assert not np.allclose(finals[1], 1.0)


METHOD_VARIANTS = [
    ("ew", {}),
    ("mean", {}),
    ("mgda", {"normalize": "none"}),
    ("mgda", {"normalize": "l2"}),
    ("mgda", {"normalize": "loss"}),
    ("mgda", {"normalize": "loss+"}),
    ("pcgrad", {}),
    ("gradvac", {}),
    ("cagrad", {"rescale": 0}),
    ("cagrad", {"rescale": 1}),
    ("imtlg", {}),
    ("gradnorm", {}),
    ("nashmtl", {"normalize": "frobenius"}),
    ("nashmtl", {"normalize": "none"}),
    ("gcosine", {}),
    ("gcosine", {"weighted": True}),
]


@pytest.mark.parametrize("name,hparams", METHOD_VARIANTS, ids=lambda v: str(v))
def test_every_method_at_the_edges(name, hparams):
    """Zero, tiny (1e-20) and huge (Gram x 1e20) gradients, one zero gradient, gradients 10^4
    apart and a zero loss: finite weights, and the same weights at every overall scale (methods
    that divide the gradients by their norms, MGDA l2 / loss+ and Nash-MTL without
    normalisation: weights / sqrt(scale), their own law)."""
    g = make_grads(3, 24, 0)
    losses = np.array([1.0, 0.5, 2.0])
    base = weights_on_gram(name, g @ g.T, losses, **hparams)
    assert np.isfinite(base).all()
    for scale in (1e-20, 1e20):
        w = weights_on_gram(name, scale * (g @ g.T), losses, **hparams)
        assert np.isfinite(w).all(), (scale, w)
        if scale > 1:
            # weights of gradients normalised by their norm shrink as the norms grow
            per_norm = name == "nashmtl" or hparams.get("normalize") in ("l2", "loss+")
            per_norm &= hparams.get("normalize") != "frobenius"
            law = 1.0 / np.sqrt(scale) if per_norm else 1.0
            np.testing.assert_allclose(w, law * base, rtol=2e-4, atol=1e-6 * np.abs(base).max())
    for case in ("zero_task", "all_zero"):
        h = _hard_cases()[case]
        assert np.isfinite(weights_on_gram(name, h @ h.T, losses, **hparams)).all(), case
    apart = g * np.array([[1.0], [1e4], [1e-2]])
    w = weights_on_gram(name, apart @ apart.T, losses, **hparams)
    assert np.isfinite(w).all()
    w = weights_on_gram(name, g @ g.T, np.array([0.0, 0.5, 2.0]), **hparams)
    assert np.isfinite(w).all()


def test_per_task_scale_free_methods_with_gradients_1e4_apart():
    """Against float64 references on gradients scaled by 1, 1e4 and 1e-2."""
    g = make_grads(3, 24, 1) * np.array([[1.0], [1e4], [1e-2]])
    k = g @ g.T
    np.testing.assert_allclose(
        weights_on_gram("imtlg", k) @ g, np_imtlg(g), rtol=1e-4, atol=1e-6 * np.abs(g).max()
    )
    np.testing.assert_allclose(
        weights_on_gram("nashmtl", k, normalize="none"), np_nash(k), rtol=1e-4
    )
    orders = orders_for(0, 3)
    np.testing.assert_allclose(
        weights_on_gram("pcgrad", k) @ g,
        np_pcgrad(g, orders).sum(0),
        rtol=1e-4,
        atol=1e-5 * np.abs(g).max(),
    )
