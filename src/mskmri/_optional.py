"""Lazy imports of heavy optional packages, with an error that names the install command."""

from __future__ import annotations

import importlib
from types import ModuleType

from mskmri.errors import OptionalDependencyError

_EXTRA_OF = {
    "torch": "ml",
    "monai": "ml",
    "safetensors": "ml",
    "onnxruntime": "ml",
    "onnx": "ml",
    "trimesh": "mesh",
    "highdicom": "dicom-out",
    "dask": "cohort",
    "distributed": "cohort",
    "pyarrow": "cohort",
    "sklearn": "stats",
}


def optional_import(name: str) -> ModuleType:
    """Import ``name`` or raise :class:`OptionalDependencyError` naming the extra to install.

    Parameters
    ----------
    name : str
        Module name, e.g. ``"torch"`` or ``"trimesh"``.
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        top = name.split(".")[0]
        extra = _EXTRA_OF.get(top, "all")
        hint = (
            "pip install torch==2.13.0 && pip install -c constraints.txt 'mskmri[ml]'"
            if extra == "ml"
            else f"pip install -c constraints.txt 'mskmri[{extra}]'"
        )
        raise OptionalDependencyError(
            f"this needs the optional package {top!r}, which is not installed; run: {hint}"
        ) from exc
