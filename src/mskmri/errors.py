"""The exception tree of mskmri.

Every error a user can cause (a wrong path, a file that is not an image, an ambiguous DICOM
folder, missing geometry) is an :class:`MskMriError`. The CLI turns these into one line on
stderr and exit status 2; anything else is a bug and keeps its traceback.

Messages say what was expected, what came, and what to do.
"""

from __future__ import annotations


class MskMriError(Exception):
    """Base class for errors caused by the user's input or options (CLI exit status 2)."""


class InputNotFoundError(MskMriError):
    """A path given by the user does not exist."""


class UnsupportedFormatError(MskMriError):
    """A file that is not an image in a supported format (or is truncated)."""


class GeometryError(MskMriError):
    """Geometry is missing, inconsistent or cannot be trusted (spacing, orientation)."""


class DicomSeriesError(MskMriError):
    """A DICOM folder holds no series, several without a choice, or a series that cannot be
    stacked into one volume (gantry tilt, missing slices, non-uniform spacing)."""


class LabelError(MskMriError):
    """A label map holds values its schema does not know, or a needed structure is absent."""


class DimensionError(MskMriError):
    """The data has the wrong number of dimensions (e.g. 2-D where 3-D is needed)."""


class OptionalDependencyError(MskMriError):
    """An optional dependency is missing; the message names the install command."""


class ModelError(MskMriError):
    """A model's weights or model card are missing or do not match the code."""
