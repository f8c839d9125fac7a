"""U-Net: shapes, encoder features, encoder weights shared with the full network, budget."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from mskmri.errors import DimensionError, ModelError  # noqa: E402
from mskmri.nn.unet import UNet, UNetConfig, UNetEncoder, count_parameters  # noqa: E402

pytestmark = pytest.mark.torch

TINY3 = UNetConfig(spatial_dims=3, in_channels=1, out_channels=3, features=(4, 8, 16),
                   strides=(1, 2, 2))


def test_default_config_fits_the_size_budget() -> None:
    net = UNet(UNetConfig(out_channels=18))  # the 18 knee classes
    n = count_parameters(net)
    assert n * 4 < 25e6, f"{n} float32 parameters exceed 25 MB"
    assert n > 1e6  # and it is not a toy


@pytest.mark.parametrize("residual", [False, True])
def test_3d_shapes_and_encoder_scales(residual: bool) -> None:
    cfg = UNetConfig(spatial_dims=3, out_channels=3, features=(4, 8, 16, 32),
                     strides=(1, (1, 2, 2), 2, 2), kernel_sizes=((1, 3, 3), 3, 3, 3),
                     residual=residual)
    assert cfg.size_divisor == (4, 8, 8)
    net = UNet(cfg).eval()
    x = torch.randn(2, 1, 8, 16, 24)
    feats = net.encoder(x)
    assert [tuple(f.shape) for f in feats] == [(2, 4, 8, 16, 24), (2, 8, 8, 8, 12),
                                             (2, 16, 4, 4, 6), (2, 32, 2, 2, 3)]
    assert net(x).shape == (2, 3, 8, 16, 24)


def test_2d_and_deep_supervision() -> None:
    cfg = UNetConfig(spatial_dims=2, in_channels=2, out_channels=4, features=(4, 8, 16),
                     strides=(1, 2, 2), deep_supervision=True)
    net = UNet(cfg)
    x = torch.randn(3, 2, 16, 32)
    outs = net.train()(x)
    assert [tuple(o.shape) for o in outs] == [(3, 4, 16, 32), (3, 4, 8, 16)]
    single = net.eval()(x)
    assert torch.equal(single, outs[0])  # eval returns the full-resolution head


def test_encoder_weights_load_into_the_unet_under_the_encoder_prefix() -> None:
    torch.manual_seed(0)
    enc = UNetEncoder(TINY3)
    net = UNet(TINY3)
    enc_keys = set(enc.state_dict())
    assert {k for k in net.state_dict() if k.startswith("encoder.")} == \
        {"encoder." + k for k in enc_keys}
    missing, unexpected = net.load_state_dict(
        {"encoder." + k: v for k, v in enc.state_dict().items()}, strict=False)
    assert not unexpected and all(k.startswith("decoder.") for k in missing)
    x = torch.randn(1, 1, 8, 8, 8)
    enc.eval(), net.eval()
    for a, b in zip(enc(x), net.encoder(x), strict=True):
        assert torch.equal(a, b)


def test_channels_last_gives_the_same_logits() -> None:
    torch.manual_seed(1)
    net = UNet(TINY3).eval()
    x = torch.randn(2, 1, 8, 12, 16)
    ref = net(x)
    net_cl = net.to(memory_format=torch.channels_last_3d)
    out = net_cl(x.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_parameter() -> None:
    net = UNet(UNetConfig(spatial_dims=2, out_channels=2, features=(4, 8), strides=(1, 2),
                          residual=True))
    net(torch.randn(2, 1, 8, 8)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_config_round_trip_and_errors() -> None:
    cfg = UNetConfig(spatial_dims=3, features=(4, 8), strides=(1, (1, 2, 2)))
    again = UNetConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert again.level_strides == ((1, 1, 1), (1, 2, 2))
    with pytest.raises(ModelError, match="unknown U-Net config keys"):
        UNetConfig.from_dict({**cfg.to_dict(), "n_filters": 3})
    with pytest.raises(ModelError, match="one stride per level"):
        UNetConfig(features=(4, 8), strides=(1, 2, 2))
    with pytest.raises(ModelError, match="odd"):
        UNetConfig(features=(4, 8), strides=(1, 2), kernel_sizes=4)


def test_input_size_not_divisible_is_a_clear_error() -> None:
    net = UNet(TINY3)
    with pytest.raises(DimensionError, match="multiple of"):
        net(torch.randn(1, 1, 8, 8, 10))
    with pytest.raises(DimensionError, match="input must be"):
        net(torch.randn(1, 2, 8, 8, 8))
