"""Atomic output: write to a temporary name beside the target, then rename.

Nothing half-written is ever left under the final name: if writing fails, the temporary
file is removed and the target (if it existed) is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _split_suffix(name: str) -> tuple[str, str]:
    for ext in (".nii.gz", ".tar.gz"):
        if name.endswith(ext):
            return name[: -len(ext)], ext
    stem, dot, ext = name.rpartition(".")
    return (stem, "." + ext) if dot and stem else (name, "")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path (same folder, same extension) that becomes ``target`` on success.

    Works for files and for folders (the temporary folder is renamed; an existing target
    folder is replaced only after the new one is complete).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stem, ext = _split_suffix(target.name)
    tmp = target.with_name(f".{stem}.tmp-{uuid.uuid4().hex[:8]}{ext}")
    try:
        yield tmp
        if tmp.is_dir():
            if target.exists():
                old = target.with_name(f".{stem}.old-{uuid.uuid4().hex[:8]}")
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        elif tmp.exists():
            os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_write_text(target: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def atomic_write_json(target: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``target`` atomically."""
    return atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")
