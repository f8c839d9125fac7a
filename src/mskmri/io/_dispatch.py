"""Format dispatch for ``read`` / ``write``."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mskmri.errors import InputNotFoundError, LabelError, UnsupportedFormatError
from mskmri.io._atomic import atomic_path, atomic_write_json
from mskmri.volume import LabelVolume, Volume

log = logging.getLogger(__name__)

NIFTI_EXTENSIONS = (".nii", ".nii.gz")
ITK_EXTENSIONS = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_EXTENSIONS = (".dcm", ".ima")
IMAGE_EXTENSIONS = NIFTI_EXTENSIONS + ITK_EXTENSIONS + DICOM_EXTENSIONS


def _ext(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def read(
    path: str | os.PathLike[str],
    *,
    series: str | None = None,
    echo: float | int | None = None,
    allow_resample: bool = False,
) -> Volume:
    """Read an image from a file or a DICOM folder.

    Parameters
    ----------
    path : path-like
        NIfTI (``.nii``, ``.nii.gz``), NRRD, MHA/MHD, a DICOM file, or a folder holding a
        DICOM series (searched recursively).
    series : str, optional
        For a DICOM folder with several series: SeriesInstanceUID, SeriesNumber or an index
        as listed by ``mskmri info``.
    echo : float or int, optional
        For a multi-echo series: echo time in ms or echo number.
    allow_resample : bool
        For DICOM: resample a series with non-uniform slice spacing instead of refusing it.

    Returns
    -------
    Volume
        3-D volume with a RAS+ affine (``geometry_known`` False when the file had none).
    """
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"{p} does not exist; check the path")
    if p.is_dir():
        from mskmri.io.dicom import read_dicom

        return read_dicom(p, series=series, echo=echo, allow_resample=allow_resample)
    ext = _ext(p)
    if p.stat().st_size == 0:
        raise UnsupportedFormatError(f"{p} is empty (0 bytes); give a complete image file")
    if ext in NIFTI_EXTENSIONS:
        from mskmri.io.nifti import read_nifti

        return read_nifti(p)
    if ext in ITK_EXTENSIONS:
        from mskmri.io.itk import read_itk

        return read_itk(p)
    from mskmri.io.dicom import is_dicom_file, read_dicom

    if ext in DICOM_EXTENSIONS or is_dicom_file(p):
        return read_dicom(p, series=series, echo=echo, allow_resample=allow_resample)
    raise UnsupportedFormatError(
        f"{p} is not an image format mskmri reads (supported: NIfTI .nii/.nii.gz, NRRD, "
        "MHA/MHD, DICOM files or a folder of them)"
    )


def read_labels(
    path: str | os.PathLike[str],
    *,
    schema: str = "custom",
    labels: Mapping[int, str] | None = None,
    strict: bool = True,
) -> LabelVolume:
    """Read a label map and name its values.

    Parameters
    ----------
    path : path-like
        Any format :func:`read` accepts.
    schema : str
        Project schema name (``"knee"``, ``"spine"``, ``"lesion"``) whose names are used when
        ``labels`` is not given; a JSON sidecar beside the file, if present, is checked too.
    labels : mapping, optional
        Explicit value -> name table.
    strict : bool
        Raise :class:`LabelError` when the map holds values the table does not name.
    """
    vol = read(path)
    arr = vol.array
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise LabelError(
                f"{path} holds fractional values, so it is not a label map; give a "
                "segmentation (integer labels)"
            )
    if labels is None:
        from mskmri.labels import SCHEMAS, spine_labels_for

        if schema == "spine":
            labels = spine_labels_for(set(np.unique(arr).tolist()))
        else:
            labels = dict(SCHEMAS.get(schema, {}))
    lv = LabelVolume(
        arr.astype(np.int32) if arr.dtype.kind == "f" else arr,
        vol.affine,
        labels,
        schema=schema,
        meta=vol.meta,
        geometry_known=vol.geometry_known,
    )
    unknown = lv.unknown_values()
    if unknown and strict:
        raise LabelError(
            f"{path} holds label values {unknown} that the {schema!r} schema does not define; "
            f"give a map in the project's {schema} schema (see `mskmri info --labels`)"
        )
    return lv


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """``seg.nii.gz`` -> ``seg.json`` (the label-map sidecar)."""
    p = Path(path)
    ext = _ext(p)
    return p.with_name(p.name[: -len(ext)] + ".json") if ext else p.with_suffix(".json")


def write(volume: Volume, path: str | os.PathLike[str], *, sidecar: bool = True) -> Path:
    """Write ``volume`` atomically; for a LabelVolume also its JSON sidecar.

    The format follows the extension: ``.nii``/``.nii.gz`` (NIfTI), ``.nrrd``, ``.mha``.
    """
    p = Path(path)
    ext = _ext(p)
    with atomic_path(p) as tmp:
        if ext in NIFTI_EXTENSIONS:
            from mskmri.io.nifti import write_nifti

            write_nifti(volume, tmp)
        elif ext in (".nrrd", ".mha"):
            from mskmri.io.itk import write_itk

            write_itk(volume, tmp)
        else:
            raise UnsupportedFormatError(
                f"cannot write {p.name}: give an output ending in .nii.gz, .nii, .nrrd or .mha"
            )
    if sidecar and isinstance(volume, LabelVolume):
        atomic_write_json(sidecar_path(p), volume.sidecar())
    log.debug("wrote %s", p)
    return p
