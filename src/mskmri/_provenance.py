"""What every pipeline output folder records about itself, and the rule for replacing one.

Shared by ``demo``, ``analyze knee`` and ``analyze spine``: package versions, a size + SHA-256
record per file, and the refusal to overwrite a folder that is not an earlier output of the
same kind.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mskmri.errors import MskMriError

#: Distributions whose versions a manifest records.
VERSIONED = ("numpy", "scipy", "nibabel", "scikit-image", "connected-components-3d", "trimesh",
             "matplotlib", "jinja2", "SimpleITK", "pydicom", "torch")


def versions(dists: Iterable[str] = VERSIONED) -> dict[str, str]:
    """mskmri, Python and each installed distribution in ``dists`` -> its version."""
    from mskmri import __version__

    out = {"mskmri": __version__, "python": sys.version.split()[0]}
    for dist in dists:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def file_record(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex digest}`` of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def check_replaceable_dir(out_dir: Path, *, manifest: str, is_ours: Callable[[dict[str, Any]], bool],
                          what: str) -> None:
    """Refuse to replace ``out_dir`` unless it is absent, empty, or an earlier ``what``.

    Parameters
    ----------
    out_dir : Path
        The output folder a pipeline is about to (atomically) replace.
    manifest : str
        Name of the manifest file inside such a folder.
    is_ours : callable
        Tells from the parsed manifest whether the folder is an earlier output of this kind.
    what : str
        Words for the error, e.g. ``"demo output"``.
    """
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise MskMriError(f"{out_dir} exists and is not a folder; give a new --out folder")
    if not any(out_dir.iterdir()):
        return
    try:
        doc = json.loads((out_dir / manifest).read_text(encoding="utf-8"))
        ours = isinstance(doc, dict) and bool(is_ours(doc))
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise MskMriError(f"{out_dir} exists and is not a previous {what} (no {what} {manifest}); "
                          "give a new --out folder or remove it first")
