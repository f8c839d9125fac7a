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
from dataclasses import dataclass, field
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
NET_CLASSES: dict[int, str] = {0: "background", 1: "vertebral body", 2: "sacrum (S1 body)",
                               3: "intervertebral disc", 4: "spinal cord", 5: "CSF"}
#: Network class values.
BODY, SACRUM, DISC, CORD, CSF = 1, 2, 3, 4, 5
#: Number of network classes.
N_CLASSES = len(NET_CLASSES)
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
#: Partially labelled training sources beyond the body exams (file paths under
#: ``<shared data>/spine``). None of them is read by the lumbar benchmark.
DISC_EXAMS: tuple[tuple[str, str], ...] = (("ivd_discs/exam11_img.nii.gz",
                                            "ivd_discs/exam11_gt.nii.gz"),)
CORD_EXAMS: tuple[tuple[str, str], ...] = (
    ("sct/sct_testing_data/t2/t2.nii.gz", "sct/sct_testing_data/t2/t2_seg-manual.nii.gz"),
    ("sct/sct_testing_data/t1/t1w.nii.gz", "sct/sct_testing_data/t1/t1w_seg-manual.nii.gz"))
#: The U2AD file and its slice keys. The healthy (public) slices carry bodies and discs over a
#: short stretch only and no cord; the clinical (private) ones carry the full C2-T1 column.
U2AD_FILE = "u2ad_cervical_slices/u2ad_samples.npz"
U2AD_KEYS: tuple[str, ...] = ("public_1", "public_2", "public_3", "private_1", "private_2",
                              "private_3")
#: Two-fold split of the U2AD slices: the model of fold "a" is trained on these slices and is
#: scored on the other four; the fold "b" model on the complement (each clinical slice is
#: scored once, by the model that never saw it). The shipped model is fold "a".
U2AD_FOLDS: dict[str, tuple[str, ...]] = {"a": ("private_1", "private_2"),
                                          "b": ("private_3",), "none": ()}
#: U2AD array values -> network classes (the arrays: 2 = bodies, 1 = discs, see
#: :data:`mskmri.labels.U2AD`; 6 = hyperintensity inside the cord; 5 and 7 undocumented).
U2AD_TO_NET: dict[int, int] = {0: 0, 1: DISC, 2: BODY, 3: CORD, 4: CSF, 5: IGNORE, 6: CORD,
                               7: IGNORE}
#: Background pixels this close (mm) to a labelled cord/CSF pixel are ignored in U2AD
#: targets: the CSF label there covers only part of the canal.
U2AD_CANAL_IGNORE_MM = 3.0
#: A U2AD cord label counts as complete (background there is "not cord") when it spans at
#: least this fraction of the labelled bodies' S-I extent; otherwise cord is positive-only.
U2AD_FULL_CORD_FRACTION = 0.7


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
    labelled : (K,) bool ndarray
        Network classes this exam labels everywhere in its band (background pixels there are
        "none of these"); a class not labelled may hide under background (marginal loss).
        Default: background, body and sacrum (the body exams).
    """

    name: str
    image: np.ndarray
    target: np.ndarray
    gt: np.ndarray
    labelled: np.ndarray = field(default_factory=lambda: _labelled((BODY, SACRUM)))


def _labelled(classes: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(N_CLASSES, bool)
    out[0] = True
    out[list(classes)] = True
    return out


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


def _band_ignore(target: np.ndarray, labelled_rows: np.ndarray) -> np.ndarray:
    """Set rows (axis 1) beyond ``labelled_rows``' extent +- the band margin to IGNORE."""
    rows_any = np.nonzero(labelled_rows)[0]
    margin = int(round(LABEL_BAND_MARGIN_MM / INPLANE_SPACING_MM))
    top, bottom = rows_any[0] - margin, rows_any[-1] + margin
    target[:, : max(top, 0), :] = IGNORE
    target[:, bottom + 1:, :] = IGNORE
    return target


def load_partial_exam(data_dir: str | Path, image_rel: str, mask_rel: str,
                      net_class: int) -> Exam:
    """A 3-D exam that labels one class only (discs or cord), on the canonical grid.

    The mask (any value > 0) becomes ``net_class``; rows beyond its S-I extent +-
    :data:`LABEL_BAND_MARGIN_MM` are ignored, and every other class may hide under background.
    """
    from mskmri.io import read, read_labels

    base = Path(data_dir) / "spine"
    img = to_canonical(read(base / image_rel))
    gt = to_canonical(read_labels(base / mask_rel, strict=False))
    if img.shape != gt.shape:
        raise GeometryError(f"{base / image_rel} and {base / mask_rel} have different grids")
    fg = np.asarray(gt.array) > 0
    target = np.where(fg, net_class, 0).astype(np.uint8)
    target = _band_ignore(target, np.asarray(fg.any(axis=(0, 2))))
    return Exam(image_rel, normalise(img.array), target, np.asarray(gt.array),
                _labelled((net_class,)))


def u2ad_target(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Network target and labelled classes of one U2AD slice (see :data:`U2AD_TO_NET`).

    Parameters
    ----------
    labels : (H, W) uint8 ndarray
        U2AD values, rows S->I, columns A->P, 1 mm.

    Returns
    -------
    target : (H, W) uint8 ndarray
        Rows beyond the bodies/discs' extent +- the band margin, background within
        :data:`U2AD_CANAL_IGNORE_MM` of cord/CSF and the undocumented values are IGNORE.
    labelled : (K,) bool ndarray
        Body, disc, sacrum (absent from the neck), CSF (outside the ignored ring) always; cord
        only when its label spans :data:`U2AD_FULL_CORD_FRACTION` of the bodies' extent.
    """
    from scipy import ndimage

    lut = np.zeros(256, np.uint8)
    for k, v in U2AD_TO_NET.items():
        lut[k] = v
    target = lut[np.asarray(labels, np.uint8)]
    canal = (target == CORD) | (target == CSF)
    if canal.any():
        ring = ndimage.distance_transform_edt(~canal) <= U2AD_CANAL_IGNORE_MM / INPLANE_SPACING_MM
        target[ring & (target == 0)] = IGNORE
    column = (target == BODY) | (target == DISC)
    target = _band_ignore(target[None], column.any(axis=1))[0]
    classes = [BODY, SACRUM, DISC, CSF]
    rows_b = np.nonzero(column.any(axis=1))[0]
    rows_c = np.nonzero((target == CORD).any(axis=1))[0]
    if rows_c.size and rows_b.size and (np.ptp(rows_c) + 1) >= U2AD_FULL_CORD_FRACTION * (
            np.ptp(rows_b) + 1):
        classes.append(CORD)
    return target, _labelled(tuple(classes))


def load_u2ad(data_dir: str | Path, keys: tuple[str, ...]) -> list[Exam]:
    """U2AD slices as one-slice exams ``(1, H, W)`` (already 1 mm, rows S->I, columns A->P)."""
    if not keys:
        return []
    npz = np.load(Path(data_dir) / "spine" / U2AD_FILE)
    out = []
    for key in keys:
        target, labelled = u2ad_target(npz[f"{key}_labels"])
        out.append(Exam(f"u2ad/{key}", normalise(npz[f"{key}_img"])[None], target[None],
                        np.asarray(npz[f"{key}_labels"])[None], labelled))
    return out


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


__all__ = ["CANONICAL_CODES", "INPLANE_SPACING_MM", "NET_CLASSES", "N_CLASSES", "SPLIT",
           "U2AD_FOLDS", "Exam", "binary_dice", "label_band", "load_exam", "load_partial_exam",
           "load_split", "load_u2ad", "normalise", "slice_axis", "to_canonical", "u2ad_target"]
