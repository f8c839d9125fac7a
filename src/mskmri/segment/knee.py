"""Coarse-to-fine knee segmentation: all 17 classes of the knee schema from one MR image.

Pipeline of :func:`segment_knee` (METHODS.md section 3, issue 3):

1. the image is reoriented (no interpolation) to RAS, so the networks always see the same
   axis order whatever the input's orientation;
2. coarse: it is resampled to :data:`COARSE_SPACING_MM` (isotropic), intensities are
   normalised (:func:`normalise_intensity`), and a small 3-D U-Net labels every class at
   that resolution; the bounding box of its foreground, grown by
   :data:`REGION_MARGIN_MM`, is the knee region (no foreground: a warning, and the whole
   field of view is used);
3. fine: only that region is resampled to :data:`FINE_SPACING_MM` (isotropic, near the
   in-plane resolution of clinical knee sequences) and a second U-Net labels it with the
   sliding-window inferer (:mod:`mskmri.nn.inference`), bf16 autocast by default; each
   fine voxel takes the class with the highest per-class weighted mean of the two
   networks' probabilities (:func:`fuse_probabilities`): the coarse network leads for the
   large classes it sees whole (bones, muscle, fat pad, background, effusion) and the
   ligaments (:data:`COARSE_LED`, :data:`COARSE_WEIGHT_LARGE`), the fine one for cartilage
   and menisci (:data:`COARSE_WEIGHT_THIN`). The earlier label rule (fine labels of the large
   classes kept only where the coarse labels agree, :func:`fuse_with_coarse`) is still
   available (``fusion="labels"``). Each network also sees the left-right mirror of its
   input, and its probabilities are the mean of the two passes (``tta="flip"``, default,
   :func:`flip_averaged_log_probs`);
4. the fine labels are brought back onto the input grid: smoothly (:func:`labels_to_grid`)
   around cartilage and menisci, by nearest neighbour elsewhere; voxels outside the region
   are background;
5. anatomical post-processing on the input grid (:func:`postprocess_knee_labels`): the
   tibial plates and menisci are named medial or lateral by their side of the joint and the
   side of the fibula (:func:`assign_compartments`), then cartilage, menisci, ligaments and
   the patellar tendon drop components smaller than :data:`MIN_COMPONENT_ML`, then each bone
   keeps its largest 3-D connected component (:data:`KEEP_LARGEST_CLASSES`), then each
   cartilage plate keeps only the components that lie on its own bone
   (:data:`CARTILAGE_BONE`, :data:`CARTILAGE_BONE_CONTACT_MM`) and each meniscus only those
   between femur and tibia (:data:`MENISCUS_BONE_CONTACT_MM`); removed voxels take the majority label of their kept neighbours (background when none). What was
   removed is recorded in ``meta["postprocess"]``.

The result is a :class:`~mskmri.volume.LabelVolume` in the input geometry (same shape and
affine), schema ``"knee"``, with warnings (``meta["warnings"]``) when the image looks far
from what the models were trained on. 2-D input is refused.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from mskmri.errors import DimensionError, MskMriError
from mskmri.labels import KNEE, KNEE_ID
from mskmri.volume import LabelVolume, Volume

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

log = logging.getLogger(__name__)

#: Axis codes every network input is reoriented to (no interpolation).
CANONICAL_AXES = "RAS"
#: Voxel spacing of the coarse model's input, mm (isotropic).
COARSE_SPACING_MM = (2.0, 2.0, 2.0)
#: Voxel spacing of the fine model's input, mm (isotropic).
FINE_SPACING_MM = (0.8, 0.8, 0.8)
#: Intensity percentiles mapped to 0 and 1 by :func:`normalise_intensity`.
NORM_PERCENTILES = (0.5, 99.5)
#: Every n-th voxel per axis is used to estimate the percentiles (speed).
NORM_STRIDE = 2
#: Normalised intensities are clipped to this range.
NORM_CLIP = (-0.5, 2.0)
#: Margin added around the coarse foreground's bounding box, mm.
REGION_MARGIN_MM = 12.0
#: Fewer coarse femur+tibia voxels than this volume (mL) means "no knee found".
MIN_KNEE_BONE_ML = 20.0
#: A field of view smaller than this along any axis (mm) is far outside training.
MIN_FOV_MM = 40.0
#: A voxel spacing coarser than this (mm) along any axis is far outside training.
MAX_SPACING_MM = 6.0
#: Classes whose neighbourhood is brought back to the input grid by smooth label
#: resampling (:func:`labels_to_grid`) instead of nearest neighbour: on an OAI map, a
#: 0.8 mm round trip costs cartilage 0.13 Dice with nearest neighbour, 0.10 smoothly.
SMOOTH_CLASSES = ("femoral_cartilage", "medial_tibial_cartilage", "lateral_tibial_cartilage",
                  "patellar_cartilage", "medial_meniscus", "lateral_meniscus")
#: Margin around the thin classes' bounding box that is resampled smoothly, mm.
SMOOTH_MARGIN_MM = 4.0
#: Label fusion (``fusion="labels"``): classes of the fine network that must be confirmed by
#: the coarse network: a fine voxel of one of these classes is kept only where the coarse
#: labels hold the same class within :data:`FUSION_TOLERANCE_MM`, otherwise it takes the coarse
#: label. The fine network sees 38 mm windows and confuses large homogeneous tissues far from
#: the joint (muscle vs marrow, femoral vs tibial shaft) that the coarse one, seeing the whole
#: knee, separates; thin classes (cartilage, menisci, ligaments, effusion) are the fine
#: network's alone.
FUSION_CHECKED = ("background", "femur", "tibia", "patella", "fibula", "muscle",
                  "infrapatellar_fat_pad")
#: Distance within which the coarse labels must confirm a checked fine class, mm (rounded to
#: whole coarse voxels of 2 mm: 0, 2 and 4 mm are the distinct choices). 0: the coarse label at
#: the voxel itself must agree. The fine network labels the dark cortex of the femoral and
#: tibial shafts as background and never predicts the fibula, so with a tolerance a
#: "background" rim up to that width was cut from every bone. Tuning set (the 6 renders of
#: :data:`MIN_CARTILAGE_ML`, the models shipped then, every post-processing pass on): bones
#: Dice 0.795 with 4 mm, 0.848 with 2 mm, 0.866 with 0 mm (femur 0.890 -> 0.938, fibula 0.53 ->
#: 0.69); cartilage 0.611 -> 0.651 (plates on a whole bone pass the contact rule); menisci
#: unchanged. A tolerance for the other classes only, with 0 for background, scored the same
#: (0.867 with 2 mm), so one value is kept.
FUSION_TOLERANCE_MM = 0.0
#: How the coarse and fine outputs are combined: ``"probabilities"`` (default,
#: :func:`fuse_probabilities`) or ``"labels"`` (:func:`fuse_with_coarse`, the earlier rule,
#: kept to reproduce earlier results).
FUSION_MODES = ("probabilities", "labels")
DEFAULT_FUSION = "probabilities"
#: Classes whose fused probability leans on the coarse network (weight
#: :data:`COARSE_WEIGHT_LARGE`): those it sees whole and the fine network confuses or misses
#: (:data:`FUSION_CHECKED`: bones, background, muscle, fat pad; the fine network's own
#: fibula Dice is 0.26 against the coarse one's 0.89 on the validation renders), joint
#: effusion (0.30 vs 0.56), and the ligaments and patellar tendon (tuning renders:
#: Dice 0.665 -> 0.734 with them here). Cartilage and menisci use :data:`COARSE_WEIGHT_THIN`.
COARSE_LED = FUSION_CHECKED + ("joint_effusion", "anterior_cruciate_ligament",
                               "posterior_cruciate_ligament", "collateral_ligaments",
                               "patellar_tendon")
#: Coarse weights of :func:`fuse_probabilities`, chosen on the tuning renders (6 renders of
#: two validation subjects that are not the benchmark's held-out maps, the models shipped
#: with them):
#: mean Dice of bones / cartilage / menisci 0.7725 with (0.6, 0.3) (0.913 / 0.735 / 0.670),
#: 0.7706 with (0.5, 0.3), 0.7699 with (0.7, 0.3), 0.7659 with (0.8, 0.3), 0.7698 with
#: (0.6, 0.2), 0.7715 with (0.6, 0.4); the label rule :func:`fuse_with_coarse` 0.7400
#: (0.903 / 0.693 / 0.624).
COARSE_WEIGHT_LARGE = 0.6
COARSE_WEIGHT_THIN = 0.3
#: Fine-grid slices fused at a time (bounds the extra memory to a few slices of class maps).
FUSION_SLAB = 8
#: Test-time augmentation (``tta=``): ``"flip"`` (default) runs each network on the image and
#: on its left-right mirror (both networks were trained with left-right flips) and averages
#: the class probabilities (:func:`flip_averaged_log_probs`); ``"none"`` runs each once.
#: Tuning renders (the 6 of :data:`COARSE_WEIGHT_LARGE`, the shipped models, probability
#: fusion): mean Dice of bones / cartilage / menisci 0.7724 without, 0.7783 with both networks
#: averaged (0.913 -> 0.921 / 0.735 -> 0.736 / 0.670 -> 0.678; higher on 6 of 6 renders),
#: 0.7764 with the coarse network alone averaged, 0.7741 with the fine one alone. The fusion
#: weights stay the best pair with it: (0.5, 0.3) 0.7756, (0.7, 0.3) 0.7763, (0.6, 0.2) 0.7749,
#: (0.6, 0.4) 0.7779.
TTA_MODES = ("none", "flip")
DEFAULT_TTA = "flip"
#: Classes kept as their largest 3-D connected component by :func:`postprocess_knee_labels`:
#: each bone is one rigid body, so a piece of its label detached from the main body is a
#: false positive (a marrow-like patch in muscle, a speck of "femur" inside the tibia).
KEEP_LARGEST_CLASSES: tuple[str, ...] = ("femur", "tibia", "patella", "fibula")
#: Smallest connected component (mL) of each cartilage plate kept by
#: :func:`postprocess_knee_labels`. Adult knees: femoral cartilage 10-20 mL, each tibial plate
#: 1.5-3 mL, patellar cartilage 3-4 mL, 1.5-3 mm thick. 0.05 mL (50 mm^3, a 5 x 5 x 2 mm patch)
#: is far below any plate and below a remnant worth a thickness measurement, so only
#: isolated specks go. (Tuning set: 6 renders of two validation subjects, never trained on
#: and not the benchmark's test maps: cartilage Dice 0.222 -> 0.229; larger minima score
#: higher with this under-trained model, 0.2 mL 0.250, but would start to drop real remnants
#: of thinned OA cartilage, so they are not used.)
MIN_CARTILAGE_ML = 0.05
#: Smallest component (mL) of each meniscus kept: 0, none is dropped with the shipped model.
#: Menisci are 2-3 mL each (a horn ~0.3 mL), so anatomy alone would allow ~0.05 mL, but the
#: shipped model predicts them as small pieces that partly lie on the true meniscus: on the
#: tuning renders every minimum tried lowered the menisci Dice (0.0005 mL: 0.1095 -> 0.1094,
#: 0.002 mL: 0.1092, 0.05 mL: 0.107; a held-out benchmark run made with 0.002 mL showed the
#: same, 0.111 -> 0.110). Their components are still counted in the record. Tune it again,
#: on validation renders, for a model whose menisci come out whole.
MIN_MENISCUS_ML = 0.0
#: Smallest component (mL) of each ligament / the patellar tendon kept: 0, for the same reason
#: as :data:`MIN_MENISCUS_ML` (anatomy: ACL, PCL 1.5-3 mL, MCL 1-2 mL, LCL ~0.5 mL, patellar
#: tendon 3-6 mL; tuning renders: PCL Dice 0.0109 -> 0.0108 with 0.0005 mL, 0.0078 with
#: 0.05 mL).
MIN_LIGAMENT_ML = 0.0
#: Smallest component (mL) kept per thin structure by :func:`postprocess_knee_labels`.
MIN_COMPONENT_ML: dict[str, float] = {
    **dict.fromkeys(("femoral_cartilage", "medial_tibial_cartilage", "lateral_tibial_cartilage",
                     "patellar_cartilage"), MIN_CARTILAGE_ML),
    **dict.fromkeys(("medial_meniscus", "lateral_meniscus"), MIN_MENISCUS_ML),
    **dict.fromkeys(("anterior_cruciate_ligament", "posterior_cruciate_ligament",
                     "collateral_ligaments", "patellar_tendon"), MIN_LIGAMENT_ML)}
#: Cartilage plate -> the bone it lies on, for the contact rule of
#: :func:`postprocess_knee_labels` (:func:`remove_cartilage_off_bone`). Articular cartilage covers
#: the ends of its bone: a piece of a plate's label that touches nowhere its own bone (a
#: "femoral cartilage" patch in the quadriceps, a "tibial cartilage" speck 6 cm down the
#: shaft) is a false positive however large it is, and such far pieces are what make the
#: cartilage HD95 60-90 mm and slow the thickness measurement.
CARTILAGE_BONE: dict[str, str] = {
    "femoral_cartilage": "femur", "medial_tibial_cartilage": "tibia",
    "lateral_tibial_cartilage": "tibia", "patellar_cartilage": "patella"}
#: Largest gap (mm) between a cartilage component and its bone for the component to count
#: as lying on it: the shortest distance between the voxels (as boxes) of the two, so
#: face-, edge- and corner-neighbours are in contact (gap 0) at any spacing, and a component
#: whose nearest voxel is separated from the bone by up to 1 mm of other labels (a thin layer
#: of another tissue, a partial-volume boundary voxel) still counts. 1 mm is below the
#: thickness of any plate (1.5-3 mm) and far below the distances of the false pieces
#: (centimetres). Tuning set (the 6 validation renders of :data:`MIN_CARTILAGE_ML`, raw
#: outputs of the shipped model, the other passes on): cartilage group Dice 0.228 without
#: the rule, 0.2687 with 0, 0.5 or 1 mm, 0.2670 with 2 mm, 0.2658 with 5 mm; femoral
#: cartilage HD95 57.9 -> 18.8 mm (1 mm), tibial plates 87 / 71 -> 42 / 46 mm.
CARTILAGE_BONE_CONTACT_MM = 1.0
#: Medial / lateral pairs relabelled by anatomy (:func:`assign_compartments`): the tibial
#: plates and the menisci.
COMPARTMENT_PAIRS: tuple[tuple[str, str], ...] = (
    ("medial_tibial_cartilage", "lateral_tibial_cartilage"),
    ("medial_meniscus", "lateral_meniscus"))
#: Fewest millilitres of tibial plates + menisci (both sides together) for the compartment
#: split to run; below, the network's own medial / lateral labels are kept.
COMPARTMENT_MIN_ML = 0.5
#: Smallest distance (mm) between the two compartments' centres along the left-right axis
#: for the split to count as two compartments (adult tibial plateaus: the plates' centres lie
#: 35-45 mm apart; on the tuning renders 43-57 mm); below, the labels are left alone.
COMPARTMENT_MIN_SEPARATION_MM = 20.0
#: Each compartment must hold at least this share of the voxels split.
COMPARTMENT_MIN_SHARE = 0.1
#: Height (mm) of the top slab of the tibia whose median left-right position starts the split.
COMPARTMENT_TIBIA_SLAB_MM = 15.0
#: Smallest predicted fibula (mL, largest component) that names the lateral side; with less
#: (fibula outside the field of view, or not found) the network's own votes decide.
COMPARTMENT_MIN_FIBULA_ML = 1.0
#: Largest gap (mm) between a meniscus component and each of femur and tibia for it to count
#: as lying in the joint (:func:`remove_menisci_off_joint`). A meniscus sits on the tibial
#: plateau's rim and meets the femoral condyle's cartilage (1.5-3 mm thick), so its gap to
#: either bone is a few millimetres at most (true menisci on the tuning renders: 0-2.2 mm);
#: false pieces lay 8-90 mm from one of them. Tuning set (5 renders of the two validation
#: subjects of :data:`MIN_CARTILAGE_ML`, shipped models, the other passes on): menisci Dice
#: 0.556 without the rule, 0.594 with 2-3 mm, 0.593 with 4-5 mm, 0.591 with 6-8 mm: a flat
#: optimum, so the generous 4 mm is used.
MENISCUS_BONE_CONTACT_MM = 4.0
#: The bones a meniscus component must come near (all of them).
MENISCUS_BONES: tuple[str, ...] = ("femur", "tibia")
#: Connectivity of the bone components of the post-processing: 6 (face neighbours only), so
#: the bone kept is one piece under any connectivity, as the segmentation benchmark and a
#: surface mesh count pieces (with 26, a largest component still held 14-31 face-connected
#: pieces per bone on the tuning renders, joined only at edges and corners; same Dice).
BONE_CONNECTIVITY = 6
#: Connectivity of the thin-structure components (26: face, edge or corner neighbours), so
#: that a thin sheet sampled obliquely is not cut into "small pieces" and dropped.
THIN_CONNECTIVITY = 26
#: A bone that loses more than this fraction of its voxels to post-processing is reported
#: in the warnings (the model's output is fragmented there).
BONE_REMOVED_WARN_FRACTION = 0.05
#: Number of output classes (background + the 17 knee classes).
N_CLASSES = len(KNEE) + 1
#: Names of the shipped models.
COARSE_MODEL = "knee-seg-coarse"
FINE_MODEL = "knee-seg-fine"


class KneeSegmentationError(MskMriError):
    """The knee segmenter cannot run on this input (2-D image, no geometry, bad options)."""


# ============================================================================ preprocessing
def normalise_intensity(array: np.ndarray, reference: np.ndarray | None = None,
                        percentiles: Sequence[float] = NORM_PERCENTILES) -> np.ndarray:
    """Map intensities so the low/high percentiles of ``reference`` become 0 and 1.

    Parameters
    ----------
    array : ndarray
        Image to normalise (any shape).
    reference : ndarray, optional
        Where the percentiles are taken (default ``array``); pass the coarse image when
        normalising a fine crop so that both models see the same scale.
    percentiles : (float, float)

    Returns
    -------
    float32 ndarray, same shape, clipped to :data:`NORM_CLIP`.
    """
    ref = array if reference is None else reference
    sample = np.asarray(ref)[(slice(None, None, NORM_STRIDE),) * np.ndim(ref)]
    lo, hi = np.percentile(sample, percentiles)
    scale = 1.0 / max(float(hi - lo), 1e-6)
    out = (np.asarray(array, dtype=np.float32) - np.float32(lo)) * np.float32(scale)
    return np.clip(out, *NORM_CLIP, out=out)


def canonical(image: Volume) -> Volume:
    """``image`` reoriented to :data:`CANONICAL_AXES` (axis permutation and flips only)."""
    return image.reorient(CANONICAL_AXES)


def grid_at_spacing(image: Volume, spacing: Sequence[float],
                    box: Sequence[slice] | None = None) -> tuple[tuple[int, ...], np.ndarray]:
    """A grid with ``spacing`` (mm) covering ``image`` (or the voxel ``box`` of it).

    The grid keeps the direction cosines of ``image`` and the outer corner of the first
    voxel of the covered part.

    Returns
    -------
    shape : tuple of int
    affine : (4, 4) ndarray
    """
    box = box or tuple(slice(0, n) for n in image.shape)
    start = np.array([b.start for b in box], dtype=np.float64)
    size = np.array([b.stop - b.start for b in box], dtype=np.float64)
    old = np.asarray(image.spacing)
    new = np.asarray(spacing, dtype=np.float64)
    shape = tuple(int(v) for v in np.maximum(1, np.round(size * old / new)))
    corner = image.voxel_to_world([start - 0.5])[0]
    aff = np.eye(4)
    aff[:3, :3] = image.direction * new[None, :]
    aff[:3, 3] = corner + aff[:3, :3] @ np.full(3, 0.5)
    return shape, aff


def labels_to_grid(labels: np.ndarray, src_affine: np.ndarray, shape: Sequence[int],
                   dst_affine: np.ndarray) -> np.ndarray:
    """Resample a label array by linear interpolation of each class's indicator + arg-max.

    Smoother than nearest neighbour when the destination grid is finer than the source:
    a thin structure (cartilage, 2-3 voxels at 0.8 mm) keeps its sub-voxel boundary instead
    of a staircase. Each class is interpolated only inside its bounding box (grown by one
    source voxel). Grids must share their axis directions (an axis-aligned mapping, as
    between the fine grid and the canonical image); otherwise nearest neighbour is used.

    Parameters
    ----------
    labels : (I, J, K) integer ndarray
        Source labels (< 256 classes).
    src_affine, dst_affine : (4, 4) ndarray
        Voxel -> world (mm) of the source and of the destination grid.
    shape : (int, int, int)
        Destination shape.

    Returns
    -------
    uint8 ndarray of ``shape``; 0 outside the source grid.
    """
    from scipy import ndimage

    mapping = np.linalg.inv(src_affine) @ np.asarray(dst_affine, dtype=np.float64)
    lin, offset = mapping[:3, :3], mapping[:3, 3]
    scale = np.diag(lin).copy()
    if not (np.allclose(lin, np.diag(scale), atol=1e-6) and np.all(scale > 0)):
        return LabelVolume(labels.astype(np.uint8), src_affine).resample_to_grid(
            shape, dst_affine, order=0, cval=0).array.astype(np.uint8)
    out = np.zeros(tuple(shape), np.uint8)
    best = np.zeros(tuple(shape), np.float32)
    counts = np.bincount(labels.ravel().astype(np.int64))
    for c in np.flatnonzero(counts):
        ind = labels == c
        box = ndimage.find_objects(ind.astype(np.uint8))[0]
        lo = np.array([max(b.start - 1, 0) for b in box])
        hi = np.array([min(b.stop + 1, n) for b, n in zip(box, labels.shape, strict=True)])
        # destination indices whose source position falls in [lo - 0.5, hi - 0.5]
        d_lo = np.maximum(np.floor((lo - 0.5 - offset) / scale), 0).astype(int)
        d_hi = np.minimum(np.ceil((hi - 0.5 - offset) / scale) + 1, shape).astype(int)
        if np.any(d_hi <= d_lo):
            continue
        sub = ind[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))].astype(np.float32)
        p = ndimage.affine_transform(sub, scale, offset=offset + scale * d_lo - lo,
                                     output_shape=tuple(d_hi - d_lo), order=1,
                                     mode="grid-constant", cval=0.0, prefilter=False)
        region = tuple(slice(a, b) for a, b in zip(d_lo, d_hi, strict=True))
        b_view, o_view = best[region], out[region]
        win = p > b_view
        b_view[win] = p[win]
        o_view[win] = c
    return out


def fuse_with_coarse(flab: np.ndarray, faff: np.ndarray, clab: np.ndarray, caff: np.ndarray,
                     tolerance_mm: float = FUSION_TOLERANCE_MM) -> np.ndarray:
    """Fine labels where the coarse labels confirm them, coarse labels elsewhere.

    A fine voxel whose class is in :data:`FUSION_CHECKED` is kept when the coarse map holds
    that class within ``tolerance_mm`` (a dilation on the coarse grid); otherwise the voxel
    takes the coarse label at its position (nearest coarse voxel). Other classes are kept.
    Grids that are not axis-aligned with each other are returned unchanged.

    Parameters
    ----------
    flab : (I, J, K) uint8 ndarray
        Fine labels on the grid ``faff``.
    faff, caff : (4, 4) ndarray
        Voxel -> world (mm) of the fine and coarse grids.
    clab : (P, Q, R) uint8 ndarray
        Coarse labels on the grid ``caff``.
    tolerance_mm : float

    Returns
    -------
    uint8 ndarray, shape of ``flab``.
    """
    from scipy import ndimage

    mapping = np.linalg.inv(caff) @ np.asarray(faff, dtype=np.float64)
    lin = mapping[:3, :3]
    scale = np.diag(lin)
    if not np.allclose(lin, np.diag(scale), atol=1e-6):
        return flab
    cspacing = np.linalg.norm(np.asarray(caff)[:3, :3], axis=0)
    steps = max(int(round(tolerance_mm / float(cspacing.min()))), 0)
    allowed = np.ones((N_CLASSES, *clab.shape), dtype=bool)
    for name in FUSION_CHECKED:
        c = 0 if name == "background" else KNEE_ID[name]
        mask = clab == c
        allowed[c] = ndimage.binary_dilation(mask, iterations=steps) if steps and mask.any() \
            else mask
    idx = [np.clip(np.rint(scale[a] * np.arange(flab.shape[a]) + mapping[a, 3]), 0,
                   clab.shape[a] - 1).astype(np.intp) for a in range(3)]
    ii, jj, kk = idx[0][:, None, None], idx[1][None, :, None], idx[2][None, None, :]
    ok = allowed[flab.astype(np.intp), ii, jj, kk]
    return np.where(ok, flab, clab[ii, jj, kk]).astype(np.uint8)


def coarse_weight_vector(large: float = COARSE_WEIGHT_LARGE,
                         thin: float = COARSE_WEIGHT_THIN) -> np.ndarray:
    """Per-class weight of the coarse network in :func:`fuse_probabilities`.

    Returns
    -------
    (N_CLASSES,) float32 ndarray
        ``large`` for :data:`COARSE_LED` (background at index 0), ``thin`` for the others.
    """
    for name, value in (("large", large), ("thin", thin)):
        if not (np.isfinite(value) and 0.0 <= value <= 1.0):
            raise KneeSegmentationError(f"the coarse weight ({name}) must lie in [0, 1], "
                                        f"not {value!r}")
    weights = np.full(N_CLASSES, thin, dtype=np.float32)
    for name in COARSE_LED:
        weights[0 if name == "background" else KNEE_ID[name]] = large
    return weights


def fuse_probabilities(flog: np.ndarray, faff: np.ndarray, clog: np.ndarray, caff: np.ndarray,
                       weights: np.ndarray | None = None, *, slab: int = FUSION_SLAB
                       ) -> np.ndarray:
    """Labels from a per-class weighted mean of the fine and coarse class probabilities.

    The coarse logits are sampled (trilinear, edge values outside) at every fine voxel
    centre; both are turned into probabilities (softmax over classes) and class ``k`` scores
    ``w[k] * p_coarse[k] + (1 - w[k]) * p_fine[k]``; the label is the best-scoring class.
    Works a few fine slices at a time (:data:`FUSION_SLAB`), so no full-size copy of either
    map is made.

    Parameters
    ----------
    flog : (K, I, J, L) float ndarray
        Fine logits on the grid ``faff`` (any memory layout, e.g. the inferer's accumulator).
    faff, caff : (4, 4) ndarray
        Voxel -> world (mm) of the fine and coarse grids (any relative orientation).
    clog : (K, P, Q, R) float ndarray
        Coarse logits on the grid ``caff``.
    weights : (K,) ndarray, optional
        Coarse weight per class in [0, 1]; :func:`coarse_weight_vector` when omitted.
    slab : int
        Fine slices (first axis) per step.

    Returns
    -------
    (I, J, L) uint8 ndarray
    """
    import torch

    n_cls = flog.shape[0]
    if clog.shape[0] != n_cls:
        raise KneeSegmentationError(f"the coarse and fine networks give {clog.shape[0]} and "
                                    f"{n_cls} classes; they must be a matching pair")
    w = coarse_weight_vector() if weights is None else np.asarray(weights, dtype=np.float32)
    wt = torch.from_numpy(w.reshape(n_cls, 1, 1, 1).copy())
    coarse = torch.from_numpy(np.ascontiguousarray(clog, dtype=np.float32))
    mapping = np.linalg.inv(np.asarray(caff, dtype=np.float64)) @ np.asarray(faff, np.float64)
    fshape = tuple(int(n) for n in flog.shape[1:])
    sample = _axis_aligned_sampler(coarse, mapping, fshape) \
        if np.allclose(mapping[:3, :3], np.diag(np.diag(mapping[:3, :3])), atol=1e-6) \
        else _grid_sampler(coarse, mapping, fshape)
    out = np.empty(fshape, dtype=np.uint8)
    with torch.inference_mode():
        for z0 in range(0, fshape[0], slab):
            z1 = min(z0 + slab, fshape[0])
            pc = sample(z0, z1).softmax(0)
            pf = torch.from_numpy(np.asarray(flog[:, z0:z1])).float().softmax(0)
            out[z0:z1] = _argmax_classes(torch.lerp(pf, pc, wt)).numpy()
    return out


def flip_averaged_log_probs(logits_of: Any, x: np.ndarray, *, slab: int = FUSION_SLAB
                            ) -> np.ndarray:
    """Log of the mean class probabilities of ``x`` and of its mirror along axis 0.

    Parameters
    ----------
    logits_of : callable
        ``logits_of(x, copy)`` -> (K, *S) float32 logits of the (*S) input ``x``;
        ``copy=False`` may return a view that the next call overwrites.
    x : (I, J, L) ndarray
        Network input; axis 0 is left-right in the canonical (RAS) grid.
    slab : int
        Slices (first spatial axis) combined per step.

    Returns
    -------
    (K, I, J, L) float32 ndarray
        ``log((softmax(f(x)) + flip(softmax(f(flip(x))))) / 2)``, a valid input wherever
        logits are expected (its softmax is the mean probability).
    """
    import torch

    out = torch.from_numpy(np.ascontiguousarray(logits_of(x, True), dtype=np.float32))
    mirrored = logits_of(np.ascontiguousarray(x[::-1]), False)
    n = out.shape[1]
    with torch.inference_mode():
        for z0 in range(0, n, slab):
            z1 = min(z0 + slab, n)
            p = out[:, z0:z1].softmax(0)
            q = torch.from_numpy(np.asarray(mirrored[:, n - z1:n - z0])).float().flip(1)
            out[:, z0:z1] = p.add_(q.softmax(0)).mul_(0.5).clamp_min_(1e-12).log_()
    return out.numpy()


def _argmax_classes(score: Any) -> Any:
    """Arg-max over the first axis of a (K, ...) tensor as uint8, one class at a time (an
    arg-max across the slowest axis reads memory out of order: 4x slower here)."""
    import torch

    best = score[0].clone()
    lab = torch.zeros(best.shape, dtype=torch.uint8)
    for k in range(1, score.shape[0]):
        better = score[k] > best
        lab.masked_fill_(better, k)
        torch.maximum(best, score[k], out=best)
    return lab


def _linear_taps(n_out: int, scale: float, offset: float, n_in: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Lower neighbour index and weight of the upper one, for linear interpolation at
    ``scale * i + offset`` (i < ``n_out``) on ``n_in`` samples, clamped to the edges."""
    x = np.clip(scale * np.arange(n_out) + offset, 0.0, n_in - 1.0)
    i0 = np.minimum(np.floor(x).astype(np.intp), max(n_in - 2, 0))
    return i0, (x - i0).astype(np.float32)


def _axis_aligned_sampler(coarse: Any, mapping: np.ndarray, fshape: tuple[int, ...]) -> Any:
    """``sample(z0, z1)``: coarse logits (K, z1 - z0, J, L) trilinearly at fine slices z0:z1,
    for grids whose axes are parallel (separable: one axis at a time, on the few coarse
    slices a slab needs)."""
    import torch

    taps = [_linear_taps(fshape[a], float(mapping[a, a]), float(mapping[a, 3]),
                         int(coarse.shape[a + 1])) for a in range(3)]

    def along(t: Any, axis: int, i0: np.ndarray, frac: np.ndarray) -> Any:
        lo_i = torch.from_numpy(i0)
        hi_i = torch.from_numpy(np.minimum(i0 + 1, t.shape[axis] - 1))
        shape = [1] * t.ndim
        shape[axis] = len(i0)
        f = torch.from_numpy(frac).reshape(shape)
        return torch.lerp(t.index_select(axis, lo_i), t.index_select(axis, hi_i), f)

    def sample(z0: int, z1: int) -> Any:
        i0, frac = taps[0][0][z0:z1], taps[0][1][z0:z1]
        lo, hi = int(i0.min()), min(int(i0.max()) + 2, int(coarse.shape[1]))
        sub = coarse[:, lo:hi]
        sub = along(sub, 2, *taps[1])
        sub = along(sub, 3, *taps[2])
        return along(sub, 1, i0 - lo, frac)

    return sample


def _grid_sampler(coarse: Any, mapping: np.ndarray, fshape: tuple[int, ...]) -> Any:
    """``sample(z0, z1)`` for grids at any relative orientation (``grid_sample``)."""
    import torch
    import torch.nn.functional as F

    # grid_sample wants (x, y, z) = (last, middle, first) axis in [-1, 1] (align_corners)
    half = np.maximum(np.array(coarse.shape[1:], dtype=np.float64) - 1.0, 1.0) / 2.0
    lin = (mapping[:3, :3] / half[:, None])[::-1]
    off = (mapping[:3, 3] / half - 1.0)[::-1]
    jj, kk = np.meshgrid(np.arange(fshape[1]), np.arange(fshape[2]), indexing="ij")
    plane = (jj[..., None] * lin[:, 1] + kk[..., None] * lin[:, 2] + off).astype(np.float32)

    def sample(z0: int, z1: int) -> Any:
        zs = np.arange(z0, z1, dtype=np.float32)[:, None, None, None] * \
            lin[:, 0].astype(np.float32)
        grid = torch.from_numpy(plane[None] + zs)[None]
        return F.grid_sample(coarse[None], grid, mode="bilinear", padding_mode="border",
                             align_corners=True)[0]

    return sample


def _fine_to_input(flab: np.ndarray, faff: np.ndarray, can: Volume, image: Volume) -> LabelVolume:
    """Fine labels on the input grid: nearest neighbour, smooth around the joint.

    Around the thin classes (:data:`SMOOTH_CLASSES`, grown by :data:`SMOOTH_MARGIN_MM`) the
    labels are resampled with :func:`labels_to_grid` on the canonical grid; elsewhere by
    nearest neighbour. The canonical result is reoriented (no interpolation) to the input's
    axes.
    """
    import nibabel.orientations as nio
    from scipy import ndimage

    fine = LabelVolume(flab, faff, dict(KNEE), schema="knee")
    out_can = fine.resample_to_grid(can.shape, can.affine, order=0, cval=0).array
    thin = np.isin(flab, [KNEE_ID[n] for n in SMOOTH_CLASSES])
    if thin.any():
        box = ndimage.find_objects(thin.astype(np.uint8))[0]
        grow = int(np.ceil(SMOOTH_MARGIN_MM / float(np.min(fine.spacing))))
        lo = np.array([max(b.start - grow, 0) for b in box])
        hi = np.array([min(b.stop + grow, n) for b, n in zip(box, flab.shape, strict=True)])
        sub = flab[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        sub_aff = faff.copy()
        sub_aff[:3, 3] = faff[:3, :3] @ lo + faff[:3, 3]
        # canonical voxels whose centres lie one fine voxel inside the crop (no edge effect)
        corners = np.array([[a, b, c] for a in (lo[0] + 1, hi[0] - 2) for b in (lo[1] + 1, hi[1] - 2)
                            for c in (lo[2] + 1, hi[2] - 2)], dtype=np.float64)
        to_can = np.linalg.inv(can.affine) @ faff
        pts = corners @ to_can[:3, :3].T + to_can[:3, 3]
        c_lo = np.maximum(np.ceil(pts.min(0)), 0).astype(int)
        c_hi = np.minimum(np.floor(pts.max(0)) + 1, can.shape).astype(int)
        if np.all(c_hi > c_lo):
            reg_aff = can.affine.copy()
            reg_aff[:3, 3] = can.affine[:3, :3] @ c_lo + can.affine[:3, 3]
            out_can[tuple(slice(a, b) for a, b in zip(c_lo, c_hi, strict=True))] = \
                labels_to_grid(sub, sub_aff, tuple(c_hi - c_lo), reg_aff)
    back = LabelVolume(out_can, can.affine, dict(KNEE), schema="knee").reorient(
        "".join(nio.aff2axcodes(image.affine)))
    if back.shape == image.shape and np.allclose(back.affine, image.affine, atol=1e-4):
        return LabelVolume(back.array, image.affine, dict(KNEE), schema="knee")
    return back.resample_to_grid(image.shape, image.affine, order=0, cval=0)  # type: ignore[return-value]


# ============================================================================ post-processing
#: Connectivity (neighbours of a voxel) -> rank of scipy's generate_binary_structure.
_CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}


def _drop_components(arr: np.ndarray, ids: Sequence[int], connectivity: int,
                     min_voxels: dict[int, float] | None, voxel_ml: float,
                     record: dict[str, dict[str, Any]]) -> np.ndarray:
    """One rule of :func:`postprocess_knee_labels` on ``arr`` (a new array is returned).

    ``min_voxels`` None: each class of ``ids`` keeps its largest component; otherwise each
    class drops the components with fewer voxels than its entry. Removed components take
    the majority label of their kept shell (background when none); ``record`` gets one entry
    per class present.
    """
    found = _class_components(arr, ids, connectivity)
    if found is None:
        return arr.copy()
    comp, counts, comp_class = found
    remove = np.zeros(counts.size, bool)
    for c in ids:
        own = _own(comp_class, c)
        if own.size == 0:
            continue
        if min_voxels is not None:
            remove[own[counts[own] < min_voxels[c]]] = True
        elif own.size > 1:
            remove[own] = True
            remove[own[int(np.argmax(counts[own]))]] = False
    _record_removed(ids, comp_class, counts, remove, voxel_ml, record)
    return _fill_removed(arr, comp, remove, connectivity)


def _class_components(arr: np.ndarray, ids: Sequence[int], connectivity: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Connected components of the classes ``ids`` (each class on its own).

    Returns
    -------
    (comp, counts, comp_class) or None
        Component map (0 = none), voxels per component id and each id's class; None when
        no voxel of ``ids`` is present.
    """
    import cc3d

    if not len(ids):
        return None
    sel = np.where(np.isin(arr, list(ids)), arr, 0).astype(np.uint8, copy=False)
    comp, n = cc3d.connected_components(sel, connectivity=cast(Literal[6, 18, 26], connectivity),
                                        return_N=True)
    if n == 0:
        return None
    flat = comp.ravel()
    counts = np.bincount(flat, minlength=n + 1)
    comp_class = np.zeros(n + 1, np.int64)
    comp_class[flat] = sel.ravel()
    return comp, counts, comp_class


def _own(comp_class: np.ndarray, c: int) -> np.ndarray:
    """Component ids of class ``c``."""
    own = np.flatnonzero(comp_class == c)
    return own[own > 0]


def _record_removed(ids: Sequence[int], comp_class: np.ndarray, counts: np.ndarray,
                    remove: np.ndarray, voxel_ml: float,
                    record: dict[str, dict[str, Any]] | None) -> None:
    """Per class present: components, and components / voxels / mL removed, into ``record``."""
    if record is None:
        return
    for c in ids:
        own = _own(comp_class, c)
        if own.size == 0:
            continue
        gone = own[remove[own]]
        record[KNEE[c]] = {
            "components": int(own.size), "components_removed": int(gone.size),
            "voxels_removed": int(counts[gone].sum()),
            "ml_removed": round(float(counts[gone].sum() * voxel_ml), 4),
            "ml_before": round(float(counts[own].sum() * voxel_ml), 4)}


def _fill_removed(arr: np.ndarray, comp: np.ndarray, remove: np.ndarray,
                  connectivity: int) -> np.ndarray:
    """``arr`` with the components ``comp == k`` (``remove[k]`` True) relabelled.

    Each removed component takes the most frequent label of its one-voxel shell
    (``connectivity`` neighbourhood) among the voxels not removed themselves; background when
    there is none. ``comp``: (I, J, K) component ids (0: none), ``remove``: bool per id.
    """
    from scipy import ndimage

    out = arr.copy()
    if not remove.any():
        return out
    removed_mask = remove[comp]
    struct = ndimage.generate_binary_structure(3, _CONNECTIVITY_RANK[connectivity])
    boxes = ndimage.find_objects(np.where(removed_mask, comp, 0))
    for k in np.flatnonzero(remove):
        box = boxes[k - 1] if k - 1 < len(boxes) else None
        if box is None:  # pragma: no cover - every removed id has voxels
            continue
        grown = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, size))
                      for b, size in zip(box, arr.shape, strict=True))
        own_mask = comp[grown] == k
        shell = ndimage.binary_dilation(own_mask, structure=struct) & ~own_mask \
            & ~removed_mask[grown]
        near = arr[grown][shell]
        out[grown][own_mask] = int(np.argmax(np.bincount(near))) if near.size else 0
    return out


def remove_cartilage_off_bone(
        arr: np.ndarray, spacing_mm: Sequence[float], *,
        cartilage_bone: Mapping[str, str] = CARTILAGE_BONE,
        contact_mm: float = CARTILAGE_BONE_CONTACT_MM,
        connectivity: int = THIN_CONNECTIVITY,
        record: dict[str, dict[str, Any]] | None = None) -> np.ndarray:
    """Remove the cartilage components that do not lie on their own bone.

    Why: articular cartilage covers the joint ends of its bone, so a component of a plate's
    label that touches nowhere its own bone (femoral cartilage -> femur, tibial plates ->
    tibia, patellar cartilage -> patella; :data:`CARTILAGE_BONE`) is a false positive however
    large it is: a patch in the quadriceps, a speck down the tibial shaft, or a tibial plate
    label stuck on the femur. Such far pieces set the cartilage HD95 and slow the thickness
    measurement.

    Rule: the components (``connectivity``, default 26) of each cartilage class are found on
    the multi-label map; a component is kept when the gap between one of its voxels and a
    voxel of its bone, both taken as boxes of the voxel spacing, is at most ``contact_mm``
    (face, edge and corner neighbours have gap 0, at any spacing). Computed per component
    on its bounding box grown by the reach of ``contact_mm``: the component dilated by one
    voxel (3x3x3) meets a voxel whose centre lies within ``contact_mm`` of a bone voxel
    centre (Euclidean distance transform with ``spacing_mm``), which is exactly a box gap
    <= ``contact_mm``. The other components take
    the majority label of their kept neighbours (background when none), as in
    :func:`postprocess_knee_labels`. A class whose bone is absent loses every component.

    Parameters
    ----------
    arr : (I, J, K) uint8 ndarray
        Knee-schema labels (not modified).
    spacing_mm : (float, float, float)
        Voxel spacing along the array axes, mm.
    cartilage_bone : mapping of str to str
        Cartilage class name -> bone class name (default :data:`CARTILAGE_BONE`).
    contact_mm : float
        Largest gap (mm) counted as contact (default :data:`CARTILAGE_BONE_CONTACT_MM`).
    connectivity : {6, 18, 26}
        Connectivity of the cartilage components.
    record : dict, optional
        Filled with one entry per cartilage class present: ``components``,
        ``components_removed``, ``voxels_removed``, ``ml_removed`` (mL, needs ``spacing_mm``)
        and ``ml_before``.

    Returns
    -------
    uint8 ndarray, shape of ``arr``.
    """
    ids = {KNEE_ID[c]: (KNEE_ID[b],) for c, b in cartilage_bone.items()}
    return _remove_off_bones(arr, spacing_mm, ids, contact_mm, connectivity, record)


def _remove_off_bones(arr: np.ndarray, spacing_mm: Sequence[float],
                      bones_of: Mapping[int, tuple[int, ...]], contact_mm: float,
                      connectivity: int, record: dict[str, dict[str, Any]] | None
                      ) -> np.ndarray:
    """Remove the components of the classes ``bones_of`` that are not within ``contact_mm``
    of every one of their bones (gap between voxel boxes; see
    :func:`remove_cartilage_off_bone`), fill them from their kept neighbours and record it.

    ``arr``: (I, J, K) knee labels; ``bones_of``: class id -> bone ids it must touch.
    """
    from scipy import ndimage

    spacing = np.asarray(spacing_mm, dtype=np.float64)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    found = _class_components(arr, list(bones_of), connectivity)
    if found is None:
        return arr.copy()
    comp, counts, comp_class = found
    touches = np.zeros(counts.size, bool)
    # voxels per axis within which a bone voxel can be in contact (gap <= contact_mm)
    reach = np.floor(contact_mm / spacing + 1e-9).astype(int) + 1
    cube = np.ones((3, 3, 3), bool)
    # per component, on its bounding box grown by the reach: far pieces have small boxes
    # with no bone in them, and no transform runs over the whole field of view
    for k, box in enumerate(ndimage.find_objects(comp), start=1):
        if box is None:  # pragma: no cover - every id has voxels
            continue
        grown = tuple(slice(max(b.start - r, 0), min(b.stop + r, size))
                      for b, r, size in zip(box, reach, arr.shape, strict=True))
        grown_own = ndimage.binary_dilation(comp[grown] == k, structure=cube)
        ok = True
        for bone in bones_of[int(comp_class[k])]:
            not_bone = arr[grown] != bone
            if not_bone.all():
                ok = False
                break
            near = ndimage.distance_transform_edt(not_bone, sampling=spacing) <= contact_mm + 1e-9
            if not (near & grown_own).any():
                ok = False
                break
        touches[k] = ok
    remove = (comp_class > 0) & ~touches
    remove[0] = False
    _record_removed(list(bones_of), comp_class, counts, remove, voxel_ml, record)
    return _fill_removed(arr, comp, remove, connectivity)


def remove_menisci_off_joint(
        arr: np.ndarray, spacing_mm: Sequence[float], *,
        contact_mm: float = MENISCUS_BONE_CONTACT_MM,
        bones: Sequence[str] = MENISCUS_BONES,
        connectivity: int = THIN_CONNECTIVITY,
        record: dict[str, dict[str, Any]] | None = None) -> np.ndarray:
    """Remove the meniscus components that do not lie in the tibiofemoral joint.

    Why: a meniscus is a wedge between the femoral condyle and the tibial plateau, so a
    component of either meniscus label farther than ``contact_mm`` from the femur or from the
    tibia (a "meniscus" patch in the popliteal fat, along the patellar tendon or on the
    femoral shaft) is a false positive; such pieces set the menisci HD95 (70-90 mm) and add
    to the meniscal volumes.

    Rule: as :func:`remove_cartilage_off_bone` (components of each class with
    ``connectivity``, gap between voxel boxes), but a component must come within
    ``contact_mm`` of *every* bone in ``bones``. Removed components take the majority label
    of their kept neighbours (background when none).

    Parameters
    ----------
    arr : (I, J, K) uint8 ndarray
        Knee-schema labels (not modified).
    spacing_mm : (float, float, float)
        Voxel spacing along the array axes, mm.
    contact_mm : float
        Largest gap (mm) to each bone (default :data:`MENISCUS_BONE_CONTACT_MM`).
    bones : sequence of str
        Bones each component must come near (default :data:`MENISCUS_BONES`).
    connectivity : {6, 18, 26}
    record : dict, optional
        Filled with one entry per meniscus present, as in :func:`remove_cartilage_off_bone`.

    Returns
    -------
    uint8 ndarray, shape of ``arr``.
    """
    bone_ids = tuple(KNEE_ID[b] for b in bones)
    ids = {KNEE_ID[m]: bone_ids for m in ("medial_meniscus", "lateral_meniscus")}
    return _remove_off_bones(arr, spacing_mm, ids, contact_mm, connectivity, record)


def assign_compartments(arr: np.ndarray, affine: np.ndarray, *,
                        record: dict[str, Any] | None = None) -> np.ndarray:
    """Name the medial and lateral tibial plates and menisci by anatomy.

    Why: the fine network sees 38 mm windows, less than a tibial plateau is wide, and it is
    trained on left and right knees (flip augmentation), so it often cannot tell the medial
    from the lateral compartment: on the tuning renders 46 % of the lateral tibial plate came
    out "medial". Merged, the two plates scored Dice 0.71 where each scored 0.33-0.40.

    Rule: the voxels of the two tibial plates and the two menisci (:data:`COMPARTMENT_PAIRS`)
    are split in two along the patient's left-right axis (world x, RAS) by 2-means
    clustering of their x positions, started from the median x of the top
    :data:`COMPARTMENT_TIBIA_SLAB_MM` of the tibia's largest component. The lateral
    compartment is the one on the side of the fibula (its largest component, when at least
    :data:`COMPARTMENT_MIN_FIBULA_ML` and its median lies below the top of the tibia's largest
    component, as the fibula hangs below the plateau); without such a fibula, the side that
    the network's own labels call lateral more often. Every plate voxel then takes its side's plate label and
    every meniscus voxel its side's meniscus label. Nothing changes when the structures are
    too small (:data:`COMPARTMENT_MIN_ML`), or the two groups are not two compartments
    (centres closer than :data:`COMPARTMENT_MIN_SEPARATION_MM`, or one with less than
    :data:`COMPARTMENT_MIN_SHARE` of the voxels); ``record["applied"]`` is then False with the
    reason.

    Parameters
    ----------
    arr : (I, J, K) uint8 ndarray
        Knee-schema labels (not modified).
    affine : (4, 4) ndarray
        Voxel to RAS world (mm) transform of ``arr``.
    record : dict, optional
        Filled with ``ml`` (plates + menisci, mL), ``applied``, ``reason`` (when not applied),
        ``split_x_mm`` (world x of the split), ``separation_mm``, ``lateral_side`` ("+x" or "-x"), ``named_by`` ("fibula" or
        "network votes"), ``votes_agree`` (whether the network's labels would name the same
        side), ``fibula_ignored`` (why a predicted fibula was not used, when so), and
        ``ml_relabelled`` per class (mL whose label changed away from it).

    Returns
    -------
    uint8 ndarray, shape of ``arr``.
    """
    import cc3d

    rec: dict[str, Any] = record if record is not None else {}
    out = arr.copy()
    aff = np.asarray(affine, dtype=np.float64)
    voxel_ml = abs(float(np.linalg.det(aff[:3, :3]))) / 1000.0
    medial = [KNEE_ID[m] for m, _ in COMPARTMENT_PAIRS]
    lateral = [KNEE_ID[x] for _, x in COMPARTMENT_PAIRS]
    idx = np.nonzero(np.isin(arr, medial + lateral))

    def world(ix: tuple[np.ndarray, ...]) -> np.ndarray:
        return np.stack(ix, 1).astype(np.float64) @ aff[:3, :3].T + aff[:3, 3]

    def skip(reason: str) -> np.ndarray:
        rec.update(applied=False, reason=reason)
        return out

    def largest(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, ...]:
        """Indices of the largest connected component of ``mask``."""
        comp = cc3d.connected_components(mask, connectivity=cast(Literal[6, 18, 26],
                                                                 connectivity))
        counts = np.bincount(comp.ravel())
        counts[0] = 0
        return np.nonzero(comp == int(counts.argmax()))

    rec["ml"] = round(float(idx[0].size * voxel_ml), 4)
    if idx[0].size * voxel_ml < COMPARTMENT_MIN_ML:
        return skip(f"tibial plates + menisci {idx[0].size * voxel_ml:.2f} mL < "
                    f"{COMPARTMENT_MIN_ML} mL")
    x = world(idx)[:, 0]
    start = float(np.median(x))
    tibia_top = None
    tibia = arr == KNEE_ID["tibia"]
    if tibia.any():  # its main body: pass 0 runs before the bone pass
        tw = world(largest(tibia, BONE_CONNECTIVITY))
        tibia_top = float(tw[:, 2].max())
        top = tw[:, 2] > tibia_top - COMPARTMENT_TIBIA_SLAB_MM
        start = float(np.median(tw[top, 0]))
    split = start
    for _ in range(100):
        lo, hi = x[x <= split], x[x > split]
        if not lo.size or not hi.size:
            break
        split, before = 0.5 * float(lo.mean() + hi.mean()), split
        if abs(split - before) < 1e-3:
            break
    plus = x > split
    share = float(min(plus.mean(), 1.0 - plus.mean()))
    if share < COMPARTMENT_MIN_SHARE:
        return skip(f"one compartment holds {100 * share:.0f} % of the voxels "
                    f"(< {100 * COMPARTMENT_MIN_SHARE:.0f} %)")
    separation = float(x[plus].mean() - x[~plus].mean())
    rec.update(split_x_mm=round(split, 2), separation_mm=round(separation, 2))
    if separation < COMPARTMENT_MIN_SEPARATION_MM:
        return skip(f"compartment centres {separation:.1f} mm apart "
                    f"(< {COMPARTMENT_MIN_SEPARATION_MM} mm)")
    labels = arr[idx]
    # voxels whose network label fits "+x is lateral", against those that fit "-x is lateral"
    fits_plus = int((np.isin(labels, lateral) == plus).sum())
    vote_side = 1.0 if 2 * fits_plus > labels.size else -1.0
    side, named_by = vote_side, "network votes"
    fib = arr == KNEE_ID["fibula"]
    if fib.any():
        fidx = largest(fib, 26)
        if fidx[0].size * voxel_ml >= COMPARTMENT_MIN_FIBULA_ML:
            fw = np.median(world(fidx), 0)
            if tibia_top is not None and float(fw[2]) < tibia_top:
                side = 1.0 if float(fw[0]) > split else -1.0
                named_by = "fibula"
            else:  # the fibula hangs below the tibial plateau; this one does not
                rec["fibula_ignored"] = ("the predicted fibula does not lie below the top of "
                                         "the tibia")
    is_lat = plus if side > 0 else ~plus
    new_labels = labels.copy()
    for m, lat in zip(medial, lateral, strict=True):
        pair = np.isin(labels, (m, lat))
        new_labels[pair] = np.where(is_lat[pair], lat, m)
    out[idx] = new_labels
    changed = new_labels != labels
    rec.update(applied=True, lateral_side="+x" if side > 0 else "-x", named_by=named_by,
               votes_agree=bool(vote_side == side),
               ml_relabelled={KNEE[c]: round(float((changed & (labels == c)).sum() * voxel_ml),
                                             4) for c in medial + lateral})
    return out


def postprocess_knee_labels(
        labels: LabelVolume, *,
        keep_largest: Sequence[str] = KEEP_LARGEST_CLASSES,
        min_component_ml: dict[str, float] | None = None,
        bone_connectivity: int = BONE_CONNECTIVITY,
        thin_connectivity: int = THIN_CONNECTIVITY,
        cartilage_bone: Mapping[str, str] | None = None,
        cartilage_contact_mm: float = CARTILAGE_BONE_CONTACT_MM,
        compartments: bool = True,
        meniscus_contact_mm: float | None = MENISCUS_BONE_CONTACT_MM,
) -> tuple[LabelVolume, dict[str, Any]]:
    """Anatomical clean-up of a knee label map: medial and lateral named by anatomy, one body
    per bone, no specks of thin tissue, cartilage only on its bone, menisci only in the joint.

    Passes, each on the result of the one before:

    0. compartments (:func:`assign_compartments`, when ``compartments``): the tibial plates
       and menisci are split into the medial and lateral compartment along the left-right
       axis and named by the side of the fibula. It comes first so that the later passes see
       whole plates, not a plate cut into medial and lateral pieces;
    1. thin structures: 3-D connected components (:func:`cc3d.connected_components` on the
       multi-label map, ``thin_connectivity``) of the ``min_component_ml`` classes; those
       smaller than their class's volume (mL) are removed (one of exactly that volume stays);
    2. bones: components of the ``keep_largest`` classes (``bone_connectivity``); all but
       the largest of each class are removed (ties: the first in C order). This pass comes
       after the thin one because a thin speck filled with a bone label may touch that bone
       at an edge only;
    3. cartilage on its bone (:func:`remove_cartilage_off_bone`): each cartilage component
       (``thin_connectivity``) that is not within ``cartilage_contact_mm`` of its own bone
       (``cartilage_bone``) is removed. It comes after the bone pass so that a detached bone
       fragment cannot hold a false cartilage piece; when one of its removed pieces is filled
       with a bone label, the bone pass is run once more (its removals are added to the
       bones' entries), so each bone stays one piece;
    4. menisci in the joint (:func:`remove_menisci_off_joint`, unless ``meniscus_contact_mm``
       is None): each meniscus component farther than ``meniscus_contact_mm`` from the femur
       or the tibia is removed (before the repeated bone pass of 3).

    Filling: each removed component takes the most frequent label among the voxels of its
    one-voxel shell (the pass's connectivity neighbourhood) that are not removed themselves;
    background when there is none. A bone speck inside the tibia becomes tibia, a cartilage
    speck in the fat becomes fat, an island in air becomes background. Filling only adds
    voxels to kept components (a shell never holds the component's own class), so running
    the step again changes nothing.

    Parameters
    ----------
    labels : LabelVolume
        (I, J, K) knee-schema label map with known geometry (volumes in mL need it).
    keep_largest : sequence of str
        Knee class names kept as their largest component (default
        :data:`KEEP_LARGEST_CLASSES`); empty: none.
    min_component_ml : dict of str to float, optional
        Class name -> smallest component kept (mL); default :data:`MIN_COMPONENT_ML`,
        ``{}``: none. A class cannot be in both rules.
    bone_connectivity, thin_connectivity : {6, 18, 26}
        Connectivity of the components of each rule (defaults :data:`BONE_CONNECTIVITY`,
        :data:`THIN_CONNECTIVITY`).
    cartilage_bone : mapping of str to str, optional
        Cartilage class -> its bone for pass 3; default :data:`CARTILAGE_BONE`, ``{}``: the
        pass is off.
    cartilage_contact_mm : float
        Largest gap (mm) between a cartilage component and its bone counted as contact
        (default :data:`CARTILAGE_BONE_CONTACT_MM`).
    compartments : bool
        Run pass 0 (default True).
    meniscus_contact_mm : float or None
        Largest gap (mm) between a meniscus component and each of femur and tibia (default
        :data:`MENISCUS_BONE_CONTACT_MM`); None: pass 4 is off.

    Returns
    -------
    cleaned : LabelVolume
        Same shape, affine, dtype, label names, schema and meta as ``labels``.
    record : dict
        JSON-ready: the step's parameters and, per checked class present in the input,
        ``components`` (before), ``components_removed``, ``voxels_removed``, ``ml_removed``
        and ``ml_before`` (``removed``: passes 1 and 2; ``cartilage_on_bone``: pass 3, with
        its parameters and its own ``removed``; ``compartments``: pass 0, see
        :func:`assign_compartments`; ``menisci_in_joint``: pass 4, as pass 3).

    Raises
    ------
    KneeSegmentationError
        Unknown class name, a class in both rules, bad connectivity, negative volume or
        contact distance, not a 3-D map.
    GeometryError
        Unknown geometry.
    """
    min_ml = dict(MIN_COMPONENT_ML if min_component_ml is None else min_component_ml)
    on_bone = dict(CARTILAGE_BONE if cartilage_bone is None else cartilage_bone)
    unknown = sorted(n for n in (*keep_largest, *min_ml, *on_bone, *on_bone.values())
                     if n not in KNEE_ID)
    if unknown:
        raise KneeSegmentationError(f"post-processing: unknown knee class(es) {unknown}; use "
                                    f"names of mskmri.labels.KNEE, e.g. {sorted(KNEE_ID)[:3]}")
    both = sorted(set(keep_largest) & set(min_ml))
    if both:
        raise KneeSegmentationError(f"post-processing: {both} given both as keep-largest and "
                                    "with a minimum volume; give each class one rule")
    for conn in (bone_connectivity, thin_connectivity):
        if conn not in _CONNECTIVITY_RANK:
            raise KneeSegmentationError(f"post-processing connectivity must be 6, 18 or 26, "
                                        f"not {conn!r}")
    bad = {n: v for n, v in min_ml.items() if not np.isfinite(v) or v < 0}
    if bad:
        raise KneeSegmentationError(f"post-processing minimum volumes must be finite and >= 0 "
                                    f"mL, not {bad}")
    if not np.isfinite(cartilage_contact_mm) or cartilage_contact_mm < 0:
        raise KneeSegmentationError(f"post-processing cartilage-bone contact distance must be "
                                    f"finite and >= 0 mm, not {cartilage_contact_mm!r}")
    if meniscus_contact_mm is not None and (not np.isfinite(meniscus_contact_mm)
                                            or meniscus_contact_mm < 0):
        raise KneeSegmentationError(f"post-processing meniscus-bone contact distance must be "
                                    f"finite and >= 0 mm (or None), not {meniscus_contact_mm!r}")
    arr = np.asarray(labels.array)
    if arr.ndim != 3:
        raise KneeSegmentationError(f"post-processing needs a 3-D label map, not shape "
                                    f"{arr.shape}")
    labels.require_geometry("knee post-processing (component volumes in mL)")
    voxel_ml = labels.voxel_volume_mm3 / 1000.0
    # a component of exactly the minimum volume is kept (relative slack for rounding)
    min_vox = {KNEE_ID[n]: v / voxel_ml * (1.0 - 1e-9) for n, v in min_ml.items()}
    removed_rec: dict[str, dict[str, Any]] = {}
    record: dict[str, Any] = {
        "step": "postprocess_knee_labels",
        "connectivity": {"keep_largest": bone_connectivity, "min_component": thin_connectivity},
        "keep_largest": list(keep_largest), "min_component_ml": min_ml,
        "fill": "majority label of the kept neighbours, else background",
        "removed": removed_rec}
    contact_rec: dict[str, dict[str, Any]] = {}
    if on_bone:
        record["cartilage_on_bone"] = {
            "bone_of": on_bone, "contact_mm": float(cartilage_contact_mm),
            "connectivity": thin_connectivity, "removed": contact_rec}
    out = arr
    if compartments:
        record["compartments"] = {}
        out = assign_compartments(out, labels.affine, record=record["compartments"])
    # thin structures next: a speck filled with a bone label (a cartilage speck inside the
    # femur) may touch that bone at an edge only, and the bone pass then sees it
    out = _drop_components(out, [KNEE_ID[n] for n in min_ml], thin_connectivity, min_vox,
                           voxel_ml, removed_rec)
    bone_ids = [KNEE_ID[n] for n in keep_largest]
    out = _drop_components(out, bone_ids, bone_connectivity, None, voxel_ml, removed_rec)
    menisci_rec: dict[str, dict[str, Any]] = {}
    if meniscus_contact_mm is not None:
        record["menisci_in_joint"] = {
            "bones": list(MENISCUS_BONES), "contact_mm": float(meniscus_contact_mm),
            "connectivity": thin_connectivity, "removed": menisci_rec}
    if on_bone or meniscus_contact_mm is not None:
        before = out
        if on_bone:
            out = remove_cartilage_off_bone(out, labels.spacing, cartilage_bone=on_bone,
                                            contact_mm=cartilage_contact_mm,
                                            connectivity=thin_connectivity, record=contact_rec)
        if meniscus_contact_mm is not None:
            out = remove_menisci_off_joint(out, labels.spacing, contact_mm=meniscus_contact_mm,
                                           connectivity=thin_connectivity, record=menisci_rec)
        if bone_ids and np.isin(out[out != before], bone_ids).any():
            again: dict[str, dict[str, Any]] = {}
            out = _drop_components(out, bone_ids, bone_connectivity, None, voxel_ml, again)
            for name, r in again.items():
                base = removed_rec.setdefault(name, {**r, "components_removed": 0,
                                                     "voxels_removed": 0, "ml_removed": 0.0})
                for key in ("components_removed", "voxels_removed"):
                    base[key] += r[key]
                base["ml_removed"] = round(base["ml_removed"] + r["ml_removed"], 4)
    log.info("knee post-processing removed (mL) %s; cartilage off its bone %s; menisci off the "
             "joint %s; compartments %s", {
                 k: v["ml_removed"] for k, v in removed_rec.items() if v["voxels_removed"]}, {
                 k: v["ml_removed"] for k, v in contact_rec.items() if v["voxels_removed"]}, {
                 k: v["ml_removed"] for k, v in menisci_rec.items() if v["voxels_removed"]},
             record.get("compartments"))
    return labels.with_array(out), record  # type: ignore[return-value]


def postprocess_warnings(record: dict[str, Any]) -> list[str]:
    """Warnings worth showing from a :func:`postprocess_knee_labels` record.

    A bone that lost more than :data:`BONE_REMOVED_WARN_FRACTION` of its volume (a fragmented
    output), a thin structure all of whose components were too small, a cartilage plate
    none of whose components lay on its bone, a meniscus none of whose components lay in the
    joint (each is then absent from the output), medial / lateral labels that could not be
    assigned by anatomy, and sides named by the fibula against the network's own votes.
    """
    out = []
    removed = record.get("removed") or {}
    largest = set(record.get("keep_largest") or ())
    min_ml = record.get("min_component_ml") or {}
    for name, r in removed.items():
        if not r["voxels_removed"]:
            continue
        frac = r["ml_removed"] / r["ml_before"] if r["ml_before"] else 0.0
        if name in largest and frac > BONE_REMOVED_WARN_FRACTION:
            out.append(f"{name}: {r['ml_removed']:.2f} mL ({100 * frac:.1f} % of the predicted "
                       f"{name}) lay in {r['components_removed']} piece(s) detached from the "
                       "main bone and was relabelled by post-processing; the segmentation is "
                       "fragmented there, check it")
        elif name in min_ml and r["components_removed"] == r["components"]:
            out.append(f"{name}: all {r['components']} predicted component(s) were smaller "
                       f"than {min_ml[name]:g} mL and were removed by "
                       f"post-processing; {name} is absent from the output")
    for key in ("cartilage_on_bone", "menisci_in_joint"):
        rule = record.get(key) or {}
        for name, r in (rule.get("removed") or {}).items():
            if r["voxels_removed"] and r["components_removed"] == r["components"]:
                near = (f"the {rule['bone_of'][name]}" if key == "cartilage_on_bone"
                        else f"both {' and '.join(rule['bones'])}")
                out.append(f"{name}: none of its {r['components']} predicted component(s) "
                           f"({r['ml_before']:.2f} mL) lay within {rule['contact_mm']:g} mm of "
                           f"{near}; removed by post-processing, {name} is absent from the "
                           "output")
    comp = record.get("compartments") or {}
    if comp.get("applied") and not comp.get("votes_agree"):
        out.append("medial / lateral tibial cartilage and menisci were named by the side of the "
                   "fibula, against the network's own labels, which called the other side "
                   "lateral more often: check the sides")
    if comp and not comp.get("applied") and comp.get("ml"):
        out.append("medial / lateral tibial cartilage and menisci keep the network's own "
                   f"labels, which often swap the compartments: {comp.get('reason')}")
    return out


@dataclass
class KneeSegmentation:
    """What :func:`segment_knee_detailed` returns.

    Attributes
    ----------
    labels : LabelVolume
        Knee-schema labels in the input geometry.
    coarse : LabelVolume
        Coarse labels on the coarse grid (canonical orientation).
    region_mm : list of [float, float]
        The fine region in canonical world coordinates (RAS mm), per axis.
    warnings : list of str
        Reasons to distrust the result (empty when none).
    timings_s : dict
        Seconds per step.
    postprocess : dict
        The record of :func:`postprocess_knee_labels` (what was removed, per class).
    """

    labels: LabelVolume
    coarse: LabelVolume
    region_mm: list[list[float]]
    warnings: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    postprocess: dict[str, Any] = field(default_factory=dict)


#: Default backend and precision, chosen by benchmarks/knee_segmentation.py as the fastest
#: that keeps >= 99.5 % of the fp32 labels on this 2-core CPU (160x384x384 with the
#: 2026-11-21 models, load ~1.8: torch fp32 20.5 s, bf16 autocast 11.1 s with 99.93 %
#: agreement, ONNX Runtime 19.0 s). ONNX exports of shipped models are made once and kept
#: in :func:`onnx_cache_dir` when ``backend="onnx"`` is asked for.
DEFAULT_BACKEND = "torch"
#: Precision of the torch backend (ONNX Runtime always runs fp32).
DEFAULT_PRECISION = "bf16"
#: Window overlap of the sliding-window inferer (fraction of the patch).
WINDOW_OVERLAP = 0.25
#: Windows per forward pass.
WINDOW_BATCH = 1
#: Patch sizes used when a model comes without a card (a bare nn.Module, e.g. in tests).
DEFAULT_COARSE_PATCH = (64, 80, 80)
DEFAULT_FINE_PATCH = (64, 64, 64)


@dataclass
class _Stage:
    """One network with what it needs to run: spacing (mm) and patch (voxels)."""

    model: nn.Module
    spacing_mm: tuple[float, float, float]
    patch: tuple[int, int, int]
    name: str
    sha256: str = ""


def onnx_cache_dir() -> Path:
    """Where ONNX exports of shipped models are kept (``$MSKMRI_CACHE_DIR/onnx`` or
    ``~/.cache/mskmri/onnx``)."""
    base = os.environ.get("MSKMRI_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "mskmri") / "onnx"


def _onnx_file(stage: _Stage) -> Path | None:
    """The cached ONNX export of ``stage`` (made once per weight file and patch size).

    None for a network without a weight file (exported to a temporary file instead).
    """
    if not stage.sha256:
        return None
    from mskmri.io import atomic_path
    from mskmri.nn.inference import export_onnx

    patch = "x".join(str(p) for p in stage.patch)
    path = onnx_cache_dir() / f"{stage.name}-{stage.sha256[:16]}-{patch}.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            export_onnx(stage.model, tmp, patch_size=stage.patch, in_channels=1)
        log.info("exported %s to %s", stage.name, path)
    return path


def _load_stage(model: str | nn.Module, default_spacing: Sequence[float],
                default_patch: Sequence[int], device: str) -> _Stage:
    if isinstance(model, str):
        from mskmri.nn.registry import load_model

        net, card = load_model(model, device=device)
        if card.label_schema != "knee" or len(card.labels) != N_CLASSES:
            raise KneeSegmentationError(
                f"model {model!r} is not a knee segmenter (schema {card.label_schema!r}, "
                f"{len(card.labels)} classes); give a knee-seg model")
        spacing = tuple(card.input_spacing_mm or default_spacing)
        patch = tuple(card.extra.get("patch_size", default_patch))
        return _Stage(net, spacing, patch, card.name, card.sha256)  # type: ignore[arg-type]
    return _Stage(model, tuple(default_spacing), tuple(default_patch),  # type: ignore[arg-type]
                  type(model).__name__)


class KneeSegmenter:
    """The two networks of the coarse-to-fine knee segmenter, ready to run.

    Parameters
    ----------
    coarse, fine : str or nn.Module
        Registered model names / ``*.safetensors`` paths (with cards), or networks (then
        :data:`COARSE_SPACING_MM`/:data:`FINE_SPACING_MM` and the default patches apply).
    precision : {"fp32", "bf16"}
        Autocast of the torch backend.
    backend : {"torch", "onnx"}
    device : str
    overlap : float
        Sliding-window overlap.
    keep_largest, min_component_ml, cartilage_bone, cartilage_contact_mm, compartments, \
meniscus_contact_mm
        Parameters of the post-processing (:func:`postprocess_knee_labels`; defaults
        :data:`KEEP_LARGEST_CLASSES`, :data:`MIN_COMPONENT_ML`, :data:`CARTILAGE_BONE`,
        :data:`CARTILAGE_BONE_CONTACT_MM`, True, :data:`MENISCUS_BONE_CONTACT_MM`).
    fusion : {"probabilities", "labels"}
        How coarse and fine outputs are combined (:data:`DEFAULT_FUSION`):
        :func:`fuse_probabilities` or the earlier label rule :func:`fuse_with_coarse`.
    coarse_weights : (float, float), optional
        Coarse weights (large classes, thin classes) of the ``"probabilities"`` fusion
        (:func:`coarse_weight_vector`; default :data:`COARSE_WEIGHT_LARGE`,
        :data:`COARSE_WEIGHT_THIN`).
    fusion_tolerance_mm : float
        Distance within which the coarse labels must confirm a checked fine class in the
        ``"labels"`` fusion (:func:`fuse_with_coarse`; default :data:`FUSION_TOLERANCE_MM`).
    tta : {"flip", "none"}
        Test-time augmentation (:data:`DEFAULT_TTA`): each network also sees the left-right
        mirror of its input and the probabilities are averaged
        (:func:`flip_averaged_log_probs`); about twice the network time and one more fine
        class map in memory.
    """

    def __init__(self, coarse: str | nn.Module = COARSE_MODEL, fine: str | nn.Module = FINE_MODEL,
                 *, precision: str = DEFAULT_PRECISION, backend: str = DEFAULT_BACKEND,
                 device: str = "cpu", overlap: float = WINDOW_OVERLAP,
                 keep_largest: Sequence[str] = KEEP_LARGEST_CLASSES,
                 min_component_ml: dict[str, float] | None = None,
                 cartilage_bone: Mapping[str, str] | None = None,
                 cartilage_contact_mm: float = CARTILAGE_BONE_CONTACT_MM,
                 compartments: bool = True,
                 meniscus_contact_mm: float | None = MENISCUS_BONE_CONTACT_MM,
                 fusion: str = DEFAULT_FUSION,
                 coarse_weights: tuple[float, float] | None = None,
                 fusion_tolerance_mm: float = FUSION_TOLERANCE_MM,
                 tta: str = DEFAULT_TTA) -> None:
        from mskmri.nn.inference import SlidingWindowConfig, SlidingWindowInferer

        if backend == "onnx":
            precision = "fp32"
        self.coarse = _load_stage(coarse, COARSE_SPACING_MM, DEFAULT_COARSE_PATCH, device)
        from mskmri.weights import model_caveat

        named = {m for m in (coarse, fine) if isinstance(m, str)}
        #: Warnings carried by every output of an unvalidated shipped model.
        self.model_caveats: list[str] = sorted(
            {c for c in (model_caveat(m) for m in named) if c})
        self.fine = _load_stage(fine, FINE_SPACING_MM, DEFAULT_FINE_PATCH, device)
        self.precision, self.backend = precision, backend
        self.keep_largest = tuple(keep_largest)
        self.min_component_ml = dict(MIN_COMPONENT_ML if min_component_ml is None
                                     else min_component_ml)
        self.cartilage_bone = dict(CARTILAGE_BONE if cartilage_bone is None else cartilage_bone)
        self.cartilage_contact_mm = float(cartilage_contact_mm)
        self.compartments = bool(compartments)
        self.meniscus_contact_mm = meniscus_contact_mm
        if not np.isfinite(fusion_tolerance_mm) or fusion_tolerance_mm < 0:
            raise KneeSegmentationError(f"fusion tolerance must be finite and >= 0 mm, not "
                                        f"{fusion_tolerance_mm!r}")
        self.fusion_tolerance_mm = float(fusion_tolerance_mm)
        if fusion not in FUSION_MODES:
            raise KneeSegmentationError(f"fusion must be one of {', '.join(FUSION_MODES)}, "
                                        f"not {fusion!r}")
        self.fusion = fusion
        if tta not in TTA_MODES:
            raise KneeSegmentationError(f"tta must be one of {', '.join(TTA_MODES)}, not "
                                        f"{tta!r}")
        self.tta = tta
        large, thin = (COARSE_WEIGHT_LARGE, COARSE_WEIGHT_THIN) if coarse_weights is None \
            else coarse_weights
        self._coarse_weights = coarse_weight_vector(large, thin)
        #: Coarse weights (large, thin classes) of the probability fusion.
        self.coarse_weight_pair = (float(large), float(thin))
        self._inferers = {}
        for name, st in (("coarse", self.coarse), ("fine", self.fine)):
            onnx = _onnx_file(st) if backend == "onnx" else None
            self._inferers[name] = SlidingWindowInferer(
                None if onnx is not None else st.model,
                SlidingWindowConfig(st.patch, overlap=overlap, batch_size=WINDOW_BATCH,
                                    precision=precision, backend=backend),
                device=device, onnx_path=onnx)

    def fusion_record(self) -> dict[str, Any]:
        """How coarse and fine outputs are combined, for sidecars and benchmark records."""
        if self.fusion == "probabilities":
            large, thin = self.coarse_weight_pair
            return {"mode": self.fusion, "coarse_weight_large": large,
                    "coarse_weight_thin": thin, "coarse_led": list(COARSE_LED)}
        return {"mode": self.fusion, "tolerance_mm": self.fusion_tolerance_mm}

    def _scores(self, stage: str, x: np.ndarray, *, copy: bool = True) -> np.ndarray:
        """(K, *S) logits of network ``stage`` (or flip-averaged log-probabilities, ``tta``)."""
        inferer = self._inferers[stage]
        if self.tta == "flip":
            return flip_averaged_log_probs(lambda a, c: inferer.logits(a, copy=c), x)
        return inferer.logits(x, copy=copy)

    def close(self) -> None:
        """Free the inferers' buffers (and temporary ONNX exports)."""
        for inf in self._inferers.values():
            inf.close()

    def __call__(self, image: Volume) -> KneeSegmentation:
        return self.run(image)

    def run(self, image: Volume) -> KneeSegmentation:
        """Segment ``image``; see :func:`segment_knee`."""
        t0 = time.perf_counter()
        _check_input(image)
        warnings = _input_warnings(image)
        warnings += self.model_caveats
        can = canonical(image)
        timings: dict[str, float] = {}
        # ---------------------------------------------------------------- coarse
        cshape, caff = grid_at_spacing(can, self.coarse.spacing_mm)
        carr = can.resample_to_grid(cshape, caff, order=1).array.astype(np.float32)
        if not np.isfinite(carr).all() or float(carr.max() - carr.min()) <= 0:
            raise KneeSegmentationError("the image is constant or holds NaN/inf values; give a "
                                        "real MR image")
        cx = normalise_intensity(carr)
        t1 = time.perf_counter()
        clog = self._scores("coarse", cx)
        clab = clog.argmax(0).astype(np.uint8)
        timings["coarse_s"] = time.perf_counter() - t1
        coarse = LabelVolume(clab, caff, {0: "background", **KNEE}, schema="knee")
        # ---------------------------------------------------------------- region
        box, why = _region_from_coarse(clab, self.coarse.spacing_mm, can, caff)
        if why:
            warnings.append(why)
        # ---------------------------------------------------------------- fine
        t2 = time.perf_counter()
        fshape, faff = grid_at_spacing(can, self.fine.spacing_mm, box)
        farr = can.resample_to_grid(fshape, faff, order=1).array.astype(np.float32)
        fx = normalise_intensity(farr, reference=carr)
        timings["fine_resample_s"] = time.perf_counter() - t2
        t3 = time.perf_counter()
        if self.fusion == "probabilities":
            flog = self._scores("fine", fx, copy=False)
            timings["fine_s"] = time.perf_counter() - t3
            flab = fuse_probabilities(flog, faff, clog, caff, self._coarse_weights)
            del flog
        else:
            flab = self._inferers["fine"].labels(fx) if self.tta == "none" else \
                self._scores("fine", fx).argmax(0).astype(np.uint8)
            timings["fine_s"] = time.perf_counter() - t3
            flab = fuse_with_coarse(flab, faff, clab, caff, self.fusion_tolerance_mm)
        timings["fusion_s"] = time.perf_counter() - t3 - timings["fine_s"]
        # ---------------------------------------------------------------- back to the input
        t4 = time.perf_counter()
        out = _fine_to_input(flab, faff, can, image)
        timings["to_input_s"] = time.perf_counter() - t4
        # ---------------------------------------------------------------- post-processing
        t5 = time.perf_counter()
        out, post = postprocess_knee_labels(out, keep_largest=self.keep_largest,
                                            min_component_ml=self.min_component_ml,
                                            cartilage_bone=self.cartilage_bone,
                                            cartilage_contact_mm=self.cartilage_contact_mm,
                                            compartments=self.compartments,
                                            meniscus_contact_mm=self.meniscus_contact_mm)
        warnings += postprocess_warnings(post)
        timings["postprocess_s"] = time.perf_counter() - t5
        timings["total_s"] = time.perf_counter() - t0
        lo = can.voxel_to_world([[b.start - 0.5 for b in box]])[0]
        hi = can.voxel_to_world([[b.stop - 0.5 for b in box]])[0]
        region_mm = [[float(min(a, b)), float(max(a, b))] for a, b in zip(lo, hi, strict=True)]
        for w in warnings:
            log.warning("knee segmentation: %s", w)
        meta = {"source": image.meta.get("source"), "models": {
            "coarse": self.coarse.name, "fine": self.fine.name},
            "precision": self.precision, "backend": self.backend,
            "fusion": self.fusion_record(), "tta": self.tta, "region_mm": region_mm,
            "warnings": list(warnings),
            "timings_s": {k: round(v, 3) for k, v in timings.items()}, "postprocess": post}
        labels = LabelVolume(out.array.astype(np.uint8), image.affine, dict(KNEE), schema="knee",
                             meta=meta)
        return KneeSegmentation(labels, coarse, region_mm, warnings, timings_s=timings,
                                postprocess=post)


def _check_input(image: Volume) -> None:
    if not isinstance(image, Volume):
        raise KneeSegmentationError(f"segment_knee needs a Volume, not {type(image).__name__}")
    if isinstance(image, LabelVolume):
        raise KneeSegmentationError("the input is a label map, not an MR image; give the image")
    try:
        image.require_3d("knee segmentation")
    except DimensionError as exc:
        raise KneeSegmentationError(str(exc)) from exc
    if min(image.shape) < 2:
        raise KneeSegmentationError(f"image of shape {image.shape} is not a 3-D volume")
    image.require_geometry("knee segmentation (the networks work in mm)")


def _input_warnings(image: Volume) -> list[str]:
    """Reasons (strings) why ``image`` is far outside the trained field of view."""
    out = []
    fov = np.asarray(image.shape) * np.asarray(image.spacing)
    if float(fov.min()) < MIN_FOV_MM:
        out.append(f"field of view {np.round(fov, 1).tolist()} mm is smaller than "
                   f"{MIN_FOV_MM} mm along an axis: far outside the trained knee field of view")
    if max(image.spacing) > MAX_SPACING_MM:
        out.append(f"voxel spacing {np.round(image.spacing, 2).tolist()} mm is coarser than "
                   f"{MAX_SPACING_MM} mm: far outside the trained resolutions")
    return out


def _region_from_coarse(clab: np.ndarray, cspacing: Sequence[float], can: Volume,
                        caff: np.ndarray) -> tuple[tuple[slice, slice, slice], str | None]:
    """Voxel box of ``can`` around the largest coarse foreground component (+ margin).

    Returns the box and a warning (None when a knee was found).
    """
    from scipy import ndimage

    vox_ml = float(np.prod(cspacing)) / 1000.0
    bones = np.isin(clab, (KNEE_ID["femur"], KNEE_ID["tibia"]))
    why = None
    full = tuple(slice(0, n) for n in can.shape)
    if bones.sum() * vox_ml < MIN_KNEE_BONE_ML:
        why = (f"no knee found: the coarse model sees {bones.sum() * vox_ml:.1f} mL of femur + "
               f"tibia (< {MIN_KNEE_BONE_ML} mL); the image is far outside the trained field "
               "of view or contrast, do not trust these labels")
    fg = clab > 0
    if not fg.any():
        return full, why  # type: ignore[return-value]
    comp, n = ndimage.label(fg)
    if n > 1:
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        fg = comp == int(sizes.argmax())
    idx = np.nonzero(fg)
    lo_c = np.array([i.min() for i in idx], dtype=float) - 0.5
    hi_c = np.array([i.max() for i in idx], dtype=float) + 0.5
    cvox_to_can = np.linalg.inv(can.affine) @ caff
    corners = np.array([[a, b, c] for a in (lo_c[0], hi_c[0]) for b in (lo_c[1], hi_c[1])
                        for c in (lo_c[2], hi_c[2])])
    pts = corners @ cvox_to_can[:3, :3].T + cvox_to_can[:3, 3]
    margin = REGION_MARGIN_MM / np.asarray(can.spacing)
    lo = np.floor(pts.min(0) + 0.5 - margin).astype(int)
    hi = np.ceil(pts.max(0) + 0.5 + margin).astype(int)
    box = tuple(slice(int(max(a, 0)), int(min(b, n))) for a, b, n in zip(lo, hi, can.shape,
                                                                          strict=True))
    if any(b.stop <= b.start for b in box):
        return full, why  # type: ignore[return-value]
    return box, why  # type: ignore[return-value]


def segment_knee(image: Volume, *, coarse: str | nn.Module = COARSE_MODEL,
                 fine: str | nn.Module = FINE_MODEL, precision: str = DEFAULT_PRECISION,
                 backend: str = DEFAULT_BACKEND, device: str = "cpu",
                 tta: str = DEFAULT_TTA) -> LabelVolume:
    """Segment the 17 knee classes of a 3-D MR image of any contrast and orientation.

    Parameters
    ----------
    image : Volume
        3-D MR image with known geometry (any orientation, spacing and contrast).
    coarse, fine : str or nn.Module
        The networks (default: the shipped ``knee-seg-coarse`` and ``knee-seg-fine``).
    precision : {"fp32", "bf16"}
        Autocast of the torch backend (default :data:`DEFAULT_PRECISION`).
    backend : {"torch", "onnx"}
    device : str
    tta : {"flip", "none"}
        Test-time augmentation (default :data:`DEFAULT_TTA`): ``"flip"`` also runs each
        network on the left-right mirror and averages; ``"none"`` runs each once (faster).

    Returns
    -------
    LabelVolume
        uint8 knee-schema labels (:data:`mskmri.labels.KNEE`) in the geometry of ``image``
        (same shape and affine), after :func:`postprocess_knee_labels`. ``meta`` records the
        models, the fine region (RAS mm), the timings, ``postprocess`` (what the
        post-processing removed, per class, in voxels and mL) and ``warnings`` (e.g. no knee
        found by the coarse model, a fragmented bone).

    Raises
    ------
    KneeSegmentationError
        2-D input, a label map, unknown geometry, a constant image.
    """
    seg = KneeSegmenter(coarse, fine, precision=precision, backend=backend, device=device,
                        tta=tta)
    try:
        return seg.run(image).labels
    finally:
        seg.close()


def knee_model_pair(model: str | None) -> tuple[str, str]:
    """(coarse, fine) model names/paths from the CLI's ``--model``.

    None or ``"knee-seg"``: the shipped pair; a folder: its ``knee-seg-coarse.safetensors``
    and ``knee-seg-fine.safetensors`` (a ``mskmri train knee-seg`` output folder).
    """
    if model is None or model == "knee-seg":
        return COARSE_MODEL, FINE_MODEL
    folder = Path(model)
    if folder.is_dir():
        c, f = folder / f"{COARSE_MODEL}.safetensors", folder / f"{FINE_MODEL}.safetensors"
        if not (c.is_file() and f.is_file()):
            raise KneeSegmentationError(
                f"{folder} lacks {c.name} and/or {f.name}; give the output folder of "
                "`mskmri train knee-seg` or leave --model out for the shipped models")
        return str(c), str(f)
    raise KneeSegmentationError(f"--model {model!r} for the knee must be 'knee-seg' (the shipped "
                                "coarse+fine pair) or a folder holding knee-seg-coarse and "
                                "knee-seg-fine .safetensors files")


def segment_knee_file(image_path: str | os.PathLike[str], out_path: str | os.PathLike[str], *,
                      model: str | None = None, device: str = "cpu",
                      series: str | None = None, echo: float | int | None = None,
                      precision: str = DEFAULT_PRECISION,
                      backend: str = DEFAULT_BACKEND, tta: str = DEFAULT_TTA) -> LabelVolume:
    """Read an image (file or DICOM folder), segment it and write the label map atomically.

    The sidecar (``OUT`` with ``.json``) holds the label names plus a ``"segmentation"``
    record: models, precision, TTA, region (RAS mm), timings and warnings. ``series`` and
    ``echo`` choose one stack of a DICOM folder (see :func:`mskmri.io.read`); ``tta`` as in
    :func:`segment_knee`.

    Returns
    -------
    LabelVolume
        The written labels (input geometry).
    """
    from mskmri.io import atomic_write_json, read, sidecar_path, write

    image = read(image_path, series=series, echo=echo)
    coarse, fine = knee_model_pair(model)
    labels = segment_knee(image, coarse=coarse, fine=fine, precision=precision,
                          backend=backend, device=device, tta=tta)
    write(labels, out_path)
    side = labels.sidecar()
    side["segmentation"] = {"image": str(image_path), **{k: v for k, v in labels.meta.items()
                                                         if k != "source"}}
    atomic_write_json(sidecar_path(out_path), side)
    return labels
