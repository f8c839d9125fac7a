"""Distortions of random areas of 2-D or 3-D images: the pretext task of self-supervised pretraining.

Every distortion is a :class:`Distortion` record: its type, its box (voxel index bounds), the
shape of the area inside the box (the whole box, an inscribed ellipse/ellipsoid, or an
irregular blob) and the parameters drawn for it, including the seed of anything random inside
the area (noise, pixel shuffling, blob shape). :func:`sample_distortions` draws the records
from a :class:`numpy.random.Generator`; :func:`apply_distortions` applies records
deterministically, so a record alone reproduces a distorted image, and only the voxels of the
area change.

Types (:data:`DISTORTION_TYPES`, index = class id + 1 of the detection head):

``noise``      additive Gaussian noise, sigma in image units;
``blur``       Gaussian blur, sigma in voxels;
``intensity``  ``scale * x ** gamma + shift`` on the area (x clipped at 0 before the power);
``shuffle``    local pixel shuffling: the area is cut into small blocks whose voxels are
               permuted within each block (Models Genesis);
``swap``       the area is replaced by the content of another, non-overlapping place of the
               same image (patch swap);
``mask``       the area is set to a constant (in-painting-style masking);
``ghost``      motion-like ghosting: a copy of the image shifted along one axis (the phase-
               encoding direction) is blended into the area.

Images are expected normalised to about 0..1 (see :func:`mskmri.pretrain.data.normalise`);
the parameter ranges below are in those units.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from mskmri.errors import MskMriError

log = logging.getLogger(__name__)

#: Distortion types; the detection head's class ``k`` is ``DISTORTION_TYPES[k]``.
DISTORTION_TYPES: tuple[str, ...] = ("noise", "blur", "intensity", "shuffle", "swap", "mask",
                                     "ghost")
#: Shapes of an area inside its box.
MASK_SHAPES: tuple[str, ...] = ("box", "ellipse", "blob")

#: Range of the Gaussian noise sigma (normalised image units, image ~0..1).
NOISE_SIGMA = (0.08, 0.25)
#: Range of the blur sigma (voxels).
BLUR_SIGMA_VOX = (1.5, 3.5)
#: Ranges of the intensity change: scale, shift (image units), gamma.
INTENSITY_SCALE = (0.5, 1.6)
INTENSITY_SHIFT = (-0.2, 0.2)
INTENSITY_GAMMA = (0.5, 2.0)
#: Smallest relative change of the intensity transform (|scale-1| or |log gamma| etc.), so an
#: ``intensity`` area is never an identity.
INTENSITY_MIN_CHANGE = 0.2
#: Block edge of local pixel shuffling (voxels).
SHUFFLE_BLOCK_VOX = (2, 5)
#: Range of the constant written by ``mask`` (image units).
MASK_VALUE = (0.0, 1.0)
#: Ghost blend weight and shift (fraction of the image size along the shifted axis).
GHOST_WEIGHT = (0.35, 0.7)
GHOST_SHIFT_FRAC = (0.08, 0.3)
#: Default area edge as a fraction of each image side.
SIZE_FRAC = (0.12, 0.35)
#: Smallest area edge, voxels.
MIN_EDGE_VOX = 6
#: Threshold (quantile of the smoothed noise inside the ellipse) that cuts a blob.
BLOB_KEEP_FRACTION = 0.7
#: Sigma of the smoothing that makes a blob, as a fraction of the box edge.
BLOB_SMOOTH_FRAC = 0.15
#: Tries to place a non-overlapping box before giving up on it.
PLACEMENT_TRIES = 50


class DistortionError(MskMriError):
    """A distortion record or request that cannot be applied."""


@dataclass(frozen=True)
class Distortion:
    """One distorted area and how it was distorted.

    Attributes
    ----------
    kind : str
        One of :data:`DISTORTION_TYPES`.
    lo, hi : tuple of int
        Box bounds, voxel indices per axis, ``lo`` inclusive and ``hi`` exclusive.
    shape : str
        Area inside the box: ``box``, ``ellipse`` or ``blob`` (:data:`MASK_SHAPES`).
    params : dict
        Type parameters (JSON-ready), e.g. ``{"sigma": 0.12}``; ``seed`` seeds anything random
        inside the area (noise, permutation, blob).
    """

    kind: str
    lo: tuple[int, ...]
    hi: tuple[int, ...]
    shape: str = "box"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in DISTORTION_TYPES:
            raise DistortionError(f"unknown distortion type {self.kind!r}; use one of "
                                  f"{DISTORTION_TYPES}")
        if self.shape not in MASK_SHAPES:
            raise DistortionError(f"unknown area shape {self.shape!r}; use one of {MASK_SHAPES}")
        if len(self.lo) != len(self.hi) or any(h <= lo for lo, h in zip(self.lo, self.hi,
                                                                          strict=True)):
            raise DistortionError(f"box lo {self.lo} / hi {self.hi} is empty or of mixed rank; "
                                  "each hi must exceed its lo")

    @property
    def type_index(self) -> int:
        """Class index of :attr:`kind` in :data:`DISTORTION_TYPES`."""
        return DISTORTION_TYPES.index(self.kind)

    @property
    def box(self) -> tuple[slice, ...]:
        """The box as a tuple of slices."""
        return tuple(slice(a, b) for a, b in zip(self.lo, self.hi, strict=True))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record."""
        d = asdict(self)
        d["lo"], d["hi"] = list(self.lo), list(self.hi)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Distortion:
        """Inverse of :meth:`to_dict`."""
        return cls(kind=d["kind"], lo=tuple(int(v) for v in d["lo"]),
                   hi=tuple(int(v) for v in d["hi"]), shape=d.get("shape", "box"),
                   params=dict(d.get("params", {})))


# ============================================================================ masks
def area_mask(d: Distortion) -> np.ndarray:
    """The area of ``d`` inside its box: bool array of shape ``hi - lo``."""
    size = tuple(h - lo for lo, h in zip(d.lo, d.hi, strict=True))
    if d.shape == "box":
        return np.ones(size, bool)
    grids = np.meshgrid(*[(np.arange(n) + 0.5) / n * 2.0 - 1.0 for n in size], indexing="ij")
    ell = sum(g ** 2 for g in grids) <= 1.0
    if d.shape == "ellipse":
        return np.asarray(ell)
    rng = np.random.default_rng(int(d.params.get("mask_seed", 0)))
    noise = ndimage.gaussian_filter(rng.standard_normal(size),
                                    [max(n * BLOB_SMOOTH_FRAC, 1.0) for n in size])
    inside = noise[ell]
    cut = np.quantile(inside, 1.0 - BLOB_KEEP_FRACTION) if inside.size else 0.0
    blob = ell & (noise >= cut)
    # Keep the largest connected part so an area is one piece.
    lab, n = ndimage.label(blob)
    if n > 1:
        sizes = ndimage.sum_labels(blob, lab, index=np.arange(1, n + 1))
        blob = lab == (int(np.argmax(sizes)) + 1)
    return blob if blob.any() else np.asarray(ell)


def full_mask(d: Distortion, shape: Sequence[int]) -> np.ndarray:
    """The area of ``d`` in an image of ``shape``: bool array of that shape."""
    out = np.zeros(tuple(shape), bool)
    out[d.box] = area_mask(d)
    return out


# ============================================================================ apply
def _apply_one(img: np.ndarray, d: Distortion) -> np.ndarray:
    """Distorted values of the whole box (the caller pastes them inside the area)."""
    p = d.params
    box = img[d.box]
    rng = np.random.default_rng(int(p.get("seed", 0)))
    if d.kind == "noise":
        return box + rng.normal(0.0, float(p["sigma"]), box.shape).astype(img.dtype)
    if d.kind == "blur":
        return np.asarray(ndimage.gaussian_filter(img, float(p["sigma_vox"]), mode="nearest")[d.box])
    if d.kind == "intensity":
        return (float(p["scale"]) * np.clip(box, 0.0, None) ** float(p["gamma"])
                + float(p["shift"])).astype(img.dtype)
    if d.kind == "shuffle":
        b = int(p["block"])
        out = box.copy()
        for start in np.ndindex(*[int(np.ceil(n / b)) for n in box.shape]):
            sl = tuple(slice(s * b, s * b + b) for s in start)
            block = out[sl]
            out[sl] = rng.permutation(block.ravel()).reshape(block.shape)
        return out
    if d.kind == "swap":
        src = tuple(slice(int(s), int(s) + (h - lo))
                    for s, lo, h in zip(p["source_lo"], d.lo, d.hi, strict=True))
        return img[src].copy()
    if d.kind == "mask":
        return np.full(box.shape, float(p["value"]), img.dtype)
    if d.kind == "ghost":
        axis, shift, w = int(p["axis"]), int(p["shift"]), float(p["weight"])
        ghost = np.roll(img, shift, axis=axis)[d.box]
        return ((1.0 - w) * box + w * ghost).astype(img.dtype)
    raise DistortionError(f"no implementation for distortion type {d.kind!r}")  # pragma: no cover


def apply_distortions(image: np.ndarray, distortions: Sequence[Distortion]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Apply the recorded distortions, in order, to a copy of ``image``.

    Parameters
    ----------
    image : (*S) float ndarray
        2-D or 3-D image, normalised to about 0..1.
    distortions : sequence of Distortion
        Records of the same rank as ``image``, inside it (from :func:`sample_distortions`).

    Returns
    -------
    distorted : (*S) float32 ndarray
        Equal to ``image`` outside the areas.
    area_ids : (*S) int16 ndarray
        0 outside every area, ``i + 1`` inside the area of ``distortions[i]`` (a later area
        overwrites an earlier one where they overlap).
    """
    img = np.asarray(image, np.float32)
    out = img.copy()
    ids = np.zeros(img.shape, np.int16)
    for i, d in enumerate(distortions):
        if len(d.lo) != img.ndim or any(h > n for h, n in zip(d.hi, img.shape, strict=True)) \
                or min(d.lo) < 0:
            raise DistortionError(f"distortion box {d.lo}..{d.hi} does not fit an image of shape "
                                  f"{img.shape}; records must come from an image of this shape")
        m = area_mask(d)
        # Distortions read the (partly distorted) current image, so records compose in order.
        vals = _apply_one(out, d)
        region = out[d.box]
        region[m] = vals[m]
        ids[d.box][m] = i + 1
    return out, ids


# ============================================================================ sampling
def _overlaps(lo: Sequence[int], hi: Sequence[int],
              boxes: Sequence[tuple[Sequence[int], Sequence[int]]]) -> bool:
    return any(all(a < h2 and lo2 < b for a, b, lo2, h2 in zip(lo, hi, blo, bhi, strict=True))
               for blo, bhi in boxes)


def _sample_box(rng: np.random.Generator, shape: Sequence[int], size_frac: tuple[float, float],
                taken: list[tuple[tuple[int, ...], tuple[int, ...]]]
                ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    for _ in range(PLACEMENT_TRIES):
        size = [max(MIN_EDGE_VOX, int(round(rng.uniform(*size_frac) * n))) for n in shape]
        size = [min(s, n) for s, n in zip(size, shape, strict=True)]
        lo = tuple(int(rng.integers(0, n - s + 1)) for s, n in zip(size, shape, strict=True))
        hi = tuple(a + s for a, s in zip(lo, size, strict=True))
        if not _overlaps(lo, hi, taken):
            return lo, hi
    return None


def _uniform_away(rng: np.random.Generator, lo: float, hi: float, centre: float,
                  min_change: float) -> float:
    """Uniform in ``[lo, hi]`` but at least ``min_change`` away from ``centre``."""
    for _ in range(100):
        v = float(rng.uniform(lo, hi))
        if abs(v - centre) >= min_change:
            return v
    return hi  # pragma: no cover


def _sample_params(kind: str, rng: np.random.Generator, shape: Sequence[int], lo: Sequence[int],
                   hi: Sequence[int], taken: list[tuple[tuple[int, ...], tuple[int, ...]]]
                   ) -> dict[str, Any] | None:
    seed = int(rng.integers(0, 2**31 - 1))
    if kind == "noise":
        return {"sigma": float(rng.uniform(*NOISE_SIGMA)), "seed": seed}
    if kind == "blur":
        return {"sigma_vox": float(rng.uniform(*BLUR_SIGMA_VOX))}
    if kind == "intensity":
        return {"scale": _uniform_away(rng, *INTENSITY_SCALE, 1.0, INTENSITY_MIN_CHANGE),
                "shift": float(rng.uniform(*INTENSITY_SHIFT)),
                "gamma": float(np.exp(_uniform_away(
                    rng, float(np.log(INTENSITY_GAMMA[0])), float(np.log(INTENSITY_GAMMA[1])),
                    0.0, INTENSITY_MIN_CHANGE)))}
    if kind == "shuffle":
        return {"block": int(rng.integers(SHUFFLE_BLOCK_VOX[0], SHUFFLE_BLOCK_VOX[1] + 1)),
                "seed": seed}
    if kind == "swap":
        size = [h - a for a, h in zip(lo, hi, strict=True)]
        for _ in range(PLACEMENT_TRIES):
            src = [int(rng.integers(0, n - s + 1)) for s, n in zip(size, shape, strict=True)]
            src_hi = [a + s for a, s in zip(src, size, strict=True)]
            if not _overlaps(src, src_hi, [(tuple(lo), tuple(hi))]):
                return {"source_lo": src}
        return None
    if kind == "mask":
        return {"value": float(rng.uniform(*MASK_VALUE))}
    if kind == "ghost":
        axis = int(rng.integers(0, len(shape)))
        n = int(shape[axis])
        shift = max(2, int(round(rng.uniform(*GHOST_SHIFT_FRAC) * n)))
        return {"axis": axis, "shift": shift * int(rng.choice([-1, 1])),
                "weight": float(rng.uniform(*GHOST_WEIGHT))}
    raise DistortionError(f"unknown distortion type {kind!r}")  # pragma: no cover


def sample_distortions(shape: Sequence[int], rng: np.random.Generator, *,
                       n_areas: tuple[int, int] = (1, 3),
                       kinds: Sequence[str] = DISTORTION_TYPES,
                       shapes: Sequence[str] = MASK_SHAPES,
                       size_frac: tuple[float, float] = SIZE_FRAC) -> list[Distortion]:
    """Draw non-overlapping distorted areas for an image of ``shape``.

    Parameters
    ----------
    shape : sequence of int
        Image shape (2 or 3 axes), voxels.
    rng : numpy.random.Generator
        The only source of randomness; the records hold every value drawn.
    n_areas : (int, int)
        Inclusive range of the number of areas.
    kinds : sequence of str
        Types to draw from (uniformly).
    shapes : sequence of str
        Area shapes to draw from (uniformly); ``("box",)`` for rectangular areas only.
    size_frac : (float, float)
        Range of each box edge as a fraction of the image side.

    Returns
    -------
    list of Distortion
        Possibly fewer than asked when the image is too small to place them apart.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (2, 3) or min(shape) < MIN_EDGE_VOX:
        raise DistortionError(f"image shape {shape} must have 2 or 3 axes of at least "
                              f"{MIN_EDGE_VOX} voxels")
    bad = [k for k in kinds if k not in DISTORTION_TYPES] + \
        [s for s in shapes if s not in MASK_SHAPES]
    if bad or not kinds or not shapes:
        raise DistortionError(f"unknown or empty distortion kinds/shapes {bad or [kinds, shapes]};"
                              f" kinds: {DISTORTION_TYPES}, shapes: {MASK_SHAPES}")
    n = int(rng.integers(n_areas[0], n_areas[1] + 1))
    taken: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    out: list[Distortion] = []
    for _ in range(n):
        placed = _sample_box(rng, shape, size_frac, taken)
        if placed is None:
            break
        lo, hi = placed
        kind = str(kinds[int(rng.integers(0, len(kinds)))])
        params = _sample_params(kind, rng, shape, lo, hi, taken)
        if params is None:
            continue
        area = str(shapes[int(rng.integers(0, len(shapes)))])
        if area == "blob":
            params["mask_seed"] = int(rng.integers(0, 2**31 - 1))
        taken.append((lo, hi))
        out.append(Distortion(kind, lo, hi, area, params))
    return out
