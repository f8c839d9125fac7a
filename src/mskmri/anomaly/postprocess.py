"""Post-processing of an anomaly map into a bone-marrow-lesion mask (numpy/scipy/cc3d only).

Every step is a named function with its parameters in mm / mL and is recorded, in order,
by :func:`postprocess` (``PostprocessResult.steps``):

1. ``roi``: restrict to the bone (femur) and exclude its cortical rim: voxels within
   ``rim_mm`` of the bone surface are dropped (Euclidean distance with the voxel spacing);
2. ``smooth``: Gaussian smoothing of the (noise-normalised) residual, sigma in mm;
3. ``threshold``: residual above a threshold; :func:`calibrate_threshold` sets it on
   lesion-free validation knees to a stated voxel false-positive rate;
4. ``opening``: binary opening with a ball of ``opening_mm`` (in-plane voxels at least 1);
5. ``extent``: each component is cut to its core (voxels at or above ``extent_fraction``
   of the component's peak residual), so the partial-volume fringe that still clears the
   threshold is not counted as lesion;
6. ``components``: 3-D connected components (26-connectivity) of at least ``min_volume_ml``;
7. ``slices``: 3-D consistency: a component must span at least ``min_slices`` slices along
   the slice axis (the axis with the largest spacing; axis 0 on isotropic grids).

:func:`lesion_table` describes each lesion: volume (mL), bone, region (medial / lateral
condyle, trochlea, or shaft, from the femur's own geometry) and peak residual.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import cc3d
import numpy as np
from scipy import ndimage

from mskmri.errors import MskMriError

log = logging.getLogger(__name__)

#: Cortical rim excluded from the ROI, mm (cortex ~1 mm; chemical-shift / partial volume).
RIM_MM = 1.0
#: Gaussian smoothing of the residual, mm (sigma).
SMOOTH_SIGMA_MM = 0.7
#: Default threshold on the noise-normalised residual (z units) before calibration.
DEFAULT_THRESHOLD = 3.0
#: Opening radius, mm (0: no opening).
OPENING_MM = 0.7
#: Minimum lesion volume, mL (the smallest OAI lesions are ~0.01-0.05 mL).
MIN_VOLUME_ML = 0.02
#: Extent of a lesion: voxels of a component at or above this fraction of the component's
#: peak (smoothed) residual (0: the threshold alone). Chosen on validation knees among
#: 0-0.5 (benchmarks/results/bml_extent.json: inpainting Dice 0.75 at 0, 0.82 at 0.2).
EXTENT_FRACTION = 0.2
#: A lesion must span at least this many slices along the slice axis.
MIN_SLICES = 2
#: Voxel false-positive rate that :func:`calibrate_threshold` aims at by default.
TARGET_FPR = 1e-3
#: Connectivity of 3-D components.
CONNECTIVITY: Literal[26] = 26
#: Distal part of the femur holding condyles and trochlea, mm from its most distal voxel.
DISTAL_FEMUR_MM = 45.0
#: Share of the distal femur's anterior-posterior extent counted as trochlea (anterior part).
TROCHLEA_FRACTION = 0.4


class PostprocessError(MskMriError):
    """The anomaly map cannot be post-processed (shapes, spacing or parameters)."""


@dataclass(frozen=True)
class PostprocessConfig:
    """Parameters of every post-processing step (units in the names).

    Parameters
    ----------
    rim_mm : float
        Cortical rim excluded from the ROI, mm.
    smooth_sigma_mm : float
        Gaussian sigma, mm (0: no smoothing).
    threshold : float
        On the smoothed residual (z units for a noise-normalised residual).
    opening_mm : float
        Opening radius, mm (0: none).
    extent_fraction : float in [0, 1)
        Each component is cut to its voxels at or above this fraction of its peak value.
    min_volume_ml : float
        Smallest kept component, mL.
    min_slices : int
        Smallest number of slices a kept component spans along ``slice_axis``.
    slice_axis : int or None
        None: the axis with the largest spacing (axis 0 when isotropic).
    """

    rim_mm: float = RIM_MM
    smooth_sigma_mm: float = SMOOTH_SIGMA_MM
    threshold: float = DEFAULT_THRESHOLD
    opening_mm: float = OPENING_MM
    extent_fraction: float = EXTENT_FRACTION
    min_volume_ml: float = MIN_VOLUME_ML
    min_slices: int = MIN_SLICES
    slice_axis: int | None = None

    def __post_init__(self) -> None:
        for name in ("rim_mm", "smooth_sigma_mm", "opening_mm", "min_volume_ml"):
            if not float(getattr(self, name)) >= 0:
                raise PostprocessError(f"{name} must be >= 0, not {getattr(self, name)}")
        if not 0.0 <= float(self.extent_fraction) < 1.0:
            raise PostprocessError(f"extent_fraction must be in [0, 1), not "
                                   f"{self.extent_fraction}")
        if int(self.min_slices) < 1:
            raise PostprocessError(f"min_slices must be >= 1, not {self.min_slices}")
        if self.slice_axis is not None and self.slice_axis not in (0, 1, 2):
            raise PostprocessError(f"slice_axis must be 0, 1, 2 or None, not {self.slice_axis}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class PostprocessResult:
    """Output of :func:`postprocess`.

    Attributes
    ----------
    mask : (X, Y, Z) uint8
        Final lesion mask.
    roi : (X, Y, Z) bool
        Bone without its rim.
    smoothed : (X, Y, Z) float32
        Smoothed residual (0 outside the ROI).
    steps : list of dict
        Each step's name, parameters and voxels left after it.
    """

    mask: np.ndarray
    roi: np.ndarray
    smoothed: np.ndarray
    steps: list[dict[str, Any]] = field(default_factory=list)


def _spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim or not all(np.isfinite(s) and s > 0 for s in sp):
        raise PostprocessError(f"spacing must be {ndim} positive mm values, not {spacing}; "
                               "post-processing needs the voxel geometry")
    return sp


def slice_axis_of(spacing: Sequence[float]) -> int:
    """The axis with the largest spacing (the first one on ties)."""
    sp = np.asarray(spacing, dtype=float)
    return int(np.argmax(sp))


# ============================================================================ steps
def roi_without_rim(bone: np.ndarray, spacing: Sequence[float], rim_mm: float) -> np.ndarray:
    """Bone voxels farther than ``rim_mm`` from the bone surface.

    Parameters
    ----------
    bone : (X, Y, Z) array
        Bone mask (nonzero = bone).
    spacing : 3 floats, mm
    rim_mm : float
        The distance of a voxel centre to the nearest non-bone voxel centre must exceed this.

    Returns
    -------
    (X, Y, Z) bool
    """
    sp = _spacing(spacing, bone.ndim)
    b = np.asarray(bone) != 0
    if rim_mm <= 0 or not b.any():
        return b
    # pad so that bone touching the array edge still has a surface there
    dist = ndimage.distance_transform_edt(np.pad(b, 1), sampling=sp)[(slice(1, -1),) * b.ndim]
    return np.asarray(dist > rim_mm)


def smooth(residual: np.ndarray, spacing: Sequence[float], sigma_mm: float,
           roi: np.ndarray | None = None) -> np.ndarray:
    """Gaussian smoothing with ``sigma_mm`` converted per axis (normalised inside ``roi``).

    With a ROI, values outside it do not leak in: the result is
    ``G*(r * roi) / G*roi`` inside the ROI and 0 outside.
    """
    sp = _spacing(spacing, residual.ndim)
    r = np.asarray(residual, dtype=np.float32)
    if sigma_mm <= 0:
        return r if roi is None else np.where(roi, r, 0).astype(np.float32)
    sig = [sigma_mm / s for s in sp]
    if roi is None:
        return ndimage.gaussian_filter(r, sig).astype(np.float32)
    m = roi.astype(np.float32)
    num = ndimage.gaussian_filter(r * m, sig)
    den = ndimage.gaussian_filter(m, sig)
    out = np.where(roi & (den > 1e-6), num / np.maximum(den, 1e-6), 0.0)
    return out.astype(np.float32)


def threshold(values: np.ndarray, level: float, roi: np.ndarray | None = None) -> np.ndarray:
    """``values > level`` (inside ``roi`` when given)."""
    out = np.asarray(values) > level
    return out & roi if roi is not None else out


def opening(mask: np.ndarray, spacing: Sequence[float], radius_mm: float) -> np.ndarray:
    """Binary opening with an ellipsoidal ball of ``radius_mm`` (at least 1 voxel in-plane).

    Axes whose spacing exceeds the radius get a radius of 0 voxels there (a thick-slice
    axis is not opened across slices; :func:`keep_slices` handles it).
    """
    sp = _spacing(spacing, mask.ndim)
    m = np.asarray(mask, dtype=bool)
    if radius_mm <= 0 or not m.any():
        return m
    rad = [int(np.floor(radius_mm / s)) for s in sp]
    if max(rad) == 0:
        rad = [1 if s == min(sp) else 0 for s in sp]
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in rad)]
    ball = sum((g / max(r, 1e-9)) ** 2 if r > 0 else g * 0.0 for g, r in zip(grids, rad, strict=True)) <= 1.0
    return np.asarray(ndimage.binary_opening(m, structure=ball))


def lesion_extent(mask: np.ndarray, values: np.ndarray, fraction: float) -> np.ndarray:
    """Cut each 3-D component to its voxels at or above ``fraction`` of its peak value.

    A threshold near the noise floor finds a lesion; its extent is then measured where the
    residual is a sizeable part of the lesion's own peak, not wherever the partial-volume
    fringe still clears the noise (``fraction = 0.5`` is the half-maximum convention; the
    default :data:`EXTENT_FRACTION` was chosen on validation knees).

    Parameters
    ----------
    mask : (X, Y, Z) bool
        Components (26-connectivity).
    values : (X, Y, Z) float
        The (smoothed) residual the mask was thresholded from.
    fraction : float in [0, 1)
        0 returns ``mask`` unchanged.

    Returns
    -------
    (X, Y, Z) bool
        A subset of ``mask``.
    """
    m = np.asarray(mask, dtype=bool)
    if fraction <= 0 or not m.any():
        return m
    labels, n = cc3d.connected_components(m.astype(np.uint8), connectivity=CONNECTIVITY,
                                          return_N=True)
    v = np.asarray(values, dtype=np.float32)
    peaks = ndimage.maximum(v, labels, index=np.arange(n + 1))
    level = np.asarray(peaks, dtype=np.float32) * np.float32(fraction)
    level[0] = np.inf
    return m & (v >= level[labels])


def keep_components(mask: np.ndarray, spacing: Sequence[float], min_volume_ml: float,
                    min_slices: int = 1, slice_axis: int | None = None) -> np.ndarray:
    """Keep 3-D components of at least ``min_volume_ml`` spanning ``min_slices`` slices.

    Parameters
    ----------
    mask : (X, Y, Z) bool
    spacing : 3 floats, mm
    min_volume_ml : float
    min_slices : int
        Distinct indices along ``slice_axis`` a component must occupy.
    slice_axis : int or None
        None: :func:`slice_axis_of`.

    Returns
    -------
    (X, Y, Z) bool
    """
    sp = _spacing(spacing, mask.ndim)
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return m
    axis = slice_axis_of(sp) if slice_axis is None else int(slice_axis)
    labels, n = cc3d.connected_components(m.astype(np.uint8), connectivity=CONNECTIVITY,
                                          return_N=True)
    vox_ml = float(np.prod(sp)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    keep = np.zeros(n + 1, dtype=bool)
    slices = ndimage.find_objects(labels)
    for lab in range(1, n + 1):
        sl = slices[lab - 1]
        if sl is None:
            continue
        if counts[lab] * vox_ml < min_volume_ml:
            continue
        if min_slices > 1:
            sub = labels[sl] == lab
            other = tuple(a for a in range(m.ndim) if a != axis)
            occupied = int(np.count_nonzero(sub.any(axis=other)))
            if occupied < min_slices:
                continue
        keep[lab] = True
    return keep[labels]


# ============================================================================ pipeline
def postprocess(residual: np.ndarray, bone: np.ndarray, spacing: Sequence[float],
                config: PostprocessConfig | None = None) -> PostprocessResult:
    """Run every step on a residual map.

    Parameters
    ----------
    residual : (X, Y, Z) float
        Anomaly map (positive = brighter than expected), e.g. noise-normalised
        ``real - painted``.
    bone : (X, Y, Z) array
        Bone mask (nonzero = bone) in the same grid.
    spacing : 3 floats, mm
    config : PostprocessConfig

    Returns
    -------
    PostprocessResult
    """
    cfg = config or PostprocessConfig()
    res = np.asarray(residual, dtype=np.float32)
    b = np.asarray(bone)
    if res.shape != b.shape:
        raise PostprocessError(f"residual {res.shape} and bone mask {b.shape} differ in shape; "
                               "give both on the same grid")
    if res.ndim != 3:
        raise PostprocessError(f"post-processing needs a 3-D map, not {res.ndim}-D")
    sp = _spacing(spacing, 3)
    steps: list[dict[str, Any]] = []
    roi = roi_without_rim(b, sp, cfg.rim_mm)
    steps.append({"step": "roi", "rim_mm": cfg.rim_mm, "voxels": int(roi.sum())})
    sm = smooth(np.nan_to_num(res), sp, cfg.smooth_sigma_mm, roi)
    steps.append({"step": "smooth", "sigma_mm": cfg.smooth_sigma_mm})
    m = threshold(sm, cfg.threshold, roi)
    steps.append({"step": "threshold", "level": cfg.threshold, "voxels": int(m.sum())})
    m = opening(m, sp, cfg.opening_mm)
    steps.append({"step": "opening", "radius_mm": cfg.opening_mm, "voxels": int(m.sum())})
    m = lesion_extent(m, sm, cfg.extent_fraction)
    steps.append({"step": "extent", "fraction_of_peak": cfg.extent_fraction,
                  "voxels": int(m.sum())})
    axis = slice_axis_of(sp) if cfg.slice_axis is None else cfg.slice_axis
    m = keep_components(m, sp, cfg.min_volume_ml, 1, axis)
    steps.append({"step": "components", "min_volume_ml": cfg.min_volume_ml,
                  "connectivity": CONNECTIVITY, "voxels": int(m.sum())})
    m = keep_components(m, sp, 0.0, cfg.min_slices, axis)
    steps.append({"step": "slices", "min_slices": cfg.min_slices, "slice_axis": axis,
                  "voxels": int(m.sum())})
    return PostprocessResult(mask=m.astype(np.uint8), roi=roi, smoothed=sm, steps=steps)


def calibrate_threshold(residuals: Sequence[np.ndarray], bones: Sequence[np.ndarray],
                        spacings: Sequence[Sequence[float]], *, fpr: float = TARGET_FPR,
                        config: PostprocessConfig | None = None) -> float:
    """Threshold giving a voxel false-positive rate ``fpr`` on lesion-free knees.

    Each residual is restricted and smoothed exactly as in :func:`postprocess`; the pooled
    ROI values' ``1 - fpr`` quantile is the threshold (before opening and components, which
    only lower the final rate further).

    Parameters
    ----------
    residuals, bones : sequences of (X, Y, Z) arrays
        Anomaly maps and bone masks of lesion-free validation knees.
    spacings : sequence of 3 floats, mm
    fpr : float in (0, 1)
        Stated voxel false-positive rate inside the ROI.

    Returns
    -------
    float
    """
    if not 0.0 < fpr < 1.0:
        raise PostprocessError(f"fpr must be in (0, 1), not {fpr}")
    if not residuals or not (len(residuals) == len(bones) == len(spacings)):
        raise PostprocessError("calibration needs as many residuals, bone masks and spacings, "
                               "at least one of each")
    cfg = config or PostprocessConfig()
    pooled = []
    for r, b, sp in zip(residuals, bones, spacings, strict=True):
        roi = roi_without_rim(np.asarray(b), sp, cfg.rim_mm)
        sm = smooth(np.nan_to_num(np.asarray(r, dtype=np.float32)), sp, cfg.smooth_sigma_mm,
                    roi)
        pooled.append(sm[roi])
    vals = np.concatenate(pooled)
    if vals.size == 0:
        raise PostprocessError("the calibration knees have no ROI voxels (empty bone masks?)")
    level = float(np.quantile(vals, 1.0 - fpr))
    log.info("calibrated threshold %.4g at voxel FPR %.2g on %d knees (%d voxels)",
             level, fpr, len(residuals), vals.size)
    return level


def threshold_for_inplane(table: Sequence[Sequence[float]], inplane_mm: float) -> float:
    """Threshold for an image of in-plane spacing ``inplane_mm`` from a calibration table.

    The tail of a noise-normalised residual depends on the input's resolution (an image
    upsampled to the working grid has spatially correlated residuals), so thresholds are
    calibrated per in-plane matrix; between the calibrated spacings the threshold is
    interpolated linearly in ``log(spacing)``, and outside them the nearest one is used.

    Parameters
    ----------
    table : sequence of (inplane_mm, threshold)
        Calibrated points, any order; at least one.
    inplane_mm : float
        In-plane spacing of the input image, mm (> 0).

    Returns
    -------
    float
    """
    pts = sorted((float(a), float(b)) for a, b in table)
    if not pts or not all(np.isfinite(a) and a > 0 and np.isfinite(b) for a, b in pts):
        raise PostprocessError(f"a threshold table needs (spacing mm > 0, threshold) pairs, "
                               f"not {list(table)}")
    if not (np.isfinite(inplane_mm) and inplane_mm > 0):
        raise PostprocessError(f"in-plane spacing must be a positive number of mm, not "
                               f"{inplane_mm}")
    xs = np.log([a for a, _ in pts])
    ys = [b for _, b in pts]
    return float(np.interp(np.log(inplane_mm), xs, ys))


# ============================================================================ table
def femur_regions(femur: np.ndarray, affine: np.ndarray, *,
                  lateral_sign: float | None = None) -> np.ndarray:
    """Label femur voxels by region from the femur's own geometry.

    In world (RAS) coordinates: the distal femur is within :data:`DISTAL_FEMUR_MM` of its
    most inferior voxel; its anterior :data:`TROCHLEA_FRACTION` (of the anterior-posterior
    extent) is the trochlea, the rest the condyles, split medial / lateral at the median
    left-right position of the distal femur. Above the distal part: shaft.

    Parameters
    ----------
    femur : (X, Y, Z) array
    affine : (4, 4) voxel -> RAS mm
    lateral_sign : {+1, -1} or None
        Sign of the RAS x direction that points laterally (+1: lateral is to the patient's
        right, i.e. a right knee). None: condyles are not split into medial / lateral.

    Returns
    -------
    (X, Y, Z) uint8
        0 outside, 1 medial condyle, 2 lateral condyle, 3 trochlea, 4 shaft,
        5 condyle (side unknown); see :data:`REGION_NAMES`.
    """
    f = np.asarray(femur) != 0
    out = np.zeros(f.shape, dtype=np.uint8)
    idx = np.argwhere(f)
    if idx.size == 0:
        return out
    world = idx @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    x, y, z = world[:, 0], world[:, 1], world[:, 2]
    distal = z <= z.min() + DISTAL_FEMUR_MM
    y_lo, y_hi = y[distal].min(), y[distal].max()
    troch = distal & (y >= y_hi - TROCHLEA_FRACTION * (y_hi - y_lo))
    x_mid = float(np.median(x[distal]))
    region = np.full(len(idx), 4, dtype=np.uint8)
    region[troch] = 3
    cond = distal & ~troch
    if lateral_sign is None:
        region[cond] = 5
    else:
        lateral = (x - x_mid) * float(np.sign(lateral_sign)) > 0
        region[cond & lateral] = 2
        region[cond & ~lateral] = 1
    out[tuple(idx.T)] = region
    return out


#: Region code -> name (:func:`femur_regions`).
REGION_NAMES = {1: "medial condyle", 2: "lateral condyle", 3: "trochlea", 4: "shaft",
                5: "condyle"}


def lesion_table(mask: np.ndarray, residual: np.ndarray, regions: np.ndarray,
                 spacing: Sequence[float], *, bone: str = "femur") -> list[dict[str, Any]]:
    """One row per lesion (3-D component of ``mask``).

    Parameters
    ----------
    mask : (X, Y, Z) array
    residual : (X, Y, Z) float
        The map whose peak is reported (e.g. the smoothed z residual).
    regions : (X, Y, Z) uint8
        From :func:`femur_regions`.
    spacing : 3 floats, mm
    bone : str

    Returns
    -------
    list of dict
        ``lesion`` (1-based id by decreasing volume), ``volume_ml``, ``bone``, ``region``
        (the most frequent region of its voxels), ``peak_residual``, ``n_voxels``,
        ``centroid_voxel``. Empty for an empty mask.
    """
    sp = _spacing(spacing, 3)
    m = np.asarray(mask) != 0
    if not m.any():
        return []
    labels, n = cc3d.connected_components(m.astype(np.uint8), connectivity=CONNECTIVITY,
                                          return_N=True)
    vox_ml = float(np.prod(sp)) / 1000.0
    rows: list[dict[str, Any]] = []
    for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        sub = labels[sl] == lab
        reg = np.asarray(regions)[sl][sub]
        reg = reg[reg > 0]
        region = REGION_NAMES.get(int(np.bincount(reg).argmax()), "unknown") if reg.size \
            else "outside bone"
        pos = np.argwhere(sub) + [s.start for s in sl]
        rows.append({"volume_ml": round(int(sub.sum()) * vox_ml, 5), "bone": bone,
                     "region": region,
                     "peak_residual": round(float(np.asarray(residual)[sl][sub].max()), 4),
                     "n_voxels": int(sub.sum()),
                     "centroid_voxel": [round(float(c), 1) for c in pos.mean(axis=0)]})
    rows.sort(key=lambda r: -float(r["volume_ml"]))
    for i, r in enumerate(rows, start=1):
        r["lesion"] = i
    return [{"lesion": r.pop("lesion"), **r} for r in rows]
