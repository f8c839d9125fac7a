"""DICOM SEG and SR (TID 1500) out: geometry, voxel counts, values and references read back.

Synthetic DICOM series (tests/_dicom_factory.py) with hand-made label maps first; the real
multi-echo knee series (one echo) through the writer second.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mskmri.errors import GeometryError
from mskmri.io import read, write
from mskmri.labels import KNEE, KNEE_ID, LESION, SPINE_FIXED
from mskmri.measure.base import Measurement, describe_input, measurements_document
from mskmri.volume import LabelVolume, Volume

hd = pytest.importorskip("highdicom")

from mskmri.report import dicom_out  # noqa: E402  (after the importorskip)
from mskmri.report.dicom_out import (  # noqa: E402
    SEG_FILE,
    SR_FILE,
    build_measurement_report,
    read_sr_measurements,
    segment_codes,
    write_dicom_outputs,
)

sys.path.insert(0, str(Path(__file__).parent))
from _dicom_factory import oblique_cosines, ramp, write_series  # noqa: E402

SHAPE = (20, 16, 8)  # (columns, rows, slices)
UCUM = {"mL": "mL", "mm": "mm", "deg": "deg", "count": "{count}", "1": "1", "%": "%",
        "mm^2": "mm2"}


# --------------------------------------------------------------------------- fixtures
def _knee_labels(image: Volume) -> tuple[LabelVolume, LabelVolume]:
    """Femur, tibia, femoral cartilage boxes and a lesion in the femur, on the image grid."""
    lab = np.zeros(image.shape, np.uint8)
    lab[2:10, 2:8, 1:5] = KNEE_ID["femur"]
    lab[10:15, 2:8, 1:5] = KNEE_ID["tibia"]
    lab[5:12, 8:10, 2:6] = KNEE_ID["femoral_cartilage"]
    les = np.zeros(image.shape, np.uint8)
    les[2:4, 3:6, 2:4] = 1
    return (LabelVolume(lab, image.affine, labels=KNEE, schema="knee"),
            LabelVolume(les, image.affine, labels=LESION, schema="lesion"))


def _document(seg: LabelVolume, extra: list[Measurement] = ()) -> dict:  # type: ignore[assignment]
    vox_ml = seg.voxel_volume_mm3 / 1000
    ms = [Measurement("volume", np.count_nonzero(seg.array == v) * vox_ml, "mL",
                      structure=KNEE[v]) for v in (1, 2, 5)]
    ms += [
        Measurement("thickness_mean", 1.25, "mm", structure="femoral_cartilage"),
        Measurement("thickness_max", 1.75, "mm", structure="femoral_cartilage"),
        Measurement("thickness_mean", float("nan"), "mm", structure="patellar_cartilage",
                    extra={"reason": "no patellar cartilage"}),
        Measurement("lesion_volume", 12 * vox_ml, "mL", structure="femur"),
        Measurement("lesion_count", 1, "count", structure="femur"),
        Measurement("lesion_volume", 12 * vox_ml, "mL"),
        *extra,
    ]
    return measurements_document(ms, input_info=describe_input(seg), tool_version="test")


@pytest.fixture(scope="module")
def axial(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An axial synthetic series, its knee labels and lesions, and the SEG/SR written."""
    root = tmp_path_factory.mktemp("axial")
    written = write_series(root / "dicom", ramp(SHAPE))
    image = read(root / "dicom")
    seg, les = _knee_labels(image)
    doc = _document(seg)
    out = write_dicom_outputs(image, seg, doc, root / "out", lesions=les, strict=True)
    return {"written": written, "image": image, "seg": seg, "lesions": les, "doc": doc,
            "out": out, "dir": root / "out"}


def _source_headers(written) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in written.files]


def _seg_masks(seg_path: Path, source_uids: list[str], n_segments: int) -> np.ndarray:
    """(cols, rows, slices, segments) masks of a SEG, read back with highdicom."""
    seg = hd.seg.segread(seg_path)
    px = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=source_uids, segment_numbers=list(range(1, n_segments + 1)))
    return np.asarray(px).transpose(2, 1, 0, 3)  # (slices, rows, cols, s) -> (cols, rows, ...)


# --------------------------------------------------------------------------- SEG
def test_writes_both_files_and_nothing_else(axial):
    assert sorted(p.name for p in axial["dir"].iterdir()) == [SR_FILE, SEG_FILE]
    assert [p.name for p in axial["out"].files] == [SEG_FILE, SR_FILE]
    assert axial["out"].warnings == []


def test_seg_frames_lie_on_their_source_slices(axial):
    w = axial["written"]
    src = {ds.SOPInstanceUID: ds for ds in _source_headers(w)}
    ds = pydicom.dcmread(axial["dir"] / SEG_FILE)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.FrameOfReferenceUID == next(iter(src.values())).FrameOfReferenceUID
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [0.7, 0.9]
    np.testing.assert_allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [*w.row_cosine, *w.col_cosine], atol=1e-6)
    assert (ds.Rows, ds.Columns) == (SHAPE[1], SHAPE[0])
    for frame in ds.PerFrameFunctionalGroupsSequence:
        refs = frame.DerivationImageSequence[0].SourceImageSequence
        assert len(refs) == 1
        source = src[refs[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in source.ImagePositionPatient], atol=1e-6)
    # the series is referenced as a whole, every instance of it
    (series,) = ds.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == w.series_uid
    assert {i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence} == set(src)


def test_segment_masks_equal_the_label_map(axial):
    seg, les = axial["seg"], axial["lesions"]
    segments = axial["out"].segments
    assert [(s.number, s.name, s.source) for s in segments] == [
        (1, "femur", "labels"), (2, "tibia", "labels"), (3, "femoral_cartilage", "labels"),
        (4, "bone_marrow_lesion", "lesions")]
    masks = _seg_masks(axial["dir"] / SEG_FILE, axial["image"].meta["sop_instance_uids"], 4)
    for s in segments:
        truth = (seg.array if s.source == "labels" else les.array) == s.value
        assert np.array_equal(masks[..., s.number - 1].astype(bool), truth), s.name
        assert s.voxels == np.count_nonzero(truth) == np.count_nonzero(masks[..., s.number - 1])
    # the lesion overlaps the femur: both segments hold those voxels (BINARY allows overlap)
    assert np.all(masks[..., 0][les.array == 1]) and np.all(masks[..., 3][les.array == 1])


def test_segment_codes_are_standard_where_they_exist(axial):
    ds = pydicom.dcmread(axial["dir"] / SEG_FILE, stop_before_pixels=True)
    by_label = {s.SegmentLabel: s for s in ds.SegmentSequence}
    femur = by_label["femur"]
    assert femur.SegmentedPropertyTypeCodeSequence[0].CodeValue == "71341001"
    assert femur.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert femur.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    cart = by_label["femoral cartilage"]
    assert cart.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Cartilage"
    assert cart.AnatomicRegionSequence[0].CodeValue == "71341001"  # femur
    bml = by_label["bone marrow lesion"]
    assert bml.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert bml.AnatomicRegionSequence[0].CodeMeaning == "Bone Marrow"
    assert femur.SegmentAlgorithmType == "AUTOMATIC"
    assert femur.SegmentAlgorithmName == "mskmri"


def test_spine_codes_by_level_and_local_fallbacks():
    assert segment_codes("L1").type.value == "66794005"  # L1 vertebra
    assert segment_codes("disc_L4-L5").type.value == "84020006"  # L4/L5 disc
    assert segment_codes("disc_L5-S1").type.value == "715056000"
    assert segment_codes("L4-L5") == segment_codes("disc_L4-L5")  # as measurements name discs
    assert segment_codes("C2-C7").type == dicom_out._local("C2-C7")  # a range, not a disc
    assert segment_codes("spinal_cord").type.value == "2748008"
    assert segment_codes("L6").type.meaning == "Vertebra"  # no L6 code: generic vertebra
    assert segment_codes("V1002").type.meaning == "Vertebra"
    disc = segment_codes("disc_V1001-V1002")
    assert disc.type.scheme_designator == dicom_out.LOCAL_SCHEME
    assert segment_codes("unknown_thing").type.scheme_designator == dicom_out.LOCAL_SCHEME
    for value, name in SPINE_FIXED.items():  # every schema name has a code
        assert segment_codes(name).type.value, value


# --------------------------------------------------------------------------- SR
def test_sr_values_and_units_equal_the_document(axial):
    doc = axial["doc"]
    got = read_sr_measurements(axial["dir"] / SR_FILE)
    written = [m for m in doc["measurements"] if m["value"] is not None]
    assert len(got) == len(written) == len(doc["measurements"]) - 1  # the null is left out
    for m, g in zip(written, got, strict=True):
        assert g["value"] == pytest.approx(m["value"], rel=1e-9)
        assert g["unit"] == UCUM[m["unit"]]
    assert {g["name"] for g in got} >= {"118565006", "59089-3", "lesion_count"}
    assert [g["derivation"] for g in got if g["name"] == "59089-3"] == ["Mean", "Maximum"]


def test_sr_groups_reference_their_segments(axial):
    seg_ds = pydicom.dcmread(axial["dir"] / SEG_FILE, stop_before_pixels=True)
    number = {s.name: s.number for s in axial["out"].segments}
    got = read_sr_measurements(axial["dir"] / SR_FILE)
    for g in got:
        assert g["seg_uid"] == seg_ds.SOPInstanceUID
        if g["group"].startswith("lesions"):
            assert g["segment_number"] == number["bone_marrow_lesion"]
        else:
            assert g["segment_number"] == number[g["group"]]


def test_sr_reads_back_as_tid1500_with_highdicom(axial):
    ds = pydicom.dcmread(axial["dir"] / SR_FILE)
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert ds.CompletionFlag == "COMPLETE" and ds.VerificationFlag == "UNVERIFIED"
    groups = sr.content.get_volumetric_roi_measurement_groups()
    femur = next(g for g in groups if g.tracking_identifier == "femur")
    ref = femur.referenced_segment[0].ReferencedSOPSequence[0]  # the "Referenced Segment" item
    assert ref.ReferencedSegmentNumber == 1
    assert ref.ReferencedSOPInstanceUID == pydicom.dcmread(
        axial["dir"] / SEG_FILE, stop_before_pixels=True).SOPInstanceUID
    (vol,) = femur.get_measurements()
    assert vol.unit.value == "mL" and vol.value == pytest.approx(
        np.count_nonzero(axial["seg"].array == 1) * axial["seg"].voxel_volume_mm3 / 1000)
    lesion = next(g for g in groups if g.tracking_identifier == "lesions femur")
    assert lesion.finding_sites[0].value.meaning == "Femur"
    # evidence: the source series and the SEG
    evidence = {s.SeriesInstanceUID: {i.ReferencedSOPInstanceUID for i in s.ReferencedSOPSequence}
                for st in ds.CurrentRequestedProcedureEvidenceSequence
                for s in st.ReferencedSeriesSequence}
    assert evidence[axial["written"].series_uid] == set(axial["image"].meta["sop_instance_uids"])
    seg_ds = pydicom.dcmread(axial["dir"] / SEG_FILE, stop_before_pixels=True)
    assert evidence[seg_ds.SeriesInstanceUID] == {seg_ds.SOPInstanceUID}


def test_spine_document_without_segments_gives_study_groups(axial, tmp_path):
    """Whole-study values (Cobb angle) and structures with no segment: TID 1501 groups."""
    doc = measurements_document(
        [Measurement("cobb_angle", 12.5, "deg"),
         Measurement("anterior_height", 24.0, "mm", structure="L3"),
         Measurement("wedge_ratio", 0.91, "1", structure="L3"),
         Measurement("cord_area", 80.5, "mm^2", structure="spinal_cord"),
         Measurement("odd", 1.0, "furlong", structure="L3")],
        input_info={}, tool_version="test")
    source = _source_headers(axial["written"])
    sr, skipped = build_measurement_report(doc, source)
    assert skipped == ["odd.L3: unit 'furlong' has no UCUM code in mskmri"]
    assert "PatientID" not in source[0]  # the caller's headers are not filled in
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(tmp_path / "sr.dcm"))
    groups = sr.content.get_image_measurement_groups()
    assert {g.tracking_identifier for g in groups} == {"study", "L3", "spinal_cord"}
    cobb = next(g for g in groups if g.tracking_identifier == "study").get_measurements()[0]
    assert cobb.name.value == "285285000" and cobb.unit.value == "deg" and cobb.value == 12.5
    l3 = next(g for g in groups if g.tracking_identifier == "L3")
    assert l3.finding_type.meaning == "L3 vertebra"
    assert [m.unit.value for m in l3.get_measurements()] == ["mm", "1"]


# --------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("reorient", [None, "RAS", "PIL"])
def test_oblique_source_and_reoriented_label_map(tmp_path, reorient):
    r, c = oblique_cosines(seed=11)
    written = write_series(tmp_path / "dicom", ramp((12, 10, 6)), row_cosine=list(r),
                           col_cosine=list(c), pixel_spacing=(0.8, 0.6), slice_spacing=2.0)
    image = read(tmp_path / "dicom")
    lab = np.zeros(image.shape, np.uint8)
    lab[1:6, 2:9, 1:5] = KNEE_ID["femur"]
    lab[6:11, 3:7, 0:3] = KNEE_ID["patella"]
    native = LabelVolume(lab, image.affine, labels=KNEE, schema="knee")
    given = native if reorient is None else native.reorient(reorient)
    assert isinstance(given, LabelVolume)
    doc = measurements_document([Measurement("volume", 1.0, "mL", structure="femur")],
                                input_info={}, tool_version="test")
    out = write_dicom_outputs(image, given, doc, tmp_path / "out", strict=True)
    masks = _seg_masks(tmp_path / "out" / SEG_FILE, image.meta["sop_instance_uids"], 2)
    assert np.array_equal(masks[..., 0].astype(bool), lab == 1)
    assert np.array_equal(masks[..., 1].astype(bool), lab == 3)
    ds = pydicom.dcmread(tmp_path / "out" / SEG_FILE, stop_before_pixels=True)
    iop = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose([float(v) for v in iop], [*written.row_cosine, *written.col_cosine],
                               atol=1e-6)
    # highdicom's own volume of the SEG puts every voxel at the same world point (LPS mm)
    vol = hd.seg.segread(tmp_path / "out" / SEG_FILE).get_volume(segment_numbers=[1],
                                                                  combine_segments=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    ijk = np.argwhere(np.asarray(vol.array) > 0)
    got = ijk @ vol.affine[:3, :3].T + vol.affine[:3, 3]
    want = native.voxel_to_world(np.argwhere(lab == 1)) @ lps[:3, :3]
    assert len(got) == len(want)
    assert {tuple(p) for p in np.round(got, 2)} == {tuple(p) for p in np.round(want, 2)}
    np.testing.assert_allclose(sorted(vol.spacing), sorted((2.0, 0.8, 0.6)), atol=1e-4)
    assert [s.voxels for s in out.segments] == [np.count_nonzero(lab == 1),
                                                np.count_nonzero(lab == 3)]


def test_label_map_off_the_source_grid_is_refused(axial, tmp_path):
    seg = axial["seg"]
    shifted = LabelVolume(seg.array, seg.affine @ np.array(
        [[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), labels=KNEE, schema="knee")
    with pytest.raises(GeometryError, match="not on the grid of the 8 source DICOM slices"):
        write_dicom_outputs(axial["image"], shifted, axial["doc"], tmp_path / "o", strict=True)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    # not strict (as analyze calls it): a warning, and no file at all
    res = write_dicom_outputs(axial["image"], shifted, axial["doc"], tmp_path / "o")
    assert res.files == [] and "not on the grid" in res.warnings[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


# --------------------------------------------------------------------------- bad input
def test_read_source_datasets_checks_the_files_are_those_read(axial, tmp_path):
    from mskmri.errors import DicomSeriesError
    from mskmri.io.dicom import read_source_datasets

    headers = read_source_datasets(axial["image"])
    assert [h.SOPInstanceUID for h in headers] == axial["image"].meta["sop_instance_uids"]
    assert all("PixelData" not in h for h in headers)  # headers only
    with pytest.raises(DicomSeriesError, match="not read from a DICOM series"):
        read_source_datasets(Volume(np.zeros((2, 2, 2)), np.eye(4)))
    moved = axial["image"].copy()
    moved.meta["files"] = [*moved.meta["files"][1:], moved.meta["files"][0]]
    with pytest.raises(DicomSeriesError, match="now holds SOPInstanceUID"):
        read_source_datasets(moved)


def test_negative_label_values_are_refused(axial, tmp_path):
    from mskmri.errors import LabelError

    seg = axial["seg"]
    bad = LabelVolume(seg.array.astype(np.int16) - 1, seg.affine, labels=KNEE)
    with pytest.raises(LabelError, match="negative values"):
        write_dicom_outputs(axial["image"], bad, axial["doc"], tmp_path, strict=True)
    assert list(tmp_path.iterdir()) == []


def test_non_dicom_input_writes_nothing(axial, tmp_path):
    write(axial["image"], tmp_path / "image.nii.gz")
    image = read(tmp_path / "image.nii.gz")
    res = write_dicom_outputs(image, axial["seg"], axial["doc"], tmp_path / "out")
    assert res.files == [] and res.warnings == [] and not (tmp_path / "out").exists()


def test_failure_while_saving_leaves_no_file(axial, tmp_path, monkeypatch):
    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hd.sr.Comprehensive3DSR, "save_as", boom)
    out = tmp_path / "out"
    res = write_dicom_outputs(axial["image"], axial["seg"], axial["doc"], out,
                              lesions=axial["lesions"])
    assert res.files == [] and "disk full" in res.warnings[0]
    assert sorted(p.name for p in out.iterdir()) == []  # no SEG alone, no temporary file


def test_without_highdicom_a_warning_names_the_install_command(axial, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import fails as if not installed
    res = write_dicom_outputs(axial["image"], axial["seg"], axial["doc"], tmp_path / "out")
    assert res.files == [] and "mskmri[dicom-out]" in res.warnings[0]
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_resampled_series_gets_the_sr_only(tmp_path):
    positions = np.array([[0, 0, z] for z in (0.0, 2.0, 4.0, 8.0, 10.0)])  # one slice missing
    write_series(tmp_path / "dicom", ramp((6, 5, 5)), positions=positions)
    image = read(tmp_path / "dicom", allow_resample=True)
    assert image.meta["resampled_slices"]
    lab = np.zeros(image.shape, np.uint8)
    lab[1:4, 1:4, 1:4] = 1
    seg = LabelVolume(lab, image.affine, labels=KNEE, schema="knee")
    doc = measurements_document([Measurement("volume", 0.5, "mL", structure="femur")],
                                input_info={}, tool_version="test")
    res = write_dicom_outputs(image, seg, doc, tmp_path / "out", strict=True)
    assert [p.name for p in res.files] == [SR_FILE] and "resampled" in res.warnings[0]
    (g,) = read_sr_measurements(tmp_path / "out" / SR_FILE)
    assert g["value"] == 0.5 and g["segment_number"] is None


# --------------------------------------------------------------------------- analyze
def test_analyze_knee_with_a_dicom_folder_writes_seg_and_sr(axial, tmp_path):
    pytest.importorskip("trimesh")
    from mskmri.analyze import analyze_knee

    write(axial["seg"], tmp_path / "seg.nii.gz")
    write(axial["lesions"], tmp_path / "lesions.nii.gz")
    folder = axial["written"].files[0].parent
    res = analyze_knee(folder, tmp_path / "knee", seg_path=tmp_path / "seg.nii.gz",
                       lesions_path=tmp_path / "lesions.nii.gz", meshes=False)
    assert {SEG_FILE, SR_FILE} <= set(res.files)
    doc = json.loads((tmp_path / "knee" / "measurements.json").read_text(encoding="utf-8"))
    got = read_sr_measurements(tmp_path / "knee" / SR_FILE)
    written = [m for m in doc["measurements"] if m["value"] is not None]
    assert [g["value"] for g in got] == pytest.approx([m["value"] for m in written], rel=1e-9)
    assert [g["unit"] for g in got] == [UCUM[m["unit"]] for m in written]
    masks = _seg_masks(tmp_path / "knee" / SEG_FILE, axial["image"].meta["sop_instance_uids"], 4)
    assert np.array_equal(masks[..., 0].astype(bool), axial["seg"].array == 1)
    manifest = json.loads((tmp_path / "knee" / "manifest.json").read_text(encoding="utf-8"))
    assert SEG_FILE in manifest["outputs"] and SR_FILE in manifest["outputs"]


def test_analyze_spine_with_a_dicom_folder_writes_seg_and_sr(tmp_path):
    """Sagittal synthetic series, three 16 mm bodies (L1-L3) 8 mm apart, given as --seg."""
    from mskmri.analyze_spine import analyze_spine
    from mskmri.labels import spine_labels_for

    shape = (48, 80, 9)  # columns run anterior->posterior, rows superior->inferior
    arr = np.full(shape, 100, np.int16)
    lab = np.zeros(shape, np.uint8)
    for n, value in enumerate((20, 21, 22)):
        lab[10:34, 8 + 24 * n:24 + 24 * n, 2:7] = value
    arr[lab > 0] = 400
    write_series(tmp_path / "dicom", arr, row_cosine=(0, 1, 0), col_cosine=(0, 0, -1),
                 pixel_spacing=(1.0, 1.0), slice_spacing=3.0)
    image = read(tmp_path / "dicom")
    seg = LabelVolume(lab, image.affine, labels=spine_labels_for({20, 21, 22}), schema="spine")
    write(seg, tmp_path / "seg.nii.gz")
    res = analyze_spine(tmp_path / "dicom", tmp_path / "out", seg_path=tmp_path / "seg.nii.gz")
    assert {SEG_FILE, SR_FILE} <= set(res.files)
    ds = pydicom.dcmread(tmp_path / "out" / SEG_FILE, stop_before_pixels=True)
    assert [(s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning)
            for s in ds.SegmentSequence] == [
        ("L1", "L1 vertebra"), ("L2", "L2 vertebra"), ("L3", "L3 vertebra")]
    doc = json.loads((tmp_path / "out" / "measurements.json").read_text(encoding="utf-8"))
    written = [m for m in doc["measurements"] if m["value"] is not None]
    got = read_sr_measurements(tmp_path / "out" / SR_FILE)
    # the SR groups measurements by structure, so compare them by (name, structure)
    by_key = {(g["name"], g["group"]): g["value"] for g in got}
    assert len(by_key) == len(got) == len(written)
    for m in written:
        assert by_key[(m["name"], m.get("structure"))] == pytest.approx(m["value"], rel=1e-9), m
    heights = [g for g in got if g["name"] == "middle_height"]
    assert [(g["group"], g["value"], g["unit"], g["segment_number"]) for g in heights] == [
        ("L1", 16.0, "mm", 1), ("L2", 16.0, "mm", 2), ("L3", 16.0, "mm", 3)]
    discs = [g for g in got if g["group"] == "L1-L2"]  # no disc segment: a study-level group
    assert discs and all(g["segment_number"] is None for g in discs)


# --------------------------------------------------------------------------- real data
@pytest.mark.shared_data
def test_real_multi_echo_series_one_echo(shared_data: Path, tmp_path: Path):
    folder = shared_data / "knee" / "pymskt_mese_t2_dicom"
    image = read(folder, echo=1)
    assert image.shape == (256, 256, 24)
    lab = np.zeros(image.shape, np.uint8)
    lab[60:200, 40:120, 4:20] = KNEE_ID["femur"]  # boxes: geometry is what is checked here
    lab[60:200, 140:220, 6:18] = KNEE_ID["tibia"]
    seg = LabelVolume(lab, image.affine, labels=KNEE, schema="knee")
    doc = _document(seg)
    t0 = time.perf_counter()
    res = write_dicom_outputs(image, seg, doc, tmp_path, strict=True)
    elapsed = time.perf_counter() - t0
    assert elapsed < 20.0, f"writing took {elapsed:.1f} s"
    ds = pydicom.dcmread(tmp_path / SEG_FILE)
    assert ds.StudyInstanceUID == image.meta["study_uid"]
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == image.meta["series_uid"]
    by_uid = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f
              for f in image.meta["files"]}
    assert set(by_uid) == set(image.meta["sop_instance_uids"])  # echo 1 only
    for frame in ds.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        src = pydicom.dcmread(by_uid[uid], stop_before_pixels=True)
        assert int(src.EchoNumbers) == 1
        np.testing.assert_allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in src.ImagePositionPatient], atol=1e-4)
    masks = _seg_masks(tmp_path / SEG_FILE, image.meta["sop_instance_uids"], 2)
    assert np.array_equal(masks[..., 0].astype(bool), lab == 1)
    assert np.array_equal(masks[..., 1].astype(bool), lab == 2)
    assert [s.voxels for s in res.segments] == [np.count_nonzero(lab == 1),
                                                np.count_nonzero(lab == 2)]
    got = read_sr_measurements(tmp_path / SR_FILE)
    assert got[0]["value"] == pytest.approx(doc["measurements"][0]["value"])
