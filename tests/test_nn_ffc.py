"""FFC inpainting generator: shapes, gradients through the spectral branch, it learns to fill."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from mskmri.errors import DimensionError, ModelError  # noqa: E402
from mskmri.nn.ffc import (  # noqa: E402
    FFC,
    FFCConfig,
    FFCInpainter,
    FourierUnit,
    composite,
    make_input,
)

pytestmark = pytest.mark.torch

TINY2 = FFCConfig(spatial_dims=2, base_channels=8, n_downsample=2, n_blocks=1)


@pytest.mark.parametrize("dims,shape", [(2, (2, 1, 32, 48)), (3, (1, 1, 16, 16, 24))])
def test_forward_shapes(dims: int, shape: tuple[int, ...]) -> None:
    net = FFCInpainter(FFCConfig(spatial_dims=dims, base_channels=8, n_downsample=2,
                                 n_blocks=2))
    img = torch.randn(shape)
    mask = (torch.rand(shape) > 0.7).float()
    x = make_input(img, mask)
    assert x.shape == (shape[0], 2, *shape[2:])
    assert torch.all(x[:, :1][mask.bool()] == 0)  # the hole is hidden from the network
    assert net(x).shape == shape


def test_fourier_unit_sees_the_whole_field_of_view() -> None:
    """One voxel changed at a corner changes the output at the far corner (global branch)."""
    torch.manual_seed(0)
    fu = FourierUnit(2, 2, 2, norm="none")
    x = torch.randn(1, 2, 16, 16)
    y0 = fu(x)
    x2 = x.clone()
    x2[0, :, 0, 0] += 5.0
    assert (fu(x2) - y0)[0, :, 15, 15].abs().max() > 1e-4
    ffc = FFC(2, 8, 8, ratio=0.75, kernel=3, norm="none")
    yl, yg = ffc(torch.randn(1, 2, 8, 8), torch.randn(1, 6, 8, 8))
    assert yl.shape == (1, 2, 8, 8) and yg.shape == (1, 6, 8, 8)


def test_gradient_flows_to_every_parameter() -> None:
    torch.manual_seed(0)
    net = FFCInpainter(TINY2)
    img, mask = torch.randn(2, 1, 16, 16), torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 1
    net(make_input(img, mask)).square().mean().backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad
    assert any(".fu." in n for n, _ in net.named_parameters())  # spectral weights are trained


def test_bf16_autocast_runs_and_stays_close() -> None:
    torch.manual_seed(0)
    net = FFCInpainter(TINY2).eval()
    x = make_input(torch.rand(1, 1, 32, 32), torch.zeros(1, 1, 32, 32))
    with torch.no_grad():
        ref = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_learns_to_fill_a_constant_field_with_its_constant() -> None:
    """Fields of a random constant c with a box hole: the painted hole must come out ~c."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    net = FFCInpainter(TINY2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 200)

    def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.rand(n, 1, 1, 1, generator=gen) * 0.8 + 0.2
        img = c.expand(n, 1, 32, 32).clone()
        mask = torch.zeros(n, 1, 32, 32)
        for i in range(n):
            y, x = torch.randint(4, 16, (2,), generator=gen).tolist()
            mask[i, :, y:y + 12, x:x + 12] = 1
        return img, mask

    for _ in range(200):
        img, mask = batch()
        out = net(make_input(img, mask))
        loss = ((out - img).abs() * mask).sum() / mask.sum() + 0.1 * (out - img).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    img, mask = batch(16)
    with torch.no_grad():
        filled = composite(img, net(make_input(img, mask)), mask)
    err = ((filled - img).abs() * mask).sum() / mask.sum()
    naive = ((img - img.mean()).abs() * mask).sum() / mask.sum()  # one constant for all
    assert err < 0.06, f"mean abs error in the hole {err:.3f}"
    assert err < 0.35 * naive
    assert torch.equal(filled[mask == 0], img[mask == 0])  # known voxels are kept


def test_config_errors() -> None:
    with pytest.raises(ModelError, match="norm"):
        FFCConfig(norm="layer")
    with pytest.raises(ModelError, match="unknown FFC config keys"):
        FFCConfig.from_dict({"blocks": 3})
    assert FFCConfig.from_dict(TINY2.to_dict()) == TINY2
    with pytest.raises(DimensionError, match="multiple of 4"):
        FFCInpainter(TINY2)(torch.zeros(1, 2, 18, 16))
