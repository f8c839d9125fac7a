"""Rendered PNG views of the 3-D reconstruction (anterior, lateral, medial), headless.

Drawn with matplotlib's object API on an Agg canvas (no screen, no OpenGL): each mesh
(:class:`~mskmri.report.mesh.StructureMesh`, world RAS+ mm) is projected orthographically
onto the view plane, faces turned away from the viewer are dropped (the meshes have outward
normals), the rest are sorted back to front (painter's algorithm) and filled with the
structure's colour (:mod:`mskmri.report.colours`) shaded by a Lambert term. Written by hand on
a 2-D ``PolyCollection`` rather than ``mplot3d`` because mplot3d sorts whole collections,
not faces across structures, and adds axes a report does not want; trimesh's own scene
renderer needs an OpenGL context, which a headless server does not have.

Views (camera looking along ``direction``, world RAS+; up is patient superior):

==========  ===========================================  ===========================
view        camera looks along                           screen right
==========  ===========================================  ===========================
anterior    -A (from in front of the knee)               patient's left
lateral     towards the midline from the lateral side    anterior (right knee)
medial      towards the lateral side from the midline    posterior (right knee)
==========  ===========================================  ===========================

Which side is lateral comes from the fibula (it lies lateral to the tibia), else from the
lateral and medial tibial cartilage or menisci (:func:`knee_side`). When none of them tells,
the two side views are called "from the right" and "from the left" instead.

For speed, meshes for display are built from the label map block-averaged to about
:data:`DISPLAY_VOXEL_MM` (see :func:`display_meshes`).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from mskmri.labels import KNEE_ID
from mskmri.report.colours import display_name, hex_to_rgb
from mskmri.report.mesh import StructureMesh, block_factors, structure_meshes
from mskmri.volume import LabelVolume

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from mskmri.report.html import ReportSection

log = logging.getLogger(__name__)

#: Structures left out of the views by default: they wrap the joint and hide it.
HIDDEN_STRUCTURES: tuple[str, ...] = ("muscle", "infrapatellar_fat_pad")

#: Opacity of translucent structures (others are opaque).
TRANSLUCENT: Mapping[str, float] = {"joint_effusion": 0.45}

#: Target voxel size (mm) of the block-averaged label map the display meshes are built from.
DISPLAY_VOXEL_MM: Final = 1.5

#: Iso-level of display meshes on the block-averaged mask: below 0.5 so that thin plates
#: (cartilage, ligaments) stay whole at display resolution; they look up to ~0.2 blocks
#: thicker, which the views accept (the mesh FILES use 0.5).
DISPLAY_ISO_LEVEL: Final = 0.3

#: Taubin iterations for display meshes (smoother look, volume kept).
DISPLAY_SMOOTHING_ITERATIONS: Final = 8

#: Shading: ambient fraction and the diffuse remainder (sum 1).
AMBIENT: Final = 0.35

#: Panel size in inches and output resolution (dots per inch).
PANEL_IN: Final = 3.6
DPI: Final = 110

#: Background of the views (dark, as the slice overlays).
BACKGROUND = "#101418"

_SUPERIOR = np.array([0.0, 0.0, 1.0])


@dataclass(frozen=True)
class View:
    """One camera: a name for people, the viewing direction (world RAS+) and a caption.

    Attributes
    ----------
    name : str
        File stem and title (``"anterior"``, ``"lateral"``, ``"medial"``, ``"right"``...).
    direction : (3,) ndarray
        Unit vector the camera looks along (RAS+).
    title : str
        Heading.
    """

    name: str
    direction: np.ndarray
    title: str


#: (lateral, medial) structure pairs whose centroids tell the knee's side, in order of trust.
SIDE_MARKERS: tuple[tuple[str, str], ...] = (
    ("fibula", "tibia"),  # the fibula lies lateral to the tibia
    ("lateral_tibial_cartilage", "medial_tibial_cartilage"),
    ("lateral_meniscus", "medial_meniscus"),
)

#: Smallest left-right offset (mm) between two markers for the side to count as known.
SIDE_MIN_OFFSET_MM: Final = 1.0


def knee_side(seg: LabelVolume) -> str | None:
    """``"right"`` or ``"left"`` knee; None when the label map cannot tell.

    The lateral structure of the first pair of :data:`SIDE_MARKERS` present (fibula vs tibia,
    else lateral vs medial tibial cartilage, else the menisci) lies on the patient's right
    (+x, RAS+) in a right knee.
    """
    present = set(seg.present_values())
    for lateral, medial in SIDE_MARKERS:
        a, b = KNEE_ID[lateral], KNEE_ID[medial]
        if a not in present or b not in present:
            continue
        ca = seg.voxel_to_world(np.argwhere(seg.array == a).mean(axis=0, keepdims=True))[0]
        cb = seg.voxel_to_world(np.argwhere(seg.array == b).mean(axis=0, keepdims=True))[0]
        dx = float(ca[0] - cb[0])
        if abs(dx) >= SIDE_MIN_OFFSET_MM:
            return "right" if dx > 0 else "left"
    return None


def knee_views(side: str | None) -> list[View]:
    """Anterior, lateral and medial cameras for a ``side`` knee (right/left views if None)."""
    views = [View("anterior", np.array([0.0, -1.0, 0.0]), "Anterior view")]
    from_right = np.array([-1.0, 0.0, 0.0])  # camera on the patient's right, looking left
    if side == "right":
        views += [View("lateral", from_right, "Lateral view"),
                  View("medial", -from_right, "Medial view")]
    elif side == "left":
        views += [View("lateral", -from_right, "Lateral view"),
                  View("medial", from_right, "Medial view")]
    else:
        views += [View("right", from_right, "View from the patient's right"),
                  View("left", -from_right, "View from the patient's left")]
    return views


def display_factors(
    seg: LabelVolume, voxel_mm: float = DISPLAY_VOXEL_MM
) -> tuple[int, int, int]:
    """Block-averaging factor per array axis that brings voxels to about ``voxel_mm``."""
    return block_factors(seg.spacing, voxel_mm)


def display_meshes(
    seg: LabelVolume,
    *,
    hidden: Sequence[str] = HIDDEN_STRUCTURES,
    voxel_mm: float = DISPLAY_VOXEL_MM,
) -> list[StructureMesh]:
    """Light meshes for the views: label map block-averaged to ~:data:`DISPLAY_VOXEL_MM`.

    Parameters
    ----------
    seg : LabelVolume
        (I, J, K) knee label map with known geometry.
    hidden : sequence of str
        Structures not meshed.
    voxel_mm : float
        Target voxel size (mm) of the block-averaged map (larger: fewer triangles, faster).
    """
    import importlib.util

    factors = display_factors(seg, voxel_mm)
    # smoothing needs trimesh (extra "mesh"); the views themselves do not, so without it
    # they are drawn from unsmoothed surfaces rather than not at all
    smoothing = DISPLAY_SMOOTHING_ITERATIONS if importlib.util.find_spec("trimesh") else 0
    names = [n for v, n in sorted(seg.labels.items()) if v != 0 and n not in set(hidden)]
    return structure_meshes(seg, structures=names, downsample=factors,
                            smoothing_iterations=smoothing,
                            iso_level=DISPLAY_ISO_LEVEL)


def _screen_axes(direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = direction / np.linalg.norm(direction)
    up = _SUPERIOR - (_SUPERIOR @ d) * d
    if np.linalg.norm(up) < 1e-6:  # looking along S/I: anterior is up
        up = np.array([0.0, 1.0, 0.0])
    up = up / np.linalg.norm(up)
    right = np.cross(d, up)
    return right, up


def _draw_view(ax: Axes, meshes: Sequence[StructureMesh], view: View,
               bounds: tuple[np.ndarray, np.ndarray]) -> None:
    from matplotlib.collections import PolyCollection

    d = view.direction / np.linalg.norm(view.direction)
    right, up = _screen_axes(d)
    light = -d + 0.45 * up - 0.25 * right  # from the viewer, a little above and left
    light /= np.linalg.norm(light)
    polys, colours, depths = [], [], []
    for m in meshes:
        tri = m.vertices[m.faces]  # (F, 3, 3)
        n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        norm = np.linalg.norm(n, axis=1)
        ok = norm > 0
        n = n[ok] / norm[ok, None]
        tri = tri[ok]
        alpha = TRANSLUCENT.get(m.name, 1.0)
        front = n @ d < 0  # outward normal facing the camera
        if alpha == 1.0:
            tri, n = tri[front], n[front]
        shade = AMBIENT + (1 - AMBIENT) * np.clip(np.abs(n @ light), 0, 1)
        rgb = np.asarray(hex_to_rgb(m.colour))
        rgba = np.empty((len(tri), 4))
        rgba[:, :3] = np.clip(shade[:, None] * rgb[None, :], 0, 1)
        rgba[:, 3] = alpha
        polys.append(np.stack([tri @ right, tri @ up], axis=-1))  # (F, 3, 2)
        colours.append(rgba)
        depths.append(tri.mean(axis=1) @ d)
    if polys:
        p = np.concatenate(polys)
        c = np.concatenate(colours)
        order = np.argsort(-np.concatenate(depths), kind="stable")  # far first
        ax.add_collection(PolyCollection(p[order], facecolors=c[order],  # type: ignore[arg-type]
                                         edgecolors="none", antialiased=False))
    lo, hi = bounds
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                        for z in (lo[2], hi[2])])
    sx, sy = corners @ right, corners @ up
    pad = 0.04 * max(np.ptp(sx), np.ptp(sy))
    ax.set_xlim(sx.min() - pad, sx.max() + pad)
    ax.set_ylim(sy.min() - pad, sy.max() + pad)
    ax.set_aspect("equal")
    ax.set_facecolor(BACKGROUND)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(view.title, color="#dde3ea", fontsize=10)


def _bounds(meshes: Sequence[StructureMesh]) -> tuple[np.ndarray, np.ndarray]:
    pts = np.concatenate([m.vertices for m in meshes])
    return pts.min(axis=0), pts.max(axis=0)


def _png(rgba: np.ndarray, dpi: int) -> bytes:
    from matplotlib.image import imsave

    buf = io.BytesIO()
    imsave(buf, rgba, format="png", dpi=dpi)
    return buf.getvalue()


def views_figure(
    meshes: Sequence[StructureMesh], views: Sequence[View], *, dpi: int = DPI
) -> tuple[bytes, dict[str, bytes]]:
    """All ``views`` side by side with a legend, drawn once.

    Returns
    -------
    combined : bytes
        PNG of every view with a legend of the structures shown.
    per_view : dict of str to bytes
        View name -> PNG of that panel alone (cut from the same drawing).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(PANEL_IN * len(views), PANEL_IN * 1.15 + 0.7), dpi=dpi,
                 facecolor=BACKGROUND, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(views), squeeze=False)[0]
    if meshes:
        bounds = _bounds(meshes)
        for ax, view in zip(axes, views, strict=True):
            _draw_view(ax, meshes, view, bounds)
        handles = [Patch(facecolor=m.colour, edgecolor=m.colour, label=display_name(m.name),
                         alpha=TRANSLUCENT.get(m.name, 1.0)) for m in meshes]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(6, len(handles)),
                   frameon=False, fontsize=8, labelcolor="#dde3ea", handlelength=1.2)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba()).copy()
    height = pixels.shape[0]
    per_view: dict[str, bytes] = {}
    for ax, view in zip(axes, views, strict=True):
        box = ax.get_tightbbox(canvas.get_renderer())  # panel with its title, pixels
        x0, x1 = int(max(box.x0, 0)), int(min(np.ceil(box.x1), pixels.shape[1]))
        y0 = int(max(height - np.ceil(box.y1), 0))
        y1 = int(min(height - box.y0, height))
        per_view[view.name] = _png(pixels[y0:y1, x0:x1], dpi)
    return _png(pixels, dpi), per_view


def render_knee_views(
    seg: LabelVolume, *, meshes: Sequence[StructureMesh] | None = None
) -> tuple[dict[str, bytes], bytes, list[View]]:
    """The knee's 3-D views: one PNG per view, a combined figure, and the cameras used.

    Parameters
    ----------
    seg : LabelVolume
        (I, J, K) knee label map with known geometry (gives the side and the meshes).
    meshes : sequence of StructureMesh, optional
        Display meshes (default: :func:`display_meshes` of ``seg``).

    Returns
    -------
    per_view : dict of str to bytes
        View name -> PNG.
    combined : bytes
        All views side by side with a legend (PNG).
    views : list of View
    """
    views = knee_views(knee_side(seg))
    shown = list(meshes) if meshes is not None else display_meshes(seg)
    combined, per_view = views_figure(shown, views)
    log.debug("rendered %d views of %d meshes", len(views), len(shown))
    return per_view, combined, views


def surfaces_section(
    combined: bytes,
    views: Sequence[View],
    meshes: Sequence[StructureMesh] = (),
    *,
    mesh_dir: str | None = None,
) -> ReportSection:
    """The report section of the 3-D reconstruction.

    Parameters
    ----------
    combined : bytes
        PNG from :func:`views_figure` / :func:`render_knee_views`.
    views : sequence of View
        The cameras drawn (for the caption).
    meshes : sequence of StructureMesh
        Full-resolution meshes for the table of mesh volumes and areas (none: no table).
    mesh_dir : str, optional
        Folder name the mesh files were written to (adds a paragraph on using them).
    """
    from mskmri.report.figures import ReportFigure
    from mskmri.report.html import ReportSection, ReportTable

    hidden = ", ".join(display_name(n) for n in HIDDEN_STRUCTURES)
    paragraphs = [
        "Surfaces of the segmented structures (marching cubes on each label, light Taubin "
        f"smoothing). Left out of the views so that the joint can be seen: {hidden}; "
        "joint effusion is drawn translucent.",
    ]
    if mesh_dir:
        paragraphs.append(
            f"The files in {mesh_dir}/ (STL and PLY, one per structure) hold LPS millimetres, "
            "the convention 3D Slicer assumes for mesh files (each file also says SPACE=LPS "
            "in its header): loaded together with the image, they overlay on it without a "
            "transform."
        )
    tables = []
    if meshes:
        tables.append(ReportTable(
            columns=["Structure", "Triangles", "Mesh volume (mL)", "Surface area (mm²)"],
            rows=[[display_name(m.name), f"{len(m.faces):,}", m.volume_ml, m.area_mm2]
                  for m in meshes],
            title="Meshes", numeric_columns=(1, 2, 3),
            caption="Mesh volumes agree with the voxel volumes of the measurement table to "
                    "within the voxel staircase and the smoothing (a few per cent; more for "
                    "thin structures).",
        ))
    return ReportSection(
        id="surfaces", title="3-D reconstruction", paragraphs=paragraphs,
        figures=[ReportFigure(
            title="3-D views", png=combined,
            caption=", ".join(v.title for v in views) + " of the reconstruction "
                    "(orthographic projection; patient superior is up).",
        )],
        tables=tables,
    )


def spine_views() -> list[View]:
    """Anterior and left-lateral cameras (the lateral one as a sagittal image is read)."""
    return [View("anterior", np.array([0.0, -1.0, 0.0]), "Anterior view"),
            View("left", np.array([1.0, 0.0, 0.0]), "View from the patient's left")]


def spine_surfaces_section(seg: LabelVolume) -> ReportSection | None:
    """The spine report's 3-D section: the labelled structures seen from the front and side.

    Parameters
    ----------
    seg : LabelVolume
        (I, J, K) spine label map with known geometry.

    Returns
    -------
    ReportSection or None
        None when no structure is large enough to mesh.
    """
    from mskmri.report.figures import ReportFigure
    from mskmri.report.html import ReportSection

    meshes = display_meshes(seg, hidden=())
    if not meshes:
        return None
    views = spine_views()
    combined, _ = views_figure(meshes, views)
    slice_mm = max(seg.spacing)
    return ReportSection(
        id="surfaces", title="3-D reconstruction",
        paragraphs=[f"Surfaces of the labelled structures (marching cubes on the label map "
                    f"block-averaged to about {DISPLAY_VOXEL_MM:g} mm, light smoothing). With "
                    f"sagittal slices {slice_mm:.3g} mm apart the surfaces are coarse from side "
                    "to side; they show the levels and their alignment, and are never "
                    "measured."],
        figures=[ReportFigure(
            title="3-D views", png=combined,
            caption=", ".join(v.title for v in views) + " of the reconstruction "
                    "(orthographic projection; patient superior is up).")],
    )


__all__ = [
    "HIDDEN_STRUCTURES",
    "View",
    "display_factors",
    "display_meshes",
    "knee_side",
    "knee_views",
    "render_knee_views",
    "spine_surfaces_section",
    "spine_views",
    "surfaces_section",
    "views_figure",
]
