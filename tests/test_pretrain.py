"""Self-supervised pretraining: distortions, the network and its losses, --init, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from mskmri.pretrain.distortions import (
    DISTORTION_TYPES,
    Distortion,
    DistortionError,
    apply_distortions,
    area_mask,
    full_mask,
    sample_distortions,
)

# ============================================================================ distortions


def _ramp(shape: tuple[int, ...] = (40, 48)) -> np.ndarray:
    rng = np.random.default_rng(3)
    return (rng.random(shape) * 0.5 + np.linspace(0, 0.5, shape[-1])).astype(np.float32)


def test_sampling_is_reproducible_and_recorded() -> None:
    a = sample_distortions((64, 64), np.random.default_rng(5), n_areas=(3, 3))
    b = sample_distortions((64, 64), np.random.default_rng(5), n_areas=(3, 3))
    c = sample_distortions((64, 64), np.random.default_rng(6), n_areas=(3, 3))
    assert a == b and a != c
    img = _ramp((64, 64))
    out_a, ids_a = apply_distortions(img, a)
    # The records alone (through JSON) reproduce the image.
    again = [Distortion.from_dict(json.loads(json.dumps(d.to_dict()))) for d in a]
    out_b, ids_b = apply_distortions(img, again)
    np.testing.assert_array_equal(out_a, out_b)
    np.testing.assert_array_equal(ids_a, ids_b)


@pytest.mark.parametrize("dims", [2, 3])
def test_only_the_areas_change(dims: int) -> None:
    shape = (40, 48) if dims == 2 else (20, 24, 28)
    img = _ramp(shape)
    for seed in range(15):
        ds = sample_distortions(shape, np.random.default_rng(seed))
        assert ds and all(len(d.lo) == dims for d in ds)
        out, ids = apply_distortions(img, ds)
        np.testing.assert_array_equal(out[ids == 0], img[ids == 0])
        for j, d in enumerate(ds):
            # Areas never overlap, and each area is its mask inside its box.
            np.testing.assert_array_equal(ids == j + 1, full_mask(d, shape))
        assert np.abs(out - img)[ids > 0].max() > 0


def _apply_one(kind: str, img: np.ndarray, params: dict, shape: str = "box"
               ) -> tuple[np.ndarray, np.ndarray, Distortion]:
    d = Distortion(kind, (8, 10), (28, 34), shape, params)
    out, ids = apply_distortions(img, [d])
    return out, ids > 0, d


def test_each_type_does_what_it_says() -> None:
    img = _ramp()
    flat = np.full((40, 48), 0.5, np.float32)
    # noise: residual std = sigma
    out, m, _ = _apply_one("noise", flat, {"sigma": 0.2, "seed": 1})
    assert abs(float((out - flat)[m].std()) - 0.2) < 0.02
    # blur: the image's Gaussian blur inside the area
    out, m, _ = _apply_one("blur", img, {"sigma_vox": 2.0})
    np.testing.assert_allclose(out[m], ndimage.gaussian_filter(img, 2.0, mode="nearest")[m],
                               rtol=1e-5)
    # intensity: scale * x ** gamma + shift (0.5 -> 1.2 * 0.25 + 0.1 = 0.4)
    out, m, _ = _apply_one("intensity", flat, {"scale": 1.2, "shift": 0.1, "gamma": 2.0})
    np.testing.assert_allclose(out[m], 0.4, rtol=1e-6)
    # shuffle: each 4x4 block holds the same values, permuted
    out, m, d = _apply_one("shuffle", img, {"block": 4, "seed": 2})
    box_in, box_out = img[d.box], out[d.box]
    assert not np.array_equal(box_in, box_out)
    for i in range(0, 20, 4):
        for j in range(0, 24, 4):
            np.testing.assert_array_equal(np.sort(box_in[i:i + 4, j:j + 4], axis=None),
                                          np.sort(box_out[i:i + 4, j:j + 4], axis=None))
    # swap: the content of the source place
    out, m, d = _apply_one("swap", img, {"source_lo": [0, 0]})
    np.testing.assert_array_equal(out[d.box], img[0:20, 0:24])
    # mask: a constant
    out, m, _ = _apply_one("mask", img, {"value": 0.7})
    np.testing.assert_allclose(out[m], 0.7)
    # ghost: blend with the image shifted along one axis
    out, m, _ = _apply_one("ghost", img, {"axis": 1, "shift": 7, "weight": 0.5})
    np.testing.assert_allclose(out[m], (0.5 * img + 0.5 * np.roll(img, 7, axis=1))[m],
                               rtol=1e-5)


def test_area_shapes() -> None:
    ell = area_mask(Distortion("mask", (0, 0), (40, 40), "ellipse", {"value": 0.0}))
    assert abs(ell.mean() - np.pi / 4) < 0.02
    blob = area_mask(Distortion("mask", (0, 0), (40, 40), "blob",
                                {"value": 0.0, "mask_seed": 4}))
    assert blob.any() and not (blob & ~ell).any()
    assert ndimage.label(blob)[1] == 1
    assert area_mask(Distortion("mask", (0, 0), (5, 6), "box", {"value": 0.0})).all()


def test_bad_records_are_refused() -> None:
    with pytest.raises(DistortionError, match="unknown distortion type"):
        Distortion("melt", (0, 0), (4, 4))
    with pytest.raises(DistortionError, match="empty"):
        Distortion("mask", (4, 0), (4, 4))
    with pytest.raises(DistortionError, match="does not fit"):
        apply_distortions(np.zeros((8, 8)), [Distortion("mask", (0, 0), (9, 4),
                                                        params={"value": 1.0})])
    with pytest.raises(DistortionError):
        sample_distortions((64, 64), np.random.default_rng(0), kinds=("melt",))
    assert len(DISTORTION_TYPES) == 7


# ============================================================================ network
torch = pytest.importorskip("torch")

from mskmri.nn.registry import load_weights_into  # noqa: E402
from mskmri.nn.unet import UNet, UNetConfig  # noqa: E402
from mskmri.pretrain.data import PretextDataset, collect_images  # noqa: E402
from mskmri.pretrain.model import (  # noqa: E402
    PretrainConfig,
    PretrainNet,
    decode_detections,
    pretrain_loss,
    roi_align,
)
from mskmri.pretrain.task import build_network, save_encoder  # noqa: E402

FEATS = (4, 8, 16, 16)


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """One torch thread: tiny networks only lose time to thread hand-offs on shared cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _net(dims: int) -> PretrainNet:
    torch.manual_seed(0)
    return build_network(dims, FEATS)


@pytest.mark.parametrize("dims,size", [(2, 32), (3, 16)])
def test_forward_shapes_and_backward(dims: int, size: int) -> None:
    net = _net(dims)
    ds = PretextDataset([_ramp((size,) * dims)], (size,) * dims)
    batch = {k: torch.stack([ds.sample(0, np.random.default_rng(s))[k] for s in range(2)])
             for k in ("input", "target", "area_ids", "boxes", "types", "valid")}
    out = net(batch["input"])
    g = size // 4
    assert out["restored"].shape == (2, 1, *(size,) * dims)
    assert out["heatmap"].shape == (2, len(DISTORTION_TYPES), *(g,) * dims)
    assert out["size"].shape == out["offset"].shape == (2, dims, *(g,) * dims)
    loss, metrics = pretrain_loss(net, batch)
    loss.backward()
    assert set(metrics) == {"heatmap", "size", "offset", "mask", "restore"}
    assert all(p.grad is not None for p in net.encoder.parameters())
    boxes = torch.tensor([[2.0] * dims + [10.0] * dims])
    m = net.mask_logits(out, boxes, torch.tensor([0]), (size,) * dims)
    assert m.shape == (1, 1, *(2 * net.config.roi_size,) * dims)


def test_each_loss_decreases_on_a_tiny_problem() -> None:
    net = _net(2)
    ds = PretextDataset([_ramp((32, 32)), _ramp((32, 32))[::-1].copy()], (32, 32))
    batch = {k: torch.stack([ds.sample(i % 2, np.random.default_rng(i))[k] for i in range(2)])
             for k in ("input", "target", "area_ids", "boxes", "types", "valid")}
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    history = []
    torch.manual_seed(1)
    for _ in range(30):
        loss, metrics = pretrain_loss(net, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(metrics)
    for key in history[0]:
        late = np.mean([h[key] for h in history[-5:]])
        assert late < 0.8 * history[0][key], (key, history[0][key], late)


def test_roi_align_known_answer() -> None:
    # A feature equal to the x (last axis) voxel coordinate at stride 1.
    feat = torch.arange(16, dtype=torch.float32).repeat(16, 1)[None, None]
    box = torch.tensor([[4.0, 2.0, 8.0, 10.0]])  # rows 4..8, cols 2..10
    got = roi_align(feat, box, torch.tensor([0]), 4, (16, 16))
    # Bin centres along x: 2 + (0.5, 1.5, 2.5, 3.5) * 2 = 3, 5, 7, 9 voxel edges -> index - 0.5
    np.testing.assert_allclose(got[0, 0, 0].numpy(), [2.5, 4.5, 6.5, 8.5], atol=1e-5)


def test_decode_recovers_a_box() -> None:
    heat = torch.full((1, 7, 8, 8), -10.0)
    heat[0, 3, 2, 5] = 5.0
    size = torch.zeros(1, 2, 8, 8)
    size[0, :, 2, 5] = torch.log(torch.tensor([8.0, 12.0]))
    off = torch.zeros(1, 2, 8, 8)
    off[0, :, 2, 5] = 0.5
    det = decode_detections({"heatmap": heat, "size": size, "offset": off}, (4, 4))[0]
    assert det["types"].tolist() == [3]
    # centre (2.5, 5.5) cells * 4 = (10, 22) voxels, size (8, 12)
    np.testing.assert_allclose(det["boxes"][0].numpy(), [6, 16, 14, 28], atol=1e-4)


def test_config_round_trip() -> None:
    net = _net(2)
    again = PretrainNet.from_config_dict(json.loads(json.dumps(net.config_dict())))
    assert again.config == net.config
    assert isinstance(net.config, PretrainConfig)


def test_init_loads_the_pretrained_encoder(tmp_path: Path) -> None:
    net = _net(2)
    path = save_encoder(net, tmp_path / "enc.safetensors", name="t", command="test", seed=0,
                        training_data=[{"name": "x", "licence": "y"}], spacing_mm=1.0, dims=2)
    seg = UNet(UNetConfig(spatial_dims=2, features=FEATS, strides=(1, 2, 2, 2),
                          out_channels=2))
    counts = load_weights_into(seg, path)
    assert counts["loaded"] == len(net.encoder.state_dict())
    for k, v in net.encoder.state_dict().items():
        assert torch.equal(seg.state_dict()[f"encoder.{k}"], v)


# ============================================================================ data + CLI
def _write(path: Path, array: np.ndarray, spacing: tuple[float, ...]) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(array.astype(np.float32),
                             np.diag([*spacing, 1.0][:4] if len(spacing) == 3
                                     else [*spacing, 1.0, 1.0])), str(path))


def _images(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        _write(folder / f"vol{i}.nii.gz", rng.random((24, 40, 40)) + 0.2, (1.0, 1.0, 2.0))
    _write(folder / "vol0_gt.nii.gz", np.ones((24, 40, 40)), (1.0, 1.0, 2.0))  # skipped
    return folder


def test_collect_images_slices_and_mixing(tmp_path: Path) -> None:
    folder = _images(tmp_path / "im")
    got = collect_images([folder], dims=2, spacing_mm=None)
    # Slices across the thick axis (2), 24x40 each: 40 + 40 slices; the label file is skipped.
    assert len(got.images) == 80 and got.images[0].shape == (24, 40)
    assert {r.used_as for r in got.records} == {"2-D slices across axis 2"}
    _write(tmp_path / "flat.nii.gz", np.random.default_rng(1).random((40, 40)), (1.0, 1.0))
    mixed = collect_images([folder, tmp_path / "flat.nii.gz"], dims=2, spacing_mm=None)
    assert len(mixed.images) == 81
    from mskmri.pretrain.data import PretrainDataError

    with pytest.raises(PretrainDataError, match="--dims 3"):
        collect_images([folder, tmp_path / "flat.nii.gz"], dims=3, spacing_mm=None)
    vols = collect_images([folder], dims=3, spacing_mm=2.0)
    # 3-D: each volume resampled to 2 mm isotropic (24x40x40 at 1x1x2 mm -> 12x20x40).
    assert [v.shape for v in vols.images] == [(12, 20, 40)] * 2
    assert {r.used_as for r in vols.records} == {"3-D volume"}


def test_train_pretrain_cli_runs_and_resumes(tmp_path: Path) -> None:
    from mskmri.cli import main
    from mskmri.nn.train import load_checkpoint

    folder = _images(tmp_path / "im")
    out = tmp_path / "out"
    base = ["train", "pretrain", "--images", str(folder), "--out", str(out), "--batch-size",
            "2", "--patch", "32", "--features", "4", "8", "16", "16", "--spacing-mm", "0",
            "--device", "cpu"]
    assert main([*base, "--steps", "2"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    card = json.loads((out / "model.json").read_text())
    assert card["architecture"] == "unet-encoder" and card["extra"]["pretraining"] == "2-D"
    assert "2-D pretraining on 80 slices" in card["extra"]["mode"]
    assert json.loads((out / "images.json").read_text())["images"][0]["n_samples"] == 40
    assert (out / "pretrain_net.safetensors").is_file()
    assert main([*base, "--steps", "3", "--resume"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3
    seg = UNet(UNetConfig(spatial_dims=2, features=(4, 8, 16, 16), strides=(1, 2, 2, 2)))
    assert load_weights_into(seg, out / "model.safetensors")["loaded"] > 0


def test_unknown_geometry_is_explicit(tmp_path: Path) -> None:
    import nibabel as nib

    from mskmri.pretrain.data import PretrainDataError

    img = nib.Nifti1Image(np.random.default_rng(2).random((20, 30, 30)).astype(np.float32),
                          None)
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    nib.save(img, str(tmp_path / "nogeom.nii.gz"))
    with pytest.raises(PretrainDataError, match="no geometry"):
        collect_images([tmp_path / "nogeom.nii.gz"], dims=2, spacing_mm=1.0)
    got = collect_images([tmp_path / "nogeom.nii.gz"], dims=2, spacing_mm=1.0,
                         unknown_geometry="native")
    assert got.records[0].geometry.startswith("unknown") and got.records[0].spacing_mm is None
    assert got.images[0].shape in {(30, 30), (20, 30)}


def test_collect_images_reads_every_echo_of_a_dicom_folder(tmp_path: Path) -> None:
    from _dicom_factory import write_series

    uid = "1.2.826.0.1.3680043.8.498.777"
    rng = np.random.default_rng(3)
    for e, te in enumerate((10.0, 20.0), start=1):
        write_series(tmp_path / "dcm", (rng.random((32, 32, 4)) * 1000 + 100).astype(np.int16),
                     series_uid=uid, echo_time=te, echo_number=e, slice_spacing=3.0,
                     pixel_spacing=(0.5, 0.5), names=[f"e{e}_{k}.dcm" for k in range(4)])
    got = collect_images([tmp_path / "dcm"], dims=2, spacing_mm=1.0)
    # one image per echo, 4 slices across the 3 mm axis, 32 x 0.5 mm -> 16 pixels at 1 mm
    assert len(got.records) == 2 and [r.n_samples for r in got.records] == [4, 4]
    assert {r.path.rsplit("[series ", 1)[1] for r in got.records} == {"1:1]", "1:2]"}
    assert len(got.images) == 8 and got.images[0].shape == (16, 16)
