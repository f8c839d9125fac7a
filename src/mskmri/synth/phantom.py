"""A procedural knee that needs no input at all, for the demo and fast tests.

:func:`phantom_knee` builds a right knee in a RAS grid from simple solids (femoral shaft,
two condyles, trochlea and intercondylar notch; tibial plateau, spine, metaphysis and
shaft; patella; fibular head and shaft), puts cartilage on the articular surfaces with a
distance transform, then lets :func:`mskmri.synth.anatomy.complete_knee` add menisci,
ligaments, patellar tendon, fat pad, muscle, effusion and a bone marrow lesion. Every one
of the 17 knee classes is present. Sizes follow an adult knee (femoral condyles about 75 mm
wide, cartilage 2-3 mm thick), scaled by a random factor per seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from mskmri.labels import KNEE, KNEE_ID
from mskmri.synth._common import SynthesisError, rng_for
from mskmri.synth._geometry import ellipsoid_radius, segment_distance
from mskmri.synth.anatomy import AnatomyOptions, complete_knee
from mskmri.volume import LabelVolume

K = KNEE_ID

#: Default phantom grid: 64 sagittal slices of 1.5 mm, 96 x 96 in-plane at 1.25 mm
#: (a 96 x 120 x 120 mm field of view).
PHANTOM_SHAPE = (64, 96, 96)
PHANTOM_SPACING = (1.5, 1.25, 1.25)
#: Field of view (mm) the knee is designed for; smaller grids scale the knee down.
DESIGN_FOV_MM = (96.0, 120.0, 120.0)


def _solids(shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator
            ) -> tuple[np.ndarray, dict[str, float]]:
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
    t_fem = 2.4 * s
    fem_cart = (d_fem > 0) & (d_fem <= t_fem) & (z < zj + 40 * s) & (np.abs(x - cx) < 33 * s)
    fem_cart &= ~((np.abs(x - cx) < 9 * s) & (y < cy + 4 * s) & (z > zj))  # no cartilage in the notch
    lab[fem_cart & (lab == 0)] = K["femoral_cartilage"]
    d_tib = ndimage.distance_transform_edt(lab != K["tibia"], sampling=sp)
    plate = (d_tib > 0) & (d_tib <= 2.0 * s) & (z > top_here - 1.0) & (np.abs(x - cx) > 7 * s)
    # medial plate oval (longer antero-posteriorly), lateral plate rounder
    plate &= np.where(x < cx,
                      ellipsoid_radius(x, y, z, (cx, cy - 6 * s, plateau_top), (34 * s, 20 * s, 10 * s)) < 1,
                      ellipsoid_radius(x, y, z, (cx, cy - 5 * s, plateau_top), (34 * s, 15 * s, 10 * s)) < 1)
    lab[plate & (x < cx) & (lab == 0)] = K["medial_tibial_cartilage"]
    lab[plate & (x >= cx) & (lab == 0)] = K["lateral_tibial_cartilage"]
    d_pat = ndimage.distance_transform_edt(lab != K["patella"], sampling=sp)
    pat_cart = (d_pat > 0) & (d_pat <= 3.0 * s) & (y < pat_c[1] - 2 * s)
    lab[pat_cart & (lab == 0)] = K["patellar_cartilage"]
    return lab, {"scale": s, "joint_line_mm": zj}


def phantom_knee(
    *,
    seed: int = 0,
    shape: Sequence[int] = PHANTOM_SHAPE,
    spacing: Sequence[float] = PHANTOM_SPACING,
    effusion_ml: float = 6.0,
    lesion_ml: float | None = 1.0,
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
    rng = rng_for(seed, "phantom")
    lab, info = _solids(shape, spacing, rng)
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
