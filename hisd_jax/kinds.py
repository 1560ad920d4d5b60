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
  retrieval       a (query, document) pair per example (token input [B, 2, L]); the head is
                  the exit's L2-normalised embedding (width `model.embed_dim`); loss = the
                  HiSD loss over in-batch InfoNCE (`objectives/retrieval.py`); metric = MRR
                  against 999 distractors, computed on the host over the whole split
                  (`split_metrics`), with the cross-exit MRR (queries at one exit, documents at
                  another); prediction = the embeddings. No soft labels, no confidence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from hisd_jax import metrics as metrics_lib
from hisd_jax.mtl import converged_kd
from hisd_jax.objectives import hisd
from hisd_jax.objectives import retrieval
from hisd_jax.objectives.distill import masked_mean, mix_targets


def _classification_loss(
    logits, labels, weights, *, progress, mask, features, final_features, soft, soft_weight, **_
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
    logits, labels, weights, *, progress, mask, features, final_features, soft, soft_weight, **_
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


def _retrieval_loss(logits, labels, weights, *, progress, mask, soft, similarity_temperature, **_):
    """The HiSD loss of a retrieval task: `logits` are its exits' pair embeddings [B, 2, D]."""
    del labels  # the positive of a query is the other row of its pair
    if soft is not None:
        raise ValueError("retrieval tasks take no soft targets")
    return retrieval.retrieval_loss(
        logits,
        weights,
        similarity_temperature=similarity_temperature,
        progress=progress,
        mask=mask,
    )


MRR_CANDIDATES = 1000  # the CodeSearchNet protocol: each query's document and 999 distractors


def retrieval_split_metrics(predictions, exit_names, seed: int = 0) -> dict:
    """{exit: {"mrr", "candidates", "mrr_docs_<exit'>" for every exit'}} of a retrieval task
    over a whole split. `predictions` [N, E_t, 2, D]: the task's pair embeddings at its exits
    `exit_names`. Candidates: min(1000, N) (a split smaller than 1000 pairs ranks each query
    among all documents); the same distractors for every pair of exits."""
    n = predictions.shape[0]
    k = min(MRR_CANDIDATES, n)
    table = retrieval.cross_exit_mrr(predictions, k, seed)
    return {
        name: {
            "mrr": float(table[i, i]),
            "candidates": float(k),
            **{f"mrr_docs_{other}": float(table[i, j]) for j, other in enumerate(exit_names)},
        }
        for i, name in enumerate(exit_names)
    }


@dataclasses.dataclass(frozen=True)
class TaskKind:
    name: str
    num_outputs: Callable[[int], int]  # num_classes -> width of the task's head
    metrics: tuple[str, ...]  # the metrics results.json holds for the task, per exit
    default_metrics: dict[str, bool]  # metric -> higher is better, judging the task by default
    eval_sums: Callable | None  # (outputs [B, n], labels [B], mask [B]) -> additive sums
    loss: Callable  # see _classification_loss
    predict: Callable  # (outputs [B, n], temperature) -> teacher prediction per example
    uses_features: bool  # whether the HiSD feature-alignment term applies
    # Soft-label tables of KD from converged tasks (mtl/converged_kd.py):
    soft_table: Callable  # (rows [N, ...] of `predict`, num_classes, top_k, dtype) -> table
    soft_rows: Callable  # (table, positions [B], num_classes) -> targets of `loss`'s `soft`
    has_confidence: bool  # class probabilities: confidence-based early exit and accuracy apply
    # A metric that needs the whole split (MRR): (predictions [N, E_t, ...], exit names) ->
    # {exit: metrics}, from `predict`'s rows; used instead of `eval_sums` when set.
    split_metrics: Callable | None = None


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
    "retrieval": TaskKind(
        name="retrieval",
        num_outputs=lambda num_classes: 0,  # the head is the embedding (model.embed_dim)
        metrics=("mrr",),
        default_metrics={"mrr": True},
        eval_sums=None,
        loss=_retrieval_loss,
        predict=lambda z, temperature: z.astype(jnp.float32),
        uses_features=False,  # it aligns its own embeddings (retrieval.retrieval_loss)
        soft_table=None,  # no KD from converged tasks
        soft_rows=None,
        has_confidence=False,
        split_metrics=retrieval_split_metrics,
    ),
}
# metric -> higher is better, for every metric any kind reports.
METRIC_DIRECTIONS = {
    "accuracy": True,
    "loss": False,
    "ece": False,
    "mse": False,
    "mae": False,
    "mrr": True,
}


def get_kind(name: str) -> TaskKind:
    """The TaskKind called `name`; ValueError naming the allowed kinds otherwise."""
    if name not in KINDS:
        raise ValueError(f"task kind {name!r} is not one of {', '.join(KINDS)}")
    return KINDS[name]
