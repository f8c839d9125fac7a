"""Training data and the ``mskmri train knee-seg`` task of the coarse-to-fine knee segmenter.

Data (issue 3): images rendered (:func:`mskmri.synth.render.render`) from the real label
maps in ``shared/data/knee`` — the OAI maps (bones, cartilage, lesions), the pymskt map
(menisci, fibula) and the SPL atlas (ligaments, tendons, muscles, fat pad); what a map lacks
is completed procedurally by :func:`mskmri.synth.anatomy.complete_knee`. Label maps are split
by subject (:func:`mskmri.synth.sources.split_by_subject`; both time points of an OAI subject
go together); pymskt and SPL are single subjects and always train.

Render ``i`` of a split is a pure function of ``(seed, split, i)``: its source map, contrast
(cycling through :data:`CONTRASTS`), in-plane matrix (:data:`INPLANE_CHOICES`), effusion
volume and every render parameter. Because one render costs several seconds, each render is
kept in a cache folder (:class:`RenderCache`, ``.npz`` per render): the coarse image and
truth at :data:`~mskmri.segment.knee.COARSE_SPACING_MM` and the fine image and truth at
:data:`~mskmri.segment.knee.FINE_SPACING_MM`, both in canonical (RAS) orientation. A missing
entry is rendered on first use (by a DataLoader worker or by :func:`fill_cache` running in
the background), so the cache only changes speed, never the data.

Training: :class:`CoarseDataset` yields the whole coarse volume (padded/cropped to
:data:`COARSE_PATCH`), :class:`FineDataset` fine patches of :data:`FINE_PATCH` voxels centred
on a random voxel of a random present class with probability :data:`FOREGROUND_PROBABILITY`;
both add a seeded intensity augmentation. Loss: cross-entropy + soft Dice. Both networks
are trained by :func:`mskmri.nn.train.fit` (seeded, resumable, DDP under ``torchrun``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mskmri.errors import MskMriError
from mskmri.labels import KNEE
from mskmri.segment.knee import (
    CANONICAL_AXES,
    COARSE_MODEL,
    COARSE_SPACING_MM,
    FINE_MODEL,
    FINE_SPACING_MM,
    N_CLASSES,
    NORM_PERCENTILES,
    canonical,
    grid_at_spacing,
    normalise_intensity,
)
from mskmri.volume import LabelVolume, Volume

log = logging.getLogger(__name__)

#: Contrasts rendered, cycled by render index.
CONTRASTS = ("dess", "iw-fs", "t1", "t2", "pd", "random")
#: In-plane matrices drawn per render (None = the source grid, 384 for OAI maps).
INPLANE_CHOICES: tuple[int | None, ...] = (None, 320, 256, 192)
#: Probability of a render without effusion.
NO_EFFUSION_PROBABILITY = 0.15
#: Range of the effusion volume (mL, log-uniform) otherwise.
EFFUSION_ML = (1.0, 60.0)
#: Share of subjects in the validation split (the rest train).
VAL_FRACTION = 0.2
#: Seed of the subject split (fixed: the split must not move with the training seed).
SPLIT_SEED = 0
#: Single-subject sources that always train (name -> relative path under shared/data/knee).
EXTRA_SOURCES = {
    "pymskt": "pymskt_dess_labels/SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd",
    "spl_atlas": "spl_atlas_labels",
}
#: Coarse network input (voxels at COARSE_SPACING_MM; multiple of 8).
COARSE_PATCH = (64, 80, 80)
#: Fine network patch (voxels at FINE_SPACING_MM; multiple of 16).
FINE_PATCH = (64, 64, 64)
#: Probability that a fine patch is centred on a voxel of a randomly chosen present class.
FOREGROUND_PROBABILITY = 0.7
#: Intensity augmentation: log-normal sigma of the gamma, of the contrast scale; noise sigma.
AUG_GAMMA_STD = 0.25
AUG_SCALE_STD = 0.1
AUG_SHIFT_STD = 0.05
AUG_NOISE_MAX = 0.05
#: Architectures (U-Net features and strides) of the two networks.
COARSE_FEATURES = (8, 16, 32, 64)
COARSE_STRIDES = (1, 2, 2, 2)
FINE_FEATURES = (8, 16, 32, 64, 128)
FINE_STRIDES = (1, 2, 2, 2, 2)
#: Weight of the soft-Dice term against cross-entropy.
DICE_WEIGHT = 1.0
#: Cache file schema.
CACHE_SCHEMA = "mskmri/knee-seg-cache/1"


class KneeTrainError(MskMriError):
    """Knee-segmentation training data or options are unusable."""


# ============================================================================ sources
def knee_data_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """``shared/data/knee`` (or ``root``); an error naming the option when it is missing."""
    if root is None:
        from mskmri.paths import shared_data_dir

        shared = shared_data_dir()
        if shared is None:
            raise KneeTrainError("the shared data folder was not found; pass --data DIR "
                                 "pointing at shared/data/knee or set MSKMRI_SHARED_DATA")
        path = shared / "knee"
    else:
        path = Path(root)
    if not (path / "oai_bone_lesion_labels").is_dir():
        raise KneeTrainError(f"no knee label maps under {path} (expected "
                             "oai_bone_lesion_labels/); pass --data DIR pointing at "
                             "shared/data/knee or set MSKMRI_SHARED_DATA")
    return path


def subject_split(root: str | os.PathLike[str] | None = None) -> dict[str, list[str]]:
    """Label-map paths per split: ``{"train": [...], "val": [...]}``, no subject in both.

    OAI maps are split by subject (both time points together, :data:`SPLIT_SEED`);
    the single-subject pymskt and SPL maps (:data:`EXTRA_SOURCES`) always train.
    """
    from mskmri.synth.sources import oai_label_paths, split_by_subject

    base = knee_data_dir(root)
    names = [str(p) for p in oai_label_paths(base / "oai_bone_lesion_labels")]
    split = split_by_subject(names, fractions=(1.0 - VAL_FRACTION, VAL_FRACTION),
                             split_names=("train", "val"), seed=SPLIT_SEED)
    extra = []
    for rel in EXTRA_SOURCES.values():
        p = base / rel
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.name.endswith((".nrrd", ".nii.gz")))
            if files:
                extra.append(str(files[0]))
        elif p.is_file():
            extra.append(str(p))
    return {"train": split["train"] + extra, "val": split["val"]}


@dataclass(frozen=True)
class RenderSpec:
    """Everything that decides one training render (recorded in the cache entry)."""

    source: str
    contrast: str
    inplane: int | None
    effusion_ml: float
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"source": self.source, "contrast": self.contrast, "inplane": self.inplane,
                "effusion_ml": self.effusion_ml, "seed": self.seed}


def render_spec(sources: Sequence[str], index: int, seed: int, split: str) -> RenderSpec:
    """The :class:`RenderSpec` of render ``index`` of ``split`` (a pure function)."""
    from mskmri.nn.train import sample_seed

    tag = {"train": 0, "val": 1}.get(split, 2)
    s = sample_seed(seed * 7919 + tag, index)
    rng = np.random.default_rng(s)
    src = sources[index % len(sources)]
    contrast = CONTRASTS[(index // len(sources) + index) % len(CONTRASTS)]
    inplane = INPLANE_CHOICES[int(rng.integers(len(INPLANE_CHOICES)))]
    eff = 0.0 if rng.random() < NO_EFFUSION_PROBABILITY else float(
        math.exp(rng.uniform(math.log(EFFUSION_ML[0]), math.log(EFFUSION_ML[1]))))
    return RenderSpec(src, contrast, inplane, round(eff, 2), int(s % (2**31 - 1)))


# ============================================================================ one render
def resample_pair(image: Volume, labels: LabelVolume, spacing: Sequence[float]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Image (linear) and labels (nearest) of one geometry on a grid of ``spacing`` mm.

    Both are reoriented to canonical axes first. Returns ``(float32, uint8)`` arrays.
    """
    img = canonical(image)
    lab = canonical(labels)
    shape, aff = grid_at_spacing(img, spacing)
    return (img.resample_to_grid(shape, aff, order=1).array.astype(np.float32),
            lab.resample_to_grid(shape, aff, order=0).array.astype(np.uint8))


def make_render(spec: RenderSpec, *, source_cache: dict[str, Any] | None = None
                ) -> dict[str, np.ndarray]:
    """Render ``spec`` and return its coarse and fine image/truth arrays (canonical axes).

    Returns
    -------
    dict
        ``coarse_image`` (float32), ``coarse_labels`` (uint8) at COARSE_SPACING_MM;
        ``fine_image``, ``fine_labels`` at FINE_SPACING_MM.
    """
    from mskmri.synth.render import render
    from mskmri.synth.sources import load_knee_source

    cache = source_cache if source_cache is not None else {}
    if spec.source not in cache:
        cache.clear()  # one source in memory at a time
        cache[spec.source] = load_knee_source(spec.source)
    src = cache[spec.source]
    res = render(src.labels, contrast=spec.contrast, seed=spec.seed, lesions=src.lesions,
                 extra=src.extra, effusion_ml=spec.effusion_ml, inplane=spec.inplane)
    ci, cl = resample_pair(res.image, res.labels, COARSE_SPACING_MM)
    fi, fl = resample_pair(res.image, res.labels, FINE_SPACING_MM)
    return {"coarse_image": ci, "coarse_labels": cl, "fine_image": fi, "fine_labels": fl}


# ============================================================================ cache
class RenderCache:
    """Renders of one split, ``<folder>/<split>_<index>.npz``, made on first use.

    Parameters
    ----------
    folder : path
        Cache folder (never inside the repository's tracked tree; e.g. ``OUT/cache``).
    sources : sequence of str
        Label-map paths of this split.
    seed : int
        Data seed.
    split : str
        ``"train"`` or ``"val"``.
    """

    def __init__(self, folder: str | os.PathLike[str], sources: Sequence[str], seed: int,
                 split: str) -> None:
        if not sources:
            raise KneeTrainError(f"no label maps in the {split!r} split")
        self.folder = Path(folder)
        self.sources = list(sources)
        self.seed = int(seed)
        self.split = split
        self._sources: dict[str, Any] = {}

    def path(self, index: int) -> Path:
        """Cache file of render ``index``."""
        return self.folder / f"{self.split}_{index:05d}.npz"

    def spec(self, index: int) -> RenderSpec:
        """The render spec of ``index``."""
        return render_spec(self.sources, index, self.seed, self.split)

    def get(self, index: int, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Arrays of render ``index`` (rendered and stored when absent or foreign).

        ``keys`` limits what is read from an existing entry (all arrays when None).
        """
        spec = self.spec(index)
        p = self.path(index)
        if p.is_file():
            try:
                with np.load(p, allow_pickle=False) as z:
                    meta = json.loads(str(z["meta"]))
                    if meta.get("schema") == CACHE_SCHEMA and meta.get("spec") == spec.to_dict():
                        wanted = [k for k in z.files if k != "meta"] if keys is None \
                            else list(keys)
                        return {k: z[k] for k in wanted}
                log.warning("cache entry %s was made from another spec; rendering again", p)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("cache entry %s unreadable (%s); rendering again", p, exc)
        arrays = make_render(spec, source_cache=self._sources)
        self.put(index, arrays)
        return arrays

    def put(self, index: int, arrays: Mapping[str, np.ndarray]) -> Path:
        """Store the arrays of render ``index`` (float32 kept as float16), atomically."""
        spec = self.spec(index)
        p = self.path(index)
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"schema": CACHE_SCHEMA, "spec": spec.to_dict(),
                "coarse_spacing_mm": list(COARSE_SPACING_MM),
                "fine_spacing_mm": list(FINE_SPACING_MM), "axes": CANONICAL_AXES}
        tmp = p.with_name(f".{p.stem}.{os.getpid()}.tmp.npz")
        store: dict[str, Any] = {k: (v.astype(np.float16) if v.dtype == np.float32 else v)
                                 for k, v in arrays.items()}
        np.savez(tmp, meta=np.array(json.dumps(meta)), **store)
        os.replace(tmp, p)
        return p


def fill_cache(cache: RenderCache, indices: Sequence[int]) -> int:
    """Make every listed cache entry (skipping existing ones); returns how many were made."""
    made = 0
    for i in indices:
        if not cache.path(i).is_file():
            t0 = time.perf_counter()
            cache.get(i)
            made += 1
            log.info("cache %s %d made in %.1f s", cache.split, i, time.perf_counter() - t0)
    return made


# ============================================================================ datasets
def augment_intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Seeded gamma, scale/shift and Gaussian noise on a normalised image (float32)."""
    img = np.clip(image, 0.0, None)
    gamma = float(np.exp(rng.normal(0.0, AUG_GAMMA_STD)))
    img = np.power(img, np.float32(gamma))
    img = img * np.float32(np.exp(rng.normal(0.0, AUG_SCALE_STD))) + np.float32(
        rng.normal(0.0, AUG_SHIFT_STD))
    sigma = float(rng.uniform(0.0, AUG_NOISE_MAX))
    if sigma > 0:
        img = img + rng.normal(0.0, sigma, img.shape).astype(np.float32)
    return img.astype(np.float32, copy=False)


def crop_or_pad(array: np.ndarray, start: Sequence[int], size: Sequence[int],
                fill: float = 0.0) -> np.ndarray:
    """``array[start:start+size]`` per axis, filled with ``fill`` where it leaves the array."""
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src = tuple(slice(max(s, 0), min(s + n, d)) for s, n, d in zip(start, size, array.shape,
                                                                    strict=True))
    dst = tuple(slice(a.start - s, a.stop - s) for a, s in zip(src, start, strict=True))
    if all(a.stop > a.start for a in src):
        out[dst] = array[src]
    return out


class _CacheDataset:
    """Samples of the first ``n_renders`` renders of ``cache``, ``patch`` voxels each."""

    default_patch: tuple[int, int, int] = FINE_PATCH

    def __init__(self, cache: RenderCache, n_renders: int,
                 patch: Sequence[int] | None = None) -> None:
        if n_renders < 1:
            raise KneeTrainError(f"n_renders must be >= 1, not {n_renders}")
        self.cache = cache
        self.n = int(n_renders)
        self.patch = tuple(int(p) for p in (patch or self.default_patch))

    def __len__(self) -> int:
        return self.n


class CoarseDataset(_CacheDataset):
    """Whole coarse volumes: ``(image (1, *patch) float32, labels (*patch) int64)``.

    A volume larger than the patch is cropped at a random position, a smaller one padded
    at a random offset (a translation augmentation). Default patch :data:`COARSE_PATCH`.
    """

    default_patch = COARSE_PATCH

    def sample(self, index: int, rng: np.random.Generator) -> tuple[Any, Any]:
        import torch

        d = self.cache.get(index, ("coarse_image", "coarse_labels"))
        img = normalise_intensity(d["coarse_image"].astype(np.float32))
        lab = d["coarse_labels"]
        start = [int(rng.integers(min(0, s - p), max(0, s - p) + 1))
                 for s, p in zip(img.shape, self.patch, strict=True)]
        img = augment_intensity(crop_or_pad(img, start, self.patch), rng)
        lab = crop_or_pad(lab, start, self.patch).astype(np.int64)
        return torch.from_numpy(img[None]), torch.from_numpy(lab)


class FineDataset(_CacheDataset):
    """Fine patches: ``(image (1, *patch) float32, labels (*patch) int64)``.

    Intensities are normalised with the percentiles of the coarse image (as at inference).
    """

    def sample(self, index: int, rng: np.random.Generator) -> tuple[Any, Any]:
        import torch

        d = self.cache.get(index)
        img = normalise_intensity(d["fine_image"].astype(np.float32),
                                  reference=d["coarse_image"].astype(np.float32))
        lab = d["fine_labels"]
        if rng.random() < FOREGROUND_PROBABILITY:
            present = [int(v) for v in np.unique(lab[::4, ::4, ::4]) if v != 0]
            cls = present[int(rng.integers(len(present)))] if present else 0
            idx = np.flatnonzero(lab == cls) if cls else np.array([], dtype=np.int64)
            centre = (np.unravel_index(int(idx[int(rng.integers(idx.size))]), lab.shape)
                      if idx.size else tuple(s // 2 for s in lab.shape))
        else:
            centre = tuple(int(rng.integers(s)) for s in lab.shape)
        start = [int(c) - p // 2 for c, p in zip(centre, self.patch, strict=True)]
        img = augment_intensity(crop_or_pad(img, start, self.patch), rng)
        lab = crop_or_pad(lab, start, self.patch).astype(np.int64)
        return torch.from_numpy(img[None]), torch.from_numpy(lab)


# ============================================================================ loss
def dice_ce_loss(logits: Any, target: Any, dice_weight: float = DICE_WEIGHT) -> Any:
    """Cross-entropy + soft Dice (mean over the foreground classes present in the batch).

    Parameters
    ----------
    logits : (B, K, *S) tensor
    target : (B, *S) int64 tensor
    """
    import torch
    from torch.nn import functional as F

    logits = logits.float()
    ce = F.cross_entropy(logits, target)
    prob = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(prob.dtype)
    dims = (0, *range(2, logits.ndim))
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    present = onehot.sum(dims)[1:] > 0
    dice = (2 * inter[1:] + 1e-5) / (denom[1:] + 1e-5)
    soft = dice[present].mean() if bool(present.any()) else torch.ones((), device=ce.device)
    return ce + dice_weight * (1.0 - soft)


# ============================================================================ networks
def coarse_config() -> Any:
    """:class:`~mskmri.nn.unet.UNetConfig` of the coarse network (small, 18 classes)."""
    from mskmri.nn.unet import UNetConfig

    return UNetConfig(spatial_dims=3, in_channels=1, out_channels=N_CLASSES,
                      features=COARSE_FEATURES, strides=COARSE_STRIDES)


def fine_config() -> Any:
    """:class:`~mskmri.nn.unet.UNetConfig` of the fine network (18 classes)."""
    from mskmri.nn.unet import UNetConfig

    return UNetConfig(spatial_dims=3, in_channels=1, out_channels=N_CLASSES,
                      features=FINE_FEATURES, strides=FINE_STRIDES)


def _objective(model: Any, batch: Any) -> Any:
    x, y = batch
    return dice_ce_loss(model(x), y)


def _make_validate(cache: RenderCache, n: int, stage: str) -> Any:
    """Validation hook: mean foreground Dice over ``n`` validation renders (one patch each)."""

    def validate(model: Any, step: int) -> dict[str, float]:

        ds: _CacheDataset = (CoarseDataset if stage == "coarse" else FineDataset)(cache, n)
        scores = []
        device = next(model.parameters()).device
        for i in range(n):
            x, y = ds.sample(i, np.random.default_rng(i))  # type: ignore[attr-defined]
            pred = model(x[None].to(device)).argmax(1)[0].cpu().numpy()
            truth = y.numpy()
            for c in np.unique(truth):
                if c == 0:
                    continue
                p, t = pred == c, truth == c
                scores.append(2.0 * np.logical_and(p, t).sum() / (p.sum() + t.sum()))
        return {"val_dice_mean": float(np.mean(scores)) if scores else float("nan")}

    return validate


TRAINING_DATA = [
    {"name": "OAI bone/cartilage/lesion label maps (Woo et al., MedIA 2024)",
     "licence": "no licence stated; research use, cite Woo et al. 2024 (arXiv 2211.16696)"},
    {"name": "pymskt DESS label map (menisci, fibula)", "licence": "MIT (pymskt, A. Gatti)"},
    {"name": "SPL/NAC Knee Atlas label map", "licence": "research/education; cite the SPL "
     "Knee Atlas"},
]


def _card(stage: str, config: Any, options: Mapping[str, Any], result: Any,
          n_train: int, split: Mapping[str, list[str]]) -> Any:
    from mskmri.nn.registry import ModelCard
    from mskmri.nn.train import format_command

    spacing = COARSE_SPACING_MM if stage == "coarse" else FINE_SPACING_MM
    patch = COARSE_PATCH if stage == "coarse" else FINE_PATCH
    val = result.validation[-1] if result.validation else {}
    return ModelCard(
        name=COARSE_MODEL if stage == "coarse" else FINE_MODEL, task="knee-seg",
        input_spacing_mm=list(spacing),
        normalisation={"method": "percentile", "low": NORM_PERCENTILES[0],
                       "high": NORM_PERCENTILES[1], "reference": "whole image at the "
                       "coarse spacing", "axes": CANONICAL_AXES},
        label_schema="knee", labels={"0": "background", **{str(k): v for k, v in KNEE.items()}},
        training_data=[*TRAINING_DATA, {"name": "mskmri.synth renders of the maps above",
                                        "licence": "derived; as the maps", "n": n_train,
                                        "notes": f"{len(split['train'])} label maps of the "
                                        f"train split, contrasts {list(CONTRASTS)}"}],
        command=format_command("knee-seg", config, options), seed=config.seed,
        validation={k: v for k, v in val.items()},
        notes=("Trained on synthetic renders only (mskmri.synth). Validation subjects "
               f"(held out, by subject): {[Path(v).name for v in split['val']]}."),
        extra={"stage": stage, "patch_size": list(patch), "steps": result.step,
               "train_seconds": result.seconds},
    )


def run(config: Any, options: dict[str, Any]) -> dict[str, Path]:
    """``mskmri train knee-seg``: train the coarse and/or the fine network.

    Parameters
    ----------
    config : TrainConfig
        Common options; ``config.steps`` are the fine network's steps.
    options : dict
        ``data`` (shared/data/knee), ``cache`` (render cache folder, default OUT/cache),
        ``renders`` (number of distinct training renders), ``stage`` (``coarse``, ``fine`` or
        ``both``), ``coarse_steps``, ``threads``.

    Returns
    -------
    dict stage -> weight file
        ``OUT/knee-seg-coarse.safetensors`` and/or ``OUT/knee-seg-fine.safetensors`` (each
        with its ``.json`` card); each stage trains in ``OUT/<stage>/`` (checkpoint, log).
    """
    import dataclasses

    import torch

    from mskmri.nn.registry import save_model
    from mskmri.nn.train import fit, seed_everything
    from mskmri.nn.unet import UNet

    if options.get("threads"):
        torch.set_num_threads(int(options["threads"]))
    stage = options.get("stage") or "both"
    if stage not in ("coarse", "fine", "both"):
        raise KneeTrainError(f"--stage must be coarse, fine or both, not {stage!r}")
    split = subject_split(options.get("data"))
    out = Path(config.out)
    cache_dir = Path(options.get("cache") or out / "cache")
    n = int(options.get("renders") or 400)
    n_val = int(options.get("val_renders") or 6)
    train_cache = RenderCache(cache_dir, split["train"], config.seed, "train")
    val_cache = RenderCache(cache_dir, split["val"], config.seed, "val")
    made: dict[str, Path] = {}
    stages = ["coarse", "fine"] if stage == "both" else [stage]
    for st in stages:
        steps = int(options.get("coarse_steps") or max(1, config.steps // 4)) \
            if st == "coarse" else config.steps
        cfg = dataclasses.replace(config, out=out / st, steps=steps)
        seed_everything(config.seed)
        model = UNet(coarse_config() if st == "coarse" else fine_config())
        ds = (CoarseDataset if st == "coarse" else FineDataset)(train_cache, n)
        result = fit(model, _objective, ds, cfg,
                     validate=_make_validate(val_cache, n_val, st) if n_val else None,
                     command=None)
        from mskmri.nn.train import init_runtime

        if init_runtime(config.device).is_main:
            path = out / f"{COARSE_MODEL if st == 'coarse' else FINE_MODEL}.safetensors"
            save_model(result.model, path, _card(st, config, options, result, n, split))
            made[st] = path
    return made
