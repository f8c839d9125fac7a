"""The demo: phantoms in, every pipeline run as a user would, one index page out.

:func:`run_demo` (``mskmri demo --out DIR``, ``make demo``) needs no data at all. In order:

1. **knee**: a phantom knee (:func:`mskmri.synth.phantom.phantom_knee`) rendered as DESS
   (:func:`mskmri.synth.render.render`), then ``analyze knee`` on the image with the
   shipped knee models (:func:`mskmri.analyze.analyze_knee`) into ``DIR/knee``; and, for
   comparison, ``analyze knee --seg --lesions`` with the phantom's truth into
   ``DIR/knee-truth``;
2. **spine**: a phantom lumbar spine (:func:`mskmri.synth.phantom.phantom_spine`), then
   ``analyze spine`` with the shipped spine model (:func:`mskmri.analyze_spine.analyze_spine`)
   into ``DIR/spine``. Should the model find no vertebral body, the phantom's truth is passed
   with ``--seg`` instead and the index says so;
3. **cohort**: ``cohort_size`` small phantom knees, half *normal* and half *OA* (more
   effusion, cartilage x :data:`OA_CARTILAGE_SCALE`, a bone marrow lesion), analysed by
   ``mskmri cohort`` on a local Dask cluster (:func:`mskmri.cohort.run_cohort`) from their
   truth label maps (the manifest's ``seg`` column; said on the index pages) into
   ``DIR/cohort``, then ``mskmri stats`` on its table into ``DIR/cohort/stats.json`` and
   ``DIR/cohort/stats_plots/``;
4. ``DIR/index.html`` links every report, the cohort index and the statistics;
   ``DIR/manifest.json`` (``mskmri/manifest/1``, kind ``demo``) records the command, seed,
   versions and timings.

The phantoms' images and truth are kept under ``DIR/inputs``. A previous demo in ``DIR`` is
replaced: it is moved aside, the new demo is built in ``DIR`` (so every path recorded in the
outputs is the final one), and the old one is deleted only when the new one is complete; on
failure the old demo is put back. Any other non-empty ``DIR`` is refused.
"""

from __future__ import annotations

import csv
import datetime as _dt
import html
import logging
import os
import platform
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from mskmri._provenance import check_replaceable_dir, versions
from mskmri._timing import StepTimer
from mskmri.errors import ModelError, MskMriError

log = logging.getLogger(__name__)

#: Seed used when none is given (phantoms, rendering, group parameters).
DEFAULT_SEED: Final = 0
#: Knees in the demo cohort (half normal, half OA) and local Dask workers.
DEFAULT_COHORT_SIZE: Final = 6
DEFAULT_WORKERS: Final = 2
#: Version tag and kind of ``DIR/manifest.json``; only such a folder is replaced.
MANIFEST_SCHEMA: Final = "mskmri/manifest/1"
MANIFEST_KIND: Final = "demo"
MANIFEST_FILE: Final = "manifest.json"
INDEX_FILE: Final = "index.html"
#: Sub-folders of ``DIR``.
INPUTS_DIR: Final = "inputs"
KNEE_DIR: Final = "knee"
KNEE_TRUTH_DIR: Final = "knee-truth"
SPINE_DIR: Final = "spine"
COHORT_DIR: Final = "cohort"
#: Contrast of the phantom knee images.
KNEE_CONTRAST: Final = "dess"
#: Cohort groups: effusion (mL) range per group, OA cartilage thickness factor, OA lesion (mL).
NORMAL_EFFUSION_ML: Final = (1.5, 5.0)
OA_EFFUSION_ML: Final = (8.0, 20.0)
OA_CARTILAGE_SCALE: Final = 0.7
OA_LESION_ML: Final = (0.5, 3.0)
#: Bootstrap resamples of the demo's statistics (fewer than the default: it is a demo).
STATS_BOOTSTRAP: Final = 500
#: Measurements whose statistics the index shows.
INDEX_STATS: Final = ("volume.joint_effusion", "volume.muscle",
                      "thickness_mean.femoral_cartilage")

#: Said on the index and the cohort page: where the cohort's segmentations come from.
COHORT_NOTE: Final = (
    "Cohort studies are analysed from their phantom truth label maps and lesion masks "
    "(the manifest's seg and lesions columns, i.e. analyze --seg --lesions), not by the "
    "knee model: the shipped knee model is an experimental checkpoint whose labels are not "
    "accurate enough for a group comparison (see its model card). Meshes and 3-D views are "
    "skipped in the cohort to keep the demo short."
)


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` wrote.

    Attributes
    ----------
    out_dir : Path
        The demo folder.
    reports : dict of str to Path
        Name (``knee``, ``knee-truth``, ``spine``, ``cohort``, and ``cohort/<id>``) -> page.
    notes : list of str
        What the index says about how each part was made (fallbacks included).
    timings_s : dict of str to float
        Wall time of each step (s) and ``"total"``.
    stats : dict
        The ``mskmri/stats/1`` document of the cohort.
    """

    out_dir: Path
    reports: dict[str, Path]
    notes: list[str]
    timings_s: dict[str, float]
    stats: dict[str, Any] = field(default_factory=dict)


def _knee_inputs(folder: Path, *, seed: int, effusion_ml: float, lesion_ml: float | None,
                 cartilage_scale: float = 1.0) -> dict[str, Path]:
    """Phantom knee rendered as DESS: image, truth labels and lesion mask written to ``folder``."""
    from mskmri.io import write
    from mskmri.synth.phantom import phantom_knee
    from mskmri.synth.render import render

    truth, lesions = phantom_knee(seed=seed, effusion_ml=effusion_ml, lesion_ml=lesion_ml,
                                  cartilage_scale=cartilage_scale)
    synth = render(truth, contrast=KNEE_CONTRAST, seed=seed, lesions=lesions)
    synth.image.meta["source"] = (f"synthetic {KNEE_CONTRAST.upper()} image of a phantom knee, "
                                  f"seed {seed}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"image": folder / "image.nii.gz", "seg": folder / "truth.nii.gz",
             "lesions": folder / "lesions.nii.gz"}
    write(synth.image, paths["image"])
    write(synth.labels, paths["seg"])
    write(synth.lesions, paths["lesions"])
    return paths


def _cohort_inputs(folder: Path, *, n: int, seed: int) -> Path:
    """``n`` phantom knees (even index normal, odd OA) and their cohort manifest."""
    import numpy as np

    rows = []
    for i in range(n):
        group = "normal" if i % 2 == 0 else "oa"
        rng = np.random.default_rng([seed, i])
        s = seed * 1000 + i + 1
        if group == "normal":
            eff, lesion, scale = float(rng.uniform(*NORMAL_EFFUSION_ML)), None, 1.0
        else:
            eff, scale = float(rng.uniform(*OA_EFFUSION_ML)), OA_CARTILAGE_SCALE
            lesion = float(rng.uniform(*OA_LESION_ML))
        sid = f"{group}{i // 2 + 1:02d}"
        paths = _knee_inputs(folder / sid, seed=s, effusion_ml=eff, lesion_ml=lesion,
                             cartilage_scale=scale)
        rows.append({"id": sid, "path": f"{sid}/{paths['image'].name}", "group": group,
                     "anatomy": "knee", "seg": f"{sid}/{paths['seg'].name}",
                     "lesions": f"{sid}/{paths['lesions'].name}", "seed": s,
                     "effusion_ml_inserted": f"{eff:.3f}"})
    manifest = folder / "cohort.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return manifest


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def write_demo_index(path: Path, *, reports: dict[str, Path], notes: Sequence[str],
                     stats: dict[str, Any], timings_s: dict[str, float], seed: int) -> None:
    """``DIR/index.html``: the reports, the cohort, the statistics and how each was made."""
    from mskmri.io import atomic_write_text

    e = html.escape
    base = path.parent

    def link(name: str, label: str) -> str:
        p = reports.get(name)
        return (f"<a href='{e(p.relative_to(base).as_posix())}'>{e(label)}</a>" if p
                else f"{e(label)} (not made)")

    rows = []
    for m in stats.get("measurements", []):
        if m["name"] not in INDEX_STATS:
            continue
        means = ", ".join(f"{e(g)} {v['mean']:.3g} (n={v['n']})" for g, v in m["groups"].items()
                          if v["mean"] is not None)
        plot = (f"<a href='{COHORT_DIR}/{e(m['plot'])}'>plot</a>" if m.get("plot") else "")
        rows.append(f"<tr><td>{e(m['name'])} [{e(m['unit'])}]</td><td>{means}</td>"
                    f"<td>{e(_fmt_p(m['welch_t'].get('p')))}</td>"
                    f"<td>{e(_fmt_p(m['welch_t']['p_holm']))}</td>"
                    f"<td>{e(_fmt_p(m['mann_whitney_u']['p_holm']))}</td>"
                    f"<td>{'yes' if m['welch_t']['significant'] else 'no'}</td><td>{plot}</td></tr>")
    study_links = " ".join(link(k, k.split("/", 1)[1]) for k in sorted(reports)
                           if k.startswith("cohort/"))
    style = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222}"
             "table{border-collapse:collapse}th,td{border-bottom:1px solid #ddd;padding:.3em .6em;"
             "text-align:left}th{background:#f4f4f4}.note{background:#fff6d6;border-left:4px "
             "solid #d8a300;padding:.5em 1em}")
    page = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>mskmri demo"
        f"</title><style>{style}</style></head><body><h1>mskmri demo</h1>",
        f"<p>Everything here was made from built-in phantoms (seed {seed}); no patient data. "
        f"Total time {timings_s.get('total', 0):.0f} s.</p>",
        "<h2>Single studies</h2><ul>",
        f"<li>{link('knee', 'Knee: analyze knee with the shipped knee models')}</li>",
        f"<li>{link('knee-truth', 'Knee: the same image with the phantom truth (--seg, --lesions)')}"
        "</li>",
        f"<li>{link('spine', 'Spine: analyze spine with the shipped spine model')}</li></ul>",
        *(f"<p class='note'>{e(n)}</p>" for n in notes),
        "<h2>Cohort (Dask) and group statistics</h2>",
        f"<p>{link('cohort', 'Cohort index')} (measurements.csv / .parquet, failures). "
        f"Study reports: {study_links}</p>",
        f"<p>Welch t and Mann-Whitney U between the groups; Holm's correction runs over all "
        f"{len(stats.get('measurements', []))} measurements of the table, so with a few knees "
        "per group even a large difference may not pass it (the 24-knee benchmark, "
        "benchmarks/results/cohort_throughput.json, shows the built-in differences).</p>",
        "<table><thead><tr><th>Measurement</th><th>Group means</th><th>Welch P</th>"
        "<th>Welch P (Holm)</th>"
        "<th>Mann-Whitney P (Holm)</th><th>Differs</th><th></th></tr></thead><tbody>",
        *rows, "</tbody></table>",
        f"<p>Full statistics: <a href='{COHORT_DIR}/stats.json'>stats.json</a>.</p>",
        "</body></html>\n",
    ]
    atomic_write_text(path, "".join(page))


def _replace_dir(out: Path, build: Callable[[], DemoResult]) -> DemoResult:
    """Build into ``out``; an earlier demo there is restored if the build fails."""
    old: Path | None = None
    if out.exists() and any(out.iterdir()):
        old = out.with_name(f".{out.name}.previous-{os.getpid()}")
        out.rename(old)
    elif out.exists():
        out.rmdir()
    try:
        result = build()
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return result


def run_demo(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = DEFAULT_SEED,
    cohort_size: int = DEFAULT_COHORT_SIZE,
    workers: int = DEFAULT_WORKERS,
    command: str | None = None,
) -> DemoResult:
    """Build the demo folder (see the module docstring).

    Parameters
    ----------
    out_dir : path-like
        Folder to create; an earlier demo there is replaced, anything else refused.
    seed : int
        Seed of every phantom and rendering (recorded in the manifest).
    cohort_size : int
        Knees in the cohort, at least 4 (2 per group, the fewest a test can use).
    workers : int
        Local Dask worker processes of the cohort.
    command : str, optional
        The command line, recorded in the manifest.

    Returns
    -------
    DemoResult

    Raises
    ------
    MskMriError
        ``out_dir`` is not a demo folder, or ``cohort_size`` < 4.
    """
    if cohort_size < 4:
        raise MskMriError(f"the demo cohort needs at least 4 knees (2 per group), not "
                          f"{cohort_size}")
    out = Path(out_dir).resolve()
    check_replaceable_dir(out, manifest=MANIFEST_FILE, what="demo output",
                          is_ours=lambda doc: doc.get("kind") == MANIFEST_KIND)
    command = command or (f"mskmri demo --out {out_dir} --seed {seed} --cohort-size "
                          f"{cohort_size} --workers {workers}")
    return _replace_dir(out, lambda: _build(out, seed=int(seed), cohort_size=int(cohort_size),
                                            workers=int(workers), command=command))


def _build(out: Path, *, seed: int, cohort_size: int, workers: int,
           command: str) -> DemoResult:
    from mskmri.analyze import analyze_knee
    from mskmri.analyze_spine import analyze_spine
    from mskmri.cohort import run_cohort
    from mskmri.evaluate.stats import stats_files
    from mskmri.io import atomic_write_json, write
    from mskmri.synth.phantom import phantom_spine

    timer = StepTimer()
    out.mkdir(parents=True)
    inputs = out / INPUTS_DIR
    reports: dict[str, Path] = {}
    notes: list[str] = []

    with timer.step("knee_phantom", "synthesising a phantom knee"):
        knee = _knee_inputs(inputs / "knee", seed=seed, effusion_ml=6.0, lesion_ml=1.0)
    with timer.step("analyze_knee", "analyze knee with the shipped knee models"):
        try:
            res = analyze_knee(knee["image"], out / KNEE_DIR,
                               command=f"mskmri analyze knee {knee['image']} --out "
                                       f"{out / KNEE_DIR}")
            reports["knee"] = out / KNEE_DIR / "report.html"
            if res.warnings:
                notes.append(f"Knee (shipped models): {len(res.warnings)} warning(s) in its "
                             f"report, e.g. {res.warnings[0]}")
        except (ModelError, ImportError) as exc:  # no knee weights, or no torch installed
            notes.append(f"Knee (shipped models) was not run: {exc}")
    with timer.step("analyze_knee_truth", "analyze knee with the phantom truth (--seg)"):
        analyze_knee(knee["image"], out / KNEE_TRUTH_DIR, seg_path=knee["seg"],
                     lesions_path=knee["lesions"],
                     command=f"mskmri analyze knee {knee['image']} --out {out / KNEE_TRUTH_DIR}"
                             f" --seg {knee['seg']} --lesions {knee['lesions']}")
        reports["knee-truth"] = out / KNEE_TRUTH_DIR / "report.html"

    with timer.step("spine_phantom", "synthesising a phantom lumbar spine"):
        spine = phantom_spine(seed=seed)
        (inputs / "spine").mkdir(parents=True)
        spine_image, spine_truth = inputs / "spine" / "image.nii.gz", inputs / "spine" / "truth.nii.gz"
        write(spine.image, spine_image)
        write(spine.labels, spine_truth)
    with timer.step("analyze_spine", "analyze spine with the shipped spine model"):
        try:
            sres = analyze_spine(spine_image, out / SPINE_DIR,
                                 command=f"mskmri analyze spine {spine_image} --out "
                                         f"{out / SPINE_DIR}")
            if sres.warnings:
                notes.append(f"Spine (shipped model): {len(sres.warnings)} warning(s) in its "
                             f"report, e.g. {sres.warnings[0]}")
        except (MskMriError, ImportError) as exc:  # no body found, no weights, no torch
            notes.append(f"Spine: the shipped spine model gave no segmentation of the "
                         f"phantom ({exc}); the spine report shows the phantom's TRUTH labels "
                         "passed with --seg, not a segmentation.")
            analyze_spine(spine_image, out / SPINE_DIR, seg_path=spine_truth,
                          command=f"mskmri analyze spine {spine_image} --out {out / SPINE_DIR}"
                                  f" --seg {spine_truth}")
        reports["spine"] = out / SPINE_DIR / "report.html"

    with timer.step("cohort_phantoms", f"synthesising {cohort_size} phantom knees"):
        manifest = _cohort_inputs(inputs / "cohort", n=cohort_size, seed=seed)
    with timer.step("cohort", f"mskmri cohort on {workers} local Dask worker(s)"):
        cres = run_cohort(manifest, out / COHORT_DIR, workers=workers, meshes=False,
                          notes=[COHORT_NOTE],
                          command=f"mskmri cohort {manifest} --out {out / COHORT_DIR} "
                                  f"--workers {workers} --no-meshes")
        reports["cohort"] = cres.index_html
        for sid, o in cres.outcomes.items():
            if o.report:
                reports[f"cohort/{sid}"] = cres.out_dir / o.report
        if cres.failed:
            notes.append(f"Cohort: {len(cres.failed)} study(ies) failed; see "
                         f"{COHORT_DIR}/failures.csv")
    notes.append(COHORT_NOTE)
    with timer.step("stats", "mskmri stats on the cohort table"):
        stats = stats_files([cres.table_csv], group="group", groups=["normal", "oa"],
                            plots_dir=out / COHORT_DIR / "stats_plots",
                            n_bootstrap=STATS_BOOTSTRAP, seed=seed)
        for m in stats["measurements"]:  # plot paths relative to the cohort folder
            if m.get("plot"):
                p = Path(m["plot"])
                m["plot"] = (p.relative_to(out / COHORT_DIR).as_posix() if p.is_absolute()
                             else f"stats_plots/{p.name}")
        atomic_write_json(out / COHORT_DIR / "stats.json", stats)
    timings = {**timer.timings, "total": timer.total()}
    write_demo_index(out / INDEX_FILE, reports=reports, notes=notes, stats=stats,
                     timings_s=timings, seed=seed)
    atomic_write_json(out / MANIFEST_FILE, {
        "schema": MANIFEST_SCHEMA, "kind": MANIFEST_KIND, "command": command,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "options": {"seed": seed, "cohort_size": cohort_size, "workers": workers},
        "versions": versions(), "platform": platform.platform(terse=True),
        "notes": notes, "timings_s": timings,
        "reports": {k: v.relative_to(out).as_posix() for k, v in reports.items()},
    })
    log.info("demo written to %s in %.0f s; open %s", out, timings["total"], out / INDEX_FILE)
    return DemoResult(out_dir=out, reports=reports, notes=notes, timings_s=timings, stats=stats)


__all__ = ["DemoResult", "run_demo", "write_demo_index"]
