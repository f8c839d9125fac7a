"""Quality checks a report shows before any number: orientation, anisotropy, contrast, confidence.

Each check returns a :class:`QcCheck` with a status:

- ``"ok"``: checked, nothing to say;
- ``"warning"``: a reader must know (also listed among the report's warnings);
- ``"not checked"``: the input does not say (e.g. no acquisition parameters in a NIfTI file,
  no confidence map from the segmenter), with the reason.

The checks look at the input's geometry and DICOM acquisition fields only; they never change
a measurement. Thresholds are the module constants below.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np

from mskmri.volume import LabelVolume, Volume

log = logging.getLogger(__name__)

#: An array axis more than this many degrees off its nearest patient axis counts as oblique.
OBLIQUE_WARN_DEG: Final = 10.0
#: Largest / smallest voxel spacing above this ratio counts as strongly anisotropic (knee:
#: volumes and thickness are measured in 3-D).
ANISOTROPY_WARN_RATIO: Final = 3.0
#: Spine measurements are made in the sagittal plane: the in-plane spacings are compared, and
#: sagittal slices thicker than this (mm) are flagged (bodies are averaged across them).
SPINE_MAX_SLICE_MM: Final = 5.0
#: A voxel inside the label map with a segmenter confidence below this (0..1) is uncertain.
LOW_CONFIDENCE: Final = 0.5
#: Warn when more than this fraction of the labelled voxels is uncertain ...
LOW_CONFIDENCE_WARN_FRACTION: Final = 0.05
#: ... or when one connected uncertain region is larger than this (mL).
LOW_CONFIDENCE_WARN_ML: Final = 0.5

#: Image weightings each analysis's model was trained on (see the model cards): the knee
#: model on renders of DESS, IW-FS, T1, T2 and random contrasts; the spine model on real
#: sagittal T1- and T2-weighted exams.
TRAINED_WEIGHTINGS: Final[Mapping[str, frozenset[str]]] = {
    "knee": frozenset({"T1", "T2", "PD", "gradient echo"}),
    "spine": frozenset({"T1", "T2"}),
}
#: Series-description words (whole tokens) that name a contrast no model here was trained on.
UNTRAINED_DESCRIPTION_WORDS: Final[Mapping[str, str]] = {
    "dwi": "diffusion-weighted", "adc": "diffusion (ADC map)", "trace": "diffusion trace",
    "stir": "STIR", "flair": "FLAIR", "perfusion": "perfusion", "dixon": "Dixon",
    "gad": "contrast-enhanced", "+c": "contrast-enhanced", "subtraction": "subtraction",
}
#: Spin-echo TR/TE rules (ms) for a coarse weighting from the DICOM header: T1 = short TR
#: and short TE, T2 = long TR and long TE, PD = long TR and short TE.
T1_MAX_TR_MS: Final = 1000.0
T1_MAX_TE_MS: Final = 30.0
T2_MIN_TR_MS: Final = 1500.0
T2_MIN_TE_MS: Final = 60.0
PD_MAX_TE_MS: Final = 45.0
#: Below this TR (ms) a series is taken for a gradient-echo sequence (DESS, FLASH, ...).
GRADIENT_ECHO_MAX_TR_MS: Final = 100.0
#: An inversion time in this range (ms) marks a STIR (fat-nulled) series.
STIR_TI_RANGE_MS: Final = (100.0, 250.0)

Status = Literal["ok", "warning", "not checked"]


@dataclass(frozen=True)
class QcCheck:
    """One quality check.

    Attributes
    ----------
    name : str
        What was checked ("Orientation", "Anisotropy", ...).
    status : {"ok", "warning", "not checked"}
    detail : str
        One sentence: what was found (or why it could not be checked).
    centre_mm : (3,) tuple of float, optional
        Where to look (RAS+ mm), e.g. the largest low-confidence region.
    """

    name: str
    status: Status
    detail: str
    centre_mm: tuple[float, float, float] | None = None


# --------------------------------------------------------------------------- geometry
def obliquity_deg(image: Volume) -> float:
    """Largest angle (deg) between an array axis and its nearest patient axis (R, A, S)."""
    direction = np.asarray(image.direction, float)  # columns: unit world direction per axis
    cosines = np.abs(direction).max(axis=0)
    return float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))


def check_orientation(image: Volume) -> QcCheck:
    """Warn when the slices are oblique to the patient axes by more than OBLIQUE_WARN_DEG."""
    if not image.geometry_known:
        return QcCheck("Orientation", "warning", "the image has no orientation: nothing about "
                       "left/right or anterior/posterior can be trusted")
    angle = obliquity_deg(image)
    codes = "".join(image.orientation)
    if angle > OBLIQUE_WARN_DEG:
        return QcCheck("Orientation", "warning",
                       f"the slices are oblique: an image axis is {angle:.1f}° off the nearest "
                       f"patient axis (> {OBLIQUE_WARN_DEG:g}°, nearest orientation {codes}); "
                       "overlays show the nearest anatomical plane, measurements use the true "
                       "geometry")
    return QcCheck("Orientation", "ok", f"{codes}, axes within {angle:.1f}° of the patient axes")


def check_anisotropy(image: Volume, anatomy: str) -> QcCheck:
    """Warn on strongly anisotropic voxels (the rule depends on how ``anatomy`` is measured)."""
    if not image.geometry_known:
        return QcCheck("Voxel size", "warning", "no voxel spacing: no measurement in mm or mL")
    spacing = np.asarray(image.spacing, float)
    text = " × ".join(f"{s:.3g}" for s in spacing) + " mm"
    if anatomy == "spine":
        lr = int(np.argmax(np.abs(np.asarray(image.direction)[0, :])))
        inplane = np.delete(spacing, lr)
        ratio = float(inplane.max() / inplane.min())
        if ratio > ANISOTROPY_WARN_RATIO:
            return QcCheck("Voxel size", "warning",
                           f"sagittal pixels are {ratio:.1f}× longer than wide ({text}): heights "
                           "and angles are coarse along the long side")
        if spacing[lr] > SPINE_MAX_SLICE_MM:
            return QcCheck("Voxel size", "warning",
                           f"sagittal slices are {spacing[lr]:.1f} mm thick (> "
                           f"{SPINE_MAX_SLICE_MM:g} mm): a body's mid-sagittal plane may fall "
                           "between slices")
        return QcCheck("Voxel size", "ok", text)
    ratio = float(spacing.max() / spacing.min())
    if ratio > ANISOTROPY_WARN_RATIO:
        return QcCheck("Voxel size", "warning",
                       f"voxels are {ratio:.1f}× longer than wide ({text}, > "
                       f"{ANISOTROPY_WARN_RATIO:g}×): thin structures (cartilage, menisci) are "
                       "coarse across the slices; treat thickness and small volumes with care")
    return QcCheck("Voxel size", "ok", f"{text} (ratio {ratio:.1f})")


# --------------------------------------------------------------------------- contrast
def weighting_from_header(meta: Mapping[str, Any]) -> str | None:
    """A coarse image weighting from DICOM TR/TE/TI (``Volume.meta`` of a DICOM read).

    Returns
    -------
    str or None
        ``"STIR"``, ``"gradient echo"``, ``"T1"``, ``"T2"``, ``"PD"`` or ``"intermediate"``;
        None when TR or TE is not recorded.
    """
    tr, te = meta.get("repetition_time_ms"), meta.get("echo_time_ms")
    ti = meta.get("inversion_time_ms")
    if ti is not None and STIR_TI_RANGE_MS[0] <= float(ti) <= STIR_TI_RANGE_MS[1]:
        return "STIR"
    if tr is None or te is None:
        return None
    tr, te = float(tr), float(te)
    if tr < GRADIENT_ECHO_MAX_TR_MS:
        return "gradient echo"
    if tr <= T1_MAX_TR_MS and te <= T1_MAX_TE_MS:
        return "T1"
    if tr >= T2_MIN_TR_MS and te >= T2_MIN_TE_MS:
        return "T2"
    if tr >= T2_MIN_TR_MS and te <= PD_MAX_TE_MS:
        return "PD"
    return "intermediate"


def check_contrast(image: Volume, anatomy: str) -> QcCheck:
    """Is the image a contrast the ``anatomy`` model was trained on (from the DICOM header)?"""
    meta = image.meta
    modality = meta.get("modality")
    if modality and str(modality).upper() != "MR":
        return QcCheck("Contrast", "warning", f"modality {modality}, not MR: the models here "
                       "are trained on MRI only")
    arr = np.asarray(image.array)
    if arr.size and float(arr.max()) == float(arr.min()):
        return QcCheck("Contrast", "warning", "the image is constant: there is nothing to see")
    description = str(meta.get("description") or "").lower()
    tokens = set(re.findall(r"[a-z0-9+]+", description))
    words = [text for word, text in UNTRAINED_DESCRIPTION_WORDS.items() if word in tokens]
    trained = TRAINED_WEIGHTINGS.get(anatomy, frozenset())
    weighting = weighting_from_header(meta)
    if words:
        return QcCheck("Contrast", "warning",
                       f"series {meta.get('description')!r} looks {words[0]}: outside the "
                       f"contrasts the {anatomy} model was trained on "
                       f"({', '.join(sorted(trained))})")
    if weighting is None:
        return QcCheck("Contrast", "not checked",
                       "no acquisition parameters (TR/TE) in the input file (e.g. NIfTI); "
                       f"the {anatomy} model was trained on {', '.join(sorted(trained))}")
    if weighting not in trained:
        return QcCheck("Contrast", "warning",
                       f"TR {meta.get('repetition_time_ms')} ms / TE {meta.get('echo_time_ms')} "
                       f"ms suggests {weighting}, outside what the {anatomy} model was trained "
                       f"on ({', '.join(sorted(trained))}); check the labels before the numbers")
    return QcCheck("Contrast", "ok", f"{weighting}-weighted by TR/TE, within the trained "
                   "contrasts")


# --------------------------------------------------------------------------- confidence
def check_confidence(segmentation: LabelVolume, *, given: bool) -> QcCheck:
    """Uncertain regions from a segmenter confidence map.

    Parameters
    ----------
    segmentation : LabelVolume
        ``meta["confidence"]`` (optional): a (I, J, K) array or Volume on the label map's
        grid with the segmenter's confidence in 0..1 (e.g. the top softmax probability).
    given : bool
        The label map was given by the user (``--seg``): nothing to check.
    """
    conf = segmentation.meta.get("confidence")
    if conf is None:
        why = ("the segmentation was given with --seg" if given else
               "the segmenter provides no confidence map")
        return QcCheck("Segmentation confidence", "not checked", why)
    values = np.asarray(conf.array if isinstance(conf, Volume) else conf, dtype=np.float32)
    if values.shape != segmentation.shape:
        return QcCheck("Segmentation confidence", "not checked",
                       f"the confidence map's shape {values.shape} is not the label map's "
                       f"{segmentation.shape}")
    fg = np.asarray(segmentation.array) > 0
    n_fg = int(fg.sum())
    if n_fg == 0:
        return QcCheck("Segmentation confidence", "not checked", "the label map is empty")
    low = fg & (values < LOW_CONFIDENCE)
    fraction = float(low.sum()) / n_fg
    if not low.any():
        return QcCheck("Segmentation confidence", "ok",
                       f"every labelled voxel has confidence >= {LOW_CONFIDENCE:g}")
    import cc3d

    comp = cc3d.connected_components(low.astype(np.uint8), connectivity=26)
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    biggest = int(sizes.argmax())
    ml = float(sizes[biggest]) * segmentation.voxel_volume_mm3 / 1000.0
    centre_vox = np.argwhere(comp == biggest).mean(axis=0)
    centre = tuple(float(v) for v in segmentation.voxel_to_world(centre_vox[None])[0])
    text = (f"{100 * fraction:.1f}% of the labelled voxels have confidence < "
            f"{LOW_CONFIDENCE:g}; the largest uncertain region is {ml:.2f} mL at "
            f"({', '.join(f'{c:.0f}' for c in centre)}) mm RAS")
    if fraction > LOW_CONFIDENCE_WARN_FRACTION or ml > LOW_CONFIDENCE_WARN_ML:
        return QcCheck("Segmentation confidence", "warning", "low-confidence region: " + text,
                       centre_mm=(centre[0], centre[1], centre[2]))
    return QcCheck("Segmentation confidence", "ok", text)


def run_checks(image: Volume, segmentation: LabelVolume | None, *, anatomy: str,
               seg_given: bool) -> list[QcCheck]:
    """All checks of one analysis, in report order.

    Parameters
    ----------
    image : Volume
    segmentation : LabelVolume, optional
    anatomy : {"knee", "spine"}
    seg_given : bool
        The label map came from ``--seg`` (not from a model).
    """
    checks = [check_orientation(image), check_anisotropy(image, anatomy),
              check_contrast(image, anatomy)]
    if segmentation is not None:
        checks.append(check_confidence(segmentation, given=seg_given))
    for c in checks:
        log.debug("qc %s: %s (%s)", c.name, c.status, c.detail)
    return checks


def qc_warnings(checks: Sequence[QcCheck]) -> list[str]:
    """The details of the checks with status "warning" (for the warnings list)."""
    return [f"{c.name}: {c.detail}" for c in checks if c.status == "warning"]


__all__ = ["ANISOTROPY_WARN_RATIO", "LOW_CONFIDENCE", "OBLIQUE_WARN_DEG", "QcCheck",
           "TRAINED_WEIGHTINGS", "check_anisotropy", "check_confidence", "check_contrast",
           "check_orientation", "obliquity_deg", "qc_warnings", "run_checks",
           "weighting_from_header"]
