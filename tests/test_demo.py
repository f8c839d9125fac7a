"""`mskmri demo`: refusal and replacement rules and the index (fast); the whole demo (slow)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import mskmri.demo as demo_mod
from mskmri.cli import main
from mskmri.demo import DemoResult, run_demo, write_demo_index
from mskmri.errors import MskMriError

#: The issue: `make demo` finishes in under 5 minutes on this machine.
DEMO_TIME_LIMIT_S = 300.0


def _fake_build(marker: str):
    """A stand-in for the demo's build step: writes a demo manifest and one file."""

    def build(out: Path, **kwargs) -> DemoResult:
        out.mkdir(parents=True)
        (out / "manifest.json").write_text(json.dumps({"kind": "demo", **kwargs}))
        (out / "which.txt").write_text(marker)
        return DemoResult(out_dir=out, reports={}, notes=[], timings_s={"total": 0.0})

    return build


def test_refuses_to_replace_a_folder_that_is_not_a_demo(tmp_path: Path) -> None:
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "scan.nii.gz").write_bytes(b"not to be lost")
    with pytest.raises(MskMriError, match="not a previous demo output"):
        run_demo(precious)
    assert main(["demo", "--out", str(precious)]) == 2
    assert [p.name for p in precious.iterdir()] == ["scan.nii.gz"]


def test_refuses_a_cohort_too_small_for_statistics(tmp_path: Path) -> None:
    with pytest.raises(MskMriError, match="at least 4"):
        run_demo(tmp_path / "d", cohort_size=2)
    assert not (tmp_path / "d").exists()


def test_rerun_replaces_a_previous_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "demo-output"
    monkeypatch.setattr(demo_mod, "_build", _fake_build("first"))
    run_demo(out)
    (out / "stale.txt").write_text("from the first run")
    monkeypatch.setattr(demo_mod, "_build", _fake_build("second"))
    assert main(["-q", "demo", "--out", str(out), "--seed", "3"]) == 0
    assert (out / "which.txt").read_text() == "second"
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "manifest.json").read_text())["seed"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["demo-output"]  # the old one is gone


def test_failed_rerun_restores_the_previous_demo(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "demo-output"
    monkeypatch.setattr(demo_mod, "_build", _fake_build("first"))
    run_demo(out)

    def broken(out: Path, **kwargs) -> DemoResult:
        out.mkdir(parents=True)
        (out / "half.txt").write_text("half-written")
        raise RuntimeError("on purpose")

    monkeypatch.setattr(demo_mod, "_build", broken)
    with pytest.raises(RuntimeError, match="on purpose"):
        run_demo(out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "which.txt"]
    assert (out / "which.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["demo-output"]


def test_index_links_reports_and_shows_statistics(tmp_path: Path) -> None:
    reports = {"knee": tmp_path / "knee" / "report.html",
               "cohort": tmp_path / "cohort" / "index.html",
               "cohort/oa01": tmp_path / "cohort" / "studies" / "oa01" / "report.html"}
    stats = {"measurements": [{
        "name": "volume.joint_effusion", "unit": "mL", "plot": "stats_plots/eff.png",
        "groups": {"normal": {"mean": 3.0, "n": 3}, "oa": {"mean": 14.0, "n": 3}},
        "welch_t": {"p": 0.0001, "p_holm": 0.0004, "significant": True},
        "mann_whitney_u": {"p_holm": 0.1, "significant": False}}]}
    write_demo_index(tmp_path / "index.html", reports=reports, notes=["truth <labels>"],
                     stats=stats, timings_s={"total": 12.0}, seed=0)
    page = (tmp_path / "index.html").read_text()
    assert "href='knee/report.html'" in page and "href='cohort/index.html'" in page
    assert "href='cohort/studies/oa01/report.html'" in page
    assert "shipped spine model (not made)" in page  # a missing report is said, not linked
    assert "truth &lt;labels&gt;" in page  # notes are escaped
    assert "&lt; 0.001" in page and "href='cohort/stats_plots/eff.png'" in page


@pytest.mark.slow
def test_whole_demo(tmp_path: Path) -> None:
    """The real demo (phantoms, shipped models, Dask cohort, stats): every link resolves."""
    res = run_demo(tmp_path / "demo-output", cohort_size=4, workers=2)
    out = res.out_dir
    page = (out / "index.html").read_text()
    links = re.findall(r"href='([^']+)'", page)
    assert links and all((out / link).is_file() for link in links), links
    for name in ("knee-truth", "spine", "cohort", "cohort/normal01", "cohort/oa02"):
        assert name in res.reports and res.reports[name].is_file()
    cohort = json.loads((out / "cohort" / "cohort.json").read_text())
    assert cohort["counts"]["ok"] == 4 and cohort["counts"]["failed"] == 0
    eff = next(m for m in res.stats["measurements"] if m["name"] == "volume.joint_effusion")
    assert eff["groups"]["oa"]["mean"] > eff["groups"]["normal"]["mean"]
    assert "phantom truth" in page  # the cohort's segmentations are said to be the truth
    man = json.loads((out / "manifest.json").read_text())
    assert man["kind"] == "demo" and man["timings_s"]["total"] < DEMO_TIME_LIMIT_S
