"""Knee label sources -> the project knee schema, plus subject-wise data splits.

Every source in ``../shared/data/knee`` is read into a :class:`KneeSource`: a knee-schema
:class:`~mskmri.volume.LabelVolume`, a lesion mask (1 = bone marrow lesion) when the source
annotates lesions, the tissues the source names that have no project class (SPL tendons,
vessels, nerves, rendered but labelled background), and who/when it is.

Medial versus lateral (OAI value 4 = both tibial cartilage plates)
-----------------------------------------------------------------
The two plates are separated at the intercondylar eminence (tibial spine): along the
left-right world axis the cartilage voxel count drops to (near) zero between the plates, so
the split plane is the minimum of the smoothed left-right profile inside the central 40% of
the cartilage's extent; plates that are separate connected components are kept whole. Which
plate is medial is decided from anatomy, not from the header (a header says left or right
of the patient, not which knee it is):

- the medial tibial plateau is longer antero-posteriorly (oval) than the lateral one (round);
- the medial plateau sits lower (the tibial plateau slopes down medially, medial proximal
  tibial angle about 87 degrees).

Score = (AP span A - AP span B) / ``AP_SCALE_MM`` + (height B - height A) / ``HEIGHT_SCALE_MM``
(spans are 2-98 percentile extents in mm, heights mean world z in mm); A is medial when the
score is positive. Checked on every map here whose plates are labelled separately (pymskt
right knee, SPL atlas left knee, CartiMorph template: all three correct) and on all 56 OAI
maps, which this rule calls right knees (medial towards -x, consistent with their RAS
headers and the pymskt right-knee reference in the same OAI geometry).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mskmri.errors import LabelError
from mskmri.labels import (
    CARTIMORPH,
    KNEE,
    KNEE_ID,
    LESION,
    OAI_LESION,
    PYMSKT,
    SPL_ATLAS,
    SourceMapping,
)
from mskmri.synth._common import SynthesisError, rng_for
from mskmri.volume import LabelVolume, Volume

log = logging.getLogger(__name__)

#: AP-span difference (mm) worth one unit of the medial-plate score.
AP_SCALE_MM = 5.0
#: Plateau-height difference (mm) worth one unit of the medial-plate score.
HEIGHT_SCALE_MM = 2.0
#: Below this |score| the medial/lateral decision is logged as uncertain.
MEDIAL_SCORE_WARN = 0.5
#: The split plane is searched inside the central fraction of the cartilage's L-R extent.
SPLIT_CENTRAL_FRACTION = 0.4
#: A connected component of the tibial cartilage counts as a plate above this fraction.
PLATE_MIN_FRACTION = 0.15

#: Extra tissues (no project class; rendered, labelled background in the truth map).
EXTRA_TISSUES: Mapping[int, str] = {1: "tendon", 2: "vessel", 3: "nerve"}

#: pymskt's ``meniscus_subregions.nrrd``: 101-103 medial, 104-106 lateral (anterior, middle,
#: posterior). Checked: 101+102+103 voxels equal pymskt's medial meniscus (value 10) count.
PYMSKT_MENISCUS_SUBREGIONS: Mapping[int, int] = {
    101: KNEE_ID["medial_meniscus"], 102: KNEE_ID["medial_meniscus"],
    103: KNEE_ID["medial_meniscus"], 104: KNEE_ID["lateral_meniscus"],
    105: KNEE_ID["lateral_meniscus"], 106: KNEE_ID["lateral_meniscus"],
}

#: Sources this module reads, by registry name.
KNEE_SOURCES: Mapping[str, SourceMapping] = {
    m.name: m for m in (OAI_LESION, PYMSKT, SPL_ATLAS, CARTIMORPH)
}

_OAI_NAME = re.compile(r"^(?P<cohort>akoa|zib)_(?P<subject>\d+)(?:_(?P<tp>\d+m))?$")
_GENERIC_TP = re.compile(r"^(?P<subject>.+?)[_-](?P<tp>(?:\d+m)|(?:tp\d+)|(?:v\d+)|(?:t\d+))$",
                         re.IGNORECASE)


@dataclass
class KneeSource:
    """One knee label map in the project schema.

    Attributes
    ----------
    labels : LabelVolume
        Knee schema (``mskmri.labels.KNEE``), in the file's own geometry.
    lesions : LabelVolume or None
        1 = bone marrow lesion, same geometry; None when the source does not annotate lesions.
    source : str
        Registry name (``oai_lesion``, ``pymskt``, ``spl_atlas``, ``cartimorph``).
    subject : str
        Subject id (time points of one subject share it; see :func:`subject_of`).
    timepoint : str or None
        E.g. ``"00m"``.
    extra : LabelVolume or None
        Tissues without a project class (:data:`EXTRA_TISSUES`), same geometry.
    notes : dict
        How the map was converted (detection, medial side, ...); JSON-ready.
    """

    labels: LabelVolume
    lesions: LabelVolume | None
    source: str
    subject: str
    timepoint: str | None = None
    extra: LabelVolume | None = None
    notes: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- names, splits
def _stem(name: str | os.PathLike[str]) -> str:
    base = Path(name).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base


def subject_of(name: str | os.PathLike[str]) -> str:
    """Subject id of a label-map file name, so that time points stay together.

    ``akoa_9031930_00m`` and ``akoa_9031930_36m`` -> ``"9031930"`` (the OAI participant id,
    shared with ``zib_9031930`` should both cohorts hold the same person); other names lose a
    trailing time-point token (``_00m``, ``_tp2``, ``_v1``, ``_t1``) and keep the rest.
    """
    stem = _stem(name)
    m = _OAI_NAME.match(stem)
    if m:
        return m.group("subject")
    g = _GENERIC_TP.match(stem)
    return g.group("subject") if g else stem


def timepoint_of(name: str | os.PathLike[str]) -> str | None:
    """Time point token of a label-map file name (``"00m"``), or None."""
    stem = _stem(name)
    m = _OAI_NAME.match(stem)
    if m:
        return m.group("tp")
    g = _GENERIC_TP.match(stem)
    return g.group("tp") if g else None


def split_by_subject(
    names: Iterable[str | os.PathLike[str]],
    *,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    split_names: Sequence[str] = ("train", "val", "test"),
    seed: int = 0,
    strata: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """Deterministic train/val/test split in which no subject crosses splits.

    Parameters
    ----------
    names : iterable of str or path
        Label-map names or paths; grouped by :func:`subject_of`.
    fractions : floats
        Share of subjects per split (normalised to sum 1).
    split_names : strs
        Names of the splits, one per fraction.
    seed : int
        Seed of the subject permutation.
    strata : mapping name -> key, optional
        Balance the split within each stratum (e.g. ``"femoral_bml"`` / ``"none"``). A
        subject's stratum is that of its first name in sorted order.

    Returns
    -------
    dict split name -> sorted list of the given names (as str)
    """
    if len(fractions) != len(split_names):
        raise SynthesisError(
            f"split_by_subject needs one name per fraction, got {len(fractions)} fractions "
            f"and {len(split_names)} names"
        )
    frac = np.asarray(fractions, dtype=float)
    if np.any(frac < 0) or frac.sum() <= 0:
        raise SynthesisError(f"split fractions must be >= 0 and not all 0, not {list(fractions)}")
    frac = frac / frac.sum()
    by_subject: dict[str, list[str]] = {}
    for n in sorted(str(x) for x in names):
        by_subject.setdefault(subject_of(n), []).append(n)
    groups: dict[str, list[str]] = {}
    for subj in sorted(by_subject):
        key = "all"
        if strata is not None:
            first = by_subject[subj][0]
            key = str(strata.get(first, strata.get(_stem(first), "none")))
        groups.setdefault(key, []).append(subj)
    out: dict[str, list[str]] = {s: [] for s in split_names}
    for key in sorted(groups):
        subjects = groups[key]
        order = rng_for(seed, "split", key).permutation(len(subjects))
        # largest-remainder allocation of this stratum's subjects
        raw = frac * len(subjects)
        counts = np.floor(raw).astype(int)
        for i in np.argsort(-(raw - counts), kind="stable")[: len(subjects) - counts.sum()]:
            counts[i] += 1
        start = 0
        for sname, c in zip(split_names, counts, strict=True):
            for idx in order[start:start + c]:
                out[sname].extend(by_subject[subjects[idx]])
            start += c
    return {k: sorted(v) for k, v in out.items()}


def oai_label_paths(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The 56 OAI lesion label maps, sorted (``root`` defaults to the shared data folder)."""
    if root is None:
        from mskmri.paths import shared_data_dir

        base = shared_data_dir()
        if base is None:
            raise SynthesisError(
                "the shared data folder was not found; set MSKMRI_SHARED_DATA or give the "
                "folder of the OAI label maps"
            )
        root = base / "knee" / "oai_bone_lesion_labels"
    root = Path(root)
    if (root / "knee" / "oai_bone_lesion_labels").is_dir():
        root = root / "knee" / "oai_bone_lesion_labels"
    return sorted(root.glob("*.nii.gz"))


# --------------------------------------------------------------------------- detection
def detect_source(volume: Volume, path: str | os.PathLike[str] | None = None) -> tuple[str, str]:
    """Which knee label source a map comes from, and why.

    By file name first (``akoa_``/``zib_`` OAI, ``CLAIR``/``cartimorph``, ``pymskt``/
    ``SAG_3D_DESS``/``meniscus_subregions``, ``spl``/``seg.nrrd`` beside ``knee.ctbl``),
    then by values: the femur is the largest structure, and its value tells the source
    (1 = OAI or CartiMorph, 5 = pymskt, 95 = SPL); OAI has patellar cartilage (6) which the
    CartiMorph segmentation lacks.

    Returns
    -------
    (name, reason) : (str, str)
    """
    if path is not None:
        p = Path(path)
        low = p.name.lower()
        if _OAI_NAME.match(_stem(p)):
            return "oai_lesion", f"file name {p.name} (akoa_/zib_ OAI lesion maps)"
        if "clair" in low or "cartimorph" in low:
            return "cartimorph", f"file name {p.name}"
        if "pymskt" in str(p).lower() or "sag_3d_dess" in low or "meniscus_subregions" in low:
            return "pymskt", f"file name {p.name}"
        if "spl" in str(p.parent).lower() or (p.parent / "knee.ctbl").exists():
            return "spl_atlas", f"file {p.name} beside the SPL colour table"
    arr = np.asarray(volume.array)
    counts = np.bincount(arr.ravel().astype(np.int64)) if arr.size else np.zeros(1, int)
    values = [int(v) for v in np.nonzero(counts)[0] if v != 0]
    if not values:
        raise LabelError("the label map is empty (all 0); give a knee label map")
    largest = max(values, key=lambda v: counts[v])
    vset = set(values)
    if largest == 95 or vset & {83, 95, 96, 98}:
        return "spl_atlas", "values 83/95/96/98 (SPL atlas cartilage and bones)"
    if largest == 5 and vset <= set(PYMSKT.table) | set(PYMSKT_MENISCUS_SUBREGIONS):
        return "pymskt", "largest structure has value 5 (pymskt femur)"
    if largest == 1 and vset <= set(OAI_LESION.table):
        if 6 in vset or vset & {7, 8, 9}:
            return "oai_lesion", "largest structure 1 (femur) and patellar cartilage 6 present"
        if vset <= set(CARTIMORPH.table):
            return "cartimorph", "values 1-5 only with femur largest (CartiMorph segmentation)"
    raise LabelError(
        f"cannot tell which knee label source holds values {values[:12]}; give --source "
        f"(one of {', '.join(KNEE_SOURCES)})"
    )


# --------------------------------------------------------------------------- medial side
def medial_score(points_a: np.ndarray, points_b: np.ndarray) -> float:
    """Score > 0 when plate A is the medial one (see the module notes).

    Parameters
    ----------
    points_a, points_b : (N, 3) arrays
        World RAS+ coordinates (mm) of the voxels of each plate.
    """
    def ap_span(p: np.ndarray) -> float:
        lo, hi = np.percentile(p[:, 1], [2.0, 98.0])
        return float(hi - lo)

    return float((ap_span(points_a) - ap_span(points_b)) / AP_SCALE_MM
                 + (points_b[:, 2].mean() - points_a[:, 2].mean()) / HEIGHT_SCALE_MM)


def _world_points(vol: Volume, idx: np.ndarray, max_points: int = 20000) -> np.ndarray:
    if len(idx) > max_points:
        idx = idx[:: int(np.ceil(len(idx) / max_points))]
    return vol.voxel_to_world(idx)


def split_tibial_cartilage(
    labels: LabelVolume,
    *,
    value: int = KNEE_ID["medial_tibial_cartilage"],
) -> tuple[LabelVolume, dict[str, Any]]:
    """Split one combined tibial-cartilage value into medial (6) and lateral (7).

    Parameters
    ----------
    labels : LabelVolume
        Knee-schema map whose voxels of ``value`` hold both plates.
    value : int
        The combined value (default 6, where ``OAI_LESION`` maps the OAI's 4).

    Returns
    -------
    (LabelVolume, dict)
        The map with 6 = medial and 7 = lateral plate, and notes: split plane, score, sides.
    """
    import cc3d

    ras = labels.reorient("RAS")
    arr = ras.array.copy()
    mask = arr == value
    idx = np.argwhere(mask)
    if len(idx) < 10:
        raise LabelError(
            f"the tibial cartilage (value {value}) has {len(idx)} voxels, too few to split into "
            "medial and lateral plates; check the label map"
        )
    from scipy import ndimage

    x = idx[:, 0]
    prof = ndimage.gaussian_filter1d(np.bincount(x, minlength=arr.shape[0]).astype(float), 2.0)
    lo, hi = np.percentile(x, [5.0, 95.0])
    cand = np.arange(arr.shape[0])
    margin = (1.0 - SPLIT_CENTRAL_FRACTION) / 2.0 * (hi - lo)
    central = (cand >= lo + margin) & (cand <= hi - margin)
    if not central.any():
        central = (cand >= lo) & (cand <= hi)
    x0 = float(cand[central][np.argmin(prof[central])]) + 0.5
    side_low = x < x0  # plate with the lower x index (RAS: towards the patient's left)
    method = "plane"
    # keep whole connected plates that sit clearly on one side of the plane
    lo_b = idx.min(axis=0)
    hi_b = idx.max(axis=0) + 1
    sub = mask[lo_b[0]:hi_b[0], lo_b[1]:hi_b[1], lo_b[2]:hi_b[2]]
    cc = cc3d.connected_components(sub.astype(np.uint8), connectivity=26)
    comp = cc[tuple((idx - lo_b).T)]
    ncomp = np.bincount(comp)
    big = [c for c in np.argsort(ncomp)[::-1] if c != 0 and ncomp[c] >= PLATE_MIN_FRACTION * len(idx)]
    if len(big) == 2:
        mean_x = [x[comp == c].mean() for c in big]
        if (mean_x[0] - x0) * (mean_x[1] - x0) < 0:
            for c, mx in zip(big, mean_x, strict=True):
                side_low[comp == c] = mx < x0
            method = "connected components + plane"
    pts_low = _world_points(ras, idx[side_low])
    pts_high = _world_points(ras, idx[~side_low])
    if len(pts_low) == 0 or len(pts_high) == 0:
        raise LabelError(
            "the tibial cartilage lies on one side of the tibial spine only; cannot split it "
            "into medial and lateral plates"
        )
    score = medial_score(pts_low, pts_high)
    low_is_medial = score > 0
    if abs(score) < MEDIAL_SCORE_WARN:
        log.warning("medial/lateral tibial plate decision is uncertain (score %.2f)", score)
    med_id, lat_id = KNEE_ID["medial_tibial_cartilage"], KNEE_ID["lateral_tibial_cartilage"]
    lab_low, lab_high = (med_id, lat_id) if low_is_medial else (lat_id, med_id)
    arr[tuple(idx[side_low].T)] = lab_low
    arr[tuple(idx[~side_low].T)] = lab_high
    out = ras.with_array(arr)
    assert isinstance(out, LabelVolume)
    back = _reorient_like(out, labels)
    notes = {
        "method": method,
        "split_plane_index_RAS_x": x0,
        "medial_score": round(score, 3),
        "medial_towards": "-x (patient left: a right knee)" if low_is_medial
        else "+x (patient right: a left knee)",
        "knee_side": "right" if low_is_medial else "left",
        "voxels_medial": int((side_low if low_is_medial else ~side_low).sum()),
        "voxels_lateral": int((~side_low if low_is_medial else side_low).sum()),
    }
    return back, notes


def _reorient_like(vol: LabelVolume, like: Volume) -> LabelVolume:
    """Permute/flip ``vol`` back into the axis order of ``like`` (same grid, no interpolation)."""
    out = vol.reorient("".join(like.orientation))
    if not out.same_geometry(like, atol=1e-4):
        raise SynthesisError("internal: reorientation did not return to the input grid")
    out.affine = like.affine.copy()
    assert isinstance(out, LabelVolume)
    return out


# --------------------------------------------------------------------------- loading
def _extra_from_spl(array: np.ndarray) -> np.ndarray:
    out = np.zeros(array.shape, dtype=np.uint8)
    out[(array >= 41) & (array <= 48)] = 1
    out[(array >= 71) & (array <= 78)] = 2
    out[(array >= 61) & (array <= 64)] = 3
    return out


def load_knee_source(
    path: str | os.PathLike[str] | Volume,
    *,
    source: str | None = None,
    name: str | None = None,
) -> KneeSource:
    """Read a knee label map of any known source into the project knee schema.

    Parameters
    ----------
    path : path-like or Volume
        Label-map file (NIfTI, NRRD, ...) or an already-read volume.
    source : str, optional
        ``oai_lesion``, ``pymskt``, ``spl_atlas`` or ``cartimorph``; detected when omitted
        (:func:`detect_source`).
    name : str, optional
        Name for subject/time point when ``path`` is a Volume.

    Returns
    -------
    KneeSource
    """
    from difflib import get_close_matches

    if isinstance(path, Volume):
        vol = path
        p = Path(name) if name else None
    else:
        from mskmri.io import read

        p = Path(path)
        vol = read(p)
    vol.require_geometry("label-map synthesis")
    arr = np.asarray(vol.array)
    if arr.dtype.kind == "f":
        if not np.all(arr == np.round(arr)):
            raise LabelError(f"{p or 'the volume'} holds fractional values: it is an image, not a "
                             "label map; give a segmentation")
        arr = arr.astype(np.int32)
    notes: dict[str, Any] = {}
    if source is None:
        source, why = detect_source(vol, p)
        notes["detected_by"] = why
    elif source not in KNEE_SOURCES:
        close = get_close_matches(source, list(KNEE_SOURCES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise LabelError(f"unknown knee label source {source!r} (known: "
                         f"{', '.join(KNEE_SOURCES)}){hint}")
    mapping = KNEE_SOURCES[source]
    table: dict[int, int] = dict(mapping.table)
    if source == "pymskt":
        table.update(PYMSKT_MENISCUS_SUBREGIONS)
    values = np.unique(arr)
    unknown = [int(v) for v in values if v != 0 and int(v) not in table]
    if unknown:
        raise LabelError(
            f"{p or 'the label map'} has values {unknown} that the {source!r} source does not "
            "define; check that the right --source was chosen"
        )
    lut = np.zeros(int(max(values.max(), max(table))) + 1, dtype=np.uint8)
    for s, d in table.items():
        lut[s] = d
    knee = lut[arr.astype(np.int64)]
    labels = LabelVolume(knee, vol.affine, dict(KNEE), schema="knee",
                         meta={"source": str(p) if p else "volume", "label_source": source})
    lesions: LabelVolume | None = None
    extra: LabelVolume | None = None
    if mapping.lesion_values:
        les = np.isin(arr, mapping.lesion_values).astype(np.uint8)
        lesions = LabelVolume(les, vol.affine, dict(LESION), schema="lesion",
                              meta={"source": str(p) if p else "volume"})
        notes["lesion_values"] = list(mapping.lesion_values)
        notes["lesion_voxels"] = int(les.sum())
    if source == "oai_lesion":
        labels, split_notes = split_tibial_cartilage(labels)
        notes["tibial_cartilage_split"] = split_notes
    if source == "spl_atlas":
        extra = LabelVolume(_extra_from_spl(arr), vol.affine, dict(EXTRA_TISSUES),
                            schema="extra_tissue", meta={"source": str(p) if p else "volume"})
    stem = p if p is not None else Path("volume")
    # single-knee sources: every file of the source is the same subject
    subject = subject_of(stem) if source == "oai_lesion" else source
    return KneeSource(
        labels=labels, lesions=lesions, source=source, subject=subject,
        timepoint=timepoint_of(stem), extra=extra, notes=notes,
    )
