"""Building blocks shared by the backbones: norms, stems, residual and conv blocks."""

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp

NORMS = ("batch", "group", "layer", "none")
STEMS = ("cifar", "imagenet", "none")


def make_norm(kind: str, train: bool, dtype, name: str, zero_init: bool = False):
    """Returns a norm layer by name. 'batch' keeps running averages in `batch_stats`."""
    scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
    if kind == "batch":
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            # Two-pass variance E[(x - mean)^2]: flax's default one-pass E[x^2] - E[x]^2
            # cancels badly when |mean| >> std (2% gradient errors on MultiDigits, and
            # different ones for every device count).
            use_fast_variance=False,
            dtype=dtype,
            scale_init=scale_init,
            name=name,
        )
    if kind == "group":
        return _GroupNorm(dtype=dtype, scale_init=scale_init, name=name)
    if kind == "layer":
        return nn.LayerNorm(dtype=dtype, scale_init=scale_init, name=name)
    if kind == "none":
        return lambda x: x
    raise ValueError(f"norm={kind!r} is not one of {', '.join(NORMS)}")


class _GroupNorm(nn.Module):
    """GroupNorm with up to 32 groups, fewer when the width is not divisible."""

    dtype: jnp.dtype = jnp.float32
    scale_init: nn.initializers.Initializer = nn.initializers.ones

    @nn.compact
    def __call__(self, x):
        groups = math.gcd(32, x.shape[-1])
        return nn.GroupNorm(num_groups=groups, dtype=self.dtype, scale_init=self.scale_init)(x)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One block of a backbone: kind in BLOCKS, output features, stride."""

    kind: str
    features: int
    stride: int = 1

    @property
    def out_features(self) -> int:
        return self.features * (4 if self.kind == "bottleneck" else 1)


class Stem(nn.Module):
    kind: str
    features: int
    norm: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        if self.kind == "none":
            return x
        if self.kind == "cifar":
            x = nn.Conv(self.features, (3, 3), use_bias=False, dtype=self.dtype, name="conv")(x)
        elif self.kind == "imagenet":
            x = nn.Conv(
                self.features,
                (7, 7),
                (2, 2),
                padding=[(3, 3), (3, 3)],
                use_bias=False,
                dtype=self.dtype,
                name="conv",
            )(x)
        else:
            raise ValueError(f"stem={self.kind!r} is not one of {', '.join(STEMS)}")
        x = nn.relu(make_norm(self.norm, train, self.dtype, "norm")(x))
        if self.kind == "imagenet":
            x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        return x


class ConvBlock(nn.Module):
    """conv3x3 -> norm -> relu (the small CNN's block)."""

    spec: BlockSpec
    norm: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        s = self.spec.stride
        x = nn.Conv(self.spec.features, (3, 3), (s, s), use_bias=False, dtype=self.dtype)(x)
        return nn.relu(make_norm(self.norm, train, self.dtype, "norm")(x))


def _shortcut(block, x, y, stride: int, train: bool):
    """The residual branch's input: identity, or a strided 1x1 projection when shapes differ.

    Called inside `block`'s compact `__call__`, so the layers are named in that block.
    """
    if x.shape == y.shape:
        return x
    x = nn.Conv(
        y.shape[-1], (1, 1), (stride, stride), use_bias=False, dtype=block.dtype, name="proj"
    )(x)
    return make_norm(block.norm, train, block.dtype, "proj_norm")(x)


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 convs, projection shortcut when the shape changes."""

    spec: BlockSpec
    norm: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        f, s = self.spec.features, self.spec.stride
        y = nn.Conv(f, (3, 3), (s, s), use_bias=False, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(make_norm(self.norm, train, self.dtype, "norm1")(y))
        y = nn.Conv(f, (3, 3), use_bias=False, dtype=self.dtype, name="conv2")(y)
        y = make_norm(self.norm, train, self.dtype, "norm2", zero_init=True)(y)
        return nn.relu(_shortcut(self, x, y, s, train) + y)


class Bottleneck(nn.Module):
    """ResNet-50 block: 1x1 -> 3x3 (strided) -> 1x1 with 4x expansion."""

    spec: BlockSpec
    norm: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        f, s = self.spec.features, self.spec.stride
        y = nn.Conv(f, (1, 1), use_bias=False, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(make_norm(self.norm, train, self.dtype, "norm1")(y))
        y = nn.Conv(f, (3, 3), (s, s), use_bias=False, dtype=self.dtype, name="conv2")(y)
        y = nn.relu(make_norm(self.norm, train, self.dtype, "norm2")(y))
        y = nn.Conv(4 * f, (1, 1), use_bias=False, dtype=self.dtype, name="conv3")(y)
        y = make_norm(self.norm, train, self.dtype, "norm3", zero_init=True)(y)
        return nn.relu(_shortcut(self, x, y, s, train) + y)


BLOCKS = {"conv": ConvBlock, "basic": BasicBlock, "bottleneck": Bottleneck}
