"""NRRD and MHA/MHD through SimpleITK.

ITK stores geometry in LPS+ (origin, spacing, direction); it is converted to the RAS+ affine
here and only here (:data:`~mskmri.volume.LPS_TO_RAS`). SimpleITK arrays are indexed
``[z, y, x]``; they are transposed to ``[x, y, z]`` so that array axis ``n`` is ITK index
``n`` and the affine's column ``n``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mskmri.errors import UnsupportedFormatError
from mskmri.volume import LPS_TO_RAS, LabelVolume, Volume


def itk_geometry_to_affine(
    spacing: tuple[float, ...], origin: tuple[float, ...], direction: tuple[float, ...]
) -> np.ndarray:
    """ITK (spacing, origin, direction) in LPS+ -> 4x4 RAS+ affine."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    aff = np.eye(4)
    aff[:3, :3] = d * np.asarray(spacing, dtype=np.float64)[None, :]
    aff[:3, 3] = origin
    return LPS_TO_RAS @ aff


def affine_to_itk_geometry(
    affine: np.ndarray,
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """4x4 RAS+ affine -> ITK (spacing, origin, direction) in LPS+."""
    lps = LPS_TO_RAS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing[None, :]
    return (
        tuple(float(s) for s in spacing),
        tuple(float(o) for o in lps[:3, 3]),
        tuple(float(v) for v in direction.ravel()),
    )


def _has_spacing(img: object, path: Path) -> bool:
    """NRRD without 'space directions'/'spacings' gets ITK's silent 1 mm: detect it."""
    if path.suffix.lower() != ".nrrd":
        return True
    keys = set(img.GetMetaDataKeys())  # type: ignore[attr-defined]
    return any(k in keys for k in ("NRRD_space directions", "NRRD_spacings", "NRRD_space"))


def read_itk(path: Path) -> Volume:
    """Read NRRD / MHA / MHD with SimpleITK into a RAS+ Volume."""
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except Exception as exc:
        raise UnsupportedFormatError(
            f"{path} could not be read ({exc.__class__.__name__}); check that the file is "
            "complete and a valid NRRD/MHA image"
        ) from exc
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise UnsupportedFormatError(
            f"{path} has {img.GetNumberOfComponentsPerPixel()} components per voxel; "
            "give a single-channel (scalar) image"
        )
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim == 2:
        arr = arr[None]
        spacing = tuple(img.GetSpacing()) + (1.0,)
        origin = tuple(img.GetOrigin()) + (0.0,)
        d2 = np.asarray(img.GetDirection()).reshape(2, 2)
        d3 = np.eye(3)
        d3[:2, :2] = d2
        direction = tuple(d3.ravel())
        was_2d = True
    else:
        spacing, origin, direction = img.GetSpacing(), img.GetOrigin(), img.GetDirection()
        was_2d = False
    arr = np.ascontiguousarray(np.transpose(arr, tuple(range(arr.ndim))[::-1]))
    affine = itk_geometry_to_affine(spacing, origin, direction)
    meta = {"source": str(path), "format": path.suffix.lower().lstrip("."), "was_2d": was_2d}
    return Volume(arr, affine, meta, geometry_known=_has_spacing(img, path))


def write_itk(volume: Volume, path: Path) -> None:
    """Write a Volume as NRRD or MHA (by the extension of ``path``)."""
    import SimpleITK as sitk

    arr = volume.array
    if isinstance(volume, LabelVolume):
        lo, hi = int(arr.min(initial=0)), int(arr.max(initial=0))
        # unsigned types would wrap negative labels around
        arr = arr.astype(np.uint16 if lo >= 0 and hi < 65536 else np.int32)
    elif arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, (2, 1, 0))))
    spacing, origin, direction = affine_to_itk_geometry(volume.affine)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path), useCompression=True)
