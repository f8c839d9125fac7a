"""Anatomical post-processing of knee label maps (:func:`mskmri.segment.knee.postprocess_knee_labels`).

Known answers on tiny synthetic label maps at 0.5 mm isotropic (one voxel = 1.25e-4 mL, so
the default 0.05 mL minimum is exactly 400 voxels): detached bone fragments go, each to the
label around it; small specks of thin structures go; cartilage pieces that do not lie on
their own bone go; main bodies, other classes and the geometry stay as they were. Tests of
the first two rules on plates floating free of any bone switch the third off
(``cartilage_bone={}``).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from mskmri.errors import GeometryError
from mskmri.labels import KNEE, KNEE_ID
from mskmri.segment import knee as K
from mskmri.volume import LabelVolume

#: Voxel edge of the phantoms, mm, and the resulting voxel volume, mL.
VOXEL_MM = 0.5
VOXEL_ML = VOXEL_MM**3 / 1000.0
FEMUR, TIBIA, PATELLA = KNEE_ID["femur"], KNEE_ID["tibia"], KNEE_ID["patella"]
MUSCLE, FCART = KNEE_ID["muscle"], KNEE_ID["femoral_cartilage"]
MENISCUS = KNEE_ID["medial_meniscus"]
#: Switches off the passes that need a whole joint (compartments, menisci between the bones),
#: for tests of the other passes on phantoms without one.
NO_JOINT = {"compartments": False, "meniscus_contact_mm": None}


def _volume(arr: np.ndarray, **kw: object) -> LabelVolume:
    aff = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    aff[:3, 3] = (-10.0, 4.0, 2.5)
    return LabelVolume(arr.astype(np.uint8), aff, dict(KNEE), schema="knee", **kw)  # type: ignore[arg-type]


def _bone_phantom() -> tuple[np.ndarray, dict[str, tuple[slice, slice, slice]]]:
    """Femur, tibia, patella and muscle blocks; three detached femur fragments.

    Returns the map and the boxes of the fragments: one in muscle, one in air, one inside
    the tibia.
    """
    a = np.zeros((40, 40, 40), np.uint8)
    a[5:25, 5:25, 5:25] = FEMUR                       # main femur, 8000 voxels
    a[28:38, 5:35, 5:35] = MUSCLE
    a[5:25, 28:38, 5:25] = TIBIA
    a[5:12, 5:12, 28:36] = PATELLA                    # one component: untouched
    frags: dict[str, tuple[slice, slice, slice]] = {"in_muscle": (slice(31, 34), slice(10, 13), slice(10, 13)),    # 27 voxels
             "in_air": (slice(30, 32), slice(37, 39), slice(37, 39)),       # 8 voxels
             "in_tibia": (slice(10, 12), slice(31, 33), slice(10, 12))}     # 8 voxels
    for box in frags.values():
        a[box] = FEMUR
    return a, frags


def test_each_bone_keeps_its_largest_component_and_fragments_take_their_surroundings() -> None:
    arr, frags = _bone_phantom()
    out, rec = K.postprocess_knee_labels(_volume(arr))
    res = out.array
    assert res[frags["in_muscle"]].tolist() == np.full((3, 3, 3), MUSCLE).tolist()
    assert (res[frags["in_air"]] == 0).all()
    assert (res[frags["in_tibia"]] == TIBIA).all()
    # the femur is its main block only; every other voxel is unchanged
    np.testing.assert_array_equal(np.argwhere(res == FEMUR).min(0), [5, 5, 5])
    np.testing.assert_array_equal(np.argwhere(res == FEMUR).max(0), [24, 24, 24])
    assert (res == FEMUR).sum() == 20**3
    changed = res != arr
    frag_mask = np.zeros(arr.shape, bool)
    for box in frags.values():
        frag_mask[box] = True
    np.testing.assert_array_equal(changed, frag_mask)
    femur = rec["removed"]["femur"]
    assert femur == {"components": 4, "components_removed": 3, "voxels_removed": 43,
                     "ml_removed": round(43 * VOXEL_ML, 4),
                     "ml_before": round((8000 + 43) * VOXEL_ML, 4)}
    assert rec["removed"]["patella"]["components_removed"] == 0
    assert rec["removed"]["tibia"]["voxels_removed"] == 0
    assert "muscle" not in rec["removed"]     # muscle is not a checked class
    json.dumps(rec)                           # the record goes to the sidecar as is


def test_thin_structures_drop_components_below_the_minimum_volume_only() -> None:
    a = np.zeros((40, 40, 40), np.uint8)
    a[20:35, 5:35, 5:35] = FEMUR
    a[10:15, 5:25, 5:25] = FCART            # main plate: 2000 voxels = 0.25 mL, kept
    a[2:10, 30:37, 30:37] = FCART           # 392 voxels = 0.049 mL < 0.05 mL: dropped
    a[2:10, 2:7, 30:40] = FCART             # exactly 400 voxels = 0.05 mL: kept
    a[25:27, 20:22, 20:22] = FCART          # 8 voxels inside the femur: becomes femur
    a[5:7, 30:32, 3:5] = MENISCUS           # 8 voxels (0.001 mL), the whole meniscus
    out, rec = K.postprocess_knee_labels(_volume(a), cartilage_bone={}, **NO_JOINT)
    res = out.array
    assert (res[10:15, 5:25, 5:25] == FCART).all()
    assert (res[2:10, 2:7, 30:40] == FCART).all()
    assert (res[2:10, 30:37, 30:37] == 0).all()
    assert (res[25:27, 20:22, 20:22] == FEMUR).all()
    assert (res == FCART).sum() == 2000 + 400
    assert rec["removed"]["femoral_cartilage"] == {
        "components": 4, "components_removed": 2, "voxels_removed": 400,
        "ml_removed": round(400 * VOXEL_ML, 4), "ml_before": round(2800 * VOXEL_ML, 4)}
    # menisci: counted, but no minimum by default (K.MIN_MENISCUS_ML = 0)
    assert (res[5:7, 30:32, 3:5] == MENISCUS).all()
    assert rec["removed"]["medial_meniscus"] == {
        "components": 1, "components_removed": 0, "voxels_removed": 0, "ml_removed": 0.0,
        "ml_before": round(8 * VOXEL_ML, 4)}
    assert K.postprocess_warnings(rec) == []
    # minima given by the caller: the 0.05 mL cartilage piece and the whole meniscus go
    out2, rec2 = K.postprocess_knee_labels(
        _volume(a), min_component_ml={"femoral_cartilage": 0.1, "medial_meniscus": 0.002},
        cartilage_bone={}, **NO_JOINT)
    assert (out2.array == FCART).sum() == 2000
    assert not (out2.array == MENISCUS).any() and (out2.array[5:7, 30:32, 3:5] == 0).all()
    warnings = K.postprocess_warnings(rec2)
    assert len(warnings) == 1
    assert warnings[0].startswith("medial_meniscus:") and "absent" in warnings[0]
    # no minimum for a class: not checked, not in the record
    out3, rec3 = K.postprocess_knee_labels(_volume(a), min_component_ml={"femoral_cartilage": 0.1},
                                           cartilage_bone={}, **NO_JOINT)
    assert (out3.array == MENISCUS).sum() == 8 and "medial_meniscus" not in rec3["removed"]


def test_bones_are_face_connected_and_thin_structures_26_connected_by_default() -> None:
    a = np.zeros((24, 24, 24), np.uint8)
    a[1:5, 1:5, 1:5] = FEMUR
    a[5:7, 5:7, 5:7] = FEMUR        # touches the first block at one corner only
    # two 250-voxel (0.031 mL) halves of a cartilage plate touching at one corner: one
    # 0.0625 mL component with 26-connectivity (kept), two too small with 6 (dropped)
    a[10:15, 10:15, 0:10] = FCART
    a[15:20, 15:20, 10:20] = FCART
    out, rec = K.postprocess_knee_labels(_volume(a), cartilage_bone={})
    assert (out.array[5:7, 5:7, 5:7] == 0).all() and (out.array[1:5, 1:5, 1:5] == FEMUR).all()
    assert rec["removed"]["femur"]["voxels_removed"] == 8
    assert (out.array == FCART).sum() == 500
    assert rec["connectivity"] == {"keep_largest": 6, "min_component": 26}
    out, rec = K.postprocess_knee_labels(_volume(a), bone_connectivity=26, thin_connectivity=6,
                                       cartilage_bone={})
    assert (out.array == FEMUR).sum() == 64 + 8
    assert not (out.array == FCART).any()
    assert rec["removed"]["femoral_cartilage"]["components_removed"] == 2


def test_empty_maps_and_maps_without_checked_classes_are_returned_unchanged() -> None:
    zeros = np.zeros((6, 7, 8), np.uint8)
    out, rec = K.postprocess_knee_labels(_volume(zeros))
    np.testing.assert_array_equal(out.array, zeros)
    assert rec["removed"] == {}
    assert K.postprocess_warnings(rec) == []
    muscle = zeros.copy()
    muscle[1:3, 1:3, 1:3] = MUSCLE
    muscle[4:6, 4:6, 5:7] = MUSCLE          # two muscle pieces: muscle is not checked
    out, rec = K.postprocess_knee_labels(_volume(muscle))
    np.testing.assert_array_equal(out.array, muscle)
    assert rec["removed"] == {}
    # nothing to do at all when both rules are switched off
    arr, _ = _bone_phantom()
    out, rec = K.postprocess_knee_labels(_volume(arr), keep_largest=(), min_component_ml={})
    np.testing.assert_array_equal(out.array, arr)


def test_geometry_names_meta_and_the_input_are_kept() -> None:
    arr, _ = _bone_phantom()
    vol = _volume(arr, meta={"source": "phantom"})
    before = arr.copy()
    out, _ = K.postprocess_knee_labels(vol)
    assert isinstance(out, LabelVolume)
    assert out.shape == vol.shape and np.array_equal(out.affine, vol.affine)
    assert out.array.dtype == np.uint8 and out.labels == vol.labels and out.schema == "knee"
    assert out.meta["source"] == "phantom"
    np.testing.assert_array_equal(vol.array, before)     # the input is not modified


def test_the_step_is_stable_when_run_twice() -> None:
    arr, _ = _bone_phantom()
    arr[2:4, 30:32, 3:5] = FCART
    once, _ = K.postprocess_knee_labels(_volume(arr))
    twice, rec = K.postprocess_knee_labels(once)
    np.testing.assert_array_equal(twice.array, once.array)
    assert all(r["voxels_removed"] == 0 for r in rec["removed"].values())


def test_on_a_noisy_map_every_bone_is_one_piece_and_every_thin_component_big_enough() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(7)
    classes = np.array([0, FEMUR, TIBIA, PATELLA, FCART, MENISCUS, MUSCLE], np.uint8)
    a = classes[rng.integers(0, classes.size, (36, 36, 36))]      # salt and pepper
    a[2:18, 2:18, 2:18] = FEMUR
    a[20:34, 2:18, 2:18] = TIBIA
    a[18:20, 4:16, 4:16] = FCART                                  # 288 voxels: too small
    a[2:18, 20:34, 2:20] = FCART                                  # 4032 voxels: kept
    out, rec = K.postprocess_knee_labels(_volume(a))
    res = out.array
    for c in (FEMUR, TIBIA, PATELLA):
        assert ndimage.label(res == c)[1] == 1                    # face-connected: one piece
    min_vox = K.MIN_COMPONENT_ML["femoral_cartilage"] / VOXEL_ML
    sizes = np.bincount(ndimage.label(res == FCART, np.ones((3, 3, 3)))[0].ravel())[1:]
    assert sizes.min() >= min_vox and (res[2:18, 20:34, 2:20] == FCART).all()
    assert rec["removed"]["femur"]["components_removed"] > 100
    again, rec2 = K.postprocess_knee_labels(out)
    np.testing.assert_array_equal(again.array, res)
    assert all(r["voxels_removed"] == 0 for r in rec2["removed"].values())


def test_a_heavily_fragmented_bone_is_a_warning() -> None:
    a = np.zeros((30, 30, 30), np.uint8)
    a[2:12, 2:12, 2:12] = TIBIA                # 1000 voxels
    a[20:25, 20:25, 20:24] = TIBIA             # 100 voxels detached: 9.1 % > 5 %
    a[20:22, 2:4, 2:4] = FEMUR                 # a single femur: no warning
    _, rec = K.postprocess_knee_labels(_volume(a))
    warnings = K.postprocess_warnings(rec)
    assert len(warnings) == 1 and warnings[0].startswith("tibia:")
    assert "9.1 %" in warnings[0] and "fragmented" in warnings[0]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"keep_largest": ("femurr",)}, "unknown knee class"),
    ({"min_component_ml": {"acl": 0.05}}, "unknown knee class"),
    ({"min_component_ml": {"patellar_tendon": -1.0}}, ">= 0 mL"),
    ({"bone_connectivity": 4}, "6, 18 or 26"),
    ({"thin_connectivity": 8}, "6, 18 or 26"),
    ({"min_component_ml": {"femur": 1.0}}, "one rule"),
])
def test_bad_parameters_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(K.KneeSegmentationError, match=match):
        K.postprocess_knee_labels(_volume(np.zeros((4, 4, 4))), **kwargs)  # type: ignore[arg-type]


def test_unknown_geometry_is_refused() -> None:
    vol = LabelVolume(np.ones((4, 4, 4), np.uint8), np.eye(4), dict(KNEE), schema="knee",
                      geometry_known=False)
    with pytest.raises(GeometryError, match="post-processing"):
        K.postprocess_knee_labels(vol)


def test_the_segmenter_applies_and_records_the_step() -> None:
    torch = pytest.importorskip("torch")
    from mskmri.volume import Volume

    class ThresholdNet(torch.nn.Module):  # type: ignore[name-defined,misc]
        """Logits: femur where the normalised input > 0.5, background elsewhere."""

        def forward(self, x: Any) -> Any:
            out = torch.full((x.shape[0], K.N_CLASSES, *x.shape[2:]), -10.0, dtype=x.dtype)
            out[:, 0] = 0.5 - x[:, 0]
            out[:, 1] = x[:, 0] - 0.5
            return out

    # a bright 40 mm cube and, 6 mm from it, a bright 4 mm cube: two "femur" components
    arr = np.full((40, 40, 40), 100.0, np.float32)
    arr[8:28, 8:28, 8:28] = 1000.0
    arr[31:33, 16:18, 16:18] = 1000.0
    image = Volume(arr, np.diag([2.0, 2.0, 2.0, 1.0]))
    raw = K.KneeSegmenter(ThresholdNet(), ThresholdNet(), precision="fp32", backend="torch",
                          keep_largest=(), min_component_ml={}).run(image)
    import cc3d

    assert cc3d.connected_components(raw.labels.array == FEMUR, connectivity=26).max() == 2
    res = K.KneeSegmenter(ThresholdNet(), ThresholdNet(), precision="fp32",
                          backend="torch").run(image)
    lab = res.labels.array
    assert cc3d.connected_components(lab == FEMUR, connectivity=26).max() == 1
    assert (lab[31:33, 16:18, 16:18] == 0).all()
    np.testing.assert_array_equal(lab[raw.labels.array != FEMUR], 0)
    femur = res.postprocess["removed"]["femur"]
    assert femur["components_removed"] == 1 and femur["voxels_removed"] == 8
    assert res.labels.meta["postprocess"] == res.postprocess
    assert res.postprocess["cartilage_on_bone"]["contact_mm"] == K.CARTILAGE_BONE_CONTACT_MM
    assert res.postprocess["cartilage_on_bone"]["removed"] == {}     # no cartilage here
    assert res.postprocess["menisci_in_joint"]["removed"] == {}
    assert res.postprocess["compartments"] == {"ml": 0.0, "applied": False, "reason": (
        "tibial plates + menisci 0.00 mL < 0.5 mL")}
    assert "postprocess_s" in res.timings_s


# ------------------------------------------------------------------ cartilage on its bone
TCART_M, TCART_L = KNEE_ID["medial_tibial_cartilage"], KNEE_ID["lateral_tibial_cartilage"]
#: Pieces of _plates_phantom that are off their bone (default 1.0 mm contact distance).
OFF_BONE = {"fcart_gap_1.5mm": (slice(2, 12), slice(33, 37), slice(20, 30)),
            "tcart_on_femur": (slice(2, 16), slice(30, 35), slice(32, 38)),
            "fcart_in_muscle": (slice(33, 37), slice(48, 53), slice(15, 35))}


def _plates_phantom() -> np.ndarray:
    """Femur and tibia blocks, cartilage plates on them and pieces off them (0.5 mm voxels).

    Every piece is >= 0.05 mL (400 voxels), so only the contact rule can remove it.
    """
    a = np.zeros((40, 60, 40), np.uint8)
    a[2:16, 2:30, 2:38] = FEMUR
    a[24:38, 2:30, 2:38] = TIBIA
    a[16:18, 5:25, 5:35] = FCART        # on the femur (face contact): 1200 voxels
    a[22:24, 5:25, 5:20] = TCART_M      # on the tibia: 600 voxels
    a[22:24, 5:25, 22:35] = TCART_L     # on the tibia: 520 voxels
    a[2:12, 32:36, 2:12] = FCART        # 400 voxels, y 30-31 empty: 1.0 mm gap, on the bone
    a[OFF_BONE["fcart_gap_1.5mm"]] = FCART    # 400 voxels, y 30-32 empty: 1.5 mm gap
    a[OFF_BONE["tcart_on_femur"]] = TCART_M   # 420 voxels on the femur, 4 mm from the tibia
    a[30:40, 40:60, 0:40] = MUSCLE
    a[OFF_BONE["fcart_in_muscle"]] = FCART    # 400 voxels inside the muscle
    return a


def test_cartilage_pieces_off_their_own_bone_are_removed_with_known_answers() -> None:
    from scipy import ndimage

    a = _plates_phantom()
    out, rec = K.postprocess_knee_labels(_volume(a), **NO_JOINT)
    res = out.array
    # kept: the plates on their bones and the piece 1.0 mm from the femur
    assert (res[16:18, 5:25, 5:35] == FCART).all() and (res[2:12, 32:36, 2:12] == FCART).all()
    assert (res[22:24, 5:25, 5:20] == TCART_M).all() and (res[22:24, 5:25, 22:35] == TCART_L).all()
    # removed, each to the majority label of its neighbours: air, air, muscle
    assert (res[OFF_BONE["fcart_gap_1.5mm"]] == 0).all()
    assert (res[OFF_BONE["tcart_on_femur"]] == 0).all()       # 98 femur vs 378 air neighbours
    assert (res[OFF_BONE["fcart_in_muscle"]] == MUSCLE).all()
    off = np.zeros(a.shape, bool)
    for box in OFF_BONE.values():
        off[box] = True
    np.testing.assert_array_equal(res != a, off)              # nothing else changed
    assert (res == FCART).sum() == 1200 + 400 and (res == TCART_M).sum() == 600
    for c in (FEMUR, TIBIA):
        assert ndimage.label(res == c)[1] == 1
    cob = rec["cartilage_on_bone"]
    assert cob["contact_mm"] == K.CARTILAGE_BONE_CONTACT_MM == 1.0
    assert cob["bone_of"] == K.CARTILAGE_BONE and cob["connectivity"] == 26
    assert cob["removed"]["femoral_cartilage"] == {
        "components": 4, "components_removed": 2, "voxels_removed": 800,
        "ml_removed": round(800 * VOXEL_ML, 4), "ml_before": round(2400 * VOXEL_ML, 4)}
    assert cob["removed"]["medial_tibial_cartilage"] == {
        "components": 2, "components_removed": 1, "voxels_removed": 420,
        "ml_removed": round(420 * VOXEL_ML, 4), "ml_before": round(1020 * VOXEL_ML, 4)}
    assert cob["removed"]["lateral_tibial_cartilage"]["components_removed"] == 0
    assert "patellar_cartilage" not in cob["removed"]          # absent: no entry
    assert K.postprocess_warnings(rec) == []
    json.dumps(rec)
    # without the rule every piece stays (they are all >= the minimum volume)
    plain, rec0 = K.postprocess_knee_labels(_volume(a), cartilage_bone={}, **NO_JOINT)
    np.testing.assert_array_equal(plain.array, a)
    assert "cartilage_on_bone" not in rec0
    # contact distance 0: only touching pieces stay (the one 1.0 mm away goes too)
    zero, _ = K.postprocess_knee_labels(_volume(a), cartilage_contact_mm=0.0, **NO_JOINT)
    assert (zero.array == FCART).sum() == 1200
    # 1.5 mm: the piece 1.5 mm away stays as well
    wide, _ = K.postprocess_knee_labels(_volume(a), cartilage_contact_mm=1.5, **NO_JOINT)
    assert (wide.array == FCART).sum() == 1200 + 400 + 400
    # the rule only: a map of these pieces is stable under a second run
    again, rec2 = K.postprocess_knee_labels(out, **NO_JOINT)
    np.testing.assert_array_equal(again.array, res)
    assert all(r["voxels_removed"] == 0 for r in rec2["cartilage_on_bone"]["removed"].values())


def test_contact_is_measured_in_mm_with_anisotropic_spacing() -> None:
    # 0.3 x 0.3 x 2.0 mm voxels. Face contact along the 2 mm axis is contact (gap 0, though
    # the voxel centres are 2 mm apart); one empty 2 mm slice between is a 2 mm gap; along
    # the 0.3 mm axis 3 empty voxels are a 0.9 mm gap, 4 voxels 1.2 mm.
    a = np.zeros((60, 30, 20), np.uint8)
    a[10:30, 5:25, 0:8] = FEMUR
    pieces = {"z_contact": (slice(12, 18), slice(8, 22), slice(8, 9)),
              "z_gap_2mm": (slice(22, 28), slice(8, 22), slice(9, 11)),
              "x_gap_0.9mm": (slice(33, 36), slice(8, 22), slice(0, 6)),
              "x_gap_1.2mm": (slice(34, 37), slice(1, 5), slice(0, 6))}
    for box in pieces.values():
        a[box] = FCART
    vol = LabelVolume(a, np.diag([0.3, 0.3, 2.0, 1.0]), dict(KNEE), schema="knee")  # type: ignore[arg-type]

    def kept(contact_mm: float) -> set[str]:
        out, _ = K.postprocess_knee_labels(vol, min_component_ml={},
                                           cartilage_contact_mm=contact_mm)
        for name, box in pieces.items():
            assert (out.array[box] == FCART).all() or (out.array[box] == 0).all(), name
        return {name for name, box in pieces.items() if (out.array[box] == FCART).all()}

    assert kept(1.0) == {"z_contact", "x_gap_0.9mm"}
    assert kept(0.0) == {"z_contact"}
    assert kept(1.19) == {"z_contact", "x_gap_0.9mm"}
    assert kept(1.2) == {"z_contact", "x_gap_0.9mm", "x_gap_1.2mm"}
    assert kept(2.0) == set(pieces)
    _, rec = K.postprocess_knee_labels(vol, min_component_ml={})
    r = rec["cartilage_on_bone"]["removed"]["femoral_cartilage"]
    assert r["components"] == 4 and r["components_removed"] == 2
    assert r["voxels_removed"] == 6 * 14 * 2 + 3 * 4 * 6


def test_a_plate_whose_bone_is_absent_is_removed_and_warned() -> None:
    a = np.zeros((30, 30, 30), np.uint8)
    a[2:20, 2:20, 2:20] = FEMUR
    a[20:22, 4:18, 4:18] = FCART                  # on the femur: kept
    a[22:24, 4:18, 4:18] = KNEE_ID["patellar_cartilage"]   # on femoral cartilage, no patella
    out, rec = K.postprocess_knee_labels(_volume(a), min_component_ml={})
    assert not (out.array == KNEE_ID["patellar_cartilage"]).any()
    assert (out.array[22:24, 4:18, 4:18] == 0).all()     # 196 cartilage vs 412 air neighbours
    warnings = K.postprocess_warnings(rec)
    assert len(warnings) == 1 and warnings[0].startswith("patellar_cartilage:")
    assert "patella" in warnings[0] and "absent" in warnings[0]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"cartilage_bone": {"femoral_cartilage": "femurr"}}, "unknown knee class"),
    ({"cartilage_bone": {"cartilage": "femur"}}, "unknown knee class"),
    ({"cartilage_contact_mm": -0.5}, ">= 0 mm"),
    ({"cartilage_contact_mm": float("nan")}, ">= 0 mm"),
])
def test_bad_contact_parameters_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(K.KneeSegmentationError, match=match):
        K.postprocess_knee_labels(_volume(np.zeros((4, 4, 4))), **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------ compartments, menisci
FIBULA = KNEE_ID["fibula"]
MEN_M, MEN_L = KNEE_ID["medial_meniscus"], KNEE_ID["lateral_meniscus"]


def _joint_phantom(fibula_side: str | None = "+x") -> tuple[np.ndarray, np.ndarray]:
    """A tibiofemoral joint at 1 mm voxels whose plates and menisci carry scrambled sides.

    World x = i - 40 (RAS: left-right). Tibia below (z 0-14), femur above (z 22-39), two
    plates on the tibia (z 15-16) centred at x -21 and +21, a meniscus rim on each (z 17-20,
    1 mm below the femur). The -x plate is half "lateral", half "medial" and its rim
    "lateral"; the +x plate is "medial" and its rim "medial". The fibula (1.2 mL) is on the
    ``fibula_side`` (None: none). Returns the map and its affine.
    """
    a = np.zeros((80, 40, 40), np.uint8)
    a[5:75, 5:25, 0:15] = TIBIA
    a[5:75, 5:25, 22:40] = FEMUR
    a[8:19, 5:25, 15:17] = TCART_L
    a[19:30, 5:25, 15:17] = TCART_M
    a[50:72, 5:25, 15:17] = TCART_M
    a[8:12, 5:25, 17:21] = MEN_L
    a[68:72, 5:25, 17:21] = MEN_M
    if fibula_side == "+x":
        a[60:72, 8:18, 0:10] = FIBULA
    elif fibula_side == "-x":
        a[8:20, 8:18, 0:10] = FIBULA
    aff = np.eye(4)
    aff[0, 3] = -40.0
    return a, aff


def _joint_volume(a: np.ndarray, aff: np.ndarray) -> LabelVolume:
    return LabelVolume(a, aff, dict(KNEE), schema="knee")


@pytest.mark.parametrize(("fibula_side", "lateral", "named_by"), [
    ("+x", "+x", "fibula"), ("-x", "-x", "fibula"),
    # no fibula: the network's own labels call the -x side lateral more often (760 vs 440
    # voxels there, 0 vs 1200 on the +x side)
    (None, "-x", "network votes")])
def test_compartments_are_named_by_the_side_of_the_fibula(
        fibula_side: str | None, lateral: str, named_by: str) -> None:
    a, aff = _joint_phantom(fibula_side)
    rec: dict[str, Any] = {}
    out = K.assign_compartments(a, aff, record=rec)
    lat_slice, med_slice = (slice(40, 80), slice(0, 40)) if lateral == "+x" else \
        (slice(0, 40), slice(40, 80))
    plates = np.isin(a, (TCART_M, TCART_L))
    rims = np.isin(a, (MEN_M, MEN_L))
    for sl, plate, rim in ((lat_slice, TCART_L, MEN_L), (med_slice, TCART_M, MEN_M)):
        assert (out[sl][plates[sl]] == plate).all()
        assert (out[sl][rims[sl]] == rim).all()
    np.testing.assert_array_equal(out[~(plates | rims)], a[~(plates | rims)])
    assert rec["applied"] is True and rec["lateral_side"] == lateral
    assert rec["named_by"] == named_by
    assert rec["votes_agree"] is (fibula_side in (None, "-x"))
    # both plates hold 880 voxels, rims 320 each: the split lies between the plates
    assert -11.0 < rec["split_x_mm"] < 10.0 and rec["separation_mm"] > 30.0
    assert rec["ml"] == pytest.approx((2 * 880 + 2 * 320) / 1000.0)
    json.dumps(rec)


def test_one_compartment_only_keeps_the_network_labels_and_warns() -> None:
    a, aff = _joint_phantom()
    a[50:72, 5:25, 15:17] = TIBIA         # no +x plate, no +x rim
    a[68:72, 5:25, 17:21] = 0
    out, rec = K.postprocess_knee_labels(_joint_volume(a, aff), meniscus_contact_mm=None)
    assert rec["compartments"]["applied"] is False
    assert "apart" in rec["compartments"]["reason"] or "holds" in rec["compartments"]["reason"]
    assert ((out.array == TCART_L).sum(), (out.array == TCART_M).sum()) == (440, 440)
    warnings = K.postprocess_warnings(rec)
    assert len(warnings) == 1 and "keep the network's own labels" in warnings[0]
    # no plates or menisci at all: nothing to assign, nothing to warn about
    empty, aff0 = _joint_phantom()
    empty[np.isin(empty, (TCART_L, TCART_M, MEN_L, MEN_M))] = 0
    _, rec0 = K.postprocess_knee_labels(_joint_volume(empty, aff0))
    assert rec0["compartments"] == {"ml": 0.0, "applied": False,
                                    "reason": "tibial plates + menisci 0.00 mL < 0.5 mL"}
    assert K.postprocess_warnings(rec0) == []


def test_menisci_off_the_joint_are_removed_and_the_joint_passes_are_stable() -> None:
    a, aff = _joint_phantom()
    a[30:40, 32:36, 17:21] = MEN_M        # in the air 7 mm behind the joint
    a[75:79, 5:25, 0:4] = MEN_L           # on the tibia, 18 mm below the femur
    out, rec = K.postprocess_knee_labels(_joint_volume(a, aff))
    res = out.array
    assert (res[30:40, 32:36, 17:21] == 0).all()
    assert (res[75:79, 5:25, 0:4] == 0).all()      # more air than tibia around it
    assert (res[8:12, 5:25, 17:21] == MEN_M).all() and (res[68:72, 5:25, 17:21] == MEN_L).all()
    joint = rec["menisci_in_joint"]
    assert joint["contact_mm"] == K.MENISCUS_BONE_CONTACT_MM and joint["bones"] == ["femur",
                                                                                   "tibia"]
    assert joint["removed"]["medial_meniscus"]["voxels_removed"] == 160
    assert joint["removed"]["lateral_meniscus"]["voxels_removed"] == 320
    # the phantom's network labels call the -x side lateral; the fibula on +x wins, warned
    warnings = K.postprocess_warnings(rec)
    assert len(warnings) == 1 and "against the network's own labels" in warnings[0]
    again, rec2 = K.postprocess_knee_labels(out)
    np.testing.assert_array_equal(again.array, res)
    assert all(r["voxels_removed"] == 0 for r in rec2["menisci_in_joint"]["removed"].values())
    # switched off: both pieces stay
    off, rec3 = K.postprocess_knee_labels(_joint_volume(a, aff), meniscus_contact_mm=None)
    assert (off.array[30:40, 32:36, 17:21] == MEN_M).all() and "menisci_in_joint" not in rec3


def test_a_meniscus_with_no_piece_in_the_joint_is_removed_and_warned() -> None:
    a, aff = _joint_phantom()
    a[8:12, 5:25, 17:21] = 0
    a[68:72, 5:25, 17:21] = 0
    a[60:70, 32:36, 17:21] = MEN_M        # the only meniscus: +x (fibula) side, behind the joint
    out, rec = K.postprocess_knee_labels(_joint_volume(a, aff))
    assert not np.isin(out.array, (MEN_M, MEN_L)).any()
    warnings = [w for w in K.postprocess_warnings(rec) if "against the network" not in w]
    assert len(warnings) == 1 and warnings[0].startswith("lateral_meniscus:")
    assert "femur and tibia" in warnings[0] and "absent" in warnings[0]


@pytest.mark.parametrize("value", [-1.0, float("inf")])
def test_bad_meniscus_contact_is_refused(value: float) -> None:
    with pytest.raises(K.KneeSegmentationError, match="meniscus-bone"):
        K.postprocess_knee_labels(_volume(np.zeros((4, 4, 4))), meniscus_contact_mm=value)


def test_a_fibula_that_does_not_hang_below_the_tibial_plateau_names_no_side() -> None:
    a, aff = _joint_phantom(None)
    a[60:72, 8:18, 30:40] = FIBULA       # 1.2 mL "fibula" inside the femur: not anatomical
    a[40:42, 30:32, 38:40] = TIBIA        # a stray "tibia" speck above it: not the tibia's top
    rec: dict[str, Any] = {}
    out = K.assign_compartments(a, aff, record=rec)
    assert rec["named_by"] == "network votes" and rec["lateral_side"] == "-x"
    assert "below the top of the tibia" in rec["fibula_ignored"]
    assert (out[8:30][np.isin(a[8:30], (TCART_M, TCART_L))] == TCART_L).all()
