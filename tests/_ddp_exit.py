"""The end of a ``torchrun`` test worker: leave the process group, mark the rank done, exit.

Shared by every DDP test worker (``test_training_ddp.py``, ``test_segment_knee.py``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path


def finish_worker(out: Path, rank: int) -> None:
    """Leave the process group, write ``out/rank{rank}.done`` and exit with status 0.

    The exit skips interpreter finalisation. In CI runs, a rank of either DDP test aborted
    now and then with "terminate called without an active exception" (exit -6) and nothing
    else logged; C++ teardown at exit is the usual source. Every result is on disk before
    this is called, and the ``.done`` markers (:func:`ranks_done`) tell the test how far each
    rank got if it happens again.
    """
    from mskmri.nn.train import shutdown_runtime

    shutdown_runtime()
    (out / f"rank{rank}.done").write_text("ok")
    logging.shutdown()
    os._exit(0)


def ranks_done(out: Path, world: int = 2) -> list[int]:
    """Ranks whose worker reached :func:`finish_worker`'s marker."""
    return [r for r in range(world) if (out / f"rank{r}.done").exists()]
