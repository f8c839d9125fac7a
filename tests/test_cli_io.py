"""`mskmri info` and `mskmri convert` in-process: the real DICOM folder against SimpleITK, and
bad input (exit status 2, one line on stderr, no traceback, nothing left behind)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _dicom_factory import ramp, write_series

from mskmri.cli import main
from mskmri.io import write
from mskmri.volume import LabelVolume, Volume

MESE = "knee/pymskt_mese_t2_dicom"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------- real DICOM
def _sitk_echo(folder: Path, echo_number: int):  # -> SimpleITK.Image
    """The files of one echo read by SimpleITK's ImageSeriesReader, in InstanceNumber order
    (independent of mskmri's sorting)."""
    import pydicom
    import SimpleITK as sitk

    files = []
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if int(ds.EchoNumbers) == echo_number:
            files.append((int(ds.InstanceNumber), str(f)))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([f for _, f in sorted(files)])
    return reader.Execute()


@pytest.mark.shared_data
@pytest.mark.parametrize(("te", "echo_number"), [(6.3, 1), (25.2, 4)])
def test_convert_real_dicom_matches_simpleitk(shared_data: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              te: float, echo_number: int) -> None:
    import SimpleITK as sitk

    folder = shared_data / MESE
    out = tmp_path / "echo.nii.gz"
    rc, _, err = _run(capsys, "-q", "convert", str(folder), str(out), "--echo", str(te))
    assert rc == 0, err
    ours = nib.load(out)  # read back with nibabel, not with mskmri
    arr = np.asarray(ours.dataobj)
    assert arr.shape == (256, 256, 24) and arr.dtype == np.int16
    np.testing.assert_allclose(ours.header.get_zooms(), (0.625, 0.625, 4.0), atol=1e-3)

    img = _sitk_echo(folder, echo_number)
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    ref_aff = np.eye(4)
    ref_aff[:3, :3] = direction * np.asarray(img.GetSpacing())[None, :]
    ref_aff[:3, 3] = img.GetOrigin()
    ref_aff = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ref_aff  # ITK's LPS -> RAS
    np.testing.assert_allclose(ours.affine, ref_aff, atol=1e-3)

    # same values at the same world points, for every voxel
    idx = np.argwhere(np.ones(arr.shape, bool))
    world_ras = idx @ ours.affine[:3, :3].T + ours.affine[:3, 3]
    ref_idx = (world_ras - ref_aff[:3, 3]) @ np.linalg.inv(ref_aff[:3, :3]).T
    np.testing.assert_allclose(ref_idx, np.round(ref_idx), atol=1e-2)
    ref_idx = np.round(ref_idx).astype(int)
    ref = sitk.GetArrayFromImage(img)  # [k, j, i]
    np.testing.assert_array_equal(arr[tuple(idx.T)], ref[ref_idx[:, 2], ref_idx[:, 1], ref_idx[:, 0]])


@pytest.mark.shared_data
def test_info_real_dicom_lists_echoes(shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = str(shared_data / MESE)
    rc, out, _ = _run(capsys, "info", folder)
    assert rc == 0
    assert "96 files" in out and "echo times: 6.312, 12.624, 18.936, 25.248 ms" in out
    assert out.count("256x256x24  0.625 x 0.625 x 4 mm") == 4
    assert "--echo" in out  # the note on how to choose one

    rc, out, _ = _run(capsys, "info", folder, "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["schema"] == "mskmri/info/1" and info["format"] == "dicom"
    (series,) = info["dicom_series"]
    np.testing.assert_allclose(series["echo_times_ms"], (6.3, 12.6, 18.9, 25.2), atol=0.06)
    assert series["n_files"] == 96 and series["number"] == 8
    assert [s["shape"] for s in series["stacks"]] == [[256, 256, 24]] * 4
    assert info["image"] is None

    rc, out, _ = _run(capsys, "info", folder, "--json", "--echo", "18.9")
    im = json.loads(out)["image"]
    assert im["shape"] == [256, 256, 24] and im["meta"]["echo_time_ms"] == 18.936
    np.testing.assert_allclose(im["spacing_mm"], (0.625, 0.625, 4.0), atol=1e-3)
    assert im["orientation"] == "PIR" and im["kind"] == "image"


@pytest.mark.shared_data
def test_convert_real_dicom_without_echo(shared_data: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.nii.gz"
    rc, _, err = _run(capsys, "convert", str(shared_data / MESE), str(out))
    assert rc == 2 and "--echo" in err and err.count("\n") == 1
    assert not out.exists()


# ---------------------------------------------------------------------------- synthetic
def test_convert_formats_and_sidecar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lab = LabelVolume(np.array([0, 1, 2, 1] * 2).reshape(2, 2, 2), np.diag([0.5, 0.5, 2, 1]),
                      {1: "femur", 2: "tibia"}, schema="knee")
    write(lab, tmp_path / "seg.nii.gz")
    rc, _, err = _run(capsys, "-q", "convert", str(tmp_path / "seg.nii.gz"),
                      str(tmp_path / "seg.nrrd"))
    assert rc == 0, err
    assert json.loads((tmp_path / "seg.json").read_text())["labels"] == {"1": "femur",
                                                                          "2": "tibia"}
    rc, out, _ = _run(capsys, "info", str(tmp_path / "seg.nrrd"))
    assert "femur" in out and "label map" in out


def test_convert_synthetic_dicom(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arr = ramp((8, 6, 5))
    write_series(tmp_path / "dcm", arr)
    rc, _, err = _run(capsys, "-q", "convert", str(tmp_path / "dcm"), str(tmp_path / "o.mha"))
    assert rc == 0, err
    import SimpleITK as sitk

    back = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "o.mha")))
    np.testing.assert_array_equal(back.transpose(2, 1, 0), arr)


# ---------------------------------------------------------------------------- bad input
def _bad(kind: str, tmp: Path) -> list[str]:
    """Arguments for one kind of bad input; inputs are made in ``tmp / 'in'``."""
    src = tmp / "in"
    src.mkdir(parents=True)
    if kind == "missing":
        return [str(src / "nope.nii.gz")]
    if kind == "truncated":
        write(Volume(np.random.default_rng(0).normal(size=(16, 16, 16)), np.eye(4)),
              src / "full.nii.gz")
        blob = (src / "full.nii.gz").read_bytes()
        (src / "cut.nii.gz").write_bytes(blob[: len(blob) // 3])
        return [str(src / "cut.nii.gz")]
    if kind == "text-as-nifti":
        (src / "t.nii.gz").write_text("definitely not\na NIfTI image\n")
        return [str(src / "t.nii.gz")]
    if kind == "random-file":
        (src / "blob.dat").write_bytes(np.random.default_rng(2).bytes(4096))
        return [str(src / "blob.dat")]
    if kind == "no-dicom-folder":
        (src / "notes.txt").write_text("nothing here")
        (src / "sub").mkdir()
        return [str(src)]
    if kind == "two-series":
        write_series(src, ramp((4, 4, 3)), series_number=1, names=["a1", "a2", "a3"])
        write_series(src, ramp((4, 4, 3)), series_number=2, names=["b1", "b2", "b3"])
        return [str(src)]
    if kind == "four-d":
        nib.save(nib.Nifti1Image(np.ones((3, 3, 3, 2), np.int16), np.eye(4)), src / "t.nii.gz")
        return [str(src / "t.nii.gz")]
    if kind == "gantry-tilt":
        pos = np.array([[0.6 * k, 0.0, 2.0 * k] for k in range(3)])
        write_series(src, ramp((4, 4, 3)), positions=pos)
        return [str(src)]
    raise AssertionError(kind)


BAD = {
    "missing": "does not exist",
    "truncated": "could not be read as NIfTI",
    "text-as-nifti": "really a NIfTI",
    "random-file": "not an image format",
    "no-dicom-folder": "holds no DICOM images",
    "two-series": "--series",
    "four-d": "must be 3-D, not 4-D",
    "gantry-tilt": "gantry tilt",
}


#: info lists several series, or a stack and its problem, instead of refusing them
_INFO_LISTS = ("two-series", "gantry-tilt")


@pytest.mark.parametrize(
    ("command", "kind"),
    [("convert", k) for k in sorted(BAD)] + [("info", k) for k in sorted(BAD) if k not in _INFO_LISTS],
)
def test_bad_input_exit_2_one_line_nothing_written(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   command: str, kind: str) -> None:
    src = _bad(kind, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = [command, *src] + ([str(out_dir / "o.nii.gz")] if command == "convert" else [])
    rc, out, err = _run(capsys, *argv)
    assert rc == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mskmri: error: ") and BAD[kind] in lines[0]
    assert "Traceback" not in err and out == ""
    assert list(out_dir.iterdir()) == []  # no output, no temporary file


def test_info_lists_two_series_and_a_tilted_stack(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    src = _bad("two-series", tmp_path)
    rc, out, _ = _run(capsys, "info", *src)
    assert rc == 0 and "--series 1" in out and "--series 2" in out
    rc, out, _ = _run(capsys, "info", *src, "--series", "2", "--json")
    assert rc == 0 and json.loads(out)["image"]["meta"]["series_number"] == 2
    tilted = _bad("gantry-tilt", tmp_path / "t")
    rc, out, _ = _run(capsys, "info", *tilted)
    assert rc == 0 and "problem: its slices are not stacked along the slice normal" in out


def test_bad_output_extension_is_refused_before_reading(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    write(Volume(np.zeros((2, 2, 2)), np.eye(4)), tmp_path / "a.nii.gz")
    rc, _, err = _run(capsys, "convert", str(tmp_path / "a.nii.gz"), str(tmp_path / "a.png"))
    assert rc == 2 and "give an output ending in .nii.gz" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]


def test_failure_while_writing_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from mskmri.errors import UnsupportedFormatError
    from mskmri.io import nifti

    write(Volume(np.zeros((2, 2, 2)), np.eye(4)), tmp_path / "a.nrrd")

    def half_write(volume: Volume, path: Path) -> None:
        path.write_bytes(b"partial")
        raise UnsupportedFormatError("disk full while writing; free space and retry")

    monkeypatch.setattr(nifti, "write_nifti", half_write)
    out_dir = tmp_path / "out"
    rc, _, err = _run(capsys, "convert", str(tmp_path / "a.nrrd"), str(out_dir / "o.nii.gz"))
    assert rc == 2 and "disk full" in err
    assert list(out_dir.iterdir()) == []


def test_no_spacing_nifti_converts_without_inventing_geometry(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = nib.Nifti1Image(np.ones((3, 3, 3), np.int16), None)
    nib.save(img, tmp_path / "raw.nii.gz")
    rc, _, _ = _run(capsys, "-q", "convert", str(tmp_path / "raw.nii.gz"), str(tmp_path / "c.nii.gz"))
    assert rc == 0
    hdr = nib.load(tmp_path / "c.nii.gz").header
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (0, 0)
    rc, out, _ = _run(capsys, "info", str(tmp_path / "c.nii.gz"))
    assert "geometry    UNKNOWN" in out
