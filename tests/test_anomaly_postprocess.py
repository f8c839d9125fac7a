"""Post-processing of BML anomaly maps: each step on phantoms with hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest

from mskmri.anomaly.postprocess import (
    REGION_NAMES,
    PostprocessConfig,
    PostprocessError,
    calibrate_threshold,
    femur_regions,
    keep_components,
    lesion_extent,
    lesion_table,
    opening,
    postprocess,
    roi_without_rim,
    slice_axis_of,
    smooth,
    threshold_for_inplane,
)


def _cube(shape: tuple[int, int, int], lo: int, hi: int) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[lo:hi, lo:hi, lo:hi] = True
    return m


def test_rim_isotropic_removes_one_voxel_layer() -> None:
    bone = _cube((14, 14, 14), 2, 12)  # 10^3
    roi = roi_without_rim(bone, (1.0, 1.0, 1.0), 1.0)
    # edge voxels are 1 mm from outside (excluded), the next layer 2 mm (kept): 8^3
    assert roi.sum() == 8 ** 3
    assert not roi[2, 5, 5] and roi[3, 5, 5]


def test_rim_uses_spacing_and_array_edge() -> None:
    bone = np.ones((10, 10, 10), dtype=bool)  # touches every edge
    roi = roi_without_rim(bone, (2.0, 1.0, 1.0), 1.0)
    # along axis 0 every voxel is >= 2 mm from outside; in-plane one layer goes
    assert roi.sum() == 10 * 8 * 8
    assert roi_without_rim(bone, (1, 1, 1), 0.0).sum() == 1000


def test_smooth_inside_roi_does_not_leak() -> None:
    roi = _cube((20, 20, 20), 5, 15)
    r = np.where(roi, 2.0, 100.0).astype(np.float32)
    out = smooth(r, (1.0, 1.0, 1.0), 1.5, roi)
    assert np.allclose(out[roi], 2.0, atol=1e-4)
    assert np.all(out[~roi] == 0)
    assert smooth(r, (1, 1, 1), 0.0).max() == 100.0


def test_opening_removes_isolated_voxels_keeps_blob() -> None:
    m = _cube((20, 20, 20), 5, 10)
    m[15, 15, 15] = True
    out = opening(m, (1.0, 1.0, 1.0), 1.0)
    assert not out[15, 15, 15]
    assert out[7, 7, 7] and out.sum() >= 27


def test_components_volume_and_slices() -> None:
    m = np.zeros((20, 20, 20), dtype=bool)
    m[2:5, 2:5, 2:5] = True          # 27 voxels = 0.027 mL at 1 mm
    m[10, 10, 10] = True             # 0.001 mL
    m[15, 10:15, 10:15] = True       # 25 voxels on one slice of axis 0
    kept = keep_components(m, (1.0, 1.0, 1.0), 0.01)
    assert kept.sum() == 27 + 25
    kept2 = keep_components(m, (1.0, 1.0, 1.0), 0.01, min_slices=2, slice_axis=0)
    assert kept2.sum() == 27
    assert slice_axis_of((0.7, 0.36, 0.36)) == 0 and slice_axis_of((0.3, 0.3, 3.0)) == 2


def test_postprocess_finds_block_and_records_steps() -> None:
    bone = _cube((30, 30, 30), 2, 28)
    res = np.zeros(bone.shape, dtype=np.float32)
    res[10:16, 10:16, 10:16] = 10.0
    out = postprocess(res, bone, (1.0, 1.0, 1.0), PostprocessConfig(threshold=3.0))
    assert [s["step"] for s in out.steps] == ["roi", "smooth", "threshold", "opening",
                                             "extent", "components", "slices"]
    truth = res > 0
    dice = 2 * (out.mask.astype(bool) & truth).sum() / (out.mask.sum() + truth.sum())
    assert dice > 0.8
    empty = postprocess(np.zeros_like(res), bone, (1, 1, 1))
    assert empty.mask.sum() == 0


def test_postprocess_bad_input() -> None:
    with pytest.raises(PostprocessError, match="differ in shape"):
        postprocess(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1))
    with pytest.raises(PostprocessError, match="spacing"):
        postprocess(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 0, 1))
    with pytest.raises(PostprocessError):
        PostprocessConfig(min_slices=0)
    with pytest.raises(PostprocessError, match="extent_fraction"):
        PostprocessConfig(extent_fraction=1.0)


def test_lesion_extent_cuts_each_component_to_its_own_fraction_of_peak() -> None:
    # two blobs with a fringe: peak 10 with a fringe of 3, peak 4 with a fringe of 1.5
    v = np.zeros((20, 20, 20), dtype=np.float32)
    v[2:10, 2:10, 2:10] = 3.0
    v[4:8, 4:8, 4:8] = 10.0
    v[12:18, 12:18, 12:18] = 1.5
    v[14:16, 14:16, 14:16] = 4.0
    mask = v > 1.0
    half = lesion_extent(mask, v, 0.5)
    # the strong blob keeps its >= 5 core only; the weak one its >= 2 core only
    assert half.sum() == 4 ** 3 + 2 ** 3
    assert half[4:8, 4:8, 4:8].all() and half[14:16, 14:16, 14:16].all()
    # the fringe of the strong blob (3) is above the weak blob's level: per-component levels
    assert not half[2, 2, 2]
    # a lower fraction keeps the fringes too; 0 is a no-op; never adds voxels
    assert lesion_extent(mask, v, 0.25).sum() == mask.sum()
    assert np.array_equal(lesion_extent(mask, v, 0.0), mask)
    assert not (lesion_extent(mask, v, 0.5) & ~mask).any()
    assert lesion_extent(np.zeros_like(mask), v, 0.5).sum() == 0


def test_calibrate_threshold_is_the_stated_quantile() -> None:
    vals = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    bone = np.ones_like(vals, dtype=bool)
    cfg = PostprocessConfig(rim_mm=0.0, smooth_sigma_mm=0.0)
    level = calibrate_threshold([vals], [bone], [(1, 1, 1)], fpr=0.1, config=cfg)
    assert level == pytest.approx(np.quantile(np.arange(1000), 0.9))
    assert (vals > level).mean() == pytest.approx(0.1, abs=0.002)
    with pytest.raises(PostprocessError):
        calibrate_threshold([vals], [bone], [(1, 1, 1)], fpr=0.0)


def test_femur_regions_box() -> None:
    fem = np.zeros((40, 40, 80), dtype=bool)
    fem[:, :, :] = True
    reg = femur_regions(fem, np.eye(4), lateral_sign=1.0)
    # distal = z <= 45; trochlea = y >= 39 - 0.4 * 39 = 23.4; lateral = x > 19.5
    assert REGION_NAMES[int(reg[5, 5, 5])] == "medial condyle"
    assert REGION_NAMES[int(reg[35, 5, 5])] == "lateral condyle"
    assert REGION_NAMES[int(reg[20, 35, 5])] == "trochlea"
    assert REGION_NAMES[int(reg[20, 20, 70])] == "shaft"
    assert REGION_NAMES[int(femur_regions(fem, np.eye(4))[5, 5, 5])] == "condyle"
    left = femur_regions(fem, np.eye(4), lateral_sign=-1.0)
    assert REGION_NAMES[int(left[5, 5, 5])] == "lateral condyle"


def test_lesion_table_rows() -> None:
    m = np.zeros((20, 20, 20), dtype=np.uint8)
    m[2:4, 2:4, 2:4] = 1       # 8 voxels
    m[10:14, 10:14, 10:14] = 1  # 64 voxels
    r = np.zeros(m.shape, dtype=np.float32)
    r[11, 11, 11] = 7.5
    regions = np.full(m.shape, 3, dtype=np.uint8)
    rows = lesion_table(m, r, regions, (0.5, 0.5, 0.5))
    assert [row["lesion"] for row in rows] == [1, 2]
    assert rows[0]["volume_ml"] == pytest.approx(64 * 0.125 / 1000)
    assert rows[0]["peak_residual"] == pytest.approx(7.5)
    assert rows[0]["region"] == "trochlea" and rows[0]["bone"] == "femur"
    assert rows[1]["n_voxels"] == 8
    assert lesion_table(np.zeros_like(m), r, regions, (1, 1, 1)) == []


def test_threshold_for_inplane_interpolates_in_log_spacing_and_clamps() -> None:
    table = [(1.25, 6.0), (0.3125, 3.0), (0.625, 2.0)]  # any order
    assert threshold_for_inplane(table, 0.625) == pytest.approx(2.0)
    # halfway between 0.625 and 1.25 in log(spacing): sqrt(0.625 * 1.25)
    assert threshold_for_inplane(table, float(np.sqrt(0.625 * 1.25))) == pytest.approx(4.0)
    assert threshold_for_inplane(table, 0.1) == pytest.approx(3.0)
    assert threshold_for_inplane(table, 5.0) == pytest.approx(6.0)
    assert threshold_for_inplane([(0.5, 2.5)], 0.9) == pytest.approx(2.5)
    with pytest.raises(PostprocessError, match="in-plane"):
        threshold_for_inplane(table, 0.0)
    with pytest.raises(PostprocessError, match="pairs"):
        threshold_for_inplane([], 0.5)

