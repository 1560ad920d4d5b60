"""The training objective over the (task x exit) grid of model outputs.

`build_objective` turns the config's `objective` section into a pure function
`task_losses(outputs, batch, ctx) -> (losses {task: scalar}, metrics)`. Each task's loss is its
kind's (`kinds.py`): a classification task gets the HiSD loss over its exits (presets:
final_only, sdn, byot, mose, hisd); a regression task gets the same per-exit weights on the
squared error; a retrieval task the HiSD loss over in-batch InfoNCE of its exits' embeddings
(`retrieval.retrieval_loss`, temperature `objective.similarity_temperature`). `ctx`
(`steps.LossContext`) supplies the training progress (the SDN ramp) and,
per task, soft targets with their mixing weight (KD from converged tasks); a task without soft
targets trains on its labels. How per-task losses become one update is the MTL strategy's job.
"""

import dataclasses
from collections.abc import Callable

from hisd_jax.objectives import hisd


@dataclasses.dataclass(frozen=True)
class Objective:
    task_losses: Callable  # (outputs, batch, ctx) -> ({task: loss}, metrics)
    weights: dict[str, hisd.HiSDWeights]  # per task, over that task's exits
    needs_projection: bool


def _named_terms(terms: dict, exits: tuple[int, ...]) -> dict:
    """A task's loss terms with its exits named as the model names them ('ce/exit{i}' of the
    task's i-th exit -> 'ce/exit{exits[i]}'); the distillation terms only where the task has
    more than one exit (with one they are always 0)."""
    out = {}
    for key, value in terms.items():
        head, sep, index = key.rpartition("/exit")
        if sep and index.isdigit():
            out[f"{head}/exit{exits[int(index)]}"] = value
        elif len(exits) > 1 or key not in ("kd", "hier", "feat"):
            out[key] = value
    return out


def _overrides(obj_cfg) -> dict:
    out = {k: obj_cfg[k] for k in ("kd", "hier", "feat", "temperature") if obj_cfg[k] is not None}
    if obj_cfg.ce is not None:
        out["ce"] = tuple(obj_cfg.ce)
    return out


def build_objective(obj_cfg, tasks, depths) -> Objective:
    """Builds the loss for `tasks` (`mtl.tasks.TaskSpec`) on a model whose exits sit at block
    counts `depths`.

    Each task's HiSD loss runs over its own exits (`TaskSpec.exits`), its deepest one being
    its teacher. The feature-alignment term needs the task's deepest exit to be the model's
    final exit (the projections map to the final exit's width).

    Raises:
      ValueError: a preset/override the task's exits cannot take, or feature alignment on a
        task that does not read the final exit.
    """
    final = len(depths) - 1
    weights = {}
    for t in tasks:
        e = t.exits
        weights[t.name] = hisd.resolve_weights(
            obj_cfg.preset, len(e), [depths[i] for i in e], **_overrides(obj_cfg)
        )
        if len(e) > 1 and weights[t.name].feat > 0 and e[-1] != final:
            raise ValueError(
                f"objective.feat > 0 needs task {t.name!r} to read the final exit "
                f"(it reads exits {e}); set objective.feat=0.0"
            )
    uses_feat = {
        t.name: t.task_kind.uses_features and len(t.exits) > 1 and weights[t.name].feat > 0
        for t in tasks
    }
    needs_projection = any(uses_feat.values())

    def task_losses(outputs, batch, ctx):
        losses, metrics = {}, {}
        for i, task in enumerate(tasks):
            e = task.exits
            feat = uses_feat[task.name]
            soft = ctx.soft_targets.get(task.name)
            mask = batch.get("mask")
            if task.name in ctx.example_weights:  # every term becomes a weighted mean
                w = ctx.example_weights[task.name]
                mask = w if mask is None else mask * w
            loss, terms = task.task_kind.loss(
                outputs["logits"][task.name],
                batch[task.label_key],
                weights[task.name],
                progress=ctx.progress,
                mask=mask,
                features=[outputs["projected"][j] for j in e[:-1]] if feat else None,
                final_features=outputs["features"][e[-1]] if feat else None,
                soft=soft,
                soft_weight=None if soft is None else ctx.soft_weight[i],
                similarity_temperature=obj_cfg.similarity_temperature,
            )
            losses[task.name] = loss
            metrics.update({f"{task.name}/{k}": v for k, v in _named_terms(terms, e).items()})
        return losses, metrics

    return Objective(task_losses, weights, needs_projection)
