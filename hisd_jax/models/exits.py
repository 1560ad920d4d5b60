"""Exit heads: adaptive pooling -> (hidden layers) -> one classifier per task.

A head also owns the learned projection P_e that maps its pooled features to the
common width used by HiSD's feature-alignment term. The projection is computed only
when asked for (training with a feature loss), so it costs nothing at inference.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from hisd_jax.models import labels


def adaptive_avg_pool(x: jnp.ndarray, size: int) -> jnp.ndarray:
    """Average-pools [B, H, W, C] to [B, size, size, C] with PyTorch's bin edges.

    Bin i covers rows floor(i*H/size) .. ceil((i+1)*H/size) - 1, so every input
    row is used and size=1 is global average pooling. H, W are static.
    """
    if size == 1:
        return jnp.mean(x, axis=(1, 2), keepdims=True)
    h, w = x.shape[1], x.shape[2]

    def bins(n):
        return [(i * n // size, -(-(i + 1) * n // size)) for i in range(size)]

    rows = []
    for r0, r1 in bins(h):
        cols = [jnp.mean(x[:, r0:r1, c0:c1, :], axis=(1, 2)) for c0, c1 in bins(w)]
        rows.append(jnp.stack(cols, axis=1))
    return jnp.stack(rows, axis=1)


def hidden_name(i: int) -> str:
    return f"hidden{i}"


def task_out_name(task: str) -> str:
    return f"out_{task}"


PROJ_NAME = "proj"


class ExitHead(nn.Module):
    """One exit: pooled features and per-task outputs.

    Attributes:
      tasks: (task name, number of outputs) pairs; regression tasks have 1 output.
      pool_size: adaptive pooling output side (1 = global average pooling).
      hidden: widths of optional hidden Dense+ReLU layers before the classifiers.
      proj_dim: width of the feature projection P_e (None: this head has none,
        as for the final exit whose pooled features are the distillation target).
    """

    tasks: Sequence[tuple[str, int]]
    pool_size: int = 1
    hidden: Sequence[int] = ()
    proj_dim: int | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, project: bool = False):
        if self.pool_size > min(x.shape[1], x.shape[2]):  # repeated bins, size**2 slices
            raise ValueError(
                f"model.head_pool={self.pool_size} is larger than the {x.shape[1]}x{x.shape[2]} "
                f"feature map an exit pools; use at most {min(x.shape[1], x.shape[2])}"
            )
        pooled = adaptive_avg_pool(x, self.pool_size).reshape(x.shape[0], -1)
        h = pooled
        for i, width in enumerate(self.hidden):
            h = nn.relu(nn.Dense(width, dtype=self.dtype, name=hidden_name(i))(h))
        logits = {
            name: nn.Dense(n, dtype=self.dtype, name=task_out_name(name))(h).astype(jnp.float32)
            for name, n in self.tasks
        }
        out = {"logits": logits, "features": pooled.astype(jnp.float32)}
        if self.proj_dim is not None and (project or self.is_initializing()):
            out["projected"] = nn.Dense(self.proj_dim, dtype=self.dtype, name=PROJ_NAME)(
                pooled
            ).astype(jnp.float32)
        return out

    def param_labels(self, params, exit_index: int) -> dict:
        """The label of every parameter leaf of this head (see `models.labels`).

        Built from the names this module gives its submodules (the functions above), so a
        renamed submodule fails here instead of silently changing a leaf's role.
        """
        out = {}
        for i in range(len(self.hidden)):
            out[hidden_name(i)] = labels.exit_shared(exit_index)
        for name, _ in self.tasks:
            out[task_out_name(name)] = labels.task_head(name, exit_index)
        if PROJ_NAME in params:
            out[PROJ_NAME] = labels.projection(exit_index)
        return labels.expand(out, params, where=f"exit head {exit_index}")
