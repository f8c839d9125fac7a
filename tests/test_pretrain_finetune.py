"""Fine-tuning pieces of the pretraining experiment: crops that contain the structure, Dice,
slice-stack prediction, and the benchmark's effusion-task contrasts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from mskmri.pretrain.data import crop_or_pad

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "pretraining.py"


def test_crop_contains_the_point_known_starts() -> None:
    image = np.arange(10, dtype=np.float32)
    rng = np.random.default_rng(0)
    # A 4-wide window of 10 that contains index 0 can only start at 0; index 9 only at 6.
    assert {crop_or_pad(image, (4,), rng, (0,))[1][0] for _ in range(20)} == {0}
    assert {crop_or_pad(image, (4,), rng, (9,))[1][0] for _ in range(20)} == {6}
    # Index 5: starts 2..5, every one reachable, and the window holds the value 5.
    starts = set()
    for _ in range(200):
        win, (st,) = crop_or_pad(image, (4,), rng, (5,))
        starts.add(st)
        assert 5.0 in win
    assert starts == {2, 3, 4, 5}
    # Without a point, every start 0..6 occurs.
    assert {crop_or_pad(image, (4,), rng)[1][0] for _ in range(300)} == set(range(7))


def test_crop_pads_a_small_image_whatever_the_point() -> None:
    image = np.ones((3, 5), np.float32)
    win, starts = crop_or_pad(image, (3, 8), np.random.default_rng(1), (1, 2))
    assert win.shape == (3, 8) and win.sum() == 15.0
    assert starts[0] == 0 and -3 <= starts[1] <= 0


torch = pytest.importorskip("torch")

from mskmri.nn.unet import UNet, UNetConfig  # noqa: E402
from mskmri.pretrain.finetune import (  # noqa: E402
    LabelledVolume,
    SliceSegDataset,
    dice,
    predict_volume,
    seg_loss,
)


def test_foreground_crops_contain_a_small_structure() -> None:
    # One 2 x 2 structure in the corner of one 120 x 120 slice of three; 32 x 32 crops.
    labels = np.zeros((3, 120, 120), np.uint8)
    labels[1, 100:102, 110:112] = 1
    image = labels.astype(np.float32)
    ds = SliceSegDataset([LabelledVolume("tiny", image, labels)], (32, 32))
    rng = np.random.default_rng(0)
    hits = 0
    n = 400
    for _ in range(n):
        x, y = ds.sample(0, rng)
        assert x.shape == (1, 32, 32) and y.shape == (32, 32) and y.dtype == torch.int64
        if int(y.sum()):
            hits += 1
            # Image and labels are cropped by one window: the structure is bright in both.
            assert float(x[0][y == 1].mean()) > float(x[0][y == 0].mean()) + 0.5
    # Foreground slices are drawn 3 times in 4 and then always contain the structure; a blind
    # crop would hold it about 1 time in 14 (32 * 32 / 120 / 120).
    assert 0.68 <= hits / n <= 0.82


def test_dice_known_answers() -> None:
    a = np.zeros((2, 4, 4), np.uint8)
    b = np.zeros_like(a)
    assert dice(a, b) == 1.0
    a[0, :2, :2] = 1   # 4 voxels
    b[0, :2, :] = 1    # 8 voxels, 4 shared
    assert dice(a, b) == pytest.approx(2 * 4 / 12)
    assert dice(a, np.zeros_like(a)) == 0.0


def test_predict_volume_pads_and_crops_back() -> None:
    torch.manual_seed(0)
    net = UNet(UNetConfig(spatial_dims=2, features=(4, 8, 8, 16), strides=(1, 2, 2, 2),
                          out_channels=2))
    image = np.random.default_rng(0).random((3, 30, 27)).astype(np.float32)
    out = predict_volume(net, image, 8, chunk=2)
    assert out.shape == image.shape and out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1}


def test_seg_loss_is_small_for_a_right_answer() -> None:
    y = torch.zeros((1, 8, 8), dtype=torch.int64)
    y[0, 2:5, 2:5] = 1
    logits = torch.stack([(y == 0).float(), (y == 1).float()], 1) * 20.0

    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return logits

    good, parts = seg_loss(Fixed(), (torch.zeros((1, 1, 8, 8)), y))
    bad, _ = seg_loss(Fixed(), (torch.zeros((1, 1, 8, 8)), 1 - y))
    assert float(good) < 0.05 and parts["soft_dice"] > 0.95
    assert float(bad) > 1.0


def _benchmark() -> object:
    spec = importlib.util.spec_from_file_location("bench_pretraining", BENCHMARK)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_effusion_task_uses_fluid_sensitive_contrasts() -> None:
    from mskmri.synth import get_contrast

    bench = _benchmark()
    seeds = bench.KNEE_EVAL_SEEDS + bench.KNEE_POOL_SEEDS
    got = [bench.knee_contrast(s) for s in seeds]
    assert got == [bench.knee_contrast(s) for s in seeds]  # seeded
    assert set(got) <= set(bench.KNEE_CONTRASTS)
    for name in bench.KNEE_CONTRASTS:
        model = get_contrast(name)
        # Effusion (fluid) is the brightest class, unlike the 'random' contrast.
        assert not model.randomised
        assert model.means["fluid"] >= max(model.means.values()) - 1e-9
    # Evaluation, pool and pretraining knees never share a seed.
    assert not set(bench.KNEE_EVAL_SEEDS) & set(bench.KNEE_POOL_SEEDS)
    assert not set(bench.KNEE_EVAL_SEEDS + bench.KNEE_POOL_SEEDS) & set(bench.KNEE_PRETRAIN_SEEDS)


def test_site_breakdown_known_answer() -> None:
    bench = _benchmark()
    n = len(bench.SPINE_EVAL)
    myo = [i for i, e in enumerate(bench.SPINE_EVAL) if e.startswith("myosegmentum/")]
    per = [0.8 if i in myo else 0.1 for i in range(n)]
    runs = [{"task": "spine", "arm": "scratch", "budget": 1, "seed": 0, "per_volume": per},
            {"task": "spine", "arm": "pretrained", "budget": 1, "seed": 0,
             "per_volume": [v + 0.1 for v in per]},
            {"task": "spine", "arm": "scratch", "budget": 2, "seed": 0, "per_volume": [0.0] * n}]
    got = bench.site_breakdown(runs, 1)
    assert got["myosegmentum"]["scratch_mean"] == pytest.approx(0.8)
    assert got["myosegmentum"]["pretrained_mean"] == pytest.approx(0.9)
    assert got["chu2015"]["relative_gain"] == pytest.approx(1.0)
    assert bench.site_breakdown(runs, 2)["chu2015"]["pretrained_mean"] is None
