"""Timing of named pipeline steps (one place for demo and analyze)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

log = logging.getLogger("mskmri")


class StepTimer:
    """Times named steps and logs each one as it starts.

    ``timings`` maps step name -> wall time in seconds (rounded to ms); ``total()`` is the
    time since the timer was made.
    """

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._t0 = time.perf_counter()

    @contextlib.contextmanager
    def step(self, name: str, message: str) -> Iterator[None]:
        """Log ``message`` and time the block as step ``name``."""
        log.info("%s ...", message)
        t = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t, 3)

    def total(self) -> float:
        """Seconds since the timer was made."""
        return round(time.perf_counter() - self._t0, 3)
