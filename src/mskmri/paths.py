"""Where things live: the shared real data, the shipped weights.

The shared data folder is found from ``MSKMRI_SHARED_DATA`` or ``../shared/data`` relative to
the repository root. Nothing is read at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = PACKAGE_DIR / "weights"
REPO_ROOT = PACKAGE_DIR.parent.parent


def shared_data_dir() -> Path | None:
    """Return the real-data folder (``../shared/data``) or None when it is absent."""
    env = os.environ.get("MSKMRI_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "data")
    candidates.append(Path.cwd().parent / "shared" / "data")
    for cand in candidates:
        if cand.is_dir():
            return cand.resolve()
    return None
