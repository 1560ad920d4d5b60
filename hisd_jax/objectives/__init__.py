"""Objectives over the (task x exit) grid of model outputs.

`build_objective` turns the config's `objective` section into a pure function
`task_losses(outputs, batch, progress) -> (losses {task: scalar}, metrics)`. Each
classification task gets the HiSD loss over its exits (presets: final_only, sdn,
byot, mose, hisd); a regression task gets the same per-exit weights on the squared
error. How per-task losses become one update is the MTL strategy's job (mtl/).
"""

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp

from hisd_jax.objectives import hisd
from hisd_jax.objectives.distill import masked_mean


@dataclasses.dataclass(frozen=True)
class Objective:
    task_losses: Callable
    weights: dict[str, hisd.HiSDWeights]  # per task, over that task's exits
    needs_projection: bool


def _overrides(obj_cfg) -> dict:
    out = {k: obj_cfg[k] for k in ("kd", "hier", "feat", "temperature") if obj_cfg[k] is not None}
    if obj_cfg.ce is not None:
        out["ce"] = tuple(obj_cfg.ce)
    return out


def build_objective(obj_cfg, tasks, depths, task_exits=None) -> Objective:
    """Builds the loss for `tasks` on a model whose exits sit at block counts `depths`.

    `task_exits` maps a task to the exits its heads sit at (default: every exit); each
    task's HiSD loss runs over its own exits, its deepest one being its teacher. The
    feature-alignment term needs the task's deepest exit to be the model's final exit
    (the projections map to the final exit's width).
    """
    task_exits = task_exits or {}
    all_exits = tuple(range(len(depths)))
    exits = {t.name: tuple(task_exits.get(t.name, all_exits)) for t in tasks}
    weights = {}
    for t in tasks:
        e = exits[t.name]
        weights[t.name] = hisd.resolve_weights(
            obj_cfg.preset, len(e), [depths[i] for i in e], **_overrides(obj_cfg)
        )
        if len(e) > 1 and weights[t.name].feat > 0 and e[-1] != all_exits[-1]:
            raise ValueError(
                f"objective.feat > 0 needs task {t.name!r} to read the final exit "
                f"(it reads exits {e}); set objective.feat=0.0"
            )
    needs_projection = any(len(exits[n]) > 1 and w.feat > 0 for n, w in weights.items())

    def task_losses(outputs, batch, progress):
        losses, metrics = {}, {}
        mask = batch.get("mask")
        for task in tasks:
            logits = outputs["logits"][task.name]
            labels = batch[task.label_key]
            w, e = weights[task.name], exits[task.name]
            if task.kind == "classification":
                use_feat = len(e) > 1 and w.feat > 0
                loss, terms = hisd.hisd_loss(
                    logits,
                    labels,
                    w,
                    progress=progress,
                    mask=mask,
                    features=[outputs["projected"][i] for i in e[:-1]] if use_feat else None,
                    final_features=outputs["features"][e[-1]] if use_feat else None,
                )
            else:  # regression: the same per-exit weights on the squared error
                sq = [masked_mean((z[:, 0] - labels) ** 2, mask) for z in logits]
                loss = jnp.sum(hisd.ce_weights(w, progress) * jnp.stack(sq))
                terms = {f"mse/exit{i}": v for i, v in enumerate(sq)}
                terms["loss"] = loss
            losses[task.name] = loss
            metrics.update({f"{task.name}/{k}": v for k, v in terms.items()})
        return losses, metrics

    return Objective(task_losses, weights, needs_projection)
