"""``mskmri analyze spine IMAGE --out DIR [--seg SEG]``: segmentation, measurements, report.

Steps: read the image; segment the vertebral bodies, discs, cord and CSF
(:func:`mskmri.segment.spine.segment_spine`) unless a label map is given with ``--seg``;
measure it with
:func:`mskmri.measure.spine.analyse_spine` (the ``mskmri/measurements/1`` contract); write
``segmentation.nii.gz`` (+ sidecar), ``measurements.json``, ``spine_measurements.png`` (the
measurements drawn on the image), ``report.html`` (warnings, study without patient
identifiers unless ``--include-phi``, quality checks, drawing, overlays, 3-D views, table,
what was not measured, methods and models, provenance), ``report.pdf`` with ``--pdf``,
``segmentation.dcm`` (DICOM SEG) and ``measurements_sr.dcm`` (DICOM SR, TID 1500) for DICOM
input (:mod:`mskmri.report.dicom_out`), and ``analysis.json`` (command, versions, timings, input checksums, files with sha256). DIR must
not exist unless ``--overwrite`` (:func:`mskmri.analyze.check_out_dir`). DIR is written
atomically: everything goes to a temporary folder that is renamed to DIR at the end, so a
failure leaves no partial output (and a previous analysis in DIR stays as it was).

Fracture grades (RHLV per section and Genant grade, :mod:`mskmri.measure.grading`) are made
for every vertebra with a neighbour above and below (:func:`mskmri.anomaly.vertebra_inpaint.grade_spine`).
Measurement families the analysis cannot make (no cord, no discs, no fracture grade) are
listed in the report as not measured, with the reason (:func:`spine_not_measured`).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mskmri._provenance import file_record
from mskmri.analyze import check_out_dir, qc_figures, report_context, write_pdf
from mskmri.errors import GeometryError

log = logging.getLogger(__name__)

#: Files written into DIR.
SEGMENTATION_FILE = "segmentation.nii.gz"
MEASUREMENTS_FILE = "measurements.json"
REPORT_FILE = "report.html"
DRAWING_FILE = "spine_measurements.png"
MANIFEST_FILE = "analysis.json"
#: Manifest schema and kind (an existing DIR is replaced only when it holds such a manifest).
MANIFEST_SCHEMA = "mskmri/analysis/1"
MANIFEST_KIND = "spine"


#: The methods section of the spine report.
SPINE_METHODS: tuple[str, ...] = (
    "Segmentation: vertebral bodies by level (VerSe ids), intervertebral discs (100 + id of the "
    "body above), spinal cord (201) and CSF/canal (202) from the shipped 2-D U-Net on the "
    "sagittal slices (bone probabilities averaged with the bodies-only model outside the neck), "
    "or given with --seg; levels from anatomy where it can be told (the sacrum; C2 as the top "
    "body at least 1.4x the median height with no disc above it), otherwise ordinal ids from "
    "1000 (named V1000, V1001, ...).",
    "Fracture grade: each vertebra with a neighbour above and below is painted from its "
    "neighbours (shape inpainting, vertebra-inpaint) to get its pre-fracture shape; relative "
    "height loss (RHLV) per section = (pseudo-healthy - observed) / pseudo-healthy height; "
    "Genant grade 0-3 by a linear SVM on the three RHLVs (trained on rendered fractures).",
    "Heights (mm): in each body's mid-sagittal plane, along the body's own superior-inferior "
    "axis, at 85%, 50% and 15% of its anterior-posterior depth counted from the posterior edge "
    "(anterior, middle, posterior); wedge ratio = anterior / posterior height.",
    "Endplates and angles (deg): a line fitted to each endplate; the Cobb angle between the "
    "superior endplate of the upper and the inferior endplate of the lower vertebra.",
    "Lines are drawn on the image in each body's own plane and projected onto the shown slice.",
)
#: Measurement names of each family the spine analysis reports (for the "Not measured" list).
SPINE_FAMILIES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("Vertebral body heights and wedge ratios", ("middle_height",), "vertebra"),
    ("Disc heights and angles", ("disc_height", "disc_angle"), "disc"),
    ("Spinal cord: MSCC, cord area, T2-MI, RSCI, K-line",
     ("mscc", "cord_area", "cord_t2_mi", "rsci", "k_line"), "cord"),
    ("Fracture grade (Genant)", ("genant_grade", "fracture_grade", "grade"), "grade"),
)


def spine_not_measured(seg: Any, document: dict[str, Any],
                       warnings: list[str]) -> list[tuple[str, str]]:
    """(what, why) for the spine measurement families absent from ``document``.

    Also lists each warning that says "X not measured: why" (e.g. a Cobb angle with a
    missing endplate), so nothing that was not measured looks measured.
    """
    from mskmri.labels import CSF, SPINAL_CORD
    from mskmri.measure.spine import is_disc_value, is_vertebra_value

    names = {str(m.get("name")) for m in document.get("measurements", ())}
    present = set(seg.present_values())
    why_absent = {
        "vertebra": ("no vertebral body in the label map" if not any(
            is_vertebra_value(v) for v in present) else "no vertebral body could be measured"),
        "disc": ("no intervertebral discs in the label map (when segmented here, the "
                 "segmentation sidecar's not_segmented says why)"
                 if not any(is_disc_value(v) for v in present)
                 else "the discs could not be measured (see the warnings)"),
        "cord": ("no spinal cord in the label map" if SPINAL_CORD not in present
                 else "the cord could not be measured (see the warnings)")
        + ("" if CSF in present else "; no CSF/canal label"),
        "grade": ("no vertebra with a neighbour above and below (grading paints a vertebra "
                  "from its neighbours)"),
    }
    out = [(what, why_absent[kind]) for what, prefixes, kind in SPINE_FAMILIES
           if not any(n == p or n.startswith(p) for n in names for p in prefixes)]
    for w in warnings:
        head, sep, tail = w.partition(" not measured")
        if sep and len(head) < 80:
            out.append((head.replace("_", " "), tail.lstrip(": ") or "see the warnings"))
    return out


@dataclass
class SpineAnalysisResult:
    """What :func:`analyze_spine` wrote.

    Attributes
    ----------
    out_dir : Path
    files : dict of str to Path
    document : dict
        The measurements document.
    warnings : list of str
    timings_s : dict of str to float
    """

    out_dir: Path
    files: dict[str, Path]
    document: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)


def _shipped_name(file: str) -> str:
    """Public name of the shipped model stored in weight file ``file`` (else ``file``)."""
    from mskmri.weights import MODELS

    return next((name for name, e in MODELS.items() if e.file == Path(file).name), file)


def report_models(model: str, segmentation: dict[str, Any] | None) -> list[Any]:
    """The report's model rows: the networks that segmented (``segmentation`` is the record of
    :func:`mskmri.segment.spine.segment_spine`, None for a given ``--seg``) and the
    pseudo-healthy vertebra painter of the grading, which runs in every analysis.

    Returns
    -------
    list of mskmri.report.html.ModelInfo
        Main model, its ensemble members (class probabilities averaged), the bodies-only
        partner when it vetoed bone, then the painter.
    """
    from mskmri.anomaly.vertebra_inpaint import DEFAULT_MODEL as PAINTER
    from mskmri.report.html import model_info

    rows = []
    if segmentation is not None:
        rows.append(model_info(model, "vertebral bodies, discs, cord and CSF"))
        for member in segmentation.get("ensemble_members") or []:
            rows.append(model_info(_shipped_name(member["file"]),
                                   f"ensemble member of {model} (class probabilities averaged)"))
        if segmentation.get("bone_ensemble"):
            rows.append(model_info(_shipped_name(segmentation["bone_ensemble"]),
                                   "bone veto (bodies-only partner network)"))
    rows.append(model_info(PAINTER, "pseudo-healthy vertebra (height loss, Genant grade)"))
    return rows


def analyze_spine(image_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                  seg_path: str | os.PathLike[str] | None = None, model: str = "spine-seg",
                  device: str = "cpu", command: str | None = None, overwrite: bool = False,
                  include_phi: bool = False, pdf: bool = False) -> SpineAnalysisResult:
    """Segment (or take ``seg_path``), measure and report a sagittal spine MRI into ``out_dir``.

    Parameters
    ----------
    image_path : path-like
        Sagittal T1/T2 spine MRI (any format :func:`mskmri.io.read` accepts).
    out_dir : path-like
        Folder to create; an existing one is refused unless ``overwrite`` (see
        :func:`mskmri.analyze.check_out_dir`).
    seg_path : path-like, optional
        A spine-schema label map on the image's grid; skips the segmentation.
    model : str
        Segmentation model name or weight file.
    device : str
        torch device of the segmentation.
    command : str, optional
        Command line recorded in the manifest and the report.
    overwrite : bool
        Replace an existing ``out_dir`` (an earlier analysis or an empty folder only).
    include_phi : bool
        Show patient identifiers from the DICOM header in the report (default: left out).
    pdf : bool
        Also write ``report.pdf`` (headless Chromium; checked before any work).

    Returns
    -------
    SpineAnalysisResult

    Raises
    ------
    GeometryError
        Axial-only data (sagittal slices are needed), missing geometry, or a ``--seg`` on
        another grid.
    ModelError
        Segmentation weights missing.
    SegmentationError
        No vertebral body found.
    """
    from mskmri import __version__
    from mskmri.io import atomic_path, atomic_write_json, read, read_labels, write
    from mskmri.io._dispatch import sidecar_path
    from mskmri.measure.base import describe_input, measurements_document, write_measurements
    from mskmri.measure.spine import analyse_spine
    from mskmri.report.figures import ReportFigure, label_centroid_world, overlay_figure
    from mskmri.report.html import write_report
    from mskmri.report.spine_drawing import spine_drawing
    from mskmri.segment._spine_data import slice_axis
    from mskmri.segment.spine import segment_spine

    out = Path(out_dir)
    check_out_dir(out, overwrite=overwrite, manifest=MANIFEST_FILE,
                  is_ours=lambda doc: doc.get("schema") == MANIFEST_SCHEMA)
    if pdf:
        from mskmri.report.pdf import require_chromium

        require_chromium()
    command = command or (f"mskmri analyze spine {image_path} --out {out}"
                          + (f" --seg {seg_path}" if seg_path else ""))
    timings: dict[str, float] = {}
    t = time.perf_counter()
    image = read(image_path)
    slice_axis(image)  # sagittal slices are needed: clear error for axial-only data
    warnings: list[str] = []
    seg_record: dict[str, Any]
    if seg_path is not None:
        seg = read_labels(seg_path, schema="spine", strict=False)
        if not seg.same_geometry(image):
            raise GeometryError(f"--seg {seg_path} is not on the grid of {image_path} (shape "
                                f"{seg.shape} vs {image.shape} or another affine); resample it "
                                "to the image first")
        seg_record = {"source": "given", "path": str(seg_path)}
        timings["read"] = time.perf_counter() - t
    else:
        timings["read"] = time.perf_counter() - t
        t = time.perf_counter()
        res = segment_spine(image, model=model, device=device)
        seg = res.labels
        warnings.extend(res.warnings)
        seg_record = {"source": "mskmri segment spine", **res.sidecar()["segmentation"]}
        timings["segment"] = time.perf_counter() - t
    t = time.perf_counter()
    analysis = analyse_spine(seg, image=image)
    warnings.extend(analysis.warnings)
    from mskmri.anomaly.vertebra_inpaint import grade_spine  # RHLV + Genant (measure.grading)

    grading = grade_spine(seg, device=device)
    analysis.measurements.extend(grading.measurements)
    warnings.extend(w for w in grading.warnings if w not in warnings)
    models = report_models(model, None if seg_path is not None else seg_record)
    context = report_context(image, image_path, seg, anatomy="spine", seg_path=seg_path,
                             models=models, include_phi=include_phi)
    warnings += [w for w in context.qc_warnings() if w not in warnings]
    info = describe_input(seg, Path(seg_path) if seg_path else Path(SEGMENTATION_FILE))
    info.update(anatomy="spine", image=str(image_path), segmentation=seg_record["source"])
    document = measurements_document(analysis.measurements, input_info=info,
                                     tool_version=__version__, warnings=warnings)
    timings["measure"] = time.perf_counter() - t
    if not analysis.vertebrae:
        warnings.append("no vertebral body could be measured")

    with atomic_path(out) as tmp:
        tmp.mkdir()
        t = time.perf_counter()
        write(seg, tmp / SEGMENTATION_FILE, sidecar=False)
        atomic_write_json(sidecar_path(tmp / SEGMENTATION_FILE),
                          {**seg.sidecar(), "segmentation": seg_record})
        write_measurements(tmp / MEASUREMENTS_FILE, document)
        from mskmri.report.dicom_out import write_dicom_outputs  # DICOM input only

        warnings += write_dicom_outputs(image, seg, document, tmp).warnings
        png, caption = spine_drawing(image, seg, analysis)
        (tmp / DRAWING_FILE).write_bytes(png)
        centre = label_centroid_world(seg)
        figures = [
            ReportFigure(title="Measurements drawn on the image", png=png, caption=caption),
            ReportFigure(title="Segmentation overlay",
                         png=overlay_figure(image, seg, centre_mm=centre, plain_row=True),
                         caption="Sagittal, coronal and axial slices through the centre of the "
                                 "labelled bodies: the image (top) and the label map (bottom)."),
            *qc_figures(image, seg, context),
        ]
        from mskmri.report.views import spine_surfaces_section

        surfaces = spine_surfaces_section(seg)
        timings["figures"] = time.perf_counter() - t
        t = time.perf_counter()
        write_report(
            tmp / REPORT_FILE, title="mskmri: spine analysis",
            subtitle=f"{Path(image_path).name}; segmentation: {seg_record['source']}",
            image=image, segmentation=seg, measurements=document["measurements"],
            figures=figures, warnings=warnings,
            provenance={"command": command, "segmentation": json.dumps(seg_record)[:2000]},
            not_measured=spine_not_measured(seg, document, warnings), methods=SPINE_METHODS,
            sections=[surfaces] if surfaces is not None else [],
            **context.report_kwargs())
        write_pdf(tmp, pdf=pdf)
        timings["report"] = time.perf_counter() - t
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {
            "schema": MANIFEST_SCHEMA, "kind": MANIFEST_KIND, "command": command,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "mskmri_version": __version__, "platform": platform.platform(terse=True),
            "segmentation": seg_record, "warnings": warnings,
            "input_checksums": context.inputs, "versions": context.versions,
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "outputs": {n: file_record(tmp / n)
                        for n in files},
        }
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
    paths = {n: out / n for n in [*files, MANIFEST_FILE]}
    log.info("spine analysis written to %s; open %s", out, out / REPORT_FILE)
    return SpineAnalysisResult(out, paths, document, warnings, timings)


__all__ = ["MANIFEST_SCHEMA", "SpineAnalysisResult", "analyze_spine"]
