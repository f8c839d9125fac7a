"""DICOM series reading: synthetic series with hand-computed answers first, the real
multi-echo knee series (``../shared/data/knee/pymskt_mese_t2_dicom``) second."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from _dicom_factory import oblique_cosines, ramp, write_series

from mskmri.errors import (
    DicomSeriesError,
    GeometryError,
    InputNotFoundError,
    UnsupportedFormatError,
)
from mskmri.io import read
from mskmri.io.dicom import (
    POSITION_ATOL_MM,
    SPACING_RTOL,
    is_dicom_file,
    list_series,
    read_dicom,
)

SHAPE = (8, 6, 5)  # columns, rows, slices: all different, so a swapped axis cannot pass


def _all_voxels(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return i.ravel(), j.ravel(), k.ravel()


# ---------------------------------------------------------------------------- geometry
def test_oblique_series_values_and_world_coordinates_exact(tmp_path: Path) -> None:
    r, c = oblique_cosines()
    arr = ramp(SHAPE)
    w = write_series(tmp_path, arr, row_cosine=r, col_cosine=c, slice_spacing=1.3,
                     pixel_spacing=(0.7, 0.9), echo_time=12.5, description="oblique")
    vol = read_dicom(tmp_path)
    assert vol.shape == SHAPE
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, arr)
    # spacing: columns 0.9, rows 0.7 (PixelSpacing is row-first), slices 1.3 from positions
    np.testing.assert_allclose(vol.spacing, (0.9, 0.7, 1.3), atol=1e-5)
    assert vol.voxel_volume_mm3 == pytest.approx(0.9 * 0.7 * 1.3, rel=1e-5)
    i, j, k = _all_voxels(SHAPE)
    expected = w.world_ras(i, j, k)
    np.testing.assert_allclose(vol.voxel_to_world(np.stack([i, j, k], 1)), expected, atol=1e-4)
    assert vol.geometry_known
    assert vol.meta["echo_time_ms"] == 12.5
    assert vol.meta["description"] == "oblique"
    assert vol.meta["slice_spacing_mm"] == pytest.approx(1.3, abs=1e-5)
    assert vol.meta["slice_thickness_mm"] == 3.0  # recorded, not used as spacing
    assert vol.meta["files"] == [str(f) for f in w.files]


def test_shuffled_files_and_instance_numbers_sort_along_normal(tmp_path: Path) -> None:
    r, c = oblique_cosines(3)
    arr = ramp(SHAPE)
    rng = np.random.default_rng(0)
    names = [f"{x}.dcm" for x in rng.permutation(["q", "b", "z", "a", "m"])]
    instance = [5, 1, 4, 2, 3]  # not in position order either
    w = write_series(tmp_path, arr, row_cosine=r, col_cosine=c, names=names,
                     instance_numbers=instance)
    vol = read_dicom(tmp_path)
    np.testing.assert_array_equal(vol.array, arr)
    i, j, k = _all_voxels(SHAPE)
    np.testing.assert_allclose(vol.voxel_to_world(np.stack([i, j, k], 1)),
                               w.world_ras(i, j, k), atol=1e-4)


def test_slices_written_against_the_normal_are_reversed(tmp_path: Path) -> None:
    arr = ramp(SHAPE)
    pos = np.array([[0.0, 0.0, -2.0 * k] for k in range(SHAPE[2])])  # descending along +z
    write_series(tmp_path, arr, positions=pos)
    vol = read_dicom(tmp_path)
    np.testing.assert_array_equal(vol.array, arr[:, :, ::-1])
    assert vol.affine[2, 2] == pytest.approx(2.0)  # axis 2 increases along the normal (+S)
    assert vol.origin[2] == pytest.approx(-8.0)


def test_axis_order_matches_orientation_codes(tmp_path: Path) -> None:
    # r = +x (LPS Left), c = +y (Posterior), n = +z (Superior) -> RAS codes L, P, S
    write_series(tmp_path, ramp(SHAPE))
    vol = read_dicom(tmp_path)
    assert vol.orientation == ("L", "P", "S")
    assert list_series(tmp_path)[0].orientation == "LPS"


def test_agrees_with_simpleitk_and_highdicom_on_oblique_series(tmp_path: Path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    r, c = oblique_cosines(11)
    arr = ramp(SHAPE)
    w = write_series(tmp_path, arr, row_cosine=r, col_cosine=c, slice_spacing=2.2)
    vol = read_dicom(tmp_path)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in w.files])
    img = reader.Execute()
    i, j, k = _all_voxels(SHAPE)
    lps = vol.voxel_to_world(np.stack([i, j, k], 1)) * np.array([-1.0, -1.0, 1.0])
    ref = sitk.GetArrayFromImage(img)  # [k, j, i]
    idx = np.array([img.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in lps])
    np.testing.assert_allclose(idx, np.round(idx), atol=1e-3)
    idx = np.round(idx).astype(int)
    np.testing.assert_array_equal(vol.array[i, j, k], ref[idx[:, 2], idx[:, 1], idx[:, 0]])

    hd = pytest.importorskip("highdicom")
    import pydicom

    hvol = hd.get_volume_from_series([pydicom.dcmread(f) for f in w.files], dtype=np.int16)
    hidx = (np.linalg.inv(hvol.affine) @ np.c_[lps, np.ones(len(lps))].T).T[:, :3]
    np.testing.assert_allclose(hidx, np.round(hidx), atol=1e-3)
    hidx = np.round(hidx).astype(int)
    np.testing.assert_array_equal(vol.array[i, j, k], hvol.array[hidx[:, 0], hidx[:, 1], hidx[:, 2]])


# ---------------------------------------------------------------------------- grouping
def test_multi_echo_series_is_split_by_echo(tmp_path: Path) -> None:
    uid = "1.2.826.0.1.3680043.8.498.100"
    e1, e2 = ramp(SHAPE), ramp(SHAPE, start=1000)
    write_series(tmp_path, e1, series_uid=uid, echo_time=10.0, echo_number=1,
                 names=[f"e1_{k}.dcm" for k in range(5)])
    write_series(tmp_path, e2, series_uid=uid, echo_time=20.0, echo_number=2,
                 names=[f"e2_{k}.dcm" for k in range(5)])
    (info,) = list_series(tmp_path)
    assert info.echo_times_ms == (10.0, 20.0)
    assert info.echo_numbers == (1, 2)
    assert info.n_files == 10 and info.n_slices == 5
    assert [s.selector for s in info.stacks] == ["1:1", "1:2"]
    with pytest.raises(DicomSeriesError, match="--echo") as exc:
        read_dicom(tmp_path)
    assert "10, 20 ms" in str(exc.value)
    np.testing.assert_array_equal(read_dicom(tmp_path, echo=20.0).array, e2)
    np.testing.assert_array_equal(read_dicom(tmp_path, echo=20.04).array, e2)  # within 0.1 ms
    np.testing.assert_array_equal(read_dicom(tmp_path, echo=1).array, e1)  # echo number
    np.testing.assert_array_equal(read_dicom(tmp_path, series="1:2").array, e2)
    with pytest.raises(DicomSeriesError, match="no echo 15"):
        read_dicom(tmp_path, echo=15)
    assert read(tmp_path, echo=10).meta["echo_time_ms"] == 10.0


def test_a_file_selects_its_own_series_and_echo(tmp_path: Path) -> None:
    uid = "1.2.826.0.1.3680043.8.498.101"
    write_series(tmp_path, ramp(SHAPE), series_uid=uid, echo_time=10.0,
                 names=[f"e1_{k}.dcm" for k in range(5)])
    w2 = write_series(tmp_path, ramp(SHAPE, 500), series_uid=uid, echo_time=20.0,
                      names=[f"e2_{k}.dcm" for k in range(5)])
    vol = read_dicom(w2.files[2])
    assert vol.meta["echo_time_ms"] == 20.0
    assert read_dicom(w2.files[2], echo=10).meta["echo_time_ms"] == 10.0


def test_two_series_need_a_choice(tmp_path: Path) -> None:
    a = write_series(tmp_path, ramp(SHAPE), series_number=3, description="sag",
                     names=[f"a{k}.dcm" for k in range(5)])
    b = write_series(tmp_path, ramp(SHAPE, 700), series_number=5, description="cor",
                     names=[f"b{k}.dcm" for k in range(5)])
    infos = list_series(tmp_path)
    assert [s.number for s in infos] == [3, 5]
    assert [s.selector for s in infos] == ["3", "5"]
    with pytest.raises(DicomSeriesError, match="--series") as exc:
        read_dicom(tmp_path)
    msg = str(exc.value)
    assert "2 DICOM series" in msg and "'sag'" in msg and "'cor'" in msg
    assert "\n" not in msg
    assert read_dicom(tmp_path, series="5").meta["description"] == "cor"
    assert read_dicom(tmp_path, series=3).meta["description"] == "sag"
    assert read_dicom(tmp_path, series=b.series_uid).meta["series_number"] == 5
    assert read_dicom(tmp_path, series="2").meta["series_number"] == 5  # no number 2: index
    assert read_dicom(tmp_path, series="[1]").meta["series_number"] == 3
    assert read_dicom(tmp_path, series="[2]").meta["series_number"] == 5
    assert read_dicom(a.files[0]).meta["series_number"] == 3  # a file picks its series
    with pytest.raises(DicomSeriesError, match="no DICOM series '9'"):
        read_dicom(tmp_path, series="9")


def test_stacks_with_different_orientations_need_series_colon_stack(tmp_path: Path) -> None:
    uid = "1.2.826.0.1.3680043.8.498.102"
    axial = write_series(tmp_path, ramp(SHAPE), series_uid=uid, series_number=7,
                         names=[f"ax{k}.dcm" for k in range(5)])
    write_series(tmp_path, ramp(SHAPE, 300), series_uid=uid, series_number=7,
                 row_cosine=(0, 1, 0), col_cosine=(0, 0, -1),
                 names=[f"sag{k}.dcm" for k in range(5)])
    (info,) = list_series(tmp_path)
    assert len(info.stacks) == 2 and info.orientation is None  # they differ
    with pytest.raises(DicomSeriesError, match="SERIES:STACK"):
        read_dicom(tmp_path)
    v1 = read_dicom(tmp_path, series="7:1")
    v2 = read_dicom(tmp_path, series="7:2")
    assert {v1.meta["files"][0], v2.meta["files"][0]} >= {str(axial.files[0])}
    assert {"".join(v1.orientation), "".join(v2.orientation)} == {"LPS", "PIR"}  # sagittal: n = r x c = -x_LPS = Right
    with pytest.raises(DicomSeriesError, match="not 3"):
        read_dicom(tmp_path, series="7:3")


def test_duplicate_positions_split_by_acquisition_number(tmp_path: Path) -> None:
    uid = "1.2.826.0.1.3680043.8.498.103"
    write_series(tmp_path, ramp(SHAPE), series_uid=uid, extra={"AcquisitionNumber": 1},
                 names=[f"a1_{k}.dcm" for k in range(5)])
    write_series(tmp_path, ramp(SHAPE, 900), series_uid=uid, extra={"AcquisitionNumber": 2},
                 names=[f"a2_{k}.dcm" for k in range(5)])
    (info,) = list_series(tmp_path)
    assert [s.split_by for s in info.stacks] == [(("AcquisitionNumber", "1"),),
                                                 (("AcquisitionNumber", "2"),)]
    np.testing.assert_array_equal(read_dicom(tmp_path, series="1:2").array, ramp(SHAPE, 900))


def test_duplicates_nothing_tells_apart_are_refused(tmp_path: Path) -> None:
    uid = "1.2.826.0.1.3680043.8.498.104"
    write_series(tmp_path, ramp(SHAPE), series_uid=uid, names=[f"a{k}.dcm" for k in range(5)])
    write_series(tmp_path, ramp(SHAPE), series_uid=uid, names=[f"b{k}.dcm" for k in range(5)])
    with pytest.raises(DicomSeriesError, match="share a position"):
        read_dicom(tmp_path)


def test_nested_subfolders_and_junk_files(tmp_path: Path) -> None:
    arr = ramp(SHAPE)
    names = ["a/1.dcm", "a/b/2", "c/3.IMA", "c/d/e/4.dcm", "5.dcm"]
    write_series(tmp_path, arr, names=names)
    (tmp_path / "README.txt").write_text("not dicom")
    (tmp_path / "a" / "notes.dcm").write_text("a text file with a .dcm name")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "junk.bin").write_bytes(np.random.default_rng(1).bytes(500))
    np.testing.assert_array_equal(read_dicom(tmp_path).array, arr)
    assert list_series(tmp_path)[0].n_files == 5


# ---------------------------------------------------------------------------- refusals
def test_gantry_tilt_is_refused(tmp_path: Path) -> None:
    # each slice 0.5 mm further along x: positions are not along the normal (+z)
    pos = np.array([[0.5 * k, 0.0, 2.0 * k] for k in range(SHAPE[2])])
    write_series(tmp_path, ramp(SHAPE), positions=pos)
    with pytest.raises(DicomSeriesError, match="gantry tilt of about 14.04 degrees"):
        read_dicom(tmp_path)
    with pytest.raises(DicomSeriesError, match="tilt"):  # resampling does not undo tilt
        read_dicom(tmp_path, allow_resample=True)
    assert "tilt" in (list_series(tmp_path)[0].stacks[0].problem or "")


def test_small_in_plane_jitter_is_within_tolerance(tmp_path: Path) -> None:
    pos = np.array([[0.02 * (k % 2), 0.0, 2.0 * k] for k in range(SHAPE[2])])
    assert 0.02 < POSITION_ATOL_MM
    write_series(tmp_path, ramp(SHAPE), positions=pos)
    assert read_dicom(tmp_path).shape == SHAPE
    with pytest.raises(DicomSeriesError, match="tilt"):
        read_dicom(tmp_path, position_atol_mm=0.01)


def _linear_in_z(z: np.ndarray) -> np.ndarray:
    """(8, 6, n) int16 slices whose value is 10 x (slice position in mm) + 5 x column, so
    linear interpolation along the slices is exact."""
    cols = np.arange(SHAPE[0])[:, None, None]
    return (10 * z[None, None, :] + 5 * cols + np.zeros((1, SHAPE[1], 1))).astype(np.int16)


def test_missing_slice_refused_or_interpolated(tmp_path: Path) -> None:
    z = np.array([0.0, 1.0, 2.0, 4.0, 5.0])  # the slice at 3 mm is missing
    write_series(tmp_path, _linear_in_z(z), positions=np.c_[np.zeros((5, 2)), z])
    with pytest.raises(DicomSeriesError, match="1 slice\\(s\\) are missing") as exc:
        read_dicom(tmp_path)
    assert "--allow-resample" in str(exc.value)
    vol = read_dicom(tmp_path, allow_resample=True)
    assert vol.shape == (8, 6, 6)
    np.testing.assert_allclose(vol.spacing, (0.9, 0.7, 1.0), atol=1e-6)
    np.testing.assert_allclose(vol.array, _linear_in_z(np.arange(6.0)), atol=1e-4)
    assert vol.meta["resampled_slices"] and vol.array.dtype == np.float32
    assert vol.meta["original_slice_positions_mm"] == [0.0, 1.0, 2.0, 4.0, 5.0]


def test_non_uniform_spacing_refused_or_resampled(tmp_path: Path) -> None:
    z = np.array([0.0, 1.0, 2.0, 3.5, 5.0])  # steps 1, 1, 1.5, 1.5
    write_series(tmp_path, _linear_in_z(z), positions=np.c_[np.zeros((5, 2)), z])
    with pytest.raises(DicomSeriesError, match="not uniform \\(steps from 1.000 to 1.500 mm"):
        read_dicom(tmp_path)
    vol = read_dicom(tmp_path, allow_resample=True)
    # median step 1.25 mm over 5 mm: 5 slices at 0, 1.25, ..., 5 (first and last kept)
    assert vol.shape == (8, 6, 5)
    assert vol.spacing[2] == pytest.approx(1.25)
    assert vol.origin[2] == pytest.approx(0.0)
    z_new = np.arange(5) * 1.25  # 12.5 steps are not int16-exact: expected as float
    expected = 10 * z_new[None, None, :] + 5 * np.arange(8)[:, None, None] + np.zeros((8, 6, 5))
    np.testing.assert_allclose(vol.array, expected, atol=1e-4)


def test_spacing_tolerance_is_a_visible_option(tmp_path: Path) -> None:
    z = np.array([0.0, 1.0, 2.03, 3.0, 4.0])  # 3 % off the grid
    write_series(tmp_path, ramp(SHAPE), positions=np.c_[np.zeros((5, 2)), z])
    assert SPACING_RTOL < 0.03
    with pytest.raises(DicomSeriesError, match="not uniform"):
        read_dicom(tmp_path)
    assert read_dicom(tmp_path, spacing_rtol=0.05).spacing[2] == pytest.approx(1.0)


def test_damaged_orientation_is_a_geometry_error(tmp_path: Path) -> None:
    write_series(tmp_path, ramp(SHAPE), row_cosine=(1, 0, 0), col_cosine=(0.1, 1, 0))
    with pytest.raises(GeometryError, match="not two orthogonal unit vectors"):
        read_dicom(tmp_path)


def test_no_position_means_no_geometry(tmp_path: Path) -> None:
    arr = ramp(SHAPE)
    write_series(tmp_path, arr, with_geometry=False, instance_numbers=[1, 2, 3, 4, 5])
    vol = read_dicom(tmp_path)
    assert not vol.geometry_known
    np.testing.assert_array_equal(vol.array, arr)
    with pytest.raises(GeometryError, match="no voxel spacing"):
        vol.require_geometry("a volume")


def test_single_slice_is_flagged_2d(tmp_path: Path) -> None:
    write_series(tmp_path, ramp((8, 6, 1)))
    vol = read_dicom(tmp_path)
    assert vol.shape == (8, 6, 1) and vol.meta["was_2d"]
    assert vol.spacing[2] == pytest.approx(3.0)  # SliceThickness is all one slice has


# ---------------------------------------------------------------------------- values
def test_rescale_slope_intercept_float(tmp_path: Path) -> None:
    arr = ramp(SHAPE)
    write_series(tmp_path, arr, slope=2.5, intercept=-10)
    vol = read_dicom(tmp_path)
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.array, arr * 2.5 - 10, rtol=0, atol=1e-3)
    assert vol.meta["rescale_applied"]


def test_rescale_per_slice_and_whole_numbers_stay_integer(tmp_path: Path) -> None:
    arr = ramp(SHAPE)
    write_series(tmp_path, arr, slope=[1, 2, 1, 2, 1], intercept=-1024)
    vol = read_dicom(tmp_path)
    assert vol.array.dtype == np.int16
    expected = arr.astype(np.int64) * np.array([1, 2, 1, 2, 1])[None, None, :] - 1024
    np.testing.assert_array_equal(vol.array, expected)


# ---------------------------------------------------------------------------- bad input
def test_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(DicomSeriesError, match="holds no DICOM images \\(1 files looked at"):
        read_dicom(tmp_path)
    with pytest.raises(DicomSeriesError, match="holds no DICOM"):
        list_series(tmp_path)


def test_not_dicom_file_and_missing_path(tmp_path: Path) -> None:
    f = tmp_path / "x.dcm"
    f.write_text("not a dicom file")
    assert not is_dicom_file(f)
    with pytest.raises(UnsupportedFormatError, match="not a DICOM image file"):
        read_dicom(f)
    with pytest.raises(InputNotFoundError):
        read_dicom(tmp_path / "nope")


def test_is_dicom_file(tmp_path: Path) -> None:
    w = write_series(tmp_path / "s", ramp(SHAPE))
    assert is_dicom_file(w.files[0])
    assert not is_dicom_file(tmp_path / "s")
    assert not is_dicom_file(tmp_path / "missing.dcm")


def test_truncated_pixel_data_is_a_clear_error(tmp_path: Path) -> None:
    w = write_series(tmp_path, ramp(SHAPE))
    data = w.files[2].read_bytes()
    w.files[2].write_bytes(data[:-40])
    with pytest.raises(UnsupportedFormatError, match="pixel data could not be read"):
        read_dicom(tmp_path)


# ---------------------------------------------------------------------------- real data
MESE = "knee/pymskt_mese_t2_dicom"
MESE_TE_MS = (6.3, 12.6, 18.9, 25.2)


@pytest.mark.shared_data
def test_real_multi_echo_folder_lists_four_echoes(shared_data: Path) -> None:
    folder = shared_data / MESE
    assert len(os.listdir(folder)) == 96
    (info,) = list_series(folder)
    assert info.n_files == 96
    np.testing.assert_allclose(info.echo_times_ms, MESE_TE_MS, atol=0.06)
    assert info.echo_numbers == (1, 2, 3, 4)
    assert len(info.stacks) == 4 and all(s.n_slices == 24 for s in info.stacks)
    assert all(s.problem is None for s in info.stacks)
    assert info.modality == "MR" and info.description == "T2MAP"


@pytest.mark.shared_data
@pytest.mark.parametrize("te", MESE_TE_MS)
def test_real_multi_echo_reads_each_echo(shared_data: Path, te: float) -> None:
    vol = read(shared_data / MESE, echo=te)
    assert vol.shape == (256, 256, 24)
    np.testing.assert_allclose(vol.spacing, (0.625, 0.625, 4.0), atol=1e-3)
    assert vol.meta["echo_time_ms"] == pytest.approx(te, abs=0.06)
    assert vol.meta["slice_thickness_mm"] == 3.0 and vol.meta["n_files"] == 24
    assert vol.array.dtype == np.int16 and vol.array.max() > 1000


@pytest.mark.shared_data
def test_real_multi_echo_without_echo_is_refused(shared_data: Path) -> None:
    with pytest.raises(DicomSeriesError, match="4 echoes.*--echo"):
        read(shared_data / MESE)


def test_copies_of_the_same_image_are_read_once(tmp_path: Path) -> None:
    arr = ramp(SHAPE)
    w = write_series(tmp_path / "a", arr)
    (tmp_path / "backup").mkdir()
    for f in w.files[:2]:
        (tmp_path / "backup" / f.name).write_bytes(f.read_bytes())
    np.testing.assert_array_equal(read_dicom(tmp_path).array, arr)


def test_file_without_preamble_is_read(tmp_path: Path) -> None:
    # old "bare" DICOM: no 128-byte preamble, no DICM, no file meta
    import pydicom

    w = write_series(tmp_path / "src", ramp((8, 6, 3)))
    for f in w.files:
        ds = pydicom.dcmread(f)
        ds.preamble = None
        del ds.file_meta
        ds.save_as(tmp_path / f.name, implicit_vr=True, little_endian=True)
    bare = tmp_path / w.files[0].name
    assert bare.read_bytes()[:2] == b"\x08\x00" and is_dicom_file(bare)
    np.testing.assert_array_equal(read_dicom(bare).array, ramp((8, 6, 3)))
