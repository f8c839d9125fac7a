"""What a report says: nothing unmeasured as a number, no patient identifiers unless asked,
quality checks with known answers, input checksums, and the PDF's clear failure."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from _dicom_factory import write_series

from mskmri.io import read
from mskmri.report.html import ModelInfo, model_info, render_report
from mskmri.report.pdf import PdfError, find_chromium, require_chromium
from mskmri.report.qc import (
    ANISOTROPY_WARN_RATIO,
    LOW_CONFIDENCE,
    OBLIQUE_WARN_DEG,
    check_anisotropy,
    check_confidence,
    check_contrast,
    check_orientation,
    obliquity_deg,
    run_checks,
    weighting_from_header,
)
from mskmri.report.study import input_checksum, study_summary
from mskmri.volume import LabelVolume, Volume

PHI = {"PatientName": "Doe^Jane", "PatientID": "PID-4711", "PatientBirthDate": "19700101",
       "AccessionNumber": "ACC-0042", "InstitutionName": "Saint Example Hospital"}


def _volume(spacing=(1.0, 1.0, 1.0), rotation_deg: float = 0.0, meta=None,
            shape=(12, 14, 10)) -> Volume:
    t = np.radians(rotation_deg)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    arr = np.random.default_rng(0).normal(100, 10, shape).astype(np.float32)
    return Volume(arr, aff, dict(meta or {}))


# ----------------------------------------------------------------------------- not measured
def test_unmeasured_values_are_words_with_reasons_never_numbers() -> None:
    ms = [
        {"name": "volume", "structure": "femur", "value": 12.5, "unit": "mL"},
        {"name": "thickness_mean", "structure": "femoral_cartilage", "value": None,
         "unit": "mm", "reason": "no femur in the label map"},
        {"name": "cobb_angle", "structure": "L1-L5", "value": float("nan"), "unit": "deg",
         "reason": "an endplate line is missing"},
    ]
    html = render_report(title="t", measurements=ms,
                         not_measured=[("Disc heights", "no discs in the label map")])
    rows = dict(re.findall(r'data-key="([^"]+)">(.*?)</tr>', html, re.S))
    for key, why in (("thickness_mean.femoral_cartilage", "no femur in the label map"),
                     ("cobb_angle.L1-L5", "an endplate line is missing")):
        cells = re.sub(r"<[^>]+>", "|", rows[key])
        assert "not measured" in cells and why in cells
        assert not re.search(r"\|\s*-?\d", cells.split("not measured")[0] + "|"), cells
        assert "nan" not in cells.lower()
    assert 'data-value="12.5"' in rows["volume.femur"]
    assert 'class="not-measured"' in html and "no discs in the label map" in html
    assert "Not measured" in html


def test_report_is_locked_against_outside_resources() -> None:
    html = render_report(title="t")
    assert 'http-equiv="Content-Security-Policy"' in html
    assert "default-src 'none'" in html and "img-src data:" in html
    assert "@media print" in html and "break-inside: avoid" in html


def test_models_versions_and_checksums_are_shown(tmp_path: Path) -> None:
    f = tmp_path / "image.nii.gz"
    f.write_bytes(b"0123456789")
    rec = input_checksum(f)
    assert rec["sha256"] == hashlib.sha256(b"0123456789").hexdigest() and rec["bytes"] == 10
    html = render_report(
        title="t", inputs={"image": rec}, versions={"numpy": "9.9.9"},
        models=[ModelInfo("knee segmentation", "m", "m.safetensors", "beware <this>")],
        methods=["Volumes: voxel count x voxel volume."])
    assert rec["sha256"] in html and "9.9.9" in html
    assert "beware &lt;this&gt;" in html and 'id="methods"' in html


def test_model_info_reads_the_card_and_the_caveat() -> None:
    from mskmri.weights import MODELS, model_caveat

    name = next(iter(MODELS))
    info = model_info(name, "role")
    assert info.version.startswith(MODELS[name].file) and "sha256" in info.version
    assert info.caveat == (model_caveat(name) or "")
    assert model_info("no-such-model", "role").version == "not a shipped model"


# ----------------------------------------------------------------------------- PHI
@pytest.fixture
def dicom_image(tmp_path: Path) -> Volume:
    arr = np.arange(8 * 6 * 4, dtype=np.int16).reshape(8, 6, 4)
    write_series(tmp_path / "dcm", arr, description="Sag T1 TSE",
                 extra={**PHI, "RepetitionTime": "550", "EchoTime": "12",
                        "MagneticFieldStrength": "3", "PatientSex": "F"})
    return read(tmp_path / "dcm")


def test_patient_identifiers_are_left_out_by_default(dicom_image: Volume) -> None:
    study = study_summary(dicom_image, description="dcm")
    text = repr(study.rows)
    for value in ("Doe", "PID-4711", "19700101", "ACC-0042", "Saint Example"):
        assert value not in text
    assert not study.phi_included and "--include-phi" in study.phi_note
    assert ("TR", "550 ms") in study.rows and ("Field strength", "3 T") in study.rows
    html = render_report(title="t", image=dicom_image, study=study)  # (no figures)
    for value in ("Doe", "PID-4711", "19700101", "ACC-0042", "Saint Example"):
        assert value not in html
    assert 'id="phi"' not in html


def test_patient_identifiers_with_include_phi(dicom_image: Volume) -> None:
    study = study_summary(dicom_image, include_phi=True)
    rows = dict(study.rows)
    assert rows["Patient name"] == "Doe^Jane" and rows["Patient ID"] == "PID-4711"
    assert rows["Accession number"] == "ACC-0042" and rows["Birth date"] == "19700101"
    assert rows["Institution"] == "Saint Example Hospital"
    html = render_report(title="t", image=dicom_image, study=study)
    assert 'id="phi"' in html and "Contains patient identifiers" in html


def test_dicom_folder_checksum_is_the_digest_of_its_files(dicom_image: Volume) -> None:
    files = dicom_image.meta["files"]
    rec = input_checksum(Path(files[0]).parent, files)
    inner = "".join(hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files)
    assert rec["sha256"] == hashlib.sha256(inner.encode()).hexdigest()
    assert rec["files"] == len(files) == 4


# ----------------------------------------------------------------------------- QC
def test_orientation_check() -> None:
    assert obliquity_deg(_volume()) == pytest.approx(0.0, abs=1e-6)
    assert obliquity_deg(_volume(rotation_deg=25.0)) == pytest.approx(25.0, abs=1e-6)
    assert check_orientation(_volume(rotation_deg=OBLIQUE_WARN_DEG - 3)).status == "ok"
    oblique = check_orientation(_volume(rotation_deg=OBLIQUE_WARN_DEG + 5))
    assert oblique.status == "warning" and "oblique" in oblique.detail


def test_anisotropy_check_depends_on_the_anatomy() -> None:
    thick = _volume(spacing=(0.5, 0.5, 0.5 * ANISOTROPY_WARN_RATIO + 0.5))
    assert check_anisotropy(thick, "knee").status == "warning"
    assert check_anisotropy(_volume(spacing=(0.5, 0.5, 1.4)), "knee").status == "ok"
    # spine: sagittal 4 mm slices along L-R are normal, 0.8 mm in plane
    assert check_anisotropy(_volume(spacing=(4.0, 0.8, 0.8)), "spine").status == "ok"
    assert check_anisotropy(_volume(spacing=(7.0, 0.8, 0.8)), "spine").status == "warning"
    assert check_anisotropy(_volume(spacing=(4.0, 0.5, 3.0)), "spine").status == "warning"


@pytest.mark.parametrize(("tr", "te", "ti", "weighting"), [
    (550, 12, None, "T1"), (4000, 90, None, "T2"), (3000, 30, None, "PD"),
    (15, 5, None, "gradient echo"), (4000, 40, 160, "STIR"), (1200, 50, None, "intermediate"),
    (None, 10, None, None),
])
def test_weighting_from_tr_te(tr, te, ti, weighting) -> None:
    meta = {"repetition_time_ms": tr, "echo_time_ms": te, "inversion_time_ms": ti}
    assert weighting_from_header(meta) == weighting


def test_contrast_check_against_what_each_model_was_trained_on() -> None:
    pd = {"repetition_time_ms": 3000.0, "echo_time_ms": 30.0, "modality": "MR"}
    assert check_contrast(_volume(meta=pd), "knee").status == "ok"
    assert check_contrast(_volume(meta=pd), "spine").status == "warning"
    t2 = {"repetition_time_ms": 3500.0, "echo_time_ms": 100.0}
    assert check_contrast(_volume(meta=t2), "spine").status == "ok"
    assert check_contrast(_volume(meta={"modality": "CT"}), "knee").status == "warning"
    stir = {**t2, "description": "SAG_STIR"}
    assert "STIR" in check_contrast(_volume(meta=stir), "spine").detail
    assert check_contrast(_volume(), "knee").status == "not checked"  # NIfTI: no TR/TE


def test_low_confidence_region_is_found_and_located() -> None:
    image = _volume(shape=(20, 20, 20))
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[4:16, 4:16, 4:16] = 1
    conf = np.ones(lab.shape, np.float32)
    conf[12:16, 12:16, 12:16] = LOW_CONFIDENCE / 2  # 64 of 1728 voxels (3.7%, 0.064 mL)
    small = LabelVolume(lab, image.affine, {1: "femur"}, schema="knee",
                        meta={"confidence": conf})
    check = check_confidence(small, given=False)
    assert check.status == "ok" and "3.7%" in check.detail  # under both thresholds
    conf[8:16, 8:16, 8:16] = LOW_CONFIDENCE / 2  # 512 voxels: 29.6%, 0.512 mL
    seg = LabelVolume(lab, image.affine, {1: "femur"}, schema="knee",
                      meta={"confidence": conf})
    check = check_confidence(seg, given=False)
    assert check.status == "warning" and "low-confidence region" in check.detail
    assert check.centre_mm == pytest.approx((11.5, 11.5, 11.5))
    assert "29.6%" in check.detail and "0.51 mL" in check.detail
    sure = LabelVolume(lab, image.affine, {1: "femur"}, schema="knee",
                       meta={"confidence": np.ones(lab.shape)})
    assert check_confidence(sure, given=False).status == "ok"
    plain = LabelVolume(lab, image.affine, {1: "femur"}, schema="knee")
    assert check_confidence(plain, given=True).status == "not checked"
    checks = run_checks(image, seg, anatomy="knee", seg_given=False)
    html = render_report(title="t", image=image, segmentation=seg, qc=checks)
    assert 'id="qc"' in html and html.index('id="warnings"') < html.index('id="qc"')
    assert "Segmentation confidence: low-confidence region" in html


# ----------------------------------------------------------------------------- PDF
def test_pdf_without_chromium_is_one_clear_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MSKMRI_CHROMIUM", str(tmp_path / "no-such-browser"))
    assert find_chromium() is None
    with pytest.raises(PdfError, match="apt-get install chromium") as err:
        require_chromium()
    assert "--pdf" in str(err.value) and "\n" not in str(err.value)
