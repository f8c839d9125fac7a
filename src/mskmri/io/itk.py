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


#: NRRD header fields that give voxel spacing (without one, ITK silently reads 1 mm).
NRRD_SPACING_FIELDS = ("space directions", "spacings")
#: Most bytes of an NRRD header read when looking for its fields.
NRRD_HEADER_MAX_BYTES = 1 << 16


def nrrd_header_fields(path: Path) -> set[str]:
    """Field names (lower case) of an NRRD file's text header.

    SimpleITK does not keep every field in its metadata (a 2-D NRRD's ``space directions``
    only shows up as ITK's own spacing, indistinguishable from its 1 mm default), so the
    header is read here: lines up to the first empty one, ``key: value`` pairs only
    (``key:=value`` pairs are user key/values, comments start with ``#``).
    """
    with open(path, "rb") as fh:
        head = fh.read(NRRD_HEADER_MAX_BYTES)
    fields: set[str] = set()
    for raw in head.split(b"\n")[1:]:
        line = raw.rstrip(b"\r").decode("latin-1")
        if not line:
            break
        if line.startswith("#") or ":=" in line or ": " not in line:
            continue
        fields.add(line.split(": ", 1)[0].strip().lower())
    return fields


def _has_spacing(path: Path) -> bool:
    """NRRD without 'space directions'/'spacings' gets ITK's silent 1 mm: detect it."""
    if path.suffix.lower() not in (".nrrd", ".nhdr"):
        return True
    return any(f in nrrd_header_fields(path) for f in NRRD_SPACING_FIELDS)


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
    return Volume(arr, affine, meta, geometry_known=_has_spacing(path))


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
