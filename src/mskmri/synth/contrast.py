"""Per-tissue intensity models of the MR contrasts we render, and their registry.

Intensities are relative (fluid on a fluid-sensitive sequence = 1) and were set by eye from
the literature's appearance of knee tissues and checked against the two real knees in
``../shared/data/knee`` (GE 3T DESS echo 1 from pyKNEEr; GE 3T multi-echo spin-echo T2
map from pymskt, whose early echoes are proton-density-like and not fat-suppressed;
``benchmarks/synth_figure.py`` draws them side by side, locally, as the real scans are never
committed). They are starting points, not measurements: every
render perturbs them (``jitter``), and the ``random`` contrast ignores them altogether
(SynthSeg, Billot et al. 2023: a random mean per tissue forces a model to learn shapes,
not grey levels).

Bone marrow lesions (BML) are hyperintense on fluid-sensitive fat-suppressed contrasts
(``iw-fs``, ``t2``: fat-suppressed T2-weighted), hypointense to fatty marrow on ``t1``,
and subtle on ``dess`` and ``pd``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from difflib import get_close_matches
from types import MappingProxyType
from typing import Any

import numpy as np

from mskmri.synth._common import SynthesisError

#: Tissue classes that contrast models give intensities to.
CLASSES = ("air", "marrow", "cortex", "cartilage", "meniscus", "fluid", "muscle", "ligament",
           "fat", "skin", "vessel", "nerve")

#: Default log-normal jitter (sigma) of each class mean per render.
CLASS_JITTER = 0.15
#: Extra log-normal jitter (sigma) of each tissue around its class.
TISSUE_JITTER = 0.05


@dataclass(frozen=True)
class ContrastModel:
    """Mean and texture standard deviation per tissue class for one MR contrast.

    Attributes
    ----------
    name : str
        Registry name.
    description : str
        What it imitates.
    means : mapping class -> float
        Relative mean intensity.
    stds : mapping class -> float
        Texture standard deviation (same units as ``means``).
    bml : float
        Mean intensity of a bone marrow lesion core.
    fat_suppressed, fluid_sensitive : bool
    randomised : bool
        True for the SynthSeg-style contrast: means are drawn at random per tissue.
    """

    name: str
    description: str
    means: Mapping[str, float]
    stds: Mapping[str, float]
    bml: float
    fat_suppressed: bool
    fluid_sensitive: bool
    randomised: bool = False

    def __post_init__(self) -> None:
        missing = [c for c in CLASSES if c not in self.means or c not in self.stds]
        if missing:
            raise SynthesisError(f"contrast {self.name!r} lacks classes {missing}")


def _std(means: Mapping[str, float], rel: float = 0.06, floor: float = 0.01,
         **over: float) -> dict[str, float]:
    out = {c: max(floor, rel * means[c]) for c in CLASSES}
    out.update(over)
    return out


_DESS_M = {"air": 0.01, "marrow": 0.05, "cortex": 0.02, "cartilage": 0.40, "meniscus": 0.04,
           "fluid": 1.00, "muscle": 0.38, "ligament": 0.05, "fat": 0.12, "skin": 0.25,
           "vessel": 0.55, "nerve": 0.35}
_IWFS_M = {"air": 0.01, "marrow": 0.08, "cortex": 0.02, "cartilage": 0.42, "meniscus": 0.04,
           "fluid": 1.00, "muscle": 0.26, "ligament": 0.05, "fat": 0.07, "skin": 0.30,
           "vessel": 0.60, "nerve": 0.45}
_T2_M = {"air": 0.01, "marrow": 0.05, "cortex": 0.02, "cartilage": 0.22, "meniscus": 0.03,
         "fluid": 1.00, "muscle": 0.15, "ligament": 0.04, "fat": 0.05, "skin": 0.20,
         "vessel": 0.60, "nerve": 0.40}
_T1_M = {"air": 0.01, "marrow": 0.85, "cortex": 0.03, "cartilage": 0.40, "meniscus": 0.05,
         "fluid": 0.18, "muscle": 0.35, "ligament": 0.08, "fat": 1.00, "skin": 0.50,
         "vessel": 0.10, "nerve": 0.45}
_PD_M = {"air": 0.01, "marrow": 0.60, "cortex": 0.03, "cartilage": 0.42, "meniscus": 0.06,
         "fluid": 0.55, "muscle": 0.25, "ligament": 0.08, "fat": 1.00, "skin": 0.45,
         "vessel": 0.20, "nerve": 0.45}

CONTRASTS: Mapping[str, ContrastModel] = MappingProxyType({
    "dess": ContrastModel(
        "dess", "3D double-echo steady state, water excitation (OAI SAG 3D DESS WE)",
        _DESS_M, _std(_DESS_M, marrow=0.015, muscle=0.03), bml=0.09,
        fat_suppressed=True, fluid_sensitive=False),
    "iw-fs": ContrastModel(
        "iw-fs", "intermediate-weighted turbo spin echo, fat-suppressed (OAI SAG IW TSE FS)",
        _IWFS_M, _std(_IWFS_M, marrow=0.02, muscle=0.025), bml=0.55,
        fat_suppressed=True, fluid_sensitive=True),
    "t2": ContrastModel(
        "t2", "T2-weighted fast spin echo, fat-suppressed",
        _T2_M, _std(_T2_M, marrow=0.015), bml=0.50,
        fat_suppressed=True, fluid_sensitive=True),
    "t1": ContrastModel(
        "t1", "T1-weighted spin echo (no fat suppression)",
        _T1_M, _std(_T1_M, marrow=0.05), bml=0.45,
        fat_suppressed=False, fluid_sensitive=False),
    "pd": ContrastModel(
        "pd", "proton-density / early-echo spin echo, no fat suppression (like a MESE T2 "
        "map's first echoes)",
        _PD_M, _std(_PD_M, marrow=0.04), bml=0.70,
        fat_suppressed=False, fluid_sensitive=False),
    "random": ContrastModel(
        "random", "SynthSeg-style: every tissue gets a random mean and texture per render",
        {c: 0.5 for c in CLASSES}, {c: 0.05 for c in CLASSES}, bml=0.5,
        fat_suppressed=False, fluid_sensitive=False, randomised=True),
})

_ALIASES = {"iwfs": "iw-fs", "iw_fs": "iw-fs", "pdfs": "iw-fs", "t2fs": "t2", "t2-fs": "t2",
            "t1w": "t1", "t2w": "t2", "synthseg": "random"}


def contrast_names() -> list[str]:
    """Registered contrast names, in registry order."""
    return list(CONTRASTS)


def get_contrast(name: str | ContrastModel) -> ContrastModel:
    """Look up a contrast by name (case-insensitive, a few aliases), with "did you mean"."""
    if isinstance(name, ContrastModel):
        return name
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key in CONTRASTS:
        return CONTRASTS[key]
    close = get_close_matches(key, list(CONTRASTS) + list(_ALIASES), n=1, cutoff=0.5)
    hint = f"; did you mean {_ALIASES.get(close[0], close[0])!r}?" if close else ""
    raise SynthesisError(
        f"unknown contrast {name!r} (known: {', '.join(CONTRASTS)}){hint}"
    )


@dataclass(frozen=True)
class IntensityParams:
    """Drawn intensities of one render, per tissue id.

    Attributes
    ----------
    means, stds : (N_tissues,) float32 arrays
    bml_mean, bml_std : float
        Lesion core intensity and texture.
    """

    means: np.ndarray
    stds: np.ndarray
    bml_mean: float
    bml_std: float

    def as_dict(self, names: Sequence[str]) -> dict[str, Any]:
        return {
            "means": {n: round(float(v), 5) for n, v in zip(names, self.means, strict=True)},
            "stds": {n: round(float(v), 5) for n, v in zip(names, self.stds, strict=True)},
            "bml_mean": round(self.bml_mean, 5), "bml_std": round(self.bml_std, 5),
        }


def sample_intensities(
    model: ContrastModel,
    rng: np.random.Generator,
    tissue_class: Sequence[str],
    *,
    class_jitter: float = CLASS_JITTER,
    tissue_jitter: float = TISSUE_JITTER,
) -> IntensityParams:
    """Draw per-tissue means and texture stds for one render.

    Parameters
    ----------
    model : ContrastModel
    rng : Generator
    tissue_class : sequence of str
        Contrast class of each tissue id (index = tissue id).
    class_jitter, tissue_jitter : float
        Log-normal sigma of the class means and of each tissue around its class.
    """
    n = len(tissue_class)
    if model.randomised:
        means = rng.uniform(0.0, 1.0, n)
        means[0] = rng.uniform(0.0, 0.4)  # air: kept darkish more often than not
        stds = rng.uniform(0.0, 0.08, n)
        marrow = [i for i, c in enumerate(tissue_class) if c == "marrow"]
        base = float(np.mean(means[marrow])) if marrow else 0.5
        delta = rng.uniform(0.15, 0.5) * rng.choice([-1.0, 1.0])
        bml = float(np.clip(base + delta, 0.0, 1.2))
        if abs(bml - base) < 0.1:  # clipped against a bound: go the other way
            bml = float(np.clip(base - delta, 0.0, 1.2))
        return IntensityParams(means.astype(np.float32), stds.astype(np.float32), bml,
                               float(rng.uniform(0.0, 0.08)))
    cls_factor = {c: float(np.exp(rng.normal(0.0, class_jitter))) for c in CLASSES}
    means = np.empty(n, dtype=np.float32)
    stds = np.empty(n, dtype=np.float32)
    for i, c in enumerate(tissue_class):
        f = cls_factor[c] * float(np.exp(rng.normal(0.0, tissue_jitter)))
        means[i] = model.means[c] * f
        stds[i] = model.stds[c] * float(np.exp(rng.normal(0.0, 0.3)))
    bml = model.bml * cls_factor["marrow"] * float(np.exp(rng.normal(0.0, class_jitter)))
    if model.fluid_sensitive:
        # keep the lesion clearly above marrow on fluid-sensitive contrasts
        bml = max(bml, 2.5 * model.means["marrow"] * cls_factor["marrow"])
    return IntensityParams(means, stds, float(bml), float(0.08 * bml))
