"""Vertebral fracture grading on fractures rendered into real spine label maps.

No fractured spine image exists in the shared data, so fractures are rendered into the real
manual masks (:func:`mskmri.measure.grading.render_fracture`: wedge, biconcave or crush, on the
target's mid-sagittal section, with a known worst height loss ``L``); the Genant grade of a
render is that of ``L`` (grade 0 = normal variation, L < 20%; 1 = 20-25%; 2 = 25-40%; 3 =
40-60%). Splits by subject (exam):

- painter training: segmentation *train* exams (+ VerSe 0007, U2AD clinical slices);
- SVM fitting: segmentation *validation* exams (MyoSegmenTUM 09, 10, Chu 10), grades drawn
  uniformly (class-balanced);
- test: segmentation *test* exams (MyoSegmenTUM 11-14, Chu 11, 12; never seen by the
  painter or the SVM), grades drawn with the HealthiVert-GAN test-set proportions (VerSe,
  ``vertebra_data.json``), and a second, class-balanced test draw.

Reported: inpainting quality (pseudo-healthy minus true height of every *intact* vertebra, mm
and %), 4-class macro-F1 and per-grade precision/recall/F1 of the linear SVM on the three
RHLVs, against (a) TotalSegmentator's rule min/max height < 0.8 (binary: fractured or not),
(b) the same ratio with the Genant cut-offs (1 - min/max as the height loss), (c) the largest
RHLV with the Genant cut-offs (no learning). Both painters: the shipped network and the
model-free neighbour interpolation.

Usage::

    python benchmarks/vertebra_grading.py [--data DIR] [--renders 40] [--write-svm]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_commit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from mskmri.anomaly.vertebra_inpaint import (  # noqa: E402
    SVM_EXAMS,
    TEST_EXAMS,
    exam_maps,
    network_painter,
)
from mskmri.io import atomic_path, atomic_write_json  # noqa: E402
from mskmri.measure.grading import (  # noqa: E402
    FRACTURE_SHAPES,
    GENANT_THRESHOLDS,
    SECTIONS,
    SVM_FILE,
    GenantSvm,
    InterpolationPainter,
    extract_section,
    genant_from_loss,
    neighbours,
    pseudo_healthy,
    render_fracture,
    rhlv,
    section_heights,
)
from mskmri.paths import shared_data_dir  # noqa: E402

#: Height-loss range (fraction) rendered for each Genant grade.
GRADE_LOSS: dict[int, tuple[float, float]] = {0: (0.0, GENANT_THRESHOLDS[0]),
                                              1: (GENANT_THRESHOLDS[0], GENANT_THRESHOLDS[1]),
                                              2: (GENANT_THRESHOLDS[1], GENANT_THRESHOLDS[2]),
                                              3: (GENANT_THRESHOLDS[2], 0.60)}
#: SVM regularisation values tried (leave-one-exam-out on the SVM exams).
C_GRID: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)
#: The paper's macro-F1 on VerSe CT.
PAPER_MACRO_F1 = 0.723



def _machine() -> dict[str, Any]:
    mem = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            mem = round(int(fh.readline().split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return {"node": platform.node(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "memory_gib": mem, "python": platform.python_version(),
            "note": "shared 2-core CPU with other jobs running: timings are upper bounds"}


def healthivert_proportions(data: Path, part: str = "test") -> dict[int, float]:
    """Genant grade proportions of a HealthiVert-GAN split (VerSe CT)."""
    d = json.loads((data / "spine" / "healthivert_genant_grades" / "vertebra_data.json")
                   .read_text(encoding="utf-8"))[part]
    g = np.bincount(np.asarray(list(d.values()), int), minlength=4)
    return {i: float(g[i] / g.sum()) for i in range(4)}


def vertebra_sections(maps: list[Any]) -> list[Any]:
    """The measurement section of every vertebra with both neighbours."""
    out = []
    for m in maps:
        for v, nb in neighbours(m.seg, m.centroids).items():
            if isinstance(nb, str):
                continue
            sec = extract_section(m.seg, v, nb[0], nb[1], centroids=m.centroids)
            out.append((m.name, sec))
    return out


def renders(sections: list[Any], n: int, probs: dict[int, float], seed: int
            ) -> list[dict[str, Any]]:
    """``n`` fracture renders per vertebra: grade ~ ``probs``, shape uniform, loss uniform."""
    rng = np.random.default_rng(seed)
    out = []
    p = np.array([probs[g] for g in range(4)])
    for k, (exam, sec) in enumerate(sections):
        for _ in range(n):
            g = int(rng.choice(4, p=p / p.sum()))
            loss = float(rng.uniform(*GRADE_LOSS[g]))
            shape = str(rng.choice(FRACTURE_SHAPES))
            mask = render_fracture(sec, shape, loss)
            obs, _ = section_heights(sec, mask)
            out.append({"vertebra": k, "exam": exam, "structure": sec.structure,
                        "grade": genant_from_loss(loss), "loss": loss, "shape": shape,
                        "observed": obs})
    return out


def pseudo_heights(sections: list[Any], painter: Any) -> list[dict[str, float]]:
    """Pseudo-healthy heights (mm) of every section."""
    return [section_heights(sec, pseudo_healthy(sec, painter))[0] for _, sec in sections]


def features(rs: list[dict[str, Any]], ph: list[dict[str, float]]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RHLV features, grades and a validity mask of renders."""
    x, y, ok = [], [], []
    for r in rs:
        f = rhlv(ph[r["vertebra"]], r["observed"])
        good = len(f) == 3
        x.append([f.get(s, 0.0) for s in SECTIONS])
        y.append(r["grade"])
        ok.append(good)
    return np.asarray(x, float), np.asarray(y, int), np.asarray(ok, bool)


def rule_predictions(rs: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """TotalSegmentator's binary rule and its Genant version from observed heights."""
    binary, graded = [], []
    for r in rs:
        h = r["observed"]
        if len(h) < 3:
            binary.append(0)
            graded.append(0)
            continue
        ratio = min(h.values()) / max(h.values())
        binary.append(int(ratio < 0.8))
        graded.append(genant_from_loss(1.0 - ratio))
    return np.asarray(binary), np.asarray(graded)


def scores(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """4-class macro-F1, per-grade P/R/F1 and the confusion matrix."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(y, pred, labels=[0, 1, 2, 3], zero_division=0)
    return {"macro_f1": round(float(f1_score(y, pred, labels=[0, 1, 2, 3], average="macro",
                                             zero_division=0)), 4),
            "per_grade": {str(g): {"precision": round(float(p[g]), 3),
                                   "recall": round(float(r[g]), 3),
                                   "f1": round(float(f[g]), 3), "n": int(s[g])}
                          for g in range(4)},
            "confusion_rows_true_cols_pred": confusion_matrix(y, pred, labels=[0, 1, 2, 3])
            .tolist()}


def binary_scores(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """F1, sensitivity and specificity of fractured (grade >= 1) vs not."""
    from sklearn.metrics import f1_score

    t, q = y >= 1, pred >= 1
    return {"f1": round(float(f1_score(t, q, zero_division=0)), 4),
            "sensitivity": round(float((t & q).sum() / max(t.sum(), 1)), 4),
            "specificity": round(float((~t & ~q).sum() / max((~t).sum(), 1)), 4)}


def inpaint_quality(sections: list[Any], ph: list[dict[str, float]]) -> dict[str, Any]:
    """Pseudo-healthy minus true height of intact vertebrae, per section (mm and %)."""
    out: dict[str, Any] = {}
    per: list[dict[str, Any]] = []
    for (exam, sec), p in zip(sections, ph, strict=True):
        true, _ = section_heights(sec, sec.target_fine)
        per.append({"exam": exam, "structure": sec.structure,
                    **{f"{s}_error_mm": round(p[s] - true[s], 2)
                       for s in SECTIONS if s in p and s in true}})
        for s in SECTIONS:
            if s in p and s in true:
                out.setdefault(s, []).append((p[s] - true[s], (p[s] - true[s]) / true[s]))
    summary = {}
    for s, v in out.items():
        a = np.asarray(v)
        summary[s] = {"n": len(a), "median_abs_error_mm": round(float(np.median(np.abs(a[:, 0]))), 2),
                      "mean_error_mm": round(float(a[:, 0].mean()), 2),
                      "median_abs_error_pct": round(float(100 * np.median(np.abs(a[:, 1]))), 1),
                      "p90_abs_error_pct": round(float(100 * np.percentile(np.abs(a[:, 1]), 90)), 1)}
    return {"summary": summary, "vertebrae": per}


def choose_c(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int) -> tuple[float, dict[str, float]]:
    """SVM C with the best leave-one-exam-out macro-F1 on the SVM exams (:data:`C_GRID`)."""
    from sklearn.metrics import f1_score

    cv: dict[str, float] = {}
    for c in C_GRID:
        pred = np.zeros_like(y)
        for g in np.unique(groups):
            held = groups == g
            pred[held] = GenantSvm.fit(x[~held], y[~held], c=c, seed=seed).predict(x[held])
        cv[str(c)] = round(float(f1_score(y, pred, labels=[0, 1, 2, 3], average="macro",
                                          zero_division=0)), 4)
    best = max(C_GRID, key=lambda c: cv[str(c)])
    return best, cv


def evaluate_painter(name: str, painter: Any, svm_secs: list[Any], test_secs: list[Any],
                     svm_rs: list[dict[str, Any]], test_sets: dict[str, list[dict[str, Any]]],
                     seed: int, prior: dict[int, float]) -> tuple[dict[str, Any], GenantSvm]:
    """Inpainting quality and grading scores of one painter; returns the prior-weighted SVM.

    ``prior``: grade -> class weight (grade share among real vertebrae / share in renders).
    """
    t = time.perf_counter()
    ph_svm = pseudo_heights(svm_secs, painter)
    ph_test = pseudo_heights(test_secs, painter)
    x, y, ok = features(svm_rs, ph_svm)
    groups = np.array([r["exam"] for r in svm_rs])
    c, cv = choose_c(x[ok], y[ok], groups[ok], seed)
    base = {"painter": name, "fitted_on": {k: list(v) for k, v in SVM_EXAMS.items()},
            "renders": int(ok.sum()), "C_leave_one_exam_out_macro_f1": cv,
            "by": "benchmarks/vertebra_grading.py"}
    svms = {"svm": GenantSvm.fit(x[ok], y[ok], c=c, seed=seed, info=base),
            # the renders are class-balanced; weighting each grade by its share among real
            # (VerSe) vertebrae moves the boundaries towards a population that is mostly grade 0
            "svm_prior": GenantSvm.fit(x[ok], y[ok], c=c, seed=seed, class_weight=prior,
                                       info={**base, "class_weight_from":
                                             "HealthiVert-GAN train split grade proportions"})}
    res: dict[str, Any] = {"inpainting_intact_test": inpaint_quality(test_secs, ph_test),
                           "inpainting_intact_svm_exams": inpaint_quality(svm_secs, ph_svm)["summary"]}
    for tname, rs in test_sets.items():
        xt, yt, okt = features(rs, ph_test)
        res[tname] = {"unmeasured_renders": int((~okt).sum())}
        shapes = np.array([r["shape"] for r in rs])
        for key, svm in svms.items():
            pred = np.where(okt, svm.predict(xt), 0)
            res[tname][key] = scores(yt, pred)
            res[tname][key + "_binary"] = binary_scores(yt, pred)
            res[tname][key + "_by_shape"] = {
                sh: {"macro_f1": scores(yt[shapes == sh], pred[shapes == sh])["macro_f1"],
                     "recall_per_grade": {g: v["recall"] for g, v in scores(
                         yt[shapes == sh], pred[shapes == sh])["per_grade"].items()},
                     "n": int((shapes == sh).sum())}
                for sh in FRACTURE_SHAPES}
        rhlv_rule = np.array([genant_from_loss(max(f)) for f in xt])
        res[tname]["max_rhlv_genant_rule"] = scores(yt, rhlv_rule)
        res[tname]["max_rhlv_genant_rule_binary"] = binary_scores(yt, rhlv_rule)
    res["svm"] = svms["svm"].to_dict()
    res["svm_prior"] = svms["svm_prior"].to_dict()
    res["seconds"] = round(time.perf_counter() - t, 1)
    return res, svms["svm_prior"]


def confusion_figure(path: Path, panels: list[tuple[str, list[list[int]]]]) -> None:
    """Confusion matrices side by side (rows true, columns predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4))
    for ax, (title, cm) in zip(np.atleast_1d(axes), panels, strict=True):
        a = np.asarray(cm, float)
        norm = a / np.maximum(a.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                ax.text(j, i, int(a[i, j]), ha="center", va="center",
                        color="white" if norm[i, j] > 0.5 else "black", fontsize=9)
        ax.set_xticks(range(a.shape[1]))
        ax.set_yticks(range(a.shape[0]))
        ax.set_xlabel("predicted grade")
        ax.set_ylabel("rendered grade")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="shared data folder")
    ap.add_argument("--renders", type=int, default=40, help="renders per vertebra (40)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="vertebra-inpaint", help="painter network (name/path; 'none' = interpolation only)")
    ap.add_argument("--write-svm", action="store_true",
                    help="write the network painter's prior-weighted SVM to "
                         f"src/mskmri/weights/{SVM_FILE}")
    ap.add_argument("--out", type=Path,
                    default=ROOT / "benchmarks" / "results" / "vertebra_grading.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    data = args.data or shared_data_dir()
    if data is None:
        sys.stderr.write("no shared data: give --data or set MSKMRI_SHARED_DATA\n")
        return 2
    t0 = time.perf_counter()
    svm_secs = vertebra_sections(exam_maps(data, SVM_EXAMS))
    test_secs = vertebra_sections(exam_maps(data, TEST_EXAMS))
    test_p = healthivert_proportions(data, "test")
    uniform = {g: 0.25 for g in range(4)}
    svm_rs = renders(svm_secs, args.renders, uniform, seed=args.seed)
    test_sets = {"test_healthivert_proportions": renders(test_secs, args.renders, test_p,
                                                         seed=args.seed + 1),
                 "test_balanced": renders(test_secs, args.renders, uniform, seed=args.seed + 2)}
    t_render = time.perf_counter() - t0
    doc: dict[str, Any] = {
        "schema": "mskmri/benchmark/vertebra_grading/1",
        "command": " ".join(["python", *sys.argv]),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(), "git_commit": git_commit(),
        "split": {"svm": {k: list(v) for k, v in SVM_EXAMS.items()},
                  "test": {k: list(v) for k, v in TEST_EXAMS.items()},
                  "painter_training": "segmentation train exams + VerSe 0007 + U2AD clinical"},
        "vertebrae": {"svm": len(svm_secs), "test": len(test_secs)},
        "renders_per_vertebra": args.renders,
        "grade_loss_ranges": {str(g): list(r) for g, r in GRADE_LOSS.items()},
        "test_grade_proportions_healthivert": test_p,
        "paper_macro_f1_ct": PAPER_MACRO_F1,
        "seconds_rendering": round(t_render, 1),
    }
    rules = {}
    for tname, rs in test_sets.items():
        y = np.array([r["grade"] for r in rs])
        binary, graded = rule_predictions(rs)
        rules[tname] = {"totalsegmentator_min_max_lt_0_8": binary_scores(y, binary),
                        "min_max_ratio_genant_4class": scores(y, graded)}
    doc["rules_from_observed_heights"] = rules
    painters: dict[str, Any] = {} if args.model == "none" else {
        "network": network_painter(args.model)}
    painters["interpolation"] = InterpolationPainter()
    svms = {}
    train_p = healthivert_proportions(data, "train")
    prior = {g: train_p[g] / uniform[g] for g in range(4)}
    doc["svm_prior_class_weights"] = prior
    for name, painter in painters.items():
        doc[f"painter_{name}"], svms[name] = evaluate_painter(
            name, painter, svm_secs, test_secs, svm_rs, test_sets, args.seed, prior)
    t = "test_healthivert_proportions"
    main_name = "network" if "network" in painters else "interpolation"
    main = doc[f"painter_{main_name}"][t]
    if "network" in painters:
        doc["painter_network"]["model_card"] = {k: painters["network"].card.get(k)
                                                for k in ("name", "sha256")}
    fig = args.out.parent / "figures" / "vertebra_grading_confusion.png"
    confusion_figure(fig, [
        (f"SVM, prior-weighted ({main_name} painter;\nshipped) macro-F1 "
         f"{main['svm_prior']['macro_f1']}", main["svm_prior"]["confusion_rows_true_cols_pred"]),
        (f"SVM, class-balanced\nmacro-F1 {main['svm']['macro_f1']}",
         main["svm"]["confusion_rows_true_cols_pred"]),
        (f"max RHLV, Genant cut-offs\nmacro-F1 {main['max_rhlv_genant_rule']['macro_f1']}",
         main["max_rhlv_genant_rule"]["confusion_rows_true_cols_pred"]),
        ("1 - min/max height, Genant cut-offs\nmacro-F1 "
         f"{rules[t]['min_max_ratio_genant_4class']['macro_f1']}",
         rules[t]["min_max_ratio_genant_4class"]["confusion_rows_true_cols_pred"])])
    doc["figure"] = str(fig.relative_to(ROOT)) if fig.is_relative_to(ROOT) else str(fig)
    if args.write_svm and "network" in svms:
        from mskmri.weights import WEIGHTS_DIR

        atomic_write_json(WEIGHTS_DIR / SVM_FILE, svms["network"].to_dict())
        doc["svm_written"] = f"src/mskmri/weights/{SVM_FILE}"
    doc["seconds_total"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(args.out, doc)
    for name in painters:
        r = doc[f"painter_{name}"]
        sys.stdout.write(
            f"{name}: macro-F1 SVM prior {r[t]['svm_prior']['macro_f1']}, SVM balanced "
            f"{r[t]['svm']['macro_f1']}, max-RHLV rule {r[t]['max_rhlv_genant_rule']['macro_f1']}"
            f" (balanced test: {r['test_balanced']['svm_prior']['macro_f1']}, "
            f"{r['test_balanced']['svm']['macro_f1']}, "
            f"{r['test_balanced']['max_rhlv_genant_rule']['macro_f1']}), inpainting median |err| "
            + ", ".join(f"{s} {v['median_abs_error_mm']} mm"
                        for s, v in r["inpainting_intact_test"]["summary"].items()) + "\n")
    sys.stdout.write(f"rule: {rules[t]}\nwrote {args.out} in {doc['seconds_total']} s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
