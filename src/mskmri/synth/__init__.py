"""Label-map-driven MR image synthesis for the knee (SynthSeg-style).

The bridge from real label maps to training images: every later model (knee segmentation,
BML detection by inpainting, pretraining) trains on renders of the label maps in
``../shared/data/knee``.

- :mod:`.sources`: read each knee label source into the project schema (OAI lesion maps
  with the tibial cartilage split medial/lateral, pymskt, SPL atlas, CartiMorph); subject-
  wise splits.
- :mod:`.anatomy`: fill what a source lacks (menisci, ligaments, tendon, fat pad, muscle,
  fat, skin, cortex), insert effusion and bone marrow lesions of chosen volumes.
- :mod:`.contrast` / :mod:`.render`: per-tissue contrast models (DESS, IW-FS, T2, T1, PD,
  random) and the renderer (deformation, texture, blur, thick slices, bias, Rician noise).
- :mod:`.phantom`: a procedural knee that needs no input.

Everything random takes a seed and records what it drew; torch is not used.
"""

from __future__ import annotations

from mskmri.synth._common import SynthesisError
from mskmri.synth.anatomy import AnatomyOptions, KneeScene, Tissue, complete_knee
from mskmri.synth.contrast import CONTRASTS, ContrastModel, contrast_names, get_contrast
from mskmri.synth.phantom import phantom_knee
from mskmri.synth.render import RenderOptions, SynthResult, render, render_scene
from mskmri.synth.sources import (
    KneeSource,
    detect_source,
    load_knee_source,
    oai_label_paths,
    split_by_subject,
    split_tibial_cartilage,
    subject_of,
    timepoint_of,
)

__all__ = [
    "CONTRASTS",
    "AnatomyOptions",
    "ContrastModel",
    "KneeScene",
    "KneeSource",
    "RenderOptions",
    "SynthResult",
    "SynthesisError",
    "Tissue",
    "complete_knee",
    "contrast_names",
    "detect_source",
    "get_contrast",
    "load_knee_source",
    "oai_label_paths",
    "phantom_knee",
    "render",
    "render_scene",
    "split_by_subject",
    "split_tibial_cartilage",
    "subject_of",
    "timepoint_of",
]
