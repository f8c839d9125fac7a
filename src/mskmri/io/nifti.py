"""NIfTI-1/2 through nibabel.

Geometry: nibabel's ``get_best_affine`` (sform if its code > 0, else qform if > 0). A file
with both codes 0 has no geometry: it is read with ``geometry_known=False`` and nothing
physical is measured from it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from mskmri.errors import UnsupportedFormatError
from mskmri.volume import LabelVolume, Volume

log = logging.getLogger(__name__)


def read_nifti(path: Path) -> Volume:
    """Read a NIfTI file into a Volume (RAS+ affine as stored; array as stored)."""
    import nibabel as nib

    try:
        img: Any = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many kinds for broken files
        reason = str(exc).splitlines()[0] if str(exc) else ""  # one line for the CLI
        raise UnsupportedFormatError(
            f"{path} could not be read as NIfTI ({type(exc).__name__}: {reason}); "
            "check that the file is complete and really a NIfTI image"
        ) from exc
    hdr = img.header
    sform = int(hdr["sform_code"]) if "sform_code" in hdr else 0
    qform = int(hdr["qform_code"]) if "qform_code" in hdr else 0
    known = sform > 0 or qform > 0
    affine = img.affine
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
        meta_2d = True
    else:
        meta_2d = False
    # nibabel returns floats when scl_slope/scl_inter rescale the stored integers
    slope_applied = data.dtype.kind == "f" and data.dtype != hdr.get_data_dtype()
    meta = {
        "source": str(path),
        "format": "nifti",
        "nifti_codes": {"sform": sform, "qform": qform},
        "was_2d": meta_2d,
        "scaled": bool(slope_applied),
    }
    # a 4-D series or other non-3-D data: Volume raises its DimensionError
    return Volume(data, affine, meta, geometry_known=known)


def write_nifti(volume: Volume, path: Path) -> None:
    """Write a Volume as NIfTI with sform and qform set (code 1 = scanner, or 0 if unknown)."""
    import nibabel as nib

    arr = volume.array
    if isinstance(volume, LabelVolume):
        minv = int(arr.min()) if arr.size else 0
        maxv = int(arr.max()) if arr.size else 0
        if minv < 0:  # unsigned types would wrap negative labels around
            arr = arr.astype(np.int16 if -32768 <= minv and maxv < 32768 else np.int32)
        else:
            arr = arr.astype(np.uint8 if maxv < 256 else np.uint16 if maxv < 65536 else np.int32)
    elif arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8)
    img = nib.Nifti1Image(arr, volume.affine)
    code = 1 if volume.geometry_known else 0
    img.header.set_sform(volume.affine, code=code)
    img.header.set_qform(volume.affine, code=code)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
