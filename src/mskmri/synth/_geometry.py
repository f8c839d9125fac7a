"""Grid bookkeeping, knee landmarks and shape primitives for procedural anatomy.

Everything here works in the *canonical array frame*: a label array reoriented to RAS
(axis 0 = x, left -> right; axis 1 = y, posterior -> anterior; axis 2 = z, inferior ->
superior), with positions in "array millimetres" ``index * spacing``. The medial direction
along x is not fixed (left and right knees): :attr:`Landmarks.medial_sign` holds it.

Heavy work happens on a coarse grid (cells of about :data:`CELL_MM`), sampled from the full
grid at block centres; fields come back to full resolution with separable linear
interpolation, restricted to a bounding box when only part of the volume needs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mskmri.errors import LabelError
from mskmri.labels import KNEE_ID

#: Cell size (mm) of the coarse working grid.
CELL_MM = 1.5

K = KNEE_ID
BONE_IDS = (K["femur"], K["tibia"], K["patella"], K["fibula"])
CARTILAGE_IDS = (K["femoral_cartilage"], K["medial_tibial_cartilage"],
                 K["lateral_tibial_cartilage"], K["patellar_cartilage"])


def _interp_rows(coords: np.ndarray, n_in: int) -> np.ndarray:
    """Linear-interpolation matrix for continuous coarse coordinates ``coords`` (edges held)."""
    x = np.clip(np.asarray(coords, dtype=np.float64), 0.0, max(n_in - 1.0, 0.0))
    i0 = np.floor(x).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (x - i0).astype(np.float32)
    mat = np.zeros((len(x), n_in), dtype=np.float32)
    rows = np.arange(len(x))
    np.add.at(mat, (rows, i0), 1.0 - w)
    np.add.at(mat, (rows, i1), w)
    return mat


@dataclass(frozen=True)
class Grid:
    """A full-resolution grid and its coarse companion.

    Attributes
    ----------
    shape : 3 ints
        Full-resolution shape.
    spacing : 3 floats
        Full-resolution spacing (mm).
    factors : 3 ints
        Coarse cell = ``factors`` full voxels; coarse voxel ``c`` samples full voxel
        ``c * f + f // 2``.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    factors: tuple[int, int, int]

    @classmethod
    def for_shape(cls, shape: Sequence[int], spacing: Sequence[float],
                  cell_mm: float = CELL_MM) -> Grid:
        f = tuple(max(1, int(round(cell_mm / s))) for s in spacing)
        return cls(tuple(int(n) for n in shape), tuple(float(s) for s in spacing), f)  # type: ignore[arg-type]

    @property
    def offsets(self) -> tuple[int, int, int]:
        return (self.factors[0] // 2, self.factors[1] // 2, self.factors[2] // 2)

    @property
    def coarse_spacing(self) -> tuple[float, float, float]:
        return (self.spacing[0] * self.factors[0], self.spacing[1] * self.factors[1],
                self.spacing[2] * self.factors[2])

    def coarse(self, arr: np.ndarray) -> np.ndarray:
        """Subsample a full-resolution array at coarse cell centres (no copy made)."""
        o, f = self.offsets, self.factors
        return arr[o[0]::f[0], o[1]::f[1], o[2]::f[2]]

    @property
    def coarse_shape(self) -> tuple[int, int, int]:
        o, f = self.offsets, self.factors
        return tuple(len(range(o[a], self.shape[a], f[a])) for a in range(3))  # type: ignore[return-value]

    def upsample(self, field: np.ndarray, box: Sequence[slice] | None = None) -> np.ndarray:
        """Coarse ``field`` -> full resolution (float32), optionally only inside ``box``."""
        box = box or tuple(slice(0, n) for n in self.shape)
        mats = []
        for a in range(3):
            start, stop, _ = box[a].indices(self.shape[a])
            idx = np.arange(start, stop)
            mats.append(_interp_rows((idx - self.offsets[a]) / self.factors[a], field.shape[a]))
        r = np.asarray(field, dtype=np.float32) @ mats[2].T
        r = np.matmul(mats[1][None], r)
        a0 = r.shape[0]
        return (mats[0] @ r.reshape(a0, -1)).reshape(mats[0].shape[0], mats[1].shape[0],
                                                       mats[2].shape[0])

    def axis_mm(self, axis: int, box: Sequence[slice] | None = None) -> np.ndarray:
        """Array-mm coordinates of the full voxels along ``axis`` (inside ``box``)."""
        sl = box[axis] if box is not None else slice(0, self.shape[axis])
        start, stop, _ = sl.indices(self.shape[axis])
        return (np.arange(start, stop, dtype=np.float32) * np.float32(self.spacing[axis]))

    def mesh_mm(self, box: Sequence[slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (x, y, z) mm coordinate arrays for ``box``."""
        x = self.axis_mm(0, box)[:, None, None]
        y = self.axis_mm(1, box)[None, :, None]
        z = self.axis_mm(2, box)[None, None, :]
        return x, y, z

    def box_mm(self, lo: npt.ArrayLike, hi: npt.ArrayLike) -> tuple[slice, slice, slice] | None:
        """Index box covering the array-mm box ``[lo, hi]``, clipped; None when empty."""
        lo = np.asarray(lo, dtype=float)
        hi = np.asarray(hi, dtype=float)
        out = []
        for a in range(3):
            i0 = max(0, int(np.floor(lo[a] / self.spacing[a])))
            i1 = min(self.shape[a], int(np.ceil(hi[a] / self.spacing[a])) + 1)
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return (out[0], out[1], out[2])

    def coarse_points_mm(self, mask_coarse: np.ndarray) -> np.ndarray:
        """(N, 3) array-mm positions of the true voxels of a coarse mask."""
        idx = np.argwhere(mask_coarse)
        f = np.asarray(self.factors)
        o = np.asarray(self.offsets)
        return ((idx * f + o) * np.asarray(self.spacing)).astype(np.float64)


def segment_distance(x: np.ndarray, y: np.ndarray, z: np.ndarray, p0: Sequence[float],
                     p1: Sequence[float], scale: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Distance (mm) from grid points to the segment ``p0-p1``, in coordinates scaled by ``scale``.

    ``scale`` stretches axes before measuring (e.g. ``(0.2, 1, 1)`` makes a band 5x wider
    along x than thick along y).
    """
    s = np.asarray(scale, dtype=np.float32)
    a = np.asarray(p0, dtype=np.float32) * s
    b = np.asarray(p1, dtype=np.float32) * s
    d = b - a
    dd = float(d @ d) or 1e-6
    px, py, pz = x * s[0] - a[0], y * s[1] - a[1], z * s[2] - a[2]
    t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / dd, 0.0, 1.0)
    return np.sqrt((px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2)


def ellipsoid_radius(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: Sequence[float],
                     radii: Sequence[float]) -> np.ndarray:
    """Normalised ellipsoidal radius (1 on the surface) of grid points."""
    return np.sqrt(((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
                   + ((z - centre[2]) / radii[2]) ** 2)


def vonmises_lobe(theta: np.ndarray, mu_deg: float, kappa: float) -> np.ndarray:
    """A bump of height 1 at angle ``mu_deg`` (von Mises shape, width set by ``kappa``)."""
    return np.exp(kappa * (np.cos(theta - np.deg2rad(mu_deg)) - 1.0))


@dataclass
class Landmarks:
    """Knee landmarks in array mm of the canonical (RAS) frame.

    Attributes
    ----------
    medial_sign : float
        +1 when the medial side is towards +x, -1 when towards -x.
    side_from : str
        Which structures told the medial side.
    z_plateau, z_femur_bottom, z_joint : float
        Top of the tibial plateau, bottom of the femoral condyles, their midpoint (mm).
    x_notch : float
        Left-right position of the intercondylar notch / tibial spine (mm).
    plateau_y : (float, float)
        Posterior and anterior extent of the tibial plateau (mm).
    plateau_x : (float, float)
        Left-right extent of the tibial plateau (mm).
    plateau_c : (float, float)
        Centre (x, y) of the plateau.
    femur_c, tibia_c : (float, float)
        Shaft centres (x, y): femur 45 mm above, tibia 35 mm below the joint line when the
        field of view reaches, else the nearest available level.
    extent : (float, float, float)
        Field of view (mm).
    """

    medial_sign: float
    side_from: str
    z_plateau: float
    z_femur_bottom: float
    z_joint: float
    x_notch: float
    plateau_y: tuple[float, float]
    plateau_x: tuple[float, float]
    plateau_c: tuple[float, float]
    femur_c: tuple[float, float]
    tibia_c: tuple[float, float]
    extent: tuple[float, float, float]

    @property
    def lateral_sign(self) -> float:
        return -self.medial_sign

    @property
    def plateau_ap(self) -> float:
        return self.plateau_y[1] - self.plateau_y[0]

    def axis_centre(self, z: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of the limb axis at height ``z``: femur shaft above, tibia shaft below."""
        zf = self.z_joint + 45.0
        zt = self.z_joint - 35.0
        w = np.clip((np.asarray(z, dtype=np.float32) - zt) / (zf - zt), 0.0, 1.0)
        cx = self.tibia_c[0] + w * (self.femur_c[0] - self.tibia_c[0])
        cy = self.tibia_c[1] + w * (self.femur_c[1] - self.tibia_c[1])
        return cx, cy

    def as_dict(self) -> dict[str, object]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _centroid_xy(pts: np.ndarray) -> tuple[float, float]:
    return float(pts[:, 0].mean()), float(pts[:, 1].mean())


def find_landmarks(labels_c: np.ndarray, grid: Grid) -> Landmarks:
    """Landmarks from a coarse knee-schema label array (canonical frame).

    Raises
    ------
    LabelError
        When the femur or tibia is missing (nothing can be placed without them).
    """
    fem = grid.coarse_points_mm(labels_c == K["femur"])
    tib = grid.coarse_points_mm(labels_c == K["tibia"])
    if len(fem) < 20 or len(tib) < 20:
        raise LabelError(
            "knee synthesis needs a femur and a tibia in the label map (found "
            f"{len(fem)} and {len(tib)} coarse voxels); give a knee label map"
        )
    z_pl = float(np.percentile(tib[:, 2], 99.0))
    z_fb = float(np.percentile(fem[:, 2], 1.0))
    z_joint = 0.5 * (z_pl + z_fb)
    top = tib[tib[:, 2] > z_pl - 10.0]
    px = (float(np.percentile(top[:, 0], 2)), float(np.percentile(top[:, 0], 98)))
    py = (float(np.percentile(top[:, 1], 2)), float(np.percentile(top[:, 1], 98)))
    # medial side: labelled plates, then menisci, then fibula (lateral); else a right knee
    sign, side_from, x_notch = -1.0, "default (right knee in RAS: medial towards -x)", None
    for med_v, lat_v, what in ((K["medial_tibial_cartilage"], K["lateral_tibial_cartilage"],
                                "tibial cartilage plates"),
                               (K["medial_meniscus"], K["lateral_meniscus"], "menisci")):
        pm = grid.coarse_points_mm(labels_c == med_v)
        pl = grid.coarse_points_mm(labels_c == lat_v)
        if len(pm) >= 5 and len(pl) >= 5:
            sign = 1.0 if pm[:, 0].mean() > pl[:, 0].mean() else -1.0
            side_from = what
            x_notch = 0.5 * (pm[:, 0].mean() + pl[:, 0].mean())
            if what == "tibial cartilage plates":
                # the notch is the gap between the plates' inner edges
                inner_m = np.percentile(pm[:, 0], 95 if sign < 0 else 5)
                inner_l = np.percentile(pl[:, 0], 5 if sign < 0 else 95)
                x_notch = float(0.5 * (inner_m + inner_l))
            break
    else:
        fib = grid.coarse_points_mm(labels_c == K["fibula"])
        if len(fib) >= 5:
            sign = -1.0 if fib[:, 0].mean() > tib[:, 0].mean() else 1.0
            side_from = "fibula (lateral)"
    if x_notch is None:
        x_notch = 0.5 * (px[0] + px[1])

    def shaft(pts: np.ndarray, z0: float, above: bool) -> tuple[float, float]:
        sel = pts[pts[:, 2] > z0] if above else pts[pts[:, 2] < z0]
        if len(sel) < 10:
            sel = pts[np.argsort(pts[:, 2])[-max(10, len(pts) // 10):]] if above else \
                pts[np.argsort(pts[:, 2])[: max(10, len(pts) // 10)]]
        return _centroid_xy(sel)

    extent = tuple(float(n * s) for n, s in zip(grid.shape, grid.spacing, strict=True))
    return Landmarks(
        medial_sign=sign, side_from=side_from, z_plateau=z_pl, z_femur_bottom=z_fb,
        z_joint=z_joint, x_notch=float(x_notch), plateau_y=py, plateau_x=px,
        plateau_c=(0.5 * (px[0] + px[1]), 0.5 * (py[0] + py[1])),
        femur_c=shaft(fem, z_joint + 45.0, True), tibia_c=shaft(tib, z_joint - 35.0, False),
        extent=extent,  # type: ignore[arg-type]
    )


def structure_points(labels_c: np.ndarray, grid: Grid, *values: int) -> np.ndarray:
    """(N, 3) array-mm points of coarse voxels holding any of ``values``."""
    return grid.coarse_points_mm(np.isin(labels_c, values))
