"""`mskmri analyze knee` end to end on the synthetic phantom, and its bad-input contract."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mskmri.analyze import analyze_knee
from mskmri.cli import main
from mskmri.io import read, read_labels, write
from mskmri.labels import KNEE, KNEE_ID
from mskmri.volume import LabelVolume, Volume

pytest.importorskip("trimesh")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A rendered phantom knee stored as LPI (not RAS) with its truth labels and lesions."""
    from mskmri.synth.phantom import phantom_knee
    from mskmri.synth.render import render

    labels, lesions = phantom_knee(seed=3)
    synth = render(labels, contrast="dess", seed=3, lesions=lesions)
    folder = tmp_path_factory.mktemp("inputs")
    paths = {"image": folder / "image.nii.gz", "seg": folder / "seg.nii.gz",
             "lesions": folder / "lesions.nii.gz"}
    write(synth.image.reorient("LPI"), paths["image"])
    write(synth.labels.reorient("LPI"), paths["seg"])
    write(synth.lesions.reorient("LPI"), paths["lesions"])
    return paths


@pytest.fixture(scope="module")
def analysis(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "knee"
    rc = main(["analyze", "knee", str(inputs["image"]), "--out", str(out), "--seg",
               str(inputs["seg"]), "--lesions", str(inputs["lesions"])])
    assert rc == 0
    return out


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_outputs_exist_and_nothing_else_is_left(analysis):
    names = {p.name for p in analysis.iterdir()}
    assert names == {"segmentation.nii.gz", "segmentation.json", "lesions.nii.gz",
                     "lesions.json", "measurements.json", "meshes", "views", "report.html",
                     "manifest.json"}
    assert [p.name for p in analysis.parent.iterdir()] == ["knee"]  # no temporary folder
    assert {p.name for p in (analysis / "views").iterdir()} == {
        "anterior.png", "lateral.png", "medial.png"}
    meshes = {p.name for p in (analysis / "meshes").iterdir()}
    for name in ("femur", "tibia", "femoral_cartilage", "joint_effusion", "muscle"):
        assert {f"{name}.stl", f"{name}.ply"} <= meshes
    man = _json(analysis / "manifest.json")
    assert man["kind"] == "analysis" and man["schema"] == "mskmri/manifest/1"
    assert "views/lateral.png" in man["outputs"] and "meshes/femur.stl" in man["outputs"]


def test_segmentation_is_written_in_the_input_geometry(analysis, inputs):
    image = read(inputs["image"])
    seg = read_labels(analysis / "segmentation.nii.gz", schema="knee")
    truth = read_labels(inputs["seg"], schema="knee")
    assert "".join(seg.orientation) == "LPI"
    assert seg.same_geometry(image) and np.array_equal(seg.array, truth.array)
    assert _json(analysis / "segmentation.json")["labels"]["1"] == "femur"


def test_measurements(analysis, inputs):
    doc = _json(analysis / "measurements.json")
    assert doc["schema"] == "mskmri/measurements/1" and doc["warnings"] == []
    by = {".".join(p for p in (m["name"], m.get("structure")) if p): m
          for m in doc["measurements"]}
    truth = read_labels(inputs["seg"], schema="knee")
    vox_ml = truth.voxel_volume_mm3 / 1000
    for name in ("joint_effusion", "muscle", "medial_meniscus", "lateral_meniscus"):
        n = np.count_nonzero(truth.array == KNEE_ID[name])
        assert by[f"volume.{name}"]["value"] == pytest.approx(n * vox_ml, rel=1e-6)
        assert by[f"volume.{name}"]["unit"] == "mL"
    for plate in ("femoral_cartilage", "medial_tibial_cartilage", "lateral_tibial_cartilage",
                  "patellar_cartilage"):
        mean = by[f"thickness_mean.{plate}"]
        assert mean["unit"] == "mm" and 0.5 < mean["value"] < 5.0  # phantom plates: 1-3 mm
        assert by[f"thickness_max.{plate}"]["value"] >= mean["value"]
    assert by["lesion_volume.femur"]["value"] > 0 and by["lesion_count.femur"]["value"] >= 1


def test_meshes_overlay_the_segmentation_in_lps(analysis, inputs):
    import trimesh

    truth = read_labels(inputs["seg"], schema="knee")
    femur_world = truth.voxel_to_world(np.argwhere(truth.array == KNEE_ID["femur"]))
    mesh = trimesh.load(analysis / "meshes" / "femur.stl", force="mesh")
    ras = np.asarray(mesh.vertices) * np.array([-1.0, -1.0, 1.0])  # file is LPS
    assert np.allclose(ras.min(axis=0), femur_world.min(axis=0), atol=2.0)
    assert np.allclose(ras.max(axis=0), femur_world.max(axis=0), atol=2.0)
    assert mesh.volume > 0  # outward normals
    n = np.count_nonzero(truth.array == KNEE_ID["femur"])
    assert mesh.volume / 1000 == pytest.approx(n * truth.voxel_volume_mm3 / 1000, rel=0.03)


def test_report_has_overlays_views_and_units(analysis):
    html = (analysis / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") >= 4  # overlays, compartments, lesions, 3-D
    assert "3-D reconstruction" in html and "SPACE=LPS" in html
    assert 'data-key="thickness_mean.femoral_cartilage"' in html
    assert 'data-key="volume.joint_effusion"' in html
    assert "Research use only" in html


# --------------------------------------------------------------------------- bad input
def _exit_2(capsys, argv, out: Path, *needles: str) -> str:
    rc = main(["-q", *argv])  # -q: only the error line on stderr
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not out.exists() and not any(out.parent.glob(f".{out.name}*"))
    assert err.count("\n") == 1 and "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


def test_no_seg_and_no_model_says_how_to_pass_seg(inputs, tmp_path, capsys, monkeypatch):
    import mskmri.analyze as analyze

    # whatever the installed state of the knee model, a missing model reads the same
    monkeypatch.setattr(analyze, "KNEE_SEGMENTER", "mskmri.segment.no_such_module:segment")
    out = tmp_path / "o"
    _exit_2(capsys, ["analyze", "knee", str(inputs["image"]), "--out", str(out)], out,
            "not available", "--seg")


def test_non_knee_label_map_exits_2(inputs, tmp_path, capsys):
    seg = read_labels(inputs["seg"], schema="knee")
    bad = seg.array.astype(np.int16)
    bad[bad == KNEE_ID["muscle"]] = 201  # a spine value
    write(LabelVolume(bad, seg.affine, {}, schema="custom"), tmp_path / "bad.nii.gz")
    out = tmp_path / "o"
    _exit_2(capsys, ["analyze", "knee", str(inputs["image"]), "--out", str(out), "--seg",
                     str(tmp_path / "bad.nii.gz")], out, "[201]", "knee schema")


def test_two_d_image_exits_2(tmp_path, capsys):
    img = nib.Nifti1Image(np.random.default_rng(0).random((64, 64)).astype(np.float32),
                          np.diag([0.5, 0.5, 3.0, 1.0]))
    nib.save(img, tmp_path / "slice.nii.gz")
    out = tmp_path / "o"
    _exit_2(capsys, ["analyze", "knee", str(tmp_path / "slice.nii.gz"), "--out", str(out),
                     "--seg", str(tmp_path / "slice.nii.gz")], out, "2-D")


def test_label_map_on_another_grid_exits_2(inputs, tmp_path, capsys):
    seg = read_labels(inputs["seg"], schema="knee")
    write(seg.reorient("RAS"), tmp_path / "ras.nii.gz")  # same voxels, another storage
    out = tmp_path / "o"
    _exit_2(capsys, ["analyze", "knee", str(inputs["image"]), "--out", str(out), "--seg",
                     str(tmp_path / "ras.nii.gz")], out, "not on the image's grid")
    les = read_labels(inputs["lesions"], schema="lesion")
    write(les.crop([slice(0, 40), slice(None), slice(None)]), tmp_path / "les.nii.gz")
    _exit_2(capsys, ["analyze", "knee", str(inputs["image"]), "--out", str(out), "--seg",
                     str(inputs["seg"]), "--lesions", str(tmp_path / "les.nii.gz")], out,
            "lesion mask")


def test_missing_femur_and_tibia_warns_in_json_and_report(inputs, tmp_path):
    seg = read_labels(inputs["seg"], schema="knee")
    a = seg.array.copy()
    a[np.isin(a, [KNEE_ID["femur"], KNEE_ID["tibia"]])] = 0
    write(seg.with_array(a), tmp_path / "nobones.nii.gz")
    res = analyze_knee(inputs["image"], tmp_path / "o", seg_path=tmp_path / "nobones.nii.gz",
                       meshes=False)
    doc = _json(tmp_path / "o" / "measurements.json")
    assert any("no femur" in w for w in doc["warnings"])
    assert any("no tibia" in w for w in doc["warnings"])
    # plates on absent bones: no number, a reason
    by = {(m["name"], m.get("structure")): m for m in doc["measurements"]}
    fem = by[("thickness_mean", "femoral_cartilage")]
    assert fem["value"] is None and "no femur" in fem["reason"]
    html = (tmp_path / "o" / "report.html").read_text(encoding="utf-8")
    assert "no femur in the label map" in html and 'id="warnings"' in html
    assert res.warnings == doc["warnings"]
    assert not (tmp_path / "o" / "meshes").exists()


def test_a_segmenter_slots_in(inputs, tmp_path):
    truth = read_labels(inputs["seg"], schema="knee")

    def segmenter(image: Volume) -> LabelVolume:
        out = LabelVolume(truth.array, image.affine, dict(KNEE), schema="knee",
                          meta={"warnings": ["test segmenter: low confidence"],
                                "postprocess": {"compartments": {"applied": True}},
                                "models": {"fine": "test"}, "source": "not copied"})
        return out

    res = analyze_knee(inputs["image"], tmp_path / "o", segmenter=segmenter, meshes=False)
    assert res.warnings[0] == "test segmenter: low confidence"
    # the segmenter's record (models, post-processing...) is kept in measurements.json
    record = _json(tmp_path / "o" / "measurements.json")["input"]["segmentation_record"]
    assert record == {"models": {"fine": "test"},
                      "postprocess": {"compartments": {"applied": True}}}
    seg = read_labels(tmp_path / "o" / "segmentation.nii.gz", schema="knee")
    assert np.array_equal(seg.array, truth.array)
    # an existing non-analysis folder is never replaced, not even with overwrite
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "mine.txt").write_text("x")
    from mskmri.errors import MskMriError

    with pytest.raises(MskMriError, match="--overwrite"):
        analyze_knee(inputs["image"], tmp_path / "keep", segmenter=segmenter, meshes=False)
    with pytest.raises(MskMriError, match="not an earlier mskmri analysis"):
        analyze_knee(inputs["image"], tmp_path / "keep", segmenter=segmenter, meshes=False,
                     overwrite=True)
    assert [p.name for p in (tmp_path / "keep").iterdir()] == ["mine.txt"]


# --------------------------------------------------------------------------- --overwrite
def test_existing_out_is_refused_without_overwrite(inputs, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["analyze", "knee", str(inputs["image"]), "--out", str(out), "--seg",
            str(inputs["seg"]), "--no-meshes"]
    assert main(["-q", *argv]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc = main(["-q", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--overwrite" in err and "Traceback" not in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # untouched
    # an empty folder is an existing folder too
    (tmp_path / "empty").mkdir()
    assert main(["-q", "analyze", "knee", str(inputs["image"]), "--out",
                 str(tmp_path / "empty"), "--seg", str(inputs["seg"]), "--no-meshes"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_overwrite_replaces_an_earlier_analysis_atomically(inputs, tmp_path):
    out = tmp_path / "o"
    argv = ["-q", "analyze", "knee", str(inputs["image"]), "--out", str(out), "--seg",
            str(inputs["seg"]), "--no-meshes"]
    assert main(argv) == 0
    (out / "stale.txt").write_text("from before")
    assert main([*argv, "--lesions", str(inputs["lesions"]), "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "stale.txt" not in names and "lesions.nii.gz" in names  # the new analysis, whole
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temporary or old folder left
    man = _json(out / "manifest.json")
    assert "--overwrite" in man["command"]
    assert man["input_checksums"]["image"]["sha256"] == __import__("hashlib").sha256(
        inputs["image"].read_bytes()).hexdigest()


def test_pdf_without_chromium_exits_2_before_any_work(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MSKMRI_CHROMIUM", str(tmp_path / "no-such-browser"))
    out = tmp_path / "o"
    _exit_2(capsys, ["analyze", "knee", str(inputs["image"]), "--out", str(out), "--seg",
                     str(inputs["seg"]), "--pdf"], out, "--pdf", "chromium")


def test_report_lists_what_was_not_measured_and_the_lesions(analysis, tmp_path, inputs):
    html = (analysis / "report.html").read_text(encoding="utf-8")
    assert 'id="lesions"' in html and "Centroid (RAS, mm)" in html
    assert 'id="qc"' in html and 'id="study"' in html and 'id="methods"' in html
    assert "label map given with --seg" in html  # the segmentation's source, as a model row
    # a label map without the ligaments and no lesion mask: both listed as not measured
    seg = read_labels(inputs["seg"], schema="knee")
    a = seg.array.copy()
    a[np.isin(a, [KNEE_ID["anterior_cruciate_ligament"], KNEE_ID["posterior_cruciate_ligament"]])] = 0
    write(seg.with_array(a), tmp_path / "noacl.nii.gz")
    analyze_knee(inputs["image"], tmp_path / "o", seg_path=tmp_path / "noacl.nii.gz",
                 meshes=False)
    html = (tmp_path / "o" / "report.html").read_text(encoding="utf-8")
    row = re.search(r"<tr><td>Volume of: ([^<]*)</td><td class=\"reason\">([^<]*)<", html)
    assert row and row.group(1) == "anterior cruciate ligament, posterior cruciate ligament"
    assert row.group(2) == "not in the label map"
    assert "no lesion mask was given" in html
    assert 'data-key="volume.anterior_cruciate_ligament"' not in html  # no 0 mL row


def test_low_confidence_from_a_segmenter_is_warned_and_shown(inputs, tmp_path):
    truth = read_labels(inputs["seg"], schema="knee")
    conf = np.ones(truth.shape, np.float32)
    femur = truth.array == KNEE_ID["femur"]
    conf[femur] = 0.2  # the whole femur uncertain: far above both thresholds

    def segmenter(image: Volume) -> LabelVolume:
        return LabelVolume(truth.array, image.affine, dict(KNEE), schema="knee",
                           meta={"confidence": conf})

    res = analyze_knee(inputs["image"], tmp_path / "o", segmenter=segmenter, meshes=False)
    warning = next(w for w in res.warnings if w.startswith("Segmentation confidence"))
    assert "low-confidence region" in warning
    html = (tmp_path / "o" / "report.html").read_text(encoding="utf-8")
    assert "Quality check: segmentation confidence" in html
    assert warning.split(":")[1].strip()[:20] in html
    assert _json(tmp_path / "o" / "measurements.json")["warnings"] == res.warnings


def test_detect_bml_reports_the_detected_lesion(tmp_path, capsys):
    """`analyze knee --detect-bml` finds the phantom's 1 mL IW-FS lesion on the given
    segmentation and reports it (mask, per-bone volume, the detector's record and caveat);
    a lesion mask and detection together are refused before any work."""
    from mskmri.synth.phantom import phantom_knee
    from mskmri.synth.render import render

    labels, lesions = phantom_knee(seed=0, lesion_ml=1.0)
    synth = render(labels, contrast="iw-fs", seed=3, lesions=lesions)
    write(synth.image, tmp_path / "image.nii.gz")
    write(synth.labels, tmp_path / "seg.nii.gz")
    write(synth.lesions, tmp_path / "truth.nii.gz")
    out = tmp_path / "knee"
    args = ["analyze", "knee", str(tmp_path / "image.nii.gz"), "--out", str(out), "--seg",
            str(tmp_path / "seg.nii.gz"), "--no-meshes"]
    assert main([*args, "--detect-bml", "inpaint", "--lesions",
                 str(tmp_path / "truth.nii.gz")]) == 2
    assert "not both" in capsys.readouterr().err
    assert not out.exists()
    assert main([*args, "--detect-bml", "inpaint"]) == 0
    found = read_labels(out / "lesions.nii.gz", schema="lesion").array > 0
    truth = synth.lesions.array > 0
    assert 2 * (found & truth).sum() / (found.sum() + truth.sum()) > 0.5
    doc = _json(out / "measurements.json")
    record = doc["input"]["bml_detection"]
    assert record["method"] == "inpaint"
    assert record["threshold_from"]["source"].startswith("model card")
    assert any("BML inpainter" in w for w in doc["warnings"])
    assert "bml-inpaint" in (out / "report.html").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- segmenter options
def test_model_device_and_tta_reach_the_knee_segmenter(inputs, tmp_path, monkeypatch):
    """`analyze knee --model DIR --tta none` segments with DIR's weights, says so everywhere."""
    import mskmri.segment.knee as knee

    truth = read_labels(inputs["seg"], schema="knee")
    calls: list[dict] = []

    def fake_segment_knee(image: Volume, **kwargs) -> LabelVolume:
        calls.append(kwargs)
        return LabelVolume(truth.array, image.affine, dict(KNEE), schema="knee",
                           meta={"models": {"coarse": str(kwargs.get("coarse", "shipped")),
                                            "fine": str(kwargs.get("fine", "shipped"))},
                                 "tta": kwargs.get("tta", "default")})

    # stands in for the shipped segmenter, under its name
    fake_segment_knee.__module__, fake_segment_knee.__qualname__ = knee.__name__, "segment_knee"
    monkeypatch.setattr(knee, "segment_knee", fake_segment_knee)
    models = tmp_path / "run"
    models.mkdir()
    for name in ("knee-seg-coarse", "knee-seg-fine"):
        (models / f"{name}.safetensors").write_bytes(b"")
    out = tmp_path / "o"
    assert main(["-q", "analyze", "knee", str(inputs["image"]), "--out", str(out),
                 "--model", str(models), "--tta", "none", "--no-meshes"]) == 0
    assert calls == [{"coarse": str(models / "knee-seg-coarse.safetensors"),
                      "fine": str(models / "knee-seg-fine.safetensors"),
                      "device": "cpu", "tta": "none"}]
    record = _json(out / "measurements.json")["input"]["segmentation_record"]
    assert record["tta"] == "none" and record["models"]["fine"].startswith(str(models))
    command = _json(out / "manifest.json")["command"]
    assert f"--model {models}" in command and "--tta none" in command
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "weights given with --model" in html and "knee-seg-fine.safetensors" in html
    # the shipped pair with default settings: nothing bound, the shipped models' rows
    calls.clear()
    assert main(["-q", "analyze", "knee", str(inputs["image"]), "--out", str(tmp_path / "d"),
                 "--no-meshes"]) == 0
    assert calls == [{}]
    html = (tmp_path / "d" / "report.html").read_text(encoding="utf-8")
    assert "weights given with --model" not in html and "knee-seg-fine" in html


def test_segmenter_options_are_refused_where_they_would_be_ignored(inputs, tmp_path, capsys):
    out = tmp_path / "o"
    _exit_2(capsys, ["analyze", "knee", str(inputs["image"]), "--out", str(out), "--seg",
                     str(inputs["seg"]), "--tta", "none"], out, "--seg", "not segmented")
    _exit_2(capsys, ["analyze", "knee", str(inputs["image"]), "--out", str(out),
                     "--model", str(tmp_path / "nowhere")], out, "knee-seg-coarse")
    _exit_2(capsys, ["analyze", "spine", str(inputs["image"]), "--out", str(out),
                     "--tta", "none", "--no-meshes"], out, "--tta, --no-meshes are for the "
            "knee only")
    seg_out = tmp_path / "s.nii.gz"
    _exit_2(capsys, ["segment", "spine", str(inputs["image"]), str(seg_out), "--tta", "flip"],
            seg_out, "--tta is for the knee only")
