"""Bone marrow lesion (BML) detection by masked inpainting of the femoral marrow.

Method (Qin et al., SPIE Medical Imaging 2025; METHODS.md section 1), 2-D slice-wise on
sagittal slices (the network and the masks are 2-D; 3-D consistency comes from the
post-processing):

1. the image and the femur mask are put in RAS order (axis 0 = left-right: sagittal slices),
   cropped to the femur (+ :data:`CROP_MARGIN_MM`), resampled in-plane to the painter's
   spacing and divided by the femoral marrow median;
2. a set of hole patterns (:func:`hole_patterns`): checkerboards of square cells of
   :data:`CELL_MM`, each at ``n_offsets`` seeded random offsets and both phases, cut to the
   femur. Every femur voxel is hidden, and painted from its context, ``n_offsets`` times;
3. residual = real - mean painted (BMLs are hyperintense on fluid-sensitive fat-suppressed
   images); the spread (std) of the paintings across offsets is the Monte-Carlo
   uncertainty map; the residual minus its median over the femur (the painter's bias on
   this knee: a few noise units on some lesion-free validation knees) is divided by
   ``sqrt(noise**2 + spread**2)``, where the noise is a robust per-slice scale
   (1.4826 * MAD) of the residual inside the femur;
4. the z map goes back to the input grid and through :mod:`.postprocess` (rim, smoothing,
   threshold, opening, extent, components, slices) and :func:`.postprocess.lesion_table`;
   the threshold is the model card's, calibrated per in-plane matrix and interpolated at the
   input's in-plane spacing (:func:`choose_threshold`).

The painter is any ``(image, hole) -> painted`` callable on ``(N, H, W)`` arrays: the shipped
FFC network (:class:`NetworkPainter`) or :class:`LocalMeanPainter` (a model-free stub that
fills each hole with the Gaussian-weighted mean of the surrounding known marrow, for tests
and as a floor any trained model must beat).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from mskmri.anomaly.postprocess import (
    PostprocessConfig,
    femur_regions,
    lesion_table,
    postprocess,
)
from mskmri.errors import MskMriError
from mskmri.volume import LabelVolume, Volume

log = logging.getLogger(__name__)

#: Shipped inpainting model name (:data:`mskmri.weights.MODELS`).
DEFAULT_MODEL = "bml-inpaint"
#: ``--model`` name of the model-free :class:`LocalMeanPainter` stub.
STUB_MODEL = "local-mean"
#: Edge of the checkerboard cells that are hidden, mm.
CELL_MM = 12.0
#: Offsets of the checkerboard (each gives one painting of every femur voxel).
N_OFFSETS = 3
#: Margin around the femur kept as context, mm.
CROP_MARGIN_MM = 12.0
#: Smallest femur accepted as present, mL.
MIN_FEMUR_ML = 5.0
#: Floor of the per-slice noise scale, as a fraction of the volume's median scale.
NOISE_FLOOR_FRACTION = 0.5
#: Slices painted per network call.
BATCH_SLICES = 16
#: Contrasts on which BMLs are seen well; others get a warning.
SENSITIVE_CONTRASTS = ("iw-fs", "t2-fs", "stir", "pd-fs")
#: Warning carried in the output of a DESS (or other non-fat-suppressed) input.
DESS_WARNING = ("input contrast {contrast!r} is not fluid-sensitive fat-suppressed: bone marrow "
                "lesions are subtle on it and the detector is less sensitive (use a sagittal "
                "IW/PD/T2 fat-suppressed series when there is one)")
#: Warning when the contrast is neither given nor named in the image's metadata.
UNKNOWN_CONTRAST_WARNING = ("input contrast unknown (pass --contrast): the detector is made "
                            "for fluid-sensitive fat-suppressed images and is less sensitive "
                            "on others such as DESS")

#: ``painter(image, hole, roi)`` on ``(N, H, W)`` arrays -> painted ``(N, H, W)``.
Painter = Callable[..., np.ndarray]


class BmlDetectionError(MskMriError):
    """BML detection cannot run on this input (no femur, bad geometry, unknown method)."""


# ============================================================================ painters
class LocalMeanPainter:
    """Model-free stub: each hole pixel gets the Gaussian-weighted mean of known marrow.

    Parameters
    ----------
    sigma_px : float
        Gaussian sigma of the neighbourhood, pixels.
    """

    spacing_mm: float | None = None

    def __init__(self, sigma_px: float = 8.0) -> None:
        self.sigma_px = float(sigma_px)

    def __call__(self, image: np.ndarray, hole: np.ndarray, roi: np.ndarray | None = None
                 ) -> np.ndarray:
        """Paint ``(N, H, W)`` slices; ``roi`` (N, H, W) limits the known pixels used."""
        known = (hole < 0.5) if roi is None else ((hole < 0.5) & (roi > 0))
        k = known.astype(np.float32)
        sig = (0, self.sigma_px, self.sigma_px)
        num = ndimage.gaussian_filter(image * k, sig)
        den = ndimage.gaussian_filter(k, sig)
        fallback = float(np.median(image[known])) if known.any() else 0.0
        return np.where(den > 1e-3, num / np.maximum(den, 1e-3), fallback).astype(np.float32)


class NetworkPainter:
    """The FFC inpainting network as a painter (pads slices to the size divisor).

    Parameters
    ----------
    model : str or nn.Module
        Registered name or weight path (default :data:`DEFAULT_MODEL`), or a module.
    device : str
    spacing_mm : float, optional
        In-plane spacing the network expects; from the model card when loaded by name.
    """

    def __init__(self, model: Any = DEFAULT_MODEL, *, device: str = "cpu",
                 spacing_mm: float | None = None) -> None:
        from mskmri.nn.registry import load_model

        self.card: dict[str, Any] = {}
        #: Warnings every output made with this painter carries (unvalidated shipped model).
        self.caveats: list[str] = []
        #: Calibrated (in-plane spacing mm, threshold) pairs from the card (None: none).
        self.thresholds: list[tuple[float, float]] | None = None
        if isinstance(model, str) or hasattr(model, "__fspath__"):
            from mskmri.weights import model_caveat

            net, card = load_model(model, device=device)
            self.card = {"name": card.name, "sha256": card.sha256, "command": card.command}
            caveat = model_caveat(card.name)
            if caveat:
                self.caveats.append(caveat)
            self.thresholds = card_thresholds(card.extra)
            if card.input_spacing_mm:
                spacing_mm = float(card.input_spacing_mm[-1])
        else:
            net = model.to(device).eval()
        self.net = net
        self.device = device
        self.spacing_mm = spacing_mm
        self.divisor = int(getattr(getattr(net, "config", None), "size_divisor", 8))

    def __call__(self, image: np.ndarray, hole: np.ndarray, roi: np.ndarray | None = None
                 ) -> np.ndarray:
        """Paint ``(N, H, W)`` slices (``roi`` unused: the network sees the whole slice)."""
        import torch

        from mskmri.nn.ffc import make_input

        n, h, w = image.shape
        ph, pw = (-h) % self.divisor, (-w) % self.divisor
        img = np.pad(image, ((0, 0), (0, ph), (0, pw)), mode="reflect" if min(h, w) > 1
                     else "edge")
        msk = np.pad(hole, ((0, 0), (0, ph), (0, pw)))
        out = np.empty_like(img, dtype=np.float32)
        with torch.no_grad():
            for s in range(0, n, BATCH_SLICES):
                ti = torch.from_numpy(np.ascontiguousarray(img[s:s + BATCH_SLICES, None]))
                tm = torch.from_numpy(np.ascontiguousarray(msk[s:s + BATCH_SLICES, None]))
                x = make_input(ti.float().to(self.device), tm.float().to(self.device))
                out[s:s + BATCH_SLICES] = self.net(x)[:, 0].float().cpu().numpy()
        return out[:, :h, :w]


# ============================================================================ masks
def hole_patterns(shape: Sequence[int], cell_px: int, n_offsets: int, seed: int
                  ) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Checkerboard hole patterns of one slice: ``2 * n_offsets`` (H, W) bool masks.

    For each seeded offset ``(oy, ox)`` in ``[0, cell_px)``, the two phases of a
    checkerboard with square cells of ``cell_px``; the two phases of one offset cover every
    pixel exactly once, so every pixel is hidden ``n_offsets`` times in all.

    Returns
    -------
    (patterns, offsets)
    """
    if cell_px < 1 or n_offsets < 1:
        raise BmlDetectionError(f"cell_px and n_offsets must be >= 1, not {cell_px}, "
                                f"{n_offsets}")
    h, w = int(shape[0]), int(shape[1])
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    patterns, offsets = [], []
    for k in range(n_offsets):
        oy, ox = (0, 0) if k == 0 else (int(rng.integers(cell_px)), int(rng.integers(cell_px)))
        parity = ((yy + oy) // cell_px + (xx + ox) // cell_px) % 2
        offsets.append((oy, ox))
        patterns += [parity == 0, parity == 1]
    return patterns, offsets


# ============================================================================ config
@dataclass(frozen=True)
class DetectConfig:
    """Parameters of :func:`detect_bml` (recorded in its output).

    Parameters
    ----------
    cell_mm : float
        Checkerboard cell edge, mm.
    n_offsets : int
        Paintings per voxel (Monte-Carlo offsets).
    seed : int
        Seed of the offsets.
    crop_margin_mm : float
    postprocess : PostprocessConfig
    """

    cell_mm: float = CELL_MM
    n_offsets: int = N_OFFSETS
    seed: int = 0
    crop_margin_mm: float = CROP_MARGIN_MM
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class BmlResult:
    """Output of :func:`detect_bml`, all on the input image's grid.

    Attributes
    ----------
    mask : LabelVolume
        1 = bone marrow lesion (schema ``lesion``).
    zmap : Volume
        Smoothed noise-normalised residual inside the ROI (femur without rim; 0 elsewhere).
    uncertainty : Volume
        Std of the paintings across offsets (normalised intensity units).
    table : list of dict
        Per-lesion rows (:func:`mskmri.anomaly.postprocess.lesion_table`).
    warnings : list of str
    record : dict
        Method, parameters, steps, painter, timings.
    """

    mask: LabelVolume
    zmap: Volume
    uncertainty: Volume
    table: list[dict[str, Any]]
    warnings: list[str]
    record: dict[str, Any]


# ============================================================================ helpers
def guess_contrast(image: Volume) -> str:
    """The contrast named in the image's metadata, or ``"unknown"``.

    Looks at ``meta["contrast"]`` (synthesised images) and DICOM-like descriptions
    (``SeriesDescription``/``ProtocolName``: ``DESS`` -> ``"dess"``; ``FS``/``FAT SAT``/``STIR``
    with ``IW``/``PD``/``T2`` -> fat-suppressed). Intensities are not used: marrow-to-fluid
    ratios of FS and DESS renders overlap.
    """
    meta = image.meta or {}
    named = meta.get("contrast")
    if isinstance(named, str) and named:
        return named.lower()
    text = " ".join(str(meta.get(k, "")) for k in ("SeriesDescription", "ProtocolName",
                                                    "series_description")).upper()
    if "DESS" in text:
        return "dess"
    if "STIR" in text:
        return "stir"
    if any(t in text for t in ("FS", "FAT SAT", "FATSAT", "SPAIR", "SPIR")):
        return "iw-fs"
    return "unknown"


def _zoom_to(arr: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    if tuple(arr.shape) == tuple(shape):
        return arr
    f = [t / s for t, s in zip(shape, arr.shape, strict=True)]
    out = ndimage.zoom(arr, f, order=order, grid_mode=True, mode="nearest")
    # zoom may miss the target by a voxel through rounding: crop/pad to the exact shape
    pads = [(0, max(0, t - o)) for t, o in zip(shape, out.shape, strict=True)]
    out = np.pad(out, pads, mode="edge")
    return out[tuple(slice(0, t) for t in shape)]


def _robust_scale(values: np.ndarray) -> float:
    if values.size < 8:
        return float("nan")
    med = np.median(values)
    return float(1.4826 * np.median(np.abs(values - med)))


def paint_residual(image: np.ndarray, femur: np.ndarray, painter: Painter, *, cell_px: int,
                   n_offsets: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                       np.ndarray]:
    """Paint every femur voxel ``n_offsets`` times slice-wise (axis 0) and compare.

    Parameters
    ----------
    image : (X, H, W) float32
        Normalised image (marrow ~ 1), sagittal slices along axis 0.
    femur : (X, H, W) bool
    painter : callable
    cell_px, n_offsets, seed
        See :func:`hole_patterns`.

    Returns
    -------
    residual, spread, zmap, count : (X, H, W) float32 / float32 / float32 / int16
        ``real - mean painted``, the std of the paintings, the noise-normalised residual
        (its median over the femur subtracted first) and how often each voxel was painted
        (0 outside the femur).
    """
    xs = np.nonzero(femur.any(axis=(1, 2)))[0]
    s1 = np.zeros(image.shape, dtype=np.float64)
    s2 = np.zeros(image.shape, dtype=np.float64)
    count = np.zeros(image.shape, dtype=np.int16)
    if xs.size == 0:
        z = np.zeros(image.shape, dtype=np.float32)
        return z, z.copy(), z.copy(), count
    img = image[xs]
    fem = femur[xs]
    patterns, _ = hole_patterns(image.shape[1:], cell_px, n_offsets, seed)
    for pat in patterns:
        hole = (fem & pat[None]).astype(np.float32)
        if not hole.any():
            continue
        painted = painter(img, hole, fem)
        h = hole > 0
        s1[xs] += np.where(h, painted, 0.0)
        s2[xs] += np.where(h, painted.astype(np.float64) ** 2, 0.0)
        count[xs] += h
    n = np.maximum(count, 1)
    mean = s1 / n
    var = np.maximum(s2 / n - mean ** 2, 0.0)
    spread = np.where(count > 1, np.sqrt(var), 0.0).astype(np.float32)
    residual = np.where(count > 0, image - mean, 0.0).astype(np.float32)
    # robust location (the painter's bias on this knee) and noise scale per sagittal slice,
    # floored by the volume's
    inside = count > 0
    bias = float(np.median(residual[inside]))
    global_scale = _robust_scale(residual[inside])
    if not np.isfinite(global_scale) or global_scale <= 0:
        global_scale = 1.0
    noise = np.full(image.shape[0], global_scale, dtype=np.float32)
    for x in xs:
        sc = _robust_scale(residual[x][inside[x]])
        if np.isfinite(sc):
            noise[x] = max(sc, NOISE_FLOOR_FRACTION * global_scale)
    denom = np.sqrt(noise[:, None, None] ** 2 + spread ** 2)
    zmap = np.where(inside, (residual - bias) / denom, 0.0).astype(np.float32)
    return residual, spread, zmap, count


# ============================================================================ detector
def femur_mask_of(seg: Volume | np.ndarray, femur_label: int = 1) -> np.ndarray:
    """Femur voxels of a knee-schema label map (bool)."""
    arr = seg.array if isinstance(seg, Volume) else np.asarray(seg)
    return np.asarray(arr == femur_label)


def femur_work_crop(arr: np.ndarray, fem: np.ndarray, spacing: Sequence[float],
                    margin_mm: float, work_mm: float | None
                    ) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray, float]:
    """Crop a RAS image to the femur + margin, resample in-plane, divide by the marrow median.

    Shared by the inpainting and the MKD detectors (slices along axis 0 kept, axes 1-2
    resampled to ``work_mm``).

    Parameters
    ----------
    arr : (X, Y, Z) float32
    fem : (X, Y, Z) bool
    spacing : 3 floats, mm
    margin_mm : float
    work_mm : float or None
        In-plane working spacing, mm (None: keep the grid).

    Returns
    -------
    box, crop_w, fem_w, median
        The crop's slices on ``arr``, the normalised working crop, its femur mask, and the
        marrow median the crop was divided by.
    """
    idx = np.argwhere(fem)
    margin = [int(np.ceil(margin_mm / s)) for s in spacing]
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + np.asarray(margin), arr.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    crop, fcrop = arr[box], fem[box]
    if work_mm:
        shape_w = [crop.shape[0]] + [max(8, int(round(n * s / work_mm)))
                                     for n, s in zip(crop.shape[1:], spacing[1:], strict=True)]
    else:
        shape_w = list(crop.shape)
    crop_w = _zoom_to(crop, shape_w, order=1)
    fem_w = _zoom_to(fcrop.astype(np.uint8), shape_w, order=0) > 0
    med = float(np.median(crop_w[fem_w])) if fem_w.any() else 0.0
    if not med > 0:
        raise BmlDetectionError(f"median marrow intensity is {med}: the image is blank or not "
                                "an MR magnitude image inside the femur")
    return box, (crop_w / med).astype(np.float32), fem_w, med


def check_bml_inputs(image: Volume, seg: LabelVolume) -> float:
    """Check the inputs of a BML detector (either method) and return the femur volume (mL).

    Raises
    ------
    BmlDetectionError
        Unknown geometry, a 2-D image, a segmentation on another grid, or no femur (label 1
        under :data:`MIN_FEMUR_ML`).
    """
    from mskmri.errors import GeometryError

    try:
        image.require_geometry("BML detection")
    except GeometryError as exc:
        raise BmlDetectionError(str(exc)) from exc
    if image.array.ndim != 3:
        raise BmlDetectionError(f"BML detection needs a 3-D image, not shape {image.array.shape}")
    if not image.same_geometry(seg):
        raise BmlDetectionError(f"the segmentation {seg.shape} is not on the image's grid "
                                f"{image.shape}; resample it onto the image first")
    femur_ml = int(femur_mask_of(seg).sum()) * image.voxel_volume_mm3 / 1000.0
    if femur_ml < MIN_FEMUR_ML:
        raise BmlDetectionError(f"no femur in the segmentation ({femur_ml:.2f} mL of label 1, "
                                f"need >= {MIN_FEMUR_ML} mL); give a knee label map with the "
                                "femur as label 1")
    return femur_ml


def card_thresholds(extra: dict[str, Any]) -> list[tuple[float, float]] | None:
    """Calibrated ``(in-plane spacing mm, threshold)`` pairs of a model card's ``extra``.

    ``thresholds_by_inplane_mm`` (one per calibrated in-plane matrix) is preferred; a single
    ``threshold`` is read as valid at every spacing. None when the card has neither.
    """
    table = extra.get("thresholds_by_inplane_mm")
    if table:
        return [(float(a), float(b)) for a, b in table]
    if extra.get("threshold") is not None:
        return [(1.0, float(extra["threshold"]))]
    return None


def choose_threshold(threshold: float | None, table: Sequence[Sequence[float]] | None,
                     spacing: Sequence[float], default: float) -> tuple[float, dict[str, Any]]:
    """The detection threshold and where it came from (recorded in every output).

    Parameters
    ----------
    threshold : float or None
        Given by the caller (``--threshold``): used as is.
    table : sequence of (inplane_mm, threshold) or None
        The model card's calibration (:func:`card_thresholds`), interpolated at the input's
        in-plane spacing by :func:`mskmri.anomaly.postprocess.threshold_for_inplane`.
    spacing : 3 floats, mm
        RAS spacing of the input; axes 1-2 are the sagittal plane the detector works in.
    default : float
        Used when there is neither (``PostprocessConfig.threshold``).

    Returns
    -------
    (float, dict)
    """
    from mskmri.anomaly.postprocess import threshold_for_inplane

    if threshold is not None:
        return float(threshold), {"source": "argument"}
    if table:
        inplane = float(np.mean(spacing[1:]))
        return threshold_for_inplane(table, inplane), {
            "source": "model card, calibrated per in-plane spacing",
            "input_inplane_mm": round(inplane, 4), "table": [list(t) for t in table]}
    return float(default), {"source": "default (no calibration)"}


def detect_bml(image: Volume, seg: LabelVolume, *, painter: Painter | None = None,
               config: DetectConfig | None = None, contrast: str = "auto",
               threshold: float | None = None) -> BmlResult:
    """Detect femoral bone marrow lesions by masked inpainting.

    Parameters
    ----------
    image : Volume
        3-D MR image with known geometry (sagittal fluid-sensitive fat-suppressed is best).
    seg : LabelVolume
        Knee-schema label map on the image's grid (femur = 1; fibula = 4 sets the side).
    painter : callable, optional
        Default: :class:`NetworkPainter` with the shipped model.
    config : DetectConfig
    contrast : str
        ``"auto"`` (:func:`guess_contrast` from the metadata), ``"iw-fs"``, ``"dess"``, ...;
        non-FS contrasts get :data:`DESS_WARNING`, an unknown one
        :data:`UNKNOWN_CONTRAST_WARNING`.
    threshold : float, optional
        Overrides the painter's calibrated thresholds (:func:`choose_threshold`) and
        ``config.postprocess.threshold``.

    Returns
    -------
    BmlResult

    Raises
    ------
    BmlDetectionError
        Unknown geometry, other grids, no femur (or one under :data:`MIN_FEMUR_ML`).
    """
    t0 = time.perf_counter()
    cfg = config or DetectConfig()
    femur_ml = check_bml_inputs(image, seg)
    orig_codes = "".join(image.orientation)
    img_r = image.reorient("RAS")
    seg_r = seg.reorient("RAS")
    arr = np.asarray(img_r.array, dtype=np.float32)
    fem = femur_mask_of(seg_r)
    sp = img_r.spacing
    painter = painter if painter is not None else NetworkPainter()
    level, level_from = choose_threshold(threshold, getattr(painter, "thresholds", None), sp,
                                         cfg.postprocess.threshold)
    cfg = DetectConfig(**{**asdict(cfg), "postprocess": PostprocessConfig(
        **{**cfg.postprocess.to_dict(), "threshold": level})})
    warnings: list[str] = []
    if contrast == "auto":
        contrast = guess_contrast(image)
        log.info("input contrast: %s", contrast)
    if contrast == "unknown":
        warnings.append(UNKNOWN_CONTRAST_WARNING)
    elif contrast not in SENSITIVE_CONTRASTS:
        warnings.append(DESS_WARNING.format(contrast=contrast))
    # crop to the femur + margin, in-plane working grid, divided by the marrow median
    warnings[:0] = list(getattr(painter, "caveats", []))
    work_sp = getattr(painter, "spacing_mm", None)
    inplane_mm = float(work_sp) if work_sp else float(np.mean(sp[1:]))
    box, crop_w, fem_w, med = femur_work_crop(arr, fem, sp, cfg.crop_margin_mm, work_sp)
    crop, fcrop = arr[box], fem[box]
    cell_px = max(2, int(round(cfg.cell_mm / inplane_mm)))
    t1 = time.perf_counter()
    _, spread_w, z_w, count_w = paint_residual(crop_w, fem_w, painter, cell_px=cell_px,
                                               n_offsets=cfg.n_offsets, seed=cfg.seed)
    t_paint = time.perf_counter() - t1
    ufull = np.zeros(arr.shape, dtype=np.float32)
    ufull[box] = np.where(fcrop, _zoom_to(spread_w, crop.shape, order=1), 0.0)
    pp, mask_full, smooth_full, table = lesions_in_femur(
        z_w, box=box, fem=fem, seg_ras=seg_r, affine=img_r.affine, spacing=sp,
        config=cfg.postprocess, warnings=warnings)
    record = {
        "method": "inpaint", "painting": "2-D sagittal slices",
        "config": cfg.to_dict(), "threshold_from": level_from, "cell_px": cell_px,
        "inplane_work_mm": inplane_mm,
        "contrast": contrast, "marrow_median": med, "steps": pp.steps,
        "min_paintings": int(count_w[fem_w].min()) if fem_w.any() else 0,
        "painter": getattr(painter, "card", None) or type(painter).__name__,
        "femur_ml": round(femur_ml, 3),
        "timing_s": {"paint": round(t_paint, 3), "total": round(time.perf_counter() - t0, 3)},
    }
    return bml_result(mask_full, smooth_full, ufull, img_ras=img_r, orig_codes=orig_codes,
                      table=table, warnings=warnings, record=record)


def lesions_in_femur(
    z_w: np.ndarray, *, box: tuple[slice, ...], fem: np.ndarray, seg_ras: Volume,
    affine: np.ndarray, spacing: Sequence[float], config: Any, warnings: list[str],
) -> tuple[Any, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Score map on the working grid -> post-processed lesion mask and per-lesion table.

    Shared by the inpainting and MKD detectors: the working-grid map ``z_w`` goes back onto
    the femur crop ``box`` of the RAS image, is post-processed inside the crop (the margin
    keeps the femur away from its edges), and lesions get their femoral region.

    Returns
    -------
    pp, mask, smoothed, table
        The post-processing result, the (X, Y, Z) uint8 mask and float32 smoothed map on the
        RAS grid, and one row per lesion. A warning is appended when the condyles cannot be
        told apart (no fibula).
    """
    fcrop = fem[box]
    zcrop = np.where(fcrop, _zoom_to(z_w, fcrop.shape, order=1), 0.0).astype(np.float32)
    pp = postprocess(zcrop, fcrop, spacing, config)
    mask_full = np.zeros(fem.shape, dtype=np.uint8)
    mask_full[box] = pp.mask
    smooth_full = np.zeros(fem.shape, dtype=np.float32)
    smooth_full[box] = pp.smoothed
    lateral_sign = _lateral_sign(seg_ras)
    regions = femur_regions(fem, affine, lateral_sign=lateral_sign)
    if lateral_sign is None:
        warnings.append("no fibula in the segmentation: condyles are not split into medial "
                        "and lateral")
    table = lesion_table(mask_full, smooth_full, regions, spacing, bone="femur")
    return pp, mask_full, smooth_full, table


def bml_result(mask_ras: np.ndarray, smoothed_ras: np.ndarray, uncertainty_ras: np.ndarray, *,
               img_ras: Volume, orig_codes: str, table: list[dict[str, Any]],
               warnings: list[str], record: dict[str, Any]) -> BmlResult:
    """Wrap RAS-grid outputs as a :class:`BmlResult` back in the input's orientation."""
    from mskmri.labels import LESION

    mask_r = LabelVolume(mask_ras, img_ras.affine, dict(LESION), schema="lesion",
                         meta={"bml_detection": record, "warnings": list(warnings)})
    mask = mask_r.reorient(orig_codes)
    assert isinstance(mask, LabelVolume)
    zmap = img_ras.with_array(smoothed_ras).reorient(orig_codes)
    unc = img_ras.with_array(uncertainty_ras).reorient(orig_codes)
    for w in warnings:
        log.warning("%s", w)
    return BmlResult(mask=mask, zmap=zmap, uncertainty=unc, table=table, warnings=warnings,
                     record=record)


def _lateral_sign(seg_ras: Volume) -> float | None:
    """+1 when the fibula lies at larger RAS x than the femur (lateral = right), -1 else."""
    arr = seg_ras.array
    fib = np.argwhere(arr == 4)
    femur = np.argwhere(arr == 1)
    if len(fib) < 10 or len(femur) == 0:
        return None
    return 1.0 if fib[:, 0].mean() > femur[:, 0].mean() else -1.0


# ============================================================================ files
#: Methods of ``mskmri detect bml``.
METHODS = ("inpaint", "mkd")


def report_path(out: str | Path) -> Path:
    """``bml.nii.gz`` -> ``bml.bml.json``: the detection record beside the mask."""
    from mskmri.io import sidecar_path

    side = sidecar_path(out)
    return side.with_name(side.stem + ".bml.json")


def write_table(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write the per-lesion table as ``.csv`` or ``.json`` (atomically; empty -> header only)."""
    import csv
    import io as _io

    from mskmri.io import atomic_write_json, atomic_write_text

    p = Path(path)
    if p.suffix.lower() == ".json":
        return atomic_write_json(p, {"lesions": list(rows)})
    if p.suffix.lower() != ".csv":
        raise BmlDetectionError(f"--table must end in .csv or .json, not {p.name!r}")
    cols = ["lesion", "volume_ml", "bone", "region", "peak_residual", "n_voxels",
            "centroid_voxel"]
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (" ".join(map(str, r[k])) if isinstance(r.get(k), list) else r.get(k))
                    for k in cols})
    return atomic_write_text(p, buf.getvalue())


def detect_bml_file(image_path: str | Path, out_path: str | Path, *,
                    seg_path: str | Path | None = None, method: str = "inpaint",
                    uncertainty_path: str | Path | None = None,
                    table_path: str | Path | None = None, contrast: str = "auto",
                    model: str = DEFAULT_MODEL, threshold: float | None = None,
                    device: str = "cpu") -> BmlResult:
    """Read, detect and write: the mask (+ label sidecar and ``*.bml.json`` record).

    ``model="local-mean"`` uses the model-free :class:`LocalMeanPainter` (tests, floor).
    Without ``seg_path`` the knee is segmented with :func:`mskmri.segment.knee.segment_knee`
    (needs the shipped knee models; a clear error otherwise).
    """
    from mskmri.io import read, read_labels

    if method not in METHODS:
        raise BmlDetectionError(f"unknown method {method!r}; choose one of {METHODS}")
    if method == "mkd":
        from mskmri.anomaly.mkd import DEFAULT_MODEL as MKD_MODEL
        from mskmri.anomaly.mkd import detect_bml_mkd_file

        return detect_bml_mkd_file(
            image_path, out_path, seg_path=seg_path, uncertainty_path=uncertainty_path,
            table_path=table_path, contrast=contrast,
            model=MKD_MODEL if model == DEFAULT_MODEL else model, threshold=threshold,
            device=device)
    image = read(image_path)
    if seg_path is not None:
        seg = read_labels(seg_path, schema="knee")
    else:
        seg = _segment_or_explain(image, device)
    painter: Painter
    if model == STUB_MODEL:
        painter = LocalMeanPainter()
    else:
        painter = NetworkPainter(model, device=device)
    result = detect_bml(image, seg, painter=painter, contrast=contrast, threshold=threshold)
    write_bml_outputs(result, image_path=image_path, seg_path=seg_path, out_path=out_path,
                      uncertainty_path=uncertainty_path, table_path=table_path)
    return result


def write_bml_outputs(result: BmlResult, *, image_path: str | Path, seg_path: str | Path | None,
                      out_path: str | Path, uncertainty_path: str | Path | None = None,
                      table_path: str | Path | None = None) -> None:
    """Write a detection: the mask (+ sidecar), the ``*.bml.json`` record, and optionally
    the uncertainty map and the per-lesion table (each atomically). Shared by every method."""
    from mskmri.io import atomic_write_json, write

    write(result.mask, out_path)
    atomic_write_json(report_path(out_path), {
        "schema": "mskmri/bml-detection/1", "image": str(image_path),
        "seg": str(seg_path) if seg_path else "segment.knee", "warnings": result.warnings,
        "lesions": result.table, "record": result.record})
    if uncertainty_path is not None:
        write(result.uncertainty, uncertainty_path)
    if table_path is not None:
        write_table(result.table, table_path)


def _segment_or_explain(image: Volume, device: str) -> LabelVolume:
    from mskmri.weights import MODELS

    try:
        from mskmri.segment.knee import COARSE_MODEL, FINE_MODEL, segment_knee
    except ImportError as exc:  # pragma: no cover - segment.knee ships with mskmri
        raise BmlDetectionError(f"knee segmentation is unavailable ({exc}); pass --seg SEG "
                                "with a knee label map on the image's grid") from exc
    missing = [m for m in (COARSE_MODEL, FINE_MODEL) if m not in MODELS]
    if missing:
        raise BmlDetectionError(f"no knee segmentation model is shipped yet ({missing}); pass "
                                "--seg SEG with a knee label map (femur = 1) on the image's "
                                "grid")
    return segment_knee(image, device=device)
