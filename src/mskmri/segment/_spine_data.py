"""Spine segmentation data: canonical sagittal grid, normalisation and the fixed exam split.

Torch-free: used by training (:mod:`mskmri.segment.spine_train`), inference
(:mod:`mskmri.segment.spine`) and the benchmark.

Canonical grid: the volume is reoriented (no interpolation) to axis codes
:data:`CANONICAL_CODES` = ``("R", "I", "P")`` -- axis 0 runs left to right (one sagittal slice
per index), axis 1 superior to inferior, axis 2 anterior to posterior -- and resampled in-plane
to :data:`INPLANE_SPACING_MM`; the slice spacing is kept. Network input = one sagittal slice
``(S-I, A-P)`` normalised by :func:`normalise`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mskmri.errors import DimensionError, GeometryError
from mskmri.volume import Volume

log = logging.getLogger(__name__)

#: Axis codes of the canonical grid: slices along L-R, rows S->I, columns A->P.
CANONICAL_CODES: tuple[str, str, str] = ("R", "I", "P")
#: In-plane pixel size of the network input (mm).
INPLANE_SPACING_MM = 1.0
#: Intensity percentiles mapped to 0 and 1 (clipped outside).
NORM_PERCENTILES: tuple[float, float] = (0.5, 99.5)
#: Largest angle (deg) between the slice normal and the patient's L-R axis for sagittal data.
MAX_SAGITTAL_TILT_DEG = 30.0
#: Class channels of the network.
NET_CLASSES: dict[int, str] = {0: "background", 1: "vertebral body", 2: "sacrum (S1 body)"}
#: Loss ignore value in training targets.
IGNORE = 255
#: Rows (mm) kept beyond the labelled S-I extent of a partially labelled exam (within the disc).
LABEL_BAND_MARGIN_MM = 3.0

#: Fixed split by exam (never changed after the first training run).
SPLIT: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {"myosegmentum": ("exam01", "exam02", "exam03", "exam04", "exam05", "exam06",
                               "exam07", "exam08"),
              "chu2015": ("exam02", "exam03", "exam07", "exam08")},
    "validation": {"myosegmentum": ("exam09", "exam10"), "chu2015": ("exam10",)},
    "test": {"myosegmentum": ("exam11", "exam12", "exam13", "exam14"),
             "chu2015": ("exam11", "exam12")},
}
#: Data folders under ``<shared data>/spine``.
SOURCE_DIRS: dict[str, str] = {"myosegmentum": "myosegmentum_vertebral_bodies",
                               "chu2015": "chu2015_vertebral_bodies"}


def slice_axis(vol: Volume) -> int:
    """Index of the array axis closest to the patient's left-right axis.

    Raises :class:`GeometryError` when the slices are not sagittal (the through-plane axis,
    i.e. the axis with the largest spacing, is not L-R) -- e.g. axial-only data.
    """
    vol.require_geometry("spine segmentation (sagittal slices are needed)")
    direction = vol.direction  # columns = world direction of each array axis
    lr_axis = int(np.argmax(np.abs(direction[0, :])))
    tilt = float(np.degrees(np.arccos(min(1.0, abs(direction[0, lr_axis])))))
    spacing = np.asarray(vol.spacing)
    through = int(np.argmax(spacing)) if spacing.max() > 1.2 * np.median(spacing) else lr_axis
    if through != lr_axis or tilt > MAX_SAGITTAL_TILT_DEG:
        codes = "".join(vol.orientation)
        raise GeometryError(
            f"spine segmentation needs sagittal slices, but this image's slice axis is not "
            f"left-right (orientation {codes}, spacing {tuple(round(s, 2) for s in spacing)} mm): "
            "give the sagittal T1/T2 series of the exam")
    return lr_axis


def to_canonical(vol: Volume, *, order: int | None = None) -> Volume:
    """Reorient to :data:`CANONICAL_CODES` and resample in-plane to 1 mm (slice spacing kept).

    Parameters
    ----------
    vol : Volume or LabelVolume
        Sagittal input (see :func:`slice_axis`); labels are resampled nearest-neighbour.
    order : int, optional
        Spline order (default: 1 for images, 0 for label maps).

    Returns
    -------
    Volume
        ``(n_slices, S-I rows, A-P columns)`` at ``(slice spacing, 1, 1)`` mm.
    """
    slice_axis(vol)
    can = vol.reorient(CANONICAL_CODES)
    sp = can.spacing
    target = (sp[0], INPLANE_SPACING_MM, INPLANE_SPACING_MM)
    if np.allclose(sp[1:], target[1:], atol=1e-3) and _axis_aligned(can):
        return can
    return can.resample(target, order=order)


def _axis_aligned(vol: Volume) -> bool:
    d = np.abs(vol.direction)
    return bool(np.allclose(d, np.round(d), atol=1e-4))


def normalise(array: np.ndarray) -> np.ndarray:
    """Map the :data:`NORM_PERCENTILES` of the non-zero voxels to 0 and 1 (float32, clipped).

    Parameters
    ----------
    array : ndarray
        Image intensities (any shape).

    Returns
    -------
    ndarray
        float32 of the same shape in [0, 1].
    """
    arr = np.asarray(array, dtype=np.float32)
    vals = arr[arr > 0] if np.any(arr > 0) else arr.ravel()
    lo, hi = np.percentile(vals, NORM_PERCENTILES)
    if not hi > lo:
        raise DimensionError("the image is constant: nothing to segment")
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


@dataclass
class Exam:
    """One labelled exam on the canonical grid.

    Attributes
    ----------
    name : str
        ``"<source>/<exam>"``.
    image : (L, H, W) float32 ndarray
        Normalised image.
    target : (L, H, W) uint8 ndarray
        0 background, 1 body, 2 sacrum (S1), :data:`IGNORE` outside the labelled S-I band.
    gt : (L, H, W) int ndarray
        The manual label map (source values) on the canonical grid.
    """

    name: str
    image: np.ndarray
    target: np.ndarray
    gt: np.ndarray


def _target(source: str, gt: np.ndarray) -> np.ndarray:
    """Training target with the unlabelled S-I ends set to :data:`IGNORE` (canonical grid)."""
    target = (gt > 0).astype(np.uint8)
    if source == "chu2015":
        # the lowest instance is S1 in all 7 exams (labels.CHU2015); order by centroid row
        ids = [int(v) for v in np.unique(gt) if v]
        rows = {v: float(np.nonzero(gt == v)[1].mean()) for v in ids}
        s1 = max(ids, key=lambda v: rows[v])
        target[gt == s1] = 2
    rows_any = np.nonzero(gt.any(axis=(0, 2)))[0]
    margin = int(round(LABEL_BAND_MARGIN_MM / INPLANE_SPACING_MM))
    top, bottom = rows_any[0] - margin, rows_any[-1] + margin
    target[:, : max(top, 0), :] = IGNORE
    target[:, bottom + 1:, :] = IGNORE
    return target


def label_band(gt: np.ndarray) -> slice:
    """Rows (S-I, canonical grid) of the labelled extent +- :data:`LABEL_BAND_MARGIN_MM`."""
    rows_any = np.nonzero(gt.any(axis=(0, 2)))[0]
    margin = int(round(LABEL_BAND_MARGIN_MM / INPLANE_SPACING_MM))
    return slice(max(int(rows_any[0]) - margin, 0), int(rows_any[-1]) + margin + 1)


def exam_paths(data_dir: str | Path, source: str, exam: str) -> tuple[Path, Path]:
    """Image and manual-mask paths of one exam under ``<data_dir>/spine``."""
    base = Path(data_dir) / "spine" / SOURCE_DIRS[source]
    return base / f"{exam}_img.nii.gz", base / f"{exam}_gt.nii.gz"


def load_exam(data_dir: str | Path, source: str, exam: str) -> Exam:
    """Read one labelled exam onto the canonical grid."""
    from mskmri.io import read, read_labels

    img_p, gt_p = exam_paths(data_dir, source, exam)
    img = to_canonical(read(img_p))
    gt = to_canonical(read_labels(gt_p, strict=False))
    if img.shape != gt.shape:
        raise GeometryError(f"{img_p} and {gt_p} have different grids")
    return Exam(f"{source}/{exam}", normalise(img.array), _target(source, gt.array),
                np.asarray(gt.array))


def load_split(data_dir: str | Path, part: str) -> list[Exam]:
    """All exams of one part of :data:`SPLIT` (``"train"``, ``"validation"``, ``"test"``)."""
    return [load_exam(data_dir, src, ex) for src, exams in SPLIT[part].items() for ex in exams]


def binary_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(p, t).sum()) / denom


__all__ = ["CANONICAL_CODES", "INPLANE_SPACING_MM", "NET_CLASSES", "SPLIT", "Exam",
           "binary_dice", "label_band", "load_exam", "load_split", "normalise", "slice_axis",
           "to_canonical"]
