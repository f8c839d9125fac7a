"""The demo pipeline: a phantom knee, synthesised, measured and reported, with no input at all.

:func:`run_demo` (and ``mskmri demo --out DIR``) does, in order:

1. build a phantom knee label map and bone marrow lesion mask (:func:`mskmri.synth.phantom_knee`);
2. render an MR image from it (:func:`mskmri.synth.render`, DESS or IW fat-suppressed);
3. measure it (:func:`mskmri.measure.knee.measure_knee_with_warnings`);
4. draw slice overlays and 3-D views of the truth labels (:mod:`mskmri.report.views`) and
   write the report (:mod:`mskmri.report`).

Everything goes into a temporary folder beside ``DIR`` that is renamed to ``DIR`` only when
complete, so a failure leaves neither ``DIR`` nor the temporary folder behind. ``DIR`` then holds:

==================  ============================================================
``image.nii.gz``    the synthetic image
``labels.nii.gz``   its truth label map, knee schema (+ ``labels.json`` sidecar)
``lesions.nii.gz``  the lesion mask, 1 = bone marrow lesion (+ ``lesions.json``)
``measurements.json``  ``mskmri/measurements/1``: volumes per structure, lesions per bone
``report.html``     self-contained report: slice overlays, 3-D views, measurements, provenance
``manifest.json``   ``mskmri/manifest/1``: versions, options, seed, synthesis
                    parameters, timings, and the size and SHA-256 of every output
==================  ============================================================

All outputs share the image's geometry (shape and affine). The run is deterministic for a
given seed (the timings and creation date aside).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mskmri._provenance import check_replaceable_dir, file_record, versions
from mskmri._timing import StepTimer
from mskmri.errors import MskMriError

log = logging.getLogger(__name__)

#: Contrasts the demo can render (a subset of what :mod:`mskmri.synth` offers).
DEMO_CONTRASTS: tuple[str, ...] = ("dess", "iw-fs")
#: Contrast used when none is given.
DEFAULT_CONTRAST = "dess"
#: Seed used when none is given (phantom and rendering).
DEFAULT_SEED = 0
#: Version tag of ``manifest.json``.
MANIFEST_SCHEMA = "mskmri/manifest/1"
#: ``manifest.json["kind"]`` of a demo folder; only such a folder is replaced by a new run.
MANIFEST_KIND = "demo"

#: Output file names inside the demo folder.
IMAGE_FILE = "image.nii.gz"
LABELS_FILE = "labels.nii.gz"
LESIONS_FILE = "lesions.nii.gz"
MEASUREMENTS_FILE = "measurements.json"
REPORT_FILE = "report.html"
MANIFEST_FILE = "manifest.json"

#: Knee structures whose centroid the overview slices pass through (the joint line).
OVERVIEW_STRUCTURES: tuple[str, ...] = (
    "femoral_cartilage",
    "medial_tibial_cartilage",
    "lateral_tibial_cartilage",
    "medial_meniscus",
    "lateral_meniscus",
)

#: Voxel size (mm) the 3-D views are meshed at: coarse, to keep the demo fast.
VIEW_VOXEL_MM = 2.5

#: Distributions whose versions go into the manifest.
@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` wrote.

    Attributes
    ----------
    out_dir : Path
        The demo folder.
    files : dict of str to Path
        Output name -> path, for every file in the folder.
    timings_s : dict of str to float
        Wall time of each step in seconds, and ``"total"``.
    measurements : dict
        The ``mskmri/measurements/1`` document that was written.
    """

    out_dir: Path
    files: dict[str, Path]
    timings_s: dict[str, float]
    measurements: dict[str, Any]


def _jsonable(obj: Any) -> Any:
    """Synthesis parameters -> plain JSON (numpy scalars and arrays, tuples, paths)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _largest_lesion_centre(lesions: Any) -> np.ndarray | None:
    """World centre (RAS+, mm) of the largest 26-connected lesion, or None when empty."""
    import cc3d

    comps = cc3d.connected_components((lesions.array > 0).astype(np.uint8), connectivity=26)
    if comps.max() == 0:
        return None
    sizes = np.bincount(comps.ravel())
    sizes[0] = 0
    idx = np.argwhere(comps == int(np.argmax(sizes)))
    return lesions.voxel_to_world(idx.mean(axis=0, keepdims=True))[0]


def run_demo(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = DEFAULT_SEED,
    contrast: str = DEFAULT_CONTRAST,
    command: str | None = None,
) -> DemoResult:
    """Synthesise, measure and report a phantom knee into ``out_dir`` (atomically).

    Parameters
    ----------
    out_dir : path-like
        Folder to create. An existing folder is replaced only when it is empty or a previous
        demo output (it holds a demo ``manifest.json``); anything else is refused.
    seed : int
        Seed of the phantom and of the rendering (recorded in the manifest).
    contrast : str
        One of :data:`DEMO_CONTRASTS`.
    command : str, optional
        The command line that asked for this run, recorded in the manifest and the report.

    Returns
    -------
    DemoResult

    Raises
    ------
    MskMriError
        For an unknown contrast or an ``out_dir`` that must not be replaced.
    """
    from mskmri import __version__
    from mskmri.io import atomic_path, atomic_write_json, write
    from mskmri.labels import KNEE_ID
    from mskmri.measure.base import describe_input, measurements_document, write_measurements
    from mskmri.measure.knee import measure_knee_with_warnings
    from mskmri.report.figures import ReportFigure, label_centroid_world, overlay_figure
    from mskmri.report.html import write_report
    from mskmri.synth.phantom import phantom_knee
    from mskmri.synth.render import render

    if contrast not in DEMO_CONTRASTS:
        raise MskMriError(f"the demo renders {', '.join(DEMO_CONTRASTS)}, not {contrast!r}")
    seed = int(seed)
    out = Path(out_dir)
    check_replaceable_dir(out, manifest=MANIFEST_FILE, what="demo output",
                          is_ours=lambda doc: doc.get("kind") == MANIFEST_KIND)
    command = command or f"mskmri demo --out {out} --seed {seed} --contrast {contrast}"
    timer = StepTimer()
    log.info("mskmri demo: phantom knee, %s contrast, seed %d -> %s", contrast, seed, out)

    with atomic_path(out) as tmp:
        tmp.mkdir()
        with timer.step("phantom", "building the phantom knee label map"):
            truth, truth_lesions = phantom_knee(seed=seed)
        with timer.step("render", f"rendering a {contrast} image"):
            synth = render(truth, contrast=contrast, seed=seed, lesions=truth_lesions)
        image, labels, lesions = synth.image, synth.labels, synth.lesions
        image.meta["source"] = f"synthetic {contrast} image of the phantom knee, seed {seed}"
        with timer.step("measure", "measuring volumes and lesions"):
            measurements, warnings = measure_knee_with_warnings(labels, image=image,
                                                                lesions=lesions)
            info = describe_input(labels, LABELS_FILE)
            info.update(anatomy="knee", image=IMAGE_FILE, lesions=LESIONS_FILE)
            document = measurements_document(measurements, input_info=info,
                                             tool_version=__version__, warnings=warnings)
        with timer.step("write_volumes", "writing image, labels and lesions"):
            write(image, tmp / IMAGE_FILE)
            write(labels, tmp / LABELS_FILE)
            write(lesions, tmp / LESIONS_FILE)
            write_measurements(tmp / MEASUREMENTS_FILE, document)
        with timer.step("figures", "drawing slice overlays"):
            ids = [KNEE_ID[n] for n in OVERVIEW_STRUCTURES]
            centre = label_centroid_world(labels, ids)
            if centre is None:
                centre = label_centroid_world(labels)
            figures = [ReportFigure(
                title="Phantom knee with its label map",
                png=overlay_figure(image, labels, lesions=lesions, centre_mm=centre,
                                   plain_row=True),
                caption="Sagittal, coronal and axial slices through the centre of the "
                        "joint (cartilage and menisci): the image (top) and the truth label "
                        "map over it (bottom), each structure outlined and tinted in its "
                        "colour.",
            )]
            lesion_centre = _largest_lesion_centre(lesions)
            if lesion_centre is not None:
                figures.append(ReportFigure(
                    title="Bone marrow lesion",
                    png=overlay_figure(image, lesions=lesions, centre_mm=lesion_centre,
                                       plain_row=True),
                    caption="Slices through the centre of the largest inserted lesion: the "
                            "image (top) and the lesion mask outlined in magenta (bottom).",
                ))
        with timer.step("views", "rendering 3-D views of the label map"):
            from mskmri.report.views import display_meshes, render_knee_views, surfaces_section

            _, views_png, views = render_knee_views(
                labels, meshes=display_meshes(labels, voxel_mm=VIEW_VOXEL_MM))
            sections = [surfaces_section(views_png, views)]
        options = {"seed": seed, "contrast": contrast}
        with timer.step("report", "writing the report"):
            write_report(
                tmp / REPORT_FILE,
                title="mskmri demo: phantom knee",
                subtitle=f"synthetic {contrast.upper()} image of a phantom knee (no patient "
                         f"data), seed {seed}",
                image=image,
                segmentation=labels,
                measurements=document["measurements"],
                figures=figures,
                warnings=warnings,
                sections=sections,
                provenance={"command": command, **options,
                            "inputs": "none (phantom built from the seed)"},
            )
        files = sorted(p.name for p in tmp.iterdir())
        timings = {**timer.timings, "total": timer.total()}
        manifest: dict[str, Any] = {
            "schema": MANIFEST_SCHEMA,
            "kind": MANIFEST_KIND,
            "command": command,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "options": options,
            "versions": versions(),
            "platform": platform.platform(terse=True),
            "synthesis": {"phantom": _jsonable(truth.meta.get("phantom", {})),
                          "render": _jsonable(synth.params)},
            "timings_s": timings,
            "outputs": {name: file_record(tmp / name) for name in files},
        }
        atomic_write_json(tmp / MANIFEST_FILE, manifest)

    paths = {name: out / name for name in [*files, MANIFEST_FILE]}
    log.info("demo written to %s in %.1f s; open %s", out, timings["total"], out / REPORT_FILE)
    return DemoResult(out_dir=out, files=paths, timings_s=timings, measurements=document)
