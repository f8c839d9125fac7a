"""Complete a knee label map into a renderable scene: the tissues a source lacks, effusion, BMLs.

A source label map names bones and cartilage (OAI, CartiMorph), plus menisci and fibula
(pymskt), or nearly everything (SPL atlas). An image rendered from bones alone would show
bones on a flat field; :func:`complete_knee` fills what is missing with approximate,
randomised procedural shapes so the image looks like a knee:

- patella + patellar cartilage and fibula when absent (ellipsoid, sphere + capsule);
- medial/lateral menisci: wedges on the periphery of each tibial plate, open towards the
  notch, squeezed between tibial and femoral cartilage (only free voxels are used);
- ACL, PCL (capsules across the notch), patellar tendon (flat band patella -> tibial
  tuberosity), collateral ligaments (bands following the medial/lateral bone surface),
  Hoffa's fat pad (ellipsoid behind the tendon, clipped by everything already there);
- quadriceps tendon and popliteal vessels (rendered, labelled background) where the source
  has no soft tissue;
- soft tissue in layers outward from the joint: popliteal (deep) fat, muscle (thigh above,
  gastrocnemius heads at the joint line, calf below; von Mises lobes around the limb axis),
  intermuscular septa, subcutaneous fat and skin; cortical bone as a thin rim of each bone;
- joint effusion of a chosen volume in mL (label 11, exact: the N free voxels with the
  lowest "fluid priority", N = volume / voxel volume): a film on the cartilage surfaces
  that thickens, plus the suprapatellar recess;
- bone marrow lesions of a chosen volume in mL (subchondral seed, smooth ill-defined
  strength field, exact mask = the N marrow voxels of highest strength, kept connected).
  Lesion voxels stay bone in the tissue map; the lesion mask is separate (1 = BML).

Every structure that was generated is labelled in the truth map and reported as
``"procedural"`` in :attr:`KneeScene.origin`, so a model can down-weight it; ``"source"``
marks structures taken from the label map. Each random step draws from its own seeded
stream and records its parameters.

The scene holds *tissue* ids (:class:`Tissue`), a refinement of the knee schema: ids 1-17
are the knee classes themselves, 18+ are tissues that the truth map calls bone (cortex) or
background (fat, skin, tendon, vessel, nerve). ``TRUTH_OF_TISSUE`` maps one to the other.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
from scipy import ndimage

from mskmri.errors import GeometryError, LabelError
from mskmri.labels import KNEE, KNEE_ID, LESION
from mskmri.synth._common import SynthesisError, json_ready, rng_for
from mskmri.synth._geometry import (
    BONE_IDS,
    CARTILAGE_IDS,
    Grid,
    Landmarks,
    ellipsoid_radius,
    find_landmarks,
    segment_distance,
    structure_points,
    vonmises_lobe,
)
from mskmri.volume import LabelVolume

log = logging.getLogger(__name__)
K = KNEE_ID


class Tissue(IntEnum):
    """Tissue ids of a synthesis scene (1-17 are the knee schema's own ids)."""

    AIR = 0
    FEMUR = 1
    TIBIA = 2
    PATELLA = 3
    FIBULA = 4
    FEMORAL_CARTILAGE = 5
    MEDIAL_TIBIAL_CARTILAGE = 6
    LATERAL_TIBIAL_CARTILAGE = 7
    PATELLAR_CARTILAGE = 8
    MEDIAL_MENISCUS = 9
    LATERAL_MENISCUS = 10
    EFFUSION = 11
    MUSCLE = 12
    ACL = 13
    PCL = 14
    COLLATERAL = 15
    PATELLAR_TENDON = 16
    FAT_PAD = 17
    FEMUR_CORTEX = 18
    TIBIA_CORTEX = 19
    PATELLA_CORTEX = 20
    FIBULA_CORTEX = 21
    SUBCUTANEOUS_FAT = 22
    SKIN = 23
    SOFT_FAT = 24  # popliteal, intermuscular and intra-articular fat
    TENDON = 25  # tendons without a project class (quadriceps, SPL tendons)
    VESSEL = 26
    NERVE = 27


N_TISSUES = len(Tissue)

#: Contrast class of each tissue (the contrast models give intensities per class).
TISSUE_CLASS: Mapping[int, str] = {
    Tissue.AIR: "air",
    Tissue.FEMUR: "marrow", Tissue.TIBIA: "marrow", Tissue.PATELLA: "marrow",
    Tissue.FIBULA: "marrow",
    Tissue.FEMORAL_CARTILAGE: "cartilage", Tissue.MEDIAL_TIBIAL_CARTILAGE: "cartilage",
    Tissue.LATERAL_TIBIAL_CARTILAGE: "cartilage", Tissue.PATELLAR_CARTILAGE: "cartilage",
    Tissue.MEDIAL_MENISCUS: "meniscus", Tissue.LATERAL_MENISCUS: "meniscus",
    Tissue.EFFUSION: "fluid", Tissue.MUSCLE: "muscle",
    Tissue.ACL: "ligament", Tissue.PCL: "ligament", Tissue.COLLATERAL: "ligament",
    Tissue.PATELLAR_TENDON: "ligament", Tissue.FAT_PAD: "fat",
    Tissue.FEMUR_CORTEX: "cortex", Tissue.TIBIA_CORTEX: "cortex",
    Tissue.PATELLA_CORTEX: "cortex", Tissue.FIBULA_CORTEX: "cortex",
    Tissue.SUBCUTANEOUS_FAT: "fat", Tissue.SKIN: "skin", Tissue.SOFT_FAT: "fat",
    Tissue.TENDON: "ligament", Tissue.VESSEL: "vessel", Tissue.NERVE: "nerve",
}

_CORTEX_OF = {Tissue.FEMUR: Tissue.FEMUR_CORTEX, Tissue.TIBIA: Tissue.TIBIA_CORTEX,
              Tissue.PATELLA: Tissue.PATELLA_CORTEX, Tissue.FIBULA: Tissue.FIBULA_CORTEX}


def _truth_lut() -> np.ndarray:
    lut = np.zeros(256, dtype=np.uint8)
    for t in Tissue:
        if 1 <= t <= 17:
            lut[t] = t
    for bone, cortex in _CORTEX_OF.items():
        lut[cortex] = bone
    return lut


#: tissue id -> knee-schema id (cortex -> its bone; fat, skin, tendon, vessel, nerve -> 0).
TRUTH_OF_TISSUE: np.ndarray = _truth_lut()

#: Lesion strength is stored in 0..LESION_LEVELS; the truth mask is >= LESION_HALF.
LESION_LEVELS = 15
LESION_HALF = 8

#: Angular resolution of the soft-tissue thickness tables (samples around the limb).
SOFT_TISSUE_ANGLES = 72
#: Least depth (mm) over which the soft-tissue layer coordinate falls by one inside the core.
CORE_DEPTH_MM = 2.0
#: Fluid priority (mm) above which a voxel can never hold effusion.
EFFUSION_PHI_MAX = 40.0
#: Distance (mm) from cartilage inside which joint fluid may sit.
EFFUSION_JOINT_REACH_MM = 14.0
#: Subchondral band (mm from cartilage) where BML seeds are drawn.
BML_SEED_DEPTH_MM = (0.8, 4.0)
#: Height (mm above the joint line) below which femoral BMLs are weight-bearing.
BML_WEIGHT_BEARING_MM = 14.0
#: Share of femoral BMLs seeded in the weight-bearing condyles (rest: trochlea/elsewhere).
BML_WEIGHT_BEARING_SHARE = 0.8

_BML_CARTILAGE = {"femur": (K["femoral_cartilage"],),
                  "tibia": (K["medial_tibial_cartilage"], K["lateral_tibial_cartilage"]),
                  "patella": (K["patellar_cartilage"],)}


@dataclass(frozen=True)
class AnatomyOptions:
    """Ranges of the random anatomy parameters (uniform unless said otherwise).

    Attributes
    ----------
    procedural : bool
        Generate structures the source lacks (False: only fat/skin/cortex are added).
    effusion_ml : (float, float)
        Range of the total joint fluid (mL, log-uniform) when no volume is requested and the
        map has none.
    cortex_mm : (float, float)
        Cortical rim thickness.
    muscle_scale : (float, float)
        Factor on all muscle thicknesses.
    fat_mm : (float, float)
        Subcutaneous fat thickness.
    skin_mm : (float, float)
        Skin thickness.
    lesion_edge_mm : (float, float)
        Gaussian blur (sigma, mm) of the intensity edge of source lesion masks.
    """

    procedural: bool = True
    effusion_ml: tuple[float, float] = (0.5, 20.0)
    cortex_mm: tuple[float, float] = (0.5, 1.2)
    muscle_scale: tuple[float, float] = (0.6, 1.4)
    fat_mm: tuple[float, float] = (3.0, 14.0)
    skin_mm: tuple[float, float] = (1.0, 2.5)
    lesion_edge_mm: tuple[float, float] = (0.5, 1.2)


@dataclass
class KneeScene:
    """A completed knee: tissue map + lesion strength, in the input label map's geometry.

    Attributes
    ----------
    tissues : (I, J, K) uint8 ndarray
        :class:`Tissue` ids.
    lesion_weight : (I, J, K) uint8 ndarray or None
        Lesion intensity weight 0..``LESION_LEVELS``; the lesion truth mask is
        ``>= LESION_HALF``. None when the knee has no lesion.
    affine : (4, 4) ndarray
        Voxel -> RAS+ mm (the input label map's).
    origin : dict
        Knee class name -> ``"source"``, ``"procedural"`` or ``"absent"``.
    params : dict
        Every sampled parameter (JSON-ready).
    """

    tissues: np.ndarray
    lesion_weight: np.ndarray | None
    affine: np.ndarray
    origin: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> LabelVolume:
        """An empty-labels volume carrying the scene's geometry."""
        return LabelVolume(np.zeros((1, 1, 1), np.uint8), self.affine)

    def truth(self) -> LabelVolume:
        """The knee-schema truth map (cortex counted as bone, fat/skin/tendon as 0)."""
        return LabelVolume(TRUTH_OF_TISSUE[self.tissues], self.affine, dict(KNEE), schema="knee")

    def lesion_mask(self) -> LabelVolume:
        """The lesion truth mask (1 = bone marrow lesion)."""
        if self.lesion_weight is None:
            arr = np.zeros(self.tissues.shape, np.uint8)
        else:
            arr = (self.lesion_weight >= LESION_HALF).astype(np.uint8)
        return LabelVolume(arr, self.affine, dict(LESION), schema="lesion")


# =========================================================================== helpers
def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _assign(t: np.ndarray, box: Sequence[slice], mask: np.ndarray, tissue: int) -> int:
    """Write ``tissue`` where ``mask`` is true and the voxel is still free; returns count."""
    sub = t[tuple(box)]
    sel = mask & (sub == 0)
    sub[sel] = tissue
    return int(sel.sum())


def _slab(points: np.ndarray, axis: int, lo: float, hi: float) -> np.ndarray:
    return points[(points[:, axis] >= lo) & (points[:, axis] <= hi)]


# =========================================================================== bones
def _add_patella(t: np.ndarray, grid: Grid, lm: Landmarks, rng: np.random.Generator) -> dict:
    lab_c = grid.coarse(t)
    fem = structure_points(lab_c, grid, K["femur"], K["femoral_cartilage"])
    zc = lm.z_joint + _u(rng, 18.0, 28.0)
    slab = _slab(_slab(fem, 2, zc - 3, zc + 3), 0, lm.x_notch - 12, lm.x_notch + 12)
    y_front = float(slab[:, 1].max()) if len(slab) else float(fem[:, 1].max())
    radii = (_u(rng, 19, 23), _u(rng, 9, 11), _u(rng, 17, 21))
    tc = _u(rng, 2.0, 3.0)
    centre = (lm.x_notch + lm.lateral_sign * _u(rng, 0, 4), y_front + 0.6 + tc + radii[1], zc)
    outer = tuple(r + tc for r in radii)
    box = grid.box_mm(np.subtract(centre, outer) - 1, np.add(centre, outer) + 1)
    if box is None:
        return {"placed": False}
    x, y, z = grid.mesh_mm(box)
    r = ellipsoid_radius(x, y, z, centre, radii)
    n_bone = _assign(t, box, r < 1.0, Tissue.PATELLA)
    r_out = ellipsoid_radius(x, y, z, centre, outer)
    cart = (r_out < 1.0) & (r >= 1.0) & (y < centre[1] - 0.3 * radii[1])
    n_cart = _assign(t, box, cart, Tissue.PATELLAR_CARTILAGE)
    return {"placed": True, "centre_mm": centre, "radii_mm": radii, "cartilage_mm": tc,
            "voxels": n_bone, "cartilage_voxels": n_cart}


def _add_fibula(t: np.ndarray, grid: Grid, lm: Landmarks, rng: np.random.Generator) -> dict:
    lab_c = grid.coarse(t)
    tib = structure_points(lab_c, grid, K["tibia"])
    z_head = lm.z_plateau - _u(rng, 14.0, 20.0)
    slab = _slab(tib, 2, z_head - 4, z_head + 4)
    if len(slab) < 5:
        return {"placed": False, "reason": "tibia absent at the fibular head level"}
    post = slab[slab[:, 1] < np.median(slab[:, 1])]
    pick = post[np.argmax(post[:, 0] * lm.lateral_sign)]
    r_head = _u(rng, 8.5, 11.0)
    head = (float(pick[0]) + lm.lateral_sign * r_head * 0.55, float(pick[1]) - r_head * 0.35, z_head)
    r_shaft = _u(rng, 5.0, 7.0)
    foot = (head[0] + lm.lateral_sign * _u(rng, 0, 3), head[1] + _u(rng, -2, 3), head[2] - 120.0)
    lo = np.minimum(head, foot) - r_head - 1
    hi = np.maximum(head, foot) + r_head + 1
    box = grid.box_mm(lo, hi)
    if box is None:
        return {"placed": False, "reason": "outside the field of view"}
    x, y, z = grid.mesh_mm(box)
    m = (ellipsoid_radius(x, y, z, head, (r_head, r_head, r_head * 1.2)) < 1.0) | (
        segment_distance(x, y, z, head, foot) < r_shaft)
    n = _assign(t, box, m, Tissue.FIBULA)
    return {"placed": True, "head_mm": head, "head_radius_mm": r_head,
            "shaft_radius_mm": r_shaft, "voxels": n}


# =========================================================================== menisci
def _add_meniscus(t: np.ndarray, grid: Grid, lm: Landmarks, rng: np.random.Generator,
                  plate: int, meniscus: int, side_sign: float) -> dict:
    lab_c = grid.coarse(t)
    pts = structure_points(lab_c, grid, plate)
    if len(pts) < 5:
        return {"placed": False, "reason": f"no tibial cartilage {plate} to sit on"}
    w_in, w_out, h = _u(rng, 6.5, 10.0), _u(rng, 1.5, 3.0), _u(rng, 4.5, 7.0)
    lo = pts.min(axis=0) - [w_out + 3, w_out + 3, 4]
    hi = pts.max(axis=0) + [w_out + 3, w_out + 3, h + 6]
    box = grid.box_mm(lo, hi)
    if box is None:
        return {"placed": False}
    sub = t[box]
    sx, sy, sz = grid.spacing
    foot = (sub == plate).any(axis=2)
    d_in = ndimage.distance_transform_edt(foot, sampling=(sx, sy))
    d_out = ndimage.distance_transform_edt(~foot, sampling=(sx, sy))
    hmap = np.where(foot, h * np.clip(1.0 - d_in / w_in, 0.0, 1.0), np.where(d_out < w_out, h, 0.0))
    # open the C towards the notch: no meniscus on the inner 40% of the plate in its middle
    x = grid.axis_mm(0, box)[:, None]
    y = grid.axis_mm(1, box)[None, :]
    px = pts[:, 0] * side_sign
    inner, outer = px.min(), px.max()
    xin = (x * side_sign - inner) / max(outer - inner, 1.0)
    yc = 0.5 * (pts[:, 1].min() + pts[:, 1].max())
    half_ap = 0.5 * (pts[:, 1].max() - pts[:, 1].min())
    horn = _u(rng, 0.45, 0.65)
    cut = (xin < 0.4) & (np.abs(y - yc) < horn * half_ap)
    hmap[cut] = 0.0
    occ = (sub == K["tibia"]) | (sub == plate)
    has = occ.any(axis=2)
    ztop = occ.shape[2] - 1 - np.argmax(occ[:, :, ::-1], axis=2)
    kk = np.arange(sub.shape[2])[None, None, :]
    hvox = (hmap / sz)[:, :, None]
    m = has[:, :, None] & (kk > ztop[:, :, None]) & (kk <= ztop[:, :, None] + hvox) & (hvox > 0.5)
    n = _assign(t, box, m, meniscus)
    return {"placed": True, "inner_width_mm": w_in, "outer_width_mm": w_out, "height_mm": h,
            "horn_fraction": horn, "voxels": n}


# =========================================================================== ligaments
def _add_cruciates(t: np.ndarray, grid: Grid, lm: Landmarks, rng: np.random.Generator,
                   acl: bool, pcl: bool) -> dict:
    out: dict[str, Any] = {}
    ap, yc = lm.plateau_ap, lm.plateau_c[1]
    if acl:
        tib = (lm.x_notch + lm.medial_sign * _u(rng, 0, 2), yc + _u(rng, 0.15, 0.25) * ap,
               lm.z_plateau - 1.0)
        fem = (lm.x_notch + lm.lateral_sign * _u(rng, 5, 8), yc - _u(rng, 0.2, 0.3) * ap,
               lm.z_joint + _u(rng, 12, 16))
        r = _u(rng, 4.0, 5.5)
        box = grid.box_mm(np.minimum(tib, fem) - r - 1, np.maximum(tib, fem) + r + 1)
        if box is not None:
            x, y, z = grid.mesh_mm(box)
            n = _assign(t, box, segment_distance(x, y, z, tib, fem) < r, Tissue.ACL)
            out["acl"] = {"tibial_mm": tib, "femoral_mm": fem, "radius_mm": r, "voxels": n}
    if pcl:
        tib = (lm.x_notch + _u(rng, -1, 1), lm.plateau_y[0] + _u(rng, 2, 5),
               lm.z_plateau - _u(rng, 6, 10))
        fem = (lm.x_notch + lm.medial_sign * _u(rng, 5, 8), yc + _u(rng, 0.05, 0.15) * ap,
               lm.z_joint + _u(rng, 11, 15))
        mid = tuple(0.5 * (a + b) for a, b in zip(tib, fem, strict=True))
        mid = (mid[0], mid[1] - _u(rng, 3, 6), mid[2] + _u(rng, 2, 5))
        r = _u(rng, 4.5, 5.5)
        pts = np.array([tib, mid, fem])
        box = grid.box_mm(pts.min(0) - r - 1, pts.max(0) + r + 1)
        if box is not None:
            x, y, z = grid.mesh_mm(box)
            m = (segment_distance(x, y, z, tib, mid) < r) | (segment_distance(x, y, z, mid, fem) < r)
            n = _assign(t, box, m, Tissue.PCL)
            out["pcl"] = {"tibial_mm": tib, "mid_mm": mid, "femoral_mm": fem, "radius_mm": r,
                          "voxels": n}
    return out


def _add_band(t: np.ndarray, grid: Grid, lm: Landmarks, p0: Sequence[float],
              p1: Sequence[float], half_width: float, half_thick: float, tissue: int) -> int:
    """A flat band (wide along x, thin along y) from p0 to p1."""
    lo = np.minimum(p0, p1) - [half_width + 1, half_thick + 1, half_thick + 1]
    hi = np.maximum(p0, p1) + [half_width + 1, half_thick + 1, half_thick + 1]
    box = grid.box_mm(lo, hi)
    if box is None:
        return 0
    x, y, z = grid.mesh_mm(box)
    d = segment_distance(x, y, z, p0, p1, scale=(half_thick / half_width, 1.0, 1.0))
    return _assign(t, box, d < half_thick, tissue)


def _patella_poles(t: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    pat = structure_points(grid.coarse(t), grid, K["patella"])
    if len(pat) < 5:
        return None
    zs = pat[:, 2]
    low = pat[zs <= np.percentile(zs, 5)]
    high = pat[zs >= np.percentile(zs, 95)]
    return low.mean(axis=0), high.mean(axis=0), pat


def _add_patellar_tendon(t: np.ndarray, grid: Grid, lm: Landmarks,
                         rng: np.random.Generator) -> dict:
    poles = _patella_poles(t, grid)
    if poles is None:
        return {"placed": False, "reason": "no patella"}
    low, _, pat = poles
    tib = structure_points(grid.coarse(t), grid, K["tibia"])
    zt = lm.z_plateau - _u(rng, 22, 32)
    slab = _slab(tib, 2, zt - 2.5, zt + 2.5)
    if len(slab) < 3:
        slab = tib[tib[:, 2] <= np.percentile(tib[:, 2], 5)]
        zt = float(slab[:, 2].mean())
    ymax = float(slab[:, 1].max())
    xt = float(slab[slab[:, 1] > ymax - 4, 0].mean())
    p0 = (float(low[0]), float(low[1]) + _u(rng, 1.0, 3.0), float(low[2]) + 2.0)
    p1 = (xt, ymax - _u(rng, 1.0, 2.5), zt)
    hw, ht = _u(rng, 10.0, 14.0), _u(rng, 2.0, 3.0)
    n = _add_band(t, grid, lm, p0, p1, hw, ht, Tissue.PATELLAR_TENDON)
    return {"placed": n > 0, "patella_mm": p0, "tuberosity_mm": p1, "half_width_mm": hw,
            "half_thickness_mm": ht, "voxels": n}


def _add_quadriceps_tendon(t: np.ndarray, grid: Grid, lm: Landmarks,
                           rng: np.random.Generator) -> dict:
    poles = _patella_poles(t, grid)
    if poles is None:
        return {"placed": False}
    _, high, _ = poles
    fem = structure_points(grid.coarse(t), grid, K["femur"])
    z1 = float(high[2]) + _u(rng, 35, 55)
    slab = _slab(fem, 2, z1 - 3, z1 + 3)
    y1 = (float(slab[:, 1].max()) if len(slab) else float(high[1])) + _u(rng, 8, 14)
    p0 = (float(high[0]), float(high[1]) + _u(rng, 0, 3), float(high[2]) - 3.0)
    p1 = (float(high[0]) + _u(rng, -3, 3), y1, z1)
    hw, ht = _u(rng, 10, 14), _u(rng, 2.5, 4.0)
    n = _add_band(t, grid, lm, p0, p1, hw, ht, Tissue.TENDON)
    return {"placed": n > 0, "from_mm": p0, "to_mm": p1, "voxels": n}


def _add_collateral(t: np.ndarray, grid: Grid, lm: Landmarks, side: float,
                    y_range: tuple[float, float], z_range: tuple[float, float],
                    thick: float, gap: float) -> int:
    """A band following the outermost bone/cartilage/meniscus surface on one side (x)."""
    box = grid.box_mm((0.0, y_range[0], z_range[0]), (lm.extent[0], y_range[1], z_range[1]))
    if box is None:
        return 0
    sub = t[box]
    occ = (sub >= 1) & (sub <= 10)
    valid = occ.any(axis=0)
    if not valid.any():
        return 0
    nx = sub.shape[0]
    first = np.argmax(occ, axis=0)
    last = nx - 1 - np.argmax(occ[::-1], axis=0)
    edge_idx = last if side > 0 else first
    x0 = box[0].start
    edge = ((edge_idx + x0) * grid.spacing[0]).astype(np.float32)
    sig = (3.0 / grid.spacing[1], 3.0 / grid.spacing[2])
    num = ndimage.gaussian_filter(np.where(valid, edge, 0.0).astype(np.float32), sig)
    den = ndimage.gaussian_filter(valid.astype(np.float32), sig)
    ok = den > 0.3
    edge_s = np.where(ok, num / np.maximum(den, 1e-3), np.nan)
    x = grid.axis_mm(0, box)[:, None, None]
    e = edge_s[None]
    if side > 0:
        m = (x > e + gap) & (x <= e + gap + thick)
    else:
        m = (x < e - gap) & (x >= e - gap - thick)
    m &= ok[None]
    return _assign(t, box, m, Tissue.COLLATERAL)


def _add_collaterals(t: np.ndarray, grid: Grid, lm: Landmarks, rng: np.random.Generator) -> dict:
    yc = lm.plateau_c[1]
    m_thick = _u(rng, 2.0, 3.0)
    m_y = (yc - _u(rng, 6, 9), yc + _u(rng, 4, 7))
    m_z = (lm.z_joint - _u(rng, 45, 60), lm.z_joint + _u(rng, 28, 35))
    m_n = _add_collateral(t, grid, lm, lm.medial_sign, m_y, m_z, m_thick, 0.3)
    fib = structure_points(grid.coarse(t), grid, K["fibula"])
    z_lo = float(fib[:, 2].max()) - 3.0 if len(fib) else lm.z_plateau - 18.0
    l_thick = _u(rng, 2.5, 4.0)
    l_y = (yc - _u(rng, 12, 16), yc - _u(rng, 3, 6))
    l_z = (z_lo, lm.z_joint + _u(rng, 20, 28))
    l_n = _add_collateral(t, grid, lm, lm.lateral_sign, l_y, l_z, l_thick, 0.3)
    return {"mcl": {"thickness_mm": m_thick, "y_mm": m_y, "z_mm": m_z, "voxels": m_n},
            "lcl": {"thickness_mm": l_thick, "y_mm": l_y, "z_mm": l_z, "voxels": l_n}}


def _add_fat_pad(t: np.ndarray, grid: Grid, lm: Landmarks, rng: np.random.Generator) -> dict:
    lab_c = grid.coarse(t)
    ten = _slab(structure_points(lab_c, grid, K["patellar_tendon"]), 2, lm.z_joint - 4,
                lm.z_joint + 4)
    if len(ten) < 3:
        return {"placed": False, "reason": "no patellar tendon at the joint line"}
    xt = float(ten[:, 0].mean())
    y_t = float(ten[:, 1].min())
    core = structure_points(lab_c, grid, *(list(BONE_IDS) + list(CARTILAGE_IDS) + [9, 10]))
    near = _slab(_slab(core, 2, lm.z_joint - 5, lm.z_joint + 5), 0, xt - 15, xt + 15)
    if len(near) < 3:
        return {"placed": False}
    y_b = float(near[:, 1].max())
    poles = _patella_poles(t, grid)
    z_hi = float(poles[0][2]) + _u(rng, 3.0, 7.0) if poles is not None else lm.z_joint + 15.0
    z_lo = lm.z_plateau - _u(rng, 6.0, 12.0)
    # from the tendon's back to a few mm into the anterior notch; everything already there
    # (bones, cartilage, menisci, ligaments, tendon) clips it
    y_front = y_t + 1.0
    y_back = min(y_b, y_t - 4.0) - _u(rng, 4.0, 10.0)
    centre = (xt + _u(rng, -2, 2), 0.5 * (y_front + y_back), 0.5 * (z_lo + z_hi))
    radii = (_u(rng, 17, 23), 0.5 * (y_front - y_back), 0.5 * (z_hi - z_lo) + 3.0)
    box = grid.box_mm(np.subtract(centre, radii) - 1, np.add(centre, radii) + 1)
    if box is None:
        return {"placed": False}
    x, y, z = grid.mesh_mm(box)
    n = _assign(t, box, ellipsoid_radius(x, y, z, centre, radii) < 1.0, Tissue.FAT_PAD)
    return {"placed": n > 0, "centre_mm": centre, "radii_mm": radii, "voxels": n}


def _add_vessels(t: np.ndarray, grid: Grid, lm: Landmarks, rng: np.random.Generator) -> dict:
    lab_c = grid.coarse(t)
    bones = structure_points(lab_c, grid, K["femur"], K["tibia"])
    bones = _slab(bones, 0, lm.x_notch - 12, lm.x_notch + 12)
    z_lo, z_hi = lm.z_joint - 45.0, lm.z_joint + 55.0
    zc = grid.axis_mm(2)
    keep = (zc >= z_lo) & (zc <= z_hi)
    if len(bones) < 10 or not keep.any():
        return {"placed": False}
    # posterior-most bone y per coarse z bin, interpolated over every full-res z
    zb = np.round(bones[:, 2] / grid.coarse_spacing[2]).astype(int)
    ymin: dict[int, float] = {}
    for zi, yv in zip(zb, bones[:, 1], strict=True):
        ymin[zi] = min(ymin.get(zi, np.inf), yv)
    zk = np.array(sorted(ymin)) * grid.coarse_spacing[2]
    yk = ndimage.gaussian_filter1d(np.array([ymin[k] for k in sorted(ymin)]), 3.0)
    y_post = np.interp(zc, zk, yk).astype(np.float32)
    off_a = _u(rng, 7, 13)
    r_a, r_v = _u(rng, 2.5, 3.5), _u(rng, 3.5, 5.0)
    dx_a = lm.lateral_sign * _u(rng, 0, 4)
    dv = (lm.lateral_sign * _u(rng, 3, 6), -_u(rng, 3, 6))
    lo = (lm.x_notch - 20, float(y_post[keep].min()) - off_a - 15, z_lo)
    hi = (lm.x_notch + 20, float(y_post[keep].max()) - off_a + 8, z_hi)
    box = grid.box_mm(lo, hi)
    if box is None:
        return {"placed": False}
    x, y, z = grid.mesh_mm(box)
    yv = y_post[box[2]][None, None, :] - off_a
    art = (x - (lm.x_notch + dx_a)) ** 2 + (y - yv) ** 2 < r_a ** 2
    vein = (x - (lm.x_notch + dx_a + dv[0])) ** 2 + (y - (yv + dv[1])) ** 2 < r_v ** 2
    n = _assign(t, box, art | vein, Tissue.VESSEL)
    return {"placed": n > 0, "posterior_offset_mm": off_a, "artery_radius_mm": r_a,
            "vein_radius_mm": r_v, "voxels": n}


# =========================================================================== effusion
def _fluid_priority(t: np.ndarray, grid: Grid, lm: Landmarks, rng: np.random.Generator
                    ) -> tuple[np.ndarray, dict]:
    """Coarse fluid priority (mm-like; lower fills first) and its parameters."""
    lab_c = np.ascontiguousarray(grid.coarse(t))
    cs = grid.coarse_spacing
    cart = np.isin(lab_c, CARTILAGE_IDS)
    d_cart = ndimage.distance_transform_edt(~cart, sampling=cs).astype(np.float32)
    xc = (np.arange(lab_c.shape[0]) * grid.factors[0] + grid.offsets[0]) * grid.spacing[0]
    yc = (np.arange(lab_c.shape[1]) * grid.factors[1] + grid.offsets[1]) * grid.spacing[1]
    zc = (np.arange(lab_c.shape[2]) * grid.factors[2] + grid.offsets[2]) * grid.spacing[2]
    X, Y, Z = xc[:, None, None], yc[None, :, None], zc[None, None, :]
    poles = _patella_poles(t, grid)
    z_pat_top = float(poles[1][2]) if poles is not None else lm.z_joint + 35.0
    joint_w = _u(rng, 0.8, 2.0)
    # a smooth random offset makes the fluid gather in pockets instead of an even film
    pocket_amp = _u(rng, 2.0, 7.0)
    cell = np.array([12.0, 12.0, 12.0])
    sh = np.maximum(2, np.ceil(np.array(lab_c.shape) * np.asarray(cs) / cell)).astype(int)
    pockets = ndimage.zoom(rng.standard_normal(sh).astype(np.float32),
                           np.array(lab_c.shape) / sh, order=1)[
        : lab_c.shape[0], : lab_c.shape[1], : lab_c.shape[2]]
    phi_joint = np.where(
        (d_cart < EFFUSION_JOINT_REACH_MM) & (Z > lm.z_plateau - 12) & (Z < z_pat_top + 6)
        & (X > lm.plateau_x[0] - 6) & (X < lm.plateau_x[1] + 6),
        d_cart * joint_w + pocket_amp * (pockets + 1.5), np.float32(EFFUSION_PHI_MAX + 1))
    # suprapatellar recess: an ellipsoid hugging the anterior femur above the patella
    fem = structure_points(lab_c, grid, K["femur"])
    radii = (_u(rng, 16, 24), _u(rng, 5, 9), _u(rng, 20, 32))
    zp = z_pat_top + radii[2] * _u(rng, 0.5, 0.8)
    slab = _slab(fem, 2, zp - 4, zp + 4)
    if len(slab):
        xp = float(slab[:, 0].mean())
        yp = float(slab[:, 1].max()) + radii[1] * 0.8
    else:
        xp, yp = lm.femur_c[0], lm.femur_c[1] + 20.0
    pouch_w = _u(rng, 4.0, 12.0)
    r = ellipsoid_radius(X, Y, Z, (xp, yp, zp), radii)
    phi = np.minimum(phi_joint, np.where(r < 1.6, r * pouch_w, EFFUSION_PHI_MAX + 1))
    return phi.astype(np.float32), {
        "joint_weight": joint_w, "pocket_amplitude_mm": pocket_amp, "pouch_centre_mm": (xp, yp, zp), "pouch_radii_mm": radii,
        "pouch_weight": pouch_w}


def insert_effusion_array(t: np.ndarray, grid: Grid, lm: Landmarks, volume_ml: float,
                          rng: np.random.Generator) -> dict:
    """Write exactly ``round(volume / voxel volume)`` effusion voxels into free space of ``t``.

    Raises
    ------
    SynthesisError
        When the joint has less free space than asked for.
    """
    vox_mm3 = float(np.prod(grid.spacing))
    n_want = int(round(volume_ml * 1000.0 / vox_mm3))
    info: dict[str, Any] = {"requested_ml": volume_ml, "voxels": 0}
    if n_want <= 0:
        info["inserted_ml"] = 0.0
        return info
    phi_c, pinfo = _fluid_priority(t, grid, lm, rng)
    info.update(pinfo)
    reach = phi_c <= EFFUSION_PHI_MAX
    if not reach.any():
        raise SynthesisError("no joint space found for effusion; check the label map")
    idx = np.argwhere(reach)
    lo = (idx.min(0) * grid.factors + grid.offsets - grid.factors) * grid.spacing
    hi = (idx.max(0) * grid.factors + grid.offsets + grid.factors) * grid.spacing
    box = grid.box_mm(lo, hi)
    assert box is not None
    phi = grid.upsample(phi_c, box)
    sub = t[box]
    cand = (sub == 0) & (phi <= EFFUSION_PHI_MAX)
    vals = phi[cand]
    if n_want > vals.size:
        raise SynthesisError(
            f"cannot place {volume_ml:.1f} mL of effusion: the joint has room for "
            f"{vals.size * vox_mm3 / 1000:.1f} mL here; ask for less"
        )
    order = np.argpartition(vals, n_want - 1)[:n_want]
    chosen = np.zeros(vals.size, dtype=bool)
    chosen[order] = True
    full = np.zeros(sub.shape, dtype=bool)
    full[cand] = chosen
    sub[full] = Tissue.EFFUSION
    info["voxels"] = n_want
    info["inserted_ml"] = n_want * vox_mm3 / 1000.0
    return info


# =========================================================================== soft tissue
def _add_soft_tissue(t: np.ndarray, grid: Grid, lm: Landmarks, rng: np.random.Generator,
                     make_muscle: bool, opts: AnatomyOptions) -> dict:
    """Popliteal fat, muscle, subcutaneous fat and skin in layers around the joint.

    Thin septa inside muscle are left to the renderer's strand texture: drawn here on the
    coarse grid they would show its steps.
    """
    lab_c = np.ascontiguousarray(grid.coarse(t))
    cs = np.asarray(grid.coarse_spacing)
    core = ndimage.gaussian_filter((lab_c > 0).astype(np.float32), 4.0 / cs) > 0.35
    # pockets enclosed in an axial slice (notch, popliteal fossa between muscles already in
    # the map) are body, not outside: fill holes slice by slice across the limb axis (z)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    core = ndimage.binary_fill_holes(core, structure=in_plane)
    if not make_muscle:
        # the map brings its own muscles: the body is (nearly) convex across the limb, so
        # every axial slice of the labelled region is closed to its convex hull
        from skimage.morphology import convex_hull_image

        for k in range(core.shape[2]):
            if core[:, :, k].sum() >= 3:
                core[:, :, k] = convex_hull_image(core[:, :, k])
    # signed distance to the core surface, which lies about half a cell from the nodes
    # on either side (an unshifted EDT would put it on the outer nodes: coarse-grid steps)
    half = np.float32(0.5 * float(np.mean(cs)))
    d = np.maximum(ndimage.distance_transform_edt(~core, sampling=cs).astype(np.float32) - half, 0.0)
    d_in = np.maximum(ndimage.distance_transform_edt(core, sampling=cs).astype(np.float32) - half, 0.0)
    xc = (np.arange(lab_c.shape[0]) * grid.factors[0] + grid.offsets[0]) * grid.spacing[0]
    yc = (np.arange(lab_c.shape[1]) * grid.factors[1] + grid.offsets[1]) * grid.spacing[1]
    zc = (np.arange(lab_c.shape[2]) * grid.factors[2] + grid.offsets[2]) * grid.spacing[2]
    X = xc.astype(np.float32)[:, None, None]
    Y = yc.astype(np.float32)[None, :, None]
    Z = zc.astype(np.float32)[None, None, :]
    cx, cy = lm.axis_centre(Z)
    theta = np.arctan2((X - cx) * lm.medial_sign, Y - cy)  # 0 anterior, +pi/2 medial
    poles = _patella_poles(t, grid)
    z_thigh = float(poles[1][2]) if poles is not None else lm.z_joint + 30.0
    # thickness tables over (angle around the limb axis, height): every layer is a sum of
    # von Mises lobes whose weights change from thigh to joint to calf
    n_ang = SOFT_TISSUE_ANGLES
    ang = np.linspace(-np.pi, np.pi, n_ang, endpoint=False, dtype=np.float32)[:, None]
    zz = zc.astype(np.float32)[None, :]
    w_thigh = 1.0 / (1.0 + np.exp(-(zz - z_thigh) / 8.0))
    w_calf = 1.0 / (1.0 + np.exp(-((lm.z_joint - 18.0) - zz) / 8.0))
    w_joint = np.clip(1.0 - w_thigh - w_calf, 0.0, 1.0)
    p: dict[str, Any] = {"muscle": make_muscle}

    def lobes(spec: list[tuple[float, float, float]], key: str) -> np.ndarray:
        acc: np.ndarray = np.zeros_like(ang)
        drawn = []
        for amp, mu, kappa in spec:
            a = amp * _u(rng, 0.6, 1.4)
            m = mu + _u(rng, -12, 12)
            acc = acc + a * vonmises_lobe(ang, m, kappa)
            drawn.append((a, m, kappa))
        p[key] = drawn
        return acc

    if make_muscle:
        scale = _u(rng, *opts.muscle_scale)
        p["muscle_scale"] = scale
        thigh = 5.0 + lobes([(26, 40, 2.5), (24, -55, 2.5), (28, 145, 3.0), (24, -145, 3.0)],
                            "thigh_lobes")
        joint = lobes([(20, 150, 8.0), (17, -150, 8.0), (10, 60, 3.0)], "joint_lobes")
        calf = 3.0 + lobes([(40, 180, 1.8), (22, -65, 5.0), (12, -105, 6.0)], "calf_lobes")
        tab_m = scale * (w_thigh * thigh + w_joint * joint + w_calf * calf)
        deep = _u(rng, 8.0, 20.0)
        tab_df = (w_joint * deep * vonmises_lobe(ang, 180.0, 10.0)
                  + 0.5 * w_thigh * deep * vonmises_lobe(ang, 180.0, 6.0))
        p["popliteal_fat_mm"] = deep
    else:
        tab_m = np.zeros((n_ang, zz.shape[1]), np.float32)
        tab_df = np.zeros_like(tab_m)
    fat0 = _u(rng, *opts.fat_mm)
    tab_inner = tab_df + tab_m
    tab_total = tab_inner + fat0 * (1.0 + 0.6 * vonmises_lobe(ang, 90.0, 2.0))
    # the skin is smooth and convex-ish: lift the outline to the upper envelope of the
    # layers with a bounded slope around the limb, so no air pockets open between lobes
    dang = np.abs(ang - ang.T)
    dang = np.minimum(dang, 2 * np.pi - dang)
    slope = _u(rng, 15.0, 30.0)
    tab_body = (tab_total[None, :, :] - slope * dang[:, :, None]).max(axis=1)
    q = (theta + np.pi) / (2 * np.pi) * n_ang
    i0 = np.floor(q).astype(np.int64) % n_ang
    i1 = (i0 + 1) % n_ang
    wq = (q - np.floor(q)).astype(np.float32)
    kz = np.arange(zz.shape[1])[None, None, :]

    def look(tab: np.ndarray) -> np.ndarray:
        return (1.0 - wq) * tab[i0, kz] + wq * tab[i1, kz]

    t_df = look(tab_df)
    t_m = look(tab_m)
    fat_noise = ndimage.zoom(rng.standard_normal((4, 4, 4)).astype(np.float32),
                             np.array(d.shape) / 4.0, order=1)[: d.shape[0], : d.shape[1], : d.shape[2]]
    t_f = np.maximum(look(tab_body) - t_df - t_m, 0.3 * fat0) * np.clip(1.0 + 0.2 * fat_noise, 0.5, None)
    t_s = np.float32(_u(rng, *opts.skin_mm))
    p.update({"fat_mm": fat0, "skin_mm": float(t_s), "outline_slope_mm_per_rad": slope})
    eps = np.float32(1e-3)
    # layers thinner than a quarter cell vanish (else u would jump across them at the core
    # surface and show coarse-grid steps)
    thin = np.float32(0.25 * float(np.mean(cs)))
    t_df = np.where(t_df < thin, 0.0, t_df).astype(np.float32)
    t_m = np.where(t_m < thin, 0.0, t_m).astype(np.float32)
    c1 = t_df
    c2 = c1 + t_m
    c3 = c2 + t_f
    c4 = c3 + t_s
    u = np.where(d < c1, d / np.maximum(t_df, eps),
        np.where(d < c2, 1.0 + (d - c1) / np.maximum(t_m, eps),
        np.where(d < c3, 2.0 + (d - c2) / np.maximum(t_f, eps),
        np.where(d < c4, 3.0 + (d - c3) / t_s, 4.0 + (d - c4) / t_s))))
    # inside the body core (between structures, enclosed pockets): continue the layer
    # coordinate below its value at the core surface with the depth, so interpolation sees
    # no jump there (a jump would show as coarse-grid steps at full resolution); anything
    # below the first layer is intra-articular / popliteal fat
    # (same slope as the first layer outside, so the surface is where interpolation puts it)
    u0 = np.where(c1 > 0, 0.0, np.where(c2 > 0, 1.0, 2.0)).astype(np.float32)
    first = np.where(c1 > 0, t_df, np.where(c2 > 0, t_m, t_f))
    u = np.where(core, u0 - d_in / np.maximum(first, np.float32(CORE_DEPTH_MM)), u).astype(np.float32)
    np.maximum(u, -1.0, out=u)
    U = grid.upsample(u)
    np.floor(U, out=U)
    U += 1.0
    np.clip(U, 0.0, 5.0, out=U)
    code = U.astype(np.uint8)
    del U
    lut = np.array([Tissue.SOFT_FAT, Tissue.SOFT_FAT,
                    Tissue.MUSCLE if make_muscle else Tissue.SOFT_FAT,
                    Tissue.SUBCUTANEOUS_FAT, Tissue.SKIN, Tissue.AIR], dtype=np.uint8)
    t[...] = np.where(t == 0, lut[code], t)
    p["voxels_muscle"] = int((t == Tissue.MUSCLE).sum()) if make_muscle else 0
    return p


# =========================================================================== cortex
def add_cortex(t: np.ndarray, spacing: Sequence[float], thickness_mm: float) -> dict:
    """Relabel the outer ``thickness_mm`` of each bone as its cortex (cross neighbourhood).

    A bone voxel is interior when every voxel within ``round(thickness / spacing)`` steps
    along each axis holds the same tissue; the field-of-view edge does not make cortex.
    """
    bone = (t >= 1) & (t <= 4)
    if not bone.any():
        return {"thickness_mm": thickness_mm, "voxels": 0}
    idx = [np.nonzero(bone.any(axis=tuple(b for b in range(3) if b != a)))[0] for a in range(3)]
    radii = [max(1, int(round(thickness_mm / s))) for s in spacing]
    box = tuple(slice(max(0, int(i.min()) - r - 1), min(n, int(i.max()) + r + 2))
                for i, r, n in zip(idx, radii, t.shape, strict=True))
    sub = t[box]
    bsub = bone[box]
    interior = bsub.copy()
    for axis, r in enumerate(radii):
        n = sub.shape[axis]
        for k in range(1, r + 1):
            if k >= n:
                break
            a = [slice(None)] * 3
            b = [slice(None)] * 3
            a[axis] = slice(0, n - k)
            b[axis] = slice(k, n)
            same = sub[tuple(a)] == sub[tuple(b)]
            interior[tuple(a)] &= same
            interior[tuple(b)] &= same
    rim = bsub & ~interior
    lut = np.arange(256, dtype=np.uint8)
    for bone_t, cortex_t in _CORTEX_OF.items():
        lut[bone_t] = cortex_t
    sub[rim] = lut[sub[rim]]
    return {"thickness_mm": thickness_mm, "radius_voxels": radii, "voxels": int(rim.sum())}


# =========================================================================== lesions
def _quantise_weight(w: np.ndarray, mask: np.ndarray) -> np.ndarray:
    q = np.rint(np.clip(w, 0.0, 1.0) * LESION_LEVELS).astype(np.uint8)
    q = np.where(mask, np.maximum(q, LESION_HALF), np.minimum(q, LESION_HALF - 1))
    return q.astype(np.uint8)


def lesion_weight_from_mask(mask: np.ndarray, spacing: Sequence[float], sigma_mm: float
                            ) -> np.ndarray:
    """Lesion weight (0..LESION_LEVELS) of a binary mask: Gaussian-blurred edge, half at the
    mask boundary; the mask is recovered exactly as ``weight >= LESION_HALF``."""
    out = np.zeros(mask.shape, dtype=np.uint8)
    if not mask.any():
        return out
    sig = np.asarray([sigma_mm / s for s in spacing])
    pad = np.ceil(3 * sig).astype(int) + 1
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    w = ndimage.gaussian_filter(mask[box].astype(np.float32), sig)
    # a small lesion's blurred peak stays below 1: rescale each box so the core is full
    peak = float(w.max())
    if peak > 0:
        w = np.clip(w / max(peak, 0.5) * 1.0, 0.0, 1.0)
    out[box] = _quantise_weight(w, mask[box])
    return out


def _check_bone(bone: str) -> None:
    if bone not in _BML_CARTILAGE:
        from difflib import get_close_matches

        close = get_close_matches(bone, list(_BML_CARTILAGE), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SynthesisError(f"BMLs go into femur, tibia or patella, not {bone!r}{hint}")


def insert_bml_array(t: np.ndarray, weight: np.ndarray, grid: Grid, lm: Landmarks,
                     volume_ml: float, bone: str, rng: np.random.Generator) -> dict:
    """Insert one subchondral BML of exactly ``volume_ml`` (to a voxel) into ``bone``'s marrow.

    ``t`` must already hold cortex (the lesion is drawn from marrow voxels, abutting the
    subchondral plate). ``weight`` (uint8) receives the lesion intensity weight.
    """
    _check_bone(bone)
    bone_id = K[bone]
    vox_mm3 = float(np.prod(grid.spacing))
    n_want = int(round(volume_ml * 1000.0 / vox_mm3))
    info: dict[str, Any] = {"bone": bone, "requested_ml": volume_ml}
    if n_want <= 0:
        info.update(inserted_ml=0.0, voxels=0)
        return info
    lab_c = np.ascontiguousarray(grid.coarse(t))
    cs = grid.coarse_spacing
    cart = np.isin(lab_c, _BML_CARTILAGE[bone])
    if not cart.any():
        raise SynthesisError(f"no {bone} cartilage to put a subchondral lesion under")
    d_cart = ndimage.distance_transform_edt(~cart, sampling=cs)
    cand = (lab_c == bone_id) & (d_cart >= BML_SEED_DEPTH_MM[0]) & (d_cart <= BML_SEED_DEPTH_MM[1])
    pts = grid.coarse_points_mm(cand)
    weight_bearing = bone == "femur" and rng.random() < BML_WEIGHT_BEARING_SHARE
    if weight_bearing:
        wb = pts[pts[:, 2] < lm.z_joint + BML_WEIGHT_BEARING_MM]
        if len(wb):
            pts = wb
    if len(pts) == 0:
        raise SynthesisError(f"no subchondral {bone} marrow found for a lesion")
    seed = pts[int(rng.integers(len(pts)))]
    r_eq = (3.0 * volume_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
    half = 2.4 * r_eq + 4.0
    box = grid.box_mm(seed - half, seed + half)
    assert box is not None
    sub = t[box]
    marrow = sub == bone_id
    in_bone = marrow | (sub == _CORTEX_OF[Tissue(bone_id)])
    depth = ndimage.distance_transform_edt(in_bone, sampling=grid.spacing).astype(np.float32)
    x, y, z = grid.mesh_mm(box)
    rho = r_eq * _u(rng, 0.9, 1.3)
    lam = r_eq * _u(rng, 0.6, 1.2)
    d0 = _u(rng, 0.5, 2.0)
    alpha = _u(rng, 0.2, 0.45)
    cell = max(2.0, r_eq * _u(rng, 0.4, 0.8))
    nshape = [max(2, int(np.ceil(n * s / cell))) for n, s in zip(sub.shape, grid.spacing, strict=True)]
    noise = ndimage.zoom(rng.standard_normal(nshape).astype(np.float32),
                         np.array(sub.shape) / np.array(nshape), order=1)
    noise = noise[: sub.shape[0], : sub.shape[1], : sub.shape[2]]
    noise /= max(float(noise.std()), 1e-3)
    r2 = (x - seed[0]) ** 2 + (y - seed[1]) ** 2 + (z - seed[2]) ** 2
    s = (np.exp(-0.5 * r2 / rho ** 2) * np.exp(-np.maximum(depth - d0, 0.0) / lam)
         * np.clip(1.0 + alpha * noise, 0.05, None)).astype(np.float32)
    s[~in_bone] = 0.0
    free = marrow & (weight[box] < LESION_HALF)
    vals = np.where(free, s, -1.0)
    if n_want > int(free.sum()):
        raise SynthesisError(
            f"a {volume_ml:.2f} mL lesion does not fit in the {bone} marrow near the chosen "
            "site; ask for a smaller lesion"
        )
    import cc3d

    flat = vals.ravel()
    n_take = n_want
    mask = np.zeros(sub.shape, dtype=bool)
    for _ in range(8):
        top = np.argpartition(-flat, n_take - 1)[:n_take]
        m = np.zeros(flat.size, dtype=bool)
        m[top] = True
        m = m.reshape(sub.shape) & free
        cc = cc3d.connected_components(m.astype(np.uint8), connectivity=26)
        counts = np.bincount(cc.ravel())
        counts[0] = 0
        biggest = int(np.argmax(counts))
        mask = cc == biggest
        if counts[biggest] >= n_want:
            break
        n_take = min(int(free.sum()), n_take + (n_want - int(counts[biggest])) * 2)
    if mask.sum() > n_want:
        keep = np.argpartition(-np.where(mask, s, -1.0).ravel(), n_want - 1)[:n_want]
        trimmed = np.zeros(flat.size, dtype=bool)
        trimmed[keep] = True
        mask = trimmed.reshape(sub.shape)
    tau = float(s[mask].min()) if mask.any() else 1.0
    w = np.clip(s / max(tau, 1e-6) - 0.5, 0.0, 1.0)
    w[~in_bone] = 0.0
    q = _quantise_weight(w, mask)
    wsub = weight[box]
    np.maximum(wsub, q, out=wsub)
    info.update(seed_mm=seed, weight_bearing=bool(weight_bearing), equivalent_radius_mm=r_eq,
                spread_mm=rho, depth_decay_mm=lam, plate_offset_mm=d0, irregularity=alpha,
                irregularity_cell_mm=cell, voxels=int(mask.sum()),
                inserted_ml=float(mask.sum()) * vox_mm3 / 1000.0)
    return info


# =========================================================================== orchestration
def _to_ras(vol: LabelVolume) -> LabelVolume:
    out = vol.reorient("RAS")
    assert isinstance(out, LabelVolume)
    return out


def _back(arr: np.ndarray, ras_affine: np.ndarray, like: LabelVolume) -> np.ndarray:
    v = LabelVolume(arr, ras_affine).reorient("".join(like.orientation))
    if v.shape != like.shape:
        raise GeometryError("internal: reorientation did not return to the input grid")
    return np.ascontiguousarray(v.array)


def _check_knee(labels: LabelVolume) -> None:
    arr = labels.array
    if arr.size and (int(arr.max()) > max(KNEE) or int(arr.min()) < 0):
        bad = [int(v) for v in np.unique(arr) if v != 0 and int(v) not in KNEE][:8]
        raise LabelError(
            f"label map has values {bad} outside the knee schema (1-17); convert it first "
            "(mskmri.synth.sources.load_knee_source) or give --source"
        )


def _origins(present: set[int]) -> dict[str, str]:
    return {name: ("source" if v in present else "absent") for v, name in KNEE.items()}


def complete_knee(
    labels: LabelVolume,
    *,
    seed: int = 0,
    lesions: LabelVolume | None = None,
    extra: LabelVolume | None = None,
    effusion_ml: float | None = None,
    lesion_ml: float | Sequence[float] | None = None,
    lesion_bone: str | Sequence[str] = "femur",
    options: AnatomyOptions | None = None,
) -> KneeScene:
    """Complete a knee-schema label map into a renderable :class:`KneeScene`.

    Parameters
    ----------
    labels : LabelVolume
        Knee schema (``mskmri.labels.KNEE``); needs at least femur and tibia.
    seed : int
        Seed of every anatomy draw.
    lesions : LabelVolume, optional
        Existing lesion mask (1 = BML) in the same geometry; kept, with a soft edge.
    extra : LabelVolume, optional
        Tissues without a project class (1 tendon, 2 vessel, 3 nerve), same geometry.
    effusion_ml : float, optional
        Total joint effusion (label 11) in mL, exact to one voxel. None: keep the map's own
        effusion, or draw a volume from ``options.effusion_ml`` when it has none. 0: none.
    lesion_ml : float or sequence of float, optional
        Volumes (mL) of BMLs to insert (one lesion per value).
    lesion_bone : str or sequence of str
        ``femur``, ``tibia`` or ``patella`` per lesion (one value: used for all).
    options : AnatomyOptions, optional

    Returns
    -------
    KneeScene
        In the geometry of ``labels``.
    """
    labels.require_geometry("knee synthesis")
    _check_knee(labels)
    opts = options or AnatomyOptions()
    vols: list[float] = []
    bones: list[str] = []
    if lesion_ml is not None:  # validate before any work
        vols = ([float(lesion_ml)] if isinstance(lesion_ml, (int, float))
                else [float(v) for v in lesion_ml])
        bones = [lesion_bone] * len(vols) if isinstance(lesion_bone, str) else list(lesion_bone)
        if len(bones) != len(vols):
            raise SynthesisError(f"{len(vols)} lesion volumes but {len(bones)} lesion bones; "
                                 "give one bone per lesion or a single bone")
        for vol_ml, b in zip(vols, bones, strict=True):
            if vol_ml < 0:
                raise SynthesisError(f"lesion volume must be >= 0 mL, not {vol_ml}")
            _check_bone(b)
    if effusion_ml is not None and effusion_ml < 0:
        raise SynthesisError(f"effusion volume must be >= 0 mL, not {effusion_ml}")
    ras = _to_ras(labels)
    t = np.ascontiguousarray(ras.array, dtype=np.uint8).copy()
    grid = Grid.for_shape(t.shape, ras.spacing)
    counts = np.bincount(t.ravel(), minlength=256)
    present = {int(v) for v in np.nonzero(counts)[0] if v != 0}
    origin = _origins(present)
    params: dict[str, Any] = {"seed": seed, "options": asdict(opts), "grid_factors": grid.factors}

    def check_same(other: LabelVolume | None, what: str) -> np.ndarray | None:
        if other is None:
            return None
        if not other.same_geometry(labels, atol=1e-3):
            raise GeometryError(
                f"the {what} map has shape {other.shape} and a different affine than the label "
                f"map {labels.shape}; give both in the same geometry"
            )
        return np.ascontiguousarray(_to_ras(other).array)

    les = check_same(lesions, "lesion")
    ext = check_same(extra, "extra-tissue")
    lm = find_landmarks(grid.coarse(t), grid)
    params["landmarks"] = lm.as_dict()
    proc: dict[str, Any] = {}

    def mark(name: str, info: Mapping[str, Any]) -> None:
        if info.get("placed", True) and info.get("voxels", 1):
            origin[name] = "procedural"

    if opts.procedural:
        if K["patella"] not in present:
            proc["patella"] = _add_patella(t, grid, lm, rng_for(seed, "anatomy", "patella"))
            mark("patella", proc["patella"])
            if proc["patella"].get("cartilage_voxels", 0) and K["patellar_cartilage"] not in present:
                origin["patellar_cartilage"] = "procedural"
        if K["fibula"] not in present:
            proc["fibula"] = _add_fibula(t, grid, lm, rng_for(seed, "anatomy", "fibula"))
            mark("fibula", proc["fibula"])
        for plate, men, name in ((K["medial_tibial_cartilage"], K["medial_meniscus"], "medial_meniscus"),
                                 (K["lateral_tibial_cartilage"], K["lateral_meniscus"], "lateral_meniscus")):
            if men not in present:
                side = lm.medial_sign if men == K["medial_meniscus"] else lm.lateral_sign
                proc[name] = _add_meniscus(t, grid, lm, rng_for(seed, "anatomy", name), plate,
                                           men, side)
                mark(name, proc[name])
        acl, pcl = K["anterior_cruciate_ligament"] not in present, K["posterior_cruciate_ligament"] not in present
        if acl or pcl:
            proc["cruciates"] = _add_cruciates(t, grid, lm, rng_for(seed, "anatomy", "cruciates"),
                                               acl, pcl)
            if "acl" in proc["cruciates"]:
                mark("anterior_cruciate_ligament", proc["cruciates"]["acl"])
            if "pcl" in proc["cruciates"]:
                mark("posterior_cruciate_ligament", proc["cruciates"]["pcl"])
        if K["patellar_tendon"] not in present:
            proc["patellar_tendon"] = _add_patellar_tendon(t, grid, lm,
                                                           rng_for(seed, "anatomy", "tendon"))
            mark("patellar_tendon", proc["patellar_tendon"])
        if K["collateral_ligaments"] not in present:
            proc["collaterals"] = _add_collaterals(t, grid, lm, rng_for(seed, "anatomy", "collateral"))
            if proc["collaterals"]["mcl"]["voxels"] + proc["collaterals"]["lcl"]["voxels"]:
                origin["collateral_ligaments"] = "procedural"
        if K["infrapatellar_fat_pad"] not in present:
            proc["fat_pad"] = _add_fat_pad(t, grid, lm, rng_for(seed, "anatomy", "fat_pad"))
            mark("infrapatellar_fat_pad", proc["fat_pad"])
        if K["muscle"] not in present:
            proc["quadriceps_tendon"] = _add_quadriceps_tendon(
                t, grid, lm, rng_for(seed, "anatomy", "quadriceps"))
            proc["vessels"] = _add_vessels(t, grid, lm, rng_for(seed, "anatomy", "vessels"))
    if ext is not None:
        for v, tissue in ((1, Tissue.TENDON), (2, Tissue.VESSEL), (3, Tissue.NERVE)):
            sel = (ext == v) & (t == 0)
            t[sel] = tissue
    # effusion
    eff_rng = rng_for(seed, "anatomy", "effusion")
    if effusion_ml is None and K["joint_effusion"] not in present and opts.procedural:
        lo, hi = opts.effusion_ml
        effusion_ml = float(np.exp(eff_rng.uniform(np.log(lo), np.log(hi))))
        params["effusion_ml_drawn"] = effusion_ml
    if effusion_ml is not None:
        t[t == Tissue.EFFUSION] = 0
        params["effusion"] = insert_effusion_array(t, grid, lm, float(effusion_ml), eff_rng)
        origin["joint_effusion"] = "procedural" if params["effusion"]["voxels"] else "absent"
    # soft tissue, cortex
    make_muscle = K["muscle"] not in present and opts.procedural
    params["soft_tissue"] = _add_soft_tissue(t, grid, lm, rng_for(seed, "anatomy", "soft"),
                                             make_muscle, opts)
    if make_muscle and params["soft_tissue"]["voxels_muscle"]:
        origin["muscle"] = "procedural"
    crng = rng_for(seed, "anatomy", "cortex")
    params["cortex"] = add_cortex(t, grid.spacing, _u(crng, *opts.cortex_mm))
    # lesions
    weight: np.ndarray | None = None
    if les is not None and les.any():
        lrng = rng_for(seed, "anatomy", "lesion_edge")
        sigma = _u(lrng, *opts.lesion_edge_mm)
        weight = lesion_weight_from_mask(les > 0, grid.spacing, sigma)
        params["source_lesions"] = {"voxels": int((les > 0).sum()), "edge_sigma_mm": sigma}
    if vols:
        if weight is None:
            weight = np.zeros(t.shape, dtype=np.uint8)
        params["bml"] = []
        for i, (vol_ml, b) in enumerate(zip(vols, bones, strict=True)):
            params["bml"].append(insert_bml_array(t, weight, grid, lm, vol_ml, b,
                                                  rng_for(seed, "anatomy", "bml", i)))
    params["procedural"] = proc
    tissues = _back(t, ras.affine, labels)
    w_back = _back(weight, ras.affine, labels) if weight is not None else None
    scene = KneeScene(tissues=tissues, lesion_weight=w_back, affine=labels.affine.copy(),
                      origin=origin, params=json_ready(params))
    return scene
