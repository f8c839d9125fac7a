"""Sliding-window inferer: exact blending, tiling, regions, buffers reused, bf16 and ONNX."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mskmri.errors import DimensionError  # noqa: E402
from mskmri.nn.inference import (  # noqa: E402
    InferenceError,
    SlidingWindowConfig,
    SlidingWindowInferer,
    bbox_slices,
    gaussian_importance,
    paste,
    tile_starts,
)
from mskmri.nn.unet import UNet, UNetConfig  # noqa: E402

pytestmark = pytest.mark.torch


class VoxelwiseNet(torch.nn.Module):
    """A 1x1x1 convolution: its output at a voxel does not depend on the window, so the
    blended sliding-window output must equal the network applied to the whole image."""

    def __init__(self, k: int = 3, dims: int = 3) -> None:
        super().__init__()
        conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
        self.conv = conv(1, k, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(1.0, k + 1).view(k, 1, *([1] * dims)) - 2)
            self.conv.bias.copy_(torch.linspace(-0.5, 0.5, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("size,patch,overlap", [(100, 32, 0.5), (32, 32, 0.5), (10, 32, 0.5),
                                                (97, 40, 0.25), (50, 16, 0.0)])
def test_tile_starts_cover_the_axis_with_the_overlap(size: int, patch: int,
                                                     overlap: float) -> None:
    starts = tile_starts(size, patch, overlap)
    assert starts[0] == 0 and starts[-1] == max(size - patch, 0)
    covered = np.zeros(max(size, patch), bool)
    for s in starts:
        covered[s:s + patch] = True
    assert covered.all()
    gaps = np.diff(starts)
    assert np.all(gaps <= patch * (1 - overlap) + 1e-9) and np.all(gaps > 0)


def test_gaussian_importance_peaks_in_the_centre_and_is_symmetric() -> None:
    w = gaussian_importance((9, 16, 5))
    assert w.shape == (9, 16, 5) and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0) and w.min() > 0
    np.testing.assert_allclose(w, w[::-1, ::-1, ::-1], rtol=1e-6)
    assert w[4, 7, 2] == pytest.approx(w.max(), rel=1e-3)
    # sigma = patch/8: one sigma from the centre of a 1-D window the weight is exp(-1/2)
    w1 = gaussian_importance((81,))
    assert w1[40 + 10] == pytest.approx(np.exp(-0.5 * (10 / 10.125) ** 2), rel=1e-5)


@pytest.mark.parametrize("shape,patch", [((20, 37, 29), (8, 16, 16)),   # several windows
                                         ((5, 9, 40), (8, 16, 16))])    # padded region
def test_voxelwise_network_blends_to_the_whole_image_output(shape: tuple[int, ...],
                                                            patch: tuple[int, ...]) -> None:
    net = VoxelwiseNet()
    img = _image(shape)
    inferer = SlidingWindowInferer(net, SlidingWindowConfig(patch, overlap=0.5, batch_size=3))
    out = inferer.logits(img)
    with torch.no_grad():
        ref = net(torch.from_numpy(img)[None, None])[0].numpy()
    assert out.shape == (3, *shape)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(inferer.labels(img), ref.argmax(0))


def test_region_only_and_paste_back() -> None:
    net = VoxelwiseNet(dims=2)
    img = _image((60, 50))
    roi = (slice(10, 41), slice(5, 30))
    inferer = SlidingWindowInferer(net, SlidingWindowConfig((16, 16), overlap=0.25))
    lab = inferer.labels(img, roi=roi)
    assert lab.shape == (31, 25) and lab.dtype == np.uint8
    with torch.no_grad():
        ref = net(torch.from_numpy(img)[None, None])[0].numpy().argmax(0)
    np.testing.assert_array_equal(lab, ref[roi])
    full = paste(lab, img.shape, roi)
    assert full.shape == img.shape and full[:10].max() == 0
    np.testing.assert_array_equal(full[roi], lab)
    assert inferer.stats.region_shape == (31, 25)
    assert inferer.stats.windows == len(tile_starts(31, 16, 0.25)) * len(tile_starts(25, 16, 0.25))


def test_buffers_are_allocated_once_and_reused() -> None:
    inferer = SlidingWindowInferer(VoxelwiseNet(), SlidingWindowConfig((8, 8, 8), batch_size=2))
    img = _image((12, 20, 20))
    first = inferer.labels(img)
    acc_ptr = inferer._acc.data_ptr()
    in_ptr = inferer._inbuf.data_ptr()
    second = inferer.labels(img + 0.0)
    assert inferer._acc.data_ptr() == acc_ptr and inferer._inbuf.data_ptr() == in_ptr
    np.testing.assert_array_equal(first, second)  # the reused accumulator was zeroed
    for layout in (True, False):  # returned logits never alias the reused accumulator
        inf = SlidingWindowInferer(VoxelwiseNet(), SlidingWindowConfig((8, 8, 8),
                                                                       channels_last=layout))
        a = inf.logits(img)
        keep = a.copy()
        inf.logits(img * 2.0)
        np.testing.assert_array_equal(a, keep)
        assert a.flags.c_contiguous


def test_unet_bf16_and_onnx_agree_with_fp32(tmp_path) -> None:
    torch.manual_seed(0)
    net = UNet(UNetConfig(out_channels=4, features=(4, 8, 16), strides=(1, 2, 2)))
    img = _image((20, 40, 36), seed=3)
    patch = (16, 24, 24)
    ref = SlidingWindowInferer(net, SlidingWindowConfig(patch, channels_last=False))
    ref_logits = ref.logits(img)
    cl = SlidingWindowInferer(net, SlidingWindowConfig(patch, channels_last=True))
    np.testing.assert_allclose(cl.logits(img), ref_logits, rtol=1e-4, atol=1e-4)
    bf16 = SlidingWindowInferer(net, SlidingWindowConfig(patch, precision="bf16"))
    agree_bf16 = (bf16.labels(img) == ref_logits.argmax(0)).mean()
    assert agree_bf16 > 0.97
    onnx_file = tmp_path / "net.onnx"
    ort = SlidingWindowInferer(net, SlidingWindowConfig(patch, backend="onnx", batch_size=3),
                               onnx_path=onnx_file)
    assert onnx_file.is_file()
    np.testing.assert_allclose(ort.logits(img), ref_logits, rtol=1e-4, atol=1e-4)
    # the export is reusable without the network
    again = SlidingWindowInferer(None, SlidingWindowConfig(patch, backend="onnx"),
                                 onnx_path=onnx_file)
    np.testing.assert_array_equal(again.labels(img), ort.labels(img))


def test_bbox_slices() -> None:
    m = np.zeros((10, 10, 10), bool)
    m[2:4, 5, 7:9] = True
    assert bbox_slices(m) == (slice(2, 4), slice(5, 6), slice(7, 9))
    assert bbox_slices(m, 2) == (slice(0, 6), slice(3, 8), slice(5, 10))
    assert bbox_slices(np.zeros((3, 3), bool)) is None


def test_errors_say_what_is_wrong() -> None:
    with pytest.raises(InferenceError, match="overlap"):
        SlidingWindowConfig((8, 8), overlap=1.0)
    with pytest.raises(InferenceError, match="fp32 only"):
        SlidingWindowConfig((8, 8), backend="onnx", precision="bf16")
    inferer = SlidingWindowInferer(VoxelwiseNet(), SlidingWindowConfig((8, 8, 8)))
    with pytest.raises(DimensionError, match="spatial axes"):
        inferer.labels(np.zeros((4, 4), np.float32))
    with pytest.raises(InferenceError, match="empty"):
        inferer.labels(np.zeros((4, 4, 4), np.float32), roi=(slice(2, 2),) * 3)
