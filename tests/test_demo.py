"""`mskmri demo`: every output written, with its schema, in the image's geometry, atomically."""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from mskmri.cli import main
from mskmri.demo import MANIFEST_SCHEMA, run_demo
from mskmri.errors import MskMriError
from mskmri.io import read, read_labels
from mskmri.labels import KNEE

EXPECTED_FILES = {
    "image.nii.gz", "labels.nii.gz", "labels.json", "lesions.nii.gz", "lesions.json",
    "measurements.json", "report.html", "manifest.json",
}
#: The brief: the demo runs in under 20 s; allow for a loaded shared test machine.
DEMO_TIME_LIMIT_S = 60.0


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("demo") / "demo-output"
    return run_demo(out, seed=0, contrast="dess")


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_demo_writes_every_file(demo) -> None:
    names = {p.name for p in demo.out_dir.iterdir()}
    assert names == EXPECTED_FILES
    assert set(demo.files) == EXPECTED_FILES
    # nothing left beside the folder (no temporary or old folders)
    assert [p.name for p in demo.out_dir.parent.iterdir()] == [demo.out_dir.name]


def test_outputs_share_the_image_geometry(demo) -> None:
    image = read(demo.out_dir / "image.nii.gz")
    labels = read_labels(demo.out_dir / "labels.nii.gz", schema="knee")
    lesions = read_labels(demo.out_dir / "lesions.nii.gz", schema="lesion")
    assert image.geometry_known and image.array.dtype.kind == "f"
    assert labels.same_geometry(image) and lesions.same_geometry(image)
    assert set(labels.present_values()) >= {1, 2, 3, 5}  # femur, tibia, patella, cartilage
    assert set(lesions.present_values()) <= {1}


def test_sidecars_and_measurements_schema(demo) -> None:
    side = _json(demo.out_dir / "labels.json")
    assert side["schema"] == "mskmri/labelmap/1" and side["label_schema"] == "knee"
    assert side["labels"]["1"] == "femur"
    assert _json(demo.out_dir / "lesions.json")["labels"] == {"1": "bone_marrow_lesion"}

    doc = _json(demo.out_dir / "measurements.json")
    assert doc == demo.measurements
    assert doc["schema"] == "mskmri/measurements/1"
    assert doc["input"]["path"] == "labels.nii.gz"
    assert all(m["unit"] for m in doc["measurements"])
    # volumes equal voxel count x voxel volume of the written label map
    labels = read_labels(demo.out_dir / "labels.nii.gz", schema="knee")
    vox_ml = labels.voxel_volume_mm3 / 1000.0
    volumes = {m["structure"]: m["value"] for m in doc["measurements"] if m["name"] == "volume"}
    assert volumes, "no volumes measured"
    for value in labels.present_values():
        expected = np.count_nonzero(labels.array == value) * vox_ml
        assert volumes[KNEE[value]] == pytest.approx(expected, rel=1e-6)


def test_manifest(demo) -> None:
    man = _json(demo.out_dir / "manifest.json")
    assert man["schema"] == MANIFEST_SCHEMA and man["kind"] == "demo"
    assert man["options"] == {"seed": 0, "contrast": "dess"}
    assert man["versions"]["mskmri"] and man["versions"]["numpy"]
    assert man["synthesis"], "synthesis parameters must be recorded"
    assert set(man["timings_s"]) >= {"phantom", "render", "measure", "report", "total"}
    assert man["timings_s"]["total"] < DEMO_TIME_LIMIT_S
    assert set(man["outputs"]) == EXPECTED_FILES - {"manifest.json"}
    for name, rec in man["outputs"].items():
        data = (demo.out_dir / name).read_bytes()
        assert rec["bytes"] == len(data)
        assert rec["sha256"] == hashlib.sha256(data).hexdigest()


def test_report_holds_figures_and_every_measurement(demo) -> None:
    html = (demo.out_dir / "report.html").read_text(encoding="utf-8")
    assert html.count('src="data:image/png;base64,') >= 1
    doc = demo.measurements
    assert html.count('<tr class="m"') == len(doc["measurements"])
    assert "mskmri demo --out" in html


def test_same_seed_same_data(demo, tmp_path: Path) -> None:
    """Deterministic for a seed: the volumes and measurements are identical on a rerun."""
    again = run_demo(tmp_path / "again", seed=0, contrast="dess")
    for name in ("image.nii.gz", "labels.nii.gz", "lesions.nii.gz"):
        a = read(demo.out_dir / name).array
        b = read(again.out_dir / name).array
        np.testing.assert_array_equal(a, b)
    assert again.measurements["measurements"] == demo.measurements["measurements"]


@pytest.fixture
def cached_synthesis(demo, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replay the module demo's phantom and image instead of synthesising them again (fast)."""
    # the modules themselves: mskmri.synth re-exports functions under the same names
    phantom_mod = importlib.import_module("mskmri.synth.phantom")
    render_mod = importlib.import_module("mskmri.synth.render")

    labels = read_labels(demo.out_dir / "labels.nii.gz", schema="knee")
    lesions = read_labels(demo.out_dir / "lesions.nii.gz", schema="lesion")
    image = read(demo.out_dir / "image.nii.gz")
    monkeypatch.setattr(phantom_mod, "phantom_knee", lambda **kw: (labels.copy(), lesions.copy()))
    monkeypatch.setattr(render_mod, "render", lambda *a, **kw: render_mod.SynthResult(
        image=image.copy(), labels=labels.copy(), lesions=lesions.copy(), params={"cached": True}))


@pytest.mark.parametrize("step", ["write_report", "overlay_figure"])
def test_failure_leaves_nothing_behind(step: str, tmp_path: Path, cached_synthesis,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A step failing after the volumes were written: neither DIR nor a temporary folder."""
    import mskmri.report.figures
    import mskmri.report.html

    def broken(*args, **kwargs):
        raise RuntimeError(f"{step} failed on purpose")

    module = mskmri.report.html if step == "write_report" else mskmri.report.figures
    monkeypatch.setattr(module, step, broken)
    with pytest.raises(RuntimeError, match="on purpose"):
        run_demo(tmp_path / "out", seed=0)
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_a_previous_demo(tmp_path: Path, cached_synthesis,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed rerun leaves the earlier demo folder as it was."""
    import mskmri.report.html

    first = run_demo(tmp_path / "out", seed=0)
    before = {p.name: p.read_bytes() for p in first.out_dir.iterdir()}
    monkeypatch.setattr(mskmri.report.html, "write_report",
                        lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("on purpose")))
    with pytest.raises(RuntimeError, match="on purpose"):
        run_demo(tmp_path / "out", seed=0)
    assert {p.name: p.read_bytes() for p in first.out_dir.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_refuses_to_replace_a_folder_that_is_not_a_demo(tmp_path: Path) -> None:
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "scan.nii.gz").write_bytes(b"not to be lost")
    with pytest.raises(MskMriError, match="not a previous demo output"):
        run_demo(precious)
    assert (precious / "scan.nii.gz").read_bytes() == b"not to be lost"
    assert main(["demo", "--out", str(precious)]) == 2


def test_cli_demo_replaces_a_previous_demo(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo-output"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"schema": MANIFEST_SCHEMA, "kind": "demo"}))
    (out / "stale.txt").write_text("from an older run")
    assert main(["-q", "demo", "--out", str(out), "--contrast", "iw-fs", "--seed", "3"]) == 0
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    man = _json(out / "manifest.json")
    assert man["options"] == {"seed": 3, "contrast": "iw-fs"}
    assert man["command"] == f"mskmri demo --out {out} --seed 3 --contrast iw-fs"
    assert [p.name for p in tmp_path.iterdir()] == ["demo-output"]


def test_cli_demo_rejects_unknown_contrast(tmp_path: Path) -> None:
    assert main(["demo", "--out", str(tmp_path / "x"), "--contrast", "ct"]) == 2
    assert not (tmp_path / "x").exists()
