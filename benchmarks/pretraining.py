"""Does distortion-restoration pretraining raise Dice when few volumes are labelled?

Reproduces the experiment of Felfeliyan et al. (arXiv 2207.11191; METHODS.md section 2) at CPU
scale: one self-supervised pretraining run (:mod:`mskmri.pretrain`) on unlabelled images,
then the same 2-D U-Net fine-tuned from scratch or from the pretrained encoder with 1, 2, 5
and 10 labelled volumes, several seeds each, scored by 3-D Dice on held-out volumes.

Task 1, vertebral bodies (real labels): sagittal slices of the lumbar MRI in
``spine/myosegmentum_vertebral_bodies`` (14 exams) and ``spine/chu2015_vertebral_bodies`` (7),
resampled in-plane to 2 mm; all bodies = one class. The evaluation exams
(:data:`SPINE_EVAL`) were fixed in this file before any run and are never used for training,
pretraining or any choice. Task 2, knee effusion (synthetic labels, as in the journal
version): sagittal slices of procedural knees rendered by :mod:`mskmri.synth` with random
contrast and effusion volume, at the phantom's 1.25 mm in-plane spacing.

Pretraining images (labels never read): the spine training exams, the other real spine and
knee images in ``../shared/data`` and synthetic knee renders of other seeds; none of the
evaluation volumes. Hyper-parameters (steps, learning rate, augmentation, network) were fixed
a priori from the CPU budget; nothing was tuned on any split.

Both arms: same network, same steps, batch, learning rate, augmentation, and for each seed
the same labelled volumes; the pretrained arm differs only by ``--init``. Work runs in two
processes of one torch thread each (the machine's two cores are shared).

Usage::

    .venv/bin/python benchmarks/pretraining.py [--quick] [--ship]

writes ``benchmarks/results/pretraining.json`` and ``pretraining.png``; ``--ship`` also saves
the pretrained encoder as the registered model ``pretrain-encoder-2d``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import concurrent.futures as cf  # noqa: E402
import datetime as dt  # noqa: E402
import logging  # noqa: E402
import multiprocessing as mp  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

log = logging.getLogger("benchmarks.pretraining")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

#: Evaluation exams of the vertebral-body task, fixed before any run (every third
#: MyoSegmenTUM exam plus two Chu exams, one T2-like, one other); never trained or pretrained on.
SPINE_EVAL = ("myosegmentum/exam03", "myosegmentum/exam06", "myosegmentum/exam09",
              "myosegmentum/exam12", "chu2015/exam03", "chu2015/exam10")
SPINE_FOLDERS = {"myosegmentum": "spine/myosegmentum_vertebral_bodies",
                 "chu2015": "spine/chu2015_vertebral_bodies"}
#: In-plane spacing of the spine slices, mm.
SPINE_SPACING_MM = 2.0
#: Label budgets (labelled volumes) per task.
SPINE_BUDGETS = (1, 2, 5, 10)
KNEE_BUDGETS = (1, 2, 5)
#: Seeds of the phantom knees: evaluation, labelled pool, unlabelled pretraining renders.
KNEE_EVAL_SEEDS = (1000, 1001, 1002, 1003)
KNEE_POOL_SEEDS = (1100, 1101, 1102, 1103, 1104, 1105)
KNEE_PRETRAIN_SEEDS = (1200, 1201, 1202, 1203, 1204, 1205)
#: Effusion volume range of the knee renders, mL.
KNEE_EFFUSION_ML = (3.0, 15.0)
#: Knee slice spacing (the phantom's in-plane), mm.
KNEE_SPACING_MM = 1.25
#: Other real images used for pretraining only (relative to ../shared/data).
EXTRA_PRETRAIN = ("spine/ivd_discs/exam11_img.nii.gz", "spine/sct/sct_tutorial_data/t2_lumbar.nii.gz",
                  "spine/sct/sct_example_data_2014/t2.nii.gz",
                  "knee/pykneer_dess/sub01_DESS_echo01.nii.gz")
#: Network and training recipe (fixed a priori).
FEATURES = (8, 16, 32, 64)
PATCH = 96
SEEDS = (0, 1, 2)
FT_STEPS = 150
FT_BATCH = 8
FT_LR = 1e-3
PT_STEPS = 1000
PT_BATCH = 8
PT_LR = 1e-3

_DATA: dict[str, Any] = {}


# ============================================================================ data
def _spine_volumes(shared: Path) -> dict[str, Any]:
    from mskmri.io import read, read_labels
    from mskmri.pretrain.data import normalise, slice_axis, volume_slices
    from mskmri.pretrain.finetune import LabelledVolume

    out = {}
    for key, folder in SPINE_FOLDERS.items():
        for img_path in sorted((shared / folder).glob("exam*_img.nii.gz")):
            exam = img_path.name.split("_")[0]
            img = read(img_path)
            lab = read_labels(img_path.with_name(f"{exam}_gt.nii.gz"), strict=False)
            axis = slice_axis(img.spacing, img.orientation)
            x = normalise(volume_slices(img.array, img.spacing, axis, SPINE_SPACING_MM))
            y = volume_slices((lab.array > 0).astype(np.uint8), lab.spacing, axis,
                              SPINE_SPACING_MM, order=0)
            out[f"{key}/{exam}"] = LabelledVolume(f"{key}/{exam}", x, (y > 0).astype(np.uint8))
    return out


def _knee_volume(seed: int) -> Any:
    from mskmri.labels import KNEE
    from mskmri.pretrain.data import normalise
    from mskmri.pretrain.finetune import LabelledVolume
    from mskmri.synth import phantom_knee, render

    eff = float(np.random.default_rng(seed).uniform(*KNEE_EFFUSION_ML))
    lab, _ = phantom_knee(seed=seed, effusion_ml=eff, lesion_ml=None)
    r = render(lab, contrast="random", seed=seed)
    effusion = next(k for k, v in KNEE.items() if v == "joint_effusion")
    # Axis 0 of the phantom grid is left-right: sagittal slices, 1.25 mm in-plane.
    return LabelledVolume(f"phantom-knee/seed{seed}", normalise(r.image.array),
                          (r.labels.array == effusion).astype(np.uint8))


def prepare(shared: Path, quick: bool) -> None:
    """Load every volume into the module globals (inherited by the forked workers)."""
    from mskmri.pretrain.data import collect_images

    spine = _spine_volumes(shared)
    missing = [e for e in SPINE_EVAL if e not in spine]
    if missing:
        raise SystemExit(f"evaluation exams {missing} not found under {shared}")
    pool = [k for k in spine if k not in SPINE_EVAL]
    knee_seeds = KNEE_EVAL_SEEDS + KNEE_POOL_SEEDS + KNEE_PRETRAIN_SEEDS
    if quick:
        knee_seeds = KNEE_EVAL_SEEDS[:1] + KNEE_POOL_SEEDS[:2] + KNEE_PRETRAIN_SEEDS[:1]
    knees = {s: _knee_volume(s) for s in knee_seeds}
    # Pretraining slices: spine training exams (images only), other real images, renders.
    images: list[np.ndarray] = []
    sources: list[dict[str, Any]] = []
    for k in pool:
        v = spine[k]
        keep = [s for s in v.image if (s > 0.1).mean() >= 0.05]
        images += keep
        sources.append({"image": k, "slices": len(keep), "spacing_mm": SPINE_SPACING_MM})
    for rel in EXTRA_PRETRAIN:
        sp = KNEE_SPACING_MM if rel.startswith("knee") else SPINE_SPACING_MM
        got = collect_images([shared / rel], dims=2, spacing_mm=sp)
        images += got.images
        sources.append({"image": rel, "slices": len(got.images), "spacing_mm": sp})
    for s in knee_seeds:
        if s in KNEE_PRETRAIN_SEEDS:
            keep = [x for x in knees[s].image if (x > 0.1).mean() >= 0.05]
            images += keep
            sources.append({"image": knees[s].name + " (synthetic render, labels unused)",
                            "slices": len(keep), "spacing_mm": KNEE_SPACING_MM})
    _DATA.update(spine=spine, spine_pool=pool, knees=knees, pt_images=images,
                 pt_sources=sources,
                 knee_eval=[s for s in KNEE_EVAL_SEEDS if s in knees],
                 knee_pool=[s for s in KNEE_POOL_SEEDS if s in knees])
    log.info("spine: %d exams (%d eval, %d pool); knees: %d; pretraining slices: %d",
             len(spine), len(SPINE_EVAL), len(pool), len(knees), len(images))


# ============================================================================ jobs
def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)


def _pretrain_job(workdir: str, steps: int) -> dict[str, Any]:
    from mskmri.nn.train import TrainConfig, fit, seed_everything
    from mskmri.pretrain.data import PretextDataset
    from mskmri.pretrain.model import pretrain_loss
    from mskmri.pretrain.task import build_network, save_encoder

    t0 = time.perf_counter()
    seed_everything(0)
    net = build_network(2, FEATURES)
    ds = PretextDataset(_DATA["pt_images"], (PATCH, PATCH))
    cfg = TrainConfig(out=Path(workdir) / "pretrain", steps=steps, batch_size=PT_BATCH,
                      lr=PT_LR, seed=0, device="cpu", checkpoint_every=max(steps // 4, 1),
                      log_every=50, schedule="cosine", warmup_steps=min(50, steps // 10))
    res = fit(net, pretrain_loss, ds, cfg, command="benchmarks/pretraining.py (pretraining)")
    path = Path(workdir) / "pretrain" / "encoder.safetensors"
    save_encoder(net, path, name="pretrain-encoder-2d",
                 command="python benchmarks/pretraining.py --ship", seed=0,
                 training_data=[{"name": s["image"], "licence": "see ../shared/data/README.md",
                                 "n": s["slices"]} for s in _DATA["pt_sources"]],
                 spacing_mm=None, dims=2,
                 extra={"mode": f"2-D pretraining on {len(ds)} slices", "patch": PATCH,
                        "steps": steps, "spine_eval_excluded": list(SPINE_EVAL)})
    first = res.history[0] if res.history else {}
    last = res.history[-1] if res.history else {}
    return {"encoder": str(path), "seconds": time.perf_counter() - t0, "steps": steps,
            "first_losses": first, "final_losses": last, "slices": len(ds)}


def _volumes(task: str, names: list[Any]) -> list[Any]:
    if task == "spine":
        return [_DATA["spine"][n] for n in names]
    return [_DATA["knees"][n] for n in names]


def _finetune_job(task: str, arm: str, budget: int, seed: int, train: list[Any],
                  evals: list[Any], init: str | None, workdir: str, steps: int
                  ) -> dict[str, Any]:
    from mskmri.nn.train import TrainConfig, fit, seed_everything
    from mskmri.nn.unet import UNet, UNetConfig
    from mskmri.pretrain.finetune import SliceSegDataset, dice, predict_volume, seg_loss

    t0 = time.perf_counter()
    seed_everything(seed)
    net = UNet(UNetConfig(spatial_dims=2, features=FEATURES, strides=(1, 2, 2, 2),
                          out_channels=2))
    ds = SliceSegDataset(_volumes(task, train), (PATCH, PATCH))
    out = Path(workdir) / f"{task}-{arm}-b{budget}-s{seed}"
    cfg = TrainConfig(out=out, steps=steps, batch_size=FT_BATCH, lr=FT_LR, seed=seed,
                      device="cpu", init=Path(init) if init else None,
                      checkpoint_every=steps, log_every=50)
    fit(net, seg_loss, ds, cfg, command=f"benchmarks/pretraining.py ({task} {arm})")
    scores = []
    for v in _volumes(task, evals):
        scores.append(dice(predict_volume(net, v.image, 8), v.labels))
    return {"task": task, "arm": arm, "budget": budget, "seed": seed,
            "dice": float(np.mean(scores)), "per_volume": scores,
            "seconds": time.perf_counter() - t0}


# ============================================================================ main
def _plan() -> dict[str, Any]:
    """Labelled volumes per (task, budget, seed): nested subsets of one permutation per seed."""
    plan: dict[str, Any] = {"spine": {}, "knee": {}}
    for task, pool, budgets in (("spine", _DATA["spine_pool"], SPINE_BUDGETS),
                                ("knee", _DATA["knee_pool"], KNEE_BUDGETS)):
        for seed in SEEDS:
            perm = list(np.random.default_rng([7, seed]).permutation(len(pool)))
            for b in budgets:
                if b <= len(pool):
                    plan[task][(b, seed)] = [pool[i] for i in perm[:b]]
    return plan


def _figure(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(doc["tasks"]), figsize=(5 * len(doc["tasks"]), 4))
    for ax, t in zip(np.atleast_1d(axes), doc["tasks"], strict=True):
        x = [b["labelled_volumes"] for b in t["budgets"]]
        for arm, colour in (("scratch", "tab:grey"), ("pretrained", "tab:blue")):
            vals = [b[f"{arm}_dice"] for b in t["budgets"]]
            m = [float(np.mean(v)) for v in vals]
            s = [float(np.std(v)) for v in vals]
            ax.errorbar(x, m, yerr=s, marker="o", capsize=3, color=colour, label=arm)
            for xi, v in zip(x, vals, strict=True):
                ax.scatter([xi] * len(v), v, s=8, color=colour, alpha=0.5)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(x)
        ax.set_xticklabels([str(v) for v in x])
        ax.set_xlabel("labelled volumes")
        ax.set_ylabel("3-D Dice on held-out volumes")
        ax.set_title(t["task"], fontsize=9)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (not a result)")
    ap.add_argument("--ship", action="store_true", help="save the encoder as pretrain-encoder-2d")
    ap.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=str(RESULTS / "pretraining.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from mskmri.paths import shared_data_dir

    shared = shared_data_dir()
    if shared is None:
        raise SystemExit("needs ../shared/data (or MSKMRI_SHARED_DATA)")
    t_start = time.perf_counter()
    prepare(Path(shared), args.quick)
    workdir = args.workdir or tempfile.mkdtemp(prefix="mskmri-pretraining-")
    pt_steps = 4 if args.quick else PT_STEPS
    ft_steps = 3 if args.quick else FT_STEPS
    plan = _plan()
    if args.quick:
        plan = {t: {k: v for k, v in p.items() if k[0] == 1 and k[1] == 0}
                for t, p in plan.items()}
    evals = {"spine": list(SPINE_EVAL), "knee": list(_DATA["knee_eval"])}
    results: list[dict[str, Any]] = []
    ctx = mp.get_context("fork")
    with cf.ProcessPoolExecutor(2, mp_context=ctx, initializer=_worker_init) as ex:
        pt_future = ex.submit(_pretrain_job, workdir, pt_steps)
        futures = [ex.submit(_finetune_job, task, "scratch", b, s, names, evals[task], None,
                             workdir, ft_steps)
                   for task in ("spine", "knee") for (b, s), names in plan[task].items()]
        pretrain = pt_future.result()
        log.info("pretraining done in %.0f s: %s", pretrain["seconds"], pretrain["final_losses"])
        futures += [ex.submit(_finetune_job, task, "pretrained", b, s, names, evals[task],
                              pretrain["encoder"], workdir, ft_steps)
                    for task in ("spine", "knee") for (b, s), names in plan[task].items()]
        for f in cf.as_completed(futures):
            r = f.result()
            results.append(r)
            log.info("%s %s budget %d seed %d: Dice %.3f (%.0f s)", r["task"], r["arm"],
                     r["budget"], r["seed"], r["dice"], r["seconds"])
    command = "python benchmarks/pretraining.py" + ("".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])))
    import torch

    machine = (f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPU cores "
               f"(shared with other work, load average {os.getloadavg()[0]:.1f} at the end), "
               f"CPU only, 2 worker processes x 1 torch thread, torch {torch.__version__}")
    tasks = []
    for task, title, eval_names in (
            ("spine", "vertebral-body segmentation (real lumbar MRI, sagittal 2-D U-Net)",
             list(SPINE_EVAL)),
            ("knee", "knee joint effusion segmentation (synthetic renders, synthetic labels)",
             [_DATA["knees"][s].name for s in _DATA["knee_eval"]])):
        budgets = []
        for b in sorted({k[0] for k in plan[task]}):
            row: dict[str, Any] = {"labelled_volumes": b}
            for arm in ("scratch", "pretrained"):
                rs = sorted((r for r in results if r["task"] == task and r["arm"] == arm
                             and r["budget"] == b), key=lambda r: r["seed"])
                row[f"{arm}_dice"] = [round(r["dice"], 4) for r in rs]
            row["seeds"] = sorted(s for (bb, s) in plan[task] if bb == b)
            row["train_volumes"] = [[_volumes(task, [n])[0].name for n in plan[task][(b, s)]]
                                    for s in row["seeds"]]
            ms, mp_ = float(np.mean(row["scratch_dice"])), float(np.mean(row["pretrained_dice"]))
            row["scratch_mean"], row["pretrained_mean"] = round(ms, 4), round(mp_, 4)
            row["scratch_std"] = round(float(np.std(row["scratch_dice"])), 4)
            row["pretrained_std"] = round(float(np.std(row["pretrained_dice"])), 4)
            row["relative_gain"] = round((mp_ - ms) / ms, 4) if ms > 0 else None
            budgets.append(row)
        pool = _DATA["spine_pool"] if task == "spine" else \
            [_DATA["knees"][s].name for s in _DATA["knee_pool"]]
        tasks.append({
            "task": title, "eval_volumes": eval_names, "train_pool": list(pool),
            "pretraining_images": [s["image"] for s in _DATA["pt_sources"]],
            "command": command, "machine": machine, "budgets": budgets,
            "metric": "mean over evaluation volumes of the 3-D Dice of the stacked slice "
                      "predictions (foreground vs background), on the experiment's grid "
                      f"({SPINE_SPACING_MM if task == 'spine' else KNEE_SPACING_MM} mm in-plane)",
        })
    doc = {
        "schema": "mskmri/benchmark-pretraining/1",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": bool(args.quick),
        "tasks": tasks,
        "pretraining": {**pretrain, "encoder": "pretrain-encoder-2d" if args.ship else None,
                        "sources": _DATA["pt_sources"]},
        "settings": {"features": list(FEATURES), "patch": PATCH, "seeds": list(SEEDS),
                     "finetune_steps": ft_steps, "finetune_batch": FT_BATCH, "finetune_lr": FT_LR,
                     "pretrain_steps": pt_steps, "pretrain_batch": PT_BATCH, "pretrain_lr": PT_LR,
                     "spine_eval_rule": "fixed in the script before any run; hyper-parameters "
                                        "fixed a priori, nothing tuned"},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    out = Path(args.out)
    from mskmri.io import atomic_write_json

    atomic_write_json(out, doc)
    _figure(doc, out.with_suffix(".png"))
    if args.ship:
        _ship(Path(pretrain["encoder"]))
    log.info("wrote %s in %.0f s", out, doc["seconds"])
    return 0


def _ship(encoder: Path) -> None:
    """Copy the encoder and its card into the package's weights folder."""
    import shutil

    from mskmri.weights import WEIGHTS_DIR

    for suffix in (".safetensors", ".json"):
        shutil.copyfile(encoder.with_suffix(suffix), WEIGHTS_DIR / f"pretrain-encoder-2d{suffix}")
    log.info("shipped %s as pretrain-encoder-2d", encoder)


if __name__ == "__main__":
    raise SystemExit(main())
