"""Self-supervised pretraining by distortion restoration (METHODS.md section 2).

- :mod:`.distortions`: seeded, recorded distortions of random areas of 2-D/3-D images.
- :mod:`.model`: the pretraining network (U-Net encoder + detection, mask and restoration
  heads) and its losses.
- :mod:`.data`: unlabelled images -> normalised 2-D slices or 3-D volumes, the pretext dataset.
- :mod:`.task`: ``mskmri train pretrain`` (encoder weights + model card).
- :mod:`.finetune`: the segmentation fine-tuning used by the pretraining experiment.
"""

from __future__ import annotations

from mskmri.pretrain.distortions import (
    DISTORTION_TYPES,
    Distortion,
    DistortionError,
    apply_distortions,
    sample_distortions,
)

__all__ = ["DISTORTION_TYPES", "Distortion", "DistortionError", "apply_distortions",
           "sample_distortions"]
