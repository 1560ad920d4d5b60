"""Task kinds: every place that treats classification and regression differently asks here.

A `TaskKind` says, for one kind of task, how many outputs a head has, which metrics
`results.json` holds (and which one judges the task by default, with its direction), how a
batch's evaluation sums are taken, how the per-exit training loss is formed (hard targets,
soft targets from a teacher, or a mix of both), and what a teacher's per-example prediction
(the soft label of KD from converged tasks) is.

  classification  outputs = num_classes; loss = the HiSD loss over the task's exits (CE
                  against hard labels and/or soft labels); prediction = softmax(z / T)
  regression      outputs = 1; loss = the same per-exit weights on the squared error
                  (against the label and/or the teacher's prediction); prediction = z
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from hisd_jax import metrics as metrics_lib
from hisd_jax.mtl import converged_kd
from hisd_jax.objectives import hisd
from hisd_jax.objectives.distill import masked_mean, mix_targets


def _classification_loss(
    logits, labels, weights, *, progress, mask, features, final_features, soft, soft_weight
):
    """The HiSD loss over the task's exits; CE against the labels, the soft labels, or both."""
    return hisd.hisd_loss(
        logits,
        labels,
        weights,
        progress=progress,
        mask=mask,
        features=features,
        final_features=final_features,
        targets=soft,
        soft_weight=soft_weight,
    )


def _regression_loss(
    logits, labels, weights, *, progress, mask, features, final_features, soft, soft_weight
):
    """The per-exit weights of the task on the squared error (to the label and/or teacher)."""
    del features, final_features  # no feature alignment for regression heads
    sq = [masked_mean((z[:, 0] - labels) ** 2, mask) for z in logits]
    if soft is not None:
        soft_sq = [masked_mean((z[:, 0] - soft) ** 2, mask) for z in logits]
        sq = [mix_targets(h, s, soft_weight) for h, s in zip(sq, soft_sq, strict=True)]
    loss = jnp.sum(hisd.ce_weights(weights, progress) * jnp.stack(sq))
    terms = {f"mse/exit{i}": v for i, v in enumerate(sq)}
    terms["loss"] = loss
    return loss, terms


@dataclasses.dataclass(frozen=True)
class TaskKind:
    name: str
    num_outputs: Callable[[int], int]  # num_classes -> width of the task's head
    metrics: tuple[str, ...]  # the metrics results.json holds for the task, per exit
    default_metrics: dict[str, bool]  # metric -> higher is better, judging the task by default
    eval_sums: Callable  # (outputs [B, n], labels [B], mask [B]) -> additive sums
    loss: Callable  # see _classification_loss
    predict: Callable  # (outputs [B, n], temperature) -> teacher prediction per example
    uses_features: bool  # whether the HiSD feature-alignment term applies
    # Soft-label tables of KD from converged tasks (mtl/converged_kd.py):
    soft_table: Callable  # (rows [N, ...] of `predict`, num_classes, top_k, dtype) -> table
    soft_rows: Callable  # (table, positions [B], num_classes) -> targets of `loss`'s `soft`
    has_confidence: bool  # class probabilities: confidence-based early exit and accuracy apply


KINDS: dict[str, TaskKind] = {
    "classification": TaskKind(
        name="classification",
        num_outputs=lambda num_classes: num_classes,
        metrics=("accuracy", "loss", "ece"),
        default_metrics={"accuracy": True},
        eval_sums=metrics_lib.classification_sums,
        loss=_classification_loss,
        predict=lambda z, temperature: jax.nn.softmax(z.astype(jnp.float32) / temperature),
        uses_features=True,
        soft_table=lambda rows, num_classes, top_k, dtype: converged_kd.compress(
            rows, top_k, dtype
        ),
        soft_rows=converged_kd.soft_targets,
        has_confidence=True,
    ),
    "regression": TaskKind(
        name="regression",
        num_outputs=lambda num_classes: 1,
        metrics=("mse", "mae"),
        default_metrics={"mae": False},
        eval_sums=metrics_lib.regression_sums,
        loss=_regression_loss,
        predict=lambda z, temperature: z[:, 0].astype(jnp.float32),
        uses_features=False,
        soft_table=lambda rows, num_classes, top_k, dtype: {"pred": jnp.asarray(rows, jnp.float32)},
        soft_rows=lambda table, positions, num_classes: table["pred"][positions],
        has_confidence=False,
    ),
}
# metric -> higher is better, for every metric any kind reports.
METRIC_DIRECTIONS = {"accuracy": True, "loss": False, "ece": False, "mse": False, "mae": False}


def get_kind(name: str) -> TaskKind:
    """The TaskKind called `name`; ValueError naming the allowed kinds otherwise."""
    if name not in KINDS:
        raise ValueError(f"task kind {name!r} is not one of {', '.join(KINDS)}")
    return KINDS[name]
