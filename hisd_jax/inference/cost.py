"""Compute accounting from XLA's cost analysis of each piece of a multi-exit model.

The model is costed piece by piece (segment 0 = stem + blocks up to exit 0, segment
1, ..., and each exit head), for one example, so that:
  * a standalone model cut at exit e costs  sum(segments[:e+1]) + heads[e];
  * a cascade that exits at e has also run the heads before it:
    sum(segments[:e+1]) + sum(heads[:e+1]).
"""

import jax
import jax.numpy as jnp
import numpy as np

from hisd_jax.models import labels


def compiled_flops(fn, *args) -> float:
    """FLOPs of `fn(*args)` as XLA's cost analysis of the compiled program reports them."""
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax returned one dict per device
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


def piece_flops(model, variables, image_shape, dtype=jnp.float32) -> dict:
    """FLOPs per example of every segment and every exit head (inference mode); `image_shape`
    and `dtype` are one example's input (a data set's `image_shape` and `input_dtype`)."""
    x = jax.ShapeDtypeStruct((1, *image_shape), dtype)
    seg, heads = [], []
    for i in range(model.num_exits):
        run_seg = lambda v, x, i=i: model.apply(v, i, x, method=model.run_segment)
        seg.append(compiled_flops(run_seg, variables, x))
        x_out = jax.eval_shape(run_seg, variables, x)
        run_head = lambda v, h, i=i: model.apply(v, i, h, method=model.run_head)
        heads.append(compiled_flops(run_head, variables, x_out))
        x = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), x_out)
    return {"segments": seg, "heads": heads}


def exit_costs(pieces: dict, exits=None) -> dict:
    """Per-exit standalone and cascade FLOPs and their fractions of the full model.

    `exits` (sorted exit indices; default every exit) restricts the cascade to a task's own
    exits (`model.task_exits`): exiting at exits[k] has run every segment up to it and the
    heads at exits[:k+1] only, and the full model is the one cut at exits[-1]. Arrays [len(exits)]
    (FLOPs per example); `stage_segments` is the segment FLOPs each cascade stage adds. A head's
    cost is the whole exit head (every task's classifier at that exit).
    """
    seg, heads = np.asarray(pieces["segments"]), np.asarray(pieces["heads"])
    exits = np.arange(len(seg)) if exits is None else np.asarray(exits, int)
    trunk = np.cumsum(seg)[exits]
    standalone = trunk + heads[exits]
    cascade = trunk + np.cumsum(heads[exits])
    full = standalone[-1]
    return {
        "standalone": standalone,
        "cascade": cascade,
        "full": full,
        "fraction": standalone / full,
        "cascade_fraction": cascade / full,
        "stage_segments": np.diff(trunk, prepend=0.0),
        "heads": heads[exits],
    }


def exit_param_counts(params, param_labels) -> list[int]:
    """Parameters a model cut at each exit needs: its trunk segments and its head without the
    training-only projection (`models.labels.needed_by_exit`)."""
    flat = list(zip(jax.tree.leaves(param_labels), jax.tree.leaves(params), strict=True))
    num_exits = 1 + max(labels.exit_of(label) for label, _ in flat)
    return [
        int(sum(np.size(x) for label, x in flat if labels.needed_by_exit(label, e)))
        for e in range(num_exits)
    ]
