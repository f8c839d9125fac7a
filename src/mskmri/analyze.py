"""The whole knee pipeline as one library function: image in, a folder of results out.

:func:`analyze_knee` (and ``mskmri analyze knee IMAGE --out DIR [--seg SEG] [--lesions MASK]``)
does, in order:

1. read the image (DICOM folder, NIfTI, NRRD, MHA; :func:`mskmri.io.read`) and refuse a 2-D
   image or one without geometry;
2. get the knee segmentation: from ``seg_path`` when given (it must be in the knee schema and
   on the image's grid), otherwise from a *segmenter* ``f(image: Volume) -> LabelVolume``
   (default: :func:`default_knee_segmenter`, i.e. ``mskmri.segment.knee.segment_knee`` once
   that model ships);
3. measure (:func:`mskmri.measure.knee.measure_knee_with_warnings`): volumes, effusion,
   muscle, menisci, cartilage thickness, lesions per bone;
4. build one mesh per structure (:mod:`mskmri.report.mesh`) and render the 3-D views
   (:mod:`mskmri.report.views`);
5. write the report (:mod:`mskmri.report.html`).

``DIR`` must not exist, unless ``--overwrite`` is given (:func:`check_out_dir`: then an
earlier analysis or an empty folder is replaced, nothing else). Everything is written into a
temporary folder beside ``DIR`` that is renamed to ``DIR`` only when complete. ``DIR`` then
holds:

=========================  ===========================================================
``segmentation.nii.gz``    knee label map in the image's geometry (+ ``segmentation.json``)
``lesions.nii.gz``         the lesion mask, when one was given (+ ``lesions.json``)
``measurements.json``      ``mskmri/measurements/1`` (warnings included)
``meshes/<name>.stl|ply``  one surface per structure, LPS mm (3D Slicer's convention)
``views/<view>.png``       anterior, lateral, medial renders of the reconstruction
``report.html``            self-contained report: warnings, study (no patient identifiers
                           unless ``--include-phi``), quality checks, overlays, 3-D views,
                           measurements, lesion table, what was not measured, methods and
                           models, provenance with input checksums
``report.pdf``             the same report printed by headless Chromium (``--pdf`` only)
``segmentation.dcm``       DICOM SEG of the labels and lesions, on and referencing the
                           source series (DICOM input only; :mod:`mskmri.report.dicom_out`)
``measurements_sr.dcm``    DICOM SR (TID 1500) of ``measurements.json`` (DICOM input only)
``manifest.json``          ``mskmri/manifest/1``, kind ``analysis``: command, options,
                           versions, timings, input checksums, size and SHA-256 of every
                           output
=========================  ===========================================================

Bad input gives a :class:`~mskmri.errors.MskMriError` (exit 2 on the command line) and leaves
nothing behind: a 2-D image, a label map with values outside the knee schema, a label map or
lesion mask on another grid. Doubtful input that can still be measured (no femur or tibia,
plates that cannot be measured) gives warnings in ``measurements.json`` and in the report,
as do the quality checks (:mod:`mskmri.report.qc`). :func:`report_context`,
:func:`check_out_dir`, :func:`qc_figures` and :func:`write_pdf` are shared with
``analyze spine``.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.metadata
import json
import logging
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from mskmri._provenance import file_record, versions
from mskmri._timing import StepTimer
from mskmri.errors import GeometryError, ModelError, MskMriError
from mskmri.volume import LabelVolume, Volume

log = logging.getLogger(__name__)

#: A segmenter: ``f(image) -> knee label map on the image's grid``.
Segmenter = Callable[[Volume], LabelVolume]

#: Where the default knee segmenter lives: ``"module:function"``.
KNEE_SEGMENTER: Final = "mskmri.segment.knee:segment_knee"

#: Version tag and kind of ``manifest.json``.
MANIFEST_SCHEMA: Final = "mskmri/manifest/1"
MANIFEST_KIND: Final = "analysis"

#: Output names inside the analysis folder.
SEGMENTATION_FILE: Final = "segmentation.nii.gz"
#: Keys of a segmenter's label-map meta copied into ``measurements.json``
#: (``input.segmentation_record``) when ``analyze`` segments the image itself.
SEGMENTATION_RECORD_KEYS: Final = ("models", "precision", "backend", "fusion", "tta",
                                   "region_mm", "timings_s", "postprocess")
LESIONS_FILE: Final = "lesions.nii.gz"
MEASUREMENTS_FILE: Final = "measurements.json"
REPORT_FILE: Final = "report.html"
MANIFEST_FILE: Final = "manifest.json"
PDF_FILE: Final = "report.pdf"
MESHES_DIR: Final = "meshes"
VIEWS_DIR: Final = "views"

#: Structures whose centroid the overview slices pass through (the joint line).
OVERVIEW_STRUCTURES: tuple[str, ...] = (
    "femoral_cartilage", "medial_tibial_cartilage", "lateral_tibial_cartilage",
    "medial_meniscus", "lateral_meniscus",
)
#: Compartments shown as sagittal slices through their tibial plate (name, structure).
COMPARTMENT_SLICES: tuple[tuple[str, str], ...] = (
    ("Medial compartment", "medial_tibial_cartilage"),
    ("Lateral compartment", "lateral_tibial_cartilage"),
)

#: At most this many lesions are listed one by one in the report.
MAX_LESION_ROWS: Final = 50


@dataclass(frozen=True)
class AnalysisResult:
    """What :func:`analyze_knee` wrote.

    Attributes
    ----------
    out_dir : Path
        The analysis folder.
    files : list of str
        Paths relative to ``out_dir`` of every file written.
    measurements : dict
        The ``mskmri/measurements/1`` document.
    warnings : list of str
        Everything a reader must know (also in the document and the report).
    timings_s : dict of str to float
        Wall time of each step (s) and ``"total"``.
    """

    out_dir: Path
    files: list[str]
    measurements: dict[str, Any]
    warnings: list[str]
    timings_s: dict[str, float]


def default_knee_segmenter() -> Segmenter:
    """The shipped knee segmenter (:data:`KNEE_SEGMENTER`).

    Raises
    ------
    ModelError
        While no knee model ships with this version: the message says how to pass a
        segmentation made elsewhere (``--seg``).
    """
    module_name, _, func = KNEE_SEGMENTER.partition(":")
    hint = ("the knee segmentation model is not available in this version of mskmri yet; "
            "segment the image elsewhere and pass the label map with --seg SEG (knee schema, "
            "on the image's grid), e.g. `mskmri analyze knee IMAGE --out DIR --seg SEG`")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise ModelError(hint) from exc
        raise
    fn = getattr(module, func, None)
    if fn is None or not callable(fn):
        raise ModelError(hint)
    segmenter: Segmenter = fn
    return segmenter


def _require_on_grid(image: Volume, other: Volume, what: str, source: Any) -> None:
    if not image.same_geometry(other):
        raise GeometryError(
            f"the {what} {source} ({other.shape}, {''.join(other.orientation)}, spacing "
            f"{tuple(round(s, 4) for s in other.spacing)} mm) is not on the image's grid "
            f"({image.shape}, {''.join(image.orientation)}, spacing "
            f"{tuple(round(s, 4) for s in image.spacing)} mm); give the {what} made from "
            "this image (same shape and affine)"
        )


def _read_segmentation(path: str | os.PathLike[str], image: Volume) -> LabelVolume:
    from mskmri.io import read_labels
    from mskmri.measure.knee import check_knee_labels

    seg = read_labels(path, schema="knee", strict=False)
    check_knee_labels(seg)  # LabelError naming the values outside the knee schema
    _require_on_grid(image, seg, "label map", path)
    return seg


def _read_lesions(path: str | os.PathLike[str], image: Volume) -> LabelVolume:
    from mskmri.io import read_labels
    from mskmri.labels import LESION
    from mskmri.measure.base import check_label_values

    les = read_labels(path, schema="lesion", strict=False)
    check_label_values(les, LESION, schema_name="lesion")
    _require_on_grid(image, les, "lesion mask", path)
    return les


def _segment(image: Volume, segmenter: Segmenter) -> LabelVolume:
    seg = segmenter(image)
    if not isinstance(seg, LabelVolume):
        raise ModelError(f"the segmenter returned {type(seg).__name__}, not a LabelVolume")
    if not image.same_geometry(seg):
        raise ModelError("the segmenter returned a label map off the image's grid; a "
                         "segmenter must return its labels in the geometry of its input")
    from mskmri.measure.knee import check_knee_labels

    check_knee_labels(seg)
    return seg


def _overlay_figures(image: Volume, seg: LabelVolume, lesions: LabelVolume | None) -> list[Any]:
    """Overlays at representative slices: the joint centre, each compartment, the lesion."""
    from mskmri.labels import KNEE_ID
    from mskmri.report.figures import ReportFigure, label_centroid_world, overlay_figure

    # reoriented to RAS+ once here (the figures would each do it again: seconds on big volumes)
    image, seg = image.reorient("RAS"), seg.reorient("RAS")  # type: ignore[assignment]
    if lesions is not None:
        lesions = lesions.reorient("RAS")  # type: ignore[assignment]
    figures = []
    centre = label_centroid_world(seg, [KNEE_ID[n] for n in OVERVIEW_STRUCTURES])
    where = "the centre of the joint (cartilage and menisci)"
    if centre is None:
        centre = label_centroid_world(seg)
        where = "the centre of the segmented structures"
    figures.append(ReportFigure(
        title="Image and segmentation",
        png=overlay_figure(image, seg, lesions=lesions, centre_mm=centre, plain_row=True),
        caption=f"Sagittal, coronal and axial slices through {where}: the image (top) and "
                "the label map over it (bottom), each structure outlined in its colour.",
    ))
    for title, structure in COMPARTMENT_SLICES:
        c = label_centroid_world(seg, [KNEE_ID[structure]])
        if c is None:
            continue
        figures.append(ReportFigure(
            title=title,
            png=overlay_figure(image, seg, lesions=lesions, centre_mm=c,
                               planes=("sagittal", "coronal")),
            caption=f"Sagittal and coronal slices through the centre of the "
                    f"{structure.replace('_', ' ')}.",
        ))
    if lesions is not None and lesions.array.any():
        c = label_centroid_world(lesions)
        figures.append(ReportFigure(
            title="Bone marrow lesions",
            png=overlay_figure(image, lesions=lesions, centre_mm=c, plain_row=True),
            caption="Slices through the centre of the lesion mask: the image (top) and the "
                    "lesions outlined in magenta (bottom).",
        ))
    return figures


#: The methods section of the knee report (how each number is obtained).
KNEE_METHODS: tuple[str, ...] = (
    "Segmentation: the knee label map (17 structures of the project's knee schema) comes from "
    "the shipped coarse-to-fine 3-D U-Nets, or is given with --seg; its source is in the "
    "table below.",
    "Volumes (mL): voxel count × voxel volume of each structure, on the image's own grid.",
    "Cartilage thickness (mm): per plate, at each voxel of the cartilage-bone interface, the "
    "Euclidean distance (world mm) to the nearest voxel outside cartilage and bone (the "
    "articular side); mean and maximum over the interface. Exact to within half a voxel; rim "
    "values are low.",
    "Lesions: 26-connected components of the bone marrow lesion mask, each assigned to the "
    "bone holding most of its voxels; volumes in mL.",
    "3-D views and meshes: marching cubes on the label map (meshes in LPS mm, 3D Slicer's "
    "convention); views are for orientation only, never measured.",
)


def _configured_segmenter(seg_fn: Segmenter, model: str | None, device: str,
                          tta: str | None) -> Segmenter:
    """The default knee segmenter with ``--model``, ``--device`` and ``--tta`` bound.

    Raises
    ------
    MskMriError
        ``model`` is neither the shipped pair nor a folder with both weight files.
    """
    import functools

    kwargs: dict[str, Any] = {"device": device}
    if model not in (None, "knee-seg"):
        from mskmri.segment.knee import knee_model_pair

        kwargs["coarse"], kwargs["fine"] = knee_model_pair(model)
    if tta is not None:
        kwargs["tta"] = tta
    return functools.partial(seg_fn, **kwargs)


def _knee_models(seg_fn: Any, seg_source: str) -> list[Any]:
    """ModelInfo rows of the segmenter that made the knee label map."""
    from mskmri.report.html import ModelInfo, model_info

    bound = getattr(seg_fn, "keywords", {})  # see _configured_segmenter
    if seg_source.endswith(KNEE_SEGMENTER.replace(":", ".")) and "fine" in bound:
        return [ModelInfo(role, str(bound[key]), "weights given with --model",
                          "not a shipped model: its validation is the caller's")
                for role, key in (("knee region (coarse)", "coarse"),
                                  ("knee segmentation (fine)", "fine"))]
    if seg_source.endswith(KNEE_SEGMENTER.replace(":", ".")):
        return [model_info("knee-seg-coarse", "knee region (coarse)"),
                model_info("knee-seg-fine", "knee segmentation (fine)")]
    return [ModelInfo("knee segmentation", seg_source, "a segmenter passed in by the caller",
                      "not a shipped model: its validation is the caller's")]


class OutputExistsError(MskMriError):
    """``--out DIR`` exists and ``--overwrite`` was not given (or DIR is not ours to replace)."""


def check_out_dir(out_dir: str | os.PathLike[str], *, overwrite: bool, manifest: str,
                  is_ours: Callable[[dict[str, Any]], bool]) -> None:
    """The rule for an analysis output folder, checked before any work is done.

    - ``out_dir`` absent: fine (it is created atomically at the end);
    - it exists and ``overwrite`` is False: refused, the message names ``--overwrite``;
    - it exists and ``overwrite`` is True: replaced (atomically, at the end) only when it is
      an empty folder or an earlier analysis (its ``manifest`` passes ``is_ours``); any other
      folder is refused even then, so ``--overwrite --out ~`` cannot delete a home folder.

    Parameters
    ----------
    out_dir : path-like
    overwrite : bool
        ``--overwrite`` was given.
    manifest : str
        Name of the manifest file an earlier analysis left in the folder.
    is_ours : callable
        Tells from the parsed manifest whether the folder is an earlier analysis.

    Raises
    ------
    OutputExistsError
    """
    out = Path(out_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputExistsError(f"--out {out} exists and is not a folder; give a new folder")
    if not overwrite:
        raise OutputExistsError(f"--out {out} already exists; give a new folder, or pass "
                                "--overwrite to replace it")
    if not any(out.iterdir()):
        return
    try:
        doc = json.loads((out / manifest).read_text(encoding="utf-8"))
        ours = isinstance(doc, dict) and bool(is_ours(doc))
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise OutputExistsError(f"--out {out} exists and is not an earlier mskmri analysis (no "
                                f"{manifest}); --overwrite replaces only earlier analyses: give "
                                "a new folder or remove it yourself")


@dataclass(frozen=True)
class ReportContext:
    """What every analysis report shows beside its measurements (built by :func:`report_context`).

    Attributes
    ----------
    study : StudySummary
    qc : list of QcCheck
    inputs : dict
        Role -> size and SHA-256 (:func:`mskmri.report.study.input_checksums`).
    versions : dict of str to str
    models : list of ModelInfo
    """

    study: Any
    qc: list[Any]
    inputs: dict[str, dict[str, Any]]
    versions: dict[str, str]
    models: list[Any]

    def qc_warnings(self) -> list[str]:
        """QC findings with status "warning", worded for the warnings list."""
        from mskmri.report.qc import qc_warnings

        return qc_warnings(self.qc)

    def report_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`mskmri.report.html.render_report`."""
        return {"study": self.study, "qc": self.qc, "inputs": self.inputs,
                "versions": self.versions, "models": self.models}


def report_context(image: Volume, image_path: str | os.PathLike[str],
                   segmentation: LabelVolume | None, *, anatomy: str,
                   seg_path: str | os.PathLike[str] | None = None,
                   other_inputs: dict[str, str | os.PathLike[str] | None] | None = None,
                   models: Sequence[Any] = (), include_phi: bool = False) -> ReportContext:
    """Study summary, quality checks, input checksums, versions and models of one analysis.

    Parameters
    ----------
    image : Volume
        The input image (its DICOM header, when it has one, gives the study rows).
    image_path : path-like
        As given on the command line.
    segmentation : LabelVolume, optional
        The label map (its ``meta["confidence"]``, when a segmenter gave one, is checked).
    anatomy : {"knee", "spine"}
    seg_path : path-like, optional
        ``--seg``: the label map was given, not made by a model.
    other_inputs : dict, optional
        Further inputs by role (``{"lesions": path}``), checksummed too.
    models : sequence of ModelInfo
        Models used (a given label map is added as one).
    include_phi : bool
        Show patient identifiers from the DICOM header.
    """
    from mskmri.report.html import ModelInfo
    from mskmri.report.qc import run_checks
    from mskmri.report.study import input_checksums, study_summary

    study = study_summary(image, include_phi=include_phi, description=Path(image_path).name)
    qc = run_checks(image, segmentation, anatomy=anatomy, seg_given=seg_path is not None)
    roles: dict[str, tuple[Any, Volume | None]] = {"image": (image_path, image)}
    if seg_path is not None:
        roles["segmentation"] = (seg_path, None)
    for role, path in (other_inputs or {}).items():
        roles[role] = (path, None)
    inputs = input_checksums(roles)
    model_list = list(models)
    if seg_path is not None:
        rec = inputs["segmentation"]
        model_list.insert(0, ModelInfo(
            f"{anatomy} segmentation", "label map given with --seg",
            f"{Path(seg_path).name}, sha256 {rec['sha256'][:16]}…",
            "made outside this run: its quality is the user's responsibility"))
    return ReportContext(study, qc, inputs, versions(), model_list)


def qc_figures(image: Volume, seg: LabelVolume, context: ReportContext) -> list[Any]:
    """Overlays through each place a quality check points at (e.g. a low-confidence region)."""
    from mskmri.report.figures import ReportFigure, overlay_figure

    figures = []
    for check in context.qc:
        if check.status == "warning" and check.centre_mm is not None:
            figures.append(ReportFigure(
                title=f"Quality check: {check.name.lower()}",
                png=overlay_figure(image, seg, centre_mm=check.centre_mm, plain_row=True),
                caption=f"Slices through the place this check points at: {check.detail}."))
    return figures


def write_pdf(out_tmp: Path, *, pdf: bool) -> list[str]:
    """``report.pdf`` from the report in ``out_tmp`` when ``pdf`` (headless Chromium)."""
    if not pdf:
        return []
    from mskmri.report.pdf import html_to_pdf

    html_to_pdf(out_tmp / REPORT_FILE, out_tmp / PDF_FILE)
    return [PDF_FILE]


def lesion_table_section(seg: LabelVolume, lesions: LabelVolume) -> Any:
    """The report's per-lesion table: one row per 26-connected lesion component.

    Columns: lesion number, bone (the knee bone holding most of its voxels, as in
    :func:`mskmri.measure.knee.lesion_volumes_by_bone`), volume (mL), voxels, and the
    centroid (RAS+, mm).

    Parameters
    ----------
    seg : LabelVolume
        (I, J, K) knee label map.
    lesions : LabelVolume
        (I, J, K) lesion mask on the same grid (1 = bone marrow lesion).

    Returns
    -------
    ReportSection
    """
    import cc3d
    import numpy as np

    from mskmri.labels import KNEE, KNEE_ID
    from mskmri.measure.knee import LESION_BONES
    from mskmri.report.html import ReportSection, ReportTable

    bone_values = [KNEE_ID[b] for b in LESION_BONES]
    mask = np.asarray(lesions.array) > 0
    comp = cc3d.connected_components(mask.astype(np.uint8), connectivity=26)
    n = int(comp.max())
    vox_ml = lesions.voxel_volume_mm3 / 1000.0
    labels = np.asarray(seg.array)
    rows: list[list[Any]] = []
    for k in range(1, min(n, MAX_LESION_ROWS) + 1):
        where = comp == k
        idx = np.argwhere(where)
        under = labels[where]
        bones = [(int(np.count_nonzero(under == v)), -v) for v in bone_values]
        count, neg = max(bones)
        bone = KNEE.get(-neg, "?") if count > 0 else "outside the bones"
        centre = lesions.voxel_to_world(idx.mean(axis=0)[None])[0]
        rows.append([k, bone.replace("_", " "), float(len(idx) * vox_ml), len(idx),
                     ", ".join(f"{c:.1f}" for c in centre)])
    paragraphs = [f"{n} lesion{'s' if n != 1 else ''} (26-connected components of the lesion "
                  "mask); each is assigned to the bone holding most of its voxels."]
    if n > MAX_LESION_ROWS:
        paragraphs.append(f"The {MAX_LESION_ROWS} first of {n} lesions are listed; "
                          "lesions.nii.gz holds them all.")
    if n == 0:
        return ReportSection(id="lesions", title="Lesions",
                             paragraphs=["The lesion mask is empty: no lesion."])
    return ReportSection(id="lesions", title="Lesions", paragraphs=paragraphs, tables=[
        ReportTable(["Lesion", "Bone", "Volume (mL)", "Voxels", "Centroid (RAS, mm)"], rows,
                    numeric_columns=(0, 2, 3))])


def knee_not_measured(seg: LabelVolume, document: dict[str, Any],
                      lesions: LabelVolume | None, *, meshes: bool = True
                      ) -> list[tuple[str, str]]:
    """(what, why) for the knee measurements this analysis could not make.

    A structure of the knee schema absent from the label map has no volume; without a lesion
    mask there are no lesion volumes. Measurements present with no value carry their own
    reason in the table and are not repeated here.
    """
    from mskmri.labels import KNEE

    present = set(seg.present_values())
    absent = [name.replace("_", " ") for v, name in KNEE.items() if v and v not in present]
    out: list[tuple[str, str]] = []
    if absent:
        out.append((f"Volume of: {', '.join(absent)}", "not in the label map"))
    if lesions is None:
        out.append(("Bone marrow lesions (volume, count per bone)",
                    "no lesion mask was given (--lesions MASK)"))
    if not meshes:
        out.append(("3-D views and meshes", "not made: --no-meshes was given"))
    return out


#: Methods of ``analyze knee --detect-bml``.
BML_METHODS: Final = ("inpaint", "mkd")


def _detect_lesions(image: Volume, seg: LabelVolume, method: str
                    ) -> tuple[LabelVolume, list[str], dict[str, Any]]:
    """Femoral BMLs by ``method`` on the analysis' own segmentation: mask, warnings, record."""
    if method == "mkd":
        from mskmri.anomaly.mkd import detect_bml_mkd

        res = detect_bml_mkd(image, seg)
    else:
        from mskmri.anomaly.inpaint import detect_bml as detect_inpaint

        res = detect_inpaint(image, seg)
    return res.mask, list(res.warnings), {"method": method, **res.record}


def analyze_knee(
    image_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    seg_path: str | os.PathLike[str] | None = None,
    lesions_path: str | os.PathLike[str] | None = None,
    segmenter: Segmenter | None = None,
    series: str | None = None,
    echo: float | None = None,
    allow_resample: bool = False,
    meshes: bool = True,
    command: str | None = None,
    overwrite: bool = False,
    include_phi: bool = False,
    pdf: bool = False,
    detect_bml: str | None = None,
    model: str | None = None,
    device: str = "cpu",
    tta: str | None = None,
) -> AnalysisResult:
    """Segment (or take a segmentation), measure, mesh, render and report one knee.

    Parameters
    ----------
    image_path : path-like
        The knee image: DICOM folder, NIfTI, NRRD or MHA, any orientation.
    out_dir : path-like
        Folder to create (see the module docstring for its contents). An existing folder is
        replaced only when empty or a previous analysis.
    seg_path : path-like, optional
        Knee label map (project knee schema) on the image's grid. When None, ``segmenter``
        (or :func:`default_knee_segmenter`) makes it.
    lesions_path : path-like, optional
        Bone marrow lesion mask (1 = lesion) on the image's grid.
    segmenter : callable, optional
        ``f(image: Volume) -> LabelVolume`` (knee schema, image grid); ignored with
        ``seg_path``.
    series, echo, allow_resample
        Choosing one image from a DICOM folder (see :func:`mskmri.io.read`).
    meshes : bool
        Write meshes and 3-D views (``False`` skips both).
    command : str, optional
        The command line, recorded in the manifest and the report.
    overwrite : bool
        Replace an existing ``out_dir`` (an earlier analysis or an empty folder only; see
        :func:`check_out_dir`). Without it an existing ``out_dir`` is refused.
    include_phi : bool
        Show patient identifiers from the DICOM header in the report (default: left out).
    pdf : bool
        Also write ``report.pdf`` (needs a headless Chromium; checked before any work).
    detect_bml : {"inpaint", "mkd"}, optional
        Detect femoral bone marrow lesions with this method
        (:func:`mskmri.anomaly.inpaint.detect_bml` or :func:`mskmri.anomaly.mkd.detect_bml_mkd`,
        femur from the segmentation) and report them as the lesion mask; its warnings and
        record go into the outputs. Not together with ``lesions_path``.
    model : str, optional
        Settings of the default segmenter (not with ``segmenter``; unused with ``seg_path``):
        ``"knee-seg"`` or None for the shipped pair, or a ``mskmri train knee-seg`` output
        folder holding ``knee-seg-coarse``/``knee-seg-fine`` weight files
        (:func:`mskmri.segment.knee.knee_model_pair`).
    device : str
        torch device of the default segmenter.
    tta : {"flip", "none"}, optional
        Test-time augmentation of the default segmenter (None: its default, ``"flip"``).

    Returns
    -------
    AnalysisResult

    Raises
    ------
    MskMriError
        Bad input (2-D image, no geometry, labels outside the knee schema, a label map on
        another grid, no segmentation available), an existing ``out_dir`` without
        ``overwrite``, ``pdf`` without Chromium; nothing is written.
    """
    from mskmri import __version__
    from mskmri.io import atomic_path, atomic_write_json, read, write
    from mskmri.measure.base import describe_input, measurements_document, write_measurements
    from mskmri.measure.knee import measure_knee_with_warnings
    from mskmri.report.figures import write_png
    from mskmri.report.html import ReportSection, write_report

    out = Path(out_dir)
    check_out_dir(out, overwrite=overwrite, manifest=MANIFEST_FILE,
                  is_ours=lambda doc: doc.get("kind") == MANIFEST_KIND)
    if detect_bml is not None and detect_bml not in BML_METHODS:
        raise MskMriError(f"--detect-bml {detect_bml!r} is not a method; use "
                          f"{' or '.join(BML_METHODS)}")
    custom = model not in (None, "knee-seg") or device != "cpu" or tta is not None
    if segmenter is not None and custom:
        raise MskMriError("model, device and tta set the default knee segmenter; give them "
                          "or a segmenter, not both")
    if seg_path is not None and custom:
        raise MskMriError(f"--seg {seg_path} with --model, --device or --tta: the knee is not "
                          "segmented when a label map is given; drop one of them")
    configured = (_configured_segmenter(default_knee_segmenter(), model, device, tta)
                  if custom else None)
    if detect_bml is not None and lesions_path is not None:
        raise MskMriError(f"--detect-bml {detect_bml} with --lesions {lesions_path}: give a "
                          "lesion mask or detect lesions, not both")
    if pdf:
        from mskmri.report.pdf import require_chromium

        require_chromium()
    timer = StepTimer()
    with timer.step("read", f"reading {image_path}"):
        image = read(image_path, series=series, echo=echo, allow_resample=allow_resample)
        image.require_3d("knee analysis")
        image.require_geometry("knee analysis (volumes in mL, thickness in mm)")
        seg: LabelVolume | None = None
        if seg_path is not None:
            seg = _read_segmentation(seg_path, image)
        lesions = _read_lesions(lesions_path, image) if lesions_path is not None else None
    if seg is None:
        seg_fn = segmenter or configured or default_knee_segmenter()
        with timer.step("segment", "segmenting the knee"):
            try:
                seg = _segment(image, seg_fn)
            except ModelError as exc:
                if segmenter is not None or model not in (None, "knee-seg"):
                    raise
                raise ModelError(
                    f"{exc}; the knee model is not available in this installation: segment "
                    "the image elsewhere and pass the label map with --seg SEG (knee schema, "
                    "on the image's grid)"
                ) from exc
        fn = getattr(seg_fn, "func", seg_fn)  # a configured default segmenter is a partial
        seg_source = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', fn)}"
        models = _knee_models(seg_fn, seg_source)
    else:
        seg_source = str(seg_path)
        models = []
    if not seg.labels:
        from mskmri.labels import KNEE

        seg.labels = dict(KNEE)
    bml_warnings: list[str] = []
    bml_record: dict[str, Any] | None = None
    if detect_bml is not None:
        from mskmri.report.html import model_info

        with timer.step("detect_bml", f"detecting bone marrow lesions ({detect_bml})"):
            lesions, bml_warnings, bml_record = _detect_lesions(image, seg, detect_bml)
        name = "bml-mkd" if detect_bml == "mkd" else "bml-inpaint"
        models = [*models, model_info(name, f"bone marrow lesions ({detect_bml})")]

    with timer.step("measure", "measuring"):
        ms, warnings = measure_knee_with_warnings(seg, image=image, lesions=lesions)
        # a segmenter reports doubts about its input (no knee found, odd contrast) here
        warnings = [*(str(w) for w in seg.meta.get("warnings") or ()), *bml_warnings,
                    *warnings]
        context = report_context(image, image_path, seg, anatomy="knee", seg_path=seg_path,
                                 other_inputs={"lesions": lesions_path}, models=models,
                                 include_phi=include_phi)
        warnings += [w for w in context.qc_warnings() if w not in warnings]
        info = describe_input(seg, SEGMENTATION_FILE)
        info.update(anatomy="knee", image=str(image_path), segmentation_source=seg_source,
                    lesions=str(lesions_path) if lesions_path is not None else None)
        if bml_record is not None:
            info.update(lesions=f"detected ({detect_bml})", bml_detection=bml_record)
        if seg_path is None:  # the segmenter's record: models, region, post-processing
            record = {k: seg.meta[k] for k in SEGMENTATION_RECORD_KEYS if k in seg.meta}
            if record:
                info["segmentation_record"] = record

    mesh_list: list[Any] = []
    sections: list[ReportSection] = []
    with atomic_path(out) as tmp:
        tmp.mkdir()
        if meshes:
            from mskmri.report.mesh import (
                MESH_VOXEL_MM,
                block_factors,
                structure_meshes,
                write_meshes,
            )
            from mskmri.report.views import (
                HIDDEN_STRUCTURES,
                display_factors,
                render_knee_views,
                surfaces_section,
            )

            with timer.step("meshes", "building surface meshes"):
                mesh_list = structure_meshes(
                    seg, downsample=block_factors(seg.spacing, MESH_VOXEL_MM))
                write_meshes(mesh_list, tmp / MESHES_DIR)
            with timer.step("views", "rendering 3-D views"):
                # at display resolution already: reuse the meshes instead of building lighter ones
                shown = ([m for m in mesh_list if m.name not in HIDDEN_STRUCTURES]
                         if display_factors(seg) == block_factors(seg.spacing, MESH_VOXEL_MM)
                         else None)
                per_view, combined, views = render_knee_views(seg, meshes=shown)
                (tmp / VIEWS_DIR).mkdir()
                for name, png in per_view.items():
                    write_png(tmp / VIEWS_DIR / f"{name}.png", png)
            sections.append(surfaces_section(combined, views, mesh_list, mesh_dir=MESHES_DIR))
        document = measurements_document(ms, input_info=info, tool_version=__version__,
                                         warnings=warnings)
        with timer.step("write", "writing segmentation and measurements"):
            write(seg, tmp / SEGMENTATION_FILE)
            if lesions is not None:
                write(lesions, tmp / LESIONS_FILE)
            write_measurements(tmp / MEASUREMENTS_FILE, document)
            from mskmri.report.dicom_out import write_dicom_outputs  # DICOM input only

            warnings += write_dicom_outputs(image, seg, document, tmp, lesions=lesions).warnings
        with timer.step("report", "drawing overlays and writing the report"):
            figures = [*_overlay_figures(image, seg, lesions), *qc_figures(image, seg, context)]
            if lesions is not None:
                sections.insert(0, lesion_table_section(seg, lesions))
            options = {"seg": str(seg_path) if seg_path is not None else None,
                       "lesions": str(lesions_path) if lesions_path is not None else None,
                       "detect_bml": detect_bml, "meshes": meshes}
            write_report(
                tmp / REPORT_FILE,
                title="mskmri knee analysis",
                subtitle=Path(str(image.meta.get("source", image_path))).name,
                image=image, segmentation=seg, measurements=document["measurements"],
                figures=figures, warnings=warnings, sections=sections,
                provenance={"command": command or f"analyze_knee({str(image_path)!r})",
                            "segmentation": seg_source, **options},
                not_measured=knee_not_measured(seg, document, lesions, meshes=meshes),
                methods=KNEE_METHODS, **context.report_kwargs(),
            )
            write_pdf(tmp, pdf=pdf)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        timings = {**timer.timings, "total": timer.total()}
        manifest = {
            "schema": MANIFEST_SCHEMA,
            "kind": MANIFEST_KIND,
            "command": command,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "inputs": {"image": str(image_path), **options},
            "input_checksums": context.inputs,
            "segmentation_source": seg_source,
            "versions": versions(),
            "platform": platform.platform(terse=True),
            "timings_s": timings,
            "outputs": {name: file_record(tmp / name) for name in files},
        }
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
    log.info("analysis written to %s in %.1f s; open %s", out, timings["total"],
             out / REPORT_FILE)
    if warnings:
        log.warning("%d warning(s); see %s", len(warnings), out / MEASUREMENTS_FILE)
    return AnalysisResult(out_dir=out, files=[*files, MANIFEST_FILE], measurements=document,
                          warnings=list(warnings), timings_s=timings)


#: Version tag of ``surfaces.json`` (what :func:`write_surfaces` wrote).
SURFACES_SCHEMA: Final = "mskmri/surfaces/1"
SURFACES_FILE: Final = "surfaces.json"


def write_surfaces(
    seg_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, views: bool = True
) -> list[Path]:
    """Meshes (and 3-D views) of a knee label map file, into a folder, atomically.

    ``out_dir`` gets ``<structure>.stl`` and ``<structure>.ply`` (LPS mm, see
    :mod:`mskmri.report.mesh`), ``views/<view>.png`` when ``views``, and ``surfaces.json``
    (``mskmri/surfaces/1``: the coordinate system, the source, and per mesh its triangle
    count, volume in mL and area in mm^2). An existing ``out_dir`` is replaced only when it is
    empty or holds a ``surfaces.json``.

    Parameters
    ----------
    seg_path : path-like
        Knee label map (project knee schema) with known geometry.
    out_dir : path-like
        Folder to create.
    views : bool
        Also render the anterior/lateral/medial views.

    Returns
    -------
    list of Path
        The files written (final paths).
    """
    from mskmri.io import atomic_path, atomic_write_json
    from mskmri.report.figures import write_png
    from mskmri.report.mesh import (
        FILE_SPACE,
        MESH_VOXEL_MM,
        block_factors,
        mesh_summary,
        structure_meshes,
        write_meshes,
    )
    from mskmri.report.views import render_knee_views

    out = Path(out_dir)
    check_surfaces_dir(out)
    seg = _read_segmentation_alone(seg_path)
    meshes = structure_meshes(seg, downsample=block_factors(seg.spacing, MESH_VOXEL_MM))
    with atomic_path(out) as tmp:
        tmp.mkdir()
        write_meshes(meshes, tmp)
        if views:
            per_view, _, _ = render_knee_views(seg)
            (tmp / VIEWS_DIR).mkdir()
            for name, png in per_view.items():
                write_png(tmp / VIEWS_DIR / f"{name}.png", png)
        atomic_write_json(tmp / SURFACES_FILE, {
            "schema": SURFACES_SCHEMA, "space": FILE_SPACE, "units": "mm",
            "source": str(seg_path), "meshes": mesh_summary(meshes),
        })
        files = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file())
    log.info("wrote %d meshes to %s", len(meshes), out)
    return [out / f for f in files]


def check_surfaces_dir(out_dir: str | os.PathLike[str]) -> None:
    """Raise :class:`MskMriError` unless ``out_dir`` is new, empty or a previous mesh folder."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / SURFACES_FILE).is_file())):
        raise MskMriError(f"{out} exists and is not a previous mesh folder (no {SURFACES_FILE}); "
                          "give a new folder or remove it first")


def _read_segmentation_alone(path: str | os.PathLike[str]) -> LabelVolume:
    from mskmri.io import read_labels
    from mskmri.measure.knee import check_knee_labels

    seg = read_labels(path, schema="knee", strict=False)
    seg.require_geometry("meshes in world millimetres")
    check_knee_labels(seg)
    return seg


#: anatomy -> analysis function (the CLI reads its choices from here).
ANALYSES: dict[str, Callable[..., AnalysisResult]] = {"knee": analyze_knee}

__all__ = [
    "ANALYSES",
    "KNEE_SEGMENTER",
    "AnalysisResult",
    "Segmenter",
    "analyze_knee",
    "check_surfaces_dir",
    "default_knee_segmenter",
    "write_surfaces",
]
