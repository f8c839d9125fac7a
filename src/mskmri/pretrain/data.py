"""Unlabelled images for pretraining: reading, slicing, normalising, and the pretext dataset.

Geometry is handled explicitly (never guessed):

- ``dims=2``: every 3-D volume is cut into 2-D slices across its slice axis (the axis of
  largest spacing; for near-isotropic volumes the left-right axis, i.e. sagittal slices) and
  each slice is resampled in-plane to ``spacing_mm``; a 2-D image (one slice) is used as one
  slice. An image without geometry cannot be resampled: with ``unknown_geometry="native"``
  it is used at its own pixel grid (logged and recorded), with ``"error"`` (default) it stops
  the run with a message naming the file.
- ``dims=3``: volumes are resampled to isotropic ``spacing_mm``; a 2-D image in the list is an
  error (mixing would silently train a 3-D network on flat volumes): pretrain with ``--dims 2``
  or leave the slices out.

Every image gets a record (path, shape, spacing, how it was used), written into the card.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from mskmri.errors import MskMriError
from mskmri.pretrain.distortions import Distortion, apply_distortions, sample_distortions

log = logging.getLogger(__name__)

#: Intensity percentiles mapped to 0 and 1 by :func:`normalise`.
NORM_PERCENTILES = (0.5, 99.5)
#: Upper clip after normalisation (bright fluid/fat may exceed the 99.5th percentile).
NORM_CLIP = 1.5
#: Spacings within this relative spread count as isotropic (slice axis = left-right).
ISOTROPIC_TOLERANCE = 0.1
#: A slice is kept when at least this fraction of it is above :data:`FOREGROUND_LEVEL`.
MIN_FOREGROUND_FRACTION = 0.05
#: Normalised level above which a pixel counts as foreground (not air).
FOREGROUND_LEVEL = 0.1
#: Files of a folder looked at to tell a DICOM folder (read as series) from a folder of files.
DICOM_PROBE_FILES = 20
#: Most distorted areas per sample (padding size of the box tensors).
MAX_AREAS = 3


class PretrainDataError(MskMriError):
    """Images that cannot be used for pretraining as asked."""


def normalise(array: np.ndarray) -> np.ndarray:
    """Map the 0.5th..99.5th intensity percentiles to 0..1 (clipped to 0..``NORM_CLIP``)."""
    a = np.asarray(array, np.float32)
    lo, hi = np.percentile(a, NORM_PERCENTILES)
    if not hi > lo:
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0.0, NORM_CLIP).astype(np.float32)


def slice_axis(spacing: Sequence[float], orientation: Sequence[str]) -> int:
    """Axis to cut 2-D slices across: the largest spacing, or left-right when isotropic."""
    sp = np.asarray(spacing, float)
    if sp.max() - sp.min() <= ISOTROPIC_TOLERANCE * sp.min():
        lr = [i for i, c in enumerate(orientation) if c in ("L", "R")]
        return lr[0] if lr else int(np.argmax(sp))
    return int(np.argmax(sp))


def volume_slices(array: np.ndarray, spacing: Sequence[float] | None, axis: int,
                  spacing_mm: float | None, *, order: int = 1) -> np.ndarray:
    """``(n_slices, H, W)`` slices across ``axis``, resampled in-plane to ``spacing_mm``.

    ``spacing`` None (unknown geometry) or ``spacing_mm`` None keeps the pixel grid.
    ``order`` 0 for label maps.
    """
    arr = np.moveaxis(np.asarray(array), axis, 0)
    if spacing is not None and spacing_mm is not None:
        sp = [s for i, s in enumerate(spacing) if i != axis]
        zoom = (1.0, sp[0] / spacing_mm, sp[1] / spacing_mm)
        if any(abs(z - 1.0) > 1e-3 for z in zoom):
            arr = ndimage.zoom(arr.astype(np.float32) if order else arr, zoom, order=order,
                               grid_mode=True, mode="grid-constant" if order == 0 else "nearest")
    return arr


@dataclass
class ImageRecord:
    """How one input image was used (written into the model card)."""

    path: str
    shape: list[int]
    spacing_mm: list[float] | None
    geometry: str
    used_as: str
    n_samples: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dict(self.__dict__)


@dataclass
class ImageSet:
    """Normalised pretraining images and their records."""

    images: list[np.ndarray] = field(default_factory=list)
    records: list[ImageRecord] = field(default_factory=list)


def _image_sources(paths: Sequence[str | Path]) -> list[tuple[Path, str | None]]:
    """``(path, DICOM series selector or None)`` of every image under ``paths``."""
    from mskmri.io import IMAGE_EXTENSIONS
    from mskmri.io.dicom import is_dicom_file, list_series

    out: list[tuple[Path, str | None]] = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.is_file())
            if any(is_dicom_file(f) for f in inside[:DICOM_PROBE_FILES]):
                for info in list_series(p):
                    out += [(p, st.selector) for st in info.stacks if st.problem is None]
                continue
            out += [(f, None) for f in sorted(p.iterdir()) if f.is_file()
                    and any(f.name.lower().endswith(e) for e in IMAGE_EXTENSIONS)
                    and not any(t in f.name.lower() for t in ("_gt", "label", "seg"))]
        elif p.exists():
            out.append((p, None))
        else:
            raise PretrainDataError(f"no image at {p}; give existing image files or folders")
    if not out:
        raise PretrainDataError(f"no image files found in {[str(p) for p in paths]}")
    return out


def collect_images(paths: Sequence[str | Path], *, dims: int, spacing_mm: float | None,
                   unknown_geometry: str = "error") -> ImageSet:
    """Read images (files or folders of images) into normalised 2-D slices or 3-D volumes.

    Parameters
    ----------
    paths : sequence of path
        Image files (any format :func:`mskmri.io.read` reads) or folders. A folder holding
        DICOM files is read as DICOM (searched recursively): every series and every stack of
        it (each echo of a multi-echo series) is one image. Any other folder contributes every
        image file inside (non-recursive; files named ``*_gt*``/``*label*``/``*seg*`` are
        skipped: pretraining uses images only).
    dims : {2, 3}
        2-D slices or 3-D volumes (see the module docstring).
    spacing_mm : float or None
        Target in-plane (2-D) or isotropic (3-D) spacing, mm; None keeps each grid.
    unknown_geometry : {"error", "native"}
        What to do with an image without geometry.

    Returns
    -------
    ImageSet
    """
    from mskmri.io import read

    if dims not in (2, 3):
        raise PretrainDataError(f"--dims must be 2 or 3, not {dims}")
    if unknown_geometry not in ("error", "native"):
        raise PretrainDataError(f"unknown_geometry must be 'error' or 'native', not "
                                f"{unknown_geometry!r}")
    files = _image_sources(paths)
    out = ImageSet()
    flat: list[str] = []
    for f, series in files:
        vol = read(f, series=series)
        if series is not None:
            f = Path(f"{f} [series {series}]")
        is_2d = bool(vol.meta.get("was_2d")) or 1 in vol.shape
        if is_2d:
            flat.append(str(f))
        if not vol.geometry_known and unknown_geometry == "error":
            raise PretrainDataError(
                f"{f} has no geometry (no voxel spacing), so it cannot be resampled to "
                f"{spacing_mm} mm; pass --unknown-geometry native to use it at its pixel grid "
                "or leave it out")
        spacing = vol.spacing if vol.geometry_known else None
        geom = "known" if vol.geometry_known else "unknown (used at its pixel grid)"
        if dims == 3:
            if is_2d:
                continue
            arr = normalise(vol.array)
            if spacing is not None and spacing_mm is not None:
                arr = ndimage.zoom(arr, [s / spacing_mm for s in spacing], order=1)
            out.images.append(arr.astype(np.float32))
            out.records.append(ImageRecord(str(f), list(vol.shape), list(spacing or []) or None,
                                           geom, "3-D volume", 1))
            continue
        axis = int(np.argmin(vol.shape)) if is_2d else slice_axis(vol.spacing, vol.orientation)
        arr = normalise(volume_slices(vol.array, spacing, axis, spacing_mm))
        keep = [s for s in arr if (s > FOREGROUND_LEVEL).mean() >= MIN_FOREGROUND_FRACTION]
        out.images += keep
        out.records.append(ImageRecord(str(f), list(vol.shape), list(spacing or []) or None,
                                       geom, "2-D slice" if is_2d else f"2-D slices across axis "
                                       f"{axis}", len(keep)))
    if dims == 3 and flat:
        raise PretrainDataError(
            f"{len(flat)} of the images are 2-D slices (first: {flat[0]}) but --dims 3 asks for "
            "3-D pretraining; pretrain with --dims 2 (slices and volumes mix there) or leave "
            "the slices out")
    if not out.images:
        raise PretrainDataError("every image was empty after normalisation; check the inputs")
    log.info("pretraining on %d %s from %d images", len(out.images),
             "2-D slices" if dims == 2 else "3-D volumes", len(files))
    return out


def crop_or_pad(image: np.ndarray, size: Sequence[int], rng: np.random.Generator,
                contains: Sequence[int] | None = None) -> tuple[np.ndarray, tuple[int, ...]]:
    """A random ``size`` window of ``image`` (zero-padded where the image is smaller).

    Parameters
    ----------
    image : ndarray
        Any rank.
    size : sequence of int
        Window shape (one entry per axis of ``image``), voxels.
    rng : numpy.random.Generator
        Source of the window start.
    contains : sequence of int or None
        A voxel index the window must include: the start is drawn uniformly among the
        windows that contain it (None: among all windows).

    Returns
    -------
    (ndarray, tuple of int)
        The window (float32, shape ``size``) and its start (negative where padded).
    """
    starts = []
    out = np.zeros(tuple(size), np.float32)
    src, dst = [], []
    point = [None] * image.ndim if contains is None else [int(c) for c in contains]
    for n, s, c in zip(image.shape, size, point, strict=True):
        if n >= s:
            lo, hi = (0, n - s) if c is None else (max(0, c - s + 1), min(n - s, c))
            st = int(rng.integers(lo, hi + 1))
        else:
            st = -int(rng.integers(0, s - n + 1))
        starts.append(st)
        a0, a1 = max(st, 0), min(st + s, n)
        src.append(slice(a0, a1))
        dst.append(slice(a0 - st, a1 - st))
    out[tuple(dst)] = image[tuple(src)]
    return out, tuple(starts)


def pretext_sample(image: np.ndarray, distortions: Sequence[Distortion]) -> dict[str, Any]:
    """Network input and targets of one image and its distortions (torch tensors).

    Keys: ``input``, ``target`` ``(1, *S)`` float32; ``area_ids`` ``(1, *S)`` int64;
    ``boxes`` ``(MAX_AREAS, 2D)`` float32 voxels; ``types`` ``(MAX_AREAS,)`` int64;
    ``valid`` ``(MAX_AREAS,)`` bool.
    """
    import torch

    d = image.ndim
    distorted, ids = apply_distortions(image, distortions[:MAX_AREAS])
    boxes = np.zeros((MAX_AREAS, 2 * d), np.float32)
    types = np.zeros(MAX_AREAS, np.int64)
    valid = np.zeros(MAX_AREAS, bool)
    for j, dd in enumerate(distortions[:MAX_AREAS]):
        # Box of the area as applied (the mask may not fill its box).
        where = np.nonzero(ids == j + 1)
        if not where[0].size:
            continue
        boxes[j] = [*[w.min() for w in where], *[w.max() + 1 for w in where]]
        types[j] = dd.type_index
        valid[j] = True
    return {"input": torch.from_numpy(distorted[None]),
            "target": torch.from_numpy(np.ascontiguousarray(image[None], np.float32)),
            "area_ids": torch.from_numpy(ids[None].astype(np.int64)),
            "boxes": torch.from_numpy(boxes), "types": torch.from_numpy(types),
            "valid": torch.from_numpy(valid)}


class PretextDataset:
    """Random crops of unlabelled images with freshly drawn distortions (a seeded dataset).

    Parameters
    ----------
    images : list of ndarray
        Normalised 2-D slices or 3-D volumes (one rank for all).
    patch : sequence of int
        Crop size, voxels (each a multiple of the network's size divisor).
    n_areas : (int, int)
        Range of distorted areas per sample (at most :data:`MAX_AREAS`).

    ``sample(index, rng)`` draws crop, flips and distortions from ``rng`` only, so
    :func:`mskmri.nn.train.fit` reproduces every sample from the seed.
    """

    def __init__(self, images: Sequence[np.ndarray], patch: Sequence[int],
                 n_areas: tuple[int, int] = (1, MAX_AREAS)) -> None:
        if not images:
            raise PretrainDataError("no images to pretrain on")
        ranks = {im.ndim for im in images}
        if ranks != {len(patch)}:
            raise PretrainDataError(f"images of rank {sorted(ranks)} do not fit a "
                                    f"{len(patch)}-D patch {list(patch)}")
        self.images = list(images)
        self.patch = tuple(int(p) for p in patch)
        self.n_areas = (int(n_areas[0]), min(int(n_areas[1]), MAX_AREAS))

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        """One pretext sample (see :func:`pretext_sample`)."""
        img, _ = crop_or_pad(self.images[index], self.patch, rng)
        for a in range(img.ndim):
            if rng.random() < 0.5:
                img = np.flip(img, axis=a)
        img = np.ascontiguousarray(img)
        ds = sample_distortions(img.shape, rng, n_areas=self.n_areas)
        return pretext_sample(img, ds)
