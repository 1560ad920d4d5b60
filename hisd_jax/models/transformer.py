"""A multi-exit Transformer encoder for token sequences (code search, sequence classification).

`TransformerExitNet` follows `MultiExitNet`'s interface (segments, one head per exit,
`run_segment` / `run_head`, `trunk` / `apply_heads`, `cut_at`, `param_labels`), so the
per-exit costs, early exit and export machinery apply to it as to the CNNs.

  input     tokens int32 [B, L], or pairs [B, 2, L] (query, document: a retrieval data set);
            id 0 is padding (`data.pycode.PAD_ID`), masked out of every attention and every
            pooling; position 0 is expected to hold [CLS] for `pool="cls"`.
  segment 0 token embedding + learned position embedding, then layers 1..exit_after[0];
  segment i the layers exit_after[i-1]+1 .. exit_after[i]. A segment maps {"h" [..., L, W],
            "mask" bool [..., L]} to the same (segment 0 takes the tokens); the leading axes
            are [B] or [B, 2], every sequence encoded alone.
  layer     pre-LN: h + MHA(LN(h)), then h + MLP(LN(h)) (GELU); attention by
            `jax.nn.dot_product_attention` with the padding mask on the keys; bidirectional.
  exit head LN, then pooling (masked mean over real tokens, or the [CLS] position) to pooled
            features [..., W]. "features" [B, W] (of the document of a pair); per
            classification task a Dense on them ("logits" [B, C]); per retrieval task an
            L2-normalised Dense to `embed_dim` of every sequence ("logits" [B, 2, D] for pairs,
            [B, D] for single sequences); and, when asked, the projection P_e to the final
            exit's width (HiSD's feature alignment of classification tasks).

Vaswani et al. 2017 (the encoder); Xiong et al. 2020 (pre-LN); the exits and pooling follow
MoSE (arXiv 2503.03008: exits after chosen layers, mean-pooled, L2-normalised embeddings).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hisd_jax.models import labels
from hisd_jax.models.multi_exit import SegmentsAndExits
from hisd_jax.objectives.distill import l2_normalize

POOLS = ("mean", "cls")


class EncoderLayer(nn.Module):
    """One pre-LN Transformer encoder layer."""

    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, mask):
        width = h.shape[-1]
        if width % self.num_heads:
            raise ValueError(
                f"model.width={width} must be a multiple of model.num_heads={self.num_heads}"
            )
        head_dim = width // self.num_heads
        x = nn.LayerNorm(dtype=self.dtype, name="ln_attn")(h)
        qkv = nn.DenseGeneral((3, self.num_heads, head_dim), dtype=self.dtype, name="qkv")(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, N, H]
        attn = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
        h = h + nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out")(attn)
        x = nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(h)
        x = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_in")(x))
        return h + nn.Dense(width, dtype=self.dtype, name="mlp_out")(x)


class EncoderSegment(nn.Module):
    """The layers between two exits (segment 0 also embeds the tokens)."""

    num_layers: int
    num_heads: int
    mlp_dim: int
    width: int
    vocab_size: int | None = None  # segment 0 only
    max_len: int | None = None
    dtype: jnp.dtype = jnp.float32
    remat: bool = False  # jax.checkpoint each layer

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no dropout or batch statistics
        if self.vocab_size is not None:
            tokens = x
            if tokens.shape[-1] > self.max_len:
                raise ValueError(
                    f"sequences of {tokens.shape[-1]} tokens exceed model.max_len={self.max_len}"
                )
            length = tokens.shape[-1]
            h = nn.Embed(self.vocab_size, self.width, name="tokens")(tokens)
            pos = nn.Embed(self.max_len, self.width, name="positions")(jnp.arange(length))
            x = {"h": (h + pos).astype(self.dtype), "mask": tokens != 0}
        shape = x["h"].shape  # [..., L, W]: every sequence (each side of a pair) alone
        h = x["h"].reshape(-1, *shape[-2:])
        mask = x["mask"].reshape(-1, shape[-2])
        layer = nn.remat(EncoderLayer) if self.remat else EncoderLayer
        for i in range(self.num_layers):
            h = layer(self.num_heads, self.mlp_dim, self.dtype, name=f"layer{i}")(h, mask)
        return {"h": h.reshape(shape), "mask": x["mask"]}


def masked_mean_pool(h, mask):
    """Mean of `h` [..., L, W] over the positions where `mask` [..., L] holds; [..., W] (0 for
    a sequence without any real token)."""
    m = mask.astype(h.dtype)[..., None]
    return jnp.sum(h * m, axis=-2) / jnp.maximum(jnp.sum(m, axis=-2), 1.0)


class EncoderExitHead(nn.Module):
    """One exit of the encoder: pooled features, task logits, retrieval embeddings."""

    tasks: Sequence[tuple[str, int]]
    pool: str = "mean"
    embed_dim: int = 0  # a retrieval task's embedding width (0: the model width)
    proj_dim: int | None = None
    retrieval_tasks: Sequence[str] = ()
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, project: bool = False):
        h = nn.LayerNorm(dtype=self.dtype, name="ln")(x["h"])
        if self.pool == "cls":
            pooled = h[..., 0, :]
        else:
            pooled = masked_mean_pool(h, x["mask"])
        pooled = pooled.astype(jnp.float32)  # [B, W] or, for pairs, [B, 2, W]
        paired = x["mask"].ndim == 3
        document = pooled[:, -1] if paired else pooled
        logits = {}
        for name, n in self.tasks:
            if name in self.retrieval_tasks:
                z = nn.Dense(self.embed_dim or pooled.shape[-1], dtype=self.dtype,
                             name=f"out_{name}")(pooled)  # fmt: skip
                logits[name] = l2_normalize(z.astype(jnp.float32))
            else:
                logits[name] = nn.Dense(n, dtype=self.dtype, name=f"out_{name}")(document).astype(
                    jnp.float32
                )
        out = {"features": document, "logits": logits}
        if self.proj_dim is not None and (project or self.is_initializing()):
            out["projected"] = nn.Dense(self.proj_dim, dtype=self.dtype, name="proj")(
                document
            ).astype(jnp.float32)
        return out

    def param_labels(self, params, exit_index: int) -> dict:
        out = {"ln": labels.exit_shared(exit_index)}
        for name, _ in self.tasks:
            out[f"out_{name}"] = labels.task_head(name, exit_index)
        if "proj" in params:
            out["proj"] = labels.projection(exit_index)
        return labels.expand(out, params, where=f"encoder exit head {exit_index}")


class TransformerExitNet(SegmentsAndExits, nn.Module):
    """A Transformer encoder with an exit after each of `exit_after`'s layer counts.

    Attributes:
      vocab_size, max_len: token vocabulary and longest sequence (learned positions).
      width, num_heads, mlp_dim: the layers' sizes; `exit_after` (sorted layer counts, the last
        one the depth) places the exits. `tasks` ((name, outputs), ...) get a head at every
        exit: a classifier, or for the names in `retrieval_tasks` an L2-normalised embedding of
        width `embed_dim` (0: `width`); `pool` picks the exit pooling; `cut_at` keeps exits
        0..cut_at.

    `__call__(tokens)` returns {"features": [E x [B, W]], "logits": {task: [E x [B, C]] or,
    for a retrieval task, [E x [B, 2, D]] (pairs) / [E x [B, D]]}} and, with `project` (or at
    init), "projected": the first E-1 exits' features mapped to the final exit's width.
    """

    vocab_size: int
    max_len: int
    width: int
    num_heads: int
    mlp_dim: int
    exit_after: Sequence[int]
    tasks: Sequence[tuple[str, int]] = ()
    pool: str = "mean"
    embed_dim: int = 0
    retrieval_tasks: Sequence[str] = ()
    cut_at: int | None = None
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    def exits_of(self, task: str) -> tuple[int, ...]:
        del task
        return tuple(range(self.num_exits))

    def setup(self):
        if self.pool not in POOLS:
            raise ValueError(f"model.pool={self.pool!r} is not one of {', '.join(POOLS)}")
        ends = list(self.exit_after[: self.num_exits])
        starts = [0] + ends[:-1]
        self.segments = [
            EncoderSegment(
                b - a,
                self.num_heads,
                self.mlp_dim,
                self.width,
                self.vocab_size if i == 0 else None,
                self.max_len if i == 0 else None,
                self.dtype,
                self.remat,
            )
            for i, (a, b) in enumerate(zip(starts, ends))
        ]
        self.heads = [EncoderExitHead(*self._head_args(i)) for i in range(len(ends))]

    def _head_args(self, i: int) -> tuple:
        """EncoderExitHead's fields at exit i (every exit but the last projects to the width)."""
        last = i == self.num_exits - 1
        return (tuple(self.tasks), self.pool, self.embed_dim, None if last else self.width,
                tuple(self.retrieval_tasks), self.dtype)  # fmt: skip

    def __call__(self, tokens, train: bool = False, project: bool = False):
        return self.apply_heads(self.trunk(tokens, train), project)

    def apply_heads(self, features, project: bool = False) -> dict:
        outs = [head(f, project=project) for head, f in zip(self.heads, features)]
        result = {
            "features": [o["features"] for o in outs],
            "logits": {name: [o["logits"][name] for o in outs] for name, _ in self.tasks},
        }
        if project or self.is_initializing():
            result["projected"] = [o["projected"] for o in outs[:-1]]
        return result

    def param_labels(self, params) -> dict:
        prefix = {}
        for i in range(self.num_exits):
            prefix[f"segments_{i}"] = labels.trunk(i)
            prefix[f"heads_{i}"] = EncoderExitHead(*self._head_args(i), parent=None).param_labels(
                params.get(f"heads_{i}", {}), i
            )
        return labels.expand(prefix, params)
