"""Write one synthesis to a folder: what ``mskmri synth knee LABELS OUT`` does.

``OUT`` receives, atomically (built in a temporary folder beside it, renamed when complete):

==================  ===========================================================
``image.nii.gz``    the rendered image (float32)
``labels.nii.gz``   its truth label map, knee schema (+ ``labels.json`` sidecar)
``lesions.nii.gz``  the lesion mask, 1 = bone marrow lesion (+ ``lesions.json``)
``synth.json``      ``mskmri/synth/1``: source, seed, contrast, every parameter drawn,
                    which classes are real and which procedural, volumes, timings
==================  ===========================================================
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mskmri.errors import InputNotFoundError
from mskmri.labels import KNEE
from mskmri.synth._common import SynthesisError, json_ready
from mskmri.synth.contrast import get_contrast
from mskmri.synth.render import RenderOptions, SynthResult, render
from mskmri.volume import LabelVolume

log = logging.getLogger(__name__)

#: Version tag of ``synth.json``.
SYNTH_SCHEMA = "mskmri/synth/1"
#: LABELS value that asks for the built-in phantom.
PHANTOM = "phantom"
#: ``--source`` value for a map already in the project knee schema.
KNEE_SCHEMA_SOURCE = "knee"


def _load_labels(labels: str | os.PathLike[str], source: str | None, seed: int
                 ) -> tuple[LabelVolume, LabelVolume | None, LabelVolume | None, dict[str, Any]]:
    """(knee labels, lesions, extra tissues, source description) for LABELS."""
    if str(labels) == PHANTOM:
        from mskmri.synth.phantom import phantom_knee

        lab, les = phantom_knee(seed=seed)
        return lab, les, None, {"name": PHANTOM, "seed": seed}
    path = Path(labels)
    if not path.exists():
        raise InputNotFoundError(f"{path} does not exist; give a knee label map or the word "
                                 f"`{PHANTOM}`")
    if source is None:
        from mskmri.io import sidecar_path

        side = sidecar_path(path)
        if side.exists():
            try:
                doc = json.loads(side.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                doc = {}
            if isinstance(doc, dict) and doc.get("label_schema") == KNEE_SCHEMA_SOURCE:
                source = KNEE_SCHEMA_SOURCE
    if source == KNEE_SCHEMA_SOURCE:
        from mskmri.io import read_labels

        lab = read_labels(path, schema="knee")
        lab = LabelVolume(lab.array, lab.affine, dict(KNEE), schema="knee", meta=lab.meta)
        return lab, None, None, {"name": KNEE_SCHEMA_SOURCE, "path": str(path)}
    from mskmri.synth.sources import load_knee_source

    src = load_knee_source(path, source=source)
    desc = {"name": src.source, "path": str(path), "subject": src.subject,
            "timepoint": src.timepoint, "notes": src.notes}
    return src.labels, src.lesions, src.extra, desc


def write_synth_folder(result: SynthResult, out: str | os.PathLike[str],
                       source: dict[str, Any]) -> Path:
    """Write a :class:`SynthResult` to folder ``out`` atomically (see the module notes)."""
    from mskmri import __version__
    from mskmri.io import atomic_path, write

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SynthesisError(f"{out} exists and is not a folder; give a new or existing folder")
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        write(result.image, tmp / "image.nii.gz")
        write(result.labels, tmp / "labels.nii.gz")
        write(result.lesions, tmp / "lesions.nii.gz")
        doc = {
            "schema": SYNTH_SCHEMA,
            "mskmri_version": __version__,
            "source": source,
            "contrast": result.params.get("contrast"),
            "seed": result.params.get("seed"),
            "files": {"image": "image.nii.gz", "labels": "labels.nii.gz",
                      "lesions": "lesions.nii.gz"},
            "geometry": {"shape": list(result.image.shape),
                         "spacing_mm": [round(s, 6) for s in result.image.spacing],
                         "orientation": "".join(result.image.orientation)},
            "params": result.params,
        }
        (tmp / "synth.json").write_text(json.dumps(json_ready(doc), indent=2) + "\n",
                                        encoding="utf-8")
    return out


def synth_knee(
    labels: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    contrast: str = "dess",
    seed: int = 0,
    source: str | None = None,
    effusion_ml: float | None = None,
    lesion_ml: Sequence[float] | None = None,
    lesion_bone: Sequence[str] | str = "femur",
    inplane: int | None = None,
    deform: bool = True,
) -> Path:
    """Render a knee from LABELS (a label-map path or ``"phantom"``) into folder ``out``.

    Parameters are those of :func:`mskmri.synth.render`; ``source`` names the label source
    (``oai_lesion``, ``pymskt``, ``spl_atlas``, ``cartimorph`` or ``knee`` for the project
    schema) and is detected when omitted.

    Returns
    -------
    Path
        The output folder.
    """
    model = get_contrast(contrast)  # fail on a bad name before any reading
    lab, les, extra, desc = _load_labels(labels, source, seed)
    bones: str | list[str] = lesion_bone if isinstance(lesion_bone, str) else list(lesion_bone)
    if isinstance(bones, list) and len(bones) == 1:
        bones = bones[0]
    opts = RenderOptions(deform=deform)
    result = render(lab, contrast=model, seed=seed, lesions=les, extra=extra,
                    effusion_ml=effusion_ml,
                    lesion_ml=list(lesion_ml) if lesion_ml else None, lesion_bone=bones,
                    inplane=inplane, options=opts)
    folder = write_synth_folder(result, out, desc)
    log.info("rendered %s from %s in %.1f s", model.name, desc["name"],
             result.params["timing"]["total_s"])
    return folder
