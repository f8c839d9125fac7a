"""Real knee label sources (``../shared/data/knee``) into the project schema.

OAI lesion maps: value 4 (both tibial plates) split into two plausible plates, medial towards
-x (these are right knees, like the pymskt right-knee reference in the same geometry), lesion
mask = values 7-9 exactly. The medial/lateral rule is checked on every source whose plates
are labelled separately, by merging them and asking the rule to find them again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mskmri.io import read
from mskmri.labels import KNEE_ID
from mskmri.synth import load_knee_source, oai_label_paths, split_by_subject, split_tibial_cartilage
from mskmri.synth.sources import subject_of

K = KNEE_ID
MED, LAT = K["medial_tibial_cartilage"], K["lateral_tibial_cartilage"]

pytestmark = pytest.mark.shared_data


def test_oai_map_loads_split_and_lesions(shared_data: Path) -> None:
    path = shared_data / "knee" / "oai_bone_lesion_labels" / "akoa_9055361_00m.nii.gz"
    raw = read(path)
    src = load_knee_source(path)
    assert src.source == "oai_lesion" and src.subject == "9055361" and src.timepoint == "00m"
    assert src.labels.same_geometry(raw) and src.lesions is not None
    r = np.asarray(raw.array)
    lab = src.labels.array
    # lesion mask = 7..9 exactly, and those voxels are bone again in the knee map
    assert np.array_equal(src.lesions.array > 0, np.isin(r, (7, 8, 9)))
    assert src.lesions.array.sum() > 0
    assert np.all(lab[r == 7] == K["femur"]) and np.all(lab[r == 8] == K["tibia"])
    # value 4 becomes two plates that together are exactly the old voxels
    plates = np.isin(lab, (MED, LAT))
    assert np.array_equal(plates, r == 4)
    n_med, n_lat = int((lab == MED).sum()), int((lab == LAT).sum())
    assert min(n_med, n_lat) > 0.3 * (n_med + n_lat)
    # medial plate towards -x (a right knee), each plate one side of the tibial spine
    ras = src.labels.reorient("RAS")
    xm = np.argwhere(ras.array == MED)[:, 0]
    xl = np.argwhere(ras.array == LAT)[:, 0]
    assert xm.max() < xl.min() + 3
    notes = src.notes["tibial_cartilage_split"]
    assert notes["knee_side"] == "right" and notes["medial_score"] > 1.0


@pytest.mark.parametrize("rel, med, lat, side", [
    ("pymskt_dess_labels/SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd", 2, 3, "right"),
    ("cartimorph_template/CLAIR-Knee-103R_segmentation_64x128x128.nii.gz", 4, 5, None),
    ("spl_atlas_labels/seg.nrrd", 85, 84, "left"),
])
def test_medial_rule_recovers_labelled_plates(shared_data: Path, rel: str, med: int, lat: int,
                                              side: str | None) -> None:
    src = load_knee_source(shared_data / "knee" / rel)
    lab = src.labels
    truth = lab.array.copy()
    merged = truth.copy()
    merged[merged == LAT] = MED
    split, notes = split_tibial_cartilage(lab.with_array(merged))
    if side is not None:
        assert notes["knee_side"] == side
    agree = (split.array[np.isin(truth, (MED, LAT))] == truth[np.isin(truth, (MED, LAT))]).mean()
    assert agree > 0.97


def test_other_sources_load(shared_data: Path) -> None:
    knee = shared_data / "knee"
    spl = load_knee_source(knee / "spl_atlas_labels" / "seg.nrrd")
    assert spl.source == "spl_atlas" and spl.extra is not None
    assert {1, 2, 3, 4, 12, 13, 14, 15, 16, 17} <= set(spl.labels.present_values())
    assert set(np.unique(spl.extra.array).tolist()) == {0, 1, 2, 3}
    sub = load_knee_source(knee / "pymskt_dess_labels" / "meniscus_subregions.nrrd")
    main = load_knee_source(knee / "pymskt_dess_labels" /
                            "SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd")
    # subregions 101-103 / 104-106 are exactly the medial / lateral menisci of the main file
    assert np.array_equal(sub.labels.array, main.labels.array)
    assert sub.subject == main.subject == "pymskt"


def test_oai_subject_split(shared_data: Path) -> None:
    paths = oai_label_paths(shared_data)
    assert len(paths) == 56
    split = split_by_subject([p.name for p in paths], seed=0)
    subjects = {k: {subject_of(n) for n in v} for k, v in split.items()}
    assert sum(len(v) for v in split.values()) == 56
    assert not (subjects["train"] & (subjects["val"] | subjects["test"]))
    assert not (subjects["val"] & subjects["test"])
    for names in split.values():  # both time points of an akoa subject travel together
        for n in names:
            if n.startswith("akoa_"):
                assert sum(subject_of(m) == subject_of(n) for m in names) == 2
