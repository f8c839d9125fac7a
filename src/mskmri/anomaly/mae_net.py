"""The ViT masked autoencoder of the cord hyperintensity detector (U2AD, arXiv 2503.13400).

Plain torch (``nn.TransformerEncoderLayer``, pre-norm, GELU). Registered as architecture
``"mae-vit"`` in :data:`mskmri.nn.registry.ARCHITECTURES`; used by :mod:`mskmri.anomaly.mae`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

#: Default input edge, pixels (1 mm pixels: a 64 mm window).
IMAGE_SIZE = 64
#: Default ViT patch edge, pixels (U2AD: 8).
PATCH = 8
#: Weight of the Sobel-edge term in :func:`reconstruction_loss`.
EDGE_WEIGHT = 0.1


class MaskedAutoencoderViT(nn.Module):
    """ViT masked autoencoder that reconstructs hidden patches from the visible ones.

    The encoder (``depth`` layers of width ``dim``) attends to the visible patches only
    (hidden patches are key padding, as in MAE where the encoder never sees them); the decoder
    (``decoder_depth`` layers of width ``decoder_dim``) gets a learned mask token at every
    hidden patch and predicts, for every patch, its ``patch x patch`` pixels and their Sobel
    edge magnitude (two heads, as U2AD reconstructs pixels and edges).

    Parameters
    ----------
    image_size, patch : int
        Input edge and patch edge, pixels (``image_size`` a multiple of ``patch``).
    dim, depth, heads : int
        Encoder width, layers, attention heads.
    decoder_dim, decoder_depth, decoder_heads : int
        Decoder width, layers, heads.
    mlp_ratio : float
        Feed-forward width / layer width.

    Notes
    -----
    ``forward(x, mask)``: ``x`` (B, 1, S, S) float, ``mask`` (B, (S/patch)^2) bool, True =
    hidden (at least one patch visible per sample), row-major patch order; returns
    (B, 2, S, S): channel 0 the reconstructed image, channel 1 its predicted edges.
    """

    architecture = "mae-vit"

    def __init__(self, image_size: int = IMAGE_SIZE, patch: int = PATCH, dim: int = 128,
                 depth: int = 4, heads: int = 8, decoder_dim: int = 64, decoder_depth: int = 2,
                 decoder_heads: int = 4, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        self._config = {"image_size": image_size, "patch": patch, "dim": dim, "depth": depth,
                        "heads": heads, "decoder_dim": decoder_dim,
                        "decoder_depth": decoder_depth, "decoder_heads": decoder_heads,
                        "mlp_ratio": mlp_ratio}
        self.patch = patch
        self.grid = image_size // patch
        n = self.grid * self.grid
        self.embed = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, n, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.to_decoder = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.dec_pos = nn.Parameter(torch.zeros(1, n, decoder_dim))
        dlayer = nn.TransformerEncoderLayer(decoder_dim, decoder_heads,
                                            int(decoder_dim * mlp_ratio), dropout=0.0,
                                            activation="gelu", batch_first=True,
                                            norm_first=True)
        self.decoder = nn.TransformerEncoder(dlayer, decoder_depth, enable_nested_tensor=False)
        self.dec_norm = nn.LayerNorm(decoder_dim)
        self.head = nn.Linear(decoder_dim, 2 * patch * patch)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.dec_pos, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def config_dict(self) -> dict[str, Any]:
        """The constructor arguments (for the model card)."""
        return dict(self._config)

    @classmethod
    def from_config_dict(cls, config: Mapping[str, Any]) -> MaskedAutoencoderViT:
        """Build from a model card's config."""
        return cls(**dict(config))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``x`` (B, 1, S, S) from its visible patches (``mask`` True = hidden):
        (B, 2, S, S) image and edges."""
        b = x.shape[0]
        tok = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        enc = self.norm(self.encoder(tok, src_key_padding_mask=mask))
        dec = self.to_decoder(enc)
        dec = torch.where(mask[..., None], self.mask_token.expand(b, dec.shape[1], -1), dec)
        dec = self.dec_norm(self.decoder(dec + self.dec_pos))
        out = self.head(dec)
        pp = self.patch * self.patch
        return torch.cat([unpatchify(out[..., :pp], self.patch, self.grid),
                          unpatchify(out[..., pp:], self.patch, self.grid)], dim=1)


def unpatchify(tokens: torch.Tensor, patch: int, grid: int) -> torch.Tensor:
    """(B, grid*grid, patch*patch) -> (B, 1, grid*patch, grid*patch), row-major patches."""
    b = tokens.shape[0]
    t = tokens.reshape(b, grid, grid, patch, patch).permute(0, 1, 3, 2, 4)
    return t.reshape(b, 1, grid * patch, grid * patch)


def sobel_edges(x: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of (B, 1, H, W) images (replicate padding)."""
    f = nn.functional
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype,
                     device=x.device)
    kernel = torch.stack([k, k.t()])[:, None]
    g = f.conv2d(f.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)
    return torch.sqrt((g * g).sum(1, keepdim=True) + 1e-8)


def reconstruction_loss(recon: torch.Tensor, image: torch.Tensor, mask: torch.Tensor,
                        patch: int = PATCH, edge_weight: float = EDGE_WEIGHT) -> torch.Tensor:
    """Mean squared error over the hidden patches' pixels of the image (channel 0 of
    ``recon``) + ``edge_weight`` x that of the predicted edges (channel 1, when present)
    against the image's Sobel edges. ``recon`` (B, 2, S, S), ``image`` (B, 1, S, S);
    ``mask`` (B, N) bool."""
    g = recon.shape[-1] // patch
    pix = mask.reshape(-1, 1, g, g).to(recon.dtype)
    pix = torch.repeat_interleave(torch.repeat_interleave(pix, patch, 2), patch, 3)
    n = pix.sum().clamp_min(1.0)
    err = ((recon[:, :1] - image) ** 2 * pix).sum() / n
    if recon.shape[1] < 2 or edge_weight == 0:
        return err
    edge = ((recon[:, 1:2] - sobel_edges(image)) ** 2 * pix).sum() / n
    return err + edge_weight * edge


__all__ = ["MaskedAutoencoderViT", "reconstruction_loss", "sobel_edges", "unpatchify"]
