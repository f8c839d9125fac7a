"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import subprocess
from pathlib import Path

#: The repository root (the benchmarks live in ``ROOT / "benchmarks"``).
REPO_ROOT = Path(__file__).resolve().parents[1]


def git_commit(root: Path = REPO_ROOT) -> str | None:
    """The commit checked out in ``root`` (40 hex digits), or None outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
