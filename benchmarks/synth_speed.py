"""Speed of knee synthesis on one core: a full 160x384x384 OAI-geometry render.

Runs with one BLAS/OpenMP thread, renders one OAI lesion label map several times (anatomy
completion + rendering, and rendering alone from a completed scene), and writes the
per-stage timings to ``benchmarks/results/synth_speed.json``. The machine's load average is
recorded too: other work on a shared machine inflates the numbers (the minimum over repeats
is the least disturbed estimate).

Usage::

    .venv/bin/python benchmarks/synth_speed.py [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

log = logging.getLogger("benchmarks.synth_speed")

#: The label map timed (any OAI map has the same 160x384x384 geometry).
LABEL_MAP = "akoa_9055361_00m.nii.gz"


def _stats(values: list[float]) -> dict[str, float]:
    return {"min_s": round(min(values), 3), "median_s": round(statistics.median(values), 3),
            "max_s": round(max(values), 3)}


def run(repeats: int) -> dict[str, object]:
    from mskmri.paths import shared_data_dir
    from mskmri.synth import complete_knee, phantom_knee, render, render_scene
    from mskmri.synth.sources import load_knee_source

    shared = shared_data_dir()
    if shared is None:
        raise SystemExit("needs ../shared/data (or MSKMRI_SHARED_DATA)")
    t0 = time.perf_counter()
    src = load_knee_source(shared / "knee" / "oai_bone_lesion_labels" / LABEL_MAP)
    load_s = time.perf_counter() - t0
    load_avg = os.getloadavg()
    render(src.labels, lesions=src.lesions, contrast="dess", seed=0)  # warm-up
    full: dict[str, list[float]] = {}
    stages: dict[str, list[float]] = {}
    for i in range(repeats):
        for contrast in ("dess", "iw-fs"):
            t = time.perf_counter()
            r = render(src.labels, lesions=src.lesions, contrast=contrast, seed=100 + i,
                       lesion_ml=[1.0], effusion_ml=5.0)
            full.setdefault(contrast, []).append(time.perf_counter() - t)
            for k, v in r.params["timing"].items():
                stages.setdefault(k, []).append(float(v))
    scene = complete_knee(src.labels, lesions=src.lesions, seed=1, lesion_ml=[1.0])
    only: list[float] = []
    for i in range(repeats):
        t = time.perf_counter()
        render_scene(scene, contrast="iw-fs", seed=200 + i)
        only.append(time.perf_counter() - t)
    res448: list[float] = []
    for i in range(max(1, repeats // 2)):
        t = time.perf_counter()
        render_scene(scene, contrast="iw-fs", seed=300 + i, inplane=448)
        res448.append(time.perf_counter() - t)
    ph: list[float] = []
    for i in range(repeats):
        t = time.perf_counter()
        phantom_knee(seed=i)
        ph.append(time.perf_counter() - t)
    return {
        "schema": "mskmri/benchmark/1",
        "benchmark": "synth_speed",
        "label_map": LABEL_MAP,
        "shape": list(src.labels.shape),
        "spacing_mm": [round(s, 4) for s in src.labels.spacing],
        "threads": 1,
        "repeats": repeats,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(),
                    "load_average_1_5_15": [round(v, 2) for v in load_avg]},
        "load_label_map_s": round(load_s, 3),
        "full_render_s": {c: _stats(v) for c, v in full.items()},
        "stages_s": {k: _stats(v) for k, v in stages.items()},
        "render_only_from_scene_s": _stats(only),
        "render_only_inplane_448_s": _stats(res448),
        "phantom_s": _stats(ph),
        "note": ("full render = anatomy completion (procedural tissues, 5 mL effusion, a 1 mL "
                 "BML) + deformation + texture + blur + bias + Rician noise of a 160x384x384 "
                 "map; 'render only' reuses one completed scene"),
    }


def main() -> None:
    from mskmri.paths import REPO_ROOT

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path,
                   default=REPO_ROOT / "benchmarks" / "results" / "synth_speed.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = run(args.repeats)
    from mskmri.io import atomic_write_json

    atomic_write_json(args.out, res)
    log.info("%s", json.dumps({k: res[k] for k in ("full_render_s", "render_only_from_scene_s",
                                                    "phantom_s")}, indent=1))


if __name__ == "__main__":
    main()
