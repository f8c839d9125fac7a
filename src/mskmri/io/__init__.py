"""Reading and writing volumes: NIfTI, NRRD, MHA and DICOM series.

``read(path)`` dispatches on what the path is (a folder is a DICOM series; a file by its
extension, with a content check) and returns a :class:`~mskmri.volume.Volume` in RAS+.
``write(volume, path)`` writes atomically (temporary name, then rename) and, for label maps,
the JSON sidecar naming their values.
"""

from __future__ import annotations

from mskmri.io._atomic import atomic_path, atomic_write_json, atomic_write_text
from mskmri.io._dispatch import (
    IMAGE_EXTENSIONS,
    read,
    read_labels,
    sidecar_path,
    write,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "atomic_path",
    "atomic_write_json",
    "atomic_write_text",
    "read",
    "read_labels",
    "sidecar_path",
    "write",
]
