"""Sliding-window inference speed: fp32 vs bf16 autocast vs ONNX Runtime on one knee-sized volume.

Runs the default-size 3-D U-Net of :mod:`mskmri.nn.unet` (random, seeded weights, 18 output
classes as the knee schema has) over a 160x384x384 volume with :class:`SlidingWindowInferer`,
``--repeats`` times per variant (median reported; this 2-core host is shared and single runs
drift by tens of percent), each variant in its own process so that its peak resident memory
(``ru_maxrss``) is its own. Reports wall time (set-up such as the ONNX export apart), where the time went
(forward passes vs blending), peak RSS, and how many voxels' arg-max labels agree with fp32.

The input is a smooth seeded random field (low-resolution noise, trilinearly upsampled, plus
fine noise), so the random network produces spatially varying labels; agreement between
precisions on a random network is a lower bound of the agreement on a trained one (trained
logits have larger margins).

Usage::

    .venv/bin/python benchmarks/inference_speed.py            # writes the results JSON
    .venv/bin/python benchmarks/inference_speed.py --shape 64 128 128 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "inference_speed.json"
#: Variant name -> (backend, precision, channels_last).
VARIANTS: dict[str, tuple[str, str, bool]] = {
    "fp32": ("torch", "fp32", True),
    "bf16": ("torch", "bf16", True),
    "onnx": ("onnx", "fp32", False),
    "fp32-contiguous": ("torch", "fp32", False),
}
DEFAULT_VARIANTS = ["fp32", "bf16", "onnx"]
#: Classes of the knee schema (background + 17 structures).
KNEE_CLASSES = 18
#: Agreement with fp32 that issue 3 requires before a faster variant may be used.
AGREEMENT_TARGET = 0.995


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def _volume(shape: tuple[int, ...], seed: int) -> np.ndarray:
    import torch

    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 1, *[max(s // 8, 2) for s in shape]), generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear",
                                             align_corners=False)[0, 0]
    return (smooth + 0.2 * torch.randn(shape, generator=g)).numpy().astype(np.float32)


def _child(args: argparse.Namespace) -> dict[str, Any]:
    """One variant, in this process; returns its measurements and saves its labels."""
    import torch

    from mskmri.nn.inference import SlidingWindowConfig, SlidingWindowInferer
    from mskmri.nn.unet import UNet, UNetConfig, count_parameters

    torch.set_num_threads(args.threads)
    backend, precision, channels_last = VARIANTS[args.child]
    shape = tuple(args.shape)
    image = _volume(shape, args.seed)
    torch.manual_seed(args.seed)
    net = UNet(UNetConfig(out_channels=args.classes))
    rss_before = _rss_mb()
    t0 = time.perf_counter()
    cfg = SlidingWindowConfig(tuple(args.patch), overlap=args.overlap,
                              batch_size=args.batch_size, precision=precision,
                              backend=backend, channels_last=channels_last)
    inferer = SlidingWindowInferer(net, cfg)
    # warm-up on one window: one-time kernel selection is set-up, not inference
    inferer.labels(image[tuple(slice(0, p) for p in args.patch)])
    setup_s = time.perf_counter() - t0
    runs: list[float] = []
    for _ in range(args.repeats):
        t1 = time.perf_counter()
        labels = inferer.labels(image)
        runs.append(time.perf_counter() - t1)
    np.save(args.labels_out, labels)
    st = inferer.stats  # of the last run
    inferer.close()
    return {
        "variant": args.child, "backend": backend, "precision": precision,
        "channels_last": channels_last, "seconds": round(float(np.median(runs)), 2),
        "seconds_runs": [round(r, 2) for r in runs],
        "setup_seconds": round(setup_s, 2), "windows": st.windows,
        "forward_seconds": round(st.forward_s, 2), "blend_seconds": round(st.blend_s, 2),
        "argmax_seconds": round(float(st.extra.get("argmax_s", 0.0)), 2),
        "peak_rss_mb": round(_rss_mb(), 0), "rss_before_inference_mb": round(rss_before, 0),
        "parameters": count_parameters(net),
    }


def _machine(threads: int) -> dict[str, Any]:
    import onnxruntime
    import torch

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu or platform.processor(), "logical_cpus": os.cpu_count(),
            "torch_threads": threads, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "load_average_at_start": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--shape", type=int, nargs=3, default=[160, 384, 384])
    p.add_argument("--patch", type=int, nargs=3, default=[80, 160, 160])
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--classes", type=int, default=KNEE_CLASSES)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3,
                   help="full-volume runs per variant (the median is reported)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--labels-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        sys.stdout.write(json.dumps(_child(args)) + "\n")
        return 0

    machine = _machine(args.threads)
    results: list[dict[str, Any]] = []
    labels: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="mskmri-bench-") as tmp:
        for variant in args.variants:
            lab = Path(tmp) / f"{variant}.npy"
            cmd = [sys.executable, __file__, "--child", variant, "--labels-out", str(lab),
                   "--shape", *map(str, args.shape), "--patch", *map(str, args.patch),
                   "--overlap", str(args.overlap), "--batch-size", str(args.batch_size),
                   "--classes", str(args.classes), "--threads", str(args.threads),
                   "--seed", str(args.seed), "--repeats", str(args.repeats)]
            env = {**os.environ, "MSKMRI_NO_PROGRESS": "1"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                return proc.returncode
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            labels[variant] = np.load(lab)
            results.append(res)
            sys.stderr.write(f"{variant}: median {res['seconds']} s of {res['seconds_runs']}, "
                             f"peak RSS {res['peak_rss_mb']} MB\n")
    machine["load_average_at_end"] = list(os.getloadavg())
    ref = labels.get("fp32")
    for res in results:
        if ref is not None:
            res["label_agreement_with_fp32"] = float((labels[res["variant"]] == ref).mean())
    doc = {
        "schema": "mskmri/benchmark/1",
        "benchmark": "inference_speed",
        "command": " ".join(["python benchmarks/inference_speed.py", *(argv or sys.argv[1:])]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "volume_shape": args.shape, "patch_size": args.patch, "overlap": args.overlap,
        "batch_size": args.batch_size, "classes": args.classes,
        "network": "mskmri.nn.unet.UNet default config (3-D, features 16-256, random seeded "
                   "weights)",
        "agreement_target": AGREEMENT_TARGET,
        "results": results,
        "repeats": args.repeats,
        "notes": "seconds = median of `repeats` full-volume labels() calls (all in "
                 "seconds_runs) after a one-window warm-up; forward/blend/argmax seconds are "
                 "of the last call; "
                 "peak_rss_mb = ru_maxrss of the variant's own process (volume, network, "
                 "accumulator of classes x volume float32 included). Whole volume, no "
                 "region restriction: segmenters restrict inference to the anatomy's bbox. "
                 "The 2 cores are shared with other jobs: a 1-minute load average above 2 "
                 "(recorded at start and end) means the times are inflated by contention.",
    }
    from mskmri.io import atomic_write_json

    atomic_write_json(args.out, doc)
    sys.stderr.write(f"wrote {args.out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
