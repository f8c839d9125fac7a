"""Pseudo-healthy vertebra painter: the FFC inpainter trained on real spine label maps.

``mskmri train vertebra-inpaint`` trains the LaMa-style FFC generator of the BML issue
(:class:`mskmri.nn.ffc.FFCInpainter`, 2-D) to paint the vertebral-body *shape* of a target
vertebra from its neighbours on the section of :func:`mskmri.measure.grading.extract_section`:
input = the other bodies of the section (binary) with the hole of
:func:`mskmri.measure.grading.hole_mask` set to 0, plus the hole mask; output = one logit per
pixel of "vertebral body"; loss = binary cross-entropy plus soft Dice, both inside the hole
(:func:`shape_loss`). :func:`network_painter` wraps the shipped model as a painter for
:func:`mskmri.measure.grading.grade_vertebrae` (sigmoid of the logits).

Training data (real manual label maps, never the held-out test exams of
``benchmarks/results/spine_segmentation.json``): MyoSegmenTUM and Chu exams of the
segmentation *train* split (:data:`mskmri.segment._spine_data.SPLIT`; the validation exams
are kept for the grading SVM), the VerSe mask ``0007`` of HealthiVert-GAN, and the three
clinical U2AD cervical slices (the healthy ones have fragmentary body labels). Every vertebra
with both neighbours gives sections at several left-right offsets, rotations, scales and
shifts (:func:`build_bank`); rows are flipped at random (the hole is symmetric).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from mskmri.errors import MskMriError
from mskmri.labels import VERTEBRA_ID, vertebra_name
from mskmri.measure.grading import (
    CROP_SHAPE,
    GradingError,
    body_centroids,
    extract_section,
    hole_mask,
    neighbours,
)
from mskmri.volume import LabelVolume

log = logging.getLogger(__name__)

#: Shipped model name (:data:`mskmri.weights.MODELS`).
DEFAULT_MODEL = "vertebra-inpaint"
#: Left-right offsets of training sections from the body's centroid, mm (3-D maps only).
LR_OFFSETS_MM: tuple[float, ...] = (-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0)
#: Rotation jitter of training sections, deg (uniform in +-).
ANGLE_JITTER_DEG = 8.0
#: Pixel-size jitter of training sections (factor uniform in 1 +- this).
SCALE_JITTER = 0.08
#: Crop shift jitter, pixels (uniform in +-; rows and columns).
SHIFT_JITTER_PX = 3.0
#: Weight of the soft Dice term beside the binary cross-entropy.
DICE_WEIGHT = 1.0
#: Smallest connected body part kept from the U2AD slices, pixels (drops fragments).
U2AD_MIN_BODY_PX = 100
#: MyoSegmenTUM / Chu exams used for training (segmentation train split).
TRAIN_EXAMS: Mapping[str, tuple[str, ...]] = {
    "myosegmentum": ("exam01", "exam02", "exam03", "exam04", "exam05", "exam06", "exam07",
                     "exam08"),
    "chu2015": ("exam02", "exam03", "exam07", "exam08"),
}
#: Exams for fitting the grading SVM (segmentation validation split; not seen in training).
SVM_EXAMS: Mapping[str, tuple[str, ...]] = {"myosegmentum": ("exam09", "exam10"),
                                            "chu2015": ("exam10",)}
#: Held-out exams (segmentation test split): grading test, never trained on.
TEST_EXAMS: Mapping[str, tuple[str, ...]] = {
    "myosegmentum": ("exam11", "exam12", "exam13", "exam14"), "chu2015": ("exam11", "exam12")}
_DIRS = {"myosegmentum": "myosegmentum_vertebral_bodies", "chu2015": "chu2015_vertebral_bodies"}


class VertebraInpaintError(MskMriError):
    """Training data for the vertebra painter cannot be made."""


# ============================================================================ label maps
@dataclass
class SpineMap:
    """A real spine label map in the spine schema, with its body centroids."""

    name: str
    seg: LabelVolume
    centroids: dict[int, np.ndarray]


def _spine_map(name: str, arr: np.ndarray, affine: np.ndarray) -> SpineMap:
    from mskmri.labels import spine_labels_for

    vals = [int(v) for v in np.unique(arr) if v]
    seg = LabelVolume(arr.astype(np.int32), affine, spine_labels_for(vals), schema="spine")
    return SpineMap(name, seg, body_centroids(seg))


def load_exam_map(data_dir: str | Path, source: str, exam: str) -> SpineMap:
    """A MyoSegmenTUM or Chu manual mask in VerSe ids.

    MyoSegmenTUM 1-5 = L1-L5 (:data:`mskmri.labels.MYOSEGMENTUM`); Chu's 9 unordered
    instances are ordered by centroid from the top and named T10-L5 and sacrum (S1 is the
    lowest in all 7 exams, :data:`mskmri.labels.CHU2015`).
    """
    from mskmri.io import read_labels
    from mskmri.labels import MYOSEGMENTUM

    path = Path(data_dir) / "spine" / _DIRS[source] / f"{exam}_gt.nii.gz"
    lv = read_labels(path, strict=False)
    if source == "myosegmentum":
        arr = MYOSEGMENTUM.apply(lv.array)
    else:
        ids = [int(v) for v in np.unique(lv.array) if v]
        cents = ndimage.center_of_mass(np.ones(lv.shape), lv.array, ids)
        sup = lv.voxel_to_world(np.asarray(cents))[:, 2]
        order = [ids[i] for i in np.argsort(-sup)]
        names = [17, 18, 19, 20, 21, 22, 23, 24, 26]
        if len(order) > len(names):
            raise VertebraInpaintError(f"{path} has {len(order)} instances; the Chu masks "
                                       f"have at most {len(names)} (T10-S1)")
        names = names[len(names) - len(order):]
        lut = np.zeros(int(lv.array.max()) + 1, dtype=np.int32)
        for src, dst in zip(order, names, strict=True):
            lut[src] = dst
        arr = lut[lv.array]
    return _spine_map(f"{source}/{exam}", arr, lv.affine)


def load_verse_map(data_dir: str | Path) -> SpineMap:
    """The HealthiVert-GAN VerSe mask 0007 (VerSe ids 16-24 = T9-L5)."""
    from mskmri.io import read_labels

    lv = read_labels(Path(data_dir) / "spine" / "healthivert_genant_grades" / "0007_msk.nii.gz",
                     strict=False)
    return _spine_map("verse/0007", np.asarray(lv.array), lv.affine)


def load_u2ad_maps(data_dir: str | Path) -> list[SpineMap]:
    """The three clinical U2AD cervical slices: bodies (value 2) split into ordinal instances.

    Rows run superior to inferior and columns anterior to posterior (the cord lies at larger
    column indices than the bodies on every slice), 1 mm pixels.
    """
    from mskmri.labels import ORDINAL_VERTEBRA_START
    from mskmri.measure.spine import slice_label_volume

    path = Path(data_dir) / "spine" / "u2ad_cervical_slices" / "u2ad_samples.npz"
    out = []
    with np.load(path) as z:
        for k in ("private_1", "private_2", "private_3"):
            lab, n = ndimage.label(z[f"{k}_labels"] == 2)
            sizes = ndimage.sum(lab > 0, lab, range(1, n + 1))
            keep = [i + 1 for i in range(n) if sizes[i] >= U2AD_MIN_BODY_PX]
            rows = ndimage.center_of_mass(lab > 0, lab, keep)
            arr = np.zeros(lab.shape, dtype=np.int32)
            for j, i in enumerate(sorted(keep, key=lambda i: rows[keep.index(i)][0])):
                arr[lab == i] = ORDINAL_VERTEBRA_START + j
            vol = slice_label_volume(arr, (1.0, 1.0), thickness_mm=1.0)
            out.append(SpineMap(f"u2ad/{k}", vol, body_centroids(vol)))
    return out


def exam_maps(data_dir: str | Path, exams: Mapping[str, Sequence[str]]) -> list[SpineMap]:
    """Label maps of the given MyoSegmenTUM / Chu exams."""
    return [load_exam_map(data_dir, src, ex) for src, exs in exams.items() for ex in exs]


def training_maps(data_dir: str | Path) -> list[SpineMap]:
    """All label maps the painter is trained on (module docstring)."""
    return [*exam_maps(data_dir, TRAIN_EXAMS), load_verse_map(data_dir),
            *load_u2ad_maps(data_dir)]


# ============================================================================ bank
def build_bank(maps: Sequence[SpineMap], n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` augmented sections: ``known`` and ``target`` (N, H, W) uint8.

    Each sample draws a map and a vertebra with both neighbours, then a left-right offset
    from :data:`LR_OFFSETS_MM` (3-D maps), a rotation, a scale and a shift.
    """
    rng = np.random.default_rng(seed)
    items = [(m, v, nb) for m in maps for v, nb in neighbours(m.seg, m.centroids).items()
             if not isinstance(nb, str)]
    if not items:
        raise VertebraInpaintError("no vertebra with neighbours above and below in the "
                                   "training label maps")
    h, w = CROP_SHAPE
    known = np.zeros((n, h, w), np.uint8)
    target = np.zeros((n, h, w), np.uint8)
    filled = 0
    tries = 0
    while filled < n and tries < 20 * n:
        tries += 1
        m, v, (up, lo) = items[int(rng.integers(len(items)))]
        planar = 1 in m.seg.shape
        try:
            sec = extract_section(
                m.seg, v, up, lo, centroids=m.centroids,
                lr_offset_mm=0.0 if planar else float(rng.choice(LR_OFFSETS_MM)),
                angle_deg=float(rng.uniform(-ANGLE_JITTER_DEG, ANGLE_JITTER_DEG)),
                scale=float(rng.uniform(1 - SCALE_JITTER, 1 + SCALE_JITTER)),
                shift_px=(float(rng.uniform(-SHIFT_JITTER_PX, SHIFT_JITTER_PX)),
                          float(rng.uniform(-SHIFT_JITTER_PX, SHIFT_JITTER_PX))))
        except GradingError:
            continue
        if sec.target.sum() < 50:
            continue  # the offset plane missed the body
        known[filled], target[filled] = sec.others, sec.target
        filled += 1
    if filled < n:
        raise VertebraInpaintError(f"only {filled} of {n} training sections could be made")
    log.info("section bank: %d sections from %d vertebrae of %d maps", n, len(items), len(maps))
    return {"known": known, "target": target}


class SectionDataset:
    """Seeded dataset over a section bank (``sample(index, rng)``).

    Each sample is ``{"known": (1, H, W), "hole": (1, H, W), "target": (1, H, W)}`` float32;
    rows are flipped with probability 0.5.
    """

    def __init__(self, bank: Mapping[str, np.ndarray], length: int = 1_000_000) -> None:
        self.known = bank["known"]
        self.target = bank["target"]
        self.length = int(length)

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        i = int(rng.integers(len(self.known)))
        k, t = self.known[i].astype(bool), self.target[i].astype(bool)
        if rng.random() < 0.5:
            k, t = k[::-1], t[::-1]
        hole = hole_mask(k)
        return {"known": np.ascontiguousarray(k[None], np.float32),
                "hole": np.ascontiguousarray(hole[None], np.float32),
                "target": np.ascontiguousarray((t & hole)[None], np.float32)}


# ============================================================================ loss
def shape_loss(logits: Any, target: Any, hole: Any) -> tuple[Any, dict[str, float]]:
    """Binary cross-entropy + :data:`DICE_WEIGHT` x soft Dice loss, inside the hole.

    Parameters
    ----------
    logits, target, hole : torch.Tensor, (N, 1, H, W)

    Returns
    -------
    (loss, parts)
    """
    import torch.nn.functional as F

    n_hole = hole.sum().clamp_min(1.0)
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * hole).sum() \
        / n_hole
    p = logits.sigmoid() * hole
    inter = (p * target).sum(dim=(1, 2, 3))
    denom = p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
    dice = (2 * inter + 1.0) / (denom + 1.0)
    loss = bce + DICE_WEIGHT * (1 - dice.mean())
    return loss, {"bce": float(bce.detach()), "dice": float(dice.mean().detach())}


# ============================================================================ painter
class ShapePainter:
    """The shape network as a grading painter: ``(known, hole) -> probability`` (sigmoid).

    Parameters
    ----------
    model : str, path or nn.Module
        Registered name (default :data:`DEFAULT_MODEL`), weight file, or a module.
    device : str
    """

    def __init__(self, model: Any = DEFAULT_MODEL, *, device: str = "cpu") -> None:
        from mskmri.anomaly.inpaint import NetworkPainter

        self._net = NetworkPainter(model, device=device)
        self.card = self._net.card
        self.caveats = self._net.caveats

    def __call__(self, known: np.ndarray, hole: np.ndarray) -> np.ndarray:
        """Probability of vertebral body, ``(N, H, W)`` float32."""
        logits = self._net(np.asarray(known, np.float32), np.asarray(hole, np.float32))
        return (1.0 / (1.0 + np.exp(-np.clip(logits, -30, 30)))).astype(np.float32)


def network_painter(model: Any = DEFAULT_MODEL, *, device: str = "cpu") -> ShapePainter:
    """The shipped (or given) shape network as a painter for grading."""
    return ShapePainter(model, device=device)


def grade_spine(seg: LabelVolume, *, model: Any = DEFAULT_MODEL, device: str = "cpu",
                classifier: Any = None) -> Any:
    """Fracture grades of a spine label map with the shipped painter and SVM.

    :func:`mskmri.measure.grading.grade_vertebrae` with :func:`network_painter`; the
    painter's caveat (an unvalidated shipped model) is added to the warnings.

    Parameters
    ----------
    seg : LabelVolume
        Spine label map with geometry.
    model : str, path or nn.Module
        Painter network.
    device : str
    classifier : GenantSvm, optional
        Default: the shipped SVM coefficients.

    Returns
    -------
    mskmri.measure.grading.GradingResult
    """
    from mskmri.errors import ModelError
    from mskmri.measure.grading import (
        GradingResult,
        VertebraGrade,
        body_centroids,
        grade_measurements,
        grade_vertebrae,
    )

    try:
        painter = network_painter(model, device=device)
    except (ImportError, ModelError) as exc:
        # no torch or no weights: every grade is absent with the reason, never guessed
        reason = f"the vertebra painter could not be loaded ({exc})"
        out = GradingResult(warnings=[f"fracture grades not made: {reason}"])
        for v, c in body_centroids(seg).items():
            if v == VERTEBRA_ID["sacrum"]:
                continue
            vg = VertebraGrade(structure=vertebra_name(v), centroid_mm=c, reason=reason)
            out.measurements.extend(grade_measurements(vg))
        return out
    res = grade_vertebrae(seg, painter=painter, classifier=classifier)
    res.warnings.extend(c for c in painter.caveats if c not in res.warnings)
    return res


# ============================================================================ task
def run(config: Any, options: Mapping[str, Any]) -> Any:
    """``mskmri train vertebra-inpaint``: build the section bank, train, save weights + card."""
    import torch

    from mskmri.nn.ffc import FFCConfig, FFCInpainter, make_input
    from mskmri.nn.registry import ModelCard, save_model
    from mskmri.nn.train import fit, format_command, seed_everything
    from mskmri.paths import shared_data_dir

    threads = options.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    data_opt = options.get("data") or shared_data_dir()
    if data_opt is None:
        raise VertebraInpaintError("no shared data folder: give --data DIR (the folder "
                                   "holding spine/) or set MSKMRI_SHARED_DATA")
    data = Path(data_opt)
    maps = training_maps(data)
    n_bank = int(options.get("sections") or 4000)
    bank = build_bank(maps, n_bank, seed=config.seed)
    seed_everything(config.seed)
    width = int(options.get("width") or 16)
    net = FFCInpainter(FFCConfig(spatial_dims=2, base_channels=width, n_downsample=2,
                                 n_blocks=int(options.get("blocks") or 3)))
    dataset = SectionDataset(bank)

    def objective(model: Any, batch: Mapping[str, Any]) -> Any:
        logits = model(make_input(batch["known"], batch["hole"]))
        return shape_loss(logits, batch["target"], batch["hole"])

    command = format_command("vertebra-inpaint", config, options)
    result = fit(net, objective, dataset, config, command=command)
    last = result.history[-1] if result.history else {}
    card = ModelCard(
        name=str(options.get("name") or DEFAULT_MODEL), task="vertebra-inpaint",
        input_spacing_mm=None,
        normalisation={"method": "binary", "notes": "input = other vertebral bodies (1) of the "
                       "section of mskmri.measure.grading.extract_section, hole set to 0; "
                       "pixel size = half the distance between the neighbours' centroids / "
                       f"{32} (level-normalised)"},
        label_schema="none", labels={"0": "vertebral body (logit)"},
        training_data=[
            {"name": "MyoSegmenTUM spine manual masks (Burian et al. 2019), segmentation "
                     "train exams", "licence": "see source; via FastCleverSeg (GPL-3.0 repo)",
             "n": len(TRAIN_EXAMS["myosegmentum"])},
            {"name": "Chu et al. 2015 lumbar manual masks, segmentation train exams",
             "licence": "see source; via FastCleverSeg (GPL-3.0 repo)",
             "n": len(TRAIN_EXAMS["chu2015"])},
            {"name": "VerSe 2019 mask 0007 (HealthiVert-GAN)", "licence": "MIT", "n": 1},
            {"name": "U2AD clinical cervical slices (zhibaishouheilab)", "licence": "MIT",
             "n": 3}],
        command=command, seed=int(config.seed),
        validation={k: v for k, v in last.items() if k in ("loss", "bce", "dice")},
        notes=("2-D FFC (LaMa-style) painter of the vertebral-body shape of a target vertebra "
               "from its neighbours on a level-normalised sagittal section; output logits. "
               "Loss: BCE + soft Dice inside the hole. Used by mskmri.measure.grading for the "
               "pseudo-healthy heights (RHLV). First small CPU model."),
        extra={"crop_shape": list(CROP_SHAPE), "sections": n_bank, "steps": result.step,
               "maps": [m.name for m in maps]},
    )
    return save_model(result.model.cpu(), Path(config.out) / "model.safetensors", card)


__all__ = ["DEFAULT_MODEL", "SVM_EXAMS", "TEST_EXAMS", "TRAIN_EXAMS", "SectionDataset",
           "ShapePainter", "SpineMap", "build_bank", "exam_maps", "grade_spine", "load_exam_map",
           "load_u2ad_maps", "load_verse_map", "network_painter", "run", "shape_loss",
           "training_maps"]
