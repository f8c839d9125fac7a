"""Training of the marrow inpainter (``mskmri train inpaint``).

Data: lesion-free knees rendered from the OAI label maps of the *training* subjects
(:func:`mskmri.synth.split_by_subject`, both time points of a subject in one split; the OAI
lesion labels are dropped so the marrow is healthy), fat-suppressed IW and DESS contrasts.
Each render is stored once in a cache (``.npz``: RAS image at the working in-plane spacing,
normalised by the femoral marrow median, and the femur mask). Samples are 2-D sagittal patches
centred in the femur with a hole made of large irregular strokes and boxes inside bone.

Loss (no ImageNet weights are available, so no perceptual or adversarial term):

- L1 inside the hole (weight :data:`HOLE_WEIGHT`): the detector compares intensities, so the
  painted level must be right; L1 on the known part with a small weight
  (:data:`KNOWN_WEIGHT`);
- L1 between the finite-difference gradients of painted and real image inside the hole
  (weight :data:`GRADIENT_WEIGHT`): plain L1 pulls fills towards a flat local mean; matching
  gradients keeps marrow texture and trabecular edges so the residual of healthy marrow is
  smaller and a flat bright lesion stands out.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mskmri.errors import MskMriError

log = logging.getLogger(__name__)

#: Working in-plane spacing of the network, mm (OAI field of view at a 224 matrix).
WORK_SPACING_MM = 0.625
#: Patch edge of training samples, pixels (40 mm at the working spacing).
PATCH = 64
#: Contrasts rendered for training (fluid-sensitive FS first; DESS so it is not foreign).
TRAIN_CONTRASTS = ("iw-fs", "dess")
#: Weight of the L1 term inside the hole.
HOLE_WEIGHT = 6.0
#: Weight of the L1 term on known pixels (the detector only reads the hole; a small weight
#: keeps the output anchored without spending the small network on an identity task).
KNOWN_WEIGHT = 0.1
#: Weight of the gradient (high-frequency) L1 term inside the hole.
GRADIENT_WEIGHT = 2.0
#: Hole area as a fraction of the femur area in a patch (range drawn per sample).
HOLE_FRACTION = (0.15, 0.6)
#: Knee label of the femur.
FEMUR_LABEL = 1


class InpaintTrainingError(MskMriError):
    """Training data for the inpainter cannot be made."""


# ============================================================================ cache
def render_cache(paths: Sequence[str | Path], cache: str | Path, *, renders: int,
                 seed: int = 0, contrasts: Sequence[str] = TRAIN_CONTRASTS,
                 inplane: int = 224) -> list[Path]:
    """Render ``renders`` lesion-free knees from ``paths`` into ``cache`` (reused when present).

    Parameters
    ----------
    paths : sequence of path
        OAI lesion label maps (training subjects only).
    cache : path
        Folder of ``render_<i>.npz`` files (keys ``image`` (X, Y, Z) float32 RAS normalised
        by the femoral marrow median, ``femur`` uint8, ``spacing`` mm, ``contrast``, ``seed``).
    renders : int
        How many renders; source ``i % len(paths)``, contrast ``i % len(contrasts)``,
        render seed ``seed * 100003 + i``.
    """
    from mskmri.synth import load_knee_source, render

    if not paths:
        raise InpaintTrainingError("no label maps for inpainting training; check --data")
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    for i in range(renders):
        target = cache / f"render_{i:04d}.npz"
        out.append(target)
        if target.is_file():
            continue
        src = load_knee_source(paths[i % len(paths)])
        contrast = contrasts[i % len(contrasts)]
        rseed = seed * 100003 + i
        res = render(src.labels, contrast=contrast, seed=rseed, inplane=inplane, lesion_ml=None)
        img = res.image.reorient("RAS")
        lab = res.labels.reorient("RAS")
        femur = (lab.array == FEMUR_LABEL).astype(np.uint8)
        image = normalise_by_roi(img.array, femur)
        tmp = target.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, image=image.astype(np.float32), femur=femur,
                            spacing=np.asarray(img.spacing), contrast=contrast, seed=rseed,
                            source=str(paths[i % len(paths)]))
        tmp.replace(target)
        log.info("cached render %d/%d (%s, %s)", i + 1, renders, contrast,
                 Path(paths[i % len(paths)]).name)
    return out


def normalise_by_roi(image: np.ndarray, roi: np.ndarray) -> np.ndarray:
    """Divide by the median intensity inside ``roi`` (healthy marrow ~ 1).

    Raises
    ------
    InpaintTrainingError
        When the ROI is empty or its median is not positive.
    """
    vals = image[roi > 0]
    if vals.size == 0:
        raise InpaintTrainingError("the femur mask is empty: cannot normalise the image")
    med = float(np.median(vals))
    if not med > 0:
        raise InpaintTrainingError(f"median marrow intensity is {med}: the image is blank or "
                                   "negative inside the femur")
    return (image / med).astype(np.float32)


# ============================================================================ masks
def random_hole(shape: Sequence[int], roi: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A large irregular hole: strokes and boxes, restricted to ``roi``.

    Parameters
    ----------
    shape : (H, W)
    roi : (H, W) bool
        Femur in the patch; the hole is cut to it.
    rng : Generator

    Returns
    -------
    (H, W) float32
        1 = hole.
    """
    h, w = int(shape[0]), int(shape[1])
    hole = np.zeros((h, w), dtype=bool)
    want = rng.uniform(*HOLE_FRACTION) * max(int(roi.sum()), 1)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(12):
        if rng.random() < 0.5:  # box
            bh, bw = rng.integers(h // 6, h // 2 + 1), rng.integers(w // 6, w // 2 + 1)
            y0, x0 = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
            hole[y0:y0 + bh, x0:x0 + bw] = True
        else:  # irregular stroke: a random walk of thick discs
            y, x = rng.uniform(0, h), rng.uniform(0, w)
            width = rng.uniform(3, 10)
            for _ in range(int(rng.integers(4, 10))):
                ang = rng.uniform(0, 2 * np.pi)
                length = rng.uniform(5, 20)
                for t in np.linspace(0, 1, 8):
                    cy, cx = y + t * length * np.sin(ang), x + t * length * np.cos(ang)
                    hole |= (yy - cy) ** 2 + (xx - cx) ** 2 <= width ** 2
                y, x = y + length * np.sin(ang), x + length * np.cos(ang)
        if (hole & roi).sum() >= want:
            break
    return (hole & roi).astype(np.float32)


class InpaintSlices:
    """Seeded dataset of sagittal patches with a hole (``sample(index, rng)``).

    Each sample is ``{"image": (1, P, P), "mask": (1, P, P)}`` float32; the image is the
    normalised render, the mask 1 in the hole.
    """

    def __init__(self, files: Sequence[Path], length: int = 100_000, patch: int = PATCH) -> None:
        self.volumes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for f in files:
            with np.load(f) as z:
                img, fem = z["image"], z["femur"].astype(bool)
            pts = np.argwhere(fem)
            self.volumes.append((img, fem, pts))
        if not self.volumes:
            raise InpaintTrainingError("no cached renders to train on")
        self.length = int(length)
        self.patch = int(patch)

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        img, fem, pts = self.volumes[int(rng.integers(len(self.volumes)))]
        x, y, z = pts[int(rng.integers(len(pts)))]
        p = self.patch
        sl = img[x]
        fm = fem[x]
        y0 = int(np.clip(y - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, sl.shape[0] - p))
        z0 = int(np.clip(z - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, sl.shape[1] - p))
        patch = sl[y0:y0 + p, z0:z0 + p].copy()
        roi = fm[y0:y0 + p, z0:z0 + p]
        if rng.random() < 0.5:
            patch, roi = patch[:, ::-1], roi[:, ::-1]
        hole = random_hole((p, p), roi, rng)
        # intensity jitter: the detector normalises by the marrow median; keep +-10 % slack
        patch = patch * float(rng.uniform(0.9, 1.1))
        return {"image": np.ascontiguousarray(patch[None], dtype=np.float32),
                "mask": np.ascontiguousarray(hole[None], dtype=np.float32)}


# ============================================================================ loss
def inpaint_loss(painted: Any, image: Any, mask: Any) -> tuple[Any, dict[str, float]]:
    """L1 (hole-weighted) plus gradient L1 inside the hole; see the module docstring.

    Parameters
    ----------
    painted, image, mask : torch.Tensor, (N, 1, H, W)

    Returns
    -------
    (loss, parts)
    """
    err = (painted - image).abs()
    hole = mask
    known = 1 - mask
    n_hole = hole.sum().clamp_min(1.0)
    l1_hole = (err * hole).sum() / n_hole
    l1_known = (err * known).sum() / known.sum().clamp_min(1.0)
    gy_p, gy_i = painted.diff(dim=-2), image.diff(dim=-2)
    gx_p, gx_i = painted.diff(dim=-1), image.diff(dim=-1)
    hy = hole[..., 1:, :] * hole[..., :-1, :]
    hx = hole[..., :, 1:] * hole[..., :, :-1]
    grad = (((gy_p - gy_i).abs() * hy).sum() + ((gx_p - gx_i).abs() * hx).sum()) / (
        hy.sum() + hx.sum()).clamp_min(1.0)
    loss = HOLE_WEIGHT * l1_hole + KNOWN_WEIGHT * l1_known + GRADIENT_WEIGHT * grad
    return loss, {"l1_hole": float(l1_hole.detach()), "l1_known": float(l1_known.detach()),
                  "grad_hole": float(grad.detach())}


# ============================================================================ task
def run(config: Any, options: Mapping[str, Any]) -> Any:
    """``mskmri train inpaint``: render the cache, train the FFC inpainter, save weights+card."""
    import torch

    from mskmri.nn.ffc import FFCConfig, FFCInpainter, make_input
    from mskmri.nn.registry import ModelCard, save_model
    from mskmri.nn.train import fit, format_command, seed_everything
    from mskmri.synth import oai_label_paths, split_by_subject

    threads = options.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    data = options.get("data")
    paths = oai_label_paths(data) if data else oai_label_paths()
    split = split_by_subject([str(p) for p in paths], seed=0)
    cache = Path(options.get("cache") or (Path(config.out) / "cache"))
    n_renders = int(options.get("renders") or 8)
    files = render_cache(split["train"], cache, renders=n_renders, seed=config.seed)
    seed_everything(config.seed)
    width = int(options.get("width") or 16)
    net = FFCInpainter(FFCConfig(spatial_dims=2, base_channels=width, n_downsample=2,
                                 n_blocks=int(options.get("blocks") or 3)))
    dataset = InpaintSlices(files)

    def objective(model: Any, batch: Mapping[str, Any]) -> Any:
        image, mask = batch["image"], batch["mask"]
        painted = model(make_input(image, mask))
        return inpaint_loss(painted, image, mask)

    command = format_command("inpaint", config, options)
    result = fit(net, objective, dataset, config, command=command)
    last = result.history[-1] if result.history else {}
    card = ModelCard(
        name=str(options.get("name") or "bml-inpaint"), task="inpaint",
        input_spacing_mm=[WORK_SPACING_MM, WORK_SPACING_MM],
        normalisation={"method": "roi-median", "roi": "femur",
                       "notes": "image divided by the median intensity inside the femur"},
        label_schema="none", labels={},
        training_data=[{"name": "OAI bone lesion label maps (Woo et al., MedIA 2024), "
                                "training subjects, rendered lesion-free by mskmri.synth",
                        "licence": "no licence stated; research use",
                        "n": len(files), "notes": f"contrasts {list(TRAIN_CONTRASTS)}, "
                                                  "sagittal 2-D patches"}],
        command=command, seed=int(config.seed),
        validation={k: v for k, v in last.items() if k in ("loss", "l1_hole", "grad_hole")},
        notes=("2-D sagittal LaMa-style FFC inpainter of healthy femoral marrow. Loss: L1 in "
               f"the hole (x{HOLE_WEIGHT}) + L1 on known pixels (x{KNOWN_WEIGHT}) + gradient "
               "L1 in the hole "
               f"(x{GRADIENT_WEIGHT}); no perceptual/adversarial loss because no ImageNet "
               "weights are available and an adversary would invent texture the detector "
               "then reads as residual. A first small model (short CPU training): use as a "
               "starting point, not a validated detector."),
        extra={"patch": PATCH, "renders": len(files), "steps": result.step,
               "hole_fraction": list(HOLE_FRACTION)},
    )
    path = save_model(result.model.cpu(), Path(config.out) / "model.safetensors", card)
    return path
