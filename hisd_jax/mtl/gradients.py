"""Per-task-gradient MTL methods, expressed as weights over the task gradients.

Every method here produces an update that is a linear combination of the task gradients,
g = sum_t w_t g_t = w^T G with G [T, P] the stacked task gradients. A method therefore only needs
the Gram matrix K = G G^T [T, T] (plus the task losses and a small state pytree) and returns w:

* parameter space: ``K = gram_matrix(grads)`` from per-task gradients of the shared parameters,
  then ``update = combine(w, grads)``;
* representation space (MGDA-UB style): K from the gradients w.r.t. the shared representation,
  then back-propagate ``sum_t stop_gradient(w_t) L_t``.

Memory stays at T x T and the two parameter-sized contractions (K and w^T G) shard like any
other reduction. Projection methods (PCGrad, GradVac) are linear too: the projected gradient of
task i is tracked as a coefficient row C_i (g'_i = sum_j C_ij g_j), and its dot products come
from C K. All solvers are fixed-iteration ``lax.fori_loop``s, so every ``weights`` function jits.
Computation is in float32; scale-invariant methods work on K divided by its mean diagonal.

Interface (the caller keeps ``state`` in its train state):

    method = get_gradient_method("pcgrad", num_tasks=3, task_ids=(7, 3, 11))
    state = method.init(3)
    w, state = method.weights(gram, losses, state, step=step, rng=rng, active=active)

Active tasks. ``active`` (float32 [T] of 0/1, may be traced and change between steps of one
compiled function; None = all active) marks the tasks that take part in this step. On the active
tasks every method returns what it returns on the sub-problem with the inactive tasks deleted
(the sub-Gram matrix without their rows and columns, the sub-vector of losses, the matching
sub-vector of ``task_ids``); an inactive task gets w_t = 0 exactly, its rows/columns of K and
its loss are never read into the result (they may be inf or nan), and its entries of ``state``
are left untouched, so when it becomes active again it resumes from its own state (or its
initialisation). Solvers work on the active subset (masked argmin/argmax, masked means such as
the mean diagonal of ``_unit_scale``), not on a zero gradient for the inactive tasks.

Task ids. ``task_ids`` (construction time; T distinct ints in [0, 2^32), default 0..T-1) name the
tasks for randomness: task t's random numbers come from ``jax.random.fold_in(rng, task_ids[t])``,
so PCGrad/GradVac's random visiting orders restricted to the active tasks equal the orders drawn
on the sub-problem with the same ids.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hisd_jax.mtl.weighting import active_mask, resolve_task_ids, task_keys

_TINY = 1e-30  # floors a squared norm against 0/0 only, never a scale


class GradientMethod(NamedTuple):
    """A per-task-gradient method.

    init: num_tasks -> state pytree.
    weights: (gram [T,T], losses [T], state, *, step, rng, active=None) -> (w [T], new_state);
      the update is w^T G. ``w`` is stop-gradient'ed; ``active`` float [T] of 0/1 (None: all
      tasks active), see the module doc.
    """

    init: Callable[[int], Any]
    weights: Callable[..., tuple[jax.Array, Any]]


# ------------------------------------------------------------------------------- pytree helpers
def gram_matrix(per_task_grads) -> jax.Array:
    """K_ij = g_i . g_j summed over all leaves (leading axis = task), in float32."""
    leaves = jax.tree_util.tree_leaves(per_task_grads)
    num_tasks = leaves[0].shape[0]
    gram = jnp.zeros((num_tasks, num_tasks), jnp.float32)
    for leaf in leaves:
        leaf = leaf.astype(jnp.float32)
        axes = tuple(range(1, leaf.ndim))  # no reshape, so sharded leaves stay as they are
        gram = gram + jnp.tensordot(leaf, leaf, axes=(axes, axes), precision=lax.Precision.HIGHEST)
    return gram


def combine(w, per_task_grads):
    """sum_t w_t g_t for every leaf (tensordot over the leading task axis)."""
    return jax.tree_util.tree_map(
        lambda g: jnp.tensordot(w.astype(g.dtype), g, axes=1, precision=lax.Precision.HIGHEST),
        per_task_grads,
    )


# ------------------------------------------------------------------------------ shared numerics
def _masked_gram(gram, active=None):
    """K in float32 with the rows and columns of inactive tasks replaced by those of I.

    An inactive task then looks like a unit gradient orthogonal to all others (its own entries,
    possibly inf/nan, are never read); the solvers still exclude it explicitly.
    """
    gram = gram.astype(jnp.float32)
    num = gram.shape[0]
    mask = active_mask(active, num)
    both = mask[:, None] & mask[None, :]
    return jnp.where(both, gram, jnp.eye(num, dtype=jnp.float32))


def _unit_scale(gram, active=None):
    """(K / s, s) with s the mean diagonal of K over the active tasks, the scale-free form used by
    the solvers (inactive rows/columns: those of I, see ``_masked_gram``)."""
    num = gram.shape[0]
    mask = active_mask(active, num)
    gram = _masked_gram(gram, mask)
    num_active = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
    scale = jnp.maximum(jnp.sum(jnp.where(mask, jnp.diag(gram), 0.0)) / num_active, _TINY)
    both = mask[:, None] & mask[None, :]
    return jnp.where(both, gram / scale, jnp.eye(num, dtype=jnp.float32)), scale


def _cosine(gram, mask):
    """(C, norms, nonzero): C_ij = K_ij / (||g_i|| ||g_j||) computed as two divisions (no
    product of norms, so 1e-20 and 1e20 gradients neither underflow nor overflow), with the rows
    and columns of inactive or zero-gradient tasks those of I; norms = sqrt(diag K) (0 for
    inactive tasks); nonzero = active with a positive norm. C is the scale-free form of K:
    scaling task t's gradient leaves it unchanged."""
    gram = _masked_gram(gram, mask)
    norms = jnp.where(mask, jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0)), 0.0)
    nonzero = mask & (norms > 0)
    safe = jnp.where(nonzero, norms, 1.0)
    both = nonzero[:, None] & nonzero[None, :]
    cos = jnp.clip(gram / safe[:, None] / safe[None, :], -1.0, 1.0)
    return jnp.where(both, cos, jnp.eye(gram.shape[0], dtype=jnp.float32)), norms, nonzero


def _uniform(mask):
    """1/n on the n active tasks, 0 elsewhere."""
    num_active = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
    return jnp.where(mask, 1.0 / num_active, 0.0)


def _no_state(num_tasks):
    del num_tasks
    return {}


def _pairwise_frank_wolfe(x0, grad_fn, step_fn, iters, mask):
    """Minimise a convex function over the probability simplex by pairwise Frank-Wolfe.

    Each iteration moves mass from the active vertex v (x_v > 0) with the largest partial
    derivative to the vertex s with the smallest one, x <- x + gamma (e_s - e_v), with
    gamma = step_fn(x, e_s - e_v, x_v) in [0, x_v] from an exact line search. Unlike plain
    Frank-Wolfe it converges linearly for objectives like the min-norm problem (Lacoste-Julien &
    Jaggi, NeurIPS 2015); a fixed iteration count gives an essentially exact solution for
    moderate T (the tests compare against float64 references). Only the vertices of the active
    tasks (``mask``) are used, so x0 supported on them stays on their face of the simplex.
    """
    vertices = jnp.eye(x0.shape[0], dtype=x0.dtype)

    def body(_, x):
        g = grad_fn(x)
        s = jnp.argmin(jnp.where(mask, g, jnp.inf))
        v = jnp.argmax(jnp.where(mask & (x > 0), g, -jnp.inf))
        d = vertices[s] - vertices[v]
        return x + step_fn(x, d, x[v]) * d

    return lax.fori_loop(0, iters, body, x0)


def min_norm_weights(gram, iters: int = 250, active=None):
    """lambda on the simplex minimising ||lambda^T G||^2 = lambda^T K lambda (pairwise Frank-Wolfe).

    For T = 2 the first iteration is the exact closed form of Sener & Koltun (2018, Alg. 1).
    With ``active``, the simplex of the active tasks (lambda_t = 0 for the others).
    """
    mask = active_mask(active, gram.shape[0])
    gram, _ = _unit_scale(gram, mask)

    def step(x, d, gmax):  # exact line search of the quadratic along d
        slope = d @ gram @ x
        curvature = d @ gram @ d
        return jnp.clip(-slope / jnp.maximum(curvature, _TINY), 0.0, gmax)

    x = _pairwise_frank_wolfe(_uniform(mask), lambda x: gram @ x, step, iters, mask)
    return jnp.where(mask, x, 0.0)


def random_task_orders(rng, num_tasks: int, task_ids=None) -> jax.Array:
    """int32 [T, T-1]: row i is a uniformly random order of the tasks other than i.

    Row i sorts the other tasks j by u_ij ~ U[0, 1) drawn from
    ``fold_in(fold_in(rng, task_ids[i]), task_ids[j])`` (``task_ids`` default 0..T-1), so the
    relative order of any subset of tasks depends only on their ids: the sub-problem with the
    same ids draws the same orders restricted to its tasks.
    """
    ids = jnp.asarray(np.asarray(resolve_task_ids(task_ids, num_tasks), np.uint32))
    keys = task_keys(rng, resolve_task_ids(task_ids, num_tasks))

    def row(i, key):
        u = jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(key, j)))(ids)
        u = jnp.where(jnp.arange(num_tasks) == i, jnp.inf, u)  # task i itself sorts last
        return jnp.argsort(u, stable=True)[: num_tasks - 1]

    return jax.vmap(row)(jnp.arange(num_tasks), keys).astype(jnp.int32)


def surgery_coefficients(gram, orders, targets, beta: float, active=None):
    """GradVac-style gradient surgery on coefficient rows (PCGrad is targets = 0, beta = 0).

    For each task i, starting from g'_i = g_i, and for each j in ``orders[i]``:
      rho = cos(g'_i, g_j);
      if rho < phi_ij:  g'_i <- g'_i + ||g'_i|| (phi_ij sqrt(1-rho^2) - rho sqrt(1-phi_ij^2))
                                       / (||g_j|| sqrt(1-phi_ij^2)) g_j;
      phi_ij <- (1 - beta) phi_ij + beta rho.
    With phi_ij = 0 the correction is -(g'_i . g_j / ||g_j||^2) g_j, i.e. PCGrad's projection
    onto the normal plane of the ORIGINAL g_j whenever g'_i . g_j < 0.

    With ``active``, pairs (i, j) with an inactive task are skipped: C_ij stays 0 for an inactive
    j, the row of an inactive i stays e_i, and their targets are left unchanged.

    Returns (C [T, T] with g'_i = sum_j C_ij g_j, updated targets [T, T]).
    """
    num_tasks = gram.shape[0]
    mask = active_mask(active, num_tasks)
    gram, _ = _unit_scale(gram, mask)
    norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))

    def one_task(i, order, phi_row):
        def body(k, carry):
            c, phi_row = carry
            j = order[k]
            ck = c @ gram
            norm_i = jnp.sqrt(jnp.maximum(ck @ c, 0.0))
            den = norm_i * norms[j]
            rho = jnp.clip(ck[j] / jnp.where(den > 0, den, 1.0), -1.0, 1.0)
            phi = phi_row[j]
            sin_phi = jnp.sqrt(jnp.maximum(1.0 - phi**2, 0.0))
            den = norms[j] * sin_phi
            coef = norm_i * (phi * jnp.sqrt(1.0 - rho**2) - rho * sin_phi)
            coef = jnp.where(den > 0, coef / jnp.where(den > 0, den, 1.0), 0.0)
            # a zero g'_i or g_j has no direction to correct: the pair is skipped
            visit = mask[i] & mask[j] & (norm_i > 0) & (norms[j] > 0)
            c = c.at[j].add(jnp.where(visit & (rho < phi), coef, 0.0))
            phi_row = phi_row.at[j].set(jnp.where(visit, (1.0 - beta) * phi + beta * rho, phi))
            return c, phi_row

        c0 = jax.nn.one_hot(i, num_tasks, dtype=jnp.float32)
        return lax.fori_loop(0, num_tasks - 1, body, (c0, phi_row))

    return jax.vmap(one_task)(jnp.arange(num_tasks), orders, targets.astype(jnp.float32))


# -------------------------------------------------------------------------------------- methods
def _ew(num_tasks, task_ids):
    """Equal weighting: g = sum_t g_t (w = 1)."""
    del num_tasks, task_ids

    def weights(gram, losses, state, *, step, rng, active=None):
        mask = active_mask(active, gram.shape[0])
        return jnp.where(mask, 1.0, 0.0).astype(jnp.float32), state

    return GradientMethod(_no_state, weights)


def _mean(num_tasks, task_ids):
    """Mean gradient: g = (1/T) sum_t g_t."""
    del num_tasks, task_ids

    def weights(gram, losses, state, *, step, rng, active=None):
        return _uniform(active_mask(active, gram.shape[0])), state

    return GradientMethod(_no_state, weights)


_MGDA_NORMALIZERS = ("none", "l2", "loss", "loss+")


def _mgda(num_tasks, task_ids, normalize: str = "none", iters: int = 250):
    """MGDA / MGDA-UB (Sener & Koltun, NeurIPS 2018).

    With normalisers n_t (none: 1; l2: ||g_t||; loss: L_t; loss+: L_t ||g_t||) the min-norm
    element of the convex hull of {g_t / n_t} is found on the Gram matrix,
      lambda = argmin_{lambda in simplex} ||sum_t lambda_t g_t / n_t||^2   (sum lambda = 1),
    and the returned weights are w_t = lambda_t / n_t, so that w^T G is exactly that min-norm
    point (for "none", w = lambda sums to 1). Applied to representation gradients this is MGDA-UB.
    A task whose normaliser is 0: a zero gradient (l2, loss+) is the zero vector of the hull
    (the min-norm point is then 0, w = 0), a zero loss (loss, loss+) leaves the task out of
    the hull (w_t = 0). K / (n n^T) is formed by two divisions, so no n_i n_j underflows.
    The original code instead applies lambda to the un-normalised losses; we keep the update
    consistent with the hull the solver minimised over.
    """
    del num_tasks, task_ids
    if normalize not in _MGDA_NORMALIZERS:
        raise ValueError(f"mgda normalize must be one of {_MGDA_NORMALIZERS}, got {normalize!r}")

    def weights(gram, losses, state, *, step, rng, active=None):
        mask = active_mask(active, gram.shape[0])
        gram = _masked_gram(gram, mask)
        grad_norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))
        losses = jnp.where(mask, lax.stop_gradient(losses).astype(jnp.float32), 1.0)
        n = {
            "none": jnp.ones_like(grad_norms),
            "l2": grad_norms,
            "loss": losses,
            "loss+": losses * grad_norms,
        }[normalize]
        # A normaliser of 0 (or not finite): a zero gradient normalises to the zero vector,
        # which then lies in the hull (the min-norm point is 0: no update); a zero loss puts
        # g_t / 0 infinitely far, which the min-norm point never uses: the task is left out.
        ok = (n > 0) & jnp.isfinite(n)
        zero_vector = ~ok & (grad_norms == 0) & (normalize in ("l2", "loss+"))
        use = mask & (ok | zero_vector)
        safe = jnp.where(ok, n, 1.0)
        scaled = gram / safe[:, None] / safe[None, :]  # two divisions: no n_i n_j underflow
        scaled = jnp.where(zero_vector[:, None] | zero_vector[None, :], 0.0, scaled)
        lam = min_norm_weights(scaled, iters, use)
        return lax.stop_gradient(jnp.where(use & ok, lam / safe, 0.0)), state

    return GradientMethod(_no_state, weights)


def _active_column_sums(coefs, mask):
    """w_j = sum_i C_ij over the active rows i (0 for an inactive j)."""
    return jnp.where(mask, jnp.sum(jnp.where(mask[:, None], coefs, 0.0), axis=0), 0.0)


def _pcgrad(num_tasks, task_ids):
    """PCGrad (Yu et al., NeurIPS 2020), "gradient surgery".

    For each task i, visiting the other tasks j in a random order (``random_task_orders``):
      if g'_i . g_j < 0:  g'_i <- g'_i - (g'_i . g_j / ||g_j||^2) g_j      (g_j the original),
    and the update is sum_i g'_i. Returned weights are the column sums of the coefficient matrix.
    """

    def weights(gram, losses, state, *, step, rng, active=None):
        mask = active_mask(active, num_tasks)
        orders = random_task_orders(rng, num_tasks, task_ids)
        zeros = jnp.zeros((num_tasks, num_tasks), jnp.float32)
        coefs, _ = surgery_coefficients(gram, orders, zeros, 0.0, mask)
        return lax.stop_gradient(_active_column_sums(coefs, mask)), state

    return GradientMethod(_no_state, weights)


def _gradvac(num_tasks, task_ids, beta: float = 0.01):
    """Gradient Vaccine (Wang et al., ICLR 2021), whole-model granularity.

    Like PCGrad but each pair (i, j) has an EMA target cosine phi_ij (state, starts at 0): if
    rho_ij = cos(g'_i, g_j) < phi_ij then
      g'_i <- g'_i + ||g'_i|| (phi_ij sqrt(1-rho_ij^2) - rho_ij sqrt(1-phi_ij^2))
                     / (||g_j|| sqrt(1-phi_ij^2)) g_j,
    and, for every visited pair (as in the paper's Algorithm 1),
      phi_ij <- (1 - beta) phi_ij + beta rho_ij.
    The update is sum_i g'_i. See ``surgery_coefficients``; the targets of pairs with an
    inactive task are left unchanged.
    """

    def init(num):
        return {"targets": jnp.zeros((num, num), jnp.float32)}

    def weights(gram, losses, state, *, step, rng, active=None):
        mask = active_mask(active, num_tasks)
        orders = random_task_orders(rng, num_tasks, task_ids)
        coefs, targets = surgery_coefficients(gram, orders, state["targets"], beta, mask)
        return lax.stop_gradient(_active_column_sums(coefs, mask)), {"targets": targets}

    return GradientMethod(init, weights)


_CAGRAD_RESCALES = (0, 1, 2)


def _cagrad(
    num_tasks,
    task_ids,
    c: float = 0.5,
    rescale: int = 1,
    iters: int = 250,
    line_search_iters: int = 40,
):
    """CAGrad (Liu et al., NeurIPS 2021).

    With g0 the mean gradient and phi = c^2 ||g0||^2, find
      x = argmin_{x in simplex} g_x^T g0 + sqrt(phi) ||g_x||,   g_x = sum_t x_t g_t,
    (pairwise Frank-Wolfe with a bisection line search), then
      g = (g0 + sqrt(phi) / ||g_x|| g_x) / r,   r = 1 (rescale=0), 1 + c^2 (1), 1 + c (2).
    Returned weights: w = (1/T + sqrt(phi) / ||g_x|| x) / r. c = 0 gives exactly the mean.
    """
    del task_ids
    if rescale not in _CAGRAD_RESCALES:
        raise ValueError(f"cagrad rescale must be one of {_CAGRAD_RESCALES}, got {rescale!r}")
    divisor = {0: 1.0, 1: 1.0 + c**2, 2: 1.0 + c}[rescale]

    def weights(gram, losses, state, *, step, rng, active=None):
        mask = active_mask(active, num_tasks)
        gram, _ = _unit_scale(gram, mask)
        mean_w = _uniform(mask)
        k_mean = gram @ mean_w  # K_t. g0 for every task
        radius = c * jnp.sqrt(jnp.maximum(mean_w @ k_mean, 0.0))

        def norm_sq(x):  # floored only against 0/0; K x / ||g_x|| stays bounded by ||g_t||
            return jnp.maximum(x @ gram @ x, _TINY)

        def grad_fn(x):
            return k_mean + radius * (gram @ x) / jnp.sqrt(norm_sq(x))

        def step_fn(x, d, gmax):  # root of the (monotone) directional derivative on [0, gmax]
            slope_lin, q1, q2 = d @ k_mean, x @ gram @ d, d @ gram @ d

            def deriv(gamma):
                return slope_lin + radius * (q1 + gamma * q2) / jnp.sqrt(norm_sq(x + gamma * d))

            def bisect(_, bounds):
                lo, hi = bounds
                mid = 0.5 * (lo + hi)
                up = deriv(mid) > 0
                return jnp.where(up, lo, mid), jnp.where(up, mid, hi)

            lo, _ = lax.fori_loop(0, line_search_iters, bisect, (jnp.zeros_like(gmax), gmax))
            return jnp.where(deriv(gmax) <= 0, gmax, lo)

        x = _pairwise_frank_wolfe(mean_w, grad_fn, step_fn, iters, mask)
        norm = jnp.sqrt(jnp.maximum(x @ gram @ x, 0.0))  # no guard enters the coefficient
        w = mean_w + jnp.where(norm > 0, radius / jnp.where(norm > 0, norm, 1.0), 0.0) * x
        w = w / divisor
        return lax.stop_gradient(jnp.where(mask, w, 0.0)), state

    return GradientMethod(_no_state, weights)


def _imtlg(num_tasks, task_ids):
    """IMTL-G (Liu et al., ICLR 2021, "Towards Impartial Multi-task Learning"), gradient part.

    The update g = w^T G with sum(w) = 1 whose projections onto the unit gradients
    u_t = g_t / ||g_t|| are all equal. (The paper writes it as alpha = g_1 U^T (D U^T)^-1 with
    D = [g_1 - g_t], U = [u_1 - u_t]; the solution is the same.) Solved on the cosine matrix
    C (`_cosine`), which is free of the gradients' scales: with g = sum_s v_s u_s the
    projections are C v, so v = c C^+ 1 and w_s = v_s / ||g_s||, c = 1 / sum_s (C^+ 1)_s /
    ||g_s|| (sum(w) = 1); c is then the common projection. Gradients 10^4 apart, 1e-20 or 1e20
    in size give the same projections to float32 precision (forming D U^T does not: its
    entries mix the scales). The pseudo-inverse (cutoff 10 n eps, n the tasks used) keeps
    collinear cases finite. Inactive tasks and tasks with a zero gradient get w_t = 0 (the
    sub-problem's solution).
    """
    del task_ids
    num = num_tasks
    eps = float(jnp.finfo(jnp.float32).eps)

    def weights(gram, losses, state, *, step, rng, active=None):
        mask = active_mask(active, num)
        cos, norms, use = _cosine(gram, mask)
        n = jnp.sum(use.astype(jnp.float32))
        y = jnp.linalg.pinv(cos, rtol=10.0 * jnp.maximum(n, 1.0) * eps) @ use.astype(jnp.float32)
        safe = jnp.where(use, norms, 1.0)
        per_norm = jnp.where(use, y / safe, 0.0)
        total = jnp.sum(per_norm)
        w = jnp.where(total != 0, per_norm / jnp.where(total != 0, total, 1.0), 0.0)
        return lax.stop_gradient(jnp.where(use, w, 0.0)), state

    return GradientMethod(_no_state, weights)


def _gradnorm(num_tasks, task_ids, alpha: float = 1.5, lr: float = 0.025, min_weight: float = 1e-3):
    """GradNorm (Chen et al., ICML 2018).

    Task weights w (state, start at 1). With G_t = ||w_t g_t|| = w_t sqrt(K_tt), its mean G_bar,
    the inverse training rates r_t = L~_t / mean(L~), L~_t = L_t / L_t(0) (L(0) = the losses of
    the first call, kept in state), the GradNorm loss, divided by sg(G_bar) so that its
    gradient has no units, is
      L_grad = sum_t |G_t - sg(G_bar r_t^alpha)| / sg(G_bar),
    dL_grad/dw_t = sign(G_t - target_t) ||g_t|| / G_bar. (The paper's loss is not divided:
    its steps are then lr ||g_t|| in raw gradient units and thrash once lr ||g|| >> w; divided,
    the weights follow the same trajectory at any gradient scale.) Each call returns the
    current w (the weights for this step's update) and stores
    w <- renorm(max(w - lr dL_grad/dw, min_weight)), renorm(v) = T v / sum(v). The floor keeps
    weights positive (the paper relies on small steps instead). K should come from the last
    shared layer (as in the paper) or whatever shared gradients the caller chooses.

    With inactive tasks, T, the means and renorm run over the n active tasks; the returned
    weights are the stored ones of the active tasks rescaled to sum to n (a no-op up to rounding
    unless the active set changed), and L_t(0) is the loss at the first step where task t is
    active ("initialized" is per task). An inactive task's weight and L_t(0) stay as they are.
    """
    del task_ids

    def init(num):
        return {
            "weights": jnp.ones(num, jnp.float32),
            "initial_losses": jnp.ones(num, jnp.float32),
            "initialized": jnp.zeros(num, jnp.bool_),
        }

    def weights(gram, losses, state, *, step, rng, active=None):
        mask = active_mask(active, num_tasks)
        num_active = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)

        def mean(v):
            return jnp.sum(jnp.where(mask, v, 0.0)) / num_active

        def renorm(v):  # n v / sum(v) over the active tasks
            return v * num_active / jnp.maximum(jnp.sum(jnp.where(mask, v, 0.0)), _TINY)

        losses = jnp.where(mask, lax.stop_gradient(losses).astype(jnp.float32), 1.0)
        initialized = state["initialized"] | ~mask
        initial = jnp.where(initialized, state["initial_losses"], losses)
        w = jnp.where(mask, renorm(state["weights"]), 0.0)
        norms = jnp.sqrt(jnp.maximum(jnp.diag(_masked_gram(gram, mask)), 0.0))
        ratio = losses / jnp.maximum(initial, _TINY)
        g_bar = mean(w * norms)
        target = g_bar * (ratio / mean(ratio)) ** alpha
        # the step of L_grad / sg(G_bar): in units of the mean weighted norm, not of gradients
        relative = jnp.where(g_bar > 0, norms / jnp.where(g_bar > 0, g_bar, 1.0), 0.0)
        new_w = jnp.maximum(w - lr * jnp.sign(w * norms - target) * relative, min_weight)
        new_w = jnp.where(mask, renorm(new_w), state["weights"])
        return lax.stop_gradient(w), {
            "weights": new_w,
            "initial_losses": initial,
            "initialized": state["initialized"] | mask,
        }

    return GradientMethod(init, weights)


_NASH_NORMALIZATIONS = ("frobenius", "none")


def nash_solve(gram, ridge: float = 1e-6, iters: int = 100, active=None):
    """alpha > 0 with (K + ridge diag(K)) alpha = 1 / alpha.

    Solved on the cosine matrix C (`_cosine`): with beta_t = alpha_t ||g_t|| the equation is
    (C + ridge I) beta = 1 / beta, free of every task's gradient scale, so scaling task t's
    gradient by s divides alpha_t by s exactly (the per-task scale invariance Navon et al.
    claim; a ridge relative to the mean diagonal would break it) and 1e-20 or 1e20 gradients
    neither underflow nor overflow. beta minimises the strictly convex, self-concordant
    f(beta) = 1/2 beta^T (C + ridge I) beta - sum_t log beta_t; we take damped Newton steps
    (step 1/(1+lambda) while the Newton decrement lambda > 1/4, full steps after), which stay
    strictly inside beta > 0. The Newton system is solved in the scaled variable
    y = Delta / beta, (B C' B + I) y = 1 - beta * (C' beta), whose matrix has eigenvalues >= 1.
    The ridge makes the minimiser exist when C is singular with a positive null vector
    (exactly opposed gradients).

    Inactive tasks and tasks with a zero gradient (for which no alpha satisfies the equation)
    are decoupled (rows/columns of I), their Newton steps are zeroed, and alpha_t = 0.
    """
    num = gram.shape[0]
    mask = active_mask(active, num)
    cos, norms, use = _cosine(gram, mask)
    cos = cos + ridge * jnp.eye(num, dtype=jnp.float32)

    def body(_, b):
        scaled = b[:, None] * cos * b[None, :] + jnp.eye(num, dtype=jnp.float32)
        y = jnp.linalg.solve(scaled, 1.0 - b * (cos @ b))
        y = jnp.where(use, y, 0.0)  # the decrement (step size) is the used tasks' one
        # Newton decrement; the max with |y|_inf keeps the positivity guarantee under rounding.
        lam = jnp.maximum(jnp.sqrt(jnp.maximum(y @ scaled @ y, 0.0)), jnp.max(jnp.abs(y)))
        t = jnp.where(lam > 0.25, 1.0 / (1.0 + lam), 1.0)
        return b * (1.0 + t * y)

    b = lax.fori_loop(0, iters, body, jnp.full((num,), 1.0 / jnp.sqrt(1.0 + ridge), jnp.float32))
    return jnp.where(use, b / jnp.where(use, norms, 1.0), 0.0)


def _frobenius(gram, mask):
    """||K||_F over the active sub-matrix, as m ||K / m||_F with m = max |K_ij| (squaring the
    entries of a 1e20-scaled K would overflow float32)."""
    sub = jnp.where(mask[:, None] & mask[None, :], gram.astype(jnp.float32), 0.0)
    m = jnp.max(jnp.abs(sub))
    return jnp.where(m > 0, m * jnp.linalg.norm(sub / jnp.where(m > 0, m, 1.0)), 0.0)


def _nashmtl(
    num_tasks, task_ids, normalize: str = "frobenius", ridge: float = 1e-6, iters: int = 100
):
    """Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution.

    Returns alpha > 0 solving K' alpha = 1 / alpha (each task's directional derivative along
    g = alpha^T G is the inverse of its weight), with K' = K / ||K||_F for
    normalize="frobenius" (so that alpha does not depend on the gradients' overall scale) or
    K' = K for "none" (then ||g||^2 = T). Solved exactly by ``nash_solve`` (damped Newton on the
    cosine matrix, a ridge relative to each task's own squared norm) instead of the paper's
    sequence of convex (CCP) approximations warm-started across steps; since
    K' = K / f gives alpha' = sqrt(f) alpha, the Frobenius norm only rescales the solution of
    K, computed without squaring K's entries. (The official implementation normalises the Gram
    matrix by its norm too and clips the shared-parameter gradient norm to 1: do the latter in
    the optimiser, optax.clip_by_global_norm.) With inactive tasks, ||K||_F is the active
    sub-matrix's. An all-zero K gives alpha = 0.
    """
    del task_ids
    if normalize not in _NASH_NORMALIZATIONS:
        raise ValueError(
            f"nashmtl normalize must be one of {_NASH_NORMALIZATIONS}, got {normalize!r}"
        )

    def weights(gram, losses, state, *, step, rng, active=None):
        mask = active_mask(active, num_tasks)
        alpha = nash_solve(gram, ridge, iters, mask)
        if normalize == "frobenius":
            alpha = alpha * jnp.sqrt(_frobenius(gram, mask))
        return lax.stop_gradient(alpha), state

    return GradientMethod(_no_state, weights)


def _gcosine(num_tasks, task_ids, target: int = 0, weighted: bool = False):
    """Gradient-similarity weighting of auxiliary tasks (Du, Czarnecki, Jayakumar, Farajtabar,
    Pascanu & Lakshminarayanan, "Adapting Auxiliary Losses Using Gradient Similarity", 2018).

    One target task (index `target`, weight 1); an auxiliary task's gradient is used only when
    its cosine with the target's gradient is positive: w_t = 1[cos(g_target, g_t) > 0], or
    w_t = max(0, cos) with `weighted`. In Gram form cos = K_0t / sqrt(K_00 K_tt); its sign is
    the sign of K_0t, so the unweighted rule needs no division (a zero gradient: weight 0).
    """
    del task_ids
    if not 0 <= target < num_tasks:
        raise ValueError(f"gcosine: target={target} must index one of the {num_tasks} tasks")

    def weights(gram, losses, state, *, step, rng, active=None):
        mask = active_mask(active, num_tasks)
        dots = gram[target]
        if weighted:
            norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))
            scale = norms[target] * norms
            w = jnp.where(scale > 0, jnp.maximum(dots, 0.0) / jnp.where(scale > 0, scale, 1.0), 0.0)
        else:
            w = (dots > 0).astype(jnp.float32)
        w = w.at[target].set(1.0)
        return lax.stop_gradient(jnp.where(mask, w, 0.0).astype(jnp.float32)), state

    return GradientMethod(_no_state, weights)


_METHODS = {
    "ew": _ew,
    "mean": _mean,
    "mgda": _mgda,
    "pcgrad": _pcgrad,
    "gradvac": _gradvac,
    "cagrad": _cagrad,
    "imtlg": _imtlg,
    "gradnorm": _gradnorm,
    "nashmtl": _nashmtl,
    "gcosine": _gcosine,
}


def get_gradient_method(name: str, num_tasks: int, *, task_ids=None, **hparams) -> GradientMethod:
    """The per-task-gradient method called ``name`` (see ``_METHODS``) with its hparams.

    ``task_ids``: T distinct ints in [0, 2^32) naming the tasks for per-task randomness
    (default 0..T-1); see the module docstring.
    """
    if name not in _METHODS:
        raise ValueError(f"unknown gradient method {name!r}; allowed: {sorted(_METHODS)}")
    if num_tasks < 2:
        raise ValueError(f"gradient methods need num_tasks >= 2, got {num_tasks}")
    return _METHODS[name](num_tasks, resolve_task_ids(task_ids, num_tasks), **hparams)
