"""Spine measurements drawn on the mid-sagittal image: endplate lines, heights, Cobb angle.

The geometry comes from :func:`mskmri.measure.spine.analyse_spine` (world RAS+ mm) and is
projected onto the displayed sagittal slice (:func:`mskmri.report.figures.display_slices`,
anterior on the left, superior at the top). Points off the slice are drawn at their projection
(the lines of a body lie in its own mid-sagittal plane, which may be a few mm from the slice
shown); the caption says which slice is shown.
"""

from __future__ import annotations

import io
import logging

import numpy as np

from mskmri.measure.spine import SpineAnalysis
from mskmri.report.colours import colour_table
from mskmri.report.figures import (
    _PLANE_AXES,
    DPI,
    DisplaySlice,
    _draw_panel,
    _scale_bar_mm,
    display_slices,
    intensity_window,
)
from mskmri.volume import LabelVolume, Volume

log = logging.getLogger(__name__)

#: Colours of the drawn measurements.
ENDPLATE_COLOUR = "#ffd400"
HEIGHT_COLOUR = "#00e5ff"
COBB_COLOUR = "#ff4fd8"
#: Length (mm) of the Cobb lines drawn through the endplates.
COBB_LINE_MM = 90.0
#: Panel height (inches).
PANEL_HEIGHT_IN = 6.0
#: Opacity of the label fill and outline under the drawing.
FILL_ALPHA, CONTOUR_ALPHA = 0.15, 0.6


def _to_display(ras: Volume, points: np.ndarray) -> np.ndarray:
    """World points (N, 3) -> display (x, y) mm of the sagittal panel of :func:`display_slices`."""
    _, h_ax, v_ax = _PLANE_AXES["sagittal"]
    vox = ras.world_to_voxel(np.atleast_2d(points))
    sp = ras.spacing
    x = (ras.shape[h_ax] - 1 - vox[:, h_ax] + 0.5) * sp[h_ax]
    y = (ras.shape[v_ax] - 1 - vox[:, v_ax] + 0.5) * sp[v_ax]
    return np.stack([x, y], axis=1)


def _centre(analysis: SpineAnalysis) -> np.ndarray | None:
    cents = [g.frame.centre for g in analysis.vertebrae.values()]
    return np.mean(cents, axis=0) if cents else None


def spine_drawing(image: Volume, segmentation: LabelVolume | None,
                  analysis: SpineAnalysis, *, dpi: int = DPI) -> tuple[bytes, str]:
    """The measurements drawn on the sagittal slice through the measured bodies, as PNG.

    Parameters
    ----------
    image : Volume
        The image (any orientation).
    segmentation : LabelVolume, optional
        Label map on the image's grid (drawn faintly under the lines).
    analysis : SpineAnalysis
        From :func:`mskmri.measure.spine.analyse_spine` on ``segmentation``.
    dpi : int

    Returns
    -------
    png : bytes
    caption : str
        What is drawn and on which slice.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patheffects as pe
    import matplotlib.pyplot as plt

    centre = _centre(analysis)
    labels = [segmentation] if segmentation is not None else []
    sl: DisplaySlice = display_slices(image, labels, centre_mm=centre, planes=("sagittal",))[0]
    ras = image.reorient("RAS")
    left, right, bottom, top = sl.extent
    fig_w = PANEL_HEIGHT_IN * (right - left) / max(bottom - top, 1e-6)
    fig, ax = plt.subplots(figsize=(max(fig_w, 3.0), PANEL_HEIGHT_IN), dpi=dpi)
    fig.patch.set_facecolor("#101418")
    colours = [colour_table(segmentation.labels, segmentation.schema)] if segmentation else []
    _draw_panel(ax, sl, intensity_window(image), colours,
                scale_bar_mm=_scale_bar_mm(right - left), fill_alpha=FILL_ALPHA,
                contour_alpha=CONTOUR_ALPHA)
    outline = [pe.withStroke(linewidth=2.5, foreground="black")]
    n_lines = 0
    for name, geo in analysis.vertebrae.items():
        for ep in (geo.superior, geo.inferior):
            if ep is not None:
                xy = _to_display(ras, ep.ends)
                ax.plot(xy[:, 0], xy[:, 1], color=ENDPLATE_COLOUR, linewidth=1.6)
                n_lines += 1
        for seg in geo.segments.values():
            xy = _to_display(ras, np.asarray(seg))
            ax.plot(xy[:, 0], xy[:, 1], color=HEIGHT_COLOUR, linewidth=1.2)
        c = _to_display(ras, geo.frame.centre)[0]
        ax.text(c[0], c[1], name, color="white", fontsize=8, ha="center", va="center",
                path_effects=outline)
    cobb = _cobb_lines(analysis)
    for (p, d), _ in cobb:
        ends = np.stack([p - 0.5 * COBB_LINE_MM * d, p + 0.5 * COBB_LINE_MM * d])
        xy = _to_display(ras, ends)
        ax.plot(xy[:, 0], xy[:, 1], color=COBB_COLOUR, linewidth=1.2, linestyle="--")
    texts = list(dict.fromkeys(f"Cobb {label}: {value:.1f} deg" for _, (label, value) in cobb))
    if texts:
        # on a dark box, so the text stays legible where it crosses a level name or a line
        ax.text(left + 0.03 * (right - left), top + 0.10 * (bottom - top), "\n".join(texts),
                color=COBB_COLOUR, fontsize=9, ha="left", va="top", path_effects=outline,
                bbox={"facecolor": "black", "alpha": 0.65, "edgecolor": "none", "pad": 2.0})
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    fig.tight_layout(pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor=fig.get_facecolor())
    plt.close(fig)
    caption = (f"Sagittal slice {sl.index + 1}/{sl.count} (x = {sl.position_mm:.1f} mm) through "
               f"the mean centre of the {len(analysis.vertebrae)} measured bodies. Yellow: "
               "fitted endplate lines; cyan: anterior, middle and posterior heights; magenta "
               "dashed: the endplates of the Cobb angle(s), extended. Lines lie in each body's "
               "own mid-sagittal plane and are projected onto this slice.")
    log.debug("spine drawing: %d endplate lines, %d Cobb angles", n_lines, len(cobb))
    return buf.getvalue(), caption


def _cobb_lines(analysis: SpineAnalysis) -> list[tuple[tuple[np.ndarray, np.ndarray],
                                                       tuple[str, float]]]:
    """(point, direction) of both endplates of each reported Cobb angle, with its label."""
    out: list[tuple[tuple[np.ndarray, np.ndarray], tuple[str, float]]] = []
    for m in analysis.measurements:
        if m.name != "cobb_angle" or m.value is None or m.region:
            continue
        upper, _, lower = str(m.structure).partition("-")
        gu, gl = analysis.vertebrae.get(upper), analysis.vertebrae.get(lower)
        if gu is None or gl is None:
            continue
        cervical = str(m.structure) == "C2-C7"
        eu = gu.inferior if cervical else gu.superior
        el = gl.inferior
        for ep in (eu, el):
            if ep is not None:
                out.append(((np.asarray(ep.point), np.asarray(ep.direction)),
                            (str(m.structure), float(m.value))))
    return out


__all__ = ["spine_drawing"]
