"""Many studies at once: ``mskmri cohort MANIFEST --out DIR`` runs ``analyze`` on Dask.

The manifest is a CSV file with one row per study:

===============  ==========================================================================
``path``         the image: DICOM folder, NIfTI, NRRD or MHA (relative paths are read from
                 the manifest's folder)
``group``        the study's group label (e.g. ``normal`` / ``oa``), carried into the table
``anatomy``      ``knee`` or ``spine``; may be left out when ``--anatomy`` gives a default
``id``           optional study id (default: the file or folder name without extension);
                 letters, digits, ``.``, ``_`` and ``-`` only, unique
``seg``          optional label map on the image's grid: analysed instead of segmenting
                 (``analyze --seg``)
``lesions``      optional knee lesion mask (``analyze --lesions``)
``series``       optional, knee: which series of a DICOM folder holding several
                 (SeriesInstanceUID, SeriesNumber or index, as ``mskmri info`` lists them)
anything else    carried unchanged into the table (e.g. ``site``, ``age``)
===============  ==========================================================================

Every study is analysed by :func:`mskmri.analyze.analyze_knee` or
:func:`mskmri.analyze_spine.analyze_spine` into ``DIR/studies/<id>/`` as one Dask task: by
default on a :class:`distributed.LocalCluster` of ``workers`` processes with one thread each
(the segmenters are single-threaded there: one study per core), or on any running Dask
scheduler given by address (``--scheduler tcp://host:8786``). With a remote scheduler the
workers must see the manifest's paths and ``DIR`` at the same paths (a shared file system).

``DIR`` then holds:

=========================  ==================================================================
``studies/<id>/``          one analysis folder per study (its ``report.html``, ...)
``records/<id>.json``      ``mskmri/cohort-study/1``: the input checksum and the SHA-256 of
                           the study's analysis manifest, written when the study finished
``measurements.csv``       one row per successful study: ``subject`` (= id), ``group``,
                           ``anatomy``, the manifest's extra columns, then one column per
                           measurement named ``key [unit]`` (e.g. ``volume.joint_effusion
                           [mL]``): the table ``mskmri stats DIR/measurements.csv --group
                           group`` takes
``measurements.parquet``   the same table (Apache Parquet; units also in the column metadata)
``failures.csv``           ``id, path, group, anatomy, error, reason``: one line per failed
                           study, with the one-line reason (header only when none failed)
``index.html``             every study with its group, status and a link to its report
``cohort.json``            ``mskmri/cohort/1``: command, options, versions, counts, timings
=========================  ==================================================================

Resuming: a study whose record is present, whose input checksum (image, ``seg``,
``lesions``, anatomy) still matches and whose analysis manifest is unchanged is skipped and
its measurements are read back; any other study (new, failed before, or with changed inputs)
is analysed. ``overwrite=True`` (``--overwrite``) analyses every study again.

Failures are isolated: an unreadable image, a segmentation error or any other exception in
one study is caught in its task (or, when a worker process dies, when its result is
gathered) and listed with its reason; the other studies go on. The command's exit status is
0 when every study succeeded and :data:`EXIT_SOME_FAILED` (3) when some failed.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import html
import json
import logging
import os
import platform
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from mskmri._provenance import file_record
from mskmri.errors import MskMriError

log = logging.getLogger(__name__)

#: Version tags of ``cohort.json`` and of each ``records/<id>.json``.
COHORT_SCHEMA: Final = "mskmri/cohort/1"
RECORD_SCHEMA: Final = "mskmri/cohort-study/1"
#: ``cohort.json["kind"]``: only such a folder is resumed into.
COHORT_KIND: Final = "cohort"
#: Exit status of ``mskmri cohort`` when at least one study failed (0: all succeeded).
EXIT_SOME_FAILED: Final = 3

#: Output names inside ``DIR``.
STUDIES_DIR: Final = "studies"
RECORDS_DIR: Final = "records"
TABLE_CSV: Final = "measurements.csv"
TABLE_PARQUET: Final = "measurements.parquet"
FAILURES_CSV: Final = "failures.csv"
INDEX_HTML: Final = "index.html"
COHORT_FILE: Final = "cohort.json"

#: Manifest columns with a meaning; every other column is carried into the table.
REQUIRED_COLUMNS: Final = ("path", "group")
KNOWN_COLUMNS: Final = ("id", "path", "group", "anatomy", "seg", "lesions", "series")
#: Anatomies a cohort can analyse.
ANATOMIES: Final = ("knee", "spine")
#: First columns of the table, before the manifest's extra columns and the measurements.
TABLE_ID_COLUMNS: Final = ("subject", "group", "anatomy")
FAILURE_COLUMNS: Final = ("id", "path", "group", "anatomy", "error", "reason")
#: Default number of local worker processes (one thread each).
DEFAULT_WORKERS: Final = 2
#: Reasons are cut to this many characters (one line in the CSV and the index).
MAX_REASON_CHARS: Final = 300

_ID_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class CohortError(MskMriError):
    """A manifest or output folder that a cohort cannot run with."""


# ============================================================================ the manifest
@dataclass(frozen=True)
class Study:
    """One row of the cohort manifest, paths resolved.

    Attributes
    ----------
    id : str
        Unique study id (folder name under ``DIR/studies``).
    path : Path
        The image (file or DICOM folder).
    group : str
        Group label.
    anatomy : str
        ``"knee"`` or ``"spine"``.
    seg, lesions : Path or None
        Optional label map / lesion mask passed to the analysis.
    series : str or None
        Knee: the series of a DICOM folder to analyse.
    extra : dict of str to str
        The manifest's other columns, carried into the table.
    """

    id: str
    path: Path
    group: str
    anatomy: str
    seg: Path | None = None
    lesions: Path | None = None
    series: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _id_from_path(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _ID_SAFE.sub("_", name).strip("._") or "study"


def _optional_path(cell: str | None, base: Path) -> Path | None:
    """A manifest cell as a path (relative to the manifest's folder), or None when empty."""
    if not cell:
        return None
    q = Path(cell).expanduser()
    return q if q.is_absolute() else base / q


def read_cohort_manifest(path: str | os.PathLike[str], *,
                         anatomy: str | None = None) -> list[Study]:
    """Read and check a cohort manifest CSV (see the module docstring for its columns).

    Parameters
    ----------
    path : path-like
        The CSV file.
    anatomy : str, optional
        Anatomy of rows whose ``anatomy`` cell is empty or absent.

    Returns
    -------
    list of Study
        In manifest order. Paths do not have to exist: a missing image fails its study alone.

    Raises
    ------
    CohortError
        No such file, a missing column, an empty group, an unknown anatomy, a bad or
        duplicate id.
    """
    p = Path(path)
    if not p.is_file():
        raise CohortError(f"cohort manifest {p} does not exist or is not a file; give a CSV "
                          "with the columns path,group[,anatomy,id,seg,lesions]")
    if anatomy is not None and anatomy not in ANATOMIES:
        raise CohortError(f"--anatomy must be one of {', '.join(ANATOMIES)}, not {anatomy!r}")
    try:
        with p.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()}
                    for r in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CohortError(f"cohort manifest {p} is not a readable CSV file ({exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if "anatomy" not in columns and anatomy is None:
        missing.append("anatomy (or --anatomy)")
    if missing:
        raise CohortError(f"cohort manifest {p} lacks the column(s) {', '.join(missing)} (it "
                          f"has: {', '.join(columns) or 'none'}); give path,group,anatomy")
    if not rows:
        raise CohortError(f"cohort manifest {p} has no studies; add one row per study")
    base = p.resolve().parent
    studies: list[Study] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        if not row.get("path"):
            raise CohortError(f"{p} line {line}: the path is empty; every study needs an image")
        image = Path(row["path"]).expanduser()
        image = image if image.is_absolute() else base / image
        group = row.get("group", "")
        if not group:
            raise CohortError(f"{p} line {line}: the group is empty; every study needs a group")
        anat = (row.get("anatomy") or anatomy or "").lower()
        if anat not in ANATOMIES:
            raise CohortError(f"{p} line {line}: anatomy {anat or '(empty)'!r} is not one of "
                              f"{', '.join(ANATOMIES)}")
        sid = row.get("id") or _id_from_path(image)
        if _ID_SAFE.search(sid) or sid in (".", ".."):
            raise CohortError(f"{p} line {line}: id {sid!r} may hold only letters, digits, "
                              "'.', '_' and '-' (it names a folder)")
        if sid in seen:
            raise CohortError(f"{p} line {line}: id {sid!r} is already used on line "
                              f"{seen[sid]}; give every study its own id (an 'id' column)")
        seen[sid] = line

        for col in ("lesions", "series"):
            if anat != "knee" and row.get(col):
                raise CohortError(f"{p} line {line}: the {col} column is for knee studies, "
                                  f"not {anat}; leave it empty")
        extra = {k: v for k, v in row.items() if k and k not in KNOWN_COLUMNS}
        studies.append(Study(id=sid, path=image, group=group, anatomy=anat,
                             seg=_optional_path(row.get("seg"), base),
                             lesions=_optional_path(row.get("lesions"), base),
                             series=row.get("series") or None, extra=extra))
    return studies


# ============================================================================ checksums
def path_checksum(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's contents, or of a folder's files (relative names and contents,
    in sorted order: a DICOM series renamed or re-sorted inside its folder changes it).

    Raises
    ------
    FileNotFoundError
        The path does not exist.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(2, "no such file or folder", str(p))
    if p.is_file():
        return str(file_record(p)["sha256"])
    digest = hashlib.sha256()
    for f in sorted(f for f in p.rglob("*") if f.is_file()):
        digest.update(f.relative_to(p).as_posix().encode() + b"\0")
        digest.update(bytes.fromhex(str(file_record(f)["sha256"])))
    return digest.hexdigest()


def study_checksum(study: Study, options: Mapping[str, Any]) -> str:
    """One SHA-256 over what decides a study's result: anatomy, options and input files."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"anatomy": study.anatomy, "series": study.series,
                              "options": dict(options)}, sort_keys=True).encode())
    for role, p in (("image", study.path), ("seg", study.seg), ("lesions", study.lesions)):
        if p is not None:
            digest.update(f"{role}:{path_checksum(p)}".encode())
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    return str(file_record(path)["sha256"])


# ============================================================================ one study
@dataclass(frozen=True)
class StudyOutcome:
    """What happened to one study (returned by the Dask task; small and picklable).

    Attributes
    ----------
    id : str
    status : {"ok", "skipped", "failed"}
        ``"skipped"``: complete from an earlier run, measurements read back.
    seconds : float
        Wall time of the task (s).
    cpu_seconds : float
        CPU time of the task's process (s; one study per single-thread worker process).
    measurements : list of dict
        ``{"key", "value", "unit"}`` per measurement (empty when failed).
    warnings : list of str
        The analysis warnings.
    error, reason : str
        Exception type and one-line reason when failed, else ``""``.
    report : str
        Report path relative to ``DIR`` (``""`` when failed).
    """

    id: str
    status: str
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    measurements: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str = ""
    reason: str = ""
    report: str = ""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def _analysis_files(anatomy: str) -> tuple[str, str, str]:
    """(manifest, measurements, report) file names of an analysis folder of ``anatomy``."""
    if anatomy == "knee":
        from mskmri import analyze as mod
    else:
        from mskmri import analyze_spine as mod  # type: ignore[no-redef]
    return mod.MANIFEST_FILE, mod.MEASUREMENTS_FILE, mod.REPORT_FILE


def _measurement_rows(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``{"key", "value", "unit"}`` of every measurement of a document (None = not measured)."""
    from mskmri.measure.base import Measurement

    rows = []
    for d in doc.get("measurements", []):
        m = Measurement.from_dict(d)
        rows.append({"key": m.key, "unit": m.unit,
                     "value": None if m.is_missing else float(m.value)})
    return rows


def _complete(study: Study, out_dir: Path, checksum: str) -> StudyOutcome | None:
    """The outcome of an earlier run of ``study`` when it is complete and current, else None."""
    record_path = out_dir / RECORDS_DIR / f"{study.id}.json"
    manifest_name, meas_name, report_name = _analysis_files(study.anatomy)
    sdir = out_dir / STUDIES_DIR / study.id
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if (record.get("schema") != RECORD_SCHEMA or record.get("input_sha256") != checksum
                or record.get("manifest_sha256") != _sha256_file(sdir / manifest_name)):
            return None
        doc = json.loads((sdir / meas_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return StudyOutcome(id=study.id, status="skipped", measurements=_measurement_rows(doc),
                        warnings=list(doc.get("warnings") or []),
                        report=f"{STUDIES_DIR}/{study.id}/{report_name}")


def _limit_threads(threads: int) -> None:
    """One study per worker thread: keep torch from starting a thread per core."""
    try:
        import torch
    except ImportError:  # pragma: no cover - analyses from --seg need no torch
        return
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def run_study(study: Study, out_dir: str | os.PathLike[str], *, overwrite: bool = False,
              options: Mapping[str, Any] | None = None, threads: int = 1) -> StudyOutcome:
    """Analyse one study into ``out_dir/studies/<id>`` and record it (a Dask task).

    Never raises for a problem of the study itself: any exception becomes a ``"failed"``
    outcome with its one-line reason, so one bad study cannot stop a cohort.

    Parameters
    ----------
    study : Study
    out_dir : path-like
        The cohort folder.
    overwrite : bool
        Analyse again even when an earlier complete result matches.
    options : mapping, optional
        Analysis options: ``{"meshes": bool}`` for knees.
    threads : int
        torch threads of this task.

    Returns
    -------
    StudyOutcome
    """
    from mskmri.io import atomic_write_json

    t0, c0 = time.perf_counter(), time.process_time()
    out = Path(out_dir)
    opts = dict(options or {})
    try:
        checksum = study_checksum(study, opts)
        if not overwrite:
            done = _complete(study, out, checksum)
            if done is not None:
                return done
        if study.seg is None:  # the segmenters use torch
            _limit_threads(threads)
        sdir = out / STUDIES_DIR / study.id
        replace = sdir.exists()
        command = (f"mskmri analyze {study.anatomy} {study.path} --out {sdir}"
                   + (f" --seg {study.seg}" if study.seg else "")
                   + (f" --lesions {study.lesions}" if study.lesions else "")
                   + (f" --series {study.series}" if study.series else "")
                   + (" --overwrite" if replace else ""))
        if study.anatomy == "knee":
            from mskmri.analyze import analyze_knee

            res = analyze_knee(study.path, sdir, seg_path=study.seg, lesions_path=study.lesions,
                               series=study.series, meshes=bool(opts.get("meshes", True)),
                               command=command, overwrite=replace)
            doc, warnings = res.measurements, list(res.warnings)
        else:
            from mskmri.analyze_spine import analyze_spine

            sres = analyze_spine(study.path, sdir, seg_path=study.seg, command=command,
                                 overwrite=replace)
            doc, warnings = sres.document, list(sres.warnings)
        manifest_name, _, report_name = _analysis_files(study.anatomy)
        atomic_write_json(out / RECORDS_DIR / f"{study.id}.json", {
            "schema": RECORD_SCHEMA, "id": study.id, "anatomy": study.anatomy,
            "input_sha256": checksum, "options": opts,
            "manifest_sha256": _sha256_file(sdir / manifest_name),
            "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - t0, 3),
        })
        return StudyOutcome(id=study.id, status="ok", seconds=time.perf_counter() - t0,
                            cpu_seconds=time.process_time() - c0,
                            measurements=_measurement_rows(doc), warnings=warnings,
                            report=f"{STUDIES_DIR}/{study.id}/{report_name}")
    except Exception as exc:  # noqa: BLE001 - isolate every failure of one study
        log.debug("study %s failed", study.id, exc_info=True)
        return StudyOutcome(id=study.id, status="failed", seconds=time.perf_counter() - t0,
                            error=type(exc).__name__, reason=_one_line(exc))


# ============================================================================ the table
def measurement_table(studies: Sequence[Study], outcomes: Mapping[str, StudyOutcome]
                      ) -> tuple[list[str], list[dict[str, Any]]]:
    """Wide table of the successful studies: (header, rows), one row per study.

    Columns: :data:`TABLE_ID_COLUMNS`, the manifest's extra columns, then one ``key [unit]``
    column per measurement in order of first appearance; a measurement a study lacks (or
    could not make) is an empty cell.
    """
    extra_cols: list[str] = []
    meas_cols: list[str] = []
    rows: list[dict[str, Any]] = []
    for s in studies:
        o = outcomes.get(s.id)
        if o is None or o.status == "failed":
            continue
        for k in s.extra:
            if k not in extra_cols:
                extra_cols.append(k)
        row: dict[str, Any] = {"subject": s.id, "group": s.group, "anatomy": s.anatomy,
                               **s.extra}
        for m in o.measurements:
            col = f"{m['key']} [{m['unit']}]"
            if col not in meas_cols:
                meas_cols.append(col)
            row[col] = m["value"]
        rows.append(row)
    return [*TABLE_ID_COLUMNS, *extra_cols, *meas_cols], rows


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    from mskmri.io import atomic_path

    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(header), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else
                            (repr(r[k]) if isinstance(r[k], float) else r[k]))
                        for k in header})


def write_parquet(path: Path, header: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """The wide table as Parquet: text id columns, float64 measurement columns (units kept
    in the column names, as in the CSV, and as field metadata ``unit``)."""
    from mskmri._optional import optional_import
    from mskmri.evaluate.stats import split_unit
    from mskmri.io import atomic_path

    pa = optional_import("pyarrow")
    pq = optional_import("pyarrow.parquet")
    fields, arrays = [], []
    for col in header:
        name, unit = split_unit(col)
        if unit is not None and col not in TABLE_ID_COLUMNS:
            fields.append(pa.field(col, pa.float64(), metadata={"unit": unit, "name": name}))
            arrays.append(pa.array([r.get(col) for r in rows], type=pa.float64()))
        else:
            fields.append(pa.field(col, pa.string()))
            vals = [r.get(col) for r in rows]
            arrays.append(pa.array([None if v is None else str(v) for v in vals],
                                   type=pa.string()))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


# ============================================================================ the index
_INDEX_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em auto;padding:0 1.5em;max-width:70em;"
    "color:#222}"
    "table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #ddd;"
    "padding:.3em .6em;text-align:left;vertical-align:top}th{background:#f4f4f4}"
    ".failed{color:#a40000}.skipped{color:#555}.ok{color:#1a6b1a}.note{background:#fff6d6;"
    "border-left:4px solid #d8a300;padding:.5em 1em}td.num{text-align:right}"
)


def write_index(path: Path, *, title: str, studies: Sequence[Study],
                outcomes: Mapping[str, StudyOutcome], notes: Sequence[str] = (),
                links: Sequence[tuple[str, str]] = (),
                columns: Sequence[str] = ()) -> None:
    """A plain HTML page: one row per study (group, anatomy, status, report link, reason).

    Parameters
    ----------
    path : Path
        The page (its links are relative to its folder).
    title : str
    studies, outcomes
        Rows, and what happened to each (a study without an outcome is "not run").
    notes : sequence of str
        Paragraphs shown in a highlighted box above the table (e.g. how studies were
        segmented).
    links : sequence of (label, relative href)
        Files shown above the table (the measurement table, failures).
    columns : sequence of str
        Measurement keys shown as extra columns (value and unit).
    """
    from mskmri.io import atomic_write_text

    e = html.escape
    counts: dict[str, int] = {}
    for s in studies:
        st = outcomes[s.id].status if s.id in outcomes else "not run"
        counts[st] = counts.get(st, 0) + 1
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}"
             f"</title><style>{_INDEX_STYLE}</style></head><body><h1>{e(title)}</h1>",
             "<p>" + ", ".join(f"{n} {e(k)}" for k, n in sorted(counts.items())) + "</p>"]
    parts += [f"<p class='note'>{e(n)}</p>" for n in notes]
    if links:
        parts.append("<ul>" + "".join(f"<li><a href='{e(h)}'>{e(lbl)}</a></li>"
                                      for lbl, h in links) + "</ul>")
    head = ["Study", "Group", "Anatomy", "Status", "Report",
            *(c.replace(".", " ") for c in columns), "Reason / warnings"]
    parts.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head)
                 + "</tr></thead><tbody>")
    for s in studies:
        o = outcomes.get(s.id)
        status = o.status if o else "not run"
        report = (f"<a href='{e(o.report)}'>report</a>" if o and o.report else "")
        values = {m["key"]: m for m in (o.measurements if o else [])}
        cells = []
        for c in columns:
            m = values.get(c)
            cells.append("<td class='num'>" + (
                f"{m['value']:.4g} {e(m['unit'])}" if m and m["value"] is not None
                else "not measured" if m else "") + "</td>")
        why = (o.reason if o and o.status == "failed"
               else f"{len(o.warnings)} warning(s)" if o and o.warnings else "")
        parts.append(f"<tr><td>{e(s.id)}</td><td>{e(s.group)}</td><td>{e(s.anatomy)}</td>"
                     f"<td class='{e(status)}'>{e(status)}</td><td>{report}</td>"
                     + "".join(cells) + f"<td>{e(why)}</td></tr>")
    parts.append("</tbody></table></body></html>\n")
    atomic_write_text(path, "".join(parts))


# ============================================================================ the cohort
@dataclass(frozen=True)
class CohortResult:
    """What :func:`run_cohort` did.

    Attributes
    ----------
    out_dir : Path
    outcomes : dict of str to StudyOutcome
        Study id -> outcome, in manifest order.
    table_csv, table_parquet, failures_csv, index_html : Path
    seconds : float
        Wall time of the whole run (s), cluster start included.
    """

    out_dir: Path
    outcomes: dict[str, StudyOutcome]
    table_csv: Path
    table_parquet: Path
    failures_csv: Path
    index_html: Path
    seconds: float

    @property
    def failed(self) -> list[StudyOutcome]:
        """The failed studies."""
        return [o for o in self.outcomes.values() if o.status == "failed"]

    @property
    def exit_status(self) -> int:
        """0 when every study succeeded, :data:`EXIT_SOME_FAILED` otherwise."""
        return EXIT_SOME_FAILED if self.failed else 0


def _check_cohort_dir(out: Path) -> None:
    """``out`` must be new, empty, or an earlier cohort folder (which is resumed)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise CohortError(f"--out {out} exists and is not a folder; give a new folder")
    if not any(out.iterdir()):
        return
    try:
        doc = json.loads((out / COHORT_FILE).read_text(encoding="utf-8"))
        ours = isinstance(doc, dict) and doc.get("kind") == COHORT_KIND
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise CohortError(f"--out {out} exists and is not an earlier cohort folder (no "
                          f"{COHORT_FILE}); give a new folder (an earlier cohort folder is "
                          "resumed)")


def _client(scheduler: str | None, workers: int) -> tuple[Any, Any]:
    """A dask.distributed Client (and the LocalCluster it owns, or None)."""
    from mskmri._optional import optional_import

    distributed = optional_import("distributed")
    if scheduler:
        try:
            return distributed.Client(scheduler, timeout="20s"), None
        except (OSError, TimeoutError) as exc:
            raise CohortError(f"cannot reach the Dask scheduler at {scheduler} ({exc}); start "
                              "it (`dask scheduler`) or leave --scheduler out for a local "
                              "cluster") from exc
    if workers < 1:
        raise CohortError(f"--workers must be at least 1, not {workers}")
    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1,
                                       processes=True, dashboard_address=None,
                                       silence_logs=logging.WARNING)
    return distributed.Client(cluster), cluster


def run_cohort(
    manifest: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    anatomy: str | None = None,
    scheduler: str | None = None,
    workers: int = DEFAULT_WORKERS,
    overwrite: bool = False,
    meshes: bool = True,
    command: str | None = None,
    notes: Sequence[str] = (),
    on_outcome: Callable[[StudyOutcome], None] | None = None,
) -> CohortResult:
    """Analyse every study of a manifest on Dask and gather the results (module docstring).

    Parameters
    ----------
    manifest : path-like
        Cohort manifest CSV.
    out_dir : path-like
        Cohort folder: created, or an earlier cohort folder that is resumed.
    anatomy : {"knee", "spine"}, optional
        Anatomy of rows that name none.
    scheduler : str, optional
        Address of a running Dask scheduler; default: a local cluster.
    workers : int
        Worker processes of the local cluster (one thread each); ignored with ``scheduler``.
    overwrite : bool
        Analyse every study again, even those complete from an earlier run.
    meshes : bool
        Knee studies: write meshes and 3-D views (False is faster).
    command : str, optional
        The command line, recorded in ``cohort.json``.
    notes : sequence of str
        Paragraphs for the top of ``index.html`` (e.g. where segmentations came from).
    on_outcome : callable, optional
        Called in this process with each outcome as it arrives.

    Returns
    -------
    CohortResult
        ``exit_status`` is 0 when all studies succeeded, :data:`EXIT_SOME_FAILED` otherwise.

    Raises
    ------
    CohortError
        A bad manifest, an ``out_dir`` that is not a cohort folder, no scheduler.

    Notes
    -----
    The local cluster starts its workers by spawning new Python processes, which import the
    caller's main module again: a script that calls this function must do so under
    ``if __name__ == "__main__":``. Every input file is hashed once per run (in the
    workers) to decide what is complete.
    """
    from mskmri import __version__, _progress
    from mskmri._provenance import versions
    from mskmri.io import atomic_write_json

    t0 = time.perf_counter()
    studies = read_cohort_manifest(manifest, anatomy=anatomy)
    out = Path(out_dir).resolve()
    _check_cohort_dir(out)
    (out / STUDIES_DIR).mkdir(parents=True, exist_ok=True)
    (out / RECORDS_DIR).mkdir(exist_ok=True)
    options = {"meshes": bool(meshes)}
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    # mark the folder as ours before any study runs: an interrupted run can be resumed
    cohort_doc: dict[str, Any] = {
        "schema": COHORT_SCHEMA, "kind": COHORT_KIND, "command": command,
        "manifest": {"path": str(Path(manifest).resolve()),
                     "sha256": _sha256_file(Path(manifest))},
        "options": {**options, "anatomy": anatomy, "scheduler": scheduler,
                    "workers": None if scheduler else workers, "overwrite": overwrite},
        "started_utc": started, "versions": versions(), "platform": platform.platform(terse=True),
    }
    atomic_write_json(out / COHORT_FILE, {**cohort_doc, "finished_utc": None})
    log.info("cohort: %d studies from %s -> %s (%s)", len(studies), manifest, out,
             f"scheduler {scheduler}" if scheduler else f"{workers} local worker(s)")
    outcomes: dict[str, StudyOutcome] = {}
    client, cluster = _client(scheduler, workers)
    t_start = time.perf_counter() - t0
    try:
        from distributed import as_completed

        futures = client.map(run_study, studies, out_dir=str(out), overwrite=overwrite,
                             options=options, key=[f"mskmri-study-{s.id}" for s in studies],
                             pure=False)
        by_key = {f.key: s for f, s in zip(futures, studies, strict=True)}
        for fut in _progress.progress(as_completed(futures), desc="studies",
                                      total=len(futures)):
            study = by_key[fut.key]
            try:
                outcome = fut.result()
            except Exception as exc:  # noqa: BLE001 - a worker died (memory, segfault)
                outcome = StudyOutcome(id=study.id, status="failed", error=type(exc).__name__,
                                       reason=_one_line(exc))
            outcomes[study.id] = outcome
            if outcome.status == "failed":
                log.warning("study %s failed: %s", study.id, outcome.reason)
            else:
                log.debug("study %s: %s in %.1f s", study.id, outcome.status, outcome.seconds)
            if on_outcome is not None:
                on_outcome(outcome)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    ordered = {s.id: outcomes[s.id] for s in studies if s.id in outcomes}
    header, rows = measurement_table(studies, ordered)
    _write_csv(out / TABLE_CSV, header, rows)
    write_parquet(out / TABLE_PARQUET, header, rows)
    by_id = {s.id: s for s in studies}
    failures = [{"id": o.id, "path": str(by_id[o.id].path), "group": by_id[o.id].group,
                 "anatomy": by_id[o.id].anatomy, "error": o.error, "reason": o.reason}
                for o in ordered.values() if o.status == "failed"]
    _write_csv(out / FAILURES_CSV, FAILURE_COLUMNS, failures)
    shown = [k for k in ("volume.joint_effusion", "volume.muscle") if any(
        m["key"] == k for o in ordered.values() for m in o.measurements)]
    write_index(out / INDEX_HTML, title="mskmri cohort", studies=studies, outcomes=ordered,
                notes=notes, columns=shown,
                links=[("measurement table (CSV)", TABLE_CSV),
                       ("measurement table (Parquet)", TABLE_PARQUET),
                       (f"failures ({len(failures)})", FAILURES_CSV)])
    seconds = time.perf_counter() - t0
    counts = {st: sum(o.status == st for o in ordered.values())
              for st in ("ok", "skipped", "failed")}
    analysed = [o.seconds for o in ordered.values() if o.status == "ok"]
    cpu = [o.cpu_seconds for o in ordered.values() if o.status == "ok"]
    atomic_write_json(out / COHORT_FILE, {
        **cohort_doc, "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(
            timespec="seconds"),
        "counts": {**counts, "studies": len(studies)},
        "timings_s": {"total": round(seconds, 3), "cluster_start": round(t_start, 3),
                      "study_mean": round(sum(analysed) / len(analysed), 3) if analysed
                      else None,
                      "study_cpu_mean": round(sum(cpu) / len(cpu), 3) if cpu else None},
        "failures": failures, "tool_version": __version__,
    })
    log.info("cohort: %d analysed, %d skipped (complete earlier), %d failed in %.1f s; open %s",
             counts["ok"], counts["skipped"], counts["failed"], seconds, out / INDEX_HTML)
    for f in failures:
        log.warning("failed: %s (%s): %s", f["id"], f["path"], f["reason"])
    return CohortResult(out_dir=out, outcomes=ordered, table_csv=out / TABLE_CSV,
                        table_parquet=out / TABLE_PARQUET, failures_csv=out / FAILURES_CSV,
                        index_html=out / INDEX_HTML, seconds=seconds)


__all__ = [
    "COHORT_SCHEMA", "EXIT_SOME_FAILED", "CohortError", "CohortResult", "Study", "StudyOutcome",
    "measurement_table", "path_checksum", "read_cohort_manifest", "run_cohort", "run_study",
    "study_checksum", "write_index", "write_parquet",
]
