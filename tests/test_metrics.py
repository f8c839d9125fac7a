"""Segmentation and lesion metrics against hand-computed phantom values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import random_orientation_affine
from scipy.spatial.distance import cdist

from mskmri.cli import main
from mskmri.errors import DimensionError, GeometryError, LabelError
from mskmri.evaluate.metrics import (
    EVALUATION_SCHEMA,
    MetricError,
    accuracy,
    assd,
    binary_metrics,
    confusion,
    dice,
    evaluate_labels,
    hd95,
    iou,
    lesion_detection,
    sensitivity,
    size_stratum_names,
    specificity,
    surface_distances,
    surface_voxels,
    volume_difference,
)
from mskmri.io import write
from mskmri.volume import LabelVolume, Volume

SPACING = (0.5, 0.7, 2.0)


def _affine(spacing=SPACING) -> np.ndarray:
    return np.diag([*spacing, 1.0])


# ============================================================================ overlap
def test_shifted_cubes_overlap_exact():
    # two 10^3 cubes, the second shifted by 2 voxels along axis 0: overlap 8 x 10 x 10
    a = np.zeros((20, 20, 20), bool)
    b = np.zeros_like(a)
    a[2:12, 5:15, 5:15] = True
    b[4:14, 5:15, 5:15] = True
    c = confusion(b, a)
    assert (c.tp, c.fp, c.fn, c.tn) == (800, 200, 200, 8000 - 1200)
    assert dice(b, a).value == pytest.approx(0.8, abs=1e-12)
    assert iou(b, a).value == pytest.approx(800 / 1200, abs=1e-12)
    assert sensitivity(b, a).value == pytest.approx(0.8)
    assert specificity(b, a).value == pytest.approx(6800 / 7000)
    assert accuracy(b, a).value == pytest.approx((800 + 6800) / 8000)


def test_nested_spheres_dice_from_counts():
    z, y, x = np.mgrid[:41, :41, :41] - 20
    r = np.sqrt(x**2 + y**2 + z**2)
    truth = r <= 15
    pred = r <= 10  # inside the truth: TP = |pred|, FP = 0
    expected = 2 * pred.sum() / (pred.sum() + truth.sum())
    assert dice(pred, truth).value == pytest.approx(expected, abs=1e-12)
    assert specificity(pred, truth).value == 1.0
    assert sensitivity(pred, truth).value == pytest.approx(pred.sum() / truth.sum())


def test_empty_masks_are_nan_with_a_reason_not_zero():
    empty = np.zeros((5, 5, 5), bool)
    full = np.zeros_like(empty)
    full[1:3, 1:3, 1:3] = True
    d = dice(empty, empty)
    assert math.isnan(d.value) and "both masks are empty" in d.reason
    assert dice(empty, full).value == 0.0  # well defined: nothing found
    s = sensitivity(full, empty)
    assert math.isnan(s.value) and "truth is empty" in s.reason
    h = hd95(empty, full, spacing=(1, 1, 1))
    assert math.isnan(h.value) and "prediction is empty" in h.reason
    h = hd95(full, empty, spacing=(1, 1, 1))
    assert math.isnan(h.value) and "truth is empty" in h.reason
    m = binary_metrics(empty, empty, spacing=(1, 1, 1))
    assert math.isnan(m["assd"].value) and m["assd"].to_dict()["value"] is None
    assert m["assd"].to_dict()["reason"] == "both masks are empty"
    assert math.isnan(m["volume_difference_percent"].value)
    assert m["volume_difference"].value == 0.0
    with pytest.raises(MetricError):
        surface_distances(empty, full, spacing=(1, 1, 1))


# ============================================================================ surfaces
def test_surface_is_face_connected_boundary():
    m = np.zeros((7, 7, 7), bool)
    m[1:6, 1:6, 1:6] = True  # 5^3 cube: interior 3^3
    s = surface_voxels(m)
    assert s.sum() == 125 - 27
    full = np.ones((3, 3, 3), bool)  # array border counts as outside
    assert surface_voxels(full).sum() == 26


@pytest.mark.parametrize(("axis", "k"), [(2, 3), (0, 4), (1, 1)])
def test_parallel_planes_hd95_and_assd_in_mm(axis, k):
    # one-voxel-thick planes normal to `axis`, k voxels apart: every surface voxel is
    # exactly k * spacing[axis] mm from the other plane
    shape = (12, 10, 14)
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    idx_a = [slice(None)] * 3
    idx_b = [slice(None)] * 3
    idx_a[axis] = 2
    idx_b[axis] = 2 + k
    a[tuple(idx_a)] = True
    b[tuple(idx_b)] = True
    expected = k * SPACING[axis]
    assert hd95(a, b, spacing=SPACING).value == pytest.approx(expected, abs=1e-9)
    assert assd(a, b, spacing=SPACING).value == pytest.approx(expected, abs=1e-9)
    m = binary_metrics(a, b, spacing=SPACING)
    assert m["hausdorff"].value == pytest.approx(expected, abs=1e-9)
    assert m["hd95"].unit == "mm"
    # the same planes as Volumes take the spacing from the affine
    va = Volume(a.astype(np.uint8), _affine())
    vb = Volume(b.astype(np.uint8), _affine())
    assert hd95(va, vb).value == pytest.approx(expected, abs=1e-9)


def test_single_voxels_at_known_offset():
    a = np.zeros((8, 8, 8), bool)
    b = np.zeros_like(a)
    a[1, 1, 1] = True
    b[2, 3, 4] = True
    expected = math.sqrt((1 * 0.5) ** 2 + (2 * 0.7) ** 2 + (3 * 2.0) ** 2)
    assert hd95(a, b, spacing=SPACING).value == pytest.approx(expected)
    assert assd(a, b, spacing=SPACING).value == pytest.approx(expected)


def _brute_force(p: np.ndarray, t: np.ndarray, spacing) -> tuple[float, float]:
    sp = np.argwhere(surface_voxels(p)) * np.asarray(spacing)
    st = np.argwhere(surface_voxels(t)) * np.asarray(spacing)
    d = cdist(sp, st)
    d_pt, d_tp = d.min(axis=1), d.min(axis=0)
    hd = max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))
    return hd, (d_pt.sum() + d_tp.sum()) / (d_pt.size + d_tp.size)


def test_distances_match_brute_force_and_are_symmetric(rng):
    from scipy import ndimage

    shape = (24, 20, 16)
    a = ndimage.gaussian_filter(rng.random(shape), 2) > 0.52
    b = ndimage.gaussian_filter(rng.random(shape), 2) > 0.52
    assert a.any() and b.any()
    hd_ref, assd_ref = _brute_force(a, b, SPACING)
    assert hd95(a, b, spacing=SPACING).value == pytest.approx(hd_ref, rel=1e-9)
    assert assd(a, b, spacing=SPACING).value == pytest.approx(assd_ref, rel=1e-9)
    assert hd95(b, a, spacing=SPACING).value == pytest.approx(hd_ref, rel=1e-9)
    assert assd(b, a, spacing=SPACING).value == pytest.approx(assd_ref, rel=1e-9)
    # anisotropy matters: isotropic 1 mm gives another answer
    assert hd95(a, b, spacing=(1, 1, 1)).value != pytest.approx(hd_ref, rel=1e-3)


def test_metrics_do_not_depend_on_storage_orientation(rng):
    a = np.zeros((16, 18, 12), np.uint8)
    b = np.zeros_like(a)
    a[3:10, 4:12, 2:8] = 1
    b[4:11, 4:13, 3:8] = 1
    aff = random_orientation_affine(rng, spacing=SPACING)
    va, vb = Volume(a, aff), Volume(b, aff)
    ref = binary_metrics(vb, va)
    for codes in ("RAS", "LPI", "SRA", "PIL"):
        m = binary_metrics(vb.reorient(codes), va.reorient(codes))
        for key, metric in ref.items():
            assert m[key].value == pytest.approx(metric.value, rel=1e-9, abs=1e-12), key


def test_volume_difference_in_ml_and_percent():
    t = np.zeros((20, 20, 20), bool)
    p = np.zeros_like(t)
    t[0:10, 0:10, 0:10] = True  # 1000 voxels
    p[0:12, 0:10, 0:10] = True  # 1200 voxels
    sp = (0.5, 0.5, 2.0)  # 0.5 mm^3 per voxel
    dv, pct = volume_difference(p, t, spacing=sp)
    assert dv.value == pytest.approx(200 * 0.5 / 1000) and dv.unit == "mL"
    assert pct.value == pytest.approx(20.0) and pct.unit == "%"


# ============================================================================ geometry
def test_arrays_need_spacing_and_volumes_need_same_grid():
    a = np.zeros((6, 6, 6), np.uint8)
    a[2:4, 2:4, 2:4] = 1
    with pytest.raises(GeometryError, match="spacing="):
        hd95(a, a)
    with pytest.raises(GeometryError, match="positive"):
        hd95(a, a, spacing=(1, 0, 1))
    with pytest.raises(DimensionError):
        dice(a, a[:5])
    va = Volume(a, _affine())
    vb = Volume(a, _affine((0.5, 0.7, 2.5)))
    with pytest.raises(GeometryError, match="different grids"):
        binary_metrics(va, vb)
    with pytest.raises(GeometryError, match="both as Volumes"):
        dice(va, a)
    nogeo = Volume(a, np.eye(4), geometry_known=False)
    with pytest.raises(GeometryError, match="no voxel spacing"):
        hd95(nogeo, nogeo)
    assert dice(nogeo, nogeo).value == 1.0  # overlap needs no geometry


def test_resample_prediction_onto_truth_grid(rng):
    a = np.zeros((14, 16, 10), np.uint8)
    a[3:9, 4:12, 2:7] = 1
    truth = LabelVolume(a, random_orientation_affine(rng, spacing=SPACING))
    pred = truth.reorient("LPI")  # same voxels, another storage grid
    assert not pred.same_geometry(truth)
    m = binary_metrics(pred, truth, resample=True)
    assert m["dice"].value == 1.0 and m["hd95"].value == 0.0


# ============================================================================ lesions
def _lesion_layout() -> tuple[np.ndarray, np.ndarray]:
    """Hand-built layout (1 mm voxels, 1 voxel = 0.001 mL).

    truth: L1 cube 6^3 half covered by P1; L2 3^3 missed; L3a and L3b (4^3 each) both touched
    by one component P3; L4 = two cubes touching only at a corner (one lesion under
    26-connectivity) covered by two separate predictions P4a, P4b. False alarms: P5, P6.
    """
    t = np.zeros((60, 40, 40), np.uint8)
    p = np.zeros_like(t)
    t[2:8, 2:8, 2:8] = 1  # L1, 216 voxels
    p[2:5, 2:8, 2:8] = 1  # P1 covers 108 (50 %)
    t[20:23, 2:5, 2:5] = 1  # L2, missed
    t[30:34, 2:6, 2:6] = 1  # L3a
    t[30:34, 10:14, 2:6] = 1  # L3b
    p[31:33, 4:12, 3:5] = 1  # P3 bridges L3a and L3b
    t[40:43, 20:23, 20:23] = 1  # L4 part 1
    t[43:46, 23:26, 23:26] = 1  # L4 part 2, corner contact only
    p[40:43, 20:23, 20:23] = 1  # P4a
    p[44:46, 24:26, 24:26] = 1  # P4b (not touching P4a)
    p[10:12, 30:32, 30:32] = 1  # P5 false alarm
    p[50:52, 30:32, 30:32] = 1  # P6 false alarm
    return p, t


def test_lesion_detection_counts_on_hand_built_layout():
    p, t = _lesion_layout()
    det = lesion_detection(p, t, spacing=(1, 1, 1))
    assert det.n_truth == 5  # L1, L2, L3a, L3b, L4 (26-connected)
    assert det.n_hit == 4 and det.n_missed == 1
    assert det.n_predicted == 6  # P1, P3, P4a, P4b, P5, P6
    assert det.n_false_alarm == 2
    assert det.recall().value == pytest.approx(4 / 5)
    assert det.precision().value == pytest.approx(4 / 6)
    assert det.f1().value == pytest.approx(2 * 4 / (2 * 4 + 2 + 1))
    missed = [x for x in det.truth if not x.hit]
    assert len(missed) == 1 and missed[0].voxels == 27
    # 6-connectivity would split L4: check the rule really is 26
    assert sorted(x.voxels for x in det.truth) == [27, 54, 64, 64, 216]
    d = det.to_dict()
    assert d["n_false_alarm"] == {"value": 2, "unit": "count"}
    assert len(d["truth_lesions"]) == 5 and len(d["predicted_lesions"]) == 6


def test_min_overlap_fraction_turns_partial_hits_into_misses():
    p, t = _lesion_layout()
    det = lesion_detection(p, t, spacing=(1, 1, 1), min_overlap_fraction=0.6)
    # L1 is 50 % covered -> missed, P1 becomes a false alarm; L3a/L3b covered 8/64 -> missed,
    # P3 false alarm; L4 covered (27 + 8) / 54 = 65 % -> hit
    assert det.n_hit == 1 and det.n_missed == 4
    assert det.n_false_alarm == 4
    with pytest.raises(MetricError):
        lesion_detection(p, t, spacing=(1, 1, 1), min_overlap_fraction=1.5)


def test_size_strata_counts_and_detection_rate():
    assert size_stratum_names((0.1, 0.5, 2.0)) == ["<0.1", "0.1-0.5", "0.5-2", ">2"]
    t = np.zeros((80, 40, 40), np.uint8)
    p = np.zeros_like(t)
    # 1 mm^3 voxels: volumes 0.027, 0.1 (edge, lower inclusive), 0.125, 1.0, 2.744 mL
    t[2:5, 2:5, 2:5] = 1  # 27 voxels   -> <0.1, missed
    t[10:14, 2:7, 2:7] = 1  # 100 voxels -> 0.1-0.5, hit
    p[10:14, 2:7, 2:7] = 1
    t[20:25, 20:25, 2:7] = 1  # 125 voxels -> 0.1-0.5, missed
    t[30:40, 2:12, 2:12] = 1  # 1000 voxels -> 0.5-2, hit exactly
    p[30:40, 2:12, 2:12] = 1
    t[50:64, 2:16, 2:16] = 1  # 2744 voxels -> >2, hit by half
    p[50:57, 2:16, 2:16] = 1
    p[70:72, 30:32, 30:32] = 1  # false alarm of 8 voxels -> stratum <0.1
    det = lesion_detection(p, t, spacing=(1.0, 1.0, 1.0))
    strata = {s.name: s for s in det.strata()}
    assert [strata[n].n_truth for n in ("<0.1", "0.1-0.5", "0.5-2", ">2")] == [1, 2, 1, 1]
    assert [strata[n].n_hit for n in ("<0.1", "0.1-0.5", "0.5-2", ">2")] == [0, 1, 1, 1]
    assert strata["0.1-0.5"].detection_rate.value == 0.5
    assert strata["<0.1"].n_false_alarm == 1
    assert strata["0.5-2"].dice_mean.value == 1.0
    assert strata[">2"].dice_mean.value == pytest.approx(2 * 1372 / (2744 + 1372))
    assert strata["0.1-0.5"].dice_mean.value == pytest.approx(0.5)  # mean of 1 and 0
    # strata are in mL, so they follow the spacing: with 2 mm^3 voxels the 1000-voxel lesion
    # is 2.0 mL (lower edge inclusive -> ">2") and the 27-voxel one 0.054 mL
    det2 = lesion_detection(p, t, spacing=(2.0, 1.0, 1.0))
    assert {s.name: s.n_truth for s in det2.strata()} == {
        "<0.1": 1, "0.1-0.5": 2, "0.5-2": 0, ">2": 2}


def test_lesion_dice_uses_the_lesions_own_neighbourhood():
    t = np.zeros((40, 30, 30), np.uint8)
    t[10:15, 10:15, 10:15] = 1  # lesion A
    t[18:23, 10:15, 10:15] = 1  # lesion B, 3 voxels (3 mm) away from A
    p = t.copy()  # perfect prediction of both
    det = lesion_detection(p, t, spacing=(1, 1, 1), neighbourhood_mm=5.0)
    assert [x.dice for x in det.truth] == [1.0, 1.0]  # B's prediction does not count against A
    # a 1-voxel halo of over-segmentation around a lone lesion: 5^3 inside 7^3
    t2 = np.zeros((30, 30, 30), np.uint8)
    p2 = np.zeros_like(t2)
    t2[10:15, 10:15, 10:15] = 1
    p2[9:16, 9:16, 9:16] = 1
    det2 = lesion_detection(p2, t2, spacing=(1, 1, 1))
    assert det2.truth[0].dice == pytest.approx(2 * 125 / (125 + 343))


# ============================================================================ multi-label
def test_per_label_metrics_with_names_and_absent_label(rng):
    t = np.zeros((20, 20, 20), np.uint8)
    t[2:10, 2:10, 2:10] = 1
    t[12:18, 12:18, 12:18] = 2
    p = t.copy()
    p[2:4, 2:10, 2:10] = 0  # label 1 loses 2 of 8 slabs
    aff = random_orientation_affine(rng, spacing=SPACING)
    names = {1: "femur", 2: "tibia", 3: "patella"}
    res = evaluate_labels(LabelVolume(p, aff, names), LabelVolume(t, aff, names), labels=[1, 2, 3])
    by = {r.name: r for r in res}
    assert by["femur"].metrics["dice"].value == pytest.approx(2 * 384 / (384 + 512))
    assert by["tibia"].metrics["dice"].value == 1.0 and by["tibia"].metrics["hd95"].value == 0.0
    assert math.isnan(by["patella"].metrics["dice"].value)
    assert by["patella"].metrics["dice"].reason == "both masks are empty"
    with pytest.raises(LabelError):
        evaluate_labels(p, t, labels=[0], spacing=SPACING)
    # default labels = those present
    assert [r.label for r in evaluate_labels(p, t, spacing=SPACING)] == [1, 2]


# ============================================================================ CLI
def _write_pair(tmp_path, rng, *, schema_names=True):
    t = np.zeros((24, 20, 18), np.uint8)
    t[2:10, 2:10, 2:10] = 1
    t[12:20, 10:18, 8:16] = 2
    t[14:16, 3:5, 3:5] = 11
    p = t.copy()
    p[2:4] = np.where(p[2:4] == 1, 0, p[2:4])
    aff = random_orientation_affine(rng, spacing=SPACING)
    names = {1: "femur", 2: "tibia", 11: "joint_effusion"}
    write(LabelVolume(p, aff, names, schema="knee"), tmp_path / "pred.nii.gz")
    write(LabelVolume(t, aff, names, schema="knee"), tmp_path / "truth.nii.gz")
    return p, t


def test_cli_evaluate_writes_versioned_json(tmp_path, rng):
    p, t = _write_pair(tmp_path, rng)
    out = tmp_path / "eval.json"
    rc = main(["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "truth.nii.gz"),
               "--json", str(out), "--schema", "knee", "--lesions"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == EVALUATION_SCHEMA
    assert [x["label"] for x in doc["labels"]] == list(range(1, 18))
    femur = doc["labels"][0]
    assert femur["name"] == "femur"
    assert femur["metrics"]["dice"] == {"value": pytest.approx(2 * 384 / 896), "unit": "1"}
    assert femur["metrics"]["hd95"]["unit"] == "mm"
    assert femur["lesions"]["n_truth"]["value"] == 1
    patella = doc["labels"][2]
    assert patella["metrics"]["dice"]["value"] is None
    assert patella["metrics"]["dice"]["reason"] == "both masks are empty"
    assert any("patella" in w for w in doc["warnings"])
    assert doc["summary"]["mean_dice"]["n_labels"] == 3

    out2 = tmp_path / "eval2.json"
    assert main(["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "truth.nii.gz"),
                 "--json", str(out2), "--labels", "1,2"]) == 0
    doc2 = json.loads(out2.read_text())
    assert [x["name"] for x in doc2["labels"]] == ["femur", "tibia"]  # names from the sidecar


def test_cli_evaluate_bad_input_exit_2(tmp_path, rng, capsys):
    _write_pair(tmp_path, rng)
    other = LabelVolume(np.zeros((5, 5, 5), np.uint8), np.eye(4))
    write(other, tmp_path / "small.nii.gz")
    out = tmp_path / "eval.json"
    rc = main(["evaluate", str(tmp_path / "small.nii.gz"), str(tmp_path / "truth.nii.gz"),
               "--json", str(out)])
    assert rc == 2 and not out.exists()
    assert "different grids" in capsys.readouterr().err
    bad = LabelVolume(np.full((5, 5, 5), 42, np.uint8), np.eye(4))
    write(bad, tmp_path / "bad.nii.gz")
    rc = main(["evaluate", str(tmp_path / "bad.nii.gz"), str(tmp_path / "bad.nii.gz"),
               "--json", str(out), "--schema", "knee"])
    assert rc == 2 and not out.exists()
    assert "42" in capsys.readouterr().err
    rc = main(["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "truth.nii.gz"),
               "--json", str(out), "--labels", "a,b"])
    assert rc == 2
