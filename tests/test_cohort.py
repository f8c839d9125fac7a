"""`mskmri cohort`: Dask workers, one unreadable study failing alone, resume, table -> stats."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mskmri.cli import main
from mskmri.cohort import (
    EXIT_SOME_FAILED,
    CohortError,
    read_cohort_manifest,
    run_cohort,
)
from mskmri.io import read_labels, write
from mskmri.labels import KNEE_ID

pytest.importorskip("distributed")
pytest.importorskip("pyarrow")

#: Effusion voxels added per study (muscle relabelled): known effusion differences.
EXTRA_EFFUSION_VOXELS = {"n1": 0, "n2": 40, "oa1": 400, "oa2": 600}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """4 knee studies (image + label map; effusion grown by known voxel counts) + 1 broken."""
    from mskmri.synth.phantom import phantom_knee
    from mskmri.synth.render import render

    root = tmp_path_factory.mktemp("cohort_inputs")
    # a coarse phantom (2 mm slices, 1.67 mm in-plane, the default field of view): fast
    truth, lesions = phantom_knee(seed=0, shape=(48, 72, 72), spacing=(2.0, 5 / 3, 5 / 3))
    synth = render(truth, contrast="dess", seed=0, lesions=lesions)
    write(synth.image, root / "image.nii.gz")
    muscle = np.argwhere(synth.labels.array == KNEE_ID["muscle"])
    for sid, n in EXTRA_EFFUSION_VOXELS.items():
        lab = synth.labels.copy()
        idx = muscle[:n]
        lab.array[idx[:, 0], idx[:, 1], idx[:, 2]] = KNEE_ID["joint_effusion"]
        write(lab, root / f"{sid}_seg.nii.gz")
    (root / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    rows = [{"id": sid, "path": "image.nii.gz", "group": "oa" if sid.startswith("oa") else
             "normal", "anatomy": "knee", "seg": f"{sid}_seg.nii.gz", "site": "A"}
            for sid in EXTRA_EFFUSION_VOXELS]
    rows.insert(2, {"id": "bad", "path": "broken.nii.gz", "group": "normal",
                    "anatomy": "knee", "seg": "", "site": "B"})
    with (root / "cohort.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return {"root": root, "manifest": root / "cohort.csv", "image": root / "image.nii.gz"}


@pytest.fixture(scope="module")
def scheduler():
    """An in-process Dask cluster (threads, no process start-up): its scheduler's address."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def first_run(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("cohort") / "out"
    return run_cohort(inputs["manifest"], out, workers=2, meshes=False)


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_unreadable_study_fails_alone(first_run) -> None:
    status = {k: o.status for k, o in first_run.outcomes.items()}
    assert status == {"n1": "ok", "n2": "ok", "bad": "failed", "oa1": "ok", "oa2": "ok"}
    assert first_run.exit_status == EXIT_SOME_FAILED
    failures = _csv(first_run.failures_csv)
    assert [f["id"] for f in failures] == ["bad"]
    assert failures[0]["reason"] and "\n" not in failures[0]["reason"]
    assert failures[0]["path"].endswith("broken.nii.gz")
    doc = json.loads((first_run.out_dir / "cohort.json").read_text())
    assert doc["counts"] == {"ok": 4, "skipped": 0, "failed": 1, "studies": 5}
    assert doc["options"]["workers"] == 2
    assert [f["id"] for f in doc["failures"]] == ["bad"]


def test_table_one_row_per_study_with_units(first_run, inputs) -> None:
    rows = _csv(first_run.table_csv)
    assert [r["subject"] for r in rows] == ["n1", "n2", "oa1", "oa2"]
    assert {r["site"] for r in rows} == {"A"}  # extra manifest columns are carried
    col = "volume.joint_effusion [mL]"
    seg = read_labels(inputs["root"] / "n1_seg.nii.gz", schema="knee")
    voxel_ml = seg.voxel_volume_mm3 / 1000.0
    base = np.count_nonzero(seg.array == KNEE_ID["joint_effusion"]) * voxel_ml
    for r in rows:
        expected = base + EXTRA_EFFUSION_VOXELS[r["subject"]] * voxel_ml
        assert float(r[col]) == pytest.approx(expected, rel=1e-9)
    import pyarrow.parquet as pq

    table = pq.read_table(first_run.table_parquet)
    assert table.column("subject").to_pylist() == ["n1", "n2", "oa1", "oa2"]
    assert table.schema.field(col).metadata[b"unit"] == b"mL"
    np.testing.assert_allclose(table.column(col).to_pylist(), [float(r[col]) for r in rows])


def test_index_links_every_report(first_run) -> None:
    page = first_run.index_html.read_text()
    for sid in ("n1", "n2", "oa1", "oa2"):
        href = f"studies/{sid}/report.html"
        assert f"href='{href}'" in page
        assert (first_run.out_dir / href).is_file()
    assert "failed" in page and "bad" in page


def test_resume_skips_finished_studies_and_redoes_changed_ones(first_run, inputs,
                                                               scheduler) -> None:
    out = first_run.out_dir
    old = {r["subject"]: r for r in _csv(first_run.table_csv)}
    before = {sid: (out / "studies" / sid / "manifest.json").stat().st_mtime_ns
              for sid in ("n1", "n2", "oa1", "oa2")}
    again = run_cohort(inputs["manifest"], out, scheduler=scheduler, meshes=False)
    assert {k: o.status for k, o in again.outcomes.items()} == {
        "n1": "skipped", "n2": "skipped", "bad": "failed", "oa1": "skipped", "oa2": "skipped"}
    after = {sid: (out / "studies" / sid / "manifest.json").stat().st_mtime_ns for sid in before}
    assert after == before  # nothing rewritten
    assert {r["subject"]: r for r in _csv(again.table_csv)} == old  # measurements read back
    # a changed input is analysed again, the others stay skipped
    seg_path = inputs["root"] / "oa2_seg.nii.gz"
    seg = read_labels(seg_path, schema="knee")
    muscle = np.argwhere(seg.array == KNEE_ID["muscle"])[:100]
    seg.array[muscle[:, 0], muscle[:, 1], muscle[:, 2]] = KNEE_ID["joint_effusion"]
    write(seg, seg_path)
    third = run_cohort(inputs["manifest"], out, scheduler=scheduler, meshes=False)
    assert third.outcomes["oa2"].status == "ok"
    assert {third.outcomes[s].status for s in ("n1", "n2", "oa1")} == {"skipped"}
    rows = {r["subject"]: r for r in _csv(third.table_csv)}
    col = "volume.joint_effusion [mL]"
    assert float(rows["oa2"][col]) > float(old["oa2"][col])


def test_table_feeds_stats(first_run, tmp_path: Path) -> None:
    out = tmp_path / "stats.json"
    assert main(["-q", "stats", str(first_run.table_csv), "--group", "group", "--json",
                 str(out), "--n-bootstrap", "200"]) == 0
    doc = json.loads(out.read_text())
    names = {m["name"] for m in doc["measurements"]}
    assert "volume.joint_effusion" in names and "volume.muscle" in names
    eff = next(m for m in doc["measurements"] if m["name"] == "volume.joint_effusion")
    assert eff["unit"] == "mL"


def test_cli_on_a_scheduler_by_address(inputs, scheduler, tmp_path: Path) -> None:
    """Any Dask scheduler by address (here an in-process one); exit 3 with a failure."""
    code = main(["-q", "cohort", str(inputs["manifest"]), "--out", str(tmp_path / "c"),
                 "--scheduler", scheduler, "--no-meshes"])
    assert code == EXIT_SOME_FAILED
    assert len(_csv(tmp_path / "c" / "measurements.csv")) == 4
    assert len(_csv(tmp_path / "c" / "failures.csv")) == 1


def test_refuses_a_folder_that_is_not_a_cohort(inputs, tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(CohortError, match="not an earlier cohort folder"):
        run_cohort(inputs["manifest"], tmp_path, scheduler="tcp://127.0.0.1:1")
    assert main(["cohort", str(inputs["manifest"]), "--out", str(tmp_path)]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(("text", "match"), [
    ("path,anatomy\na.nii.gz,knee\n", "lacks the column"),
    ("path,group\na.nii.gz,x\n", "anatomy"),
    ("path,group,anatomy\na.nii.gz,,knee\n", "group is empty"),
    ("path,group,anatomy\na.nii.gz,x,hip\n", "is not one of"),
    ("path,group,anatomy\nd1/a.nii.gz,x,knee\nd2/a.nii.gz,y,knee\n", "already used"),
    ("id,path,group,anatomy\n../up,a.nii.gz,x,knee\n", "may hold only"),
    ("path,group,anatomy\n", "no studies"),
    ("path,group,anatomy,series\na.nii.gz,x,spine,3\n", "for knee studies"),
])
def test_bad_manifests(tmp_path: Path, text: str, match: str) -> None:
    m = tmp_path / "m.csv"
    m.write_text(text)
    with pytest.raises(CohortError, match=match):
        read_cohort_manifest(m)


def test_manifest_defaults(tmp_path: Path) -> None:
    m = tmp_path / "m.csv"
    m.write_text("path,group,age,series\nscans/K01.nii.gz,oa,61,\n/abs/dicom_folder,normal,55,4\n")
    studies = read_cohort_manifest(m, anatomy="knee")
    assert [s.id for s in studies] == ["K01", "dicom_folder"]
    assert studies[0].path == tmp_path.resolve() / "scans" / "K01.nii.gz"
    assert studies[1].path == Path("/abs/dicom_folder")
    assert studies[0].extra == {"age": "61"} and studies[0].anatomy == "knee"
    assert studies[0].series is None and studies[1].series == "4"


def test_spine_study_and_resume(scheduler, tmp_path: Path) -> None:
    """A spine study (phantom with its truth as seg): measured, reported, skipped on resume."""
    from mskmri.synth.phantom import phantom_spine

    ph = phantom_spine(seed=1, wedge={"L3": 0.75})
    write(ph.image, tmp_path / "spine.nii.gz")
    write(ph.labels, tmp_path / "spine_seg.nii.gz")
    (tmp_path / "m.csv").write_text("id,path,group,seg\nsp1,spine.nii.gz,a,spine_seg.nii.gz\n")
    res = run_cohort(tmp_path / "m.csv", tmp_path / "out", anatomy="spine", scheduler=scheduler)
    assert res.exit_status == 0 and res.outcomes["sp1"].status == "ok"
    assert (res.out_dir / res.outcomes["sp1"].report).is_file()
    row = _csv(res.table_csv)[0]
    assert row["anatomy"] == "spine" and 0.7 < float(row["wedge_ratio.L3 [1]"]) < 0.9
    again = run_cohort(tmp_path / "m.csv", tmp_path / "out", anatomy="spine",
                       scheduler=scheduler)
    assert again.outcomes["sp1"].status == "skipped"
    assert _csv(again.table_csv) == [row]
