"""Knee measurements and the measurement contract (mskmri/measurements/1)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from conftest import random_orientation_affine

from mskmri.errors import GeometryError, LabelError
from mskmri.labels import KNEE, KNEE_ID, OAI_LESION
from mskmri.measure import ANATOMIES, MEASUREMENTS_SCHEMA, get_measurer
from mskmri.measure.base import (
    Measurement,
    MeasurementError,
    describe_input,
    measurements_document,
    read_measurements,
    write_measurements,
)
from mskmri.measure.knee import knee_volumes, lesion_volumes_by_bone, measure_knee
from mskmri.volume import LabelVolume

SPACING = (0.7, 0.4, 0.5)  # mm; voxel volume 0.14 mm^3

#: Every orientation a permutation and flips of three axes can give (48).
ALL_CODES = [
    "".join(axes[i][f] for i, f in enumerate(flips))
    for axes in itertools.permutations(("RL", "AP", "SI"))
    for flips in itertools.product((0, 1), repeat=3)
]


def _phantom(rng: np.random.Generator) -> LabelVolume:
    """Boxes of several knee labels in a random storage orientation."""
    a = np.zeros((30, 40, 36), np.uint8)
    a[2:12, 3:23, 4:34] = KNEE_ID["femur"]  # 10 x 20 x 30 = 6000 voxels
    a[14:26, 5:35, 6:30] = KNEE_ID["tibia"]  # 12 x 30 x 24 = 8640
    a[12:14, 5:20, 6:20] = KNEE_ID["femoral_cartilage"]  # 2 x 15 x 14 = 420
    a[27:29, 1:9, 1:9] = KNEE_ID["joint_effusion"]  # 2 x 8 x 8 = 128
    a[0:2, 30:40, 0:10] = KNEE_ID["muscle"]  # 2 x 10 x 10 = 200
    return LabelVolume(a, random_orientation_affine(rng, spacing=SPACING), dict(KNEE),
                       schema="knee")


EXPECTED_VOXELS = {"femur": 6000, "tibia": 8640, "femoral_cartilage": 420,
                   "joint_effusion": 128, "muscle": 200}


def test_all_codes_are_48_distinct_orientations():
    assert len(set(ALL_CODES)) == 48


def test_volumes_are_voxel_count_times_voxel_volume(rng):
    seg = _phantom(rng)
    ms = knee_volumes(seg)
    got = {m.structure: m for m in ms}
    assert list(got) == ["femur", "tibia", "femoral_cartilage", "joint_effusion", "muscle"]
    for name, n in EXPECTED_VOXELS.items():
        assert got[name].value == pytest.approx(n * 0.14 / 1000, rel=1e-12)
        assert got[name].unit == "mL"
        assert got[name].method == "voxel count x voxel volume"
        assert got[name].extra["voxels"] == n
    assert got["femur"].value == pytest.approx(0.84)


def test_cylinder_phantom_matches_analytic_volume():
    # a cylinder of radius 20 mm and height 30 mm on a 0.5 x 0.5 x 1 mm grid: pi r^2 h
    sp = (0.5, 0.5, 1.0)
    i, j, k = np.mgrid[:100, :100, :40]
    x, y = (i - 49.5) * sp[0], (j - 49.5) * sp[1]
    a = ((x**2 + y**2 <= 20.0**2) & (k >= 5) & (k < 35)).astype(np.uint8)
    seg = LabelVolume(a, np.diag([*sp, 1.0]), dict(KNEE), schema="knee")
    vol = knee_volumes(seg)[0]
    assert vol.structure == "femur"
    assert vol.value == pytest.approx(math.pi * 20.0**2 * 30.0 / 1000.0, rel=0.01)


def test_same_volumes_in_every_storage_orientation(rng):
    seg = _phantom(rng)
    ref = {m.structure: m.value for m in knee_volumes(seg)}
    arrays_differ = 0
    for codes in ALL_CODES:
        other = seg.reorient(codes)
        assert "".join(other.orientation) == codes
        arrays_differ += other.array.shape != seg.array.shape or not np.array_equal(
            other.array, seg.array)
        # the same world point holds the same label
        w = seg.voxel_to_world([[5, 10, 15]])
        ijk = np.round(other.world_to_voxel(w)[0]).astype(int)
        assert other.array[tuple(ijk)] == seg.array[5, 10, 15]
        got = {m.structure: m.value for m in knee_volumes(other)}
        assert set(got) == set(ref)
        for name, v in ref.items():
            assert got[name] == pytest.approx(v, rel=1e-3)
            assert got[name] == pytest.approx(
                np.count_nonzero(other.array == KNEE_ID[name]) * other.voxel_volume_mm3 / 1000,
                rel=1e-12)
    assert arrays_differ >= 47  # the test really changes the storage


def test_refuses_missing_geometry_and_unknown_labels(rng):
    seg = _phantom(rng)
    nogeo = LabelVolume(seg.array, np.eye(4), dict(KNEE), geometry_known=False)
    with pytest.raises(GeometryError, match="no voxel spacing"):
        knee_volumes(nogeo)
    bad = seg.array.copy()
    bad[0, 0, 0] = 99
    with pytest.raises(LabelError, match=r"\[99\]"):
        measure_knee(LabelVolume(bad, seg.affine, dict(KNEE), schema="knee"))


def test_lesion_volumes_by_bone(rng, caplog):
    seg = _phantom(rng)
    les = np.zeros(seg.shape, np.uint8)
    les[4:6, 5:9, 10:13] = 1  # inside the femur: 2 x 4 x 3 = 24 voxels
    les[8:10, 15:17, 20:22] = 1  # a second femoral lesion: 8 voxels
    les[20:23, 10:12, 10:12] = 1  # tibia: 12 voxels
    les[29, 20, 20] = 1  # outside every bone: 1 voxel
    lv = LabelVolume(les, seg.affine, {1: "bone_marrow_lesion"}, schema="lesion")
    ms, warnings = lesion_volumes_by_bone(seg, lv)
    by = {m.key: m for m in ms}
    vox_ml = 0.14 / 1000
    assert by["lesion_volume.femur"].value == pytest.approx(32 * vox_ml)
    assert by["lesion_count.femur"].value == 2 and by["lesion_count.femur"].unit == "count"
    assert by["lesion_volume.tibia"].value == pytest.approx(12 * vox_ml)
    assert by["lesion_count.tibia"].value == 1
    assert by["lesion_volume"].value == pytest.approx(45 * vox_ml)  # total incl. unassigned
    assert "patella" not in {m.structure for m in ms}  # no patella in this map
    assert len(warnings) == 1 and "overlap no bone" in warnings[0]
    # through measure_knee, same numbers after the volumes
    all_ms = measure_knee(seg, lesions=lv)
    assert [m.name for m in all_ms][:5] == ["volume"] * 5
    assert {m.key for m in all_ms} >= set(by)
    with pytest.raises(GeometryError, match="lesion mask"):
        lesion_volumes_by_bone(seg, lv.reorient("LPI") if "".join(lv.orientation) != "LPI"
                               else lv.reorient("RAS"))
    bad = LabelVolume(les * 3, seg.affine, {}, schema="lesion")
    with pytest.raises(LabelError, match="lesion schema"):
        lesion_volumes_by_bone(seg, bad)


def test_measurement_contract():
    m = Measurement("volume", 267.14, "mL", structure="femur", method="voxel count x voxel volume")
    assert m.to_dict() == {"name": "volume", "structure": "femur", "value": 267.14, "unit": "mL",
                           "method": "voxel count x voxel volume"}
    assert m.key == "volume.femur"
    assert Measurement.from_dict(m.to_dict()) == m
    with pytest.raises(MeasurementError, match="no unit"):
        Measurement("volume", 1.0, "")
    with pytest.raises(MeasurementError, match="without a reason"):
        Measurement("thickness_mean", float("nan"), "mm")
    missing = Measurement("thickness_mean", float("nan"), "mm", structure="patellar_cartilage",
                          extra={"reason": "no patellar cartilage"})
    d = missing.to_dict()
    assert d["value"] is None and d["reason"] == "no patellar cartilage"
    assert Measurement.from_dict(d).is_missing
    with pytest.raises(MeasurementError, match="twice"):
        measurements_document([m, m], input_info={}, tool_version="0")
    with pytest.raises(AttributeError):
        m.value = 3.0  # type: ignore[misc]  # frozen


def test_document_layout_and_atomic_write(tmp_path, rng):
    seg = _phantom(rng)
    doc = measurements_document(measure_knee(seg), input_info=describe_input(seg, "seg.nii.gz"),
                                tool_version="9.9", warnings=["w"])
    assert list(doc) == ["schema", "tool", "input", "measurements", "warnings"]
    assert doc["schema"] == MEASUREMENTS_SCHEMA == "mskmri/measurements/1"
    inp = doc["input"]
    assert inp["path"] == "seg.nii.gz" and inp["shape"] == [30, 40, 36]
    assert sorted(inp["spacing_mm"]) == sorted(SPACING)
    assert inp["voxel_volume_mm3"] == pytest.approx(0.14)
    assert len(inp["orientation"]) == 3
    assert all(isinstance(x["unit"], str) and x["unit"] for x in doc["measurements"])
    out = tmp_path / "sub" / "m.json"
    write_measurements(out, doc)
    assert read_measurements(out) == json.loads(json.dumps(doc))
    assert [p.name for p in out.parent.iterdir()] == ["m.json"]  # no temporary left
    with pytest.raises(MeasurementError):
        write_measurements(tmp_path / "x.json", {"schema": "other"})


def test_registry_has_knee_and_suggests():
    assert "knee" in ANATOMIES
    assert callable(get_measurer("knee"))
    with pytest.raises(Exception, match="did you mean 'knee'"):
        get_measurer("kne")


@pytest.mark.shared_data
def test_real_oai_label_map_volumes(shared_data):
    from mskmri.io import read

    path = sorted((shared_data / "knee" / "oai_bone_lesion_labels").glob("*.nii.gz"))[0]
    src = read(path)
    arr = OAI_LESION.apply(np.asarray(src.array))
    seg = LabelVolume(arr, src.affine, dict(KNEE), schema="knee", meta=src.meta)
    ms = {m.structure: m.value for m in knee_volumes(seg)}
    # OAI DESS field of view: distal femur and proximal tibia, tens to hundreds of mL
    # (first map: femur 152.5, tibia 97.3, patella 14.0, femoral cartilage 10.5 mL)
    assert 80 < ms["femur"] < 400 and 40 < ms["tibia"] < 250 and 5 < ms["patella"] < 40
    assert 3 < ms["femoral_cartilage"] < 20
    assert seg.voxel_volume_mm3 == pytest.approx(0.7 * 0.3646 * 0.3646, rel=1e-3)
    total = sum(ms.values())
    assert total == pytest.approx(np.count_nonzero(arr) * seg.voxel_volume_mm3 / 1000, rel=1e-12)
    other = {m.structure: m.value for m in knee_volumes(seg.reorient("PIL"))}
    for k, v in ms.items():
        assert other[k] == pytest.approx(v, rel=1e-3)
