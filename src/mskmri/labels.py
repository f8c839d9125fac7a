"""Label schemas: the single source of truth for label ids and names.

Two project schemas (knee, spine; ARCHITECTURE.md "Label schemas") and mapping tables from
every label source in ``../shared/data`` to them. Outputs always use the project ids.

A mapping table maps a *source* value to a project value; 0 means "not represented in the
project schema" (the voxel becomes background). Source values that need more than a table
(a combined tibial cartilage split by side, a lesion label that is also bone, instance ids
that need ordering along the spine) are named in the table's ``needs`` notes and handled by
the function that uses the table (``synth`` for the knee, ``segment.spine`` for the spine).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from difflib import get_close_matches
from types import MappingProxyType

import numpy as np

from mskmri.errors import LabelError

# --------------------------------------------------------------------------- knee schema
KNEE: Mapping[int, str] = MappingProxyType(
    {
        1: "femur",
        2: "tibia",
        3: "patella",
        4: "fibula",
        5: "femoral_cartilage",
        6: "medial_tibial_cartilage",
        7: "lateral_tibial_cartilage",
        8: "patellar_cartilage",
        9: "medial_meniscus",
        10: "lateral_meniscus",
        11: "joint_effusion",
        12: "muscle",
        13: "anterior_cruciate_ligament",
        14: "posterior_cruciate_ligament",
        15: "collateral_ligaments",
        16: "patellar_tendon",
        17: "infrapatellar_fat_pad",
    }
)
KNEE_ID: Mapping[str, int] = MappingProxyType({v: k for k, v in KNEE.items()})

KNEE_BONES = ("femur", "tibia", "patella", "fibula")
KNEE_CARTILAGE = (
    "femoral_cartilage",
    "medial_tibial_cartilage",
    "lateral_tibial_cartilage",
    "patellar_cartilage",
)
KNEE_MENISCI = ("medial_meniscus", "lateral_meniscus")

#: Lesion masks are separate from the tissue map: 1 = bone marrow lesion.
LESION: Mapping[int, str] = MappingProxyType({1: "bone_marrow_lesion"})

# --------------------------------------------------------------------------- spine schema
_CERVICAL = {i: f"C{i}" for i in range(1, 8)}
_THORACIC = {7 + i: f"T{i}" for i in range(1, 13)}
_LUMBAR = {19 + i: f"L{i}" for i in range(1, 7)}
VERTEBRAE: Mapping[int, str] = MappingProxyType({**_CERVICAL, **_THORACIC, **_LUMBAR, 26: "sacrum"})
VERTEBRA_ID: Mapping[str, int] = MappingProxyType({v: k for k, v in VERTEBRAE.items()})

DISC_OFFSET = 100
SPINAL_CORD = 201
CSF = 202
CORD_HYPERINTENSITY = 203
#: Vertebrae whose level cannot be told are numbered in order from the top from here.
ORDINAL_VERTEBRA_START = 1000


def disc_name(upper_vertebra_id: int) -> str:
    """Name of the disc below vertebra ``upper_vertebra_id`` (e.g. 20 -> ``"L1-L2"``)."""
    upper = vertebra_name(upper_vertebra_id)
    lower_id = upper_vertebra_id + 1
    if upper_vertebra_id >= ORDINAL_VERTEBRA_START:
        return f"{upper}-V{lower_id}"
    if upper_vertebra_id == 24:  # L5 above the sacrum (no L6 in most spines)
        return "L5-S1"
    lower = VERTEBRAE.get(lower_id, "S1" if lower_id == 26 else f"V{lower_id}")
    if lower == "sacrum":
        lower = "S1"
    return f"{upper}-{lower}"


def vertebra_name(value: int) -> str:
    """Level name of a vertebra id: VerSe ids -> ``"L3"``; ordinal ids -> ``"V1002"``."""
    if value in VERTEBRAE:
        return VERTEBRAE[value]
    if ORDINAL_VERTEBRA_START <= value < ORDINAL_VERTEBRA_START + DISC_OFFSET:
        return f"V{value}"
    raise LabelError(f"{value} is not a vertebra id (1-26 VerSe, or 1000-1099 ordinal)")


def is_vertebra(value: int) -> bool:
    """True for VerSe vertebra ids (1-26) and ordinal ones (1000-1099)."""
    return value in VERTEBRAE or ORDINAL_VERTEBRA_START <= value < ORDINAL_VERTEBRA_START + DISC_OFFSET


def is_disc(value: int) -> bool:
    """True for disc ids: 100 + a VerSe id, or 100 + an ordinal id (1100-1199)."""
    return is_vertebra(value - DISC_OFFSET) and value - DISC_OFFSET != 26


def spine_label_name(value: int) -> str:
    """Name of any spine-schema value."""
    if is_vertebra(value):
        return vertebra_name(value)
    if is_disc(value):
        return f"disc_{disc_name(value - DISC_OFFSET)}"
    fixed = {SPINAL_CORD: "spinal_cord", CSF: "csf", CORD_HYPERINTENSITY: "cord_t2_hyperintensity"}
    if value in fixed:
        return fixed[value]
    raise LabelError(f"{value} is not a value of the spine schema")


def spine_labels_for(values: list[int] | set[int]) -> dict[int, str]:
    """Value -> name for the spine-schema values present (for sidecars)."""
    return {int(v): spine_label_name(int(v)) for v in sorted(values) if v != 0}


SPINE_FIXED: Mapping[int, str] = MappingProxyType(
    {
        **VERTEBRAE,
        **{DISC_OFFSET + k: f"disc_{disc_name(k)}" for k in list(VERTEBRAE)[:-1]},
        SPINAL_CORD: "spinal_cord",
        CSF: "csf",
        CORD_HYPERINTENSITY: "cord_t2_hyperintensity",
    }
)

SCHEMAS: Mapping[str, Mapping[int, str]] = MappingProxyType(
    {"knee": KNEE, "spine": SPINE_FIXED, "lesion": LESION}
)


def get_schema(name: str) -> Mapping[int, str]:
    """Look up a schema by name, with a "did you mean" on a typo."""
    if name in SCHEMAS:
        return SCHEMAS[name]
    close = get_close_matches(name, list(SCHEMAS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise LabelError(f"unknown label schema {name!r} (known: {', '.join(SCHEMAS)}){hint}")


def knee_id(name: str) -> int:
    """Project id of a knee structure, with a "did you mean" on a typo."""
    if name in KNEE_ID:
        return KNEE_ID[name]
    close = get_close_matches(name, list(KNEE_ID), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise LabelError(f"unknown knee structure {name!r}{hint}")


# --------------------------------------------------------------------------- source tables
@dataclass(frozen=True)
class SourceMapping:
    """How one label source maps onto a project schema.

    Attributes
    ----------
    name : str
        Registry name of the source (e.g. ``"oai_lesion"``).
    schema : str
        Target project schema (``"knee"`` or ``"spine"``).
    table : mapping of int to int
        Source value -> project value (0 = not represented).
    source_names : mapping of int to str
        Source value -> the source's own name for it.
    lesion_values : tuple of int
        Source values that are also bone marrow lesions (written to the lesion mask).
    needs : str
        What a plain table cannot do for this source, and where it is done.
    citation : str
        Where the source comes from and its licence.
    """

    name: str
    schema: str
    table: Mapping[int, int]
    source_names: Mapping[int, str]
    lesion_values: tuple[int, ...] = ()
    needs: str = ""
    citation: str = ""
    unmapped_ok: tuple[int, ...] = field(default=())

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Map a source label array to project ids (uint16); unknown values raise LabelError."""
        values = np.unique(array)
        unknown = [int(v) for v in values if v != 0 and int(v) not in self.table]
        if unknown:
            raise LabelError(
                f"label map has values {unknown} that the {self.name!r} source does not define; "
                "check that the right source was chosen"
            )
        lut = np.zeros(int(values.max()) + 1 if values.size else 1, dtype=np.uint16)
        for src, dst in self.table.items():
            if src < lut.size:
                lut[src] = dst
        return lut[array.astype(np.int64)]


_K = KNEE_ID

OAI_LESION = SourceMapping(
    name="oai_lesion",
    schema="knee",
    table={1: _K["femur"], 2: _K["femoral_cartilage"], 3: _K["tibia"],
           4: _K["medial_tibial_cartilage"], 5: _K["patella"], 6: _K["patellar_cartilage"],
           7: _K["femur"], 8: _K["tibia"], 9: _K["patella"]},
    source_names={1: "femur", 2: "femoral cartilage", 3: "tibia", 4: "tibial cartilage",
                  5: "patella", 6: "patellar cartilage", 7: "femoral bone lesion",
                  8: "tibial bone lesion", 9: "patellar bone lesion"},
    lesion_values=(7, 8, 9),
    needs=("value 4 is medial+lateral tibial cartilage together: split by side "
           "(synth.sources.split_tibial_cartilage); lesions 7-9 are cut out of their bone, so "
           "they map back to the bone and also to the lesion mask"),
    citation=("Woo et al., Medical Image Analysis 2024 (arXiv 2211.16696); OAI; no licence "
              "stated, research use"),
)

PYMSKT = SourceMapping(
    name="pymskt",
    schema="knee",
    table={1: _K["femoral_cartilage"], 2: _K["medial_tibial_cartilage"],
           3: _K["lateral_tibial_cartilage"], 4: _K["patellar_cartilage"], 5: _K["femur"],
           6: _K["tibia"], 7: _K["patella"], 8: _K["fibula"], 9: _K["lateral_meniscus"],
           10: _K["medial_meniscus"]},
    source_names={1: "femoral cartilage", 2: "medial tibial cartilage",
                  3: "lateral tibial cartilage", 4: "patellar cartilage", 5: "femur",
                  6: "tibia", 7: "patella", 8: "fibula", 9: "lateral meniscus",
                  10: "medial meniscus"},
    citation="pymskt (A. Gatti), MIT licence",
)

_SPL_NAMES = {
    9: "infrapatellar_fat_body", 12: "vastus_lateralis_muscle", 13: "vastus_medialis_muscle",
    15: "biceps_femoris_muscle", 16: "semimembranosus_muscle", 17: "semitendinosus_muscle",
    18: "gracilis_muscle", 19: "sartorius_muscle", 20: "medial_head_gastrocnemius_muscle",
    21: "lateral_head_gastrocnemius_muscle", 22: "popliteus_muscle", 23: "soleus_muscle",
    24: "tibialis_anterior_muscle", 25: "extensor_digitorum_longus_muscle",
    26: "peroneus_longus_muscle", 31: "anterior_cruciate_ligament",
    32: "posterior_cruciate_ligament", 33: "fibular_collateral_ligament",
    34: "tibial_collateral_ligament", 35: "patellar_ligament", 41: "adductor_magnus_tendon",
    42: "biceps_femoris_tendon", 43: "iliotibial_tract", 44: "popliteus_tendon",
    46: "soleus_tendon", 47: "semitendinosus_tendon", 48: "gracilis_tendon",
    61: "peroneus_nerve", 62: "tibialis_nerve", 63: "muscular_branches_tibialis_nerve",
    64: "medial_sural_cutaneous_nerve", 71: "popliteal_artery", 72: "popliteal_vein",
    73: "superior_medial_genicular_artery", 74: "superior_lateral_genicular_artery",
    75: "middle_genicular_artery", 77: "great_saphenous_vein", 78: "small_saphenous_vein",
    81: "lateral_meniscus", 82: "medial_meniscus", 83: "femoral_cartilage",
    84: "lateral_tibial_cartilage", 85: "medial_tibial_cartilage", 86: "patellar_cartilage",
    95: "femur", 96: "tibia", 97: "fibula", 98: "patella",
    3: "(no colour-table entry)",
}
_SPL_TABLE = {v: 0 for v in _SPL_NAMES}
_SPL_TABLE.update({v: _K["muscle"] for v in range(12, 27) if v in _SPL_NAMES})
_SPL_TABLE.update({
    9: _K["infrapatellar_fat_pad"], 31: _K["anterior_cruciate_ligament"],
    32: _K["posterior_cruciate_ligament"], 33: _K["collateral_ligaments"],
    34: _K["collateral_ligaments"], 35: _K["patellar_tendon"], 81: _K["lateral_meniscus"],
    82: _K["medial_meniscus"], 83: _K["femoral_cartilage"], 84: _K["lateral_tibial_cartilage"],
    85: _K["medial_tibial_cartilage"], 86: _K["patellar_cartilage"], 95: _K["femur"],
    96: _K["tibia"], 97: _K["fibula"], 98: _K["patella"],
})
SPL_ATLAS = SourceMapping(
    name="spl_atlas",
    schema="knee",
    table=_SPL_TABLE,
    source_names=_SPL_NAMES,
    needs=("tendons (41-48), nerves (61-64) and vessels (71-78) have no project class and map "
           "to background; synthesis still renders them with their own tissue intensity"),
    citation="SPL/NAC Knee Atlas, Harvard Surgical Planning Lab (research/education)",
)

CARTIMORPH = SourceMapping(
    name="cartimorph",
    schema="knee",
    table={1: _K["femur"], 2: _K["femoral_cartilage"], 3: _K["tibia"],
           4: _K["medial_tibial_cartilage"], 5: _K["lateral_tibial_cartilage"]},
    source_names={1: "femur", 2: "femoral cartilage", 3: "tibia", 4: "medial tibial cartilage",
                  5: "lateral tibial cartilage"},
    citation="Yao et al., CartiMorph, Medical Image Analysis 2023; CC BY-NC 4.0",
)

MYOSEGMENTUM = SourceMapping(
    name="myosegmentum",
    schema="spine",
    table={1: 20, 2: 21, 3: 22, 4: 23, 5: 24},
    source_names={i: f"lumbar vertebral body {i} (L{i}, ordered along axis 0)" for i in range(1, 6)},
    citation="MyoSegmenTUM spine, Burian et al., BMC Musculoskelet Disord 2019; via FastCleverSeg",
)

CHU2015 = SourceMapping(
    name="chu2015",
    schema="spine",
    table={i: ORDINAL_VERTEBRA_START + i - 1 for i in range(1, 10)},
    source_names={i: f"vertebral body instance {i} (not in anatomical order)" for i in range(1, 10)},
    needs=("instance ids are not in anatomical order: renumber by centroid from the top "
           "before naming levels; in all 7 exams the lowest instance is S1 (checked visually), "
           "so the 9 instances are T10-S1 assuming no transitional vertebra"),
    citation="Chu et al., PLoS ONE 2015; via FastCleverSeg",
)

IVD_DISCS = SourceMapping(
    name="ivd_discs",
    schema="spine",
    table={i: DISC_OFFSET + 19 + i for i in range(1, 6)},
    source_names={i: f"lumbar disc {i} (L{i}-{'L' + str(i + 1) if i < 5 else 'S1'})" for i in range(1, 6)},
    citation="Menezes-Reis et al., QIMS 2016; via FastCleverSeg",
)

U2AD = SourceMapping(
    name="u2ad",
    schema="spine",
    # The data README says 1 = vertebral bodies, 2 = discs; the arrays show the opposite
    # (value 2 is the tall bony blocks, value 1 the thin wedges between them; checked visually
    # and by shape on all six slices), so the table follows the arrays.
    table={1: DISC_OFFSET + ORDINAL_VERTEBRA_START, 2: ORDINAL_VERTEBRA_START, 3: SPINAL_CORD,
           4: CSF, 5: 0, 6: CORD_HYPERINTENSITY, 7: 0},
    source_names={1: "discs (all; the README says vertebral bodies, the arrays show discs)",
                  2: "vertebral bodies (all; the README says discs)", 3: "spinal cord",
                  4: "CSF", 5: "undocumented (clinical only)",
                  6: "intramedullary T2 hyperintensity (inferred from the authors' code)",
                  7: "undocumented (clinical only)"},
    needs=("vertebral bodies (2) and discs (1) are single classes: split into instances by "
           "connected components and order from the top before naming levels"),
    citation="U2AD (zhibaishouheilab), MIT licence",
)

SCT = SourceMapping(
    name="sct",
    schema="spine",
    table={1: SPINAL_CORD},
    source_names={1: "spinal cord (binary manual mask)"},
    needs=("SCT's level-labelled masks use value = vertebral level (C1=1..C7=7, T1=8..), the "
           "same numbering as VerSe: use VERTEBRAE directly for those"),
    citation="Spinal Cord Toolbox sample data (NeuroPoly), MIT licence",
)

VERSE = SourceMapping(
    name="verse",
    schema="spine",
    table={v: v for v in VERTEBRAE},
    source_names=dict(VERTEBRAE),
    citation="VerSe 2019 ids; HealthiVert-GAN (MIT)",
)

SOURCES: Mapping[str, SourceMapping] = MappingProxyType(
    {m.name: m for m in (OAI_LESION, PYMSKT, SPL_ATLAS, CARTIMORPH, MYOSEGMENTUM, CHU2015,
                         IVD_DISCS, U2AD, SCT, VERSE)}
)


def get_source(name: str) -> SourceMapping:
    """Look up a label source by registry name, with a "did you mean" on a typo."""
    if name in SOURCES:
        return SOURCES[name]
    close = get_close_matches(name, list(SOURCES), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise LabelError(f"unknown label source {name!r} (known: {', '.join(SOURCES)}){hint}")
