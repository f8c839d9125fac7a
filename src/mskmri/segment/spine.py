"""Vertebral-body segmentation of sagittal spine MRI (``mskmri segment spine IMAGE OUT``).

Pipeline
--------
1. The image must be sagittal: the array axis closest to the patient's left-right axis must be
   the slice (largest-spacing) axis (:func:`mskmri.segment._spine_data.slice_axis`); axial-only
   data is refused with a :class:`~mskmri.errors.GeometryError` naming what is missing.
2. Reorient to the canonical grid (R, I, P), resample in-plane to 1 mm, normalise intensities
   (0.5-99.5 percentiles), run the 2-D U-Net ``spine-seg`` on every sagittal slice with the
   sliding-window inferer (:class:`mskmri.nn.inference.SlidingWindowInferer`).
3. Post-processing (:func:`body_instances`, :func:`assign_levels`): the network gives
   "vertebral body" and "sacrum" (S1 body). Bodies are split into instances by a watershed
   from seeds deeper than :data:`SEED_DEPTH_MM` inside the mask (thin false bridges across a
   disc are cut), small fragments and regions off the column are dropped, and instances are
   numbered from the top. Levels are named from anatomy when the sacrum can be told: a sacrum
   component of at least :data:`MIN_SACRUM_FRACTION` of the median body size whose top lies
   below the lowest body's centroid and within :data:`SACRUM_MAX_GAP_MM` of it; the lowest
   body is then L5 and the bodies above are L4, L3, ... (assumes no transitional vertebra).
   Otherwise bodies get ordinal ids from 1000 (top first) and the output says so (warning +
   sidecar).
4. The label map goes back to the input grid (nearest neighbour) and is written with a
   sidecar that records the model, how levels were named and every warning.

What is not segmented: discs, spinal cord and CSF (no labelled real training data beyond one
disc exam; see the model card). The sacrum is labelled 26 (S1 body only).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mskmri.errors import MskMriError
from mskmri.labels import ORDINAL_VERTEBRA_START, VERTEBRA_ID, spine_labels_for
from mskmri.measure._geometry import SUPERIOR
from mskmri.segment import _spine_data as sd
from mskmri.volume import LabelVolume, Volume

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

log = logging.getLogger(__name__)

#: Shipped model used by default.
DEFAULT_MODEL = "spine-seg"
#: Sliding-window patch (pixels of 1 mm) on one sagittal slice; a multiple of 16.
INFER_PATCH: tuple[int, int] = (224, 224)
#: Overlap of neighbouring windows.
INFER_OVERLAP = 0.25
#: Largest slice spacing (mm) at which class probabilities are averaged over neighbours.
SMOOTH_MAX_SPACING_MM = 1.5
#: Network class values (see :data:`mskmri.segment._spine_data.NET_CLASSES`).
NET_BODY, NET_SACRUM = 1, 2
#: Spine-schema value of the sacrum.
SACRUM_ID = 26
#: Largest distance (mm, along S-I) from the lowest body's centroid to the top of the sacrum.
SACRUM_MAX_GAP_MM = 40.0
#: Smallest sacrum component, as a fraction of the median body size (voxels).
MIN_SACRUM_FRACTION = 0.3
#: Seeds of the instance split: voxels deeper than this (mm) inside the body mask; bridges
#: thinner than twice this (across a disc) are cut.
SEED_DEPTH_MM = 4.0
#: Smallest seed kept (mm^3).
MIN_SEED_MM3 = 100.0
#: Instances smaller than this fraction of the median instance are dropped (as in
#: :func:`mskmri.measure.spine.split_vertebral_bodies`).
MIN_INSTANCE_FRACTION = 0.2
#: An instance taller (S-I) than this multiple of the median height may be merged bodies.
MERGED_BODY_RATIO = 1.6
#: Column filter: an instance whose centroid lies farther than this (mm, in the axial plane)
#: from the median centroid of the instances within +-:data:`COLUMN_WINDOW_MM` (S-I) is not
#: part of the vertebral column (posterior elements, bowel, ...) and is dropped.
COLUMN_MAX_OFFSET_MM = 25.0
COLUMN_WINDOW_MM = 70.0
#: Label values of the level-naming rule.
LEVEL_SOURCE_ANATOMY = "anatomy: sacrum below the lowest lumbar body (lowest body = L5)"
LEVEL_SOURCE_ORDINAL = "ordinal: levels could not be told, ids from 1000 numbered from the top"


class SegmentationError(MskMriError):
    """Segmentation found nothing usable (no vertebral body in the image)."""


@dataclass
class SpineSegmentation:
    """Result of :func:`segment_spine`.

    Attributes
    ----------
    labels : LabelVolume
        Spine-schema label map on the input grid: bodies as VerSe ids (L5 = 24, ...) or
        ordinal ids from 1000, sacrum 26.
    level_source : str
        :data:`LEVEL_SOURCE_ANATOMY` or :data:`LEVEL_SOURCE_ORDINAL`.
    warnings : list of str
    info : dict
        Model name, timings (s), canonical shape, ...
    """

    labels: LabelVolume
    level_source: str
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ordinal(self) -> bool:
        """True when the levels are ordinal (not named from anatomy)."""
        return self.level_source == LEVEL_SOURCE_ORDINAL

    def sidecar(self) -> dict[str, Any]:
        """The label-map sidecar with a ``"segmentation"`` record (model, levels, warnings)."""
        return {**self.labels.sidecar(), "segmentation": {
            "tool": "mskmri segment spine", "levels": self.level_source,
            "ordinal_levels": self.ordinal, "warnings": list(self.warnings),
            "not_segmented": ["discs", "spinal cord", "CSF"], **self.info}}


# ----------------------------------------------------------------------------- network
def predict_canonical(model: nn.Module, image: np.ndarray, *, slice_spacing_mm: float = 1.0,
                      batch_size: int = 2) -> np.ndarray:
    """Network classes of a normalised canonical stack, slice by slice.

    Each sagittal slice goes through the sliding-window inferer; the class probabilities are
    then averaged over each slice and its two neighbours (weights 1/3) when the slices are at
    most :data:`SMOOTH_MAX_SPACING_MM` apart (a light 2.5-D consistency step: +0.004 Dice on
    the validation exams), and the arg-max is taken.

    Parameters
    ----------
    model : nn.Module
        2-D network, ``(B, 1, H, W)`` -> ``(B, 3, H, W)`` logits.
    image : (L, H, W) float32 ndarray
        Sagittal slices on the canonical grid (:func:`~mskmri.segment._spine_data.to_canonical`),
        normalised to [0, 1].
    slice_spacing_mm : float
        Distance between the slices (mm).
    batch_size : int
        Windows per forward pass.

    Returns
    -------
    (L, H, W) uint8 ndarray
        0 background, 1 vertebral body, 2 sacrum.
    """
    import torch
    from scipy import ndimage

    from mskmri.nn.inference import SlidingWindowConfig, SlidingWindowInferer

    was_training = model.training
    inferer = SlidingWindowInferer(model, SlidingWindowConfig(
        INFER_PATCH, overlap=INFER_OVERLAP, batch_size=batch_size))
    prob: np.ndarray | None = None
    for k in range(image.shape[0]):
        p = torch.from_numpy(inferer.logits(image[k])).softmax(0).numpy()
        if prob is None:
            prob = np.empty((p.shape[0], *image.shape), np.float32)
        prob[:, k] = p
    model.train(was_training)
    assert prob is not None
    if image.shape[0] >= 3 and slice_spacing_mm <= SMOOTH_MAX_SPACING_MM:
        prob = ndimage.convolve1d(prob, np.full(3, 1.0 / 3.0), axis=1, mode="nearest")
    return np.asarray(prob.argmax(0), dtype=np.uint8)


# ----------------------------------------------------------------------------- post-processing
def body_instances(classes: LabelVolume) -> tuple[np.ndarray, list[str]]:
    """Split the vertebral-body class into instances with ordinal ids from the top.

    Seeds are the connected parts of the mask deeper than :data:`SEED_DEPTH_MM` (Euclidean
    distance in mm, so anisotropic voxels are handled); each body voxel joins the seed it
    reaches first by a watershed on the distance map, so bodies touched by a thin false
    bridge across a disc are still told apart. Instances smaller than
    :data:`MIN_INSTANCE_FRACTION` of the median and those off the column
    (:data:`COLUMN_MAX_OFFSET_MM`) are dropped with a warning.

    Parameters
    ----------
    classes : LabelVolume
        Network classes (:data:`NET_BODY` = body), known geometry.

    Returns
    -------
    ids : (I, J, K) int32 ndarray
        0 or ordinal ids 1000, 1001, ... numbered from the top (S-I of the centroid).
    warnings : list of str
    """
    import cc3d
    from scipy import ndimage
    from skimage.segmentation import watershed

    warnings: list[str] = []
    mask = np.asarray(classes.array) == NET_BODY
    out = np.zeros(mask.shape, np.int32)
    if not mask.any():
        return out, warnings
    spacing = classes.spacing
    voxel_mm3 = float(np.prod(spacing))
    dist = ndimage.distance_transform_edt(mask, sampling=spacing)
    seeds = cc3d.connected_components((dist > SEED_DEPTH_MM).astype(np.uint8), connectivity=6)
    counts = np.bincount(seeds.ravel())
    small = np.nonzero(counts * voxel_mm3 < MIN_SEED_MM3)[0]
    seeds[np.isin(seeds, small)] = 0
    if not seeds.any():  # thin bodies (coarse or small images): plain components
        seeds = cc3d.connected_components(mask.astype(np.uint8), connectivity=6)
    inst = watershed(-dist, seeds, mask=mask)
    # components of the mask with no seed are dropped by the watershed; count them
    values = [int(v) for v in np.unique(inst) if v]
    sizes = ndimage.sum_labels(np.ones_like(inst), inst, values)
    med = float(np.median(sizes)) if len(values) else 0.0
    keep = [v for v, n in zip(values, sizes, strict=True) if n >= MIN_INSTANCE_FRACTION * med]
    if len(keep) < len(values):
        warnings.append(f"{len(values) - len(keep)} small vertebral body fragment(s) dropped "
                        f"(< {MIN_INSTANCE_FRACTION:.0%} of the median size)")
    cents = {v: classes.voxel_to_world(np.argwhere(inst == v)).mean(axis=0) for v in keep}
    s_pos = {v: float(c @ SUPERIOR) for v, c in cents.items()}
    off_column = []
    for v in keep:
        near = [cents[u] for u in keep if abs(s_pos[u] - s_pos[v]) <= COLUMN_WINDOW_MM]
        ref = np.median(np.stack(near), axis=0)
        d = cents[v] - ref
        d = d - (d @ SUPERIOR) * SUPERIOR
        if float(np.linalg.norm(d)) > COLUMN_MAX_OFFSET_MM:
            off_column.append(v)
    if off_column:
        warnings.append(f"{len(off_column)} body-like region(s) off the vertebral column "
                        f"(> {COLUMN_MAX_OFFSET_MM:.0f} mm from its neighbours) dropped")
    keep = sorted((v for v in keep if v not in off_column), key=lambda v: -s_pos[v])
    heights = {}
    for v in keep:
        zs = classes.voxel_to_world(np.argwhere(inst == v)) @ SUPERIOR
        heights[v] = float(zs.max() - zs.min())
    med_h = float(np.median(list(heights.values()))) if heights else 0.0
    for rank, v in enumerate(keep):
        out[inst == v] = ORDINAL_VERTEBRA_START + rank
        if heights[v] > MERGED_BODY_RATIO * med_h:
            warnings.append(f"body V{ORDINAL_VERTEBRA_START + rank} is "
                            f"{heights[v] / med_h:.1f}x the median height: it may be two "
                            "merged bodies")
    return out, warnings


def assign_levels(classes: LabelVolume) -> tuple[LabelVolume, str, list[str]]:
    """Instances and levels from a body/sacrum class map (see the module docstring).

    Parameters
    ----------
    classes : LabelVolume
        Values :data:`NET_BODY` (any vertebral body) and :data:`NET_SACRUM`, known geometry.

    Returns
    -------
    labels : LabelVolume
        Spine schema: bodies as VerSe ids or ordinal ids from 1000, sacrum 26.
    level_source : str
    warnings : list of str

    Raises
    ------
    SegmentationError
        When no vertebral body is present.
    """
    import cc3d

    classes.require_geometry("naming vertebral levels")
    arr = np.asarray(classes.array)
    out, warnings = body_instances(classes)
    ids = sorted(v for v in np.unique(out) if v >= ORDINAL_VERTEBRA_START)
    if not ids:
        raise SegmentationError(
            "no vertebral body was found in the image; give a sagittal T1/T2 spine MRI "
            "that shows the vertebral bodies")

    def s_coords(mask: np.ndarray) -> np.ndarray:
        return classes.voxel_to_world(np.argwhere(mask)) @ SUPERIOR

    sizes = {v: int(np.count_nonzero(out == v)) for v in ids}
    med = float(np.median(list(sizes.values())))
    lowest = ids[-1]  # ordinal ids are numbered from the top
    low_c = float(s_coords(out == lowest).mean())
    source = LEVEL_SOURCE_ORDINAL
    sac_mask = arr == NET_SACRUM
    reason = "no sacrum was found"
    if sac_mask.any():
        lab = cc3d.connected_components(sac_mask.astype(np.uint8), connectivity=6)
        counts = np.bincount(lab.ravel())
        counts[0] = 0
        big = int(np.argmax(counts))
        sac = lab == big
        top = float(s_coords(sac).max())
        if counts[big] < MIN_SACRUM_FRACTION * med:
            reason = (f"the sacrum found is small ({counts[big]} voxels, < "
                      f"{MIN_SACRUM_FRACTION:.0%} of the median body)")
        elif not (low_c > top >= low_c - SACRUM_MAX_GAP_MM):
            reason = (f"the sacrum found is not just below the lowest body (its top is "
                      f"{low_c - top:.0f} mm below that body's centre; expected 0-"
                      f"{SACRUM_MAX_GAP_MM:.0f} mm)")
        else:
            out[sac] = SACRUM_ID
            if len(ids) > VERTEBRA_ID["L5"] - VERTEBRA_ID["C2"] + 1:
                reason = "more bodies above the sacrum than levels from C2 to L5"
            else:
                renamed = np.zeros_like(out)
                for rank, v in enumerate(reversed(ids)):
                    renamed[out == v] = VERTEBRA_ID["L5"] - rank
                out = np.where(np.isin(out, ids), renamed, out)
                source = LEVEL_SOURCE_ANATOMY
    if source == LEVEL_SOURCE_ORDINAL:
        warnings.append(f"vertebral levels could not be told ({reason}): bodies have ordinal "
                        "ids from 1000 numbered from the top (V1000, V1001, ...)")
    names = spine_labels_for({int(v) for v in np.unique(out) if v})
    labels = LabelVolume(out, classes.affine, names, schema="spine", meta=dict(classes.meta))
    return labels, source, warnings


# ----------------------------------------------------------------------------- public API
def segment_spine(image: Volume, *, model: str | os.PathLike[str] = DEFAULT_MODEL,
                  device: str = "cpu") -> SpineSegmentation:
    """Segment the vertebral bodies of a sagittal spine MRI.

    Parameters
    ----------
    image : Volume
        Sagittal T1- or T2-weighted image with known geometry (any storage orientation).
    model : str or path
        Registered model name or a ``*.safetensors`` file with its card.
    device : str
        torch device.

    Returns
    -------
    SpineSegmentation
        Label map on ``image``'s grid, how levels were named, warnings, timings.

    Raises
    ------
    GeometryError
        No geometry, or not sagittal (e.g. axial-only data).
    ModelError
        Weights missing (names ``mskmri train spine-seg``) or not matching their card.
    SegmentationError
        No vertebral body found.
    """
    from mskmri.nn.registry import load_model

    t0 = time.perf_counter()
    sd.slice_axis(image)  # geometry and sagittal checks before the model is loaded
    can = sd.to_canonical(image)
    norm = sd.normalise(can.array)
    net, card = load_model(str(model), device=device)
    t1 = time.perf_counter()
    import torch

    with torch.no_grad():
        classes = predict_canonical(net, norm, slice_spacing_mm=can.spacing[0])
    t2 = time.perf_counter()
    class_vol = LabelVolume(classes, can.affine, {NET_BODY: "vertebral body",
                                                  NET_SACRUM: "sacrum"}, schema="custom")
    labels_can, source, warnings = assign_levels(class_vol)
    labels = labels_can.resample_to(image, order=0)
    assert isinstance(labels, LabelVolume)
    labels.meta = dict(image.meta)
    if not labels.present_values():
        raise SegmentationError("the vertebral bodies found vanished on the input grid; "
                                "is the image very coarse?")
    for w in warnings:
        log.warning("%s", w)
    info = {"model": card.name, "model_sha256": card.sha256,
            "canonical_shape": list(can.shape),
            "seconds": {"load": round(t1 - t0, 3), "network": round(t2 - t1, 3),
                        "postprocess": round(time.perf_counter() - t2, 3)}}
    return SpineSegmentation(labels, source, warnings, info)


def segment_spine_file(image_path: str | os.PathLike[str], out_path: str | os.PathLike[str], *,
                       model: str | os.PathLike[str] = DEFAULT_MODEL,
                       device: str = "cpu") -> SpineSegmentation:
    """Read ``image_path``, segment it and write the label map + sidecar atomically.

    The label map is on the input grid; the sidecar (``OUT.json``) records the label names,
    the model, how levels were named (``"ordinal_levels": true`` when they are ids from 1000)
    and every warning.
    """
    from mskmri.io import atomic_write_json, read, write
    from mskmri.io._dispatch import sidecar_path

    image = read(image_path)
    res = segment_spine(image, model=model, device=device)
    res.info["input"] = str(image_path)
    write(res.labels, out_path, sidecar=False)
    atomic_write_json(sidecar_path(Path(out_path)), res.sidecar())
    return res


__all__ = ["DEFAULT_MODEL", "LEVEL_SOURCE_ANATOMY", "LEVEL_SOURCE_ORDINAL", "SACRUM_ID",
           "SegmentationError", "SpineSegmentation", "assign_levels", "predict_canonical",
           "segment_spine", "segment_spine_file"]
