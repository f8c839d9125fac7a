"""Training pieces of the marrow inpainter: holes, samples, loss, one tiny fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mskmri.anomaly.inpaint_train import (  # noqa: E402
    InpaintSlices,
    InpaintTrainingError,
    inpaint_loss,
    normalise_by_roi,
    random_hole,
)


def test_random_hole_stays_in_roi_and_is_seeded() -> None:
    roi = np.zeros((64, 64), dtype=bool)
    roi[10:50, 5:60] = True
    a = random_hole((64, 64), roi, np.random.default_rng(3))
    b = random_hole((64, 64), roi, np.random.default_rng(3))
    assert np.array_equal(a, b)
    assert a.sum() > 0 and not a[~roi].any()


def test_normalise_by_roi() -> None:
    img = np.full((4, 4, 4), 50.0)
    roi = np.zeros_like(img, dtype=bool)
    roi[1:3] = True
    img[roi] = 200.0
    assert normalise_by_roi(img, roi)[roi] == pytest.approx(1.0)
    with pytest.raises(InpaintTrainingError):
        normalise_by_roi(img, np.zeros_like(roi))


def test_loss_is_zero_for_perfect_painting_and_grows_with_error() -> None:
    img = torch.rand(2, 1, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 1
    zero, parts = inpaint_loss(img.clone(), img, mask)
    assert float(zero) == pytest.approx(0.0, abs=1e-7)
    flat, parts = inpaint_loss(torch.full_like(img, 0.5), img, mask)
    assert float(flat) > 0 and parts["grad_hole"] > 0


def test_dataset_samples_and_one_step(tmp_path: Path) -> None:
    from mskmri.nn.ffc import FFCConfig, FFCInpainter, make_input

    rng = np.random.default_rng(0)
    fem = np.zeros((6, 80, 80), dtype=np.uint8)
    fem[1:5, 10:70, 10:70] = 1
    img = (1 + 0.1 * rng.standard_normal(fem.shape)).astype(np.float32)
    np.savez_compressed(tmp_path / "r.npz", image=img, femur=fem)
    ds = InpaintSlices([tmp_path / "r.npz"], length=4, patch=32)
    s = ds.sample(0, np.random.default_rng(1))
    assert s["image"].shape == (1, 32, 32) and s["mask"].shape == (1, 32, 32)
    net = FFCInpainter(FFCConfig(base_channels=8, n_downsample=2, n_blocks=1))
    x = torch.from_numpy(s["image"][None])
    m = torch.from_numpy(s["mask"][None])
    loss, _ = inpaint_loss(net(make_input(x, m)), x, m)
    loss.backward()
    assert torch.isfinite(loss)
