"""Knee cartilage thickness, effusion/muscle/meniscal volumes: phantoms with known answers.

Tolerances (voxel-size limited, stated with each test):

- flat plate whose bone boundary lies on voxel faces: the voxelised plate has
  ``n = round(t / h)`` voxels along its normal (``h`` the spacing along it), and the method
  returns exactly ``n * h``, so ``|mean - t| <= h / 2`` and the error is 0 when ``t`` is a
  multiple of ``h``;
- cylindrical plate (curved bone): ``|mean - t| <= h_max / 3`` and ``|max - t| <= 0.6 h_max``,
  ``h_max`` the largest spacing across the cylinder axis (measured errors: mean -0.03 to
  -0.12 mm, max +0.09 to +0.4 mm at 0.3-0.7 mm voxels);
- effusion ellipsoid: voxel count x voxel volume within 3 % of ``4/3 pi a b c``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import random_orientation_affine

from mskmri.labels import KNEE, KNEE_ID
from mskmri.measure.knee import (
    THICKNESS_METHOD,
    cartilage_thickness,
    cartilage_thickness_measurements,
    measure_knee_with_warnings,
)
from mskmri.volume import LabelVolume

FEMUR, TIBIA = KNEE_ID["femur"], KNEE_ID["tibia"]
FEM_CART = KNEE_ID["femoral_cartilage"]


def _slab(n_vox: int, spacing, rng: np.random.Generator, *, axis: int = 2) -> LabelVolume:
    """Bone below, a plate of ``n_vox`` voxels along ``axis``, then joint space above."""
    shape = [24, 26, 22]
    a = np.zeros(shape, np.uint8)
    sl_bone: list[slice] = [slice(None)] * 3
    sl_bone[axis] = slice(0, 8)
    sl_cart: list[slice] = [slice(None)] * 3
    sl_cart[axis] = slice(8, 8 + n_vox)
    a[tuple(sl_bone)] = FEMUR
    a[tuple(sl_cart)] = FEM_CART
    return LabelVolume(a, random_orientation_affine(rng, spacing=spacing), dict(KNEE),
                       schema="knee")


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_flat_plate_is_exact_in_every_storage_orientation(rng, axis):
    spacing = (0.7, 0.4, 0.55)  # anisotropic
    n_vox = 5
    expected = n_vox * spacing[axis]  # 3.5, 2.0, 2.75 mm
    seg = _slab(n_vox, spacing, rng, axis=axis)
    for codes in ("RAS", "LPI", "SAR", "IRP", "ALS", "PIL"):
        res = cartilage_thickness(seg.reorient(codes), "femoral_cartilage")
        assert res is not None and res.values_mm.size == seg.array.size // seg.shape[axis]
        assert res.values_mm.mean() == pytest.approx(expected, abs=1e-9)
        assert res.values_mm.max() == pytest.approx(expected, abs=1e-9)
        assert res.capped == 0


def test_plate_of_arbitrary_thickness_within_half_a_voxel(rng):
    # a plate of continuous thickness t sampled at voxel centres: n = round(t / h) voxels
    h = 0.7
    for t in (1.3, 2.0, 2.45, 3.1):
        n_vox = int(np.sum((np.arange(20) + 0.5) * h < t))  # voxel centres inside [0, t)
        seg = _slab(n_vox, (0.4, 0.5, h), rng, axis=2)
        res = cartilage_thickness(seg, "femoral_cartilage")
        assert res is not None
        assert abs(res.values_mm.mean() - t) <= h / 2 + 1e-9


def _cylinder(radius: float, t: float, spacing, affine_of=None) -> LabelVolume:
    """A bone cylinder (axis along array axis 2) covered by a cartilage shell of thickness t."""
    shape = [int(np.ceil(2 * (radius + t + 3) / s)) for s in spacing[:2]] + [int(10 / spacing[2])]
    i, j, _ = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    x = (i - shape[0] / 2 + 0.3) * spacing[0]
    y = (j - shape[1] / 2 + 0.17) * spacing[1]
    r = np.hypot(x, y)
    a = np.zeros(shape, np.uint8)
    a[r < radius] = FEMUR
    a[(r >= radius) & (r < radius + t)] = FEM_CART
    aff = np.diag([*spacing, 1.0]) if affine_of is None else affine_of(spacing)
    return LabelVolume(a, aff, dict(KNEE), schema="knee")


@pytest.mark.parametrize(("radius", "t", "spacing"), [
    (20.0, 2.0, (0.4, 0.5, 0.7)),
    (20.0, 3.0, (0.7, 0.4, 0.5)),
    (15.0, 1.5, (0.3, 0.3, 1.0)),
    (30.0, 1.0, (0.5, 0.5, 0.5)),
])
def test_cylindrical_plate_thickness(rng, radius, t, spacing):
    seg = _cylinder(radius, t, spacing,
                    affine_of=lambda sp: random_orientation_affine(rng, spacing=sp))
    res = cartilage_thickness(seg, "femoral_cartilage")
    assert res is not None and res.capped == 0
    h_max = max(spacing[:2])
    assert abs(res.values_mm.mean() - t) <= h_max / 3
    assert abs(res.values_mm.max() - t) <= 0.6 * h_max
    # interface points lie on the bone surface (radius + up to one voxel), in world mm
    sh = seg.shape
    centre = seg.voxel_to_world([[sh[0] / 2 - 0.3, sh[1] / 2 - 0.17, 0.0]])[0]
    assert res.points_mm.shape == (res.values_mm.size, 3)
    axis_dir = seg.affine[:3, 2] / np.linalg.norm(seg.affine[:3, 2])
    d = res.points_mm - centre
    r = np.linalg.norm(d - np.outer(d @ axis_dir, axis_dir), axis=1)
    assert r.min() >= radius - 1e-6 and r.max() <= radius + 1.5 * h_max


def test_thickness_does_not_depend_on_storage(rng):
    seg = _cylinder(20.0, 2.5, (0.4, 0.5, 0.7))
    ref = cartilage_thickness(seg, "femoral_cartilage")
    for codes in ("LPI", "SAR", "IRP"):
        got = cartilage_thickness(seg.reorient(codes), "femoral_cartilage")
        assert got is not None and ref is not None
        assert got.values_mm.mean() == pytest.approx(ref.values_mm.mean(), rel=1e-9)
        assert got.values_mm.max() == pytest.approx(ref.values_mm.max(), rel=1e-9)


def test_measurements_per_plate_and_warnings(rng):
    seg = _slab(4, (0.5, 0.5, 0.6), rng, axis=2)
    ms, warnings = cartilage_thickness_measurements(seg)
    assert warnings == []
    by = {m.key: m for m in ms}
    assert set(by) == {"thickness_mean.femoral_cartilage", "thickness_max.femoral_cartilage"}
    assert by["thickness_mean.femoral_cartilage"].value == pytest.approx(2.4)
    assert by["thickness_mean.femoral_cartilage"].unit == "mm"
    assert by["thickness_mean.femoral_cartilage"].method == THICKNESS_METHOD

    # a tibial plate without a tibia: NaN with a reason and a warning, never a number
    a = seg.array.copy()
    a[a == FEMUR] = 0
    a[a == FEM_CART] = KNEE_ID["medial_tibial_cartilage"]
    ms, warnings = cartilage_thickness_measurements(seg.with_array(a))  # type: ignore[arg-type]
    assert len(ms) == 2 and all(m.is_missing for m in ms)
    assert "no tibia" in ms[0].extra["reason"]
    assert len(warnings) == 1 and "medial tibial cartilage thickness not measured" in warnings[0]


def test_sheared_grid_is_not_measured(rng):
    seg = _slab(4, (0.5, 0.5, 0.6), rng, axis=2)
    aff = np.diag([0.5, 0.5, 0.6, 1.0])
    aff[0, 2] = 0.2  # gantry-tilt-like shear
    sheared = LabelVolume(seg.array, aff, dict(KNEE), schema="knee")
    ms, warnings = cartilage_thickness_measurements(sheared)
    assert all(m.is_missing for m in ms) and "not orthogonal" in ms[0].extra["reason"]
    assert warnings


def test_effusion_ellipsoid_and_muscle_meniscus_volumes(rng):
    spacing = (0.5, 0.6, 0.8)
    shape = (80, 70, 60)
    a = np.zeros(shape, np.uint8)
    a[:, :, :10] = TIBIA
    a[:, :, 50:] = FEMUR
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    x, y, z = ((i - 40) * spacing[0], (j - 35) * spacing[1], (k - 30) * spacing[2])
    semi = (12.0, 9.0, 7.0)  # mm
    a[(x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2 <= 1] = KNEE_ID["joint_effusion"]
    a[:6, :6, 20:30] = KNEE_ID["muscle"]  # 360 voxels
    a[70:74, 60:64, 25:28] = KNEE_ID["medial_meniscus"]  # 48 voxels
    seg = LabelVolume(a, random_orientation_affine(rng, spacing=spacing), dict(KNEE),
                      schema="knee")
    ms, _ = measure_knee_with_warnings(seg.reorient("PIR"))
    by = {m.key: m for m in ms}
    expected_ml = 4 / 3 * math.pi * np.prod(semi) / 1000
    assert by["volume.joint_effusion"].value == pytest.approx(expected_ml, rel=0.03)
    vox_ml = np.prod(spacing) / 1000
    assert by["volume.muscle"].value == pytest.approx(360 * vox_ml, rel=1e-6)
    assert by["volume.medial_meniscus"].value == pytest.approx(48 * vox_ml, rel=1e-6)
    assert "volume.lateral_meniscus" not in by  # absent: no entry, not 0 mL


def test_real_oai_label_map_thickness_is_plausible(shared_data):
    """One real OAI map (160x384x384, 0.7x0.36x0.36 mm): thicknesses in the range the
    literature reports for adult knees (means about 1.5-3 mm; no value above 8 mm)."""
    from mskmri.synth.sources import load_knee_source

    path = shared_data / "knee" / "oai_bone_lesion_labels" / "akoa_9031930_00m.nii.gz"
    seg = load_knee_source(path).labels
    ms, warnings = cartilage_thickness_measurements(seg)
    assert warnings == []
    by = {m.key: m.value for m in ms}
    for plate in ("femoral_cartilage", "medial_tibial_cartilage", "lateral_tibial_cartilage",
                  "patellar_cartilage"):
        assert 1.0 < by[f"thickness_mean.{plate}"] < 3.5, plate
        assert by[f"thickness_mean.{plate}"] < by[f"thickness_max.{plate}"] < 8.0, plate
    # the same in another storage orientation (world-mm distances)
    other, _ = cartilage_thickness_measurements(seg.reorient("PIR"))  # type: ignore[arg-type]
    for m in other:
        assert m.value == pytest.approx(by[m.key], rel=1e-9)
