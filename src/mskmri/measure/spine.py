"""Spine measurements from a label map in the project's spine schema (all in mm and degrees).

Input: a :class:`~mskmri.volume.LabelVolume` in the spine schema (:mod:`mskmri.labels`):
vertebral bodies 1-25 (VerSe ids C1..L6) or ordinal ids 1000-1099 (level unknown, numbered
from the top), sacrum 26 (recognised, not measured), discs 100 + the id of the vertebra above
(101-125, or 1100-1199 for ordinal vertebrae), spinal cord 201, CSF/canal 202, intramedullary
T2 hyperintensity 203 (counted as cord). A 2-D sagittal slice is measured as a one-slice
volume built with an explicit pixel spacing by :func:`slice_label_volume`. Nothing is measured
without geometry (:meth:`~mskmri.volume.Volume.require_geometry`); every position is in RAS+
world millimetres, so the storage orientation and spacing of the array do not change a number.

Definitions
-----------
**Body frame** (per vertebral body, and per disc mask; only the largest 26-connected part of
each label is measured, with a warning when more than :data:`ISLAND_WARN_FRACTION` is dropped;
C1 has no body and is not measured).

- *Left-right axis* (``lr``): of the three principal axes of the body's voxel centres (3-D
  point cloud, world mm), the one closest to the patient's left-right axis, oriented to the
  right. When its principal moment is within :data:`DEGENERATE_MOMENT_GAP` of another (a body
  as wide as it is deep, where principal axes are arbitrary) the patient L-R axis is used
  instead, with a warning. For a 2-D slice, ``lr`` is the slice normal.
- *Mid-sagittal plane*: the plane through the body's centroid with normal ``lr``.
- *Anterior-posterior axis* (``ap``), in the mid-sagittal plane, oriented anteriorly: the
  bisector of the body's own superior and inferior endplate lines (below), found by a fixed
  point iteration: start from the side of the smallest-area rectangle enclosing the central
  slab (voxels within :data:`MIDSAGITTAL_SLAB_MM` of the plane, projected on it) that is
  closest to the patient's anterior direction; fit both endplate lines in that frame; move
  the axis :data:`AXIS_RELAXATION` of the way to their bisector; repeat until it moves less
  than :data:`AXIS_TOLERANCE_DEG` (at most :data:`MAX_AXIS_ITERATIONS` passes, a warning
  otherwise). An axis that turns more than :data:`MAX_AXIS_ROTATION_DEG` from its start is
  refused and the rectangle's axis kept (warning). C2 keeps the rectangle's axis (its dens
  has no superior endplate). *Superior-inferior axis* ``si = lr x ap`` (in the plane,
  perpendicular to ``ap``; superior). In-plane principal axes were tried first and dropped:
  lumbar mid-sagittal sections are nearly square (moment ratios 1.1-1.8 on MyoSegmenTUM),
  so their principal axes wandered up to ~20 deg from the endplates.
- *AP depth*: the extent of the body along ``ap`` on lines through the centroid (a band of
  :data:`HEIGHT_BAND_MM` across ``si``, median of the ends); gives the posterior and anterior
  edges.

**Heights** ``anterior_height``, ``middle_height``, ``posterior_height`` (mm): at 85%, 50% and
15% of the AP depth counted from the posterior edge (TotalSegmentator's positions,
:data:`HEIGHT_FRACTIONS`), the extent of the mask (first entry to last exit) along ``si``
on lines parallel to ``si``, averaged over a thin band of lines: offsets of
+-``HEIGHT_BAND_MM``/2 along ``ap`` and along ``lr`` (only along ``ap`` on a 2-D slice) in steps
of :data:`BAND_STEP_MM`. Lines are sampled every :data:`RAY_STEP_MM` with nearest-neighbour
lookup, so the mask boundary lies on voxel faces. A line whose extent runs into the edge of
the field of view does not count; a height needs :data:`MIN_BAND_FRACTION` of its lines.
``wedge_ratio`` = anterior / posterior; ``min_max_height_ratio`` = min / max of the three
(TotalSegmentator flags a fracture below 0.8).

**Endplates**: on lines parallel to ``si``, every :data:`ENDPLATE_STEP_MM` between 15% and
85% of the AP depth (:data:`ENDPLATE_FIT_RANGE`, away from the rounded rims), the last exit
is a superior and the first entry an inferior boundary point, each averaged over the thin
L-R band of the mid-sagittal plane (+-``HEIGHT_BAND_MM``/2; only the slice on a 2-D slice);
a total-least-squares line is fitted to each set (one pass of outlier trimming at
:data:`ENDPLATE_OUTLIER_MAD` robust SDs). ``superior_endplate_angle`` and
``inferior_endplate_angle`` (deg): elevation of the line's anterior end above the patient's
axial plane, measured in the body's mid-sagittal plane (positive = anterior end higher).
``wedge_angle`` = superior - inferior (positive = the body opens anteriorly). On a grid of
pixel size p an endplate of length L is resolved to about atan(p / L) (2.6 deg for a 16 mm
cervical body at 0.5 mm): single-body angles are coarse, Cobb angles over several levels
less so.

**Cobb angle** ``cobb_angle`` (deg) between an endplate of an upper and one of a lower
vertebra: both lines are projected into the common sagittal plane (normal = mean of the two
``lr`` axes) and the angle is elevation(upper) - elevation(lower): positive = the lines
converge posteriorly (lordosis), negative = kyphosis. Reported for the standard pairs
:data:`STANDARD_COBB_PAIRS` when both ends are present: "C2-C7" between the *inferior*
endplates of C2 and C7 (as CervAI-X does), "T4-T12" and "L1-L5" between the superior endplate
of the upper and the inferior endplate of the lower. With ordinal ids only, the angle between
the top and the bottom vertebra is given ("V1000-V1004"). ``disc_angle`` per disc: between the
inferior endplate of the body above and the superior endplate of the body below.

**Disc heights** ``disc_anterior_height``, ``disc_middle_height``, ``disc_posterior_height``
(mm): with a disc mask, exactly as the body heights, in the disc's own frame. Without one,
between adjacent bodies: in the frame with ``lr`` and ``ap`` the normalised means of the two
bodies' axes, at 85/50/15% between the mean posterior and mean anterior edges of the two
bodies, the gap along ``si`` between the last exit of the lower body and the first entry of
the upper one (band-averaged as above).

**Cord** (needs 201; 203 counts as cord; canal = 201, 202, 203):

- ``cord_ap_diameter`` (mm) at each body (centroid) and each disc (between two measured
  bodies): extent of the cord along the level's ``ap`` on lines through the level centre,
  shifted along ``lr`` to the cord's own mid-sagittal plane at that level (3-D), averaged over
  a band of +-``HEIGHT_BAND_MM``/2 along ``si``. On a 2-D slice this is the CervAI-X sagittal
  diameter; in 3-D it is the same line in the cord's mid-sagittal plane.
- ``mscc`` (%) at each disc: (1 - D_i / ((D_a + D_b) / 2)) x 100 with D_i the cord diameter at
  the disc and D_a, D_b at the mid-body levels of the vertebrae directly above and below
  (the nearest levels where discs do not compress the cord).
- ``k_line`` (+1 = K-line(+), -1 = K-line(-)) and ``k_line_margin`` (mm), structure "C2-C7":
  the K-line joins the canal midpoints (middle of the canal's extent along ``ap`` behind the
  centroid) of C2 and C7; ``k_line_margin`` is the smallest distance from the line to the
  posterior-most reach (voxel face) of the C3-C6 bodies and the C2-C3 ... C6-C7 discs, within
  the mid-sagittal slab, measured posteriorly in the sagittal plane. K-line(-) when the
  margin is <= :data:`K_LINE_MIN_CLEARANCE_MM` (something anterior reaches the line).
- Level segments: the cord of vertebra ``v`` lies between the plane through the superior end
  of ``v``'s middle-height line (normal ``si`` of ``v``) and the same plane of ``v + 1``
  (the body and the disc below it); the last measured body ends at its own inferior end.
- ``cord_t2_mi`` (%) per level (needs the image): (max - min) x 100 / mean of the image over
  the cord voxels of the segment (all of them in 3-D) that lie farther than
  :data:`T2MI_CORD_EROSION_MM` from the cord's boundary. Without that erosion the voxels at the
  boundary, partial-volumed with bright CSF, set the maximum: on the U2AD clinical slices
  T2-MI was then 66-211% at every level and the labelled hyperintensity was missed; with it
  the labelled level is the one flagged. ``rsci`` = 3 T2-MI_i / (T2-MI_{i-1} +
  T2-MI_i + T2-MI_{i+1}) for levels with both neighbours. ``cord_t2_hyperintense`` (1/0):
  T2-MI >= :data:`T2MI_THRESHOLD` (23.7, the paper; the authors' code uses
  :data:`T2MI_THRESHOLD_CODE` = 22.5, also recorded) and RSCI >= :data:`RSCI_THRESHOLD`.
- ``cord_area`` (mm^2) per level, 3-D only: on each slice across the array axis closest to
  the patient's S-I axis, cord voxel count x in-plane pixel area x |cos| of the angle between
  the cord centreline (slice centroids, smoothed over 3 slices) and the slice normal; mean
  over the slices whose centroid lies in the level segment (structure "spinal_cord" when no
  body is labelled). Needs in-plane spacing <= :data:`CSA_MAX_INPLANE_SPACING_MM`.

**2-D and 3-D.** CervAI-X makes its measurements on the mid-sagittal slice in pixels. Here a
2-D input is measured in mm on its slice; a 3-D input is measured in 3-D and, when it holds a
cord or C2-C7, the CervAI-X measurements (:data:`MID_SAGITTAL_2D_NAMES`) are also made on its
mid-sagittal array slice (:func:`mid_sagittal_slice`) and reported with ``region`` =
"mid-sagittal 2-D", so both can be compared.

Every vertebra-level entry carries ``extra["centroid_mm"]`` (RAS+ world) and drawing
geometry (height segments, endplate line ends, K-line ends) in ``extra``. A measurement that
cannot be made is absent and ``warnings`` says why (too few vertebrae for an angle, no cord,
a body cut by the field of view, axial-only data where sagittal is needed); nothing is
guessed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from mskmri.errors import DimensionError, GeometryError, LabelError, MskMriError
from mskmri.labels import (
    CORD_HYPERINTENSITY,
    CSF,
    DISC_OFFSET,
    ORDINAL_VERTEBRA_START,
    SPINAL_CORD,
    VERTEBRA_ID,
    disc_name,
    vertebra_name,
)
from mskmri.measure._geometry import (
    RIGHT,
    SUPERIOR,
    Line2D,
    RaySampler,
    cast_rays,
    elevation_deg,
    fit_line_2d,
    patient_plane_axes,
    principal_axes,
    unit,
    voxel_half_extent,
)
from mskmri.measure.base import DIMENSIONLESS, Measurement, describe_input, measurements_document
from mskmri.volume import LabelVolume, Volume

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- thresholds
#: Height positions as fractions of the AP depth from the posterior edge (TotalSegmentator).
HEIGHT_FRACTIONS: Mapping[str, float] = MappingProxyType(
    {"anterior": 0.85, "middle": 0.50, "posterior": 0.15}
)
#: Thickness (mm) of the central slab: its enclosing rectangle starts the AP axis; K-line slab.
MIDSAGITTAL_SLAB_MM = 5.0
#: Width (mm) of the band of parallel lines averaged for one height or diameter.
HEIGHT_BAND_MM = 2.0
#: Spacing (mm) of the lines within a band.
BAND_STEP_MM = 0.5
#: Sampling step (mm) along a line.
RAY_STEP_MM = 0.1
#: A height, depth or diameter needs at least this fraction of its band's lines.
MIN_BAND_FRACTION = 0.5
#: Endplate points are taken between these fractions of the AP depth (from posterior).
ENDPLATE_FIT_RANGE = (0.15, 0.85)
#: Spacing (mm) of the endplate sampling lines.
ENDPLATE_STEP_MM = 0.5
#: Endplate points further than this many robust SDs from a first line fit are dropped.
ENDPLATE_OUTLIER_MAD = 3.0
#: Fewest points an endplate line is fitted to.
MIN_ENDPLATE_POINTS = 5
#: Fewest voxels a body (or disc, or cord level) must have to be measured.
MIN_STRUCTURE_VOXELS = 20
#: Relative gap between principal moments below which the principal axes are arbitrary.
DEGENERATE_MOMENT_GAP = 0.10
#: The AP axis iteration stops when the axis moves less than this (deg).
AXIS_TOLERANCE_DEG = 0.2
#: Most passes of the AP axis iteration.
MAX_AXIS_ITERATIONS = 20
#: Fraction of the way the AP axis moves towards the endplate bisector per pass.
AXIS_RELAXATION = 0.5
#: An endplate-bisector axis that turned more than this (deg) from its start is refused.
MAX_AXIS_ROTATION_DEG = 30.0
#: Largest voxel spacing (mm) along the patient's S-I axis for sagittal measurements.
MAX_SI_SPACING_MM = 2.0
#: Fraction of a label's voxels outside its largest component above which a warning is given.
ISLAND_WARN_FRACTION = 0.01
#: Half-thickness (mm) of the slab around a level used to find the cord's mid-sagittal plane.
CORD_LEVEL_HALF_SLAB_MM = 2.0
#: K-line(-) when the margin (mm) between the line and anterior structures is at most this.
K_LINE_MIN_CLEARANCE_MM = 0.0
#: T2-MI (%) at or above which a level may be hyperintense (CervAI-X paper).
T2MI_THRESHOLD = 23.7
#: The same threshold as used in the CervAI-X authors' code (%), recorded alongside.
T2MI_THRESHOLD_CODE = 22.5
#: RSCI at or above which a level may be hyperintense (CervAI-X).
RSCI_THRESHOLD = 1.2
#: T2-MI uses only cord voxels farther than this (mm) from the cord's boundary.
T2MI_CORD_EROSION_MM = 1.0
#: Largest in-plane spacing (mm) for the cord cross-sectional area.
CSA_MAX_INPLANE_SPACING_MM = 1.0
#: Connected components smaller than this fraction of the median are dropped when splitting.
MIN_INSTANCE_FRACTION = 0.2
#: A body taller than this times the median (along S-I) may be two merged bodies (warning).
MERGED_BODY_RATIO = 1.6

#: Usual AP depth (mm) of adult vertebral bodies per region; outside it a warning asks
#: whether the label map really uses the project's (VerSe) level ids.
PLAUSIBLE_DEPTH_MM: Mapping[str, tuple[float, float]] = MappingProxyType(
    {"C": (10.0, 30.0), "T": (15.0, 50.0), "L": (22.0, 60.0)}
)

#: Standard Cobb angles: (upper level, lower level, upper endplate, lower endplate).
STANDARD_COBB_PAIRS: tuple[tuple[str, str, str, str], ...] = (
    ("C2", "C7", "inferior", "inferior"),
    ("T4", "T12", "superior", "inferior"),
    ("L1", "L5", "superior", "inferior"),
)

#: Measurements that CervAI-X makes on the mid-sagittal slice: for a 3-D map they are also
#: made on that slice and reported with region :data:`MID_SAGITTAL_REGION`.
MID_SAGITTAL_2D_NAMES = (
    "cobb_angle", "cord_ap_diameter", "mscc", "k_line", "k_line_margin", "cord_t2_mi", "rsci",
    "cord_t2_hyperintense",
)
MID_SAGITTAL_REGION = "mid-sagittal 2-D"
_2D_WARNING_WORDS = ("cord", "MSCC", "K-line", "RSCI", "T2-MI", "cobb_angle C2-C7")

_SACRUM = 26
_ORDINAL_DISC_START = ORDINAL_VERTEBRA_START + DISC_OFFSET
_CORD_VALUES = (SPINAL_CORD, CORD_HYPERINTENSITY)
_CANAL_VALUES = (SPINAL_CORD, CSF, CORD_HYPERINTENSITY)

HEIGHT_METHOD = (
    "extent along the body's own S-I axis in its mid-sagittal plane at {pct}% of the AP depth "
    "from the posterior edge, mean of a {band:g} mm band of lines"
)
ENDPLATE_METHOD = (
    "total-least-squares line through the {which} endplate points of the mid-sagittal plane "
    "(15-85% of the AP depth); elevation of its anterior end above the patient's axial plane"
)
COBB_METHOD = (
    "angle between the {upper} endplate of {u} and the {lower} endplate of {lo} in their common "
    "sagittal plane; positive = lordosis (lines converge posteriorly)"
)
DISC_MASK_METHOD = "extent of the disc mask along the disc's own S-I axis at {pct}% of its AP depth"
DISC_GAP_METHOD = (
    "gap between adjacent bodies along their mean S-I axis at {pct}% of their mean AP depth"
)
CORD_DIAMETER_METHOD = (
    "extent of the cord along the level's AP axis in the cord's mid-sagittal plane, mean of a "
    "{band:g} mm band ({dims})"
)
MSCC_METHOD = "(1 - D_i / ((D_a + D_b) / 2)) x 100, D_a/D_b = cord diameter at the bodies above/below"
K_LINE_METHOD = (
    "line between the canal midpoints at C2 and C7; margin = distance to the posterior-most "
    "reach of the C3-C6 bodies and C2-C7 discs (negative = crosses); +1 K-line(+), -1 K-line(-)"
)
T2MI_METHOD = (
    "(max - min) x 100 / mean of the image over the level's cord voxels deeper than "
    f"{T2MI_CORD_EROSION_MM:g} mm ({{dims}})"
)
RSCI_METHOD = "3 T2-MI_i / (T2-MI_(i-1) + T2-MI_i + T2-MI_(i+1))"
HYPER_METHOD = (
    f"T2-MI >= {T2MI_THRESHOLD} % (paper; code: {T2MI_THRESHOLD_CODE}) and RSCI >= "
    f"{RSCI_THRESHOLD}; 1 = hyperintense"
)
CSA_METHOD = (
    "cord voxels per slice x pixel area x |cos(centreline, slice normal)|, mean over the "
    "level's slices"
)


# ----------------------------------------------------------------------------- values
def is_vertebra_value(value: int) -> bool:
    """True for a measurable vertebral-body id: VerSe 1-25 or ordinal 1000-1099."""
    return 1 <= value <= 25 or ORDINAL_VERTEBRA_START <= value < _ORDINAL_DISC_START


def is_disc_value(value: int) -> bool:
    """True for a disc id: 101-125 (VerSe) or 1100-1199 (below an ordinal vertebra)."""
    return (DISC_OFFSET + 1 <= value <= DISC_OFFSET + 25) or (
        _ORDINAL_DISC_START <= value < _ORDINAL_DISC_START + DISC_OFFSET
    )


def _is_spine_value(value: int) -> bool:
    return (
        is_vertebra_value(value) or is_disc_value(value) or value == _SACRUM
        or value in (SPINAL_CORD, CSF, CORD_HYPERINTENSITY)
    )


def _level_name(value: int) -> str:
    return vertebra_name(value)


def _disc_structure(upper: int) -> str:
    return disc_name(upper)


def check_spine_labels(seg: LabelVolume) -> None:
    """Raise :class:`LabelError` when ``seg`` holds values outside the spine schema."""
    unknown = [v for v in seg.present_values() if not _is_spine_value(v)]
    if unknown:
        src = seg.meta.get("source", "the label map")
        raise LabelError(
            f"{src} holds label values {unknown} that the spine schema does not define "
            "(vertebrae 1-26 or 1000-1099, discs 101-125 or 1100-1199, 201-203); map it to "
            "the project's spine schema first (mskmri.labels.SOURCES has a table per source)"
        )


# ----------------------------------------------------------------------------- 2-D slices
_AXIS_VECTORS: Mapping[str, tuple[float, float, float]] = MappingProxyType({
    "R": (1.0, 0.0, 0.0), "L": (-1.0, 0.0, 0.0), "A": (0.0, 1.0, 0.0),
    "P": (0.0, -1.0, 0.0), "S": (0.0, 0.0, 1.0), "I": (0.0, 0.0, -1.0),
})


def _slice_affine(
    spacing_mm: Sequence[float], row_axis: str, col_axis: str, thickness_mm: float
) -> np.ndarray:
    if len(spacing_mm) != 2 or any(float(s) <= 0 for s in spacing_mm):
        raise GeometryError(
            f"a 2-D slice needs its pixel spacing as two positive numbers in mm (rows, "
            f"columns), not {spacing_mm!r}"
        )
    try:
        r = np.asarray(_AXIS_VECTORS[row_axis.upper()])
        c = np.asarray(_AXIS_VECTORS[col_axis.upper()])
    except KeyError as exc:
        raise GeometryError(
            f"axis code {exc.args[0]!r} is not one of R, L, A, P, S, I (RAS+ convention: the "
            "direction in which the row or column index increases)"
        ) from None
    if abs(float(r @ c)) > 0:
        raise GeometryError(f"row axis {row_axis!r} and column axis {col_axis!r} are parallel")
    n = np.cross(r, c)
    aff = np.eye(4)
    aff[:3, 0] = r * float(spacing_mm[0])
    aff[:3, 1] = c * float(spacing_mm[1])
    aff[:3, 2] = n * float(thickness_mm)
    return aff


def slice_label_volume(
    labels: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    row_axis: str = "I",
    col_axis: str = "P",
    thickness_mm: float | None = None,
    names: Mapping[int, str] | None = None,
    source: str | None = None,
) -> LabelVolume:
    """A 2-D sagittal label slice as a one-slice :class:`LabelVolume` with explicit geometry.

    Parameters
    ----------
    labels : (H, W) integer ndarray
        Label slice in the spine schema.
    spacing_mm : (2,) sequence of float
        Pixel spacing in mm along rows and columns. Required: no spacing, no measurement.
    row_axis, col_axis : str
        RAS+ axis code the row / column index increases towards (default: rows run
        superior -> inferior, columns anterior -> posterior, i.e. the patient faces left).
    thickness_mm : float, optional
        Slice thickness; only recorded (no measurement on a slice uses it). When None the
        smaller pixel spacing is put in the affine and ``meta["slice_thickness_known"]`` is
        False.
    names : mapping, optional
        Value -> name table (default: spine-schema names of the values present).
    source : str, optional
        Recorded as ``meta["source"]``.

    Returns
    -------
    LabelVolume
        Shape (H, W, 1).
    """
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise DimensionError(f"a label slice must be 2-D, not {arr.ndim}-D with shape {arr.shape}")
    known = thickness_mm is not None
    thick = float(thickness_mm) if thickness_mm is not None else float(min(spacing_mm))
    aff = _slice_affine(spacing_mm, row_axis, col_axis, thick)
    vals = [int(v) for v in np.unique(arr) if v != 0]
    if names is None:
        names = {v: _value_name(v) for v in vals if _is_spine_value(v)}
    meta: dict[str, Any] = {"slice_thickness_known": known, "planar": True}
    if source is not None:
        meta["source"] = source
    return LabelVolume(arr[:, :, None], aff, names, schema="spine", meta=meta)


def slice_image_volume(
    image: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    row_axis: str = "I",
    col_axis: str = "P",
    thickness_mm: float | None = None,
) -> Volume:
    """A 2-D image slice as a one-slice :class:`Volume` (same geometry rules as
    :func:`slice_label_volume`, so the two share a grid)."""
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise DimensionError(f"an image slice must be 2-D, not {arr.ndim}-D with shape {arr.shape}")
    thick = float(thickness_mm) if thickness_mm is not None else float(min(spacing_mm))
    aff = _slice_affine(spacing_mm, row_axis, col_axis, thick)
    return Volume(arr[:, :, None], aff, {"slice_thickness_known": thickness_mm is not None})


def _value_name(value: int) -> str:
    if is_vertebra_value(value) or value == _SACRUM:
        return vertebra_name(value)
    if is_disc_value(value):
        return f"disc_{disc_name(value - DISC_OFFSET)}"
    return {SPINAL_CORD: "spinal_cord", CSF: "csf",
            CORD_HYPERINTENSITY: "cord_t2_hyperintensity"}.get(value, str(value))


# ----------------------------------------------------------------------------- geometry types
@dataclass(frozen=True)
class SectionFrame:
    """The own axes of a body or disc (unit vectors in RAS+ world).

    Attributes
    ----------
    centre : (3,) ndarray
        Centroid, world mm.
    lr, ap, si : (3,) ndarray
        Left-right (to the right), anterior-posterior (anterior) and superior-inferior
        (superior) axes; ``si = lr x ap``.
    planar : bool
        True for a one-slice (2-D) volume.
    axis_source : str
        Where ``ap`` came from (``"bisector of the endplate lines"``, ...).
    iterations : int
        Passes of the axis iteration.
    """

    centre: np.ndarray
    lr: np.ndarray
    ap: np.ndarray
    si: np.ndarray
    planar: bool
    axis_source: str = ""
    iterations: int = 0


@dataclass(frozen=True)
class Endplate:
    """A fitted endplate line in a body's mid-sagittal plane.

    Attributes
    ----------
    point : (3,) ndarray
        Centre of the fitted points, world mm.
    direction : (3,) ndarray
        Unit direction, pointing anteriorly.
    ends : (2, 3) ndarray
        Posterior and anterior ends of the fitted segment, world mm (for drawing).
    elevation_deg : float
        Elevation of the anterior end above the patient's axial plane, in the body's plane.
    n_points : int
        Points the line was fitted to.
    rms_mm : float
        RMS perpendicular residual.
    """

    point: np.ndarray
    direction: np.ndarray
    ends: np.ndarray
    elevation_deg: float
    n_points: int
    rms_mm: float


@dataclass
class SectionGeometry:
    """Geometry of one vertebral body or disc: frame, depth, heights, endplates.

    Attributes
    ----------
    value : int
        Label value.
    structure : str
        Level name (``"L3"``, ``"V1002"``, ``"L3-L4"``).
    frame : SectionFrame
    voxels : int
        Voxels measured (largest connected component).
    posterior_t, anterior_t : float
        Posterior and anterior edges along ``frame.ap`` from ``frame.centre`` (mm).
    heights : dict of str to float
        ``"anterior"``, ``"middle"``, ``"posterior"`` -> height in mm (absent when not made).
    segments : dict of str to (2, 3) ndarray
        Superior and inferior ends of each height's central line (world mm).
    mid_top, mid_bottom : (3,) ndarray or None
        Superior / inferior end of the middle-height line (None when cut by the view).
    superior, inferior : Endplate or None
    notes : list of str
        Why something was not measured.
    """

    value: int
    structure: str
    frame: SectionFrame
    voxels: int
    posterior_t: float = float("nan")
    anterior_t: float = float("nan")
    heights: dict[str, float] = field(default_factory=dict)
    segments: dict[str, np.ndarray] = field(default_factory=dict)
    mid_top: np.ndarray | None = None
    mid_bottom: np.ndarray | None = None
    superior: Endplate | None = None
    inferior: Endplate | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def depth(self) -> float:
        """AP depth in mm."""
        return float(self.anterior_t - self.posterior_t)


@dataclass(frozen=True)
class KLine:
    """The K-line: canal midpoints at C2 and C7 and the margin to anterior structures (mm)."""

    c2_point: np.ndarray
    c7_point: np.ndarray
    margin_mm: float
    closest_point: np.ndarray | None

    @property
    def positive(self) -> bool:
        """True for K-line(+)."""
        return self.margin_mm > K_LINE_MIN_CLEARANCE_MM


@dataclass
class SpineAnalysis:
    """Everything :func:`analyse_spine` found: measurements, warnings and drawable geometry.

    Attributes
    ----------
    measurements : list of Measurement
    warnings : list of str
    vertebrae : dict of str to SectionGeometry
        Measured bodies, top to bottom.
    discs : dict of str to SectionGeometry
        Discs measured from disc masks.
    k_line : KLine or None
    mid_sagittal : SpineAnalysis or None
        The analysis of the mid-sagittal slice of a 3-D map (see :func:`analyse_spine`).
    """

    measurements: list[Measurement] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    vertebrae: dict[str, SectionGeometry] = field(default_factory=dict)
    discs: dict[str, SectionGeometry] = field(default_factory=dict)
    k_line: KLine | None = None
    mid_sagittal: SpineAnalysis | None = None


# ----------------------------------------------------------------------------- helpers
def _band(width: float) -> np.ndarray:
    half = 0.5 * width
    n = int(round(half / BAND_STEP_MM))
    return np.arange(-n, n + 1) * BAND_STEP_MM if n > 0 else np.zeros(1)


def _planar_normal(vol: Volume) -> np.ndarray | None:
    singles = [a for a, s in enumerate(vol.shape) if s == 1]
    if not singles:
        return None
    if len(singles) > 1:
        raise DimensionError(
            f"label map of shape {vol.shape} has more than one axis of length 1; give a 2-D "
            "slice or a 3-D volume"
        )
    n = unit(vol.direction[:, singles[0]])
    return n if n @ RIGHT >= 0 else -n


def _largest_component(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Largest 26-connected component of ``mask`` and the number of voxels dropped."""
    import cc3d

    lab = cc3d.connected_components(mask.astype(np.uint8), connectivity=26)
    counts = np.bincount(lab.ravel())
    if counts.size <= 2:
        return mask, 0
    keep = int(np.argmax(counts[1:]) + 1)
    out = lab == keep
    return out, int(mask.sum() - counts[keep])


def _crop_sampler(mask: np.ndarray, affine: np.ndarray) -> tuple[RaySampler, np.ndarray]:
    """Sampler over the bounding box of ``mask`` plus one voxel, and the mask's voxel indices.

    The one-voxel margin is enough for :func:`cast_rays` to tell a real boundary (the next
    sample is background, 0) from the edge of the field of view (the next sample lies outside
    the original array, so also outside the crop: -1).
    """
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - 1, 0)
    hi = np.minimum(idx.max(axis=0) + 2, mask.shape)
    sub = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.int64)
    aff = affine.copy()
    aff[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return RaySampler(sub, aff), idx


def _plane_normal(
    pts: np.ndarray, *, planar_normal: np.ndarray | None, name: str
) -> tuple[np.ndarray, list[str]]:
    """Normal ``lr`` of the mid-sagittal plane (module docstring) from world points (N, 3)."""
    if planar_normal is not None:
        return planar_normal, []
    _, w, v = principal_axes(pts)
    j = int(np.argmax(np.abs(v.T @ RIGHT)))
    gap = min(abs(w[j] - w[k]) / max(w[j], w[k], 1e-12) for k in range(3) if k != j)
    if gap < DEGENERATE_MOMENT_GAP:
        return RIGHT.copy(), [
            f"{name}: its left-right and another principal moment differ by {100 * gap:.0f}% "
            f"(< {100 * DEGENERATE_MOMENT_GAP:.0f}%), so the patient L-R axis is used as the "
            "normal of its mid-sagittal plane"
        ]
    lr = unit(v[:, j])
    return (lr if lr @ RIGHT >= 0 else -lr), []


def _ray_half_length(pts: np.ndarray, centre: np.ndarray) -> float:
    return float(np.sqrt(((pts - centre) ** 2).sum(axis=1).max())) + 5.0


def _depth_and_endplates(
    sampler: RaySampler, geo: SectionGeometry, half: float
) -> None:
    """AP depth and endplate lines of ``geo`` in ``geo.frame`` (filled in place)."""
    f = geo.frame
    c, ap, si = f.centre, f.ap, f.si
    band = _band(HEIGHT_BAND_MM)
    hits = cast_rays(sampler, c + band[:, None] * si, ap, [1], t_min=-half, t_max=half,
                     step=RAY_STEP_MM)
    ok = ~(hits.start_cut | hits.stop_cut) & np.isfinite(hits.start)
    if ok.mean() < MIN_BAND_FRACTION:
        geo.notes.append(f"{geo.structure}: its AP depth could not be measured (cut by the field "
                         "of view or hollow at the centre); no heights or endplates")
        return
    geo.posterior_t = float(np.median(hits.start[ok]))
    geo.anterior_t = float(np.median(hits.stop[ok]))
    depth = geo.depth
    f0, f1 = ENDPLATE_FIT_RANGE
    ts = np.arange(geo.posterior_t + f0 * depth, geo.posterior_t + f1 * depth + 1e-9,
                   ENDPLATE_STEP_MM)
    if ts.size < MIN_ENDPLATE_POINTS:
        geo.notes.append(f"{geo.structure}: too shallow for endplate lines ({depth:.1f} mm)")
        return
    # one boundary point per AP position: the mean over the thin band across the plane
    lr_band = np.zeros(1) if f.planar else _band(HEIGHT_BAND_MM)
    origins = (c + ts[:, None, None] * ap + lr_band[None, :, None] * f.lr).reshape(-1, 3)
    e = cast_rays(sampler, origins, si, [1], t_min=-half, t_max=half, step=RAY_STEP_MM)
    for which, s_val, cut in (("superior", e.stop, e.stop_cut),
                              ("inferior", e.start, e.start_cut)):
        ok = (np.isfinite(s_val) & ~cut).reshape(ts.size, lr_band.size)
        vals = np.where(ok, s_val.reshape(ts.size, lr_band.size), 0.0)
        keep = ok.mean(axis=1) >= MIN_BAND_FRACTION
        s_mean = vals.sum(axis=1) / np.maximum(ok.sum(axis=1), 1)
        line = fit_line_2d(np.stack([ts[keep], s_mean[keep]], axis=1),
                           outlier_mad=ENDPLATE_OUTLIER_MAD, min_points=MIN_ENDPLATE_POINTS)
        if line is None:
            geo.notes.append(f"{geo.structure}: {which} endplate not measured (too few boundary "
                             "points inside the field of view)")
            continue
        setattr(geo, which, _endplate_from_line(line, f))


def _min_area_rectangle_angle(xy: np.ndarray) -> float:
    """Angle (rad, in [0, pi/2)) of a side of the smallest-area rectangle enclosing ``xy``.

    Rotating calipers over the convex hull edges (the optimal rectangle has a side on one).
    """
    from scipy.spatial import ConvexHull, QhullError

    try:
        hull = xy[ConvexHull(xy).vertices]
    except (QhullError, ValueError):
        return 0.0
    edges = np.diff(np.vstack([hull, hull[:1]]), axis=0)
    angles = np.unique(np.mod(np.arctan2(edges[:, 1], edges[:, 0]), np.pi / 2))
    best, best_area = 0.0, np.inf
    for ang in angles:
        c, s = np.cos(ang), np.sin(ang)
        u = xy @ np.array([c, s])
        v = xy @ np.array([-s, c])
        area = float(np.ptp(u) * np.ptp(v))
        if area < best_area:
            best, best_area = float(ang), area
    return best


def _initial_ap(rel: np.ndarray, lr: np.ndarray, planar: bool) -> np.ndarray:
    """Start of the AP axis iteration: the side of the smallest enclosing rectangle of the
    mid-sagittal slab (projected on the plane) closest to the patient's anterior direction."""
    e_s, e_a = patient_plane_axes(lr)
    if not planar:
        rel = rel[np.abs(rel @ lr) <= 0.5 * MIDSAGITTAL_SLAB_MM]
    if rel.shape[0] < MIN_STRUCTURE_VOXELS:
        return e_a
    xy = np.stack([rel @ e_a, rel @ e_s], axis=1)
    ang = _min_area_rectangle_angle(xy)
    if ang > np.pi / 4:  # the other side is closer to the patient's AP direction
        ang -= np.pi / 2
    return unit(np.cos(ang) * e_a + np.sin(ang) * e_s)


def _single_pass(
    sampler: RaySampler, centre: np.ndarray, half: float, lr: np.ndarray, ap: np.ndarray,
    planar: bool, source: str, iterations: int, *, value: int, structure: str, voxels: int,
) -> SectionGeometry:
    frame = SectionFrame(centre, lr, ap, unit(np.cross(lr, ap)), planar, source, iterations)
    geo = SectionGeometry(value=value, structure=structure, frame=frame, voxels=voxels)
    _depth_and_endplates(sampler, geo, half)
    return geo


def _analyse_section(
    sampler: RaySampler,
    pts: np.ndarray,
    *,
    lr: np.ndarray,
    planar: bool,
    value: int,
    structure: str,
    voxels: int,
) -> SectionGeometry:
    """Frame, depth, endplates and heights of one body or disc (see the module docstring).

    The AP axis starts from the smallest enclosing rectangle of the mid-sagittal section
    (:func:`_initial_ap`) and moves :data:`AXIS_RELAXATION` of the way to the bisector of the
    fitted endplate lines until it moves less than :data:`AXIS_TOLERANCE_DEG` (at most
    :data:`MAX_AXIS_ITERATIONS` passes). C2 keeps the starting axis (its dens makes the
    superior "endplate" meaningless); an axis that turns more than
    :data:`MAX_AXIS_ROTATION_DEG` from the start is refused and the start is kept.
    """
    centre = pts.mean(axis=0)
    half = _ray_half_length(pts, centre)
    ap0 = _initial_ap(pts - centre, lr, planar)
    kw: dict[str, Any] = {"value": value, "structure": structure, "voxels": voxels}
    rect = "smallest enclosing rectangle of the mid-sagittal section"
    if value == VERTEBRA_ID["C2"]:
        geo = _single_pass(sampler, centre, half, lr, ap0, planar, rect + " (C2: dens)", 1, **kw)
    else:
        ap = ap0
        source = rect + " (endplates not found)"
        moved = float("inf")
        for it in range(1, MAX_AXIS_ITERATIONS + 1):
            geo = _single_pass(sampler, centre, half, lr, ap, planar, source, it, **kw)
            if geo.superior is None or geo.inferior is None:
                break
            target = unit(geo.superior.direction + geo.inferior.direction)
            target = unit(target - (target @ lr) * lr)
            # relaxed update: move part of the way, so that a boundary point flipping in and
            # out of the fit range cannot make the axis jump back and forth
            new = unit((1.0 - AXIS_RELAXATION) * ap + AXIS_RELAXATION * target)
            moved = float(np.degrees(np.arccos(np.clip(new @ ap, -1.0, 1.0))))
            ap = new
            source = "bisector of the endplate lines"
            if moved < AXIS_TOLERANCE_DEG:
                geo = _single_pass(sampler, centre, half, lr, ap, planar, source, it + 1, **kw)
                break
        else:
            geo.notes.append(f"{structure}: its AP axis still moved {moved:.2f} deg after "
                             f"{MAX_AXIS_ITERATIONS} iterations")
        turned = float(np.degrees(np.arccos(np.clip(geo.frame.ap @ ap0, -1.0, 1.0))))
        if turned > MAX_AXIS_ROTATION_DEG:
            notes = [f"{structure}: the endplate bisector turned {turned:.0f} deg from the "
                     f"enclosing rectangle (> {MAX_AXIS_ROTATION_DEG:g}); the rectangle's axis "
                     "is used"]
            geo = _single_pass(sampler, centre, half, lr, ap0, planar, rect, 1, **kw)
            geo.notes[:0] = notes
    if not np.isfinite(geo.depth):
        return geo
    _heights(sampler, geo, half)
    return geo


def _heights(sampler: RaySampler, geo: SectionGeometry, half: float) -> None:
    """Heights at :data:`HEIGHT_FRACTIONS` of the depth (filled in place)."""
    f = geo.frame
    c, lr, ap, si = f.centre, f.lr, f.ap, f.si
    band = _band(HEIGHT_BAND_MM)
    lr_band = np.zeros(1) if f.planar else band
    da, dl = np.meshgrid(band, lr_band, indexing="ij")
    da, dl = da.ravel(), dl.ravel()
    centre_ray = int(np.argmin(np.abs(da) + np.abs(dl)))
    for label, frac in HEIGHT_FRACTIONS.items():
        t = geo.posterior_t + frac * geo.depth
        base = c + t * ap
        origins = base + da[:, None] * ap + dl[:, None] * lr
        h = cast_rays(sampler, origins, si, [1], t_min=-half, t_max=half, step=RAY_STEP_MM)
        ext = h.extent
        good = np.isfinite(ext)
        if label == "middle":
            cr = centre_ray
            if np.isfinite(h.stop[cr]) and not h.stop_cut[cr]:
                geo.mid_top = base + h.stop[cr] * si
            if np.isfinite(h.start[cr]) and not h.start_cut[cr]:
                geo.mid_bottom = base + h.start[cr] * si
        if good.mean() < MIN_BAND_FRACTION:
            geo.notes.append(f"{geo.structure}: {label} height not measured (its lines run into "
                             "the edge of the field of view or miss the mask)")
            continue
        geo.heights[label] = float(np.mean(ext[good]))
        lo = float(np.mean(h.start[good]))
        hi = float(np.mean(h.stop[good]))
        geo.segments[label] = np.stack([base + hi * si, base + lo * si])


def _endplate_from_line(line: Line2D, frame: SectionFrame) -> Endplate:
    c, ap, si = frame.centre, frame.ap, frame.si
    point = c + line.centre[0] * ap + line.centre[1] * si
    d = unit(line.direction[0] * ap + line.direction[1] * si)
    ends = np.stack([point + line.extent[0] * d, point + line.extent[1] * d])
    return Endplate(point=point, direction=d, ends=ends,
                    elevation_deg=elevation_deg(d, frame.lr), n_points=line.n_points,
                    rms_mm=line.rms)


def _section_points(
    seg: LabelVolume, value: int, name: str, warnings: list[str]
) -> tuple[np.ndarray, RaySampler, int] | None:
    mask = seg.array == value
    n_all = int(mask.sum())
    if n_all < MIN_STRUCTURE_VOXELS:
        warnings.append(f"{name}: only {n_all} voxels (< {MIN_STRUCTURE_VOXELS}); not measured")
        return None
    mask, dropped = _largest_component(mask)
    if dropped > ISLAND_WARN_FRACTION * n_all:
        warnings.append(f"{name}: {dropped} of {n_all} voxels lie outside its largest connected "
                        "part and were ignored")
    sampler, idx = _crop_sampler(mask, seg.affine)
    pts = seg.voxel_to_world(idx)
    return pts, sampler, int(idx.shape[0])


def _sagittal_ok(seg: LabelVolume, planar_normal: np.ndarray | None) -> str | None:
    """None when sagittal measurements can be made, else the reason."""
    if planar_normal is not None:
        if abs(float(planar_normal @ RIGHT)) < np.cos(np.radians(45)):
            return ("the 2-D slice is not sagittal (its normal is not along the patient's "
                    "left-right axis); sagittal measurements need a sagittal slice")
        return None
    cos_s = np.abs(seg.direction.T @ SUPERIOR)
    ax = int(np.argmax(cos_s))
    sp = seg.spacing[ax]
    if sp > MAX_SI_SPACING_MM:
        return (f"the voxel spacing along the patient's superior-inferior axis is {sp:.1f} mm "
                f"(> {MAX_SI_SPACING_MM} mm): axial-only data; heights, endplates, angles and "
                "cord diameters need sagittal or 3-D images")
    return None


# ----------------------------------------------------------------------------- public geometry
def cobb_angle(
    upper: SectionGeometry,
    lower: SectionGeometry,
    *,
    upper_endplate: str = "superior",
    lower_endplate: str = "inferior",
) -> float:
    """Signed Cobb angle (deg) between an endplate of ``upper`` and one of ``lower``.

    Parameters
    ----------
    upper, lower : SectionGeometry
        Measured bodies (``upper`` cranial to ``lower``).
    upper_endplate, lower_endplate : {"superior", "inferior"}
        Which endplate of each.

    Returns
    -------
    float
        elevation(upper line) - elevation(lower line), both in the common sagittal plane
        (normal = normalised mean of the two ``lr`` axes): positive = lordosis (the lines
        converge posteriorly), negative = kyphosis. NaN when an endplate is missing.
    """
    for which in (upper_endplate, lower_endplate):
        if which not in ("superior", "inferior"):
            raise ValueError(f"endplate must be 'superior' or 'inferior', not {which!r}")
    eu = getattr(upper, upper_endplate)
    el = getattr(lower, lower_endplate)
    if eu is None or el is None:
        return float("nan")
    n = unit(upper.frame.lr + lower.frame.lr)
    return elevation_deg(eu.direction, n) - elevation_deg(el.direction, n)


def _vertebra_measurements(geo: SectionGeometry) -> list[Measurement]:
    extra_base = {"centroid_mm": geo.frame.centre, "label": geo.value}
    out: list[Measurement] = []
    for label, frac in HEIGHT_FRACTIONS.items():
        if label not in geo.heights:
            continue
        out.append(Measurement(
            name=f"{label}_height", value=geo.heights[label], unit="mm", structure=geo.structure,
            method=HEIGHT_METHOD.format(pct=round(100 * frac), band=HEIGHT_BAND_MM),
            extra={**extra_base, "segment_mm": geo.segments[label],
                   "ap_depth_mm": geo.depth},
        ))
    h = geo.heights
    if "anterior" in h and "posterior" in h and h["posterior"] > 0:
        out.append(Measurement(
            name="wedge_ratio", value=h["anterior"] / h["posterior"], unit=DIMENSIONLESS,
            structure=geo.structure, method="anterior_height / posterior_height",
            extra=extra_base,
        ))
    if len(h) == 3 and max(h.values()) > 0:
        out.append(Measurement(
            name="min_max_height_ratio", value=min(h.values()) / max(h.values()),
            unit=DIMENSIONLESS, structure=geo.structure,
            method="min / max of the anterior, middle and posterior heights "
                   "(TotalSegmentator flags < 0.8)",
            extra=extra_base,
        ))
    for which in ("superior", "inferior"):
        ep = getattr(geo, which)
        if ep is None:
            continue
        out.append(Measurement(
            name=f"{which}_endplate_angle", value=ep.elevation_deg, unit="deg",
            structure=geo.structure, method=ENDPLATE_METHOD.format(which=which),
            extra={**extra_base, "line_mm": ep.ends, "fit_points": ep.n_points,
                   "fit_rms_mm": ep.rms_mm},
        ))
    if geo.superior is not None and geo.inferior is not None:
        n = geo.frame.lr
        out.append(Measurement(
            name="wedge_angle",
            value=elevation_deg(geo.superior.direction, n) - elevation_deg(geo.inferior.direction, n),
            unit="deg", structure=geo.structure,
            method="superior minus inferior endplate angle (positive = opens anteriorly)",
            extra=extra_base,
        ))
    return out


def _disc_from_gap(
    sampler: RaySampler, upper: SectionGeometry, lower: SectionGeometry, structure: str
) -> tuple[SectionGeometry | None, list[str]]:
    """Disc heights as the gap between two adjacent bodies (module docstring)."""
    lr = unit(upper.frame.lr + lower.frame.lr)
    ap0 = upper.frame.ap + lower.frame.ap
    ap = unit(ap0 - (ap0 @ lr) * lr)
    si = unit(np.cross(lr, ap))
    if upper.inferior is not None and lower.superior is not None:
        centre = 0.5 * (upper.inferior.point + lower.superior.point)
    else:
        centre = 0.5 * (upper.frame.centre + lower.frame.centre)
    frame = SectionFrame(centre, lr, ap, si, upper.frame.planar, "mean of the two bodies' axes")
    geo = SectionGeometry(value=0, structure=structure, frame=frame, voxels=0)
    if not (np.isfinite(upper.depth) and np.isfinite(lower.depth)):
        return None, [f"disc {structure}: the AP depth of a neighbouring body is unknown; "
                      "disc heights not measured"]
    post = [((b.frame.centre + b.posterior_t * b.frame.ap) - centre) @ ap for b in (upper, lower)]
    ant = [((b.frame.centre + b.anterior_t * b.frame.ap) - centre) @ ap for b in (upper, lower)]
    geo.posterior_t, geo.anterior_t = float(np.mean(post)), float(np.mean(ant))
    half = float(np.linalg.norm(upper.frame.centre - lower.frame.centre)) + 0.5 * max(
        upper.depth, lower.depth) + 10.0
    band = _band(HEIGHT_BAND_MM)
    lr_band = np.zeros(1) if frame.planar else band
    da, dl = np.meshgrid(band, lr_band, indexing="ij")
    da, dl = da.ravel(), dl.ravel()
    notes: list[str] = []
    for label, frac in HEIGHT_FRACTIONS.items():
        t = geo.posterior_t + frac * geo.depth
        origins = centre + (t + da)[:, None] * ap + dl[:, None] * lr
        hu = cast_rays(sampler, origins, si, [upper.value], t_min=0.0 - half, t_max=half,
                       step=RAY_STEP_MM)
        hl = cast_rays(sampler, origins, si, [lower.value], t_min=-half, t_max=half,
                       step=RAY_STEP_MM)
        gap = hu.start - hl.stop
        good = (np.isfinite(gap) & ~hu.start_cut & ~hl.stop_cut & (gap >= 0))
        if good.mean() < MIN_BAND_FRACTION:
            notes.append(f"disc {structure}: {label} height not measured (the lines do not meet "
                         "both bodies)")
            continue
        geo.heights[label] = float(np.mean(gap[good]))
        base = centre + t * ap
        geo.segments[label] = np.stack([base + float(np.mean(hu.start[good])) * si,
                                        base + float(np.mean(hl.stop[good])) * si])
    return geo, notes


def _disc_measurements(geo: SectionGeometry, method: str, extra: Mapping[str, Any]) -> list[Measurement]:
    out = []
    for label, frac in HEIGHT_FRACTIONS.items():
        if label not in geo.heights:
            continue
        out.append(Measurement(
            name=f"disc_{label}_height", value=geo.heights[label], unit="mm",
            structure=geo.structure, method=method.format(pct=round(100 * frac)),
            extra={"centroid_mm": geo.frame.centre, **extra, "segment_mm": geo.segments[label]},
        ))
    return out


# ----------------------------------------------------------------------------- cord
def _cord_offset(cord_pts: np.ndarray, centre: np.ndarray, frame: SectionFrame) -> float | None:
    rel = cord_pts - centre
    near = np.abs(rel @ frame.si) <= CORD_LEVEL_HALF_SLAB_MM
    if near.sum() == 0:
        return None
    return 0.0 if frame.planar else float(np.mean(rel[near] @ frame.lr))


def _cord_diameter(
    sampler: RaySampler, cord_pts: np.ndarray, centre: np.ndarray, frame: SectionFrame
) -> tuple[float, np.ndarray | None]:
    """Cord AP diameter (mm) through ``centre`` along ``frame.ap`` and the drawn segment."""
    off = _cord_offset(cord_pts, centre, frame)
    if off is None:
        return float("nan"), None
    band = _band(HEIGHT_BAND_MM)
    origins = centre + off * frame.lr + band[:, None] * frame.si
    h = cast_rays(sampler, origins, frame.ap, list(_CORD_VALUES), t_min=-120.0, t_max=120.0,
                  step=RAY_STEP_MM)
    ext = h.extent
    good = np.isfinite(ext)
    if good.mean() < MIN_BAND_FRACTION:
        return float("nan"), None
    base = centre + off * frame.lr
    seg = np.stack([base + float(np.mean(h.start[good])) * frame.ap,
                    base + float(np.mean(h.stop[good])) * frame.ap])
    return float(np.mean(ext[good])), seg


def _canal_midpoint(
    sampler: RaySampler, cord_pts: np.ndarray, geo: SectionGeometry
) -> np.ndarray | None:
    f = geo.frame
    off = _cord_offset(cord_pts, f.centre, f)
    if off is None:
        return None
    band = _band(HEIGHT_BAND_MM)
    origins = f.centre + off * f.lr + band[:, None] * f.si
    h = cast_rays(sampler, origins, f.ap, list(_CANAL_VALUES), t_min=-80.0, t_max=0.0,
                  step=RAY_STEP_MM)
    good = np.isfinite(h.start) & ~h.start_cut & ~h.stop_cut
    if good.mean() < MIN_BAND_FRACTION:
        return None
    mid = 0.5 * (float(np.median(h.start[good])) + float(np.median(h.stop[good])))
    return f.centre + off * f.lr + mid * f.ap


def level_segments_between_endplates(
    order: list[SectionGeometry], by_value: Mapping[int, SectionGeometry]
) -> list[tuple[SectionGeometry, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """The level segments: from each vertebra's superior endplate to the next one's.

    Parameters
    ----------
    order : list of SectionGeometry
        The vertebrae, top to bottom.
    by_value : mapping of int to SectionGeometry
        The same, by label value.

    Returns
    -------
    list of tuple
        ``(geometry, top point (3,) mm, top normal (3,), bottom point (3,) mm, bottom normal
        (3,))`` per segment, RAS world coordinates; the last vertebra's segment ends at its own
        inferior endplate.
    """
    out = []
    for geo in order:
        if geo.mid_top is None:
            continue
        nxt = by_value.get(geo.value + 1)
        if nxt is not None and nxt.mid_top is not None:
            out.append((geo, geo.mid_top, geo.frame.si, nxt.mid_top, nxt.frame.si))
        elif geo.mid_bottom is not None and nxt is None:
            out.append((geo, geo.mid_top, geo.frame.si, geo.mid_bottom, geo.frame.si))
    return out


def in_level_segment(points: np.ndarray, top: np.ndarray, n_top: np.ndarray,
                     bottom: np.ndarray, n_bottom: np.ndarray) -> np.ndarray:
    """Which points (N, 3) mm lie between the planes (point, normal) ``top`` and ``bottom``.

    Returns a boolean (N,) array: below the top plane (inclusive) and above the bottom one.
    """
    return ((points - top) @ n_top <= 0) & ((points - bottom) @ n_bottom > 0)


def cord_area_profile(seg: LabelVolume) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cord cross-sectional area per slice (3-D label maps).

    Parameters
    ----------
    seg : LabelVolume
        3-D label map holding the cord (201, and 203 counted as cord) with known geometry.

    Returns
    -------
    slices : (S,) int ndarray
        Indices along the array axis closest to the patient's S-I axis.
    centroids : (S, 3) ndarray
        Cord centroid of each slice, world mm.
    areas : (S,) ndarray
        Angle-corrected area in mm^2 (see ``cord_area`` in the module docstring).

    Raises
    ------
    GeometryError
        Unknown geometry, a 2-D slice, or in-plane spacing too coarse.
    LabelError
        No cord, or a cord spanning fewer than 3 slices.
    """
    seg.require_geometry("a cord area")
    if any(n == 1 for n in seg.shape):
        raise GeometryError("cord area needs a 3-D volume, not a single slice")
    got = _cord_area_slices(seg, np.isin(seg.array, _CORD_VALUES))
    if isinstance(got, str):
        raise (GeometryError if "spacing" in got else LabelError)(got)
    return got


def _cord_area_slices(
    seg: LabelVolume, cord: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """Slice indices (S,), per-slice centroids (S, 3), angle-corrected areas (S,) in mm^2,
    or the reason they cannot be measured."""
    from scipy.ndimage import uniform_filter1d

    cos_s = np.abs(seg.direction.T @ SUPERIOR)
    ax = int(np.argmax(cos_s))
    inplane = [a for a in range(3) if a != ax]
    sp = [seg.spacing[a] for a in inplane]
    if max(sp) > CSA_MAX_INPLANE_SPACING_MM:
        return (f"the in-plane spacing across the cord is {max(sp):.2f} mm (> "
                f"{CSA_MAX_INPLANE_SPACING_MM} mm); cord area needs finer axial sampling")
    counts = cord.sum(axis=tuple(inplane))
    slices = np.nonzero(counts)[0]
    if slices.size < 3:
        return "the cord spans fewer than 3 slices; cord area not measured"
    idx = np.argwhere(cord)
    world = seg.voxel_to_world(idx)
    cents = np.stack([world[idx[:, ax] == s].mean(axis=0) for s in slices])
    smooth = uniform_filter1d(cents, size=3, axis=0, mode="nearest")
    tang = np.gradient(smooth, slices.astype(float), axis=0)
    tang /= np.linalg.norm(tang, axis=1, keepdims=True)
    normal = unit(np.cross(seg.affine[:3, inplane[0]], seg.affine[:3, inplane[1]]))
    cosang = np.abs(tang @ normal)
    area = counts[slices] * sp[0] * sp[1] * cosang
    return slices, cents, area


def _cord_steps(
    seg: LabelVolume,
    image: Volume | None,
    res: SpineAnalysis,
    order: list[SectionGeometry],
    sampler: RaySampler,
) -> None:
    """Cord diameters, MSCC, K-line, T2-MI/RSCI, cord area (appends to ``res``)."""
    cord = np.isin(seg.array, _CORD_VALUES)
    ms, ws = res.measurements, res.warnings
    if not cord.any():
        ws.append("no spinal cord (201) in the label map: cord diameters, MSCC, K-line, "
                  "T2-MI/RSCI and cord area not measured")
        return
    cord_idx = np.argwhere(cord)
    cord_pts = seg.voxel_to_world(cord_idx)
    planar = order[0].frame.planar if order else any(s == 1 for s in seg.shape)
    dims = "2-D mid-sagittal slice" if planar else "3-D"
    by_value = {g.value: g for g in order}
    diam: dict[str, float] = {}
    disc_frames: dict[str, tuple[SectionGeometry, SectionGeometry, SectionFrame]] = {}
    # diameters at bodies
    for geo in order:
        d, segm = _cord_diameter(sampler, cord_pts, geo.frame.centre, geo.frame)
        if not np.isfinite(d):
            ws.append(f"{geo.structure}: cord AP diameter not measured (no cord at this level or "
                      "it runs out of view)")
            continue
        diam[geo.structure] = d
        ms.append(Measurement(
            name="cord_ap_diameter", value=d, unit="mm", structure=geo.structure,
            method=CORD_DIAMETER_METHOD.format(band=HEIGHT_BAND_MM, dims=dims),
            extra={"centroid_mm": geo.frame.centre, "segment_mm": segm},
        ))
    # diameters at discs
    for geo in order:
        lower = by_value.get(geo.value + 1)
        if lower is None:
            continue
        name = _disc_structure(geo.value)
        lr = unit(geo.frame.lr + lower.frame.lr)
        ap0 = geo.frame.ap + lower.frame.ap
        ap = unit(ap0 - (ap0 @ lr) * lr)
        si = unit(np.cross(lr, ap))
        if geo.inferior is not None and lower.superior is not None:
            centre = 0.5 * (geo.inferior.point + lower.superior.point)
        else:
            centre = 0.5 * (geo.frame.centre + lower.frame.centre)
        frame = SectionFrame(centre, lr, ap, si, geo.frame.planar, "mean of the two bodies' axes")
        disc_frames[name] = (geo, lower, frame)
        d, segm = _cord_diameter(sampler, cord_pts, centre, frame)
        if not np.isfinite(d):
            ws.append(f"disc {name}: cord AP diameter not measured (no cord at this level)")
            continue
        diam[name] = d
        ms.append(Measurement(
            name="cord_ap_diameter", value=d, unit="mm", structure=name,
            method=CORD_DIAMETER_METHOD.format(band=HEIGHT_BAND_MM, dims=dims),
            extra={"centroid_mm": centre, "segment_mm": segm},
        ))
    # MSCC at discs
    for name, (upper, lower, frame) in disc_frames.items():
        if name not in diam or upper.structure not in diam or lower.structure not in diam:
            continue
        ref = 0.5 * (diam[upper.structure] + diam[lower.structure])
        ms.append(Measurement(
            name="mscc", value=(1.0 - diam[name] / ref) * 100.0, unit="%", structure=name,
            method=MSCC_METHOD,
            extra={"centroid_mm": frame.centre, "d_i_mm": diam[name],
                   "d_a_mm": diam[upper.structure], "d_b_mm": diam[lower.structure],
                   "dims": dims},
        ))
    _k_line_step(seg, res, order, sampler, cord_pts, planar)
    segments = level_segments_between_endplates(order, by_value)
    if image is not None:
        from scipy.ndimage import distance_transform_edt

        # the cord's inside: farther than T2MI_CORD_EROSION_MM from its boundary
        depth_mm = distance_transform_edt(cord, sampling=seg.spacing)
        inner = depth_mm[tuple(cord_idx.T)] > T2MI_CORD_EROSION_MM
        _t2_step(image, res, segments, cord_idx[inner], cord_pts[inner], dims)
    if planar:
        return
    areas = _cord_area_slices(seg, cord)
    if isinstance(areas, str):
        ws.append(areas)
        return
    _, cents, area = areas
    if not segments:
        ms.append(Measurement(
            name="cord_area", value=float(area.mean()), unit="mm^2", structure="spinal_cord",
            method=CSA_METHOD + " (all slices: no vertebral levels in the label map)",
            extra={"slices": int(area.size), "min_mm2": float(area.min()),
                   "max_mm2": float(area.max())},
        ))
        return
    for geo, top, nt, bot, nb in segments:
        sel = in_level_segment(cents, top, nt, bot, nb)
        if not sel.any():
            ws.append(f"{geo.structure}: no cord slice in its level; cord area not measured")
            continue
        ms.append(Measurement(
            name="cord_area", value=float(area[sel].mean()), unit="mm^2",
            structure=geo.structure, method=CSA_METHOD,
            extra={"centroid_mm": geo.frame.centre, "slices": int(sel.sum())},
        ))


def _k_line_step(
    seg: LabelVolume,
    res: SpineAnalysis,
    order: list[SectionGeometry],
    sampler: RaySampler,
    cord_pts: np.ndarray,
    planar: bool,
) -> None:
    by_name = {g.structure: g for g in order}
    c2, c7 = by_name.get("C2"), by_name.get("C7")
    if c2 is None or c7 is None:
        if any(g.value <= 7 for g in order if g.value < ORDINAL_VERTEBRA_START):
            res.warnings.append("K-line not measured: it needs both C2 and C7 measured")
        return
    if not np.isin(seg.array, [CSF]).any():
        res.warnings.append("K-line: no CSF (202) labelled, so the canal midpoint is the cord's")
    m2 = _canal_midpoint(sampler, cord_pts, c2)
    m7 = _canal_midpoint(sampler, cord_pts, c7)
    if m2 is None or m7 is None:
        res.warnings.append("K-line not measured: the canal is not in view at C2 or C7")
        return
    k = unit(m7 - m2)
    n = unit(c2.frame.lr + c7.frame.lr)
    q = unit(np.cross(k, n))
    if q @ (c2.frame.ap + c7.frame.ap) > 0:
        q = -q  # q points posteriorly
    anterior_values = [3, 4, 5, 6] + [DISC_OFFSET + v for v in range(2, 7)]
    mask = np.isin(seg.array, anterior_values)
    if not mask.any():
        res.warnings.append("K-line not measured: no C3-C6 bodies or C2-C7 discs labelled")
        return
    pts = seg.voxel_to_world(np.argwhere(mask))
    rel = pts - m2
    along = rel @ k
    sel = (along >= 0) & (along <= float(np.linalg.norm(m7 - m2)))
    if not planar:
        sel &= np.abs(rel @ n) <= 0.5 * MIDSAGITTAL_SLAB_MM
    if not sel.any():
        res.warnings.append("K-line not measured: no anterior structure between C2 and C7")
        return
    reach = rel[sel] @ q + voxel_half_extent(seg.affine, q)
    i = int(np.argmax(reach))
    margin = -float(reach[i])
    kl = KLine(c2_point=m2, c7_point=m7, margin_mm=margin, closest_point=pts[sel][i])
    res.k_line = kl
    extra = {"line_mm": np.stack([m2, m7]), "closest_point_mm": kl.closest_point,
             "dims": "2-D mid-sagittal slice" if planar else "3-D"}
    res.measurements.append(Measurement(
        name="k_line", value=1.0 if kl.positive else -1.0, unit=DIMENSIONLESS, structure="C2-C7",
        method=K_LINE_METHOD, extra={**extra, "status": "K-line(+)" if kl.positive else "K-line(-)"},
    ))
    res.measurements.append(Measurement(
        name="k_line_margin", value=margin, unit="mm", structure="C2-C7", method=K_LINE_METHOD,
        extra=extra,
    ))


def _t2_step(
    image: Volume,
    res: SpineAnalysis,
    segments: list[tuple[SectionGeometry, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    cord_idx: np.ndarray,
    cord_pts: np.ndarray,
    dims: str,
) -> None:
    sig = image.array[tuple(cord_idx.T)].astype(np.float64)
    t2mi: dict[int, tuple[SectionGeometry, float]] = {}
    for geo, top, nt, bot, nb in segments:
        sel = in_level_segment(cord_pts, top, nt, bot, nb)
        if sel.sum() < MIN_STRUCTURE_VOXELS:
            res.warnings.append(f"{geo.structure}: fewer than {MIN_STRUCTURE_VOXELS} cord voxels "
                                f"deeper than {T2MI_CORD_EROSION_MM:g} mm in its level; T2-MI not "
                                "measured")
            continue
        v = sig[sel]
        mean = float(v.mean())
        if mean <= 0:
            res.warnings.append(f"{geo.structure}: mean cord signal is not positive; T2-MI not "
                                "measured")
            continue
        val = (float(v.max()) - float(v.min())) * 100.0 / mean
        t2mi[geo.value] = (geo, val)
        res.measurements.append(Measurement(
            name="cord_t2_mi", value=val, unit="%", structure=geo.structure,
            method=T2MI_METHOD.format(dims=dims),
            extra={"centroid_mm": geo.frame.centre, "voxels": int(sel.sum()),
                   "segment_mm": np.stack([top, bot])},
        ))
    for value, (geo, val) in t2mi.items():
        if value - 1 not in t2mi or value + 1 not in t2mi:
            res.warnings.append(f"{geo.structure}: RSCI needs T2-MI at both neighbouring levels; "
                                "not measured")
            continue
        denom = t2mi[value - 1][1] + val + t2mi[value + 1][1]
        if denom <= 0:
            continue
        rsci = 3.0 * val / denom
        res.measurements.append(Measurement(
            name="rsci", value=rsci, unit=DIMENSIONLESS, structure=geo.structure,
            method=RSCI_METHOD, extra={"centroid_mm": geo.frame.centre},
        ))
        hyper = val >= T2MI_THRESHOLD and rsci >= RSCI_THRESHOLD
        hyper_code = val >= T2MI_THRESHOLD_CODE and rsci >= RSCI_THRESHOLD
        res.measurements.append(Measurement(
            name="cord_t2_hyperintense", value=1.0 if hyper else 0.0, unit=DIMENSIONLESS,
            structure=geo.structure, method=HYPER_METHOD,
            extra={"centroid_mm": geo.frame.centre, "t2_mi": val, "rsci": rsci,
                   "hyperintense_with_code_threshold": hyper_code},
        ))


# ----------------------------------------------------------------------------- main
def _check_inputs(seg: LabelVolume, image: Volume | None) -> None:
    seg.require_geometry("a spine measurement")
    check_spine_labels(seg)
    if image is not None:
        image.require_geometry("a spine measurement")
        if not seg.same_geometry(image):
            raise GeometryError(
                f"the image {image.shape} {''.join(image.orientation)} is not in the geometry of "
                f"the segmentation {seg.shape} {''.join(seg.orientation)}; give the image the "
                "segmentation was made from"
            )


def mid_sagittal_slice(
    seg: LabelVolume, image: Volume | None = None
) -> tuple[LabelVolume, Volume | None, int, int]:
    """The array slice through the mid-sagittal plane of a 3-D spine label map.

    The slice runs across the array axis closest to the patient's L-R axis, at the median
    index of the cord voxels (or, without a cord, of the vertebral-body voxels).

    Parameters
    ----------
    seg : LabelVolume
        3-D label map in the spine schema.
    image : Volume, optional
        The image on the same grid; cut the same way.

    Returns
    -------
    seg_slice : LabelVolume
        One-slice volume (its geometry is exact: a crop of ``seg``).
    image_slice : Volume or None
    axis, index : int
        Which array axis was cut and where.
    """
    if any(n == 1 for n in seg.shape):
        raise DimensionError(f"the label map {seg.shape} is already a single slice")
    ax = int(np.argmax(np.abs(seg.direction.T @ RIGHT)))
    mask = np.isin(seg.array, _CORD_VALUES)
    if not mask.any():
        mask = np.isin(seg.array, [v for v in seg.present_values() if is_vertebra_value(v)])
    if not mask.any():
        raise LabelError("no cord or vertebral body to place the mid-sagittal slice on")
    k = int(round(float(np.median(np.nonzero(mask)[ax]))))
    cut = [slice(None)] * 3
    cut[ax] = slice(k, k + 1)
    seg_slice = seg.crop(cut)
    assert isinstance(seg_slice, LabelVolume)
    return seg_slice, (image.crop(cut) if image is not None else None), ax, k


def analyse_spine(
    seg: LabelVolume, *, image: Volume | None = None, mid_sagittal_2d: bool = True
) -> SpineAnalysis:
    """Measure a spine label map; return measurements, warnings and drawable geometry.

    Parameters
    ----------
    seg : LabelVolume
        (I, J, K) label map in the spine schema with known geometry; a 2-D sagittal slice is
        a (H, W, 1) volume (:func:`slice_label_volume`).
    image : Volume, optional
        The image ``seg`` was made from, on the same grid (for T2-MI/RSCI).
    mid_sagittal_2d : bool
        For a 3-D map with a cord or cervical bodies, also make the CervAI-X measurements
        (:data:`MID_SAGITTAL_2D_NAMES`) on the mid-sagittal slice (:func:`mid_sagittal_slice`)
        and report them with ``region = "mid-sagittal 2-D"`` beside the 3-D ones.

    Returns
    -------
    SpineAnalysis
        See the module docstring for every definition.
    """
    res = _analyse(seg, image)
    cervical = any(v in range(VERTEBRA_ID["C2"], VERTEBRA_ID["C7"] + 1)
                   for v in seg.present_values())
    if (mid_sagittal_2d and not any(n == 1 for n in seg.shape)
            and (cervical or np.isin(seg.array, _CORD_VALUES).any())
            and not any("axial-only" in w for w in res.warnings)):
        seg2, img2, ax, k = mid_sagittal_slice(seg, image)
        sub = _analyse(seg2, img2)
        res.mid_sagittal = sub
        for m in sub.measurements:
            if m.name not in MID_SAGITTAL_2D_NAMES or (m.name == "cobb_angle"
                                                       and m.structure != "C2-C7"):
                continue
            res.measurements.append(replace(
                m, region=MID_SAGITTAL_REGION,
                extra={**m.extra, "slice_axis": ax, "slice_index": k}))
        res.warnings.extend(f"{MID_SAGITTAL_REGION}: {w}" for w in sub.warnings
                            if any(word in w for word in _2D_WARNING_WORDS))
    for w in res.warnings:
        log.warning("%s", w)
    return res


def _analyse(seg: LabelVolume, image: Volume | None) -> SpineAnalysis:
    _check_inputs(seg, image)
    res = SpineAnalysis()
    planar_normal = _planar_normal(seg)
    present = seg.present_values()
    vert_values = [v for v in present if is_vertebra_value(v)]
    if _SACRUM in present:
        res.warnings.append("sacrum (26): recognised but not measured (heights and endplates "
                            "are defined for vertebral bodies)")
    reason = _sagittal_ok(seg, planar_normal)
    order: list[SectionGeometry] = []
    if reason is not None:
        res.warnings.append(reason)
    else:
        for v in vert_values:
            name = _level_name(v)
            if v == VERTEBRA_ID["C1"]:
                res.warnings.append("C1 (atlas) has no vertebral body: not measured")
                continue
            got = _section_points(seg, v, name, res.warnings)
            if got is None:
                continue
            pts, sub_sampler, n = got
            lr, notes = _plane_normal(pts, planar_normal=planar_normal, name=name)
            res.warnings.extend(notes)
            geo = _analyse_section(sub_sampler, pts, lr=lr, planar=planar_normal is not None,
                                   value=v, structure=name, voxels=n)
            res.warnings.extend(geo.notes)
            lo, hi = PLAUSIBLE_DEPTH_MM.get(name[0], (0.0, np.inf))
            if v < ORDINAL_VERTEBRA_START and np.isfinite(geo.depth) and not lo <= geo.depth <= hi:
                res.warnings.append(
                    f"{name}: AP depth {geo.depth:.1f} mm is outside the usual {lo:g}-{hi:g} mm "
                    "of its region; check that the label map uses the project's spine ids "
                    "(VerSe levels, mskmri.labels.SOURCES maps each data source)")
            order.append(geo)
            res.vertebrae[name] = geo
            res.measurements.extend(_vertebra_measurements(geo))
        if not vert_values:
            res.warnings.append("no vertebral bodies in the label map: no heights or angles")
    full = RaySampler(seg.array, seg.affine)
    by_value = {g.value: g for g in order}
    if reason is None:
        _disc_step(seg, res, order, by_value, full, planar_normal)
        _cobb_step(res, order, vert_values)
    if reason is None:
        _cord_steps(seg, image, res, order, full)
    elif np.isin(seg.array, _CORD_VALUES).any() and planar_normal is None:
        cord = np.isin(seg.array, _CORD_VALUES)
        areas = _cord_area_slices(seg, cord)
        if isinstance(areas, str):
            res.warnings.append(areas)
        else:
            res.measurements.append(Measurement(
                name="cord_area", value=float(areas[2].mean()), unit="mm^2",
                structure="spinal_cord", method=CSA_METHOD + " (all slices)",
                extra={"slices": int(areas[2].size)},
            ))
    return res


def _disc_step(
    seg: LabelVolume,
    res: SpineAnalysis,
    order: list[SectionGeometry],
    by_value: Mapping[int, SectionGeometry],
    full: RaySampler,
    planar_normal: np.ndarray | None,
) -> None:
    present = set(seg.present_values())
    done: set[str] = set()
    for dv in sorted(v for v in present if is_disc_value(v)):
        upper = dv - DISC_OFFSET
        name = _disc_structure(upper)
        got = _section_points(seg, dv, f"disc {name}", res.warnings)
        if got is None:
            continue
        pts, sub, n = got
        lr, notes = _plane_normal(pts, planar_normal=planar_normal, name=f"disc {name}")
        res.warnings.extend(notes)
        geo = _analyse_section(sub, pts, lr=lr, planar=planar_normal is not None, value=dv,
                               structure=name, voxels=n)
        res.warnings.extend(n_ for n_ in geo.notes if "endplate" not in n_)
        res.discs[name] = geo
        done.add(name)
        res.measurements.extend(_disc_measurements(geo, DISC_MASK_METHOD, {"source": "disc mask"}))
    for geo in order:
        lower = by_value.get(geo.value + 1)
        if lower is None:
            continue
        name = _disc_structure(geo.value)
        if name not in done:
            dgeo, notes = _disc_from_gap(full, geo, lower, name)
            res.warnings.extend(notes)
            if dgeo is not None:
                res.measurements.extend(_disc_measurements(
                    dgeo, DISC_GAP_METHOD, {"source": "gap between bodies"}))
        if geo.inferior is not None and lower.superior is not None:
            ang = cobb_angle(geo, lower, upper_endplate="inferior", lower_endplate="superior")
            centre = 0.5 * (geo.inferior.point + lower.superior.point)
            res.measurements.append(Measurement(
                name="disc_angle", value=ang, unit="deg", structure=name,
                method=COBB_METHOD.format(upper="inferior", u=geo.structure, lower="superior",
                                          lo=lower.structure),
                extra={"centroid_mm": centre},
            ))


def _cobb_step(res: SpineAnalysis, order: list[SectionGeometry], vert_values: list[int]) -> None:
    by_name = {g.structure: g for g in order}
    named = [v for v in vert_values if v < ORDINAL_VERTEBRA_START]
    for up, lo, ue, le in STANDARD_COBB_PAIRS:
        region = range(VERTEBRA_ID[up], VERTEBRA_ID[lo] + 1)
        if not any(v in region for v in named):
            continue
        structure = f"{up}-{lo}"
        gu, gl = by_name.get(up), by_name.get(lo)
        if gu is None or gl is None:
            missing = [x for x, g in ((up, gu), (lo, gl)) if g is None]
            res.warnings.append(f"cobb_angle {structure} not measured: {', '.join(missing)} "
                                "not measured (too few vertebrae for the angle)")
            continue
        _append_cobb(res, gu, gl, ue, le, structure)
    ordinal = [g for g in order if g.value >= ORDINAL_VERTEBRA_START]
    if ordinal:
        if len(ordinal) < 2:
            res.warnings.append("cobb_angle not measured: fewer than 2 vertebrae")
            return
        # the outermost bodies whose needed endplate lies inside the field of view: a body
        # cut by the edge of the image has no endplate line there
        tops = [g for g in ordinal if g.superior is not None]
        bots = [g for g in ordinal if g.inferior is not None]
        if not tops or not bots or ordinal.index(tops[0]) >= ordinal.index(bots[-1]):
            res.warnings.append("cobb_angle not measured: fewer than 2 vertebrae with an "
                                "endplate inside the field of view")
            return
        top, bot = tops[0], bots[-1]
        if (top, bot) != (ordinal[0], ordinal[-1]):
            res.warnings.append(
                f"cobb_angle measured from {top.structure} to {bot.structure}: the endplates of "
                "the outermost vertebrae are cut by the field of view")
        _append_cobb(res, top, bot, "superior", "inferior", f"{top.structure}-{bot.structure}")
    elif not named:
        return


def _append_cobb(res: SpineAnalysis, gu: SectionGeometry, gl: SectionGeometry, ue: str, le: str,
                 structure: str) -> None:
    ang = cobb_angle(gu, gl, upper_endplate=ue, lower_endplate=le)
    if not np.isfinite(ang):
        res.warnings.append(f"cobb_angle {structure} not measured: an endplate line is missing")
        return
    eu, el = getattr(gu, ue), getattr(gl, le)
    res.measurements.append(Measurement(
        name="cobb_angle", value=ang, unit="deg", structure=structure,
        method=COBB_METHOD.format(upper=ue, u=gu.structure, lower=le, lo=gl.structure),
        extra={"upper_line_mm": eu.ends, "lower_line_mm": el.ends,
               "convention": "positive = lordosis (lines converge posteriorly), "
                             "negative = kyphosis"},
    ))


def measure_spine_with_warnings(
    seg: LabelVolume, *, image: Volume | None = None
) -> tuple[list[Measurement], list[str]]:
    """:func:`measure_spine`, also returning the warnings a reader must see."""
    res = analyse_spine(seg, image=image)
    return res.measurements, res.warnings


def measure_spine(seg: LabelVolume, *, image: Volume | None = None) -> list[Measurement]:
    """All spine measurements available from a label map (and optionally its image).

    Parameters
    ----------
    seg : LabelVolume
        Label map in the spine schema with known geometry (3-D, or a one-slice 2-D sagittal
        volume from :func:`slice_label_volume`).
    image : Volume, optional
        The image on the same grid; enables T2-MI / RSCI.

    Returns
    -------
    list of Measurement
        Heights, ratios, endplate and Cobb angles, disc heights, cord diameters, MSCC,
        K-line, T2-MI/RSCI, cord area (see the module docstring). Warnings are logged; use
        :func:`measure_spine_with_warnings` or :func:`analyse_spine` to get them.
    """
    return analyse_spine(seg, image=image).measurements


def measure_spine_files(
    seg_path: str | os.PathLike[str],
    *,
    image_path: str | os.PathLike[str] | None = None,
    lesions_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Read the files, measure, and return the ``mskmri/measurements/1`` document.

    Parameters
    ----------
    seg_path : path-like
        Spine label map (any format :func:`mskmri.io.read` accepts), in the spine schema.
    image_path : path-like, optional
        The image on the same grid (for T2-MI/RSCI).
    lesions_path : None
        Not used by the spine (bone marrow lesion masks are a knee input); giving one is an
        error rather than silently ignored.

    Returns
    -------
    dict
        The document (see :func:`mskmri.measure.base.measurements_document`).
    """
    from mskmri import __version__
    from mskmri.io import read, read_labels

    if lesions_path is not None:
        raise MskMriError(
            "--lesions is a knee input (bone marrow lesion mask); spine measurements take "
            "SEG and optionally --image only"
        )
    seg = read_labels(seg_path, schema="spine", strict=False)
    image = read(image_path) if image_path is not None else None
    res = analyse_spine(seg, image=image)
    info: dict[str, Any] = describe_input(seg, Path(seg_path))
    info["anatomy"] = "spine"
    info["image"] = str(image_path) if image_path is not None else None
    return measurements_document(
        res.measurements, input_info=info, tool_version=__version__, warnings=res.warnings
    )


# ----------------------------------------------------------------------------- instances
def split_vertebral_bodies(
    seg: LabelVolume,
    *,
    body_value: int,
    disc_value: int | None = None,
    first_level: str | None = None,
) -> tuple[LabelVolume, list[str]]:
    """Split single-class body (and disc) masks into levels, ordered from the top.

    Parameters
    ----------
    seg : LabelVolume
        Label map where all vertebral bodies share ``body_value`` (and all discs
        ``disc_value``); other values are kept as they are.
    body_value, disc_value : int
        The shared values.
    first_level : str, optional
        Level name of the top body (e.g. ``"C2"``). Used only when the top body is complete:
        it does not touch the edge of the array and no disc lies above it; otherwise (or when
        None) bodies get ordinal ids from 1000 and a warning says why.

    Returns
    -------
    LabelVolume
        Bodies as VerSe ids (or ordinal ids), discs as 100 + the id of the body above.
    list of str
        Warnings (dropped fragments, possibly merged bodies, why levels are ordinal).

    Notes
    -----
    Components are face-connected (6-connectivity; 4 on a slice); components smaller than
    :data:`MIN_INSTANCE_FRACTION` of the median are dropped. Bodies are ordered by their
    centroid along the patient's S-I axis; each disc is assigned to the pair of consecutive
    bodies whose centroids bracket its own.
    """
    import cc3d

    seg.require_geometry("splitting vertebral bodies")
    warnings: list[str] = []
    arr = seg.array
    out = arr.copy().astype(np.int32)
    out[arr == body_value] = 0
    if disc_value is not None:
        out[arr == disc_value] = 0

    def _components(mask: np.ndarray, what: str) -> list[tuple[np.ndarray, float, np.ndarray]]:
        lab = cc3d.connected_components(mask.astype(np.uint8), connectivity=6)
        n = int(lab.max())
        comps = []
        for i in range(1, n + 1):
            idx = np.argwhere(lab == i)
            comps.append((idx, float(seg.voxel_to_world(idx).mean(axis=0) @ SUPERIOR), lab == i))
        if not comps:
            return []
        med = float(np.median([c[0].shape[0] for c in comps]))
        keep = [c for c in comps if c[0].shape[0] >= MIN_INSTANCE_FRACTION * med]
        if len(keep) < len(comps):
            warnings.append(f"{len(comps) - len(keep)} small {what} fragment(s) dropped "
                            f"(< {MIN_INSTANCE_FRACTION:.0%} of the median size)")
        keep.sort(key=lambda c: -c[1])
        return [(c[0], c[1], c[2]) for c in keep]

    bodies = _components(arr == body_value, "vertebral body")
    discs = _components(arr == disc_value, "disc") if disc_value is not None else []
    if not bodies:
        warnings.append("no vertebral body found")
        return LabelVolume(out, seg.affine, {}, schema="spine", meta=seg.meta), warnings
    start = ORDINAL_VERTEBRA_START
    if first_level is not None:
        top_idx, top_s, _ = bodies[0]
        touches = any(
            bool(np.any((top_idx[:, a] == 0) | (top_idx[:, a] == arr.shape[a] - 1)))
            for a in range(3) if arr.shape[a] > 1
        )
        above = [d for d in discs if d[1] > top_s]
        if first_level not in VERTEBRA_ID:
            raise LabelError(f"first_level {first_level!r} is not a level name (C1..L6)")
        if touches:
            warnings.append(f"the top body touches the edge of the image, so it may be cut: "
                            f"it is not taken as {first_level}; levels are ordinal (V1000..)")
        elif above:
            warnings.append(f"a disc lies above the top body, so a vertebra above it is not "
                            f"labelled: it is not taken as {first_level}; levels are ordinal")
        elif VERTEBRA_ID[first_level] + len(bodies) - 1 > 25:
            warnings.append("more bodies than levels below the first; levels are ordinal")
        else:
            start = VERTEBRA_ID[first_level]
    heights = []
    for idx, _, _ in bodies:
        s = seg.voxel_to_world(idx) @ SUPERIOR
        heights.append(float(s.max() - s.min()))
    med_h = float(np.median(heights))
    ids: list[int] = []
    for i, (_, _, m) in enumerate(bodies):
        vid = start + i
        ids.append(vid)
        out[m] = vid
        skip_dens = i == 0 and start == VERTEBRA_ID.get("C2")
        if heights[i] > MERGED_BODY_RATIO * med_h and not skip_dens:
            warnings.append(f"body {vertebra_name(vid)} is {heights[i] / med_h:.1f}x the median "
                            "height: it may be two merged bodies")
    cents = [b[1] for b in bodies]
    for _, s, m in discs:
        pair = [i for i in range(len(cents) - 1) if cents[i] > s > cents[i + 1]]
        if not pair:
            warnings.append("a disc lies outside the labelled bodies and was dropped")
            continue
        did = DISC_OFFSET + ids[pair[0]]
        if np.any(out == did):
            warnings.append(f"two disc parts between {vertebra_name(ids[pair[0]])} and the next "
                            "body; merged")
        out[m] = did
    names = {int(v): _value_name(int(v)) for v in np.unique(out) if v != 0}
    return LabelVolume(out, seg.affine, names, schema="spine", meta=dict(seg.meta)), warnings


def measurements_by_key(measurements: Iterable[Measurement]) -> dict[str, Measurement]:
    """``{m.key: m}`` (e.g. ``"anterior_height.L3"``) for quick lookup."""
    return {m.key: m for m in measurements}


__all__: list[str] = [
    "HEIGHT_FRACTIONS",
    "STANDARD_COBB_PAIRS",
    "Endplate",
    "KLine",
    "SectionFrame",
    "SectionGeometry",
    "SpineAnalysis",
    "analyse_spine",
    "check_spine_labels",
    "cobb_angle",
    "cord_area_profile",
    "is_disc_value",
    "is_vertebra_value",
    "measure_spine",
    "measure_spine_files",
    "measure_spine_with_warnings",
    "measurements_by_key",
    "mid_sagittal_slice",
    "slice_image_volume",
    "slice_label_volume",
    "split_vertebral_bodies",
]
