"""Retrieval losses and metrics over a (query, document) batch, per exit.

An exit embeds a batch of ``B`` queries and their ``B`` documents as L2-normalised rows
``q, d [B, D]``; row i of each is a positive pair, every other row of the batch a negative. The
in-batch similarity is ``S = q dᵀ / τ`` ([B, B]).

  info_nce        symmetric InfoNCE, ``(CE(S, i) + CE(Sᵀ, i)) / 2`` averaged over queries: the
                  CLIP loss (Radford et al. 2021) that MoSE fine-tunes its exits with
                  (arXiv 2503.03008).
  similarity_kd   HiSD's KD term for retrieval: ``T² · KL(softmax(S_teacher/T) ‖
                  softmax(S_student/T))`` over each query's row and each document's column.
  mrr             mean reciprocal rank of each query's document among candidates (the
                  CodeSearchNet protocol: its document and 999 distractors; Husain et al.
                  2019, arXiv 1909.09436).

Padding rows (``mask == 0``) are neither anchors nor negatives: their similarities are
excluded from every softmax, and the mean runs over real rows only. Teachers are NOT
stop-gradiented here (as `distill.kd_kl`); the objective stops them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hisd_jax.objectives.distill import kd_kl, masked_mean

Array = jax.Array


def similarities(q: Array, d: Array, temperature) -> Array:
    """``q dᵀ / τ`` [B, B] in float32 (at least)."""
    q = q.astype(jnp.promote_types(q.dtype, jnp.float32))
    d = d.astype(q.dtype)
    return (q @ d.T) / temperature


def _masked_logits(s: Array, mask: Array | None) -> Array:
    """`s` with the columns of padding rows at -inf (excluded from every row's softmax)."""
    if mask is None:
        return s
    return jnp.where(mask[None, :] > 0, s, -jnp.inf)


def info_nce(q: Array, d: Array, temperature, mask: Array | None = None) -> Array:
    """Symmetric in-batch InfoNCE (see the module docstring). q, d [B, D] (L2-normalised by the
    caller), `temperature` > 0 (scalar, may be traced or learned), mask [B] optional.
    Returns a float32 scalar (0 for an all-padding batch)."""
    s = similarities(q, d, temperature)
    n = s.shape[0]
    idx = jnp.arange(n)
    rows = jax.nn.log_softmax(_masked_logits(s, mask), axis=-1)[idx, idx]
    cols = jax.nn.log_softmax(_masked_logits(s.T, mask), axis=-1)[idx, idx]
    nll = -(rows + cols) / 2
    if mask is not None:  # padding rows: -inf - (-inf) = nan before the mask; zero them
        nll = jnp.where(mask > 0, nll, 0.0)
    return masked_mean(nll, mask)


def similarity_kd(
    q: Array,
    d: Array,
    teacher_q: Array,
    teacher_d: Array,
    similarity_temperature,
    kd_temperature: float,
    mask: Array | None = None,
) -> Array:
    """KD of the in-batch similarity distribution from a teacher exit: the mean of
    `distill.kd_kl` over the rows (query → documents) and over the columns (document →
    queries) of ``S = q dᵀ / τ``. Shapes as `info_nce`; returns a float32 scalar."""
    s = similarities(q, d, similarity_temperature)
    t = similarities(teacher_q, teacher_d, similarity_temperature)
    views = [(s, t), (s.T, t.T)]  # query -> documents, document -> queries
    if mask is not None:  # padding columns: a large negative (not -inf: 0·inf in the KL)
        keep = mask[None, :] > 0
        views = [tuple(jnp.where(keep, x, jnp.asarray(-1e9, x.dtype)) for x in v) for v in views]
    return sum(kd_kl(a, b, kd_temperature, mask) for a, b in views) / 2


def mrr(q: np.ndarray, d: np.ndarray, num_candidates: int = 1000, seed: int = 0) -> float:
    """Mean reciprocal rank of each query's own document among `num_candidates` documents: its
    own and ``num_candidates - 1`` distractors drawn without replacement from the other
    documents (fixed by `seed`). q, d [N, D] host arrays, row i a pair; N >= num_candidates.
    A tie with a distractor counts against the query (rank = 1 + #distractors scoring >=)."""
    q, d = np.asarray(q, np.float64), np.asarray(d, np.float64)
    n = q.shape[0]
    if n < num_candidates:
        raise ValueError(f"mrr needs at least num_candidates={num_candidates} pairs, got {n}")
    rng = np.random.default_rng(seed)
    ranks = np.empty(n)
    for i in range(n):
        others = rng.choice(n - 1, num_candidates - 1, replace=False)
        others = others + (others >= i)  # skip i
        own = q[i] @ d[i]
        ranks[i] = 1 + np.sum(d[others] @ q[i] >= own)
    return float(np.mean(1.0 / ranks))
