"""Shared fixtures: tiny synthetic phantoms first, ../shared/data second.

Tests that need the real data take the ``shared_data`` fixture: it skips with a reason when
the folder is absent, except under CI (``CI=true``), where a missing folder is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from mskmri.paths import shared_data_dir

os.environ.setdefault("MSKMRI_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder; skipped when absent (failed under CI)."""
    path = shared_data_dir()
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI=true but ../shared/data (or MSKMRI_SHARED_DATA) is missing")
        pytest.skip("needs ../shared/data or MSKMRI_SHARED_DATA (real data, not in the repo)")
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def random_orientation_affine(rng: np.random.Generator, spacing=(0.7, 0.4, 0.5)) -> np.ndarray:
    """A random axis permutation + flips with the given spacing and a random origin (RAS+)."""
    perm = rng.permutation(3)
    signs = rng.choice([-1.0, 1.0], size=3)
    aff = np.eye(4)
    aff[:3, :3] = 0
    for col, (row, sgn) in enumerate(zip(perm, signs, strict=True)):
        aff[row, col] = sgn * spacing[col]
    aff[:3, 3] = rng.uniform(-100, 100, size=3)
    return aff
