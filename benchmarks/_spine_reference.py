"""Independent reference for the vertebral-body measurements of ``mskmri.measure.spine``.

Used only to check the library (benchmarks and tests), never by it. It implements the same
*definitions* (see the module docstring of :mod:`mskmri.measure.spine`) with different code:

=====================  ============================================  ==============================
step                   library (primary)                             this reference
=====================  ============================================  ==============================
array handling         world points of the array as stored           array reoriented to RAS first
principal axes         covariance of voxel centres, ``eigh``         ``skimage.measure.regionprops``
                                                                     inertia tensor (with spacing)
sampling               nearest-neighbour rays every 0.1 mm           mask resampled with *linear*
                                                                     interpolation (threshold 0.5)
                                                                     on a rotated 2-D grid
heights                first-to-last extent along each ray           column *pixel count* x pixel
                                                                     size in the rotated grid
endplate lines         total least squares (SVD)                     ordinary least squares
                                                                     (``numpy.polyfit``) in the
                                                                     body frame
AP axis update         unit-vector sum of the endplate directions    mean of the endplate slope
                                                                     angles, frame rotated by it
Cobb angle             difference of elevations above the patient's  signed angle between the two
                       axial plane                                   projected lines (atan2 of
                                                                     cross and dot products)
=====================  ============================================  ==============================
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from skimage.measure import regionprops

from mskmri.measure.spine import (
    AXIS_RELAXATION,
    AXIS_TOLERANCE_DEG,
    BAND_STEP_MM,
    DEGENERATE_MOMENT_GAP,
    ENDPLATE_FIT_RANGE,
    ENDPLATE_OUTLIER_MAD,
    ENDPLATE_STEP_MM,
    HEIGHT_BAND_MM,
    HEIGHT_FRACTIONS,
    MAX_AXIS_ITERATIONS,
    MAX_AXIS_ROTATION_DEG,
    MIDSAGITTAL_SLAB_MM,
)
from mskmri.volume import LabelVolume

#: Pixel size (mm) of the rotated sampling grid.
GRID_MM = 0.1

#: Angle step (deg) of the brute-force search for the smallest enclosing rectangle.
RECT_SCAN_STEP_DEG = 0.05


@dataclass
class RefBody:
    """Reference measurements of one body (mm, deg, world RAS+ vectors)."""

    value: int
    centroid: np.ndarray
    lr: np.ndarray
    ap: np.ndarray = field(default_factory=lambda: np.zeros(3))
    heights: dict[str, float] = field(default_factory=dict)
    superior_dir: np.ndarray | None = None
    inferior_dir: np.ndarray | None = None
    cut: bool = False


class _Body:
    """Mask of one body (float, RAS-ordered array) with world <-> index conversion."""

    def __init__(self, mask: np.ndarray, affine: np.ndarray) -> None:
        self.mask = mask.astype(np.float32)
        self.affine = affine
        self.inv = np.linalg.inv(affine)

    def sample(self, world: np.ndarray) -> np.ndarray:
        """Linear interpolation of the mask at world points (..., 3), thresholded at 0.5."""
        shp = world.shape[:-1]
        idx = world.reshape(-1, 3) @ self.inv[:3, :3].T + self.inv[:3, 3]
        vals = ndimage.map_coordinates(self.mask, idx.T, order=1, mode="constant", cval=0.0)
        return (vals >= 0.5).reshape(shp)


def _lr_axis(region: object, spacing: np.ndarray, direction: np.ndarray, planar_axis: int | None
             ) -> np.ndarray:
    if planar_axis is not None:
        n = direction[:, planar_axis].copy()
        return n if n[0] >= 0 else -n
    inertia = np.asarray(region.inertia_tensor)  # type: ignore[attr-defined]
    w, v = np.linalg.eigh(inertia)
    cov_w = 0.5 * np.trace(inertia) - w  # covariance moments from inertia moments
    v_world = direction @ v  # index-space axes (already scaled by spacing) to world
    v_world /= np.linalg.norm(v_world, axis=0)
    j = int(np.argmax(np.abs(v_world[0, :])))
    gap = min(abs(cov_w[j] - cov_w[k]) / max(cov_w[j], cov_w[k]) for k in range(3) if k != j)
    if gap < DEGENERATE_MOMENT_GAP:
        return np.array([1.0, 0.0, 0.0])
    n = v_world[:, j]
    return n if n[0] >= 0 else -n


def _scan_min_area_angle(a: np.ndarray, s: np.ndarray) -> float:
    """Angle (rad, in (-pi/4, pi/4]) of the smallest-area enclosing rectangle of points
    ``(a, s)``, by brute force over orientations (no convex hull)."""
    angles = np.radians(np.arange(-45.0, 45.0, RECT_SCAN_STEP_DEG))[1:]
    best, best_area = 0.0, np.inf
    for t in angles:
        u = a * np.cos(t) + s * np.sin(t)
        w = -a * np.sin(t) + s * np.cos(t)
        area = (u.max() - u.min()) * (w.max() - w.min())
        if area < best_area:
            best, best_area = float(t), float(area)
    return best


def _rotate_in_plane(ap: np.ndarray, lr: np.ndarray, angle_rad: float) -> np.ndarray:
    si = np.cross(lr, ap)
    return np.cos(angle_rad) * ap + np.sin(angle_rad) * si


def _band(width: float) -> np.ndarray:
    n = int(round(0.5 * width / BAND_STEP_MM))
    return np.arange(-n, n + 1) * BAND_STEP_MM


def _grid_columns(body: _Body, c: np.ndarray, ap: np.ndarray, si: np.ndarray, lr: np.ndarray,
                  a_pos: np.ndarray, half: float, lr_off: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Boolean grid (columns at ``a_pos``, rows along si) and the row coordinates."""
    s = np.arange(-half, half + 1e-9, GRID_MM)
    pts = (c + lr_off * lr)[None, None, :] + a_pos[:, None, None] * ap + s[None, :, None] * si
    return body.sample(pts), s


def _ap_extent(body: _Body, c: np.ndarray, ap: np.ndarray, si: np.ndarray, half: float
               ) -> tuple[float, float] | None:
    rows_s = _band(HEIGHT_BAND_MM)
    a = np.arange(-half, half + 1e-9, GRID_MM)
    pts = c[None, None, :] + rows_s[:, None, None] * si + a[None, :, None] * ap
    g = body.sample(pts)
    post, ant = [], []
    for row in g:
        nz = np.flatnonzero(row)
        if nz.size == 0 or nz[0] == 0 or nz[-1] == row.size - 1:
            continue
        post.append(a[nz[0]] - 0.5 * GRID_MM)
        ant.append(a[nz[-1]] + 0.5 * GRID_MM)
    if len(post) < 0.5 * rows_s.size:
        return None
    return float(np.median(post)), float(np.median(ant))


def _ols_angle(a: np.ndarray, s: np.ndarray) -> float | None:
    """Slope angle (rad) of an OLS line s(a) with the library's trimming rule."""
    ok = np.isfinite(s)
    a, s = a[ok], s[ok]
    if a.size < 5:
        return None
    k, b = np.polyfit(a, s, 1)
    res = (s - (k * a + b)) / np.sqrt(1 + k * k)
    scale = max(1.4826 * np.median(np.abs(res - np.median(res))), 0.5)
    keep = np.abs(res - np.median(res)) <= ENDPLATE_OUTLIER_MAD * scale
    if keep.sum() >= 5 and not keep.all():
        k, b = np.polyfit(a[keep], s[keep], 1)
    return float(np.arctan(k))


def _endplate_angles(body: _Body, c: np.ndarray, ap: np.ndarray, si: np.ndarray,
                     lr: np.ndarray, post: float, ant: float, half: float, planar: bool
                     ) -> tuple[float | None, float | None]:
    """Slope angles (rad) of the superior and inferior boundaries: one point per column, the
    mean over the planes of the L-R band (as in the library), then an OLS line."""
    depth = ant - post
    f0, f1 = ENDPLATE_FIT_RANGE
    a_pos = np.arange(post + f0 * depth, post + f1 * depth + 1e-9, ENDPLATE_STEP_MM)
    offsets = np.zeros(1) if planar else _band(HEIGHT_BAND_MM)
    tops = np.full((offsets.size, a_pos.size), np.nan)
    bots = np.full((offsets.size, a_pos.size), np.nan)
    for j, off in enumerate(offsets):
        g, s = _grid_columns(body, c, ap, si, lr, a_pos, half, lr_off=off)
        for i, col in enumerate(g):
            nz = np.flatnonzero(col)
            if nz.size == 0:
                continue
            if nz[-1] < col.size - 1:
                tops[j, i] = s[nz[-1]] + 0.5 * GRID_MM
            if nz[0] > 0:
                bots[j, i] = s[nz[0]] - 0.5 * GRID_MM

    def _band_mean(x: np.ndarray) -> np.ndarray:
        n = np.isfinite(x).sum(axis=0)
        with np.errstate(invalid="ignore"):
            m = np.nansum(x, axis=0) / np.maximum(n, 1)
        return np.where(n >= 0.5 * offsets.size, m, np.nan)

    return _ols_angle(a_pos, _band_mean(tops)), _ols_angle(a_pos, _band_mean(bots))


def _measure(body: _Body, centroid: np.ndarray, lr: np.ndarray, ap: np.ndarray, half: float,
             planar: bool) -> tuple[tuple[float, float] | None, float | None, float | None]:
    """AP extent (posterior, anterior) and endplate slope angles (rad) in the frame ``ap``."""
    si = np.cross(lr, ap)
    ext = _ap_extent(body, centroid, ap, si, half)
    if ext is None:
        return None, None, None
    sup, inf = _endplate_angles(body, centroid, ap, si, lr, ext[0], ext[1], half, planar)
    return ext, sup, inf


def reference_bodies(seg: LabelVolume, values: list[int]) -> dict[int, RefBody]:
    """Reference heights and endplate directions of the bodies ``values`` in ``seg``.

    Parameters
    ----------
    seg : LabelVolume
        Spine-schema label map with an axis-aligned affine (after reorientation to RAS).
    values : list of int
        Vertebral-body ids to measure.
    """
    ras = seg.reorient("RAS")
    aff = ras.affine
    spacing = np.asarray(ras.spacing)
    direction = aff[:3, :3] / spacing[None, :]
    planar_axis = next((a for a, n in enumerate(ras.shape) if n == 1), None)
    out: dict[int, RefBody] = {}
    for v in values:
        m = ras.array == v
        if m.sum() < 20:
            continue
        lab, n = ndimage.label(m, structure=np.ones((3, 3, 3)))
        if n > 1:
            sizes = ndimage.sum(m, lab, range(1, n + 1))
            m = lab == (int(np.argmax(sizes)) + 1)
        region = regionprops(m.astype(np.uint8), spacing=tuple(spacing))[0]
        cen_idx = np.asarray(region.centroid) / spacing  # regionprops centroid is scaled
        centroid = aff[:3, :3] @ cen_idx + aff[:3, 3]
        lr = _lr_axis(region, spacing, direction, planar_axis)
        rb = RefBody(value=v, centroid=centroid, lr=lr)
        idx = np.argwhere(m)
        rb.cut = bool(any(
            np.any(idx[:, a] == 0) or np.any(idx[:, a] == ras.shape[a] - 1)
            for a in range(3) if ras.shape[a] > 1
        ))
        body = _Body(m, aff)
        world = idx @ aff[:3, :3].T + aff[:3, 3]
        half = float(np.sqrt(((world - centroid) ** 2).sum(axis=1).max())) + 5.0
        s_pat = np.array([0.0, 0.0, 1.0]) - lr[2] * lr
        s_pat /= np.linalg.norm(s_pat)
        a_pat = np.cross(s_pat, lr)
        a_pat /= np.linalg.norm(a_pat)
        rel = world - centroid
        if planar_axis is None:
            rel = rel[np.abs(rel @ lr) <= 0.5 * MIDSAGITTAL_SLAB_MM]
        ap0 = _rotate_in_plane(a_pat, lr, _scan_min_area_angle(rel @ a_pat, rel @ s_pat))
        ap = ap0
        ap_used = ap
        for _ in range(0 if v == 2 else MAX_AXIS_ITERATIONS):
            ap_used = ap
            ext, sup, inf = _measure(body, centroid, lr, ap_used, half, planar_axis is not None)
            use = [sup, inf]
            if ext is None or any(x is None for x in use):
                break
            step = AXIS_RELAXATION * float(np.mean(use))  # type: ignore[arg-type]
            ap = _rotate_in_plane(ap_used, lr, step)
            if abs(np.degrees(step)) < AXIS_TOLERANCE_DEG:
                ap_used = ap
                ext, sup, inf = _measure(body, centroid, lr, ap_used, half, planar_axis is not None)
                break
        if v == 2 or np.degrees(np.arccos(np.clip(ap_used @ ap0, -1, 1))) > MAX_AXIS_ROTATION_DEG:
            ap_used = ap0
            ext, sup, inf = _measure(body, centroid, lr, ap_used, half, planar_axis is not None)
        ap = ap_used
        rb.ap = ap
        si = np.cross(lr, ap)
        if ext is None:
            out[v] = rb
            continue
        rb.superior_dir = None if sup is None else _rotate_in_plane(ap, lr, sup)
        rb.inferior_dir = None if inf is None else _rotate_in_plane(ap, lr, inf)
        post, ant = ext
        band = _band(HEIGHT_BAND_MM)
        lr_offsets = np.zeros(1) if planar_axis is not None else band
        for name, frac in HEIGHT_FRACTIONS.items():
            a_pos = post + frac * (ant - post) + band
            counts = []
            for off in lr_offsets:
                g, _ = _grid_columns(body, centroid, ap, si, lr, a_pos, half, lr_off=off)
                for col in g:
                    if col.any() and not col[0] and not col[-1]:
                        counts.append(col.sum() * GRID_MM)
            if len(counts) >= 0.5 * a_pos.size * lr_offsets.size:
                rb.heights[name] = float(np.mean(counts))
        out[v] = rb
    return out


def reference_cobb(upper: RefBody, lower: RefBody, upper_endplate: str = "superior",
                   lower_endplate: str = "inferior") -> float:
    """Signed angle (deg) from the lower to the upper endplate line about the mean L-R axis
    (positive = lordosis), or NaN when an endplate is missing."""
    du = upper.superior_dir if upper_endplate == "superior" else upper.inferior_dir
    dl = lower.superior_dir if lower_endplate == "superior" else lower.inferior_dir
    if du is None or dl is None:
        return float("nan")
    n = upper.lr + lower.lr
    n = n / np.linalg.norm(n)
    pu = du - (du @ n) * n
    pl = dl - (dl @ n) * n
    return float(np.degrees(np.arctan2(np.cross(pl, pu) @ n, pl @ pu)))
