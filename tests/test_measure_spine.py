"""Spine measurements: synthetic phantoms with hand-computed answers first, real masks second.

Phantoms are rasterised analytically at voxel centres of an arbitrary grid, so the same body
can be stored in any orientation and spacing; the measurements must not change.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from mskmri.errors import DimensionError, GeometryError, LabelError, MskMriError
from mskmri.labels import U2AD
from mskmri.measure.spine import (
    T2MI_THRESHOLD,
    analyse_spine,
    cobb_angle,
    cord_area_profile,
    measure_spine,
    measure_spine_files,
    measurements_by_key,
    slice_image_volume,
    slice_label_volume,
    split_vertebral_bodies,
)
from mskmri.volume import LabelVolume, Volume

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- phantoms
def rot_x(deg: float) -> np.ndarray:
    """Rotation about the patient's R axis; +deg raises the anterior direction."""
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def rot_y(deg: float) -> np.ndarray:
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rot_z(deg: float) -> np.ndarray:
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def body_inside(local: np.ndarray, depth: float, h_post: float, h_ant: float, width: float
                ) -> np.ndarray:
    """A symmetric wedge in its frame (columns l, a, s): posterior height ``h_post`` at
    a = -depth/2, anterior height ``h_ant`` at a = +depth/2, width along l."""
    lat, a, s = local[..., 0], local[..., 1], local[..., 2]
    top = 0.5 * (h_post + (a + depth / 2) / depth * (h_ant - h_post))
    return (np.abs(lat) <= width / 2) & (np.abs(a) <= depth / 2) & (np.abs(s) <= top)


def grid_affine(lo: np.ndarray, hi: np.ndarray, spacing, rng: np.random.Generator | None
                ) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of a grid covering [lo, hi] (world mm), randomly permuted/flipped
    when ``rng`` is given."""
    perm = rng.permutation(3) if rng is not None else np.arange(3)
    signs = rng.choice([-1.0, 1.0], size=3) if rng is not None else np.ones(3)
    aff = np.eye(4)
    aff[:3, :3] = 0
    shape = [0, 0, 0]
    for col, (row, sg) in enumerate(zip(perm, signs, strict=True)):
        aff[row, col] = sg * spacing[col]
        shape[col] = int(np.ceil((hi[row] - lo[row]) / spacing[col])) + 1
        aff[row, 3] = lo[row] if sg > 0 else hi[row]
    return (shape[0], shape[1], shape[2]), aff


def grid(lo: np.ndarray, hi: np.ndarray, spacing, rng: np.random.Generator | None
         ) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray]:
    """:func:`grid_affine` and the world coordinates (N, 3) of all voxel centres."""
    shape, aff = grid_affine(lo, hi, spacing, rng)
    idx = np.indices(shape).reshape(3, -1).T.astype(float)
    return shape, aff, idx @ aff[:3, :3].T + aff[:3, 3]


def rasterize(bodies, spacing=(1.0, 1.0, 1.0), rng=None, margin=6.0) -> LabelVolume:
    """bodies: (value, centre (3,), rotation (3, 3) with columns lr/ap/si, depth, h_post,
    h_ant, width); each is evaluated at the voxel centres of its own bounding box only."""
    radii = [0.5 * math.sqrt(d**2 + max(hp, ha) ** 2 + w**2) for _, _, _, d, hp, ha, w in bodies]
    pts = [p for (_, c, *_), r in zip(bodies, radii, strict=True) for p in (c - r, c + r)]
    shape, aff = grid_affine(np.min(pts, axis=0) - margin, np.max(pts, axis=0) + margin,
                             spacing, rng)
    inv = np.linalg.inv(aff)
    arr = np.zeros(shape, np.int32)
    for (v, c, rot, d, hp, ha, w), r in zip(bodies, radii, strict=True):
        corners = np.array([[c[0] + sx * r, c[1] + sy * r, c[2] + sz * r]
                            for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
        ic = corners @ inv[:3, :3].T + inv[:3, 3]
        lo_i = np.maximum(np.floor(ic.min(axis=0)).astype(int), 0)
        hi_i = np.minimum(np.ceil(ic.max(axis=0)).astype(int) + 1, shape)
        sub = np.indices(hi_i - lo_i).reshape(3, -1).T + lo_i
        world = sub @ aff[:3, :3].T + aff[:3, 3]
        inside = body_inside((world - c) @ rot, d, hp, ha, w)
        arr[tuple(sub[inside].T)] = v
    return LabelVolume(arr, aff, {}, schema="spine")


#: Lordotic lumbar phantom: sagittal tilts (deg, + = anterior end up) of L1..L5, boxes
#: 32 mm deep, 27 mm tall, 44 mm wide, 34 mm apart.
LUMBAR_TILTS = (12.0, 6.0, 0.0, -6.0, -12.0)


def lumbar_bodies(g: np.ndarray | None = None, shift: np.ndarray | None = None):
    g = np.eye(3) if g is None else g
    shift = np.zeros(3) if shift is None else shift
    ys = (-6.0, -1.5, 0.0, -1.5, -6.0)
    return [(20 + i, g @ np.array([0.0, y, -34.0 * i]) + shift, g @ rot_x(phi), 32.0, 27.0, 27.0,
             44.0) for i, (phi, y) in enumerate(zip(LUMBAR_TILTS, ys, strict=True))]


def values(res) -> dict[str, float]:
    return {m.key: m.value for m in res.measurements}


# ----------------------------------------------------------------------------- one body
def test_wedge_body_heights_ratios_and_endplates():
    # posterior 28 mm, anterior 24 mm over a 32 mm depth: height(f) = 28 - 4 f
    seg = rasterize([(22, np.array([3.0, -2.0, 5.0]), np.eye(3), 32.0, 28.0, 24.0, 44.0)],
                    spacing=(0.5, 0.5, 0.5))
    res = analyse_spine(seg)
    v = values(res)
    assert v["anterior_height.L3"] == pytest.approx(28 - 4 * 0.85, abs=0.3)
    assert v["middle_height.L3"] == pytest.approx(26.0, abs=0.3)
    assert v["posterior_height.L3"] == pytest.approx(28 - 4 * 0.15, abs=0.3)
    assert v["wedge_ratio.L3"] == pytest.approx(24.6 / 27.4, abs=0.015)
    assert v["min_max_height_ratio.L3"] == pytest.approx(24.6 / 27.4, abs=0.015)
    slope = math.degrees(math.atan(2.0 / 32.0))
    assert v["superior_endplate_angle.L3"] == pytest.approx(-slope, abs=0.5)
    assert v["inferior_endplate_angle.L3"] == pytest.approx(slope, abs=0.5)
    assert v["wedge_angle.L3"] == pytest.approx(-2 * slope, abs=0.8)
    m = measurements_by_key(res.measurements)["middle_height.L3"]
    assert m.unit == "mm" and m.structure == "L3"
    np.testing.assert_allclose(m.extra["centroid_mm"], [3.0, -2.0, 5.0], atol=0.3)
    assert res.vertebrae["L3"].frame.axis_source == "bisector of the endplate lines"


def test_measure_spine_list_and_no_cord_warning():
    seg = rasterize([(22, np.zeros(3), np.eye(3), 32.0, 27.0, 27.0, 44.0)])
    ms = measure_spine(seg)
    assert {m.name for m in ms} >= {"anterior_height", "middle_height", "posterior_height"}
    res = analyse_spine(seg)
    assert any("no spinal cord" in w for w in res.warnings)
    assert any("cobb_angle L1-L5 not measured" in w for w in res.warnings)
    assert not any(m.name == "cobb_angle" for m in res.measurements)


# ----------------------------------------------------------------------------- a lumbar spine
@pytest.mark.parametrize(
    ("rotation", "spacing", "seed"),
    [
        (np.eye(3), (1.0, 1.0, 1.0), None),
        (rot_z(15) @ rot_y(10) @ rot_x(8), (0.7, 0.8, 0.9), 1),
        (rot_z(-20) @ rot_y(-12) @ rot_x(-5), (1.0, 0.6, 1.2), 2),
    ],
)
def test_lumbar_phantom_cobb_and_heights_survive_rotation_and_storage(rotation, spacing, seed):
    rng = np.random.default_rng(seed) if seed is not None else None
    seg = rasterize(lumbar_bodies(rotation, shift=np.array([10.0, -40.0, 300.0])), spacing, rng)
    res = analyse_spine(seg)
    v = values(res)
    # Cobb L1-L5 = tilt(L1) - tilt(L5) for parallel-sided boxes; rotating the whole spine in
    # 3-D or storing it in another orientation must not change it
    assert v["cobb_angle.L1-L5"] == pytest.approx(LUMBAR_TILTS[0] - LUMBAR_TILTS[-1], abs=1.0)
    tol = 0.75 * max(spacing)  # a tilted face is a staircase of voxels
    for name in ("L1", "L2", "L3", "L4", "L5"):
        for h in ("anterior", "middle", "posterior"):
            assert v[f"{h}_height.{name}"] == pytest.approx(27.0, abs=tol), (name, h)
        assert v[f"wedge_angle.{name}"] == pytest.approx(0.0, abs=2.0)
    # neighbouring boxes differ by 6 deg of tilt: the disc angle between them
    for disc in ("L1-L2", "L2-L3", "L3-L4", "L4-L5"):
        assert v[f"disc_angle.{disc}"] == pytest.approx(6.0, abs=1.5)
    assert "cobb_angle" in {m.name for m in res.measurements}
    cobb = measurements_by_key(res.measurements)["cobb_angle.L1-L5"]
    assert cobb.unit == "deg" and "lordosis" in cobb.extra["convention"]


def test_cobb_sign_is_negative_for_kyphosis():
    bodies = [(20 + i, np.array([0.0, 0.0, -34.0 * i]), rot_x(-t), 32.0, 27.0, 27.0, 44.0)
              for i, t in enumerate(LUMBAR_TILTS)]
    v = values(analyse_spine(rasterize(bodies)))
    assert v["cobb_angle.L1-L5"] == pytest.approx(-24.0, abs=1.0)


def test_cobb_angle_function_any_pair_and_missing_endplate():
    res = analyse_spine(rasterize(lumbar_bodies()))
    l2, l4 = res.vertebrae["L2"], res.vertebrae["L4"]
    assert cobb_angle(l2, l4) == pytest.approx(6.0 - (-6.0), abs=1.0)
    assert cobb_angle(l2, l4, upper_endplate="inferior", lower_endplate="superior") == (
        pytest.approx(12.0, abs=1.0))
    with pytest.raises(ValueError, match="superior"):
        cobb_angle(l2, l4, upper_endplate="top")
    l2.superior = None
    assert math.isnan(cobb_angle(l2, l4))


# ----------------------------------------------------------------------------- discs
def test_disc_heights_from_gap_and_from_disc_mask():
    # two parallel boxes 27 mm tall, centres 35 mm apart -> an 8 mm gap everywhere
    bodies = [(20, np.array([0.0, 0.0, 0.0]), rot_x(5), 32.0, 27.0, 27.0, 24.0),
              (21, rot_x(5) @ np.array([0.0, 0.0, -35.0]), rot_x(5), 32.0, 27.0, 27.0, 24.0)]
    seg = rasterize(bodies, spacing=(0.5, 0.5, 0.5))
    v = values(analyse_spine(seg))
    for h in ("anterior", "middle", "posterior"):
        assert v[f"disc_{h}_height.L1-L2"] == pytest.approx(8.0, abs=0.3)
    assert v["disc_angle.L1-L2"] == pytest.approx(0.0, abs=1.0)
    # now a disc mask (value 120 = disc below L1) 6 mm tall inside the gap
    disc = (120, rot_x(5) @ np.array([0.0, 0.0, -17.5]), rot_x(5), 30.0, 6.0, 6.0, 22.0)
    seg2 = rasterize([*bodies, disc], spacing=(0.5, 0.5, 0.5))
    res2 = analyse_spine(seg2)
    m = measurements_by_key(res2.measurements)["disc_middle_height.L1-L2"]
    assert m.value == pytest.approx(6.0, abs=0.3)
    assert m.extra["source"] == "disc mask"


# ----------------------------------------------------------------------------- bad input
def test_body_cut_by_the_field_of_view_is_not_guessed():
    seg = rasterize([(22, np.zeros(3), np.eye(3), 32.0, 27.0, 27.0, 44.0)])
    k = int(np.argmax(np.abs(seg.direction.T @ [0, 0, 1])))
    cut = [slice(None)] * 3
    cut[k] = slice(0, seg.shape[k] // 2)  # keep the inferior half (axis runs R, A, S)
    res = analyse_spine(seg.crop(cut))
    v = values(res)
    assert "middle_height.L3" not in v and "superior_endplate_angle.L3" not in v
    assert "inferior_endplate_angle.L3" in v
    assert any("L3: middle height not measured" in w for w in res.warnings)


def test_ordinal_cobb_skips_bodies_cut_by_the_field_of_view():
    # ordinal ids (levels unknown); the top body is cut by the upper edge of the image
    bodies = [(1000 + i, c, rot, d, hp, ha, w)
              for i, (_, c, rot, d, hp, ha, w) in enumerate(lumbar_bodies())]
    seg = rasterize(bodies)
    k = int(np.argmax(np.abs(seg.direction.T @ [0, 0, 1])))
    top_world_s = bodies[0][1][2]  # the centre of the top body
    ijk = seg.world_to_voxel([[0.0, 0.0, top_world_s]])[0]
    cut = [slice(None)] * 3
    cut[k] = slice(0, int(round(ijk[k])) + 1) if seg.direction[2, k] > 0 else slice(
        int(round(ijk[k])), None)
    res = analyse_spine(seg.crop(cut))
    v = values(res)
    # V1000 keeps only its inferior half: the angle runs from V1001's superior endplate to
    # V1004's inferior endplate (tilts 6 and -12 deg)
    assert v["cobb_angle.V1001-V1004"] == pytest.approx(6.0 - (-12.0), abs=1.0)
    assert any("cut by the field of view" in w for w in res.warnings)


def test_axial_only_data_is_refused_for_sagittal_measurements():
    seg = rasterize(lumbar_bodies(), spacing=(0.8, 0.8, 5.0))
    res = analyse_spine(seg)
    assert not any("height" in m.name for m in res.measurements)
    assert any("axial-only" in w for w in res.warnings)


def test_implausible_body_size_for_its_level_is_flagged():
    # a lumbar-sized body labelled C3 (a source map given without its table)
    res = analyse_spine(rasterize([(3, np.zeros(3), np.eye(3), 32.0, 27.0, 27.0, 44.0)]))
    assert any("C3: AP depth 32" in w and "spine ids" in w for w in res.warnings)
    res = analyse_spine(rasterize([(22, np.zeros(3), np.eye(3), 32.0, 27.0, 27.0, 44.0)]))
    assert not any("AP depth" in w for w in res.warnings)


def test_no_geometry_no_measurement():
    seg = rasterize([(22, np.zeros(3), np.eye(3), 32.0, 27.0, 27.0, 44.0)])
    seg.geometry_known = False
    with pytest.raises(GeometryError, match="no voxel spacing"):
        analyse_spine(seg)


def test_unknown_label_values_are_refused():
    seg = rasterize([(77, np.zeros(3), np.eye(3), 32.0, 27.0, 27.0, 44.0)])
    with pytest.raises(LabelError, match="77"):
        analyse_spine(seg)


def test_image_on_another_grid_is_refused():
    seg = rasterize([(22, np.zeros(3), np.eye(3), 32.0, 27.0, 27.0, 44.0)])
    other = seg.crop([slice(1, None)] * 3)
    with pytest.raises(GeometryError, match="not in the geometry"):
        analyse_spine(seg, image=other)


def test_slice_volume_needs_explicit_geometry():
    with pytest.raises(GeometryError, match="spacing"):
        slice_label_volume(np.zeros((4, 4), int), (1.0,))
    with pytest.raises(GeometryError, match="axis code"):
        slice_label_volume(np.zeros((4, 4), int), (1.0, 1.0), row_axis="X")
    with pytest.raises(GeometryError, match="parallel"):
        slice_label_volume(np.zeros((4, 4), int), (1.0, 1.0), row_axis="I", col_axis="S")
    with pytest.raises(DimensionError):
        slice_label_volume(np.zeros((4, 4, 4), int), (1.0, 1.0))
    vol = slice_label_volume(np.zeros((4, 5), int), (0.5, 0.8))
    assert vol.shape == (4, 5, 1) and vol.spacing[:2] == (0.5, 0.8)
    assert vol.orientation[:2] == ("I", "P") and vol.meta["slice_thickness_known"] is False


# ----------------------------------------------------------------------------- cervical slice
PIX = 0.5  # mm
#: C2..C7 sagittal tilts (deg, + = anterior end up); expected C2-C7 Cobb = 10 - (-10) = 20.
CERVICAL_TILTS = {2: 10.0, 3: 6.0, 4: 2.0, 5: -2.0, 6: -6.0, 7: -10.0}
CERVICAL_Z = {2: -20.0, 3: -47.0, 4: -66.0, 5: -85.0, 6: -104.0, 7: -123.0}


def cervical_slice(*, protrusion: bool = False, hot: bool = False):
    """A 2-D sagittal phantom (rows I, columns P, 0.5 mm): bodies C2 (30 mm tall) to C7
    (14 mm), 16 mm deep with anterior edge at y = +8; canal y in [-26, -10] (CSF), cord
    y in [-22, -14] (8 mm), narrowed to 5 mm for z in [-78, -73] (the C4-C5 disc level)."""
    h, w = 300, 140
    r, c = np.indices((h, w)).astype(float)
    # pixel centres half a pixel inside the phantom's coordinates, so that boundaries on
    # whole millimetres fall on pixel faces
    z = -(r + 0.5) * PIX  # row axis I
    y = 30.0 - (c + 0.5) * PIX  # column axis P
    arr = np.zeros((h, w), np.int32)
    for lv, zc in CERVICAL_Z.items():
        t = math.radians(CERVICAL_TILTS[lv])
        a = (y - 0.0) * math.cos(t) + (z - zc) * math.sin(t)
        s = -(y - 0.0) * math.sin(t) + (z - zc) * math.cos(t)
        height = 30.0 if lv == 2 else 14.0
        arr[(np.abs(a) <= 8.0) & (np.abs(s) <= height / 2)] = lv
    canal = (y >= -26) & (y <= -10) & (z <= -2) & (z >= -140)
    arr[canal] = 202
    narrow = (z <= -73) & (z >= -78)
    cord = canal & np.where(narrow, (y >= -20.5) & (y <= -15.5), (y >= -22) & (y <= -14))
    arr[cord] = 201
    if protrusion:  # a disc bulge at C5-C6 reaching 2 mm behind the K-line (y = -18)
        arr[(z <= -93) & (z >= -96) & (y <= -8) & (y >= -20)] = 105
    image = np.where(arr == 201, 100.0, np.where(arr == 202, 300.0, 50.0))
    if hot:  # a 2 x 2 mm bright spot in the cord at the C4 level
        image[(z <= -64) & (z >= -66) & (y <= -17) & (y >= -19)] = 150.0
    seg = slice_label_volume(arr, (PIX, PIX), row_axis="I", col_axis="P")
    return seg, slice_image_volume(image, (PIX, PIX), row_axis="I", col_axis="P")


def test_cervical_slice_cobb_mscc_k_line():
    seg, _ = cervical_slice()
    res = analyse_spine(seg)
    v = values(res)
    assert v["cobb_angle.C2-C7"] == pytest.approx(20.0, abs=1.0)
    # vertical cord 8 mm wide, crossed along each body's tilted AP axis
    for lv in (3, 4, 5, 6):
        tilt = math.radians(CERVICAL_TILTS[lv])
        assert v[f"cord_ap_diameter.C{lv}"] == pytest.approx(8.0 / math.cos(tilt), abs=0.25)
    assert v["cord_ap_diameter.C4-C5"] == pytest.approx(5.0, abs=0.25)
    assert v["mscc.C4-C5"] == pytest.approx((1 - 5.0 / 8.0) * 100, abs=3.0)
    assert v["mscc.C3-C4"] == pytest.approx(0.0, abs=3.0)
    # K-line: canal midpoints at y = -18; posterior-most body corner at
    # y = -(8 cos 6 + 7 sin 6) = -8.69 mm (C3, C6) -> margin 9.3 mm
    assert v["k_line.C2-C7"] == 1.0
    assert v["k_line_margin.C2-C7"] == pytest.approx(18.0 - 8.69, abs=0.5)
    seg_bad, _ = cervical_slice(protrusion=True)
    v_bad = values(analyse_spine(seg_bad))
    assert v_bad["k_line.C2-C7"] == -1.0
    assert v_bad["k_line_margin.C2-C7"] == pytest.approx(-2.0, abs=0.5)


def test_cervical_3d_reports_3d_and_mid_sagittal_2d():
    seg2d, image2d = cervical_slice(hot=True)
    n = 11  # extrude the slice over 11 x 1 mm to the left and right
    aff = seg2d.affine.copy()
    aff[:3, 2] = [1.0, 0.0, 0.0]
    aff[0, 3] = -5.0
    seg = LabelVolume(np.repeat(seg2d.array, n, axis=2), aff, {}, schema="spine")
    image = Volume(np.repeat(image2d.array, n, axis=2), aff)
    res = analyse_spine(seg, image=image)
    by_key = measurements_by_key(res.measurements)
    for region in (None, "mid-sagittal 2-D"):
        key = "" if region is None else f".{region}"
        assert by_key[f"cobb_angle.C2-C7{key}"].value == pytest.approx(20.0, abs=1.0)
        assert by_key[f"mscc.C4-C5{key}"].value == pytest.approx(37.5, abs=3.0)
        assert by_key[f"k_line.C2-C7{key}"].value == 1.0
        assert by_key[f"cord_t2_hyperintense.C4{key}"].value == 1.0
    assert by_key["mscc.C4-C5.mid-sagittal 2-D"].extra["slice_index"] == 5
    assert "cobb_angle.L1-L5.mid-sagittal 2-D" not in by_key
    assert res.mid_sagittal is not None and "C4" in res.mid_sagittal.vertebrae
    # the 3-D cord is a slab 11 mm wide: its area per level is 8 mm x 11 mm
    assert by_key["cord_area.C3"].value == pytest.approx(88.0, rel=0.05)


def test_cervical_slice_t2_mi_and_rsci():
    seg, image = cervical_slice(hot=True)
    res = analyse_spine(seg, image=image)
    v = values(res)
    for lv in (2, 3, 5, 6, 7):
        assert v[f"cord_t2_mi.C{lv}"] == pytest.approx(0.0, abs=1e-9)
    # (150 - 100) * 100 / mean, mean a little above 100 (16 hot pixels in ~600)
    assert 45.0 < v["cord_t2_mi.C4"] < 50.0
    assert v["rsci.C4"] == pytest.approx(3.0)
    assert v["cord_t2_mi.C4"] >= T2MI_THRESHOLD
    assert v["cord_t2_hyperintense.C4"] == 1.0
    assert v["cord_t2_hyperintense.C3"] == 0.0
    assert "rsci.C2" not in v and any("C2: RSCI needs" in w for w in res.warnings)
    m = measurements_by_key(res.measurements)["cord_t2_hyperintense.C4"]
    assert m.extra["hyperintense_with_code_threshold"] is True


def test_split_vertebral_bodies_assigns_levels_from_the_top():
    seg, _ = cervical_slice()
    arr = seg.array.copy()
    bodies = np.isin(arr, list(range(2, 8)))
    flat = np.where(bodies, 1000, np.where(arr >= 200, arr, 0))
    # discs between consecutive bodies, as one class
    single = slice_label_volume(flat[:, :, 0], (PIX, PIX))
    out, warnings = split_vertebral_bodies(single, body_value=1000, first_level="C2")
    assert warnings == []
    np.testing.assert_array_equal(out.array[bodies], arr[bodies])
    assert set(out.present_values()) == {2, 3, 4, 5, 6, 7, 201, 202}
    # a disc above the top body: the top body is not C2 -> ordinal ids and a warning
    disc_above = flat.copy()
    disc_above[(np.indices(flat.shape[:2])[0] * PIX < 4) & bodies[:, :, 0].any(axis=0)[None, :]
               ] = 1100
    vol = slice_label_volume(disc_above[:, :, 0], (PIX, PIX))
    out2, w2 = split_vertebral_bodies(vol, body_value=1000, disc_value=1100, first_level="C2")
    assert any("not taken as C2" in w for w in w2)
    assert {v for v in out2.present_values() if 1000 <= v < 1100} == set(range(1000, 1006))
    res = analyse_spine(out2)
    assert any(m.structure == "V1000-V1005" and m.name == "cobb_angle" for m in res.measurements)
    # the top body cut by the image edge is not taken as C2 either
    cut = flat[8:, :, 0]
    out3, w3 = split_vertebral_bodies(slice_label_volume(cut, (PIX, PIX)), body_value=1000,
                                      first_level="C2")
    assert any("touches the edge" in w for w in w3) and 2 not in out3.present_values()


# ----------------------------------------------------------------------------- cord area
def test_cord_area_of_a_tilted_cylinder():
    radius = 4.0
    axis = rot_x(20) @ np.array([0.0, 0.0, 1.0])
    lo, hi = np.array([-10.0, -20.0, -30.0]), np.array([10.0, 20.0, 30.0])
    shape, aff, world = grid(lo, hi, (0.5, 0.5, 0.5), None)
    d = world - (world @ axis)[:, None] * axis
    inside = np.linalg.norm(d, axis=1) <= radius  # runs through the whole field of view
    seg = LabelVolume(np.where(inside, 201, 0).reshape(shape).astype(np.int32), aff, {},
                      schema="spine")
    v = values(analyse_spine(seg))
    assert v["cord_area.spinal_cord"] == pytest.approx(math.pi * radius**2, rel=0.05)
    slices, cents, areas = cord_area_profile(seg)
    assert slices.size == areas.size == cents.shape[0] > 10
    with pytest.raises(GeometryError, match="single slice"):
        cord_area_profile(slice_label_volume(np.full((5, 5), 201), (1.0, 1.0)))


# ----------------------------------------------------------------------------- files and CLI
def test_measure_spine_files_document_and_cli(tmp_path):
    from mskmri.cli import main
    from mskmri.io import write

    seg = rasterize(lumbar_bodies(), rng=np.random.default_rng(3))
    path = tmp_path / "seg.nii.gz"
    write(seg, path)
    doc = measure_spine_files(path)
    assert doc["schema"] == "mskmri/measurements/1" and doc["input"]["anatomy"] == "spine"
    entry = next(m for m in doc["measurements"]
                 if m["name"] == "middle_height" and m["structure"] == "L3")
    assert entry["unit"] == "mm" and len(entry["extra"]["centroid_mm"]) == 3
    json.dumps(doc)  # JSON-ready
    with pytest.raises(MskMriError, match="knee input"):
        measure_spine_files(path, lesions_path=path)
    out = tmp_path / "m.json"
    assert main(["measure", "spine", str(path), "--json", str(out)]) == 0
    cli_doc = json.loads(out.read_text())
    cobb = next(m for m in cli_doc["measurements"] if m["name"] == "cobb_angle")
    assert cobb["structure"] == "L1-L5" and cobb["value"] == pytest.approx(24.0, abs=1.0)


# ----------------------------------------------------------------------------- real data
def _reference():
    spec = importlib.util.spec_from_file_location(
        "_spine_reference", REPO / "benchmarks" / "_spine_reference.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.shared_data
def test_myosegmentum_manual_masks_match_the_reference(shared_data):
    from mskmri.io import read
    from mskmri.labels import SOURCES

    ref_mod = _reference()
    diffs, cobb_diffs = [], []
    for exam in ("exam01", "exam11"):
        vol = read(shared_data / "spine" / "myosegmentum_vertebral_bodies" / f"{exam}_gt.nii.gz")
        seg = LabelVolume(SOURCES["myosegmentum"].apply(vol.array), vol.affine, {},
                          schema="spine")
        res = analyse_spine(seg)
        assert list(res.vertebrae) == ["L1", "L2", "L3", "L4", "L5"]
        ref = ref_mod.reference_bodies(seg, [20, 21, 22, 23, 24])
        for g in res.vertebrae.values():
            for h in ("anterior", "middle", "posterior"):
                assert 15.0 < g.heights[h] < 40.0
                diffs.append(abs(g.heights[h] - ref[g.value].heights[h]))
        cobb = values(res)["cobb_angle.L1-L5"]
        assert 10.0 < cobb < 80.0  # lordotic
        cobb_diffs.append(abs(cobb - ref_mod.reference_cobb(ref[20], ref[24])))
    assert float(np.median(diffs)) <= 1.0
    assert max(cobb_diffs) <= 2.0


@pytest.mark.shared_data
def test_u2ad_clinical_slice_c2_c7_and_mscc(shared_data):
    npz = np.load(shared_data / "spine" / "u2ad_cervical_slices" / "u2ad_samples.npz")
    labels = npz["private_1_labels"]
    # in this file the body class is 2 and the disc class 1 (labels.U2AD follows the arrays)
    assert np.median(np.ptp(np.argwhere(labels == 2)[:, 0])) > 0
    arr = U2AD.apply(labels).astype(np.int32)
    arr[arr == 203] = 0  # the hyperintensity is a separate question here
    seg, _ = split_vertebral_bodies(slice_label_volume(arr, (1.0, 1.0)), body_value=1000,
                                    disc_value=1100, first_level="C2")
    image = slice_image_volume(npz["private_1_img"], (1.0, 1.0))
    res = analyse_spine(seg, image=image)
    assert list(res.vertebrae)[:6] == ["C2", "C3", "C4", "C5", "C6", "C7"]
    v = values(res)
    ref_mod = _reference()
    ref = ref_mod.reference_bodies(seg, [2, 7])
    assert abs(v["cobb_angle.C2-C7"] - ref_mod.reference_cobb(ref[2], ref[7], "inferior",
                                                               "inferior")) <= 2.0
    assert {f"mscc.C{i}-C{i + 1}" for i in range(2, 7)} <= set(v)
    assert all(3.0 < v[f"cord_ap_diameter.C{i}"] < 12.0 for i in range(2, 8))
    assert v["k_line.C2-C7"] in (1.0, -1.0)


def test_committed_benchmark_meets_the_targets():
    path = REPO / "benchmarks" / "results" / "spine_measurements.json"
    doc = json.loads(path.read_text())
    for source in ("myosegmentum", "chu2015"):
        s = doc[source]["summary"]
        assert s["height_abs_diff_mm"]["median"] <= 1.0
        assert s["cobb_L1_L5_abs_diff_deg"]["max"] <= 2.0
        assert s["target_median_height_diff_met"] and s["target_cobb_diff_met"]
    assert doc["myosegmentum"]["summary"]["exams"] == 14 and doc["chu2015"]["summary"]["exams"] == 7
