"""Sanity of the BML detectors on the two real knee images (no lesion labels exist for them).

The data README says what these images can show: the detectors run end to end on real scans
(femur from the shipped knee segmenter, no ``--seg``), the femur is one plausible component,
the detected lesion volume is plausible for knees without a known BML, and the overlays can be
judged by a person. They cannot score accuracy. Neither image is fat-suppressed and
fluid-sensitive (DESS echo 1; multi-echo spin-echo T2, first echo), so every output carries the
contrast warning; the numbers are false-positive volumes only if these knees have no BML, which
nobody has checked.

Usage::

    .venv/bin/python benchmarks/bml_real_knees.py [--data ../shared/data]

writes ``benchmarks/results/bml_real_knees.json`` and ``figures/real-data/bml_real_<name>.png``
(local only: the figures show the real scans and are never committed).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import git_commit

log = logging.getLogger("bml-real-knees")

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "bml_real_knees.json"
#: Figures of the real scans: made locally, never committed (.gitignore), since nothing cut
#: from the shared data is committed.
FIGURES = ROOT / "benchmarks" / "results" / "figures" / "real-data"


def _figure(image: Any, femur: np.ndarray, mask: np.ndarray, name: str) -> str:
    """Three sagittal slices through the femur with the femur and lesion outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ras = image.reorient("RAS")
    arr = np.asarray(ras.array, dtype=np.float32)
    xs = np.nonzero(femur.any(axis=(1, 2)))[0]
    picks = [int(np.percentile(xs, q)) for q in (25, 50, 75)] if xs.size else [arr.shape[0] // 2]
    hi = float(np.percentile(arr, 99.5)) or 1.0
    fig, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 4))
    for ax, x in zip(np.atleast_1d(axes), picks, strict=False):
        ax.imshow(arr[x].T, origin="lower", cmap="gray", vmin=0, vmax=hi)
        if femur[x].any():
            ax.contour(femur[x].T, [0.5], colors="y", linewidths=0.6)
        if mask[x].any():
            ax.contour(mask[x].T, [0.5], colors="r", linewidths=0.8)
        ax.set_title(f"sagittal slice {x}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{name}: femur (yellow), detected lesion (red)", fontsize=9)
    fig.tight_layout()
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / f"bml_real_{name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path.relative_to(ROOT))


def main(argv: list[str] | None = None) -> int:
    import cc3d
    import torch

    from mskmri.anomaly.inpaint import NetworkPainter, detect_bml
    from mskmri.anomaly.mkd import MkdScorer, detect_bml_mkd
    from mskmri.errors import MskMriError
    from mskmri.io import read
    from mskmri.paths import shared_data_dir
    from mskmri.segment.knee import KneeSegmenter

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    data = args.data or shared_data_dir()
    cases = {"pykneer_dess": (data / "knee" / "pykneer_dess" / "sub01_DESS_echo01.nii.gz", None),
             "mese_t2_echo1": (data / "knee" / "pymskt_mese_t2_dicom", 1)}
    seg = KneeSegmenter()
    detectors = {"inpaint-ffc": lambda im, s: detect_bml(im, s, painter=NetworkPainter()),
                 "mkd": lambda im, s: detect_bml_mkd(im, s, scorer=MkdScorer())}
    out: dict[str, Any] = {}
    for name, (path, echo) in cases.items():
        img = read(path, echo=echo)
        t0 = time.perf_counter()
        labels = seg.run(img).labels
        femur = labels.reorient("RAS").array == 1
        comps = cc3d.connected_components(femur.astype(np.uint8), connectivity=26)
        sizes = np.bincount(comps.ravel())[1:]
        vox_ml = float(np.prod(img.spacing)) / 1000.0
        rec: dict[str, Any] = {
            "shape": list(img.shape), "spacing_mm": [round(s, 4) for s in img.spacing],
            "segment_s": round(time.perf_counter() - t0, 1),
            "femur_ml": round(float(femur.sum() * vox_ml), 1),
            "femur_components": int(sizes.size),
            "largest_component_share": round(float(sizes.max() / sizes.sum()), 4)
            if sizes.size else None,
            "methods": {}}
        for method, run in detectors.items():
            t1 = time.perf_counter()
            try:
                res = run(img, labels)
            except MskMriError as exc:  # reported, not hidden
                rec["methods"][method] = {"error": str(exc)}
                log.info("%s %s: %s", name, method, exc)
                continue
            mask = res.mask.reorient("RAS").array > 0
            rec["methods"][method] = {
                "lesion_ml": round(float(mask.sum() * vox_ml), 3),
                "lesions": len(res.table), "seconds": round(time.perf_counter() - t1, 1),
                "warnings": res.warnings,
                "figure": _figure(img, femur, mask, f"{name}_{method}")}
            log.info("%s %s: %.3f mL in %d lesions", name, method,
                     rec["methods"][method]["lesion_ml"], len(res.table))
        out[name] = rec
    doc = {"schema": "mskmri/benchmark/bml-real-knees/1",
           "command": " ".join(["python", "benchmarks/bml_real_knees.py",
                                *(argv if argv is not None else sys.argv[1:])]),
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "commit": git_commit(),
           "machine": f"{platform.machine()} {os.cpu_count()} CPUs, python "
                      f"{platform.python_version()}, torch {torch.__version__} CPU 1 thread",
           "knees": out,
           "notes": "sanity only (no lesion labels): femur from the shipped knee segmenter; "
                    "neither image is fat-suppressed fluid-sensitive, so sensitivity is low "
                    "and every output carries the contrast warning"}
    from mskmri.io import atomic_write_json

    atomic_write_json(args.out, doc)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
