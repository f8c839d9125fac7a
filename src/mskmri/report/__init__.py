"""Reports: slice-overlay figures, the self-contained HTML report, colour tables.

- :mod:`mskmri.report.figures`: :func:`overlay_figure` (PNG bytes), :class:`ReportFigure`.
- :mod:`mskmri.report.html`: :func:`render_report` / :func:`write_report`,
  :class:`ReportSection` and :class:`ReportTable` for further sections.
- :mod:`mskmri.report.colours`: one stable colour per label value and schema.
- :mod:`mskmri.report.study`: the study table (patient identifiers only when asked) and
  input checksums; :mod:`mskmri.report.qc`: the quality checks (orientation, anisotropy,
  contrast, segmenter confidence); :mod:`mskmri.report.pdf`: ``report.pdf`` by headless
  Chromium.

matplotlib and Jinja2 are imported only when a figure or a report is made.
"""

from __future__ import annotations

from mskmri.report.figures import ReportFigure, overlay_figure, write_png
from mskmri.report.html import ReportSection, ReportTable, render_report, write_report

__all__ = [
    "ReportFigure",
    "ReportSection",
    "ReportTable",
    "overlay_figure",
    "render_report",
    "write_png",
    "write_report",
]
