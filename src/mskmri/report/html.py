"""The HTML report: one self-contained ``report.html`` a person can open or mail.

``render_report`` fills the Jinja2 template ``templates/report.html`` (autoescaped: every name,
warning and provenance value from the data is escaped) with

- warnings, shown first and prominently;
- summary cards (image size, spacing, orientation);
- figures (:class:`~mskmri.report.figures.ReportFigure`), embedded as base64 PNG data URIs,
  so the file needs nothing beside it;
- the measurement table, grouped by measurement, a unit in every row (the dicts of a
  ``mskmri/measurements/1`` document);
- further sections (:class:`ReportSection`: paragraphs, figures, tables) for what later
  steps add (3-D views, lesion tables, spine drawings);
- the input geometry and the provenance (mskmri version, command, date, platform).

The template has no script and loads nothing from the network.
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
            "reason": str(m.get("reason") or "not measured"),
            "raw": "" if value is None or missing else repr(float(value)),
            "text": "n/a" if missing else format_value(value),
            "unit": display_unit(unit),
        })
    return [{"title": g["title"], "method": "; ".join(g["methods"]), "rows": g["rows"]}
            for g in groups.values()]


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


def _summary_cards(image: Volume | None, n_measurements: int) -> list[dict[str, str]]:
    if image is None:
        return []
    return [
        {"key": "Image size", "value": " × ".join(str(n) for n in image.shape)},
        {"key": "Spacing (mm)", "value": _fmt_triplet(image.spacing) if image.geometry_known
         else "unknown"},
        {"key": "Orientation", "value": "".join(image.orientation)},
        {"key": "Measurements", "value": str(n_measurements)},
    ]


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
        ``unit``, optional ``structure``, ``region``, ``method``, ``reason``). A ``None``
        value is shown as "n/a" with its reason.
    figures : sequence of ReportFigure
        Embedded as base64 PNG, in order.
    warnings : sequence of str
        Shown first, prominently.
    provenance : mapping, optional
        Extra provenance (``command``, options, seed, timings ...); merged over
        :func:`default_provenance`.
    sections : sequence of ReportSection
        Further sections, after the measurements.
    subtitle : str
        One line under the title (e.g. the study or the phantom).

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

    warns = [str(w) for w in warnings]
    if image is not None and segmentation is not None and not image.same_geometry(segmentation):
        warns.append("the label map is not on the image's grid: overlays and measurements may "
                     "not correspond to the image")
    if image is not None and not image.geometry_known:
        warns.append("the image has no voxel spacing or orientation: no physical measurement "
                     "can be trusted")
    prov = {**default_provenance(), **dict(provenance or {})}
    created = prov.get("created (UTC)", "")
    html: str = _environment().get_template(TEMPLATE_NAME).render(
        title=title,
        subtitle=subtitle,
        created=f"{created} UTC" if created else "",
        provenance_version=__version__,
        warnings=warns,
        cards=_summary_cards(image, len(measurements)),
        figures=list(figures),
        groups=_measurement_rows(measurements, segmentation),
        sections=[_prepare_section(s) for s in sections],
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
