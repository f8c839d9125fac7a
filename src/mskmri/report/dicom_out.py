"""DICOM out: a DICOM SEG of the segmentation and lesions, and a DICOM SR (TID 1500) of the
measurements, both referencing the source series. Written with highdicom.

When ``analyze`` reads a DICOM series, :func:`write_dicom_outputs` adds two files to its
output folder:

``segmentation.dcm``
    Segmentation Storage, ``BINARY`` type: one segment per structure present in the label
    map (in label-value order), then one ``bone marrow lesion`` segment when a lesion mask
    with lesions is given. BINARY and not LABELMAP because lesions lie *inside* bones
    (segments overlap, which a LABELMAP cannot hold) and because every SEG reader knows
    BINARY, while LABELMAP (added to the standard in 2024) is unknown to older ones such
    as pydicom-seg. Checked readers: highdicom (``segread``, ``get_volume``) and
    pydicom-seg 0.4.1 give back every segment on the source grid; SimpleITK/GDCM is not a
    SEG reader (it sees one multi-frame image of all segments, 1 mm spacing). Frames are
    the source slices, pixel for pixel: frame geometry (ImagePositionPatient,
    ImageOrientationPatient, PixelSpacing) is the source's, and each frame names its source
    image in its DerivationImageSequence. Frames with no voxel of a segment are left out.
``measurements_sr.dcm``
    Comprehensive 3D SR holding a TID 1500 *Imaging Measurement Report*: one measurement
    group per structure (and region) of ``measurements.json``. A group whose structure has
    a segment in the SEG is a TID 1411 *Volumetric ROI* group that references that segment;
    the others (whole-study values such as a Cobb angle, or structures without a segment)
    are TID 1501 groups. Lesion measurements reference the lesion segment, with the bone
    as finding site. Values that were not measured (``null`` in the JSON) are not written.

Codes
-----
Segment categories and types, measurement names and units are coded. SNOMED CT (``SCT``),
DICOM (``DCM``) and LOINC (``LN``) codes are taken from pydicom's copy of the DICOM standard
code tables (:data:`pydicom.sr.codedict.codes`), never typed in by hand; where the standard
has no code for a structure (a generic intervertebral disc) or a measurement (a wedge ratio),
a code of the private scheme :data:`LOCAL_SCHEME` (``99MSKMRI``, "99" marks a private
scheme in DICOM PS3.16 section 8) is used, its value the mskmri name and its meaning the name
in words. Units are UCUM: ``mL``, ``mm``, ``mm2``, ``deg``, ``%``, ``1`` (no units) and
``{count}``; a unit outside :data:`UCUM_UNITS` is not written (logged).

Geometry
--------
The label map must lie on the grid of the source slices: same slices, same in-plane
sampling, any axis order (a map reoriented to RAS+ is permuted back without interpolation).
The grid is recomputed from the source headers (ImagePositionPatient of the first and last
slice, ImageOrientationPatient, PixelSpacing) and compared with the map's affine within
:data:`GRID_ATOL_MM`. A series that was resampled along the slice normal on reading
(``allow_resample``) has no frame-to-slice correspondence and gets no SEG (the SR is still
written, without segment references).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from mskmri._optional import optional_import
from mskmri.errors import GeometryError, LabelError, MskMriError
from mskmri.volume import LPS_TO_RAS, LabelVolume, Volume

if TYPE_CHECKING:  # pragma: no cover - typing only
    from pydicom.dataset import Dataset
    from pydicom.sr.coding import Code

log = logging.getLogger(__name__)

#: Output names inside an analysis folder.
SEG_FILE: Final = "segmentation.dcm"
SR_FILE: Final = "measurements_sr.dcm"

#: SeriesNumber of the SEG and SR series (high, so they list after the acquired series).
SEG_SERIES_NUMBER: Final = 9901
SR_SERIES_NUMBER: Final = 9902

#: Private coding scheme for structures and measurements the standard has no code for.
LOCAL_SCHEME: Final = "99MSKMRI"

#: SEG type: BINARY (overlapping segments allowed; widest reader support).
SEGMENTATION_TYPE: Final = "BINARY"

#: Largest difference (mm in positions, unitless in cosines x spacing) between the label
#: map's affine and the grid of the source slices before the map counts as off the grid.
GRID_ATOL_MM: Final = 1e-2

#: Manufacturer / model written into the SEG and SR (the software is the "device").
MANUFACTURER: Final = "mskmri"
MODEL_NAME: Final = "mskmri"

#: Type 2 attributes of the Patient and General Study modules: highdicom copies them from the
#: source, so a source without them (allowed for type 2 only if present-but-empty, but often
#: simply absent in anonymised or synthetic files) gets them empty in a *copy* of its header.
_TYPE2_COPIED: Final = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "StudyID", "AccessionNumber", "ReferringPhysicianName",
)

#: mskmri unit -> (UCUM code, meaning). ``count`` has no UCUM unit: the annotation
#: ``{count}`` is UCUM's way of writing a dimensionless count.
UCUM_UNITS: Final[Mapping[str, tuple[str, str]]] = {
    "mL": ("mL", "milliliter"),
    "mm": ("mm", "millimeter"),
    "mm^2": ("mm2", "square millimeter"),
    "mm^3": ("mm3", "cubic millimeter"),
    "deg": ("deg", "Degree"),
    "%": ("%", "Percent"),
    "1": ("1", "no units"),
    "count": ("{count}", "count"),
    "ms": ("ms", "millisecond"),
}


# ---------------------------------------------------------------------------- codes
def _code(scheme: str, name: str) -> Code:
    """A code from pydicom's standard tables, e.g. ``_code("SCT", "Femur")``."""
    from pydicom.sr.codedict import codes

    c: Code = getattr(getattr(codes, scheme), name)
    return c


def _local(value: str, meaning: str | None = None) -> Code:
    """A code of the private scheme :data:`LOCAL_SCHEME`."""
    from pydicom.sr.coding import Code

    return Code(value, LOCAL_SCHEME, meaning or value.replace("_", " "))


@dataclass(frozen=True)
class SegmentCodes:
    """Coded description of one segment.

    Attributes
    ----------
    category : Code
        SegmentedPropertyCategoryCodeSequence (anatomical structure, tissue, abnormality).
    type : Code
        SegmentedPropertyTypeCodeSequence (femur, cartilage, L3 vertebra ...).
    region : Code or None
        AnatomicRegionSequence, where the type alone does not say where (cartilage of the
        femur, a meniscus of the knee joint).
    """

    category: Code
    type: Code
    region: Code | None = None


#: Knee schema name -> (category, type, region) as pydicom ``codes`` attribute names
#: (``"SCT.Femur"``); a ``"99MSKMRI:..."`` entry is a local code.
_KNEE_CODES: Final[Mapping[str, tuple[str, str, str | None]]] = {
    "femur": ("SCT.AnatomicalStructure", "SCT.Femur", None),
    "tibia": ("SCT.AnatomicalStructure", "SCT.Tibia", None),
    "patella": ("SCT.AnatomicalStructure", "SCT.Patella", None),
    "fibula": ("SCT.AnatomicalStructure", "SCT.Fibula", None),
    "femoral_cartilage": ("SCT.AnatomicalStructure", "SCT.Cartilage", "SCT.Femur"),
    "medial_tibial_cartilage": ("SCT.AnatomicalStructure", "SCT.Cartilage", "SCT.TibialPlateau"),
    "lateral_tibial_cartilage": ("SCT.AnatomicalStructure", "SCT.Cartilage",
                                 "SCT.TibialPlateau"),
    "patellar_cartilage": ("SCT.AnatomicalStructure", "SCT.Cartilage", "SCT.Patella"),
    "medial_meniscus": ("SCT.AnatomicalStructure", "SCT.Meniscus", "SCT.KneeJoint"),
    "lateral_meniscus": ("SCT.AnatomicalStructure", "SCT.Meniscus", "SCT.KneeJoint"),
    "joint_effusion": ("SCT.MorphologicallyAbnormalStructure", "SCT.Effusion", "SCT.KneeJoint"),
    "muscle": ("SCT.Tissue", "SCT.SkeletalMuscle", None),
    "anterior_cruciate_ligament": ("SCT.AnatomicalStructure", "SCT.Ligament", "SCT.KneeJoint"),
    "posterior_cruciate_ligament": ("SCT.AnatomicalStructure", "SCT.Ligament", "SCT.KneeJoint"),
    "collateral_ligaments": ("SCT.AnatomicalStructure", "SCT.Ligament", "SCT.KneeJoint"),
    "patellar_tendon": ("SCT.AnatomicalStructure", "SCT.PatellarTendon", None),
    "infrapatellar_fat_pad": ("SCT.Tissue", "SCT.AdiposeTissue", "SCT.KneeJoint"),
    "bone_marrow_lesion": ("SCT.MorphologicallyAbnormalStructure", "SCT.Lesion",
                           "SCT.BoneMarrow"),
    "spinal_cord": ("SCT.AnatomicalStructure", "SCT.SpinalCord", None),
    "csf": ("SCT.AnatomicalStructure", "SCT.CerebrospinalFluid", "SCT.SpinalCanalStructure"),
    "cord_t2_hyperintensity": ("SCT.MorphologicallyAbnormalStructure", "SCT.Lesion",
                               "SCT.SpinalCord"),
    "sacrum": ("SCT.AnatomicalStructure", "SCT.Sacrum", None),
}


def _resolve(ref: str) -> Code:
    scheme, _, name = ref.partition(".")
    return _code(scheme, name)


#: A disc named by its two levels, as spine measurements name it (``"L4-L5"``, ``"L5-S1"``).
_DISC_LEVELS: Final = re.compile(r"^[CTLSV]\d+-[CTLSV]\d+$")


def segment_codes(name: str) -> SegmentCodes:
    """Coded category, type and region of a structure of the knee, spine or lesion schema.

    Parameters
    ----------
    name : str
        Project name: ``"femur"``, ``"medial_meniscus"``, ``"L3"``, ``"disc_L4-L5"`` (or
        ``"L4-L5"``), ``"V1001"``, ``"spinal_cord"``, ``"bone_marrow_lesion"`` ...

    Returns
    -------
    SegmentCodes
        Standard codes where the standard has one (vertebrae and discs by level, e.g.
        ``SCT 66794005 L1 vertebra``); a generic vertebra for a level that has none (L6,
        an ordinal ``V1001``); a :data:`LOCAL_SCHEME` code otherwise (a disc whose level is
        not known, a name no schema has).
    """
    anatomy = _code("SCT", "AnatomicalStructure")
    if name in _KNEE_CODES:
        cat, typ, reg = _KNEE_CODES[name]
        return SegmentCodes(_resolve(cat), _resolve(typ), _resolve(reg) if reg else None)
    if _DISC_LEVELS.match(name):  # a measurement's structure "L4-L5" is that disc ...
        try:
            return SegmentCodes(anatomy, _code("SCT", name.replace("-", "") + "Disc"))
        except AttributeError:  # ... but "C2-C7" (K-line) is a range of levels, no disc
            return SegmentCodes(anatomy, _local(name[:64]))
    if name.startswith("disc_"):  # disc_L4-L5 -> SCT.L4L5Disc
        attr = name[len("disc_"):].replace("-", "") + "Disc"
        try:
            return SegmentCodes(anatomy, _code("SCT", attr))
        except AttributeError:
            return SegmentCodes(anatomy, _local("intervertebral_disc", "Intervertebral disc"),
                                _code("SCT", "Vertebra"))
    if len(name) >= 2 and name[0] in "CTLV" and name[1:].isdigit():  # C1..L6, V1000..
        try:
            return SegmentCodes(anatomy, _code("SCT", f"{name}Vertebra"))
        except AttributeError:
            return SegmentCodes(anatomy, _code("SCT", "Vertebra"))
    return SegmentCodes(anatomy, _local(name[:64]))


#: Measurement name -> (concept name, derivation) as ``codes`` references; names not here
#: get a local code. Standard codes only where one means exactly the mskmri quantity.
_MEASUREMENT_CODES: Final[Mapping[str, tuple[str, str | None]]] = {
    "volume": ("SCT.Volume", None),
    "lesion_volume": ("SCT.Volume", None),
    "thickness_mean": ("LN.Thickness", "SCT.Mean"),
    "thickness_max": ("LN.Thickness", "SCT.Maximum"),
    "cobb_angle": ("SCT.CobbAngle", None),
    "cord_area": ("SCT.Area", None),
    "cord_ap_diameter": ("SCT.Diameter", None),
}


def measurement_codes(name: str) -> tuple[Code, Code | None]:
    """Concept name and derivation (Mean, Maximum, or None) of a measurement name."""
    if name in _MEASUREMENT_CODES:
        concept, derivation = _MEASUREMENT_CODES[name]
        return _resolve(concept), _resolve(derivation) if derivation else None
    return _local(name[:64]), None


def ucum_unit(unit: str) -> Code | None:
    """The UCUM code of an mskmri unit, or None when it has none here (not written)."""
    from pydicom.sr.coding import Code

    if unit not in UCUM_UNITS:
        return None
    value, meaning = UCUM_UNITS[unit]
    return Code(value, "UCUM", meaning)


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class SegmentInfo:
    """One segment of the written SEG.

    Attributes
    ----------
    number : int
        SegmentNumber (1-based).
    name : str
        The project name of the structure (``"femur"``, ``"bone_marrow_lesion"``).
    source : str
        ``"labels"`` or ``"lesions"``: which map it came from.
    value : int
        Its value in that map.
    voxels : int
        Voxels in the segment (equal to the map's count of ``value``).
    """

    number: int
    name: str
    source: str
    value: int
    voxels: int


@dataclass
class DicomOutputs:
    """What :func:`write_dicom_outputs` wrote.

    Attributes
    ----------
    files : list of Path
        The files written (empty for a non-DICOM input or when writing failed).
    segments : list of SegmentInfo
        The segments of the SEG (empty when none was written).
    warnings : list of str
        Why a file was not written, for the report.
    """

    files: list[Path] = field(default_factory=list)
    segments: list[SegmentInfo] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- SEG
def _headers_for_highdicom(source: Sequence[Dataset]) -> list[Dataset]:
    """Copies of the source headers with missing type 2 patient/study attributes empty."""
    import copy

    out = []
    for ds in source:
        missing = [k for k in _TYPE2_COPIED if k not in ds]
        if missing:
            ds = copy.deepcopy(ds)  # headers only (no pixels): small; the caller's stay as given
            for keyword in missing:
                setattr(ds, keyword, "")
        out.append(ds)
    return out


def source_grid_affine(source: Sequence[Dataset]) -> np.ndarray:
    """The voxel -> RAS+ mm affine of the slices ``source`` (in slice order).

    Axis order as :mod:`mskmri.io.dicom` reads it: axis 0 along the row direction of
    ImageOrientationPatient (column index), axis 1 along the column direction (row index),
    axis 2 from the first to the last slice.

    Parameters
    ----------
    source : sequence of pydicom.Dataset
        Single-frame image headers in slice order (at least two, or one with
        SpacingBetweenSlices or SliceThickness).

    Raises
    ------
    GeometryError
        A header without ImageOrientationPatient, ImagePositionPatient or PixelSpacing, or
        a single slice without a thickness.
    """
    try:
        iop = np.asarray([float(v) for v in source[0].ImageOrientationPatient])
        first = np.asarray([float(v) for v in source[0].ImagePositionPatient])
        last = np.asarray([float(v) for v in source[-1].ImagePositionPatient])
        row_sp, col_sp = (float(v) for v in source[0].PixelSpacing)
    except (AttributeError, TypeError, ValueError) as exc:
        raise GeometryError(
            "the source DICOM slices lack ImageOrientationPatient, ImagePositionPatient or "
            "PixelSpacing, so a DICOM SEG cannot be placed on them; give a series with geometry"
        ) from exc
    r, c = iop[:3], iop[3:]
    if len(source) > 1:
        step = (last - first) / (len(source) - 1)
    else:  # one slice: its thickness, as the reader takes it (never a guessed 1 mm)
        thick = source[0].get("SpacingBetweenSlices") or source[0].get("SliceThickness")
        if not thick:
            raise GeometryError("a single source slice without SliceThickness has no slice "
                                "spacing, so a DICOM SEG cannot be placed on it")
        step = np.cross(r, c) * float(thick)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = r * col_sp, c * row_sp, step, first
    return LPS_TO_RAS @ lps


def _on_source_grid(volume: LabelVolume, grid: np.ndarray, n_slices: int, what: str,
                    shape: tuple[int, int, int]) -> LabelVolume:
    """``volume`` permuted/flipped onto the source grid, or GeometryError."""
    import nibabel.orientations as nio

    if volume.shape == shape and np.allclose(volume.affine, grid, atol=GRID_ATOL_MM):
        return volume
    codes = "".join(nio.aff2axcodes(grid))
    moved = volume.reorient(codes)
    if moved.shape == shape and np.allclose(moved.affine, grid, atol=GRID_ATOL_MM):
        return moved  # type: ignore[return-value]
    raise GeometryError(
        f"the {what} ({volume.shape}, {''.join(volume.orientation)}) is not on the grid of "
        f"the {n_slices} source DICOM slices ({shape}, {codes}); a DICOM SEG needs the "
        "segmentation made on the DICOM image itself (same slices and pixel spacing)"
    )


def _segment_description(info: SegmentInfo, version: str) -> Any:
    hd = optional_import("highdicom")

    codes = segment_codes(info.name)
    return hd.seg.SegmentDescription(
        segment_number=info.number,
        segment_label=info.name.replace("_", " ")[:64],
        segmented_property_category=codes.category,
        segmented_property_type=codes.type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="mskmri", version=version, family=_code("DCM", "ArtificialIntelligence")),
        anatomic_regions=[codes.region] if codes.region is not None else None,
        tracking_id=info.name[:64],
        tracking_uid=hd.UID(),
    )


def build_segmentation(
    labels: LabelVolume,
    source: Sequence[Dataset],
    *,
    lesions: LabelVolume | None = None,
    series_number: int = SEG_SERIES_NUMBER,
) -> tuple[Any, list[SegmentInfo]]:
    """A DICOM SEG (highdicom ``Segmentation``, BINARY) of a label map and a lesion mask.

    Parameters
    ----------
    labels : LabelVolume
        Label map of shape ``(I, J, K)`` on the grid of ``source`` (any axis order; see the
        module docstring). Each value present with a name in ``labels.labels`` becomes one
        segment, in value order.
    source : sequence of pydicom.Dataset
        Headers of the source slices in slice order (``read_source_datasets``); pixel data
        is not needed.
    lesions : LabelVolume, optional
        Lesion mask (1 = bone marrow lesion) on the same grid; one more segment when it
        holds a lesion.
    series_number : int
        SeriesNumber of the new SEG series.

    Returns
    -------
    segmentation : highdicom.seg.Segmentation
    segments : list of SegmentInfo

    Raises
    ------
    GeometryError
        A map off the source grid, or source slices without geometry.
    MskMriError
        Nothing to write (no labelled voxel at all).
    """
    hd = optional_import("highdicom")

    from mskmri import __version__

    grid = source_grid_affine(source)
    rows, cols = int(source[0].Rows), int(source[0].Columns)
    shape = (cols, rows, len(source))
    labels = _on_source_grid(labels, grid, len(source), "label map", shape)
    values = labels.array  # integer (LabelVolume casts bool and whole floats)
    if int(values.min(initial=0)) < 0:
        raise LabelError(f"the label map holds negative values (down to {values.min()}); a "
                         "DICOM SEG needs non-negative integer labels")
    counts = np.bincount(values.ravel())  # voxels per value
    infos: list[SegmentInfo] = []
    for value in (v for v in np.flatnonzero(counts) if v != 0):
        name = labels.labels.get(int(value))
        if not name:
            log.warning("label value %d has no name; not written to the DICOM SEG", value)
            continue
        infos.append(SegmentInfo(len(infos) + 1, name, "labels", int(value), int(counts[value])))
    lesion_mask = None
    if lesions is not None:
        lesions = _on_source_grid(lesions, grid, len(source), "lesion mask", shape)
        lesion_mask = lesions.array > 0
        if lesion_mask.any():
            infos.append(SegmentInfo(len(infos) + 1, "bone_marrow_lesion", "lesions", 1,
                                     int(np.count_nonzero(lesion_mask))))
        else:
            lesion_mask = None
    if not infos:
        raise MskMriError("the label map holds no labelled voxel, so there is no DICOM SEG to "
                          "write; check the segmentation")
    # highdicom takes frames first: (cols, rows, slices) -> (slices, rows, cols)
    if lesion_mask is None:
        # label-map style (one uint16 array, values = segment numbers): no per-segment copy
        lut = np.zeros(counts.size, np.uint16)  # label value -> segment number (0: none)
        for i in infos:
            lut[i.value] = i.number
        pixels = lut[values].transpose(2, 1, 0)
    else:
        # lesions overlap bones: stacked style (slices, rows, cols, segments), one-hot in a
        # single contiguous pass (filling one segment at a time is ~10x slower: strided writes)
        frames = np.ascontiguousarray(values.transpose(2, 1, 0))
        pixels = np.empty((*frames.shape, len(infos)), bool)
        np.equal(frames[..., None], [i.value for i in infos if i.source == "labels"],
                 out=pixels[..., :-1])
        pixels[..., -1] = lesion_mask.transpose(2, 1, 0)
    seg = hd.seg.Segmentation(
        source_images=_headers_for_highdicom(source),
        pixel_array=pixels,
        segmentation_type=SEGMENTATION_TYPE,
        segment_descriptions=[_segment_description(i, __version__) for i in infos],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=str(__version__),
        device_serial_number="none",
        series_description="mskmri segmentation",
        content_label="MSKMRI_SEG",
        content_description="mskmri segmentation"
        + (" and bone marrow lesions" if lesion_mask is not None else ""),
    )
    return seg, infos


# ---------------------------------------------------------------------------- SR
def _group_key(m: Mapping[str, Any]) -> tuple[str | None, str | None, bool]:
    """(structure, region, is_lesion): measurements sharing it form one group."""
    is_lesion = str(m["name"]).startswith("lesion_")
    return m.get("structure"), m.get("region"), is_lesion


def _segment_for(structure: str | None, is_lesion: bool,
                 segments: Sequence[SegmentInfo]) -> SegmentInfo | None:
    by_name = {s.name: s for s in segments if s.source == "labels"}
    if is_lesion:
        return next((s for s in segments if s.source == "lesions"), None)
    if structure is None:
        return None
    return by_name.get(structure) or by_name.get(f"disc_{structure}")


def build_measurement_report(
    document: Mapping[str, Any],
    source: Sequence[Dataset],
    *,
    segmentation: Any | None = None,
    segments: Sequence[SegmentInfo] = (),
    series_number: int = SR_SERIES_NUMBER,
) -> tuple[Any, list[str]]:
    """A Comprehensive 3D SR (TID 1500) of a ``mskmri/measurements/1`` document.

    Parameters
    ----------
    document : mapping
        The measurements document (``measurements.json``).
    source : sequence of pydicom.Dataset
        Headers of the source slices (the evidence the report is about).
    segmentation : highdicom.seg.Segmentation, optional
        The SEG written with it; groups of structures that have a segment reference it.
    segments : sequence of SegmentInfo
        The segments of ``segmentation`` (from :func:`build_segmentation`).
    series_number : int
        SeriesNumber of the new SR series.

    Returns
    -------
    sr : highdicom.sr.Comprehensive3DSR
    skipped : list of str
        Measurements left out and why (not measured, or a unit with no UCUM code here).
    """
    hd = optional_import("highdicom")

    from mskmri import __version__

    algorithm = hd.sr.AlgorithmIdentification(name="mskmri", version=str(__version__))
    groups: dict[tuple[str | None, str | None, bool], list[Any]] = {}
    skipped: list[str] = []
    for m in document.get("measurements", []):
        key = ".".join(str(p) for p in (m["name"], m.get("structure"), m.get("region")) if p)
        if m.get("value") is None:
            skipped.append(f"{key}: not measured ({m.get('reason', 'no reason given')})")
            continue
        unit = ucum_unit(str(m.get("unit", "")))
        if unit is None:
            skipped.append(f"{key}: unit {m.get('unit')!r} has no UCUM code in mskmri")
            continue
        name, derivation = measurement_codes(str(m["name"]))
        groups.setdefault(_group_key(m), []).append(hd.sr.Measurement(
            name=name, value=float(m["value"]), unit=unit, derivation=derivation,
            algorithm_id=algorithm,
        ))
    for text in skipped:
        log.info("not in the SR: %s", text)

    sop_class = str(getattr(segmentation, "SOPClassUID", ""))
    sop_uid = str(getattr(segmentation, "SOPInstanceUID", ""))
    series_uid = str(source[0].SeriesInstanceUID)
    imaging: list[Any] = []
    for (structure, region, is_lesion), items in groups.items():
        label = " ".join(p for p in ("lesions" if is_lesion else None, structure, region) if p)
        tracking = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=label or "study")
        site_codes = segment_codes(structure) if structure else None
        sites = ([hd.sr.FindingSite(site_codes.type)]
                 if is_lesion and site_codes is not None else None)
        seg_info = _segment_for(structure, is_lesion, segments)
        if segmentation is not None and seg_info is not None:
            codes = segment_codes(seg_info.name)
            imaging.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=sop_class, sop_instance_uid=sop_uid,
                    segment_number=seg_info.number,
                    source_series=hd.sr.SourceSeriesForSegmentation(series_uid)),
                finding_type=codes.type, finding_category=codes.category,
                finding_sites=sites, algorithm_id=algorithm, measurements=items,
            ))
        else:
            imaging.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                finding_type=site_codes.type if site_codes is not None else None,
                finding_sites=sites, algorithm_id=algorithm, measurements=items,
            ))
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(_code("DCM", "Device")),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="mskmri", manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_code("SCT", "ImagingProcedure"),
        imaging_measurements=imaging or None,
    )
    headers = _headers_for_highdicom(source)
    evidence = [*headers, *([segmentation] if segmentation is not None else [])]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description="mskmri measurements",
        is_complete=True,
        is_final=False,  # an automatic result no person has verified
    )
    return sr, skipped


# ---------------------------------------------------------------------------- writing
def write_dicom_seg_and_sr(
    labels: LabelVolume,
    document: Mapping[str, Any],
    source: Sequence[Dataset],
    out_dir: str | os.PathLike[str],
    *,
    lesions: LabelVolume | None = None,
    resampled: bool = False,
) -> DicomOutputs:
    """Build the SEG and the SR in memory, then write both atomically into ``out_dir``.

    Parameters
    ----------
    labels, lesions
        As in :func:`build_segmentation`.
    document : mapping
        The measurements document.
    source : sequence of pydicom.Dataset
        Source slice headers in slice order.
    out_dir : path-like
        Existing or new folder; gets :data:`SEG_FILE` and :data:`SR_FILE`.
    resampled : bool
        The image was resampled along the slice normal on reading: no SEG (no frame maps to
        a source slice), the SR alone.

    Returns
    -------
    DicomOutputs

    Raises
    ------
    MskMriError
        Bad input (a map off the source grid, headers without geometry). Either both files
        are written or neither is (temporary names, renamed once both are complete).
    """
    from mskmri.io import atomic_path

    out = Path(out_dir)
    result = DicomOutputs()
    source = _headers_for_highdicom(source)  # once for both (the builders then copy nothing)
    seg = None
    if resampled:
        result.warnings.append("no DICOM SEG: the series was resampled along the slice normal "
                               "on reading, so its slices are not the source slices")
    else:
        seg, result.segments = build_segmentation(labels, source, lesions=lesions)
    sr, _ = build_measurement_report(document, source, segmentation=seg,
                                     segments=result.segments)
    with atomic_path(out / SR_FILE) as tmp_sr:
        if seg is not None:
            with atomic_path(out / SEG_FILE) as tmp_seg:
                seg.save_as(tmp_seg, enforce_file_format=True)
                sr.save_as(tmp_sr, enforce_file_format=True)
            result.files.append(out / SEG_FILE)
        else:
            sr.save_as(tmp_sr, enforce_file_format=True)
    result.files.append(out / SR_FILE)
    log.info("wrote %s", ", ".join(str(p) for p in result.files))
    return result


def write_dicom_outputs(
    image: Volume,
    labels: LabelVolume,
    document: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    lesions: LabelVolume | None = None,
    strict: bool = False,
) -> DicomOutputs:
    """DICOM SEG and SR for an analysis whose image came from a DICOM series.

    Parameters
    ----------
    image : Volume
        The analysed image as :func:`mskmri.io.read` returned it. When it was not read from
        DICOM (``meta["format"] != "dicom"``), nothing is written and no error raised.
    labels : LabelVolume
        The segmentation on the image's grid.
    document : mapping
        The measurements document (``measurements.json``).
    out_dir : path-like
        The analysis folder (gets :data:`SEG_FILE` and :data:`SR_FILE`).
    lesions : LabelVolume, optional
        The lesion mask on the image's grid.
    strict : bool
        Raise on failure. By default a failure is logged, leaves neither file behind, and
        is returned in ``warnings`` so the analysis (NIfTI outputs, report) still completes.

    Returns
    -------
    DicomOutputs
    """
    if image.meta.get("format") != "dicom":
        return DicomOutputs()
    from mskmri.io.dicom import read_source_datasets

    try:
        source = read_source_datasets(image)
        return write_dicom_seg_and_sr(labels, document, source, out_dir, lesions=lesions,
                                      resampled=bool(image.meta.get("resampled_slices")))
    except Exception as exc:  # highdicom raises ValueError/TypeError on odd headers
        if strict:
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        text = f"DICOM SEG/SR not written: {first}"
        log.warning("%s", text)
        return DicomOutputs(warnings=[text])


def read_sr_measurements(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The numeric measurements of an SR written here, flattened (for checks and tests).

    Returns
    -------
    list of dict
        One per measurement: ``group`` (tracking identifier), ``name`` (CodeValue),
        ``scheme``, ``derivation`` (CodeMeaning or None), ``value``, ``unit`` (UCUM code),
        ``segment_number`` (referenced segment or None), ``seg_uid`` (referenced SEG
        SOPInstanceUID or None).
    """
    hd = optional_import("highdicom")

    sr = hd.sr.srread(path)
    out: list[dict[str, Any]] = []
    for group in _iter_groups(sr):
        ref = group.get("segment")
        for m in group["measurements"]:
            out.append({**m, "group": group["tracking"],
                        "segment_number": ref[1] if ref else None,
                        "seg_uid": ref[0] if ref else None})
    return out


def _iter_groups(sr: Any) -> Iterable[dict[str, Any]]:
    """Measurement groups of a TID 1500 SR as plain dicts (pydicom level, no template API)."""
    root = sr.ContentSequence
    for item in root:
        if item.ConceptNameCodeSequence[0].CodeValue != "126010":  # Imaging Measurements
            continue
        for group in item.ContentSequence:
            entry: dict[str, Any] = {"tracking": None, "segment": None, "measurements": []}
            for sub in group.ContentSequence:
                concept = sub.ConceptNameCodeSequence[0]
                if sub.ValueType == "TEXT" and concept.CodeValue == "112039":
                    entry["tracking"] = str(sub.TextValue)
                elif sub.ValueType == "IMAGE" and concept.CodeValue == "121191":
                    sop = sub.ReferencedSOPSequence[0]
                    entry["segment"] = (str(sop.ReferencedSOPInstanceUID),
                                        int(sop.ReferencedSegmentNumber))
                elif sub.ValueType == "NUM":
                    mv = sub.MeasuredValueSequence[0]
                    derivation = None
                    for mod in getattr(sub, "ContentSequence", []):
                        if mod.ConceptNameCodeSequence[0].CodeValue == "121401":
                            derivation = str(mod.ConceptCodeSequence[0].CodeMeaning)
                    entry["measurements"].append({
                        "name": str(getattr(concept, "CodeValue", None)
                                    or getattr(concept, "LongCodeValue", "")),
                        "scheme": str(concept.CodingSchemeDesignator),
                        "derivation": derivation,
                        "value": float(mv.NumericValue),
                        "unit": str(mv.MeasurementUnitsCodeSequence[0].CodeValue),
                    })
            yield entry


__all__ = [
    "LOCAL_SCHEME",
    "SEG_FILE",
    "SR_FILE",
    "UCUM_UNITS",
    "DicomOutputs",
    "SegmentCodes",
    "SegmentInfo",
    "build_measurement_report",
    "build_segmentation",
    "measurement_codes",
    "read_sr_measurements",
    "segment_codes",
    "source_grid_affine",
    "ucum_unit",
    "write_dicom_outputs",
    "write_dicom_seg_and_sr",
]
