"""Knowledge distillation from converged tasks: convergence tracking and soft-label tables.

Lu et al., "Asynchronous Convergence in Multi-Task Learning via Knowledge Distillation from
Converged Tasks", NAACL 2022 (industry track). Tasks converge at their own pace; once a task's
validation metric has not improved for `patience` evaluations, its best parameters label its
training split once, and from then on the task trains on those soft labels.

Pure pieces (the program `programs/kd_converged.py` composes them):

  init_tracker(T) / update_tracker(...)   per-task best score, best step, evaluations without
                                          improvement, convergence; host-side numpy (the
                                          validation metrics are on the host), stored in the
                                          program state so a resume is exact
  compress(probs, top_k, dtype)           a soft-label table: full probabilities, or the top-k
                                          values (renormalised) and their class indices, in
                                          float32 / float16 / bfloat16
  soft_targets(table, positions, C)       the rows of a table for a batch, as dense [B, C]
                                          probabilities (jittable)

Scores are direction-normalised: score = metric if higher is better else -metric, and a task
improves when score > best + min_delta.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LABEL_DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def init_tracker(num_tasks: int) -> dict:
    """The tracker of `num_tasks` tasks before any evaluation (numpy arrays)."""
    return {
        "best": np.full(num_tasks, -np.inf, np.float32),  # best direction-normalised score
        "best_step": np.full(num_tasks, -1, np.int32),
        "bad_evals": np.zeros(num_tasks, np.int32),  # evaluations since the last improvement
        "converged": np.zeros(num_tasks, np.int32),  # 1 once converged
        "converged_step": np.full(num_tasks, -1, np.int32),
    }


def update_tracker(
    tracker: dict,
    scores,
    step: int,
    *,
    patience: int,
    min_delta: float,
    tracked,
) -> tuple[dict, np.ndarray, np.ndarray]:
    """One validation: (new tracker, improved [T] bool, converged now [T] bool).

    Args:
      tracker: from `init_tracker` or a previous call (not modified).
      scores: [T] direction-normalised validation scores (higher is better).
      step: the training step of this validation.
      patience: evaluations without improvement after which a task has converged (>= 1).
      min_delta: an improvement must exceed the best score by more than this (>= 0).
      tracked: [T] bool, the tasks this validation counts for (active and not converged).
    """
    t = {k: np.array(v, copy=True) for k, v in tracker.items()}
    scores = np.asarray(scores, np.float32)
    tracked = np.asarray(tracked, bool) & (t["converged"] == 0)
    improved = tracked & (scores > t["best"] + np.float32(min_delta))
    t["best"] = np.where(improved, scores, t["best"]).astype(np.float32)
    t["best_step"] = np.where(improved, step, t["best_step"]).astype(np.int32)
    stalled = tracked & ~improved
    t["bad_evals"] = np.where(improved, 0, t["bad_evals"] + stalled).astype(np.int32)
    now = stalled & (t["bad_evals"] >= patience)
    t["converged"] = np.where(now, 1, t["converged"]).astype(np.int32)
    t["converged_step"] = np.where(now, step, t["converged_step"]).astype(np.int32)
    return t, improved, now


def compress(probs, top_k: int = 0, dtype: str = "float32") -> dict:
    """A soft-label table from class probabilities [N, C].

    top_k = 0 keeps every class: {"probs": [N, C]}. Otherwise {"values": [N, k], "indices":
    int32 [N, k]}: the k largest probabilities renormalised to sum to 1 (the others become 0),
    so the total-variation distance to the full distribution is 1 - (mass of the top k).
    Values are stored in `dtype` (float32, float16 or bfloat16).
    """
    probs = np.asarray(probs, np.float32)
    store = LABEL_DTYPES[dtype]
    if not top_k or top_k >= probs.shape[-1]:
        return {"probs": jnp.asarray(probs, store)}
    indices = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k].astype(np.int32)
    values = np.take_along_axis(probs, indices, axis=-1)
    values = values / np.maximum(values.sum(-1, keepdims=True), np.finfo(np.float32).tiny)
    return {"values": jnp.asarray(values, store), "indices": jnp.asarray(indices)}


def table_bytes_per_example(table: dict) -> int:
    """Bytes one example's soft labels take in `table`."""
    return int(sum(x.dtype.itemsize * int(np.prod(x.shape[1:])) for x in jax.tree.leaves(table)))


def soft_targets(table: dict, positions, num_classes: int) -> jax.Array:
    """Dense float32 [B, C] soft labels of the examples at `positions` (jittable)."""
    if "probs" in table:
        return table["probs"][positions].astype(jnp.float32)
    values = table["values"][positions].astype(jnp.float32)
    onehot = jax.nn.one_hot(table["indices"][positions], num_classes, dtype=jnp.float32)
    return jnp.einsum("bk,bkc->bc", values, onehot)
