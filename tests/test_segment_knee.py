"""Coarse-to-fine knee segmenter: data pipeline, geometry of the stitching, CLI, DDP training.

Known-answer tests use a "threshold network" (class 1 where the normalised input is bright),
so the whole chain coarse -> region -> fine -> input grid can be checked voxel by voxel on an
image of any orientation without trained weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mskmri.labels import KNEE  # noqa: E402
from mskmri.labels import KNEE_ID as KNEE_ID_  # noqa: E402
from mskmri.segment import knee as K  # noqa: E402
from mskmri.segment import knee_train as KT  # noqa: E402
from mskmri.volume import LabelVolume, Volume  # noqa: E402

#: Fake sources for a cache that never renders (entries are written by the test).
FAKE_SOURCES = ["/nonexistent/akoa_1_00m.nii.gz", "/nonexistent/akoa_1_12m.nii.gz"]


class ThresholdNet(torch.nn.Module):  # type: ignore[name-defined]
    """Logits: class 1 (femur) where the input > 0.5, background elsewhere, others never."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: Any) -> Any:
        b = x.shape[0]
        out = torch.full((b, K.N_CLASSES, *x.shape[2:]), -10.0, dtype=x.dtype, device=x.device)
        out[:, 0] = 0.5 - x[:, 0]
        out[:, 1] = x[:, 0] - 0.5
        return out + self.dummy


def _oblique_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """An LPI-like permuted/flipped affine (no RAS axis order), with an origin offset."""
    aff = np.zeros((4, 4))
    aff[0, 2] = -spacing[2]   # axis 2 -> L
    aff[1, 0] = -spacing[0]   # axis 0 -> P
    aff[2, 1] = spacing[1]    # axis 1 -> S
    aff[:3, 3] = (30.0, -12.0, 7.5)
    aff[3, 3] = 1.0
    return aff


def _cube_image(shape: tuple[int, int, int], spacing: tuple[float, float, float],
                side_mm: float = 44.0) -> tuple[Volume, np.ndarray]:
    """Dark noisy volume with a bright cube of ``side_mm`` at the centre; (image, cube mask)."""
    rng = np.random.default_rng(3)
    arr = rng.normal(100.0, 5.0, shape).astype(np.float32)
    half = [side_mm / 2 / s for s in spacing]
    c = [n / 2 for n in shape]
    sl = tuple(slice(int(round(ci - h)), int(round(ci + h))) for ci, h in zip(c, half, strict=True))
    mask = np.zeros(shape, bool)
    mask[sl] = True
    arr[mask] = 1000.0
    return Volume(arr, _oblique_affine(spacing)), mask


# ============================================================================ data pipeline
def test_render_spec_is_a_pure_function_of_seed_split_and_index() -> None:
    a = [KT.render_spec(FAKE_SOURCES, i, 0, "train") for i in range(12)]
    b = [KT.render_spec(FAKE_SOURCES, i, 0, "train") for i in range(12)]
    assert a == b
    assert a != [KT.render_spec(FAKE_SOURCES, i, 1, "train") for i in range(12)]
    assert a[0] != KT.render_spec(FAKE_SOURCES, 0, 0, "val")
    assert [s.source for s in a[:4]] == FAKE_SOURCES * 2
    # with the 46 training maps: the first 46 renders use every contrast, and over 6 x 46
    # renders every map is rendered in every contrast
    names = [f"m{i}" for i in range(46)]
    specs = [KT.render_spec(names, i, 0, "train") for i in range(6 * 46)]
    assert {s.contrast for s in specs[:46]} == set(KT.CONTRASTS)
    for m in names:
        assert {s.contrast for s in specs if s.source == m} == set(KT.CONTRASTS)
    assert all(s.effusion_ml >= 0 and s.inplane in KT.INPLANE_CHOICES for s in a)


def _fake_arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lab = np.zeros((20, 24, 22), np.uint8)
    lab[5:15, 6:18, 4:18] = 1
    lab[8:12, 10:14, 8:12] = 5
    img = (lab * 300.0 + rng.normal(100, 10, lab.shape)).astype(np.float32)
    return {"coarse_image": img[::2, ::2, ::2].copy(), "coarse_labels": lab[::2, ::2, ::2].copy(),
            "fine_image": img, "fine_labels": lab}


def _fake_cache(folder: Path, n: int = 3) -> Any:
    cache = KT.RenderCache(folder, FAKE_SOURCES, 0, "train")
    for i in range(n):
        cache.put(i, _fake_arrays(i))
    return cache


def test_cache_round_trip_and_datasets_are_deterministic(tmp_path: Path) -> None:
    cache = _fake_cache(tmp_path)
    got = cache.get(1)
    want = _fake_arrays(1)
    np.testing.assert_array_equal(got["fine_labels"], want["fine_labels"])
    np.testing.assert_allclose(got["fine_image"], want["fine_image"], rtol=1e-3)  # float16
    fine = KT.FineDataset(cache, 3, patch=(8, 8, 8))
    x1, y1 = fine.sample(2, np.random.default_rng(5))
    x2, y2 = fine.sample(2, np.random.default_rng(5))
    x3, _ = fine.sample(2, np.random.default_rng(6))
    assert x1.shape == (1, 8, 8, 8) and y1.shape == (8, 8, 8) and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    coarse = KT.CoarseDataset(cache, 3, patch=(16, 16, 16))
    xc, yc = coarse.sample(0, np.random.default_rng(1))
    assert xc.shape == (1, 16, 16, 16)
    # padding keeps every labelled voxel of the (smaller) coarse volume
    assert int((yc > 0).sum()) == int((want["coarse_labels"] > 0).sum())


def _no_intensity_change(monkeypatch: Any) -> None:
    """Switch every intensity/resolution augmentation off (flip stays)."""
    for name in ("AUG_GAMMA_STD", "AUG_SCALE_STD", "AUG_SHIFT_STD", "AUG_NOISE_MAX",
                 "AUG_BIAS_MAX", "AUG_BLUR_PROBABILITY", "AUG_THICK_PROBABILITY",
                 "RELABEL_PROBABILITY"):
        monkeypatch.setattr(KT, name, 0.0)


def test_augment_patch_flips_image_and_labels_together(monkeypatch: Any) -> None:
    _no_intensity_change(monkeypatch)
    lab = np.zeros((6, 5, 4), np.uint8)
    lab[:2] = 1   # the "right" side only: a flip moves it
    lab[3, 2, 1] = 5
    img = (lab * 0.1).astype(np.float32)
    flipped = 0
    for seed in range(12):
        x, y = KT.augment_patch(img, lab, np.random.default_rng(seed))
        np.testing.assert_allclose(x, y * 0.1, atol=1e-6)  # intensities stay with their labels
        flipped += int(y[-1, 0, 0] == 1)
        assert np.array_equal(y, lab) or np.array_equal(y, lab[::-1])
    assert 0 < flipped < 12  # both outcomes happen


def test_relabelled_patch_is_constant_per_class_and_keeps_the_background() -> None:
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2:5] = 1
    lab[5:7] = 5
    img = np.linspace(0, 1, lab.size, dtype=np.float32).reshape(lab.shape)
    rng = np.random.default_rng(0)
    out = KT.relabel_intensities(img, lab, rng)
    scale = out[lab == 0] / np.maximum(img[lab == 0], 1e-9)
    nz = img[lab == 0] > 1e-6
    assert np.allclose(scale[nz], scale[nz][0], rtol=1e-5)  # background: one rescaling
    for c in (1, 5):
        assert float(out[lab == c].std()) <= KT.RELABEL_STD_MAX * 1.5


def test_class_centres_hold_only_their_class_and_respect_the_limit() -> None:
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[:5] = 1
    lab[7, 7, 7] = 9
    cen = KT.class_centres(lab, np.random.default_rng(0), limit=50)
    assert set(cen) == {1, 9}
    assert cen[1].size == 50 and cen[9].size == 1
    for c, idx in cen.items():
        assert np.all(lab.ravel()[idx] == c)
        assert np.unique(idx).size == idx.size


def test_fine_patches_are_centred_on_rare_classes_more_often_than_chance(tmp_path: Path) -> None:
    cache = _fake_cache(tmp_path)
    ds = KT.FineDataset(cache, 3, patch=(6, 6, 6))
    hits = sum(int((ds.sample(i % 3, np.random.default_rng(i))[1] == 5).any())
               for i in range(60))
    # class 5 fills 64 of 10560 voxels: a uniformly placed 6^3 patch holds it about 10 % of
    # the time; class-weighted centring puts it in at least 0.8 * 3/4 of the patches
    assert hits >= 33


def test_group_dice_known_answer() -> None:
    truth = np.zeros((4, 4, 4), np.uint8)
    pred = np.zeros_like(truth)
    truth[0, :2] = 1          # femur: 8 voxels
    pred[0, :1] = 1           # 4 predicted, all right -> 2*4/(4+8)
    truth[1] = 5              # femoral cartilage: 16 voxels, predicted exactly
    pred[1] = 5
    truth[2, 0, 0] = 9        # medial meniscus missed
    d = KT.group_dice(pred, truth)
    assert d["dice_femur"] == pytest.approx(2 * 4 / 12)
    assert d["dice_femoral_cartilage"] == pytest.approx(1.0)
    assert d["dice_medial_meniscus"] == 0.0
    assert d["bones"] == pytest.approx(2 / 3) and d["cartilage"] == pytest.approx(1.0)
    assert d["mean_groups"] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)


def test_validation_keeps_the_best_weights_and_they_load_back(tmp_path: Path) -> None:
    from mskmri.nn.unet import UNet, UNetConfig

    cache = _fake_cache(tmp_path / "cache", 1)
    torch.manual_seed(0)
    net = UNet(UNetConfig(out_channels=K.N_CLASSES, features=(2, 4), strides=(1, 2)))
    net.eval()
    validate = KT._make_validate(cache, 1, "fine", tmp_path / "fine")
    with torch.no_grad():
        first = validate(net, 1)
        validate(net, 2)  # not better: the record stays at step 1
    rec = json.loads((tmp_path / "fine" / KT.BEST_RECORD).read_text())
    assert rec["step"] == 1 and rec["metrics"]["mean_groups"] == pytest.approx(
        first["mean_groups"])
    other = UNet(UNetConfig(out_channels=K.N_CLASSES, features=(2, 4), strides=(1, 2)))
    got = KT.use_best_weights(other, tmp_path / "fine")
    assert got is not None and got["step"] == 1
    for a, b in zip(net.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert KT.use_best_weights(other, tmp_path / "nothing") is None


def test_cache_entry_of_another_spec_is_not_reused(tmp_path: Path, monkeypatch: Any) -> None:
    _fake_cache(tmp_path, 1)
    other = KT.RenderCache(tmp_path, FAKE_SOURCES, 99, "train")  # other seed -> other spec
    calls: list[Any] = []

    def fake_render(spec: Any, **kw: Any) -> dict[str, np.ndarray]:
        calls.append(spec)
        return _fake_arrays(7)

    monkeypatch.setattr(KT, "make_render", fake_render)
    other.get(0)
    assert len(calls) == 1 and calls[0] == other.spec(0)


def test_dice_ce_loss_is_low_for_a_perfect_prediction_and_high_otherwise() -> None:
    target = torch.zeros((1, 6, 6, 6), dtype=torch.int64)
    target[0, 2:4, 2:4, 2:4] = 3
    perfect = torch.nn.functional.one_hot(target, 5).movedim(-1, 1).float() * 40.0
    wrong = torch.roll(perfect, 1, dims=1)
    assert float(KT.dice_ce_loss(perfect, target)) < 1e-3
    assert float(KT.dice_ce_loss(wrong, target)) > 1.0


def test_subject_split_keeps_time_points_together(shared_data: Path) -> None:
    from mskmri.synth.sources import subject_of

    split = KT.subject_split(shared_data / "knee")
    train = {subject_of(p) for p in split["train"]}
    val = {subject_of(p) for p in split["val"]}
    assert not train & val and val
    assert any("pymskt" in p for p in split["train"]) and any("spl" in p for p in split["train"])


# ============================================================================ geometry
def test_stitching_returns_the_input_geometry_for_an_oblique_anisotropic_image() -> None:
    image, mask = _cube_image((36, 40, 30), (1.6, 1.3, 2.4))
    assert image.orientation != ("R", "A", "S")
    seg = K.KneeSegmenter(ThresholdNet(), ThresholdNet(), precision="fp32", backend="torch")
    res = seg.run(image)
    lab = res.labels
    assert isinstance(lab, LabelVolume) and lab.schema == "knee"
    assert lab.shape == image.shape and np.allclose(lab.affine, image.affine)
    assert lab.array.dtype == np.uint8 and set(np.unique(lab.array)) <= {0, 1}
    pred = lab.array == 1
    dice = 2 * (pred & mask).sum() / (pred.sum() + mask.sum())
    assert dice > 0.95, dice
    assert res.warnings == []
    # the fine region contains the cube and is smaller than the whole field of view
    lo = image.voxel_to_world(np.argwhere(mask)).min(0)
    hi = image.voxel_to_world(np.argwhere(mask)).max(0)
    for (a, b), cl, ch in zip(res.region_mm, lo, hi, strict=True):
        assert a <= cl and b >= ch
    assert lab.meta["timings_s"]["total_s"] > 0


def test_labels_to_grid_is_exact_on_the_same_grid_and_smooth_on_a_finer_one() -> None:
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 4, (6, 7, 5)).astype(np.uint8)
    aff = np.diag([0.8, 0.8, 0.8, 1.0])
    aff[:3, 3] = (3.0, -2.0, 1.0)
    np.testing.assert_array_equal(K.labels_to_grid(lab, aff, lab.shape, aff), lab)
    # a one-voxel slab of class 5 at 0.8 mm, sampled at 0.2 mm: the smooth resampling keeps
    # it 0.8 mm (4 fine voxels) thick around its centre, and 0 outside the source grid
    slab = np.zeros((5, 3, 3), np.uint8)
    slab[2] = 5
    src = np.diag([0.8, 0.8, 0.8, 1.0])
    dst = np.diag([0.2, 0.8, 0.8, 1.0])
    dst[0, 3] = -0.3 - 0.8  # starts half a source voxel before the grid, plus one 0.8 mm
    out = K.labels_to_grid(slab, src, (24, 3, 3), dst)
    x_mm = dst[0, 3] + 0.2 * np.arange(24)
    inside = np.abs(x_mm - 1.6) < 0.4 - 1e-6
    assert np.array_equal(out[:, 1, 1] == 5, inside)
    assert (out[x_mm < -0.4 - 1e-6] == 0).all()
    # an oblique mapping falls back to nearest neighbour (still the right shape)
    rot = np.array([[0.0, 0.8, 0, 0], [0.8, 0, 0, 0], [0, 0, 0.8, 0], [0, 0, 0, 1]])
    assert K.labels_to_grid(lab, aff, (4, 4, 4), rot).shape == (4, 4, 4)


def test_fusion_keeps_confirmed_fine_labels_and_thin_classes_and_takes_coarse_elsewhere() -> None:
    # coarse: 2 mm grid, femur in the lower half (axis 0), muscle above
    clab = np.full((10, 4, 4), KNEE_ID_["muscle"], np.uint8)
    clab[:5] = KNEE_ID_["femur"]
    caff = np.diag([2.0, 2.0, 2.0, 1.0])
    # fine: 1 mm grid over the same box, the fine net says "tibia" everywhere except one
    # femoral-cartilage voxel far inside the muscle
    flab = np.full((20, 8, 8), KNEE_ID_["tibia"], np.uint8)
    flab[:9] = KNEE_ID_["femur"]
    flab[18, 4, 4] = KNEE_ID_["femoral_cartilage"]
    faff = np.diag([1.0, 1.0, 1.0, 1.0])
    faff[:3, 3] = -0.5  # fine voxel centres at 0, 1, ... mm; coarse at 0, 2, ... mm
    out = K.fuse_with_coarse(flab, faff, clab, caff, tolerance_mm=4.0)
    assert (out[:9] == KNEE_ID_["femur"]).all()                 # confirmed by the coarse map
    assert (out[11:17] == KNEE_ID_["muscle"]).all()            # unconfirmed tibia -> coarse
    assert out[18, 4, 4] == KNEE_ID_["femoral_cartilage"]       # thin classes stay
    assert not (out == KNEE_ID_["tibia"]).any()
    # an unaligned coarse grid leaves the fine labels as they are
    rot = np.array([[0.0, 2, 0, 0], [2, 0, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(K.fuse_with_coarse(flab, faff, clab, rot), flab)


def test_by_default_fine_background_inside_a_coarse_bone_takes_the_bone() -> None:
    # the fine net misses the femur's rim (its dark cortex): x 6-9 mm inside the coarse femur
    clab = np.zeros((10, 4, 4), np.uint8)
    clab[:5] = KNEE_ID_["femur"]                                 # coarse femur: x 0-8 mm
    caff = np.diag([2.0, 2.0, 2.0, 1.0])
    flab = np.zeros((20, 8, 8), np.uint8)
    flab[:6] = KNEE_ID_["femur"]                                 # fine femur: x 0-5 mm
    faff = np.diag([1.0, 1.0, 1.0, 1.0])
    assert K.FUSION_TOLERANCE_MM == 0.0
    out = K.fuse_with_coarse(flab, faff, clab, caff)
    assert (out[:10] == KNEE_ID_["femur"]).all() and (out[10:] == 0).all()
    # with a 4 mm tolerance the coarse background 2 voxels away confirms the rim as background
    wide = K.fuse_with_coarse(flab, faff, clab, caff, tolerance_mm=4.0)
    assert (wide[6:10] == 0).all()
    with pytest.raises(K.KneeSegmentationError, match="fusion tolerance"):
        K.KneeSegmenter(ThresholdNet(), ThresholdNet(), fusion_tolerance_mm=-1.0)


def _reference_fusion(flog: np.ndarray, faff: np.ndarray, clog: np.ndarray, caff: np.ndarray,
                      w: np.ndarray) -> np.ndarray:
    """Independent reference: scipy trilinear sampling of the coarse logits at every fine
    voxel centre (edge values outside), softmax, weighted mean, arg-max."""
    from scipy import ndimage

    mapping = np.linalg.inv(caff) @ faff
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in flog.shape[1:]], indexing="ij"), -1)
    pts = idx @ mapping[:3, :3].T + mapping[:3, 3]
    pts = np.clip(pts, 0, np.array(clog.shape[1:]) - 1)
    cup = np.stack([ndimage.map_coordinates(c, np.moveaxis(pts, -1, 0), order=1) for c in clog])

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(0, keepdims=True))
        return e / e.sum(0, keepdims=True)

    wk = w[:, None, None, None]
    return (wk * softmax(cup) + (1 - wk) * softmax(flog)).argmax(0)


@pytest.mark.parametrize("oblique", [False, True])
def test_probability_fusion_matches_an_independent_reference(oblique: bool) -> None:
    rng = np.random.default_rng(3)
    clog = rng.normal(0, 2, (K.N_CLASSES, 9, 8, 7)).astype(np.float32)
    flog = rng.normal(0, 2, (K.N_CLASSES, 13, 11, 10)).astype(np.float32)
    caff = np.diag([2.0, 2.0, 2.0, 1.0])
    caff[:3, 3] = (-3.0, 1.0, 0.5)
    faff = np.diag([0.8, 0.8, 0.8, 1.0])
    faff[:3, 3] = (-1.1, 2.3, 1.7)
    if oblique:  # fine axes rotated in-plane against the coarse ones
        c, s_ = np.cos(0.3), np.sin(0.3)
        faff[:3, :3] = np.array([[c, -s_, 0], [s_, c, 0], [0, 0, 1.0]]) @ faff[:3, :3]
    w = K.coarse_weight_vector(0.8, 0.3)
    ref = _reference_fusion(flog, faff, clog, caff, w)
    got = K.fuse_probabilities(flog, faff, clog, caff, w, slab=4)
    assert got.dtype == np.uint8 and got.shape == flog.shape[1:]
    assert (got == ref).mean() > 0.999  # float32 vs float64 near-ties only
    # the inferer's accumulator layout (classes innermost) gives the same labels
    inner = np.moveaxis(np.ascontiguousarray(np.moveaxis(flog, 0, -1)), -1, 0)
    np.testing.assert_array_equal(K.fuse_probabilities(inner, faff, clog, caff, w), got)


def test_probability_fusion_weights_pick_the_network() -> None:
    # coarse says femur everywhere (cartilage second: p 0.73 / 0.27), fine says tibia with
    # cartilage in the middle
    caff = np.diag([2.0, 2.0, 2.0, 1.0])
    clog = np.full((K.N_CLASSES, 6, 6, 6), -5.0, np.float32)
    clog[KNEE_ID_["femur"]] = 5.0
    clog[KNEE_ID_["femoral_cartilage"]] = 4.0
    faff = np.diag([1.0, 1.0, 1.0, 1.0])
    flog = np.full((K.N_CLASSES, 10, 10, 10), -5.0, np.float32)
    flog[KNEE_ID_["tibia"]] = 5.0
    flog[KNEE_ID_["femoral_cartilage"], 5, 5, 5] = 8.0
    only_fine = K.fuse_probabilities(flog, faff, clog, caff, np.zeros(K.N_CLASSES, np.float32))
    np.testing.assert_array_equal(only_fine, flog.argmax(0))
    only_coarse = K.fuse_probabilities(flog, faff, clog, caff, np.ones(K.N_CLASSES, np.float32))
    assert (only_coarse == KNEE_ID_["femur"]).all()
    # default: bones follow the coarse network, the thin cartilage the fine one
    out = K.fuse_probabilities(flog, faff, clog, caff)
    assert out[5, 5, 5] == KNEE_ID_["femoral_cartilage"]
    assert (np.delete(out.ravel(), np.ravel_multi_index((5, 5, 5), out.shape))
            == KNEE_ID_["femur"]).all()
    with pytest.raises(K.KneeSegmentationError, match="matching pair"):
        K.fuse_probabilities(flog[:5], faff, clog, caff)
    with pytest.raises(K.KneeSegmentationError, match=r"in \[0, 1\]"):
        K.coarse_weight_vector(1.5, 0.3)
    with pytest.raises(K.KneeSegmentationError, match="fusion must be one of"):
        K.KneeSegmenter(ThresholdNet(), ThresholdNet(), fusion="max")


def test_flip_averaging_is_the_mean_probability_of_the_two_passes() -> None:
    rng = np.random.default_rng(5)
    n_cls, shape = 4, (7, 5, 6)
    x = rng.normal(size=shape).astype(np.float32)
    gain = rng.normal(size=(n_cls, *shape)).astype(np.float32)  # position-dependent: not
    # mirror-symmetric, so the mirrored pass differs from the plain one

    def net(a: np.ndarray) -> np.ndarray:
        return gain * a[None] + gain[::-1].cumsum(1)

    buffer = np.empty((*shape, n_cls), np.float32)  # classes innermost, like the inferer's

    def logits_of(a: np.ndarray, copy: bool) -> np.ndarray:
        buffer[...] = np.moveaxis(net(a), 0, -1)
        view = np.moveaxis(buffer, -1, 0)
        return view.copy() if copy else view

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(0))
        return e / e.sum(0)

    ref = np.log((softmax(net(x)) + softmax(net(np.ascontiguousarray(x[::-1])))[:, ::-1]) / 2)
    for slab in (K.FUSION_SLAB, 3):
        out = K.flip_averaged_log_probs(logits_of, x, slab=slab)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(ref, np.log(softmax(net(x))), atol=1e-3)
    with pytest.raises(K.KneeSegmentationError, match="tta must be one of"):
        K.KneeSegmenter(ThresholdNet(), ThresholdNet(), tta="rotate")


@pytest.mark.parametrize(("fusion", "tta"), [("probabilities", "flip"), ("labels", "flip"),
                                             ("probabilities", "none"), ("labels", "none")])
def test_both_fusions_segment_the_cube_and_say_which_ran(fusion: str, tta: str) -> None:
    image, cube = _cube_image((40, 40, 40), (1.5, 1.5, 1.5))
    seg = K.KneeSegmenter(ThresholdNet(), ThresholdNet(), precision="fp32", fusion=fusion,
                          keep_largest=(), compartments=False, tta=tta)
    res = seg.run(image)
    femur = res.labels.array == KNEE_ID_["femur"]
    assert 2 * (femur & cube).sum() / (femur.sum() + cube.sum()) > 0.95
    assert res.labels.meta["tta"] == tta
    record = res.labels.meta["fusion"]
    assert record["mode"] == fusion
    if fusion == "probabilities":
        assert (record["coarse_weight_large"], record["coarse_weight_thin"]) == \
            (K.COARSE_WEIGHT_LARGE, K.COARSE_WEIGHT_THIN)
    else:
        assert record["tolerance_mm"] == K.FUSION_TOLERANCE_MM


def test_no_knee_found_is_a_warning_in_the_output_meta() -> None:
    image, _ = _cube_image((30, 30, 30), (1.5, 1.5, 1.5), side_mm=6.0)  # 0.2 mL bright cube
    seg = K.KneeSegmenter(ThresholdNet(), ThresholdNet(), precision="fp32", backend="torch")
    res = seg.run(image)
    assert any("no knee found" in w for w in res.warnings)
    assert res.labels.meta["warnings"] == res.warnings


def test_two_d_and_label_inputs_are_refused() -> None:
    flat = Volume(np.ones((1, 64, 64), np.float32), np.eye(4))
    with pytest.raises(K.KneeSegmentationError, match="2-D"):
        K.segment_knee(flat, coarse=ThresholdNet(), fine=ThresholdNet(), backend="torch")
    lab = LabelVolume(np.ones((8, 8, 8), np.uint8), np.eye(4), {1: "femur"})
    with pytest.raises(K.KneeSegmentationError, match="label map"):
        K.segment_knee(lab, coarse=ThresholdNet(), fine=ThresholdNet(), backend="torch")


def test_normalise_intensity_maps_percentiles_to_0_and_1() -> None:
    arr = np.random.default_rng(0).uniform(0, 1000, (40, 40, 40)).astype(np.float32)
    out = K.normalise_intensity(arr)
    assert abs(float(np.percentile(out, 50)) - 0.5) < 0.01
    assert abs(float(np.percentile(out, 0.5))) < 0.01
    assert abs(float(np.percentile(out, 99.5)) - 1.0) < 0.01
    assert out.min() >= K.NORM_CLIP[0] and out.max() <= K.NORM_CLIP[1]


# ============================================================================ CLI
def _shipped() -> bool:
    from mskmri.weights import MODELS

    return all(n in MODELS and MODELS[n].path.is_file() for n in (K.COARSE_MODEL, K.FINE_MODEL))


@pytest.mark.skipif(not _shipped(), reason="knee-seg weights are not shipped in this checkout")
def test_cli_segments_the_phantom_with_the_shipped_weights(tmp_path: Path,
                                                          monkeypatch: Any) -> None:
    from mskmri.cli import main
    from mskmri.io import read_labels, write
    from mskmri.synth.phantom import phantom_knee
    from mskmri.synth.render import RenderOptions, render

    truth, _ = phantom_knee(seed=1)
    img = render(truth, contrast="dess", seed=1, options=RenderOptions(deform=False)).image
    # the central 60 x 70 x 70 mm (keeps the test fast), stored in LPS axis order
    img = img.crop((slice(12, 52), slice(20, 76), slice(20, 76))).reorient("LPS")
    src = tmp_path / "phantom.nii.gz"
    write(img, src)
    out = tmp_path / "seg.nii.gz"
    monkeypatch.setenv("MSKMRI_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["segment", "knee", str(src), str(out)]) == 0
    # the default backend is torch with bf16 autocast: nothing is exported
    assert not list((tmp_path / "cache" / "onnx").glob("knee-seg-*.onnx"))
    # ONNX Runtime on request: exported once per weight file into the cache, same geometry
    onnx_lab = K.segment_knee(img, backend="onnx")
    assert len(list((tmp_path / "cache" / "onnx").glob("knee-seg-*.onnx"))) == 2
    assert onnx_lab.shape == img.shape
    lab = read_labels(out, schema="knee", labels=KNEE)
    assert lab.shape == img.shape and np.allclose(lab.affine, img.affine, atol=1e-4)
    assert set(lab.present_values()) <= set(KNEE)
    side = json.loads(out.with_name("seg.json").read_text())
    assert side["label_schema"] == "knee" and "segmentation" in side
    assert side["segmentation"]["models"] == {"coarse": K.COARSE_MODEL, "fine": K.FINE_MODEL}
    assert side["segmentation"]["tta"] == K.DEFAULT_TTA == "flip"
    # --tta none: each network once, recorded in the sidecar
    once = tmp_path / "once.nii.gz"
    assert main(["segment", "knee", str(src), str(once), "--tta", "none"]) == 0
    assert json.loads(once.with_name("once.json").read_text())["segmentation"]["tta"] == "none"
    assert read_labels(once, schema="knee", labels=KNEE).shape == img.shape
    # the shipped models are unvalidated: every output says so (no silent wrong numbers)
    from mskmri.weights import model_caveat

    caveat = model_caveat(K.FINE_MODEL)
    if caveat:
        assert caveat in side["segmentation"]["warnings"]


def test_cli_bad_input_exits_2(tmp_path: Path, capsys: Any) -> None:
    from mskmri.cli import main
    from mskmri.io import write

    assert main(["segment", "knee", str(tmp_path / "missing.nii.gz"),
                 str(tmp_path / "o.nii.gz")]) == 2
    flat = tmp_path / "flat.nii.gz"
    write(Volume(np.ones((1, 32, 32), np.float32), np.eye(4)), flat)
    assert main(["segment", "knee", str(flat), str(tmp_path / "o.nii.gz"),
                 "--model", str(tmp_path)]) == 2
    assert not (tmp_path / "o.nii.gz").exists()
    err = capsys.readouterr().err
    assert err.count("mskmri: error") >= 2


# ============================================================================ DDP
def _ddp_worker(folder: Path, out: Path) -> None:
    import torch.distributed as dist
    from _ddp_exit import finish_worker

    from mskmri.nn.train import TrainConfig, fit, seed_everything
    from mskmri.nn.unet import UNet, UNetConfig

    cache = KT.RenderCache(folder, FAKE_SOURCES, 0, "train")
    seed_everything(0)
    net = UNet(UNetConfig(out_channels=K.N_CLASSES, features=(2, 4), strides=(1, 2)))
    cfg = TrainConfig(out=out, steps=2, batch_size=1, lr=1e-2, seed=0, device="cpu",
                      log_every=1, checkpoint_every=2)
    res = fit(net, KT._objective, KT.FineDataset(cache, 3, patch=(8, 8, 8)), cfg)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(
        {"world": res.runtime.world_size, "step": res.step,
         "w": float(sum(p.detach().sum() for p in res.model.parameters()))}))
    finish_worker(out, dist.get_rank())


@pytest.mark.torch
def test_two_gloo_processes_train_the_fine_objective(tmp_path: Path) -> None:
    _fake_cache(tmp_path / "cache")
    out = tmp_path / "ddp"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MSKMRI_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
           "--nproc_per_node=2", __file__, str(tmp_path / "cache"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    from _ddp_exit import ranks_done

    assert proc.returncode == 0, f"ranks done: {ranks_done(out)}\n{proc.stderr[-3000:]}"
    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2 and r0["step"] == 2
    assert r0["w"] == pytest.approx(r1["w"], rel=1e-6)  # ranks stay in sync
    assert "on cpu x2" in (out / "train.log").read_text()


if __name__ == "__main__":
    _ddp_worker(Path(sys.argv[1]), Path(sys.argv[2]))
