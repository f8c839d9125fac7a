"""The HTML report: one self-contained ``report.html`` a person can open, print or mail.

``render_report`` fills the Jinja2 template ``templates/report.html`` (autoescaped: every name,
warning and provenance value from the data is escaped) with, in order:

- a notice when patient identifiers are shown (only with ``--include-phi``), then the
  warnings, first and prominently (QC findings included);
- summary cards, the study (:mod:`mskmri.report.study`: acquisition, no patient identifiers
  unless asked) and the quality checks (:mod:`mskmri.report.qc`);
- figures (:class:`~mskmri.report.figures.ReportFigure`), embedded as base64 PNG data URIs,
  so the file needs nothing beside it;
- the measurement table, grouped by measurement, a unit in every row (the dicts of a
  ``mskmri/measurements/1`` document); a value that was not measured reads "not measured"
  with its reason, never a number; a "Not measured" list of what the analysis could not do;
- further sections (:class:`ReportSection`: paragraphs, figures, tables) for what later
  steps add (3-D views, lesion tables, spine drawings);
- methods and models (versions and caveats), the input geometry, and the provenance
  (command, versions, input checksums).

The template has no script, loads nothing (its Content-Security-Policy forbids it), and has a
print style sheet (A4, rows and figures never split, table headers repeated), so the same
file prints to ``report.pdf`` (:mod:`mskmri.report.pdf`).
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mskmri.report.colours import colour_table, display_name
from mskmri.report.figures import ReportFigure
from mskmri.report.qc import QcCheck
from mskmri.report.study import StudySummary
from mskmri.volume import LabelVolume, Volume

log = logging.getLogger(__name__)

#: Template file inside ``mskmri/report/templates``.
TEMPLATE_NAME = "report.html"

#: How units are shown to people (the JSON keeps the project's unit strings).
UNIT_DISPLAY: Mapping[str, str] = {
    "1": "ratio",
    "mm^2": "mm²",
    "mm2": "mm²",
    "mm^3": "mm³",
    "mm3": "mm³",
    "deg": "°",
}

#: Shown in the structure column for whole-study values (no structure).
WHOLE_STUDY = "total"

#: A table group lists at most this many distinct methods in its heading.
MAX_METHODS_SHOWN = 2

#: Shown instead of a number for a measurement that could not be made (never 0 or blank).
NOT_MEASURED = "not measured"

#: Content-Security-Policy of the report: nothing may be fetched (images are data: URIs,
#: styles inline, no script), so a browser refuses, and logs, any outside resource.
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


# --------------------------------------------------------------------------- extension types
@dataclass(frozen=True)
class ReportTable:
    """A plain table for an extra report section.

    Attributes
    ----------
    columns : sequence of str
        Header cells.
    rows : sequence of sequence
        Cells; floats are formatted with :func:`format_value`, everything is escaped.
    title : str
        Optional heading above the table.
    caption : str
        Optional note under the table.
    numeric_columns : tuple of int
        Column indices to right-align.
    """

    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    title: str = ""
    caption: str = ""
    numeric_columns: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(
                    f"table {self.title!r}: row {i} has {len(row)} cells, expected "
                    f"{len(self.columns)} (one per column)"
                )


@dataclass(frozen=True)
class ReportSection:
    """A further report section (3-D views, lesion tables, spine drawings ...).

    Attributes
    ----------
    id : str
        HTML id (anchor), e.g. ``"lesions"``.
    title : str
        Section heading.
    paragraphs : sequence of str
        Plain-text paragraphs (escaped).
    figures : sequence of ReportFigure
    tables : sequence of ReportTable
    """

    id: str
    title: str
    paragraphs: Sequence[str] = ()
    figures: Sequence[ReportFigure] = ()
    tables: Sequence[ReportTable] = field(default_factory=tuple)


# --------------------------------------------------------------------------- formatting
def format_value(value: Any) -> str:
    """A number for people: 4-5 significant digits, thousands separated, ints as ints.

    >>> format_value(267.1449), format_value(3.14159), format_value(0.012345), format_value(12)
    ('267.1', '3.14', '0.0123', '12')
    """
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return "n/a"
        if v == 0:
            return "0"
        if float(v).is_integer() and abs(v) < 1e15:
            return f"{int(v):,}"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(value)


def display_unit(unit: str) -> str:
    """The unit as shown in the report (``"1"`` -> ``"ratio"``, ``"mm^3"`` -> ``"mm³"``)."""
    return UNIT_DISPLAY.get(unit, unit)


def _measurement_rows(
    measurements: Sequence[Mapping[str, Any]], segmentation: LabelVolume | None
) -> list[dict[str, Any]]:
    """Group measurement dicts by name (first-appearance order) into template rows."""
    colours: dict[str, str] = {}
    if segmentation is not None:
        table = colour_table(segmentation.labels, segmentation.schema)
        colours = {segmentation.labels[v]: c for v, c in table.items()}
    groups: dict[str, dict[str, Any]] = {}
    for i, m in enumerate(measurements):
        name = m.get("name")
        unit = m.get("unit")
        if not name or not isinstance(unit, str) or not unit:
            raise ValueError(
                f"measurement {i} ({name!r}) has no unit: every number in a report carries "
                "one ('mL', 'mm', '1' for ratios, 'count'); build it with mskmri.measure"
            )
        value = m.get("value")
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        structure = m.get("structure")
        region = m.get("region")
        label = display_name(str(structure)) if structure else WHOLE_STUDY
        if region:
            label = f"{label} ({display_name(str(region))})"
        key = ".".join(str(p) for p in (name, structure, region) if p)
        g = groups.setdefault(str(name), {"title": display_name(str(name)).capitalize(),
                                          "methods": [], "rows": []})
        method = str(m.get("method") or "")
        if method and method not in g["methods"]:
            g["methods"].append(method)
        g["rows"].append({
            "key": key,
            "structure": label,
            "colour": colours.get(str(structure)) if structure else None,
            "missing": missing,
            "reason": str(m.get("reason") or (m.get("extra") or {}).get("reason")
                          or "no reason recorded"),
            "raw": "" if value is None or missing else repr(float(value)),
            "text": NOT_MEASURED if missing else format_value(value),
            "unit": display_unit(unit),
        })
    return [{"title": g["title"], "method": _methods_text(g["methods"]), "rows": g["rows"]}
            for g in groups.values()]


def _methods_text(methods: Sequence[str]) -> str:
    """One line for a table group: all methods when few, else the first and a count."""
    if len(methods) <= MAX_METHODS_SHOWN:
        return "; ".join(methods)
    return f"{methods[0]}; and {len(methods) - 1} more of the same kind, one per structure"


def _fmt_triplet(values: Sequence[float], unit: str = "") -> str:
    """``(0.3646, 0.3646, 0.7)`` -> ``"0.3646 × 0.3646 × 0.7 mm"`` (4 significant digits)."""
    return " × ".join(f"{float(v):.4g}" for v in values) + (f" {unit}" if unit else "")


def geometry_rows(
    image: Volume | None, segmentation: LabelVolume | None = None
) -> list[tuple[str, str]]:
    """(label, text) rows describing the input geometry for the report."""
    rows: list[tuple[str, str]] = []
    if image is not None:
        fov = [n * s for n, s in zip(image.shape, image.spacing, strict=True)]
        rows += [
            ("Image source", str(image.meta.get("source", "(in memory)"))),
            ("Array shape (voxels)", " × ".join(str(n) for n in image.shape)),
            ("Voxel spacing", _fmt_triplet(image.spacing, "mm") if image.geometry_known
             else "unknown (no geometry in the file)"),
            ("Field of view", _fmt_triplet(fov, "mm")),
            ("Orientation (RAS+ axis codes)", "".join(image.orientation)),
            ("Voxel volume", f"{format_value(image.voxel_volume_mm3)} mm³"),
            ("Affine (voxel → RAS+ mm)",
             "; ".join("[" + ", ".join(f"{v:.4g}" for v in row) + "]"
                       for row in image.affine[:3].tolist())),
        ]
    if segmentation is not None:
        present = segmentation.present_values()
        rows += [
            ("Label map schema", segmentation.schema),
            ("Structures present", f"{len(present)} of {len(segmentation.labels)} named"),
        ]
        if image is not None:
            rows.append(("Label map on the image grid",
                         "yes" if image.same_geometry(segmentation) else "NO"))
    return rows


def _summary_cards(image: Volume | None, n_measured: int, n_missing: int,
                   n_warnings: int) -> list[dict[str, str]]:
    if image is None:
        return []
    cards = [
        {"key": "Image size", "value": " × ".join(str(n) for n in image.shape)},
        {"key": "Spacing (mm)", "value": _fmt_triplet(image.spacing) if image.geometry_known
         else "unknown"},
        {"key": "Orientation", "value": "".join(image.orientation)},
        {"key": "Measured", "value": str(n_measured)},
    ]
    if n_missing:
        cards.append({"key": "Not measured", "value": str(n_missing)})
    cards.append({"key": "Warnings", "value": str(n_warnings)})
    return cards


def default_provenance(command: str | None = None) -> dict[str, Any]:
    """mskmri version, creation time (UTC), Python and platform; ``command`` if given."""
    from mskmri import __version__

    out: dict[str, Any] = {"mskmri version": __version__}
    if command is not None:
        out["command"] = command
    out["created (UTC)"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    out["python"] = sys.version.split()[0]
    out["platform"] = platform.platform(terse=True)
    return out


def _provenance_rows(provenance: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    rows = []
    for k, v in provenance.items():
        if isinstance(v, (Mapping, list, tuple)):
            rows.append((str(k), json.dumps(v, sort_keys=False, default=str), True))
        elif str(k).lower() in ("command", "seed"):
            rows.append((str(k), str(v), True))
        else:
            rows.append((str(k), format_value(v) if isinstance(v, float) else str(v), False))
    return rows


def _input_rows(inputs: Mapping[str, Mapping[str, Any]]) -> list[dict[str, str]]:
    rows = []
    for role, rec in inputs.items():
        size = rec.get("bytes")
        n = rec.get("files")
        rows.append({
            "role": str(role),
            "path": str(rec.get("path", "")),
            "size": (f"{format_value(int(size))} bytes" if size is not None else "")
            + (f" in {n} files" if n else ""),
            "sha256": str(rec.get("sha256", "")),
        })
    return rows


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("mskmri.report", "templates"),
        autoescape=True,  # every value from the data is escaped
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


@dataclass(frozen=True)
class ModelInfo:
    """A model (or the source of a label map) named in the report's methods section.

    Attributes
    ----------
    role : str
        What it did ("knee segmentation", "vertebral bodies").
    name : str
        Model name (``mskmri.weights.MODELS`` key) or "given label map".
    version : str
        Weight file and the start of its SHA-256, or the label map's checksum.
    caveat : str
        What a user must know (:func:`mskmri.weights.model_caveat`); empty when none.
    """

    role: str
    name: str
    version: str = ""
    caveat: str = ""


def model_info(name: str, role: str) -> ModelInfo:
    """The :class:`ModelInfo` of shipped model ``name`` from its card (no torch needed).

    The version is the weight file, the card's creation date and the start of its SHA-256;
    the caveat is :func:`mskmri.weights.model_caveat`.
    """
    from mskmri.weights import MODELS, model_caveat

    entry = MODELS.get(name)
    if entry is None:
        return ModelInfo(role, name, "not a shipped model", "")
    version = entry.file
    try:
        card = json.loads(entry.path.with_suffix(".json").read_text(encoding="utf-8"))
        created = str(card.get("created", ""))[:10]
        sha = str(card.get("sha256", ""))[:16]
        version += (f", {created}" if created else "") + (f", sha256 {sha}…" if sha else "")
    except (OSError, ValueError):
        log.warning("no readable model card beside %s", entry.path)
    return ModelInfo(role, name, version, model_caveat(name) or "")


# --------------------------------------------------------------------------- public API
def render_report(
    *,
    title: str,
    image: Volume | None = None,
    segmentation: LabelVolume | None = None,
    measurements: Sequence[Mapping[str, Any]] = (),
    figures: Sequence[ReportFigure] = (),
    warnings: Sequence[str] = (),
    provenance: Mapping[str, Any] | None = None,
    sections: Sequence[ReportSection] = (),
    subtitle: str = "",
    study: StudySummary | None = None,
    qc: Sequence[QcCheck] = (),
    not_measured: Sequence[tuple[str, str]] = (),
    methods: Sequence[str] = (),
    models: Sequence[ModelInfo] = (),
    versions: Mapping[str, str] | None = None,
    inputs: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """Render the self-contained HTML report.

    Parameters
    ----------
    title : str
        Heading and ``<title>``.
    image : Volume, optional
        The input image: its geometry fills the summary cards and the geometry table.
    segmentation : LabelVolume, optional
        The label map; its colour table gives the swatches of the measurement table. A map
        not on the image's grid adds a warning.
    measurements : sequence of mapping
        Measurement dicts as in a ``mskmri/measurements/1`` document (``name``, ``value``,
        ``unit``, optional ``structure``, ``region``, ``method``, ``reason``). A ``None`` or
        NaN value is shown as "not measured" with its reason, never as a number.
    figures : sequence of ReportFigure
        Embedded as base64 PNG, in order.
    warnings : sequence of str
        Shown first, prominently (QC warnings are added from ``qc``).
    provenance : mapping, optional
        Extra provenance (``command``, options, seed, timings ...); merged over
        :func:`default_provenance`.
    sections : sequence of ReportSection
        Further sections, after the measurements.
    subtitle : str
        One line under the title (e.g. the study or the phantom).
    study : StudySummary, optional
        Study table (:func:`mskmri.report.study.study_summary`); patient identifiers only
        when it says they were asked for, and then a notice on top.
    qc : sequence of QcCheck
        Quality checks (:func:`mskmri.report.qc.run_checks`): a table; warnings go on top.
    not_measured : sequence of (str, str)
        Measurements the analysis would make but could not: (what, why). Listed under the
        measurement table.
    methods : sequence of str
        Paragraphs of the methods section (how each number was obtained).
    models : sequence of ModelInfo
        The models (or given label maps) used, with versions and caveats.
    versions : mapping, optional
        Package -> version (:func:`mskmri._provenance.versions`).
    inputs : mapping, optional
        Role -> ``{"path", "bytes", "sha256"[, "files"]}``
        (:func:`mskmri.report.study.input_checksums`).

    Returns
    -------
    str
        The HTML document.

    Raises
    ------
    ValueError
        When a measurement has no unit (a bug in the caller, not bad user input).
    """
    from mskmri import __version__
    from mskmri.report.qc import qc_warnings

    warns = [str(w) for w in warnings]
    warns += [w for w in qc_warnings(qc) if w not in warns]
    if image is not None and segmentation is not None and not image.same_geometry(segmentation):
        warns.append("the label map is not on the image's grid: overlays and measurements may "
                     "not correspond to the image")
    if image is not None and not image.geometry_known:
        warns.append("the image has no voxel spacing or orientation: no physical measurement "
                     "can be trusted")
    prov = {**default_provenance(), **dict(provenance or {})}
    created = prov.get("created (UTC)", "")
    groups = _measurement_rows(measurements, segmentation)
    n_missing = sum(r["missing"] for g in groups for r in g["rows"])
    n_measured = sum(len(g["rows"]) for g in groups) - n_missing
    html: str = _environment().get_template(TEMPLATE_NAME).render(
        title=title,
        subtitle=subtitle,
        created=f"{created} UTC" if created else "",
        provenance_version=__version__,
        csp=CONTENT_SECURITY_POLICY,
        warnings=warns,
        cards=_summary_cards(image, n_measured, n_missing + len(not_measured), len(warns)),
        study=study,
        qc=[{"name": c.name, "status": c.status, "detail": c.detail} for c in qc],
        figures=list(figures),
        groups=groups,
        not_measured=[(str(a), str(b)) for a, b in not_measured],
        sections=[_prepare_section(s) for s in sections],
        methods=[str(m) for m in methods],
        models=list(models),
        versions=list((versions or {}).items()),
        inputs=_input_rows(inputs or {}),
        geometry=geometry_rows(image, segmentation),
        provenance_rows=_provenance_rows(prov),
    )
    return html


def _prepare_section(sec: ReportSection) -> dict[str, Any]:
    tables = [
        {
            "title": t.title,
            "caption": t.caption,
            "columns": list(t.columns),
            "numeric_columns": set(t.numeric_columns),
            "rows": [[format_value(c) if isinstance(c, (float, np.floating)) else c for c in row]
                     for row in t.rows],
        }
        for t in sec.tables
    ]
    return {"id": sec.id, "title": sec.title, "paragraphs": list(sec.paragraphs),
            "figures": list(sec.figures), "tables": tables}


def write_report(path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Render (see :func:`render_report`, same keyword arguments) and write atomically.

    Returns
    -------
    Path
        ``path``.
    """
    from mskmri.io import atomic_write_text

    html = render_report(**kwargs)
    out = atomic_write_text(path, html)
    log.debug("wrote report %s (%.0f kB)", out, len(html.encode("utf-8")) / 1024)
    return out
