"""Render an MR image from a knee label map (SynthSeg-style, fast, every step recorded).

Pipeline of :func:`render` (each random step = parameters drawn from its own seeded stream,
then a deterministic operation; the parameters land in ``SynthResult.params``):

1. anatomy: :func:`mskmri.synth.anatomy.complete_knee` (missing tissues, effusion, BMLs);
2. spatial: random affine (rotation, scaling, shear, translation about the field-of-view
   centre) and elastic displacement (coarse control grid, linearly interpolated), applied
   to tissues and lesion weights together by nearest-neighbour sampling onto the output
   grid (the input grid, or a chosen in-plane matrix), so image, truth map and lesion mask
   share one geometry exactly;
3. intensity: per-tissue means and texture from a contrast model (:mod:`.contrast`);
   smooth random texture inside tissues, a finer mottled texture in marrow; lesion
   intensity blended in by its weight (ill-defined edge, exact mask);
4. partial-volume blur (Gaussian), slice thickness (box average along one axis, decimate,
   linear re-interpolation), smooth multiplicative bias field, Rician noise, gamma.

When the output grid is coarser than the input (e.g. a 112 or 224 in-plane matrix from a
384 map), the image is rendered on an integer refinement of the output grid and block-
averaged down (true partial volume), while the truth maps are sampled on the output grid.

Speed: everything is float32, vectorised, and random fields are drawn on coarse grids and
interpolated with small matrix products; a 160x384x384 OAI map renders in a few seconds on
one core (``benchmarks/synth_speed.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from mskmri.labels import KNEE, KNEE_ID, LESION
from mskmri.synth._common import (
    SynthesisError,
    json_ready,
    rng_for,
    smooth_random_field,
    upsample_linear,
)
from mskmri.synth.anatomy import (
    LESION_HALF,
    LESION_LEVELS,
    N_TISSUES,
    TISSUE_CLASS,
    TRUTH_OF_TISSUE,
    AnatomyOptions,
    KneeScene,
    Tissue,
    complete_knee,
)
from mskmri.synth.contrast import ContrastModel, IntensityParams, get_contrast, sample_intensities
from mskmri.volume import LabelVolume, Volume

log = logging.getLogger(__name__)

#: Output intensities are scaled so that this percentile of the body is OUTPUT_SCALE.
NORMALISE_PERCENTILE = 99.5
OUTPUT_SCALE = 1000.0
#: Voxels sampled (every n-th) when estimating the normalisation percentile.
PERCENTILE_STRIDE = 7

_TISSUE_NAMES = [t.name.lower() for t in Tissue]
_TISSUE_CLASSES = [TISSUE_CLASS[t] for t in range(N_TISSUES)]
KNEE_EFFUSION = KNEE_ID["joint_effusion"]
_MARROW = np.array([c == "marrow" for c in _TISSUE_CLASSES])


@dataclass(frozen=True)
class RenderOptions:
    """Ranges of the random render parameters (uniform unless said otherwise).

    Attributes
    ----------
    deform : bool
        Apply the random affine and elastic deformation.
    rotation_deg : float
        Maximum absolute rotation about each axis (degrees).
    scale : (float, float)
        Isotropic scaling range, times an anisotropic factor within ``+-anisotropic_scale``.
    anisotropic_scale : float
    shear : float
        Maximum absolute shear (unitless).
    translation_mm : float
        Maximum absolute translation per axis (mm).
    elastic_mm : (float, float)
        Range of the standard deviation of the elastic displacement (mm).
    elastic_cell_mm : float
        Control-point spacing of the elastic field (mm).
    blur : (float, float)
        Partial-volume Gaussian sigma, in output voxels, per axis.
    thick_slice_probability : float
        Probability of simulating thick slices along ``slice_axis``.
    slice_factor : (float, float)
        Slice thickness in output voxels along ``slice_axis`` when simulated.
    slice_axis : int or None
        Axis of thick slices (None: the output's coarsest axis).
    bias_std : (float, float)
        Range of the standard deviation of the log bias field.
    bias_cell_mm : (float, float)
        Range of the bias field's correlation length (mm).
    noise : (float, float)
        Rician noise sigma as a fraction of the normalised intensity scale.
    gamma_std : float
        Log-normal sigma of the gamma exponent.
    texture_cell_mm : (float, float)
        Correlation length of the smooth in-tissue texture (mm).
    marrow_texture : (float, float)
        Amplitude of the mottled marrow texture, as a fraction of the marrow mean.
    class_jitter, tissue_jitter : float
        Log-normal jitter of the contrast model's class and tissue means.
    anatomy : AnatomyOptions
    """

    deform: bool = True
    rotation_deg: float = 8.0
    scale: tuple[float, float] = (0.92, 1.08)
    anisotropic_scale: float = 0.04
    shear: float = 0.03
    translation_mm: float = 5.0
    elastic_mm: tuple[float, float] = (0.0, 2.5)
    elastic_cell_mm: float = 32.0
    blur: tuple[float, float] = (0.3, 0.9)
    thick_slice_probability: float = 0.4
    slice_factor: tuple[float, float] = (1.5, 4.0)
    slice_axis: int | None = None
    bias_std: tuple[float, float] = (0.0, 0.35)
    bias_cell_mm: tuple[float, float] = (40.0, 90.0)
    noise: tuple[float, float] = (0.005, 0.05)
    gamma_std: float = 0.2
    texture_cell_mm: tuple[float, float] = (1.5, 5.0)
    marrow_texture: tuple[float, float] = (0.03, 0.12)
    class_jitter: float = 0.15
    tissue_jitter: float = 0.05
    anatomy: AnatomyOptions = field(default_factory=AnatomyOptions)


@dataclass
class SynthResult:
    """A rendered image with its exact truth, all in one geometry.

    Attributes
    ----------
    image : Volume
        float32 image, body scaled to about 0-1000.
    labels : LabelVolume
        Knee-schema truth map.
    lesions : LabelVolume
        1 = bone marrow lesion.
    params : dict
        Every parameter drawn (JSON-ready), the seed, the contrast, the source.
    """

    image: Volume
    labels: LabelVolume
    lesions: LabelVolume
    params: dict[str, Any]


# =========================================================================== spatial
def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class SpatialParams:
    """A drawn spatial transform: output world -> source world.

    ``x_src = centre + linear @ (x_out - centre) + translation + elastic(x_out)``
    """

    linear: tuple[tuple[float, ...], ...]
    translation_mm: tuple[float, float, float]
    centre_mm: tuple[float, float, float]
    elastic_seed: int
    elastic_std_mm: float
    elastic_cell_mm: float
    drawn: dict[str, Any]


def sample_spatial(rng: np.random.Generator, centre: Sequence[float], opts: RenderOptions
                   ) -> SpatialParams:
    """Draw a random affine + elastic transform (identity when ``opts.deform`` is False)."""
    if not opts.deform:
        return SpatialParams(tuple(tuple(r) for r in np.eye(3).tolist()), (0.0, 0.0, 0.0),
                             tuple(float(c) for c in centre), 0, 0.0, opts.elastic_cell_mm,  # type: ignore[arg-type]
                             {"deform": False})
    angles = rng.uniform(-opts.rotation_deg, opts.rotation_deg, 3)
    iso = rng.uniform(*opts.scale)
    aniso = 1.0 + rng.uniform(-opts.anisotropic_scale, opts.anisotropic_scale, 3)
    shear = rng.uniform(-opts.shear, opts.shear, 3)
    sh = np.eye(3)
    sh[0, 1], sh[0, 2], sh[1, 2] = shear
    forward = _rotation(angles.tolist()) @ sh @ np.diag(iso * aniso)
    linear = np.linalg.inv(forward)
    trans = rng.uniform(-opts.translation_mm, opts.translation_mm, 3)
    el_std = float(rng.uniform(*opts.elastic_mm))
    el_seed = int(rng.integers(2**31 - 1))
    return SpatialParams(
        tuple(tuple(float(v) for v in row) for row in linear),
        (float(trans[0]), float(trans[1]), float(trans[2])),
        (float(centre[0]), float(centre[1]), float(centre[2])),
        el_seed, el_std, opts.elastic_cell_mm,
        {"deform": True, "rotation_deg": angles, "scale": iso, "anisotropy": aniso,
         "shear": shear},
    )


class _Sampler:
    """Nearest-neighbour sampling of source arrays at transformed output-grid positions.

    Works slab by slab along output axis 0: per slab, source voxel coordinates are an
    affine function of (j, k) plus an interpolated elastic displacement; indices are
    rounded and gathered with one ``take`` per source array (much faster and lighter than
    ``scipy.ndimage.map_coordinates`` with a full coordinate array).
    """

    def __init__(self, src_shape: Sequence[int], src_affine: np.ndarray, out_shape: Sequence[int],
                 out_affine: np.ndarray, sp: SpatialParams) -> None:
        self.src_shape = tuple(int(s) for s in src_shape)
        self.out_shape = tuple(int(s) for s in out_shape)
        inv = np.linalg.inv(src_affine)
        lin = np.asarray(sp.linear)
        c = np.asarray(sp.centre_mm)
        # x_src = c + L (A_out p + t_out - c) + tr + e(p);  idx = inv3 x_src + inv_t
        self.G = (inv[:3, :3] @ lin @ out_affine[:3, :3]).astype(np.float64)
        self.g = (inv[:3, :3] @ (c + lin @ (out_affine[:3, 3] - c) + np.asarray(sp.translation_mm))
                  + inv[:3, 3])
        self.H = inv[:3, :3].astype(np.float32)
        self.elastic: np.ndarray | None = None
        self.m0: np.ndarray | None = None
        if sp.elastic_std_mm > 0:
            spacing = np.linalg.norm(out_affine[:3, :3], axis=0)
            extent = np.asarray(self.out_shape) * spacing
            cshape = np.maximum(2, np.ceil(extent / sp.elastic_cell_mm).astype(int) + 1)
            erng = np.random.default_rng(sp.elastic_seed)
            ctrl = erng.standard_normal((3, *cshape)).astype(np.float32) * sp.elastic_std_mm
            from mskmri.synth._common import interp_matrix

            m1 = interp_matrix(self.out_shape[1], int(cshape[1]))
            m2 = interp_matrix(self.out_shape[2], int(cshape[2]))
            # in-plane upsampled control planes: (3, c0, J, K), world mm
            planes = np.matmul(np.matmul(m1[None, None], ctrl), m2.T[None, None])
            # displacement in source voxel units: H @ e
            self.elastic = np.einsum("ab,bcjk->acjk", self.H, planes).astype(np.float32)
            self.m0 = interp_matrix(self.out_shape[0], int(cshape[0]))
        J = np.arange(self.out_shape[1], dtype=np.float32)[:, None]
        Kk = np.arange(self.out_shape[2], dtype=np.float32)[None, :]
        G = self.G.astype(np.float32)
        # per-slab constant part of the coordinates: G[:, 1] * j + G[:, 2] * k + g
        self.base = [G[a, 1] * J + G[a, 2] * Kk + np.float32(self.g[a]) for a in range(3)]
        self.step = [np.float32(G[a, 0]) for a in range(3)]

    def sample(self, *arrays: np.ndarray | None) -> list[np.ndarray | None]:
        """Sample each source array (same shape) on the output grid; 0 outside the source."""
        outs = [None if a is None else np.zeros(self.out_shape, dtype=a.dtype) for a in arrays]
        flats = [None if a is None else a.ravel() for a in arrays]
        n0, n1, n2 = self.src_shape
        for i in range(self.out_shape[0]):
            coords = []
            for a in range(3):
                c = self.base[a] + self.step[a] * np.float32(i)
                if self.elastic is not None and self.m0 is not None:
                    w = self.m0[i]
                    nz = np.nonzero(w)[0]
                    for q in nz:
                        c = c + w[q] * self.elastic[a, q]
                coords.append(np.rint(c).astype(np.int64))
            ci, cj, ck = coords
            ok = (ci >= 0) & (ci < n0) & (cj >= 0) & (cj < n1) & (ck >= 0) & (ck < n2)
            flat_idx = np.where(ok, (ci * n1 + cj) * n2 + ck, 0)
            for out, flat in zip(outs, flats, strict=True):
                if out is None or flat is None:
                    continue
                vals = flat[flat_idx]
                vals[~ok] = 0
                out[i] = vals
        return outs


def _grid_affine(affine: np.ndarray, shape_old: Sequence[int], shape_new: Sequence[int]) -> np.ndarray:
    """Affine of a grid covering the same field of view with ``shape_new`` voxels."""
    ratio = np.asarray(shape_old, dtype=float) / np.asarray(shape_new, dtype=float)
    out = affine.copy()
    out[:3, :3] = affine[:3, :3] * ratio[None, :]
    corner = affine[:3, :3] @ np.full(3, -0.5) + affine[:3, 3]
    out[:3, 3] = corner + out[:3, :3] @ np.full(3, 0.5)
    return out


def output_grid(shape: Sequence[int], affine: np.ndarray, inplane: int | None,
                slice_axis: int | None = None) -> tuple[tuple[int, int, int], np.ndarray, int]:
    """Output shape and affine: the input grid, or the same field of view with an
    ``inplane`` x ``inplane`` matrix on the two axes other than the slice axis.

    Returns
    -------
    (shape, affine, slice_axis)
    """
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    axis = int(np.argmax(spacing)) if slice_axis is None else int(slice_axis)
    if axis not in (0, 1, 2):
        raise SynthesisError(f"slice axis must be 0, 1 or 2, not {slice_axis}")
    if inplane is None:
        return (int(shape[0]), int(shape[1]), int(shape[2])), affine.copy(), axis
    if int(inplane) < 8:
        raise SynthesisError(f"in-plane matrix must be at least 8 voxels, not {inplane}")
    new = [int(s) for s in shape]
    for a in range(3):
        if a != axis:
            new[a] = int(inplane)
    return (new[0], new[1], new[2]), _grid_affine(affine, shape, new), axis


# =========================================================================== intensity
_FAT = np.array([c == "fat" for c in _TISSUE_CLASSES])
_MUSCLE = np.array([c == "muscle" for c in _TISSUE_CLASSES])


def _bbox(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Bounding box of a boolean array from its axis projections (no index list built)."""
    out = []
    for a in range(3):
        proj = np.nonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))[0]
        if proj.size == 0:
            return None
        out.append(slice(int(proj[0]), int(proj[-1]) + 1))
    return (out[0], out[1], out[2])


def _limb_axis(affine: np.ndarray) -> int:
    """Array axis closest to the world superior-inferior direction (the limb's long axis)."""
    direction = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)[None, :]
    return int(np.argmax(np.abs(direction[2])))


def _texture(rng: np.random.Generator, tissues: np.ndarray, spacing: Sequence[float],
             limb_axis: int, ip: IntensityParams, opts: RenderOptions
             ) -> tuple[np.ndarray, dict[str, Any]]:
    """Mean image + per-tissue texture (float32).

    Three random fields: a smooth one scaled by each tissue's std (plus white noise that the
    partial-volume blur later correlates); "strands" (ridges where a field elongated along
    the limb crosses zero) that pull fat towards fibrous/muscle intensity and muscle towards
    fat (septa, fibre bundles); and a mottled field in marrow (trabecular look).
    """
    img = ip.means[tissues]
    aniso = [1.0, 1.0, 1.0]
    aniso[limb_axis] = 1.5
    cell = float(rng.uniform(*opts.texture_cell_mm))
    white_w = float(rng.uniform(0.3, 1.0))
    seed_f, seed_w, seed_m, seed_r = (int(v) for v in rng.integers(2**31 - 1, size=4))
    smooth = smooth_random_field(np.random.default_rng(seed_f), tissues.shape, spacing,
                                 cell_mm=cell, anisotropy=aniso)
    white = np.random.default_rng(seed_w).standard_normal(tissues.shape, dtype=np.float32)
    smooth *= np.float32(np.sqrt(max(1.0 - white_w ** 2, 0.0)))
    white *= np.float32(white_w)
    smooth += white
    del white
    smooth *= ip.stds[tissues]
    img += smooth
    del smooth
    # strands in fat and muscle
    fat_m = float(np.mean(ip.means[_FAT]))
    mus_m = float(np.mean(ip.means[_MUSCLE]))
    s_fat = float(rng.uniform(0.2, 0.8))
    s_mus = float(rng.uniform(0.1, 0.5))
    r_cell = float(rng.uniform(2.0, 5.0))
    r_width = float(rng.uniform(0.06, 0.16))
    lut = np.zeros(N_TISSUES, dtype=np.float32)
    lut[_FAT] = s_fat * (mus_m - fat_m)
    lut[_MUSCLE] = s_mus * (fat_m - mus_m)
    r_aniso = [1.0, 1.0, 1.0]
    r_aniso[limb_axis] = float(rng.uniform(2.0, 6.0))
    ridge = smooth_random_field(np.random.default_rng(seed_r), tissues.shape, spacing,
                                cell_mm=r_cell, anisotropy=r_aniso)
    np.abs(ridge, out=ridge)
    ridge *= np.float32(-1.0 / r_width)
    ridge += np.float32(1.0)
    np.maximum(ridge, 0.0, out=ridge)
    ridge *= lut[tissues]
    img += ridge
    del ridge
    # mottled marrow
    amp = float(rng.uniform(*opts.marrow_texture))
    marrow_mean = float(np.mean(ip.means[_MARROW]))
    mlut = np.where(_MARROW, amp * max(marrow_mean, 0.02), 0.0).astype(np.float32)
    marrow_vox = mlut[tissues]
    idx = np.nonzero(marrow_vox.any(axis=(1, 2)))[0]
    mcell = float(rng.uniform(0.8, 1.8))
    if idx.size:
        sl = slice(int(idx.min()), int(idx.max()) + 1)
        sub_shape = (sl.stop - sl.start, tissues.shape[1], tissues.shape[2])
        f = smooth_random_field(np.random.default_rng(seed_m), sub_shape, spacing, cell_mm=mcell)
        # mottled: bright specks on a darker background (|field| has a skewed distribution)
        np.abs(f, out=f)
        f -= np.float32(0.8)
        f *= marrow_vox[sl]
        img[sl] += f
    return img, {"texture_cell_mm": cell, "white_fraction": white_w, "marrow_texture": amp,
                 "marrow_cell_mm": mcell, "strand_fat": s_fat, "strand_muscle": s_mus,
                 "strand_cell_mm": r_cell, "strand_width": r_width,
                 "strand_elongation": r_aniso[limb_axis], "limb_axis": limb_axis,
                 "field_seeds": [seed_f, seed_w, seed_m, seed_r]}


def _apply_lesion(img: np.ndarray, weight: np.ndarray, ip: IntensityParams,
                  rng: np.random.Generator, spacing: Sequence[float]) -> dict[str, Any]:
    box = _bbox(weight > 0)
    if box is None:
        return {"voxels": 0}
    w = weight[box].astype(np.float32) / np.float32(LESION_LEVELS)
    sub = img[box]
    seed = int(rng.integers(2**31 - 1))
    cell = float(rng.uniform(1.5, 4.0))
    het = float(rng.uniform(0.05, 0.25))
    f = smooth_random_field(np.random.default_rng(seed), sub.shape, spacing, cell_mm=cell)
    target = np.float32(ip.bml_mean) * (1.0 + np.float32(het) * f) + np.float32(ip.bml_std) * f
    img[box] = sub + w * (target - sub)
    return {"heterogeneity": het, "cell_mm": cell, "seed": seed,
            "mean": ip.bml_mean}


# =========================================================================== degradations
def _thick_slices(img: np.ndarray, axis: int, factor: float) -> np.ndarray:
    """Average ``floor(factor)`` voxels along ``axis`` around slice centres ``factor`` apart,
    and linearly interpolate back to the grid (a thick, gapless slice acquisition)."""
    n = img.shape[axis]
    width = max(1, int(np.floor(factor)))
    if width <= 1 or n < 2 * width:
        return img
    centres = np.arange(factor / 2.0 - 0.5, n - 0.5, factor)
    starts = np.clip(np.rint(centres - (width - 1) / 2.0).astype(int), 0, n - width)
    bounds = np.empty(2 * len(starts), dtype=np.intp)
    bounds[0::2] = starts
    bounds[1::2] = starts + width
    sums = np.add.reduceat(img, bounds[:-1] if bounds[-1] >= n else bounds, axis=axis)
    low = np.take(sums, np.arange(0, 2 * len(starts), 2), axis=axis)
    low *= np.float32(1.0 / width)
    pos = np.interp(np.arange(n), starts + (width - 1) / 2.0, np.arange(len(starts)))
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, len(starts) - 1)
    shape = [1, 1, 1]
    shape[axis] = n
    wgt = (pos - i0).astype(np.float32).reshape(shape)
    out = np.take(low, i0, axis=axis)
    out *= 1.0 - wgt
    out += wgt * np.take(low, i1, axis=axis)
    return out


def _blur_axis(img: np.ndarray, sigma: float, axis: int, truncate: float = 2.5) -> np.ndarray:
    """Gaussian blur along one axis by shifted slab sums (edge-normalised).

    Along the two slowest axes of a C-ordered array this is 2-5x faster than
    ``scipy.ndimage.gaussian_filter1d``, whose inner loop strides through memory there.
    """
    r = int(np.ceil(truncate * sigma))
    if r < 1 or sigma <= 0:
        return img
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    n = img.shape[axis]
    r = min(r, n - 1)
    out = img * k[len(k) // 2]
    c = len(k) // 2
    norm = np.ones(n, dtype=np.float32)
    for d in range(1, r + 1):
        hi = [slice(None)] * 3
        lo = [slice(None)] * 3
        hi[axis] = slice(d, None)
        lo[axis] = slice(None, n - d)
        out[tuple(hi)] += k[c + d] * img[tuple(lo)]
        out[tuple(lo)] += k[c - d] * img[tuple(hi)]
        norm[:d] -= k[c - d]
        norm[n - d:] -= k[c + d]
    shape = [1, 1, 1]
    shape[axis] = n
    out /= norm.reshape(shape)
    return out


def _blur(img: np.ndarray, sigmas: Sequence[float]) -> np.ndarray:
    """Separable Gaussian blur (sigmas in voxels), fastest method per axis."""
    out = _blur_axis(img, float(sigmas[0]), 0)
    out = _blur_axis(out, float(sigmas[1]), 1)
    if sigmas[2] > 0:
        out = ndimage.gaussian_filter1d(out, float(sigmas[2]), axis=2, truncate=2.5,
                                        mode="nearest")
    return out


def _block_mean(img: np.ndarray, f: Sequence[int]) -> np.ndarray:
    s = img.shape
    return img.reshape(s[0] // f[0], f[0], s[1] // f[1], f[1], s[2] // f[2], f[2]).mean(axis=(1, 3, 5))


def _rician(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    n1 = rng.standard_normal(img.shape, dtype=np.float32)
    n1 *= np.float32(sigma)
    n1 += img
    np.square(n1, out=n1)
    n2 = rng.standard_normal(img.shape, dtype=np.float32)
    n2 *= np.float32(sigma)
    np.square(n2, out=n2)
    n1 += n2
    del n2
    np.sqrt(n1, out=n1)
    return n1


# =========================================================================== main
def render_scene(
    scene: KneeScene,
    *,
    contrast: str | ContrastModel,
    seed: int,
    inplane: int | None = None,
    options: RenderOptions | None = None,
) -> SynthResult:
    """Render a completed :class:`KneeScene` (see :func:`render` for the parameters).

    Use this to render one anatomy many times (complete once, render with many seeds).
    """
    model = get_contrast(contrast)
    opts = options or RenderOptions()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    src_spacing = np.linalg.norm(scene.affine[:3, :3], axis=0)
    out_shape, out_aff, slice_axis = output_grid(scene.tissues.shape, scene.affine, inplane,
                                                 opts.slice_axis)
    out_spacing = np.linalg.norm(out_aff[:3, :3], axis=0)
    factors = [max(1, int(round(o / s))) for o, s in zip(out_spacing, src_spacing, strict=True)]
    r_shape = tuple(n * f for n, f in zip(out_shape, factors, strict=True))
    r_aff = _grid_affine(out_aff, out_shape, r_shape)
    r_spacing = np.linalg.norm(r_aff[:3, :3], axis=0)
    centre = (scene.affine @ np.append((np.asarray(scene.tissues.shape) - 1) / 2.0, 1.0))[:3]
    sp = sample_spatial(rng_for(seed, "render", "spatial"), centre, opts)
    params: dict[str, Any] = {
        "seed": seed, "contrast": model.name, "inplane": inplane,
        "output_shape": out_shape, "output_spacing_mm": out_spacing,
        "render_refinement": factors, "slice_axis": slice_axis,
        "spatial": {**sp.drawn, "linear": sp.linear, "translation_mm": sp.translation_mm,
                    "centre_mm": sp.centre_mm, "elastic_std_mm": sp.elastic_std_mm,
                    "elastic_cell_mm": sp.elastic_cell_mm, "elastic_seed": sp.elastic_seed},
    }
    identity = (not opts.deform) and r_shape == scene.tissues.shape
    tis: np.ndarray | None
    wgt: np.ndarray | None
    if identity:
        tis, wgt = scene.tissues, scene.lesion_weight
    else:
        sampler = _Sampler(scene.tissues.shape, scene.affine, r_shape, r_aff, sp)
        tis, wgt = sampler.sample(scene.tissues, scene.lesion_weight)
    if r_shape == out_shape:
        t_out, w_out = tis, wgt
    else:
        sampler_o = _Sampler(scene.tissues.shape, scene.affine, out_shape, out_aff, sp)
        t_out, w_out = sampler_o.sample(scene.tissues, scene.lesion_weight)
    assert tis is not None and t_out is not None
    timings["spatial_s"] = time.perf_counter() - t0
    # ------------------------------------------------------------------ intensities
    t1 = time.perf_counter()
    ip = sample_intensities(model, rng_for(seed, "render", "intensity"), _TISSUE_CLASSES,
                            class_jitter=opts.class_jitter, tissue_jitter=opts.tissue_jitter)
    params["intensity"] = ip.as_dict(_TISSUE_NAMES)
    img, params["texture"] = _texture(rng_for(seed, "render", "texture"), tis, r_spacing,
                                      _limb_axis(r_aff), ip, opts)
    if wgt is not None:
        params["lesion_intensity"] = _apply_lesion(img, wgt, ip, rng_for(seed, "render", "lesion"),
                                                   r_spacing)
    timings["intensity_s"] = time.perf_counter() - t1
    # ------------------------------------------------------------------ degradations
    t2 = time.perf_counter()
    drng = rng_for(seed, "render", "blur")
    blur = drng.uniform(*opts.blur, 3)
    sigma = blur * np.asarray(factors)
    img = _blur(img, sigma)
    params["blur_sigma_output_voxels"] = blur
    srng = rng_for(seed, "render", "slices")
    thick = bool(srng.random() < opts.thick_slice_probability)
    sf = float(srng.uniform(*opts.slice_factor))
    params["thick_slices"] = {"applied": thick, "factor_output_voxels": sf if thick else 1.0,
                              "axis": slice_axis}
    if thick:
        img = _thick_slices(img, slice_axis, sf * factors[slice_axis])
    if r_shape != out_shape:
        img = _block_mean(img, factors)
    timings["blur_s"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    brng = rng_for(seed, "render", "bias")
    b_std = float(brng.uniform(*opts.bias_std))
    b_cell = float(brng.uniform(*opts.bias_cell_mm))
    b_seed = int(brng.integers(2**31 - 1))
    if b_std > 0:
        cshape = [max(2, int(np.ceil(n * s / b_cell))) for n, s in zip(out_shape, out_spacing, strict=True)]
        coarse = np.random.default_rng(b_seed).standard_normal(cshape).astype(np.float32)
        coarse = ndimage.gaussian_filter(coarse, 0.7) * np.float32(b_std * 1.6)
        img *= np.exp(upsample_linear(coarse, out_shape))
    params["bias"] = {"log_std": b_std, "cell_mm": b_cell, "seed": b_seed}
    # normalise so the body's bright end sits at OUTPUT_SCALE
    sample = img[::PERCENTILE_STRIDE, ::PERCENTILE_STRIDE, ::PERCENTILE_STRIDE]
    body = sample[t_out[::PERCENTILE_STRIDE, ::PERCENTILE_STRIDE, ::PERCENTILE_STRIDE] > 0]
    ref = float(np.percentile(body if body.size > 100 else sample, NORMALISE_PERCENTILE))
    scale = OUTPUT_SCALE / max(ref, 1e-6)
    img *= np.float32(scale)
    np.maximum(img, 0.0, out=img)
    nrng = rng_for(seed, "render", "noise")
    noise_frac = float(nrng.uniform(*opts.noise))
    img = _rician(img, noise_frac * OUTPUT_SCALE, nrng)
    grng = rng_for(seed, "render", "gamma")
    gamma = float(np.exp(grng.normal(0.0, opts.gamma_std)))
    if abs(gamma - 1.0) > 1e-3:
        img /= np.float32(OUTPUT_SCALE)
        np.power(img, np.float32(gamma), out=img)
        img *= np.float32(OUTPUT_SCALE)
    params["noise"] = {"rician_sigma_fraction": noise_frac}
    params["gamma"] = gamma
    params["normalisation"] = {"percentile": NORMALISE_PERCENTILE, "scale": scale}
    timings["bias_noise_s"] = time.perf_counter() - t3
    timings["total_s"] = time.perf_counter() - t0
    params["timing"] = {k: round(v, 3) for k, v in timings.items()}
    meta = {"synthetic": True, "contrast": model.name, "seed": seed}
    image = Volume(img.astype(np.float32, copy=False), out_aff, meta)
    labels = LabelVolume(TRUTH_OF_TISSUE[t_out], out_aff, dict(KNEE), schema="knee",
                         meta={"synthetic": True})
    les = (np.zeros(out_shape, np.uint8) if w_out is None
           else (w_out >= LESION_HALF).astype(np.uint8))
    lesions = LabelVolume(les, out_aff, dict(LESION), schema="lesion", meta={"synthetic": True})
    return SynthResult(image, labels, lesions, json_ready(params))


def render(
    labels: LabelVolume,
    *,
    contrast: str | ContrastModel,
    seed: int,
    lesions: LabelVolume | None = None,
    extra: LabelVolume | None = None,
    effusion_ml: float | None = None,
    lesion_ml: float | Sequence[float] | None = None,
    lesion_bone: str | Sequence[str] = "femur",
    inplane: int | None = None,
    options: RenderOptions | None = None,
) -> SynthResult:
    """Render an MR image of a knee from its label map.

    Parameters
    ----------
    labels : LabelVolume
        Knee-schema label map (``mskmri.labels.KNEE``; convert sources with
        :func:`mskmri.synth.sources.load_knee_source`). Needs femur and tibia.
    contrast : str or ContrastModel
        ``dess``, ``iw-fs``, ``t2``, ``t1``, ``pd`` or ``random`` (:data:`.contrast.CONTRASTS`).
    seed : int
        Seed of every random step (anatomy, spatial, intensity, degradations).
    lesions : LabelVolume, optional
        Lesion mask (1 = BML) in the geometry of ``labels``, kept in the render.
    extra : LabelVolume, optional
        Tissues without a project class (SPL tendons, vessels, nerves).
    effusion_ml : float, optional
        Total joint effusion in mL (exact to a voxel in the input grid); None: keep the
        map's own or draw one; 0: none.
    lesion_ml : float or sequence of float, optional
        Volumes of BMLs to insert (mL, exact to a voxel in the input grid).
    lesion_bone : str or sequence of str
        Bone of each inserted BML (``femur``, ``tibia``, ``patella``).
    inplane : int, optional
        Output in-plane matrix (e.g. 112, 224, 448) over the same field of view; the slice
        axis (largest spacing) keeps its spacing. None: the input grid.
    options : RenderOptions, optional
        Ranges of every random step.

    Returns
    -------
    SynthResult
        Image, truth labels and lesion mask in one geometry (the input's, or the
        resampled output grid), and ``params`` recording everything drawn. Volumes in
        ``params["anatomy"]`` are in the input grid; with deformation on, the output
        volumes differ by the drawn scaling.
    """
    model = get_contrast(contrast)
    opts = options or RenderOptions()
    t0 = time.perf_counter()
    scene = complete_knee(labels, seed=seed, lesions=lesions, extra=extra,
                          effusion_ml=effusion_ml, lesion_ml=lesion_ml, lesion_bone=lesion_bone,
                          options=opts.anatomy)
    t_anat = time.perf_counter() - t0
    result = render_scene(scene, contrast=model, seed=seed, inplane=inplane, options=opts)
    result.params["anatomy"] = scene.params
    result.params["origin"] = scene.origin
    result.params["options"] = json_ready(asdict(opts))
    result.params["timing"]["anatomy_s"] = round(t_anat, 3)
    result.params["timing"]["total_s"] = round(time.perf_counter() - t0, 3)
    vox_ml = result.labels.voxel_volume_mm3 / 1000.0
    result.params["output_volumes_ml"] = {
        "joint_effusion": float((result.labels.array == KNEE_EFFUSION).sum() * vox_ml),
        "lesions": float(result.lesions.array.sum() * vox_ml),
    }
    log.debug("rendered %s in %.2f s", model.name, result.params["timing"]["total_s"])
    return result

