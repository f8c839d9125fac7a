"""BML detection by masked inpainting: hole coverage, residual, detector and CLI.

Most detector tests use the model-free :class:`LocalMeanPainter` stub (``--model
local-mean``), so they test the pipeline (masks, residual, normalisation, geometry,
post-processing, outputs); one runs the shipped ``bml-inpaint`` network on the same knee.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mskmri.anomaly.inpaint import (
    DESS_WARNING,
    BmlDetectionError,
    DetectConfig,
    LocalMeanPainter,
    detect_bml,
    hole_patterns,
    paint_residual,
    report_path,
)
from mskmri.cli import main
from mskmri.labels import KNEE
from mskmri.volume import LabelVolume, Volume


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a != 0, b != 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


@pytest.mark.parametrize("shape,cell,n", [((40, 50), 7, 1), ((33, 64), 12, 3), ((8, 8), 3, 4)])
def test_hole_patterns_cover_every_pixel_n_times(shape: tuple[int, int], cell: int,
                                                 n: int) -> None:
    pats, offsets = hole_patterns(shape, cell, n, seed=5)
    assert len(pats) == 2 * n and len(offsets) == n
    count = np.sum(pats, axis=0)
    assert np.all(count == n)
    again, _ = hole_patterns(shape, cell, n, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(pats, again, strict=True))


def test_every_roi_voxel_is_painted_and_flat_marrow_has_no_residual() -> None:
    rng = np.random.default_rng(0)
    fem = np.zeros((6, 40, 40), dtype=bool)
    fem[1:5, 5:35, 8:30] = True
    fem &= rng.random(fem.shape) > 0.05  # holes in the ROI must not matter
    img = np.ones(fem.shape, dtype=np.float32)
    res, spread, z, count = paint_residual(img, fem, LocalMeanPainter(), cell_px=6,
                                           n_offsets=3, seed=1)
    assert count[fem].min() >= 1 and np.all(count[fem] == 3)
    assert np.all(count[~fem] == 0)
    assert np.abs(res[fem]).max() < 1e-4 and np.abs(spread).max() < 1e-3


def test_bright_blob_gives_high_z() -> None:
    rng = np.random.default_rng(1)
    fem = np.zeros((8, 48, 48), dtype=bool)
    fem[:, 4:44, 4:44] = True
    img = (1.0 + 0.05 * rng.standard_normal(fem.shape)).astype(np.float32)
    img[3:6, 20:27, 20:27] += 1.0
    _, _, z, _ = paint_residual(img, fem, LocalMeanPainter(), cell_px=8, n_offsets=2, seed=0)
    assert z[3:6, 20:27, 20:27].mean() > 5.0
    assert np.percentile(z[fem], 50) < 1.0


def test_a_painter_bias_is_removed_before_the_z_score() -> None:
    """A painter that paints every hole 0.3 too bright (about 6 noise units) must not shift
    the z map: its median over the femur is 0 and a real lesion still stands out."""
    rng = np.random.default_rng(3)
    fem = np.zeros((6, 40, 40), dtype=bool)
    fem[:, 4:36, 4:36] = True
    img = (1.0 + 0.05 * rng.standard_normal(fem.shape)).astype(np.float32)
    img[2:4, 16:22, 16:22] += 1.0

    def biased(image: np.ndarray, hole: np.ndarray, roi: np.ndarray | None = None
               ) -> np.ndarray:
        return np.full(image.shape, 1.3, dtype=np.float32)

    res, _, z, _ = paint_residual(img, fem, biased, cell_px=8, n_offsets=2, seed=0)
    assert float(np.median(res[fem])) == pytest.approx(-0.3, abs=0.01)
    assert abs(float(np.median(z[fem]))) < 0.05
    assert z[2:4, 16:22, 16:22].mean() > 10.0


def test_threshold_precedence_argument_then_card_table_then_default() -> None:
    from mskmri.anomaly.inpaint import card_thresholds, choose_threshold

    table = card_thresholds({"thresholds_by_inplane_mm": [[1.25, 6.0], [0.625, 2.0]]})
    sp = (0.7, 0.625, 0.625)
    assert choose_threshold(4.5, table, sp, 3.0) == (4.5, {"source": "argument"})
    level, rec = choose_threshold(None, table, sp, 3.0)
    assert level == pytest.approx(2.0) and rec["input_inplane_mm"] == 0.625
    assert choose_threshold(None, table, (0.7, 1.25, 1.25), 3.0)[0] == pytest.approx(6.0)
    assert choose_threshold(None, None, sp, 3.0)[0] == 3.0
    # an older card with one threshold holds at every spacing
    assert choose_threshold(None, card_thresholds({"threshold": 2.2}), sp, 3.0)[0] == 2.2
    assert card_thresholds({}) is None


# ============================================================================ synthetic knee
@pytest.fixture(scope="module")
def knee() -> tuple[Volume, LabelVolume, LabelVolume]:
    """Procedural knee rendered IW-FS with one 1 mL femoral lesion (about 10 s)."""
    from mskmri.synth import phantom_knee, render

    labels, lesions = phantom_knee(seed=0, lesion_ml=1.0)
    r = render(labels, contrast="iw-fs", seed=3, lesions=lesions)
    return r.image, r.labels, r.lesions


def test_detect_finds_inserted_lesion_with_stub(knee: tuple[Volume, LabelVolume,
                                                            LabelVolume]) -> None:
    image, seg, truth = knee
    res = detect_bml(image, seg, painter=LocalMeanPainter())
    assert res.mask.same_geometry(image)
    # strong (~5x marrow) 1 mL lesion: the stub pipeline reached Dice 0.65 when written
    assert _dice(res.mask.array, truth.array) > 0.4
    assert len(res.table) >= 1 and res.table[0]["bone"] == "femur"
    assert res.record["min_paintings"] >= 1
    assert res.warnings == []


def test_detect_with_shipped_model_finds_inserted_lesion(
        knee: tuple[Volume, LabelVolume, LabelVolume]) -> None:
    from mskmri.anomaly.inpaint import NetworkPainter

    image, seg, truth = knee
    res = detect_bml(image, seg, painter=NetworkPainter("bml-inpaint"),
                     config=DetectConfig(n_offsets=1))
    # shipped bml-inpaint reached Dice 0.81 here (3 offsets) when committed (the stub 0.65)
    assert _dice(res.mask.array, truth.array) > 0.5
    assert res.record["painter"]["name"] == "bml-inpaint"
    # an unvalidated shipped model says so in every output
    from mskmri.weights import model_caveat

    caveat = model_caveat("bml-inpaint")
    if caveat:
        assert caveat in res.warnings


def test_detect_keeps_input_geometry_other_orientation(
        knee: tuple[Volume, LabelVolume, LabelVolume]) -> None:
    image, seg, truth = knee
    img_l, seg_l, tru_l = image.reorient("LPI"), seg.reorient("LPI"), truth.reorient("LPI")
    res = detect_bml(img_l, seg_l, painter=LocalMeanPainter())
    assert res.mask.same_geometry(img_l) and res.uncertainty.same_geometry(img_l)
    assert _dice(res.mask.array, tru_l.array) > 0.4


def test_lesion_free_knee_gives_empty_mask_not_error() -> None:
    rng = np.random.default_rng(2)
    seg = np.zeros((20, 48, 48), dtype=np.uint8)
    seg[2:18, 6:42, 6:42] = 1
    img = np.where(seg == 1, 100.0, 400.0) + rng.normal(0, 3, seg.shape)
    aff = np.diag([1.5, 0.6, 0.6, 1.0])
    res = detect_bml(Volume(img.astype(np.float32), aff), LabelVolume(seg, aff, dict(KNEE),
                                                                       schema="knee"),
                     painter=LocalMeanPainter(), contrast="iw-fs")
    assert res.mask.array.sum() == 0 and res.table == []


def test_no_femur_is_an_error() -> None:
    aff = np.eye(4)
    with pytest.raises(BmlDetectionError, match="no femur"):
        detect_bml(Volume(np.ones((10, 10, 10), np.float32), aff),
                   LabelVolume(np.zeros((10, 10, 10), np.uint8), aff, dict(KNEE)),
                   painter=LocalMeanPainter())


# ============================================================================ CLI
def test_cli_detect_bml_writes_mask_table_uncertainty(
        knee: tuple[Volume, LabelVolume, LabelVolume], tmp_path: Path) -> None:
    from mskmri.io import read, read_labels, write

    image, seg, truth = knee
    write(image, tmp_path / "img.nii.gz")
    write(seg, tmp_path / "seg.nii.gz")
    out = tmp_path / "bml.nii.gz"
    rc = main(["detect", "bml", str(tmp_path / "img.nii.gz"), str(out), "--seg",
               str(tmp_path / "seg.nii.gz"), "--model", "local-mean", "--contrast", "dess",
               "--table", str(tmp_path / "t.csv"), "--uncertainty",
               str(tmp_path / "u.nii.gz")])
    assert rc == 0
    mask = read_labels(out, schema="lesion")
    assert mask.same_geometry(image)
    assert _dice(mask.array, truth.array) > 0.4
    assert read(tmp_path / "u.nii.gz").same_geometry(image)
    rows = (tmp_path / "t.csv").read_text().splitlines()
    assert rows[0].startswith("lesion,volume_ml,bone,region") and len(rows) >= 2
    rec = json.loads(report_path(out).read_text())
    assert rec["warnings"] and rec["warnings"][0] == DESS_WARNING.format(contrast="dess")
    assert len(rec["lesions"]) == len(rows) - 1


def test_cli_bad_input_exit_2(knee: tuple[Volume, LabelVolume, LabelVolume],
                              tmp_path: Path) -> None:
    from mskmri.io import write

    image, seg, _ = knee
    write(image, tmp_path / "img.nii.gz")
    empty = LabelVolume(np.zeros(seg.shape, np.uint8), seg.affine, dict(KNEE), schema="knee")
    write(empty, tmp_path / "empty.nii.gz")
    args = ["detect", "bml", str(tmp_path / "img.nii.gz"), str(tmp_path / "o.nii.gz")]
    assert main([*args, "--seg", str(tmp_path / "empty.nii.gz"), "--model",
                 "local-mean"]) == 2
    assert main([*args, "--seg", str(tmp_path / "empty.nii.gz"), "--method", "mkd"]) == 2
    assert main([*args, "--seg", str(tmp_path / "missing.nii.gz")]) == 2
    assert not (tmp_path / "o.nii.gz").exists()


def test_cli_without_seg_and_without_knee_model_says_so(
        knee: tuple[Volume, LabelVolume, LabelVolume], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from mskmri.io import write
    from mskmri.weights import MODELS

    # as in an installation without the knee models
    monkeypatch.delitem(MODELS, "knee-seg-fine", raising=False)
    write(knee[0], tmp_path / "img.nii.gz")
    rc = main(["detect", "bml", str(tmp_path / "img.nii.gz"), str(tmp_path / "o.nii.gz"),
               "--model", "local-mean"])
    assert rc == 2
    assert "--seg" in capsys.readouterr().err
