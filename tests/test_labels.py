"""Label schemas and the mapping tables from every data source."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mskmri import labels as L
from mskmri.errors import LabelError


def test_knee_schema_matches_architecture():
    assert list(L.KNEE) == list(range(1, 18))
    assert L.KNEE[1] == "femur" and L.KNEE[11] == "joint_effusion" and L.KNEE[17] == "infrapatellar_fat_pad"
    assert L.knee_id("medial_meniscus") == 9


def test_spine_schema_ids_and_names():
    assert L.VERTEBRAE[1] == "C1" and L.VERTEBRAE[7] == "C7"
    assert L.VERTEBRAE[8] == "T1" and L.VERTEBRAE[19] == "T12"
    assert L.VERTEBRAE[20] == "L1" and L.VERTEBRAE[25] == "L6" and L.VERTEBRAE[26] == "sacrum"
    assert L.disc_name(20) == "L1-L2"
    assert L.disc_name(24) == "L5-S1"
    assert L.disc_name(7) == "C7-T1"
    assert L.spine_label_name(L.DISC_OFFSET + 22) == "disc_L3-L4"
    assert L.spine_label_name(1002) == "V1002"
    assert L.spine_label_name(201) == "spinal_cord"
    assert L.spine_label_name(1100) == "disc_V1000-V1001"
    assert L.is_disc(1100) and not L.is_vertebra(1100) and L.is_vertebra(1099)
    with pytest.raises(LabelError):
        L.spine_label_name(150)


def test_did_you_mean():
    with pytest.raises(LabelError, match="did you mean 'femur'"):
        L.knee_id("femurr")
    with pytest.raises(LabelError, match="did you mean 'pymskt'"):
        L.get_source("pymsk")


@pytest.mark.parametrize("name", sorted(L.SOURCES))
def test_every_source_maps_into_its_schema(name):
    src = L.SOURCES[name]
    schema_ids = set(L.SCHEMAS[src.schema]) | {0}
    for value, target in src.table.items():
        assert value in src.source_names, f"{name}: value {value} has no source name"
        ok = target in schema_ids or target >= L.ORDINAL_VERTEBRA_START
        assert ok, f"{name}: {value} -> {target} is not a {src.schema} id"
    for v in src.lesion_values:
        assert v in src.table


def test_apply_maps_and_refuses_unknown_values():
    arr = np.array([[[0, 5, 9, 10]]], dtype=np.uint8)
    out = L.PYMSKT.apply(arr)
    assert out.tolist() == [[[0, L.knee_id("femur"), L.knee_id("lateral_meniscus"),
                              L.knee_id("medial_meniscus")]]]
    with pytest.raises(LabelError, match="does not define"):
        L.PYMSKT.apply(np.array([[[11]]]))


@pytest.mark.shared_data
def test_spl_table_agrees_with_its_colour_table(shared_data):
    ctbl = (shared_data / "knee/spl_atlas_labels/knee.ctbl").read_text().splitlines()
    names = {}
    for line in ctbl:
        m = re.match(r"^(\d+)\s+(\S+)", line)
        if m:
            names[int(m.group(1))] = m.group(2)
    for value, name in names.items():
        assert L.SPL_ATLAS.source_names[value] == name


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "source, relpath",
    [
        ("pymskt", "knee/pymskt_dess_labels/SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd"),
        ("spl_atlas", "knee/spl_atlas_labels/seg.nrrd"),
        ("cartimorph", "knee/cartimorph_template/CLAIR-Knee-103R_segmentation_64x128x128.nii.gz"),
        ("myosegmentum", "spine/myosegmentum_vertebral_bodies/exam01_gt.nii.gz"),
        ("ivd_discs", "spine/ivd_discs/exam11_gt.nii.gz"),
        ("verse", "spine/healthivert_genant_grades/0007_msk.nii.gz"),
    ],
)
def test_real_label_maps_hold_only_known_values(shared_data, source, relpath):
    from mskmri.io import read

    vol = read(shared_data / relpath)
    mapped = L.get_source(source).apply(vol.array)
    assert mapped.any()


@pytest.mark.shared_data
def test_all_oai_maps_hold_only_known_values(shared_data):
    import nibabel as nib

    files = sorted((shared_data / "knee/oai_bone_lesion_labels").glob("*.nii.gz"))
    assert len(files) == 56
    with_femoral_lesion = 0
    for f in files:
        values = set(np.unique(np.asanyarray(nib.load(f).dataobj)).tolist())
        assert values <= set(L.OAI_LESION.table) | {0}, f.name
        with_femoral_lesion += 7 in values
    assert with_femoral_lesion == 23  # as the data README states
