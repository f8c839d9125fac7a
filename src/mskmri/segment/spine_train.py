"""``mskmri train spine-seg``: 2-D U-Net for vertebral bodies on sagittal slices (real data).

Data: the labelled real lumbar exams in ``<shared data>/spine`` (MyoSegmenTUM L1-L5 bodies,
Chu et al. T10-S1 bodies) with the fixed split by exam of
:data:`mskmri.segment._spine_data.SPLIT`; test exams are never read here. Classes: background,
vertebral body (any level), sacrum (the S1 body; labelled in the Chu exams only). Partial
labels are handled by ignoring, in the loss, the rows (S-I) beyond the labelled extent of each
exam (+- :data:`~mskmri.segment._spine_data.LABEL_BAND_MARGIN_MM`): MyoSegmenTUM leaves T12 and
the sacrum unlabelled, so they are neither body nor background there. Discs, cord and CSF are
not segmented by this model (only one real exam has disc masks).

Samples: a random sagittal slice (:data:`LABELLED_SLICE_P` of them holding a body), a random
crop of :data:`PATCH` pixels, rotation and scaling, then intensity augmentation: gamma,
contrast, a smooth multiplicative bias field, Gaussian noise, and contrast inversion (so T1
and T2, where the bodies are bright or dark, both work). The checkpoint with the best
validation Dice is kept.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from mskmri.nn.registry import ModelCard, save_model
from mskmri.nn.train import TrainConfig, TrainingError, fit, format_command, seed_everything
from mskmri.nn.unet import UNet
from mskmri.segment import _spine_data as sd

log = logging.getLogger(__name__)

#: Training patch (S-I rows, A-P columns), pixels of 1 mm.
PATCH: tuple[int, int] = (160, 160)
#: Fraction of samples drawn from slices that hold a labelled body.
LABELLED_SLICE_P = 0.85
#: Rotation range (deg) and scale range of the spatial augmentation.
ROTATION_DEG = 12.0
SCALE_RANGE: tuple[float, float] = (0.85, 1.15)
#: Gamma = exp(U(-x, x)).
LOG_GAMMA = 0.4
#: Contrast factor range about the mean.
CONTRAST_RANGE: tuple[float, float] = (0.7, 1.3)
#: Largest relative amplitude of the linear-plus-quadratic bias field.
BIAS_AMPLITUDE = 0.3
#: Largest Gaussian noise SD (image in [0, 1]).
NOISE_SD = 0.05
#: Probability of contrast inversion (x -> 1 - x).
INVERT_P = 0.35
#: Weight of the soft Dice term added to cross-entropy.
DICE_WEIGHT = 1.0
#: Network architecture (about 1.9 M parameters, 7.8 MB as float32).
NET_CONFIG: dict[str, Any] = {"spatial_dims": 2, "in_channels": 1, "out_channels": 3,
                              "features": [16, 32, 64, 128, 256], "strides": [1, 2, 2, 2, 2]}
#: Licences of the training data (for the model card).
TRAINING_DATA: list[dict[str, Any]] = [
    {"name": "MyoSegmenTUM spine (Burian et al., BMC Musculoskelet Disord 2019), via "
             "FastCleverSeg (Ramos et al., MRI 2024)", "licence": "GPL-3.0 (FastCleverSeg "
             "repository that distributes the converted data); original data licence: see "
             "the dataset's publication (not re-verified here)",
     "n": len(sd.SPLIT["train"]["myosegmentum"]), "notes": "L1-L5 bodies labelled"},
    {"name": "Chu et al., PLoS ONE 2015 lumbar MRI, via FastCleverSeg", "licence":
     "GPL-3.0 (FastCleverSeg repository that distributes the converted data); original data "
     "licence: see the dataset's publication (not re-verified here)",
     "n": len(sd.SPLIT["train"]["chu2015"]), "notes": "T10-S1 bodies; S1 used as sacrum class"},
]


class SpineSliceDataset:
    """Seeded sagittal-slice samples of labelled exams (see the module docstring).

    Parameters
    ----------
    exams : list of Exam
        Training exams on the canonical grid.
    """

    def __init__(self, exams: list[sd.Exam]) -> None:
        self.exams = exams
        self.labelled = [(e, k) for e, ex in enumerate(exams)
                         for k in range(ex.image.shape[0])
                         if np.any((ex.target[k] == 1) | (ex.target[k] == 2))]

    def __len__(self) -> int:
        return len(self.labelled)

    def sample(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One augmented ``(1, H, W)`` image and ``(H, W)`` target (int64, 255 = ignore)."""
        e, k = self.labelled[index]
        ex = self.exams[e]
        if rng.random() > LABELLED_SLICE_P:
            k = int(rng.integers(ex.image.shape[0]))
        img, tgt = augment_slice(ex.image[k], ex.target[k], rng)
        return torch.from_numpy(img[None]), torch.from_numpy(tgt.astype(np.int64))


def augment_slice(image: np.ndarray, target: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random crop of :data:`PATCH` with rotation/scale, then intensity augmentation.

    Parameters
    ----------
    image : (H, W) float32 ndarray
        Normalised slice in [0, 1].
    target : (H, W) uint8 ndarray
    rng : numpy Generator

    Returns
    -------
    image : (PATCH) float32 ndarray
    target : (PATCH) uint8 ndarray
        Outside the source slice: background 0 (image padded with 0).
    """
    ph, pw = PATCH
    h, w = image.shape
    # centre of the crop: near labelled pixels when there are any
    fg = np.argwhere((target == 1) | (target == 2))
    if len(fg) and rng.random() < 0.8:
        c = fg[int(rng.integers(len(fg)))].astype(float) + rng.normal(0, 20, 2)
    else:
        c = np.array([rng.uniform(0, h), rng.uniform(0, w)])
    ang = np.radians(rng.uniform(-ROTATION_DEG, ROTATION_DEG))
    scale = rng.uniform(*SCALE_RANGE)
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]]) * scale
    offset = c - rot @ (np.array([ph, pw], float) / 2.0)
    img = ndimage.affine_transform(image, rot, offset=offset, output_shape=PATCH, order=1,
                                   mode="constant", cval=0.0)
    tgt = ndimage.affine_transform(target, rot, offset=offset, output_shape=PATCH, order=0,
                                   mode="constant", cval=0)
    # intensity
    img = np.clip(img, 0.0, 1.0) ** np.exp(rng.uniform(-LOG_GAMMA, LOG_GAMMA))
    mean = float(img.mean())
    img = (img - mean) * rng.uniform(*CONTRAST_RANGE) + mean
    yy, xx = np.meshgrid(np.linspace(-1, 1, ph), np.linspace(-1, 1, pw), indexing="ij")
    coef = rng.uniform(-1, 1, 5) * BIAS_AMPLITUDE / 2.0
    bias = 1.0 + coef[0] * yy + coef[1] * xx + coef[2] * yy * xx + coef[3] * yy**2 + coef[4] * xx**2
    img = img * np.clip(bias, 0.3, None)
    if rng.random() < INVERT_P:
        img = 1.0 - img
    img = img + rng.normal(0.0, rng.uniform(0, NOISE_SD), img.shape)
    return img.astype(np.float32), tgt.astype(np.uint8)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice (foreground classes) over non-ignored pixels.

    Parameters
    ----------
    logits : (N, K, H, W) tensor
    target : (N, H, W) int64 tensor, :data:`~mskmri.segment._spine_data.IGNORE` = ignored.
    """
    ce = F.cross_entropy(logits.float(), target, ignore_index=sd.IGNORE)
    valid = (target != sd.IGNORE).unsqueeze(1).float()
    prob = logits.float().softmax(1) * valid
    onehot = F.one_hot(target.clamp(max=logits.shape[1] - 1), logits.shape[1])
    onehot = onehot.permute(0, 3, 1, 2).float() * valid
    dims = (0, 2, 3)
    inter = (prob * onehot).sum(dims)[1:]
    denom = (prob.sum(dims) + onehot.sum(dims))[1:]
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return ce + DICE_WEIGHT * (1.0 - dice.mean())


def run(config: TrainConfig, options: dict[str, Any]) -> Path:
    """The ``spine-seg`` training task (see :data:`mskmri.nn.registry.TRAIN_TASKS`).

    Parameters
    ----------
    config : TrainConfig
    options : dict
        ``data`` (the shared data folder; default :func:`mskmri.paths.shared_data_dir`),
        ``threads`` (torch CPU threads).

    Returns
    -------
    Path
        ``OUT/model.safetensors`` (the best validation checkpoint), card beside it.
    """
    from mskmri.paths import shared_data_dir
    from mskmri.segment.spine import predict_canonical

    data_opt = options.get("data") or shared_data_dir()
    if data_opt is None:
        raise TrainingError("the shared data folder (holding spine/) was not found; pass "
                            "--data DIR or set MSKMRI_SHARED_DATA")
    data = Path(data_opt)
    if options.get("threads"):
        torch.set_num_threads(int(options["threads"]))
    seed_everything(config.seed)
    train = sd.load_split(data, "train")
    val = sd.load_split(data, "validation")
    log.info("spine-seg: %d training exams, %d validation exams", len(train), len(val))
    model = UNet.from_config_dict(dict(NET_CONFIG))
    dataset = SpineSliceDataset(train)
    best: dict[str, Any] = {"dice": -1.0, "step": 0, "per_exam": {}}
    out = Path(config.out)
    command = format_command("spine-seg", config, options)

    def objective(net: torch.nn.Module, batch: Any) -> torch.Tensor:
        img, tgt = batch
        out_ = net(img)
        logits = out_[0] if isinstance(out_, list) else out_
        return segmentation_loss(logits, tgt)

    def card(validation: dict[str, Any]) -> ModelCard:
        return ModelCard(
            name="spine-seg", task="spine-seg", input_spacing_mm=None,
            normalisation={"method": "percentile", "low": sd.NORM_PERCENTILES[0],
                           "high": sd.NORM_PERCENTILES[1], "of": "non-zero voxels of the volume"},
            label_schema="spine", labels={str(k): v for k, v in sd.NET_CLASSES.items()},
            training_data=TRAINING_DATA, command=command, seed=config.seed,
            validation=validation,
            notes=("2-D U-Net on sagittal slices (canonical grid R,I,P; in-plane 1 mm). Vertebral "
                   "bodies (instance-agnostic) and the S1 body (sacrum, from the Chu exams); "
                   "discs, cord and CSF are NOT segmented. Partial labels: loss ignored beyond "
                   "the labelled S-I extent of each exam. Checkpoint chosen on validation Dice."),
            extra={"patch": list(PATCH), "canonical_codes": list(sd.CANONICAL_CODES),
                   "inplane_spacing_mm": sd.INPLANE_SPACING_MM, "split": sd.SPLIT,
                   "augmentation": {"rotation_deg": ROTATION_DEG, "scale": list(SCALE_RANGE),
                                    "log_gamma": LOG_GAMMA, "contrast": list(CONTRAST_RANGE),
                                    "bias": BIAS_AMPLITUDE, "noise_sd": NOISE_SD,
                                    "invert_p": INVERT_P}})

    def validate(net: torch.nn.Module, step: int) -> dict[str, float]:
        per: dict[str, float] = {}
        for ex in val:
            lab = predict_canonical(net, ex.image)
            band = sd.label_band(ex.gt)
            per[ex.name] = sd.binary_dice(lab[:, band] > 0, ex.gt[:, band] > 0)
        mean = float(np.mean(list(per.values())))
        if mean > best["dice"]:
            best.update(dice=mean, step=step, per_exam=per)
            save_model(net, out / "model.safetensors", card({
                "metric": "binary vertebral-body Dice within the labelled S-I band",
                "mean_dice": mean, "per_exam": per, "step": step,
                "exams": [e.name for e in val]}))
        return {"val_dice": mean, **{f"dice_{k.replace('/', '_')}": v for k, v in per.items()}}

    fit(model, objective, dataset, config, validate=validate, command=command)
    log.info("best validation Dice %.4f at step %d", best["dice"], best["step"])
    return out / "model.safetensors"
