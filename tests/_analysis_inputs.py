"""Small synthetic inputs for the analysis and report tests (knee and spine), written to disk.

- :func:`knee_inputs`: the phantom knee rendered as DESS, stored LPI (not RAS), with its truth
  label map and lesion mask: the ``--seg`` / ``--lesions`` path of ``analyze knee``.
- :func:`spine_inputs`: five lumbar bodies (L1-L5) as boxes of known size on sagittal 4 mm
  slices, with a bright canal behind them, and the label map: ``analyze spine --seg``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mskmri.io import write
from mskmri.labels import spine_labels_for
from mskmri.volume import LabelVolume, Volume

#: Spine phantom: voxel spacing (L-R slice, A-P, S-I) in mm and array shape.
SPINE_SPACING_MM = (4.0, 0.8, 0.8)
SPINE_SHAPE = (9, 110, 240)
#: Each body: 44 mm wide (L-R), 32 mm deep (A-P), 27 mm tall (S-I), centres 34 mm apart.
BODY_WIDTH_MM, BODY_DEPTH_MM, BODY_HEIGHT_MM, BODY_PITCH_MM = 44.0, 32.0, 27.0, 34.0


def knee_inputs(folder: Path, *, seed: int = 3) -> dict[str, Path]:
    """Phantom knee image, label map and lesion mask (64 x 96 x 96, LPI) in ``folder``."""
    from mskmri.synth.phantom import phantom_knee
    from mskmri.synth.render import render

    labels, lesions = phantom_knee(seed=seed)
    synth = render(labels, contrast="dess", seed=seed, lesions=lesions)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"image": folder / "image.nii.gz", "seg": folder / "seg.nii.gz",
             "lesions": folder / "lesions.nii.gz"}
    write(synth.image.reorient("LPI"), paths["image"])
    write(synth.labels.reorient("LPI"), paths["seg"])
    write(synth.lesions.reorient("LPI"), paths["lesions"])
    return paths


def spine_labels_at(world_ras: np.ndarray) -> np.ndarray:
    """L1-L5 label values (20-24, else 0) at world points (..., 3), RAS+ mm.

    Boxes 44 mm wide, 32 mm deep and 27 mm tall centred on x = y = 0, at z = 70 - 34 i mm.
    """
    x, y, z = world_ras[..., 0], world_ras[..., 1], world_ras[..., 2]
    lab = np.zeros(world_ras.shape[:-1], np.int16)
    for i, value in enumerate(range(20, 25)):  # L1..L5, top down
        zc = 70.0 - BODY_PITCH_MM * i
        inside = ((np.abs(x) <= BODY_WIDTH_MM / 2) & (np.abs(y) <= BODY_DEPTH_MM / 2)
                  & (np.abs(z - zc) <= BODY_HEIGHT_MM / 2))
        lab[inside] = value
    return lab


def spine_image_at(world_ras: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Phantom intensities at world points: bodies 420, background 140, canal 600, noise 12."""
    lab = spine_labels_at(world_ras)
    rng = np.random.default_rng(seed)
    img = np.where(lab > 0, 420.0, 140.0) + rng.normal(0.0, 12.0, lab.shape)
    img[np.abs(world_ras[..., 1] + 26.0) < 5.0] = 600.0  # fluid-bright canal behind the bodies
    return img


def _world(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    idx = np.indices(shape).reshape(3, -1).T.astype(float)
    return (idx @ affine[:3, :3].T + affine[:3, 3]).reshape(*shape, 3)


def spine_phantom(*, seed: int = 0) -> tuple[Volume, LabelVolume]:
    """Sagittal spine phantom: L1-L5 boxes (middle height 27 mm, Cobb L1-L5 0 deg)."""
    aff = np.diag([*SPINE_SPACING_MM, 1.0])
    aff[:3, 3] = (-16.0, -52.0, -96.0)
    world = _world(SPINE_SHAPE, aff)
    lab = spine_labels_at(world)
    labels = spine_labels_for(set(np.unique(lab).tolist()))
    return (Volume(spine_image_at(world, seed=seed).astype(np.float32), aff,
                   {"source": "spine phantom"}),
            LabelVolume(lab, aff, labels, schema="spine"))


def spine_dicom_inputs(folder: Path, *, extra: dict[str, object]) -> dict[str, Path]:
    """The spine phantom as a sagittal DICOM series (``extra``: header fields, e.g. patient
    identifiers) and a label map on the grid the reader gives it."""
    from _dicom_factory import write_series

    from mskmri.io import read

    r, c = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])  # LPS: posterior, inferior
    n = np.cross(r, c)  # toward the patient's right
    origin = np.array([16.0, -35.2, 95.2])  # LPS of the first voxel
    cols, rows, slices = SPINE_SHAPE[1], SPINE_SHAPE[2], SPINE_SHAPE[0]
    i, j, k = np.meshgrid(np.arange(cols), np.arange(rows), np.arange(slices), indexing="ij")
    lps = (origin + i[..., None] * SPINE_SPACING_MM[1] * r + j[..., None] * SPINE_SPACING_MM[2]
           * c + k[..., None] * SPINE_SPACING_MM[0] * n)
    ras = lps * np.array([-1.0, -1.0, 1.0])
    img = np.round(spine_image_at(ras)).astype(np.int16)
    write_series(folder / "dicom", img, row_cosine=r, col_cosine=c, origin=origin,
                 slice_spacing=SPINE_SPACING_MM[0], pixel_spacing=(0.8, 0.8),
                 description="Sag T2 TSE", extra=extra)
    vol = read(folder / "dicom")
    lab = spine_labels_at(_world(vol.shape, vol.affine))
    seg = LabelVolume(lab, vol.affine, spine_labels_for(set(np.unique(lab).tolist())),
                      schema="spine")
    write(seg, folder / "seg.nii.gz")
    return {"image": folder / "dicom", "seg": folder / "seg.nii.gz"}


def spine_inputs(folder: Path, *, seed: int = 0) -> dict[str, Path]:
    """:func:`spine_phantom` written as ``image.nii.gz`` and ``seg.nii.gz`` in ``folder``."""
    image, seg = spine_phantom(seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"image": folder / "image.nii.gz", "seg": folder / "seg.nii.gz"}
    write(image, paths["image"])
    write(seg, paths["seg"])
    return paths
