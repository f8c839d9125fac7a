"""Knee measurements from a label map in the project's knee schema.

What is measured now:

- ``volume`` (mL) of every knee structure present (bones, cartilage plates, menisci, joint
  effusion, muscle, ligaments, fat pad): voxel count x voxel volume, the voxel volume being
  ``|det|`` of the affine's 3x3 part, so the number does not depend on the storage orientation.
  The joint effusion volume is ``volume.joint_effusion``, the muscle volume ``volume.muscle``,
  the meniscal volumes ``volume.medial_meniscus`` and ``volume.lateral_meniscus``; a
  structure absent from the map has no entry (it is not reported as 0 mL, since a map from a
  source that does not label it would otherwise read as "none").
- ``thickness_mean`` and ``thickness_max`` (mm) of each cartilage plate (femoral, medial
  tibial, lateral tibial, patellar) over its bone-cartilage interface
  (:func:`cartilage_thickness`, method in its docstring); the number of interface voxels is
  in ``extra["interface_voxels"]``.
- with a lesion mask (1 = bone marrow lesion): ``lesion_volume`` (mL) and ``lesion_count`` per
  bone, each lesion (26-connected component) assigned to the bone it overlaps most, and the
  total ``lesion_volume``.

How it is organised: :func:`measure_knee` calls one function per group of measurements
(:data:`_STEPS`); each step takes ``(seg, *, image, lesions)`` and returns
``(measurements, warnings)``. Image-based measurements are added the same way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import numpy as np

from mskmri.errors import GeometryError, LabelError
from mskmri.labels import KNEE, KNEE_BONES, KNEE_ID, LESION
from mskmri.measure.base import (
    COUNT,
    ML_PER_MM3,
    VOXEL_COUNT_METHOD,
    Measurement,
    check_label_values,
    describe_input,
    label_volumes,
    measurements_document,
)
from mskmri.volume import LabelVolume, Volume

log = logging.getLogger(__name__)

#: Structures whose absence makes a knee label map suspect (a warning, not an error).
CORE_STRUCTURES = ("femur", "tibia")

#: Bones that lesions are assigned to, in the knee schema.
LESION_BONES: tuple[str, ...] = KNEE_BONES

#: Connectivity of lesion components (26 = faces, edges and corners touch).
LESION_CONNECTIVITY: Final = 26

#: Method strings recorded with each measurement.
LESION_VOLUME_METHOD = (
    "lesion voxel count x voxel volume; each 26-connected lesion assigned to the bone it "
    "overlaps most"
)
LESION_COUNT_METHOD = "26-connected components of the lesion mask, assigned to the bone they overlap most"

#: Cartilage plate -> the bone it covers (the bone-cartilage interface is measured from).
CARTILAGE_PLATES: Mapping[str, str] = MappingProxyType(
    {
        "femoral_cartilage": "femur",
        "medial_tibial_cartilage": "tibia",
        "lateral_tibial_cartilage": "tibia",
        "patellar_cartilage": "patella",
    }
)

#: Search margin (mm) around a plate for its articular surface: the distance map is computed
#: in the plate's bounding box grown by this much, so thicknesses above it are not measured
#: (human cartilage is at most ~7 mm thick); values at this cap are flagged in a warning.
THICKNESS_SEARCH_MM: Final = 10.0

#: Largest |cosine| between two affine columns for the grid to count as orthogonal: the
#: distance transform works along the array axes, so a sheared grid (e.g. DICOM gantry tilt)
#: would give wrong millimetres; such a map gets no thickness (NaN with a reason).
ORTHOGONAL_COSINE_TOL: Final = 1e-3

#: Fewest interface voxels for a plate's thickness to be reported (fewer: NaN with a reason).
MIN_THICKNESS_POINTS: Final = 10

THICKNESS_METHOD = (
    "Euclidean distance (world mm) from each cartilage voxel on the bone-cartilage interface "
    "to the nearest voxel outside cartilage and bone (the articular side); "
    "scipy.ndimage.distance_transform_edt with sampling = voxel spacing"
)

#: A measurement step: ``step(seg, *, image, lesions) -> (measurements, warnings)``.
Step = Callable[..., tuple[list[Measurement], list[str]]]


def check_knee_labels(seg: LabelVolume) -> None:
    """Raise :class:`LabelError` if ``seg`` holds values outside the knee schema (1-17)."""
    check_label_values(seg, KNEE, schema_name="knee")


def knee_volumes(seg: LabelVolume) -> list[Measurement]:
    """Volume in mL of every knee structure present in ``seg``.

    Parameters
    ----------
    seg : LabelVolume
        (I, J, K) label map in the project's knee schema, with known geometry.

    Returns
    -------
    list of Measurement
        One ``volume`` per structure present, in schema order, ``unit="mL"``, method
        ``"voxel count x voxel volume"``; ``extra`` holds the voxel count and label value.

    Raises
    ------
    GeometryError
        When the label map has no spacing (``geometry_known`` False).
    LabelError
        When it holds values the knee schema does not define.
    """
    seg.require_geometry("a knee volume in mL")
    check_knee_labels(seg)
    return label_volumes(seg, KNEE, method=VOXEL_COUNT_METHOD)


def _volume_step(
    seg: LabelVolume, *, image: Volume | None, lesions: LabelVolume | None
) -> tuple[list[Measurement], list[str]]:
    del image, lesions  # volumes need only the label map
    ms = knee_volumes(seg)
    present = {m.structure for m in ms}
    warnings = [
        f"no {name} in the label map: is this a knee segmentation in the project's knee schema?"
        for name in CORE_STRUCTURES
        if name not in present
    ]
    return ms, warnings


def lesion_volumes_by_bone(
    seg: LabelVolume, lesions: LabelVolume
) -> tuple[list[Measurement], list[str]]:
    """Lesion volume (mL) and count per bone from a lesion mask in the same geometry.

    Parameters
    ----------
    seg : LabelVolume
        (I, J, K) knee label map.
    lesions : LabelVolume
        (I, J, K) lesion mask in the same geometry, values 0 and 1 (bone marrow lesion).

    Returns
    -------
    measurements : list of Measurement
        ``lesion_volume`` (mL) and ``lesion_count`` (count) for each bone present in ``seg``
        (zero when it has none), then the total ``lesion_volume`` over all lesions.
    warnings : list of str
        Lesions that overlap no bone (counted in the total only).

    Notes
    -----
    Rule: each 26-connected lesion component goes wholly to the bone holding most of its
    voxels (ties: schema order). Lesions in the project's masks are inside the bone, so a
    lesion touching no bone is unusual and reported.
    """
    import cc3d

    lesions.require_geometry("a lesion volume in mL")
    if not seg.same_geometry(lesions):
        raise GeometryError(
            f"the lesion mask {lesions.shape} {''.join(lesions.orientation)} is not in the "
            f"geometry of the segmentation {seg.shape} {''.join(seg.orientation)}; give a "
            "lesion mask on the same grid (as `mskmri detect bml` writes it)"
        )
    check_label_values(lesions, LESION, schema_name="lesion")
    vox_ml = seg.voxel_volume_mm3 * ML_PER_MM3
    comps = cc3d.connected_components(
        (lesions.array > 0).astype(np.uint8), connectivity=LESION_CONNECTIVITY
    )
    n_comp = int(comps.max())
    bone_ids = {name: KNEE_ID[name] for name in LESION_BONES}
    present_bones = [b for b in LESION_BONES if np.any(seg.array == bone_ids[b])]
    volume_voxels = dict.fromkeys(LESION_BONES, 0)
    count = dict.fromkeys(LESION_BONES, 0)
    unassigned = 0
    if n_comp:
        sizes = np.bincount(comps.ravel(), minlength=n_comp + 1)
        # overlap[c, b] = voxels of component c inside bone b
        overlap = np.zeros((n_comp + 1, len(LESION_BONES)), dtype=np.int64)
        for j, bone in enumerate(LESION_BONES):
            inside = comps[seg.array == bone_ids[bone]]
            overlap[:, j] = np.bincount(inside, minlength=n_comp + 1)
        for c in range(1, n_comp + 1):
            if overlap[c].max() == 0:
                unassigned += 1
                continue
            bone = LESION_BONES[int(np.argmax(overlap[c]))]
            volume_voxels[bone] += int(sizes[c])
            count[bone] += 1
        total_voxels = int(sizes[1:].sum())
    else:
        total_voxels = 0
    out: list[Measurement] = []
    for bone in LESION_BONES:
        if bone not in present_bones and count[bone] == 0:
            continue
        out.append(Measurement(
            name="lesion_volume", value=volume_voxels[bone] * vox_ml, unit="mL", structure=bone,
            method=LESION_VOLUME_METHOD, extra={"voxels": volume_voxels[bone]},
        ))
        out.append(Measurement(
            name="lesion_count", value=count[bone], unit=COUNT, structure=bone,
            method=LESION_COUNT_METHOD,
        ))
    out.append(Measurement(
        name="lesion_volume", value=total_voxels * vox_ml, unit="mL", method=LESION_VOLUME_METHOD,
        extra={"voxels": total_voxels, "lesions": n_comp},
    ))
    warnings = []
    if unassigned:
        warnings.append(
            f"{unassigned} of {n_comp} lesions overlap no bone of the segmentation; they count "
            "in the total lesion volume only"
        )
    return out, warnings


def _lesion_step(
    seg: LabelVolume, *, image: Volume | None, lesions: LabelVolume | None
) -> tuple[list[Measurement], list[str]]:
    del image
    if lesions is None:
        return [], []
    return lesion_volumes_by_bone(seg, lesions)


@dataclass(frozen=True)
class PlateThickness:
    """Thickness samples of one cartilage plate.

    Attributes
    ----------
    plate, bone : str
        Knee-schema names of the cartilage plate and of the bone under it.
    values_mm : (N,) ndarray
        Thickness (mm) at each of the N cartilage voxels on the bone-cartilage interface.
    points_mm : (N, 3) ndarray
        World position (RAS+, mm) of those voxels' centres.
    capped : int
        Interface voxels whose articular surface lies beyond :data:`THICKNESS_SEARCH_MM`
        (excluded from ``values_mm``).
    """

    plate: str
    bone: str
    values_mm: np.ndarray
    points_mm: np.ndarray
    capped: int = 0


def _grid_is_orthogonal(affine: np.ndarray) -> bool:
    cols = np.asarray(affine, dtype=np.float64)[:3, :3]
    unit_cols = cols / np.linalg.norm(cols, axis=0, keepdims=True)
    gram = unit_cols.T @ unit_cols
    return bool(np.max(np.abs(gram - np.eye(3))) <= ORTHOGONAL_COSINE_TOL)


def cartilage_thickness(
    seg: LabelVolume,
    plate: str,
    *,
    search_mm: float = THICKNESS_SEARCH_MM,
    bbox: tuple[slice, ...] | None = None,
) -> PlateThickness | None:
    """Local thickness (mm) of one cartilage plate at each voxel of its bone interface.

    Method. Let C be the plate's voxels and B the voxels of the bone it covers
    (:data:`CARTILAGE_PLATES`). The *interface* is the set of voxels of C that share a face
    with B. For each interface voxel the thickness is the Euclidean distance, in world mm,
    from its centre to the nearest voxel centre outside C and B, i.e. to the first voxel on
    the articular side (joint space, fluid, the opposing plate, meniscus, ...). It is read
    from ``scipy.ndimage.distance_transform_edt(C | B, sampling=spacing)``, so it does not
    depend on the storage orientation or on anisotropic voxels, only on their size.

    For a flat plate of ``n`` voxels along its normal, of size ``h`` along that normal, the
    value is exactly ``n * h``: the answer is exact to the voxelisation of the plate, i.e.
    within half a voxel (``h / 2``) of the continuous thickness; on curved surfaces the
    nearest-voxel choice also varies by about that much (see the tests for the tolerances).
    At a plate's rim the nearest outside voxel may lie sideways, so rim values are low.

    Parameters
    ----------
    seg : LabelVolume
        (I, J, K) knee-schema label map with known, orthogonal geometry.
    plate : str
        One of :data:`CARTILAGE_PLATES`.
    search_mm : float
        Distances are searched up to this far (mm) from the plate; interface voxels farther
        from any articular-side voxel are counted in ``capped`` and left out.
    bbox : tuple of 3 slices, optional
        Array box holding every voxel of the plate (found when None).

    Returns
    -------
    PlateThickness or None
        None when the plate or its bone is absent, or the plate touches its bone nowhere.

    Raises
    ------
    GeometryError
        When the map has no geometry or a sheared (non-orthogonal) grid.
    """
    from scipy import ndimage

    if plate not in CARTILAGE_PLATES:
        raise LabelError(f"{plate!r} is not a cartilage plate; choose from {list(CARTILAGE_PLATES)}")
    seg.require_geometry("a cartilage thickness in mm")
    if not _grid_is_orthogonal(seg.affine):
        raise GeometryError(
            "the label map's voxel axes are not orthogonal (sheared grid, e.g. gantry tilt), "
            "so distances along the array are not world mm; resample it onto an orthogonal "
            "grid first (Volume.resample_to_grid)"
        )
    bone = CARTILAGE_PLATES[plate]
    arr = seg.array
    if bbox is None:
        idx = np.argwhere(arr == KNEE_ID[plate])
        if idx.size == 0:
            return None
        first, last = idx.min(axis=0), idx.max(axis=0)
    else:
        first = np.array([sl.start for sl in bbox])
        last = np.array([sl.stop - 1 for sl in bbox])
    spacing = np.asarray(seg.spacing)
    margin = np.ceil(search_mm / spacing).astype(int) + 1
    lo = np.maximum(first - margin, 0)
    hi = np.minimum(last + margin + 1, np.asarray(arr.shape))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    sub = arr[box]
    c = sub == KNEE_ID[plate]
    if not c.any():
        return None
    b = sub == KNEE_ID[bone]
    if not b.any():
        return None
    face = ndimage.generate_binary_structure(3, 1)
    interface = c & ndimage.binary_dilation(b, structure=face)
    if not interface.any():
        return None
    solid = c | b
    if solid.all():
        return PlateThickness(plate, bone, np.zeros(0), np.zeros((0, 3)),
                              capped=int(interface.sum()))
    dist = ndimage.distance_transform_edt(solid, sampling=spacing)
    values = dist[interface]
    where = np.argwhere(interface) + lo
    ok = values <= search_mm
    return PlateThickness(
        plate=plate, bone=bone, values_mm=values[ok].astype(np.float64),
        points_mm=seg.voxel_to_world(where[ok]), capped=int((~ok).sum()),
    )


def cartilage_thickness_measurements(seg: LabelVolume) -> tuple[list[Measurement], list[str]]:
    """Mean and maximum thickness (mm) of every cartilage plate present in ``seg``.

    Parameters
    ----------
    seg : LabelVolume
        (I, J, K) knee-schema label map with known geometry.

    Returns
    -------
    measurements : list of Measurement
        ``thickness_mean`` and ``thickness_max`` (mm) per plate present, in
        :data:`CARTILAGE_PLATES` order; NaN with a ``reason`` when a plate is present but
        cannot be measured (its bone absent, no interface, a sheared grid).
    warnings : list of str
        One per plate that could not be measured or had capped values.
    """
    from scipy import ndimage

    seg.require_geometry("a cartilage thickness in mm")
    out: list[Measurement] = []
    warnings: list[str] = []
    arr = seg.array
    # one pass for every structure's bounding box (knee labels are small non-negative ints)
    boxes = ndimage.find_objects(arr if arr.dtype.kind == "u" else arr.astype(np.int32))
    present = {v + 1 for v, box in enumerate(boxes) if box is not None}
    for plate, bone in CARTILAGE_PLATES.items():
        if KNEE_ID[plate] not in present:
            continue
        reason = None
        res: PlateThickness | None = None
        try:
            res = cartilage_thickness(seg, plate, bbox=boxes[KNEE_ID[plate] - 1])
        except GeometryError as exc:
            reason = str(exc)
        if reason is None and res is None:
            reason = (f"no {bone} in the label map" if KNEE_ID[bone] not in present
                      else f"the {plate.replace('_', ' ')} touches the {bone} nowhere")
        if reason is None and res is not None and res.values_mm.size < MIN_THICKNESS_POINTS:
            reason = (f"only {res.values_mm.size} interface voxels (fewer than "
                      f"{MIN_THICKNESS_POINTS})")
        if reason is not None or res is None:
            why = reason or "not measured"
            warnings.append(f"{plate.replace('_', ' ')} thickness not measured: {why}")
            for name in ("thickness_mean", "thickness_max"):
                out.append(Measurement(name=name, value=float("nan"), unit="mm", structure=plate,
                                       method=THICKNESS_METHOD, extra={"reason": why}))
            continue
        extra = {"interface_voxels": int(res.values_mm.size), "bone": bone}
        if res.capped:
            extra["capped_voxels"] = res.capped
            warnings.append(
                f"{res.capped} interface voxels of the {plate.replace('_', ' ')} have no "
                f"articular surface within {THICKNESS_SEARCH_MM:g} mm and are left out of its "
                "thickness: check the segmentation"
            )
        out.append(Measurement(name="thickness_mean", value=float(res.values_mm.mean()),
                               unit="mm", structure=plate, method=THICKNESS_METHOD, extra=extra))
        out.append(Measurement(name="thickness_max", value=float(res.values_mm.max()),
                               unit="mm", structure=plate, method=THICKNESS_METHOD,
                               extra={"interface_voxels": int(res.values_mm.size)}))
    return out, warnings


def _thickness_step(
    seg: LabelVolume, *, image: Volume | None, lesions: LabelVolume | None
) -> tuple[list[Measurement], list[str]]:
    del image, lesions  # thickness needs only the label map
    return cartilage_thickness_measurements(seg)


#: The measurement steps, in output order. Each takes ``(seg, *, image, lesions)`` and
#: returns ``(measurements, warnings)``; image-based measurements are added here.
_STEPS: list[Step] = [_volume_step, _thickness_step, _lesion_step]


def _check_inputs(seg: LabelVolume, image: Volume | None, lesions: LabelVolume | None) -> None:
    seg.require_geometry("a knee measurement")
    seg.require_3d("knee measurements (volumes in mL, thickness in 3-D)")
    check_knee_labels(seg)
    if image is not None and not seg.same_geometry(image):
        raise GeometryError(
            f"the image {image.shape} {''.join(image.orientation)} is not in the geometry of the "
            f"segmentation {seg.shape} {''.join(seg.orientation)}; give the image the "
            "segmentation was made from"
        )
    if lesions is not None and not isinstance(lesions, LabelVolume):
        raise LabelError("the lesion mask must be a LabelVolume (read it with read_labels)")


def measure_knee_with_warnings(
    seg: LabelVolume,
    *,
    image: Volume | None = None,
    lesions: LabelVolume | None = None,
) -> tuple[list[Measurement], list[str]]:
    """:func:`measure_knee`, also returning the warnings a reader must see."""
    _check_inputs(seg, image, lesions)
    measurements: list[Measurement] = []
    warnings: list[str] = []
    for step in _STEPS:
        ms, ws = step(seg, image=image, lesions=lesions)
        measurements.extend(ms)
        warnings.extend(ws)
    for w in warnings:
        log.warning("%s", w)
    return measurements, warnings


def measure_knee(
    seg: LabelVolume,
    *,
    image: Volume | None = None,
    lesions: LabelVolume | None = None,
) -> list[Measurement]:
    """All knee measurements available from a label map (and optionally image and lesions).

    Parameters
    ----------
    seg : LabelVolume
        (I, J, K) label map in the project's knee schema, with known geometry.
    image : Volume, optional
        The image ``seg`` was made from (same grid); used by image-based measurements.
    lesions : LabelVolume, optional
        Bone marrow lesion mask (1 = lesion) on the same grid.

    Returns
    -------
    list of Measurement
        Volumes per structure (mL), cartilage thickness per plate (mm), then lesion
        volumes/counts per bone when ``lesions`` is given. Warnings are logged; use :func:`measure_knee_with_warnings` to get them.
    """
    return measure_knee_with_warnings(seg, image=image, lesions=lesions)[0]


def measure_knee_files(
    seg_path: str | os.PathLike[str],
    *,
    image_path: str | os.PathLike[str] | None = None,
    lesions_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Read the files, measure, and return the ``mskmri/measurements/1`` document.

    Parameters
    ----------
    seg_path : path-like
        Knee label map (any format :func:`mskmri.io.read` accepts).
    image_path, lesions_path : path-like, optional
        The image and the lesion mask on the same grid.

    Returns
    -------
    dict
        The document (see :func:`mskmri.measure.base.measurements_document`).
    """
    from mskmri import __version__
    from mskmri.io import read, read_labels

    seg = read_labels(seg_path, schema="knee", strict=False)
    image = read(image_path) if image_path is not None else None
    lesions = (
        read_labels(lesions_path, schema="lesion", strict=False) if lesions_path is not None else None
    )
    measurements, warnings = measure_knee_with_warnings(seg, image=image, lesions=lesions)
    info: dict[str, Any] = describe_input(seg, Path(seg_path))
    info["anatomy"] = "knee"
    info["image"] = str(image_path) if image_path is not None else None
    info["lesions"] = str(lesions_path) if lesions_path is not None else None
    return measurements_document(
        measurements, input_info=info, tool_version=__version__, warnings=warnings
    )


__all__: list[str] = [
    "CARTILAGE_PLATES",
    "CORE_STRUCTURES",
    "PlateThickness",
    "cartilage_thickness",
    "cartilage_thickness_measurements",
    "check_knee_labels",
    "knee_volumes",
    "lesion_volumes_by_bone",
    "measure_knee",
    "measure_knee_files",
    "measure_knee_with_warnings",
]
