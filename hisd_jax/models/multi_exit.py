"""A backbone cut into segments, with an exit head after each segment.

The network is a flat list of blocks. `exit_after[e]` is the number of blocks that
have run when exit e reads the features, so segment e is blocks
exit_after[e-1]..exit_after[e] (segment 0 also runs the stem). This one structure
serves three uses:
  * training: `__call__` returns every exit's outputs (logits per task, pooled
    features, and the projected features HiSD aligns);
  * early-exit inference: `run_segment(i, x)` and `run_head(i, x)` run one piece,
    so a cascade can skip deeper segments and XLA can cost each piece;
  * the "dedicated smaller model" baseline: `cut_at=e` builds only segments and
    heads 0..e, whose parameter names are a subset of the full model's.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from hisd_jax.models import labels
from hisd_jax.models.exits import ExitHead
from hisd_jax.models.layers import BLOCKS, BlockSpec, Stem


class Segment(nn.Module):
    blocks: Sequence[BlockSpec]
    norm: str
    stem: str | None = None
    stem_features: int = 0
    dtype: jnp.dtype = jnp.float32
    remat: bool = False  # jax.checkpoint each block: its activations are recomputed backward

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.stem is not None:
            x = Stem(self.stem, self.stem_features, self.norm, self.dtype, name="stem")(x, train)
        for i, spec in enumerate(self.blocks):
            block = BLOCKS[spec.kind]
            if self.remat:  # same parameters and values; `train` (argument 2) stays static
                block = nn.remat(block, static_argnums=(2,))
            x = block(spec, self.norm, self.dtype, name=f"block{i}")(x, train)
        return x


class SegmentsAndExits:
    """What every multi-exit model shares (`MultiExitNet`, `transformer.TransformerExitNet`):
    the exit count and names from `exit_after` and `cut_at`, and the forward pass by pieces
    over the `segments` and `heads` a subclass's `setup` builds."""

    @property
    def num_exits(self) -> int:
        return len(self.exit_after) if self.cut_at is None else self.cut_at + 1

    @property
    def exit_names(self) -> tuple[str, ...]:
        return tuple(f"exit{e}" for e in range(self.num_exits))

    def trunk(self, x, train: bool = False) -> list:
        """Every segment's output, shallow -> deep: the shared representation."""
        features = []
        for segment in self.segments:
            x = segment(x, train)
            features.append(x)
        return features

    def run_segment(self, i: int, x, train: bool = False):
        """Runs segment i alone (segment 0 also takes the raw input)."""
        return self.segments[i](x, train)

    def run_head(self, i: int, x):
        """Runs exit head i alone on segment i's output."""
        return self.heads[i](x)


class MultiExitNet(SegmentsAndExits, nn.Module):
    """Backbone with exits. See the module docstring.

    Outputs of `__call__` (lists ordered shallow -> deep):
      {'logits': {task: [B, n_task] per exit that predicts the task},
       'features': [B, D_e] pooled, per exit,
       'projected': [B, D_final] per non-final exit (only with project=True)}
    `task_exits` ((task, exits), ...) restricts a task to some exits (default: every
    exit); the (task x exit) grid of heads is what HiSD and the MTL strategies share.
    `trunk` and `apply_heads` split the forward pass at the shared representation
    (the MTL representation-space gradient methods differentiate there).
    """

    blocks: Sequence[BlockSpec]
    exit_after: Sequence[int]
    tasks: Sequence[tuple[str, int]]
    stem: str = "cifar"
    stem_features: int = 16
    norm: str = "batch"
    cut_at: int | None = None
    task_exits: Sequence[tuple[str, Sequence[int]]] = ()
    head_pool: int = 1
    head_hidden: Sequence[int] = ()
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    def setup(self):
        ends = list(self.exit_after[: self.num_exits])
        starts = [0] + ends[:-1]
        last = self.blocks[ends[-1] - 1]
        proj_dim = last.out_features * self.head_pool**2
        self.segments = [
            Segment(
                tuple(self.blocks[a:b]),
                self.norm,
                self.stem if i == 0 else None,
                self.stem_features,
                self.dtype,
                self.remat,
            )
            for i, (a, b) in enumerate(zip(starts, ends))
        ]
        self.heads = [
            ExitHead(
                self._head_tasks(i),
                self.head_pool,
                tuple(self.head_hidden),
                proj_dim if i < len(ends) - 1 else None,
                self.dtype,
            )
            for i in range(len(ends))
        ]

    def exits_of(self, task: str) -> tuple[int, ...]:
        """The exits whose head predicts `task` (all exits unless `task_exits` says otherwise)."""
        chosen = dict(self.task_exits).get(task)
        everything = tuple(range(self.num_exits))
        return everything if chosen is None else tuple(e for e in chosen if e < self.num_exits)

    def _head_tasks(self, i: int) -> tuple[tuple[str, int], ...]:
        return tuple((name, n) for name, n in self.tasks if i in self.exits_of(name))

    def __call__(self, x, train: bool = False, project: bool = False):
        return self.apply_heads(self.trunk(x, train), project)

    def apply_heads(self, features, project: bool = False) -> dict:
        """Exit heads on the trunk's outputs; see the class docstring for the result."""
        outs = [head(f, project=project) for head, f in zip(self.heads, features)]
        result = {
            "logits": {
                name: [outs[e]["logits"][name] for e in self.exits_of(name)]
                for name, _ in self.tasks
            },
            "features": [o["features"] for o in outs],
        }
        if project or self.is_initializing():
            result["projected"] = [o["projected"] for o in outs[:-1]]
        return result

    def param_labels(self, params) -> dict:
        """The label tree of `params` (structure of `params`, string leaves; `models.labels`).

        Flax names the entries of the `segments` and `heads` lists `segments_{i}` and
        `heads_{i}`; a parameter that this function does not label raises ValueError.
        """
        prefix = {}
        for i in range(self.num_exits):
            prefix[f"segments_{i}"] = labels.trunk(i)
            head = self._head(i)
            prefix[f"heads_{i}"] = head.param_labels(params.get(f"heads_{i}", {}), i)
        return labels.expand(prefix, params)

    def _head(self, i: int) -> ExitHead:
        """Exit head i as an unbound module (for its labels; `setup` builds the bound ones)."""
        return ExitHead(self._head_tasks(i), self.head_pool, tuple(self.head_hidden), parent=None)
