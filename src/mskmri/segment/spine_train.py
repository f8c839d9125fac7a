"""``mskmri train spine-seg``: 2-D U-Net for the spine classes on sagittal slices (real data).

Classes (:data:`mskmri.segment._spine_data.NET_CLASSES`): background, vertebral body (any
level), sacrum (S1 body), intervertebral disc, spinal cord, CSF.

Data, every source partially labelled:

- MyoSegmenTUM (L1-L5 bodies) and Chu et al. (T10-S1 bodies; the lowest is the sacrum class)
  with the fixed split by exam of :data:`mskmri.segment._spine_data.SPLIT` (test exams are never
  read here); rows beyond each exam's labelled S-I extent are ignored.
- the disc exam (``ivd_discs``: five lumbar discs), the SCT T1 and T2 cervical crops (cord);
- U2AD clinical cervical slices of one fold of :data:`~mskmri.segment._spine_data.U2AD_FOLDS`
  (bodies, discs, cord, partial CSF); the other slices are kept for scoring.

**Marginal loss** (Shi et al., "Marginal loss and exclusion loss for partially supervised
multi-organ segmentation", MedIA 2021): for a sample that does not label class c, a pixel marked
background means "background or c", so its probability is the sum of the background and every
unlabelled class (:func:`marginal_log_probs`); cross-entropy is taken on these merged
probabilities, and the soft Dice term only over the classes the sample labels.

Samples: a source is drawn with :data:`SOURCE_WEIGHTS`, then a slice of it (within the body
exams, :data:`LABELLED_SLICE_P` of them holding a labelled voxel), a random crop of
:data:`PATCH` pixels, rotation and scaling, then intensity augmentation: gamma, contrast, a
smooth multiplicative bias field, Gaussian noise, and contrast inversion (so T1 and T2 both
work). Warm start (``--warm-start``): every tensor of an earlier spine-seg network that fits,
the output layer's first channels included. The checkpoint with the best validation
vertebral-body Dice (lumbar validation exams) is kept.
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
#: Rotation range (deg) and scale range of the spatial augmentation. 30 deg (was 12): the L5
#: of the Chu exams lies at 30-50 deg to the other bodies, and its anterior-inferior corner was
#: missed; 900 fine-tuning steps at 30 deg from the 12-deg model raised the lumbar validation
#: Dice from 0.848 to 0.850 and lowered the median |endplate-angle error| of the predicted
#: L1-L5 bodies on the validation exams from 2.0 to 1.7 deg (p90 5.7 -> 4.2 deg), both with
#: the pipeline's bone rule (:func:`mskmri.segment.spine.veto_bone`).
ROTATION_DEG = 30.0
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
#: Probability of each source group per sample (body exams, disc exam, cord crops, U2AD).
SOURCE_WEIGHTS: dict[str, float] = {"bodies": 0.55, "discs": 0.15, "cord": 0.1, "u2ad": 0.2}
#: Network architecture (about 1.9 M parameters, 7.8 MB as float32).
NET_CONFIG: dict[str, Any] = {"spatial_dims": 2, "in_channels": 1, "out_channels": sd.N_CLASSES,
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
    {"name": "Lumbar disc MRI (Menezes-Reis et al., QIMS 2016), via FastCleverSeg",
     "licence": "GPL-3.0 (FastCleverSeg repository); original data licence: see the "
                "publication (not re-verified here)", "n": 1, "notes": "L1-S1 discs only"},
    {"name": "Spinal Cord Toolbox testing data (NeuroPoly), t1 and t2 crops", "licence": "MIT",
     "n": 2, "notes": "manual cord masks only"},
    {"name": "U2AD cervical slices (zhibaishouheilab)", "licence": "MIT",
     "n": None, "notes": "clinical sagittal T2 slices of one fold (see extra.u2ad_fold): "
                         "bodies, discs, cord, partial CSF"},
]


class SpineSliceDataset:
    """Seeded sagittal-slice samples of partially labelled exams (see the module docstring).

    Parameters
    ----------
    groups : dict of str to list of Exam
        Training exams on the canonical grid by source group (keys of :data:`SOURCE_WEIGHTS`;
        empty groups are skipped and the weights renormalised).
    """

    def __init__(self, groups: dict[str, list[sd.Exam]]) -> None:
        self.groups = {g: ex for g, ex in groups.items() if ex}
        self.slices = {g: [(e, k) for e, ex in enumerate(exams) for k in range(ex.image.shape[0])
                           if np.any((ex.target[k] > 0) & (ex.target[k] != sd.IGNORE))]
                       for g, exams in self.groups.items()}
        names = list(self.groups)
        w = np.array([SOURCE_WEIGHTS.get(g, 0.0) for g in names], float)
        self.names, self.weights = names, w / w.sum()

    def __len__(self) -> int:
        return sum(len(v) for v in self.slices.values())

    def sample(self, index: int,
               rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One augmented ``(1, H, W)`` image, ``(H, W)`` target (int64, 255 = ignore) and the
        ``(K,)`` bool vector of the classes its exam labels."""
        g = self.names[int(rng.choice(len(self.names), p=self.weights))]
        e, k = self.slices[g][int(rng.integers(len(self.slices[g])))]
        ex = self.groups[g][e]
        if g == "bodies" and rng.random() > LABELLED_SLICE_P:
            k = int(rng.integers(ex.image.shape[0]))
        img, tgt = augment_slice(ex.image[k], ex.target[k], rng)
        return (torch.from_numpy(img[None]), torch.from_numpy(tgt.astype(np.int64)),
                torch.from_numpy(ex.labelled.copy()))


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
    fg = np.argwhere((target > 0) & (target != sd.IGNORE))
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
                                   mode="constant", cval=sd.IGNORE)
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


def marginal_log_probs(logits: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """Log-probabilities with every unlabelled class merged into background.

    Parameters
    ----------
    logits : (N, K, H, W) tensor
    labelled : (N, K) bool tensor
        Classes each sample labels (background always).

    Returns
    -------
    (N, K, H, W) tensor
        Channel 0 = log(p_background + sum of p_c over unlabelled c); the labelled classes keep
        their log-probability (unlabelled channels are left as they are and never indexed).
    """
    logp = F.log_softmax(logits.float(), dim=1)
    merge = (~labelled).clone()
    merge[:, 0] = True
    neg = torch.finfo(logp.dtype).min
    bg = torch.logsumexp(logp.masked_fill(~merge[:, :, None, None], neg), dim=1, keepdim=True)
    return torch.cat([bg, logp[:, 1:]], dim=1)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor,
                      labelled: torch.Tensor | None = None) -> torch.Tensor:
    """Marginal cross-entropy + soft Dice (labelled foreground classes) over non-ignored pixels.

    Parameters
    ----------
    logits : (N, K, H, W) tensor
    target : (N, H, W) int64 tensor
        :data:`~mskmri.segment._spine_data.IGNORE` = ignored; 0 = background or any class the
        sample does not label.
    labelled : (N, K) bool tensor, optional
        Classes each sample labels (default: all, the plain loss).
    """
    n, k = logits.shape[:2]
    if labelled is None:
        labelled = torch.ones((n, k), dtype=torch.bool, device=logits.device)
    logq = marginal_log_probs(logits, labelled)
    ce = F.nll_loss(logq, target, ignore_index=sd.IGNORE)
    valid = (target != sd.IGNORE).unsqueeze(1).float()
    prob = logq.exp() * valid
    onehot = F.one_hot(target.clamp(max=k - 1), k).permute(0, 3, 1, 2).float() * valid
    lab = labelled[:, 1:].float()[:, :, None, None]
    inter = (prob[:, 1:] * onehot[:, 1:] * lab).sum((0, 2, 3))
    denom = ((prob[:, 1:] + onehot[:, 1:]) * lab).sum((0, 2, 3))
    present = labelled[:, 1:].any(0)
    if not bool(present.any()):
        return ce
    dice = (2 * inter[present] + 1.0) / (denom[present] + 1.0)
    return ce + DICE_WEIGHT * (1.0 - dice.mean())


def warm_start(model: torch.nn.Module, path: str | Path) -> dict[str, int]:
    """Copy every fitting tensor of an earlier spine-seg file into ``model``.

    Tensors of the same shape are copied; an output layer with fewer classes fills the first
    channels of the new one (the class order only grows at the end), the rest keep their
    seeded initialisation.

    Returns
    -------
    dict
        ``{"copied": n, "extended": n, "skipped": n}`` tensor counts.
    """
    from safetensors.torch import load_file

    src = load_file(str(path), device="cpu")
    dst = model.state_dict()
    counts = {"copied": 0, "extended": 0, "skipped": 0}
    for key, t in src.items():
        if key not in dst:
            counts["skipped"] += 1
        elif tuple(t.shape) == tuple(dst[key].shape):
            dst[key] = t.clone()
            counts["copied"] += 1
        elif t.shape[1:] == dst[key].shape[1:] and t.shape[0] < dst[key].shape[0]:
            dst[key][: t.shape[0]] = t
            counts["extended"] += 1
        else:
            counts["skipped"] += 1
    model.load_state_dict(dst)
    log.info("warm start from %s: %s", path, counts)
    return counts


def run(config: TrainConfig, options: dict[str, Any]) -> Path:
    """The ``spine-seg`` training task (see :data:`mskmri.nn.registry.TRAIN_TASKS`).

    Parameters
    ----------
    config : TrainConfig
    options : dict
        ``data`` (the shared data folder; default :func:`mskmri.paths.shared_data_dir`),
        ``threads`` (torch CPU threads), ``u2ad_fold`` (``"a"`` default, ``"b"`` or
        ``"none"``: which U2AD slices are trained on), ``warm_start`` (an earlier spine-seg
        ``*.safetensors``).

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
    fold = str(options.get("u2ad_fold") or "a")
    if fold not in sd.U2AD_FOLDS:
        raise TrainingError(f"--u2ad-fold {fold!r} is not one of {sorted(sd.U2AD_FOLDS)}")
    groups = {
        "bodies": sd.load_split(data, "train"),
        "discs": [sd.load_partial_exam(data, i, m, sd.DISC) for i, m in sd.DISC_EXAMS],
        "cord": [sd.load_partial_exam(data, i, m, sd.CORD) for i, m in sd.CORD_EXAMS],
        "u2ad": sd.load_u2ad(data, sd.U2AD_FOLDS[fold]),
    }
    val = sd.load_split(data, "validation")
    log.info("spine-seg: %s training exams, %d validation exams, U2AD fold %s",
             {g: len(v) for g, v in groups.items()}, len(val), fold)
    model = UNet.from_config_dict(dict(NET_CONFIG))
    warm = options.get("warm_start")
    if warm:
        warm_start(model, warm)
    dataset = SpineSliceDataset(groups)
    best: dict[str, Any] = {"dice": -1.0, "step": 0, "per_exam": {}}
    out = Path(config.out)
    command = format_command("spine-seg", config, options)

    def objective(net: torch.nn.Module, batch: Any) -> torch.Tensor:
        img, tgt, labelled = batch
        out_ = net(img)
        logits = out_[0] if isinstance(out_, list) else out_
        return segmentation_loss(logits, tgt, labelled)

    def card(validation: dict[str, Any]) -> ModelCard:
        return ModelCard(
            name="spine-seg", task="spine-seg", input_spacing_mm=None,
            normalisation={"method": "percentile", "low": sd.NORM_PERCENTILES[0],
                           "high": sd.NORM_PERCENTILES[1], "of": "non-zero voxels of the volume"},
            label_schema="spine", labels={str(k): v for k, v in sd.NET_CLASSES.items()},
            training_data=TRAINING_DATA, command=command, seed=config.seed,
            validation=validation,
            notes=("2-D U-Net on sagittal slices (canonical grid R,I,P; in-plane 1 mm). Vertebral "
                   "bodies (instance-agnostic), the S1 body (sacrum, from the Chu exams), "
                   "intervertebral discs, spinal cord and CSF. Partial labels: marginal loss "
                   "(unlabelled classes merged into background per source) and loss ignored "
                   "beyond the labelled S-I extent of each exam. Checkpoint chosen on the "
                   "lumbar validation vertebral-body Dice."),
            extra={"patch": list(PATCH), "canonical_codes": list(sd.CANONICAL_CODES),
                   "inplane_spacing_mm": sd.INPLANE_SPACING_MM, "split": sd.SPLIT,
                   "u2ad_fold": fold, "u2ad_trained": list(sd.U2AD_FOLDS[fold]),
                   "source_weights": SOURCE_WEIGHTS, "warm_start": str(warm) if warm else None,
                   "loss": "marginal cross-entropy + soft Dice over labelled classes",
                   "augmentation": {"rotation_deg": ROTATION_DEG, "scale": list(SCALE_RANGE),
                                    "log_gamma": LOG_GAMMA, "contrast": list(CONTRAST_RANGE),
                                    "bias": BIAS_AMPLITUDE, "noise_sd": NOISE_SD,
                                    "invert_p": INVERT_P}})

    def validate(net: torch.nn.Module, step: int) -> dict[str, float]:
        per: dict[str, float] = {}
        for ex in val:
            lab = predict_canonical(net, ex.image)
            band = sd.label_band(ex.gt)
            bone = (lab == sd.BODY) | (lab == sd.SACRUM)
            per[ex.name] = sd.binary_dice(bone[:, band], ex.gt[:, band] > 0)
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
