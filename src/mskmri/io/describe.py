"""What ``mskmri info`` shows: a description of an image, a label map or a DICOM folder.

:func:`describe` returns a JSON-ready dict (``"schema": "mskmri/info/1"``) and
:func:`format_description` turns it into text for people. Every number carries its unit in
its key (``spacing_mm``, ``voxel_volume_mm3``, ``echo_time_ms``, ``volume_ml``).

Schema ``mskmri/info/1``::

    {
      "schema": "mskmri/info/1",
      "path": str,
      "format": "nifti" | "nrrd" | "nhdr" | "mha" | "mhd" | "dicom",
      "dicom_series": [DicomSeriesInfo.to_dict(), ...] | null,   # DICOM only
      "image": {                       # null when a DICOM folder holds several stacks
        "kind": "image" | "labelmap",
        "shape": [I, J, K], "dtype": str,
        "geometry_known": bool,        # false: the file had no spacing/orientation
        "spacing_mm": [3 floats] | null,
        "orientation": "RAS"-like axis codes | null,
        "orientation_convention": str,
        "origin_mm": [3 floats] | null,     # RAS+ centre of voxel (0, 0, 0)
        "affine": 4x4 | null,               # voxel index -> RAS+ mm
        "voxel_volume_mm3": float | null,
        "field_of_view_mm": [3 floats] | null,
        "value_range": {"min": number, "max": number},
        "labels": {"names_from": "sidecar" | "none",
                   "values": [{"value": int, "name": str | null, "voxels": int,
                               "volume_ml": float | null}, ...]} | null,
        "meta": {...}                  # scalar metadata (series UID, echo time, NIfTI codes, ...)
      },
      "note": str | null
    }

Stable: keys are only ever added under ``mskmri/info/1``; a change of meaning bumps the
version.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from mskmri.errors import InputNotFoundError
from mskmri.volume import Volume

log = logging.getLogger(__name__)

#: Version tag of the dict :func:`describe` returns.
INFO_SCHEMA = "mskmri/info/1"
#: An integer image with at most this many distinct non-zero values is described as a label
#: map (values listed with voxel counts); more values make it a grey-level image.
LABEL_MAP_MAX_VALUES = 255
#: Sidecar schema that names the values of a label map (see ``LabelVolume.sidecar``).
LABELMAP_SIDECAR_SCHEMA = "mskmri/labelmap/1"

_ORIENTATION_CONVENTION = ("RAS+ axis codes (nibabel): the patient direction each array axis "
                           "increases towards (R right, A anterior, S superior)")
#: Volume.meta entries not shown (long per-slice lists).
_META_HIDDEN = ("files", "sop_instance_uids", "original_slice_positions_mm", "source")


def _format_of(path: Path) -> str:
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    ext = path.suffix.lower().lstrip(".")
    return ext if ext in ("nrrd", "nhdr", "mha", "mhd") else "dicom"


def _read_sidecar(path: Path) -> dict[int, str] | None:
    """Value names from a label-map sidecar beside ``path``, or None."""
    from mskmri.io import sidecar_path

    if path.is_dir():
        return None
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: not readable JSON (%s)", side, exc)
        return None
    if not isinstance(data, dict) or data.get("schema") != LABELMAP_SIDECAR_SCHEMA:
        return None
    try:
        return {int(k): str(v) for k, v in data.get("labels", {}).items()}
    except (TypeError, ValueError):
        log.warning("ignoring %s: its labels are not value -> name pairs", side)
        return None


def _value_counts(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values and their voxel counts (bincount when the range allows: faster)."""
    flat = arr.ravel()
    lo, hi = int(flat.min()), int(flat.max())
    if lo >= 0 and hi < 1 << 16:
        counts = np.bincount(flat, minlength=hi + 1)
        values = np.nonzero(counts)[0]
        return values, counts[values]
    return np.unique(flat, return_counts=True)


def _labels(vol: Volume, names: dict[int, str] | None, is_dicom: bool) -> dict[str, Any] | None:
    """The label-map part of the description, or None for a grey-level image."""
    arr = vol.array
    if is_dicom or arr.dtype.kind not in "iub" or arr.size == 0:
        return None
    values, counts = _value_counts(arr.astype(np.int64) if arr.dtype.kind == "b" else arr)
    nonzero = values != 0
    if names is None and int(nonzero.sum()) > LABEL_MAP_MAX_VALUES:
        return None
    voxel_ml = vol.voxel_volume_mm3 / 1000.0 if vol.geometry_known else None
    rows = [
        {
            "value": int(v),
            "name": (names or {}).get(int(v)),
            "voxels": int(c),
            "volume_ml": float(c) * voxel_ml if voxel_ml is not None else None,
        }
        for v, c in zip(values[nonzero], counts[nonzero], strict=True)
    ]
    return {"names_from": "sidecar" if names is not None else "none", "values": rows}


def _meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Scalar metadata only (and small dicts of scalars), JSON-ready."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if k in _META_HIDDEN:
            continue
        if isinstance(v, str | int | float | bool) or v is None:
            out[k] = v
        elif isinstance(v, dict) and all(isinstance(x, str | int | float | bool) for x in v.values()):
            out[k] = dict(v)
    return out


def describe_volume(vol: Volume, *, names: dict[int, str] | None = None,
                    is_dicom: bool = False) -> dict[str, Any]:
    """The ``"image"`` part of :func:`describe` for a volume already read.

    Parameters
    ----------
    vol : Volume
        Any volume.
    names : dict of int to str, optional
        Value names (from a sidecar); given names make it a label map.
    is_dicom : bool
        DICOM images are grey-level images, never described as label maps.
    """
    arr = vol.array
    known = vol.geometry_known
    labels = _labels(vol, names, is_dicom)
    if arr.size:
        lo, hi = arr.min(), arr.max()
        value_range = {"min": lo.item(), "max": hi.item()}
    else:
        value_range = {"min": None, "max": None}
    return {
        "kind": "labelmap" if labels is not None else "image",
        "shape": list(vol.shape),
        "dtype": str(arr.dtype),
        "geometry_known": known,
        "spacing_mm": list(vol.spacing) if known else None,
        "orientation": "".join(vol.orientation) if known else None,
        "orientation_convention": _ORIENTATION_CONVENTION,
        "origin_mm": list(vol.origin) if known else None,
        "affine": vol.affine.tolist() if known else None,
        "voxel_volume_mm3": vol.voxel_volume_mm3 if known else None,
        "field_of_view_mm": [n * s for n, s in zip(vol.shape, vol.spacing, strict=True)]
        if known else None,
        "value_range": value_range,
        "labels": labels,
        "meta": _meta(vol.meta),
    }


def describe(
    path: str | os.PathLike[str],
    *,
    series: str | None = None,
    echo: float | None = None,
    allow_resample: bool = False,
) -> dict[str, Any]:
    """Describe an image file, a label map or a DICOM folder (schema ``mskmri/info/1``).

    Parameters
    ----------
    path : path-like
        NIfTI, NRRD, MHA/MHD, a DICOM file or a folder of DICOM files.
    series, echo, allow_resample
        As for :func:`mskmri.io.read`; for a DICOM folder with several series or echoes they
        choose the one whose values are described (without them, all are listed and
        ``"image"`` is null).

    Returns
    -------
    dict
        See the module docstring.

    Raises
    ------
    InputNotFoundError, UnsupportedFormatError, DicomSeriesError, GeometryError
        As :func:`mskmri.io.read` does.
    """
    from mskmri.io import read

    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"{p} does not exist; check the path")
    fmt = _format_of(p)
    out: dict[str, Any] = {"schema": INFO_SCHEMA, "path": str(p), "format": fmt,
                           "dicom_series": None, "image": None, "note": None}
    if fmt == "dicom":
        from mskmri.io.dicom import is_dicom_file, list_series

        if p.is_dir() or is_dicom_file(p):
            infos = list_series(p)
            out["dicom_series"] = [s.to_dict() for s in infos]
            stacks = [st for s in infos for st in s.stacks]
            chosen = series is not None or echo is not None
            if not chosen and p.is_dir() and (len(stacks) > 1 or stacks[0].problem):
                out["note"] = (
                    f"{len(infos)} series, {len(stacks)} stacks: give --series / --echo to "
                    "describe the values of one" if len(stacks) > 1 else
                    f"the series cannot be read as one volume: {stacks[0].problem}"
                )
                return out
    vol = read(p, series=series, echo=echo, allow_resample=allow_resample)
    out["image"] = describe_volume(vol, names=_read_sidecar(p), is_dicom=fmt == "dicom")
    return out


# ---------------------------------------------------------------------------- text
def _fmt_num(v: Any) -> str:
    if v is None:
        return "?"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _triple(values: list[float] | None, unit: str = "mm", sep: str = " x ") -> str:
    if values is None:
        return "unknown"
    return sep.join(f"{v:.6g}" for v in values) + (f" {unit}" if unit else "")


def _series_lines(series: list[dict[str, Any]]) -> list[str]:
    lines = [f"DICOM: {len(series)} series"]
    for s in series:
        num = f"#{s['number']}" if s["number"] is not None else "(no number)"
        lines.append(f"  [{s['index']}] --series {s['selector']}  {num} "
                     f"{s['description']!r} {s['modality']} {s['manufacturer']}, "
                     f"{s['n_files']} files")
        if s["echo_times_ms"]:
            tes = ", ".join(f"{t:g}" for t in s["echo_times_ms"])
            lines.append(f"      echo times: {tes} ms")
        lines.append(f"      uid {s['uid']}")
        for st in s["stacks"]:
            te = (f"TE {st['echo_time_ms']:g} ms" if st["echo_time_ms"] is not None else "")
            if st["echo_number"] is not None:
                te += f" (echo {st['echo_number']})"
            extra = " ".join(f"{k} {v}" for k, v in st["split_by"])
            shape = "x".join(str(n) for n in st["shape"])
            geo = (f"{_triple(st['spacing'])}  {st['orientation']}" if st["spacing"]
                   else "geometry: see problem" if st["problem"] else "single slice")
            parts = [p for p in (te.strip(), extra, shape, geo) if p]
            lines.append(f"      stack {st['selector']}:  " + "  ".join(parts))
            if st["problem"]:
                lines.append(f"        problem: {st['problem']}")
    return lines


def _image_lines(im: dict[str, Any]) -> list[str]:
    shape = " x ".join(str(n) for n in im["shape"])
    lines = [f"{'label map' if im['kind'] == 'labelmap' else 'image'}: {shape}  {im['dtype']}"]
    if not im["geometry_known"]:
        lines.append("  geometry    UNKNOWN (the file has no spacing/orientation; nothing can "
                     "be measured from it)")
    else:
        lines += [
            f"  spacing     {_triple(im['spacing_mm'])}",
            f"  orientation {im['orientation']} (RAS+ axis codes)",
            f"  origin      ({_triple(im['origin_mm'], unit='', sep=', ')}) mm, RAS+",
            f"  voxel       {im['voxel_volume_mm3']:.6g} mm^3; field of view "
            f"{_triple(im['field_of_view_mm'])}",
            "  affine (voxel index -> RAS+ mm):",
        ]
        lines += ["    [" + "  ".join(f"{v:10.4f}" for v in row) + "]" for row in im["affine"]]
    vr = im["value_range"]
    lines.append(f"  values      {_fmt_num(vr['min'])} .. {_fmt_num(vr['max'])}")
    meta = im.get("meta") or {}
    shown = {k: v for k, v in meta.items() if v not in (None, "", {}) and k != "format"}
    if shown:
        lines.append("  meta        " + "; ".join(f"{k}={_fmt_num(v)}" for k, v in shown.items()))
    labels = im.get("labels")
    if labels:
        lines.append(f"  label values ({len(labels['values'])}):")
        for row in labels["values"]:
            vol = f"{row['volume_ml']:.4g} mL" if row["volume_ml"] is not None else "? mL"
            lines.append(f"    {row['value']:>5}  {row['name'] or '(no name)':<30} "
                         f"{row['voxels']:>10} voxels  {vol}")
    return lines


def format_description(info: dict[str, Any]) -> str:
    """Human-readable text for a :func:`describe` dict (no trailing newline)."""
    lines = [f"{info['path']}  ({info['format']})"]
    if info.get("dicom_series"):
        lines += _series_lines(info["dicom_series"])
    if info.get("image"):
        lines += _image_lines(info["image"])
    if info.get("note"):
        lines.append(f"note: {info['note']}")
    return "\n".join(lines)
