"""Volume / LabelVolume: geometry derived from the affine, operations that keep world positions."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_orientation_affine

from mskmri.errors import DimensionError, GeometryError
from mskmri.volume import LPS_TO_RAS, LabelVolume, Volume


def _rotation(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q


def _oblique_affine(spacing=(0.5, 0.8, 2.0), seed: int = 1) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = _rotation(seed) * np.asarray(spacing)[None, :]
    aff[:3, 3] = (12.0, -40.0, 7.5)
    return aff


# ---------------------------------------------------------------------------- derived geometry
def test_spacing_and_voxel_volume_from_oblique_affine() -> None:
    vol = Volume(np.zeros((4, 5, 6)), _oblique_affine((0.5, 0.8, 2.0)))
    np.testing.assert_allclose(vol.spacing, (0.5, 0.8, 2.0), rtol=1e-12)
    assert vol.voxel_volume_mm3 == pytest.approx(0.5 * 0.8 * 2.0, rel=1e-12)
    np.testing.assert_allclose(vol.direction.T @ vol.direction, np.eye(3), atol=1e-12)
    assert vol.origin == (12.0, -40.0, 7.5)


def test_orientation_codes_of_known_affines() -> None:
    assert Volume(np.zeros((2, 2, 2)), np.eye(4)).orientation == ("R", "A", "S")
    lps = LPS_TO_RAS @ np.eye(4)  # DICOM's identity in LPS is L, P, S in RAS+ codes
    assert Volume(np.zeros((2, 2, 2)), lps).orientation == ("L", "P", "S")
    sag = np.array([[0, 0, -1, 0], [1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1.0]])
    assert Volume(np.zeros((2, 2, 2)), sag).orientation == ("A", "I", "L")


def test_voxel_world_round_trip() -> None:
    vol = Volume(np.zeros((4, 5, 6)), _oblique_affine())
    idx = np.random.default_rng(0).uniform(0, 5, size=(20, 3))
    np.testing.assert_allclose(vol.world_to_voxel(vol.voxel_to_world(idx)), idx, atol=1e-10)
    # hand check of one point: voxel (1, 0, 0) is one column of the affine from the origin
    np.testing.assert_allclose(vol.voxel_to_world([[1, 0, 0]])[0],
                               vol.affine[:3, 3] + vol.affine[:3, 0])


@pytest.mark.parametrize(
    ("affine", "match"),
    [
        (np.eye(3), "shape \\(4, 4\\), not \\(3, 3\\)"),
        (np.diag([1.0, 1.0, 0.0, 1.0]), "singular"),
        (np.where(np.eye(4) == 1, np.nan, 0.0), "NaN"),
        (np.vstack([np.eye(4)[:3], [0, 0, 1, 1]]), "last row"),
    ],
)
def test_bad_affines_are_geometry_errors(affine: np.ndarray, match: str) -> None:
    with pytest.raises(GeometryError, match=match):
        Volume(np.zeros((2, 2, 2)), affine)


@pytest.mark.parametrize("shape", [(5, 5), (2, 3, 4, 5), (7,)])
def test_not_3d_is_a_dimension_error(shape: tuple[int, ...]) -> None:
    with pytest.raises(DimensionError, match=f"not {len(shape)}-D"):
        Volume(np.zeros(shape), np.eye(4))


def test_require_geometry() -> None:
    Volume(np.zeros((2, 2, 2)), np.eye(4)).require_geometry()
    vol = Volume(np.zeros((2, 2, 2)), np.eye(4), {"source": "x.nii"}, geometry_known=False)
    with pytest.raises(GeometryError, match="x.nii has no voxel spacing.*a volume in mL"):
        vol.require_geometry("a volume in mL")


def test_same_geometry_tolerance() -> None:
    a = Volume(np.zeros((3, 3, 3)), _oblique_affine())
    aff = a.affine.copy()
    aff[0, 3] += 5e-4
    assert a.same_geometry(Volume(np.zeros((3, 3, 3)), aff))
    aff[0, 3] += 1e-2
    assert not a.same_geometry(Volume(np.zeros((3, 3, 3)), aff))
    assert a.same_geometry(Volume(np.zeros((3, 3, 3)), aff), atol=0.1)
    assert not a.same_geometry(Volume(np.zeros((3, 3, 4)), a.affine))


# ---------------------------------------------------------------------------- operations
@pytest.mark.parametrize("seed", range(6))
def test_reorient_there_and_back_is_exact(seed: int) -> None:
    rng = np.random.default_rng(seed)
    aff = random_orientation_affine(rng)
    arr = rng.integers(0, 1000, size=(5, 6, 7)).astype(np.int16)
    vol = Volume(arr, aff)
    ras = vol.reorient("RAS")
    assert ras.orientation == ("R", "A", "S")
    lpi = vol.reorient("LPI")
    assert lpi.orientation == ("L", "P", "I")
    back = ras.reorient(vol.orientation)
    np.testing.assert_array_equal(back.array, arr)
    np.testing.assert_allclose(back.affine, aff, atol=1e-9)
    # every value sits at the same world point in the reoriented volume
    idx = np.argwhere(np.ones(arr.shape, bool))
    world = vol.voxel_to_world(idx)
    ridx = np.round(ras.world_to_voxel(world)).astype(int)
    np.testing.assert_array_equal(ras.array[tuple(ridx.T)], arr[tuple(idx.T)])
    assert ras.voxel_volume_mm3 == pytest.approx(vol.voxel_volume_mm3)


def test_crop_keeps_world_positions() -> None:
    rng = np.random.default_rng(3)
    vol = Volume(rng.normal(size=(10, 9, 8)), _oblique_affine())
    crop = vol.crop((slice(2, 7), slice(None), slice(3, 5)))
    assert crop.shape == (5, 9, 2)
    idx = np.argwhere(np.ones(crop.shape, bool))
    np.testing.assert_allclose(crop.voxel_to_world(idx), vol.voxel_to_world(idx + [2, 0, 3]),
                               atol=1e-10)
    np.testing.assert_array_equal(crop.array, vol.array[2:7, :, 3:5])
    with pytest.raises(GeometryError, match="step 1"):
        vol.crop((slice(0, 4, 2), slice(None), slice(None)))


def test_pad_or_crop_to_keeps_world_positions() -> None:
    vol = Volume(np.arange(27.0).reshape(3, 3, 3), _oblique_affine())
    out = vol.pad_or_crop_to((-1, 1, 0), (4, 3, 2))
    assert out.shape == (5, 2, 2)
    assert out.array[0].sum() == 0  # padding
    np.testing.assert_array_equal(out.array[1:4], vol.array[:, 1:3, 0:2])
    np.testing.assert_allclose(out.voxel_to_world([[1, 0, 0]]), vol.voxel_to_world([[0, 1, 0]]))


def test_label_resample_is_nearest() -> None:
    rng = np.random.default_rng(5)
    arr = rng.choice([0, 3, 7, 12], size=(6, 6, 6)).astype(np.uint8)
    lab = LabelVolume(arr, _oblique_affine((1.0, 1.0, 1.0)), {3: "a", 7: "b", 12: "c"})
    fine = lab.resample((0.5, 0.5, 0.5))
    assert isinstance(fine, LabelVolume) and fine.array.dtype == np.uint8
    assert set(np.unique(fine.array)) <= {0, 3, 7, 12}  # no blended values
    assert fine.labels == lab.labels
    # each fine voxel holds the label of the coarse voxel its centre falls in
    idx = np.argwhere(np.ones(fine.shape, bool))
    src = np.round(lab.world_to_voxel(fine.voxel_to_world(idx))).astype(int)
    inside = np.all((src >= 0) & (src < 6), axis=1)
    np.testing.assert_array_equal(fine.array[tuple(idx[inside].T)], arr[tuple(src[inside].T)])
    same = lab.resample_to(lab)
    np.testing.assert_array_equal(same.array, arr)


def test_image_resample_linear_is_exact_on_a_ramp() -> None:
    aff = _oblique_affine((1.0, 1.0, 1.0))
    i = np.arange(8.0)[:, None, None] + np.zeros((8, 8, 8))
    vol = Volume(i, aff)
    fine = vol.resample((0.5, 1.0, 1.0))
    assert fine.shape == (16, 8, 8)
    assert fine.spacing == pytest.approx((0.5, 1.0, 1.0))
    # outer corner of voxel 0 is kept: fine voxel 1 centre is old index 0.25 along axis 0
    x = vol.world_to_voxel(fine.voxel_to_world([[1, 0, 0]]))[0]
    np.testing.assert_allclose(x, (0.25, 0.0, 0.0), atol=1e-9)
    interior = fine.array[1:-1]
    expected = vol.world_to_voxel(fine.voxel_to_world(
        np.argwhere(np.ones(fine.shape, bool))))[:, 0].reshape(fine.shape)[1:-1]
    np.testing.assert_allclose(interior, expected, atol=1e-5)
    with pytest.raises(GeometryError, match="3 positive numbers"):
        vol.resample((1.0, 0.0, 1.0))


def test_label_volume_rejects_fractions() -> None:
    with pytest.raises(GeometryError, match="whole numbers"):
        LabelVolume(np.full((2, 2, 2), 0.5), np.eye(4))
    lab = LabelVolume(np.ones((2, 2, 2)), np.eye(4), {1: "femur"})
    assert lab.array.dtype == np.int32 and lab.present_values() == [1]
    assert lab.sidecar()["labels"] == {"1": "femur"}


def test_with_array_and_copy_are_independent() -> None:
    vol = Volume(np.zeros((2, 2, 2)), np.eye(4), {"a": [1]})
    cp = vol.copy()
    cp.meta["a"].append(2)
    cp.affine[0, 3] = 9
    assert vol.meta["a"] == [1] and vol.affine[0, 3] == 0
    with pytest.raises(DimensionError):
        vol.with_array(np.zeros((3, 2, 2)))


@pytest.mark.parametrize("seed", range(4))
def test_identity_resample_keeps_border_voxels(seed: int) -> None:
    # regression: round-off put border voxels 1e-15 outside the grid, where they became cval
    aff = _oblique_affine((0.7, 0.4, 1.1), seed=seed)
    arr = np.random.default_rng(seed).uniform(1, 2, size=(5, 6, 7)).astype(np.float32)
    out = Volume(arr, aff).resample_to(Volume(arr, aff))
    np.testing.assert_allclose(out.array, arr, atol=1e-5)
    lab = LabelVolume((arr * 3).astype(np.uint8), aff)
    np.testing.assert_array_equal(lab.resample_to(lab).array, lab.array)
