"""The measurement contract shared by every anatomy (knee, spine).

A measurement is a small frozen :class:`Measurement` (name, value, unit, the structure and
region it belongs to, and the method that produced it). A list of them, together with a
description of the input and the tool version, becomes the versioned JSON document
``{"schema": "mskmri/measurements/1", ...}`` that ``mskmri measure`` writes.

Document layout (schema ``mskmri/measurements/1``)::

    {
      "schema": "mskmri/measurements/1",
      "tool": {"name": "mskmri", "version": "0.1.0"},
      "input": {"path": ..., "shape": [I, J, K], "spacing_mm": [...], "orientation": "RAS",
                "voxel_volume_mm3": ..., "affine": [[...] x 4], ...},
      "measurements": [
        {"name": "volume", "structure": "femur", "value": 267.14, "unit": "mL",
         "method": "voxel count x voxel volume"},
        ...
      ],
      "warnings": ["..."]
    }

Rules: every number carries a unit (``"1"`` for dimensionless numbers, ``"count"`` for
counts); a value that cannot be measured is ``null`` in JSON and carries ``"reason"``;
nothing is measured from a volume without geometry (:meth:`Volume.require_geometry`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from mskmri.errors import LabelError, MskMriError
from mskmri.volume import LabelVolume, Volume

#: Version tag of the measurements JSON document.
MEASUREMENTS_SCHEMA = "mskmri/measurements/1"

#: Millilitres per cubic millimetre (1 mL = 1 cm^3 = 1000 mm^3).
ML_PER_MM3 = 1e-3

#: Unit of dimensionless numbers (ratios, fractions).
DIMENSIONLESS = "1"

#: Unit of counts (number of voxels, lesions, components).
COUNT = "count"

#: Method string of volumes from a label map.
VOXEL_COUNT_METHOD = "voxel count x voxel volume"

#: Significant digits kept in JSON for floating values (rounded only on output).
JSON_SIGNIFICANT_DIGITS = 10


class MeasurementError(MskMriError):
    """A measurement was built or read wrongly (no unit, NaN without a reason, bad document)."""


def _empty_extra() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Measurement:
    """One measured quantity with its unit.

    Parameters
    ----------
    name : str
        What is measured, e.g. ``"volume"``, ``"thickness_mean"``, ``"lesion_count"``.
    value : float
        The number, in ``unit``. NaN is allowed only with ``extra["reason"]`` saying why.
    unit : str
        Unit of ``value``: ``"mL"``, ``"mm"``, ``"deg"``, ``"%"``, ``"1"`` (dimensionless),
        ``"count"``. Never empty.
    structure : str, optional
        Project-schema structure name (``"femur"``, ``"L3"``); None for whole-study values.
    method : str
        One line saying how the value was obtained (``"voxel count x voxel volume"``).
    region : str, optional
        Sub-region of the structure (``"medial"``, ``"central"``), if any.
    extra : mapping, optional
        Further JSON-serialisable details (e.g. ``{"voxels": 12345}``). Read-only copy.

    Notes
    -----
    :attr:`key` names the measurement uniquely within a document
    (``name.structure.region``) and is the column name used by :mod:`mskmri.evaluate.stats`.
    """

    name: str
    value: float
    unit: str
    structure: str | None = None
    method: str = ""
    region: str | None = None
    extra: Mapping[str, Any] = field(default_factory=_empty_extra, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise MeasurementError(f"a measurement needs a non-empty name, not {self.name!r}")
        if not isinstance(self.unit, str) or not self.unit:
            raise MeasurementError(
                f"measurement {self.name!r} has no unit; give one (e.g. 'mL', 'mm', "
                f"{DIMENSIONLESS!r} for dimensionless, {COUNT!r} for counts)"
            )
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float, np.number)):
            raise MeasurementError(
                f"measurement {self.name!r} must have a real number as value, not "
                f"{type(self.value).__name__}"
            )
        value = float(self.value)
        if math.isinf(value):
            raise MeasurementError(f"measurement {self.name!r} is infinite; this is a bug")
        extra = MappingProxyType(dict(self.extra))
        if math.isnan(value) and not extra.get("reason"):
            raise MeasurementError(
                f"measurement {self.name!r} is NaN without a reason; give extra={{'reason': ...}}"
            )
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "extra", extra)

    @property
    def key(self) -> str:
        """Unique column name: ``name[.structure][.region]`` (e.g. ``volume.femur``)."""
        parts = [self.name, self.structure, self.region]
        return ".".join(p for p in parts if p)

    @property
    def is_missing(self) -> bool:
        """True when the value could not be measured (NaN with a reason)."""
        return math.isnan(self.value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; NaN becomes ``None`` and its reason is kept."""
        out: dict[str, Any] = {"name": self.name}
        if self.structure is not None:
            out["structure"] = self.structure
        if self.region is not None:
            out["region"] = self.region
        out["value"] = json_number(self.value)
        out["unit"] = self.unit
        out["method"] = self.method
        extra = dict(self.extra)
        if "reason" in extra:
            out["reason"] = extra.pop("reason")
        if extra:
            out["extra"] = _jsonable(extra)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Measurement:
        """Inverse of :meth:`to_dict` (``null`` values come back as NaN)."""
        try:
            value = d["value"]
            extra = dict(d.get("extra") or {})
            if value is None:
                value = float("nan")
                extra["reason"] = d.get("reason") or "not measured (no reason given)"
            return cls(
                name=d["name"], value=value, unit=d["unit"], structure=d.get("structure"),
                method=d.get("method", ""), region=d.get("region"), extra=extra,
            )
        except KeyError as exc:
            raise MeasurementError(
                f"a measurement entry lacks the key {exc.args[0]!r}: {dict(d)!r}"
            ) from exc


def json_number(
    x: float | int | np.generic | None, digits: int = JSON_SIGNIFICANT_DIGITS
) -> float | int | None:
    """A number for JSON: ints stay ints, floats keep ``digits`` significant digits, NaN and
    None become ``None`` (JSON has no NaN)."""
    if x is None:
        return None
    if isinstance(x, (bool, np.bool_)):
        return bool(x)  # type: ignore[return-value]
    if isinstance(x, (int, np.integer)):
        return int(x)
    xf = float(x)  # type: ignore[arg-type]
    if not math.isfinite(xf):
        return None
    return float(f"{xf:.{digits}g}")


def _jsonable(obj: Any) -> Any:
    """Recursively turn numpy scalars/arrays and tuples into plain JSON types."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (float, int, np.number, np.bool_)) and not isinstance(obj, bool):
        return json_number(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def describe_input(volume: Volume, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The ``"input"`` block of a document: where the data came from and its geometry.

    Parameters
    ----------
    volume : Volume
        The measured volume (its geometry must be known).
    path : path-like, optional
        File it was read from (default: ``volume.meta["source"]``).

    Returns
    -------
    dict
        ``path``, ``shape``, ``spacing_mm``, ``orientation`` (nibabel axis codes, RAS+),
        ``voxel_volume_mm3``, ``affine`` (4x4, voxel -> RAS+ mm) and, for label maps,
        ``label_schema``.
    """
    src = path if path is not None else volume.meta.get("source")
    info: dict[str, Any] = {
        "path": str(src) if src is not None else None,
        "shape": list(volume.shape),
        "spacing_mm": [json_number(s) for s in volume.spacing],
        "orientation": "".join(volume.orientation),
        "voxel_volume_mm3": json_number(volume.voxel_volume_mm3),
        "affine": [[json_number(v) for v in row] for row in volume.affine.tolist()],
    }
    if isinstance(volume, LabelVolume):
        info["label_schema"] = volume.schema
    return info


def measurements_document(
    measurements: Sequence[Measurement],
    *,
    input_info: Mapping[str, Any],
    tool_version: str,
    warnings: Iterable[str] = (),
) -> dict[str, Any]:
    """Assemble the versioned measurements document (``mskmri/measurements/1``).

    Parameters
    ----------
    measurements : sequence of Measurement
        In output order. Keys (:attr:`Measurement.key`) must be unique.
    input_info : mapping
        The ``"input"`` block, usually from :func:`describe_input`.
    tool_version : str
        ``mskmri.__version__`` of the code that measured.
    warnings : iterable of str
        Things a reader must know (absent structures, clipped values ...).

    Returns
    -------
    dict
        JSON-ready: ``schema``, ``tool``, ``input``, ``measurements``, ``warnings``.
    """
    seen: set[str] = set()
    for m in measurements:
        if not isinstance(m, Measurement):
            raise MeasurementError(f"expected Measurement objects, got {type(m).__name__}")
        if m.key in seen:
            raise MeasurementError(f"measurement {m.key!r} appears twice in one document")
        seen.add(m.key)
    return {
        "schema": MEASUREMENTS_SCHEMA,
        "tool": {"name": "mskmri", "version": str(tool_version)},
        "input": _jsonable(dict(input_info)),
        "measurements": [m.to_dict() for m in measurements],
        "warnings": [str(w) for w in warnings],
    }


def write_measurements(path: str | os.PathLike[str], document: Mapping[str, Any]) -> Path:
    """Write a measurements document atomically (temporary name, then rename)."""
    from mskmri.io import atomic_write_json

    if document.get("schema") != MEASUREMENTS_SCHEMA:
        raise MeasurementError(
            f"refusing to write a document with schema {document.get('schema')!r}; "
            f"build it with measurements_document() ({MEASUREMENTS_SCHEMA})"
        )
    return atomic_write_json(path, document)


def read_measurements(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a measurements JSON file and check its schema tag.

    Returns
    -------
    dict
        The document; ``document["measurements"]`` is a list of dicts (see
        :meth:`Measurement.from_dict`).
    """
    import json

    from mskmri.errors import InputNotFoundError, UnsupportedFormatError

    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"{p} does not exist or is not a file; check the path")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnsupportedFormatError(
            f"{p} is not valid JSON ({exc}); give a file written by `mskmri measure`"
        ) from exc
    if not isinstance(doc, dict) or doc.get("schema") != MEASUREMENTS_SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise UnsupportedFormatError(
            f"{p} is not a measurements document (schema {got!r}, expected "
            f"{MEASUREMENTS_SCHEMA!r}); give a file written by `mskmri measure --json`"
        )
    return doc


def check_label_values(
    seg: LabelVolume, known: Mapping[int, str], *, schema_name: str
) -> None:
    """Raise :class:`LabelError` when ``seg`` holds values that ``known`` does not define.

    Parameters
    ----------
    seg : LabelVolume
        The label map.
    known : mapping of int to str
        The project schema (value -> name).
    schema_name : str
        For the message (``"knee"``).
    """
    present = seg.present_values()
    unknown = [v for v in present if v not in known]
    if unknown:
        src = seg.meta.get("source", "the label map")
        raise LabelError(
            f"{src} holds label values {unknown} that the {schema_name} schema does not define "
            f"({len(known)} known values, see mskmri.labels); map it to the project's "
            f"{schema_name} schema first (mskmri.labels has a table for each known source)"
        )


def label_volumes(
    seg: LabelVolume, names: Mapping[int, str], *, method: str = VOXEL_COUNT_METHOD
) -> list[Measurement]:
    """Volume (mL) of every value of ``names`` present in ``seg``: voxel count x voxel volume.

    Parameters
    ----------
    seg : LabelVolume
        Label map with known geometry (checked).
    names : mapping of int to str
        Value -> structure name; values absent from ``seg`` are skipped.
    method : str
        Method string recorded with each measurement.

    Returns
    -------
    list of Measurement
        ``name="volume"``, ``unit="mL"``, in the order of ``names``; ``extra["voxels"]`` is
        the voxel count.

    Notes
    -----
    The voxel volume is ``|det(A[:3, :3])|`` of the affine, so the result does not depend on
    how the array is oriented or permuted.
    """
    seg.require_geometry("a volume in mL")
    arr = seg.array
    if arr.size == 0:
        return []
    flat = arr.ravel()
    if flat.min() < 0:
        raise LabelError(
            f"label map has negative values (min {int(flat.min())}); labels must be >= 0"
        )
    counts = np.bincount(flat.astype(np.int64, copy=False), minlength=max(names, default=0) + 1)
    vox_ml = seg.voxel_volume_mm3 * ML_PER_MM3
    out = []
    for value, name in names.items():
        n = int(counts[value]) if value < counts.size else 0
        if n == 0:
            continue
        out.append(Measurement(
            name="volume", value=n * vox_ml, unit="mL", structure=name, method=method,
            extra={"voxels": n, "label": int(value)},
        ))
    return out
