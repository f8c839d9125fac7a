"""Synthesis: phantom, anatomy completion, renderer, contrasts, CLI (no real data needed).

Known answers first: the phantom's classes and volumes, effusion and lesion volumes exact to
a voxel, lesion masks equal to what was inserted, determinism by seed, geometry preserved,
filters against scipy. Real label sources are tested in ``test_synth_sources.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from mskmri.labels import KNEE, KNEE_ID
from mskmri.synth import (
    CONTRASTS,
    RenderOptions,
    SynthesisError,
    complete_knee,
    get_contrast,
    phantom_knee,
    render,
    render_scene,
    split_tibial_cartilage,
)
from mskmri.synth.anatomy import LESION_HALF, TRUTH_OF_TISSUE, Tissue
from mskmri.synth.render import _blur_axis, _thick_slices, output_grid
from mskmri.synth.sources import detect_source, medial_score, split_by_subject, subject_of
from mskmri.volume import LabelVolume, Volume

K = KNEE_ID
#: Plausible volume ranges (mL) of the phantom's structures inside its 96x120x120 mm view.
PHANTOM_VOLUME_RANGES_ML = {
    "femur": (40, 250), "tibia": (25, 200), "patella": (6, 25), "fibula": (2, 20),
    "femoral_cartilage": (4, 20), "medial_tibial_cartilage": (0.4, 4),
    "lateral_tibial_cartilage": (0.3, 4), "patellar_cartilage": (1.5, 7),
    "medial_meniscus": (0.8, 5), "lateral_meniscus": (0.8, 5), "joint_effusion": (5.9, 6.1),
    "muscle": (150, 1200), "anterior_cruciate_ligament": (0.3, 4),
    "posterior_cruciate_ligament": (0.4, 5), "collateral_ligaments": (0.5, 8),
    "patellar_tendon": (0.8, 8), "infrapatellar_fat_pad": (2, 40),
}
STILL = RenderOptions(deform=False)


@pytest.fixture(scope="module")
def phantom() -> tuple[LabelVolume, LabelVolume]:
    return phantom_knee(seed=0)


def _ml(lv: LabelVolume, value: int) -> float:
    return float((lv.array == value).sum()) * lv.voxel_volume_mm3 / 1000.0


# ------------------------------------------------------------------------------ phantom
def test_phantom_has_all_classes_with_plausible_volumes(phantom) -> None:
    labels, lesions = phantom
    assert labels.schema == "knee" and labels.shape == (64, 96, 96)
    assert labels.spacing == pytest.approx((1.5, 1.25, 1.25))
    assert "".join(labels.orientation) == "RAS"
    assert set(labels.present_values()) == set(KNEE)
    for name, (lo, hi) in PHANTOM_VOLUME_RANGES_ML.items():
        assert lo <= _ml(labels, K[name]) <= hi, name
    # the default BML: 1 mL, inside the femur (lesion voxels stay bone in the tissue map)
    assert _ml(lesions, 1) == pytest.approx(1.0, abs=labels.voxel_volume_mm3 / 1000)
    assert np.all(labels.array[lesions.array > 0] == K["femur"])


def test_phantom_is_deterministic(phantom) -> None:
    a, la = phantom_knee(seed=5)
    b, lb = phantom_knee(seed=5)
    assert np.array_equal(a.array, b.array) and np.array_equal(la.array, lb.array)
    assert not np.array_equal(a.array, phantom[0].array)  # seed 0


def test_phantom_options_and_bad_grid() -> None:
    lab, les = phantom_knee(seed=1, lesion_ml=None, effusion_ml=2.0)
    assert les.array.sum() == 0
    assert _ml(lab, K["joint_effusion"]) == pytest.approx(2.0, abs=0.01)
    with pytest.raises(SynthesisError, match="at least 16"):
        phantom_knee(shape=(8, 96, 96))


# ------------------------------------------------------------------------------ anatomy
def test_effusion_volume_is_exact(phantom) -> None:
    labels, _ = phantom
    vox_ml = labels.voxel_volume_mm3 / 1000.0
    for want in (0.0, 3.3, 12.0):
        scene = complete_knee(labels, seed=3, effusion_ml=want)
        got = _ml(scene.truth(), K["joint_effusion"])
        assert abs(got - want) <= vox_ml / 2 + 1e-9
        assert scene.params["effusion"]["requested_ml"] == want
    with pytest.raises(SynthesisError, match="ask for less"):
        complete_knee(labels, seed=3, effusion_ml=5000.0)


def test_bml_inserted_exactly_subchondral_and_connected(phantom) -> None:
    labels, _ = phantom
    vox_ml = labels.voxel_volume_mm3 / 1000.0
    scene = complete_knee(labels, seed=4, effusion_ml=0.0, lesion_ml=[0.8, 1.6],
                          lesion_bone=["femur", "tibia"])
    mask = scene.lesion_mask().array > 0
    info = scene.params["bml"]
    assert [b["bone"] for b in info] == ["femur", "tibia"]
    for b, want in zip(info, (0.8, 1.6), strict=True):
        assert abs(b["inserted_ml"] - want) <= vox_ml / 2 + 1e-9
    assert abs(mask.sum() * vox_ml - 2.4) <= vox_ml + 1e-9
    truth = scene.truth().array
    assert set(np.unique(truth[mask]).tolist()) <= {K["femur"], K["tibia"]}
    # lesion voxels are marrow (cortex stays intact) and sit near cartilage (subchondral)
    assert np.all(np.isin(scene.tissues[mask], [Tissue.FEMUR, Tissue.TIBIA]))
    cart = np.isin(truth, [K["femoral_cartilage"], K["medial_tibial_cartilage"],
                           K["lateral_tibial_cartilage"]])
    d = ndimage.distance_transform_edt(~cart, sampling=labels.spacing)
    assert np.percentile(d[mask], 10) < 4.0
    n_comp = ndimage.label(mask, structure=np.ones((3, 3, 3)))[1]
    assert n_comp == 2
    # ill-defined edge: weights fall off outside the mask, and the mask is weight >= half
    w = scene.lesion_weight
    assert w is not None and np.array_equal(w >= LESION_HALF, mask)
    assert ((w > 0) & ~mask).sum() > 0


def test_bad_bone_and_missing_bones(phantom) -> None:
    labels, _ = phantom
    with pytest.raises(SynthesisError, match="did you mean 'femur'"):
        complete_knee(labels, seed=0, lesion_ml=1.0, lesion_bone="femr")
    empty = labels.with_array(np.where(labels.array == K["tibia"], 0, labels.array))
    from mskmri.errors import LabelError

    with pytest.raises(LabelError, match="femur and a tibia"):
        complete_knee(empty, seed=0)


def test_completion_labels_only_what_it_generates(phantom) -> None:
    labels, _ = phantom
    bones_only = labels.with_array(np.where(labels.array <= 8, labels.array, 0))
    scene = complete_knee(bones_only, seed=2, effusion_ml=4.0)
    for name in ("femur", "tibia", "femoral_cartilage", "medial_tibial_cartilage"):
        assert scene.origin[name] == "source"
    for name in ("medial_meniscus", "lateral_meniscus", "muscle", "joint_effusion",
                 "anterior_cruciate_ligament", "posterior_cruciate_ligament",
                 "collateral_ligaments", "patellar_tendon", "infrapatellar_fat_pad"):
        assert scene.origin[name] == "procedural", name
    truth = scene.truth().array
    # source voxels are never overwritten (cortex maps back to its bone)
    keep = bones_only.array > 0
    assert np.array_equal(truth[keep], bones_only.array[keep])
    # tissues without a class are background in the truth map
    for tis in (Tissue.SUBCUTANEOUS_FAT, Tissue.SKIN, Tissue.SOFT_FAT, Tissue.VESSEL, Tissue.TENDON):
        assert TRUTH_OF_TISSUE[tis] == 0
    assert (scene.tissues == Tissue.SUBCUTANEOUS_FAT).any() and (scene.tissues == Tissue.SKIN).any()
    assert (scene.tissues == Tissue.FEMUR_CORTEX).any()


def test_tibial_cartilage_split_recovers_phantom_plates(phantom) -> None:
    labels, _ = phantom
    merged = labels.array.copy()
    merged[merged == K["lateral_tibial_cartilage"]] = K["medial_tibial_cartilage"]
    split, notes = split_tibial_cartilage(labels.with_array(merged))
    assert notes["knee_side"] == "right" and notes["medial_score"] > 0.5
    assert np.array_equal(split.array, labels.array)
    # mirrored left-right (a left knee with the same header): medial is found on the other side
    flipped = LabelVolume(merged[::-1].copy(), labels.affine, dict(KNEE), schema="knee")
    split_l, notes_l = split_tibial_cartilage(flipped)
    assert notes_l["knee_side"] == "left"
    assert np.array_equal(split_l.array, labels.array[::-1])


# ------------------------------------------------------------------------------ render
def test_render_is_deterministic_and_records_parameters(phantom) -> None:
    labels, lesions = phantom
    a = render(labels, lesions=lesions, contrast="iw-fs", seed=11)
    b = render(labels, lesions=lesions, contrast="iw-fs", seed=11)
    c = render(labels, lesions=lesions, contrast="iw-fs", seed=12)
    assert np.array_equal(a.image.array, b.image.array)
    assert np.array_equal(a.labels.array, b.labels.array)
    assert not np.array_equal(a.image.array, c.image.array)
    p = a.params
    for key in ("seed", "contrast", "spatial", "intensity", "texture", "blur_sigma_output_voxels",
                "thick_slices", "bias", "noise", "gamma", "anatomy", "origin", "timing",
                "output_volumes_ml", "options"):
        assert key in p, key
    assert p["seed"] == 11 and p["contrast"] == "iw-fs"
    assert set(p["intensity"]["means"]) >= {"femur", "muscle", "effusion", "air"}
    json.dumps(p)  # JSON-ready


def test_outputs_share_the_input_geometry(phantom) -> None:
    labels, lesions = phantom
    for opts in (STILL, RenderOptions()):
        r = render(labels, lesions=lesions, contrast="t1", seed=2, options=opts)
        for out in (r.image, r.labels, r.lesions):
            assert out.same_geometry(labels)
        assert r.image.array.dtype == np.float32
        assert r.labels.schema == "knee" and r.lesions.schema == "lesion"
    # oblique, permuted input: outputs keep it
    aff = np.array([[0, 0, 1.25, 10.0], [0, -1.25, 0, 50.0], [1.5, 0, 0, -30.0], [0, 0, 0, 1]])
    perm = LabelVolume(np.transpose(labels.array, (2, 1, 0))[:, ::-1].copy(), aff, dict(KNEE),
                       schema="knee")
    r = render(perm, contrast="dess", seed=1, options=STILL)
    assert r.image.same_geometry(perm) and r.labels.same_geometry(perm)


def test_inplane_resampling_keeps_field_of_view(phantom) -> None:
    labels, lesions = phantom
    r = render(labels, lesions=lesions, contrast="iw-fs", seed=3, inplane=48, options=STILL)
    assert r.image.shape == (64, 48, 48)
    assert r.image.spacing == pytest.approx((1.5, 2.5, 2.5))
    corner_in = labels.voxel_to_world([[-0.5, -0.5, -0.5]])[0]
    corner_out = r.image.voxel_to_world([[-0.5, -0.5, -0.5]])[0]
    assert np.allclose(corner_in, corner_out)
    assert r.labels.same_geometry(r.image) and r.lesions.same_geometry(r.image)
    assert r.lesions.array.sum() > 0
    shape, _, axis = output_grid(labels.shape, labels.affine, 112)
    assert axis == 0 and shape == (64, 112, 112)


def test_undeformed_render_keeps_inserted_truth_exactly(phantom) -> None:
    labels, _ = phantom
    scene = complete_knee(labels, seed=21, effusion_ml=9.0, lesion_ml=1.2)
    r = render(labels, contrast="dess", seed=21, effusion_ml=9.0, lesion_ml=1.2, options=STILL)
    assert np.array_equal(r.labels.array, scene.truth().array)
    assert np.array_equal(r.lesions.array, scene.lesion_mask().array)
    vox_ml = labels.voxel_volume_mm3 / 1000.0
    assert abs(r.params["output_volumes_ml"]["joint_effusion"] - 9.0) <= vox_ml / 2 + 1e-9
    assert abs(r.params["output_volumes_ml"]["lesions"] - 1.2) <= vox_ml / 2 + 1e-9
    # one scene, many renders: same truth, different images
    a = render_scene(scene, contrast="t2", seed=1, options=STILL)
    b = render_scene(scene, contrast="t2", seed=2, options=STILL)
    assert np.array_equal(a.labels.array, b.labels.array)
    assert not np.array_equal(a.image.array, b.image.array)


def _lesion_contrast(r) -> tuple[float, float]:
    """(CNR, difference / image scale) of the lesion against the marrow ring around it."""
    img = r.image.array
    les = r.lesions.array > 0
    ring = ndimage.binary_dilation(les, iterations=4) & ~ndimage.binary_dilation(les, iterations=2)
    ring &= r.labels.array == K["femur"]
    marrow = img[ring]
    diff = float(img[les].mean() - marrow.mean())
    return diff / float(marrow.std()), diff / float(np.percentile(img, 99))


def test_bml_hyperintense_on_iwfs_subtle_on_dess(phantom) -> None:
    labels, _ = phantom
    opts = RenderOptions(deform=False, noise=(0.02, 0.02), gamma_std=0.0,
                         thick_slice_probability=0.0)
    cnr_fs, rel_fs = [], []
    cnr_dess, rel_dess = [], []
    for seed in (1, 2):
        scene = complete_knee(labels, seed=seed, effusion_ml=3.0, lesion_ml=2.0)
        c, r_ = _lesion_contrast(render_scene(scene, contrast="iw-fs", seed=seed, options=opts))
        cnr_fs.append(c)
        rel_fs.append(r_)
        c, r_ = _lesion_contrast(render_scene(scene, contrast="dess", seed=seed, options=opts))
        cnr_dess.append(c)
        rel_dess.append(r_)
    assert min(cnr_fs) > 3.0 and min(rel_fs) > 0.2
    assert max(rel_dess) < 0.1 and max(rel_dess) < 0.5 * min(rel_fs)


def test_every_contrast_renders(phantom) -> None:
    labels, lesions = phantom
    scene = complete_knee(labels, seed=7, lesions=lesions)
    for name in CONTRASTS:
        r = render_scene(scene, contrast=name, seed=7)
        img = r.image.array
        assert np.isfinite(img).all() and img.min() >= 0
        assert img.std() > 1.0
    fat = render_scene(scene, contrast="t1", seed=1, options=STILL)
    fs = render_scene(scene, contrast="iw-fs", seed=1, options=STILL)
    # fat-suppression: marrow is darker than muscle on IW-FS, brighter on T1
    for r, sign in ((fat, 1), (fs, -1)):
        marrow = r.image.array[r.labels.array == K["femur"]].mean()
        muscle = r.image.array[r.labels.array == K["muscle"]].mean()
        assert sign * (marrow - muscle) > 0


def test_contrast_registry_did_you_mean() -> None:
    assert get_contrast("IW_FS").name == "iw-fs"
    assert get_contrast("t2fs").name == "t2"
    with pytest.raises(SynthesisError, match="did you mean 'iw-fs'"):
        get_contrast("iwfss")
    with pytest.raises(SynthesisError, match="known: dess"):
        get_contrast("xyz")


def test_sampler_identity_and_shift(rng) -> None:
    from mskmri.synth.render import SpatialParams, _Sampler

    arr = rng.integers(0, 20, size=(12, 14, 16)).astype(np.uint8)
    theta = np.deg2rad(20.0)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.7, 0.4, 0.5])
    aff[:3, 3] = (5.0, -3.0, 8.0)
    eye = tuple(tuple(r) for r in np.eye(3).tolist())
    ident = SpatialParams(eye, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 0, 0.0, 30.0, {})
    out, none = _Sampler(arr.shape, aff, arr.shape, aff, ident).sample(arr, None)
    assert none is None and np.array_equal(out, arr)
    # a translation of exactly one voxel along axis 1 (world = affine column 1)
    shift = SpatialParams(eye, tuple(aff[:3, 1].tolist()), (0.0, 0.0, 0.0), 0, 0.0, 30.0, {})
    moved = _Sampler(arr.shape, aff, arr.shape, aff, shift).sample(arr)[0]
    assert moved is not None
    assert np.array_equal(moved[:, :-1], arr[:, 1:]) and np.all(moved[:, -1] == 0)


# ------------------------------------------------------------------------------ filters
def test_blur_and_thick_slices_known_answers(rng) -> None:
    a = rng.random((20, 24, 28)).astype(np.float32)
    for axis in range(3):
        ours = _blur_axis(a, 0.8, axis)
        ref = ndimage.gaussian_filter1d(a, 0.8, axis=axis, truncate=2.5, mode="constant")
        # interior equals scipy; edges are renormalised instead of zero-padded
        inner = [slice(3, -3)] * 3
        assert np.allclose(ours[tuple(inner)], ref[tuple(inner)], atol=1e-5)
    ramp = np.broadcast_to(np.arange(30, dtype=np.float32)[:, None, None], (30, 4, 4)).copy()
    out = _thick_slices(ramp, 0, 3.0)
    assert np.allclose(out[2:-2, 0, 0], np.arange(30)[2:-2], atol=1e-4)  # linear stays linear
    spike = np.zeros((30, 2, 2), np.float32)
    spike[15] = 1.0
    thick = _thick_slices(spike, 0, 4.0)
    assert thick.sum() == pytest.approx(spike.sum()) and thick.max() < 0.5


# ------------------------------------------------------------------------------ sources (no data)
def test_detect_source_by_values() -> None:
    aff = np.eye(4)
    arr = np.zeros((10, 10, 10), np.uint8)
    arr[:5] = 1
    arr[5, :2] = 2
    arr[6, :2] = 6
    assert detect_source(Volume(arr, aff))[0] == "oai_lesion"
    arr2 = arr.copy()
    arr2[arr2 == 6] = 5
    assert detect_source(Volume(arr2, aff))[0] == "cartimorph"
    arr3 = np.where(arr == 1, 5, arr).astype(np.uint8)
    assert detect_source(Volume(arr3, aff))[0] == "pymskt"
    arr4 = np.where(arr == 1, 95, 0).astype(np.int16)
    assert detect_source(Volume(arr4, aff))[0] == "spl_atlas"


def test_medial_score_sign() -> None:
    rng = np.random.default_rng(0)
    med = np.c_[rng.normal(-20, 5, 500), rng.uniform(-20, 20, 500), rng.normal(-1, 1, 500)]
    lat = np.c_[rng.normal(20, 5, 500), rng.uniform(-15, 15, 500), rng.normal(0, 1, 500)]
    assert medial_score(med, lat) > 0 > medial_score(lat, med)


def test_subject_split_keeps_time_points_together() -> None:
    names = [f"akoa_{s}_{tp}.nii.gz" for s in range(9000000, 9000020) for tp in ("00m", "96m")]
    names += [f"zib_{s}.nii.gz" for s in range(9100000, 9100010)]
    assert subject_of("akoa_9031930_36m.nii.gz") == "9031930"
    assert subject_of("/x/zib_9002430.nii.gz") == "9002430"
    a = split_by_subject(names, seed=0)
    b = split_by_subject(list(reversed(names)), seed=0)
    assert a == b
    assert sorted(sum(a.values(), [])) == sorted(names)
    subj = {k: {subject_of(n) for n in v} for k, v in a.items()}
    assert not (subj["train"] & subj["val"]) and not (subj["train"] & subj["test"])
    assert not (subj["val"] & subj["test"])
    assert [len(subj[k]) for k in ("train", "val", "test")] == [21, 4, 5] or \
        sum(len(v) for v in subj.values()) == 30
    assert split_by_subject(names, seed=1) != a
    strata = {n: ("zib" if n.startswith("zib") else "akoa") for n in names}
    s = split_by_subject(names, seed=0, strata=strata)
    assert any(n.startswith("zib") for n in s["test"]) and any(n.startswith("akoa") for n in s["test"])


# ------------------------------------------------------------------------------ CLI
def test_cli_writes_four_files(tmp_path: Path) -> None:
    from mskmri.cli import main
    from mskmri.io import read

    out = tmp_path / "render"
    rc = main(["-q", "synth", "knee", "phantom", str(out), "--contrast", "iw-fs", "--seed", "4",
               "--effusion-ml", "5", "--lesion-ml", "1.0", "--no-deform"])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["image.nii.gz", "labels.json", "labels.nii.gz", "lesions.json",
                     "lesions.nii.gz", "synth.json"]
    doc = json.loads((out / "synth.json").read_text())
    assert doc["schema"] == "mskmri/synth/1" and doc["seed"] == 4 and doc["contrast"] == "iw-fs"
    assert doc["source"]["name"] == "phantom"
    assert doc["params"]["anatomy"]["effusion"]["requested_ml"] == 5.0
    img, lab = read(out / "image.nii.gz"), read(out / "labels.nii.gz")
    assert img.same_geometry(lab)
    side = json.loads((out / "labels.json").read_text())
    assert side["label_schema"] == "knee" and side["labels"]["11"] == "joint_effusion"
    # the written labels read back as a project-schema map (source detected from the sidecar)
    out2 = tmp_path / "again"
    assert main(["-q", "synth", "knee", str(out / "labels.nii.gz"), str(out2), "--seed", "1"]) == 0
    assert json.loads((out2 / "synth.json").read_text())["source"]["name"] == "knee"


def test_cli_bad_input_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mskmri.cli import main

    rc = main(["synth", "knee", "phantom", str(tmp_path / "o"), "--contrast", "iwfs2"])
    err = capsys.readouterr().err
    assert rc == 2 and "did you mean 'iw-fs'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    rc = main(["synth", "knee", str(tmp_path / "missing.nii.gz"), str(tmp_path / "o")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
