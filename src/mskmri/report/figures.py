"""Slice overlays for reports: an image with its label map, in a radiological display.

Everything is drawn with matplotlib's object API on an Agg canvas (no pyplot, no screen, no
global backend switch), so it works on a headless server and in threads.

Display convention (stated once). The volume is reoriented to RAS+ through its affine
(:meth:`~mskmri.volume.Volume.reorient`, an axis permutation and flips, no interpolation), then
each plane is shown as radiologists read it:

==========  ==============  ===============  =================
plane       screen left     screen right     top / bottom
==========  ==============  ===============  =================
sagittal    anterior (A)    posterior (P)    superior / inferior
coronal     right (R)       left (L)         superior / inferior
axial       right (R)       left (L)         anterior / posterior
==========  ==============  ===============  =================

The edge letters are computed from the reoriented affine, not typed in, and every panel is
drawn in millimetres (``extent`` = voxel count x spacing), so the aspect ratio is the true one
for anisotropic voxels. For an oblique acquisition the panel is the voxel slice closest to
the named plane (the nearest axis of the affine) and the letters name that nearest axis.
"""

from __future__ import annotations

import base64
import io
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from mskmri.errors import GeometryError
from mskmri.report.colours import colour_table, display_name, hex_to_rgb
from mskmri.volume import LabelVolume, Volume

if TYPE_CHECKING:
    from matplotlib.axes import Axes

log = logging.getLogger(__name__)

#: The three display planes, in panel order.
PLANES: tuple[str, ...] = ("sagittal", "coronal", "axial")

#: Per plane in the RAS+ array: (normal axis, horizontal axis, vertical axis). The screen's
#: left edge and top edge are the HIGH-index ends of the horizontal and vertical axes
#: (anterior, right, superior), which gives the radiological display in the module docstring.
_PLANE_AXES: Mapping[str, tuple[int, int, int]] = {
    "sagittal": (0, 1, 2),
    "coronal": (1, 0, 2),
    "axial": (2, 0, 1),
}
_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}

#: Opacity of the label colour fill inside structures (0..1).
FILL_ALPHA = 0.25
#: Opacity of the one-pixel structure outlines (0..1).
CONTOUR_ALPHA = 0.95
#: Intensity window: percentiles of the image's non-zero voxels mapped to black and white.
WINDOW_PERCENTILES = (0.5, 99.5)
#: Height of one panel in inches; panel widths follow each plane's true aspect ratio.
PANEL_HEIGHT_IN = 3.4
#: Output resolution in dots per inch.
DPI = 120
#: Panels narrower than this (inches) get their title on three short lines.
WIDE_TITLE_MIN_IN = 2.8
#: Figure and panel background (dark, as a reading room viewer).
BACKGROUND = "#101418"
#: Scale-bar lengths tried, in mm; the longest that fits in a quarter of the panel is used.
SCALE_BAR_CHOICES_MM = (100.0, 50.0, 20.0, 10.0, 5.0, 2.0, 1.0)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- data types
@dataclass(frozen=True)
class ReportFigure:
    """A PNG figure ready to be embedded in a report.

    Attributes
    ----------
    title : str
        Heading shown above the figure.
    png : bytes
        The encoded PNG.
    caption : str
        One or two sentences under the figure (what is shown, where).
    alt : str
        Text alternative for screen readers; the title when empty.
    """

    title: str
    png: bytes
    caption: str = ""
    alt: str = ""

    def __post_init__(self) -> None:
        if not self.png.startswith(_PNG_SIGNATURE):
            raise ValueError(f"figure {self.title!r}: png must be PNG-encoded bytes")

    @property
    def data_uri(self) -> str:
        """``data:image/png;base64,...`` for an ``<img src>`` (the report stays one file)."""
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")

    @property
    def size_px(self) -> tuple[int, int]:
        """(width, height) in pixels, read from the PNG header."""
        return (int.from_bytes(self.png[16:20], "big"), int.from_bytes(self.png[20:24], "big"))


@dataclass(frozen=True)
class DisplaySlice:
    """One plane of a volume in screen order (row 0 at the top, column 0 at the left).

    Attributes
    ----------
    plane : str
        ``"sagittal"``, ``"coronal"`` or ``"axial"``.
    index : int
        Slice index along the plane's normal in the RAS+-reoriented array.
    count : int
        Number of slices along that normal.
    position_mm : float
        World coordinate (RAS+, mm) of the slice along the normal's axis (x, y or z).
    image : (rows, cols) ndarray
        Image values.
    labels : list of (rows, cols) int ndarray
        The label maps sliced the same way, in the order given.
    extent : tuple of 4 floats
        ``(left, right, bottom, top)`` in mm for ``imshow(origin="upper")``: the true size.
    edges : dict
        Orientation letter at each screen edge: keys ``left``, ``right``, ``top``, ``bottom``.
    """

    plane: str
    index: int
    count: int
    position_mm: float
    image: np.ndarray
    labels: list[np.ndarray]
    extent: tuple[float, float, float, float]
    edges: dict[str, str]


# --------------------------------------------------------------------------- geometry
def _check_same_grid(image: Volume, other: Volume, what: str) -> None:
    if not image.same_geometry(other):
        raise GeometryError(
            f"the {what} ({other.shape}, orientation {''.join(other.orientation)}) is not on "
            f"the image's grid ({image.shape}, {''.join(image.orientation)}); resample it onto "
            "the image first (Volume.resample_to)"
        )


def label_centroid_world(
    labels: LabelVolume, values: Sequence[int] | None = None
) -> np.ndarray | None:
    """World centroid (RAS+, mm) of the voxels holding ``values`` (any non-zero when None).

    Returns
    -------
    (3,) ndarray or None
        None when no voxel holds any of the values.
    """
    mask = labels.array != 0 if values is None else labels.mask(*values)
    idx = np.argwhere(mask)
    if idx.size == 0:
        return None
    return labels.voxel_to_world(idx.mean(axis=0, keepdims=True))[0]


def display_slices(
    image: Volume,
    labels: Sequence[LabelVolume] = (),
    *,
    centre_mm: npt.ArrayLike | None = None,
    planes: Sequence[str] = PLANES,
) -> list[DisplaySlice]:
    """Cut ``image`` (and label maps on its grid) along ``planes`` through ``centre_mm``.

    Parameters
    ----------
    image : Volume
        The image, any orientation.
    labels : sequence of LabelVolume
        Label maps on exactly the image's grid (same shape and affine).
    centre_mm : (3,) array_like, optional
        World point (RAS+, mm) the slices pass through; the image centre when None. Clipped
        to the field of view.
    planes : sequence of str
        Any of ``"sagittal"``, ``"coronal"``, ``"axial"``.

    Returns
    -------
    list of DisplaySlice
        One per plane, in the radiological display of the module docstring.
    """
    for lv in labels:
        _check_same_grid(image, lv, f"label map {lv.schema!r}")
    unknown = [p for p in planes if p not in _PLANE_AXES]
    if unknown:
        raise ValueError(f"unknown plane(s) {unknown}; choose from {list(_PLANE_AXES)}")
    ras = image.reorient("RAS")
    ras_labels = [lv.reorient("RAS") for lv in labels]
    codes = ras.orientation
    if centre_mm is None:
        centre_vox = (np.asarray(ras.shape) - 1) / 2.0
    else:
        centre_vox = ras.world_to_voxel(np.asarray(centre_mm, dtype=float)[None, :])[0]
    centre_vox = np.clip(np.round(centre_vox), 0, np.asarray(ras.shape) - 1).astype(int)
    spacing = ras.spacing
    out: list[DisplaySlice] = []
    for plane in planes:
        normal, h_ax, v_ax = _PLANE_AXES[plane]
        index = int(centre_vox[normal])

        def cut(arr: np.ndarray, normal: int = normal, index: int = index) -> np.ndarray:
            # remaining axes are (h, v) in every plane; high index goes left / top.
            return np.ascontiguousarray(np.take(arr, index, axis=normal)[::-1, ::-1].T)

        width = ras.shape[h_ax] * spacing[h_ax]
        height = ras.shape[v_ax] * spacing[v_ax]
        point = np.zeros(3)
        point[normal] = index
        position = float(ras.voxel_to_world(point[None, :])[0][normal])
        out.append(
            DisplaySlice(
                plane=plane,
                index=index,
                count=ras.shape[normal],
                position_mm=position,
                image=cut(ras.array),
                labels=[cut(lv.array) for lv in ras_labels],
                extent=(0.0, float(width), float(height), 0.0),
                edges={
                    "left": codes[h_ax],
                    "right": _OPPOSITE[codes[h_ax]],
                    "top": codes[v_ax],
                    "bottom": _OPPOSITE[codes[v_ax]],
                },
            )
        )
    return out


def intensity_window(image: Volume) -> tuple[float, float]:
    """Display window (low, high) from :data:`WINDOW_PERCENTILES` of the non-zero voxels."""
    arr = np.asarray(image.array)
    step = max(1, int(round((arr.size / 2_000_000) ** (1 / 3))))  # subsample big volumes
    sample = arr[::step, ::step, ::step].astype(np.float64).ravel()
    sample = sample[np.isfinite(sample) & (sample != 0)]
    if sample.size == 0:
        return (0.0, 1.0)
    lo, hi = np.percentile(sample, WINDOW_PERCENTILES)
    if hi <= lo:
        hi = lo + 1.0
    return (float(lo), float(hi))


# --------------------------------------------------------------------------- drawing
def _overlay_rgba(
    lab: np.ndarray, colours: Mapping[int, str], *, fill_alpha: float, contour_alpha: float
) -> np.ndarray:
    """(rows, cols, 4) float RGBA: filled labels plus one-pixel inner outlines."""
    from skimage.segmentation import find_boundaries

    rgba = np.zeros(lab.shape + (4,), dtype=np.float32)
    if not lab.any():
        return rgba
    edges = find_boundaries(lab, mode="inner")
    for value in np.unique(lab):
        if value == 0:
            continue
        r, g, b = hex_to_rgb(colours.get(int(value), "#ffffff"))
        m = lab == value
        rgba[m, :3] = (r, g, b)
        rgba[m, 3] = np.where(edges[m], contour_alpha, fill_alpha)
    return rgba


def _scale_bar_mm(width_mm: float) -> float:
    for length in SCALE_BAR_CHOICES_MM:
        if length <= width_mm / 4.0:
            return length
    return SCALE_BAR_CHOICES_MM[-1]


def _draw_panel(
    ax: Axes,
    sl: DisplaySlice,
    window: tuple[float, float],
    colours: Sequence[Mapping[int, str]],
    *,
    scale_bar_mm: float,
    fill_alpha: float,
    contour_alpha: float,
    show_labels: bool = True,
    show_title: bool = True,
    stacked_title: bool | None = None,
) -> None:
    import matplotlib.patheffects as pe

    ax.set_facecolor(BACKGROUND)
    ax.imshow(sl.image, cmap="gray", vmin=window[0], vmax=window[1], extent=sl.extent,
              origin="upper", interpolation="nearest", aspect="equal")
    for lab, table in zip(sl.labels if show_labels else [], colours, strict=False):
        ax.imshow(_overlay_rgba(lab, table, fill_alpha=fill_alpha, contour_alpha=contour_alpha),
                  extent=sl.extent, origin="upper", interpolation="nearest", aspect="equal")
    left, right, bottom, top = sl.extent
    outline = [pe.withStroke(linewidth=2.5, foreground="black")]
    style: dict[str, Any] = dict(color="white", fontsize=11, fontweight="bold",
                                 path_effects=outline)
    pad = 0.025 * (right - left)
    vpad = 0.025 * (bottom - top)
    ax.text(left + pad, (top + bottom) / 2, sl.edges["left"], ha="left", va="center", **style)
    ax.text(right - pad, (top + bottom) / 2, sl.edges["right"], ha="right", va="center", **style)
    ax.text((left + right) / 2, top + vpad, sl.edges["top"], ha="center", va="top", **style)
    ax.text((left + right) / 2, bottom - vpad, sl.edges["bottom"], ha="center", va="bottom",
            **style)
    bar = scale_bar_mm
    x1 = right - 2 * pad
    y = bottom - 2.2 * vpad
    ax.plot([x1 - bar, x1], [y, y], color="white", linewidth=2.5, solid_capstyle="butt",
            path_effects=[pe.withStroke(linewidth=4, foreground="black")])
    ax.text(x1 - bar / 2, y - 0.6 * vpad, f"{bar:g} mm", ha="center", va="bottom",
            color="white", fontsize=8, path_effects=outline)
    if show_title:
        axis_name = "xyz"[_PLANE_AXES[sl.plane][0]]
        parts = (sl.plane.capitalize(), f"{axis_name} = {sl.position_mm:.1f} mm",
                 f"(slice {sl.index + 1}/{sl.count})")
        width_in = PANEL_HEIGHT_IN * (right - left) / max(bottom - top, 1e-6)
        # a narrow panel (e.g. a sagittal spine) gets a stacked title so titles never overlap
        if stacked_title is None:
            stacked_title = width_in < WIDE_TITLE_MIN_IN
        title = "\n".join(parts) if stacked_title else "   ".join(parts)
        ax.set_title(title, color="#dde3ea", fontsize=10 if width_in >= 2.0 else 8, pad=5)
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("#3a4450")


def overlay_figure(
    image: Volume,
    segmentation: LabelVolume | None = None,
    *,
    lesions: LabelVolume | None = None,
    centre_mm: npt.ArrayLike | None = None,
    planes: Sequence[str] = PLANES,
    fill_alpha: float = FILL_ALPHA,
    contour_alpha: float = CONTOUR_ALPHA,
    plain_row: bool = False,
    dpi: int = DPI,
) -> bytes:
    """Slice overlay of an image and its label maps, one panel per plane, as PNG bytes.

    Parameters
    ----------
    image : Volume
        The image (any orientation; shown in the radiological display of the module doc).
    segmentation : LabelVolume, optional
        Tissue label map on the image's grid; colours from :mod:`mskmri.report.colours`.
    lesions : LabelVolume, optional
        Lesion mask on the image's grid, drawn over the segmentation.
    centre_mm : (3,) array_like, optional
        World point (RAS+, mm) all planes pass through. Default: the centroid of the
        lesions when given and non-empty, else of the segmented structures, else the image
        centre.
    planes : sequence of str
        Panels to draw, from :data:`PLANES`.
    fill_alpha, contour_alpha : float
        Opacity of label fills and outlines (0..1).
    plain_row : bool
        Add a first row with the image alone, so the overlay row can be compared with what
        is under it.
    dpi : int
        Resolution of the PNG.

    Returns
    -------
    bytes
        The PNG. The legend names every structure visible in at least one panel.

    Raises
    ------
    GeometryError
        When a label map is not on the image's grid.
    """
    from matplotlib.figure import Figure
    from matplotlib.layout_engine import ConstrainedLayoutEngine
    from matplotlib.patches import Patch

    maps: list[LabelVolume] = [m for m in (segmentation, lesions) if m is not None]
    if centre_mm is None:
        for m in (lesions, segmentation):
            if m is not None:
                centre = label_centroid_world(m)
                if centre is not None:
                    centre_mm = centre
                    break
    slices = display_slices(image, maps, centre_mm=centre_mm, planes=planes)
    tables = [colour_table(m.labels or {v: str(v) for v in m.present_values()}, m.schema)
              for m in maps]
    for m, table in zip(maps, tables, strict=True):
        for v in m.present_values():  # values the map's table does not name still get a colour
            table.setdefault(v, colour_table({v: str(v)}, m.schema)[v])
    window = intensity_window(image)

    ratios = [(s.extent[1] - s.extent[0]) / (s.extent[2] - s.extent[3]) for s in slices]
    rows = [False, True] if plain_row else [True]  # show_labels per row
    fig = Figure(figsize=(PANEL_HEIGHT_IN * sum(ratios) + 0.4,
                          PANEL_HEIGHT_IN * len(rows) + (1.4 if maps else 0.5)),
                 dpi=dpi, facecolor=BACKGROUND,
                 layout=ConstrainedLayoutEngine(h_pad=0.08, w_pad=0.06))
    axes = fig.subplots(len(rows), len(slices), width_ratios=ratios, squeeze=False)
    bar = _scale_bar_mm(min(s.extent[1] - s.extent[0] for s in slices))  # one length for all
    stacked = min(ratios) * PANEL_HEIGHT_IN < WIDE_TITLE_MIN_IN  # one title style for all
    for r, show_labels in enumerate(rows):
        for ax, sl in zip(axes[r], slices, strict=True):
            _draw_panel(ax, sl, window, tables, scale_bar_mm=bar, fill_alpha=fill_alpha,
                        contour_alpha=contour_alpha, show_labels=show_labels,
                        show_title=r == 0, stacked_title=stacked)

    handles = []
    for k, (m, table) in enumerate(zip(maps, tables, strict=True)):
        visible = sorted({int(v) for sl in slices for v in np.unique(sl.labels[k]) if v != 0})
        for v in visible:
            name = m.labels.get(v, f"label {v}")
            handles.append(Patch(facecolor=table[v], edgecolor=table[v], label=display_name(name)))
    if handles:
        ncol = max(1, min(len(handles), int(sum(ratios) * PANEL_HEIGHT_IN // 1.9)))
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False,
                   fontsize=9, labelcolor="#dde3ea", handlelength=1.2, columnspacing=1.4)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor=BACKGROUND)
    log.debug("overlay figure: %d planes, %d legend entries, %d bytes", len(slices),
              len(handles), buf.tell())
    return buf.getvalue()


def write_png(path: str | os.PathLike[str], png: bytes) -> Path:
    """Write PNG bytes to ``path`` atomically (temporary name, then rename)."""
    from mskmri.io import atomic_path

    if not png.startswith(_PNG_SIGNATURE):
        raise ValueError("write_png needs PNG-encoded bytes")
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
    return Path(path)
