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

Training: the renders are read once and kept in memory, so a sample is a crop plus its
augmentation (about 15 ms on one core; the first, short CPU runs spent most of their time
rendering inside the training loop). :class:`CoarseDataset` yields random crops of
:data:`COARSE_PATCH` of the coarse volume, :class:`FineDataset` fine patches of
:data:`FINE_PATCH` voxels centred, with probability :data:`FOREGROUND_PROBABILITY`, on a
voxel of a class drawn with :data:`CLASS_SAMPLING_WEIGHTS` (cartilage, menisci and ligaments
more often). Every patch gets :func:`augment_patch`: a left-right flip, SynthSeg-style random
per-class intensities on a share of the patches (so the networks do not learn only this
renderer's contrast tables), partial-volume and thick-slice blur, gamma, a smooth bias field
and noise. Loss: cross-entropy + soft Dice. Both networks are trained by
:func:`mskmri.nn.train.fit` (seeded, resumable, DDP under ``torchrun``); the validation hook
segments whole held-out renders with the sliding-window inferer and keeps the weights with
the best mean Dice over the bone, cartilage and meniscus groups (:data:`GROUPS`), which are
the ones shipped.
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
from mskmri.labels import KNEE, KNEE_ID
from mskmri.segment.knee import (
    CANONICAL_AXES,
    COARSE_MODEL,
    COARSE_SPACING_MM,
    FINE_MODEL,
    FINE_SPACING_MM,
    N_CLASSES,
    NORM_CLIP,
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
#: Coarse network input (voxels at COARSE_SPACING_MM; multiple of 8): random crops of the
#: whole coarse volume (56 x 70 x 70 voxels for an OAI map), run as a sliding window at inference.
COARSE_PATCH = (48, 64, 64)
#: Fine network patch (voxels at FINE_SPACING_MM; multiple of 16; 38 mm at 0.8 mm): small
#: enough for many steps on one CPU core, large enough for the joint's local anatomy.
FINE_PATCH = (48, 48, 48)
#: Probability that a fine patch is centred on a voxel of a class drawn with
#: :data:`CLASS_SAMPLING_WEIGHTS` (otherwise on a uniformly random voxel).
FOREGROUND_PROBABILITY = 0.8
#: Relative weight of each class when choosing the class a fine patch is centred on (thin
#: structures more often: they hold few voxels and decide the Dice targets); others 1.
CLASS_SAMPLING_WEIGHTS: dict[str, float] = {
    "femoral_cartilage": 3.0, "medial_tibial_cartilage": 3.0, "lateral_tibial_cartilage": 3.0,
    "patellar_cartilage": 3.0, "medial_meniscus": 3.0, "lateral_meniscus": 3.0,
    "anterior_cruciate_ligament": 2.0, "posterior_cruciate_ligament": 2.0,
    "collateral_ligaments": 2.0, "patellar_tendon": 2.0, "fibula": 1.5, "patella": 1.5}
#: At most this many voxel positions per class and render are kept as patch centres.
MAX_CENTRES_PER_CLASS = 4096
#: Probability of a left-right flip (axis 0 of RAS): a right knee becomes a left knee with
#: the same labels (medial stays medial), so both sides are seen.
FLIP_PROBABILITY = 0.5
#: Probability that a patch's intensities are replaced by random per-class intensities
#: (SynthSeg-style domain randomisation; background keeps the rendered image, rescaled), so
#: the model does not learn the renderer's contrast tables.
RELABEL_PROBABILITY = 0.2
#: Per-class intensity std (normalised units) drawn up to this in the relabelled patches.
RELABEL_STD_MAX = 0.08
#: Intensity augmentation of every patch: log-normal sigma of the gamma and of the contrast
#: scale, std of the shift, upper bound of the Gaussian noise sigma (normalised units).
AUG_GAMMA_STD = 0.3
AUG_SCALE_STD = 0.1
AUG_SHIFT_STD = 0.05
AUG_NOISE_MAX = 0.08
#: Multiplicative bias field: log-amplitude std drawn up to this, on a BIAS_GRID^3 control grid
#: (linearly interpolated over the patch).
AUG_BIAS_MAX = 0.3
AUG_BIAS_GRID = 3
#: Resolution augmentation: probability and sigma range (voxels) of an isotropic Gaussian
#: blur, and of a thick-slice blur along one random axis.
AUG_BLUR_PROBABILITY = 0.25
AUG_BLUR_SIGMA = (0.3, 0.9)
AUG_THICK_PROBABILITY = 0.25
AUG_THICK_SIGMA = (0.8, 2.0)
#: Architectures (U-Net features and strides) of the two networks. The fine network's
#: first level has 16 channels: on one CPU thread a 64^3 training step costs about the same
#: as with 8 (measured 0.76-0.97 s vs 0.73-0.83 s), and the thin classes need the width.
COARSE_FEATURES = (8, 16, 32, 64)
COARSE_STRIDES = (1, 2, 2, 2)
FINE_FEATURES = (16, 32, 64, 128, 160)
FINE_STRIDES = (1, 2, 2, 2, 2)
#: Weight of the soft-Dice term against cross-entropy.
DICE_WEIGHT = 1.0
#: Class groups of the issue-3 targets; the validation hook reports their mean Dice and keeps
#: the weights with the best mean over the groups.
GROUPS: dict[str, tuple[str, ...]] = {
    "bones": ("femur", "tibia", "patella", "fibula"),
    "cartilage": ("femoral_cartilage", "medial_tibial_cartilage", "lateral_tibial_cartilage",
                  "patellar_cartilage"),
    "menisci": ("medial_meniscus", "lateral_meniscus"),
}
#: Sliding-window overlap of the validation hook (0: cheapest; the benchmark uses the
#: inference overlap).
VAL_OVERLAP = 0.0
#: Files of the best validated weights inside each stage folder.
BEST_WEIGHTS = "best.safetensors"
BEST_RECORD = "best.json"
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
    """Seeded gamma, bias field, scale/shift and Gaussian noise on a normalised image.

    Parameters
    ----------
    image : (Z, Y, X) float32 ndarray
        Normalised intensities (:func:`~mskmri.segment.knee.normalise_intensity`).
    rng : numpy Generator

    Returns
    -------
    float32 ndarray, same shape, clipped to :data:`~mskmri.segment.knee.NORM_CLIP`.
    """
    from scipy import ndimage

    img = np.clip(image, 0.0, None)
    gamma = float(np.exp(rng.normal(0.0, AUG_GAMMA_STD)))
    img = np.power(img, np.float32(gamma))
    amp = float(rng.uniform(0.0, AUG_BIAS_MAX))
    if amp > 0 and img.ndim == 3:
        grid = rng.normal(0.0, amp, (AUG_BIAS_GRID,) * 3)
        zoom = [s / AUG_BIAS_GRID for s in img.shape]
        field = ndimage.zoom(grid, zoom, order=1, mode="nearest", grid_mode=True)
        img = img * np.exp(field[tuple(slice(0, s) for s in img.shape)]).astype(np.float32)
    img = img * np.float32(np.exp(rng.normal(0.0, AUG_SCALE_STD))) + np.float32(
        rng.normal(0.0, AUG_SHIFT_STD))
    sigma = float(rng.uniform(0.0, AUG_NOISE_MAX))
    if sigma > 0:
        img = img + rng.normal(0.0, sigma, img.shape).astype(np.float32)
    return np.clip(img.astype(np.float32, copy=False), *NORM_CLIP)


def augment_resolution(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Seeded partial-volume blur: isotropic and/or thick slices along one random axis."""
    from scipy import ndimage

    img = image
    if rng.random() < AUG_BLUR_PROBABILITY:
        img = ndimage.gaussian_filter(img, float(rng.uniform(*AUG_BLUR_SIGMA)), truncate=2.5)
    if rng.random() < AUG_THICK_PROBABILITY:
        axis = int(rng.integers(img.ndim))
        img = ndimage.gaussian_filter1d(img, float(rng.uniform(*AUG_THICK_SIGMA)), axis=axis,
                                        truncate=2.5)
    return img.astype(np.float32, copy=False)


def relabel_intensities(image: np.ndarray, labels: np.ndarray,
                        rng: np.random.Generator) -> np.ndarray:
    """SynthSeg-style image: a random mean and texture per class, background from ``image``.

    Every class of :data:`~mskmri.labels.KNEE` gets a uniform random mean in [0, 1] and
    Gaussian texture (std up to :data:`RELABEL_STD_MAX`, then blurred by the resolution
    augmentation); background voxels keep ``image`` scaled by a random factor in [0.5, 1.5].
    """
    means = rng.uniform(0.0, 1.0, N_CLASSES).astype(np.float32)
    stds = rng.uniform(0.0, RELABEL_STD_MAX, N_CLASSES).astype(np.float32)
    out = means[labels] + stds[labels] * rng.standard_normal(labels.shape, dtype=np.float32)
    bg = labels == 0
    out[bg] = image[bg] * np.float32(rng.uniform(0.5, 1.5))
    return out.astype(np.float32, copy=False)


def augment_patch(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Every training augmentation of one patch (seeded; same draws for the same ``rng``).

    Left-right flip (:data:`FLIP_PROBABILITY`), per-class random intensities
    (:data:`RELABEL_PROBABILITY`), resolution (:func:`augment_resolution`) and intensity
    (:func:`augment_intensity`) augmentation.

    Returns
    -------
    image : float32 ndarray
    labels : ndarray, same shape (flipped with the image)
    """
    if rng.random() < FLIP_PROBABILITY:
        image, labels = image[::-1], labels[::-1]
    if rng.random() < RELABEL_PROBABILITY:
        image = relabel_intensities(image, labels, rng)
    image = augment_resolution(np.ascontiguousarray(image, dtype=np.float32), rng)
    return augment_intensity(image, rng), np.ascontiguousarray(labels)


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


def class_centres(labels: np.ndarray, rng: np.random.Generator,
                  limit: int = MAX_CENTRES_PER_CLASS) -> dict[int, np.ndarray]:
    """Flat voxel indices of each present foreground class (at most ``limit`` each, seeded)."""
    order = np.argsort(labels, axis=None, kind="stable")
    counts = np.bincount(labels.ravel(), minlength=N_CLASSES)
    ends = np.cumsum(counts)
    out: dict[int, np.ndarray] = {}
    for c in range(1, len(counts)):
        idx = order[ends[c] - counts[c]:ends[c]]
        if idx.size > limit:
            idx = rng.choice(idx, limit, replace=False)
        if idx.size:
            out[c] = idx.astype(np.int64)
    return out


#: Sampling weight of each class id (index = label value).
_CLASS_WEIGHT = np.ones(N_CLASSES)
for _name, _w in CLASS_SAMPLING_WEIGHTS.items():
    _CLASS_WEIGHT[KNEE_ID[_name]] = _w


class _CacheDataset:
    """Samples of the first ``n_renders`` renders of ``cache``, ``patch`` voxels each.

    Renders are read once and kept in memory (with their normalised image and the patch
    centres of every class), so a sample costs a crop and its augmentation.
    """

    default_patch: tuple[int, int, int] = FINE_PATCH
    keys: tuple[str, ...] = ("coarse_image", "coarse_labels", "fine_image", "fine_labels")

    def __init__(self, cache: RenderCache, n_renders: int,
                 patch: Sequence[int] | None = None) -> None:
        if n_renders < 1:
            raise KneeTrainError(f"n_renders must be >= 1, not {n_renders}")
        self.cache = cache
        self.n = int(n_renders)
        self.patch = tuple(int(p) for p in (patch or self.default_patch))
        self._resident: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return self.n

    def _prepare(self, arrays: dict[str, np.ndarray], index: int) -> dict[str, Any]:
        raise NotImplementedError

    def resident(self, index: int) -> dict[str, Any]:
        """The prepared arrays of render ``index`` (read and prepared on first use)."""
        if index not in self._resident:
            self._resident[index] = self._prepare(self.cache.get(index, self.keys), index)
        return self._resident[index]


class CoarseDataset(_CacheDataset):
    """Coarse volumes: ``(image (1, *patch) float32, labels (*patch) int64)``.

    A volume larger than the patch is cropped at a random position, a smaller one padded
    at a random offset (a translation augmentation), then :func:`augment_patch` runs.
    Default patch :data:`COARSE_PATCH`.
    """

    default_patch = COARSE_PATCH
    keys = ("coarse_image", "coarse_labels")

    def _prepare(self, arrays: dict[str, np.ndarray], index: int) -> dict[str, Any]:
        return {"image": normalise_intensity(arrays["coarse_image"].astype(np.float32)),
                "labels": arrays["coarse_labels"]}

    def sample(self, index: int, rng: np.random.Generator) -> tuple[Any, Any]:
        import torch

        d = self.resident(index)
        img, lab = d["image"], d["labels"]
        start = [int(rng.integers(min(0, s - p), max(0, s - p) + 1))
                 for s, p in zip(img.shape, self.patch, strict=True)]
        img, lab = augment_patch(crop_or_pad(img, start, self.patch),
                                 crop_or_pad(lab, start, self.patch), rng)
        return torch.from_numpy(img[None].copy()), torch.from_numpy(lab.astype(np.int64))


class FineDataset(_CacheDataset):
    """Fine patches: ``(image (1, *patch) float32, labels (*patch) int64)``.

    Intensities are normalised with the percentiles of the coarse image (as at inference).
    With probability :data:`FOREGROUND_PROBABILITY` a patch is centred on a voxel of a class
    drawn with :data:`CLASS_SAMPLING_WEIGHTS` among the classes of the render, otherwise on a
    uniformly random voxel; then :func:`augment_patch` runs.
    """

    def _prepare(self, arrays: dict[str, np.ndarray], index: int) -> dict[str, Any]:
        lab = arrays["fine_labels"]
        img = normalise_intensity(arrays["fine_image"].astype(np.float32),
                                  reference=arrays["coarse_image"].astype(np.float32))
        rng = np.random.default_rng([self.cache.seed, index])
        return {"image": img.astype(np.float16), "labels": lab,
                "centres": class_centres(lab, rng)}

    def sample(self, index: int, rng: np.random.Generator) -> tuple[Any, Any]:
        import torch

        d = self.resident(index)
        img, lab, centres = d["image"], d["labels"], d["centres"]
        if centres and rng.random() < FOREGROUND_PROBABILITY:
            classes = np.array(sorted(centres))
            w = _CLASS_WEIGHT[classes]
            cls = int(rng.choice(classes, p=w / w.sum()))
            pos = centres[cls]
            flat = int(pos[int(rng.integers(pos.size))])
            centre: tuple[int, ...] = tuple(int(v) for v in np.unravel_index(flat, lab.shape))
        else:
            centre = tuple(int(rng.integers(s)) for s in lab.shape)
        start = [int(c) - p // 2 for c, p in zip(centre, self.patch, strict=True)]
        img, lab = augment_patch(crop_or_pad(img, start, self.patch).astype(np.float32),
                                 crop_or_pad(lab, start, self.patch), rng)
        return torch.from_numpy(img[None].copy()), torch.from_numpy(lab.astype(np.int64))


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


def group_dice(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice per present class (by name) and the mean of each :data:`GROUPS` entry.

    Parameters
    ----------
    pred, truth : integer ndarrays of one shape (knee-schema labels)

    Returns
    -------
    dict
        ``dice_<class>`` for every class in ``truth``, ``<group>`` (mean Dice of its present
        classes) for every group, and ``mean_groups`` (mean over the groups present).
    """
    out: dict[str, float] = {}
    pc = np.bincount(pred.ravel().astype(np.int64), minlength=N_CLASSES)
    tc = np.bincount(truth.ravel().astype(np.int64), minlength=N_CLASSES)
    both = np.bincount((truth.ravel().astype(np.int64))[pred.ravel() == truth.ravel()],
                       minlength=N_CLASSES)
    for v, name in KNEE.items():
        if tc[v]:
            out[f"dice_{name}"] = float(2.0 * both[v] / (pc[v] + tc[v]))
    groups = []
    for g, names in GROUPS.items():
        vals = [out[f"dice_{n}"] for n in names if f"dice_{n}" in out]
        if vals:
            out[g] = float(np.mean(vals))
            groups.append(out[g])
    out["mean_groups"] = float(np.mean(groups)) if groups else float("nan")
    return out


def _make_validate(cache: RenderCache, n: int, stage: str, out: Path) -> Any:
    """Validation hook: Dice of whole held-out renders segmented by a sliding window.

    Each of the first ``n`` validation renders is segmented whole at the stage's spacing
    (as at inference: canonical axes, normalised with the coarse image's percentiles,
    Gaussian-weighted windows of the training patch); the Dice per class is averaged over
    the renders, the group means are reported, and the weights with the best
    ``mean_groups`` so far are written to ``out/best.safetensors`` (``best.json`` records
    the step and the metrics).
    """
    from mskmri.nn.inference import SlidingWindowConfig, SlidingWindowInferer

    ds: _CacheDataset = (CoarseDataset if stage == "coarse" else FineDataset)(cache, n)
    state = {"best": -1.0}
    record_path = out / BEST_RECORD
    if record_path.is_file():  # a resumed run keeps the best of the interrupted one
        state["best"] = float(json.loads(record_path.read_text())["metrics"]["mean_groups"])

    def validate(model: Any, step: int) -> dict[str, float]:
        from safetensors.torch import save_file

        from mskmri.io import atomic_path, atomic_write_json

        inferer = SlidingWindowInferer(model, SlidingWindowConfig(
            ds.patch, overlap=VAL_OVERLAP, batch_size=1, precision="fp32", backend="torch"),
            device=str(next(model.parameters()).device))
        per: dict[str, list[float]] = {}
        try:
            for i in range(n):
                d = ds.resident(i)
                pred = inferer.labels(d["image"].astype(np.float32))
                for k, v in group_dice(pred, d["labels"]).items():
                    per.setdefault(k, []).append(v)
        finally:
            inferer.close()
        metrics = {k: float(np.mean(v)) for k, v in per.items()}
        metrics["val_dice_mean"] = float(np.mean([v for k, v in metrics.items()
                                                  if k.startswith("dice_")]))
        if metrics["mean_groups"] > state["best"]:
            state["best"] = metrics["mean_groups"]
            out.mkdir(parents=True, exist_ok=True)
            with atomic_path(out / BEST_WEIGHTS) as tmp:
                save_file({k: v.detach().cpu().contiguous()
                           for k, v in model.state_dict().items()}, str(tmp))
            atomic_write_json(record_path, {"step": step, "metrics": metrics})
            log.info("best %s weights so far (mean over groups %.4f) at step %d", stage,
                     metrics["mean_groups"], step)
        return metrics

    return validate


TRAINING_DATA = [
    {"name": "OAI bone/cartilage/lesion label maps (Woo et al., MedIA 2024)",
     "licence": "no licence stated; research use, cite Woo et al. 2024 (arXiv 2211.16696)"},
    {"name": "pymskt DESS label map (menisci, fibula)", "licence": "MIT (pymskt, A. Gatti)"},
    {"name": "SPL/NAC Knee Atlas label map", "licence": "research/education; cite the SPL "
     "Knee Atlas"},
]


def use_best_weights(model: Any, folder: Path) -> dict[str, Any] | None:
    """Load ``folder/best.safetensors`` into ``model`` when the validation hook wrote one.

    Returns the best record (``{"step", "metrics"}``) or None (the model is unchanged).
    """
    from safetensors.torch import load_file

    rec_path, w_path = folder / BEST_RECORD, folder / BEST_WEIGHTS
    if not (rec_path.is_file() and w_path.is_file()):
        return None
    model.load_state_dict(load_file(str(w_path)))
    record: dict[str, Any] = json.loads(rec_path.read_text())
    log.info("using the best validated weights (step %s, mean over groups %.4f)",
             record["step"], record["metrics"]["mean_groups"])
    return record


def _card(stage: str, config: Any, options: Mapping[str, Any], result: Any,
          n_train: int, split: Mapping[str, list[str]],
          best: Mapping[str, Any] | None = None) -> Any:
    from mskmri.nn.registry import ModelCard
    from mskmri.nn.train import format_command

    spacing = COARSE_SPACING_MM if stage == "coarse" else FINE_SPACING_MM
    patch = COARSE_PATCH if stage == "coarse" else FINE_PATCH
    val = ({"step": best["step"], **best["metrics"]} if best is not None
           else result.validation[-1] if result.validation else {})
    segments = result.segments
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
        notes=("Trained on synthetic renders only (mskmri.synth), patches with left-right "
               "flips, per-class random intensities, gamma, bias field, blur, thick-slice "
               "and noise augmentation, class-weighted patch centres, Dice + cross-entropy; "
               "'validation' is the best whole-volume check on held-out renders during "
               "training (its step is the shipped one). Validation subjects (held out, by "
               f"subject): {[Path(v).name for v in split['val']]}."),
        extra={"stage": stage, "patch_size": list(patch),
               "steps": int(best["step"]) if best is not None else result.step,
               "trained_steps": result.step, "train_seconds": result.seconds,
               # a resumed run: ``command`` reproduces only its last segment
               **({"training_segments": segments} if len(segments) > 1 else {})},
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
                     validate=_make_validate(val_cache, n_val, st, out / st) if n_val else None,
                     command=None)
        from mskmri.nn.train import init_runtime

        if init_runtime(config.device).is_main:
            best = use_best_weights(result.model, out / st)
            path = out / f"{COARSE_MODEL if st == 'coarse' else FINE_MODEL}.safetensors"
            save_model(result.model, path, _card(st, config, options, result, n, split, best))
            made[st] = path
    return made
