"""Small geometric tools for measurements on label maps, in world millimetres.

Everything here works on *world* coordinates (RAS+, mm; see :mod:`mskmri.volume`), never on
voxel indices, so a measurement does not depend on how the array is stored (axis order,
flips, spacing). Label arrays are sampled by nearest neighbour, which keeps the mask
boundary exactly on the voxel faces.

- :class:`RaySampler`: sample a label array at world points (``-1`` outside the array).
- :func:`cast_rays`: where a bundle of parallel rays enters and leaves a set of labels.
- :func:`principal_axes`: centroid and principal axes of a point cloud.
- :func:`fit_line_2d`: total-least-squares line through 2-D points with outlier trimming.
- :func:`patient_plane_axes`: the patient's superior and anterior directions projected into
  a plane (used to state angles relative to the patient's axial plane).

Written by hand because the pieces are a few lines of numpy each and need world coordinates
with an arbitrary affine; ``scipy.ndimage.map_coordinates`` (order 0) does the sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

#: Patient axes in RAS+ world coordinates.
RIGHT = np.array([1.0, 0.0, 0.0])
ANTERIOR = np.array([0.0, 1.0, 0.0])
SUPERIOR = np.array([0.0, 0.0, 1.0])

#: Value returned by :meth:`RaySampler.sample` for points outside the array.
OUTSIDE = -1


def unit(v: npt.ArrayLike) -> np.ndarray:
    """``v / |v|`` as float64 (raises ``ValueError`` on a zero vector)."""
    a = np.asarray(v, dtype=np.float64)
    n = float(np.linalg.norm(a))
    if n == 0.0 or not np.isfinite(n):
        raise ValueError("cannot normalise a zero or non-finite vector")
    return a / n


class RaySampler:
    """Nearest-neighbour lookup of an integer array at world points.

    Parameters
    ----------
    array : (I, J, K) integer ndarray
        Label values.
    affine : (4, 4) ndarray
        Voxel index -> RAS+ world mm.
    """

    def __init__(self, array: np.ndarray, affine: np.ndarray) -> None:
        self.array = np.asarray(array)
        self.affine = np.asarray(affine, dtype=np.float64)
        self._inv = np.linalg.inv(self.affine)

    def sample(self, points: npt.ArrayLike) -> np.ndarray:
        """Values at world ``points`` of shape (..., 3); :data:`OUTSIDE` outside the array."""
        pts = np.asarray(points, dtype=np.float64)
        flat = pts.reshape(-1, 3)
        idx = flat @ self._inv[:3, :3].T + self._inv[:3, 3]
        shape = np.asarray(self.array.shape)
        rounded = np.floor(idx + 0.5)
        inside = np.all((rounded >= 0) & (rounded <= shape - 1), axis=1)
        out = np.full(flat.shape[0], OUTSIDE, dtype=np.int64)
        if np.any(inside):
            out[inside] = ndimage.map_coordinates(
                self.array, rounded[inside].T, order=0, mode="nearest", prefilter=False
            )
        return out.reshape(pts.shape[:-1])


@dataclass(frozen=True)
class RayHits:
    """Where each ray of a bundle first enters and last leaves the matched labels.

    Attributes
    ----------
    start, stop : (R,) ndarray
        Ray parameter (mm along the direction, from the ray origin) of the first entry and
        the last exit boundary; NaN for a ray that never meets the labels.
    start_cut, stop_cut : (R,) bool ndarray
        True when that end is not a real boundary: the labels run up to the edge of the
        array (field of view) or to the end of the ray.
    """

    start: np.ndarray
    stop: np.ndarray
    start_cut: np.ndarray
    stop_cut: np.ndarray

    @property
    def extent(self) -> np.ndarray:
        """(R,) ``stop - start`` in mm; NaN for rays without a hit or with a cut end."""
        ext = self.stop - self.start
        return np.where(self.start_cut | self.stop_cut, np.nan, ext)


def cast_rays(
    sampler: RaySampler,
    origins: npt.ArrayLike,
    direction: npt.ArrayLike,
    values: Sequence[int],
    *,
    t_min: float,
    t_max: float,
    step: float,
) -> RayHits:
    """First entry and last exit of parallel rays through the voxels holding ``values``.

    Parameters
    ----------
    sampler : RaySampler
        The label array to sample.
    origins : (R, 3) array_like
        Ray origins, world mm.
    direction : (3,) array_like
        Common ray direction (normalised here).
    values : sequence of int
        Label values that count as "inside".
    t_min, t_max : float
        Ray parameter range in mm (negative ``t_min`` looks behind the origin).
    step : float
        Sampling step in mm; boundaries are placed half a step outside the first and last
        inside samples, so the extent of an ``n``-sample run is ``n * step``.

    Returns
    -------
    RayHits
    """
    o = np.atleast_2d(np.asarray(origins, dtype=np.float64))
    d = unit(direction)
    t = np.arange(t_min, t_max + 0.5 * step, step)
    pts = o[:, None, :] + t[None, :, None] * d[None, None, :]
    vals = sampler.sample(pts)  # (R, T)
    inside = np.isin(vals, np.asarray(values, dtype=np.int64))
    hit = inside.any(axis=1)
    n_t = t.size
    first = np.argmax(inside, axis=1)
    last = n_t - 1 - np.argmax(inside[:, ::-1], axis=1)
    start = np.where(hit, t[first] - 0.5 * step, np.nan)
    stop = np.where(hit, t[last] + 0.5 * step, np.nan)
    rows = np.arange(o.shape[0])
    before = vals[rows, np.maximum(first - 1, 0)]
    after = vals[rows, np.minimum(last + 1, n_t - 1)]
    start_cut = hit & ((first == 0) | (before == OUTSIDE))
    stop_cut = hit & ((last == n_t - 1) | (after == OUTSIDE))
    return RayHits(start=start, stop=stop, start_cut=start_cut, stop_cut=stop_cut)


def principal_axes(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centroid and principal axes of a point cloud.

    Parameters
    ----------
    points : (N, D) ndarray
        Points in mm.

    Returns
    -------
    centroid : (D,) ndarray
    moments : (D,) ndarray
        Variances (mm^2) along the axes, ascending.
    axes : (D, D) ndarray
        Unit axes as columns, in the order of ``moments``.
    """
    c = points.mean(axis=0)
    x = points - c
    cov = x.T @ x / max(points.shape[0], 1)
    w, v = np.linalg.eigh(cov)
    return c, w, v


@dataclass(frozen=True)
class Line2D:
    """A line fitted to 2-D points.

    Attributes
    ----------
    centre : (2,) ndarray
        Mean of the points kept, mm.
    direction : (2,) ndarray
        Unit direction, oriented so its first component is >= 0.
    n_points : int
        Points kept after trimming.
    rms : float
        Root-mean-square perpendicular residual of the kept points, mm.
    extent : (2,) ndarray
        Smallest and largest projection of the kept points on ``direction`` (mm from
        ``centre``).
    """

    centre: np.ndarray
    direction: np.ndarray
    n_points: int
    rms: float
    extent: np.ndarray


def fit_line_2d(points: np.ndarray, *, outlier_mad: float, min_points: int = 3) -> Line2D | None:
    """Total-least-squares line through 2-D points, one pass of outlier trimming.

    Points whose perpendicular residual to a first fit exceeds ``outlier_mad`` times the
    scaled median absolute residual (1.4826 MAD, at least 0.5 mm) are dropped and the line is
    fitted again.

    Parameters
    ----------
    points : (N, 2) ndarray
        Points in mm.
    outlier_mad : float
        Trimming threshold in robust standard deviations.
    min_points : int
        Fewer points than this (before or after trimming) gives None.

    Returns
    -------
    Line2D or None
    """
    pts = np.asarray(points, dtype=np.float64)
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    if pts.shape[0] < min_points:
        return None

    def _fit(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = p.mean(axis=0)
        _, _, vt = np.linalg.svd(p - c, full_matrices=False)
        d = vt[0]
        if d[0] < 0:
            d = -d
        return c, d

    c, d = _fit(pts)
    normal = np.array([-d[1], d[0]])
    res = (pts - c) @ normal
    scale = max(1.4826 * float(np.median(np.abs(res - np.median(res)))), 0.5)
    keep = np.abs(res - np.median(res)) <= outlier_mad * scale
    if keep.sum() >= min_points and not keep.all():
        pts = pts[keep]
        c, d = _fit(pts)
        normal = np.array([-d[1], d[0]])
    res = (pts - c) @ normal
    proj = (pts - c) @ d
    return Line2D(
        centre=c, direction=d, n_points=int(pts.shape[0]), rms=float(np.sqrt(np.mean(res**2))),
        extent=np.array([proj.min(), proj.max()]),
    )


def patient_plane_axes(normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The patient's superior and anterior directions within the plane of ``normal``.

    Parameters
    ----------
    normal : (3,) ndarray
        Unit normal of a (roughly sagittal) plane, oriented towards the patient's right.

    Returns
    -------
    superior, anterior : (3,) ndarray
        ``superior`` = patient +S projected into the plane and normalised;
        ``anterior = superior x normal`` (so for ``normal = +R`` it is +A).
    """
    s = SUPERIOR - (SUPERIOR @ normal) * normal
    s = unit(s)
    a = unit(np.cross(s, normal))
    return s, a


def elevation_deg(direction: np.ndarray, normal: np.ndarray) -> float:
    """Angle (deg) of a line in the plane of ``normal`` above the patient's axial plane.

    Parameters
    ----------
    direction : (3,) ndarray
        Direction of the line; projected into the plane first.
    normal : (3,) ndarray
        Unit plane normal, oriented towards the patient's right.

    Returns
    -------
    float
        In (-90, 90]: positive when the anterior end of the line is superior to its
        posterior end.
    """
    s, a = patient_plane_axes(normal)
    da = float(direction @ a)
    ds = float(direction @ s)
    if da < 0:
        da, ds = -da, -ds
    return float(np.degrees(np.arctan2(ds, da)))


def voxel_half_extent(affine: np.ndarray, direction: np.ndarray) -> float:
    """Half the extent (mm) of one voxel of ``affine`` along the unit ``direction``."""
    cols = np.asarray(affine, dtype=np.float64)[:3, :3]
    return 0.5 * float(np.sum(np.abs(direction @ cols)))
