"""Colour tables for label overlays: one stable colour per label value, per schema.

The knee and lesion colours are written out here once (figures, HTML swatches and any later
3-D view read them from this module). Spine colours and colours for unknown schemas are
derived from the label value alone, so the same value always gets the same colour.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from mskmri.labels import CORD_HYPERINTENSITY, CSF, DISC_OFFSET, KNEE_ID, SPINAL_CORD

#: Knee schema colours (``#rrggbb``), keyed by structure name so they follow ``labels.KNEE``.
#: Bones in muted warm/cool tones, cartilage in saturated ones, fluid in cyan.
KNEE_COLOURS_BY_NAME: Mapping[str, str] = MappingProxyType(
    {
        "femur": "#e8b04a",
        "tibia": "#6aa84f",
        "patella": "#3d85c6",
        "fibula": "#8e7cc3",
        "femoral_cartilage": "#e0474c",
        "medial_tibial_cartilage": "#ff8c1a",
        "lateral_tibial_cartilage": "#d65db1",
        "patellar_cartilage": "#f6d743",
        "medial_meniscus": "#2ec4b6",
        "lateral_meniscus": "#168aad",
        "joint_effusion": "#00e5ff",
        "muscle": "#a0522d",
        "anterior_cruciate_ligament": "#b5e48c",
        "posterior_cruciate_ligament": "#90be6d",
        "collateral_ligaments": "#a2d2ff",
        "patellar_tendon": "#ffafcc",
        "infrapatellar_fat_pad": "#f9e2ae",
    }
)

#: Knee colours by project label id.
KNEE_COLOURS: Mapping[int, str] = MappingProxyType(
    {KNEE_ID[name]: colour for name, colour in KNEE_COLOURS_BY_NAME.items()}
)

#: Lesion masks (1 = bone marrow lesion): a colour no knee structure uses.
LESION_COLOURS: Mapping[int, str] = MappingProxyType({1: "#ff00ff"})

#: Colours cycled over vertebrae (alternating hues so neighbouring levels differ).
_VERTEBRA_CYCLE = ("#e8b04a", "#3d85c6", "#6aa84f", "#d65db1", "#ff8c1a", "#8e7cc3")
#: Colours cycled over discs.
_DISC_CYCLE = ("#a2d2ff", "#bde0fe", "#90e0ef")
_SPINE_FIXED = {SPINAL_CORD: "#f6d743", CSF: "#00e5ff", CORD_HYPERINTENSITY: "#ff00ff"}

#: Fallback palette (matplotlib's tab20) for schemas without a table; indexed by value.
_FALLBACK = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)


def _spine_colour(value: int) -> str:
    if value in _SPINE_FIXED:
        return _SPINE_FIXED[value]
    if DISC_OFFSET < value < 2 * DISC_OFFSET:
        return _DISC_CYCLE[(value - DISC_OFFSET) % len(_DISC_CYCLE)]
    return _VERTEBRA_CYCLE[value % len(_VERTEBRA_CYCLE)]


def label_colour(value: int, schema: str, name: str | None = None) -> str:
    """The display colour (``#rrggbb``) of one label value.

    Parameters
    ----------
    value : int
        Non-zero label value.
    schema : str
        Label schema of the map (``"knee"``, ``"spine"``, ``"lesion"`` or anything else).
    name : str, optional
        Structure name; for the knee, a known name wins over the value (so a map whose
        values were renumbered still shows femur in the femur colour).
    """
    if schema == "knee":
        if name is not None and name in KNEE_COLOURS_BY_NAME:
            return KNEE_COLOURS_BY_NAME[name]
        if value in KNEE_COLOURS:
            return KNEE_COLOURS[value]
    elif schema == "lesion" and value in LESION_COLOURS:
        return LESION_COLOURS[value]
    elif schema == "spine":
        return _spine_colour(int(value))
    return _FALLBACK[int(value) % len(_FALLBACK)]


def colour_table(labels: Mapping[int, str], schema: str) -> dict[int, str]:
    """Value -> ``#rrggbb`` for every value in ``labels`` (a LabelVolume's ``labels``)."""
    return {int(v): label_colour(int(v), schema, n) for v, n in sorted(labels.items()) if v != 0}


def hex_to_rgb(colour: str) -> tuple[float, float, float]:
    """``"#rrggbb"`` -> (r, g, b) floats in [0, 1]."""
    c = colour.lstrip("#")
    return (int(c[0:2], 16) / 255.0, int(c[2:4], 16) / 255.0, int(c[4:6], 16) / 255.0)


def display_name(name: str) -> str:
    """A structure name for people: ``"medial_tibial_cartilage"`` -> ``"medial tibial cartilage"``."""
    return name.replace("_", " ")
