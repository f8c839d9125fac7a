"""Pseudo-healthy vertebra, relative height loss (RHLV) and Genant fracture grade.

Method (HealthiVert-GAN, arXiv 2503.05990; METHODS.md section 4), made on MRI label maps:

1. **Section.** For a vertebral body with a neighbour directly above and below, a 2-D
   section is sampled (nearest neighbour) from the label map: the sagittal plane through the
   target's centroid (normal = the patient's left-right axis, or the slice normal of a 2-D
   input); in it a crop of :data:`CROP_SHAPE` pixels whose rows run along the line from the
   upper to the lower neighbour's centroid (superior to inferior) and whose columns run
   anterior to posterior, centred between the two neighbours, with a pixel size chosen so
   that the neighbours' centroids lie :data:`LEVEL_PX` rows above and below the centre
   (:func:`extract_section`). Normalising the level spacing lets one network serve cervical,
   thoracic and lumbar levels.
2. **Pseudo-healthy shape.** The *shape* is inpainted, not the image: the painter sees the
   other vertebral bodies of the section (binary) and a hole = the band of rows between the
   two neighbours' centroids, minus the neighbours (:func:`hole_mask`), and returns the
   probability of vertebral body in the hole. The target itself is never shown, so the
   painting is the vertebra its neighbours predict, whatever happened to it. Why shapes:
   height loss is a property of the mask; an image painter would need a segmentation of its
   painting again, and the only real fractures-free training material with known heights is
   the label maps. Painters: the shipped FFC network (``vertebra-inpaint``, in
   :mod:`mskmri.anomaly.vertebra_inpaint`; this module stays torch-free) or the model-free
   :class:`InterpolationPainter` (mean of the neighbours' signed distance maps), the floor a
   network must beat.
3. **RHLV** per section (anterior, middle, posterior) = (H_pseudo_healthy - H_observed) /
   H_pseudo_healthy, both heights measured on the same 2-D section with the definitions of
   :mod:`mskmri.measure.spine` (85/50/15% of the AP depth from the posterior edge, thin band
   of lines along the body's own S-I axis). The paper counts heights per column over the
   central slab; here the project's height definition is used so that RHLV and the reported
   heights agree.
4. **Genant grade** by a linear SVM on the three RHLVs (:class:`GenantSvm`: scikit-learn's
   one-vs-one linear ``SVC``, applied with numpy from coefficients shipped as JSON in
   :mod:`mskmri.weights`; fitted by ``benchmarks/vertebra_grading.py`` on fractures rendered
   into real label maps of exams the painter never saw, :func:`render_fracture`, with each
   grade weighted by its share among the HealthiVert-GAN VerSe vertebrae). TotalSegmentator's
   rule (min/max of the observed heights < :data:`RULE_MIN_MAX_RATIO`) is recorded beside it.

Resolution: the section is painted on the crop grid (~1.1 mm for lumbar levels) and heights
are measured on a grid :data:`MEASURE_UPSAMPLE` times finer; a pixel of the crop is still ~4%
of a lumbar body's height, close to the width of Genant's grade-1 band (20-25%), so grade 1 is
the least reliable (see the benchmark).

A vertebra without a neighbour directly above and below gets its four entries with value NaN
and a ``reason``; nothing is guessed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from scipy import ndimage

from mskmri.errors import MskMriError
from mskmri.labels import ORDINAL_VERTEBRA_START, VERTEBRA_ID, vertebra_name
from mskmri.measure._geometry import RIGHT, unit
from mskmri.measure.base import DIMENSIONLESS, Measurement
from mskmri.volume import LabelVolume

log = logging.getLogger(__name__)

#: Section crop, pixels: (rows along S-I, columns along A-P). Multiple of 4 (network divisor).
CROP_SHAPE: tuple[int, int] = (96, 64)
#: Rows between the target's centre and each neighbour's centroid (sets the pixel size).
LEVEL_PX = 32
#: The hole: rows within this many pixels of the centre (i.e. up to the neighbours' centroids).
HOLE_HALF_ROWS = LEVEL_PX
#: Heights are measured on a grid this many times finer than the network's (the observed body
#: is resampled from the label map, the painted probability interpolated bilinearly): at the
#: network's ~1.1 mm lumbar pixel one pixel of height is ~4.5% of a body, as wide as Genant's
#: grade-1 band.
MEASURE_UPSAMPLE = 2
#: Probability above which a painted pixel is vertebral body.
PAINT_THRESHOLD = 0.5
#: Genant semiquantitative thresholds of height loss (fraction): grade 1 from 0.20, 2 from
#: 0.25, 3 from 0.40 (Genant et al., JBMR 1993).
GENANT_THRESHOLDS: tuple[float, float, float] = (0.20, 0.25, 0.40)
#: TotalSegmentator's fracture rule: min / max of the three heights below this.
RULE_MIN_MAX_RATIO = 0.8
#: Sections where RHLV is reported, in the order of the SVM features.
SECTIONS: tuple[str, str, str] = ("anterior", "middle", "posterior")
#: Relative AP position (0 = posterior edge, 1 = anterior edge) of each height
#: (:data:`mskmri.measure.spine.HEIGHT_FRACTIONS`).
SECTION_POSITION: Mapping[str, float] = MappingProxyType(
    {"anterior": 0.85, "middle": 0.50, "posterior": 0.15})
#: Largest accepted distance between two neighbours' centroids, as a multiple of the
#: target's own S-I extent (a gap in the labels means the bodies are not adjacent).
MAX_NEIGHBOUR_GAP = 4.0
#: Fracture shapes of :func:`render_fracture`.
FRACTURE_SHAPES: tuple[str, str, str] = ("wedge", "biconcave", "crush")
#: Default SVM regularisation C. RHLVs are fractions and Genant's grade-1 band is 0.05 wide, so
#: a margin of 1 needs weights of ~40: C = 1 under-fits (0.85 vs 0.95 training accuracy on
#: the synthetic check in tests/test_grading.py). The benchmark picks C by cross-validation.
SVM_C = 100.0
#: Shipped SVM coefficients (JSON, in :mod:`mskmri.weights`).
SVM_FILE = "vertebra-grading-svm.json"
#: Schema of the SVM JSON.
SVM_SCHEMA = "mskmri/linear-svm/1"

RHLV_METHOD = ("(H_pseudo_healthy - H_observed) / H_pseudo_healthy at {pct}% of the AP depth, "
               "both on the target's sagittal section (pseudo-healthy shape inpainted from the "
               "neighbours by {painter})")
GRADE_METHOD = "linear SVM on (rhlv_anterior, rhlv_middle, rhlv_posterior); Genant 0-3"

#: ``painter(known, hole)`` on ``(N, H, W)`` float32 arrays -> probability of body ``(N, H, W)``.
Painter = Callable[[np.ndarray, np.ndarray], np.ndarray]


class GradingError(MskMriError):
    """A vertebra cannot be graded (no neighbours, degenerate section, bad classifier file)."""


# ============================================================================ sections
@dataclass(frozen=True)
class Section:
    """A 2-D section through a target vertebra and its two neighbours.

    Attributes
    ----------
    value : int
        Label value of the target.
    structure : str
        Its level name (``"L3"``, ``"V1002"``).
    upper, lower : int
        Label values of the neighbours.
    target : (H, W) bool ndarray
        The target body in the crop.
    target_fine : (H * MEASURE_UPSAMPLE, W * MEASURE_UPSAMPLE) bool ndarray
        The target body on the measurement grid (:data:`MEASURE_UPSAMPLE`).
    others : (H, W) bool ndarray
        All other vertebral bodies (and sacrum) in the crop.
    spacing_mm : float
        Pixel size of the crop, mm (isotropic; the measurement grid's is this divided by
        :data:`MEASURE_UPSAMPLE`).
    origin_mm, row_dir, col_dir : (3,) ndarray
        World RAS+ position of pixel (0, 0) and unit directions of rows (inferior) and
        columns (posterior).
    centroid_mm : (3,) ndarray
        Centroid of the target body in the label map, world mm.
    """

    value: int
    structure: str
    upper: int
    lower: int
    target: np.ndarray
    target_fine: np.ndarray
    others: np.ndarray
    spacing_mm: float
    origin_mm: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    centroid_mm: np.ndarray


def _is_body(value: int) -> bool:
    return value in VERTEBRA_ID.values() or (
        ORDINAL_VERTEBRA_START <= value < ORDINAL_VERTEBRA_START + 100)


def body_centroids(seg: LabelVolume) -> dict[int, np.ndarray]:
    """Centroid (world mm, RAS+) of every vertebral body (and sacrum) of a spine label map.

    Parameters
    ----------
    seg : LabelVolume
        Spine schema; VerSe ids 1-26 or ordinal ids 1000-1099.

    Returns
    -------
    dict of int to (3,) ndarray
        Ordered superior to inferior.
    """
    seg.require_geometry("vertebral fracture grading")
    values = [v for v in seg.present_values() if _is_body(v)]
    if not values:
        return {}
    idx = ndimage.center_of_mass(np.ones(seg.shape), seg.array, values)
    cents = {v: seg.voxel_to_world(np.asarray(c)[None])[0] for v, c in zip(values, idx, strict=True)}
    return dict(sorted(cents.items(), key=lambda kv: -kv[1][2]))


def neighbours(seg: LabelVolume, centroids: Mapping[int, np.ndarray] | None = None
               ) -> dict[int, tuple[int, int] | str]:
    """Neighbours (upper, lower) of each body, or the reason it has none.

    Bodies are ordered by the superior coordinate of their centroids. A neighbour must be
    the next body in that order and, for labelled levels, the next level (``v - 1`` above,
    ``v + 1`` or the sacrum below): a missing level in between is a gap, not a neighbour.
    The sacrum (26) is a neighbour, never a target.
    """
    cents = dict(centroids) if centroids is not None else body_centroids(seg)
    order = list(cents)
    out: dict[int, tuple[int, int] | str] = {}
    sacrum = VERTEBRA_ID["sacrum"]
    for i, v in enumerate(order):
        if v == sacrum:
            continue
        if i == 0 or i == len(order) - 1:
            side = "above" if i == 0 else "below"
            out[v] = (f"{vertebra_name(v)}: no vertebral body {side} it in the label map; the "
                      "pseudo-healthy shape needs a neighbour above and below")
            continue
        up, lo = order[i - 1], order[i + 1]
        if up != v - 1 or not (lo == v + 1 or (lo == sacrum and v < sacrum)):
            out[v] = (f"{vertebra_name(v)}: its neighbours in the label map are "
                      f"{vertebra_name(up)} and {vertebra_name(lo)}, not the adjacent levels; "
                      "a missing level cannot be inpainted from")
            continue
        out[v] = (up, lo)
    return out


def _section_normal(seg: LabelVolume) -> np.ndarray:
    singles = [a for a, s in enumerate(seg.shape) if s == 1]
    if singles:
        n = unit(seg.direction[:, singles[0]])
        return n if n @ RIGHT >= 0 else -n
    return np.asarray(RIGHT, dtype=float)


def extract_section(
    seg: LabelVolume,
    value: int,
    upper: int,
    lower: int,
    *,
    centroids: Mapping[int, np.ndarray] | None = None,
    lr_offset_mm: float = 0.0,
    angle_deg: float = 0.0,
    scale: float = 1.0,
    shift_px: tuple[float, float] = (0.0, 0.0),
) -> Section:
    """Sample the section through ``value`` between ``upper`` and ``lower`` (module docstring).

    Parameters
    ----------
    seg : LabelVolume
        Spine label map with geometry (3-D, or a one-slice sagittal 2-D map).
    value, upper, lower : int
        Target and neighbour label values.
    centroids : mapping, optional
        From :func:`body_centroids` (computed when omitted).
    lr_offset_mm, angle_deg, scale, shift_px
        Augmentation for training: left-right offset of the plane (mm, 3-D only), rotation of
        the rows about the plane normal (deg), pixel-size factor, crop shift (rows, columns).
        Leave at their defaults for measurement.

    Returns
    -------
    Section
    """
    cents = centroids if centroids is not None else body_centroids(seg)
    for v in (value, upper, lower):
        if v not in cents:
            raise GradingError(f"label {v} is not a vertebral body of this label map")
    n = _section_normal(seg)
    cu, cl, ct = (np.asarray(cents[v], float) for v in (upper, lower, value))
    d = cu - cl
    d = d - (d @ n) * n
    span = float(np.linalg.norm(d))
    if span < 1e-6:
        raise GradingError(f"{vertebra_name(value)}: its neighbours' centroids coincide in the "
                           "sagittal plane; the label map is degenerate")
    si = d / span
    if angle_deg:
        a = np.radians(angle_deg)
        si = np.cos(a) * si + np.sin(a) * np.cross(n, si)
    ap = unit(np.cross(si, n))
    if ap[1] < 0:  # anterior = +A in RAS+
        ap = -ap
    row_dir, col_dir = -si, -ap
    mid = 0.5 * (cu + cl)
    centre = mid + ((ct - mid) @ n + lr_offset_mm) * n
    spacing = scale * 0.5 * span / LEVEL_PX
    h, w = CROP_SHAPE
    origin = centre + spacing * (-(h - 1) / 2 + shift_px[0]) * row_dir \
        + spacing * (-(w - 1) / 2 + shift_px[1]) * col_dir

    def sample(k: int) -> np.ndarray:
        # k x k sub-pixels per crop pixel; sub-pixel centres at (i + 0.5) / k - 0.5
        rr, cc = np.meshgrid((np.arange(h * k) + 0.5) / k - 0.5,
                             (np.arange(w * k) + 0.5) / k - 0.5, indexing="ij")
        world = origin + spacing * (rr[..., None] * row_dir + cc[..., None] * col_dir)
        vox = seg.world_to_voxel(world.reshape(-1, 3)).T
        return ndimage.map_coordinates(seg.array, vox, order=0, mode="constant", cval=0,
                                       prefilter=False).reshape(h * k, w * k)

    crop = sample(1)
    bodies = np.isin(crop, [v for v in cents if v != value])
    return Section(value=value, structure=vertebra_name(value), upper=upper, lower=lower,
                   target=crop == value, target_fine=sample(MEASURE_UPSAMPLE) == value,
                   others=bodies, spacing_mm=float(spacing), origin_mm=origin,
                   row_dir=row_dir, col_dir=col_dir, centroid_mm=ct)


def hole_mask(others: np.ndarray, half_rows: int = HOLE_HALF_ROWS) -> np.ndarray:
    """The region to paint: rows within ``half_rows`` of the centre, minus known bodies.

    Parameters
    ----------
    others : (H, W) bool ndarray
        Known vertebral bodies of the section.
    half_rows : int
        Half height of the band, pixels.

    Returns
    -------
    (H, W) bool ndarray
    """
    h = others.shape[0]
    rows = np.abs(np.arange(h) - (h - 1) / 2) < half_rows
    return rows[:, None] & ~np.asarray(others, bool)


# ============================================================================ painters
class InterpolationPainter:
    """Model-free painter: the mean of the neighbours' signed distance maps, moved to the centre.

    The section puts the upper neighbour's centroid :data:`LEVEL_PX` rows above the centre
    and the lower one as far below; shifting the known bodies down and up by that many rows
    and averaging their signed distance maps interpolates the neighbours' shapes.
    """

    def __call__(self, known: np.ndarray, hole: np.ndarray) -> np.ndarray:
        """Paint ``(N, H, W)`` sections; returns probabilities ``(N, H, W)`` in [0, 1]."""
        out = np.zeros(known.shape, dtype=np.float32)
        for i, k in enumerate(np.asarray(known) > 0.5):
            rows = np.arange(k.shape[0])
            centre = (k.shape[0] - 1) / 2
            up = k & (rows[:, None] < centre)  # the bodies above the centre
            lo = k & (rows[:, None] > centre)
            sdf: list[np.ndarray | None] = []
            for part, shift in ((up, LEVEL_PX), (lo, -LEVEL_PX)):
                moved = ndimage.shift(part.astype(np.float32), (shift, 0), order=0) > 0.5
                if not moved.any():
                    sdf.append(None)
                    continue
                sdf.append(ndimage.distance_transform_edt(~moved)
                           - ndimage.distance_transform_edt(moved))
            have = [s for s in sdf if s is not None]
            if have:
                # a one-pixel ramp (1 on the first inside pixel, 0 on the first outside one),
                # so that interpolating the output puts the edge at the zero crossing
                out[i] = np.clip(0.5 - 0.5 * np.mean(have, axis=0), 0.0, 1.0)
        return out * (np.asarray(hole) > 0.5)


def pseudo_healthy(section: Section, painter: Painter) -> np.ndarray:
    """The painted pre-fracture body of ``section`` on the measurement grid.

    The painter's probability is interpolated bilinearly to the grid of
    :data:`MEASURE_UPSAMPLE` and thresholded at :data:`PAINT_THRESHOLD` inside the hole; the
    largest connected part is kept.

    Returns
    -------
    (H * MEASURE_UPSAMPLE, W * MEASURE_UPSAMPLE) bool ndarray
    """
    hole = hole_mask(section.others)
    prob = painter(section.others[None].astype(np.float32), hole[None].astype(np.float32))[0]
    k = MEASURE_UPSAMPLE
    prob = ndimage.zoom(np.asarray(prob, np.float32), k, order=1, mode="nearest",
                        grid_mode=True)
    hole = np.repeat(np.repeat(hole, k, axis=0), k, axis=1)
    body = (prob > PAINT_THRESHOLD) & hole
    lab, n = ndimage.label(body)
    if n > 1:
        sizes = ndimage.sum(body, lab, range(1, n + 1))
        body = lab == (1 + int(np.argmax(sizes)))
    return body


# ============================================================================ heights
def section_volume(section: Section, mask: np.ndarray) -> LabelVolume:
    """A one-slice :class:`LabelVolume` of ``mask`` on the section's grid (world geometry).

    ``mask`` is on the crop grid (:data:`CROP_SHAPE`) or on the measurement grid
    (:data:`MEASURE_UPSAMPLE` times finer); its shape tells which.
    """
    mask = np.asarray(mask)
    k = mask.shape[0] / section.target.shape[0]
    if mask.shape != (round(k * section.target.shape[0]), round(k * section.target.shape[1])) \
            or k not in (1, MEASURE_UPSAMPLE):
        raise GradingError(f"mask shape {mask.shape} is neither the crop grid "
                           f"{section.target.shape} nor the measurement grid")
    sp = section.spacing_mm / k
    n = unit(np.cross(section.row_dir, section.col_dir))
    aff = np.eye(4)
    aff[:3, 0] = section.row_dir * sp
    aff[:3, 1] = section.col_dir * sp
    aff[:3, 2] = n * sp
    # sub-pixel (0, 0) centre lies (1/k - 1)/2 crop pixels from the crop pixel's centre
    aff[:3, 3] = section.origin_mm + section.spacing_mm * (0.5 / k - 0.5) * (
        section.row_dir + section.col_dir)
    arr = (np.asarray(mask, bool) * section.value).astype(np.int32)[:, :, None]
    return LabelVolume(arr, aff, {section.value: section.structure}, schema="spine",
                       meta={"planar": True, "slice_thickness_known": False})


def section_heights(section: Section, mask: np.ndarray) -> tuple[dict[str, float], list[str]]:
    """Anterior, middle and posterior heights (mm) of ``mask`` on the section.

    Measured by :func:`mskmri.measure.spine.analyse_spine` (its definitions, on the 2-D
    section). Returns the heights that could be made and the warnings.
    """
    from mskmri.measure.spine import analyse_spine

    if not np.asarray(mask).any():
        return {}, [f"{section.structure}: empty mask on its section"]
    spine_log = logging.getLogger("mskmri.measure.spine")
    level = spine_log.level
    spine_log.setLevel(logging.ERROR)  # its warnings are returned, not logged twice
    try:
        res = analyse_spine(section_volume(section, mask), mid_sagittal_2d=False)
    finally:
        spine_log.setLevel(level)
    geo = res.vertebrae.get(section.structure)
    return (dict(geo.heights) if geo is not None else {}), list(res.warnings)


def rhlv(pseudo: Mapping[str, float], observed: Mapping[str, float]) -> dict[str, float]:
    """Relative height loss per section: (H_pseudo - H_observed) / H_pseudo (dimensionless).

    Sections missing from either mapping, or with a non-positive pseudo-healthy height, are
    left out.
    """
    return {s: (pseudo[s] - observed[s]) / pseudo[s] for s in SECTIONS
            if s in pseudo and s in observed and pseudo[s] > 0}


def genant_from_loss(loss: float) -> int:
    """Genant grade (0-3) of a fractional height loss (:data:`GENANT_THRESHOLDS`)."""
    return int(np.searchsorted(GENANT_THRESHOLDS, float(loss), side="right"))


def rule_fractured(observed: Mapping[str, float]) -> bool | None:
    """TotalSegmentator's rule: min / max of the three heights < :data:`RULE_MIN_MAX_RATIO`.

    None when a height is missing.
    """
    if any(s not in observed for s in SECTIONS) or max(observed.values()) <= 0:
        return None
    return min(observed[s] for s in SECTIONS) / max(observed[s] for s in SECTIONS) \
        < RULE_MIN_MAX_RATIO


# ============================================================================ classifier
@dataclass(frozen=True)
class GenantSvm:
    """A multi-class linear SVM on the three RHLVs, applied with numpy.

    Two schemes: ``"ovo"`` (one-vs-one, scikit-learn's ``SVC(kernel="linear")``, what
    :meth:`fit` makes: one boundary per pair of grades, so a middle grade is a band between
    two boundaries) and ``"ovr"`` (one-vs-rest, one row per grade, argmax). One-vs-rest was
    tried first: a middle grade (1, 2) cannot be cut out of a monotone height loss by one
    linear boundary against all others, and grades 1-2 were mostly lost.

    Attributes
    ----------
    coef : (K, 3) ndarray
        ``"ovr"``: one row per class; ``"ovo"``: one row per pair in :attr:`pairs` order.
        Columns in :data:`SECTIONS` order.
    intercept : (K,) ndarray
    classes : tuple of int
        Genant grades.
    scheme : {"ovo", "ovr"}
    info : dict
        How it was trained (recorded in the JSON).
    """

    coef: np.ndarray
    intercept: np.ndarray
    classes: tuple[int, ...]
    scheme: str = "ovr"
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.classes)
        rows = n * (n - 1) // 2 if self.scheme == "ovo" else n
        if self.scheme not in ("ovo", "ovr"):
            raise GradingError(f"SVM scheme must be 'ovo' or 'ovr', not {self.scheme!r}")
        if self.coef.shape != (rows, len(SECTIONS)) or self.intercept.shape != (rows,):
            raise GradingError(f"SVM coef {self.coef.shape} / intercept {self.intercept.shape} "
                               f"do not fit {n} classes ({self.scheme}) x {len(SECTIONS)} "
                               "features")

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Class-index pairs of the ``"ovo"`` rows (scikit-learn's order: (0, 1), (0, 2), ...)."""
        n = len(self.classes)
        return [(i, j) for i in range(n) for j in range(i + 1, n)]

    @classmethod
    def fit(cls, features: np.ndarray, grades: np.ndarray, *, c: float = SVM_C, seed: int = 0,
            class_weight: Mapping[int, float] | str = "balanced",
            info: Mapping[str, Any] | None = None) -> GenantSvm:
        """Fit scikit-learn's linear ``SVC`` (one-vs-one) on ``(N, 3)`` RHLVs.

        Parameters
        ----------
        features : (N, 3) ndarray
            RHLVs in :data:`SECTIONS` order.
        grades : (N,) int ndarray
        c : float
            Regularisation.
        seed : int
        class_weight : "balanced" or mapping of grade to weight
            ``"balanced"`` weighs every grade equally; a mapping can put a population's grade
            proportions in (e.g. the HealthiVert-GAN VerSe proportions, mostly grade 0).
        info : mapping, optional
            Recorded in :attr:`info`.

        The numpy prediction is checked against scikit-learn's on the training data.
        """
        from sklearn.svm import SVC

        x, y = np.asarray(features, float), np.asarray(grades, int)
        weights: Any = class_weight if isinstance(class_weight, str) else {
            int(k): float(v) for k, v in class_weight.items()}
        svm = SVC(kernel="linear", C=c, class_weight=weights, decision_function_shape="ovo",
                  random_state=seed)
        svm.fit(x, y)
        if len(svm.classes_) < 3:
            raise GradingError("the SVM needs at least three grades in its training data")
        out = cls(np.atleast_2d(svm.coef_), np.asarray(svm.intercept_, float),
                  tuple(int(g) for g in svm.classes_), "ovo",
                  {"C": c, "seed": seed, "class_weight": weights,
                   "estimator": "sklearn.svm.SVC(kernel='linear', decision_function_shape='ovo')",
                   **(info or {})})
        agree = float(np.mean(out.predict(x) == svm.predict(x)))
        if agree < 0.999:
            raise GradingError(f"numpy and scikit-learn SVM predictions agree on only "
                               f"{100 * agree:.1f}% of the training data; this is a bug")
        return out

    def decision(self, features: np.ndarray) -> np.ndarray:
        """``(N, K)`` decision values of ``(N, 3)`` features (rows of :attr:`coef`)."""
        return np.atleast_2d(np.asarray(features, float)) @ self.coef.T + self.intercept

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Genant grades ``(N,)`` of ``(N, 3)`` RHLV features (anterior, middle, posterior).

        ``"ovo"``: each pair votes (decision > 0 for its first class, as libsvm does); most
        votes wins, ties to the lower grade. ``"ovr"``: argmax.
        """
        dec = self.decision(features)
        if self.scheme == "ovr":
            return np.asarray(self.classes)[np.argmax(dec, axis=1)]
        votes = np.zeros((dec.shape[0], len(self.classes)), int)
        for k, (i, j) in enumerate(self.pairs):
            first = dec[:, k] > 0
            votes[first, i] += 1
            votes[~first, j] += 1
        return np.asarray(self.classes)[np.argmax(votes, axis=1)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"schema": SVM_SCHEMA, "features": [f"rhlv_{s}" for s in SECTIONS],
                "classes": list(self.classes), "scheme": self.scheme,
                "coef": self.coef.tolist(), "intercept": self.intercept.tolist(),
                "info": dict(self.info)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "SVM file") -> GenantSvm:
        """Build from :meth:`to_dict` output (checks the schema and shapes)."""
        if data.get("schema") != SVM_SCHEMA:
            raise GradingError(f"{source} has schema {data.get('schema')!r}, expected "
                               f"{SVM_SCHEMA!r}; re-run benchmarks/vertebra_grading.py")
        try:
            return cls(np.asarray(data["coef"], float), np.asarray(data["intercept"], float),
                       tuple(int(c) for c in data["classes"]), str(data.get("scheme", "ovr")),
                       dict(data.get("info", {})))
        except KeyError as exc:
            raise GradingError(f"{source} lacks {exc}; re-run benchmarks/vertebra_grading.py")\
                from exc

    @classmethod
    def load(cls, path: str | Path | None = None) -> GenantSvm:
        """Read the shipped coefficients (default :data:`SVM_FILE`) or a given JSON file."""
        from mskmri.weights import WEIGHTS_DIR

        p = Path(path) if path is not None else WEIGHTS_DIR / SVM_FILE
        if not p.is_file():
            raise GradingError(f"no SVM coefficients at {p}; run benchmarks/vertebra_grading.py "
                               "to fit them")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise GradingError(f"{p} is not readable JSON ({exc})") from exc
        return cls.from_dict(data, source=str(p))


# ============================================================================ fracture renders
def fracture_profile(shape: str, loss: float, a: np.ndarray) -> np.ndarray:
    """Height loss (fraction) along the relative AP position ``a`` (0 posterior, 1 anterior).

    wedge: ``loss * clip(a / 0.85, 0, 1)`` (anterior collapse, posterior wall kept);
    biconcave: ``loss * (1 - ((a - 0.5) / 0.5)**2)`` (central collapse of both endplates);
    crush: ``loss`` everywhere. Each reaches ``loss`` at one of the height positions.
    """
    a = np.clip(np.asarray(a, float), 0.0, 1.0)
    if shape == "wedge":
        return loss * np.clip(a / SECTION_POSITION["anterior"], 0.0, 1.0)
    if shape == "biconcave":
        return loss * np.clip(1.0 - ((a - 0.5) / 0.5) ** 2, 0.0, 1.0)
    if shape == "crush":
        return np.full_like(a, loss)
    raise GradingError(f"unknown fracture shape {shape!r}; use one of {FRACTURE_SHAPES}")


def render_fracture(section: Section, shape: str, loss: float) -> np.ndarray:
    """The target of ``section`` compressed along its own S-I axis (a rendered fracture).

    Parameters
    ----------
    section : Section
        Intact target on the measurement grid (``target_fine``; its frame is measured by
        :mod:`mskmri.measure.spine`).
    shape : {"wedge", "biconcave", "crush"}
        See :func:`fracture_profile`. Wedge keeps the inferior endplate (anchor = lowest
        point of the body); biconcave and crush collapse both endplates towards the centroid.
    loss : float
        Height loss in [0, 0.9) at the worst height position: the Genant grade of the render
        is :func:`genant_from_loss` of it.

    Returns
    -------
    (H * MEASURE_UPSAMPLE, W * MEASURE_UPSAMPLE) bool ndarray
        The fractured body (backward warp, nearest neighbour); neighbours are not moved.
    """
    from mskmri.measure.spine import analyse_spine

    if not 0.0 <= loss < 0.9:
        raise GradingError(f"height loss must be in [0, 0.9), not {loss}")
    target = section.target_fine
    vol = section_volume(section, target)
    spine_log = logging.getLogger("mskmri.measure.spine")
    level = spine_log.level
    spine_log.setLevel(logging.ERROR)
    try:
        geo = analyse_spine(vol, mid_sagittal_2d=False).vertebrae.get(section.structure)
    finally:
        spine_log.setLevel(level)
    if geo is None or not np.isfinite(geo.depth):
        raise GradingError(f"{section.structure}: its section could not be measured, so no "
                           "fracture can be rendered into it")
    f = geo.frame
    h, w = target.shape
    idx = np.stack(np.meshgrid(np.arange(h), np.arange(w), [0], indexing="ij"), -1)
    world = vol.voxel_to_world(idx.reshape(-1, 3))
    rel = world - f.centre
    a = (rel @ f.ap - geo.posterior_t) / geo.depth
    z = rel @ f.si
    inside = target.ravel()
    anchor = float(np.min(z[inside])) if shape == "wedge" else 0.0
    prof = fracture_profile(shape, loss, a)
    z0 = anchor + (z - anchor) / (1.0 - prof)
    src = vol.world_to_voxel(world + (z0 - z)[:, None] * f.si)
    out = ndimage.map_coordinates(target.astype(np.uint8), src[:, :2].T, order=0,
                                  mode="constant", cval=0, prefilter=False)
    return out.reshape(h, w).astype(bool)


# ============================================================================ grading
@dataclass
class VertebraGrade:
    """Grading of one vertebra (what the measurements are made from).

    Attributes
    ----------
    structure : str
    centroid_mm : (3,) ndarray
    observed_mm, pseudo_healthy_mm : dict of str to float
        Heights on the section, mm.
    rhlv : dict of str to float
    grade : int or None
    rule_fractured : bool or None
        TotalSegmentator's min/max rule on the observed heights.
    section : Section or None
    pseudo_mask : (H, W) bool ndarray or None
    reason : str or None
        Why it was not graded.
    """

    structure: str
    centroid_mm: np.ndarray
    observed_mm: dict[str, float] = field(default_factory=dict)
    pseudo_healthy_mm: dict[str, float] = field(default_factory=dict)
    rhlv: dict[str, float] = field(default_factory=dict)
    grade: int | None = None
    rule_fractured: bool | None = None
    section: Section | None = None
    pseudo_mask: np.ndarray | None = None
    reason: str | None = None


@dataclass
class GradingResult:
    """Everything :func:`grade_vertebrae` found."""

    measurements: list[Measurement] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    vertebrae: dict[str, VertebraGrade] = field(default_factory=dict)
    painter: str = ""


def painter_name(painter: Painter) -> str:
    """A short name of a painter for method strings."""
    card = getattr(painter, "card", None)
    if isinstance(card, Mapping) and card.get("name"):
        return f"the {card['name']} network"
    return type(painter).__name__


def grade_section(section: Section, painter: Painter, classifier: GenantSvm | None,
                  *, observed_mask: np.ndarray | None = None) -> VertebraGrade:
    """Pseudo-healthy shape, heights, RHLV and grade of one section.

    ``observed_mask`` (measurement grid) replaces the section's target (e.g. a rendered
    fracture).
    """
    obs_mask = section.target_fine if observed_mask is None else observed_mask
    vg = VertebraGrade(structure=section.structure, centroid_mm=section.centroid_mm,
                       section=section)
    obs, w1 = section_heights(section, obs_mask)
    ph_mask = pseudo_healthy(section, painter)
    ph, w2 = section_heights(section, ph_mask)
    vg.observed_mm, vg.pseudo_healthy_mm, vg.pseudo_mask = obs, ph, ph_mask
    vg.rhlv = rhlv(ph, obs)
    vg.rule_fractured = rule_fractured(obs)
    if len(vg.rhlv) < len(SECTIONS):
        missing = [s for s in SECTIONS if s not in vg.rhlv]
        vg.reason = (f"{section.structure}: {', '.join(missing)} height(s) could not be measured "
                     f"on the {'pseudo-healthy' if len(ph) < 3 else 'observed'} section"
                     + (f" ({'; '.join(w1 + w2)})" if w1 or w2 else ""))
    elif classifier is not None:
        vg.grade = int(classifier.predict(np.array([[vg.rhlv[s] for s in SECTIONS]]))[0])
    return vg


def _nan(name: str, structure: str, centroid: np.ndarray, reason: str) -> Measurement:
    return Measurement(name=name, value=float("nan"), unit=DIMENSIONLESS, structure=structure,
                       method=GRADE_METHOD if name == "genant_grade" else "",
                       extra={"centroid_mm": centroid, "reason": reason})


def grade_vertebrae(seg: LabelVolume, *, painter: Painter | None = None,
                    classifier: GenantSvm | None = None) -> GradingResult:
    """RHLV per section and Genant grade of every vertebra with neighbours above and below.

    Parameters
    ----------
    seg : LabelVolume
        Spine label map (3-D, or a one-slice sagittal 2-D map) with geometry.
    painter : callable, optional
        ``painter(known, hole)`` on ``(N, H, W)`` arrays -> probability of body; default
        :class:`InterpolationPainter` (model-free). ``analyze spine`` passes the shipped
        network (:func:`mskmri.anomaly.vertebra_inpaint.network_painter`).
    classifier : GenantSvm, optional
        Default: the shipped coefficients (:meth:`GenantSvm.load`).

    Returns
    -------
    GradingResult
        Per vertebra ``rhlv_anterior``, ``rhlv_middle``, ``rhlv_posterior`` (dimensionless)
        and ``genant_grade`` (0-3), each with ``structure`` and ``extra["centroid_mm"]``;
        NaN with ``extra["reason"]`` when the vertebra cannot be graded.
    """
    painter = painter or InterpolationPainter()
    classifier = classifier or GenantSvm.load()
    res = GradingResult(painter=painter_name(painter))
    cents = body_centroids(seg)
    if not cents:
        res.warnings.append("no vertebral bodies in the label map: no fracture grades")
        return res
    for v, nb in neighbours(seg, cents).items():
        name = vertebra_name(v)
        if isinstance(nb, str):
            vg = VertebraGrade(structure=name, centroid_mm=cents[v], reason=nb)
        else:
            try:
                sec = extract_section(seg, v, nb[0], nb[1], centroids=cents)
            except GradingError as exc:
                vg = VertebraGrade(structure=name, centroid_mm=cents[v], reason=str(exc))
            else:
                if not sec.target.any():
                    vg = VertebraGrade(structure=name, centroid_mm=cents[v], reason=(
                        f"{name}: the body does not cross its own sagittal section"))
                else:
                    vg = grade_section(sec, painter, classifier)
        res.vertebrae[name] = vg
        res.measurements.extend(grade_measurements(vg, res.painter))
        if vg.reason:
            res.warnings.append(f"fracture grade not made: {vg.reason}")
    return res


def grade_measurements(vg: VertebraGrade, painter: str = "") -> list[Measurement]:
    """The four measurement entries of one graded (or ungraded) vertebra."""
    names = [f"rhlv_{s}" for s in SECTIONS] + ["genant_grade"]
    if vg.reason or vg.grade is None:
        reason = vg.reason or "no classifier given"
        return [_nan(n, vg.structure, vg.centroid_mm, reason) for n in names]
    base = {"centroid_mm": vg.centroid_mm,
            "pseudo_healthy_heights_mm": dict(vg.pseudo_healthy_mm),
            "observed_heights_mm": dict(vg.observed_mm)}
    out = [Measurement(name=f"rhlv_{s}", value=vg.rhlv[s], unit=DIMENSIONLESS,
                       structure=vg.structure,
                       method=RHLV_METHOD.format(pct=round(100 * SECTION_POSITION[s]),
                                                 painter=painter),
                       extra={**base, "section_spacing_mm": vg.section.spacing_mm
                              if vg.section else None})
           for s in SECTIONS]
    out.append(Measurement(
        name="genant_grade", value=float(vg.grade), unit=DIMENSIONLESS, structure=vg.structure,
        method=GRADE_METHOD,
        extra={**base, "scale": "Genant 0 none, 1 mild (20-25%), 2 moderate (25-40%), "
                                "3 severe (>40%)",
               "rule_min_max_lt_0_8": vg.rule_fractured,
               "max_rhlv": max(vg.rhlv.values())}))
    return out


def grading_document(seg_path: str | Path, *, painter: Painter | None = None,
                     classifier: GenantSvm | None = None,
                     warnings: Sequence[str] = ()) -> dict[str, Any]:
    """Read a spine label map, grade it and return the ``mskmri/measurements/1`` document.

    Parameters
    ----------
    seg_path : path
        Spine label map (any format :func:`mskmri.io.read_labels` accepts).
    painter, classifier
        As :func:`grade_vertebrae`.
    warnings : sequence of str
        Carried into the document first (e.g. the painter's caveat).
    """
    from mskmri import __version__
    from mskmri.io import read_labels
    from mskmri.measure.base import describe_input, measurements_document

    seg = read_labels(seg_path, schema="spine", strict=False)
    res = grade_vertebrae(seg, painter=painter, classifier=classifier)
    info: dict[str, Any] = describe_input(seg, Path(seg_path))
    info["anatomy"] = "spine"
    info["painter"] = res.painter
    return measurements_document(res.measurements, input_info=info, tool_version=__version__,
                                 warnings=[*warnings, *res.warnings])


__all__ = [
    "CROP_SHAPE", "FRACTURE_SHAPES", "GENANT_THRESHOLDS", "LEVEL_PX", "MEASURE_UPSAMPLE",
    "RULE_MIN_MAX_RATIO",
    "SECTIONS", "GenantSvm", "GradingError", "GradingResult", "InterpolationPainter", "Section",
    "VertebraGrade", "body_centroids", "extract_section", "fracture_profile", "genant_from_loss",
    "grade_measurements", "grade_section", "grade_vertebrae", "grading_document", "hole_mask",
    "neighbours",
    "pseudo_healthy", "render_fracture", "rhlv", "rule_fractured", "section_heights",
    "section_volume",
]
