"""DICOM series with pydicom: discovery, grouping, slice sorting and exact geometry.

What this module does, in order:

1. **Find** DICOM files under a folder (recursively; hidden files and folders, ``DICOMDIR``
   and non-DICOM files are skipped). A single file stands for the series it belongs to,
   looked up among the files of its own folder (not recursively).
2. **Group** them by ``SeriesInstanceUID``, and inside a series into *stacks*: one stack per
   echo (``EchoTime`` / ``EchoNumbers``), image orientation (``ImageOrientationPatient``,
   compared within ``orientation_atol``), image size and pixel spacing. Where slices of one
   stack still share a position, the stack is split by the first of
   :data:`DUPLICATE_SPLIT_TAGS` that tells them apart (magnitude/phase ``ImageType``,
   ``TemporalPositionIdentifier``, ``AcquisitionNumber``, ``TriggerTime``).
3. **Sort** the slices of a stack along the slice normal ``n = row x column`` (cross product
   of the two ``ImageOrientationPatient`` cosines), by ``ImagePositionPatient . n``; never by
   ``InstanceNumber`` or file name.
4. **Check** that the stack is a regular grid, with visible tolerances (module constants,
   overridable by keyword): every slice lies on the line through the first one along ``n``
   (else: gantry tilt, refused); consecutive positions are equally spaced (else: missing
   slices or non-uniform spacing, refused unless ``allow_resample``). The slice spacing comes
   from the positions, never from ``SliceThickness`` (which is the slab thickness and may
   differ, e.g. 3 mm slices every 4 mm).
5. **Read** the pixels, apply ``RescaleSlope`` / ``RescaleIntercept`` per slice, and build the
   affine.

Array axis order and affine
---------------------------
The returned :class:`~mskmri.volume.Volume` has ``array[i, j, k]`` = the pixel in column
``i`` and row ``j`` of the ``k``-th slice along the normal. So axis 0 runs along the
``ImageOrientationPatient`` row direction ``r`` (first three values; the direction in which
the column index grows), axis 1 along the column direction ``c`` (last three values), axis 2
along ``n``. In DICOM patient coordinates (LPS+, mm)::

    x_LPS(i, j, k) = IPP_0 + i * PixelSpacing[1] * r + j * PixelSpacing[0] * c + k * dz * n

with ``IPP_0`` the position of the first sorted slice and ``dz`` the slice spacing from the
positions. The volume's affine is that matrix converted once to RAS+ with
:data:`~mskmri.volume.LPS_TO_RAS`. This is the same grid SimpleITK's ``ImageSeriesReader``
builds (ITK index ``(i, j, k)``), so values at a world point agree between the two.

Not handled (refused with a message): enhanced multi-frame files (``NumberOfFrames > 1``),
colour images, gantry tilt. Private scaling (e.g. Philips "scale slope" 2005,100E) and
``RealWorldValueMappingSequence`` are not applied; only the modality rescale is.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mskmri import _progress
from mskmri.errors import (
    DicomSeriesError,
    GeometryError,
    InputNotFoundError,
    UnsupportedFormatError,
)
from mskmri.volume import LPS_TO_RAS, Volume

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- tolerances
#: Direction cosines (unitless) that differ by less than this are the same orientation; a
#: row/column cosine pair must be unit length and orthogonal to within this.
ORIENTATION_ATOL = 1e-3
#: Largest in-plane offset (mm) of a slice from the line through the first slice along the
#: slice normal; beyond it the series is tilted (gantry tilt) and refused. It is also the
#: largest world-position error the stacked grid may make, and slices closer than this
#: along the normal are taken as sharing one position.
POSITION_ATOL_MM = 0.1
#: Largest distance of a slice from the uniform grid, as a fraction of the slice spacing;
#: beyond it the spacing is not uniform (or slices are missing) and the series is refused
#: unless resampling is allowed.
SPACING_RTOL = 0.01
#: ``echo=`` matches an echo time (ms) within this many ms (so ``6.3`` selects TE 6.312 ms).
ECHO_TIME_ATOL_MS = 0.1

#: Tags tried in order to split slices that share a position inside one series and echo.
DUPLICATE_SPLIT_TAGS = ("ImageType", "TemporalPositionIdentifier", "AcquisitionNumber", "TriggerTime")

#: Header fields read while scanning a folder (pixel data is read only for the chosen stack).
_HEADER_TAGS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber",
    "SeriesDescription", "Modality", "Manufacturer", "EchoTime", "EchoNumbers", "Rows", "Columns",
    "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "InstanceNumber",
    "NumberOfFrames", "SamplesPerPixel", "SliceThickness", "SpacingBetweenSlices",
    *DUPLICATE_SPLIT_TAGS,
)

#: SOP classes with pixel data that is not an image slice to stack.
_NON_IMAGE_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.")  # SR, PR
_DICOM_UID_ROOT = "1.2.840.10008."


# ---------------------------------------------------------------------------- public types
@dataclass(frozen=True)
class DicomStackInfo:
    """One stackable set of slices inside a series (one echo, one orientation, ...).

    Attributes
    ----------
    index : int
        1-based position in its series.
    selector : str
        The ``series`` value that selects exactly this stack, e.g. ``"8:2"``.
    echo_time_ms, echo_number
        ``EchoTime`` (ms) and ``EchoNumbers`` of its slices, None when absent.
    split_by : tuple of (str, str)
        Further tags (from :data:`DUPLICATE_SPLIT_TAGS`) and the values that set this stack
        apart from others with the same echo and orientation.
    n_files, n_slices : int
        Files in the stack and slices it stacks to.
    rows, cols : int
        Image size of each slice.
    shape : (int, int, int)
        Array shape of the volume it reads to: ``(cols, rows, n_slices)``.
    spacing : (float, float, float) or None
        Voxel size in mm along the array axes (column, row, slice); None without geometry or
        when ``problem`` is set.
    orientation : str or None
        RAS+ axis codes of the array axes (nibabel convention), e.g. ``"PIR"``.
    affine : tuple of 4 tuples of 4 floats, or None
        Voxel -> RAS+ mm affine of the volume it reads to (None as for ``spacing``).
    problem : str or None
        Why it cannot be stacked as it is (tilt, missing slices, non-uniform spacing,
        duplicates, no geometry), None when it reads cleanly.
    """

    index: int
    selector: str
    echo_time_ms: float | None
    echo_number: int | None
    split_by: tuple[tuple[str, str], ...]
    n_files: int
    n_slices: int
    rows: int
    cols: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] | None
    orientation: str | None
    affine: tuple[tuple[float, ...], ...] | None
    problem: str | None

    @property
    def label(self) -> str:
        """Short human name: echo and split tags (else orientation), e.g.
        ``"TE 6.312 ms (echo 1)"``."""
        parts = []
        if self.echo_time_ms is not None:
            parts.append(f"TE {self.echo_time_ms:g} ms")
        if self.echo_number is not None:
            parts.append(f"(echo {self.echo_number})")
        parts += [f"{k} {v}" for k, v in self.split_by]
        if not parts and self.orientation:
            parts.append(f"orientation {self.orientation}")
        return " ".join(parts) or f"stack {self.index}"


@dataclass(frozen=True)
class DicomSeriesInfo:
    """Summary of one DICOM series in a folder, as ``mskmri info`` lists it.

    Attributes
    ----------
    index : int
        1-based position in the folder's listing (series sorted by number, then UID).
    selector : str
        The ``series`` value that selects it: its SeriesNumber when that is unique in the
        folder, else its SeriesInstanceUID.
    uid, number, description, modality, manufacturer
        ``SeriesInstanceUID``, ``SeriesNumber``, ``SeriesDescription``, ``Modality``,
        ``Manufacturer``.
    n_files : int
        DICOM image files of this series.
    echo_times_ms : tuple of float
        Distinct echo times (ms), sorted; empty when the files have none.
    echo_numbers : tuple of int
        Distinct echo numbers, sorted.
    rows, cols, n_slices, spacing, orientation
        As in :class:`DicomStackInfo` when all stacks agree, else None.
    stacks : tuple of DicomStackInfo
        The stacks the series splits into (one per echo for a multi-echo series).
    """

    index: int
    selector: str
    uid: str
    number: int | None
    description: str
    modality: str
    manufacturer: str
    n_files: int
    echo_times_ms: tuple[float, ...]
    echo_numbers: tuple[int, ...]
    rows: int | None
    cols: int | None
    n_slices: int | None
    spacing: tuple[float, float, float] | None
    orientation: str | None
    stacks: tuple[DicomStackInfo, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        return _jsonable(dataclasses.asdict(self))

    def summary(self) -> str:
        """One line: ``#8 'T2MAP' MR, 96 files, 4 echoes (TE 6.312, ... ms)``."""
        num = f"#{self.number}" if self.number is not None else f"uid {self.uid}"
        text = f"{num} {self.description!r} {self.modality}, {self.n_files} files"
        if len(self.echo_times_ms) > 1:
            tes = ", ".join(f"{t:g}" for t in self.echo_times_ms)
            text += f", {len(self.echo_times_ms)} echoes (TE {tes} ms)"
        elif len(self.stacks) > 1:
            text += f", {len(self.stacks)} stacks"
        return text


# ---------------------------------------------------------------------------- internals
@dataclass(frozen=True)
class _Header:
    """The header fields of one file that grouping and geometry need."""

    path: Path
    sop_class: str
    sop_uid: str
    study_uid: str
    series_uid: str
    series_number: int | None
    description: str
    modality: str
    manufacturer: str
    echo_time_ms: float | None
    echo_number: int | None
    rows: int
    cols: int
    iop: tuple[float, ...] | None
    ipp: tuple[float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    instance_number: int | None
    n_frames: int
    samples_per_pixel: int
    split_values: tuple[str, ...]  # one per DUPLICATE_SPLIT_TAGS, "" when absent


@dataclass
class _Stack:
    headers: list[_Header]
    split_by: tuple[tuple[str, str], ...] = ()


@dataclass
class _Series:
    uid: str
    stacks: list[_Stack]
    index: int = 0
    selector: str = ""

    @property
    def headers(self) -> list[_Header]:
        return [h for s in self.stacks for h in s.headers]

    @property
    def first(self) -> _Header:
        return self.stacks[0].headers[0]


@dataclass
class _Geometry:
    """Result of checking a stack's slice positions (LPS frame)."""

    order: list[int]  # indices into the stack's headers, sorted along the normal
    affine_lps: np.ndarray | None  # None without IOP/IPP/PixelSpacing
    positions_mm: np.ndarray | None  # sorted positions along the normal, relative to slice 0
    slice_spacing_mm: float | None
    problem_kind: str | None = None  # tilt | gap | nonuniform | duplicate | orientation
    problem: str | None = None
    resample_ok: bool = False  # problem can be removed by resampling along the normal


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def _text(ds: Any, keyword: str) -> str:
    val = ds.get(keyword)
    if val is None:
        return ""
    if isinstance(val, str | bytes):
        return str(val).strip()
    try:  # multi-valued (ImageType)
        return "\\".join(str(v) for v in val)
    except TypeError:
        return str(val).strip()


def _float(ds: Any, keyword: str) -> float | None:
    val = ds.get(keyword)
    if val is None or val == "":
        return None
    try:
        return float(val)
    except (TypeError, ValueError):
        return None


def _int(ds: Any, keyword: str) -> int | None:
    val = ds.get(keyword)
    if val is None or val == "":
        return None
    try:
        return int(val if not isinstance(val, list | tuple) else val[0])
    except (TypeError, ValueError):
        return None


def _floats(ds: Any, keyword: str, n: int) -> tuple[float, ...] | None:
    val = ds.get(keyword)
    if val is None or val == "":
        return None
    try:
        out = tuple(float(v) for v in val)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a DICOM file (Part 10 with the ``DICM`` preamble, or a bare
    dataset whose first element is in group 0002 or 0008).

    Parameters
    ----------
    path : path-like
        A file; folders and unreadable paths give False.
    """
    p = Path(path)
    head = _head(p)
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    return _bare_dataset_start(head) and _read_header(p, force=True) is not None


def _head(path: Path) -> bytes:
    """The first 132 bytes (preamble + ``DICM``), or b"" when unreadable."""
    try:
        with path.open("rb") as fh:
            return fh.read(132)
    except OSError:
        return b""


def _bare_dataset_start(head: bytes) -> bool:
    """Old files without the 128-byte preamble start directly with an element of group 0002
    or 0008 (little endian); such files are accepted only if a forced parse then finds a
    DICOM SOP class."""
    return head[:2] in (b"\x02\x00", b"\x08\x00")


def _read_header(path: Path, *, force: bool = False) -> _Header | None:
    """Parse the header fields of one file, or None when it is not a DICOM image."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS),
                             force=force)
    except InvalidDicomError:
        if force or not _bare_dataset_start(_head(path)):
            return None
        return _read_header(path, force=True)
    except Exception as exc:  # truncated or corrupt: pydicom raises many kinds
        log.warning("skipping %s: not a readable DICOM file (%s)", path, type(exc).__name__)
        return None
    sop_class = _text(ds, "SOPClassUID")
    if not sop_class.startswith(_DICOM_UID_ROOT) or sop_class.startswith(_NON_IMAGE_PREFIXES):
        return None
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if not rows or not cols:
        return None  # no image (structured report, key object, ...)
    ipp = _floats(ds, "ImagePositionPatient", 3)
    return _Header(
        path=path,
        sop_class=sop_class,
        sop_uid=_text(ds, "SOPInstanceUID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID") or "(no SeriesInstanceUID)",
        series_number=_int(ds, "SeriesNumber"),
        description=_text(ds, "SeriesDescription"),
        modality=_text(ds, "Modality"),
        manufacturer=_text(ds, "Manufacturer"),
        echo_time_ms=_float(ds, "EchoTime"),
        echo_number=_int(ds, "EchoNumbers"),
        rows=rows,
        cols=cols,
        iop=_floats(ds, "ImageOrientationPatient", 6),
        ipp=(ipp[0], ipp[1], ipp[2]) if ipp else None,
        pixel_spacing=_floats(ds, "PixelSpacing", 2),  # type: ignore[arg-type]
        instance_number=_int(ds, "InstanceNumber"),
        n_frames=_int(ds, "NumberOfFrames") or 1,
        samples_per_pixel=_int(ds, "SamplesPerPixel") or 1,
        split_values=tuple(_text(ds, t) for t in DUPLICATE_SPLIT_TAGS),
    )


def _candidate_files(root: Path, *, recursive: bool) -> list[Path]:
    """Files under ``root`` that could be DICOM (hidden entries and DICOMDIR skipped)."""
    it: Iterable[Path] = root.rglob("*") if recursive else root.iterdir()
    out = []
    for p in it:
        rel = p.relative_to(root).parts
        if any(part.startswith(".") for part in rel) or p.name.upper() == "DICOMDIR":
            continue
        if p.is_file():
            out.append(p)
    return sorted(out)


def _scan(root: Path, *, recursive: bool) -> tuple[list[_Header], int]:
    """Headers of the DICOM image files under ``root``; also the number of files looked at."""
    files = _candidate_files(root, recursive=recursive)
    headers = []
    seen: dict[str, Path] = {}
    for f in _progress.progress(files, desc="scanning DICOM", total=len(files)):
        h = _read_header(f)
        if h is None:
            continue
        if h.sop_uid and h.sop_uid in seen:  # the same image twice (a copied folder)
            log.warning("skipping %s: same SOPInstanceUID as %s", f, seen[h.sop_uid])
            continue
        seen[h.sop_uid] = f
        headers.append(h)
    log.debug("%s: %d DICOM images among %d files", root, len(headers), len(files))
    return headers, len(files)


def _unit(v: npt.ArrayLike) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


def _normal(iop: npt.ArrayLike) -> np.ndarray:
    """Unit slice normal r x c from the six ImageOrientationPatient values."""
    a = np.asarray(iop, dtype=np.float64)
    return _unit(np.cross(a[:3], a[3:]))


def _cluster_orientations(headers: list[_Header], atol: float) -> list[list[_Header]]:
    """Split by ImageOrientationPatient: same cluster when all six cosines agree within atol."""
    clusters: list[tuple[np.ndarray | None, list[_Header]]] = []
    for h in headers:
        ref = None if h.iop is None else np.asarray(h.iop)
        for key, members in clusters:
            if (key is None and ref is None) or (
                key is not None and ref is not None and np.max(np.abs(key - ref)) <= atol
            ):
                members.append(h)
                break
        else:
            clusters.append((ref, [h]))
    return [members for _, members in clusters]


def _has_duplicate_positions(headers: list[_Header], position_atol: float) -> bool:
    """Whether two slices lie within ``position_atol`` mm of each other along the normal."""
    if len(headers) < 2 or any(h.iop is None or h.ipp is None for h in headers):
        return False  # without positions there is nothing to compare
    n = _normal(headers[0].iop)  # type: ignore[arg-type]
    d = np.sort(np.asarray([h.ipp for h in headers]) @ n)
    return bool(np.any(np.diff(d) < position_atol))


def _split_duplicates(stack: _Stack, position_atol: float) -> list[_Stack]:
    """Split a stack whose slices share positions by the first tag that tells them apart."""
    if not _has_duplicate_positions(stack.headers, position_atol):
        return [stack]
    for t, tag in enumerate(DUPLICATE_SPLIT_TAGS):
        values = sorted({h.split_values[t] for h in stack.headers})
        if len(values) < 2:
            continue
        parts = [[h for h in stack.headers if h.split_values[t] == v] for v in values]
        if not any(_has_duplicate_positions(p, position_atol) for p in parts):
            return [_Stack(p, stack.split_by + ((tag, v),)) for p, v in zip(parts, values,
                                                                              strict=True)]
    return [stack]  # left as is; its geometry check reports the duplicates


def _group(headers: list[_Header], *, orientation_atol: float,
           position_atol: float) -> list[_Series]:
    """Group headers into series (by UID), then stacks (echo, size, orientation, duplicates)."""
    by_uid: dict[str, list[_Header]] = {}
    for h in headers:
        by_uid.setdefault(h.series_uid, []).append(h)
    series = []
    for uid, members in by_uid.items():
        by_key: dict[tuple[Any, ...], list[_Header]] = {}
        for h in members:
            key = (
                h.echo_time_ms if h.echo_time_ms is not None else -1.0,
                h.echo_number if h.echo_number is not None else -1,
                h.rows, h.cols,
                tuple(round(s, 4) for s in h.pixel_spacing) if h.pixel_spacing else (),
                h.n_frames > 1,
            )
            by_key.setdefault(key, []).append(h)
        stacks: list[_Stack] = []
        for key in sorted(by_key):
            for cluster in _cluster_orientations(by_key[key], orientation_atol):
                stacks += _split_duplicates(_Stack(cluster), position_atol)
        series.append(_Series(uid, stacks))
    series.sort(key=lambda s: (s.first.series_number is None, s.first.series_number or 0, s.uid))
    numbers = [s.first.series_number for s in series]
    for i, s in enumerate(series, start=1):
        s.index = i
        num = s.first.series_number
        s.selector = str(num) if num is not None and numbers.count(num) == 1 else s.uid
    return series


def _stack_geometry(
    stack: _Stack, *, orientation_atol: float, position_atol: float, spacing_rtol: float
) -> _Geometry:
    """Sort a stack along its slice normal and check that it forms a regular grid (LPS)."""
    hs = stack.headers
    if hs[0].n_frames > 1:
        return _Geometry(list(range(len(hs))), None, None, None, "multiframe",
                         "it is an enhanced multi-frame file (NumberOfFrames "
                         f"{hs[0].n_frames}), which mskmri does not read yet; convert it to "
                         "NIfTI with dcm2niix or export classic single-frame images")
    if any(h.iop is None or h.ipp is None or h.pixel_spacing is None for h in hs):
        order = sorted(range(len(hs)), key=lambda i: (hs[i].instance_number or 0, str(hs[i].path)))
        return _Geometry(order, None, None, None)
    iop = np.asarray(hs[0].iop, dtype=np.float64)
    r_raw, c_raw = iop[:3], iop[3:]
    if (abs(np.linalg.norm(r_raw) - 1) > orientation_atol
            or abs(np.linalg.norm(c_raw) - 1) > orientation_atol
            or abs(float(r_raw @ c_raw)) > orientation_atol):
        return _Geometry(list(range(len(hs))), None, None, None, "orientation",
                         f"its ImageOrientationPatient {iop.round(6).tolist()} is not two "
                         f"orthogonal unit vectors (tolerance {orientation_atol}); the header is "
                         "damaged: re-export the series from the scanner or PACS")
    r, c = _unit(r_raw), _unit(c_raw)
    n = _normal(iop)
    pos = np.asarray([h.ipp for h in hs], dtype=np.float64)
    d = pos @ n
    # stable sort along the normal; InstanceNumber only breaks exact ties
    order = sorted(range(len(hs)), key=lambda i: (d[i], hs[i].instance_number or 0))
    pos, d = pos[order], d[order]
    row_sp, col_sp = hs[0].pixel_spacing  # type: ignore[misc]
    aff = np.eye(4)
    aff[:3, 0] = r * col_sp
    aff[:3, 1] = c * row_sp
    aff[:3, 3] = pos[0]
    rel = d - d[0]
    geo = _Geometry(order, aff, rel, None)
    if len(hs) == 1:
        return geo
    steps = np.diff(rel)
    if np.any(steps < position_atol):
        k = int(np.argmax(steps < position_atol))
        geo.problem_kind = "duplicate"
        geo.problem = (f"{int(np.sum(steps < position_atol))} slices share a position with "
                       f"another (e.g. {d[k]:.3f} mm along the normal) and no tag of "
                       f"{', '.join(DUPLICATE_SPLIT_TAGS)} tells them apart; export one "
                       "acquisition per series")
        return geo
    inplane = (pos - pos[0]) @ np.stack([r, c], axis=1)  # (N, 2) offsets in mm
    offset = np.linalg.norm(inplane, axis=1)
    if np.max(offset) > position_atol:
        k = int(np.argmax(offset))
        tilt_deg = float(np.degrees(np.arctan2(offset[-1], rel[-1])))
        geo.problem_kind = "tilt"
        geo.problem = (f"its slices are not stacked along the slice normal (gantry tilt of "
                       f"about {tilt_deg:.2f} degrees: slice {k} sits {offset[k]:.3f} mm "
                       f"in-plane from the first, tolerance {position_atol} mm); mskmri does not "
                       "correct tilt: reconstruct the series without tilt or convert it with a "
                       "tool that corrects it (e.g. dcm2niix)")
        return geo
    # uniform grid? the spacing that puts first and last slice exactly on the grid
    dz = rel[-1] / (len(rel) - 1)
    if np.max(np.abs(rel - dz * np.arange(len(rel)))) <= spacing_rtol * dz:
        geo.slice_spacing_mm = float(dz)
        geo.affine_lps[:3, 2] = n * dz  # type: ignore[index]
        return geo
    typical = float(np.median(steps))
    ratio = steps / typical
    whole = np.round(ratio)
    geo.resample_ok = True
    geo.slice_spacing_mm = typical
    geo.affine_lps[:3, 2] = n * typical  # type: ignore[index]
    if np.all(np.abs(ratio - whole) <= spacing_rtol) and np.any(whole >= 2):
        k = int(np.argmax(whole >= 2))
        missing = int(np.sum(whole - 1))
        geo.problem_kind = "gap"
        geo.problem = (f"{missing} slice(s) are missing: the step from slice {k} to {k + 1} is "
                       f"{steps[k]:.3f} mm, {int(whole[k])} times the usual {typical:.3f} mm; "
                       "check that the folder holds the complete series, or allow resampling "
                       "(--allow-resample) to interpolate across the gap")
    else:
        geo.problem_kind = "nonuniform"
        geo.problem = (f"its slice spacing is not uniform (steps from {steps.min():.3f} to "
                       f"{steps.max():.3f} mm, tolerance {spacing_rtol:.1%} of the spacing); "
                       f"allow resampling (--allow-resample) to resample it to a uniform "
                       f"{typical:.3f} mm")
    return geo


def _codes(affine_lps: np.ndarray) -> str:
    import nibabel.orientations as nio

    return "".join(nio.aff2axcodes(LPS_TO_RAS @ affine_lps))


def _stack_info(stack: _Stack, index: int, series_selector: str, geo: _Geometry) -> DicomStackInfo:
    h = stack.headers[0]
    n_slices = len(stack.headers) * (h.n_frames if h.n_frames > 1 else 1)
    clean = geo.affine_lps is not None and geo.problem is None
    aff = LPS_TO_RAS @ geo.affine_lps if clean else None  # type: ignore[operator]
    spacing = None
    if aff is not None:
        sp = np.linalg.norm(aff[:3, :3], axis=0)
        spacing = (float(sp[0]), float(sp[1]), float(sp[2])) if len(stack.headers) > 1 else None
    return DicomStackInfo(
        index=index,
        selector=f"{series_selector}:{index}",
        echo_time_ms=h.echo_time_ms,
        echo_number=h.echo_number,
        split_by=stack.split_by,
        n_files=len(stack.headers),
        n_slices=n_slices,
        rows=h.rows,
        cols=h.cols,
        shape=(h.cols, h.rows, n_slices),
        spacing=spacing,
        orientation=_codes(geo.affine_lps) if clean and len(stack.headers) > 1 else None,  # type: ignore[arg-type]
        affine=tuple(tuple(float(v) for v in row) for row in aff) if aff is not None else None,
        problem=geo.problem,
    )


def _common(values: Sequence[Any]) -> Any:
    return values[0] if values and all(v == values[0] for v in values) else None


def _series_info(s: _Series, geos: list[_Geometry]) -> DicomSeriesInfo:
    stacks = tuple(_stack_info(st, i, s.selector, g)
                   for i, (st, g) in enumerate(zip(s.stacks, geos, strict=True), start=1))
    f = s.first
    hs = s.headers
    return DicomSeriesInfo(
        index=s.index,
        selector=s.selector,
        uid=s.uid,
        number=f.series_number,
        description=f.description,
        modality=f.modality,
        manufacturer=f.manufacturer,
        n_files=len(hs),
        echo_times_ms=tuple(sorted({h.echo_time_ms for h in hs if h.echo_time_ms is not None})),
        echo_numbers=tuple(sorted({h.echo_number for h in hs if h.echo_number is not None})),
        rows=_common([st.rows for st in stacks]),
        cols=_common([st.cols for st in stacks]),
        n_slices=_common([st.n_slices for st in stacks]),
        spacing=_common([st.spacing for st in stacks]),
        orientation=_common([st.orientation for st in stacks]),
        stacks=stacks,
    )


def _scan_and_group(
    path: Path, *, orientation_atol: float, position_atol: float
) -> tuple[list[_Series], _Header | None]:
    """Scan ``path`` (folder, recursively; or a file's folder) and group what is found.

    Returns the series and, when ``path`` is a file, that file's header.
    """
    if not path.exists():
        raise InputNotFoundError(f"{path} does not exist; check the path")
    if path.is_file():
        own = _read_header(path)
        if own is None:
            raise UnsupportedFormatError(
                f"{path} is not a DICOM image file; give a DICOM file or folder, or a NIfTI, "
                "NRRD or MHA image"
            )
        headers, n_seen = _scan(path.parent, recursive=False)
        root = path.parent
    else:
        own = None
        headers, n_seen = _scan(path, recursive=True)
        root = path
    if not headers:
        raise DicomSeriesError(
            f"{root} holds no DICOM images ({n_seen} files looked at, subfolders included); "
            "give a folder with a DICOM series, or an image file (NIfTI, NRRD, MHA)"
        )
    return _group(headers, orientation_atol=orientation_atol, position_atol=position_atol), own


def list_series(
    path: str | os.PathLike[str],
    *,
    orientation_atol: float = ORIENTATION_ATOL,
    position_atol_mm: float = POSITION_ATOL_MM,
    spacing_rtol: float = SPACING_RTOL,
) -> list[DicomSeriesInfo]:
    """List the DICOM series under ``path`` with their echoes, stacks and geometry.

    Reads headers only (no pixel data).

    Parameters
    ----------
    path : path-like
        A folder (searched recursively) or one DICOM file (its folder's files are listed).
    orientation_atol, position_atol_mm, spacing_rtol : float
        Tolerances, as for :func:`read_dicom`.

    Returns
    -------
    list of DicomSeriesInfo
        Sorted by SeriesNumber, then SeriesInstanceUID.

    Raises
    ------
    InputNotFoundError, UnsupportedFormatError, DicomSeriesError
        Missing path; a file that is not DICOM; a folder without DICOM images.
    """
    series, _ = _scan_and_group(Path(path), orientation_atol=orientation_atol,
                                position_atol=position_atol_mm)
    tol = dict(orientation_atol=orientation_atol, position_atol=position_atol_mm,
               spacing_rtol=spacing_rtol)
    return [_series_info(s, [_stack_geometry(st, **tol) for st in s.stacks]) for s in series]


# ---------------------------------------------------------------------------- selection
def _series_listing(series: list[_Series], infos: list[DicomSeriesInfo]) -> str:
    return "; ".join(f"[{i.index}] --series {i.selector}: {i.summary()}" for i in infos)


def _pick_series(series: list[_Series], choice: str | None, root: Path,
                 infos: list[DicomSeriesInfo]) -> _Series:
    if choice is None:
        if len(series) == 1:
            return series[0]
        raise DicomSeriesError(
            f"{root} holds {len(series)} DICOM series: {_series_listing(series, infos)}; "
            "choose one with --series (SeriesNumber, SeriesInstanceUID or [index])"
        )
    for s in series:
        if s.uid == choice:
            return s
    if choice.startswith("[") and choice.endswith("]") and choice[1:-1].isdigit():
        if 1 <= int(choice[1:-1]) <= len(series):  # "[2]": always the listing index
            return series[int(choice[1:-1]) - 1]
    elif choice.isdigit():
        by_number = [s for s in series if s.first.series_number == int(choice)]
        if len(by_number) == 1:
            return by_number[0]
        if len(by_number) > 1:
            raise DicomSeriesError(
                f"{root}: SeriesNumber {choice} is used by {len(by_number)} series "
                f"({', '.join(s.uid for s in by_number)}); choose one with --series UID"
            )
        if 1 <= int(choice) <= len(series):
            return series[int(choice) - 1]
    raise DicomSeriesError(
        f"{root} has no DICOM series {choice!r}; it holds: {_series_listing(series, infos)}"
    )


def _pick_echo(s: _Series, stacks: list[int], echo: float, what: str) -> list[int]:
    """Indices of the stacks whose echo time (within ECHO_TIME_ATOL_MS) or number is ``echo``."""
    by_te = [i for i in stacks if s.stacks[i].headers[0].echo_time_ms is not None
             and abs(s.stacks[i].headers[0].echo_time_ms - echo) <= ECHO_TIME_ATOL_MS]  # type: ignore[operator]
    by_num = [i for i in stacks if float(echo).is_integer()
              and s.stacks[i].headers[0].echo_number == int(echo)]
    if by_te and by_num and set(by_te) != set(by_num):
        raise DicomSeriesError(
            f"{what}: --echo {echo:g} is ambiguous: it is an echo time (ms) of one stack and "
            "the echo number of another; give the exact echo time in ms as `mskmri info` lists it"
        )
    found = by_te or by_num
    if not found:
        tes = sorted({s.stacks[i].headers[0].echo_time_ms for i in stacks} - {None})  # type: ignore[type-var]
        nums = sorted({s.stacks[i].headers[0].echo_number for i in stacks} - {None})  # type: ignore[type-var]
        raise DicomSeriesError(
            f"{what} has no echo {echo:g} (echo times: {', '.join(f'{t:g}' for t in tes) or 'none'} "
            f"ms; echo numbers: {', '.join(str(n) for n in nums) or 'none'}); "
            "give one of them with --echo"
        )
    return found


def _pick_stack(s: _Series, info: DicomSeriesInfo, stack_index: int | None,
                echo: float | None, default: int | None, what: str) -> int:
    candidates = list(range(len(s.stacks)))
    if stack_index is not None:
        if not 1 <= stack_index <= len(s.stacks):
            raise DicomSeriesError(
                f"{what} has {len(s.stacks)} stack(s), not {stack_index}; "
                f"choose one of {', '.join(st.selector for st in info.stacks)}"
            )
        candidates = [stack_index - 1]
    if echo is not None:
        candidates = _pick_echo(s, candidates, float(echo), what)
    elif default is not None and default in candidates and stack_index is None:
        candidates = [default]
    if len(candidates) == 1:
        return candidates[0]
    if len(info.echo_times_ms) > 1 and echo is None:
        tes = ", ".join(f"{t:g}" for t in info.echo_times_ms)
        first = info.echo_times_ms[0]
        hint = f"choose one with --echo TE_MS (e.g. --echo {first:g}) or --echo ECHO_NUMBER"
        if len(candidates) > len(info.echo_times_ms):
            hint += (" and the stack with --series "
                     + " / ".join(info.stacks[i].selector for i in candidates))
        raise DicomSeriesError(
            f"{what} holds {len(info.echo_times_ms)} echoes (TE {tes} ms); {hint}"
        )
    listing = ", ".join(f"{info.stacks[i].selector} ({info.stacks[i].label}, "
                        f"{info.stacks[i].n_slices} slices)" for i in candidates)
    raise DicomSeriesError(
        f"{what} splits into {len(candidates)} stacks that cannot form one volume: {listing}; "
        "choose one with --series SERIES:STACK"
    )


# ---------------------------------------------------------------------------- pixels
def _set_transfer_syntax(ds: Any) -> None:
    """A bare dataset (no file meta) has no TransferSyntaxUID, which pydicom needs to decode
    the pixels; set it from the encoding the parser found (uncompressed by definition)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _read_pixels(headers: list[_Header]) -> tuple[np.ndarray, Any, bool]:
    """Read and rescale slices (in the given order) into a (cols, rows, n) array.

    Returns the array, the first slice's full dataset (for metadata) and whether a rescale
    (slope / intercept other than 1 / 0) was applied.
    """
    import pydicom

    raw: list[np.ndarray] = []
    slopes: list[float] = []
    intercepts: list[float] = []
    first = None
    for h in _progress.progress(headers, desc="reading DICOM", total=len(headers)):
        try:
            # the scan has established that this is DICOM; force also reads bare datasets
            ds = pydicom.dcmread(h.path, force=True)
        except Exception as exc:  # truncated or corrupt since the scan
            raise UnsupportedFormatError(
                f"{h.path} could not be read as DICOM ({type(exc).__name__}); check that the "
                "file is complete"
            ) from exc
        _set_transfer_syntax(ds)
        try:
            px = ds.pixel_array
        except Exception as exc:  # no decoder for a compressed syntax, truncated pixel data
            ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
            hint = (f"its transfer syntax {ts.name} needs a decoder: pip install pylibjpeg "
                    "pylibjpeg-libjpeg pylibjpeg-openjpeg, or decompress it with gdcmconv --raw"
                    if ts is not None and ts.is_compressed
                    else "check that the file is complete")
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            raise UnsupportedFormatError(
                f"{h.path}: its pixel data could not be read ({type(exc).__name__}: "
                f"{first_line}); {hint}"
            ) from exc
        if first is None:
            first = ds
        if px.shape != (h.rows, h.cols):
            raise UnsupportedFormatError(
                f"{h.path}: pixel data of shape {px.shape} is not one {h.rows}x{h.cols} "
                "grey-level slice; colour and multi-frame images are not read"
            )
        raw.append(px.astype(px.dtype.newbyteorder("="), copy=False))
        slope = _float(ds, "RescaleSlope")
        slopes.append(1.0 if slope is None or slope == 0 else slope)  # 0 is invalid: ignore
        intercepts.append(_float(ds, "RescaleIntercept") or 0.0)
    stack = np.stack([p.T for p in raw], axis=2)  # (rows, cols) -> (cols, rows): axis 0 = column
    sl, ic = np.asarray(slopes), np.asarray(intercepts)
    if np.all(sl == 1.0) and np.all(ic == 0.0):
        return stack, first, False
    if np.all(sl == np.round(sl)) and np.all(ic == np.round(ic)):
        # whole-number rescale (CT-like): stay integer, in the smallest type that holds it
        out = stack.astype(np.int64) * sl.astype(np.int64) + ic.astype(np.int64)
        lo, hi = int(out.min(initial=0)), int(out.max(initial=0))
        for dt in (np.int16, np.int32):
            if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
                return out.astype(dt), first, True
        return out, first, True
    return (stack.astype(np.float64) * sl + ic).astype(np.float32), first, True


def _resample_slices(array: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, float]:
    """Linearly resample slices at ``positions`` (mm, ascending, first 0) to a uniform grid.

    The grid keeps the first and last slice and uses the step closest to the median one.
    Returns the float32 array and the new spacing in mm.
    """
    from scipy.interpolate import interp1d

    typical = float(np.median(np.diff(positions)))
    n_out = int(round(positions[-1] / typical)) + 1
    dz = positions[-1] / (n_out - 1)
    f = interp1d(positions, array.astype(np.float32), axis=2, kind="linear", assume_sorted=True)
    return f(np.arange(n_out) * dz).astype(np.float32), float(dz)


def _meta(ds: Any, s: _Series, headers: list[_Header], stack: _Stack, source: Path,
          slice_spacing: float | None, slope_intercept_applied: bool) -> dict[str, Any]:
    h = headers[0]
    return {
        "source": str(source),
        "format": "dicom",
        "series_uid": s.uid,
        "series_number": h.series_number,
        "description": h.description,  # SeriesDescription
        "study_uid": h.study_uid,
        "frame_of_reference_uid": _text(ds, "FrameOfReferenceUID"),
        "modality": h.modality,
        "manufacturer": h.manufacturer,
        "manufacturer_model": _text(ds, "ManufacturerModelName"),
        "magnetic_field_strength_t": _float(ds, "MagneticFieldStrength"),
        "echo_time_ms": h.echo_time_ms,
        "echo_number": h.echo_number,
        "repetition_time_ms": _float(ds, "RepetitionTime"),
        "inversion_time_ms": _float(ds, "InversionTime"),
        "flip_angle_deg": _float(ds, "FlipAngle"),
        "slice_thickness_mm": _float(ds, "SliceThickness"),
        "slice_spacing_mm": slice_spacing,
        "split_by": {k: v for k, v in stack.split_by},
        "rescale_applied": slope_intercept_applied,
        "n_files": len(headers),
        "files": [str(x.path) for x in headers],
        "sop_instance_uids": [x.sop_uid for x in headers],
    }


def read_dicom(
    path: str | os.PathLike[str],
    *,
    series: str | int | None = None,
    echo: float | int | None = None,
    allow_resample: bool = False,
    orientation_atol: float = ORIENTATION_ATOL,
    position_atol_mm: float = POSITION_ATOL_MM,
    spacing_rtol: float = SPACING_RTOL,
) -> Volume:
    """Read one DICOM series (one echo, one stack) into a RAS+ volume.

    Parameters
    ----------
    path : path-like
        A folder (searched recursively) or one DICOM file; a file selects its own series and
        stack unless ``series`` / ``echo`` say otherwise.
    series : str or int, optional
        Needed when the folder holds several series: a SeriesInstanceUID, a SeriesNumber, or
        the ``[index]`` that :func:`list_series` / ``mskmri info`` shows (a bare number is
        first taken as a SeriesNumber, then as an index; ``"[2]"`` is always the index). ``"SERIES:K"`` picks stack ``K`` of a series that splits
        into stacks not told apart by echo (e.g. a three-plane localizer).
    echo : float or int, optional
        Needed for a multi-echo series: an echo time in ms (matched within
        :data:`ECHO_TIME_ATOL_MS`) or an echo number.
    allow_resample : bool, default False
        Resample a stack with missing slices or non-uniform spacing linearly along the slice
        normal onto a uniform grid (float32 result) instead of refusing it.
    orientation_atol : float
        Tolerance on direction cosines, see :data:`ORIENTATION_ATOL`.
    position_atol_mm : float
        In-plane tolerance in mm before a stack counts as tilted, see :data:`POSITION_ATOL_MM`.
    spacing_rtol : float
        Tolerance on slice positions as a fraction of the spacing, see :data:`SPACING_RTOL`.

    Returns
    -------
    Volume
        ``array`` of shape ``(columns, rows, slices)`` (see the module docstring for the axis
        order and affine), rescaled values (the stored dtype when no rescale applies, int16 /
        int32 for whole-number rescales, else float32); ``meta`` holds ``series_uid``,
        ``series_number``, ``description`` (SeriesDescription), ``study_uid``,
        ``frame_of_reference_uid``, ``modality``, ``manufacturer``, ``echo_time_ms``,
        ``echo_number``, ``repetition_time_ms``, ``flip_angle_deg``, ``slice_thickness_mm``
        (as recorded), ``slice_spacing_mm`` (from the positions), and ``files`` /
        ``sop_instance_uids`` in slice order (axis 2). A stack without
        position/orientation/pixel spacing is read in InstanceNumber order with
        ``geometry_known=False``; a single slice gets ``meta["was_2d"] = True`` and a slice
        spacing from SpacingBetweenSlices or SliceThickness.

    Raises
    ------
    InputNotFoundError
        ``path`` does not exist.
    UnsupportedFormatError
        A file that is not DICOM, or pixel data that cannot be decoded.
    DicomSeriesError
        No DICOM images; several series / echoes / stacks and no choice; a choice that does
        not exist; gantry tilt; missing slices or non-uniform spacing (unless
        ``allow_resample``); slices sharing a position.
    GeometryError
        A damaged ImageOrientationPatient.
    """
    root = Path(path)
    found, own = _scan_and_group(root, orientation_atol=orientation_atol,
                                 position_atol=position_atol_mm)
    tol = dict(orientation_atol=orientation_atol, position_atol=position_atol_mm,
               spacing_rtol=spacing_rtol)
    geos = {id(st): _stack_geometry(st, **tol) for s in found for st in s.stacks}
    infos = [_series_info(s, [geos[id(st)] for st in s.stacks]) for s in found]

    stack_index: int | None = None
    choice = None if series is None else str(series).strip()
    if choice is not None and ":" in choice:
        head, _, tail = choice.rpartition(":")
        if not tail.isdigit():
            raise DicomSeriesError(f"--series {choice!r}: the part after ':' must be a stack "
                                   "number as `mskmri info` lists it, e.g. 8:2")
        choice, stack_index = head, int(tail)
    default_stack = None
    if choice is None and own is not None:
        choice = own.series_uid
    s = _pick_series(found, choice, root, infos)
    info = infos[found.index(s)]
    if own is not None and own.series_uid == s.uid:
        default_stack = next(i for i, st in enumerate(s.stacks)
                             if any(h.path == own.path for h in st.headers))
    what = f"{root}: series {info.selector} ({info.description or 'no description'})"
    k = _pick_stack(s, info, stack_index, echo, default_stack, what)
    stack, geo = s.stacks[k], geos[id(s.stacks[k])]
    if len(s.stacks) > 1:
        what += f", stack {info.stacks[k].selector} ({info.stacks[k].label})"

    if geo.problem is not None and not (allow_resample and geo.resample_ok):
        err = GeometryError if geo.problem_kind == "orientation" else DicomSeriesError
        raise err(f"{what}: cannot be read as one volume: {geo.problem}")

    headers = [stack.headers[i] for i in geo.order]
    array, ds, rescaled = _read_pixels(headers)
    meta_extra: dict[str, Any] = {"was_2d": len(headers) == 1, "resampled_slices": False}
    geometry_known = geo.affine_lps is not None
    if geo.affine_lps is None:
        log.warning("%s: no ImagePositionPatient/ImageOrientationPatient/PixelSpacing; read in "
                    "InstanceNumber order without geometry (nothing can be measured)", what)
        affine_lps = np.eye(4)
        spacing = None
    else:
        affine_lps = geo.affine_lps.copy()
        spacing = geo.slice_spacing_mm
        if geo.problem is not None:  # allowed resampling along the normal
            assert geo.positions_mm is not None
            log.warning("%s: %s -- resampling as allowed", what, geo.problem.split(";")[0])
            array, spacing = _resample_slices(array, geo.positions_mm)
            affine_lps[:3, 2] = _normal(headers[0].iop) * spacing  # type: ignore[arg-type]
            meta_extra["resampled_slices"] = True
            meta_extra["original_slice_positions_mm"] = [float(v) for v in geo.positions_mm]
        elif len(headers) == 1:
            thick = _float(ds, "SpacingBetweenSlices") or _float(ds, "SliceThickness")
            if thick:
                affine_lps[:3, 2] = _normal(headers[0].iop) * thick  # type: ignore[arg-type]
                spacing = thick
            else:
                affine_lps[:3, 2] = _normal(headers[0].iop)  # type: ignore[arg-type]
                geometry_known = False
    meta = _meta(ds, s, headers, stack, root, spacing, rescaled)
    meta.update(meta_extra)
    vol = Volume(array, LPS_TO_RAS @ affine_lps, meta, geometry_known=geometry_known)
    log.debug("read DICOM %s: %s", what, vol)
    return vol


def read_source_datasets(volume: Volume) -> list[Any]:
    """The headers of the DICOM files a volume was read from, in slice order (axis 2).

    For writing DICOM objects that reference the source series (SEG, SR): each file in
    ``volume.meta["files"]`` is read again without its pixel data (``stop_before_pixels``),
    so the pixels are never loaded twice.

    Parameters
    ----------
    volume : Volume
        A volume returned by :func:`read_dicom` (``meta["format"] == "dicom"``). A volume
        derived from it keeps the list as long as its ``meta`` is kept.

    Returns
    -------
    list of pydicom.Dataset
        One header per slice, ``result[k]`` for ``volume.array[:, :, k]`` (for a volume
        resampled along the normal, ``meta["resampled_slices"]``, one per *source* file).

    Raises
    ------
    DicomSeriesError
        The volume was not read from DICOM, or a source file is gone or no longer holds the
        SOPInstanceUID it had when the volume was read.
    """
    import pydicom

    files = volume.meta.get("files")
    uids = volume.meta.get("sop_instance_uids")
    if volume.meta.get("format") != "dicom" or not files or not uids or len(files) != len(uids):
        raise DicomSeriesError(
            f"{volume.meta.get('source', 'this volume')} was not read from a DICOM series (no "
            "source file list in its metadata); read the DICOM folder with mskmri.io.read"
        )
    out = []
    for f, uid in zip(files, uids, strict=True):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        except Exception as exc:  # removed or damaged since it was read
            raise DicomSeriesError(
                f"{f}: the source DICOM file could not be read again ({type(exc).__name__}); "
                "keep the input folder unchanged while the analysis runs"
            ) from exc
        if _text(ds, "SOPInstanceUID") != uid:
            raise DicomSeriesError(
                f"{f} now holds SOPInstanceUID {_text(ds, 'SOPInstanceUID')!r}, not {uid!r} "
                "as when it was read; keep the input folder unchanged while the analysis runs"
            )
        out.append(ds)
    return out
