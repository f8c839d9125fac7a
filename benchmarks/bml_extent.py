"""Choice of the BML post-processing's lesion extent (``EXTENT_FRACTION``) on validation knees.

The extent step cuts each detected component to the voxels at or above a fraction of its
peak residual (:func:`mskmri.anomaly.postprocess.lesion_extent`). The fraction is chosen
here, on *validation* subjects only (never the test maps of ``benchmarks/bml.py``): lesion-free
validation maps with femoral lesions of 0.3, 1 and 3 mL inserted by our renderer, IW-FS at 224
and 448, both detectors, each at the threshold calibrated on the other lesion-free validation
maps (as ``bml.py`` does). The fraction with the best mean Dice of the inpainting detector is
the default; MKD's Dice is reported beside it.

Usage::

    .venv/bin/python benchmarks/bml_extent.py [--cache DIR]

writes ``benchmarks/results/bml_extent.json``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from _common import git_commit  # noqa: E402
from bml import CALIBRATION_FPR, SEED, _detect, _painters, _render, _volumes  # noqa: E402

log = logging.getLogger("bml-extent")

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "bml_extent.json"
#: Fractions of the component's peak tried.
FRACTIONS = (0.0, 0.2, 0.3, 0.4, 0.5)
#: In-plane matrices of the tuning renders.
INPLANES = (224, 448)


def main(argv: list[str] | None = None) -> int:
    import nibabel as nib
    import torch

    from mskmri.anomaly.postprocess import PostprocessConfig, calibrate_threshold, postprocess
    from mskmri.evaluate.metrics import dice
    from mskmri.synth import oai_label_paths, split_by_subject

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/mskmri-bml-cache"))
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    args.cache.mkdir(parents=True, exist_ok=True)

    split = split_by_subject([str(p) for p in oai_label_paths()], seed=0)
    val_free = [p for p in sorted(split["val"])
                if int((np.asarray(nib.load(p).dataobj) == 7).sum()) == 0]
    calib, tune = val_free[:2], val_free[2:4]

    def rendered(p: str, ip: int, les: str) -> dict[str, Any]:
        seed = SEED + zlib.crc32(f"{Path(p).name}/iw-fs/{ip}/{les}".encode()) % 100_000
        return _render(p, contrast="iw-fs", inplane=ip, lesions=les, seed=seed,
                       cache=args.cache)

    methods: dict[str, Any] = {}
    for name, painter in _painters("bml-inpaint", ["inpaint", "mkd"]).items():
        zs, bones, sps = [], [], []
        for p in calib:
            for ip in (112, 224, 448):
                img, seg, _ = _volumes(rendered(p, ip, "none"), "iw-fs")
                res = _detect(painter, img, seg, threshold=float("inf"), smooth=False)
                zs.append(res.zmap.array)
                bones.append(seg.array == 1)
                sps.append(img.spacing)
        level = calibrate_threshold(zs, bones, sps, fpr=CALIBRATION_FPR)
        cases = []
        for p in tune:
            for ip in INPLANES:
                img, seg, les = _volumes(rendered(p, ip, "inserted"), "iw-fs")
                res = _detect(painter, img, seg, threshold=float("inf"), smooth=False)
                fem = seg.array == 1
                truth = (les.array > 0) & fem
                row: dict[str, Any] = {"map": Path(p).name, "inplane": ip, "dice": {}}
                for fr in FRACTIONS:
                    pp = postprocess(res.zmap.array, fem, img.spacing,
                                     PostprocessConfig(threshold=level, extent_fraction=fr))
                    row["dice"][str(fr)] = round(float(dice(pp.mask > 0, truth)), 4)
                log.info("%s %s %d: %s", name, Path(p).name, ip, row["dice"])
                cases.append(row)
        mean = {str(fr): round(float(np.mean([c["dice"][str(fr)] for c in cases])), 4)
                for fr in FRACTIONS}
        methods[name] = {"threshold_z": level, "cases": cases, "mean_dice": mean}
    means = methods["inpaint-ffc"]["mean_dice"]
    best = max(FRACTIONS, key=lambda fr: means[str(fr)])
    doc = {
        "schema": "mskmri/benchmark/bml-extent/1",
        "command": " ".join(["python", "benchmarks/bml_extent.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, python "
                   f"{platform.python_version()}, torch {torch.__version__} CPU 1 thread",
        "data": {"calibration_val_lesion_free": [Path(p).name for p in calib],
                 "tuning_val_inserted": [Path(p).name for p in tune],
                 "inplanes": list(INPLANES), "contrast": "iw-fs",
                 "lesions": "0.3, 1 and 3 mL femoral BMLs inserted by mskmri.synth"},
        "fractions": list(FRACTIONS), "methods": methods,
        "chosen_extent_fraction": best,
        "notes": "validation subjects only; the chosen fraction is EXTENT_FRACTION in "
                 "mskmri.anomaly.postprocess",
    }
    from mskmri.io import atomic_write_json

    atomic_write_json(args.out, doc)
    log.info("best extent fraction %s (inpainting mean Dice %s)", best, means[str(best)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
