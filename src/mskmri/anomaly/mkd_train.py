"""Training of the MKD student (``mskmri train mkd``).

Data: the inpainter's (:mod:`.inpaint_train`): lesion-free renders of the OAI *training*
subjects (fat-suppressed IW and DESS), cached once, sampled as 2-D sagittal patches of
:data:`~mskmri.anomaly.inpaint_train.PATCH` pixels centred in the femur (the inpainter's hole
is not used). The teacher (``bml-mkd-teacher``) is frozen; the student
(:func:`mskmri.anomaly.mkd.build_student`) minimises :func:`mskmri.anomaly.mkd.mkd_loss`.

After training, the detection threshold is calibrated on lesion-free renders of the
*validation* subjects (:func:`mskmri.anomaly.postprocess.calibrate_threshold`, voxel
false-positive rate :data:`~mskmri.anomaly.postprocess.TARGET_FPR`) and stored in the card's
``extra["threshold"]`` (one value for every spacing). The shipped card instead carries the
per-in-plane-matrix table that ``benchmarks/bml.py`` calibrates (``thresholds_by_inplane_mm``,
preferred by the detector).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mskmri.anomaly.inpaint_train import TRAIN_CONTRASTS, InpaintSlices, render_cache

log = logging.getLogger(__name__)

#: Lesion-free validation renders used to calibrate the threshold.
VAL_RENDERS = 2


class MkdSlices(InpaintSlices):
    """Seeded dataset of lesion-free sagittal femur patches, marrow only.

    Each sample is ``{"image": (1, P, P)}`` float32: a patch centred in the femur as the
    inpainter's (same volumes, flips and +-10 % intensity jitter, no hole), set to 0 outside
    the femur (the detector shows the networks the femur only).
    """

    def sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        """One marrow-only patch."""
        img, fem, pts = self.volumes[int(rng.integers(len(self.volumes)))]
        x, y, z = pts[int(rng.integers(len(pts)))]
        p = self.patch
        sl, fm = img[x], fem[x]
        y0 = int(np.clip(y - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, sl.shape[0] - p))
        z0 = int(np.clip(z - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, sl.shape[1] - p))
        patch = sl[y0:y0 + p, z0:z0 + p] * fm[y0:y0 + p, z0:z0 + p]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        patch = patch * float(rng.uniform(0.9, 1.1))
        return {"image": np.ascontiguousarray(patch[None], dtype=np.float32)}


def calibrate(student: Any, teacher: Any, files: list[Path]) -> float:
    """Threshold of the MKD z map at the target voxel FPR on lesion-free renders.

    Parameters
    ----------
    student, teacher : nn.Module
    files : list of path
        Render-cache ``.npz`` files of validation subjects.

    Returns
    -------
    float
    """
    from mskmri.anomaly.inpaint import _zoom_to, femur_work_crop
    from mskmri.anomaly.mkd import (
        CROP_MARGIN_MM,
        WORK_SPACING_MM,
        MkdScorer,
        mkd_zmap,
    )
    from mskmri.anomaly.postprocess import calibrate_threshold

    scorer = MkdScorer(student, teacher=teacher)
    zs, bones, spacings = [], [], []
    for f in files:
        with np.load(f) as z:
            img, fem, sp = z["image"], z["femur"].astype(bool), tuple(z["spacing"].tolist())
        box, crop_w, fem_w, _ = femur_work_crop(img, fem, sp, CROP_MARGIN_MM, WORK_SPACING_MM)
        z_w = mkd_zmap(crop_w, fem_w, scorer)
        shape = tuple(b.stop - b.start for b in box)
        zs.append(np.where(fem[box], _zoom_to(z_w, shape, order=1), 0.0))
        bones.append(fem[box])
        spacings.append(sp)
    return calibrate_threshold(zs, bones, spacings)


def run(config: Any, options: Mapping[str, Any]) -> Any:
    """``mskmri train mkd``: train the student against the frozen teacher, calibrate, save."""
    import torch

    from mskmri.anomaly.mkd import (
        INPUT_SCALE,
        LAMBDA_MSE,
        TEACHER_MODEL,
        TEACHER_WARNING,
        WORK_SPACING_MM,
        build_student,
        load_teacher,
        mkd_loss,
    )
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
    n_renders = int(options.get("renders") or 4)
    files = render_cache(split["train"], cache / "train", renders=n_renders, seed=config.seed)
    seed_everything(config.seed)
    teacher = load_teacher("cpu")
    student = build_student(teacher.config)

    class _Pair(torch.nn.Module):
        """Student with the frozen teacher attached (only the student is optimised)."""

        def __init__(self) -> None:
            super().__init__()
            self.student = student
            self.teacher = teacher

        def forward(self, x: Any) -> Any:
            return self.student(x), self.teacher(x)

    pair = _Pair()

    def objective(model: Any, batch: Mapping[str, Any]) -> Any:
        x = batch["image"] * INPUT_SCALE
        s, t = model(x)
        return mkd_loss(s, [f.detach() for f in t])

    command = format_command("mkd", config, options)
    result = fit(pair, objective, MkdSlices(files), config, command=command)
    teacher.eval()
    val_opt = options.get("val_renders")
    n_val = VAL_RENDERS if val_opt is None else int(val_opt)
    threshold = None
    if n_val > 0:
        val_files = render_cache(split["val"], cache / "val", renders=n_val,
                                 seed=config.seed + 1)
        threshold = calibrate(student.cpu(), teacher.cpu(), val_files)
    last = result.history[-1] if result.history else {}
    card = ModelCard(
        name=str(options.get("name") or "bml-mkd"), task="mkd",
        input_spacing_mm=[WORK_SPACING_MM, WORK_SPACING_MM],
        normalisation={"method": "roi-median", "roi": "femur",
                       "notes": f"image divided by the femoral marrow median, times "
                                f"{INPUT_SCALE}"},
        label_schema="none", labels={},
        training_data=[{"name": "OAI bone lesion label maps (Woo et al., MedIA 2024), "
                                "training subjects, rendered lesion-free by mskmri.synth",
                        "licence": "no licence stated; research use",
                        "n": len(files), "notes": f"contrasts {list(TRAIN_CONTRASTS)}, "
                                                  "sagittal 2-D patches"}],
        command=command, seed=int(config.seed),
        validation={"loss": last.get("loss")},
        notes=("MKD student (Salehi et al., CVPR 2021) for the BML baseline: the teacher's "
               "2-D encoder layout (same widths) with one convolution per stage, trained to "
               f"match the frozen teacher {TEACHER_MODEL!r} at 4 levels with (1 - cosine) + "
               f"{LAMBDA_MSE} x MSE. " + TEACHER_WARNING + ". A first small model (short CPU "
               "training): a baseline, not a validated detector."),
        extra={"teacher": TEACHER_MODEL, "threshold": threshold, "val_renders": n_val,
               "renders": len(files), "steps": result.step, "lambda_mse": LAMBDA_MSE,
               "input_scale": INPUT_SCALE},
    )
    return save_model(student.cpu(), Path(config.out) / "model.safetensors", card)
