"""Spine segmentation of sagittal MRI (``mskmri segment spine IMAGE OUT``): vertebral bodies by
level, sacrum, intervertebral discs, spinal cord and CSF.

Pipeline
--------
1. The image must be sagittal: the array axis closest to the patient's left-right axis must be
   the slice (largest-spacing) axis (:func:`mskmri.segment._spine_data.slice_axis`); axial-only
   data is refused with a :class:`~mskmri.errors.GeometryError` naming what is missing.
2. Reorient to the canonical grid (R, I, P), resample in-plane to 1 mm, normalise intensities
   (0.5-99.5 percentiles), run the 2-D U-Net ``spine-seg`` on every sagittal slice with the
   sliding-window inferer (:class:`mskmri.nn.inference.SlidingWindowInferer`); when the card
   lists ensemble members (:data:`MEMBERS_KEY`: the shipped model has one, a continuation of
   its own training), their class probabilities are averaged with the model's. When the model
   card names a bodies-only partner network (``bone_ensemble``), the partner may only *veto*
   whole bone regions of the main network (:func:`veto_bone`): a connected bone region that
   the two networks' mean bone probability does not confirm over at least
   :data:`VETO_AGREEMENT` of its voxels is removed; the shape of every region that is kept is
   the main network's own (the averaged probability trimmed the anterior corners of the
   lowest lumbar bodies and joined bodies across dark discs, which turned the endplates by up
   to 40 deg on the training and validation exams; see :func:`veto_bone`). The partner,
   trained on lumbar and lower thoracic exams, is not used on a neck: neither when the
   model's own map names the levels from C2 nor when the vetoed one would.
3. Post-processing (:func:`body_instances`, :func:`assign_levels`): the network gives
   "vertebral body" and "sacrum" (S1 body). Bodies are split into instances by a watershed
   from seeds deeper than :data:`SEED_DEPTH_MM` inside the mask (thin false bridges across a
   disc are cut), small fragments, regions off the column and lateral fragments that do not
   reach the column's mid-sagittal plane (:data:`MIDLINE_TOLERANCE_MM`; every vertebral body
   crosses it) are dropped, and instances are numbered from the top. Levels are named from anatomy when the sacrum can be told: a sacrum
   component of at least :data:`MIN_SACRUM_FRACTION` of the median body size whose top lies
   below the lowest body's centroid and within :data:`SACRUM_MAX_GAP_MM` of it; the lowest
   body is then L5 and the bodies above are L4, L3, ... (assumes no transitional vertebra).
   Failing that, from C2 (:func:`c2_anchor`): the top body is C2 when it is at least
   :data:`C2_HEIGHT_RATIO` times the median height of the others (the dens), is not cut by
   the image edge and no disc lies above it in the column (within
   :data:`COLUMN_MAX_OFFSET_MM` of its centroid in the axial plane). A region cut by the
   image edge directly above such a body, with no disc between, is not a vertebral body
   (C1 has none; skull base) and is dropped with a warning. Otherwise bodies get ordinal ids from 1000 (top
   first) and the output says so (warning + sidecar).
4. Discs, cord and CSF (:func:`add_soft_tissue`): each disc component goes to the pair of
   consecutive bodies (the sacrum counts as the lowest) whose centroids bracket its own and
   gets 100 + the id of the body above (L4-L5 = 123, ordinal 1100+); a disc outside the
   bodies in view, or off their line by more than :data:`COLUMN_MAX_OFFSET_MM`, is dropped
   with a warning. Cord (201) and CSF (202) keep the components of at least
   :data:`MIN_CORD_FRACTION` of the largest and :data:`MIN_SOFT_MM3`. A class the network
   did not find is listed in the sidecar's ``"not_segmented"`` with the reason.
5. The label map goes back to the input grid (nearest neighbour) and is written with a
   sidecar that records the model, how levels were named and every warning.

The sacrum is labelled 26 (S1 body only). The CSF class was trained on partial labels (U2AD
slices); treat it as the least reliable class (see the model card).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mskmri.errors import ModelError, MskMriError
from mskmri.labels import (
    CSF,
    DISC_OFFSET,
    ORDINAL_VERTEBRA_START,
    SPINAL_CORD,
    VERTEBRA_ID,
    is_disc,
    is_vertebra,
    spine_labels_for,
)
from mskmri.measure._geometry import SUPERIOR
from mskmri.segment import _spine_data as sd
from mskmri.volume import LabelVolume, Volume

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

log = logging.getLogger(__name__)

#: Shipped model used by default.
DEFAULT_MODEL = "spine-seg"
#: Model-card ``extra`` key naming a background/body/sacrum network (a weight file beside the
#: model's) that vetoes the model's bone regions the two do not agree on (:func:`veto_bone`).
BONE_ENSEMBLE_KEY = "bone_ensemble"
#: Model-card ``extra`` key listing weight files beside the model's (same architecture and
#: classes) whose class probabilities are averaged with the model's (:func:`_mean_probabilities`).
MEMBERS_KEY = "ensemble_members"
#: A bone region of the main network (26-connected, 3-D) is kept when at least this fraction
#: of its voxels is bone by the mean probability of the two networks (:func:`veto_bone`).
VETO_AGREEMENT = 0.5
#: Sliding-window patch (pixels of 1 mm) on one sagittal slice; a multiple of 16.
INFER_PATCH: tuple[int, int] = (224, 224)
#: Overlap of neighbouring windows.
INFER_OVERLAP = 0.25
#: Largest slice spacing (mm) at which class probabilities are averaged over neighbours.
SMOOTH_MAX_SPACING_MM = 1.5
#: Network class values (see :data:`mskmri.segment._spine_data.NET_CLASSES`).
NET_BODY, NET_SACRUM, NET_DISC, NET_CORD, NET_CSF = sd.BODY, sd.SACRUM, sd.DISC, sd.CORD, sd.CSF
#: The top body is taken as C2 (with its dens) when it is at least this many times the median
#: S-I height of the other bodies (C2 with the dens is about twice C3's height).
C2_HEIGHT_RATIO = 1.4
#: Why the C2 rule fails when the top body is cut by the image edge.
C2_EDGE_REASON = "the top body touches the image edge (it may be cut)"
#: Fewest bodies for the C2 rule (the median of the others must mean something).
C2_MIN_BODIES = 4
#: Cord/CSF components smaller than this fraction of the class's largest component are dropped.
MIN_CORD_FRACTION = 0.1
#: Smallest disc, cord or CSF component kept (mm^3; on a single 2-D slice, mm^2 x the pixel
#: thickness in the affine).
MIN_SOFT_MM3 = 15.0
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
#: part of the vertebral column (posterior elements, bowel, ...) and is dropped. When fewer
#: than :data:`COLUMN_MIN_NEIGHBOURS` instances (itself included) lie in the window, the
#: median is over the :data:`COLUMN_MIN_NEIGHBOURS` nearest along S-I: the median of two
#: centroids is their midpoint, so a region 50 mm behind the column at the top of a neck
#: image, with only C2 in its window, stayed and was taken for a body above C2.
COLUMN_MAX_OFFSET_MM = 25.0
COLUMN_WINDOW_MM = 70.0
COLUMN_MIN_NEIGHBOURS = 5
#: Midline rule: every vertebral body crosses the mid-sagittal plane of the column. An instance
#: whose left-right extent (voxel edges) stays farther than this (mm) from the column's local
#: midline (the volume-weighted median left-right centroid of the instances within
#: +-:data:`COLUMN_WINDOW_MM` S-I) is a lateral fragment (e.g. the lateral rim of a disc or a
#: pedicle taken for bone on the outer slices) and is dropped.
MIDLINE_TOLERANCE_MM = 2.0
#: Label values of the level-naming rule.
LEVEL_SOURCE_ANATOMY = "anatomy: sacrum below the lowest lumbar body (lowest body = L5)"
LEVEL_SOURCE_C2 = "anatomy: C2 (tall top body with the dens, not cut, no disc above)"
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
        ordinal ids from 1000, sacrum 26, discs 100 + the id of the body above, cord 201,
        CSF 202.
    level_source : str
        :data:`LEVEL_SOURCE_ANATOMY`, :data:`LEVEL_SOURCE_C2` or :data:`LEVEL_SOURCE_ORDINAL`.
    warnings : list of str
    info : dict
        Model name, timings (s), canonical shape, ...
    not_segmented : dict of str to str
        Structure ("discs", "spinal cord", "CSF") -> why it is absent from the label map.
    """

    labels: LabelVolume
    level_source: str
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    not_segmented: dict[str, str] = field(default_factory=dict)

    @property
    def ordinal(self) -> bool:
        """True when the levels are ordinal (not named from anatomy)."""
        return self.level_source == LEVEL_SOURCE_ORDINAL

    def sidecar(self) -> dict[str, Any]:
        """The label-map sidecar with a ``"segmentation"`` record (model, levels, warnings)."""
        return {**self.labels.sidecar(), "segmentation": {
            "tool": "mskmri segment spine", "levels": self.level_source,
            "ordinal_levels": self.ordinal, "warnings": list(self.warnings),
            "not_segmented": dict(self.not_segmented), **self.info}}


# ----------------------------------------------------------------------------- network
def _class_probabilities(model: nn.Module, image: np.ndarray, slice_spacing_mm: float,
                         batch_size: int) -> np.ndarray:
    """Softmax ``(K, L, H, W)`` of a 2-D network slice by slice (3-slice average when thin)."""
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
    return prob


def _mean_probabilities(models: list[nn.Module], image: np.ndarray, slice_spacing_mm: float,
                        batch_size: int) -> np.ndarray:
    """Mean of :func:`_class_probabilities` over ``models`` (same classes): ``(K, L, H, W)``."""
    prob = _class_probabilities(models[0], image, slice_spacing_mm, batch_size)
    for other in models[1:]:
        prob += _class_probabilities(other, image, slice_spacing_mm, batch_size)
    if len(models) > 1:
        prob /= len(models)
    return prob


def _load_members(model: str, card: Any,
                  device: str) -> tuple[list[nn.Module], list[dict[str, str]]]:
    """The networks named under :data:`MEMBERS_KEY` in ``card``, loaded from beside ``model``.

    Raises
    ------
    ModelError
        A member file is missing, does not match its card, or has other classes.
    """
    from mskmri.nn.registry import load_model, resolve_weights

    names = list((getattr(card, "extra", None) or {}).get(MEMBERS_KEY) or [])
    if not names:
        return [], []
    folder = resolve_weights(str(model))[0].parent
    nets: list[nn.Module] = []
    info: list[dict[str, str]] = []
    for name in names:
        net, member_card = load_model(folder / name, device=device)
        if dict(member_card.labels) != dict(card.labels):
            raise ModelError(f"ensemble member {folder / name} has other classes than "
                             f"{model}; its card must list the same labels")
        nets.append(net)
        info.append({"file": str(name), "sha256": member_card.sha256})
    return nets, info


def predict_canonical(model: nn.Module, image: np.ndarray, *, slice_spacing_mm: float = 1.0,
                      batch_size: int = 2, bone_model: nn.Module | None = None) -> np.ndarray:
    """Network classes of a normalised canonical stack, slice by slice.

    Each sagittal slice goes through the sliding-window inferer; the class probabilities are
    then averaged over each slice and its two neighbours (weights 1/3) when the slices are at
    most :data:`SMOOTH_MAX_SPACING_MM` apart (a light 2.5-D consistency step: +0.004 Dice on
    the validation exams), and the arg-max is taken.

    With ``bone_model`` (a background/body/sacrum network), the partner vetoes whole bone
    regions of ``model`` that the mean of the two networks does not confirm
    (:func:`veto_bone`); it never changes the outline of a region that is kept.

    Parameters
    ----------
    model : nn.Module
        2-D network, ``(B, 1, H, W)`` -> ``(B, K, H, W)`` logits.
    image : (L, H, W) float32 ndarray
        Sagittal slices on the canonical grid (:func:`~mskmri.segment._spine_data.to_canonical`),
        normalised to [0, 1].
    slice_spacing_mm : float
        Distance between the slices (mm).
    batch_size : int
        Windows per forward pass.
    bone_model : nn.Module, optional
        Second network with classes background, body, sacrum.

    Returns
    -------
    (L, H, W) uint8 ndarray
        Network classes (:data:`~mskmri.segment._spine_data.NET_CLASSES`).
    """
    prob = _class_probabilities(model, image, slice_spacing_mm, batch_size)
    if bone_model is None:
        return np.asarray(prob.argmax(0), dtype=np.uint8)
    return veto_bone(prob, _class_probabilities(bone_model, image, slice_spacing_mm, batch_size))


def fuse_bone(prob: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Classes from the main network's probabilities with bone decided by two networks.

    Parameters
    ----------
    prob : (K, ...) ndarray
        Main network's class probabilities (:data:`~mskmri.segment._spine_data.NET_CLASSES`).
    other : (3, ...) ndarray
        Background/body/sacrum probabilities of the second network.

    Returns
    -------
    (...) uint8 ndarray
        Bone where the mean bone probability (body + sacrum) > 0.5 (body or sacrum by the
        larger mean), elsewhere the main network's most likely non-bone class.
    """
    body = 0.5 * (prob[NET_BODY] + other[NET_BODY])
    sacrum = 0.5 * (prob[NET_SACRUM] + other[NET_SACRUM])
    soft = prob.copy()
    soft[[NET_BODY, NET_SACRUM]] = -1.0
    out = soft.argmax(0).astype(np.uint8)
    bone = body + sacrum > 0.5
    out[bone] = np.where(sacrum[bone] > body[bone], NET_SACRUM, NET_BODY)
    return out


def veto_bone(prob: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Classes of the main network, with whole bone regions vetoed by the partner network.

    The main network's arg-max is kept everywhere except in the connected regions (26-connected
    over the whole array) of its bone (body or sacrum) of which fewer than
    :data:`VETO_AGREEMENT` of the voxels are bone by the mean of the two networks
    (:func:`fuse_bone`); those regions take the fused classes (mostly not bone). The partner
    can neither add bone nor move the outline of a region that is kept.

    Why not the fused map itself: averaging the probabilities trims a body where the partner
    is unsure (the dark, steep L5 of chu2015/exam10 lost its anterior-inferior corner: its
    inferior endplate turned 17.6 deg) and fills dark discs with bone (chu2015/exam02 L4 and
    L5 became one region, chu2015/exam08 L4 got half of the L3-L4 disc: 25-40 deg). On the 12
    training and 3 validation lumbar exams the matched L1-L5 Cobb difference to the manual
    masks fell from a mean |difference| of 7.3 deg (max 29.2) with the fused map to 3.8 deg (max
    15.6) with this rule, at a bone Dice of 0.853 (fused 0.857, main network alone 0.851).

    Parameters
    ----------
    prob : (K, ...) ndarray
        Main network's class probabilities (:data:`~mskmri.segment._spine_data.NET_CLASSES`).
    other : (3, ...) ndarray
        Background/body/sacrum probabilities of the partner network.

    Returns
    -------
    (...) uint8 ndarray
        Network classes.
    """
    import cc3d

    main = np.asarray(prob.argmax(0), dtype=np.uint8)
    fused = fuse_bone(prob, other)
    bone = (main == NET_BODY) | (main == NET_SACRUM)
    if not bone.any():
        return main
    squeeze = bone.ndim == 2
    lab = cc3d.connected_components((bone[None] if squeeze else bone).astype(np.uint8),
                                    connectivity=26)
    lab = lab[0] if squeeze else lab
    n = int(lab.max())
    total = np.bincount(lab.ravel(), minlength=n + 1)
    fused_bone = (fused == NET_BODY) | (fused == NET_SACRUM)
    agree = np.bincount(lab.ravel(), weights=fused_bone.ravel().astype(np.float64),
                        minlength=n + 1)
    veto = agree < VETO_AGREEMENT * total
    veto[0] = False
    drop = veto[lab]
    main[drop] = fused[drop]
    return main


# ----------------------------------------------------------------------------- post-processing
def body_instances(classes: LabelVolume) -> tuple[np.ndarray, list[str]]:
    """Split the vertebral-body class into instances with ordinal ids from the top.

    Seeds are the connected parts of the mask deeper than :data:`SEED_DEPTH_MM` (Euclidean
    distance in mm, so anisotropic voxels are handled); each body voxel joins the seed it
    reaches first by a watershed on the distance map, so bodies touched by a thin false
    bridge across a disc are still told apart. Instances smaller than
    :data:`MIN_INSTANCE_FRACTION` of the median, those off the column
    (:data:`COLUMN_MAX_OFFSET_MM`) and those whose left-right extent does not reach the
    column's local midline (:data:`MIDLINE_TOLERANCE_MM`: e.g. the lateral rims of a disc
    taken for bone on the outer slices, which the size and column rules keep) are dropped with
    a warning.

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
        by_gap = sorted(keep, key=lambda u: abs(s_pos[u] - s_pos[v]))
        near = [cents[u] for u in by_gap if abs(s_pos[u] - s_pos[v]) <= COLUMN_WINDOW_MM]
        if len(near) < COLUMN_MIN_NEIGHBOURS:
            near = [cents[u] for u in by_gap[:COLUMN_MIN_NEIGHBOURS]]
        ref = np.median(np.stack(near), axis=0)
        d = cents[v] - ref
        d = d - (d @ SUPERIOR) * SUPERIOR
        if float(np.linalg.norm(d)) > COLUMN_MAX_OFFSET_MM:
            off_column.append(v)
    if off_column:
        warnings.append(f"{len(off_column)} body-like region(s) off the vertebral column "
                        f"(> {COLUMN_MAX_OFFSET_MM:.0f} mm from its neighbours) dropped")
    keep = [v for v in keep if v not in off_column]
    lateral = _lateral_fragments(inst, keep, classes, s_pos)
    if lateral:
        warnings.append(f"{len(lateral)} lateral body-like fragment(s) not reaching the "
                        f"column's mid-sagittal plane (> {MIDLINE_TOLERANCE_MM:g} mm from it) "
                        "dropped")
    keep = sorted((v for v in keep if v not in lateral), key=lambda v: -s_pos[v])
    heights = {}
    for v in keep:
        zs = classes.voxel_to_world(np.argwhere(inst == v)) @ SUPERIOR
        heights[v] = float(zs.max() - zs.min())
    med_h = float(np.median(list(heights.values()))) if heights else 0.0
    for rank, v in enumerate(keep):
        out[inst == v] = ORDINAL_VERTEBRA_START + rank
        if med_h > 0 and heights[v] > MERGED_BODY_RATIO * med_h:  # med_h 0: flat bodies
            warnings.append(f"body V{ORDINAL_VERTEBRA_START + rank} is "
                            f"{heights[v] / med_h:.1f}x the median height: it may be two "
                            "merged bodies")
    return out, warnings


def _lateral_fragments(inst: np.ndarray, keep: list[int], classes: LabelVolume,
                       s_pos: dict[int, float]) -> list[int]:
    """Instances that do not reach the column's mid-sagittal plane (:data:`MIDLINE_TOLERANCE_MM`).

    Parameters
    ----------
    inst : (I, J, K) int ndarray
        Instance ids on ``classes``' grid.
    keep : list of int
        Instances to check.
    classes : LabelVolume
        The grid (affine) of ``inst``.
    s_pos : dict of int to float
        S-I position (mm) of each instance's centroid.

    Returns
    -------
    list of int
        The lateral fragments. On a single sagittal slice every instance crosses the midline.
    """
    from mskmri.measure._geometry import RIGHT, voxel_half_extent

    half = voxel_half_extent(classes.affine, RIGHT)
    lr: dict[int, np.ndarray] = {
        v: classes.voxel_to_world(np.argwhere(inst == v)) @ RIGHT for v in keep}
    lateral = []
    for v in keep:
        near = [u for u in keep if abs(s_pos[u] - s_pos[v]) <= COLUMN_WINDOW_MM]
        cents = np.array([float(lr[u].mean()) for u in near])
        weights = np.array([float(lr[u].size) for u in near])
        order = np.argsort(cents)
        cum = np.cumsum(weights[order])
        midline = float(cents[order][np.searchsorted(cum, 0.5 * cum[-1])])
        lo, hi = float(lr[v].min()) - half, float(lr[v].max()) + half
        if midline < lo - MIDLINE_TOLERANCE_MM or midline > hi + MIDLINE_TOLERANCE_MM:
            lateral.append(v)
    return lateral


def c2_anchor(out: np.ndarray, ids: list[int], classes: LabelVolume) -> str | None:
    """Why the top body cannot be taken as C2, or None when it can (see :data:`C2_HEIGHT_RATIO`).

    Parameters
    ----------
    out : (I, J, K) int ndarray
        Ordinal body ids (numbered from the top) on ``classes``' grid.
    ids : list of int
        The ordinal ids present, top first.
    classes : LabelVolume
        Network classes (discs :data:`NET_DISC` are looked at above the top body).
    """
    if len(ids) < C2_MIN_BODIES:
        return f"fewer than {C2_MIN_BODIES} bodies in view for the C2 rule"
    if len(ids) > VERTEBRA_ID["L5"] - VERTEBRA_ID["C2"] + 1:
        return "more bodies than levels from C2 to L5"
    top = np.argwhere(out == ids[0])
    shape = out.shape
    if any(bool(np.any((top[:, a] == 0) | (top[:, a] == shape[a] - 1)))
           for a in range(3) if shape[a] > 1):
        return C2_EDGE_REASON
    heights = []
    for v in ids:
        zs = classes.voxel_to_world(np.argwhere(out == v)) @ SUPERIOR
        heights.append(float(zs.max() - zs.min()))
    med = float(np.median(heights[1:]))
    if heights[0] < C2_HEIGHT_RATIO * med:
        return (f"the top body is {heights[0] / med:.1f}x the median height of the others "
                f"(C2 with its dens: >= {C2_HEIGHT_RATIO})")
    top_w = classes.voxel_to_world(top)
    top_s, top_c = float((top_w @ SUPERIOR).max()), top_w.mean(axis=0)
    lab, keep = _components(np.asarray(classes.array) == NET_DISC, float(np.prod(classes.spacing)))
    for comp in keep:
        c = classes.voxel_to_world(np.argwhere(lab == comp)).mean(axis=0)
        d = c - top_c
        off = float(np.linalg.norm(d - (d @ SUPERIOR) * SUPERIOR))
        if float(c @ SUPERIOR) > top_s and off <= COLUMN_MAX_OFFSET_MM:
            return "a disc lies above the top body (a vertebra above it is in view)"
    return None


def assign_levels(classes: LabelVolume) -> tuple[LabelVolume, str, list[str]]:
    """Instances and levels from a body/sacrum class map (see the module docstring).

    Parameters
    ----------
    classes : LabelVolume
        Values :data:`NET_BODY` (any vertebral body) and :data:`NET_SACRUM` (other network
        classes are looked at for the C2 rule only), known geometry.

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

    def rename(first_id: int, from_top: bool) -> np.ndarray:
        renamed = np.zeros_like(out)
        order = ids if from_top else list(reversed(ids))
        for rank, v in enumerate(order):
            renamed[out == v] = first_id + rank if from_top else first_id - rank
        return np.where(np.isin(out, ids), renamed, out)

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
                out = rename(VERTEBRA_ID["L5"], from_top=False)
                source = LEVEL_SOURCE_ANATOMY
    if source == LEVEL_SOURCE_ORDINAL:
        c2_reason = c2_anchor(out, ids, classes)
        if c2_reason == C2_EDGE_REASON and len(ids) > 1 and c2_anchor(out, ids[1:], classes) is None:
            # a region cut by the image edge right above a C2-like body with no disc between
            # is not a vertebral body (C1 has none; skull base): it is dropped
            out[out == ids[0]] = 0
            warnings.append(f"a body-like region at the image edge above C2 (no disc between: "
                            f"C1 or the skull base) was dropped (was V{ids[0]})")
            ids = ids[1:]
            c2_reason = None
        if c2_reason is None:
            out = rename(VERTEBRA_ID["C2"], from_top=True)
            source = LEVEL_SOURCE_C2
            # C2 is tall because of its dens, not because two bodies merged
            warnings = [w for w in warnings if not w.startswith(f"body V{ids[0]} is ")]
        else:
            reason = f"{reason}; not C2: {c2_reason}"
    if source == LEVEL_SOURCE_ORDINAL:
        warnings.append(f"vertebral levels could not be told ({reason}): bodies have ordinal "
                        "ids from 1000 numbered from the top (V1000, V1001, ...)")
    names = spine_labels_for({int(v) for v in np.unique(out) if v})
    labels = LabelVolume(out, classes.affine, names, schema="spine", meta=dict(classes.meta))
    return labels, source, warnings


def _components(mask: np.ndarray, voxel_mm3: float) -> tuple[np.ndarray, list[int]]:
    """Face-connected components of ``mask`` and the ids of those of at least
    :data:`MIN_SOFT_MM3`."""
    import cc3d

    lab = cc3d.connected_components(mask.astype(np.uint8), connectivity=6)
    counts = np.bincount(lab.ravel())
    keep = [i for i in range(1, len(counts)) if counts[i] * voxel_mm3 >= MIN_SOFT_MM3]
    return lab, keep


def add_soft_tissue(labels: LabelVolume,
                    classes: LabelVolume) -> tuple[LabelVolume, list[str], dict[str, str]]:
    """Add discs (100 + body above), cord (201) and CSF (202) to a body label map.

    Parameters
    ----------
    labels : LabelVolume
        Output of :func:`assign_levels` (bodies, sacrum).
    classes : LabelVolume
        Network classes on the same grid.

    Returns
    -------
    labels : LabelVolume
        With discs, cord and CSF.
    warnings : list of str
    not_segmented : dict of str to str
        Structure -> why it is absent (none predicted, or every part dropped).
    """
    warnings: list[str] = []
    missing: dict[str, str] = {}
    arr = np.asarray(classes.array)
    out = np.asarray(labels.array).astype(np.int32).copy()
    voxel_mm3 = float(np.prod(classes.spacing))
    # ---- discs
    verts = sorted(int(v) for v in np.unique(out) if is_vertebra(int(v)))
    cents = {v: classes.voxel_to_world(np.argwhere(out == v)).mean(axis=0) for v in verts}
    order = sorted((v for v in verts if v != SACRUM_ID), key=lambda v: -float(cents[v] @ SUPERIOR))
    if SACRUM_ID in cents:
        order.append(SACRUM_ID)
    disc_mask = arr == NET_DISC
    if not disc_mask.any():
        missing["discs"] = "the network found no disc in this image"
    else:
        lab, keep = _components(disc_mask, voxel_mm3)
        dropped = 0
        for comp in keep:
            idx = np.argwhere(lab == comp)
            c = classes.voxel_to_world(idx).mean(axis=0)
            s = float(c @ SUPERIOR)
            pair = [(u, w) for u, w in zip(order[:-1], order[1:], strict=True)
                    if float(cents[u] @ SUPERIOR) > s > float(cents[w] @ SUPERIOR)]
            if not pair:
                dropped += 1
                continue
            u, w = pair[0]
            axis = cents[w] - cents[u]
            t = float(np.clip((c - cents[u]) @ axis / max(float(axis @ axis), 1e-9), 0, 1))
            if float(np.linalg.norm(c - (cents[u] + t * axis))) > COLUMN_MAX_OFFSET_MM:
                dropped += 1
                continue
            sel = tuple(idx.T)
            out[sel] = np.where(out[sel] == 0, DISC_OFFSET + u, out[sel])
        if dropped:
            warnings.append(f"{dropped} disc-like region(s) outside the bodies in view or off "
                            "the vertebral column dropped")
        if not any(is_disc(int(v)) for v in np.unique(out)):
            missing["discs"] = ("no disc found lies between two bodies in view "
                                f"({dropped} region(s) dropped)")
    # ---- cord and CSF
    for net, value, name in ((NET_CORD, SPINAL_CORD, "spinal cord"), (NET_CSF, CSF, "CSF")):
        mask = arr == net
        if not mask.any():
            missing[name] = f"the network found no {name} in this image"
            continue
        lab, keep = _components(mask, voxel_mm3)
        counts = np.bincount(lab.ravel())
        big = max((int(counts[i]) for i in keep), default=0)
        keep = [i for i in keep if counts[i] >= MIN_CORD_FRACTION * big]
        if not keep:
            missing[name] = f"every {name} region found is smaller than {MIN_SOFT_MM3:g} mm^3"
            continue
        sel = np.isin(lab, keep) & (out == 0)
        out[sel] = value
    names = spine_labels_for({int(v) for v in np.unique(out) if v})
    return (LabelVolume(out, labels.affine, names, schema="spine", meta=dict(labels.meta)),
            warnings, missing)


# ----------------------------------------------------------------------------- public API
def segment_spine(image: Volume, *, model: str | os.PathLike[str] = DEFAULT_MODEL,
                  device: str = "cpu", bone_ensemble: bool = True,
                  ensemble: bool = True) -> SpineSegmentation:
    """Segment the vertebral bodies, discs, cord and CSF of a sagittal spine MRI.

    Parameters
    ----------
    image : Volume
        Sagittal T1- or T2-weighted image with known geometry (any storage orientation).
    model : str or path
        Registered model name or a ``*.safetensors`` file with its card.
    device : str
        torch device.
    bone_ensemble : bool
        Let the bodies-only partner network named in the card veto whole bone regions
        (:func:`veto_bone`; default; never on a spine whose levels come out from C2). False:
        the model alone.
    ensemble : bool
        Average the class probabilities of the model with those of the networks its card lists
        under :data:`MEMBERS_KEY` (default; the shipped ``spine-seg`` has one, which doubles
        the network time). False: the model's own probabilities.

    Returns
    -------
    SpineSegmentation
        Label map on ``image``'s grid, how levels were named, warnings, timings, and the
        structures not segmented with the reason.

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
    members, member_info = _load_members(str(model), card, device) if ensemble else ([], [])
    bone_net = None
    partner = (getattr(card, "extra", None) or {}).get(BONE_ENSEMBLE_KEY)
    if partner and bone_ensemble:
        from mskmri.nn.registry import resolve_weights

        bone_net, _ = load_model(resolve_weights(str(model))[0].parent / partner, device=device)
    t1 = time.perf_counter()
    import torch

    with torch.no_grad():
        prob = _mean_probabilities([net, *members], norm, can.spacing[0], 2)
        class_vol = LabelVolume(prob.argmax(0).astype(np.uint8), can.affine,
                                dict(sd.NET_CLASSES), schema="custom")
        labels_can, source, warnings = assign_levels(class_vol)
        fused = False
        if bone_net is not None and source != LEVEL_SOURCE_C2:
            # the bodies-only partner was trained on lumbar/lower thoracic exams only: it is
            # not used on a cervical spine (levels from C2),
            other = _class_probabilities(bone_net, norm, can.spacing[0], 2)
            vetoed = LabelVolume(veto_bone(prob, other), can.affine, dict(sd.NET_CLASSES),
                                 schema="custom")
            try:
                got = assign_levels(vetoed)
            except SegmentationError:  # the partner vetoed every body: the model's own map
                got = None
            # nor when its veto is what makes the C2 rule hold (a neck: on the healthy U2AD
            # slice public_3 the veto left an off-column region that became "C3")
            if got is not None and got[1] != LEVEL_SOURCE_C2:
                class_vol, (labels_can, source, warnings) = vetoed, got
                fused = True
    t2 = time.perf_counter()
    labels_can, soft_warnings, missing = add_soft_tissue(labels_can, class_vol)
    warnings += soft_warnings
    labels = labels_can.resample_to(image, order=0)
    assert isinstance(labels, LabelVolume)
    labels.meta = dict(image.meta)
    if not labels.present_values():
        raise SegmentationError("the vertebral bodies found vanished on the input grid; "
                                "is the image very coarse?")
    from mskmri.weights import model_caveat

    caveat = model_caveat(str(model))
    if caveat:
        warnings.append(f"model caveat: {caveat}")
    for w in warnings:
        log.warning("%s", w)
    info = {"model": card.name, "model_sha256": card.sha256,
            "bone_ensemble": partner if fused else None,
            "ensemble_members": member_info or None,
            "canonical_shape": list(can.shape),
            "seconds": {"load": round(t1 - t0, 3), "network": round(t2 - t1, 3),
                        "postprocess": round(time.perf_counter() - t2, 3)}}
    return SpineSegmentation(labels, source, warnings, info, missing)


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


__all__ = ["DEFAULT_MODEL", "LEVEL_SOURCE_ANATOMY", "LEVEL_SOURCE_C2", "LEVEL_SOURCE_ORDINAL",
           "SACRUM_ID", "SegmentationError", "SpineSegmentation", "add_soft_tissue",
           "assign_levels", "c2_anchor", "fuse_bone", "predict_canonical", "segment_spine",
           "segment_spine_file", "veto_bone"]
