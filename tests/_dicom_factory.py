"""Tiny synthetic DICOM series written with pydicom, for tests (no real data involved).

``write_series`` writes one single-frame MR file per slice from an array laid out the way
``mskmri.io.dicom`` reads it, ``array[i, j, k]`` = column ``i``, row ``j`` of slice ``k``, and
returns the exact geometry written (direction cosines and positions are rounded to six
decimals first, since DICOM stores them as decimal strings) so tests can compute the
expected world coordinates by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Written:
    """What was written: files in slice order, and the geometry in LPS (mm)."""

    files: list[Path]
    row_cosine: np.ndarray  # r: direction of increasing column index
    col_cosine: np.ndarray  # c: direction of increasing row index
    positions: np.ndarray  # (n, 3) ImagePositionPatient per slice, slice order
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    series_uid: str

    def world_ras(self, i: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
        """(N, 3) RAS+ world coordinates of voxels (i, j, k), computed from the header values."""
        row_sp, col_sp = self.pixel_spacing
        lps = (self.positions[k] + np.outer(i * col_sp, self.row_cosine)
               + np.outer(j * row_sp, self.col_cosine))
        return lps * np.array([-1.0, -1.0, 1.0])


def oblique_cosines(seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, clearly oblique pair of orthonormal direction cosines (rounded to 1e-6)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return np.round(q[:, 0], 6), np.round(q[:, 1], 6)


def _ds(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".") or "0"


def write_series(
    folder: Path,
    array: np.ndarray,
    *,
    row_cosine: Sequence[float] = (1.0, 0.0, 0.0),
    col_cosine: Sequence[float] = (0.0, 1.0, 0.0),
    positions: np.ndarray | None = None,
    origin: Sequence[float] = (10.0, -20.0, 30.0),
    slice_spacing: float = 1.5,
    pixel_spacing: tuple[float, float] = (0.7, 0.9),
    series_uid: str | None = None,
    series_number: int = 1,
    description: str = "synthetic",
    echo_time: float | None = None,
    echo_number: int | None = None,
    slope: float | Sequence[float] | None = None,
    intercept: float | Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    instance_numbers: Sequence[int] | None = None,
    extra: dict[str, object] | None = None,
    per_slice_extra: Sequence[dict[str, object]] | None = None,
    with_geometry: bool = True,
) -> Written:
    """Write ``array`` (cols, rows, n) as n DICOM files in ``folder`` and return the geometry.

    ``positions`` (n, 3, LPS mm) defaults to ``origin + k * slice_spacing * (r x c)``.
    ``slope``/``intercept`` are written as RescaleSlope/Intercept (the stored values are
    ``array`` itself). ``names`` gives file names (relative, may hold subfolders).
    """
    folder.mkdir(parents=True, exist_ok=True)
    cols, rows, n = array.shape
    r = np.round(np.asarray(row_cosine, float), 6)
    c = np.round(np.asarray(col_cosine, float), 6)
    if positions is None:
        normal = np.cross(r, c)
        normal /= np.linalg.norm(normal)
        positions = np.asarray(origin, float) + np.outer(np.arange(n) * slice_spacing, normal)
    positions = np.round(np.asarray(positions, float), 6)
    series_uid = series_uid or generate_uid()
    study_uid = "1.2.826.0.1.3680043.8.498.1"
    for_uid = "1.2.826.0.1.3680043.8.498.2"
    files = []
    for k in range(n):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = for_uid
        ds.Modality = "MR"
        ds.Manufacturer = "mskmri-tests"
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.InstanceNumber = int(instance_numbers[k]) if instance_numbers is not None else k + 1
        if echo_time is not None:
            ds.EchoTime = _ds(echo_time)
        if echo_number is not None:
            ds.EchoNumbers = echo_number
        if with_geometry:
            ds.ImageOrientationPatient = [_ds(v) for v in (*r, *c)]
            ds.ImagePositionPatient = [_ds(v) for v in positions[k]]
            ds.PixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]
        ds.SliceThickness = "3"  # deliberately not the spacing: the reader must not use it
        if slope is not None:
            ds.RescaleSlope = _ds(slope if np.isscalar(slope) else slope[k])  # type: ignore[index,arg-type]
        if intercept is not None:
            ds.RescaleIntercept = _ds(intercept if np.isscalar(intercept) else intercept[k])  # type: ignore[index,arg-type]
        for key, value in {**(extra or {}), **(per_slice_extra[k] if per_slice_extra else {})}.items():
            setattr(ds, key, value)
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.PixelData = np.ascontiguousarray(array[:, :, k].T.astype("<i2")).tobytes()
        name = names[k] if names is not None else f"slice_{k:03d}.dcm"
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return Written(files, r, c, positions, pixel_spacing, series_uid)


def ramp(shape: tuple[int, int, int], start: int = 1) -> np.ndarray:
    """Distinct int16 values ``start, start + 1, ...`` in (cols, rows, n) C order."""
    return (np.arange(int(np.prod(shape)), dtype=np.int16) + start).reshape(shape)
