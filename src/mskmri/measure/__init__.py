"""Clinical measurements from label maps: the measurement contract and one module per anatomy.

- :mod:`mskmri.measure.base`: :class:`Measurement`, the ``mskmri/measurements/1`` document,
  volumes from label maps (shared by every anatomy).
- :mod:`mskmri.measure.knee`: volume of every structure (effusion, muscle, menisci among
  them), cartilage thickness per plate, lesion volumes and counts per bone.
- :mod:`mskmri.measure.spine`: vertebral heights and ratios, endplate, disc and Cobb angles,
  disc heights, cord diameters and area, MSCC, K-line, T2-MI/RSCI.

:data:`ANATOMIES` is the registry the ``mskmri measure`` command reads its choices from:
anatomy name -> ``"module:function"`` of a function
``f(seg_path, *, image_path=None, lesions_path=None) -> dict`` returning the document.

Nothing here imports torch; importing this package is cheap (modules load on use).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from difflib import get_close_matches
from types import MappingProxyType
from typing import Any

from mskmri.errors import MskMriError
from mskmri.measure.base import (
    COUNT,
    DIMENSIONLESS,
    MEASUREMENTS_SCHEMA,
    ML_PER_MM3,
    Measurement,
    MeasurementError,
    describe_input,
    measurements_document,
    read_measurements,
    write_measurements,
)

#: anatomy -> "module:function" measuring from files (see the module docstring).
ANATOMIES: Mapping[str, str] = MappingProxyType(
    {
        "knee": "mskmri.measure.knee:measure_knee_files",
        "spine": "mskmri.measure.spine:measure_spine_files",
    }
)


def get_measurer(anatomy: str) -> Callable[..., dict[str, Any]]:
    """The file-level measuring function of ``anatomy``, with a "did you mean" on a typo."""
    if anatomy not in ANATOMIES:
        close = get_close_matches(anatomy, list(ANATOMIES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise MskMriError(
            f"no measurements for {anatomy!r} (available: {', '.join(ANATOMIES)}){hint}"
        )
    module, _, func = ANATOMIES[anatomy].partition(":")
    fn: Callable[..., dict[str, Any]] = getattr(importlib.import_module(module), func)
    return fn


__all__ = [
    "ANATOMIES",
    "COUNT",
    "DIMENSIONLESS",
    "MEASUREMENTS_SCHEMA",
    "ML_PER_MM3",
    "Measurement",
    "MeasurementError",
    "describe_input",
    "get_measurer",
    "measurements_document",
    "read_measurements",
    "write_measurements",
]
