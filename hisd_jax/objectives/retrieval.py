"""Retrieval losses and metrics over a (query, document) batch, per exit.

An exit embeds a batch of ``B`` queries and their ``B`` documents as L2-normalised rows
``q, d [B, D]``; row i of each is a positive pair, every other row of the batch a negative. The
in-batch similarity is ``S = q dᵀ / τ`` ([B, B]).

  info_nce        symmetric InfoNCE, ``(CE(S, i) + CE(Sᵀ, i)) / 2`` averaged over queries: the
                  CLIP loss (Radford et al. 2021) that MoSE fine-tunes its exits with
                  (arXiv 2503.03008).
  similarity_kd   HiSD's KD term for retrieval: ``T² · KL(softmax(S_teacher/T) ‖
                  softmax(S_student/T))`` over each query's row and each document's column.
  retrieval_loss  the HiSD loss of a retrieval task over its exits (below).
  mrr             mean reciprocal rank of each query's document among candidates (the
                  CodeSearchNet protocol: its document and 999 distractors; Husain et al.
                  2019, arXiv 1909.09436); `cross_exit_mrr`: queries embedded at exit e
                  against documents embedded at exit e', for every pair of exits.

The HiSD loss of a retrieval task, with exits e = 1..E (E the final one, the teacher), pair
embeddings ``q_e, d_e`` and ``sg = jax.lax.stop_gradient``::

    L = Σ_e      w_e(progress) · InfoNCE(q_e, d_e)
      + λ_kd   · Σ_{e<E} SimKD(e ← sg(E))
      + λ_hier · Σ_{e<E} SimKD(e ← sg(e+1))
      + λ_feat · Σ_{e<E} (‖q_e − sg(q_E)‖² + ‖d_e − sg(d_E)‖²) / 2

Every exit embeds into the same space (one head per exit onto ``embed_dim``), so the feature
term aligns the embeddings themselves (no projection P_e): what lets a query embedded at a
cheap exit search an index built by the final exit (`cross_exit_mrr`). The weights are the
task's `hisd.HiSDWeights` (presets final_only, sdn, byot, mose, hisd, as for classification).

Padding rows (``mask == 0``) are neither anchors nor negatives: their similarities are
excluded from every softmax, and the mean runs over real rows only. Teachers are NOT
stop-gradiented here (as `distill.kd_kl`); the objective stops them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hisd_jax.objectives import hisd
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


def retrieval_loss(
    embeddings,
    weights: hisd.HiSDWeights,
    *,
    similarity_temperature,
    progress=1.0,
    mask: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """The HiSD loss of a retrieval task (module docstring) and its unweighted terms.

    Args:
      embeddings: ``E`` arrays ``[B, 2, D]``, shallow → deep: per pair the query's (row 0) and
        the document's (row 1) L2-normalised embedding at each of the task's exits.
      weights: from `hisd.resolve_weights` (CE weights become InfoNCE weights; ``temperature``
        is the KD temperature T).
      similarity_temperature: τ of ``S = q dᵀ / τ`` (> 0).
      progress: training progress in [0, 1] (the SDN ramp); may be traced.
      mask: optional ``[B]``, 0 on padding rows.

    Returns:
      ``(loss, metrics)``: float32 scalars ``nce/exit{i}`` (0-based over the task's exits),
      ``kd``, ``hier``, ``feat`` (sums over the internal exits, computed whatever their weight;
      a term enters the loss only when its weight is non-zero) and ``loss``.
    """
    embeddings = list(embeddings)
    num_exits = len(embeddings)
    if weights.ce_start.shape != (num_exits,):
        raise ValueError(
            f"retrieval_loss got {num_exits} exits but weights for {weights.ce_start.shape[0]}"
        )
    q = [x[:, 0] for x in embeddings]
    d = [x[:, 1] for x in embeddings]
    tau = similarity_temperature
    nce = [info_nce(q[e], d[e], tau, mask) for e in range(num_exits)]
    w = hisd.ce_weights(weights, progress)
    loss = sum(w[e] * nce[e] for e in range(num_exits))

    sg = jax.lax.stop_gradient
    t = weights.temperature
    zero = jnp.zeros((), jnp.float32)
    internal = range(num_exits - 1)

    def sim_kd(e, teacher):
        return similarity_kd(q[e], d[e], sg(q[teacher]), sg(d[teacher]), tau, t, mask)

    def align(e):
        dq = q[e] - sg(q[-1])
        dd = d[e] - sg(d[-1])
        per_row = (jnp.sum(dq * dq, axis=-1) + jnp.sum(dd * dd, axis=-1)) / 2
        return masked_mean(per_row, mask)

    kd = sum((sim_kd(e, num_exits - 1) for e in internal), zero)
    hier = sum((sim_kd(e, e + 1) for e in internal), zero)
    feat = sum((align(e) for e in internal), zero)
    return hisd.add_distillation(loss, weights, {"nce": nce}, kd=kd, hier=hier, feat=feat)


def candidate_sets(n: int, num_candidates: int = 1000, seed: int = 0) -> np.ndarray:
    """int [n, num_candidates - 1]: for each query i, distractor rows drawn without replacement
    from the other n - 1 documents (fixed by `seed`). ValueError if n < num_candidates."""
    if n < num_candidates:
        raise ValueError(f"mrr needs at least num_candidates={num_candidates} pairs, got {n}")
    rng = np.random.default_rng(seed)
    out = np.empty((n, num_candidates - 1), np.int64)
    for i in range(n):
        others = rng.choice(n - 1, num_candidates - 1, replace=False)
        out[i] = others + (others >= i)  # skip i
    return out


def mrr(
    q: np.ndarray,
    d: np.ndarray,
    num_candidates: int = 1000,
    seed: int = 0,
    candidates: np.ndarray | None = None,
) -> float:
    """Mean reciprocal rank of each query's own document among `num_candidates` documents: its
    own and ``num_candidates - 1`` distractors (`candidate_sets(N, num_candidates, seed)`, or
    the given `candidates` [N, K]). q, d [N, D] host arrays, row i a pair;
    N >= num_candidates. A tie with a distractor counts against the query (rank = 1 +
    #distractors scoring >=). Float64 throughout."""
    q, d = np.asarray(q, np.float64), np.asarray(d, np.float64)
    if candidates is None:
        candidates = candidate_sets(q.shape[0], num_candidates, seed)
    own = np.einsum("nd,nd->n", q, d)
    scores = np.einsum("nd,nkd->nk", q, d[candidates])
    ranks = 1 + np.sum(scores >= own[:, None], axis=1)
    return float(np.mean(1.0 / ranks))


def cross_exit_mrr(embeddings: np.ndarray, num_candidates: int = 1000, seed: int = 0) -> np.ndarray:
    """float64 [E, E]: entry (e, e') is the MRR of queries embedded at exit e against documents
    embedded at exit e' (same candidate sets for every entry; the diagonal is each exit's own
    MRR). `embeddings` [N, E, 2, D]: per pair and exit, query (row 0) and document (row 1)."""
    x = np.asarray(embeddings, np.float64)
    n, num_exits = x.shape[:2]
    candidates = candidate_sets(n, num_candidates, seed)
    return np.array([
        [mrr(x[:, e, 0], x[:, f, 1], candidates=candidates) for f in range(num_exits)]
        for e in range(num_exits)
    ])  # fmt: skip
