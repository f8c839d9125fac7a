"""What a report says about the study: a summary without patient identifiers, input checksums.

:func:`study_summary` gives the rows of the report's "Study" table. From a DICOM input it
reads the header of the first slice again (``pydicom.dcmread(..., stop_before_pixels=True)``;
:mod:`mskmri.io.dicom` keeps only the acquisition fields in ``Volume.meta``) and shows the
acquisition (modality, scanner, field strength, sequence, TR/TE/TI, flip angle). Patient
identifiers (:data:`PHI_FIELDS`: name, ID, birth date, accession number, institution, study
date and referring physician) are shown only when the caller asks for them
(``--include-phi``); otherwise the report says that they were left out.

:func:`input_checksums` records the size and SHA-256 of every input (a DICOM folder: the
digest of the per-file digests in slice order, so the same series gives the same value
wherever its files sit).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from mskmri.volume import Volume

log = logging.getLogger(__name__)

#: DICOM keywords that identify a patient (or lead to one), with the words the report shows.
#: They appear in a report only with ``include_phi=True``.
PHI_FIELDS: Final[tuple[tuple[str, str], ...]] = (
    ("PatientName", "Patient name"),
    ("PatientID", "Patient ID"),
    ("PatientBirthDate", "Birth date"),
    ("AccessionNumber", "Accession number"),
    ("InstitutionName", "Institution"),
    ("ReferringPhysicianName", "Referring physician"),
    ("StudyDate", "Study date"),
)

#: Acquisition fields that identify no one: (DICOM keyword, label, unit or "").
ACQUISITION_FIELDS: Final[tuple[tuple[str, str, str], ...]] = (
    ("Modality", "Modality", ""),
    ("Manufacturer", "Manufacturer", ""),
    ("ManufacturerModelName", "Scanner model", ""),
    ("MagneticFieldStrength", "Field strength", "T"),
    ("SeriesDescription", "Series", ""),
    ("SequenceName", "Sequence", ""),
    ("ScanningSequence", "Scanning sequence", ""),
    ("RepetitionTime", "TR", "ms"),
    ("EchoTime", "TE", "ms"),
    ("InversionTime", "TI", "ms"),
    ("FlipAngle", "Flip angle", "°"),
    ("PatientSex", "Sex", ""),
    ("PatientAge", "Age", ""),
)

#: Read files in chunks of this many bytes when hashing.
_CHUNK_BYTES: Final = 1 << 20


@dataclass(frozen=True)
class StudySummary:
    """The rows of the report's study table.

    Attributes
    ----------
    rows : list of (str, str)
        (label, value) pairs, in display order.
    phi_included : bool
        True when patient identifiers are among ``rows`` (the report then says so on top).
    phi_note : str
        One sentence on what was left out (empty when nothing was).
    """

    rows: list[tuple[str, str]]
    phi_included: bool
    phi_note: str


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return " ".join(str(v) for v in value)
    return str(value).strip()


def _dicom_header(image: Volume) -> Any | None:
    files = image.meta.get("files") or ()
    if image.meta.get("format") != "dicom" or not files:
        return None
    try:
        import pydicom

        return pydicom.dcmread(str(files[0]), stop_before_pixels=True)
    except (OSError, ValueError, ImportError) as exc:  # the report still works without it
        log.warning("could not read the DICOM header of %s again for the report: %s",
                    files[0], exc)
        return None


def study_summary(image: Volume, *, include_phi: bool = False,
                  description: str = "") -> StudySummary:
    """Study rows for the report: acquisition, and patient identifiers only when asked.

    Parameters
    ----------
    image : Volume
        The input image (``meta["format"] == "dicom"`` and ``meta["files"]`` for DICOM).
    include_phi : bool
        Show the :data:`PHI_FIELDS` found in the DICOM header.
    description : str
        First row ("Input"): e.g. the file name.

    Returns
    -------
    StudySummary
    """
    rows: list[tuple[str, str]] = []
    if description:
        rows.append(("Input", description))
    ds = _dicom_header(image)
    if ds is None:
        fmt = str(image.meta.get("format") or Path(str(image.meta.get("source", ""))).suffix
                  or "file")
        rows.append(("Format", fmt))
        return StudySummary(rows, False, "")
    rows.append(("Format", f"DICOM series of {image.meta.get('n_files', '?')} file(s)"))
    for keyword, label, unit in ACQUISITION_FIELDS:
        text = _text(ds.get(keyword))
        if text:
            rows.append((label, f"{text} {unit}".strip()))
    present = [(kw, label) for kw, label in PHI_FIELDS if _text(ds.get(kw))]
    if include_phi:
        rows += [(label, _text(ds.get(kw))) for kw, label in present]
        return StudySummary(rows, bool(present), "")
    note = ("Patient identifiers (" + ", ".join(label.lower() for _, label in present)
            + ") are in the DICOM header but left out of this report; run with --include-phi "
            "to show them.") if present else ""
    return StudySummary(rows, False, note)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of one file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def input_checksum(path: str | os.PathLike[str],
                   files: Sequence[str | os.PathLike[str]] = ()) -> dict[str, Any]:
    """Size and SHA-256 of one input.

    Parameters
    ----------
    path : path-like
        The input as given (a file, or a DICOM folder).
    files : sequence of path-like
        For a folder: the files that were read, in slice order (``Volume.meta["files"]``).

    Returns
    -------
    dict
        ``{"path", "bytes", "sha256"}``; a folder adds ``"files"`` (count) and its
        ``sha256`` is the digest of the per-file hex digests joined in order.
    """
    p = Path(path)
    if p.is_file():
        return {"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
    members = [Path(f) for f in files] or sorted(f for f in p.rglob("*") if f.is_file())
    outer = hashlib.sha256()
    for f in members:
        outer.update(sha256_file(f).encode("ascii"))
    return {"path": str(p), "bytes": sum(f.stat().st_size for f in members),
            "sha256": outer.hexdigest(), "files": len(members)}


def input_checksums(inputs: Mapping[str, tuple[str | os.PathLike[str] | None, Volume | None]]
                    ) -> dict[str, dict[str, Any]]:
    """:func:`input_checksum` of each named input that was given.

    Parameters
    ----------
    inputs : mapping
        Role (``"image"``, ``"seg"``, ``"lesions"``) -> (path or None, the Volume read from it
        or None). The volume's ``meta["files"]`` orders a DICOM folder.
    """
    out: dict[str, dict[str, Any]] = {}
    for role, (path, vol) in inputs.items():
        if path is None:
            continue
        files = (vol.meta.get("files") or ()) if vol is not None else ()
        out[role] = input_checksum(path, files)
    return out


__all__ = ["ACQUISITION_FIELDS", "PHI_FIELDS", "StudySummary", "input_checksum",
           "input_checksums", "sha256_file", "study_summary"]
