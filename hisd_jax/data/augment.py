"""Training-time augmentation of image batches, on the host, deterministic by (seed, step).

`crop_flip` is the CIFAR standard of ResNet training (He et al., 2016, sec. 4.2) that BYOT
(Zhang et al., 2019) trains with: pad each side with `padding` zeros, take a random H x W crop,
flip it horizontally with probability 1/2.

The training iterator (`pipeline.BatchIterator(augment=...)`) draws the crop offsets and flips
of global batch s for all of its rows from `np.random.default_rng([seed, STREAM, s])`, and each
process applies its own rows' draws, so the augmented global batch depends only on
(seed, s), not on the process count, and a resume is exact. Evaluation batches are never
augmented.
"""

from __future__ import annotations

import dataclasses

import numpy as np

AUGMENTATIONS = ("none", "crop_flip")
STREAM = 0x41554731  # "AUG1": the draws' seed is [seed, STREAM, step] (permutations: [seed, epoch])


@dataclasses.dataclass(frozen=True)
class CropFlip:
    """Random crop of a zero-padded image plus a random horizontal flip.

    `padding`: zeros added on each side (4 for 32 x 32 CIFAR); `key`: the batch field holding
    the images, float [N, H, W, C].
    """

    padding: int = 4
    key: str = "image"

    def draw(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """Per-row draws for `n` rows: 'dy', 'dx' int in [0, 2 * padding] (the crop's corner
        in the padded image) and 'flip' bool."""
        span = 2 * self.padding + 1
        return {
            "dy": rng.integers(0, span, n),
            "dx": rng.integers(0, span, n),
            "flip": rng.random(n) < 0.5,
        }

    def apply(self, batch: dict, draws: dict[str, np.ndarray]) -> dict:
        """`batch` with its images cropped and flipped by `draws` (one row each; see `draw`)."""
        return {**batch, self.key: crop_flip(batch[self.key], **draws, padding=self.padding)}


def crop_flip(images, dy, dx, flip, *, padding: int) -> np.ndarray:
    """images [N, H, W, C] zero-padded by `padding` on each side of H and W; row i cropped to
    H x W at corner (dy[i], dx[i]) of the padded image, then mirrored left-right where flip[i].
    Same dtype as `images`. dy, dx in [0, 2 * padding] (ValueError otherwise)."""
    images = np.asarray(images)
    n, h, w = images.shape[:3]
    dy, dx, flip = (np.asarray(a).reshape(n) for a in (dy, dx, flip))
    if padding < 0 or np.any((dy < 0) | (dy > 2 * padding) | (dx < 0) | (dx > 2 * padding)):
        raise ValueError(f"crop offsets must lie in [0, {2 * padding}] (padding {padding})")
    pad = [(0, 0), (padding, padding), (padding, padding)] + [(0, 0)] * (images.ndim - 3)
    padded = np.pad(images, pad)
    rows = dy[:, None] + np.arange(h)  # [N, H]
    cols = dx[:, None] + np.arange(w)  # [N, W]
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def build(name: str, *, padding: int, key: str) -> CropFlip | None:
    """The augmentation `data.augment` names (None for 'none')."""
    if name == "none":
        return None
    if name == "crop_flip":
        return CropFlip(padding=padding, key=key)
    raise ValueError(f"data.augment={name!r} is not one of {', '.join(AUGMENTATIONS)}")
