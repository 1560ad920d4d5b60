"""How per-task losses become one update: the MTL strategy inside the train step.

Two kinds of strategy (see weighting.py and gradients.py):
  * loss weighting (EW, static, UW, DWA, RLW, GLS): one backward pass of a weighted
    total; learnable weights (UW) live in `strategy_params` and are optimised with the
    model;
  * per-task-gradient methods (MGDA, PCGrad, GradVac, CAGrad, IMTL-G, GradNorm,
    Nash-MTL): the per-task gradients come from ONE forward pass (`jax.vjp` of the
    task-loss vector) and one backward pass per identity cotangent, all in the same
    jitted step; the method reads their Gram matrix and returns task weights w.
    - space="param": gradients of the shared parameters; the update is sum_t w_t g_t
      on shared leaves, while a task's own output layers (leaves labelled "task:…" by
      the model's label tree, `models/labels.py`) get their own gradient, unweighted (as
      LibMTL does).
    - space="rep": gradients with respect to the shared representation (the trunk's
      outputs: MGDA-UB's upper bound), so only the small heads are differentiated T
      times; the trunk is back-propagated once with sum_t w_t dL_t/dz. Only the trunk
      outputs the task losses read (found by a liveness pass over the traced losses, e.g.
      the exits that carry task heads) get T gradients and enter the Gram matrix.
How the T backward passes run (`backward`, config `mtl.backward`; same gradients either way):
  * "unroll": T vjp calls of the one forward pass, in the same jitted step;
  * "vmap":   jax.vmap of the vjp over the T one-hot cotangents (one batched backward);
  * "auto":   unroll in parameter space, vmap in representation space — the faster of the two
    on XLA:CPU for each (vmap's batched convolution gradients are ~1.4x slower there; the
    heads' dense gradients batch well). `python -m hisd_jax.bench --strategies all` measures
    both on your hardware.
Strategy state (DWA's running losses, GradVac's targets, GradNorm's weights, ...) is a
pytree in the train state, checkpointed and replicated like the parameters.

Active tasks: `value_and_grad` takes a traced per-task mask `active` [T] (1 = active). An
inactive task's entry of the loss vector is replaced by 0, so it has exactly zero gradient;
the strategy gives it weight 0 and leaves its state alone (weighting.py, gradients.py).
Randomness is drawn per task from a stable id of the task's name (`task_id`), so an inactive
task does not change the other tasks' draws.
"""

import dataclasses
import inspect
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from hisd_jax.models import labels as labels_lib
from hisd_jax.mtl import gradients as grad_lib
from hisd_jax.mtl import weighting as weighting_lib

LOSS_WEIGHTINGS = tuple(weighting_lib._WEIGHTINGS)  # noqa: SLF001
GRADIENT_METHODS = tuple(m for m in grad_lib._METHODS if m not in ("ew", "mean"))  # noqa: SLF001
STRATEGIES = LOSS_WEIGHTINGS + GRADIENT_METHODS
SPACES = ("param", "rep")
BACKWARDS = ("auto", "unroll", "vmap")


@dataclasses.dataclass(frozen=True)
class Strategy:
    name: str
    space: str
    tasks: tuple[str, ...]
    weighting: weighting_lib.LossWeighting | None = None
    method: grad_lib.GradientMethod | None = None
    backward: str = "auto"

    @property
    def per_task_gradients(self) -> bool:
        return self.method is not None

    def init(self) -> tuple[Any, Any]:
        """(learnable strategy params, strategy state)."""
        if self.weighting is not None:
            return self.weighting.init(len(self.tasks))
        return {}, self.method.init(len(self.tasks))


def task_id(name: str) -> int:
    """A stable non-negative int32 id of a task name (per-task random streams)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _accepts(factory, name: str) -> bool:
    return name in inspect.signature(factory).parameters


def build_strategy(
    name: str,
    tasks,
    *,
    space: str = "param",
    backward: str = "auto",
    steps_per_epoch: int | None = None,
    **hparams,
) -> Strategy:
    """The strategy `name` for the task names `tasks`, with its hyper-parameters.

    `steps_per_epoch` describes the training stream; a strategy whose factory takes it (DWA)
    gets it unless the hyper-parameters set it.

    Raises:
      ValueError: an unknown name, space or backward, or hyper-parameters the strategy rejects.
    A hyper-parameter `target` given as a task name becomes that task's index.
    """
    tasks = tuple(tasks)
    if isinstance(hparams.get("target"), str):  # a target task given by name (gcosine)
        if hparams["target"] not in tasks:
            raise ValueError(f"mtl.hparams.target={hparams['target']!r} is not one of {tasks}")
        hparams["target"] = tasks.index(hparams["target"])
    if space not in SPACES:
        raise ValueError(f"space={space!r} is not one of {', '.join(SPACES)}")
    if backward not in BACKWARDS:
        raise ValueError(f"backward={backward!r} is not one of {', '.join(BACKWARDS)}")
    ids = [task_id(t) for t in tasks]
    if name in LOSS_WEIGHTINGS:
        factory = weighting_lib._WEIGHTINGS[name]  # noqa: SLF001
        if steps_per_epoch is not None and _accepts(factory, "steps_per_epoch"):
            hparams.setdefault("steps_per_epoch", steps_per_epoch)
        weighting = weighting_lib.get_weighting(name, len(tasks), task_ids=ids, **hparams)
        return Strategy(name, space, tasks, weighting=weighting, backward=backward)
    if name in GRADIENT_METHODS:
        factory = grad_lib._METHODS[name]  # noqa: SLF001
        if steps_per_epoch is not None and _accepts(factory, "steps_per_epoch"):
            hparams.setdefault("steps_per_epoch", steps_per_epoch)
        method = grad_lib.get_gradient_method(name, len(tasks), task_ids=ids, **hparams)
        return Strategy(name, space, tasks, method=method, backward=backward)
    raise ValueError(f"mtl.method={name!r} is not one of {', '.join(STRATEGIES)}")


def _weighted_update(w, per_task, param_labels):
    """sum_t w_t g_t on shared leaves; a task's own leaves keep their (only) gradient."""

    def leaf(label, g):
        if labels_lib.is_shared(label):
            return grad_lib.combine(w, g)
        return jnp.sum(g, axis=0)

    return jax.tree.map(leaf, param_labels, per_task)


def _shared_leaves(per_task, param_labels):
    return labels_lib.leaves_where(param_labels, per_task, labels_lib.is_shared)


def _head_side(tree, param_labels):
    """The top-level entries of `tree` that are not trunk (exit heads: the rep-space heads)."""
    out = {}
    for key, sub in tree.items():
        roles = {labels_lib.role(label) for label in jax.tree.leaves(param_labels[key])}
        if labels_lib.TRUNK in roles and len(roles) > 1:
            raise ValueError(f"parameter entry {key!r} mixes trunk and head leaves")
        if labels_lib.TRUNK not in roles:
            out[key] = sub
    return out


def live_inputs(fn, *args) -> list[bool]:
    """For every leaf of `args`: may `fn(*args)` depend on it?

    A backward liveness pass over the traced jaxpr: an equation is live when one of its
    outputs is, and then all its inputs are. Conservative (a call primitive whose output is
    live makes all its inputs live), so False means "certainly unused".
    """
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    jaxpr = jax.make_jaxpr(fn)(*shapes).jaxpr

    def variables(vs):
        return [v for v in vs if not isinstance(v, jax_core.Literal)]

    live = set(variables(jaxpr.outvars))
    for eqn in reversed(jaxpr.eqns):
        if any(v in live for v in variables(eqn.outvars)):
            live.update(variables(eqn.invars))
    return [v in live for v in jaxpr.invars]


def _vmapped(strategy: Strategy) -> bool:
    """Whether the T backward passes run under jax.vmap ("auto": in representation space)."""
    if strategy.backward == "auto":
        return strategy.space == "rep"
    return strategy.backward == "vmap"


def _per_task_vjp(vjp, eye, batched: bool):
    """vjp applied to every row of the identity, outputs stacked along a leading task axis."""
    if batched:
        return jax.vmap(vjp)(eye)
    return jax.tree.map(lambda *g: jnp.stack(g), *(vjp(row) for row in eye))


def _loss_weighting_grad(strategy, trunk, loss_vector, params, strategy_params, ctx):
    """One backward pass of the weighted total: (value, grads, w, new state, metrics, aux)."""

    def total(params, sparams):
        reps, aux = trunk(params)
        vec, metrics = loss_vector(params, reps)
        value, new_state, w = strategy.weighting.apply(
            vec, sparams, ctx["state"], step=ctx["step"], rng=ctx["rng"], active=ctx["active"]
        )
        return value, (w, new_state, metrics, aux)

    (value, (w, new_state, metrics, aux)), grads = jax.value_and_grad(
        total, argnums=(0, 1), has_aux=True
    )(params, strategy_params)
    return value, grads, w, new_state, metrics, aux


def _param_space_grad(strategy, trunk, loss_vector, params, param_labels, ctx):
    """Per-task gradients of every parameter from one forward pass; shared leaves combined."""

    def forward(params):
        reps, aux = trunk(params)
        vec, metrics = loss_vector(params, reps)
        return vec, (metrics, aux)

    vec, vjp, (metrics, aux) = jax.vjp(forward, params, has_aux=True)
    eye = jnp.eye(vec.shape[0], dtype=jnp.float32)
    (per_task,) = _per_task_vjp(vjp, eye, _vmapped(strategy))
    gram = grad_lib.gram_matrix(_shared_leaves(per_task, param_labels))
    w, new_state = _method_weights(strategy, gram, vec, ctx)
    return vec, _weighted_update(w, per_task, param_labels), w, new_state, metrics, aux


def _rep_space_grad(strategy, trunk, loss_vector, params, param_labels, ctx):
    """Heads differentiated T times w.r.t. the trunk outputs they read, the trunk once."""
    head_params = _head_side(params, param_labels)
    head_labels = _head_side(param_labels, param_labels)
    reps, trunk_vjp, aux = jax.vjp(trunk, params, has_aux=True)
    leaves, treedef = jax.tree.flatten(reps)
    live = live_inputs(lambda h, r: loss_vector(h, r)[0], head_params, reps)
    used = [i for i, alive in enumerate(live[-len(leaves) :]) if alive]
    used = used or list(range(len(leaves)))

    def used_loss_vector(head_params, used_leaves):
        full = list(leaves)  # the unused outputs enter as constants
        for i, leaf in zip(used, used_leaves):
            full[i] = leaf
        return loss_vector(head_params, jax.tree.unflatten(treedef, full))

    vec, head_vjp, metrics = jax.vjp(
        used_loss_vector, head_params, [leaves[i] for i in used], has_aux=True
    )
    eye = jnp.eye(vec.shape[0], dtype=jnp.float32)
    head_grads, rep_grads = _per_task_vjp(head_vjp, eye, _vmapped(strategy))
    gram = grad_lib.gram_matrix(rep_grads)
    w, new_state = _method_weights(strategy, gram, vec, ctx)
    cotangent = [jnp.zeros_like(leaf) for leaf in leaves]
    for i, g in zip(used, grad_lib.combine(w, rep_grads)):
        cotangent[i] = g
    (param_grads,) = trunk_vjp(jax.tree.unflatten(treedef, cotangent))
    head_update = _weighted_update(w, head_grads, head_labels)
    param_grads = {
        k: jax.tree.map(jnp.add, g, head_update[k]) if k in head_update else g
        for k, g in param_grads.items()
    }
    return vec, param_grads, w, new_state, metrics, aux


def _method_weights(strategy, gram, vec, ctx):
    return strategy.method.weights(
        gram, vec, ctx["state"], step=ctx["step"], rng=ctx["rng"], active=ctx["active"]
    )


def value_and_grad(
    strategy: Strategy,
    *,
    trunk: Callable,
    heads: Callable,
    task_losses: Callable,
    params,
    param_labels,
    strategy_params,
    strategy_state,
    step,
    rng,
    active=None,
):
    """One strategy-combined gradient.

    Args:
      trunk: params -> (representation, aux) — the shared part of the forward pass.
      heads: (params, representation) -> model outputs.
      task_losses: outputs -> ({task: loss}, metrics).
      params: the model parameters; `param_labels` their label tree (`models/labels.py`).
      active: float32 [T], 1 for an active task, 0 for an inactive one (default: all active).
    Returns:
      (loss, (param grads, strategy-param grads), new strategy state, metrics, trunk aux)
      where `loss` is the combined objective and metrics include every task's weight.
    """
    tasks = strategy.tasks
    if active is None:
        active = jnp.ones(len(tasks), jnp.float32)

    def loss_vector(params, reps):
        losses, metrics = task_losses(heads(params, reps))
        vec = jnp.stack([losses[t] for t in tasks])
        return jnp.where(active > 0, vec, 0.0), metrics  # inactive: no loss, no gradient

    ctx = {"state": strategy_state, "step": step, "rng": rng, "active": active}
    if strategy.weighting is not None:
        value, grads, w, new_state, metrics, aux = _loss_weighting_grad(
            strategy, trunk, loss_vector, params, strategy_params, ctx
        )
    else:
        grad_fn = _param_space_grad if strategy.space == "param" else _rep_space_grad
        vec, param_grads, w, new_state, metrics, aux = grad_fn(
            strategy, trunk, loss_vector, params, param_labels, ctx
        )
        value = jnp.dot(jax.lax.stop_gradient(w), vec)
        grads = (param_grads, jax.tree.map(jnp.zeros_like, strategy_params))
    metrics = dict(metrics)
    metrics.update({f"weight/{t}": w[i] for i, t in enumerate(tasks)})
    return value, grads, new_state, metrics, aux
