"""Cohort throughput on Dask (1 vs 2 local workers) and group statistics on the result.

Synthesises a cohort of phantom knees (:func:`mskmri.synth.phantom.phantom_knee`, rendered
as DESS by :func:`mskmri.synth.render.render`): half *normal* (effusion drawn from
:data:`NORMAL_EFFUSION_ML`, full-thickness cartilage, no bone marrow lesion) and half *OA*
(effusion from :data:`OA_EFFUSION_ML`, cartilage thickness x :data:`OA_CARTILAGE_SCALE`, one
femoral BML from :data:`OA_LESION_ML`). Muscle is drawn the same way in both groups. Each
knee's truth label map and lesion mask go into the manifest's ``seg`` and ``lesions``
columns, so ``analyze`` measures the truth: the shipped knee model is not accurate enough
(see its model card) for a group comparison to mean anything, and the benchmark times the
cohort machinery and the analysis (measurements, meshes, 3-D views, report), not the
segmentation network.

Then it runs ``mskmri cohort`` (:func:`mskmri.cohort.run_cohort`) on the same manifest with
one local worker and with two, each into a fresh folder, and reports studies per minute for
each (cluster start included and excluded) and their ratio; and finally ``mskmri stats`` on
the 2-worker table (Welch t and Mann-Whitney U, Holm-corrected), expecting joint effusion
to differ (P < 0.05) and muscle not to.

The machine has 2 cores shared with other work: timings are upper bounds, and the load
average before and after each run is recorded.

Usage::

    .venv/bin/python benchmarks/cohort_throughput.py [--n 24] [--work DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks.cohort_throughput")

#: Group parameters (drawn uniformly per knee, seeded by the knee's index).
NORMAL_EFFUSION_ML = (1.5, 5.0)
OA_EFFUSION_ML = (8.0, 20.0)
OA_CARTILAGE_SCALE = 0.7
OA_LESION_ML = (0.5, 3.0)
#: Worker counts compared.
WORKER_COUNTS = (1, 2)


def synthesise(n: int, work: Path) -> tuple[Path, bool]:
    """Write ``n`` phantom knees (image, truth labels, lesions) and the cohort manifest.

    Returns the manifest and whether it was reused from an earlier run (same ``work``).
    """
    import numpy as np

    from mskmri.io import write
    from mskmri.synth.phantom import phantom_knee
    from mskmri.synth.render import render

    manifest = work / "cohort.csv"
    if manifest.is_file():
        log.info("reusing the synthetic cohort in %s", work)
        return manifest, True
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        group = "normal" if i % 2 == 0 else "oa"
        rng = np.random.default_rng([i, 20261121])
        if group == "normal":
            eff, scale, lesion = float(rng.uniform(*NORMAL_EFFUSION_ML)), 1.0, None
        else:
            eff, scale = float(rng.uniform(*OA_EFFUSION_ML)), OA_CARTILAGE_SCALE
            lesion = float(rng.uniform(*OA_LESION_ML))
        t = time.perf_counter()
        truth, lesions = phantom_knee(seed=i, effusion_ml=eff, lesion_ml=lesion,
                                      cartilage_scale=scale)
        synth = render(truth, contrast="dess", seed=i, lesions=lesions)
        sid = f"knee{i:03d}"
        write(synth.image, data / f"{sid}_image.nii.gz")
        write(synth.labels, data / f"{sid}_seg.nii.gz")
        write(synth.lesions, data / f"{sid}_lesions.nii.gz")
        rows.append({"id": sid, "path": f"data/{sid}_image.nii.gz", "group": group,
                     "anatomy": "knee", "seg": f"data/{sid}_seg.nii.gz",
                     "lesions": f"data/{sid}_lesions.nii.gz", "seed": i,
                     "effusion_ml_inserted": round(eff, 3), "cartilage_scale": scale,
                     "lesion_ml_inserted": "" if lesion is None else round(lesion, 3)})
        log.info("synthesised %s (%s) in %.1f s", sid, group, time.perf_counter() - t)
    tmp = manifest.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(manifest)
    return manifest, False


def _machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text()
                      .splitlines() if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem_kb = 0
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "memory_gib": round(mem_kb / 2**20, 1), "python": sys.version.split()[0]}


def run(n: int, work: Path, meshes: bool) -> dict[str, Any]:
    from mskmri.cli import main as cli_main
    from mskmri.cohort import run_cohort

    t = time.perf_counter()
    manifest, reused = synthesise(n, work)
    synth_s = time.perf_counter() - t
    runs: dict[str, Any] = {}
    for workers in WORKER_COUNTS:
        out = work / f"cohort_{workers}w"
        shutil.rmtree(out, ignore_errors=True)
        load0 = os.getloadavg()
        res = run_cohort(manifest, out, workers=workers, meshes=meshes,
                         command=f"mskmri cohort {manifest} --out {out} --workers {workers}")
        doc = json.loads((out / "cohort.json").read_text())
        start = doc["timings_s"]["cluster_start"]
        ok = sum(o.status == "ok" for o in res.outcomes.values())
        runs[f"{workers}_workers"] = {
            "workers": workers, "studies_ok": ok, "studies_failed": len(res.failed),
            "wall_s": round(res.seconds, 2), "cluster_start_s": start,
            "studies_per_min": round(ok / res.seconds * 60.0, 2),
            "studies_per_min_excluding_cluster_start": round(
                ok / (res.seconds - start) * 60.0, 2),
            "mean_study_s": doc["timings_s"]["study_mean"],
            "mean_study_cpu_s": doc["timings_s"]["study_cpu_mean"],
            # what the workers would reach with a free core each (an estimate, not measured)
            "estimate_studies_per_min_on_free_cores": round(
                workers * 60.0 / doc["timings_s"]["study_cpu_mean"], 2),
            "load_average_before": [round(v, 2) for v in load0],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
        }
        log.info("%d worker(s): %d studies in %.1f s (%.1f / min)", workers, ok, res.seconds,
                 runs[f"{workers}_workers"]["studies_per_min"])
    one, two = runs["1_workers"], runs["2_workers"]
    table = work / f"cohort_{WORKER_COUNTS[-1]}w" / "measurements.csv"
    stats_json = work / "stats.json"
    code = cli_main(["-q", "stats", str(table), "--group", "group", "--groups", "normal,oa",
                     "--json", str(stats_json), "--plots", str(work / "stats_plots")])
    if code != 0:
        raise SystemExit(f"mskmri stats failed with exit status {code}")
    stats = json.loads(stats_json.read_text())
    picked = {}
    for m in stats["measurements"]:
        if m["name"] in ("volume.joint_effusion", "volume.muscle",
                         "thickness_mean.femoral_cartilage", "lesion_volume.femur"):
            picked[m["name"]] = {
                "unit": m["unit"],
                "mean": {g: v["mean"] for g, v in m["groups"].items()},
                "n": {g: v["n"] for g, v in m["groups"].items()},
                "welch_p": m["welch_t"]["p"], "welch_p_holm": m["welch_t"]["p_holm"],
                "welch_significant": m["welch_t"]["significant"],
                "mann_whitney_p_holm": m["mann_whitney_u"]["p_holm"],
                "mann_whitney_significant": m["mann_whitney_u"]["significant"],
                "hedges_g": m["hedges_g"]["value"], "hedges_g_ci": m["hedges_g"]["ci"],
            }
    return {
        "benchmark": "cohort_throughput",
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": _machine(),
        "note": ("Read the load averages recorded with each run: above about 1 on this "
                 "2-core machine, other jobs shared the cores, every timing is an upper bound "
                 "and the 2-worker speed-up is limited by what the other jobs left free "
                 "(compare mean_study_s, the wall time of one study, with mean_study_cpu_s, "
                 "its CPU time). Studies are analysed from their truth label maps "
                 "(--seg/--lesions), so the timings cover the cohort machinery and the "
                 "analysis (measurements, meshes, 3-D views, report), not the segmentation "
                 "network."),
        "cohort": {"n": n, "groups": {"normal": (n + 1) // 2, "oa": n // 2},
                   "phantom_grid": "64x96x96 at 1.5x1.25x1.25 mm (default phantom)",
                   "normal_effusion_ml": NORMAL_EFFUSION_ML, "oa_effusion_ml": OA_EFFUSION_ML,
                   "oa_cartilage_scale": OA_CARTILAGE_SCALE, "oa_lesion_ml": OA_LESION_ML,
                   "meshes": meshes,
                   "synthesis_s": None if reused else round(synth_s, 1),
                   "synthesis": "reused from an earlier run in the same --work folder"
                   if reused else "made by this run"},
        "runs": runs,
        "speedup_2_vs_1": round(two["studies_per_min"] / one["studies_per_min"], 3),
        "speedup_2_vs_1_excluding_cluster_start": round(
            two["studies_per_min_excluding_cluster_start"]
            / one["studies_per_min_excluding_cluster_start"], 3),
        "stats": {"table": "2-worker measurements.csv", "options": stats["options"],
                  "n_measurements": len(stats["measurements"]),
                  "measurements": picked,
                  "effusion_differs": picked.get("volume.joint_effusion", {})
                  .get("welch_significant"),
                  "muscle_differs": picked.get("volume.muscle", {}).get("welch_significant")},
    }


def main() -> None:
    from mskmri.paths import REPO_ROOT

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=24, help="knees in the cohort (half OA)")
    p.add_argument("--work", type=Path, default=Path("/tmp/mskmri-cohort-bench"),
                   help="scratch folder (the synthetic cohort is reused when present)")
    p.add_argument("--no-meshes", action="store_true", help="skip meshes and 3-D views")
    p.add_argument("--out", type=Path,
                   default=REPO_ROOT / "benchmarks" / "results" / "cohort_throughput.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    from mskmri import _progress

    _progress.set_enabled(False)
    args.work.mkdir(parents=True, exist_ok=True)
    result = run(args.n, args.work, meshes=not args.no_meshes)
    from mskmri.io import atomic_write_json

    atomic_write_json(args.out, result)
    log.info("wrote %s", args.out)


if __name__ == "__main__":  # the Dask workers are spawned: they must not run main()
    main()
