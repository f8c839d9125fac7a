"""Group statistics on a synthetic cohort with built-in differences (and one without)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from mskmri.cli import main
from mskmri.evaluate.stats import (
    STATS_SCHEMA,
    TableError,
    cliffs_delta,
    compare_groups,
    hedges_g,
    holm,
    read_table_csv,
    split_unit,
    stats_files,
    table_from_rows,
    write_table_csv,
)
from mskmri.measure.base import Measurement, measurements_document, write_measurements

#: The synthetic cohort, per knee (stated distributions, parameters of numpy's generators):
#: - joint effusion (mL): log-normal, median 3 (normal) vs 8 (OA), sigma of log 0.6;
#: - mean femoral cartilage thickness (mm): normal 2.2 +- 0.3 (normal) vs 1.9 +- 0.3 (OA);
#: - BML volume (mL): 0 unless the knee has a BML (probability 0.15 normal, 0.7 OA), then
#:   log-normal with median 0.3 (normal) vs 1.0 (OA), sigma of log 0.8;
#: - muscle volume (mL): normal 350 +- 60 in both groups (no difference built in).
COHORT = {
    "effusion_median_mL": {"normal": 3.0, "oa": 8.0}, "effusion_sigma_log": 0.6,
    "cartilage_mm": {"normal": (2.2, 0.3), "oa": (1.9, 0.3)},
    "bml_probability": {"normal": 0.15, "oa": 0.7}, "bml_median_mL": {"normal": 0.3, "oa": 1.0},
    "bml_sigma_log": 0.8, "muscle_mL": (350.0, 60.0),
}
N_PER_GROUP = 30


def synthetic_cohort(seed: int, n: int = N_PER_GROUP) -> list[dict[str, object]]:
    """Rows of a normal-vs-OA cohort drawn from :data:`COHORT` with ``default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    c = COHORT
    rows: list[dict[str, object]] = []
    for g in ("normal", "oa"):
        eff = rng.lognormal(math.log(c["effusion_median_mL"][g]), c["effusion_sigma_log"], n)
        cart = rng.normal(*c["cartilage_mm"][g], n)
        has_bml = rng.random(n) < c["bml_probability"][g]
        bml = np.where(has_bml, rng.lognormal(math.log(c["bml_median_mL"][g]),
                                              c["bml_sigma_log"], n), 0.0)
        mus = rng.normal(*c["muscle_mL"], n)
        for i in range(n):
            rows.append({"subject": f"{g}_{i:02d}", "group": g,
                         "volume.joint_effusion [mL]": eff[i],
                         "thickness_mean.femoral_cartilage [mm]": cart[i],
                         "lesion_volume [mL]": bml[i], "volume.muscle [mL]": mus[i]})
    return rows


# ============================================================================ pieces
def test_holm_by_hand():
    adj = holm([0.01, 0.04, 0.03, 0.005, float("nan")])
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): 0.02, 0.03, 0.06, max(0.06, 0.04)
    assert adj[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(adj[4])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_hedges_g_by_hand():
    e = hedges_g(np.array([1.0, 2.0, 3.0]), np.array([3.0, 4.0, 5.0]))
    # d = 2 / 1, J = 1 - 3 / (4 * 6 - 9) = 0.8, SE = sqrt(6 / 9 + 1.6^2 / 12)
    se = math.sqrt(6 / 9 + 1.6**2 / 12)
    assert e.value == pytest.approx(1.6)
    assert (e.ci_low, e.ci_high) == pytest.approx((1.6 - 1.959964 * se, 1.6 + 1.959964 * se),
                                                  rel=1e-5)
    assert e.unit == "SD"


def test_cliffs_delta_by_hand_and_equals_rank_biserial(rng):
    a, b = np.array([1.0, 2.0, 3.0]), np.array([2.0, 3.0, 4.0])
    assert cliffs_delta(a, b) == pytest.approx(5 / 9)  # 6 pairs b > a, 1 pair b < a
    x, y = rng.normal(size=17), rng.normal(0.5, size=23)
    u = sps.mannwhitneyu(y, x).statistic
    assert cliffs_delta(x, y) == pytest.approx(2 * u / (17 * 23) - 1)


def test_split_unit():
    assert split_unit("volume.joint_effusion [mL]") == ("volume.joint_effusion", "mL")
    assert split_unit("age") == ("age", None)


# ============================================================================ the cohort
def test_recovers_built_in_differences_and_not_muscle():
    table = table_from_rows(synthetic_cohort(seed=0), group="group")
    res = compare_groups(table, groups=("normal", "oa"), seed=0)
    eff = res["volume.joint_effusion"]
    assert eff.welch.p_holm < 0.05 and eff.mann_whitney.p_holm < 0.05
    assert eff.hedges_g.value > 0 and eff.hedges_g.ci_low > 0 and eff.cliffs_delta.ci_low > 0
    cart = res["thickness_mean.femoral_cartilage"]
    assert cart.welch.p_holm < 0.05 and cart.hedges_g.ci_high < 0  # thinner in OA
    bml = res["lesion_volume"]
    assert bml.mann_whitney.p_holm < 0.05 and bml.cliffs_delta.value > 0
    mus = res["volume.muscle"]
    assert mus.welch.p_holm > 0.05 and mus.mann_whitney.p_holm > 0.05
    assert mus.hedges_g.ci_low < 0 < mus.hedges_g.ci_high
    assert mus.cliffs_delta.ci_low < 0 < mus.cliffs_delta.ci_high
    assert eff.unit == "mL" and cart.unit == "mm"
    assert eff.summaries["oa"].n == N_PER_GROUP


def test_power_and_false_positive_rate_over_seeds():
    # 200 cohorts: the muscle difference (none built in) must come out at about alpha;
    # effusion and cartilage almost always
    n_seeds = 200
    muscle_w = muscle_u = muscle_holm = eff_hits = cart_hits = 0
    for seed in range(1, n_seeds + 1):
        res = compare_groups(table_from_rows(synthetic_cohort(seed), group="group"),
                             groups=("normal", "oa"), n_bootstrap=0)
        mus = res["volume.muscle"]
        muscle_w += mus.welch.p < 0.05
        muscle_u += mus.mann_whitney.p < 0.05
        muscle_holm += mus.welch.p_holm < 0.05
        eff_hits += res["volume.joint_effusion"].welch.p_holm < 0.05
        cart_hits += res["thickness_mean.femoral_cartilage"].welch.p_holm < 0.05
    # binomial(200, 0.05): mean 10, SD 3.1 -> [4, 18] is about +-2.6 SD
    assert 4 <= muscle_w <= 18, muscle_w
    assert 4 <= muscle_u <= 18, muscle_u
    assert muscle_holm <= muscle_w
    assert eff_hits >= 0.95 * n_seeds and cart_hits >= 0.9 * n_seeds


def test_bootstrap_is_seeded_and_recorded():
    table = table_from_rows(synthetic_cohort(seed=3), group="group")
    a = compare_groups(table, groups=("normal", "oa"), seed=7, n_bootstrap=500)
    b = compare_groups(table, groups=("normal", "oa"), seed=7, n_bootstrap=500)
    c = compare_groups(table, groups=("normal", "oa"), seed=8, n_bootstrap=500)
    ea, eb, ec = (r["volume.joint_effusion"].cliffs_delta for r in (a, b, c))
    assert (ea.ci_low, ea.ci_high) == (eb.ci_low, eb.ci_high)
    assert (ea.ci_low, ea.ci_high) != (ec.ci_low, ec.ci_high)
    assert a.options["seed"] == 7 and a.options["n_bootstrap"] == 500


def test_missing_values_and_degenerate_columns():
    rows = synthetic_cohort(seed=4, n=6)
    rows[0]["volume.muscle [mL]"] = ""
    rows[1]["volume.muscle [mL]"] = "NA"
    for r in rows:
        r["constant [mm]"] = 1.0
        r["note"] = "free text"
    table = table_from_rows(rows, group="group")
    assert "note" not in table.values and any("note" in w for w in table.warnings)
    res = compare_groups(table, groups=("normal", "oa"), n_bootstrap=0)
    assert res["volume.muscle"].summaries["normal"].n == 4
    const = res["constant"]
    assert math.isnan(const.welch.p) and const.welch.reason == "no variance in either group"
    assert math.isnan(const.hedges_g.value)
    assert any("constant" in w for w in res.warnings)


def test_group_errors():
    rows = synthetic_cohort(seed=5, n=4)
    with pytest.raises(TableError, match="no column 'grp'"):
        table_from_rows(rows, group="grp")
    rows[0]["group"] = "third"
    table = table_from_rows(rows, group="group")
    with pytest.raises(TableError, match="3 groups"):
        compare_groups(table)
    with pytest.raises(TableError, match="not found"):
        compare_groups(table, groups=("normal", "severe"))
    compare_groups(table, groups=("normal", "oa"), n_bootstrap=0)  # the pair can be chosen


# ============================================================================ inputs
def test_csv_round_trip(tmp_path):
    table = table_from_rows(synthetic_cohort(seed=6, n=5), group="group")
    write_table_csv(table, tmp_path / "t.csv")
    back = read_table_csv(tmp_path / "t.csv", group="group")
    assert back.subjects == table.subjects and back.groups == table.groups
    assert dict(back.units) == dict(table.units)
    for k in table.values:
        np.testing.assert_array_equal(back.values[k], table.values[k])


def _write_json_cohort(root, rows) -> None:
    for r in rows:
        ms = [Measurement("volume", r["volume.joint_effusion [mL]"], "mL",
                          structure="joint_effusion"),
              Measurement("thickness_mean", r["thickness_mean.femoral_cartilage [mm]"], "mm",
                          structure="femoral_cartilage"),
              Measurement("lesion_volume", r["lesion_volume [mL]"], "mL"),
              Measurement("volume", r["volume.muscle [mL]"], "mL", structure="muscle")]
        doc = measurements_document(ms, input_info={"path": f"{r['subject']}.nii.gz"},
                                    tool_version="test")
        write_measurements(root / str(r["group"]) / f"{r['subject']}.json", doc)


def test_json_files_grouped_by_folder_or_manifest_match_the_csv(tmp_path):
    rows = synthetic_cohort(seed=0)
    _write_json_cohort(tmp_path / "cohort", rows)
    # a label-map sidecar in the folder is skipped, not read as a subject
    (tmp_path / "cohort" / "normal" / "seg.json").write_text(
        json.dumps({"schema": "mskmri/labelmap/1", "labels": {}}))
    table = table_from_rows(rows, group="group")
    write_table_csv(table, tmp_path / "cohort.csv")
    ref = stats_files([tmp_path / "cohort.csv"], group="group", n_bootstrap=200)
    by_parent = stats_files([tmp_path / "cohort"], group="group", group_from="parent",
                            n_bootstrap=200)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("file,diagnosis\n" + "".join(
        f"cohort/{r['group']}/{r['subject']}.json,{r['group']}\n" for r in rows))
    by_manifest = stats_files([tmp_path / "cohort"], group="diagnosis", manifest=manifest,
                              n_bootstrap=200)
    assert by_parent["input"]["n_subjects"] == 2 * N_PER_GROUP
    for doc in (by_parent, by_manifest):
        got = {m["name"]: m for m in doc["measurements"]}
        for m in ref["measurements"]:
            g = got[m["name"]]
            assert g["unit"] == m["unit"]
            # JSON keeps 10 significant digits, the CSV full precision
            assert g["welch_t"]["p"] == pytest.approx(m["welch_t"]["p"], rel=1e-6)
            assert g["cliffs_delta"]["ci"] == pytest.approx(m["cliffs_delta"]["ci"], rel=1e-6)
    with pytest.raises(TableError, match="where each subject's group comes from"):
        stats_files([tmp_path / "cohort"], group="group")


# ============================================================================ CLI
def test_cli_stats_with_plots(tmp_path):
    table = table_from_rows(synthetic_cohort(seed=0), group="group")
    write_table_csv(table, tmp_path / "cohort.csv")
    out = tmp_path / "stats.json"
    plots = tmp_path / "plots"
    rc = main(["stats", str(tmp_path / "cohort.csv"), "--group", "group", "--json", str(out),
               "--plots", str(plots), "--groups", "normal,oa", "--n-bootstrap", "300"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == STATS_SCHEMA
    assert doc["options"]["reference_group"] == "normal" and doc["options"]["seed"] == 0
    by = {m["name"]: m for m in doc["measurements"]}
    assert by["volume.joint_effusion"]["welch_t"]["significant"] is True
    assert by["volume.joint_effusion"]["welch_t"]["p_holm"] < 0.05
    assert by["volume.muscle"]["welch_t"]["significant"] is False
    assert by["volume.joint_effusion"]["groups"]["oa"]["unit"] == "mL"
    assert by["volume.joint_effusion"]["hedges_g"]["unit"] == "SD"
    pngs = sorted(p.name for p in plots.iterdir())
    assert pngs == sorted(m["plot"] for m in doc["measurements"])
    assert len(pngs) == 4
    for p in pngs:
        assert (plots / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_stats_bad_input_exit_2(tmp_path, capsys):
    table = table_from_rows(synthetic_cohort(seed=0, n=4), group="group")
    write_table_csv(table, tmp_path / "cohort.csv")
    out = tmp_path / "stats.json"
    assert main(["stats", str(tmp_path / "cohort.csv"), "--group", "sex", "--json",
                 str(out)]) == 2
    assert "no column 'sex'" in capsys.readouterr().err and not out.exists()
    assert main(["stats", str(tmp_path / "missing.csv"), "--group", "group", "--json",
                 str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err and not out.exists()
