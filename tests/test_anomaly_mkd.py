"""MKD baseline of the BML detector: loss, gradient map, detector and CLI.

The detector and CLI tests use a seeded *untrained* student against the shipped teacher
(pipeline, geometry and outputs); the shipped student is exercised when it is present.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mskmri.anomaly.inpaint import BmlDetectionError, report_path  # noqa: E402
from mskmri.anomaly.mkd import (  # noqa: E402
    TEACHER_MODEL,
    TEACHER_WARNING,
    MkdScorer,
    build_student,
    detect_bml_mkd,
    gradient_map,
    load_teacher,
    mkd_loss,
    zscore_in,
)
from mskmri.cli import main  # noqa: E402
from mskmri.labels import KNEE  # noqa: E402
from mskmri.volume import LabelVolume, Volume  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def nets() -> tuple[torch.nn.Module, torch.nn.Module]:
    teacher = load_teacher()
    torch.manual_seed(0)
    return build_student(teacher.config), teacher


def test_loss_zero_for_identical_features_positive_otherwise() -> None:
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, c, s, s, generator=g) for c, s in ((8, 16), (16, 8))]
    assert float(mkd_loss(feats, [f.clone() for f in feats])) == pytest.approx(0.0, abs=1e-6)
    # opposite direction: 1 - cos = 2 at every position and level, MSE = 4 * mean(f^2)
    neg = [-f for f in feats]
    want = sum(2.0 + 0.1 * float((2 * f).pow(2).mean()) for f in feats)
    assert float(mkd_loss(feats, neg, lambda_mse=0.1)) == pytest.approx(want, rel=1e-4)
    # a pure scale keeps the cosine at 1: only the MSE term remains
    scaled = [2 * f for f in feats]
    assert float(mkd_loss(feats, scaled, lambda_mse=0.0)) == pytest.approx(0.0, abs=1e-5)
    assert float(mkd_loss(feats, scaled, lambda_mse=0.5)) > 0
    per = mkd_loss(feats, neg, per_sample=True)
    assert per.shape == (2,)
    with pytest.raises(BmlDetectionError):
        mkd_loss(feats, feats[:1])


def test_student_is_smaller_and_matches_teacher_shapes(nets: tuple) -> None:
    student, teacher = nets
    x = torch.zeros(1, 1, 32, 40)
    s, t = student(x), teacher(x)
    assert [f.shape for f in s] == [f.shape for f in t] and len(s) == 4
    n_s = sum(p.numel() for p in student.parameters())
    n_t = sum(p.numel() for p in teacher.parameters())
    assert n_s < 0.6 * n_t
    assert not any(p.requires_grad for p in teacher.parameters())


def test_gradient_map_shape_nonzero_and_seeded(nets: tuple) -> None:
    student, teacher = nets
    rng = np.random.default_rng(0)
    img = (0.5 + 0.05 * rng.standard_normal((3, 30, 37))).astype(np.float32)
    img[1, 10:18, 12:20] += 1.0
    g = gradient_map(img, student, teacher, n_noise=2, seed=1)
    assert g.shape == img.shape and g.dtype == np.float32
    assert np.all(g >= 0) and g[:, 5:25, 5:32].min() > 0
    again = gradient_map(img, student, teacher, n_noise=2, seed=1)
    np.testing.assert_allclose(g, again, rtol=1e-5)


def test_gradient_map_is_zero_outside_the_marrow(nets: tuple) -> None:
    student, teacher = nets
    img = np.full((2, 32, 32), 0.5, dtype=np.float32)
    roi = np.zeros(img.shape, dtype=bool)
    roi[:, 8:24, 8:24] = True
    g = gradient_map(img, student, teacher, roi=roi, n_noise=0, sigma_px=0, opening_px=1)
    assert np.all(g[~roi] == 0) and g[roi].max() > 0


def test_input_x_gradient_is_the_plain_gradient_times_the_input(nets: tuple) -> None:
    student, teacher = nets
    rng = np.random.default_rng(1)
    img = (0.5 + 0.05 * rng.standard_normal((2, 24, 32))).astype(np.float32)
    img[0, 8:14, 10:18] = 1.5
    roi = np.zeros(img.shape, dtype=bool)
    roi[:, 4:20, 4:28] = True
    kw = {"roi": roi, "n_noise": 0, "sigma_px": 0, "opening_px": 1}
    plain = gradient_map(img, student, teacher, attribution="gradient", **kw)
    ixg = gradient_map(img, student, teacher, attribution="input-x-gradient", **kw)
    np.testing.assert_allclose(ixg, plain * np.abs(img * roi), rtol=1e-4, atol=1e-9)
    with pytest.raises(BmlDetectionError, match="attribution"):
        gradient_map(img, student, teacher, attribution="saliency")
    with pytest.raises(BmlDetectionError, match="attribution"):
        MkdScorer(student, teacher=teacher, attribution="saliency")


def test_training_patches_are_marrow_only(tmp_path: Path) -> None:
    from mskmri.anomaly.mkd_train import MkdSlices

    img = np.full((3, 80, 80), 2.0, dtype=np.float32)
    fem = np.zeros(img.shape, dtype=np.uint8)
    fem[:, 20:60, 20:60] = 1
    np.savez(tmp_path / "r.npz", image=img, femur=fem, spacing=np.ones(3))
    ds = MkdSlices([tmp_path / "r.npz"], patch=32)
    a = ds.sample(0, np.random.default_rng(4))["image"]
    b = ds.sample(0, np.random.default_rng(4))["image"]
    assert a.shape == (1, 32, 32) and np.array_equal(a, b)
    vals = np.unique(np.round(a, 5))
    assert vals[0] == 0 or vals.size == 1
    assert 1.8 <= a.max() <= 2.2


def test_zscore_is_zero_outside_roi_and_robust() -> None:
    rng = np.random.default_rng(2)
    v = rng.normal(5.0, 2.0, (4, 50, 50)).astype(np.float32)
    roi = np.zeros(v.shape, dtype=bool)
    roi[:, 5:45, 5:45] = True
    z = zscore_in(v, roi)
    assert np.all(z[~roi] == 0)
    assert abs(float(np.median(z[roi]))) < 0.05
    assert float(np.std(z[roi])) == pytest.approx(1.0, abs=0.1)


# ============================================================================ synthetic knee
@pytest.fixture(scope="module")
def knee() -> tuple[Volume, LabelVolume]:
    """Procedural knee rendered IW-FS with one 1 mL femoral lesion."""
    from mskmri.synth import phantom_knee, render

    labels, lesions = phantom_knee(seed=0, lesion_ml=1.0)
    r = render(labels, contrast="iw-fs", seed=3, lesions=lesions)
    return r.image, r.labels


def test_detect_end_to_end_mask_in_input_geometry(knee: tuple, nets: tuple) -> None:
    image, seg = knee
    student, teacher = nets
    scorer = MkdScorer(student, teacher=teacher, n_noise=1)
    res = detect_bml_mkd(image, seg, scorer=scorer)
    assert res.mask.same_geometry(image) and res.mask.array.shape == image.array.shape
    assert set(np.unique(res.mask.array)) <= {0, 1}
    assert res.zmap.same_geometry(image)
    assert np.any(res.zmap.array[seg.array == 1] != 0)
    assert np.all(res.mask.array[seg.array != 1] == 0)
    assert TEACHER_WARNING in res.warnings
    assert res.record["method"] == "mkd" and res.record["teacher"] == "bml-mkd-teacher"
    assert isinstance(res.table, list)


def test_no_femur_is_an_error(knee: tuple, nets: tuple) -> None:
    image, seg = knee
    empty = LabelVolume(np.zeros(seg.shape, np.uint8), seg.affine, dict(KNEE), schema="knee")
    with pytest.raises(BmlDetectionError, match="no femur"):
        detect_bml_mkd(image, empty, scorer=MkdScorer(nets[0], teacher=nets[1], n_noise=1))


def _save_student(student: torch.nn.Module, path: Path) -> Path:
    from mskmri.nn.registry import ModelCard, save_model

    card = ModelCard(name="mkd-test", task="mkd", input_spacing_mm=[0.625, 0.625],
                     normalisation={"method": "roi-median"}, label_schema="none", labels={},
                     training_data=[], command="test", seed=0, extra={"threshold": 3.0})
    return save_model(student, path, card)


def test_cli_detect_mkd_exit_0_and_bad_input_exit_2(knee: tuple, nets: tuple,
                                                    tmp_path: Path) -> None:
    from mskmri.io import write

    image, seg = knee
    write(image, tmp_path / "img.nii.gz")
    write(seg, tmp_path / "seg.nii.gz")
    weights = _save_student(nets[0], tmp_path / "student.safetensors")
    out = tmp_path / "bml.nii.gz"
    args = ["detect", "bml", str(tmp_path / "img.nii.gz"), str(out), "--method", "mkd",
            "--model", str(weights)]
    assert main([*args, "--seg", str(tmp_path / "seg.nii.gz"), "--table",
                 str(tmp_path / "t.csv")]) == 0
    from mskmri.io import read

    mask = read(out)
    assert mask.same_geometry(image)
    rec = json.loads(report_path(out).read_text())
    assert rec["record"]["method"] == "mkd"
    assert any("VGG-16" in w for w in rec["warnings"])
    assert (tmp_path / "t.csv").read_text().startswith("lesion,")
    empty = LabelVolume(np.zeros(seg.shape, np.uint8), seg.affine, dict(KNEE), schema="knee")
    write(empty, tmp_path / "empty.nii.gz")
    assert main([*args, "--seg", str(tmp_path / "empty.nii.gz")]) == 2
    assert main([*args, "--seg", str(tmp_path / "missing.nii.gz")]) == 2


def test_cli_shipped_student_runs_and_carries_its_caveat(knee: tuple, tmp_path: Path) -> None:
    from mskmri.io import write
    from mskmri.weights import MODELS

    if "bml-mkd" not in MODELS or not MODELS["bml-mkd"].path.is_file():
        pytest.skip("bml-mkd is not shipped")
    image, seg = knee
    write(image, tmp_path / "img.nii.gz")
    write(seg, tmp_path / "seg.nii.gz")
    out = tmp_path / "bml.nii.gz"
    assert main(["detect", "bml", str(tmp_path / "img.nii.gz"), str(out), "--method", "mkd",
                 "--seg", str(tmp_path / "seg.nii.gz")]) == 0
    rec = json.loads(report_path(out).read_text())
    assert any("first small model" in w for w in rec["warnings"])
    assert rec["record"]["config"]["postprocess"]["threshold"] > 0
    assert rec["record"]["student"]["name"] == "bml-mkd"


def test_shipped_student_map_is_higher_in_the_lesion(knee: tuple) -> None:
    """The shipped MKD map separates the phantom's 1 mL lesion from healthy marrow (the
    published plain gradient did not: its z was lower in the lesion)."""
    from mskmri.anomaly.postprocess import roi_without_rim
    from mskmri.synth import phantom_knee, render
    from mskmri.weights import MODELS

    if "bml-mkd" not in MODELS or not MODELS["bml-mkd"].path.is_file():
        pytest.skip("bml-mkd is not shipped")
    labels, lesions = phantom_knee(seed=0, lesion_ml=1.0)
    r = render(labels, contrast="iw-fs", seed=3, lesions=lesions)
    roi = roi_without_rim(r.labels.array == 1, r.image.spacing, 1.0)
    lesion = (r.lesions.array > 0) & roi
    assert lesion.sum() > 100
    medians = {}
    for attribution in ("input-x-gradient", "gradient"):
        scorer = MkdScorer(n_noise=1, attribution=attribution)
        z = detect_bml_mkd(r.image, r.labels, scorer=scorer, threshold=float("inf")).zmap.array
        medians[attribution] = float(np.median(z[lesion]))
        if attribution == "input-x-gradient":
            assert medians[attribution] > float(np.quantile(z[roi & ~lesion], 0.9))
    assert medians["gradient"] < 0 < medians["input-x-gradient"]



def test_teacher_is_the_one_the_shipped_student_was_distilled_from() -> None:
    # The teacher ships under its own name, so re-pretraining pretrain-encoder-2d cannot change
    # the MKD baseline behind the student's back (bml.json and the thresholds were made with it).
    from mskmri.nn.registry import load_model, read_card, resolve_weights, sha256_file

    student_card = read_card(resolve_weights("bml-mkd")[0])
    path, _ = resolve_weights(TEACHER_MODEL)
    assert student_card.extra["teacher"] == TEACHER_MODEL == "bml-mkd-teacher"
    assert sha256_file(path) == student_card.extra["teacher_sha256"] == read_card(path).sha256
    teacher, _ = load_model(TEACHER_MODEL)
    assert not any(p.requires_grad for p in load_teacher().parameters())
    assert sum(p.numel() for p in teacher.parameters()) > 0
