"""Backbone definitions: each name maps to a list of blocks and default exit positions.

`transformer` is the multi-exit encoder of `models/transformer.py`: `stage_sizes` counts its
layers per stage (default (2, 2, 2)), an exit after each stage; `width` is its model width.
`resnet18/34/50` follow He et al. (2016) with a configurable base width (64 in the
paper; small widths make the CPU demos fast) and a CIFAR (3x3) or ImageNet (7x7 +
max-pool) stem. `resnet` is the same family with explicit `stage_sizes`, for tiny
variants. `cnn` is a plain conv net, one conv block per stage by default.
By default there is one exit after each stage.
"""

from hisd_jax.models.layers import BlockSpec

RESNET_STAGES = {
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
}
BACKBONES = ("cnn", "resnet", *RESNET_STAGES, "transformer")
ENCODER = "encoder"  # the block kind of `transformer`: one encoder layer (models/transformer.py)


def backbone_blocks(name: str, width: int, stage_sizes=None, strides=None):
    """Returns (blocks, default exit positions) for a backbone name.

    `strides` gives each stage's downsampling factor (default 1 for the first stage
    and 2 after); small inputs may keep the last stage at full resolution.
    """
    if name in RESNET_STAGES:
        default_sizes, kind = RESNET_STAGES[name]
        stage_sizes = stage_sizes or default_sizes
    elif name == "resnet":
        kind = "basic"
        stage_sizes = stage_sizes or (1, 1, 1, 1)
    elif name == "cnn":
        kind = "conv"
        stage_sizes = stage_sizes or (1, 1, 1)
    elif name == "transformer":  # stages of encoder layers, no downsampling
        stage_sizes = stage_sizes or (2, 2, 2)
        blocks = tuple(BlockSpec(ENCODER, width, 1) for _ in range(sum(stage_sizes)))
        ends = [sum(stage_sizes[: i + 1]) for i in range(len(stage_sizes))]
        return blocks, tuple(ends)
    else:
        raise ValueError(f"model.name={name!r} is not one of {', '.join(BACKBONES)}")
    strides = strides or tuple(1 if s == 0 else 2 for s in range(len(stage_sizes)))
    if len(strides) != len(stage_sizes):
        raise ValueError(
            f"model.strides={tuple(strides)} must have one entry per stage ({len(stage_sizes)})"
        )
    blocks, exits = [], []
    for stage, size in enumerate(stage_sizes):
        for b in range(size):
            blocks.append(BlockSpec(kind, width * 2**stage, strides[stage] if b == 0 else 1))
        exits.append(len(blocks))
    return tuple(blocks), tuple(exits)
