"""One progress-bar wrapper for everything long.

Disabled by ``set_enabled(False)`` (the CLI's ``--quiet``) or the environment variable
``MSKMRI_NO_PROGRESS=1``; also off when stderr is not a terminal unless forced.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_enabled: bool | None = None


def set_enabled(flag: bool | None) -> None:
    """Force progress bars on (True) or off (False); None restores the automatic choice."""
    global _enabled
    _enabled = flag


def enabled() -> bool:
    """Whether progress bars are shown now."""
    if os.environ.get("MSKMRI_NO_PROGRESS", "") not in ("", "0"):
        return False
    if _enabled is not None:
        return _enabled
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], *, desc: str = "", total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (tqdm) when enabled, plainly otherwise."""
    if not enabled():
        yield from iterable
        return
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
