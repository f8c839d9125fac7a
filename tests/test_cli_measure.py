"""`mskmri measure knee` end to end: files in, versioned JSON out, bad input -> exit 2."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import random_orientation_affine

from mskmri.cli import main
from mskmri.io import write
from mskmri.labels import KNEE, KNEE_ID
from mskmri.volume import LabelVolume, Volume

SPACING = (0.7, 0.4, 0.5)


def _seg(rng: np.random.Generator) -> LabelVolume:
    a = np.zeros((24, 30, 28), np.uint8)
    a[2:12, 3:23, 4:24] = KNEE_ID["femur"]  # 4000 voxels
    a[13:22, 5:25, 6:26] = KNEE_ID["tibia"]  # 3600
    a[12, 5:20, 6:20] = KNEE_ID["femoral_cartilage"]  # 210
    a[22:24, 1:9, 1:9] = KNEE_ID["joint_effusion"]  # 128
    return LabelVolume(a, random_orientation_affine(rng, spacing=SPACING), dict(KNEE),
                       schema="knee")


def _volumes(path) -> dict[str, float]:
    doc = json.loads(path.read_text())
    assert doc["schema"] == "mskmri/measurements/1"
    return {m["structure"]: m["value"] for m in doc["measurements"] if m["name"] == "volume"}


def test_measure_knee_writes_the_document(tmp_path, rng):
    seg = _seg(rng)
    write(seg, tmp_path / "seg.nii.gz")
    out = tmp_path / "m.json"
    assert main(["measure", "knee", str(tmp_path / "seg.nii.gz"), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["input"]["path"].endswith("seg.nii.gz")
    assert doc["input"]["voxel_volume_mm3"] == pytest.approx(0.14)
    assert doc["tool"]["name"] == "mskmri"
    assert all(m["unit"] for m in doc["measurements"])
    vols = _volumes(out)
    assert vols == pytest.approx({"femur": 4000 * 1.4e-4, "tibia": 3600 * 1.4e-4,
                                  "femoral_cartilage": 210 * 1.4e-4,
                                  "joint_effusion": 128 * 1.4e-4}, rel=1e-6)  # float32 affine
    assert doc["warnings"] == []


@pytest.mark.parametrize("codes", ["LPI", "SAR", "IRP", "ALS"])
def test_same_volumes_from_a_file_in_another_orientation(tmp_path, rng, codes):
    seg = _seg(rng)
    write(seg, tmp_path / "a.nii.gz")
    write(seg.reorient(codes), tmp_path / "b.nrrd")  # another format too
    for name in ("a.nii.gz", "b.nrrd"):
        assert main(["measure", "knee", str(tmp_path / name), "--json",
                     str(tmp_path / f"{name}.json")]) == 0
    a = _volumes(tmp_path / "a.nii.gz.json")
    b = _volumes(tmp_path / "b.nrrd.json")
    assert a.keys() == b.keys()
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-3)
        assert b[k] == pytest.approx(np.count_nonzero(seg.array == KNEE_ID[k]) * 0.14e-3,
                                     rel=1e-6)


def test_lesions_and_image_options(tmp_path, rng):
    seg = _seg(rng)
    les = np.zeros(seg.shape, np.uint8)
    les[4:6, 5:8, 6:9] = 1  # 18 voxels in the femur
    write(seg, tmp_path / "seg.nii.gz")
    write(LabelVolume(les, seg.affine, {1: "bone_marrow_lesion"}, schema="lesion"),
          tmp_path / "les.nii.gz")
    write(Volume(np.zeros(seg.shape, np.float32), seg.affine), tmp_path / "img.nii.gz")
    out = tmp_path / "m.json"
    assert main(["measure", "knee", str(tmp_path / "seg.nii.gz"), "--lesions",
                 str(tmp_path / "les.nii.gz"), "--image", str(tmp_path / "img.nii.gz"),
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    by = {(m["name"], m.get("structure")): m for m in doc["measurements"]}
    assert by[("lesion_volume", "femur")]["value"] == pytest.approx(18 * 1.4e-4)
    assert by[("lesion_count", "femur")] == {
        "name": "lesion_count", "structure": "femur", "value": 0 + 1, "unit": "count",
        "method": by[("lesion_count", "femur")]["method"]}
    assert by[("lesion_volume", "tibia")]["value"] == 0
    assert doc["input"]["lesions"].endswith("les.nii.gz")


def _assert_exit_2(capsys, argv, out, *needles):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not out.exists()
    assert err.count("\n") == 1 and "Traceback" not in err
    for n in needles:
        assert n in err, err


def test_no_geometry_exits_2(tmp_path, rng, capsys):
    seg = _seg(rng)
    img = nib.Nifti1Image(seg.array, None)  # no affine: sform and qform codes stay 0
    nib.save(img, str(tmp_path / "nogeo.nii.gz"))
    hdr = nib.load(str(tmp_path / "nogeo.nii.gz")).header
    assert int(hdr["sform_code"]) == 0 and int(hdr["qform_code"]) == 0
    out = tmp_path / "m.json"
    _assert_exit_2(capsys, ["measure", "knee", str(tmp_path / "nogeo.nii.gz"), "--json",
                            str(out)], out, "no voxel spacing")


def test_unknown_labels_exit_2(tmp_path, rng, capsys):
    seg = _seg(rng)
    arr = seg.array.copy()
    arr[0, 0, 0] = 40
    write(LabelVolume(arr, seg.affine, {}, schema="custom"), tmp_path / "bad.nii.gz")
    out = tmp_path / "m.json"
    _assert_exit_2(capsys, ["measure", "knee", str(tmp_path / "bad.nii.gz"), "--json",
                            str(out)], out, "[40]", "knee schema")


def test_wrong_grid_and_missing_file_exit_2(tmp_path, rng, capsys):
    seg = _seg(rng)
    write(seg, tmp_path / "seg.nii.gz")
    write(Volume(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "img.nii.gz")
    out = tmp_path / "m.json"
    _assert_exit_2(capsys, ["measure", "knee", str(tmp_path / "seg.nii.gz"), "--image",
                            str(tmp_path / "img.nii.gz"), "--json", str(out)], out, "geometry")
    _assert_exit_2(capsys, ["measure", "knee", str(tmp_path / "nope.nii.gz"), "--json",
                            str(out)], out, "does not exist")
    _assert_exit_2(capsys, ["measure", "spine-ish", str(tmp_path / "seg.nii.gz"), "--json",
                            str(out)], out, "invalid choice")


def test_measure_knee_refuses_a_2d_label_map(tmp_path, capsys):
    path = tmp_path / "slice.nii.gz"
    arr = np.zeros((20, 20), np.uint8)
    arr[5:15, 5:10] = 1
    arr[5:15, 10:15] = 2
    nib.save(nib.Nifti1Image(arr, np.diag([0.5, 0.5, 3.0, 1.0])), path)
    out = tmp_path / "m.json"
    assert main(["measure", "knee", str(path), "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2-D" in err[0]
    assert not out.exists()
