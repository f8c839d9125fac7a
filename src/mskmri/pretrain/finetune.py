"""Slice-wise binary segmentation fine-tuning for the pretraining experiment.

The same recipe for both arms of ``benchmarks/pretraining.py`` (scratch and pretrained):
a 2-D :class:`~mskmri.nn.unet.UNet`, random crops of labelled slices (foreground slices
oversampled, and their crops placed to contain a random foreground pixel, so a small structure
in a slice larger than the patch is still seen), intensity augmentation, Dice + cross-entropy, the shared loop
:func:`mskmri.nn.train.fit`; the pretrained arm differs only by ``TrainConfig.init``.
Evaluation stacks the slice predictions of a volume and scores 3-D Dice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from mskmri.pretrain.data import crop_or_pad

log = logging.getLogger(__name__)

#: Fraction of training samples drawn from slices that contain foreground.
FOREGROUND_SLICE_FRACTION = 0.75
#: Intensity augmentation ranges: gamma, scale, shift (normalised units), noise sigma.
AUG_GAMMA = (0.7, 1.5)
AUG_SCALE = (0.85, 1.15)
AUG_SHIFT = (-0.1, 0.1)
AUG_NOISE = (0.0, 0.05)
#: Smoothing of the soft Dice, voxels.
DICE_SMOOTH = 1.0


@dataclass
class LabelledVolume:
    """One volume as slices: ``image`` ``(Z, H, W)`` normalised float32, ``labels`` same shape
    uint8 (0/1), a name, and how it was made (``meta``, JSON-ready, e.g. a render's contrast)."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


class SliceSegDataset:
    """Random labelled crops from a few volumes (a seeded dataset for :func:`fit`).

    ``sample(index, rng)`` picks volume ``index``, a slice (with foreground at probability
    :data:`FOREGROUND_SLICE_FRACTION`), a crop of ``patch`` (on a foreground slice, one that
    contains a foreground pixel drawn at random) and an intensity augmentation.
    """

    def __init__(self, volumes: Sequence[LabelledVolume], patch: Sequence[int]) -> None:
        self.volumes = list(volumes)
        self.patch = tuple(int(p) for p in patch)
        self.fg = [np.nonzero(v.labels.reshape(len(v.labels), -1).any(1))[0]
                   for v in self.volumes]

    def __len__(self) -> int:
        return len(self.volumes)

    def sample(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image (1, *patch) float32, labels (*patch) int64)``."""
        v = self.volumes[index]
        fg = self.fg[index]
        contains: tuple[int, ...] | None = None
        if fg.size and rng.random() < FOREGROUND_SLICE_FRACTION:
            z = int(rng.choice(fg))
            pts = np.argwhere(v.labels[z] > 0)
            contains = (0, *(int(c) for c in pts[rng.integers(len(pts))]))
        else:
            z = int(rng.integers(0, len(v.image)))
        stack = np.stack([v.image[z], v.labels[z].astype(np.float32)])
        # One window for image and labels: crop the 2-channel stack.
        img, lab = crop_or_pad(stack, (2, *self.patch), rng, contains)[0]
        img = np.clip(img, 0.0, None) ** rng.uniform(*AUG_GAMMA)
        img = img * rng.uniform(*AUG_SCALE) + rng.uniform(*AUG_SHIFT)
        img = img + rng.normal(0.0, rng.uniform(*AUG_NOISE), img.shape)
        return (torch.from_numpy(img[None].astype(np.float32)),
                torch.from_numpy((lab > 0.5).astype(np.int64)))


def seg_loss(model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """Soft Dice (foreground) + cross-entropy of 2-class logits (the :func:`fit` objective)."""
    x, y = batch
    logits = model(x).float()
    ce = F.cross_entropy(logits, y)
    p = torch.softmax(logits, 1)[:, 1]
    t = (y == 1).float()
    inter = (p * t).sum()
    dice = (2 * inter + DICE_SMOOTH) / (p.sum() + t.sum() + DICE_SMOOTH)
    return ce + (1 - dice), {"ce": float(ce.detach()), "soft_dice": float(dice.detach())}


@torch.no_grad()
def predict_volume(model: torch.nn.Module, image: np.ndarray, divisor: int,
                   chunk: int = 16) -> np.ndarray:
    """Binary prediction ``(Z, H, W)`` uint8 of a slice stack, padded to ``divisor``."""
    model.eval()
    z, h, w = image.shape
    ph, pw = (-h) % divisor, (-w) % divisor
    x = np.pad(image, ((0, 0), (0, ph), (0, pw)))
    out = np.zeros((z, h, w), np.uint8)
    for s in range(0, z, chunk):
        t = torch.from_numpy(x[s:s + chunk, None].astype(np.float32))
        pred = model(t).argmax(1).numpy()
        out[s:s + chunk] = pred[:, :h, :w]
    return out


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """3-D Dice of two binary arrays (1.0 when both are empty)."""
    p, t = pred > 0, truth > 0
    den = int(p.sum() + t.sum())
    return 1.0 if den == 0 else 2.0 * int((p & t).sum()) / den
