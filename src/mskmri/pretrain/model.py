"""The pretraining network: find, classify, outline and restore distorted areas.

Architecture (2-D or 3-D, every operation rank-generic)
------------------------------------------------------
::

    distorted image (N, 1, *S)
        |
    encoder = UNetEncoder (exactly the segmentation network's; weights under ``encoder.``)
        |  feats[0] (stride 1) ... feats[L-1] (bottleneck)
        +--> restoration decoder = UNetDecoder (1 output channel), residual:
        |        restored = input + decoder(feats)                    -> (N, 1, *S)
        +--> neck: 1x1 lateral of feats[det_level] + upsampled 1x1 lateral of feats[L-1]
        |        (one top-down FPN step; the detection level sees the bottleneck context)
        |    detection head (anchor-free, CenterNet/FCOS-style, on the neck, stride r):
        |        heatmap  (N, K, *S/r)  centre of an area of type k (logits, focal loss)
        |        size     (N, D, *S/r)  log box edge in voxels at the centre cell (L1)
        |        offset   (N, D, *S/r)  sub-cell position of the centre (L1)
        +--> mask head, per area box (ground-truth boxes in training, decoded ones at use):
                 ROI-align #1: the neck sampled on an R^D grid over the box (grid_sample)
                 -> 2 conv blocks -> transposed conv (x2) = the extra decoder layer
                 ROI-align #2: feats[0] (full resolution) on a (2R)^D grid = the skip
                 concat -> conv block -> 1x1 conv -> mask logits (M, 1, *(2R)^D) (BCE)

Losses (:func:`pretrain_loss`): focal loss on the heatmap (CenterNet, alpha 2, beta 4) over a
Gaussian target per area, L1 on log size and offset at the centre cells, BCE on the masks,
and an L1 restoration loss weighted :data:`AREA_WEIGHT` times more inside the areas.

What changed from Mask R-CNN / iMaskRCNN (Felfeliyan et al.) and why
-------------------------------------------------------------------
- **Backbone**: not a ResNet-FPN but exactly :class:`mskmri.nn.unet.UNetEncoder`, so the
  pretrained weights load into our segmentation U-Net unchanged (``--init``).
- **No anchors, no region-proposal network, no NMS stage**: a dense centre-heatmap head
  (CenterNet / FCOS family) on one neck level. Distorted areas are few (1-3 per image), of
  free aspect ratio and never overlap, which is the easy case for centre heatmaps; anchors
  would need per-aspect tuning and explode in number in 3-D, while the heatmap head is the
  same code for 2-D and 3-D. Classification of the distortion type is the heatmap channel.
- **One neck level instead of a 4-level FPN**: areas span 12-35% of the image side, which a
  stride-4 level with bottleneck context covers; fewer heads is less compute on CPUs.
- **Mask head on ground-truth boxes in training** (jittered), not on sampled proposals:
  without an RPN there are no proposals to sample, and the mask head's job in pretraining is
  to teach boundaries, not to rescore detections. At use, decoded boxes feed it.
- **Kept from iMaskRCNN**: a second ROI-align (here on the full-resolution encoder level),
  an extra mask-decoder layer (the transposed convolution) and a skip connection (the
  second ROI-align concatenated after it).
- **Restoration** is a U-Net decoder over the whole image (the authors restore inside the
  ROI); a whole-image decoder trains every encoder level, including the skips the
  segmentation decoder will use, and needs no ROI paste-back.
- ROI-align is written with :func:`torch.nn.functional.grid_sample` (bilinear, one sample per
  bin centre), because torchvision's ``roi_align`` does not load against this CPU torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from mskmri.errors import ModelError
from mskmri.nn.unet import LEAKY_SLOPE, InstanceNorm, UNetConfig, UNetDecoder, UNetEncoder
from mskmri.pretrain.distortions import DISTORTION_TYPES

#: Restoration loss weight inside distorted areas relative to outside.
AREA_WEIGHT = 5.0
#: CenterNet focal-loss exponents.
FOCAL_ALPHA = 2.0
FOCAL_BETA = 4.0
#: Gaussian sigma of a heatmap target as a fraction of the box edge (per axis).
HEATMAP_SIGMA_FRAC = 1.0 / 6.0
#: Relative jitter of ground-truth boxes fed to the mask head in training.
BOX_JITTER = 0.1
#: Default loss weights.
LOSS_WEIGHTS: dict[str, float] = {"heatmap": 1.0, "size": 0.5, "offset": 0.5, "mask": 1.0,
                                  "restore": 10.0}


@dataclass(frozen=True)
class PretrainConfig:
    """Architecture of a :class:`PretrainNet`.

    Parameters
    ----------
    unet : UNetConfig
        The segmentation network's config; its encoder is the backbone (``out_channels`` is
        ignored: the restoration decoder has one output).
    det_level : int
        Encoder level of the detection head (its stride ``r`` = product of strides up to it).
    n_types : int
        Distortion classes (``len(DISTORTION_TYPES)``).
    head_channels : int
        Channels of the neck and heads.
    roi_size : int
        ROI-align grid edge R of the mask head (mask logits are 2R per axis).
    """

    unet: UNetConfig = field(default_factory=lambda: UNetConfig(spatial_dims=2))
    det_level: int = 2
    n_types: int = len(DISTORTION_TYPES)
    head_channels: int = 32
    roi_size: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.det_level < len(self.unet.features) - 1:
            raise ModelError(f"det_level must be between 1 and {len(self.unet.features) - 2} "
                             f"(not the first or the bottleneck level), not {self.det_level}")
        if self.n_types < 1 or self.head_channels < 1 or self.roi_size < 2:
            raise ModelError(f"n_types, head_channels must be >= 1 and roi_size >= 2, not "
                             f"{self.n_types}, {self.head_channels}, {self.roi_size}")

    @property
    def stride(self) -> tuple[int, ...]:
        """Stride of the detection level per axis (input voxels per heatmap cell)."""
        d = self.unet.spatial_dims
        return tuple(math.prod(s[a] for s in self.unet.level_strides[:self.det_level + 1])
                     for a in range(d))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the U-Net config nested)."""
        return {"unet": self.unet.to_dict(), "det_level": self.det_level,
                "n_types": self.n_types, "head_channels": self.head_channels,
                "roi_size": self.roi_size}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PretrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"unknown pretraining config keys {unknown}; known {sorted(known)}")
        kw = dict(data)
        if "unet" in kw:
            kw["unet"] = UNetConfig.from_dict(dict(kw["unet"]))
        return cls(**kw)


def _conv(d: int, c_in: int, c_out: int, k: int = 3) -> nn.Module:
    conv = nn.Conv3d if d == 3 else nn.Conv2d
    return conv(c_in, c_out, k, padding=k // 2)


def _block(d: int, c_in: int, c_out: int) -> nn.Sequential:
    conv = nn.Conv3d if d == 3 else nn.Conv2d
    return nn.Sequential(conv(c_in, c_out, 3, padding=1, bias=False), InstanceNorm(c_out),
                         nn.LeakyReLU(LEAKY_SLOPE, inplace=True))


def roi_grid(boxes: torch.Tensor, out_size: int, image_size: tuple[int, ...]) -> torch.Tensor:
    """Sampling grid of ``out_size`` bin centres per axis over each box, for ``grid_sample``.

    Parameters
    ----------
    boxes : (M, 2D) float tensor
        ``lo_0 .. lo_{D-1}, hi_0 .. hi_{D-1}`` in input voxel indices (hi exclusive).
    out_size : int
        Bins per axis.
    image_size : tuple of D ints
        Input spatial size (voxels).

    Returns
    -------
    (M, *([out_size] * D), D) tensor
        Normalised coordinates (``align_corners=False``), last axis in grid_sample's x, y(, z)
        order (i.e. reversed array axes).
    """
    d = len(image_size)
    lo, hi = boxes[:, :d], boxes[:, d:]
    t = (torch.arange(out_size, device=boxes.device, dtype=boxes.dtype) + 0.5) / out_size
    axes = []
    for a in range(d):
        pos = lo[:, a:a + 1] + t[None] * (hi[:, a:a + 1] - lo[:, a:a + 1])  # (M, R) voxels
        axes.append(pos / image_size[a] * 2.0 - 1.0)
    mesh = []
    for a in range(d):
        shape = [boxes.shape[0]] + [1] * d
        shape[a + 1] = out_size
        mesh.append(axes[a].reshape(shape).expand(boxes.shape[0], *([out_size] * d)))
    return torch.stack(mesh[::-1], dim=-1)


def roi_align(feat: torch.Tensor, boxes: torch.Tensor, batch_index: torch.Tensor,
              out_size: int, image_size: tuple[int, ...]) -> torch.Tensor:
    """Bilinear ROI-align of ``feat`` over ``boxes`` (one sample per bin centre).

    ``feat`` ``(N, C, *s)`` at any stride of an input of ``image_size``; boxes in input voxels;
    returns ``(M, C, *([out_size] * D))``.
    """
    grid = roi_grid(boxes, out_size, image_size)
    src = feat[batch_index]
    return F.grid_sample(src, grid.to(src.dtype), mode="bilinear", padding_mode="border",
                         align_corners=False)


class PretrainNet(nn.Module):
    """Encoder + restoration decoder + anchor-free detection head + ROI mask head.

    Forward: ``(N, 1, *S)`` -> dict with ``restored (N, 1, *S)``, ``heatmap (N, K, *S/r)``,
    ``size (N, D, *S/r)``, ``offset (N, D, *S/r)``, and ``neck``/``feats`` for
    :meth:`mask_logits`. See the module docstring.
    """

    architecture: ClassVar[str] = "pretrain-net"

    def __init__(self, config: PretrainConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or PretrainConfig()
        u = c.unet
        d = u.spatial_dims
        self.encoder = UNetEncoder(u)
        dec_cfg = UNetConfig.from_dict({**u.to_dict(), "out_channels": 1,
                                        "deep_supervision": False})
        self.restore = UNetDecoder(dec_cfg)
        h = c.head_channels
        conv1 = nn.Conv3d if d == 3 else nn.Conv2d
        self.lateral = conv1(u.features[c.det_level], h, 1)
        self.top = conv1(u.features[-1], h, 1)
        self.neck = _block(d, h, h)
        self.heatmap = nn.Sequential(_block(d, h, h), _conv(d, h, c.n_types, 1))
        self.size = nn.Sequential(_block(d, h, h), _conv(d, h, d, 1))
        self.offset = nn.Sequential(_block(d, h, h), _conv(d, h, d, 1))
        # CenterNet's prior: start with a low centre probability everywhere.
        nn.init.constant_(self.heatmap[-1].bias, -2.19)  # type: ignore[index, arg-type]
        self.mask_convs = nn.Sequential(_block(d, h, h), _block(d, h, h))
        tconv = nn.ConvTranspose3d if d == 3 else nn.ConvTranspose2d
        self.mask_up = tconv(h, h, 2, stride=2)
        self.mask_fuse = _block(d, h + u.features[0], h)
        self.mask_out = _conv(d, h, 1, 1)

    @classmethod
    def from_config_dict(cls, data: dict[str, Any]) -> PretrainNet:
        """Build from a model card's ``config``."""
        return cls(PretrainConfig.from_dict(data))

    def config_dict(self) -> dict[str, Any]:
        """The config as written into model cards."""
        return self.config.to_dict()

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        c = self.config
        d = c.unet.spatial_dims
        if x.ndim != d + 2 or x.shape[1] != 1:
            raise ModelError(f"input must be (N, 1, {', '.join('S' * d)}), not {tuple(x.shape)}")
        feats = self.encoder(x)
        restored = x + self.restore(feats)
        lat = self.lateral(feats[c.det_level])
        top = F.interpolate(self.top(feats[-1]), size=lat.shape[2:], mode="nearest")
        neck = self.neck(lat + top)
        return {"restored": restored, "heatmap": self.heatmap(neck), "size": self.size(neck),
                "offset": self.offset(neck), "neck": neck, "feats": feats}

    def mask_logits(self, out: Mapping[str, Any], boxes: torch.Tensor,
                    batch_index: torch.Tensor, image_size: tuple[int, ...]) -> torch.Tensor:
        """Mask logits ``(M, 1, *([2R] * D))`` of the areas ``boxes`` (``(M, 2D)``, voxels)."""
        r = self.config.roi_size
        roi = roi_align(out["neck"], boxes, batch_index, r, image_size)
        y = self.mask_up(self.mask_convs(roi))
        skip = roi_align(out["feats"][0], boxes, batch_index, 2 * r, image_size)
        return self.mask_out(self.mask_fuse(torch.cat([y, skip], dim=1)))


# ============================================================================ losses
def _gaussian_targets(boxes: torch.Tensor, types: torch.Tensor, valid: torch.Tensor,
                      n_types: int, grid: tuple[int, ...], stride: tuple[int, ...]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Heatmap target ``(N, K, *grid)`` and integer centre cells ``(N, M, D)``."""
    n, m = types.shape
    d = len(grid)
    dev = boxes.device
    heat = torch.zeros((n, n_types, *grid), device=dev)
    st = torch.tensor(stride, device=dev, dtype=boxes.dtype)
    centre = (boxes[..., :d] + boxes[..., d:]) / 2.0 / st  # (N, M, D) in cells
    cell = centre.floor().long()
    for a in range(d):
        cell[..., a] = cell[..., a].clamp(0, grid[a] - 1)
    coords = torch.meshgrid(*[torch.arange(g, device=dev, dtype=boxes.dtype) + 0.5
                              for g in grid], indexing="ij")
    for i in range(n):
        for j in range(m):
            if not bool(valid[i, j]):
                continue
            size = (boxes[i, j, d:] - boxes[i, j, :d]) / st
            sig = (size * HEATMAP_SIGMA_FRAC).clamp(min=0.5)
            c = cell[i, j].to(boxes.dtype) + 0.5
            r2 = torch.zeros_like(coords[0])
            for a in range(d):
                r2 = r2 + ((coords[a] - c[a]) / sig[a]) ** 2
            g = torch.exp(-r2 / 2.0)
            k = int(types[i, j])
            heat[i, k] = torch.maximum(heat[i, k], g)
    return heat, cell


def focal_loss(logits: torch.Tensor, target: torch.Tensor, n_pos: int) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, summed and divided by ``n_pos`` (>= 1)."""
    p = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
    pos = target >= 1.0 - 1e-6
    pos_loss = -torch.log(p) * (1 - p) ** FOCAL_ALPHA
    neg_loss = -torch.log(1 - p) * p ** FOCAL_ALPHA * (1 - target) ** FOCAL_BETA
    return (pos_loss[pos].sum() + neg_loss[~pos].sum()) / max(n_pos, 1)


def pretrain_loss(model: nn.Module, batch: Mapping[str, torch.Tensor],
                  weights: Mapping[str, float] | None = None
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """Total pretraining loss of one batch and each term (the :func:`~mskmri.nn.train.fit`
    objective).

    Parameters
    ----------
    model : PretrainNet (or its DDP wrapper)
    batch : dict
        ``input``, ``target`` ``(N, 1, *S)`` float; ``area_ids`` ``(N, 1, *S)`` int (0 none,
        ``j + 1`` area j); ``boxes`` ``(N, M, 2D)`` float voxels; ``types`` ``(N, M)`` int;
        ``valid`` ``(N, M)`` bool (areas padded to M).
    weights : dict, optional
        Loss weights (default :data:`LOSS_WEIGHTS`).
    """
    w = {**LOSS_WEIGHTS, **(weights or {})}
    net: Any = model.module if isinstance(model, nn.parallel.DistributedDataParallel) \
        else model
    cfg: PretrainConfig = net.config
    x, target = batch["input"], batch["target"]
    ids, boxes, types, valid = batch["area_ids"], batch["boxes"], batch["types"], batch["valid"]
    image_size = tuple(int(s) for s in x.shape[2:])
    d = len(image_size)
    out = model(x)
    inside = (ids > 0).float()
    wmap = 1.0 + AREA_WEIGHT * inside
    restore = ((out["restored"].float() - target).abs() * wmap).sum() / wmap.sum()
    grid = tuple(int(s) for s in out["heatmap"].shape[2:])
    heat_t, cell = _gaussian_targets(boxes.float(), types, valid, cfg.n_types, grid, cfg.stride)
    n_pos = int(valid.sum())
    heat = focal_loss(out["heatmap"], heat_t, n_pos)
    # Regression at the centre cells of valid areas.
    bi, mj = torch.nonzero(valid, as_tuple=True)
    zero = out["size"].sum() * 0.0
    if bi.numel():
        c = cell[bi, mj]  # (P, D)
        size_pred = out["size"].float().permute(0, *range(2, d + 2), 1)[
            (bi, *[c[:, a] for a in range(d)])]
        off_pred = out["offset"].float().permute(0, *range(2, d + 2), 1)[
            (bi, *[c[:, a] for a in range(d)])]
        b = boxes[bi, mj].float()
        size_t = torch.log((b[:, d:] - b[:, :d]).clamp(min=1.0))
        st = torch.tensor(cfg.stride, device=b.device, dtype=b.dtype)
        off_t = (b[:, :d] + b[:, d:]) / 2.0 / st - c.to(b.dtype)
        size_l = F.l1_loss(size_pred, size_t)
        off_l = F.l1_loss(off_pred, off_t)
        # Mask head on jittered ground-truth boxes.
        ext = b[:, d:] - b[:, :d]
        jit = (torch.rand_like(b) * 2.0 - 1.0) * BOX_JITTER * torch.cat([ext, ext], dim=1)
        jb = b + jit
        logits = net.mask_logits(out, jb, bi, image_size)
        area = (ids[bi] == (mj + 1).view(-1, *([1] * (d + 1)))).float()
        grid_pts = roi_grid(jb, 2 * cfg.roi_size, image_size)
        mask_t = (F.grid_sample(area, grid_pts, mode="bilinear", align_corners=False) > 0.5)
        mask_l = F.binary_cross_entropy_with_logits(logits.float(), mask_t.float())
    else:
        size_l = off_l = mask_l = zero
    total = (w["heatmap"] * heat + w["size"] * size_l + w["offset"] * off_l
             + w["mask"] * mask_l + w["restore"] * restore)
    metrics = {"heatmap": float(heat.detach()), "size": float(size_l.detach()),
               "offset": float(off_l.detach()), "mask": float(mask_l.detach()),
               "restore": float(restore.detach())}
    return total, metrics


# ============================================================================ decoding
@torch.no_grad()
def decode_detections(out: Mapping[str, torch.Tensor], stride: tuple[int, ...], *,
                      top_k: int = 5, threshold: float = 0.3) -> list[dict[str, torch.Tensor]]:
    """Areas found in one forward pass: peaks of the heatmap, their box and type.

    Returns one dict per image: ``boxes (P, 2D)`` voxels, ``types (P,)`` indices into
    :data:`DISTORTION_TYPES`, ``scores (P,)`` probabilities >= ``threshold``.
    """
    heat = torch.sigmoid(out["heatmap"].float())
    d = heat.ndim - 2
    pool = F.max_pool3d if d == 3 else F.max_pool2d
    peaks = heat * (pool(heat, 3, stride=1, padding=1) == heat)
    n, k = heat.shape[:2]
    grid = heat.shape[2:]
    res = []
    st = torch.tensor(stride, device=heat.device, dtype=torch.float32)
    for i in range(n):
        scores, flat = peaks[i].reshape(-1).topk(min(top_k, peaks[i].numel()))
        keep = scores >= threshold
        scores, flat = scores[keep], flat[keep]
        types = flat // math.prod(grid)
        rest = flat % math.prod(grid)
        cells = []
        for g in reversed(grid):
            cells.append(rest % g)
            rest = rest // g
        cell = torch.stack(cells[::-1], dim=1)
        idx: tuple[Any, ...] = (slice(None), *[cell[:, a] for a in range(d)])
        size = out["size"][i].float()[idx].T.exp()
        off = out["offset"][i].float()[idx].T
        centre = (cell.float() + off) * st
        res.append({"boxes": torch.cat([centre - size / 2, centre + size / 2], dim=1),
                    "types": types, "scores": scores})
    return res
