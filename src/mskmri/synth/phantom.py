"""Procedural knee and spine phantoms that need no input at all, for the demo and fast tests.

:func:`phantom_knee` builds a right knee in a RAS grid from simple solids (femoral shaft,
two condyles, trochlea and intercondylar notch; tibial plateau, spine, metaphysis and
shaft; patella; fibular head and shaft), puts cartilage on the articular surfaces with a
distance transform, then lets :func:`mskmri.synth.anatomy.complete_knee` add menisci,
ligaments, patellar tendon, fat pad, muscle, effusion and a bone marrow lesion. Every one
of the 17 knee classes is present. Sizes follow an adult knee (femoral condyles about 75 mm
wide, cartilage 2-3 mm thick, or thinner with ``cartilage_scale``), scaled by a random factor
per seed.

:func:`phantom_spine` draws a sagittal, T2-like lumbar spine image and its spine-schema truth
(bodies by level, discs, sacrum, cord, CSF) from rounded boxes on a lordotic curve, with the
retroperitoneal fat, psoas, aorta and bowel around the column that a real scan shows (the
shipped spine model segments it as it does real scans: ``make demo``); optional wedge
deformities give known anterior/posterior height ratios.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from mskmri.labels import KNEE, KNEE_ID
from mskmri.synth._common import SynthesisError, rng_for
from mskmri.synth._geometry import ellipsoid_radius, segment_distance
from mskmri.synth.anatomy import AnatomyOptions, complete_knee
from mskmri.volume import LabelVolume, Volume

K = KNEE_ID

#: Default phantom grid: 64 sagittal slices of 1.5 mm, 96 x 96 in-plane at 1.25 mm
#: (a 96 x 120 x 120 mm field of view).
PHANTOM_SHAPE = (64, 96, 96)
PHANTOM_SPACING = (1.5, 1.25, 1.25)
#: Field of view (mm) the knee is designed for; smaller grids scale the knee down.
DESIGN_FOV_MM = (96.0, 120.0, 120.0)
#: Allowed factors on the cartilage thickness (thinner than half a plate vanishes on the grid).
CARTILAGE_SCALE_RANGE = (0.4, 1.5)


def _solids(shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator,
            cartilage_scale: float = 1.0) -> tuple[np.ndarray, dict[str, float]]:
    fov = np.asarray(shape) * np.asarray(spacing)
    s = float(min(1.0, *(fov / np.asarray(DESIGN_FOV_MM)))) * float(rng.uniform(0.9, 1.0))
    j = lambda: float(rng.uniform(0.95, 1.05))  # noqa: E731  (per-solid size jitter)
    cx, cy, cz = fov[0] / 2.0, fov[1] * 0.46, fov[2] / 2.0
    zj = cz - 4.0 * s
    x = (np.arange(shape[0], dtype=np.float32) * spacing[0])[:, None, None]
    y = (np.arange(shape[1], dtype=np.float32) * spacing[1])[None, :, None]
    z = (np.arange(shape[2], dtype=np.float32) * spacing[2])[None, None, :]
    lab = np.zeros(tuple(int(n) for n in shape), dtype=np.uint8)
    # ---------------- femur: shaft, epicondylar block, trochlea, condyles, minus the notch
    top = fov[2] + 20.0
    c_r = 18.0 * s * j()
    femur = segment_distance(x, y, z, (cx, cy - 2 * s, zj + 30 * s), (cx, cy - 5 * s, top)) < 13.0 * s * j()
    femur |= ellipsoid_radius(x, y, z, (cx, cy - 2 * s, zj + 26 * s), (35 * s, 22 * s, 14 * s)) < 1
    femur |= ellipsoid_radius(x, y, z, (cx, cy + 8 * s, zj + 26 * s), (24 * s, 13 * s, 15 * s)) < 1
    med = ellipsoid_radius(x, y, z, (cx - 19 * s, cy - 4 * s, zj + 2.5 * s + c_r),
                           (14 * s, 27 * s * j(), c_r)) < 1
    lat = ellipsoid_radius(x, y, z, (cx + 19 * s, cy - 2 * s, zj + 3.0 * s + c_r),
                           (14 * s, 25 * s * j(), c_r * 0.97)) < 1
    femur |= med | lat
    notch = ellipsoid_radius(x, y, z, (cx, cy - 14 * s, zj + 4 * s), (8 * s, 20 * s, 16 * s)) < 1
    femur &= ~notch
    # ---------------- tibia: plateau, spine, metaphysis, shaft
    plateau_top = zj - 2.5 * s
    # the medial plateau (x < cx, a right knee) sits about 1 mm lower than the lateral one
    top_here = plateau_top - np.where(x < cx, 1.0 * s, 0.0)
    tibia = (ellipsoid_radius(x, y, z, (cx, cy - 6 * s, plateau_top), (38 * s * j(), 22 * s, 22 * s)) < 1) & (z <= top_here)
    tibia |= ellipsoid_radius(x, y, z, (cx, cy - 7 * s, plateau_top), (5 * s, 10 * s, 4 * s)) < 1
    tibia |= ellipsoid_radius(x, y, z, (cx + 3 * s, cy + 10 * s, zj - 24 * s), (10 * s, 7 * s, 12 * s)) < 1
    tibia |= segment_distance(x, y, z, (cx, cy - 1 * s, zj - 25 * s), (cx + 1 * s, cy + 1 * s, -20.0)) < 12.5 * s
    # ---------------- patella in front of the trochlea
    pat_c = (cx + 3 * s, cy + 8 * s + 13 * s + 6.5 * s + 9 * s, zj + 30 * s)
    patella = ellipsoid_radius(x, y, z, pat_c, (20 * s * j(), 9 * s, 18 * s * j())) < 1
    # ---------------- fibula: posterolateral head and shaft (lateral = +x, a right knee)
    head = (cx + 31 * s, cy - 15 * s, zj - 19 * s)
    fibula = ellipsoid_radius(x, y, z, head, (9 * s, 9 * s, 10 * s)) < 1
    fibula |= segment_distance(x, y, z, head, (head[0] + 2 * s, head[1] + 2 * s, -20.0)) < 6 * s
    fibula &= ~tibia
    lab[femur] = K["femur"]
    lab[tibia & ~femur] = K["tibia"]
    lab[patella & (lab == 0)] = K["patella"]
    lab[fibula & (lab == 0)] = K["fibula"]
    # ---------------- cartilage by distance from the bone surfaces
    sp = tuple(float(v) for v in spacing)
    d_fem = ndimage.distance_transform_edt(lab != K["femur"], sampling=sp)
    t_fem = 2.4 * s * cartilage_scale
    fem_cart = (d_fem > 0) & (d_fem <= t_fem) & (z < zj + 40 * s) & (np.abs(x - cx) < 33 * s)
    fem_cart &= ~((np.abs(x - cx) < 9 * s) & (y < cy + 4 * s) & (z > zj))  # no cartilage in the notch
    lab[fem_cart & (lab == 0)] = K["femoral_cartilage"]
    d_tib = ndimage.distance_transform_edt(lab != K["tibia"], sampling=sp)
    plate = (d_tib > 0) & (d_tib <= 2.0 * s * cartilage_scale) & (z > top_here - 1.0) & (np.abs(x - cx) > 7 * s)
    # medial plate oval (longer antero-posteriorly), lateral plate rounder
    plate &= np.where(x < cx,
                      ellipsoid_radius(x, y, z, (cx, cy - 6 * s, plateau_top), (34 * s, 20 * s, 10 * s)) < 1,
                      ellipsoid_radius(x, y, z, (cx, cy - 5 * s, plateau_top), (34 * s, 15 * s, 10 * s)) < 1)
    lab[plate & (x < cx) & (lab == 0)] = K["medial_tibial_cartilage"]
    lab[plate & (x >= cx) & (lab == 0)] = K["lateral_tibial_cartilage"]
    d_pat = ndimage.distance_transform_edt(lab != K["patella"], sampling=sp)
    pat_cart = (d_pat > 0) & (d_pat <= 3.0 * s * cartilage_scale) & (y < pat_c[1] - 2 * s)
    lab[pat_cart & (lab == 0)] = K["patellar_cartilage"]
    return lab, {"scale": s, "joint_line_mm": zj}


def phantom_knee(
    *,
    seed: int = 0,
    shape: Sequence[int] = PHANTOM_SHAPE,
    spacing: Sequence[float] = PHANTOM_SPACING,
    effusion_ml: float = 6.0,
    lesion_ml: float | None = 1.0,
    cartilage_scale: float = 1.0,
) -> tuple[LabelVolume, LabelVolume]:
    """A procedural right knee with all 17 knee classes and one femoral BML.

    Parameters
    ----------
    seed : int
        Seed of every random size and placement.
    shape : 3 ints
        Grid shape; axis 0 = sagittal slices (x, left -> right), 1 = y (posterior ->
        anterior), 2 = z (inferior -> superior): a RAS grid.
    spacing : 3 floats
        Voxel size in mm.
    effusion_ml : float
        Joint effusion volume (mL).
    lesion_ml : float or None
        Volume (mL) of the femoral bone marrow lesion; None for a lesion-free knee.
    cartilage_scale : float
        Factor on every cartilage plate's thickness (1 = about 2.4 mm femoral, 2 mm tibial,
        3 mm patellar; e.g. 0.7 for the thinner cartilage of an osteoarthritic knee).

    Returns
    -------
    (LabelVolume, LabelVolume)
        Knee-schema labels and the lesion mask (1 = BML), RAS affine with the given spacing.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise SynthesisError(f"phantom shape must be 3 sizes of at least 16 voxels, not {shape}")
    spacing = tuple(float(v) for v in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise SynthesisError(f"phantom spacing must be 3 positive mm values, not {spacing}")
    if not CARTILAGE_SCALE_RANGE[0] <= cartilage_scale <= CARTILAGE_SCALE_RANGE[1]:
        raise SynthesisError(f"cartilage_scale must be in {CARTILAGE_SCALE_RANGE}, not "
                             f"{cartilage_scale}")
    rng = rng_for(seed, "phantom")
    lab, info = _solids(shape, spacing, rng, cartilage_scale=float(cartilage_scale))
    info["cartilage_scale"] = float(cartilage_scale)
    affine = np.diag([*spacing, 1.0])
    base = LabelVolume(lab, affine, dict(KNEE), schema="knee")
    scene = complete_knee(base, seed=seed, effusion_ml=effusion_ml, lesion_ml=lesion_ml,
                          options=AnatomyOptions())
    truth = scene.truth()
    meta = {"synthetic": True, "phantom": {"seed": seed, **info,
                                           "anatomy": scene.params, "origin": scene.origin}}
    truth.meta.update(meta)
    lesions = scene.lesion_mask()
    lesions.meta.update({"synthetic": True})
    present = set(np.nonzero(np.bincount(truth.array.ravel(), minlength=len(KNEE) + 1))[0].tolist())
    missing = [KNEE[v] for v in KNEE if v not in present]
    if missing:
        raise SynthesisError(f"phantom grid {shape} at {spacing} mm is too coarse or small to "
                             f"hold {missing}; use a larger grid")
    return truth, lesions


# ============================================================================ spine
#: Default spine phantom grid: 20 sagittal slices of 3 mm (x, left -> right), 200 mm
#: posterior -> anterior (y) and 256 mm inferior -> superior (z) at 1 mm: a RAS grid.
SPINE_PHANTOM_SHAPE = (20, 200, 256)
SPINE_PHANTOM_SPACING = (3.0, 1.0, 1.0)
#: Levels of the spine phantom, top first; the sacrum follows the last one.
SPINE_PHANTOM_LEVELS: tuple[str, ...] = ("T12", "L1", "L2", "L3", "L4", "L5")
#: Vertebral body size (mm): height (S-I), depth (A-P), width (L-R), before the per-seed jitter.
SPINE_BODY_MM = (26.0, 34.0, 44.0)
#: The top body runs this far (mm) out of the field of view, as in a lumbar scan that shows
#: the lower part of T12.
SPINE_TOP_CUT_MM = 8.0
#: Disc height (mm) between two bodies.
SPINE_DISC_MM = 9.0
#: Cortical shell of the bodies (mm), drawn dark.
SPINE_CORTEX_MM = 1.0
#: Lordosis: largest anterior shift (mm) of the column's mid-lumbar part.
SPINE_LORDOSIS_MM = 12.0
#: Tilt of the S1 axis from the vertical (degrees, top leaning anterior).
SPINE_SACRAL_TILT_DEG = 50.0
#: The sacrum curves anteriorly: each lower segment is this much (degrees) more vertical.
SACRAL_CURVE_DEG = 12.0
#: Sacral segments S1, S2, ... drawn: (height, depth, width) as fractions of the lumbar body's.
SPINE_SACRAL_SEGMENTS: tuple[tuple[float, float, float], ...] = (
    (0.95, 1.0, 1.0), (0.8, 0.85, 0.85), (0.6, 0.7, 0.7))
#: T2-like tissue intensities (arbitrary units, 1 = CSF) of the spine phantom image.
SPINE_INTENSITY: dict[str, float] = {
    "air": 0.0, "fat": 0.72, "muscle": 0.22, "viscera": 0.35, "marrow": 0.45,
    "cortex": 0.15, "nucleus": 0.85, "annulus": 0.28, "csf": 0.95, "cord": 0.42,
    "posterior_elements": 0.38, "vessel": 0.08,
}
#: Retroperitoneal fat in front of the bodies (mm, before a per-seed factor of 0.7-1.3).
SPINE_PREVERTEBRAL_FAT_MM = 15.0
#: Scale (mm, Gaussian sigma) of the bowel/viscera texture.
SPINE_GUT_TEXTURE_MM = 6.0
#: Relative amplitude (SD) of the bowel/viscera texture.
SPINE_GUT_TEXTURE_AMPLITUDE = 0.25
#: Psoas radius (mm, axial plane) at the top body and at the sacrum (it grows downwards).
SPINE_PSOAS_RADIUS_MM = (6.0, 22.0)
#: Aorta radius (mm); it runs in front of the bodies, left of the midline, down to L4.
SPINE_AORTA_RADIUS_MM = 9.0
#: Image noise (SD, fraction of the CSF intensity) and bias-field amplitude (fraction).
SPINE_NOISE_SD = 0.03
SPINE_BIAS_AMPLITUDE = 0.15


@dataclass(frozen=True)
class SpinePhantom:
    """A synthetic sagittal lumbar spine MRI and its truth.

    Attributes
    ----------
    image : Volume
        T2-like image (float32, arbitrary units with CSF near 1000), RAS grid.
    labels : LabelVolume
        Spine-schema truth on the image's grid: vertebral bodies by level (VerSe ids), discs
        (100 + the id of the vertebra above), sacrum (26), spinal cord (201), CSF (202).
        Posterior elements are drawn in the image but not labelled (the spine segmenter
        segments bodies only).
    params : dict
        Every sampled size and position (mm, degrees) and the seed.
    """

    image: Volume
    labels: LabelVolume
    params: dict[str, Any]


def _superellipse(u: np.ndarray, v: np.ndarray, w: np.ndarray, half: Sequence[float],
                  power: float = 4.0) -> np.ndarray:
    """Normalised radius of a rounded box (1 on the surface) in local coordinates (mm)."""
    return (np.abs(u / half[0]) ** power + np.abs(v / half[1]) ** power
            + np.abs(w / half[2]) ** 2) ** (1.0 / power)


def phantom_spine(
    *,
    seed: int = 0,
    shape: Sequence[int] = SPINE_PHANTOM_SHAPE,
    spacing: Sequence[float] = SPINE_PHANTOM_SPACING,
    levels: Sequence[str] = SPINE_PHANTOM_LEVELS,
    wedge: Mapping[str, float] | None = None,
) -> SpinePhantom:
    """A procedural sagittal lumbar spine MRI (T2-like) with its spine-schema truth.

    Vertebral bodies are rounded boxes with textured marrow in a dark cortical shell
    (:data:`SPINE_CORTEX_MM` thick on every slice), set on a lordotic curve and tilted along
    it, with discs (bright nucleus, dark annulus) between them, a fused sacrum tilted by
    :data:`SPINE_SACRAL_TILT_DEG`, the canal (CSF with the cord ending at L1-L2) behind them,
    posterior elements, paraspinal muscles and subcutaneous fat. In front of and beside the
    column lie retroperitoneal fat (:data:`SPINE_PREVERTEBRAL_FAT_MM`), the psoas muscles
    (:data:`SPINE_PSOAS_RADIUS_MM`), the aorta down to L4 (a dark flow void,
    :data:`SPINE_AORTA_RADIUS_MM`) and textured bowel and viscera, as on a real sagittal
    lumbar T2 scan. A smooth bias field and Gaussian noise are added.

    Parameters
    ----------
    seed : int
        Seed of every random size, shift, texture and the noise.
    shape : 3 ints
        Grid shape: axis 0 = x (sagittal slices, left -> right), 1 = y (posterior ->
        anterior), 2 = z (inferior -> superior).
    spacing : 3 floats
        Voxel size in mm; the field of view must hold the levels (about 250 mm S-I).
    levels : sequence of str
        Vertebrae drawn, top first (e.g. ``("T12", "L1", ..., "L5")``).
    wedge : mapping of str to float, optional
        Level -> anterior / posterior body height ratio (e.g. ``{"L1": 0.7}`` for a wedge
        deformity); 1 when not given.

    Returns
    -------
    SpinePhantom
    """
    from mskmri.labels import CSF, DISC_OFFSET, SPINAL_CORD, VERTEBRA_ID, spine_labels_for

    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(v) for v in spacing)
    if len(shape) != 3 or len(spacing) != 3 or min(spacing) <= 0 or min(shape) < 8:
        raise SynthesisError(f"spine phantom needs 3 sizes >= 8 and 3 positive spacings, not "
                             f"{shape} at {spacing} mm")
    unknown = [lv for lv in levels if lv not in VERTEBRA_ID or lv == "sacrum"]
    if unknown or not levels:
        raise SynthesisError(f"unknown vertebra level(s) {unknown}; give names like T12, L1")
    wedge = dict(wedge or {})
    if any(lv not in levels or not 0.3 <= r <= 1.0 for lv, r in wedge.items()):
        raise SynthesisError(f"wedge ratios must be in [0.3, 1] for drawn levels, not {wedge}")
    rng = rng_for(seed, "phantom-spine")
    fov = np.asarray(shape) * np.asarray(spacing)
    size = float(rng.uniform(0.93, 1.05))
    body_h, body_d, body_w = (v * size for v in SPINE_BODY_MM)
    disc_h = SPINE_DISC_MM * size * float(rng.uniform(0.9, 1.1))
    lordosis = SPINE_LORDOSIS_MM * float(rng.uniform(0.7, 1.3))
    x = (np.arange(shape[0], dtype=np.float32) * spacing[0])[:, None, None]
    y = (np.arange(shape[1], dtype=np.float32) * spacing[1])[None, :, None]
    z = (np.arange(shape[2], dtype=np.float32) * spacing[2])[None, None, :]
    cx = fov[0] / 2.0
    # column: bodies' centre line y_c(z), from the sacrum (bottom) up; middle lumbar forward
    n = len(levels)
    pitch = body_h + disc_h
    z_top = fov[2] + SPINE_TOP_CUT_MM - 0.5 * body_h + float(rng.uniform(-3.0, 3.0))
    z_centres = [z_top - i * pitch for i in range(n)]
    z_sacrum = z_centres[-1] - 0.5 * body_h - disc_h
    y_post0 = fov[1] * 0.42  # posterior body wall at the ends of the curve
    span = max(z_centres[0] - z_sacrum, 1.0)

    def y_centre(zz: np.ndarray | float) -> np.ndarray | float:
        t = (np.asarray(zz) - z_sacrum) / span  # 0 at the sacrum, 1 at the top body
        return y_post0 + 0.5 * body_d + lordosis * np.sin(np.pi * np.clip(t, 0.0, 1.0))

    def slope(zz: float) -> float:
        return float(y_centre(zz + 1.0) - y_centre(zz - 1.0)) / 2.0

    lab = np.zeros(shape, dtype=np.int32)
    tissue = np.full(shape, SPINE_INTENSITY["air"], dtype=np.float32)
    # trunk: skin at the back (low y), abdomen to the front edge, fat under the skin
    skin_y = fov[1] * 0.06
    back = y - skin_y
    trunk = (back > 0) & (np.abs(x - cx) < fov[0])
    tissue[np.broadcast_to(trunk, shape)] = SPINE_INTENSITY["viscera"]
    fat = trunk & (back < 12.0 * size)
    tissue[np.broadcast_to(fat, shape)] = SPINE_INTENSITY["fat"]
    yc = np.asarray(y_centre(z), dtype=np.float32)  # (1, 1, nz)
    post_wall = yc - 0.5 * body_d
    canal_d = 15.0 * size
    muscle = (back >= 12.0 * size) & (y < post_wall - canal_d)
    tissue[np.broadcast_to(muscle, shape)] = SPINE_INTENSITY["muscle"]
    # in front of and beside the column: retroperitoneal fat, then bowel and viscera with a
    # smooth random texture; the psoas muscles beside the bodies (growing downwards) and the
    # aorta (a flow void left of the midline, down to L4). Without them the bodies sit in a
    # uniform grey close to marrow, unlike any real scan, and the model misses their outer
    # slices and takes the lateral rims of the discs for bone.
    ant_wall = yc + 0.5 * body_d
    fat_mm = SPINE_PREVERTEBRAL_FAT_MM * float(rng.uniform(0.7, 1.3))
    retro = np.broadcast_to(trunk & (y >= post_wall - canal_d) & (y < ant_wall + fat_mm), shape)
    tissue[retro] = SPINE_INTENSITY["fat"]
    gut_tex = ndimage.gaussian_filter(
        rng.normal(0.0, 1.0, shape).astype(np.float32),
        sigma=tuple(SPINE_GUT_TEXTURE_MM / sp for sp in spacing))
    gut_tex /= max(float(gut_tex.std()), 1e-6)
    gut = np.broadcast_to(trunk & (y >= ant_wall + fat_mm), shape)
    tissue[gut] = SPINE_INTENSITY["viscera"] * (1.0 + SPINE_GUT_TEXTURE_AMPLITUDE * gut_tex[gut])
    t_down = np.clip((z_centres[0] - z) / max(z_centres[0] - z_sacrum, 1.0), 0.0, 1.0)
    r_top, r_bottom = SPINE_PSOAS_RADIUS_MM
    psoas_r = (r_top + (r_bottom - r_top) * t_down) * size
    for side in (-1.0, 1.0):
        px = cx + side * (0.5 * body_w + 0.8 * psoas_r)
        psoas = ((x - px) / psoas_r) ** 2 + ((y - yc) / (1.2 * psoas_r)) ** 2 < 1.0
        psoas = np.broadcast_to(psoas & (z > z_sacrum - 20.0) & (z < z_centres[0]), shape)
        tissue[psoas] = SPINE_INTENSITY["muscle"]
    aorta_r = SPINE_AORTA_RADIUS_MM * size
    z_bifurcation = z_centres[levels.index("L4")] if "L4" in levels else z_sacrum
    aorta = ((x - (cx - 0.25 * body_w)) ** 2 + (y - (ant_wall + 2.0 + aorta_r)) ** 2
             < aorta_r ** 2) & (z > z_bifurcation)
    tissue[np.broadcast_to(aorta, shape)] = SPINE_INTENSITY["vessel"]
    # posterior elements: laminae + spinous process behind the canal, one per level
    params_levels: dict[str, Any] = {}
    for zc in z_centres:
        ycen = float(y_centre(zc))
        pe_y = ycen - 0.5 * body_d - canal_d - 14.0 * size
        pe = ellipsoid_radius(x, y, z, (cx, pe_y, zc - 4.0 * size),
                              (6.0 * size, 14.0 * size, 11.0 * size)) < 1
        tissue[np.broadcast_to(pe, shape)] = SPINE_INTENSITY["posterior_elements"]
    # canal: CSF tube, cord down to the L1-L2 disc
    canal = (y < post_wall) & (y >= post_wall - canal_d) & (np.abs(x - cx) < 9.0 * size) \
        & (z > z_sacrum)
    lab[canal] = CSF
    tissue[canal] = SPINE_INTENSITY["csf"]
    conus_z = z_centres[levels.index("L1")] - 0.5 * pitch if "L1" in levels else z_centres[0]
    cord = canal & (np.abs(y - (post_wall - 0.5 * canal_d)) < 4.0 * size) \
        & (np.abs(x - cx) < 5.0 * size) & (z > conus_z)
    lab[cord] = SPINAL_CORD
    tissue[cord] = SPINE_INTENSITY["cord"]
    # bodies and discs, in the local frame of the curve (u along S-I, v along A-P)
    marrow_tex = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape).astype(np.float32),
                                         sigma=(0.7, 1.5, 1.5))
    bone = np.zeros(shape, dtype=bool)
    for i, level in enumerate(levels):
        zc = z_centres[i]
        ycen = float(y_centre(zc))
        angle = float(np.arctan(slope(zc)))
        ca, sa = np.cos(angle), np.sin(angle)
        dz, dy = z - zc, y - ycen
        u = dz * ca + dy * sa   # along the column
        v = -dz * sa + dy * ca  # anterior positive
        ratio = wedge.get(level, 1.0)
        # height falls linearly from the posterior wall (v = -d/2) to the anterior (v = d/2)
        half_h = 0.5 * body_h * (1.0 - (1.0 - ratio) * np.clip(v / body_d + 0.5, 0.0, 1.0))
        jitter = float(rng.uniform(0.95, 1.05))
        r = _superellipse(u, v, x - cx, (half_h * jitter, 0.5 * body_d, 0.5 * body_w))
        body = r < 1.0
        vid = VERTEBRA_ID[level]
        lab[body] = vid
        bone |= body
        params_levels[level] = {"centre_z_mm": zc, "centre_y_mm": ycen,
                                "tilt_deg": float(np.degrees(angle)), "wedge_ratio": ratio,
                                "height_mm": body_h * jitter}
        # the disc below this body (above the next one or the sacrum)
        zd = zc - 0.5 * pitch
        yd = float(y_centre(zd))
        ad = float(np.arctan(slope(zd)))
        ud = (z - zd) * np.cos(ad) + (y - yd) * np.sin(ad)
        vd = -(z - zd) * np.sin(ad) + (y - yd) * np.cos(ad)
        rd = _superellipse(ud, vd, x - cx, (0.5 * disc_h + 1.0, 0.5 * body_d - 0.5,
                                            0.5 * body_w - 1.0), power=3.0)
        disc = (rd < 1.0) & (lab == 0)
        lab[disc] = DISC_OFFSET + vid
        nucleus = disc & (rd < 0.6)
        tissue[disc] = SPINE_INTENSITY["annulus"]
        tissue[nucleus] = SPINE_INTENSITY["nucleus"]
    # sacrum: S1, S2, S3 as rounded boxes, smaller and more tilted downwards, fused
    # (no disc between them), running posterior-inferior from the last disc; the canal
    # follows its posterior surface
    tilt0 = float(np.radians(SPINE_SACRAL_TILT_DEG * float(rng.uniform(0.9, 1.1))))
    py, pz = float(y_centre(z_sacrum)), z_sacrum
    sacrum = np.zeros(shape, dtype=bool)
    sac_canal = np.zeros(shape, dtype=bool)
    for k, (fh, fd, fw) in enumerate(SPINE_SACRAL_SEGMENTS):
        tk = tilt0 - np.radians(SACRAL_CURVE_DEG * k)
        dy_axis, dz_axis = -np.sin(tk), -np.cos(tk)  # down the sacrum (posterior, inferior)
        h = body_h * fh
        cy_k, cz_k = py + dy_axis * 0.5 * h, pz + dz_axis * 0.5 * h
        u = (y - cy_k) * dy_axis + (z - cz_k) * dz_axis
        v = (y - cy_k) * (-dz_axis) + (z - cz_k) * dy_axis  # anterior positive
        r = _superellipse(u, v, x - cx, (0.5 * h, 0.5 * body_d * fd, 0.5 * body_w * fw))
        seg = (r < 1.0) & (lab == 0) & ~sacrum
        sacrum |= seg
        sac_canal |= (v < -0.5 * body_d * fd) & (v > -0.5 * body_d * fd - 0.6 * canal_d) \
            & (np.abs(u) < 0.5 * h + 1.0) & (np.abs(x - cx) < 9.0 * size)
        py, pz = py + dy_axis * h, pz + dz_axis * h
    lab[sacrum] = VERTEBRA_ID["sacrum"]
    # bone: textured marrow inside a cortical shell of SPINE_CORTEX_MM, by the in-plane
    # distance (mm) to the bone surface on each sagittal slice, so the shell is as thin on
    # the outer slices as in the middle ones; the fused sacral segments share one shell
    bone |= sacrum
    depth = np.stack([ndimage.distance_transform_edt(b, sampling=spacing[1:]) for b in bone])
    tissue[bone] = np.where(depth[bone] <= SPINE_CORTEX_MM, SPINE_INTENSITY["cortex"],
                            SPINE_INTENSITY["marrow"] * (1.0 + 0.25 * marrow_tex[bone]))
    sac_canal &= (lab == 0) & (z < z_sacrum)
    lab[sac_canal] = CSF
    tissue[sac_canal] = SPINE_INTENSITY["csf"]
    # bias field (smooth, low order) and noise
    gy = (y / fov[1] - 0.5)
    gz = (z / fov[2] - 0.5)
    bias = 1.0 + SPINE_BIAS_AMPLITUDE * float(rng.uniform(-1, 1)) * gy \
        + SPINE_BIAS_AMPLITUDE * float(rng.uniform(-1, 1)) * gz
    img = ndimage.gaussian_filter(tissue * bias, sigma=(0.3, 0.6, 0.6))
    img = img + rng.normal(0.0, SPINE_NOISE_SD, shape).astype(np.float32)
    img = np.clip(img, 0.0, None).astype(np.float32) * 1000.0
    affine = np.diag([*spacing, 1.0])
    present = sorted(int(v) for v in np.unique(lab) if v)
    labels = LabelVolume(lab, affine, spine_labels_for(present), schema="spine",
                         meta={"synthetic": True})
    params: dict[str, Any] = {
        "seed": int(seed), "size_factor": size, "disc_height_mm": disc_h,
        "lordosis_mm": lordosis, "sacral_tilt_deg": float(np.degrees(tilt0)),
        "prevertebral_fat_mm": fat_mm,
        "levels": params_levels, "noise_sd": SPINE_NOISE_SD,
    }
    labels.meta["phantom"] = params
    image = Volume(img, affine, {"synthetic": True, "source": f"spine phantom, seed {seed}",
                                 "phantom": params})
    return SpinePhantom(image=image, labels=labels, params=params)
