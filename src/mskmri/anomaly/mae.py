"""Cord T2 hyperintensity by uncertainty-guided mask-and-reconstruct (U2AD, arXiv 2503.13400).

A small ViT masked autoencoder (:class:`mskmri.anomaly.mae_net.MaskedAutoencoderViT`) learns, on healthy cords only,
to reconstruct image patches *inside the cord/CSF region* of sagittal T2 slices from the rest
of the slice. A bright intramedullary lesion cannot be predicted from healthy context, so the
reconstruction error marks it. Steps of :func:`detect_cord_hyperintensity`:

1. Canonical sagittal slices: the image and label map are reoriented (no interpolation) to
   ``R I P`` (:data:`CANONICAL_CODES`; each slice has rows superior -> inferior, columns
   anterior -> posterior) and each slice holding at least :data:`MIN_CORD_AREA_MM2` of cord is
   resampled in-plane to :data:`WORK_SPACING_MM` (1 mm, the published input). In-plane spacing
   coarser than :data:`MAX_INPLANE_SPACING_MM` (e.g. axial stacks) is refused.
2. Intensities are divided by the median cord signal of the whole input and multiplied by
   :data:`CORD_LEVEL` (clipped to ``[0, CLIP_MAX]``).
3. Windows of :data:`WINDOW` x :data:`WINDOW` pixels every :data:`WINDOW_STRIDE` pixels cover
   the cord/CSF region; its patches (:data:`PATCH` pixels, at least
   :data:`MIN_REGION_FRACTION` inside the region) are the only ones ever masked.
4. Test-time adaptation (:func:`adapt_model`, on a copy of the model, ``adapt_steps``
   steps, :data:`ADAPT_STEPS` when asked for): every :data:`ADAPT_REFRESH` steps Monte-Carlo
   maps are recomputed and masking is biased towards uncertain patches, epistemic first
   (first half of the steps), aleatoric second, as in U2AD. Off by default
   (:data:`DEFAULT_ADAPT_STEPS` = 0): U2AD adapts on a whole clinical *set*; adapting on one
   input teaches the network that input's own lesion (benchmark: read-zone pixel AUROC on
   lesions rendered into a held-out healthy SCT cord 0.48 with 20 steps vs 0.95 without).
   :func:`adapt_model` takes the slices of many inputs for set-level adaptation.
5. Monte-Carlo inference (:func:`reconstruct_slice`): :data:`MC_REPEATS` repeats; in each,
   the candidate patches are split into :data:`MC_GROUPS` random groups and every group is
   reconstructed once with :data:`MASK_RATIO` of the candidates masked, so every cord patch is
   reconstructed exactly ``MC_REPEATS`` times. Mean reconstruction, epistemic map (variance of
   the reconstructions) and aleatoric map (|image - mean reconstruction|).
6. Anomaly map = |image - mean reconstruction| inside the cord eroded by
   :data:`CORD_EROSION_MM` (as published: absolute, not signed).

Decision rule (documented here, the authors' code has none):

- pixel: its robust z score ``(anomaly - median) / max(1.4826 MAD, MIN_ANOMALY_SCALE)``, the
  median and MAD taken over the input's own eroded cord (so that scanners whose healthy cords
  reconstruct less well are put on one scale), above the calibrated threshold (model card
  ``extra["z_threshold"]``: the ``1 - PIXEL_FPR`` quantile of z over the healthy training
  cord, same pipeline); the map is not read within :data:`FOV_MARGIN_MM` of the slice's upper
  and lower edges (no context there for the reconstruction);
- lesion: a connected group of such pixels on one sagittal slice (8-connected) covering at
  least :data:`MIN_LESION_AREA_MM2`; smaller groups are dropped;
- segment (vertebral level, from the superior endplate of a vertebra to the superior endplate
  of the next one, as T2-MI/RSCI in :mod:`mskmri.measure.spine`): positive when the flagged
  area inside it, summed over slices, is at least :data:`SEGMENT_MIN_AREA_MM2`;
- patient (the whole input): positive when any segment is positive, or, without levels, when
  the flagged area is at least :data:`SEGMENT_MIN_AREA_MM2`.

Differences from the paper (CPU budget): 64-pixel windows instead of the whole 256 x 256
slice, encoder dim 128 / depth 4 (paper 128 / 12), decoder 64 / 2 (paper 64 / 8). As in U2AD a
second head predicts Sobel edges (loss weight :data:`EDGE_WEIGHT`); only the image is used.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from mskmri.errors import GeometryError, LabelError, MskMriError
from mskmri.labels import CORD_HYPERINTENSITY, CSF, SPINAL_CORD
from mskmri.volume import LabelVolume, Volume

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- constants
#: Registered name of the shipped model.
DEFAULT_MODEL = "cord-mae"
#: Architecture name in :data:`mskmri.nn.registry.ARCHITECTURES`.
ARCHITECTURE = "mae-vit"
#: Array axis codes of the canonical stack: slices L->R, rows S->I, columns A->P.
CANONICAL_CODES = "RIP"
#: In-plane pixel spacing the network works at, mm (U2AD: 1 mm).
WORK_SPACING_MM = 1.0
#: In-plane spacings within this of WORK_SPACING_MM are used as they are, mm.
SPACING_TOLERANCE_MM = 0.05
#: Coarsest in-plane spacing accepted (sagittal slices needed), mm.
MAX_INPLANE_SPACING_MM = 1.5
#: Network input edge, pixels (at WORK_SPACING_MM).
WINDOW = 64
#: ViT patch edge, pixels (U2AD: 8).
PATCH = 8
#: Distance between neighbouring window origins, pixels.
WINDOW_STRIDE = 24
#: Fraction of the cord/CSF patches masked at once (U2AD: 0.75).
MASK_RATIO = 0.75
#: Groups a repeat's candidate patches are split into (each reconstructed once per repeat).
MC_GROUPS = 4
#: Monte-Carlo repeats: reconstructions of every cord patch (U2AD: K = 10).
MC_REPEATS = 8
#: A patch is a masking candidate when at least this fraction of it is cord/CSF.
MIN_REGION_FRACTION = 0.1
#: Median cord signal after normalisation.
CORD_LEVEL = 0.4
#: Normalised intensities are clipped to [0, CLIP_MAX].
CLIP_MAX = 3.0
#: Without a CSF label, the region around the cord masked as "CSF", mm.
CSF_MARGIN_MM = 3.0
#: The anomaly map is read inside the cord eroded by this, mm (CSF partial volume at the edge).
CORD_EROSION_MM = 1.0
#: Sagittal slices with less cord than this are skipped, mm^2.
MIN_CORD_AREA_MM2 = 20.0
#: Voxel false-positive rate on healthy training cords that sets the z threshold.
PIXEL_FPR = 0.005
#: Floor of the robust spread (1.4826 MAD) of the anomaly in z scores (normalised units).
MIN_ANOMALY_SCALE = 0.01
#: The anomaly map is not read this close to the slice's upper and lower edges, mm.
FOV_MARGIN_MM = 8.0
#: Smallest flagged group kept, mm^2 (in-plane, per slice).
MIN_LESION_AREA_MM2 = 4.0
#: Flagged area (summed over slices) that makes a segment / patient positive, mm^2.
SEGMENT_MIN_AREA_MM2 = 4.0
#: Weight of the Sobel-edge head's loss (U2AD reconstructs pixels and edges).
EDGE_WEIGHT = 0.1
#: Test-time adaptation: steps, learning rate, windows per step, refresh period (steps),
#: Monte-Carlo repeats of the guiding maps.
ADAPT_STEPS = 20
#: Adaptation steps of :func:`detect_cord_hyperintensity` unless asked (see step 4 above).
DEFAULT_ADAPT_STEPS = 0
ADAPT_LR = 1e-4
ADAPT_BATCH = 8
ADAPT_REFRESH = 10
ADAPT_MC_REPEATS = 2
#: Added to the guiding uncertainty (times its mean) so that every candidate can be masked.
ADAPT_FLOOR = 0.1
#: Windows per forward pass at inference.
INFER_BATCH = 64
#: Label value of the output mask (spine schema).
OUTPUT_VALUE = CORD_HYPERINTENSITY
#: Schema of the detection record beside the mask.
RECORD_SCHEMA = "mskmri/cord-hyperintensity/1"
#: The decision rule, recorded with every output.
DECISION_RULE = (
    "pixel: robust z of the anomaly |image - mean reconstruction| (median and 1.4826 MAD over "
    "the input's eroded cord) > z_threshold inside the cord eroded by "
    f"{CORD_EROSION_MM:g} mm, farther than {FOV_MARGIN_MM:g} mm from the slice's upper and "
    "lower edges; lesion: 8-connected group on one sagittal slice >= "
    f"{MIN_LESION_AREA_MM2:g} mm^2; segment (superior endplate of a vertebra to that of the next):"
    f" positive when its flagged area summed over slices >= {SEGMENT_MIN_AREA_MM2:g} mm^2; "
    "patient: any positive segment (without levels: flagged area >= "
    f"{SEGMENT_MIN_AREA_MM2:g} mm^2)"
)


class CordHyperintensityError(MskMriError):
    """Cord hyperintensity detection cannot run on this input (no cord, not sagittal, ...)."""


# ----------------------------------------------------------------------------- network
def _torch() -> Any:
    from mskmri._optional import optional_import

    return optional_import("torch")


def patch_fraction(mask: np.ndarray, patch: int = PATCH) -> np.ndarray:
    """Fraction of each patch inside ``mask``.

    Parameters
    ----------
    mask : (..., S, S) bool ndarray
    patch : int

    Returns
    -------
    (..., (S/patch)^2) float ndarray, row-major patch order.
    """
    m = np.asarray(mask, dtype=np.float32)
    s = m.shape[-1]
    g = s // patch
    r = m.reshape(*m.shape[:-2], g, patch, g, patch).mean(axis=(-3, -1))
    return r.reshape(*m.shape[:-2], g * g)


def _patch_mean(arr: np.ndarray, patch: int = PATCH) -> np.ndarray:
    """Mean of a (S, S) map over each patch -> ((S/patch)^2,) row-major."""
    g = arr.shape[-1] // patch
    return arr.reshape(g, patch, g, patch).mean(axis=(1, 3)).ravel()


def token_pixels(tokens: np.ndarray, patch: int = PATCH) -> np.ndarray:
    """(..., N) per-patch values -> (..., S, S) pixels (each patch filled with its value)."""
    t = np.asarray(tokens)
    g = int(round(math.sqrt(t.shape[-1])))
    grid = t.reshape(*t.shape[:-1], g, g)
    return np.repeat(np.repeat(grid, patch, axis=-2), patch, axis=-1)


# ----------------------------------------------------------------------------- slices
@dataclass
class CordSlice:
    """One canonical sagittal slice at :data:`WORK_SPACING_MM`.

    Attributes
    ----------
    image : (H, W) float32 ndarray
        Normalised intensities (median cord = :data:`CORD_LEVEL`).
    region : (H, W) bool ndarray
        Cord/CSF region: the only pixels whose patches are masked.
    cord : (H, W) bool ndarray
    inner : (H, W) bool ndarray
        Cord eroded by :data:`CORD_EROSION_MM`: where the anomaly map is read.
    """

    image: np.ndarray
    region: np.ndarray
    cord: np.ndarray
    inner: np.ndarray


def normalise(image: np.ndarray, cord: np.ndarray) -> np.ndarray:
    """Divide by the median cord signal, times :data:`CORD_LEVEL`, clipped to [0, CLIP_MAX].

    Parameters
    ----------
    image : ndarray
    cord : bool ndarray, same shape

    Returns
    -------
    float32 ndarray
    """
    vals = np.asarray(image, dtype=np.float64)[np.asarray(cord, dtype=bool)]
    med = float(np.median(vals)) if vals.size else 0.0
    if not med > 0:
        raise CordHyperintensityError(
            f"the median image signal in the cord is {med:g}, not positive; is the label map "
            "on this image's grid (cord = 201) and the image T2-weighted?")
    return np.clip(np.asarray(image, dtype=np.float32) / med * CORD_LEVEL, 0.0,
                   CLIP_MAX).astype(np.float32)


def make_slice(image: np.ndarray, cord: np.ndarray, csf: np.ndarray | None = None) -> CordSlice:
    """A :class:`CordSlice` from a normalised 1-mm slice and its masks.

    Parameters
    ----------
    image : (H, W) float ndarray
        Already normalised (:func:`normalise`), rows S->I, columns A->P, 1 mm pixels.
    cord : (H, W) bool ndarray
    csf : (H, W) bool ndarray, optional
        Without it the cord dilated by :data:`CSF_MARGIN_MM` is the region.
    """
    cord = np.asarray(cord, dtype=bool)
    depth = ndimage.distance_transform_edt(cord)
    inner = depth > CORD_EROSION_MM / WORK_SPACING_MM
    if csf is not None and np.asarray(csf).any():
        region = cord | np.asarray(csf, dtype=bool)
    else:
        outside = ndimage.distance_transform_edt(~cord)
        region = outside <= CSF_MARGIN_MM / WORK_SPACING_MM
    return CordSlice(np.asarray(image, dtype=np.float32), region, cord, inner)


def window_origins(region: np.ndarray, window: int = WINDOW,
                   stride: int = WINDOW_STRIDE) -> list[tuple[int, int]]:
    """Origins (row, col) of windows covering every ``region`` pixel (may lie outside the
    slice: windows are cut from a zero-padded copy)."""
    idx = np.argwhere(region)
    if idx.size == 0:
        return []
    r0, c0 = idx.min(0)
    r1, c1 = idx.max(0)
    margin = (window - stride) // 2
    rows = list(range(int(r0) - margin, int(r1) - margin + 1, stride)) or [int(r0) - margin]
    cols = list(range(int(c0) - margin, int(c1) - margin + 1, stride)) or [int(c0) - margin]
    if rows[-1] + window - margin <= r1:
        rows.append(rows[-1] + stride)
    if cols[-1] + window - margin <= c1:
        cols.append(cols[-1] + stride)
    out = []
    for r in rows:
        for c in cols:
            rr = slice(max(r, 0), max(r + window, 0))
            cc = slice(max(c, 0), max(c + window, 0))
            if region[rr, cc].any():
                out.append((r, c))
    return out


def cut_window(arr: np.ndarray, origin: tuple[int, int], window: int = WINDOW) -> np.ndarray:
    """The ``window`` x ``window`` piece of ``arr`` at ``origin`` (zero outside ``arr``)."""
    out = np.zeros((window, window), dtype=arr.dtype)
    r, c = origin
    h, w = arr.shape
    rs, cs = max(r, 0), max(c, 0)
    re, ce = min(r + window, h), min(c + window, w)
    if re > rs and ce > cs:
        out[rs - r:re - r, cs - c:ce - c] = arr[rs:re, cs:ce]
    return out


def _taper(window: int) -> np.ndarray:
    t = np.sin(np.pi * (np.arange(window) + 0.5) / window)
    return (np.outer(t, t) + 0.05).astype(np.float32)


@dataclass
class SliceMaps:
    """Monte-Carlo maps of one slice (all (H, W) float32; 0 outside the region).

    Attributes
    ----------
    mean : mean reconstruction
    epistemic : variance of the reconstructions
    aleatoric : |image - mean reconstruction| in the region
    anomaly : |image - mean reconstruction| inside the eroded cord (0 elsewhere)
    """

    mean: np.ndarray
    epistemic: np.ndarray
    aleatoric: np.ndarray
    anomaly: np.ndarray


def _windows(sl: CordSlice) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """Window origins, (B, W, W) window images and (B, N) masking candidates of a slice."""
    origins = window_origins(sl.region)
    if not origins:
        return [], np.zeros((0, WINDOW, WINDOW), np.float32), \
            np.zeros((0, (WINDOW // PATCH) ** 2), bool)
    imgs = np.stack([cut_window(sl.image, o) for o in origins])
    regions = np.stack([cut_window(sl.region, o) for o in origins])
    return origins, imgs, patch_fraction(regions) >= MIN_REGION_FRACTION


def _forward(model: Any, imgs: np.ndarray, masks: np.ndarray, device: str) -> np.ndarray:
    torch = _torch()
    outs = []
    for i in range(0, len(imgs), INFER_BATCH):
        x = torch.from_numpy(imgs[i:i + INFER_BATCH, None]).to(device)
        m = torch.from_numpy(masks[i:i + INFER_BATCH]).to(device)
        outs.append(model(x, m)[:, 0].float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros_like(imgs)


def mc_masks(cand: np.ndarray, rng: np.random.Generator, *, ratio: float = MASK_RATIO,
             groups: int = MC_GROUPS) -> tuple[np.ndarray, np.ndarray]:
    """One Monte-Carlo repeat's masks: every candidate is a target exactly once.

    Parameters
    ----------
    cand : (B, N) bool ndarray
        Candidate patches per window.
    rng : numpy Generator

    Returns
    -------
    masks : (groups, B, N) bool
        Hidden patches of each pass (the targets plus random other candidates, ``ratio`` of
        the candidates in all).
    targets : (groups, B, N) bool
        The patches whose reconstruction is recorded in each pass.
    """
    b, n = cand.shape
    masks = np.zeros((groups, b, n), bool)
    targets = np.zeros((groups, b, n), bool)
    for i in range(b):
        idx = np.flatnonzero(cand[i])
        if idx.size == 0:
            continue
        perm = rng.permutation(idx)
        grp = np.arange(idx.size) % groups
        for g in range(groups):
            tgt = perm[grp == g]
            rest = perm[grp != g]
            n_more = max(0, min(rest.size, int(round(ratio * idx.size)) - tgt.size))
            extra = rng.choice(rest, n_more, replace=False) if n_more else rest[:0]
            targets[g, i, tgt] = True
            masks[g, i, tgt] = True
            masks[g, i, extra] = True
    # never hide every patch of a window (the encoder needs one visible key)
    full = masks.all(axis=2)
    masks[full, 0] = False
    return masks, targets


def reconstruct_slice(model: Any, sl: CordSlice, rng: np.random.Generator, *,
                      repeats: int = MC_REPEATS, device: str = "cpu") -> SliceMaps:
    """Monte-Carlo reconstruction of the cord/CSF region of one slice.

    Parameters
    ----------
    model : nn.Module
        A :class:`~mskmri.anomaly.mae_net.MaskedAutoencoderViT` in eval mode.
    sl : CordSlice
    rng : numpy Generator
        Draws the random maskings (seed it for reproducible maps).
    repeats : int
        Reconstructions of every candidate patch.
    device : str

    Returns
    -------
    SliceMaps
    """
    torch = _torch()
    h, w = sl.image.shape
    origins, imgs, cand = _windows(sl)
    acc = np.zeros((h, w), np.float64)
    acc2 = np.zeros((h, w), np.float64)
    accv = np.zeros((h, w), np.float64)
    if not origins:
        z = np.zeros((h, w), np.float32)
        return SliceMaps(z, z.copy(), z.copy(), z.copy())
    taper = _taper(WINDOW)
    s1 = np.zeros(imgs.shape, np.float64)
    s2 = np.zeros(imgs.shape, np.float64)
    cnt = np.zeros(imgs.shape, np.float64)
    with torch.no_grad():
        for _ in range(repeats):
            masks, targets = mc_masks(cand, rng)
            for g in range(masks.shape[0]):
                rec = _forward(model, imgs, masks[g], device)
                tp = token_pixels(targets[g]).astype(np.float64)
                s1 += rec * tp
                s2 += rec.astype(np.float64) ** 2 * tp
                cnt += tp
    ok = cnt > 0
    mean_w = np.where(ok, s1 / np.maximum(cnt, 1), 0.0)
    var_w = np.where(ok, np.maximum(s2 / np.maximum(cnt, 1) - mean_w ** 2, 0.0), 0.0)
    for k, (r, c) in enumerate(origins):
        rs, cs = max(r, 0), max(c, 0)
        re, ce = min(r + WINDOW, h), min(c + WINDOW, w)
        if re <= rs or ce <= cs:
            continue
        sub = (slice(rs - r, re - r), slice(cs - c, ce - c))
        wt = taper[sub] * ok[k][sub]
        acc[rs:re, cs:ce] += wt * mean_w[k][sub]
        accv[rs:re, cs:ce] += wt * var_w[k][sub]
        acc2[rs:re, cs:ce] += wt
    covered = acc2 > 0
    mean = np.where(covered, acc / np.maximum(acc2, 1e-12), 0.0).astype(np.float32)
    var = np.where(covered, accv / np.maximum(acc2, 1e-12), 0.0).astype(np.float32)
    err = np.where(covered & sl.region, np.abs(sl.image - mean), 0.0).astype(np.float32)
    anomaly = np.where(covered & sl.inner, err, 0.0).astype(np.float32)
    return SliceMaps(mean, var * sl.region, err, anomaly)


def guided_masks(cand: np.ndarray, weight: np.ndarray, rng: np.random.Generator, *,
                 ratio: float = MASK_RATIO) -> np.ndarray:
    """Masks that hide ``ratio`` of the candidates, drawn with probability ~ ``weight``.

    Parameters
    ----------
    cand : (B, N) bool ndarray
    weight : (B, N) float ndarray
        Per-patch uncertainty (>= 0); :data:`ADAPT_FLOOR` x its mean is added.

    Returns
    -------
    (B, N) bool ndarray
    """
    out = np.zeros(cand.shape, bool)
    for i in range(cand.shape[0]):
        idx = np.flatnonzero(cand[i])
        if idx.size == 0:
            continue
        k = min(idx.size, max(1, int(round(ratio * idx.size))))
        wv = np.maximum(weight[i, idx].astype(np.float64), 0.0)
        wv = wv + ADAPT_FLOOR * (wv.mean() if wv.mean() > 0 else 1.0)
        out[i, rng.choice(idx, k, replace=False, p=wv / wv.sum())] = True
    full = out.all(axis=1)
    out[full, 0] = False
    return out


def adapt_model(model: Any, slices: Sequence[CordSlice], rng: np.random.Generator, *,
                steps: int = ADAPT_STEPS, lr: float = ADAPT_LR, device: str = "cpu") -> Any:
    """Uncertainty-guided test-time adaptation of a *copy* of ``model`` on ``slices``.

    Every :data:`ADAPT_REFRESH` steps the Monte-Carlo maps of all windows are recomputed
    (:data:`ADAPT_MC_REPEATS` repeats); masking then favours patches with high epistemic
    uncertainty (first half of the steps) or high aleatoric error (second half). Each step
    trains on :data:`ADAPT_BATCH` windows with :func:`reconstruction_loss` (Adam, ``lr``).

    Returns
    -------
    nn.Module
        The adapted copy, in eval mode (``model`` is unchanged).
    """
    torch = _torch()
    from mskmri.anomaly.mae_net import reconstruction_loss

    net = copy.deepcopy(model).to(device)
    if steps <= 0:
        return net.eval()
    wins: list[np.ndarray] = []
    cands: list[np.ndarray] = []
    owner: list[tuple[int, tuple[int, int]]] = []
    for s, sl in enumerate(slices):
        origins, imgs, cand = _windows(sl)
        wins.extend(imgs)
        cands.extend(cand)
        owner.extend((s, o) for o in origins)
    if not wins:
        return net.eval()
    imgs_all = np.stack(wins)
    cand_all = np.stack(cands)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    weight = np.ones(cand_all.shape, np.float32)
    for step in range(steps):
        if step % ADAPT_REFRESH == 0:
            net.eval()
            maps = [reconstruct_slice(net, sl, rng, repeats=ADAPT_MC_REPEATS, device=device)
                    for sl in slices]
            use_epistemic = step < steps / 2
            for k, (s, o) in enumerate(owner):
                m = maps[s].epistemic if use_epistemic else maps[s].aleatoric
                weight[k] = _patch_mean(cut_window(m, o))
            net.train()
        pick = rng.choice(len(imgs_all), min(ADAPT_BATCH, len(imgs_all)), replace=False)
        masks = guided_masks(cand_all[pick], weight[pick], rng)
        x = torch.from_numpy(imgs_all[pick, None]).to(device)
        m = torch.from_numpy(masks).to(device)
        loss = reconstruction_loss(net(x, m), x, m, edge_weight=EDGE_WEIGHT)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


# ----------------------------------------------------------------------------- volumes
def _inplane_zoom(arr: np.ndarray, shape: tuple[int, int], order: int) -> np.ndarray:
    if arr.shape == shape:
        return arr
    factors = (shape[0] / arr.shape[0], shape[1] / arr.shape[1])
    if order == 0:
        out = ndimage.zoom(arr.astype(np.uint8), factors, order=0, grid_mode=True,
                           mode="grid-constant")
        return out.astype(bool)
    return ndimage.zoom(arr.astype(np.float32), factors, order=order, grid_mode=True,
                        mode="nearest").astype(np.float32)


def _work_shape(shape: tuple[int, int], spacing: tuple[float, float]) -> tuple[int, int]:
    return (max(1, int(round(shape[0] * spacing[0] / WORK_SPACING_MM))),
            max(1, int(round(shape[1] * spacing[1] / WORK_SPACING_MM))))


def canonical_stack(image: Volume, cord: np.ndarray, csf: np.ndarray | None
                    ) -> tuple[Volume, np.ndarray, np.ndarray | None]:
    """Reorient ``image`` and its masks to :data:`CANONICAL_CODES` (no interpolation)."""
    aff = image.affine
    can = image.reorient(CANONICAL_CODES)
    cord_c = Volume(cord.astype(np.uint8), aff).reorient(CANONICAL_CODES).array.astype(bool)
    csf_c = (Volume(csf.astype(np.uint8), aff).reorient(CANONICAL_CODES).array.astype(bool)
             if csf is not None else None)
    return can, cord_c, csf_c


def check_sagittal(can: Volume) -> tuple[float, float]:
    """In-plane (S-I, A-P) spacing of the canonical stack; refuses non-sagittal data."""
    sp = can.spacing
    inplane = (float(sp[1]), float(sp[2]))
    if can.shape[0] > 1 and 1 in can.shape[1:]:
        raise CordHyperintensityError(
            f"a 2-D input must be a sagittal slice, but its plane holds the "
            f"{'S-I' if can.shape[1] == 1 else 'A-P'} axis only once (canonical R, I, P shape "
            f"{can.shape}); check the file's affine or give a sagittal T2 image")
    if max(inplane) > MAX_INPLANE_SPACING_MM:
        raise CordHyperintensityError(
            f"cord hyperintensity needs sagittal slices: the in-plane spacing (S-I, A-P) is "
            f"{inplane[0]:.2f} x {inplane[1]:.2f} mm, coarser than {MAX_INPLANE_SPACING_MM} mm; "
            "give a sagittal T2 series (axial-only data cannot be used)")
    return inplane


@dataclass
class CordResult:
    """What :func:`detect_cord_hyperintensity` returns (maps on the input grid).

    Attributes
    ----------
    mask : LabelVolume
        Flagged pixels (value :data:`OUTPUT_VALUE` = 203, cord T2 hyperintensity).
    anomaly, epistemic, reconstruction : Volume
        |image - mean reconstruction| in the eroded cord (normalised units: median cord =
        :data:`CORD_LEVEL`), variance of the reconstructions, mean reconstruction.
    inner : bool ndarray
        The eroded cord where the anomaly map was read (input grid).
    levels : list of dict
        One row per vertebral-level segment (see :data:`DECISION_RULE`).
    patient : dict
        Patient-level decision and totals.
    record : dict
        Parameters, thresholds, model, seeds, timing, what ran (2-D or 3-D).
    warnings : list of str
    """

    mask: LabelVolume
    anomaly: Volume
    epistemic: Volume
    reconstruction: Volume
    inner: np.ndarray
    levels: list[dict[str, Any]]
    patient: dict[str, Any]
    record: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def calibrated_threshold(model: str) -> float | None:
    """The z threshold stored in the model card (``extra["z_threshold"]``)."""
    from mskmri.nn.registry import read_card, resolve_weights

    path, _ = resolve_weights(model)
    value = read_card(path).extra.get("z_threshold")
    return float(value) if value is not None else None


def prepare_slices(image: Volume, cord: np.ndarray, csf: np.ndarray | None
                   ) -> tuple[Volume, list[int], list[CordSlice], tuple[float, float]]:
    """Canonical stack, the slice indices used and their :class:`CordSlice` at 1 mm."""
    can, cord_c, csf_c = canonical_stack(image, cord, csf)
    inplane = check_sagittal(can)
    pix_mm2 = inplane[0] * inplane[1]
    norm = normalise(can.array, cord_c)
    used: list[int] = []
    slices: list[CordSlice] = []
    for i in range(can.shape[0]):
        if cord_c[i].sum() * pix_mm2 < MIN_CORD_AREA_MM2:
            continue
        shape = _work_shape(norm[i].shape, inplane)
        img = _inplane_zoom(norm[i], shape, 1)
        cd = _inplane_zoom(cord_c[i], shape, 0)
        cs = _inplane_zoom(csf_c[i], shape, 0) if csf_c is not None else None
        used.append(i)
        slices.append(make_slice(img, cd, cs))
    return can, used, slices, inplane


def detect_cord_hyperintensity(
    image: Volume,
    seg: LabelVolume,
    *,
    model: Any = DEFAULT_MODEL,
    threshold: float | None = None,
    segments: np.ndarray | None = None,
    segment_names: Mapping[int, str] | None = None,
    repeats: int = MC_REPEATS,
    adapt_steps: int = DEFAULT_ADAPT_STEPS,
    seed: int = 0,
    device: str = "cpu",
) -> CordResult:
    """Detect intramedullary T2 hyperintensity on sagittal T2 MRI (U2AD).

    Parameters
    ----------
    image : Volume
        Sagittal T2-weighted image (3-D stack or one 2-D slice) with known geometry.
    seg : LabelVolume
        Spine-schema label map on ``image``'s grid: cord 201 (a labelled hyperintensity 203
        counts as cord), CSF 202 (optional: without it the cord dilated by
        :data:`CSF_MARGIN_MM` is masked); vertebrae give the level segments.
    model : str, path or nn.Module
        Registered name (:data:`DEFAULT_MODEL`), ``*.safetensors`` file, or a loaded network.
    threshold : float, optional
        Threshold on the robust z score of the anomaly map; default: the model card's.
    segments : (I, J, K) int ndarray, optional
        Level segment id per voxel on ``image``'s grid (0 = none); default: from the
        vertebrae of ``seg`` (:func:`level_segments`).
    segment_names : mapping, optional
        Segment id -> name (with ``segments``).
    repeats : int
        Monte-Carlo reconstructions of every cord patch.
    adapt_steps : int
        Uncertainty-guided test-time adaptation steps on this input (default
        :data:`DEFAULT_ADAPT_STEPS` = 0, none; see step 4 of the module notes).
    seed : int
        Seed of every random masking.
    device : str

    Returns
    -------
    CordResult
    """
    import time

    torch = _torch()
    t0 = time.perf_counter()
    image.require_geometry("cord hyperintensity detection")
    if not image.same_geometry(seg):
        raise GeometryError(f"the label map's grid {seg.shape} differs from the image's "
                            f"{image.shape} (or its affine does); give a label map made on "
                            "this image")
    cord = seg.mask(SPINAL_CORD, CORD_HYPERINTENSITY)
    if not cord.any():
        raise LabelError("the label map has no spinal cord (201): pass --seg with the cord "
                         "labelled 201 (CSF 202) on the image's grid")
    csf = seg.mask(CSF) if (seg.array == CSF).any() else None
    warnings: list[str] = []
    if csf is None:
        warnings.append(f"no CSF (202) in the label map: the cord dilated by "
                        f"{CSF_MARGIN_MM:g} mm is masked instead")
    if segments is None:
        segments, segment_names, seg_warn = level_segments(seg)
        warnings += seg_warn
    names = dict(segment_names or {})
    can, used, slices, inplane = prepare_slices(image, cord, csf)
    if not slices:
        raise CordHyperintensityError(
            f"no sagittal slice holds {MIN_CORD_AREA_MM2:g} mm^2 of cord; is the cord in view "
            "and the label map on this image's grid?")
    card_extra: dict[str, Any] = {}
    if isinstance(model, (str, Path)):
        from mskmri.nn.registry import load_model

        net, card = load_model(str(model), device=device)
        card_extra = dict(card.extra)
        model_name = card.name
        if threshold is None:
            threshold = card_extra.get("z_threshold")
    else:
        net, model_name = model, type(model).__name__
    if threshold is None:
        raise CordHyperintensityError("no z threshold: the model card has none; pass "
                                      "--threshold or use a calibrated model")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = adapt_model(net, slices, rng, steps=adapt_steps, device=device)
    t1 = time.perf_counter()
    shape_c = can.shape
    anom = np.zeros(shape_c, np.float32)
    epi = np.zeros(shape_c, np.float32)
    rec = np.zeros(shape_c, np.float32)
    for i, sl in zip(used, slices, strict=True):
        maps = reconstruct_slice(net, sl, rng, repeats=repeats, device=device)
        shp = shape_c[1:]
        anom[i] = _inplane_zoom(maps.anomaly, shp, 1)
        epi[i] = _inplane_zoom(maps.epistemic, shp, 1)
        rec[i] = _inplane_zoom(maps.mean, shp, 1)
    # eroded cord on the native grid (the zoomed map is read there only)
    cord_c = canonical_stack(image, cord, None)[1]
    inner_c = np.zeros(shape_c, bool)
    for i in used:
        inner_c[i] = ndimage.distance_transform_edt(cord_c[i], sampling=inplane) > \
            CORD_EROSION_MM
    margin = int(math.ceil(FOV_MARGIN_MM / inplane[0]))
    inner_c[:, :margin] = False
    inner_c[:, shape_c[1] - margin:] = False
    anom = np.where(inner_c, anom, 0.0).astype(np.float32)
    t2 = time.perf_counter()

    def back(arr: np.ndarray, label: bool = False) -> np.ndarray:
        out = Volume(arr, can.affine).reorient(image.orientation)
        if not out.same_geometry(image):  # pragma: no cover - reorient is exact
            out = out.resample_to(image, order=0 if label else 1)
        return out.array

    anomaly = image.with_array(back(anom))
    inner = back(inner_c.astype(np.uint8), label=True).astype(bool)
    mask_arr, levels, patient = apply_threshold(anomaly, inner, float(threshold), segments,
                                                names)
    mode = "2-D (one sagittal slice)" if can.shape[0] == 1 else \
        f"3-D ({len(used)} sagittal slices through the cord)"
    record = {
        "method": "U2AD uncertainty-guided mask-and-reconstruct (arXiv 2503.13400)",
        "ran_on": mode, "slices_used": used, "model": model_name,
        "z_threshold": float(threshold), "decision_rule": DECISION_RULE,
        "anomaly_median": patient.pop("_median"), "anomaly_scale": patient.pop("_scale"),
        "parameters": {"window": WINDOW, "patch": PATCH, "mask_ratio": MASK_RATIO,
                       "mc_repeats": repeats, "mc_groups": MC_GROUPS,
                       "adapt_steps": adapt_steps, "adapt_lr": ADAPT_LR,
                       "adapt_refresh": ADAPT_REFRESH, "seed": seed,
                       "cord_erosion_mm": CORD_EROSION_MM, "csf_margin_mm": CSF_MARGIN_MM,
                       "fov_margin_mm": FOV_MARGIN_MM,
                       "min_anomaly_scale": MIN_ANOMALY_SCALE,
                       "min_lesion_area_mm2": MIN_LESION_AREA_MM2,
                       "segment_min_area_mm2": SEGMENT_MIN_AREA_MM2,
                       "work_spacing_mm": WORK_SPACING_MM, "cord_level": CORD_LEVEL},
        "anomaly_units": f"normalised signal (median cord = {CORD_LEVEL})",
        "seconds": {"adapt": round(t1 - t0, 2), "reconstruct": round(t2 - t1, 2)},
    }
    from mskmri.weights import model_caveat

    caveat = model_caveat(str(model)) if isinstance(model, (str, Path)) else None
    if caveat:
        warnings.append(caveat)
    mask = LabelVolume(mask_arr.astype(np.uint8) * OUTPUT_VALUE, image.affine,
                       {OUTPUT_VALUE: "cord_t2_hyperintensity"}, schema="spine",
                       meta=dict(image.meta))
    return CordResult(mask=mask, anomaly=anomaly, epistemic=image.with_array(back(epi)),
                      reconstruction=image.with_array(back(rec)), inner=inner, levels=levels,
                      patient=patient, record=record, warnings=warnings)


def apply_threshold(anomaly: Volume, inner: np.ndarray, threshold: float,
                    segments: np.ndarray | None, names: Mapping[int, str] | None
                    ) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
    """Flag pixels of an anomaly map and take the segment / patient decisions.

    Parameters
    ----------
    anomaly : Volume
        Anomaly map on the input grid (:attr:`CordResult.anomaly`).
    inner : bool ndarray
        Eroded cord on the same grid.
    threshold : float
        Threshold on the robust z score (:func:`robust_z`).
    segments, names
        Level segment id per voxel (or None) and their names.

    Returns
    -------
    flagged : bool ndarray
        On the input grid.
    levels, patient
        As :func:`decide` (``patient`` also holds ``"_median"`` and ``"_scale"``, the z
        statistics).
    """
    z, med, scale = robust_z(anomaly.array, inner)
    can = anomaly.with_array(z).reorient(CANONICAL_CODES)
    sp = can.spacing
    inplane = (float(sp[1]), float(sp[2]))
    flagged_c = flag_pixels(can.array, threshold, inplane)
    flagged = Volume(flagged_c.astype(np.uint8), can.affine).reorient(
        anomaly.orientation).array.astype(bool)
    levels, patient = decide(flagged, anomaly.array, inner, segments, dict(names or {}),
                             inplane[0] * inplane[1])
    patient["_median"], patient["_scale"] = round(med, 5), round(scale, 5)
    return flagged, levels, patient


def robust_z(anomaly: np.ndarray, inner: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Robust z score of an anomaly map over the eroded cord.

    Parameters
    ----------
    anomaly : float ndarray
    inner : bool ndarray
        Where the map is read (its median and MAD are taken there).

    Returns
    -------
    z : float32 ndarray
        ``(anomaly - median) / max(1.4826 MAD, MIN_ANOMALY_SCALE)`` inside ``inner``, 0
        elsewhere.
    median, scale : float
    """
    vals = anomaly[inner]
    if vals.size == 0:
        return np.zeros(anomaly.shape, np.float32), 0.0, MIN_ANOMALY_SCALE
    med = float(np.median(vals))
    scale = max(1.4826 * float(np.median(np.abs(vals - med))), MIN_ANOMALY_SCALE)
    z = np.where(inner, (anomaly - med) / scale, 0.0).astype(np.float32)
    return z, med, scale


def flag_pixels(anomaly: np.ndarray, threshold: float, inplane_mm: tuple[float, float]
                ) -> np.ndarray:
    """Pixels above ``threshold`` in 8-connected groups of >= :data:`MIN_LESION_AREA_MM2`
    on each slice of a canonical stack ``anomaly`` (S, H, W)."""
    out = np.zeros(anomaly.shape, bool)
    pix = inplane_mm[0] * inplane_mm[1]
    for i in range(anomaly.shape[0]):
        above = anomaly[i] > threshold
        if not above.any():
            continue
        lab, n = ndimage.label(above, structure=np.ones((3, 3)))
        sizes = ndimage.sum_labels(above, lab, index=np.arange(1, n + 1)) * pix
        keep = np.flatnonzero(sizes >= MIN_LESION_AREA_MM2) + 1
        out[i] = np.isin(lab, keep)
    return out


def decide(flagged: np.ndarray, anomaly: np.ndarray, inner: np.ndarray,
           segments: np.ndarray | None, names: Mapping[int, str], pixel_mm2: float
           ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Segment- and patient-level decisions (:data:`DECISION_RULE`).

    Parameters
    ----------
    flagged, inner : bool ndarray
        Flagged pixels and the eroded cord (same grid).
    anomaly : float ndarray
    segments : int ndarray or None
        Segment id per voxel (0 = none).
    names : mapping
        Segment id -> name.
    pixel_mm2 : float
        In-plane pixel area, mm^2.

    Returns
    -------
    levels : list of dict
        ``structure``, ``cord_area_mm2``, ``flagged_area_mm2``, ``max_anomaly``,
        ``mean_anomaly``, ``positive``.
    patient : dict
    """
    rows: list[dict[str, Any]] = []
    if segments is not None:
        for sid in sorted(int(v) for v in np.unique(segments[inner]) if v > 0):
            sel = inner & (segments == sid)
            fa = float((flagged & (segments == sid)).sum() * pixel_mm2)
            rows.append({"structure": names.get(sid, f"segment {sid}"), "segment_id": sid,
                         "cord_area_mm2": round(float(sel.sum() * pixel_mm2), 2),
                         "flagged_area_mm2": round(fa, 2),
                         "max_anomaly": round(float(anomaly[sel].max()), 4),
                         "mean_anomaly": round(float(anomaly[sel].mean()), 4),
                         "positive": bool(fa >= SEGMENT_MIN_AREA_MM2)})
    total = float(flagged.sum() * pixel_mm2)
    if rows:
        positive = any(r["positive"] for r in rows)
        basis = "any positive segment"
    else:
        positive = total >= SEGMENT_MIN_AREA_MM2
        basis = "no level segments: flagged area"
    patient = {"positive": bool(positive), "basis": basis,
               "flagged_area_mm2": round(total, 2),
               "max_anomaly": round(float(anomaly[inner].max()) if inner.any() else 0.0, 4),
               "positive_segments": [r["structure"] for r in rows if r["positive"]]}
    return rows, patient


def level_segments(seg: LabelVolume) -> tuple[np.ndarray | None, dict[int, str], list[str]]:
    """Vertebral-level segment of every voxel, as T2-MI/RSCI uses them.

    A segment runs from the superior endplate midpoint of a vertebra to that of the next one
    below (the last vertebra: to its own inferior endplate), along each vertebra's S-I axis
    (:func:`mskmri.measure.spine.analyse_spine` geometry).

    Returns
    -------
    segments : int ndarray or None
        Segment id (the vertebra's label value) per cord/CSF voxel (0 elsewhere); None
        without vertebrae.
    names : dict
        Segment id -> level name ("C3", or "V1002" for ordinal levels).
    warnings : list of str
    """
    from mskmri.measure import spine as sp

    vert = [v for v in seg.present_values() if sp.is_vertebra_value(v)]
    if not vert:
        return None, {}, ["no vertebrae in the label map: no level segments, patient-level "
                          "decision only"]
    spine_log = logging.getLogger(sp.__name__)
    level = spine_log.level
    spine_log.setLevel(logging.ERROR)  # its measurement warnings are not about segments
    try:
        res = sp.analyse_spine(seg)
    except MskMriError as exc:
        return None, {}, [f"level segments not available ({exc}); patient-level decision only"]
    finally:
        spine_log.setLevel(level)
    order = list(res.vertebrae.values())
    by_value = {g.value: g for g in order}
    segs = sp.level_segments_between_endplates(order, by_value)
    out = np.zeros(seg.shape, np.int32)
    idx = np.argwhere(seg.mask(SPINAL_CORD, CORD_HYPERINTENSITY, CSF))
    pts = seg.voxel_to_world(idx)
    ids = np.zeros(len(idx), np.int32)
    names: dict[int, str] = {}
    for geo, top, nt, bot, nb in segs:
        sel = sp.in_level_segment(pts, top, nt, bot, nb) & (ids == 0)
        ids[sel] = geo.value
        names[geo.value] = geo.structure
    out[tuple(idx.T)] = ids
    return out, names, []


# ----------------------------------------------------------------------------- files
def report_path(out: str | Path) -> Path:
    """``cord.nii.gz`` -> ``cord.cord.json``: the detection record beside the mask."""
    from mskmri.io import sidecar_path

    side = sidecar_path(out)
    return side.with_name(side.stem + ".cord.json")


def write_level_table(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Per-level table as ``.csv`` or ``.json`` (atomically)."""
    import csv
    import io as _io

    from mskmri.io import atomic_write_json, atomic_write_text

    p = Path(path)
    if p.suffix.lower() == ".json":
        return atomic_write_json(p, {"levels": list(rows)})
    if p.suffix.lower() != ".csv":
        raise CordHyperintensityError(f"--table must end in .csv or .json, not {p.name!r}")
    cols = ["structure", "segment_id", "cord_area_mm2", "flagged_area_mm2", "max_anomaly",
            "mean_anomaly", "positive"]
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in cols})
    return atomic_write_text(p, buf.getvalue())


def cord_from_segmentation(image: Volume, device: str = "cpu") -> LabelVolume:
    """Cord/CSF from ``mskmri segment spine`` when its model predicts the cord; else a
    one-line error naming ``--seg``."""
    from mskmri.nn.registry import read_card, resolve_weights
    from mskmri.segment.spine import DEFAULT_MODEL as SPINE_MODEL
    from mskmri.segment.spine import segment_spine

    path, _ = resolve_weights(SPINE_MODEL)
    names = " ".join(read_card(path).labels.values()).lower()
    if "cord" not in names:
        raise CordHyperintensityError(
            f"the shipped spine model {SPINE_MODEL!r} does not segment the spinal cord; pass "
            "--seg SEG with the cord (201) and CSF (202) on the image's grid")
    labels = segment_spine(image, device=device).labels
    if not (labels.array == SPINAL_CORD).any():
        raise CordHyperintensityError("the spine model found no spinal cord in this image; "
                                      "pass --seg SEG with the cord (201) on the image's grid")
    return labels


def detect_cord_hyperintensity_file(
    image_path: str | Path, out_path: str | Path, *, seg_path: str | Path | None = None,
    uncertainty_path: str | Path | None = None, anomaly_path: str | Path | None = None,
    table_path: str | Path | None = None, model: str = DEFAULT_MODEL,
    threshold: float | None = None, adapt_steps: int = DEFAULT_ADAPT_STEPS, seed: int = 0,
    device: str = "cpu",
) -> CordResult:
    """Read, detect, write: the mask (+ label sidecar), ``OUT.cord.json`` (record, per-level
    table, patient decision, warnings) and optionally the epistemic map, the anomaly map and
    the per-level table (each atomically, on the input grid)."""
    from mskmri.io import atomic_write_json, read, read_labels, write

    if table_path is not None and Path(table_path).suffix.lower() not in (".csv", ".json"):
        raise CordHyperintensityError(f"--table must end in .csv or .json, not "
                                      f"{Path(table_path).name!r}")
    image = read(image_path)
    if seg_path is not None:
        seg = read_labels(seg_path, schema="spine", strict=False)
    else:
        seg = cord_from_segmentation(image, device)
    res = detect_cord_hyperintensity(image, seg, model=model, threshold=threshold,
                                     adapt_steps=adapt_steps, seed=seed, device=device)
    write(res.mask, out_path)
    atomic_write_json(report_path(out_path), {
        "schema": RECORD_SCHEMA, "image": str(image_path),
        "seg": str(seg_path) if seg_path else "mskmri segment spine",
        "patient": res.patient, "levels": res.levels, "record": res.record,
        "warnings": res.warnings})
    if uncertainty_path is not None:
        write(res.epistemic, uncertainty_path)
    if anomaly_path is not None:
        write(res.anomaly, anomaly_path)
    if table_path is not None:
        write_level_table(res.levels, table_path)
    for w in res.warnings:
        log.warning("%s", w)
    return res


__all__ = [
    "DECISION_RULE", "DEFAULT_MODEL", "CordHyperintensityError", "CordResult", "CordSlice",
    "adapt_model", "calibrated_threshold", "decide", "robust_z",
    "apply_threshold", "detect_cord_hyperintensity", "detect_cord_hyperintensity_file",
    "flag_pixels",
    "level_segments", "make_slice", "normalise", "prepare_slices", "reconstruct_slice",
    "report_path", "window_origins",
]
