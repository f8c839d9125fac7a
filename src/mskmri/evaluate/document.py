"""The ``mskmri/evaluation/1`` document: what ``mskmri evaluate PRED TRUTH --json OUT`` writes.

Layout::

    {
      "schema": "mskmri/evaluation/1",
      "tool": {"name": "mskmri", "version": ...},
      "prediction": {path, shape, spacing_mm, orientation, voxel_volume_mm3, affine},
      "truth": {...},
      "options": {"labels": [...], "label_schema": ..., "resampled": false,
                  "hd_percentile": 95, "lesions": {...} | null},
      "definitions": {"dice": "...", "hd95": "...", ...},
      "labels": [{"label": 1, "name": "femur",
                  "metrics": {"dice": {"value": 0.97, "unit": "1"},
                              "hd95": {"value": 1.2, "unit": "mm"}, ...},
                  "lesions": {...}}, ...],
      "summary": {"mean_dice": {"value": ..., "unit": "1", "n_labels": ...}, ...},
      "warnings": [...]
    }

Every number carries its unit (``"1"`` dimensionless, ``"count"``, ``"mm"``, ``"mL"``,
``"%"``); an undefined metric is ``null`` with a ``"reason"``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mskmri.evaluate.metrics import (
    DEFAULT_SIZE_EDGES_ML,
    EVALUATION_SCHEMA,
    HD_PERCENTILE,
    LESION_NEIGHBOURHOOD_MM,
    MIN_OVERLAP_FRACTION,
    LabelEvaluation,
    evaluate_labels,
    summarize,
)
from mskmri.volume import LabelVolume

log = logging.getLogger(__name__)

#: One-line definitions written into every evaluation document.
DEFINITIONS: Mapping[str, str] = {
    "dice": "2 TP / (2 TP + FP + FN) over voxels; null when both masks are empty",
    "iou": "TP / (TP + FP + FN)",
    "sensitivity": "TP / (TP + FN)",
    "specificity": "TN / (TN + FP)",
    "accuracy": "(TP + TN) / all voxels",
    "surface": "voxels of a mask with a face neighbour outside it; distances between voxel "
               "centres in mm (spacing from the affine)",
    "hd95": "max of the two directed 95th percentiles of surface-to-surface distances (mm)",
    "assd": "mean of all surface-to-surface distances of both directions pooled (mm)",
    "hausdorff": "max surface-to-surface distance of both directions (mm)",
    "volume_difference": "V(pred) - V(truth) in mL; percent relative to V(truth)",
    "lesion": "26-connected component; a true lesion is hit when the prediction covers at "
              "least max(1, ceil(min_overlap_fraction x size)) of its voxels; a predicted "
              "component touching no hit true lesion is a false alarm; precision = hits / "
              "(hits + false alarms), recall = hits / true lesions, F1 their harmonic mean",
    "lesion_dice": "Dice of one true lesion within neighbourhood_mm of it, excluding voxels "
                   "closer to another true lesion",
    "size_strata": "true-lesion volume in mL, lower edge inclusive",
}


def _sidecar_names(path: Path) -> dict[int, str]:
    from mskmri.io import sidecar_path

    sc = sidecar_path(path)
    if not sc.is_file():
        return {}
    try:
        doc = json.loads(sc.read_text(encoding="utf-8"))
        return {int(k): str(v) for k, v in (doc.get("labels") or {}).items()}
    except (ValueError, AttributeError, TypeError):
        log.warning("ignoring unreadable label sidecar %s", sc)
        return {}


def _read(path: str | os.PathLike[str], schema: str | None) -> LabelVolume:
    from mskmri.io import read_labels

    if schema is not None:
        return read_labels(path, schema=schema, strict=True)
    lv = read_labels(path, schema="custom", strict=False)
    lv.labels = _sidecar_names(Path(path))
    return lv


def evaluation_document(
    results: Sequence[LabelEvaluation],
    *,
    prediction_info: Mapping[str, Any],
    truth_info: Mapping[str, Any],
    options: Mapping[str, Any],
    tool_version: str,
    warnings: Sequence[str] = (),
    per_lesion: bool = True,
) -> dict[str, Any]:
    """Assemble the versioned evaluation document (``mskmri/evaluation/1``).

    Parameters
    ----------
    results : sequence of LabelEvaluation
        From :func:`mskmri.evaluate.metrics.evaluate_labels`.
    prediction_info, truth_info : mapping
        Input descriptions (:func:`mskmri.measure.base.describe_input`).
    options : mapping
        The options used (labels, resampling, lesion rule ...).
    tool_version : str
        ``mskmri.__version__``.
    warnings : sequence of str
        Things a reader must know.
    per_lesion : bool
        Include the per-lesion tables.
    """
    return {
        "schema": EVALUATION_SCHEMA,
        "tool": {"name": "mskmri", "version": str(tool_version)},
        "prediction": dict(prediction_info),
        "truth": dict(truth_info),
        "options": dict(options),
        "definitions": dict(DEFINITIONS),
        "labels": [r.to_dict(per_lesion=per_lesion) for r in results],
        "summary": summarize(results),
        "warnings": list(warnings),
    }


def evaluate_files(
    pred_path: str | os.PathLike[str],
    truth_path: str | os.PathLike[str],
    *,
    labels: Sequence[int] | None = None,
    schema: str | None = None,
    resample: bool = False,
    lesions: bool = False,
    min_overlap_fraction: float = MIN_OVERLAP_FRACTION,
    size_edges_ml: Sequence[float] = DEFAULT_SIZE_EDGES_ML,
    neighbourhood_mm: float = LESION_NEIGHBOURHOOD_MM,
) -> dict[str, Any]:
    """Read a predicted and a true label map, evaluate, and return the document.

    Parameters
    ----------
    pred_path, truth_path : path-like
        Label maps (any format :func:`mskmri.io.read` accepts), with geometry.
    labels : sequence of int, optional
        Values to evaluate. Default: every value of ``schema`` when given, else every
        non-zero value present in either map.
    schema : str, optional
        Project label schema (``"knee"``, ``"spine"``, ``"lesion"``): names the values and
        refuses maps with values outside it.
    resample : bool
        Resample the prediction onto the truth grid (nearest) when the grids differ.
    lesions : bool
        Add lesion-wise detection and size strata for each label.
    min_overlap_fraction, size_edges_ml, neighbourhood_mm
        Lesion rule (see :func:`mskmri.evaluate.metrics.lesion_detection`).
    """
    from mskmri import __version__
    from mskmri.labels import get_schema
    from mskmri.measure.base import describe_input

    if schema is not None:
        get_schema(schema)  # "did you mean" on a typo, before reading anything
    pred = _read(pred_path, schema)
    truth = _read(truth_path, schema)
    names: dict[int, str] = {**pred.labels, **truth.labels}
    if labels is None and schema is not None:
        labels = sorted(get_schema(schema)) if schema != "spine" else None
    warnings: list[str] = []
    resampled = False
    if not pred.same_geometry(truth):
        if resample:
            resampled = True
            warnings.append("the prediction was resampled onto the truth grid (nearest "
                            "neighbour) before evaluation")
    results = evaluate_labels(
        pred, truth, labels=labels, names=names, resample=resample, lesions=lesions,
        min_overlap_fraction=min_overlap_fraction, size_edges_ml=size_edges_ml,
        neighbourhood_mm=neighbourhood_mm,
    )
    for r in results:
        t_empty = r.metrics["volume_truth"].value == 0
        p_empty = r.metrics["volume_pred"].value == 0
        if t_empty and p_empty:
            warnings.append(f"label {r.label} ({r.name}) is absent from both maps")
        elif t_empty:
            warnings.append(f"label {r.label} ({r.name}) is absent from the truth")
        elif p_empty:
            warnings.append(f"label {r.label} ({r.name}) is absent from the prediction")
    options: dict[str, Any] = {
        "labels": [r.label for r in results],
        "label_schema": schema,
        "resampled": resampled,
        "hd_percentile": HD_PERCENTILE,
        "lesions": (
            {"min_overlap_fraction": float(min_overlap_fraction),
             "size_strata_edges_mL": [float(e) for e in size_edges_ml],
             "neighbourhood_mm": float(neighbourhood_mm), "connectivity": 26}
            if lesions else None
        ),
    }
    return evaluation_document(
        results,
        prediction_info=describe_input(pred, Path(pred_path)),
        truth_info=describe_input(truth, Path(truth_path)),
        options=options,
        tool_version=__version__,
        warnings=warnings,
    )
