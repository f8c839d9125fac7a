"""Surface meshes of label-map structures, in world millimetres, for 3D Slicer and friends.

:func:`structure_meshes` runs marching cubes (``skimage.measure.marching_cubes``) on each
structure's binary mask at the 0.5 iso-level (maps finer than :data:`MESH_VOXEL_MM` may be
block-averaged to about that first, see ``downsample``), maps the vertices through the label map's
affine to world coordinates (RAS+, mm), orients every triangle so its normal points out of
the structure, and optionally applies light Taubin smoothing (``trimesh.smoothing
.filter_taubin``, which shrinks far less than plain Laplacian smoothing). :func:`write_meshes`
writes one STL and one PLY file per structure, named by structure (``femur.stl``,
``femur.ply``).

Coordinate convention of the FILES (stated once): **LPS** millimetres. Inside mskmri every
world coordinate is RAS+; the files hold ``(-x, -y, z)``, because 3D Slicer (since 4.11)
reads a mesh file as LPS unless its header says otherwise, and so do ITK-based tools. Each
file also says so in its header (STL: the 80-byte header starts ``SPACE=LPS``; PLY: a
``comment SPACE=LPS`` line), which Slicer reads, so a mesh dropped into Slicer next to the
image (NIfTI/DICOM) overlays on it without any transform.

Normals. Marching cubes on an index grid gives triangles in a fixed winding (normals into
the object, for skimage 0.2x); a voxel-to-world affine with a negative determinant (a
mirrored storage, e.g. LAS or an odd number of flips) reverses it, so the faces are reversed
exactly when ``det(A[:3, :3]) > 0``. The RAS ->
LPS change has determinant +1 and keeps the winding. Checked in the tests: every mesh is
watertight, winding-consistent and has a positive signed volume (outward normals).

trimesh is an optional dependency (extra ``mesh``), imported on use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from mskmri.errors import MskMriError
from mskmri.measure.base import ML_PER_MM3
from mskmri.report.colours import hex_to_rgb, label_colour
from mskmri.volume import LabelVolume

if TYPE_CHECKING:
    import trimesh

log = logging.getLogger(__name__)

#: RAS+ -> LPS: the coordinate system written into mesh files (see the module docstring).
RAS_TO_LPS: Final = np.diag([-1.0, -1.0, 1.0])

#: Name of the file coordinate system, written into every file header.
FILE_SPACE: Final = "LPS"

#: Iso-level of marching cubes on a 0/1 mask: the surface passes half-way between voxel
#: centres inside and outside, i.e. through the voxel faces of the mask.
ISO_LEVEL: Final = 0.5

#: Taubin smoothing: shrink factor lambda and inflate factor nu (nu > lambda keeps volume).
TAUBIN_LAMBDA: Final = 0.5
TAUBIN_NU: Final = 0.53

#: Default Taubin iterations (0 = no smoothing; 10 removes the voxel staircase lightly).
DEFAULT_SMOOTHING_ITERATIONS: Final = 10

#: File formats written by :func:`write_meshes`.
MESH_FORMATS: tuple[str, ...] = ("stl", "ply")

#: Down-sampled display meshes: a structure whose block-averaged mask keeps less than this
#: fraction of its volume (a thin plate breaking up) is meshed at full resolution instead.
MIN_DOWNSAMPLED_FRACTION: Final = 0.85

#: Target voxel size (mm) of mesh files: finer label maps are block-averaged to about this
#: (:func:`block_factors`) before marching cubes, which keeps files of 0.3 mm in-plane maps
#: to tens of MB instead of hundreds; thin structures keep their resolution (see above).
MESH_VOXEL_MM: Final = 0.6

#: Structures with fewer voxels than this get no mesh (too small to be a surface).
MIN_VOXELS: Final = 8


class MeshError(MskMriError):
    """A mesh could not be built or written (empty structure, unknown format)."""


@dataclass(frozen=True)
class StructureMesh:
    """The closed surface of one structure, in world RAS+ mm.

    Attributes
    ----------
    name : str
        Structure name (``"femur"``); also the file stem.
    label : int
        Label value of the structure in its map.
    vertices : (V, 3) float64 ndarray
        Vertex positions, RAS+ mm.
    faces : (F, 3) int64 ndarray
        Triangles as vertex indices, counter-clockwise seen from outside (outward normals).
    colour : str
        Display colour ``#rrggbb`` from :mod:`mskmri.report.colours`.
    """

    name: str
    label: int
    vertices: np.ndarray
    faces: np.ndarray
    colour: str

    @property
    def volume_ml(self) -> float:
        """Enclosed volume (mL) by the divergence theorem; positive for outward normals."""
        tri = self.vertices[self.faces]
        signed = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0
        return float(signed) * ML_PER_MM3

    @property
    def area_mm2(self) -> float:
        """Surface area in mm^2."""
        tri = self.vertices[self.faces]
        return float(0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0],
                                                   tri[:, 2] - tri[:, 0]), axis=1).sum())

    def to_trimesh(self, space: str = "RAS") -> trimesh.Trimesh:
        """A ``trimesh.Trimesh`` in ``space`` (``"RAS"`` as stored, or ``"LPS"`` for files)."""
        from mskmri._optional import optional_import

        tm = optional_import("trimesh")
        if space not in ("RAS", "LPS"):
            raise MeshError(f"mesh space must be 'RAS' or 'LPS', not {space!r}")
        verts = self.vertices @ RAS_TO_LPS.T if space == "LPS" else self.vertices
        mesh = tm.Trimesh(vertices=verts, faces=self.faces, process=False)
        rgba = np.array([*(int(round(255 * c)) for c in hex_to_rgb(self.colour)), 255], np.uint8)
        mesh.visual.face_colors = np.tile(rgba, (len(self.faces), 1))
        return mesh


def block_factors(spacing: Sequence[float], voxel_mm: float) -> tuple[int, int, int]:
    """Integer block-averaging factor per array axis bringing ``spacing`` (mm) to ~``voxel_mm``.

    >>> block_factors((0.3125, 0.3125, 0.7), 0.6)
    (2, 2, 1)
    """
    f = [max(1, int(round(voxel_mm / float(s)))) for s in spacing]
    return (f[0], f[1], f[2])


def _mask_surface(
    crop: np.ndarray, lo: np.ndarray, affine: np.ndarray, *,
    downsample: Sequence[int] = (1, 1, 1), iso_level: float = ISO_LEVEL,
) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes of a boolean mask -> (RAS+ vertices, outward faces).

    ``crop`` is the mask inside its bounding box, whose first voxel is ``lo`` (array index).
    With ``downsample`` > 1 the mask is first block-averaged (each output cell is the
    fraction of its ``f0 x f1 x f2`` voxels inside), and the 0.5 iso-surface of that fraction
    is taken: a coarser but still closed, consistently wound surface. Thin structures that
    would break up (:data:`MIN_DOWNSAMPLED_FRACTION`) get halved factors, down to full
    resolution. ``iso_level`` below 0.5 keeps thin structures whole on coarse blocks at the
    price of slightly fattening them (for display only).
    """
    from skimage.measure import block_reduce, marching_cubes

    f = np.asarray(downsample, dtype=int)
    lo = np.asarray(lo, dtype=int)
    field = crop.astype(np.float32)
    n_inside = max(int(crop.sum()), 1)
    while np.any(f > 1):
        reduced = block_reduce(field, block_size=tuple(int(v) for v in f), func=np.mean,
                               cval=0.0)
        kept = np.count_nonzero(reduced > iso_level) * int(np.prod(f)) / n_inside
        if kept >= MIN_DOWNSAMPLED_FRACTION:
            field = reduced
            break
        # thinner than a block in places, it would break up: try half the factor
        f = np.maximum(f // 2, 1)
    # one cell of background all round, so every surface is closed (also at the array edge)
    padded = np.pad(field, 1)
    level = iso_level if np.any(f > 1) else ISO_LEVEL  # full resolution: the voxel faces
    verts, faces, _, _ = marching_cubes(padded, level=level, allow_degenerate=False)
    # cell centre c of the reduced grid covers voxels c*f .. c*f + f - 1 of the crop
    # dropping degenerate triangles can leave vertices no face uses: remove them (they would
    # have no neighbours in the smoothing, and no place in the files)
    used, faces = np.unique(faces, return_inverse=True)
    verts = verts[used]
    faces = faces.reshape(-1, 3)
    ijk = (verts.astype(np.float64) - 1.0) * f + (f - 1) / 2.0 + lo
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    faces = faces.astype(np.int64)
    # In index space skimage's triangles wind so that their normals point INTO the object
    # (inside > level; checked in the tests by the signed volume). A mirroring affine
    # (det < 0) reverses the winding by itself; otherwise reverse it here, so the normals
    # point outward in world space either way.
    if np.linalg.det(affine[:3, :3]) > 0:
        faces = faces[:, ::-1]
    return world, np.ascontiguousarray(faces)


def label_mesh(
    seg: LabelVolume,
    values: Sequence[int],
    *,
    name: str,
    downsample: int | Sequence[int] = 1,
    smoothing_iterations: int = DEFAULT_SMOOTHING_ITERATIONS,
    bbox: tuple[slice, ...] | None = None,
    iso_level: float = ISO_LEVEL,
) -> StructureMesh:
    """The closed surface of the voxels holding ``values``, in world RAS+ mm.

    Parameters
    ----------
    seg : LabelVolume
        (I, J, K) label map with known geometry.
    values : sequence of int
        Label values making up the structure.
    name : str
        Structure name (file stem).
    downsample : int or 3 ints
        Block-average the mask by this factor per axis first (1 = full resolution; 2-4 for
        quick display meshes with far fewer triangles).
    smoothing_iterations : int
        Taubin smoothing iterations (0 = none).
    bbox : tuple of 3 slices, optional
        Array box holding every voxel of the structure (found when None).
    iso_level : float
        Iso-level on the block-averaged mask (default 0.5: volume-preserving; lower values
        keep thin structures whole on coarse display meshes).

    Returns
    -------
    StructureMesh

    Raises
    ------
    MeshError
        When no voxel holds ``values``.
    """
    seg.require_geometry("a mesh in world millimetres")
    factors = ((downsample,) * 3 if isinstance(downsample, (int, np.integer))
               else tuple(int(v) for v in downsample))
    if len(factors) != 3 or min(factors) < 1:
        raise MeshError(f"downsample must be a positive int or 3 of them, not {downsample!r}")
    if bbox is None:
        idx = np.argwhere(seg.mask(*values))
        if idx.size == 0:
            raise MeshError(f"no voxel of {name!r} (values {list(values)}) in the label map; "
                            "nothing to mesh")
        bbox = tuple(slice(int(a), int(b) + 1)
                     for a, b in zip(idx.min(axis=0), idx.max(axis=0), strict=True))
    sub = seg.array[bbox]
    crop = np.isin(sub, np.asarray(values, dtype=sub.dtype))
    if not crop.any():
        raise MeshError(f"no voxel of {name!r} (values {list(values)}) in the label map; "
                        "nothing to mesh")
    lo = np.array([sl.start or 0 for sl in bbox])
    verts, faces = _mask_surface(crop, lo, seg.affine, downsample=factors, iso_level=iso_level)
    if smoothing_iterations > 0:
        from mskmri._optional import optional_import

        tm = optional_import("trimesh")
        mesh = tm.Trimesh(vertices=verts, faces=faces, process=False)
        tm.smoothing.filter_taubin(mesh, lamb=TAUBIN_LAMBDA, nu=TAUBIN_NU,
                                   iterations=int(smoothing_iterations))
        verts = np.asarray(mesh.vertices, dtype=np.float64)
    first = int(values[0])
    return StructureMesh(name=name, label=first, vertices=verts, faces=faces,
                         colour=label_colour(first, seg.schema, name))


def structure_meshes(
    seg: LabelVolume,
    *,
    structures: Sequence[str] | None = None,
    downsample: int | Sequence[int] = 1,
    smoothing_iterations: int = DEFAULT_SMOOTHING_ITERATIONS,
    min_voxels: int = MIN_VOXELS,
    iso_level: float = ISO_LEVEL,
) -> list[StructureMesh]:
    """One mesh per named structure present in ``seg`` (schema order).

    Parameters
    ----------
    seg : LabelVolume
        (I, J, K) label map with known geometry; ``seg.labels`` names the values.
    structures : sequence of str, optional
        Names to mesh (default: every named structure present).
    downsample, smoothing_iterations, iso_level
        As for :func:`label_mesh`.
    min_voxels : int
        Structures with fewer voxels are skipped (logged).

    Returns
    -------
    list of StructureMesh
    """
    from scipy import ndimage

    seg.require_geometry("meshes in world millimetres")
    arr = seg.array
    counts = np.bincount(arr.ravel().astype(np.int64, copy=False))
    # one pass for every structure's bounding box (labels are small non-negative ints)
    boxes = ndimage.find_objects(arr.astype(np.int32, copy=False) if arr.dtype.kind == "i"
                                 else arr)
    wanted = set(structures) if structures is not None else None
    out: list[StructureMesh] = []
    for value, name in sorted(seg.labels.items()):
        if value == 0 or (wanted is not None and name not in wanted):
            continue
        n = int(counts[value]) if value < counts.size else 0
        if n == 0:
            continue
        if n < min_voxels:
            log.info("no mesh for %s: %d voxels (< %d)", name, n, min_voxels)
            continue
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        out.append(label_mesh(seg, [value], name=name, downsample=downsample,
                              smoothing_iterations=smoothing_iterations, bbox=box,
                              iso_level=iso_level))
    return out


def _ply_bytes(mesh: StructureMesh) -> bytes:
    from trimesh.exchange.ply import export_ply

    data = export_ply(mesh.to_trimesh("LPS"), encoding="binary")
    first, _, rest = data.partition(b"\n")  # "ply"
    second, _, rest = rest.partition(b"\n")  # "format ..."
    comment = f"comment SPACE={FILE_SPACE}\ncomment mskmri structure {mesh.name}\n".encode()
    return first + b"\n" + second + b"\n" + comment + rest


def _stl_bytes(mesh: StructureMesh) -> bytes:
    from trimesh.exchange.stl import export_stl

    data = export_stl(mesh.to_trimesh("LPS"))
    # binary STL: an 80-byte free header (must not start with "solid"), then the triangles
    header = f"SPACE={FILE_SPACE} mskmri {mesh.name}".encode("ascii", "replace")[:80]
    return header.ljust(80, b" ") + data[80:]


_WRITERS = {"stl": _stl_bytes, "ply": _ply_bytes}


def write_meshes(
    meshes: Sequence[StructureMesh],
    out_dir: str | os.PathLike[str],
    *,
    formats: Sequence[str] = MESH_FORMATS,
) -> list[Path]:
    """Write each mesh as ``<out_dir>/<name>.<format>`` (LPS mm), each file atomically.

    Parameters
    ----------
    meshes : sequence of StructureMesh
    out_dir : path-like
        Folder (created if needed).
    formats : sequence of str
        Any of :data:`MESH_FORMATS`.

    Returns
    -------
    list of Path
        The files written.
    """
    from mskmri._optional import optional_import
    from mskmri.io import atomic_path

    optional_import("trimesh")
    bad = [f for f in formats if f not in _WRITERS]
    if bad:
        raise MeshError(f"unknown mesh format(s) {bad}; choose from {list(_WRITERS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for mesh in meshes:
        for fmt in formats:
            path = out / f"{mesh.name}.{fmt}"
            with atomic_path(path) as tmp:
                tmp.write_bytes(_WRITERS[fmt](mesh))
            written.append(path)
    log.debug("wrote %d mesh files to %s", len(written), out)
    return written


def mesh_summary(meshes: Sequence[StructureMesh]) -> list[dict[str, Any]]:
    """JSON-ready rows: name, vertex and face counts, volume (mL), area (mm^2)."""
    return [
        {"structure": m.name, "vertices": int(len(m.vertices)), "faces": int(len(m.faces)),
         "volume_ml": float(m.volume_ml), "area_mm2": float(m.area_mm2)}
        for m in meshes
    ]


def colours_of(meshes: Sequence[StructureMesh]) -> Mapping[str, str]:
    """Structure name -> display colour."""
    return {m.name: m.colour for m in meshes}


__all__ = [
    "FILE_SPACE",
    "MESH_FORMATS",
    "MESH_VOXEL_MM",
    "RAS_TO_LPS",
    "MeshError",
    "StructureMesh",
    "block_factors",
    "colours_of",
    "label_mesh",
    "mesh_summary",
    "structure_meshes",
    "write_meshes",
]
