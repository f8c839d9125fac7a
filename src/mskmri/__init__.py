"""mskmri: musculoskeletal MRI toolkit.

Knee and spine segmentation, lesion detection by masked inpainting and reconstruction,
self-supervised pretraining, clinical measurements and reports.

Nothing heavy is imported here: ``import mskmri`` stays cheap and torch-free.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger("mskmri").addHandler(logging.NullHandler())

__all__ = ["__version__"]
