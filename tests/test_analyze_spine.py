"""``mskmri analyze spine``: the whole pipeline with a given label map (real manual mask), its
outputs, atomic writing and bad input; end to end from the image with the shipped model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from mskmri.analyze_spine import MANIFEST_SCHEMA, analyze_spine
from mskmri.cli import main
from mskmri.errors import GeometryError, MskMriError
from mskmri.io import read, read_labels, write
from mskmri.labels import get_source, spine_labels_for, vertebra_name
from mskmri.measure.spine import measure_spine, measurements_by_key
from mskmri.segment import _spine_data as sd
from mskmri.volume import LabelVolume, Volume
from mskmri.weights import MODELS

#: A held-out exam (never used for training or checkpoint selection).
EXAM = sd.SPLIT["test"]["myosegmentum"][0]


def _manual_seg(shared_data: Path, tmp_path: Path) -> tuple[Path, Path, LabelVolume]:
    img_p, gt_p = sd.exam_paths(shared_data, "myosegmentum", EXAM)
    gt = read_labels(gt_p, strict=False)
    arr = get_source("myosegmentum").apply(np.asarray(gt.array))
    seg = LabelVolume(arr, gt.affine, spine_labels_for(set(np.unique(arr).tolist())),
                      schema="spine")
    seg_p = tmp_path / "manual.nii.gz"
    write(seg, seg_p)
    return img_p, seg_p, seg


def test_analyze_with_manual_mask(shared_data: Path, tmp_path: Path) -> None:
    img_p, seg_p, seg = _manual_seg(shared_data, tmp_path)
    out = tmp_path / "analysis"
    assert main(["-q", "analyze", "spine", str(img_p), "--out", str(out), "--seg",
                 str(seg_p)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"measurements.json", "report.html", "spine_measurements.png", "analysis.json",
            "segmentation.nii.gz", "segmentation.json"} <= names
    doc = json.loads((out / "measurements.json").read_text())
    got = {(m["name"], m.get("structure")): m["value"] for m in doc["measurements"]}
    # the same numbers as measuring the mask directly
    direct = measurements_by_key(measure_spine(seg, image=read(img_p)))
    cobb = direct["cobb_angle.L1-L5"].value
    assert got[("cobb_angle", "L1-L5")] == pytest.approx(cobb, abs=1e-6)
    for lvl in ("L1", "L3", "L5"):
        assert got[("middle_height", lvl)] == pytest.approx(
            direct[f"middle_height.{lvl}"].value, abs=1e-6)
        assert 15.0 < got[("middle_height", lvl)] < 40.0  # plausible lumbar body, mm
    manifest = json.loads((out / "analysis.json").read_text())
    assert manifest["schema"] == MANIFEST_SCHEMA
    assert manifest["segmentation"]["source"] == "given"
    html = (out / "report.html").read_text()
    assert "Measurements drawn on the image" in html and "data:image/png;base64," in html
    assert (out / "spine_measurements.png").read_bytes().startswith(b"\x89PNG")
    # no temporary folder left beside the output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_seg_on_another_grid_is_refused(shared_data: Path, tmp_path: Path) -> None:
    img_p, _, seg = _manual_seg(shared_data, tmp_path)
    cropped = seg.crop((slice(0, 200), slice(0, 224), slice(0, 77)))
    bad = tmp_path / "cropped.nii.gz"
    write(cropped, bad)
    with pytest.raises(GeometryError, match="not on the grid"):
        analyze_spine(img_p, tmp_path / "out", seg_path=bad)
    assert not (tmp_path / "out").exists()


def test_bad_input_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    axial = tmp_path / "axial.nii.gz"
    write(Volume(np.random.default_rng(0).random((32, 32, 8)).astype(np.float32),
                 np.diag([0.5, 0.5, 4.0, 1.0])), axial)
    assert main(["analyze", "spine", str(axial), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "sagittal" in err
    assert not (tmp_path / "o").exists()
    other = tmp_path / "busy"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(MskMriError, match="--overwrite"):
        analyze_spine(axial, other)
    with pytest.raises(MskMriError, match="not an earlier mskmri analysis"):
        analyze_spine(axial, other, overwrite=True)
    assert (other / "keep.txt").exists()


@pytest.mark.slow  # about 45 s on 2 shared cores; the benchmark records all held-out exams
@pytest.mark.skipif("spine-seg" not in MODELS, reason="spine-seg weights not shipped yet")
def test_end_to_end_from_image(shared_data: Path, tmp_path: Path) -> None:
    """From the image alone (shipped model) on a held-out exam: bodies found and measured,
    heights within 2.0 mm (median over matched levels) of the manual-mask values."""
    img_p, seg_p, seg = _manual_seg(shared_data, tmp_path)
    out = tmp_path / "auto"
    res = analyze_spine(img_p, out)
    manual = measurements_by_key(measure_spine(seg))
    auto = {(m["name"], m.get("structure")): m for m in res.document["measurements"]}
    auto_seg = read_labels(out / "segmentation.nii.gz", strict=False)
    errors = []
    for v in seg.present_values():  # match each manual level to the predicted body over it
        vals, counts = np.unique(auto_seg.array[seg.array == v], return_counts=True)
        keep = vals != 0
        if not keep.any():
            continue
        pred = int(vals[keep][np.argmax(counts[keep])])
        name = seg.labels[v]
        pname = vertebra_name(pred)
        for h in ("anterior_height", "middle_height", "posterior_height"):
            ref, got = manual.get(f"{h}.{name}"), auto.get((h, pname))
            if ref is not None and got is not None and got["value"] is not None:
                errors.append(abs(got["value"] - ref.value))
    assert len(errors) >= 9
    assert float(np.median(errors)) <= 2.0


# ----------------------------------------------------------------------------- phantoms (fast)
def test_phantom_analysis_report_and_overwrite(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Five 27 mm boxes on sagittal 4 mm slices: heights measured, intact bodies graded 0 (the
    end bodies, without two neighbours, not graded), the cord listed as not measured with its
    reason, an existing --out refused unless --overwrite."""
    from _analysis_inputs import spine_inputs

    paths = spine_inputs(tmp_path / "in")
    out = tmp_path / "out"
    argv = ["-q", "analyze", "spine", str(paths["image"]), "--out", str(out), "--seg",
            str(paths["seg"])]
    assert main(argv) == 0
    doc = json.loads((out / "measurements.json").read_text())
    got = {(m["name"], m.get("structure")): m["value"] for m in doc["measurements"]}
    for level in ("L1", "L2", "L3", "L4", "L5"):
        assert got[("middle_height", level)] == pytest.approx(27.0, abs=1.0)
    assert got[("cobb_angle", "L1-L5")] == pytest.approx(0.0, abs=1.0)
    html = (out / "report.html").read_text()
    nm = html[html.index('class="not-measured"'):]
    nm = nm[:nm.index("</table>")]  # the "Not measured" table only (the methods name grading)
    assert "no spinal cord in the label map" in nm and "Fracture grade" not in nm
    for level in ("L2", "L3", "L4"):
        assert got[("genant_grade", level)] == 0
    assert got[("genant_grade", "L1")] is None and got[("genant_grade", "L5")] is None
    assert all(n not in got for n in (("mscc", None), ("cord_area", None)))
    for section in ('id="study"', 'id="qc"', 'id="methods"', 'id="surfaces"', "Input checksums"):
        assert section in html
    manifest = json.loads((out / "analysis.json").read_text())
    assert manifest["command"].startswith("mskmri analyze spine ")
    assert set(manifest["input_checksums"]) == {"image", "segmentation"}
    # an existing folder: refused (one line naming --overwrite), untouched
    (out / "note.txt").write_text("mine")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and err.count("\n") == 1
    assert (out / "note.txt").exists()
    assert main([*argv, "--overwrite"]) == 0
    assert not (out / "note.txt").exists() and (out / "report.html").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _text_of(html: str) -> str:
    """The report without its embedded images (base64 can hold any short word)."""
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:", html)


def test_dicom_input_phi_only_with_include_phi(tmp_path: Path) -> None:
    from _analysis_inputs import spine_dicom_inputs

    phi = {"PatientName": "Roe^Richard", "PatientID": "SPN-123", "PatientBirthDate": "19551231",
           "AccessionNumber": "ACC-77", "InstitutionName": "Example Spine Centre",
           "RepetitionTime": "3500", "EchoTime": "100"}
    paths = spine_dicom_inputs(tmp_path / "in", extra=phi)
    out = tmp_path / "out"
    assert main(["-q", "analyze", "spine", str(paths["image"]), "--out", str(out), "--seg",
                 str(paths["seg"])]) == 0
    html = _text_of((out / "report.html").read_text())
    for value in ("Roe", "SPN-123", "19551231", "ACC-77", "Example Spine Centre"):
        assert value not in html
    assert "left out of this report" in html and "T2-weighted by TR/TE" in html
    assert main(["-q", "analyze", "spine", str(paths["image"]), "--out", str(out), "--seg",
                 str(paths["seg"]), "--overwrite", "--include-phi"]) == 0
    html = (out / "report.html").read_text()
    for value in ("Roe^Richard", "SPN-123", "19551231", "ACC-77", "Example Spine Centre"):
        assert value in html
    assert "Contains patient identifiers" in html


def test_report_models_list_every_network_that_ran() -> None:
    """Model rows: the main model, its ensemble members and the partner that vetoed bone (by
    their shipped names), then the grading painter; with a given --seg only the painter."""
    from mskmri.analyze_spine import report_models

    record = {"ensemble_members": [{"file": "spine-seg-2.safetensors", "sha256": "x"}],
              "bone_ensemble": "spine-seg-bodies.safetensors"}
    rows = report_models("spine-seg", record)
    assert [r.name for r in rows] == ["spine-seg", "spine-seg-2", "spine-seg-bodies",
                                      "vertebra-inpaint"]
    assert "ensemble member" in rows[1].role and "veto" in rows[2].role
    assert all("not a shipped model" not in r.version for r in rows)
    no_veto = report_models("spine-seg", {"ensemble_members": None, "bone_ensemble": None})
    assert [r.name for r in no_veto] == ["spine-seg", "vertebra-inpaint"]
    assert [r.name for r in report_models("spine-seg", None)] == ["vertebra-inpaint"]
