"""Knee measurements from a label map in the project's knee schema.

What is measured now:

- ``volume`` (mL) of every knee structure present (bones, cartilage plates, menisci, joint
  effusion, muscle, ligaments, fat pad): voxel count x voxel volume, the voxel volume being
  ``|det|`` of the affine's 3x3 part, so the number does not depend on the storage orientation.
- with a lesion mask (1 = bone marrow lesion): ``lesion_volume`` (mL) and ``lesion_count`` per
  bone, each lesion (26-connected component) assigned to the bone it overlaps most, and the
  total ``lesion_volume``.

Where later measurements slot in: :func:`measure_knee` calls one function per group of
measurements (:data:`_STEPS`); cartilage thickness and image-based measurements are added as
further steps that take the same arguments and return ``(measurements, warnings)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
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


#: The measurement steps, in output order. Each takes ``(seg, *, image, lesions)`` and
#: returns ``(measurements, warnings)``; add cartilage thickness etc. here.
_STEPS: list[Step] = [_volume_step, _lesion_step]


def _check_inputs(seg: LabelVolume, image: Volume | None, lesions: LabelVolume | None) -> None:
    seg.require_geometry("a knee measurement")
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
        Volumes per structure (mL), then lesion volumes/counts per bone when ``lesions`` is
        given. Warnings are logged; use :func:`measure_knee_with_warnings` to get them.
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
    "CORE_STRUCTURES",
    "check_knee_labels",
    "knee_volumes",
    "lesion_volumes_by_bone",
    "measure_knee",
    "measure_knee_files",
    "measure_knee_with_warnings",
]
