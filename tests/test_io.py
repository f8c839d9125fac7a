"""NIfTI / NRRD / MHA reading and writing: random-orientation round trips, geometry checked
against nibabel and SimpleITK directly, bad files, atomic writes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import random_orientation_affine

from mskmri.errors import (
    DimensionError,
    GeometryError,
    InputNotFoundError,
    LabelError,
    UnsupportedFormatError,
)
from mskmri.io import atomic_path, read, read_labels, sidecar_path, write
from mskmri.io.describe import describe, format_description
from mskmri.volume import LabelVolume, Volume

FORMATS = (".nii.gz", ".nii", ".nrrd", ".mha")


def _oblique(seed: int, spacing=(0.7, 0.4, 1.2)) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    aff = np.eye(4)
    aff[:3, :3] = q * np.asarray(spacing)[None, :]
    aff[:3, 3] = (-30.0, 12.5, 80.0)
    return aff


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("ext", FORMATS)
@pytest.mark.parametrize("seed", range(4))
def test_random_orientation_round_trip(tmp_path: Path, ext: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    aff = random_orientation_affine(rng, spacing=(0.7, 0.4, 0.5))
    arr = rng.normal(size=(5, 6, 7)).astype(np.float32)
    vol = Volume(arr, aff)
    out = write(vol, tmp_path / f"img{ext}")
    back = read(out)
    assert back.same_geometry(vol, atol=1e-5)
    assert back.orientation == vol.orientation
    np.testing.assert_array_equal(back.array, arr)  # same grid: same values at same world points
    assert back.geometry_known


@pytest.mark.parametrize("ext", FORMATS)
def test_oblique_round_trip_and_world_points(tmp_path: Path, ext: str) -> None:
    aff = _oblique(2)
    arr = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    back = read(write(Volume(arr, aff), tmp_path / f"obl{ext}"))
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, arr)
    idx = np.argwhere(np.ones(arr.shape, bool))
    # NIfTI's qform stores float32 quaternions: allow 1e-4 mm
    np.testing.assert_allclose(back.voxel_to_world(idx), Volume(arr, aff).voxel_to_world(idx),
                               atol=1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_nifti_geometry_matches_nibabel_and_itk_matches_simpleitk(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(10 + seed)
    aff = random_orientation_affine(rng)
    arr = rng.integers(0, 100, size=(4, 5, 6)).astype(np.int16)
    write(Volume(arr, aff), tmp_path / "a.nii.gz")
    img = nib.load(tmp_path / "a.nii.gz")
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj), arr)
    write(Volume(arr, aff), tmp_path / "a.nrrd")
    simg = sitk.ReadImage(str(tmp_path / "a.nrrd"))
    # world point of voxel (1, 2, 3) in ITK's LPS equals ours after the LPS->RAS flip
    lps = np.asarray(simg.TransformIndexToPhysicalPoint((1, 2, 3)))
    np.testing.assert_allclose(lps * [-1, -1, 1], Volume(arr, aff).voxel_to_world([[1, 2, 3]])[0],
                               atol=1e-5)
    assert sitk.GetArrayFromImage(simg)[3, 2, 1] == arr[1, 2, 3]


@pytest.mark.parametrize("ext", FORMATS)
def test_label_map_round_trip_with_sidecar(tmp_path: Path, ext: str) -> None:
    rng = np.random.default_rng(4)
    arr = rng.choice([0, 1, 2, 5], size=(6, 5, 4))
    lab = LabelVolume(arr, random_orientation_affine(rng), {1: "femur", 2: "tibia", 5: "patella"},
                      schema="knee")
    path = write(lab, tmp_path / f"seg{ext}")
    side = sidecar_path(path)
    assert side.name == "seg.json" and side.is_file()
    back = read_labels(path, schema="knee")
    np.testing.assert_array_equal(back.array, arr)
    assert back.same_geometry(lab, atol=1e-5)
    assert back.labels[1] == "femur"
    info = describe(path)
    assert info["image"]["kind"] == "labelmap"
    assert [r["value"] for r in info["image"]["labels"]["values"]] == [1, 2, 5]
    assert info["image"]["labels"]["values"][0]["name"] == "femur"
    assert info["image"]["labels"]["values"][0]["voxels"] == int((arr == 1).sum())


def test_label_map_with_unknown_values_is_refused(tmp_path: Path) -> None:
    write(Volume(np.full((3, 3, 3), 77, np.int16), np.eye(4)), tmp_path / "s.nii.gz")
    with pytest.raises(LabelError, match="\\[77\\]"):
        read_labels(tmp_path / "s.nii.gz", schema="knee")


def test_reoriented_copy_reads_back_with_same_world_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    vol = Volume(rng.normal(size=(5, 6, 7)).astype(np.float32), random_orientation_affine(rng))
    ras = read(write(vol.reorient("RAS"), tmp_path / "ras.nii.gz"))
    idx = np.argwhere(np.ones(vol.shape, bool))
    ridx = np.round(ras.world_to_voxel(vol.voxel_to_world(idx))).astype(int)
    np.testing.assert_array_equal(ras.array[tuple(ridx.T)], vol.array[tuple(idx.T)])


# ---------------------------------------------------------------------------- no geometry
def test_nifti_without_qform_sform_has_no_geometry(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.int16), None)  # no affine: both codes 0
    img.header.set_zooms((2.0, 2.0, 2.0))  # pixdim alone is not trusted
    nib.save(img, tmp_path / "raw.nii.gz")
    hdr = nib.load(tmp_path / "raw.nii.gz").header
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (0, 0)
    vol = read(tmp_path / "raw.nii.gz")
    assert not vol.geometry_known
    with pytest.raises(GeometryError, match="raw.nii.gz has no voxel spacing"):
        vol.require_geometry("a volume")
    # converting does not invent geometry: codes stay 0
    write(vol, tmp_path / "copy.nii.gz")
    assert not read(tmp_path / "copy.nii.gz").geometry_known
    assert describe(tmp_path / "raw.nii.gz")["image"]["spacing_mm"] is None


def test_nrrd_without_spacing_has_no_geometry(tmp_path: Path) -> None:
    data = np.arange(8, dtype=np.uint8)
    header = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n\n"
    (tmp_path / "bare.nrrd").write_bytes(header.encode() + data.tobytes())
    vol = read(tmp_path / "bare.nrrd")
    assert vol.shape == (2, 2, 2) and not vol.geometry_known


@pytest.mark.parametrize("geometry", ["space dimension: 2\nspace directions: (0.5,0) (0,0.25)",
                                      "spacings: 0.5 0.25"])
def test_two_d_nrrd_with_spacing_has_geometry(tmp_path: Path, geometry: str) -> None:
    # SimpleITK keeps no trace of a 2-D NRRD's spacing fields in its metadata: read the header
    data = np.arange(6, dtype=np.uint8)
    header = f"NRRD0004\n# comment: x\ntype: uint8\ndimension: 2\nsizes: 3 2\n{geometry}\nencoding: raw\n\n"
    (tmp_path / "slice.nrrd").write_bytes(header.encode() + data.tobytes())
    vol = read(tmp_path / "slice.nrrd")
    assert vol.geometry_known and vol.meta["was_2d"]
    assert vol.spacing[:2] == pytest.approx((0.5, 0.25))
    (tmp_path / "bare.nrrd").write_bytes(header.replace(geometry + "\n", "").encode()
                                         + data.tobytes())
    assert not read(tmp_path / "bare.nrrd").geometry_known


def test_two_d_nifti_is_flagged(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.ones((4, 5), np.int16), np.eye(4)), tmp_path / "slice.nii.gz")
    vol = read(tmp_path / "slice.nii.gz")
    assert vol.shape == (4, 5, 1) and vol.meta["was_2d"]


def test_four_d_nifti_is_a_dimension_error(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 3), np.int16), np.eye(4)), tmp_path / "t.nii.gz")
    with pytest.raises(DimensionError, match="3-D, not 4-D"):
        read(tmp_path / "t.nii.gz")


# ---------------------------------------------------------------------------- bad files
def test_missing_empty_truncated_and_fake_files(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="does not exist"):
        read(tmp_path / "nope.nii.gz")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(UnsupportedFormatError, match="empty"):
        read(tmp_path / "empty.nii.gz")
    write(Volume(np.random.default_rng(0).normal(size=(20, 20, 20)), np.eye(4)),
          tmp_path / "full.nii.gz")
    blob = (tmp_path / "full.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UnsupportedFormatError, match="cut.nii.gz could not be read as NIfTI"):
        read(tmp_path / "cut.nii.gz")
    (tmp_path / "text.nii.gz").write_text("this is not an image\n")
    with pytest.raises(UnsupportedFormatError, match="really a NIfTI"):
        read(tmp_path / "text.nii.gz")
    (tmp_path / "fake.mha").write_text("hello")
    with pytest.raises(UnsupportedFormatError, match="valid NRRD/MHA"):
        read(tmp_path / "fake.mha")
    (tmp_path / "data.bin").write_bytes(np.random.default_rng(1).bytes(300))
    with pytest.raises(UnsupportedFormatError, match="not an image format"):
        read(tmp_path / "data.bin")


def test_write_refuses_unknown_extension_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFormatError, match="\\.nii\\.gz"):
        write(Volume(np.zeros((2, 2, 2)), np.eye(4)), tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- atomic writes
def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "out.nii.gz"
    target.write_text("old content")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half-written")
        raise RuntimeError("disk full")
    assert target.read_text() == "old content"
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def test_atomic_path_renames_on_success(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "sub" / "x.nii.gz") as tmp:
        assert tmp.name.startswith(".x.tmp-") and tmp.name.endswith(".nii.gz")
        tmp.write_text("done")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.nii.gz"]


def test_sidecar_path() -> None:
    assert sidecar_path("a/seg.nii.gz") == Path("a/seg.json")
    assert sidecar_path("seg.nrrd") == Path("seg.json")


# ---------------------------------------------------------------------------- describe
def test_describe_image(tmp_path: Path) -> None:
    aff = _oblique(1, spacing=(0.5, 0.5, 2.0))
    arr = np.random.default_rng(2).normal(size=(10, 11, 3)).astype(np.float32)
    write(Volume(arr, aff), tmp_path / "img.nrrd")
    info = describe(tmp_path / "img.nrrd")
    assert info["schema"] == "mskmri/info/1" and info["format"] == "nrrd"
    im = info["image"]
    assert im["kind"] == "image" and im["shape"] == [10, 11, 3] and im["dtype"] == "float32"
    np.testing.assert_allclose(im["spacing_mm"], (0.5, 0.5, 2.0), atol=1e-6)
    assert im["voxel_volume_mm3"] == pytest.approx(0.5, rel=1e-6)
    np.testing.assert_allclose(im["affine"], aff, atol=1e-5)
    np.testing.assert_allclose(im["field_of_view_mm"], (5.0, 5.5, 6.0), atol=1e-5)
    assert im["value_range"]["min"] == pytest.approx(float(arr.min()))
    assert im["labels"] is None
    text = format_description(info)
    assert "spacing     0.5 x 0.5 x 2 mm" in text and "image: 10 x 11 x 3" in text


def test_describe_integer_label_map_without_sidecar(tmp_path: Path) -> None:
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[:2] = 3
    write(Volume(arr, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "m.nii.gz")
    im = describe(tmp_path / "m.nii.gz")["image"]
    assert im["kind"] == "labelmap" and im["labels"]["names_from"] == "none"
    assert im["labels"]["values"] == [{"value": 3, "name": None, "voxels": 32,
                                       "volume_ml": pytest.approx(32 * 8 / 1000)}]


@pytest.mark.parametrize("values", [(-1, 0, 3, 5), (0, 3, 300, 70000)])
@pytest.mark.parametrize("ext", FORMATS)
def test_negative_and_large_label_values_survive(tmp_path: Path, ext: str, values) -> None:
    # regression: label maps were cast to unsigned types, wrapping -1 to 255 / 65535
    arr = np.array(values * 2, dtype=np.int32).reshape(2, 2, 2)
    back = read(write(LabelVolume(arr, np.eye(4)), tmp_path / f"neg{ext}"))
    np.testing.assert_array_equal(back.array, arr)
