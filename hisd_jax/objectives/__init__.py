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


@dataclasses.dataclass(frozen=True)
class Objective:
    task_losses: Callable
    weights: hisd.HiSDWeights
    needs_projection: bool


def _overrides(obj_cfg) -> dict:
    out = {k: obj_cfg[k] for k in ("kd", "hier", "feat", "temperature") if obj_cfg[k] is not None}
    if obj_cfg.ce is not None:
        out["ce"] = tuple(obj_cfg.ce)
    return out


def build_objective(obj_cfg, tasks, depths) -> Objective:
    """Builds the loss for `tasks` on a model whose exits sit at block counts `depths`."""
    weights = hisd.resolve_weights(obj_cfg.preset, len(depths), depths, **_overrides(obj_cfg))
    needs_projection = len(depths) > 1 and float(weights.feat) > 0

    def task_losses(outputs, batch, progress):
        losses, metrics = {}, {}
        mask = batch.get("mask")
        for task in tasks:
            logits = outputs["logits"][task.name]
            labels = batch[task.label_key]
            if task.kind == "classification":
                loss, terms = hisd.hisd_loss(
                    logits,
                    labels,
                    weights,
                    progress=progress,
                    mask=mask,
                    features=outputs.get("projected") if needs_projection else None,
                    final_features=outputs["features"][-1] if needs_projection else None,
                )
            else:
                w = hisd.ce_weights(weights, progress)
                sq = [jnp.mean((z[:, 0] - labels) ** 2) for z in logits]
                terms = {f"mse/exit{e}": v for e, v in enumerate(sq)}
                loss = jnp.sum(w * jnp.stack(sq))
                terms["loss"] = loss
            losses[task.name] = loss
            metrics.update({f"{task.name}/{k}": v for k, v in terms.items()})
        return losses, metrics

    return Objective(task_losses, weights, needs_projection)
