"""Pseudo-healthy vertebra, RHLV and Genant grade (mskmri.measure.grading).

Phantoms first: a sagittal column of identical rectangular bodies (25 mm high, 40 mm deep,
10 mm discs, 0.5 mm pixels), where every neighbour predicts the target exactly, so the
pseudo-healthy height is 25 mm and a rendered loss L gives RHLV = L at the sections the
fracture profile says. Then the real MyoSegmenTUM masks through the shared-data fixture.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from mskmri.labels import VERTEBRA_ID
from mskmri.measure.grading import (
    CROP_SHAPE,
    LEVEL_PX,
    GenantSvm,
    GradingError,
    InterpolationPainter,
    body_centroids,
    extract_section,
    fracture_profile,
    genant_from_loss,
    grade_section,
    grade_vertebrae,
    hole_mask,
    neighbours,
    pseudo_healthy,
    render_fracture,
    rhlv,
    rule_fractured,
    section_heights,
)
from mskmri.measure.spine import slice_label_volume
from mskmri.volume import LabelVolume

PX = 0.5  # mm
BODY_H, DEPTH, DISC = 25.0, 40.0, 10.0  # mm
LEVELS = ("L1", "L2", "L3", "L4", "L5")


def column(levels: tuple[str, ...] = LEVELS, heights: dict[str, float] | None = None
           ) -> np.ndarray:
    """(rows S->I, cols A->P) label slice of rectangular bodies; rows/cols at 0.5 mm."""
    heights = heights or {}
    n = len(LEVELS)
    arr = np.zeros((int((n * (BODY_H + DISC) + 2 * DISC) / PX), int((DEPTH + 40) / PX)),
                   np.int32)
    c0 = int(20 / PX)
    for i, name in enumerate(LEVELS):
        if name not in levels:
            continue
        top = DISC + i * (BODY_H + DISC)
        centre = top + BODY_H / 2
        h = heights.get(name, BODY_H)
        r0, r1 = int(round((centre - h / 2) / PX)), int(round((centre + h / 2) / PX))
        arr[r0:r1, c0:c0 + int(DEPTH / PX)] = VERTEBRA_ID[name]
    return arr


def phantom(levels: tuple[str, ...] = LEVELS, heights: dict[str, float] | None = None
            ) -> LabelVolume:
    return slice_label_volume(column(levels, heights), (PX, PX))


def diagonal_svm() -> GenantSvm:
    """Grades the largest RHLV by the Genant cut-offs (a hand-made linear classifier)."""
    # decision_g = sum(rhlv) * slope_g + b_g, ordered so that thresholds 0.2/0.25/0.4 on a
    # uniform loss u (sum = 3u) separate the classes: use slopes 0, 1, 2, 3 per unit of sum
    coef = np.array([[0.0] * 3, [1.0] * 3, [2.0] * 3, [3.0] * 3])
    # g wins over g-1 when 3u > b_{g-1} - b_g: put the boundaries at 3 * 0.2, 0.25, 0.4
    b1 = -0.6
    b2 = b1 - 0.75
    b3 = b2 - 1.2
    return GenantSvm(coef, np.array([0.0, b1, b2, b3]), (0, 1, 2, 3))


def test_neighbours_need_adjacent_levels_above_and_below() -> None:
    seg = phantom()
    nb = neighbours(seg)
    assert nb[VERTEBRA_ID["L3"]] == (VERTEBRA_ID["L2"], VERTEBRA_ID["L4"])
    assert "no vertebral body above" in str(nb[VERTEBRA_ID["L1"]])
    assert "no vertebral body below" in str(nb[VERTEBRA_ID["L5"]])
    gap = neighbours(phantom(levels=("L1", "L2", "L4", "L5")))
    assert isinstance(gap[VERTEBRA_ID["L2"]], str) and "adjacent" in gap[VERTEBRA_ID["L2"]]


def test_section_puts_neighbours_one_level_above_and_below() -> None:
    seg = phantom()
    l2, l3, l4 = (VERTEBRA_ID[n] for n in ("L2", "L3", "L4"))
    sec = extract_section(seg, l3, l2, l4)
    assert sec.target.shape == CROP_SHAPE
    # neighbour centroids 35 mm apart from the target: 32 px = 35 mm
    assert sec.spacing_mm == pytest.approx((BODY_H + DISC) / LEVEL_PX, rel=1e-6)
    rows = np.nonzero(sec.target.any(axis=1))[0]
    assert abs(rows.mean() - (CROP_SHAPE[0] - 1) / 2) < 1.0
    # nearest-neighbour sampling at 1.09 mm: up to one pixel row and column less
    assert sec.target.sum() * sec.spacing_mm ** 2 == pytest.approx(BODY_H * DEPTH, rel=0.1)
    hole = hole_mask(sec.others)
    assert not (hole & sec.others).any() and (hole & sec.target).sum() == sec.target.sum()
    with pytest.raises(GradingError, match="not a vertebral body"):
        extract_section(seg, 99, l2, l4)


def test_interpolation_painter_recovers_identical_neighbours() -> None:
    seg = phantom()
    sec = extract_section(seg, VERTEBRA_ID["L3"], VERTEBRA_ID["L2"], VERTEBRA_ID["L4"])
    ph = pseudo_healthy(sec, InterpolationPainter())
    h, _ = section_heights(sec, ph)
    for s in ("anterior", "middle", "posterior"):
        assert h[s] == pytest.approx(BODY_H, abs=2 * sec.spacing_mm)


@pytest.mark.parametrize(("shape", "expect", "tol"), [
    ("crush", {"anterior": 0.30, "middle": 0.30, "posterior": 0.30}, 0.02),
    # the wedged body is measured in its own frame (AP axis = bisector of its endplates, which
    # turns by half the wedge angle): the anterior loss reads ~0.27, not 0.30
    ("wedge", {"anterior": 0.30, "middle": 0.30 * 0.50 / 0.85, "posterior": 0.30 * 0.15 / 0.85},
     0.04),
    ("biconcave", {"anterior": 0.30 * 0.51, "middle": 0.30, "posterior": 0.30 * 0.51}, 0.03),
])
def test_rendered_fracture_gives_the_known_height_loss(shape: str, expect: dict[str, float],
                                                       tol: float) -> None:
    seg = phantom()
    sec = extract_section(seg, VERTEBRA_ID["L3"], VERTEBRA_ID["L2"], VERTEBRA_ID["L4"])
    intact, _ = section_heights(sec, sec.target_fine)
    broken, _ = section_heights(sec, render_fracture(sec, shape, 0.30))
    loss = rhlv(intact, broken)
    for s, v in expect.items():
        assert loss[s] == pytest.approx(v, abs=tol), (shape, s, loss)


def test_fracture_profile_and_bad_inputs() -> None:
    a = np.array([0.15, 0.5, 0.85])
    assert np.allclose(fracture_profile("crush", 0.4, a), 0.4)
    assert fracture_profile("wedge", 0.4, a)[2] == pytest.approx(0.4)
    assert fracture_profile("biconcave", 0.4, a)[1] == pytest.approx(0.4)
    seg = phantom()
    sec = extract_section(seg, VERTEBRA_ID["L3"], VERTEBRA_ID["L2"], VERTEBRA_ID["L4"])
    with pytest.raises(GradingError, match="shape"):
        render_fracture(sec, "burst", 0.3)
    with pytest.raises(GradingError, match="height loss"):
        render_fracture(sec, "crush", 0.95)


def test_genant_thresholds_and_rule() -> None:
    assert [genant_from_loss(x) for x in (0.0, 0.19, 0.20, 0.24, 0.25, 0.39, 0.40, 0.7)] == \
        [0, 0, 1, 1, 2, 2, 3, 3]
    assert rule_fractured({"anterior": 20.0, "middle": 25.0, "posterior": 25.0}) is False
    assert rule_fractured({"anterior": 19.0, "middle": 25.0, "posterior": 25.0}) is True
    assert rule_fractured({"anterior": 19.0}) is None
    assert rhlv({"anterior": 20.0, "middle": 0.0}, {"anterior": 15.0, "middle": 1.0}) == \
        {"anterior": 0.25}


def test_svm_fit_round_trip_and_schema(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    loss = rng.uniform(0, 0.6, 400)
    x = loss[:, None] * np.array([1.0, 0.8, 0.6]) + rng.normal(0, 0.01, (400, 3))
    y = np.array([genant_from_loss(v) for v in loss])
    svm = GenantSvm.fit(x, y, seed=0)
    assert svm.classes == (0, 1, 2, 3) and svm.scheme == "ovo" and svm.coef.shape == (6, 3)
    assert (svm.predict(x) == y).mean() > 0.9  # the middle grades are bands between pairs
    with pytest.raises(GradingError, match="do not fit"):
        GenantSvm(np.zeros((4, 3)), np.zeros(4), (0, 1, 2, 3), "ovo")
    path = tmp_path / "svm.json"
    import json

    path.write_text(json.dumps(svm.to_dict()))
    back = GenantSvm.load(path)
    assert np.array_equal(back.predict(x), svm.predict(x))
    with pytest.raises(GradingError, match="schema"):
        GenantSvm.from_dict({"schema": "nope"})
    with pytest.raises(GradingError, match="no SVM coefficients"):
        GenantSvm.load(tmp_path / "missing.json")
    assert (diagonal_svm().predict(np.array([[0.1] * 3, [0.22] * 3, [0.3] * 3, [0.5] * 3]))
            == [0, 1, 2, 3]).all()


def test_grade_vertebrae_on_a_crushed_phantom() -> None:
    seg = phantom(heights={"L3": BODY_H * 0.55})  # 45% loss: Genant 3
    res = grade_vertebrae(seg, painter=InterpolationPainter(), classifier=diagonal_svm())
    by = {(m.name, m.structure): m for m in res.measurements}
    assert by[("genant_grade", "L3")].value == 3
    # the neighbours are painted on the 1.09 mm crop grid: one crop pixel (~4% of 25 mm)
    assert by[("rhlv_middle", "L3")].value == pytest.approx(0.45, abs=0.05)
    assert by[("genant_grade", "L2")].value == 0
    assert by[("genant_grade", "L4")].value == 0
    for name in ("rhlv_anterior", "rhlv_middle", "rhlv_posterior", "genant_grade"):
        m = by[(name, "L1")]
        assert math.isnan(m.value) and "above" in m.extra["reason"]
        assert m.unit == "1" and len(m.extra["centroid_mm"]) == 3
    assert any("L5" in w for w in res.warnings)
    d = by[("rhlv_anterior", "L3")].to_dict()
    assert d["structure"] == "L3" and d["unit"] == "1"


def test_grade_vertebrae_in_3d_matches_the_slice() -> None:
    sl = column()
    vol = np.repeat(sl[:, :, None], 60, axis=2)  # 30 mm wide bodies
    vol[:, :, :10] = 0
    vol[:, :, 50:] = 0
    aff = slice_label_volume(sl, (PX, PX)).affine.copy()
    aff[:3, 2] = [PX, 0, 0]  # third axis left -> right
    seg = LabelVolume(vol, aff, {v: str(v) for v in np.unique(vol) if v}, schema="spine")
    cents = body_centroids(seg)
    assert list(cents) == [VERTEBRA_ID[n] for n in LEVELS]  # superior first
    res = grade_vertebrae(seg, painter=InterpolationPainter(), classifier=diagonal_svm())
    g = {m.structure: m.value for m in res.measurements if m.name == "genant_grade"}
    assert g["L2"] == g["L3"] == g["L4"] == 0


def test_grade_section_reports_unmeasurable_sections() -> None:
    seg = phantom()
    sec = extract_section(seg, VERTEBRA_ID["L3"], VERTEBRA_ID["L2"], VERTEBRA_ID["L4"])
    vg = grade_section(sec, lambda k, h: np.zeros_like(k), diagonal_svm())
    assert vg.grade is None and vg.reason and "pseudo-healthy" in vg.reason


# ---------------------------------------------------------------------------- real masks
def test_real_intact_lumbar_vertebrae_are_not_graded_as_fractures(shared_data: Path) -> None:
    from mskmri.anomaly.vertebra_inpaint import load_exam_map

    m = load_exam_map(shared_data, "myosegmentum", "exam11")  # held-out exam
    res = grade_vertebrae(m.seg, painter=InterpolationPainter(), classifier=diagonal_svm())
    graded = {k: v for k, v in res.vertebrae.items() if v.grade is not None}
    assert set(graded) == {"L2", "L3", "L4"}
    for vg in graded.values():
        # real lumbar bodies: heights 20-35 mm; the neighbours predict them within 25%
        assert all(20 < h < 36 for h in vg.observed_mm.values())
        assert all(abs(r) < 0.35 for r in vg.rhlv.values())
    sec = graded["L3"].section
    assert sec is not None
    broken = render_fracture(sec, "crush", 0.5)
    vg = grade_section(sec, InterpolationPainter(), diagonal_svm(), observed_mask=broken)
    assert vg.grade == 3 and vg.rule_fractured is False  # a crush keeps min/max near 1


def test_cli_grade_writes_the_measurement_document(tmp_path: Path) -> None:
    import json

    from mskmri.cli import main
    from mskmri.io import write

    seg = phantom(heights={"L3": BODY_H * 0.55})
    write(seg, tmp_path / "seg.nii.gz")
    out = tmp_path / "grades.json"
    assert main(["-q", "grade", str(tmp_path / "seg.nii.gz"), "--json", str(out),
                 "--painter", "interpolation"]) == 0
    doc = json.loads(out.read_text())
    grades = {m["structure"]: m for m in doc["measurements"] if m["name"] == "genant_grade"}
    assert set(grades) == {"L1", "L2", "L3", "L4", "L5"}
    assert grades["L3"]["value"] >= 2 and grades["L2"]["value"] == 0
    assert grades["L1"]["value"] is None and "above" in grades["L1"]["reason"]
    assert any("fitted on the network" in w for w in doc["warnings"])
