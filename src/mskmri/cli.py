"""The ``mskmri`` command line: parse, build a config, call one library function, write.

Each subcommand has an ``_add_<name>`` function that declares its arguments and a ``_run_<name>``
function that does the work; heavy imports happen inside ``_run_*`` only. ``main(argv)`` is
testable in-process and returns the exit status:

- 0 on success;
- 2 for bad input or options: one line on stderr saying what was wrong and what to do, no
  traceback, nothing half-written (outputs are written atomically);
- 1 for anything unexpected (a bug): the traceback is kept;
- 3 from ``cohort`` when some studies failed (the others were analysed; see its
  ``failures.csv``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mskmri import __version__
from mskmri.errors import MskMriError

log = logging.getLogger("mskmri")

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2

Runner = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line (exit 2), like our own errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"mskmri: error: {message} (see `{self.prog} --help`)\n")


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"
                                           if verbose > 1 else "%(message)s"))
    root = logging.getLogger("mskmri")
    root.handlers = [h for h in root.handlers if isinstance(h, logging.NullHandler)]
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _geometry_options(p: argparse.ArgumentParser) -> None:
    """Options for choosing one image out of a DICOM folder."""
    p.add_argument("--series", help="DICOM folder with several series: which one "
                   "(SeriesInstanceUID, SeriesNumber or index from `mskmri info`)")
    p.add_argument("--echo", type=float, help="multi-echo series: echo time in ms "
                   "(or echo number)")
    p.add_argument("--allow-resample", action="store_true",
                   help="resample a DICOM series with non-uniform slice spacing instead of refusing it")


def _read_image(args: argparse.Namespace, path: str | Path) -> Any:
    from mskmri.io import read

    return read(path, series=getattr(args, "series", None), echo=getattr(args, "echo", None),
                allow_resample=getattr(args, "allow_resample", False))


# ============================================================================ info
def _add_info(sub: Any) -> None:
    p = sub.add_parser("info", help="describe an image, label map or DICOM folder")
    p.add_argument("path", help="image file or DICOM folder")
    p.add_argument("--json", action="store_true", help="print JSON (schema mskmri/info/1)")
    _geometry_options(p)
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    """Describe PATH; a DICOM folder lists its series, echoes and stacks."""
    from mskmri.io.describe import describe, format_description

    info = describe(args.path, series=args.series, echo=args.echo,
                    allow_resample=args.allow_resample)
    if args.json:
        _print_json(info)
    else:
        sys.stdout.write(format_description(info) + "\n")
    return EXIT_OK


# ============================================================================ convert
def _add_convert(sub: Any) -> None:
    p = sub.add_parser("convert", help="convert an image (DICOM folder, NIfTI, NRRD, MHA) "
                       "to NIfTI, NRRD or MHA, geometry exact")
    p.add_argument("src", help="input image file or DICOM folder")
    p.add_argument("dst", help="output file (.nii.gz, .nii, .nrrd, .mha)")
    _geometry_options(p)
    p.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    """Read SRC (one series/echo of a DICOM folder, or an image file) and write it to DST.

    The output extension is checked before reading; a label-map sidecar beside SRC is
    carried to DST's sidecar; DST is written atomically (nothing half-written on failure).
    """
    from mskmri.errors import UnsupportedFormatError
    from mskmri.io import atomic_write_json, sidecar_path, write
    from mskmri.io.describe import LABELMAP_SIDECAR_SCHEMA

    dst = Path(args.dst)
    if not dst.name.lower().endswith((".nii.gz", ".nii", ".nrrd", ".mha")):
        raise UnsupportedFormatError(
            f"cannot write {dst.name}: give an output ending in .nii.gz, .nii, .nrrd or .mha"
        )
    vol = _read_image(args, args.src)
    write(vol, dst)
    src = Path(args.src)
    side = sidecar_path(src) if src.is_file() else None
    if side is not None and side.is_file():
        try:
            data = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and data.get("schema") == LABELMAP_SIDECAR_SCHEMA:
            atomic_write_json(sidecar_path(dst), data)
    log.info("wrote %s %s", dst, vol)
    return EXIT_OK


# ============================================================================ demo
def _add_demo(sub: Any) -> None:
    from mskmri.demo import DEFAULT_COHORT_SIZE, DEFAULT_SEED, DEFAULT_WORKERS

    p = sub.add_parser("demo", help="phantom knee and spine through analyze, a small cohort "
                       "on Dask and its statistics; DIR/index.html links it all (no input "
                       "needed)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (created; a previous demo output there is replaced)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"seed of the phantoms and the rendering (default {DEFAULT_SEED})")
    p.add_argument("--cohort-size", type=int, default=DEFAULT_COHORT_SIZE, metavar="N",
                   help=f"knees in the demo cohort, half OA (default {DEFAULT_COHORT_SIZE})")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, metavar="N",
                   help=f"local Dask workers of the cohort (default {DEFAULT_WORKERS})")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from mskmri.demo import run_demo

    command = " ".join(["mskmri", "demo", "--out", str(args.out), "--seed", str(args.seed),
                        "--cohort-size", str(args.cohort_size), "--workers",
                        str(args.workers)])
    run_demo(args.out, seed=args.seed, cohort_size=args.cohort_size, workers=args.workers,
             command=command)
    return EXIT_OK


# ============================================================================ measure
def _add_measure(sub: Any) -> None:
    from mskmri.measure import ANATOMIES

    p = sub.add_parser("measure", help="measure a segmentation (volumes in mL, lesions per "
                       "bone, ...) and write mskmri/measurements/1 JSON")
    # choices come from the registry mskmri.measure.ANATOMIES (spine joins when it exists)
    p.add_argument("anatomy", choices=list(ANATOMIES), help="which anatomy's measurements")
    p.add_argument("seg", metavar="SEG", help="label map in the project's schema for ANATOMY")
    p.add_argument("--image", metavar="IMAGE", help="the image SEG was made from (same grid)")
    p.add_argument("--lesions", metavar="MASK", help="lesion mask on the same grid "
                   "(1 = bone marrow lesion): adds lesion volume and count per bone")
    p.add_argument("--json", dest="json_out", metavar="OUT", required=True,
                   help="output JSON file (written atomically)")
    p.add_argument("--meshes", metavar="DIR", help="knee: also write one mesh per structure "
                   "(STL + PLY, LPS mm for 3D Slicer) and 3-D views (views/*.png) into DIR")
    p.set_defaults(run=_run_measure)


def _run_measure(args: argparse.Namespace) -> int:
    """Measure SEG with the ANATOMY's measurer and write the document atomically."""
    from mskmri.measure import get_measurer, write_measurements

    if getattr(args, "meshes", None):
        if args.anatomy != "knee":
            raise MskMriError(f"--meshes is available for the knee, not {args.anatomy!r}")
        from mskmri.analyze import check_surfaces_dir

        check_surfaces_dir(args.meshes)  # before anything is written
    doc = get_measurer(args.anatomy)(args.seg, image_path=args.image, lesions_path=args.lesions)
    write_measurements(args.json_out, doc)
    log.info("wrote %d measurements to %s", len(doc["measurements"]), args.json_out)
    if getattr(args, "meshes", None):
        from mskmri.analyze import write_surfaces

        write_surfaces(args.seg, args.meshes)
    return EXIT_OK


# ============================================================================ evaluate
def _number_list(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers like 1,2,3, not {text!r}"
            ) from None

    return parse


def _add_evaluate(sub: Any) -> None:
    from mskmri.evaluate.metrics import (
        DEFAULT_SIZE_EDGES_ML,
        LESION_NEIGHBOURHOOD_MM,
        MIN_OVERLAP_FRACTION,
    )

    p = sub.add_parser("evaluate", help="compare a predicted label map with the truth: Dice, "
                       "IoU, HD95/ASSD (mm), volumes (mL), lesion-wise detection")
    p.add_argument("pred", metavar="PRED", help="predicted label map")
    p.add_argument("truth", metavar="TRUTH", help="true label map (its grid is the reference)")
    p.add_argument("--json", dest="json_out", metavar="OUT", required=True,
                   help="output JSON file, schema mskmri/evaluation/1 (written atomically)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--labels", type=_number_list(int), metavar="1,2,3",
                       help="label values to evaluate (default: all present in either map)")
    which.add_argument("--schema", choices=("knee", "spine", "lesion"),
                       help="project label schema: names the values, refuses unknown ones "
                       "(knee/lesion: evaluates every value of the schema)")
    p.add_argument("--lesions", action="store_true",
                   help="add lesion-wise detection (26-connected components) and size strata")
    p.add_argument("--resample", action="store_true",
                   help="resample PRED onto TRUTH's grid (nearest) when the grids differ")
    p.add_argument("--min-overlap", type=float, default=MIN_OVERLAP_FRACTION, metavar="F",
                   help="fraction of a true lesion the prediction must cover to hit it "
                   "(default 0 = any overlap)")
    p.add_argument("--size-strata", type=_number_list(float), metavar="0.1,0.5,2",
                   default=list(DEFAULT_SIZE_EDGES_ML),
                   help="lesion-size strata edges in mL (default 0.1,0.5,2)")
    p.add_argument("--neighbourhood-mm", type=float, default=LESION_NEIGHBOURHOOD_MM,
                   metavar="MM", help="radius of the per-lesion Dice neighbourhood "
                   f"(default {LESION_NEIGHBOURHOOD_MM:g} mm)")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    """Evaluate PRED against TRUTH and write the document atomically."""
    from mskmri.evaluate.document import evaluate_files
    from mskmri.io import atomic_write_json

    doc = evaluate_files(
        args.pred, args.truth, labels=args.labels, schema=args.schema, resample=args.resample,
        lesions=args.lesions, min_overlap_fraction=args.min_overlap,
        size_edges_ml=args.size_strata, neighbourhood_mm=args.neighbourhood_mm,
    )
    atomic_write_json(args.json_out, doc)
    md = doc["summary"].get("mean_dice", {})
    log.info("evaluated %d labels (mean Dice %s); wrote %s", len(doc["labels"]),
             md.get("value"), args.json_out)
    return EXIT_OK


# ============================================================================ stats
def _add_stats(sub: Any) -> None:
    from mskmri.evaluate.stats import ALPHA, DEFAULT_SEED, N_BOOTSTRAP

    p = sub.add_parser("stats", help="compare two groups over many measurements: Welch t, "
                       "Mann-Whitney U, effect sizes with CIs, Holm correction, plots")
    p.add_argument("inputs", nargs="+", metavar="TABLE",
                   help="one CSV table (a row per subject; columns 'name [unit]'), or "
                   "measurements JSON files / folders of them")
    p.add_argument("--group", required=True, metavar="COLUMN",
                   help="group column of the CSV or manifest (for --group-from: its name)")
    p.add_argument("--json", dest="json_out", metavar="OUT", required=True,
                   help="output JSON file, schema mskmri/stats/1 (written atomically)")
    p.add_argument("--plots", metavar="DIR", help="write a box + strip plot per measurement")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--manifest", metavar="CSV",
                     help="JSON input: CSV with columns 'file' and COLUMN")
    src.add_argument("--group-from", choices=("parent",),
                     help="JSON input: the group is the name of each file's folder")
    p.add_argument("--groups", type=lambda t: [x.strip() for x in t.split(",")],
                   metavar="REF,OTHER", help="the two groups, reference first (default: the "
                   "two present, sorted)")
    p.add_argument("--alpha", type=float, default=ALPHA,
                   help=f"family-wise level after Holm correction (default {ALPHA})")
    p.add_argument("--n-bootstrap", type=int, default=N_BOOTSTRAP,
                   help=f"bootstrap resamples for Cliff's delta CIs (default {N_BOOTSTRAP})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"seed of the bootstrap and the plot jitter (default {DEFAULT_SEED})")
    p.set_defaults(run=_run_stats)


def _run_stats(args: argparse.Namespace) -> int:
    """Compare the groups and write the document (and plots) atomically."""
    from mskmri.evaluate.stats import stats_files
    from mskmri.io import atomic_write_json

    doc = stats_files(
        args.inputs, group=args.group, manifest=args.manifest, group_from=args.group_from,
        groups=args.groups, plots_dir=args.plots, alpha=args.alpha,
        n_bootstrap=args.n_bootstrap, seed=args.seed,
    )
    atomic_write_json(args.json_out, doc)
    sig = [m["name"] for m in doc["measurements"] if m["welch_t"]["significant"]]
    log.info("compared %d measurements; Welch significant after Holm: %s; wrote %s",
             len(doc["measurements"]), ", ".join(sig) or "none", args.json_out)
    return EXIT_OK


# ============================================================================ train
def _add_train(sub: Any) -> None:
    """``mskmri train TASK``: subcommands come from the registry of trainable tasks."""
    from mskmri.nn.registry import COMMON_TRAIN_OPTIONS, TRAIN_TASKS

    p = sub.add_parser("train", help="train a model (`mskmri train` lists the tasks)",
                       description="Train a model. Every task is seeded, resumable "
                       "(--resume), logs to OUT/train.log and uses a GPU when one is present; "
                       "under torchrun it trains with DistributedDataParallel.")
    tasks = p.add_subparsers(dest="task", metavar="TASK", parser_class=_Parser)
    for task in TRAIN_TASKS.values():
        tp = tasks.add_parser(task.name, help=task.help, description=task.help)
        for opt in (*COMMON_TRAIN_OPTIONS, *task.options):
            tp.add_argument(*opt.flags, **dict(opt.kwargs))
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    """List the tasks (no TASK given) or build the config and run the task."""
    from mskmri.nn.registry import COMMON_TRAIN_OPTIONS, TRAIN_TASKS, option_dest

    if args.task is None:
        if not TRAIN_TASKS:
            sys.stdout.write("no training tasks are registered yet (each arrives with its "
                             "model: knee-seg, spine-seg, inpaint, mkd, mae, pretrain)\n")
        for task in TRAIN_TASKS.values():
            sys.stdout.write(f"{task.name:12s} {task.help}\n")
        return EXIT_OK
    from mskmri.nn.train import TrainConfig, format_command, run_task

    task = TRAIN_TASKS[args.task]
    common = {option_dest(o) for o in COMMON_TRAIN_OPTIONS}
    given = {k: getattr(args, k) for k in common if getattr(args, k) is not None}
    config = TrainConfig(**{**task.defaults, **given})
    options = {option_dest(o): getattr(args, option_dest(o)) for o in task.options}
    log.info("%s", format_command(task.name, config, options))
    run_task(task.name, config, options)
    return EXIT_OK


# ============================================================================ synth
def _add_synth(sub: Any) -> None:
    p = sub.add_parser("synth", help="render an MR image (and its exact truth) from a label "
                       "map or a phantom")
    p.add_argument("anatomy", choices=["knee"], help="which anatomy (knee)")
    p.add_argument("labels", metavar="LABELS", help="knee label map (OAI lesion map, pymskt, "
                   "SPL atlas, CartiMorph, or the project schema) or the word `phantom`")
    p.add_argument("out", metavar="OUT", help="output folder: image.nii.gz, labels.nii.gz, "
                   "lesions.nii.gz (+ sidecars), synth.json (written atomically)")
    p.add_argument("--contrast", default="dess", help="dess, iw-fs, t2, t1, pd or random "
                   "(default dess)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random step (default 0)")
    p.add_argument("--source", help="label source of LABELS (oai_lesion, pymskt, spl_atlas, "
                   "cartimorph, knee); detected from the file when omitted")
    p.add_argument("--effusion-ml", type=float, help="total joint effusion in mL (default: "
                   "keep the map's own, else drawn at random; 0 = none)")
    p.add_argument("--lesion-ml", type=float, nargs="+", metavar="ML",
                   help="insert one bone marrow lesion per volume given (mL)")
    p.add_argument("--lesion-bone", nargs="+", default=["femur"], metavar="BONE",
                   help="bone of the lesions: femur, tibia or patella (one, or one per lesion)")
    p.add_argument("--inplane", type=int, metavar="N", help="output in-plane matrix (e.g. "
                   "112, 224, 448) over the same field of view; default: the input grid")
    p.add_argument("--no-deform", action="store_true",
                   help="no random affine or elastic deformation (outputs on the input grid)")
    p.set_defaults(run=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from mskmri.synth.output import synth_knee

    folder = synth_knee(
        args.labels, args.out, contrast=args.contrast, seed=args.seed, source=args.source,
        effusion_ml=args.effusion_ml, lesion_ml=args.lesion_ml, lesion_bone=args.lesion_bone,
        inplane=args.inplane, deform=not args.no_deform,
    )
    log.info("wrote %s", folder)
    return EXIT_OK


# ============================================================================ analyze knee
def _run_analyze_knee(args: argparse.Namespace) -> int:
    """``mskmri analyze knee IMAGE --out DIR [--seg SEG] [--lesions MASK]``."""
    import shlex

    from mskmri.analyze import analyze_knee

    parts = ["mskmri", "analyze", "knee", str(args.image), "--out", str(args.out)]
    model = None if args.model == "knee-seg" else args.model
    device = None if args.device == "cpu" else args.device
    for flag, value in (("--seg", args.seg), ("--lesions", getattr(args, "lesions", None)),
                        ("--detect-bml", getattr(args, "detect_bml", None)),
                        ("--model", model), ("--device", device),
                        ("--tta", getattr(args, "tta", None))):
        if value:
            parts += [flag, str(value)]
    parts += [f for f, on in (("--overwrite", getattr(args, "overwrite", False)),
                              ("--include-phi", getattr(args, "include_phi", False)),
                              ("--pdf", getattr(args, "pdf", False))) if on]
    command = " ".join(shlex.quote(p) for p in parts)
    res = analyze_knee(
        args.image, args.out, seg_path=args.seg, lesions_path=getattr(args, "lesions", None),
        series=getattr(args, "series", None), echo=getattr(args, "echo", None),
        allow_resample=getattr(args, "allow_resample", False),
        meshes=not getattr(args, "no_meshes", False), command=command,
        overwrite=getattr(args, "overwrite", False),
        include_phi=getattr(args, "include_phi", False), pdf=getattr(args, "pdf", False),
        detect_bml=getattr(args, "detect_bml", None), model=args.model, device=args.device,
        tta=getattr(args, "tta", None),
    )
    log.info("wrote %d files to %s", len(res.files), res.out_dir)
    return EXIT_OK


# ============================================================================ segment / analyze
# One `segment` and one `analyze` command; each anatomy adds its runner to the tables below
# (spine here; the knee slot is for the knee pipeline: add "knee": _run_segment_knee / ...).
#: Options of ``segment`` / ``analyze`` that only the knee pipeline reads: dest -> flag.
_KNEE_ONLY_OPTIONS: dict[str, str] = {"tta": "--tta", "lesions": "--lesions",
                                      "detect_bml": "--detect-bml", "no_meshes": "--no-meshes"}


def _refuse_knee_only(args: argparse.Namespace) -> None:
    """Raise when a knee-only option was given to a spine command (it would be ignored)."""
    given = [flag for dest, flag in _KNEE_ONLY_OPTIONS.items() if getattr(args, dest, None)]
    if given:
        raise MskMriError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for the "
                          f"knee only; drop {'it' if len(given) == 1 else 'them'} for "
                          f"`{args.command} spine`")


def _run_segment_spine(args: argparse.Namespace) -> int:
    """``mskmri segment spine IMAGE OUT``: vertebral bodies by level, written with a sidecar."""
    from mskmri.segment.spine import segment_spine_file

    _refuse_knee_only(args)
    res = segment_spine_file(args.image, args.out, model=args.model, device=args.device)
    log.info("wrote %s (%d structures; levels: %s)", args.out, len(res.labels.present_values()),
             res.level_source)
    return EXIT_OK


def _run_analyze_spine(args: argparse.Namespace) -> int:
    """``mskmri analyze spine IMAGE --out DIR [--seg SEG]``."""
    import shlex

    from mskmri.analyze_spine import analyze_spine

    _refuse_knee_only(args)
    parts = ["mskmri", "analyze", "spine", str(args.image), "--out", str(args.out)]
    parts += [f"--seg={args.seg}"] if args.seg else []
    parts += [f for f, on in (("--overwrite", getattr(args, "overwrite", False)),
                              ("--include-phi", getattr(args, "include_phi", False)),
                              ("--pdf", getattr(args, "pdf", False))) if on]
    command = " ".join(shlex.quote(p) for p in parts)
    analyze_spine(args.image, args.out, seg_path=args.seg, model=args.model,
                  device=args.device, command=command,
                  overwrite=getattr(args, "overwrite", False),
                  include_phi=getattr(args, "include_phi", False),
                  pdf=getattr(args, "pdf", False))
    return EXIT_OK


# ==== segment knee
def _run_segment_knee(args: argparse.Namespace) -> int:
    """``mskmri segment knee IMAGE OUT``: 17 knee classes, coarse-to-fine, with a sidecar."""
    from mskmri.segment.knee import segment_knee_file

    echo = getattr(args, "echo", None)
    labels = segment_knee_file(args.image, args.out, model=args.model, device=args.device,
                               series=getattr(args, "series", None),
                               echo=int(echo) if echo is not None and echo.is_integer() else echo,
                               **({"tta": args.tta} if args.tta else {}))
    log.info("wrote %s (%d structures)", args.out, len(labels.present_values()))
    for warning in labels.meta.get("warnings", []):
        log.warning("%s", warning)
    return EXIT_OK


#: anatomy -> runner of ``mskmri segment ANATOMY IMAGE OUT``.
_SEGMENT_RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "spine": _run_segment_spine,
    "knee": _run_segment_knee,
}
#: anatomy -> runner of ``mskmri analyze ANATOMY IMAGE --out DIR``.
_ANALYZE_RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "spine": _run_analyze_spine,
    "knee": _run_analyze_knee,
}


def _add_segment(sub: Any) -> None:
    p = sub.add_parser("segment", help="segment an image with a shipped model (spine: "
                       "vertebral bodies by level) and write the label map with its sidecar")
    p.add_argument("anatomy", choices=sorted(_SEGMENT_RUNNERS), help="which anatomy")
    p.add_argument("image", metavar="IMAGE", help="input image (NIfTI, NRRD, MHA, DICOM)")
    p.add_argument("out", metavar="OUT", help="output label map (.nii.gz, ...), on IMAGE's grid")
    p.add_argument("--model", default=None, help="model name or *.safetensors (default: the "
                   "shipped model of ANATOMY, e.g. spine-seg)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--series", default=None, help="DICOM series of IMAGE (folder input)")
    p.add_argument("--echo", type=float, default=None, metavar="TE_MS_OR_NUMBER",
                   help="echo of a multi-echo DICOM series (TE in ms or echo number)")
    p.add_argument("--tta", choices=["flip", "none"], default=None,
                   help="knee: test-time augmentation; flip (default) also runs each network on "
                   "the left-right mirror and averages, none runs each once (about 30%% less "
                   "time, slightly lower Dice: benchmarks/results/knee_segmentation.json)")
    p.set_defaults(run=_run_segment)


def _run_segment(args: argparse.Namespace) -> int:
    if args.model is None:
        args.model = f"{args.anatomy}-seg"
    return _SEGMENT_RUNNERS[args.anatomy](args)


def _add_analyze(sub: Any) -> None:
    p = sub.add_parser("analyze", help="whole pipeline: segmentation, measurements.json and "
                       "an HTML report with the measurements drawn on the image")
    p.add_argument("anatomy", choices=sorted(_ANALYZE_RUNNERS), help="which anatomy")
    p.add_argument("image", metavar="IMAGE", help="input image")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (written "
                   "atomically; must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR when it exists (only "
                   "an earlier analysis or an empty folder), atomically at the end")
    p.add_argument("--include-phi", action="store_true", help="show patient identifiers from "
                   "the DICOM header (name, ID, birth date, accession, institution) in the "
                   "report; left out by default")
    p.add_argument("--pdf", action="store_true", help="also write report.pdf (needs a headless "
                   "Chromium: apt-get install chromium)")
    p.add_argument("--seg", metavar="SEG", help="use this label map (on IMAGE's grid) instead "
                   "of segmenting")
    p.add_argument("--lesions", metavar="MASK", help="knee: bone marrow lesion mask on "
                   "IMAGE's grid (1 = lesion), measured per bone")
    p.add_argument("--detect-bml", choices=["inpaint", "mkd"], default=None,
                   help="knee: detect femoral bone marrow lesions with this method (on a "
                   "fluid-sensitive fat-suppressed image) and report them; not with --lesions")
    p.add_argument("--no-meshes", action="store_true", help="knee: skip meshes and 3-D views")
    p.add_argument("--model", default=None, help="segmentation model: name or *.safetensors "
                   "(spine); knee-seg or a `mskmri train knee-seg` output folder (knee)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--tta", choices=["flip", "none"], default=None,
                   help="knee: test-time augmentation; flip (default) also runs each network on "
                   "the left-right mirror and averages, none runs each once (about 30%% less "
                   "time, slightly lower Dice: benchmarks/results/knee_segmentation.json)")
    p.set_defaults(run=_run_analyze)


def _run_analyze(args: argparse.Namespace) -> int:
    if args.model is None:
        args.model = f"{args.anatomy}-seg"
    return _ANALYZE_RUNNERS[args.anatomy](args)


# ==== cord-hyperintensity
def _add_detect_cord_options(p: argparse.ArgumentParser) -> None:
    """Options of ``mskmri detect cord-hyperintensity`` (ignored by ``detect bml``)."""
    from mskmri.anomaly.mae import ADAPT_STEPS, DEFAULT_ADAPT_STEPS

    p.add_argument("--adapt-steps", type=int, default=DEFAULT_ADAPT_STEPS, metavar="N",
                   help="cord-hyperintensity: uncertainty-guided test-time adaptation steps on "
                   f"this input (default {DEFAULT_ADAPT_STEPS}; U2AD-like: {ADAPT_STEPS}; it "
                   "can learn the input's own lesion, see benchmarks/results/"
                   "cord_hyperintensity.json)")
    p.add_argument("--anomaly", metavar="OUT", help="cord-hyperintensity: write the anomaly "
                   "map |image - mean reconstruction| (eroded cord) here")
    p.add_argument("--seed", type=int, default=0, help="cord-hyperintensity: seed of the random "
                   "maskings (default 0)")


def _run_detect_cord(args: argparse.Namespace) -> int:
    """``mskmri detect cord-hyperintensity IMAGE OUT``: mask, OUT.cord.json, optional maps."""
    from mskmri.anomaly.mae import DEFAULT_MODEL, detect_cord_hyperintensity_file

    res = detect_cord_hyperintensity_file(
        args.image, args.out, seg_path=args.seg, uncertainty_path=args.uncertainty,
        anomaly_path=args.anomaly, table_path=args.table, model=args.model or DEFAULT_MODEL,
        threshold=args.threshold, adapt_steps=args.adapt_steps, seed=args.seed,
        device=args.device)
    log.info("wrote %s (%s): patient %s; positive levels: %s", args.out, res.record["ran_on"],
             "positive" if res.patient["positive"] else "negative",
             ", ".join(res.patient["positive_segments"]) or "none")
    return EXIT_OK


# ==== detect bml
def _add_detect(sub: Any) -> None:
    p = sub.add_parser("detect", help="detect lesions: bml = femoral bone marrow lesions by "
                       "masked inpainting (binary mask on IMAGE's grid + per-lesion table); "
                       "cord-hyperintensity = spinal cord T2 hyperintensity (U2AD)")
    p.add_argument("target", choices=["bml", "cord-hyperintensity"], help="what to detect")
    p.add_argument("image", metavar="IMAGE", help="bml: 3-D knee MRI (sagittal fluid-sensitive "
                   "fat-suppressed is best); cord-hyperintensity: sagittal T2 spine MRI (3-D "
                   "or one 2-D slice)")
    p.add_argument("out", metavar="OUT", help="lesion mask (.nii.gz, ...) on IMAGE's grid; "
                   "OUT's sidecar and OUT.bml.json (record, warnings, lesions) beside it "
                   "(cord-hyperintensity: OUT.cord.json with the per-level table)")
    p.add_argument("--seg", metavar="SEG", help="label map on IMAGE's grid (bml: knee, femur "
                   "= 1; cord-hyperintensity: spine, cord 201, CSF 202); default: segment with "
                   "the shipped model")
    p.add_argument("--method", choices=["inpaint", "mkd"], default="inpaint",
                   help="detector (mkd: multiresolution knowledge distillation baseline, "
                   "teacher = our MRI-pretrained encoder, not ImageNet VGG-16)")
    p.add_argument("--uncertainty", metavar="OUT", help="write the Monte-Carlo spread of the "
                   "paintings (cord-hyperintensity: of the reconstructions) here")
    p.add_argument("--table", metavar="PATH", help="per-lesion (bml) or per-level "
                   "(cord-hyperintensity) table (.csv or .json)")
    p.add_argument("--contrast", default="auto", help="input contrast (iw-fs, pd-fs, t2-fs, "
                   "stir, dess, ...); auto: from the image metadata")
    p.add_argument("--model", help="model name or *.safetensors (default: bml-inpaint, or "
                   "bml-mkd with --method mkd)")
    p.add_argument("--threshold", type=float, help="z threshold (default: calibrated, from "
                   "the model card)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    _add_detect_cord_options(p)
    p.set_defaults(run=_run_detect)


def _run_detect(args: argparse.Namespace) -> int:
    """``mskmri detect bml IMAGE OUT``: lesion mask, record and optional table."""
    if args.target == "cord-hyperintensity":
        return _run_detect_cord(args)
    from mskmri.anomaly.inpaint import detect_bml_file

    if args.method == "mkd":
        from mskmri.anomaly.mkd import DEFAULT_MODEL, detect_bml_mkd_file

        res = detect_bml_mkd_file(args.image, args.out, seg_path=args.seg,
                                  uncertainty_path=args.uncertainty, table_path=args.table,
                                  contrast=args.contrast, model=args.model or DEFAULT_MODEL,
                                  threshold=args.threshold, device=args.device)
    else:
        res = detect_bml_file(args.image, args.out, seg_path=args.seg, method=args.method,
                              uncertainty_path=args.uncertainty, table_path=args.table,
                              contrast=args.contrast, model=args.model or "bml-inpaint",
                              threshold=args.threshold, device=args.device)
    log.info("wrote %s: %d lesion(s), %.3f mL", args.out, len(res.table),
             sum(r["volume_ml"] for r in res.table))
    return EXIT_OK


# ==== cohort
def _add_cohort(sub: Any) -> None:
    from mskmri.cohort import ANATOMIES, DEFAULT_WORKERS, EXIT_SOME_FAILED

    p = sub.add_parser("cohort", help="analyse many studies (a CSV of paths and groups) on "
                       "Dask: resumable, failures isolated, one measurement table",
                       description="Exit status: 0 all studies succeeded, "
                       f"{EXIT_SOME_FAILED} some failed (listed in DIR/failures.csv), 2 bad "
                       "manifest or options.")
    p.add_argument("manifest", metavar="MANIFEST", help="CSV with columns path, group, "
                   "anatomy (knee|spine) and optionally id, seg, lesions, series (knee, DICOM "
                   "folders) and any others (carried into the table)")
    p.add_argument("--out", required=True, metavar="DIR", help="cohort folder (an earlier "
                   "cohort folder is resumed: complete studies are skipped)")
    p.add_argument("--anatomy", choices=ANATOMIES, help="anatomy of rows that name none")
    p.add_argument("--scheduler", metavar="ADDRESS", help="address of a running Dask "
                   "scheduler (e.g. tcp://host:8786); default: a local cluster")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, metavar="N",
                   help=f"local worker processes, one thread each (default {DEFAULT_WORKERS})")
    p.add_argument("--overwrite", action="store_true", help="analyse every study again, "
                   "even those complete from an earlier run")
    p.add_argument("--detect-bml", choices=["inpaint", "mkd"], default=None,
                   help="knee: detect femoral bone marrow lesions with this method (on a "
                   "fluid-sensitive fat-suppressed image) and report them; not with --lesions")
    p.add_argument("--no-meshes", action="store_true", help="knee: skip meshes and 3-D views")
    p.set_defaults(run=_run_cohort)


def _run_cohort(args: argparse.Namespace) -> int:
    """Run the cohort; exit 0 when all studies succeeded, EXIT_SOME_FAILED otherwise."""
    import shlex

    from mskmri.cohort import run_cohort

    command = "mskmri " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] \
        else None
    res = run_cohort(args.manifest, args.out, anatomy=args.anatomy, scheduler=args.scheduler,
                     workers=args.workers, overwrite=args.overwrite,
                     meshes=not args.no_meshes, command=command)
    return res.exit_status


# ==== grade (vertebral fracture grades)
def _add_grade(sub: Any) -> None:
    p = sub.add_parser("grade", help="vertebral fracture grades from a spine label map: "
                       "pseudo-healthy heights, RHLV per section, Genant 0-3 (JSON)")
    p.add_argument("seg", metavar="SEG", help="spine label map (VerSe or ordinal ids; 3-D or "
                   "a sagittal slice)")
    p.add_argument("--json", dest="json_out", metavar="OUT", required=True,
                   help="output mskmri/measurements/1 JSON (written atomically)")
    p.add_argument("--painter", choices=("network", "interpolation"), default="network",
                   help="pseudo-healthy shape from the shipped network (default) or the "
                        "model-free interpolation of the neighbours")
    p.add_argument("--model", default="vertebra-inpaint", help="painter network name or "
                   "*.safetensors (default vertebra-inpaint)")
    p.add_argument("--svm", metavar="JSON", help="SVM coefficients (default: the shipped ones)")
    p.add_argument("--device", default="cpu", help="torch device of the painter")
    p.set_defaults(run=_run_grade)


def _run_grade(args: argparse.Namespace) -> int:
    """``mskmri grade SEG --json OUT``."""
    from mskmri.measure import write_measurements
    from mskmri.measure.grading import GenantSvm, InterpolationPainter, grading_document

    warnings: list[str] = []
    painter: Any
    if args.painter == "network":
        from mskmri.anomaly.vertebra_inpaint import network_painter

        painter = network_painter(args.model, device=args.device)
        warnings += painter.caveats
    else:
        painter = InterpolationPainter()
        if not args.svm:
            warnings.append("the shipped SVM was fitted on the network painter's RHLVs; with "
                            "--painter interpolation its grades are less reliable")
    doc = grading_document(args.seg, painter=painter, classifier=GenantSvm.load(args.svm),
                           warnings=warnings)
    write_measurements(args.json_out, doc)
    log.info("wrote %d measurements to %s", len(doc["measurements"]), args.json_out)
    return EXIT_OK


# ============================================================================ registry
#: (adder) for every subcommand, in help order. Add new commands here.
_COMMANDS: list[Callable[[Any], None]] = [
    _add_info,
    _add_convert,
    _add_demo,
    _add_measure,
    _add_evaluate,
    _add_stats,
    _add_train,
    _add_synth,
    _add_segment,
    _add_analyze,
    _add_detect,
    _add_cohort,
    _add_grade,
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (used by ``main`` and by the docs)."""
    parser = _Parser(prog="mskmri", description="Musculoskeletal MRI toolkit: knee and spine "
                     "segmentation, lesion detection, measurements and reports.")
    parser.add_argument("--version", action="version", version=f"mskmri {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="only warnings and errors; no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input, 1 bug)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    _configure_logging(args.verbose, args.quiet)
    from mskmri import _progress

    if args.quiet:
        _progress.set_enabled(False)
    try:
        return int(args.run(args))
    except MskMriError as exc:
        sys.stderr.write(f"mskmri: error: {exc}\n")
        return EXIT_USAGE
    except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        sys.stderr.write(f"mskmri: error: cannot write or read {exc.filename}: {exc.strerror}; "
                         "check the path and its permissions\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("mskmri: interrupted\n")
        return 130


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
