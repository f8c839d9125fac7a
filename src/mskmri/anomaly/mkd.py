"""Multiresolution knowledge distillation (MKD) baseline of the BML detector.

Method (Salehi et al., CVPR 2021; METHODS.md section 1), 2-D on sagittal slices:

1. **Teacher**: the frozen 2-D U-Net encoder ``bml-mkd-teacher`` (features 8, 16, 32, 64;
   four levels), pretrained on MRI by our distortion-restoration pretext task
   (:mod:`mskmri.pretrain`; the first ``pretrain-encoder-2d``, pinned under its own name so
   that re-pretraining the shipped encoder does not silently change the baseline). The published
   method uses an ImageNet VGG-16; no ImageNet weights can be downloaded here, so the teacher is
   **substituted** and every output says so (:data:`TEACHER_WARNING`).
2. **Student**: the same encoder layout with the same widths but **one** convolution per
   stage instead of two (:func:`build_student`; about half the teacher's parameters), trained
   on lesion-free femoral marrow (:mod:`.mkd_train`) to match the teacher at all four levels.
3. **Loss** (:func:`mkd_loss`): sum over the four levels of the mean over positions of
   ``1 - cos(student, teacher)`` (cosine along channels at each position) plus
   :data:`LAMBDA_MSE` times the mean squared difference.
4. **Anomaly map** (:func:`gradient_map`): the attribution of that loss to the input pixels,
   ``|x * d loss / d x|`` (input x gradient, :data:`ATTRIBUTION`; the published plain
   ``|d loss / d x|`` is lower on hyperintense lesions than on healthy marrow with our teacher
   and is kept as an option), averaged over :data:`SMOOTHGRAD_N` noisy copies (SmoothGrad,
   noise std :data:`SMOOTHGRAD_NOISE`), Gaussian smoothing with :data:`GRAD_SIGMA_PX` pixels
   in-plane (4 px as published = 2.5 mm on our 0.625 mm grid) and a 3x3 grey opening.
5. The map is turned into a robust z score over the femur (median / 1.4826 MAD of the whole
   volume) and goes through **the same** femur crop, working grid, ROI and post-processing as
   the inpainting detector (:mod:`.postprocess`), with thresholds calibrated per in-plane
   matrix on lesion-free validation knees (the card's ``thresholds_by_inplane_mm``, written
   from ``benchmarks/bml.py``; :func:`.inpaint.choose_threshold`).

Input: the image is divided by the femoral marrow median as for the inpainter, multiplied by
:data:`INPUT_SCALE` so healthy marrow sits inside the teacher's pretraining range (its images
were percentile-scaled to about [0, 1.5]), and set to 0 outside the femur, in training and in
detection: the networks see marrow only. (With the surrounding joint in view, a hyperintense
lesion looks like joint fluid, which the student has learnt to match, and its gradient was
lower than that of healthy marrow on our phantom.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from mskmri.anomaly.inpaint import (
    CROP_MARGIN_MM,
    DESS_WARNING,
    SENSITIVE_CONTRASTS,
    UNKNOWN_CONTRAST_WARNING,
    BmlDetectionError,
    BmlResult,
    _robust_scale,
    bml_result,
    card_thresholds,
    check_bml_inputs,
    choose_threshold,
    femur_mask_of,
    femur_work_crop,
    guess_contrast,
    lesions_in_femur,
)
from mskmri.anomaly.postprocess import (
    PostprocessConfig,
)
from mskmri.volume import LabelVolume, Volume

log = logging.getLogger(__name__)

#: Shipped MKD student (:data:`mskmri.weights.MODELS`).
DEFAULT_MODEL = "bml-mkd"
#: Frozen teacher: our MRI-pretrained 2-D encoder (substitute for ImageNet VGG-16), the
#: student's own copy: byte-identical to the first shipped ``pretrain-encoder-2d``.
TEACHER_MODEL = "bml-mkd-teacher"
#: Working in-plane spacing, mm (the inpainter's grid).
WORK_SPACING_MM = 0.625
#: Weight of the MSE term against the cosine term.
LAMBDA_MSE = 0.1
#: Multiplier of the marrow-median-normalised image before the networks (marrow ~ 0.5).
INPUT_SCALE = 0.5
#: SmoothGrad: noisy copies averaged per slice.
SMOOTHGRAD_N = 4
#: SmoothGrad: noise std, in units of the network input (marrow ~ :data:`INPUT_SCALE`).
SMOOTHGRAD_NOISE = 0.05
#: In-plane Gaussian sigma of the gradient map, pixels of the working grid (published: 4).
GRAD_SIGMA_PX = 4.0
#: In-plane size of the grey opening of the gradient map, pixels.
OPENING_PX = 3
#: Attribution of the loss to the input pixels: ``"input-x-gradient"`` (default) or
#: ``"gradient"`` (the published vanilla / SmoothGrad map). With our substitute teacher the
#: plain gradient is *lower* on hyperintense lesions than on healthy marrow (voxel AUROC 0.48
#: on a held-out render, 0.99 for input x gradient; it detects nothing on any set of
#: benchmarks/results/bml.json, method ``mkd-plain-gradient``).
ATTRIBUTION = "input-x-gradient"
#: Attributions :func:`gradient_map` knows.
ATTRIBUTIONS = ("input-x-gradient", "gradient")
#: Slices per network call.
BATCH_SLICES = 8
#: Size divisor of the encoder input (three stride-2 levels).
SIZE_DIVISOR = 8
#: Warning every MKD output carries: the teacher is not the published one.
TEACHER_WARNING = ("MKD baseline: the teacher is our MRI-pretrained 2-D encoder "
                   "'bml-mkd-teacher' (distortion-restoration pretext task), NOT the "
                   "ImageNet VGG-16 of Salehi et al. (not downloadable here); its results are "
                   "those of this substitute")


# ============================================================================ networks
def build_student(teacher_config: dict[str, Any] | Any) -> Any:
    """The student: the teacher's encoder layout with one convolution per stage.

    Parameters
    ----------
    teacher_config : UNetConfig or dict
        The teacher's config; widths, strides and kernels are kept, ``convs_per_stage`` = 1.

    Returns
    -------
    UNetEncoder
    """
    from mskmri.nn.unet import UNetConfig, UNetEncoder

    data = teacher_config.to_dict() if hasattr(teacher_config, "to_dict") else dict(
        teacher_config)
    data = {**data, "convs_per_stage": 1}
    return UNetEncoder(UNetConfig.from_dict(data))


def load_teacher(device: str = "cpu") -> Any:
    """The frozen teacher (eval mode, ``requires_grad`` off)."""
    from mskmri.nn.registry import load_model

    net, _ = load_model(TEACHER_MODEL, device=device)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def mkd_loss(student_feats: Sequence[Any], teacher_feats: Sequence[Any], *,
             lambda_mse: float = LAMBDA_MSE, per_sample: bool = False) -> Any:
    """MKD distillation loss: sum over levels of ``(1 - cos) + lambda * MSE``.

    Parameters
    ----------
    student_feats, teacher_feats : sequences of torch.Tensor, each (N, C_l, H_l, W_l)
        Features of the same levels, equal shapes.
    lambda_mse : float
    per_sample : bool
        Return an ``(N,)`` tensor (one loss per slice) instead of the batch mean.

    Returns
    -------
    torch.Tensor
        Scalar (or ``(N,)``); 0 when the features are identical, > 0 otherwise.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812

    if len(student_feats) != len(teacher_feats):
        raise BmlDetectionError(f"student gives {len(student_feats)} levels, teacher "
                                f"{len(teacher_feats)}; they must match")
    total: Any = 0.0
    for s, t in zip(student_feats, teacher_feats, strict=True):
        if s.shape != t.shape:
            raise BmlDetectionError(f"student features {tuple(s.shape)} differ from teacher "
                                    f"{tuple(t.shape)}")
        cos = F.cosine_similarity(s, t, dim=1, eps=1e-6)  # (N, H, W)
        direction = (1.0 - cos).flatten(1).mean(1)
        value = (s - t).pow(2).flatten(1).mean(1)
        total = total + direction + lambda_mse * value
    out = torch.as_tensor(total)
    return out if per_sample else out.mean()


def _check_attribution(attribution: str) -> None:
    """Refuse an attribution :func:`gradient_map` does not know."""
    if attribution not in ATTRIBUTIONS:
        raise BmlDetectionError(f"unknown MKD attribution {attribution!r}; use one of "
                                f"{', '.join(ATTRIBUTIONS)}")


def gradient_map(image: np.ndarray, student: Any, teacher: Any, *, roi: np.ndarray | None = None,
                 n_noise: int = SMOOTHGRAD_N, noise: float = SMOOTHGRAD_NOISE, seed: int = 0,
                 sigma_px: float = GRAD_SIGMA_PX, opening_px: int = OPENING_PX,
                 attribution: str = ATTRIBUTION) -> np.ndarray:
    """SmoothGrad map of the MKD loss w.r.t. the input, smoothed and opened, per slice.

    Parameters
    ----------
    image : (N, H, W) float32
        Network-input slices (marrow-median normalised times :data:`INPUT_SCALE`).
    student, teacher : nn.Module
        Encoders returning matching feature lists.
    roi : (N, H, W) bool, optional
        Marrow mask: the networks see ``image * roi`` (0 outside), as in training, so the
        gradient is 0 outside it.
    n_noise : int
        Noisy copies averaged (``0``: plain gradient, no noise).
    noise : float
        Std of the Gaussian noise, input units.
    seed : int
        Seed of the noise.
    sigma_px : float
        In-plane Gaussian sigma, pixels (0: none).
    opening_px : int
        In-plane grey opening size, pixels (<= 1: none).
    attribution : {"input-x-gradient", "gradient"}
        ``|x * d loss / d x|`` (gradient times the network input, Shrikumar et al. 2017) or
        the plain ``|d loss / d x|``.

    Returns
    -------
    (N, H, W) float32
        The attribution averaged over the copies, smoothed, opened (>= 0).
    """
    import torch

    _check_attribution(attribution)
    n, h, w = image.shape
    ph, pw = (-h) % SIZE_DIVISOR, (-w) % SIZE_DIVISOR
    img = np.pad(image, ((0, 0), (0, ph), (0, pw)), mode="reflect" if min(h, w) > 1
                 else "edge").astype(np.float32)
    keep = np.ones(img.shape, dtype=np.float32) if roi is None else np.pad(
        roi, ((0, 0), (0, ph), (0, pw))).astype(np.float32)
    gen = torch.Generator().manual_seed(int(seed))
    acc = np.zeros(img.shape, dtype=np.float64)
    copies = max(1, int(n_noise))
    student.eval()
    teacher.eval()
    for s in range(0, n, BATCH_SLICES):
        base = torch.from_numpy(np.ascontiguousarray(img[s:s + BATCH_SLICES, None]))
        inside = torch.from_numpy(np.ascontiguousarray(keep[s:s + BATCH_SLICES, None]))
        for _ in range(copies):
            x = base.clone()
            if n_noise > 0 and noise > 0:
                x = x + noise * torch.randn(x.shape, generator=gen)
            x.requires_grad_(True)
            xin = x * inside
            loss = mkd_loss(student(xin), teacher(xin), per_sample=True).sum()
            (grad,) = torch.autograd.grad(loss, x)
            if attribution == "input-x-gradient":
                grad = grad * xin.detach()
            acc[s:s + BATCH_SLICES] += grad[:, 0].abs().double().numpy()
    out = (acc / copies)[:, :h, :w].astype(np.float32)
    if sigma_px > 0:
        out = ndimage.gaussian_filter(out, (0, sigma_px, sigma_px))
    if opening_px > 1:
        out = ndimage.grey_opening(out, size=(1, opening_px, opening_px))
    return out.astype(np.float32)


class MkdScorer:
    """Teacher + trained student: ``(N, H, W)`` normalised slices -> gradient maps.

    Parameters
    ----------
    model : str or nn.Module
        Registered student name or weight path (default :data:`DEFAULT_MODEL`), or a module.
    teacher : nn.Module, optional
        Default: :func:`load_teacher`.
    device : str
    n_noise, noise, seed
        SmoothGrad parameters (:func:`gradient_map`).
    attribution : {"input-x-gradient", "gradient"}
        See :func:`gradient_map`.
    """

    spacing_mm: float = WORK_SPACING_MM

    def __init__(self, model: Any = DEFAULT_MODEL, *, teacher: Any = None, device: str = "cpu",
                 n_noise: int = SMOOTHGRAD_N, noise: float = SMOOTHGRAD_NOISE,
                 seed: int = 0, attribution: str = ATTRIBUTION) -> None:
        _check_attribution(attribution)
        self.attribution = attribution
        self.card: dict[str, Any] = {}
        #: Warnings every output made with this scorer carries.
        self.caveats: list[str] = [TEACHER_WARNING]
        #: Calibrated (in-plane spacing mm, threshold) pairs from the card (None: none).
        self.thresholds: list[tuple[float, float]] | None = None
        if isinstance(model, str) or hasattr(model, "__fspath__"):
            from mskmri.nn.registry import load_model
            from mskmri.weights import model_caveat

            net, card = load_model(model, device=device)
            self.card = {"name": card.name, "sha256": card.sha256, "command": card.command}
            caveat = model_caveat(card.name)
            if caveat:
                self.caveats.append(caveat)
            self.thresholds = card_thresholds(card.extra)
        else:
            net = model.to(device)
        for p in net.parameters():
            p.requires_grad_(False)
        self.student = net.eval()
        self.teacher = teacher if teacher is not None else load_teacher(device)
        self.n_noise, self.noise, self.seed = int(n_noise), float(noise), int(seed)

    def __call__(self, image: np.ndarray, roi: np.ndarray | None = None) -> np.ndarray:
        """Gradient map of ``(N, H, W)`` marrow-median-normalised slices (``roi``: femur)."""
        return gradient_map(image * INPUT_SCALE, self.student, self.teacher, roi=roi,
                            n_noise=self.n_noise, noise=self.noise, seed=self.seed,
                            attribution=self.attribution)


# ============================================================================ detector
@dataclass(frozen=True)
class MkdConfig:
    """Parameters of :func:`detect_bml_mkd` (recorded in its output).

    Parameters
    ----------
    crop_margin_mm : float
        Margin around the femur kept as context, mm.
    postprocess : PostprocessConfig
        Shared with the inpainting detector.
    """

    crop_margin_mm: float = CROP_MARGIN_MM
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def zscore_in(values: np.ndarray, roi: np.ndarray) -> np.ndarray:
    """``(values - median) / (1.4826 * MAD)`` over ``roi`` (whole volume), 0 outside.

    Parameters
    ----------
    values : array
    roi : bool array, same shape

    Returns
    -------
    float32 array, same shape
    """
    inside = values[roi]
    if inside.size == 0:
        return np.zeros(values.shape, dtype=np.float32)
    scale = _robust_scale(inside)
    if not np.isfinite(scale) or scale <= 0:
        scale = float(np.std(inside)) or 1.0
    z = (values - float(np.median(inside))) / scale
    return np.where(roi, z, 0.0).astype(np.float32)


def mkd_zmap(image: np.ndarray, femur: np.ndarray, scorer: Any) -> np.ndarray:
    """Robust z score of the MKD gradient map on the femur's sagittal slices.

    Parameters
    ----------
    image : (X, H, W) float32
        Marrow-median-normalised crop on the working grid, slices along axis 0.
    femur : (X, H, W) bool
    scorer : callable
        ``(image, femur)``, both ``(N, H, W)`` -> ``(N, H, W)`` gradient maps
        (:class:`MkdScorer`).

    Returns
    -------
    (X, H, W) float32
        z inside the femur, 0 elsewhere.
    """
    grad = np.zeros(image.shape, dtype=np.float32)
    xs = np.nonzero(femur.any(axis=(1, 2)))[0]
    if xs.size:
        grad[xs] = scorer(image[xs], femur[xs])
    return zscore_in(grad, femur)


def detect_bml_mkd(image: Volume, seg: LabelVolume, *, scorer: Any = None,
                   config: MkdConfig | None = None, contrast: str = "auto",
                   threshold: float | None = None) -> BmlResult:
    """Detect femoral bone marrow lesions with the MKD baseline.

    Same input checks, femur crop, working grid, post-processing and outputs as
    :func:`mskmri.anomaly.inpaint.detect_bml`; the anomaly map is :func:`mkd_zmap`.

    Parameters
    ----------
    image : Volume
        3-D MR image with known geometry.
    seg : LabelVolume
        Knee-schema label map on the image's grid (femur = 1; fibula = 4 sets the side).
    scorer : callable, optional
        Default :class:`MkdScorer` with the shipped student.
    config : MkdConfig
    contrast : str
        ``"auto"``, ``"iw-fs"``, ``"dess"``, ...
    threshold : float, optional
        Overrides the scorer's calibrated thresholds (:func:`.inpaint.choose_threshold`)
        and ``config.postprocess.threshold``.

    Returns
    -------
    BmlResult
        ``uncertainty`` is all zeros (MKD has no Monte-Carlo spread).

    Raises
    ------
    BmlDetectionError
        Unknown geometry, other grids, no femur.
    """

    t0 = time.perf_counter()
    cfg = config or MkdConfig()
    scorer = scorer if scorer is not None else MkdScorer()
    femur_ml = check_bml_inputs(image, seg)
    orig_codes = "".join(image.orientation)
    img_r, seg_r = image.reorient("RAS"), seg.reorient("RAS")
    arr = np.asarray(img_r.array, dtype=np.float32)
    fem = femur_mask_of(seg_r)
    sp = img_r.spacing
    level, level_from = choose_threshold(threshold, getattr(scorer, "thresholds", None), sp,
                                         cfg.postprocess.threshold)
    cfg = MkdConfig(crop_margin_mm=cfg.crop_margin_mm, postprocess=PostprocessConfig(
        **{**cfg.postprocess.to_dict(), "threshold": level}))
    warnings: list[str] = list(getattr(scorer, "caveats", [TEACHER_WARNING]))
    if contrast == "auto":
        contrast = guess_contrast(image)
    if contrast == "unknown":
        warnings.append(UNKNOWN_CONTRAST_WARNING)
    elif contrast not in SENSITIVE_CONTRASTS:
        warnings.append(DESS_WARNING.format(contrast=contrast))
    box, crop_w, fem_w, med = femur_work_crop(arr, fem, sp, cfg.crop_margin_mm,
                                              getattr(scorer, "spacing_mm", WORK_SPACING_MM))
    t1 = time.perf_counter()
    z_w = mkd_zmap(crop_w, fem_w, scorer)
    t_score = time.perf_counter() - t1
    pp, mask_full, smooth_full, table = lesions_in_femur(
        z_w, box=box, fem=fem, seg_ras=seg_r, affine=img_r.affine, spacing=sp,
        config=cfg.postprocess, warnings=warnings)
    record = {
        "method": "mkd", "teacher": TEACHER_MODEL, "teacher_substitution": TEACHER_WARNING,
        "student": getattr(scorer, "card", None) or type(scorer).__name__,
        "anomaly_map": {"gradient": "SmoothGrad",
                        "attribution": getattr(scorer, "attribution", None),
                        "n_noise": getattr(scorer, "n_noise", None),
                        "noise": getattr(scorer, "noise", None),
                        "seed": getattr(scorer, "seed", None), "sigma_px": GRAD_SIGMA_PX,
                        "opening_px": OPENING_PX, "lambda_mse": LAMBDA_MSE,
                        "input_scale": INPUT_SCALE, "normalised": "robust z over the femur"},
        "config": cfg.to_dict(), "threshold_from": level_from, "contrast": contrast,
        "marrow_median": med,
        "steps": pp.steps, "femur_ml": round(femur_ml, 3),
        "timing_s": {"score": round(t_score, 3), "total": round(time.perf_counter() - t0, 3)},
    }
    return bml_result(mask_full, smooth_full, np.zeros(arr.shape, dtype=np.float32),
                      img_ras=img_r, orig_codes=orig_codes, table=table, warnings=warnings,
                      record=record)


def detect_bml_mkd_file(image_path: str | Path, out_path: str | Path, *,
                        seg_path: str | Path | None = None,
                        uncertainty_path: str | Path | None = None,
                        table_path: str | Path | None = None, contrast: str = "auto",
                        model: str = DEFAULT_MODEL, threshold: float | None = None,
                        device: str = "cpu") -> BmlResult:
    """Read, detect with MKD and write the mask (+ sidecar and ``*.bml.json`` record)."""
    from mskmri.anomaly.inpaint import _segment_or_explain, write_bml_outputs
    from mskmri.io import read, read_labels

    image = read(image_path)
    seg = (read_labels(seg_path, schema="knee") if seg_path is not None
           else _segment_or_explain(image, device))
    result = detect_bml_mkd(image, seg, scorer=MkdScorer(model, device=device),
                            contrast=contrast, threshold=threshold)
    write_bml_outputs(result, image_path=image_path, seg_path=seg_path, out_path=out_path,
                      uncertainty_path=uncertainty_path, table_path=table_path)
    return result
