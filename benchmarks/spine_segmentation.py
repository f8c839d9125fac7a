"""Vertebral-body segmentation and the whole spine pipeline on held-out real lumbar MRI.

Run from the repository root::

    .venv/bin/python benchmarks/spine_segmentation.py [--data ../shared/data] \
        [--model spine-seg] [--out benchmarks/results/spine_segmentation.json]

What it does (issue 6, "Segmentation" and "The whole pipeline"):

- Split by exam, fixed in :data:`mskmri.segment._spine_data.SPLIT`: the test exams (4
  MyoSegmenTUM + 2 Chu) were never used for training or checkpoint selection; the validation
  exams (chose the checkpoint) are reported separately.
- Segmentation: :func:`mskmri.segment.spine.segment_spine` from the image alone. Dice of the
  binary vertebral-bone mask (bodies + sacrum; the predicted discs, cord and CSF are left out,
  as the manual masks hold bodies only) against the manual mask (any label), on the
  canonical grid, **within the labelled S-I band** (the rows of the manual labels +- 3 mm):
  MyoSegmenTUM labels only L1-L5, so T12 and the sacrum are bone the manual mask leaves out;
  the whole-volume Dice is also given. Target: >= 0.85 on every held-out exam (goal 0.90).
- Levels: whether the levels were named from anatomy (sacrum found) and, per manual level,
  whether the predicted body over it got the same name (MyoSegmenTUM L1-L5; Chu: the lowest
  instance is S1, the ones above L5, L4, ... (:func:`chu_to_spine`)).
- End to end: :func:`mskmri.measure.spine.analyse_spine` on the predicted map vs on the manual
  map. Heights matched by overlap (the predicted body covering each manual body); L1-L5 Cobb
  (a) as reported under the predicted level names and (b) between the predicted bodies that
  cover manual L1 and L5 (geometry only, independent of level naming). Targets: median
  |height difference| <= 2.0 mm, |L1-L5 difference| <= 5 deg.
- ``previous``: the summary and per-exam numbers of the file this run overwrites (its commit
  and date), so a change of the pipeline shows its before/after; ``change`` says what changed
  and what prompted it (:data:`CHANGE`); ``not_shipped_trials`` of that file is carried over.
- ``model.ensemble_members``: the networks the model's card lists, whose class probabilities
  are averaged with the model's (:data:`mskmri.segment.spine.MEMBERS_KEY`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_commit  # noqa: E402

from mskmri.io import atomic_write_json, read, read_labels  # noqa: E402
from mskmri.labels import VERTEBRA_ID, get_source, is_vertebra, spine_labels_for  # noqa: E402
from mskmri.measure.spine import analyse_spine, cobb_angle  # noqa: E402
from mskmri.paths import shared_data_dir  # noqa: E402
from mskmri.segment import _spine_data as sd  # noqa: E402
from mskmri.segment.spine import segment_spine  # noqa: E402
from mskmri.volume import LabelVolume  # noqa: E402

TARGET_DICE = 0.85
GOAL_DICE = 0.90
TARGET_HEIGHT_MM = 2.0
TARGET_COBB_DEG = 5.0
HEIGHTS = ("anterior_height", "middle_height", "posterior_height")
#: What the pipeline change of this run was and what prompted it (recorded in the JSON).
CHANGE = {
    "what": ["spine-seg is a two-model ensemble: its class probabilities are averaged with "
             "those of spine-seg-2, the same network trained on for 4000 more steps from the "
             "shipped weights (seed 3, rotation 30 deg, best hook check step 3600), listed "
             "under ensemble_members in the spine-seg card (segment.spine.MEMBERS_KEY)"],
    "why": "spine-seg-2 alone raised the validation Dice (0.853) but turned the validation "
           "L1-L5 angles (Cobb max 4.7 deg) and was not shipped (not_shipped_trials); "
           "averaging the two is a different candidate, scored once",
    "selection_rule": "fixed before scoring, validation exams only (the session-8 TTA rule's "
                      "thresholds): mean band Dice >= 0.8526, no validation exam down by more "
                      "than 0.005, matched L1-L5 Cobb max <= 2.173 deg; the test exams scored "
                      "only after it passed, reported whatever they are",
    "validation_before_after": {"dice_band_mean": [0.8496, 0.854],
                                "dice_band": {"myosegmentum/exam09": [0.856, 0.8612],
                                              "myosegmentum/exam10": [0.8589, 0.8619],
                                              "chu2015/exam10": [0.834, 0.8389]},
                                "cobb_matched_abs_diff_max_deg": [1.673, 1.411]},
    "cost": "two forward passes of the 2-D U-Net per slice instead of one",
    "earlier": {
        "what": [
            "bone of the bodies-only partner network: whole-region veto (segment.spine.veto_bone) "
            "instead of the averaged bone probability (fuse_bone)",
            "spine-seg fine-tuned 900 steps with rotation augmentation 30 deg (was 12) from the "
            "previous model (spine_train.ROTATION_DEG)",
            "column filter: median over at least 5 instances (segment.spine.COLUMN_MIN_NEIGHBOURS)",
        ],
        "why": "the averaged probability trimmed the anterior-inferior corner of L5 and joined "
               "bodies across dark discs, turning endplates by up to 40 deg; the steep L5 of the "
               "Chu exams lost its anterior-inferior corner in the network itself",
        "prompted_by": "validation exam chu2015/exam10 (matched L1-L5 Cobb difference -22.3 deg, "
                       "L5 inferior endplate +17.6 deg) and the 12 training exams (chu2015/exam02 "
                       "-29.2, exam08 -19.7 deg). The veto was chosen on training + validation "
                       "exams (mean |difference| 7.3 -> 3.8 deg, bone Dice 0.857 -> 0.853). A first "
                       "test run with the veto and the previous model (test Dice mean 0.849, Cobb "
                       "5.4, -1.1, 0.7, -2.7, -4.1, 29.6 deg) showed chu2015/exam12's L5 losing its "
                       "anterior-inferior corner: that test failure prompted the rotation fine-tune, "
                       "which was then judged on the validation exams only (Dice 0.848 -> 0.850, "
                       "median |endplate error| 2.0 -> 1.7 deg) before this run. The column-filter "
                       "change was prompted by the U2AD test slices private_1/2 (see "
                       "spine_cervical.json); it changes no number here",
        "endplate_fit_ranges_tried": "15-85% (kept), 10-90%, 20-80%, 25-75%, 15-75%, 30-70% of the "
                                     "AP depth on the training + validation exams: none better "
                                     "(shorter lines are noisier); the remaining errors are "
                                     "predicted bodies whose anterior corners are rounded off",
        "partner_rules_tried": "averaged (previous), network alone, union, weighted 0.7/0.3, "
                               "voxel-wise trimming where the partner is unsure or confident: every "
                               "rule that lets the partner trim a body cut chu2015/exam10's L5 "
                               "corner (Cobb 13-29 deg off); every rule that lets it add bone "
                               "joined chu2015/exam02's L4 and L5",
    },
}


def chu_to_spine(path: Path) -> LabelVolume:
    """Chu instances -> VerSe ids: ordered by centroid along S-I, the lowest is S1 (sacrum,
    26; ``mskmri.labels.CHU2015``), the one above it L5 (24), then L4, ... upwards."""
    gt = read_labels(path, strict=False)
    arr = np.asarray(gt.array)
    values = [int(v) for v in np.unique(arr) if v]
    s_pos = {v: float((gt.voxel_to_world(np.argwhere(arr == v)) @ np.array([0, 0, 1.0])).mean())
             for v in values}
    order = sorted(values, key=lambda v: -s_pos[v])  # top first
    lut = np.zeros(int(arr.max()) + 1, np.int32)
    lut[order[-1]] = 26
    for rank, v in enumerate(reversed(order[:-1])):
        lut[v] = VERTEBRA_ID["L5"] - rank
    return LabelVolume(lut[arr], gt.affine, schema="spine")


def manual_spine(source: str, path: Path) -> LabelVolume:
    """The manual mask in the spine schema (VerSe ids)."""
    if source == "chu2015":
        seg = chu_to_spine(path)
    else:
        gt = read_labels(path, strict=False)
        seg = LabelVolume(get_source("myosegmentum").apply(np.asarray(gt.array)), gt.affine,
                          schema="spine")
    seg.labels = spine_labels_for(set(seg.present_values()))
    return seg


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), nd)


def evaluate_exam(data: Path, source: str, exam: str, model: str) -> dict[str, Any]:
    """Segmentation Dice, level naming and end-to-end measurement differences of one exam."""
    img_p, gt_p = sd.exam_paths(data, source, exam)
    image = read(img_p)
    manual = manual_spine(source, gt_p)
    t0 = time.perf_counter()
    res = segment_spine(image, model=model)
    t_seg = time.perf_counter() - t0
    pred = res.labels
    can_gt = sd.to_canonical(manual).array
    can_pred = sd.to_canonical(pred).array
    band = sd.label_band(can_gt)
    # vertebral bone only: discs, cord and CSF of the prediction are not in the manual mask
    bone = np.isin(can_pred, [v for v in np.unique(can_pred) if is_vertebra(int(v))])
    out: dict[str, Any] = {
        "dice_band": _r(sd.binary_dice(bone[:, band], can_gt[:, band] > 0), 4),
        "dice_whole_volume": _r(sd.binary_dice(bone, can_gt > 0), 4),
        "predicted_structures": sorted({pred.labels.get(int(v), str(v)) for v in
                                        pred.present_values() if not is_vertebra(int(v))}),
        "not_segmented": res.not_segmented,
        "segment_seconds": _r(t_seg, 1), "levels": res.level_source, "ordinal": res.ordinal,
        "warnings": res.warnings,
    }
    # level naming and matching: the predicted body over each manual body
    match: dict[str, tuple[int, str]] = {}
    for v in manual.present_values():
        if v == 26:
            continue
        vals, counts = np.unique(pred.array[manual.array == v], return_counts=True)
        keep = vals != 0
        if keep.any():
            p = int(vals[keep][np.argmax(counts[keep])])
            match[manual.labels[v]] = (p, pred.labels.get(p, str(p)))
    out["level_names_correct"] = {k: (name == k) for k, (_, name) in match.items()}
    t1 = time.perf_counter()
    a_man = analyse_spine(manual, mid_sagittal_2d=False)
    a_pred = analyse_spine(pred, mid_sagittal_2d=False)
    out["measure_seconds"] = _r(time.perf_counter() - t1, 1)
    man = {m.key: m.value for m in a_man.measurements}
    prd = {m.key: m.value for m in a_pred.measurements}
    diffs = []
    per_level: dict[str, dict[str, float | None]] = {}
    for lvl, (_, pname) in match.items():
        row: dict[str, float | None] = {}
        for h in HEIGHTS:
            ref, got = man.get(f"{h}.{lvl}"), prd.get(f"{h}.{pname}")
            if ref is not None and got is not None:
                row[h] = _r(got - ref)
                diffs.append(abs(got - ref))
        per_level[lvl] = row
    out["height_diff_mm"] = per_level
    out["height_abs_diff_median_mm"] = _r(float(np.median(diffs)) if diffs else None)
    out["height_pairs"] = len(diffs)
    ref_cobb = man.get("cobb_angle.L1-L5")
    out["cobb_L1_L5_manual_deg"] = _r(ref_cobb)
    named = prd.get("cobb_angle.L1-L5")
    out["cobb_L1_L5_named_diff_deg"] = _r(named - ref_cobb) if (
        named is not None and ref_cobb is not None) else None
    matched = None
    if "L1" in match and "L5" in match:
        gu = a_pred.vertebrae.get(match["L1"][1])
        gl = a_pred.vertebrae.get(match["L5"][1])
        if gu is not None and gl is not None and ref_cobb is not None:
            matched = cobb_angle(gu, gl) - ref_cobb
    out["cobb_L1_L5_matched_diff_deg"] = _r(matched)
    return out


def _summary(exams: dict[str, dict[str, Any]]) -> dict[str, Any]:
    dice = [e["dice_band"] for e in exams.values()]
    heights = [e["height_abs_diff_median_mm"] for e in exams.values()
               if e["height_abs_diff_median_mm"] is not None]
    cobb = [abs(e["cobb_L1_L5_matched_diff_deg"]) for e in exams.values()
            if e["cobb_L1_L5_matched_diff_deg"] is not None]
    names = [ok for e in exams.values() for ok in e["level_names_correct"].values()]
    return {"dice_band_mean": _r(float(np.mean(dice)), 4), "dice_band_min": _r(min(dice), 4),
            "all_exams_dice_ge_target": bool(min(dice) >= TARGET_DICE),
            "height_median_of_exam_medians_mm": _r(float(np.median(heights))) if heights else None,
            "cobb_matched_abs_diff_max_deg": _r(max(cobb)) if cobb else None,
            "cobb_matched_abs_diff_mean_deg": _r(float(np.mean(cobb))) if cobb else None,
            "cobb_matched_within_target": sum(c <= TARGET_COBB_DEG for c in cobb),
            "cobb_matched_n": len(cobb),
            "level_names_correct_fraction": _r(float(np.mean(names))) if names else None,
            "exams_with_anatomical_levels": sum(not e["ordinal"] for e in exams.values())}


def _previous(path: Path) -> dict[str, Any] | None:
    """Commit, date, summaries and per-exam Cobb/Dice of the result file about to be replaced."""
    import json

    if not path.exists():
        return None
    old = json.loads(path.read_text())
    out: dict[str, Any] = {"git_commit": old.get("git_commit"), "date_utc": old.get("date_utc"),
                           "model_sha256": (old.get("model") or {}).get("sha256")}
    for part in ("test", "validation"):
        if part in old:
            out[part] = {"summary": old[part]["summary"], "exams": {
                k: {n: e.get(n) for n in ("dice_band", "height_abs_diff_median_mm",
                                          "cobb_L1_L5_matched_diff_deg")}
                for k, e in old[part]["exams"].items()}}
    return out


def _not_shipped_trials(path: Path) -> list[Any]:
    """The ``not_shipped_trials`` record of the file about to be replaced (kept as it is)."""
    import json

    if not path.exists():
        return []
    return list(json.loads(path.read_text()).get("not_shipped_trials") or [])


def _member_cards(model: str, card: Any) -> list[Any]:
    """Cards of the ensemble members ``card`` lists (files beside ``model``'s)."""
    from mskmri.nn.registry import read_card, resolve_weights
    from mskmri.segment.spine import MEMBERS_KEY

    folder = resolve_weights(model)[0].parent
    return [read_card(folder / name) for name in (card.extra or {}).get(MEMBERS_KEY) or []]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="shared data folder")
    ap.add_argument("--model", default="spine-seg", help="model name or weight file")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results"
                    / "spine_segmentation.json")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    data = args.data or shared_data_dir()
    if data is None:
        sys.stderr.write("no shared data: give --data or set MSKMRI_SHARED_DATA\n")
        return 2
    from mskmri.nn.registry import read_card, resolve_weights

    card = read_card(resolve_weights(args.model)[0])
    previous = _previous(args.out)
    previous_trials = _not_shipped_trials(args.out)
    t0 = time.perf_counter()
    doc: dict[str, Any] = {
        "schema": "mskmri/benchmark/spine_segmentation/1",
        "command": " ".join(["python", *sys.argv]),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"node": platform.node(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": args.threads,
                    "python": platform.python_version(), "note": "2 CPU cores shared with "
                    "other jobs: timings are upper bounds"},
        "git_commit": git_commit(),
        "model": {"name": card.name, "sha256": card.sha256, "command": card.command,
                  "validation": card.validation,
                  "ensemble_members": [{"name": m.name, "sha256": m.sha256,
                                        "command": m.command, "validation": m.validation}
                                       for m in _member_cards(args.model, card)]},
        "split": sd.SPLIT,
        "targets": {"dice_band": TARGET_DICE, "dice_goal": GOAL_DICE,
                    "height_median_abs_diff_mm": TARGET_HEIGHT_MM,
                    "cobb_L1_L5_abs_diff_deg": TARGET_COBB_DEG},
        "metric": "binary vertebral-bone Dice (bodies + sacrum vs any manual label) within the "
                  "labelled S-I band +- 3 mm, canonical 1 mm grid; see the module docstring",
    }
    for part in ("test", "validation"):
        exams = {f"{src}/{ex}": evaluate_exam(data, src, ex, args.model)
                 for src, names in sd.SPLIT[part].items() for ex in names}
        doc[part] = {"exams": exams, "summary": _summary(exams)}
        for k, e in exams.items():
            sys.stdout.write(f"{part} {k}: Dice {e['dice_band']} (whole {e['dice_whole_volume']}),"
                             f" heights median {e['height_abs_diff_median_mm']} mm, Cobb matched"
                             f" {e['cobb_L1_L5_matched_diff_deg']} deg, levels "
                             f"{'ordinal' if e['ordinal'] else 'anatomy'}, "
                             f"{e['segment_seconds']} s\n")
    doc["seconds_total"] = round(time.perf_counter() - t0, 1)
    doc["change"] = CHANGE
    doc["previous"] = previous
    if previous_trials:
        doc["not_shipped_trials"] = previous_trials
    atomic_write_json(args.out, doc)
    sys.stdout.write(f"test summary: {doc['test']['summary']}\nwrote {args.out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
