"""Anomaly detection in bone marrow: bone marrow lesions (BMLs) of the femur.

- :mod:`.postprocess`: named, parameterised, recorded steps from an anomaly map to a lesion
  mask and a per-lesion table (numpy/scipy/cc3d, no torch);
- :mod:`.inpaint`: the masked-inpainting detector (LaMa-style FFC painter, 2-D sagittal);
- :mod:`.inpaint_train`: ``mskmri train inpaint``.

The MKD baseline (``anomaly.mkd``) is not written yet.
"""

from __future__ import annotations

from mskmri.anomaly.postprocess import (
    PostprocessConfig,
    PostprocessResult,
    calibrate_threshold,
    lesion_table,
    postprocess,
)

__all__ = [
    "PostprocessConfig",
    "PostprocessResult",
    "calibrate_threshold",
    "lesion_table",
    "postprocess",
]
