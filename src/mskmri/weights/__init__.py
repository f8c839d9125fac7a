"""Shipped model weights: ``<file>.safetensors`` + its model card ``<file>.json`` each.

This module is pure data (no torch): :data:`MODELS` maps a model's public name to the weight
file in this folder and to the ``mskmri train`` task that reproduces it. Load a model with
:func:`mskmri.nn.registry.load_model`; write one with :func:`mskmri.nn.registry.save_model`.

A model is added here only together with its weight file and card (never a placeholder).
Size budget (ARCHITECTURE.md): each model under 25 MB, all shipped weights under 80 MB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: This folder: where shipped weight files and their cards live.
WEIGHTS_DIR = Path(__file__).resolve().parent

#: Size budget of one shipped weight file, MB (10**6 bytes).
MODEL_SIZE_BUDGET_MB = 25.0
#: Size budget of all shipped weight files together, MB.
TOTAL_SIZE_BUDGET_MB = 80.0


@dataclass(frozen=True)
class ModelEntry:
    """One shipped model.

    Parameters
    ----------
    file : str
        Weight file name in :data:`WEIGHTS_DIR` (``*.safetensors``; the card is ``*.json``).
    task : str
        The ``mskmri train`` task that reproduces it (e.g. ``"knee-seg"``).
    description : str
        One line for listings.
    caveat : str
        Empty for a model that meets its validation targets; otherwise what a user must know
        (e.g. "held-out Dice 0.11"). Every output made with the model carries it as a warning,
        so a number from an unvalidated model is never silent.
    """

    file: str
    task: str
    description: str
    caveat: str = ""

    @property
    def path(self) -> Path:
        """Absolute path of the weight file."""
        return WEIGHTS_DIR / self.file


_KNEE_SEG_CAVEAT = (
    "the shipped knee segmentation model is a CPU training run (coarse 11000 and fine 59000 "
    "steps on one shared thread) short of the issue-3 targets on held-out renders: mean Dice "
    "bones 0.92 (femur 0.97, tibia 0.95, patella 0.94, fibula 0.83), cartilage 0.77, menisci "
    "0.71, ligaments 0.59-0.80, effusion 0.79 (benchmarks/results/knee_segmentation.json); "
    "it has never been scored on a real knee scan with manual labels: check the overlays, and "
    "treat cartilage thickness, meniscal, ligament and effusion numbers as rough; pass a "
    "segmentation with --seg or continue `mskmri train knee-seg --resume` on a GPU"
)

#: Public model name -> entry. Filled by the issues that train and ship each model.
MODELS: dict[str, ModelEntry] = {
    "knee-seg-coarse": ModelEntry(
        "knee-seg-coarse.safetensors", "knee-seg",
        "knee: coarse 3-D U-Net at 2 mm (finds the knee region, confirms the fine network's "
        "large classes; 11000 CPU steps)",
        caveat=_KNEE_SEG_CAVEAT),
    "knee-seg-fine": ModelEntry(
        "knee-seg-fine.safetensors", "knee-seg",
        "knee: fine 3-D U-Net at 0.8 mm, 17 classes (59000 CPU steps)",
        caveat=_KNEE_SEG_CAVEAT),
}

MODELS["pretrain-encoder-2d"] = ModelEntry(
    "pretrain-encoder-2d.safetensors", "pretrain",
    "2-D U-Net encoder (8-64 channels, 4 levels) pretrained by distortion restoration on "
    "every unlabelled real spine/knee image and knee renders (benchmarks/pretraining.py); "
    "for --init")

MODELS["bml-mkd-teacher"] = ModelEntry(
    "bml-mkd-teacher.safetensors", "pretrain",
    "frozen teacher of the MKD baseline: the first pretrain-encoder-2d (distortion restoration, "
    "1678 unlabelled slices, 1000 steps), kept byte-identical so bml-mkd stays tied to it")

MODELS["bml-inpaint"] = ModelEntry(
    "bml-inpaint.safetensors", "inpaint",
    "2-D FFC (LaMa-style) inpainter of healthy femoral marrow for BML detection (first small "
    "CPU training, 3000 steps on 8 lesion-free renders)",
    caveat=("the shipped BML inpainter was trained and evaluated on synthesised knees only "
            "(held-out renders, IW-FS at 448: Dice 0.82 on inserted lesions, 0.90 on a foreign "
            "synthesis, 0.32 on the small real OAI lesion shapes; DESS Dice 0.14; "
            "benchmarks/results/bml.json): no real knee with BML labels exists here, so treat "
            "its lesion masks as unvalidated on real scans"))

MODELS["bml-mkd"] = ModelEntry(
    "bml-mkd.safetensors", "mkd",
    "2-D MKD student (baseline of the BML detector), distilled from the frozen "
    "bml-mkd-teacher on lesion-free femur renders (3000 CPU steps)",
    caveat=("the shipped MKD student is a first small model (3000 CPU steps) and its teacher "
            "is our MRI-pretrained encoder, not ImageNet VGG-16; its map is SmoothGrad of input "
            "x gradient (the published plain gradient detected nothing here): held-out IW-FS "
            "Dice 0.41 on inserted lesions at 448, 0.28 on a foreign synthesis "
            "(benchmarks/results/bml.json); a baseline, treat its lesion masks as unvalidated"))

MODELS["spine-seg"] = ModelEntry(
    "spine-seg.safetensors", "spine-seg",
    "2-D U-Net: vertebral bodies, sacrum (S1), discs, spinal cord and CSF on sagittal spine "
    "MRI, T1/T2 (real partially labelled sources, marginal loss; 1800 CPU steps warm-started "
    "from spine-seg-bodies, then 900 steps with 30 deg rotation augmentation); its class "
    "probabilities are averaged with spine-seg-2's",
    caveat=("the spine model's discs, cord and CSF are first results from few labelled images "
            "(discs: one lumbar exam and two cervical slices; CSF: partial labels only; checked "
            "on 1 held-out clinical cervical slice and 2 lumbar slices, "
            "benchmarks/results/spine_cervical.json): treat disc, cord and CSF masks and the "
            "cord measurements made from them as unvalidated"))

MODELS["spine-seg-2"] = ModelEntry(
    "spine-seg-2.safetensors", "spine-seg",
    "2-D U-Net, same classes as spine-seg: spine-seg trained on for 4000 more CPU steps "
    "(seed 3); the second member of the spine-seg ensemble (class probabilities averaged), "
    "not used alone")

MODELS["spine-seg-bodies"] = ModelEntry(
    "spine-seg-bodies.safetensors", "spine-seg",
    "2-D U-Net: vertebral bodies and sacrum (S1) only (the previous spine-seg); it vetoes "
    "whole bone regions of spine-seg that the two networks do not agree on (veto_bone)")

MODELS["vertebra-inpaint"] = ModelEntry(
    "vertebra-inpaint.safetensors", "vertebra-inpaint",
    "2-D FFC painter of a vertebral body's pseudo-healthy shape from its neighbours (fracture "
    "grading: RHLV, Genant grade; real spine label maps; 1100 CPU steps)",
    caveat=("the shipped vertebra painter and grading SVM are first small models checked only "
            "on fractures rendered into 26 held-out real lumbar vertebrae (no real fractured "
            "MRI was available): Genant macro-F1 0.61 there, grade 1 F1 0.29 "
            "(benchmarks/results/vertebra_grading.json); treat Genant grades as unvalidated"))

MODELS["cord-mae"] = ModelEntry(
    "cord-mae.safetensors", "mae",
    "2-D ViT masked autoencoder (U2AD) of healthy cords on sagittal T2 at 1 mm: cord T2 "
    "hyperintensity by mask-and-reconstruct (1600 CPU steps on one healthy SCT cord + "
    "auxiliary healthy slices)",
    caveat=("the shipped cord masked autoencoder is a first small CPU model trained on one "
            "healthy cord and checked on 3 clinical slices and rendered lesions only: it "
            "misses the one labelled clinical hyperintensity (19 pixels) at its calibrated "
            "threshold and flags healthy upper levels (C2 of a clinical slice, the top 20 mm of "
            "a held-out healthy cord; benchmarks/results/cord_hyperintensity.json); treat its "
            "masks and level "
            "decisions as unvalidated"))


def model_caveat(name: str) -> str | None:
    """The caveat of shipped model ``name`` (None when it has none or is not shipped)."""
    entry = MODELS.get(name)
    return entry.caveat if entry is not None and entry.caveat else None


__all__ = ["MODELS", "MODEL_SIZE_BUDGET_MB", "TOTAL_SIZE_BUDGET_MB", "WEIGHTS_DIR", "ModelEntry", "model_caveat"]
