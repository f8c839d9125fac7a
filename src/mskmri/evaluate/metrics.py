"""Segmentation and lesion-detection metrics in physical units (numpy, SciPy, cc3d; no torch).

Inputs are either two :class:`~mskmri.volume.Volume` objects on the same grid (their spacing
comes from the affine) or two arrays of the same shape with an explicit ``spacing=`` in mm;
a metric in mm is never computed from a guessed 1 mm spacing. Foreground is ``!= 0`` for the
binary functions and ``== label`` in :func:`evaluate_labels`.

Each metric is a :class:`Metric` (value, unit, and, when the value is NaN, the reason): an
undefined metric (Dice of two empty masks, HD95 with an empty mask) is NaN with a reason,
never a silent 0 or 1.

Definitions
-----------
With ``P`` the predicted and ``T`` the true foreground, ``TP = |P & T|``, ``FP = |P & ~T|``,
``FN = |~P & T|``, ``TN = |~P & ~T|`` (voxel counts):

- Dice ``2 TP / (2 TP + FP + FN)``; IoU ``TP / (TP + FP + FN)``;
- sensitivity ``TP / (TP + FN)``; specificity ``TN / (TN + FP)``;
  accuracy ``(TP + TN) / N``;
- volume difference ``V(P) - V(T)`` in mL and ``100 (V(P) - V(T)) / V(T)`` in %.

Surface distances. The *surface* ``S(M)`` of a mask ``M`` is the set of its voxels with at least
one of their 6 face neighbours outside ``M`` (``M & ~erode(M)`` with the 6-connected cross;
voxels on the array border count as surface, the outside of the array being background).
For every voxel of ``S(P)`` its distance to ``S(T)`` is the Euclidean distance in mm between
voxel centres to the nearest voxel of ``S(T)`` (``scipy.ndimage.distance_transform_edt`` with
``sampling=spacing``), and vice versa. Then

- HD95 = ``max(p95(d(S(P) -> S(T))), p95(d(S(T) -> S(P))))``, the larger of the two directed
  95th percentiles (numpy's linear interpolation), as in MedPy and MONAI; it is symmetric;
- ASSD = the mean of all distances of both directions pooled,
  ``(sum d(S(P)->S(T)) + sum d(S(T)->S(P))) / (|S(P)| + |S(T)|)``;
- Hausdorff = the maximum of both directions.

Lesions. Lesions are connected components (26-connectivity in 3-D, via cc3d) of each mask.
A true lesion is *hit* when the predicted foreground covers at least
``max(1, ceil(min_overlap_fraction * |lesion|))`` of its voxels (default: any overlap);
otherwise it is *missed*. A predicted component is a *false alarm* when it overlaps no hit
true lesion. Recall = hits / true lesions, precision = hits / (hits + false alarms), and
F1 = ``2 hits / (2 hits + false alarms + missed)`` (their harmonic mean). Size strata are
by true-lesion volume in mL, lower edge inclusive. The Dice of one true lesion is computed
in its *neighbourhood*: the voxels within ``neighbourhood_mm`` of the lesion that are not
closer to another true lesion (a Voronoi cell clipped at ``neighbourhood_mm``), so a nearby
lesion's prediction does not count against it while a halo of over-segmentation does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from mskmri.errors import DimensionError, GeometryError, LabelError, MskMriError
from mskmri.volume import Volume

log = logging.getLogger(__name__)

#: Version tag of the evaluation JSON document.
EVALUATION_SCHEMA = "mskmri/evaluation/1"

#: Percentile (of each directed surface-distance set) used by HD95.
HD_PERCENTILE = 95.0

#: Default lesion-size strata edges, in mL (true-lesion volume; lower edge inclusive).
DEFAULT_SIZE_EDGES_ML: tuple[float, ...] = (0.1, 0.5, 2.0)

#: Default radius (mm) of the neighbourhood in which a single lesion's Dice is computed.
LESION_NEIGHBOURHOOD_MM = 5.0

#: Default minimum fraction (0..1) of a true lesion's voxels the prediction must cover to
#: hit it; 0 means any overlap (at least one voxel).
MIN_OVERLAP_FRACTION = 0.0

#: Connectivity of lesion components: full (faces, edges, corners) in 3-D and 2-D.
LESION_CONNECTIVITY = {3: 26, 2: 8}

#: Tolerance on the orthogonality of the affine's axes (dot products of unit columns).
ORTHOGONAL_ATOL = 1e-4

#: Units of dimensionless numbers and counts.
DIMENSIONLESS = "1"
COUNT = "count"

_ML_PER_MM3 = 1e-3


class MetricError(MskMriError, ValueError):
    """A metric cannot be computed with the given options or inputs."""


# ============================================================================ result types
@dataclass(frozen=True)
class Metric:
    """One metric value with its unit, and the reason when it is undefined (NaN).

    Parameters
    ----------
    name : str
        ``"dice"``, ``"hd95"``, ...
    value : float
        The value in ``unit``; NaN when undefined.
    unit : str
        ``"1"`` (dimensionless), ``"mm"``, ``"mL"``, ``"%"`` or ``"count"``.
    reason : str, optional
        Why the value is NaN (required then).
    """

    name: str
    value: float
    unit: str
    reason: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", float(self.value))
        if math.isnan(self.value) and not self.reason:
            raise ValueError(f"metric {self.name!r} is NaN without a reason (a bug)")

    def __float__(self) -> float:
        return self.value

    @property
    def defined(self) -> bool:
        """False when the value is NaN (see :attr:`reason`)."""
        return not math.isnan(self.value)

    def to_dict(self) -> dict[str, Any]:
        """``{"value": x, "unit": u}``; NaN becomes ``None`` with ``"reason"``."""
        from mskmri.measure.base import json_number

        out: dict[str, Any] = {"value": json_number(self.value), "unit": self.unit}
        if not self.defined:
            out["reason"] = self.reason
        return out


def _nan(name: str, unit: str, reason: str) -> Metric:
    return Metric(name, float("nan"), unit, reason)


def _ratio(name: str, num: float, den: float, reason: str) -> Metric:
    return Metric(name, num / den, DIMENSIONLESS) if den > 0 else _nan(name, DIMENSIONLESS, reason)


@dataclass(frozen=True)
class Confusion:
    """Voxel counts of the confusion matrix (foreground = positive)."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def total(self) -> int:
        """Number of voxels."""
        return self.tp + self.fp + self.fn + self.tn


# ============================================================================ inputs
@dataclass(frozen=True)
class _Pair:
    pred: np.ndarray
    truth: np.ndarray
    spacing: tuple[float, ...] | None
    voxel_volume_mm3: float | None


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    sp = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=np.float64)))
    if len(sp) != ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise GeometryError(
            f"spacing must be {ndim} positive numbers in mm (one per array axis), not {spacing!r}"
        )
    return sp


def _volume_spacing(vol: Volume, what: str) -> tuple[float, ...]:
    vol.require_geometry(what)
    d = vol.direction
    if not np.allclose(d.T @ d, np.eye(3), atol=ORTHOGONAL_ATOL):
        raise GeometryError(
            "the volume's voxel axes are not orthogonal (sheared affine), so distances cannot "
            "be measured on its grid; resample it onto an orthogonal grid first"
        )
    return vol.spacing


def _as_pair(
    pred: Volume | npt.ArrayLike,
    truth: Volume | npt.ArrayLike,
    *,
    spacing: Sequence[float] | None,
    need_spacing: bool,
    resample: bool = False,
) -> _Pair:
    """Check and unwrap a (prediction, truth) pair; spacing from Volumes or given explicitly."""
    if isinstance(pred, Volume) != isinstance(truth, Volume):
        raise GeometryError(
            "give prediction and truth both as Volumes (geometry from the affine) or both as "
            "arrays with spacing=, not one of each"
        )
    if isinstance(pred, Volume) and isinstance(truth, Volume):
        what = "a metric in mm or mL"
        if not pred.same_geometry(truth):
            if not resample:
                raise GeometryError(
                    f"prediction {pred.shape} spacing {_fmt(pred.spacing)} mm "
                    f"{''.join(pred.orientation)} and truth {truth.shape} spacing "
                    f"{_fmt(truth.spacing)} mm {''.join(truth.orientation)} are on different "
                    "grids; give both on the same grid or allow resampling the prediction "
                    "onto the truth (resample=True, --resample)"
                )
            pred.require_geometry("resampling the prediction")
            truth.require_geometry("resampling the prediction")
            log.info("resampling the prediction onto the truth grid (nearest neighbour)")
            pred = pred.resample_to(truth, order=0)
        sp_t = _volume_spacing(truth, what) if need_spacing else None
        if spacing is not None and sp_t is not None and not np.allclose(spacing, sp_t, atol=1e-6):
            raise GeometryError(
                f"spacing={tuple(spacing)} contradicts the volumes' spacing {_fmt(sp_t)} mm; "
                "leave spacing out when giving Volumes"
            )
        vv = truth.voxel_volume_mm3 if sp_t is not None else None
        return _Pair(np.asarray(pred.array), np.asarray(truth.array), sp_t, vv)
    p = np.asarray(pred)
    t = np.asarray(truth)
    if p.shape != t.shape:
        raise DimensionError(
            f"prediction shape {p.shape} and truth shape {t.shape} differ; give masks on the "
            "same grid"
        )
    if p.ndim not in (2, 3):
        raise DimensionError(f"masks must be 2-D or 3-D, not {p.ndim}-D")
    if spacing is None:
        if need_spacing:
            raise GeometryError(
                "arrays carry no geometry: give spacing= (mm per axis) or pass Volumes; "
                "mskmri does not assume 1 mm"
            )
        return _Pair(p, t, None, None)
    sp = _check_spacing(spacing, p.ndim)
    return _Pair(p, t, sp, float(np.prod(sp)))


def _fmt(sp: Iterable[float]) -> str:
    return "(" + ", ".join(f"{s:.4g}" for s in sp) + ")"


def _fg(a: np.ndarray) -> np.ndarray:
    return a.astype(bool) if a.dtype != bool else a


# ============================================================================ overlap
def confusion(
    pred: Volume | npt.ArrayLike, truth: Volume | npt.ArrayLike
) -> Confusion:
    """Voxel confusion counts of two masks (foreground ``!= 0``).

    Parameters
    ----------
    pred, truth : Volume or (I, J[, K]) array_like
        Same grid (Volumes: ``same_geometry``; arrays: same shape).
    """
    pair = _as_pair(pred, truth, spacing=None, need_spacing=False)
    return _confusion(_fg(pair.pred), _fg(pair.truth))


def _confusion(p: np.ndarray, t: np.ndarray) -> Confusion:
    n_p = int(np.count_nonzero(p))
    n_t = int(np.count_nonzero(t))
    tp = int(np.count_nonzero(p & t))
    fp = n_p - tp
    fn = n_t - tp
    tn = int(p.size) - tp - fp - fn
    return Confusion(tp, fp, fn, tn)


def overlap_metrics(c: Confusion) -> dict[str, Metric]:
    """Dice, IoU, sensitivity, specificity and accuracy from confusion counts (unit ``"1"``)."""
    both_empty = "both masks are empty"
    return {
        "dice": _ratio("dice", 2 * c.tp, 2 * c.tp + c.fp + c.fn, both_empty),
        "iou": _ratio("iou", c.tp, c.tp + c.fp + c.fn, both_empty),
        "sensitivity": _ratio("sensitivity", c.tp, c.tp + c.fn,
                              "truth is empty (no positives to find)"),
        "specificity": _ratio("specificity", c.tn, c.tn + c.fp,
                              "truth has no background (no negatives)"),
        "accuracy": _ratio("accuracy", c.tp + c.tn, c.total, "the masks have no voxels"),
    }


def dice(pred: Volume | npt.ArrayLike, truth: Volume | npt.ArrayLike) -> Metric:
    """Dice coefficient ``2|P&T| / (|P| + |T|)``; NaN (with reason) when both are empty."""
    return overlap_metrics(confusion(pred, truth))["dice"]


def iou(pred: Volume | npt.ArrayLike, truth: Volume | npt.ArrayLike) -> Metric:
    """Jaccard index ``|P&T| / |P|T|``; NaN (with reason) when both are empty."""
    return overlap_metrics(confusion(pred, truth))["iou"]


def sensitivity(pred: Volume | npt.ArrayLike, truth: Volume | npt.ArrayLike) -> Metric:
    """``TP / (TP + FN)``; NaN when the truth is empty."""
    return overlap_metrics(confusion(pred, truth))["sensitivity"]


def specificity(pred: Volume | npt.ArrayLike, truth: Volume | npt.ArrayLike) -> Metric:
    """``TN / (TN + FP)``; NaN when the truth has no background."""
    return overlap_metrics(confusion(pred, truth))["specificity"]


def accuracy(pred: Volume | npt.ArrayLike, truth: Volume | npt.ArrayLike) -> Metric:
    """``(TP + TN) / N``."""
    return overlap_metrics(confusion(pred, truth))["accuracy"]


# ============================================================================ surfaces
def surface_voxels(mask: npt.ArrayLike) -> np.ndarray:
    """Boolean surface of a mask: voxels with a face neighbour outside it (array border = out).

    Parameters
    ----------
    mask : (I, J[, K]) array_like
        Foreground ``!= 0``.

    Returns
    -------
    ndarray of bool, same shape
    """
    m = _fg(np.asarray(mask))
    if not m.any():
        return np.zeros_like(m)
    cross = ndimage.generate_binary_structure(m.ndim, 1)
    return m & ~ndimage.binary_erosion(m, structure=cross, border_value=0)


def _bbox(mask: np.ndarray, pad: int) -> tuple[slice, ...]:
    idx = np.nonzero(mask)
    return tuple(
        slice(max(int(i.min()) - pad, 0), min(int(i.max()) + pad + 1, n))
        for i, n in zip(idx, mask.shape, strict=True)
    )


def _surface_distances(
    p: np.ndarray, t: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    # Work in the union bounding box padded by one voxel: all surface voxels of both masks lie
    # inside it, so the distance transforms there are exact, and the pad keeps the surface
    # definition (outside = background) where the box is not the array border.
    box = _bbox(p | t, pad=1)
    pc, tc = p[box], t[box]
    sp, st = surface_voxels(pc), surface_voxels(tc)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return np.asarray(to_truth[sp], dtype=np.float64), np.asarray(to_pred[st], dtype=np.float64)


def surface_distances(
    pred: Volume | npt.ArrayLike,
    truth: Volume | npt.ArrayLike,
    *,
    spacing: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm (see the module docstring for the definition).

    Parameters
    ----------
    pred, truth : Volume or (I, J[, K]) array_like
        Masks on the same grid.
    spacing : sequence of float, optional
        mm per array axis; required for arrays, taken from the affine for Volumes.

    Returns
    -------
    d_pred_to_truth : (|S(P)|,) ndarray
        For each surface voxel of the prediction, the distance (mm) to the truth's surface.
    d_truth_to_pred : (|S(T)|,) ndarray
        The same from the truth's surface to the prediction's.

    Raises
    ------
    MetricError
        When either mask is empty (distances are undefined).
    """
    pair = _as_pair(pred, truth, spacing=spacing, need_spacing=True)
    p, t = _fg(pair.pred), _fg(pair.truth)
    if not p.any() or not t.any():
        raise MetricError("surface distances need two non-empty masks; one of them is empty")
    assert pair.spacing is not None
    return _surface_distances(p, t, pair.spacing)


def _distance_metrics(
    p: np.ndarray, t: np.ndarray, spacing: Sequence[float], percentile: float
) -> dict[str, Metric]:
    names = ("hd95", "assd", "hausdorff")
    reason = None
    if not p.any() and not t.any():
        reason = "both masks are empty"
    elif not p.any():
        reason = "prediction is empty (no surface to measure from)"
    elif not t.any():
        reason = "truth is empty (no surface to measure to)"
    if reason is not None:
        return {n: _nan(n, "mm", reason) for n in names}
    d_pt, d_tp = _surface_distances(p, t, spacing)
    hd = max(float(np.percentile(d_pt, percentile)), float(np.percentile(d_tp, percentile)))
    assd_v = float((d_pt.sum() + d_tp.sum()) / (d_pt.size + d_tp.size))
    hmax = max(float(d_pt.max()), float(d_tp.max()))
    return {
        "hd95": Metric("hd95", hd, "mm"),
        "assd": Metric("assd", assd_v, "mm"),
        "hausdorff": Metric("hausdorff", hmax, "mm"),
    }


def hd95(
    pred: Volume | npt.ArrayLike,
    truth: Volume | npt.ArrayLike,
    *,
    spacing: Sequence[float] | None = None,
    percentile: float = HD_PERCENTILE,
) -> Metric:
    """Symmetric 95th-percentile Hausdorff distance in mm; NaN (with reason) if a mask is empty.

    Parameters
    ----------
    pred, truth : Volume or (I, J[, K]) array_like
        Masks on the same grid (foreground ``!= 0``).
    spacing : sequence of float, optional
        mm per axis; required for arrays.
    percentile : float
        Percentile of each directed distance set (95 by default).
    """
    pair = _as_pair(pred, truth, spacing=spacing, need_spacing=True)
    assert pair.spacing is not None
    return _distance_metrics(_fg(pair.pred), _fg(pair.truth), pair.spacing, percentile)["hd95"]


def assd(
    pred: Volume | npt.ArrayLike,
    truth: Volume | npt.ArrayLike,
    *,
    spacing: Sequence[float] | None = None,
) -> Metric:
    """Average symmetric surface distance in mm; NaN (with reason) if a mask is empty."""
    pair = _as_pair(pred, truth, spacing=spacing, need_spacing=True)
    assert pair.spacing is not None
    return _distance_metrics(_fg(pair.pred), _fg(pair.truth), pair.spacing, HD_PERCENTILE)["assd"]


# ============================================================================ volumes
def _volume_metrics(c: Confusion, voxel_volume_mm3: float) -> dict[str, Metric]:
    v_ml = voxel_volume_mm3 * _ML_PER_MM3
    vp = (c.tp + c.fp) * v_ml
    vt = (c.tp + c.fn) * v_ml
    pct = (
        Metric("volume_difference_percent", 100.0 * (vp - vt) / vt, "%")
        if vt > 0
        else _nan("volume_difference_percent", "%", "truth is empty (no volume to relate to)")
    )
    return {
        "volume_pred": Metric("volume_pred", vp, "mL"),
        "volume_truth": Metric("volume_truth", vt, "mL"),
        "volume_difference": Metric("volume_difference", vp - vt, "mL"),
        "volume_difference_percent": pct,
    }


def volume_difference(
    pred: Volume | npt.ArrayLike,
    truth: Volume | npt.ArrayLike,
    *,
    spacing: Sequence[float] | None = None,
) -> tuple[Metric, Metric]:
    """Volume difference prediction - truth, in mL and in % of the true volume.

    Returns
    -------
    (Metric, Metric)
        ``volume_difference`` (mL) and ``volume_difference_percent`` (%, NaN if truth empty).
    """
    pair = _as_pair(pred, truth, spacing=spacing, need_spacing=True)
    assert pair.voxel_volume_mm3 is not None
    vm = _volume_metrics(_confusion(_fg(pair.pred), _fg(pair.truth)), pair.voxel_volume_mm3)
    return vm["volume_difference"], vm["volume_difference_percent"]


def binary_metrics(
    pred: Volume | npt.ArrayLike,
    truth: Volume | npt.ArrayLike,
    *,
    spacing: Sequence[float] | None = None,
    resample: bool = False,
    percentile: float = HD_PERCENTILE,
) -> dict[str, Metric]:
    """All voxel metrics of one pair of masks: overlap, surface distances (mm), volumes (mL).

    Parameters
    ----------
    pred, truth : Volume or (I, J[, K]) array_like
        Masks (foreground ``!= 0``).
    spacing : sequence of float, optional
        mm per axis; required for arrays.
    resample : bool
        For Volumes on different grids: resample the prediction onto the truth (nearest).
    percentile : float
        HD percentile.

    Returns
    -------
    dict of str to Metric
        ``dice, iou, sensitivity, specificity, accuracy, hd95, assd, hausdorff, volume_pred,
        volume_truth, volume_difference, volume_difference_percent``.
    """
    pair = _as_pair(pred, truth, spacing=spacing, need_spacing=True, resample=resample)
    assert pair.spacing is not None and pair.voxel_volume_mm3 is not None
    return _binary_metrics(
        _fg(pair.pred), _fg(pair.truth), pair.spacing, pair.voxel_volume_mm3, percentile
    )


def _binary_metrics(
    p: np.ndarray, t: np.ndarray, spacing: Sequence[float], vv: float, percentile: float
) -> dict[str, Metric]:
    c = _confusion(p, t)
    out = overlap_metrics(c)
    out.update(_distance_metrics(p, t, spacing, percentile))
    out.update(_volume_metrics(c, vv))
    return out


# ============================================================================ lesions
def size_stratum_names(edges_ml: Sequence[float]) -> list[str]:
    """Names of the strata cut by ``edges_ml``: (0.1, 0.5, 2) -> <0.1, 0.1-0.5, 0.5-2, >2."""
    e = [f"{x:g}" for x in edges_ml]
    if not e:
        return ["all"]
    return [f"<{e[0]}"] + [f"{a}-{b}" for a, b in zip(e[:-1], e[1:], strict=True)] + [f">{e[-1]}"]


def _check_edges(edges_ml: Sequence[float]) -> tuple[float, ...]:
    edges = tuple(float(x) for x in edges_ml)
    if any(not math.isfinite(x) or x <= 0 for x in edges) or list(edges) != sorted(set(edges)):
        raise MetricError(f"size strata edges must be increasing positive mL values, not {edges_ml!r}")
    return edges


def _check_lesion_options(min_overlap_fraction: float, neighbourhood_mm: float) -> None:
    if not 0.0 <= float(min_overlap_fraction) <= 1.0:
        raise MetricError(f"min_overlap_fraction must be in [0, 1], not {min_overlap_fraction}")
    if not float(neighbourhood_mm) > 0:
        raise MetricError(f"the lesion neighbourhood must be > 0 mm, not {neighbourhood_mm}")


def _stratum(volume_ml: float, edges: Sequence[float], names: Sequence[str]) -> str:
    return names[int(np.searchsorted(np.asarray(edges), volume_ml, side="right"))]


@dataclass(frozen=True)
class TruthLesion:
    """One true lesion (connected component of the truth) and how it was found.

    Attributes
    ----------
    id : int
        Component id in the truth's component map (1-based, cc3d order).
    voxels : int
        Size in voxels.
    volume_ml : float
        Size in mL.
    stratum : str
        Size stratum name.
    covered_voxels : int
        Voxels of the lesion inside the predicted foreground.
    hit : bool
        Detected under the overlap rule.
    dice : float
        Dice in the lesion's neighbourhood (see module docstring).
    centroid_vox : tuple of float
        Centroid in voxel indices.
    """

    id: int
    voxels: int
    volume_ml: float
    stratum: str
    covered_voxels: int
    hit: bool
    dice: float
    centroid_vox: tuple[float, ...]


@dataclass(frozen=True)
class PredictedLesion:
    """One predicted component: its size and whether it is a false alarm."""

    id: int
    voxels: int
    volume_ml: float
    stratum: str
    false_alarm: bool
    centroid_vox: tuple[float, ...]


@dataclass(frozen=True)
class Stratum:
    """Detection and Dice of the true lesions in one size stratum."""

    name: str
    n_truth: int
    n_hit: int
    n_false_alarm: int
    detection_rate: Metric
    dice_mean: Metric

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "stratum": self.name,
            "n_truth": {"value": self.n_truth, "unit": COUNT},
            "n_hit": {"value": self.n_hit, "unit": COUNT},
            "n_false_alarm": {"value": self.n_false_alarm, "unit": COUNT},
            "detection_rate": self.detection_rate.to_dict(),
            "dice_mean": self.dice_mean.to_dict(),
        }


@dataclass(frozen=True)
class LesionDetection:
    """Lesion-wise detection result (see the module docstring for the rules).

    Attributes
    ----------
    truth : tuple of TruthLesion
    predicted : tuple of PredictedLesion
    size_edges_ml : tuple of float
    options : mapping
        The rule's parameters (connectivity, min_overlap_fraction, neighbourhood_mm).
    """

    truth: tuple[TruthLesion, ...]
    predicted: tuple[PredictedLesion, ...]
    size_edges_ml: tuple[float, ...]
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_truth(self) -> int:
        """Number of true lesions."""
        return len(self.truth)

    @property
    def n_hit(self) -> int:
        """True lesions hit."""
        return sum(t.hit for t in self.truth)

    @property
    def n_missed(self) -> int:
        """True lesions missed."""
        return self.n_truth - self.n_hit

    @property
    def n_predicted(self) -> int:
        """Number of predicted components."""
        return len(self.predicted)

    @property
    def n_false_alarm(self) -> int:
        """Predicted components overlapping no hit true lesion."""
        return sum(p.false_alarm for p in self.predicted)

    def recall(self) -> Metric:
        """Hits / true lesions."""
        return _ratio("recall", self.n_hit, self.n_truth, "no true lesions")

    def precision(self) -> Metric:
        """Hits / (hits + false alarms)."""
        return _ratio("precision", self.n_hit, self.n_hit + self.n_false_alarm,
                      "no true lesion hit and no false alarm (nothing predicted)")

    def f1(self) -> Metric:
        """``2 hits / (2 hits + false alarms + missed)``."""
        return _ratio("f1", 2 * self.n_hit, 2 * self.n_hit + self.n_false_alarm + self.n_missed,
                      "no true and no predicted lesions")

    def strata(self) -> list[Stratum]:
        """Per size stratum: counts, detection rate, mean neighbourhood Dice."""
        out = []
        for name in size_stratum_names(self.size_edges_ml):
            ts = [t for t in self.truth if t.stratum == name]
            n_hit = sum(t.hit for t in ts)
            fa = sum(p.false_alarm and p.stratum == name for p in self.predicted)
            dices = [t.dice for t in ts]
            dm = (Metric("dice_mean", float(np.mean(dices)), DIMENSIONLESS) if dices
                  else _nan("dice_mean", DIMENSIONLESS, "no true lesion in this stratum"))
            out.append(Stratum(
                name=name, n_truth=len(ts), n_hit=n_hit, n_false_alarm=fa,
                detection_rate=_ratio("detection_rate", n_hit, len(ts),
                                      "no true lesion in this stratum"),
                dice_mean=dm,
            ))
        return out

    def to_dict(self, *, per_lesion: bool = True) -> dict[str, Any]:
        """JSON-ready dict: counts, recall/precision/F1, strata and (optionally) lesion tables."""
        from mskmri.measure.base import json_number

        def cnt(n: int) -> dict[str, Any]:
            return {"value": n, "unit": COUNT}

        out: dict[str, Any] = {
            "rule": dict(self.options),
            "n_truth": cnt(self.n_truth),
            "n_hit": cnt(self.n_hit),
            "n_missed": cnt(self.n_missed),
            "n_predicted": cnt(self.n_predicted),
            "n_false_alarm": cnt(self.n_false_alarm),
            "recall": self.recall().to_dict(),
            "precision": self.precision().to_dict(),
            "f1": self.f1().to_dict(),
            "size_strata_edges_mL": list(self.size_edges_ml),
            "strata": [s.to_dict() for s in self.strata()],
        }
        if per_lesion:
            out["truth_lesions"] = [
                {"id": t.id, "voxels": t.voxels, "volume_mL": json_number(t.volume_ml),
                 "stratum": t.stratum, "covered_voxels": t.covered_voxels, "hit": t.hit,
                 "dice": json_number(t.dice),
                 "centroid_voxel": [json_number(c) for c in t.centroid_vox]}
                for t in self.truth
            ]
            out["predicted_lesions"] = [
                {"id": p.id, "voxels": p.voxels, "volume_mL": json_number(p.volume_ml),
                 "stratum": p.stratum, "false_alarm": p.false_alarm,
                 "centroid_voxel": [json_number(c) for c in p.centroid_vox]}
                for p in self.predicted
            ]
        return out


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    import cc3d

    conn: Literal[8, 26] = 26 if mask.ndim == 3 else 8  # = LESION_CONNECTIVITY[mask.ndim]
    labels, n = cc3d.connected_components(
        mask.astype(np.uint8), connectivity=conn, return_N=True
    )
    return np.asarray(labels), int(n)


def _centroids(labels: np.ndarray, n: int) -> list[tuple[float, ...]]:
    if n == 0:
        return []
    cms = ndimage.center_of_mass(np.ones(labels.shape, dtype=np.uint8), labels, range(1, n + 1))
    return [tuple(float(c) for c in cm) for cm in cms]


def _neighbourhood_dice(
    t_cc: np.ndarray, lesion: int, p: np.ndarray, spacing: Sequence[float], radius_mm: float,
    box: tuple[slice, ...],
) -> float:
    # Grow the lesion's bounding box by 2 radii: every voxel within radius_mm of the lesion,
    # and every other lesion voxel closer than that to such a voxel, is inside it, so the
    # comparisons below are exact.
    grow = [int(math.ceil(2 * radius_mm / s)) + 1 for s in spacing]
    crop = tuple(
        slice(max(b.start - g, 0), min(b.stop + g, n))
        for b, g, n in zip(box, grow, t_cc.shape, strict=True)
    )
    tc = t_cc[crop]
    mine = tc == lesion
    others = (tc != 0) & ~mine
    d_mine = ndimage.distance_transform_edt(~mine, sampling=spacing)
    region = d_mine <= radius_mm
    if others.any():
        d_other = ndimage.distance_transform_edt(~others, sampling=spacing)
        region &= d_mine <= d_other
    pc = p[crop] & region
    inter = int(np.count_nonzero(pc & mine))
    return 2.0 * inter / (int(np.count_nonzero(mine)) + int(np.count_nonzero(pc)))


def lesion_detection(
    pred: Volume | npt.ArrayLike,
    truth: Volume | npt.ArrayLike,
    *,
    spacing: Sequence[float] | None = None,
    min_overlap_fraction: float = MIN_OVERLAP_FRACTION,
    size_edges_ml: Sequence[float] = DEFAULT_SIZE_EDGES_ML,
    neighbourhood_mm: float = LESION_NEIGHBOURHOOD_MM,
    resample: bool = False,
) -> LesionDetection:
    """Lesion-wise detection by connected components, stratified by true-lesion size.

    Parameters
    ----------
    pred, truth : Volume or (I, J[, K]) array_like
        Lesion masks (foreground ``!= 0``) on the same grid.
    spacing : sequence of float, optional
        mm per axis; required for arrays (volumes in mL and the neighbourhood in mm need it).
    min_overlap_fraction : float in [0, 1]
        Fraction of a true lesion's voxels the prediction must cover to hit it (0 = any
        overlap, i.e. at least one voxel).
    size_edges_ml : sequence of float
        Increasing stratum edges in mL (lower edge inclusive).
    neighbourhood_mm : float
        Radius of the neighbourhood in which each lesion's Dice is computed.
    resample : bool
        For Volumes on different grids, resample the prediction onto the truth (nearest).

    Returns
    -------
    LesionDetection
        Per-lesion tables, counts, recall/precision/F1 and strata.
    """
    _check_lesion_options(min_overlap_fraction, neighbourhood_mm)
    edges = _check_edges(size_edges_ml)
    pair = _as_pair(pred, truth, spacing=spacing, need_spacing=True, resample=resample)
    assert pair.spacing is not None and pair.voxel_volume_mm3 is not None
    return _lesion_detection(
        _fg(pair.pred), _fg(pair.truth), pair.spacing, pair.voxel_volume_mm3,
        float(min_overlap_fraction), edges, float(neighbourhood_mm),
    )


def _lesion_detection(
    p: np.ndarray, t: np.ndarray, spacing: Sequence[float], vv: float,
    min_overlap_fraction: float, edges: tuple[float, ...], neighbourhood_mm: float,
) -> LesionDetection:
    names = size_stratum_names(edges)
    v_ml = vv * _ML_PER_MM3
    t_cc, n_t = _components(t)
    p_cc, n_p = _components(p)
    t_size = np.bincount(t_cc.ravel(), minlength=n_t + 1)
    p_size = np.bincount(p_cc.ravel(), minlength=n_p + 1)
    both = (t_cc > 0) & (p_cc > 0)
    covered = np.bincount(t_cc[both], minlength=n_t + 1)
    need = np.maximum(1, np.ceil(min_overlap_fraction * t_size - 1e-9)).astype(np.int64)
    hit = covered >= need
    hit[0] = False
    # predicted components touching a hit true lesion
    pairs = np.unique(np.stack([t_cc[both], p_cc[both]]), axis=1) if both.any() else np.zeros((2, 0), int)
    matched = np.zeros(n_p + 1, dtype=bool)
    for ti, pj in pairs.T:
        if hit[ti]:
            matched[pj] = True
    boxes = ndimage.find_objects(t_cc) if n_t else []
    t_cent = _centroids(t_cc, n_t)
    p_cent = _centroids(p_cc, n_p)
    truth_rows = []
    for i in range(1, n_t + 1):
        box = boxes[i - 1]
        assert box is not None
        d = _neighbourhood_dice(t_cc, i, p, spacing, neighbourhood_mm, box)
        vol = float(t_size[i]) * v_ml
        truth_rows.append(TruthLesion(
            id=i, voxels=int(t_size[i]), volume_ml=vol, stratum=_stratum(vol, edges, names),
            covered_voxels=int(covered[i]), hit=bool(hit[i]), dice=d, centroid_vox=t_cent[i - 1],
        ))
    pred_rows = []
    for j in range(1, n_p + 1):
        vol = float(p_size[j]) * v_ml
        pred_rows.append(PredictedLesion(
            id=j, voxels=int(p_size[j]), volume_ml=vol, stratum=_stratum(vol, edges, names),
            false_alarm=not bool(matched[j]), centroid_vox=p_cent[j - 1],
        ))
    return LesionDetection(
        truth=tuple(truth_rows), predicted=tuple(pred_rows), size_edges_ml=edges,
        options={
            "connectivity": LESION_CONNECTIVITY[t.ndim],
            "min_overlap_fraction": min_overlap_fraction,
            "neighbourhood_mm": neighbourhood_mm,
            "hit": "true lesion covered by >= max(1, ceil(min_overlap_fraction x size)) "
                   "predicted voxels",
            "false_alarm": "predicted component overlapping no hit true lesion",
        },
    )


# ============================================================================ multi-label
@dataclass(frozen=True)
class LabelEvaluation:
    """Metrics of one label value: voxel metrics and, optionally, lesion-wise detection."""

    label: int
    name: str
    metrics: Mapping[str, Metric]
    lesions: LesionDetection | None = None

    def to_dict(self, *, per_lesion: bool = True) -> dict[str, Any]:
        """JSON-ready dict."""
        out: dict[str, Any] = {
            "label": self.label,
            "name": self.name,
            "metrics": {k: m.to_dict() for k, m in self.metrics.items()},
        }
        if self.lesions is not None:
            out["lesions"] = self.lesions.to_dict(per_lesion=per_lesion)
        return out


def evaluate_labels(
    pred: Volume | npt.ArrayLike,
    truth: Volume | npt.ArrayLike,
    *,
    labels: Sequence[int] | None = None,
    names: Mapping[int, str] | None = None,
    spacing: Sequence[float] | None = None,
    resample: bool = False,
    lesions: bool = False,
    min_overlap_fraction: float = MIN_OVERLAP_FRACTION,
    size_edges_ml: Sequence[float] = DEFAULT_SIZE_EDGES_ML,
    neighbourhood_mm: float = LESION_NEIGHBOURHOOD_MM,
    percentile: float = HD_PERCENTILE,
) -> list[LabelEvaluation]:
    """Per-label metrics of two label maps.

    Parameters
    ----------
    pred, truth : LabelVolume / Volume or (I, J[, K]) integer array_like
        Label maps on the same grid.
    labels : sequence of int, optional
        Label values to evaluate; default all non-zero values present in either map.
    names : mapping of int to str, optional
        Value -> name; default the truth's ``labels`` (LabelVolume) or ``"label_<v>"``.
    spacing : sequence of float, optional
        mm per axis; required for arrays.
    resample : bool
        For Volumes on different grids: resample the prediction onto the truth (nearest).
    lesions : bool
        Also run :func:`lesion_detection` on each label's mask.
    min_overlap_fraction, size_edges_ml, neighbourhood_mm
        Passed to :func:`lesion_detection`.
    percentile : float
        HD percentile.

    Returns
    -------
    list of LabelEvaluation
        In the order of ``labels``.
    """
    edges = _check_edges(size_edges_ml)
    _check_lesion_options(min_overlap_fraction, neighbourhood_mm)
    pair = _as_pair(pred, truth, spacing=spacing, need_spacing=True, resample=resample)
    assert pair.spacing is not None and pair.voxel_volume_mm3 is not None
    pa, ta = pair.pred, pair.truth
    for what, arr in (("prediction", pa), ("truth", ta)):
        if arr.dtype.kind == "f" and not np.all(arr == np.round(arr)):
            raise LabelError(f"the {what} holds fractional values: give an integer label map")
    if labels is None:
        labels = sorted((set(np.unique(pa).tolist()) | set(np.unique(ta).tolist())) - {0})
    labels = [int(v) for v in labels]
    if any(v == 0 for v in labels):
        raise LabelError("label 0 is background and cannot be evaluated; leave it out of labels")
    if names is None:
        names = getattr(truth, "labels", None) or getattr(pred, "labels", None) or {}
    out = []
    for v in labels:
        p = pa == v
        t = ta == v
        metrics = _binary_metrics(p, t, pair.spacing, pair.voxel_volume_mm3, percentile)
        det = (
            _lesion_detection(p, t, pair.spacing, pair.voxel_volume_mm3,
                              float(min_overlap_fraction), edges, float(neighbourhood_mm))
            if lesions else None
        )
        out.append(LabelEvaluation(label=v, name=str(names.get(v, f"label_{v}")),
                                   metrics=metrics, lesions=det))
    return out


def summarize(results: Sequence[LabelEvaluation]) -> dict[str, Any]:
    """Mean of each metric over the labels where it is defined (count of labels used)."""
    from mskmri.measure.base import json_number

    out: dict[str, Any] = {}
    if not results:
        return out
    for key in ("dice", "iou", "hd95", "assd"):
        vals = [r.metrics[key].value for r in results if r.metrics[key].defined]
        unit = results[0].metrics[key].unit
        out[f"mean_{key}"] = (
            {"value": json_number(float(np.mean(vals))), "unit": unit, "n_labels": len(vals)}
            if vals else {"value": None, "unit": unit, "n_labels": 0,
                          "reason": "undefined for every label"}
        )
    return out


__all__ = [
    "DEFAULT_SIZE_EDGES_ML",
    "EVALUATION_SCHEMA",
    "HD_PERCENTILE",
    "LESION_NEIGHBOURHOOD_MM",
    "Confusion",
    "LabelEvaluation",
    "LesionDetection",
    "Metric",
    "MetricError",
    "PredictedLesion",
    "Stratum",
    "TruthLesion",
    "accuracy",
    "assd",
    "binary_metrics",
    "confusion",
    "dice",
    "evaluate_labels",
    "hd95",
    "iou",
    "lesion_detection",
    "overlap_metrics",
    "sensitivity",
    "size_stratum_names",
    "specificity",
    "summarize",
    "surface_distances",
    "surface_voxels",
    "volume_difference",
]
