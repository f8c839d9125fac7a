"""LaMa-style inpainting generator built from Fast Fourier Convolutions (FFC), 2-D and 3-D.

An FFC splits its channels into a *local* part (ordinary convolutions) and a *global* part
whose spectral transform mixes information over the whole field of view in one layer: a
real FFT over the spatial axes, a 1x1 convolution on the stacked real and imaginary parts,
and the inverse FFT (Suvorov et al., "Resolution-robust Large Mask Inpainting with Fourier
Convolutions", WACV 2022). The generator is LaMa's: a 7x7 stem, strided downsampling, a
stack of residual FFC blocks, transposed-convolution upsampling, a 7x7 output convolution.

Input is ``(N, 2, *S)``: channel 0 the image with the hole set to 0, channel 1 the mask
(1 = hole). Output is ``(N, 1, *S)``, the painted image (linear output: MRI intensities are
normalised, not bounded to [0, 1]); :func:`composite` keeps the known voxels.

Written in plain torch: neither torch nor MONAI ships Fourier convolutions. Normalisation is
batch norm by default, as in LaMa: instance norm would remove the absolute intensity level
that the painted marrow must match.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from mskmri.errors import DimensionError, ModelError

#: Fraction of channels in the global (spectral) branch, LaMa's ``ratio_gin = ratio_gout``.
GLOBAL_RATIO = 0.75
#: Kernel of the stem and output convolutions (LaMa: 7).
OUTER_KERNEL = 7
#: Padding of the spatial convolutions (LaMa: reflection, which torch has in 2-D and 3-D).
PAD_MODE = "reflect"

_NORMS = ("batch", "instance", "none")


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv3d if dims == 3 else nn.Conv2d


def _tconv(dims: int) -> type[nn.Module]:
    return nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d


def _norm(dims: int, kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d)(channels, affine=True)
    return nn.Identity()


@dataclass(frozen=True)
class FFCConfig:
    """Architecture of an :class:`FFCInpainter` (JSON-serialisable via :meth:`to_dict`).

    Parameters
    ----------
    spatial_dims : {2, 3}
        Slices or volumes.
    in_channels : int
        Image channels plus one mask channel (2 for one MRI contrast).
    out_channels : int
        Painted image channels.
    base_channels : int
        Channels after the stem; doubled at each downsampling.
    n_downsample : int
        Stride-2 downsamplings (LaMa: 3). Input sizes must be multiples of ``2**n_downsample``.
    n_blocks : int
        Residual FFC blocks at the lowest resolution (LaMa big: 18, LaMa: 9).
    global_ratio : float
        Fraction of the channels in the spectral branch.
    norm : {"batch", "instance", "none"}
        Normalisation after each convolution.
    """

    spatial_dims: int = 2
    in_channels: int = 2
    out_channels: int = 1
    base_channels: int = 32
    n_downsample: int = 3
    n_blocks: int = 6
    global_ratio: float = GLOBAL_RATIO
    norm: str = "batch"

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ModelError(f"spatial_dims must be 2 or 3, not {self.spatial_dims}")
        if self.norm not in _NORMS:
            raise ModelError(f"norm must be one of {_NORMS}, not {self.norm!r}")
        if not 0.0 < self.global_ratio < 1.0:
            raise ModelError(f"global_ratio must be in (0, 1), not {self.global_ratio}")
        if self.in_channels < 2:
            raise ModelError("in_channels counts the image channels plus the mask channel: >= 2")
        if self.base_channels < 4 or self.n_downsample < 0 or self.n_blocks < 1:
            raise ModelError("base_channels >= 4, n_downsample >= 0 and n_blocks >= 1 are needed")

    @property
    def size_divisor(self) -> int:
        """Each spatial input size must be a multiple of this."""
        return 2 ** self.n_downsample

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FFCConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"unknown FFC config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)


class FourierUnit(nn.Module):
    """Global mixing in the frequency domain.

    ``(N, C, *S)`` -> real FFT over ``S`` -> real and imaginary parts stacked as ``2C``
    channels -> 1x1 conv -> norm -> ReLU -> back to complex -> inverse FFT -> ``(N, C_out, *S)``.
    The FFT runs in float32 even under bf16 autocast (torch has no bf16 FFT on CPU).
    """

    def __init__(self, dims: int, c_in: int, c_out: int, norm: str) -> None:
        super().__init__()
        self.dims = dims
        self.conv = _conv(dims)(2 * c_in, 2 * c_out, 1, bias=False)
        self.norm = _norm(dims, norm, 2 * c_out)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = tuple(range(-self.dims, 0))
        size = x.shape[-self.dims:]
        with torch.autocast(device_type=x.device.type, enabled=False):
            f = torch.fft.rfftn(x.float(), dim=spatial, norm="ortho")
            n, c = f.shape[:2]
            # (N, C, *F) complex -> (N, C, 2, *F) real -> (N, 2C, *F)
            z = torch.stack((f.real, f.imag), dim=2).reshape(n, 2 * c, *f.shape[2:])
        z = self.act(self.norm(self.conv(z)))
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = z.float().reshape(n, -1, 2, *z.shape[2:])
            out = torch.fft.irfftn(torch.complex(z[:, :, 0], z[:, :, 1]), s=size, dim=spatial,
                                   norm="ortho")
        return out.to(x.dtype)


class SpectralTransform(nn.Module):
    """LaMa's global branch: 1x1 reduce (C_out/2) -> Fourier unit -> residual -> 1x1 expand."""

    def __init__(self, dims: int, c_in: int, c_out: int, norm: str) -> None:
        super().__init__()
        half = max(c_out // 2, 1)
        self.reduce = nn.Sequential(_conv(dims)(c_in, half, 1, bias=False),
                                    _norm(dims, norm, half), nn.ReLU(inplace=True))
        self.fu = FourierUnit(dims, half, half, norm)
        self.expand = _conv(dims)(half, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        return self.expand(x + self.fu(x))


class FFC(nn.Module):
    """One Fast Fourier Convolution on a (local, global) channel split, same spatial size.

    local_out = conv_ll(local) + conv_gl(global); global_out = conv_lg(local) + spectral(global),
    each followed by norm + activation.
    """

    def __init__(self, dims: int, c_in: int, c_out: int, ratio: float, kernel: int,
                 norm: str) -> None:
        super().__init__()
        self.g_in = int(c_in * ratio)
        self.l_in = c_in - self.g_in
        g_out = int(c_out * ratio)
        l_out = c_out - g_out
        pad = kernel // 2
        conv = _conv(dims)

        def k(ci: int, co: int) -> nn.Module:
            return conv(ci, co, kernel, padding=pad, padding_mode=PAD_MODE, bias=False)

        self.l2l = k(self.l_in, l_out)
        self.g2l = k(self.g_in, l_out)
        self.l2g = k(self.l_in, g_out)
        self.g2g = SpectralTransform(dims, self.g_in, g_out, norm)
        self.norm_l = _norm(dims, norm, l_out)
        self.norm_g = _norm(dims, norm, g_out)
        self.act = nn.ReLU(inplace=True)

    def forward(self, xl: torch.Tensor, xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        yl = self.act(self.norm_l(self.l2l(xl) + self.g2l(xg)))
        yg = self.act(self.norm_g(self.l2g(xl) + self.g2g(xg)))
        return yl, yg


class FFCResBlock(nn.Module):
    """Two FFCs with an identity skip on both branches (LaMa's ``FFCResnetBlock``)."""

    def __init__(self, dims: int, channels: int, ratio: float, norm: str) -> None:
        super().__init__()
        self.ffc1 = FFC(dims, channels, channels, ratio, 3, norm)
        self.ffc2 = FFC(dims, channels, channels, ratio, 3, norm)

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        xl, xg = x
        yl, yg = self.ffc2(*self.ffc1(xl, xg))
        return xl + yl, xg + yg


class FFCInpainter(nn.Module):
    """LaMa-style generator: stem, downsampling, residual FFC blocks, upsampling, output conv.

    Parameters
    ----------
    config : FFCConfig, optional
        Architecture (default: 2-D, 32 base channels, 3 downsamplings, 6 FFC blocks).

    Forward: ``(N, in_channels, *S)`` (image with hole, then mask) -> ``(N, out_channels, *S)``.
    Spatial sizes must be multiples of ``config.size_divisor``.
    """

    architecture: ClassVar[str] = "ffc-inpainter"

    def __init__(self, config: FFCConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or FFCConfig()
        d, conv = c.spatial_dims, _conv(c.spatial_dims)
        ch = c.base_channels
        self.stem = nn.Sequential(
            conv(c.in_channels, ch, OUTER_KERNEL, padding=OUTER_KERNEL // 2,
                 padding_mode=PAD_MODE, bias=False),
            _norm(d, c.norm, ch), nn.ReLU(inplace=True))
        down: list[nn.Module] = []
        for _ in range(c.n_downsample):
            down += [conv(ch, 2 * ch, 3, stride=2, padding=1, bias=False),
                     _norm(d, c.norm, 2 * ch), nn.ReLU(inplace=True)]
            ch *= 2
        self.down = nn.Sequential(*down)
        self.g_channels = int(ch * c.global_ratio)
        self.blocks = nn.Sequential(*[FFCResBlock(d, ch, c.global_ratio, c.norm)
                                      for _ in range(c.n_blocks)])
        up: list[nn.Module] = []
        for _ in range(c.n_downsample):
            up += [_tconv(d)(ch, ch // 2, 3, stride=2, padding=1, output_padding=1, bias=False),
                   _norm(d, c.norm, ch // 2), nn.ReLU(inplace=True)]
            ch //= 2
        self.up = nn.Sequential(*up)
        self.head = conv(ch, c.out_channels, OUTER_KERNEL, padding=OUTER_KERNEL // 2,
                         padding_mode=PAD_MODE)

    @classmethod
    def from_config_dict(cls, data: dict[str, Any]) -> FFCInpainter:
        """Build from a model card's ``config`` (an :class:`FFCConfig` dict)."""
        return cls(FFCConfig.from_dict(data))

    def config_dict(self) -> dict[str, Any]:
        """The config as written into model cards."""
        return self.config.to_dict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if not (torch.jit.is_tracing() or torch.jit.is_scripting()):
            if x.ndim != c.spatial_dims + 2 or x.shape[1] != c.in_channels:
                raise DimensionError(f"input must be (N, {c.in_channels}, *S) with "
                                     f"{c.spatial_dims} spatial axes, not {tuple(x.shape)}")
            if any(int(s) % c.size_divisor for s in x.shape[2:]):
                raise DimensionError(f"spatial size {tuple(x.shape[2:])} is not a multiple of "
                                     f"{c.size_divisor}; pad the input")
        h = self.down(self.stem(x))
        hl, hg = self.blocks((h[:, : h.shape[1] - self.g_channels],
                              h[:, h.shape[1] - self.g_channels:]))
        return self.head(self.up(torch.cat([hl, hg], dim=1)))


def make_input(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Network input from an image and a hole mask.

    Parameters
    ----------
    image : (N, C, *S) tensor
        Normalised intensities.
    mask : (N, 1, *S) tensor
        1 inside the hole (to paint), 0 where the image is known.

    Returns
    -------
    (N, C + 1, *S) tensor
        The image with the hole set to 0, then the mask.
    """
    mask = mask.to(image.dtype)
    return torch.cat([image * (1.0 - mask), mask], dim=1)


def composite(image: torch.Tensor, painted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Known voxels from ``image``, hole voxels from ``painted`` (all ``(N, C, *S)``)."""
    mask = mask.to(image.dtype)
    return image * (1.0 - mask) + painted * mask

