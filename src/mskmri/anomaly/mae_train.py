"""Training of the cord masked autoencoder (``mskmri train mae``) on healthy cords only.

Data (``../shared/data/spine``):

- SCT ``sct_testing_data/t2`` (sagittal cervical T2 crop, 1 mm, manual cord mask; healthy):
  every sagittal slice holding cord, the masked region being the cord dilated by
  :data:`~mskmri.anomaly.mae.CSF_MARGIN_MM` (no CSF label there). Weight
  :data:`CORD_WEIGHT` of the samples.
- U2AD ``public_2`` and ``public_3`` (healthy Spine Generic slices, 1 mm): these are
  parasagittal (no cord labelled or in view), so they are auxiliary context only: the masked
  region is the labelled bodies/discs dilated by :data:`AUX_MARGIN_PX`, intensities normalised
  by that region's median. ``public_1`` is held out. Weight :data:`AUX_WEIGHT`.
- SCT ``sct_example_data_2014/t2`` (full-FOV cervical/upper thoracic T2) and
  ``sct_tutorial_data/t2_lumbar`` (lumbar T2), both 1 mm and unlabelled: the central
  :data:`BAND_SLICES` sagittal slices, with a random vertical band
  (:data:`BAND_WIDTH_PX` wide) as the masked region (a cord-like tube through healthy anatomy);
  intensities normalised by the median foreground signal. Weight ``1 - CORD_WEIGHT -
  AUX_WEIGHT``.

Not used for training: SCT ``t2/t2_fake_lesion`` (held out for the benchmark), the U2AD
clinical ``private_*`` slices (test set; the detector adapts to each input at test time).

Samples are :data:`~mskmri.anomaly.mae.WINDOW`-pixel windows around a random region pixel with
random rotation (+-:data:`ROTATE_DEG`), scale (:data:`SCALE_RANGE`), A-P flip, intensity scale
and gamma, and Gaussian noise; :data:`~mskmri.anomaly.mae.MASK_RATIO` of the region patches
are hidden. After training the z threshold (:func:`~mskmri.anomaly.mae.robust_z`) is
calibrated on the healthy SCT cord with the default detection pipeline (Monte-Carlo; no
adaptation, :data:`~mskmri.anomaly.mae.DEFAULT_ADAPT_STEPS`), voxel FPR :data:`~mskmri.anomaly.mae.PIXEL_FPR`, and stored in the card
(``extra["z_threshold"]``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from mskmri.anomaly import mae
from mskmri.errors import MskMriError

log = logging.getLogger(__name__)

#: Fraction of samples from healthy cords, from the auxiliary U2AD slices (the rest: bands).
CORD_WEIGHT = 0.6
AUX_WEIGHT = 0.15
#: Band slices: central sagittal slices taken per volume, band width range (pixels), and the
#: foreground (fraction of the 99th percentile) whose median sets the intensity scale.
BAND_SLICES = 9
BAND_WIDTH_PX = (8, 20)
FOREGROUND_FRACTION = 0.1
#: Unlabelled healthy SCT T2 volumes used as band slices (relative to spine/sct).
BAND_VOLUMES = ("sct_example_data_2014/t2.nii.gz", "sct_tutorial_data/t2_lumbar.nii.gz")
#: Auxiliary slices: region = labelled bodies/discs dilated by this, pixels.
AUX_MARGIN_PX = 3
#: Random rotation, degrees (+-).
ROTATE_DEG = 12.0
#: Random isotropic scale range.
SCALE_RANGE = (0.85, 1.15)
#: Random intensity scale range and gamma range.
INTENSITY_RANGE = (0.85, 1.15)
GAMMA_RANGE = (0.8, 1.25)
#: Largest Gaussian noise standard deviation (normalised units).
NOISE_MAX = 0.03
#: U2AD public slices used for training (public_1 is held out).
AUX_KEYS = ("public_2", "public_3")
#: SCT files (relative to spine/sct/sct_testing_data/t2).
SCT_IMAGE, SCT_CORD, SCT_LEVELS = "t2.nii.gz", "t2_seg-manual.nii.gz", "t2_seg-manual_labeled.nii.gz"


class MaeTrainingError(MskMriError):
    """The training data for ``mskmri train mae`` is missing or empty."""


@dataclass
class HealthyCase:
    """A healthy 3-D case for calibration: image, spine-schema label map, level segments."""

    name: str
    image: Any
    seg: Any
    segments: np.ndarray | None
    names: dict[int, str]


def sct_case(spine_dir: Path) -> HealthyCase:
    """The SCT cervical T2 crop with its manual cord (201) and levels C2..C5 as segments."""
    from mskmri.io import read
    from mskmri.labels import SPINAL_CORD
    from mskmri.volume import LabelVolume

    base = spine_dir / "sct" / "sct_testing_data" / "t2"
    if not (base / SCT_IMAGE).is_file():
        raise MaeTrainingError(f"no SCT T2 data at {base}; give --data with spine/sct inside")
    image = read(base / SCT_IMAGE)
    cord = read(base / SCT_CORD).array > 0
    levels = np.rint(read(base / SCT_LEVELS).array).astype(np.int32)
    seg = LabelVolume(np.where(cord, SPINAL_CORD, 0).astype(np.int32), image.affine,
                      {SPINAL_CORD: "spinal_cord"}, schema="spine")
    names = {int(v): f"C{int(v)}" for v in np.unique(levels) if v > 0}
    return HealthyCase("sct_testing_data/t2", image, seg, levels, names)


def aux_slices(spine_dir: Path) -> list[mae.CordSlice]:
    """Auxiliary healthy U2AD public slices (no cord in view): region = bodies/discs."""
    npz = spine_dir / "u2ad_cervical_slices" / "u2ad_samples.npz"
    if not npz.is_file():
        return []
    out = []
    with np.load(npz) as z:
        for key in AUX_KEYS:
            img = z[f"{key}_img"].astype(np.float32)
            region = ndimage.binary_dilation(z[f"{key}_labels"] > 0, iterations=AUX_MARGIN_PX)
            norm = mae.normalise(img, region)
            out.append(mae.CordSlice(norm, region, np.zeros_like(region), np.zeros_like(region)))
    return out


def band_slices(spine_dir: Path) -> list[mae.CordSlice]:
    """Central sagittal slices of the unlabelled healthy SCT volumes (region = foreground;
    the masked band is drawn per sample)."""
    from mskmri.io import read

    out = []
    for rel in BAND_VOLUMES:
        path = spine_dir / "sct" / rel
        if not path.is_file():
            continue
        vol = read(path).reorient(mae.CANONICAL_CODES)
        arr = vol.array.astype(np.float32)
        fg = arr > FOREGROUND_FRACTION * np.percentile(arr, 99)
        norm = np.clip(arr / float(np.median(arr[fg])) * mae.CORD_LEVEL, 0, mae.CLIP_MAX)
        mid = arr.shape[0] // 2
        for i in range(mid - BAND_SLICES // 2, mid + BAND_SLICES // 2 + 1):
            empty = np.zeros(fg[i].shape, bool)
            out.append(mae.CordSlice(norm[i].astype(np.float32), fg[i], empty, empty))
    return out


class MaeSlices:
    """Seeded dataset of augmented windows with hidden region patches.

    Each sample is ``{"image": (1, W, W) float32, "mask": (N,) bool}``.
    """

    def __init__(self, cord_slices: list[mae.CordSlice], aux: list[mae.CordSlice],
                 bands: list[mae.CordSlice] | None = None, length: int = 100_000) -> None:
        if not cord_slices:
            raise MaeTrainingError("no healthy cord slices to train on")
        self.cord = cord_slices
        self.aux = aux
        self.bands = list(bands or [])
        self.length = int(length)

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        """One augmented window and its mask."""
        u = rng.random()
        band = False
        if u < CORD_WEIGHT or not (self.aux or self.bands):
            pool = self.cord
        elif (u < CORD_WEIGHT + AUX_WEIGHT and self.aux) or not self.bands:
            pool = self.aux
        else:
            pool, band = self.bands, True
        sl = pool[int(rng.integers(len(pool)))]
        pts = np.argwhere(sl.region)
        centre = pts[int(rng.integers(len(pts)))] + rng.integers(-8, 9, size=2)
        w = mae.WINDOW
        ang = np.deg2rad(rng.uniform(-ROTATE_DEG, ROTATE_DEG))
        scale = rng.uniform(*SCALE_RANGE)
        rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]]) * scale
        offset = centre - rot @ np.array([w / 2 - 0.5, w / 2 - 0.5])
        img = ndimage.affine_transform(sl.image, rot, offset, output_shape=(w, w), order=1,
                                       mode="constant", cval=0.0)
        reg = ndimage.affine_transform(sl.region.astype(np.float32), rot, offset,
                                       output_shape=(w, w), order=0, mode="constant") > 0.5
        if band:  # a random vertical band through the window is the region
            width = int(rng.integers(BAND_WIDTH_PX[0], BAND_WIDTH_PX[1] + 1))
            c0 = int(rng.integers(0, w - width + 1))
            reg = np.zeros((w, w), bool)
            reg[:, c0:c0 + width] = True
        if rng.random() < 0.5:
            img, reg = img[:, ::-1], reg[:, ::-1]
        gamma = rng.uniform(*GAMMA_RANGE)
        img = mae.CORD_LEVEL * (np.maximum(img, 0) / mae.CORD_LEVEL) ** gamma
        img = img * rng.uniform(*INTENSITY_RANGE) + rng.normal(0, rng.uniform(0, NOISE_MAX),
                                                                 img.shape)
        img = np.clip(img, 0, mae.CLIP_MAX)
        cand = mae.patch_fraction(reg[None])[0] >= mae.MIN_REGION_FRACTION
        if not cand.any():
            cand = rng.random(cand.shape) < 0.3
            cand[int(rng.integers(cand.size))] = True
        mask = mae.guided_masks(cand[None], np.ones((1, cand.size)), rng)[0]
        return {"image": np.ascontiguousarray(img[None], dtype=np.float32), "mask": mask}


def calibrate(model: Any, cases: list[HealthyCase], *, seed: int = 0) -> dict[str, Any]:
    """z threshold at :data:`~mskmri.anomaly.mae.PIXEL_FPR` on healthy cords (full pipeline,
    :func:`~mskmri.anomaly.mae.robust_z` per case) and what the decision rule then says
    about those healthy cases."""
    vals = []
    results = []
    for case in cases:
        res = mae.detect_cord_hyperintensity(case.image, case.seg, model=model, threshold=1e9,
                                             segments=case.segments, segment_names=case.names,
                                             seed=seed)
        inner = res.inner
        vals.append(mae.robust_z(res.anomaly.array, inner)[0][inner])
        results.append((case, res, inner))
    allv = np.concatenate(vals)
    thr = float(np.quantile(allv, 1.0 - mae.PIXEL_FPR))
    healthy: dict[str, Any] = {}
    for case, res, inner in results:
        _, levels, patient = mae.apply_threshold(res.anomaly, inner, thr, case.segments,
                                                 case.names)
        healthy[case.name] = {"positive_segments": patient["positive_segments"],
                              "segments": len(levels), "patient_positive": patient["positive"],
                              "flagged_area_mm2": patient["flagged_area_mm2"]}
    return {"z_threshold": thr, "pixel_fpr": mae.PIXEL_FPR, "n_pixels": int(allv.size),
            "healthy_cases": healthy,
            "pipeline": f"as detection: adapt_steps {mae.DEFAULT_ADAPT_STEPS}, Monte-Carlo "
                        f"repeats {mae.MC_REPEATS}, robust z per case"}


def run(config: Any, options: Mapping[str, Any]) -> Any:
    """``mskmri train mae``: train on healthy cords, calibrate the threshold, save."""
    import torch

    from mskmri.anomaly.mae_net import MaskedAutoencoderViT, reconstruction_loss
    from mskmri.nn.registry import ModelCard, save_model
    from mskmri.nn.train import fit, format_command, seed_everything
    from mskmri.paths import shared_data_dir

    threads = options.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    data = options.get("data") or shared_data_dir()
    if data is None:
        raise MaeTrainingError("no shared data folder found; give --data DIR holding spine/")
    spine = Path(data) / "spine"
    case = sct_case(spine)
    cord = case.seg.array > 0
    _, _, slices, _ = mae.prepare_slices(case.image, cord, None)
    aux = aux_slices(spine)
    bands = band_slices(spine)
    log.info("training on %d healthy cord slices (SCT), %d auxiliary U2AD slices and %d band "
             "slices", len(slices), len(aux), len(bands))
    seed_everything(config.seed)
    dims = {k: options[k] for k in ("dim", "depth") if options.get(k)}
    net = MaskedAutoencoderViT(image_size=mae.WINDOW, patch=mae.PATCH, **dims)

    def objective(model: Any, batch: Mapping[str, Any]) -> Any:
        x, m = batch["image"], batch["mask"]
        return reconstruction_loss(model(x, m), x, m, edge_weight=mae.EDGE_WEIGHT)

    command = format_command("mae", config, options)
    result = fit(net, objective, MaeSlices(slices, aux, bands), config, command=command)
    trained: Any = result.model.cpu().eval()
    cal = calibrate(trained, [case], seed=config.seed)
    last = result.history[-1] if result.history else {}
    card = ModelCard(
        name=str(options.get("name") or mae.DEFAULT_MODEL), task="mae",
        input_spacing_mm=[mae.WORK_SPACING_MM, mae.WORK_SPACING_MM],
        normalisation={"method": "roi-median", "roi": "spinal cord",
                       "notes": f"image divided by the median cord signal of the input, times "
                                f"{mae.CORD_LEVEL}, clipped to [0, {mae.CLIP_MAX}]"},
        label_schema="none", labels={},
        training_data=[
            {"name": "Spinal Cord Toolbox sample data, sct_testing_data/t2 (healthy cervical "
                     "T2, manual cord mask)", "licence": "MIT (NeuroPoly)", "n": len(slices),
             "notes": "sagittal slices holding cord"},
            {"name": "U2AD public (Spine Generic) slices public_2, public_3 (healthy, "
                     "parasagittal: no cord in view; auxiliary context)",
             "licence": "MIT (U2AD, zhibaishouheilab)", "n": len(aux)},
            {"name": "Spinal Cord Toolbox sample data, sct_example_data_2014/t2 and "
                     "sct_tutorial_data/t2_lumbar (healthy, unlabelled; random-band masking)",
             "licence": "MIT (NeuroPoly)", "n": len(bands),
             "notes": f"central {BAND_SLICES} sagittal slices of each"}],
        command=command, seed=int(config.seed),
        validation={"final_loss": last.get("loss"),
                    "healthy_calibration": cal["healthy_cases"],
                    "note": "benchmarks/cord_hyperintensity.py holds the held-out evaluation"},
        notes=("U2AD (arXiv 2503.13400) ViT masked autoencoder, reduced for CPU: 64-pixel "
               "windows at 1 mm, patch 8, encoder/decoder as in config. Trained on ONE healthy "
               f"subject's cord (SCT sample) plus auxiliary healthy context ({len(aux)} U2AD "
               f"public slices without cord, {len(bands)} unlabelled SCT slices with random-band "
               "masking): a first small model. The z threshold is calibrated on that same "
               "training cord (optimistic)."),
        extra={"z_threshold": cal["z_threshold"], "calibration": cal,
               "steps": result.step, "window": mae.WINDOW, "patch": mae.PATCH,
               "mask_ratio": mae.MASK_RATIO, "edge_weight": mae.EDGE_WEIGHT,
               "sample_weights": {"cord": CORD_WEIGHT, "u2ad_public": AUX_WEIGHT,
                                  "bands": round(1 - CORD_WEIGHT - AUX_WEIGHT, 3)},
               "augmentation": {
                   "rotate_deg": ROTATE_DEG, "scale": list(SCALE_RANGE),
                   "intensity": list(INTENSITY_RANGE), "gamma": list(GAMMA_RANGE),
                   "noise_max": NOISE_MAX, "ap_flip": 0.5},
               "seconds": round(result.seconds, 1)},
    )
    return save_model(trained, Path(config.out) / "model.safetensors", card)
