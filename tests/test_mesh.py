"""Surface meshes: world positions for any storage, outward normals, volumes, LPS files."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import random_orientation_affine

pytest.importorskip("trimesh")
import trimesh  # noqa: E402

from mskmri.labels import KNEE  # noqa: E402
from mskmri.report.mesh import (  # noqa: E402
    RAS_TO_LPS,
    MeshError,
    label_mesh,
    structure_meshes,
    write_meshes,
)
from mskmri.volume import LabelVolume  # noqa: E402

RADIUS = 10.0  # mm
SPACING = (0.6, 0.5, 0.8)
KNEE_ID_TIBIA = 2


def _sphere(affine_of, *, radius: float = RADIUS, spacing=SPACING) -> tuple[LabelVolume, np.ndarray]:
    """A ball of ``radius`` mm (label 1 = femur) and its world centre."""
    shape = [int(np.ceil((2 * radius + 6) / s)) for s in spacing]
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    c = [(n - 1) / 2 + 0.23 for n in shape]  # centre off the voxel grid
    r = np.sqrt(((i - c[0]) * spacing[0]) ** 2 + ((j - c[1]) * spacing[1]) ** 2
                + ((k - c[2]) * spacing[2]) ** 2)
    a = np.zeros(shape, np.uint8)
    a[r <= radius] = 1
    a[2:4, 2:4, 2:4] = KNEE_ID_TIBIA  # a small cube of another structure
    seg = LabelVolume(a, affine_of(spacing), dict(KNEE), schema="knee")
    return seg, seg.voxel_to_world([c])[0]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("smoothing", [0, 10])
def test_sphere_mesh_world_position_volume_and_normals(seed, smoothing):
    rng = np.random.default_rng(seed)
    seg, centre = _sphere(lambda sp: random_orientation_affine(rng, spacing=sp))
    mesh = label_mesh(seg, [1], name="femur", smoothing_iterations=smoothing)
    # vertices are world RAS+ mm around the world centre, at the sphere's radius
    r = np.linalg.norm(mesh.vertices - centre, axis=1)
    assert abs(r.mean() - RADIUS) < 0.3
    assert r.min() > RADIUS - 1.0 and r.max() < RADIUS + 1.0
    # volume: mesh ~ voxel count x voxel volume ~ 4/3 pi r^3 (within 2 %)
    voxel_ml = np.count_nonzero(seg.array == 1) * seg.voxel_volume_mm3 / 1000
    assert mesh.volume_ml == pytest.approx(voxel_ml, rel=0.02)
    assert mesh.volume_ml == pytest.approx(4 / 3 * math.pi * RADIUS**3 / 1000, rel=0.02)
    # outward normals, whatever the sign of the affine's determinant
    assert np.isfinite(mesh.vertices).all()
    assert np.unique(mesh.faces).size == len(mesh.vertices)  # no unreferenced vertex
    tm = mesh.to_trimesh()
    assert tm.is_watertight and tm.is_winding_consistent
    assert tm.volume > 0
    outward = np.einsum("ij,ij->i", tm.face_normals, tm.triangles_center - centre)
    assert np.mean(outward > 0) > 0.99


def test_both_determinant_signs_are_covered():
    dets = set()
    for seed in range(4):
        rng = np.random.default_rng(seed)
        dets.add(np.sign(np.linalg.det(random_orientation_affine(rng)[:3, :3])))
    assert dets == {-1.0, 1.0}


def test_same_surface_in_every_storage(rng):
    seg, centre = _sphere(lambda sp: random_orientation_affine(rng, spacing=sp))
    ref = label_mesh(seg, [1], name="femur", smoothing_iterations=0)
    for codes in ("LPI", "SAR", "RAS"):
        other = label_mesh(seg.reorient(codes), [1], name="femur", smoothing_iterations=0)
        assert other.volume_ml == pytest.approx(ref.volume_ml, rel=1e-9)
        assert np.allclose(np.sort(other.vertices, axis=0), np.sort(ref.vertices, axis=0))


def test_display_downsampling_keeps_a_closed_outward_surface(rng):
    seg, centre = _sphere(lambda sp: random_orientation_affine(rng, spacing=sp))
    full = label_mesh(seg, [1], name="femur", smoothing_iterations=0)
    coarse = label_mesh(seg, [1], name="femur", downsample=3, smoothing_iterations=0)
    assert len(coarse.faces) < len(full.faces) / 4
    assert coarse.volume_ml == pytest.approx(full.volume_ml, rel=0.06)
    assert coarse.to_trimesh().is_winding_consistent
    r = np.linalg.norm(coarse.vertices - centre, axis=1)
    assert abs(r.mean() - RADIUS) < 0.6


def test_structure_meshes_and_files_are_lps(tmp_path, rng):
    seg, centre = _sphere(lambda sp: random_orientation_affine(rng, spacing=sp))
    meshes = structure_meshes(seg, smoothing_iterations=0)
    assert [m.name for m in meshes] == ["femur", "tibia"]
    assert meshes[0].colour.startswith("#")
    files = write_meshes(meshes, tmp_path / "meshes")
    assert sorted(p.name for p in files) == ["femur.ply", "femur.stl", "tibia.ply", "tibia.stl"]
    assert sorted(p.name for p in (tmp_path / "meshes").iterdir()) == sorted(p.name for p in files)
    stl = (tmp_path / "meshes" / "femur.stl").read_bytes()
    assert stl[:9] == b"SPACE=LPS"
    ply = (tmp_path / "meshes" / "femur.ply").read_bytes()
    assert b"comment SPACE=LPS\n" in ply.split(b"end_header")[0]
    for name in ("femur.stl", "femur.ply"):
        back = trimesh.load(tmp_path / "meshes" / name, force="mesh")
        # the file holds LPS = (-x, -y, z) of the RAS+ vertices
        lps_centre = RAS_TO_LPS @ centre
        assert np.allclose(back.vertices.mean(axis=0), lps_centre, atol=0.3)
        assert back.volume / 1000 == pytest.approx(meshes[0].volume_ml, rel=1e-4)


def test_empty_structure_and_bad_format(tmp_path, rng):
    seg, _ = _sphere(lambda sp: random_orientation_affine(rng, spacing=sp))
    with pytest.raises(MeshError, match="no voxel"):
        label_mesh(seg, [9], name="medial_meniscus")
    with pytest.raises(MeshError, match="unknown mesh format"):
        write_meshes(structure_meshes(seg, structures=["tibia"]), tmp_path, formats=["obj"])


# --------------------------------------------------------------------------- 3-D views
def test_knee_side_and_views(rng):
    from mskmri.report.views import knee_side, knee_views, render_knee_views

    a = np.zeros((40, 30, 50), np.uint8)
    a[10:20, 10:20, 30:48] = 1  # femur
    a[10:20, 10:20, 5:28] = 2  # tibia
    a[24:28, 12:16, 5:20] = 4  # fibula at higher x = patient's right in a RAS grid
    seg = LabelVolume(a, np.diag([1.0, 1.0, 1.0, 1.0]), dict(KNEE), schema="knee")
    assert knee_side(seg) == "right"
    assert knee_side(seg.reorient("LPI")) == "right"  # storage does not matter
    mirrored = LabelVolume(a, np.diag([-1.0, 1.0, 1.0, 1.0]), dict(KNEE), schema="knee")
    assert knee_side(mirrored) == "left"
    assert [v.name for v in knee_views(None)] == ["anterior", "right", "left"]
    # without a fibula the tibial plates tell: lateral plate at lower x = a left knee
    b = a.copy()
    b[b == 4] = 0
    b[10:14, 10:20, 28] = 7  # lateral tibial cartilage
    b[16:20, 10:20, 28] = 6  # medial tibial cartilage
    assert knee_side(LabelVolume(b, seg.affine, dict(KNEE), schema="knee")) == "left"
    b[b == 7] = 0
    assert knee_side(LabelVolume(b, seg.affine, dict(KNEE), schema="knee")) is None
    per_view, combined, views = render_knee_views(seg)
    assert [v.name for v in views] == ["anterior", "lateral", "medial"]
    assert set(per_view) == {"anterior", "lateral", "medial"}
    from io import BytesIO

    from matplotlib.image import imread

    # from the lateral side (camera on the right looking left) the fibula hides part of the
    # tibia: its purple is on screen, and the femur's colour too
    from mskmri.report.colours import hex_to_rgb

    def share(png: bytes, colour: str) -> float:
        img = imread(BytesIO(png))
        rgb = np.asarray(hex_to_rgb(colour))
        lit = img[..., :3] / np.maximum(img[..., :3].max(axis=-1, keepdims=True), 1e-6)
        ref = rgb / rgb.max()
        return float(np.mean(np.all(np.abs(lit - ref) < 0.08, axis=-1)))

    assert share(per_view["lateral"], "#8e7cc3") > 0.01  # fibula seen from the lateral side
    assert share(per_view["medial"], "#8e7cc3") < 0.002  # and hidden behind the tibia from the medial side
    assert combined[:8] == b"\x89PNG\r\n\x1a\n"


def test_measure_cli_writes_meshes(tmp_path, rng):
    import json

    from mskmri.cli import main
    from mskmri.io import write

    seg, centre = _sphere(lambda sp: random_orientation_affine(rng, spacing=sp))
    write(seg, tmp_path / "seg.nii.gz")
    out = tmp_path / "surf"
    assert main(["-q", "measure", "knee", str(tmp_path / "seg.nii.gz"), "--json",
                 str(tmp_path / "m.json"), "--meshes", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"femur.stl", "femur.ply", "tibia.stl", "surfaces.json", "views"} <= names
    doc = json.loads((out / "surfaces.json").read_text())
    assert doc["schema"] == "mskmri/surfaces/1" and doc["space"] == "LPS"
    femur = next(m for m in doc["meshes"] if m["structure"] == "femur")
    assert femur["volume_ml"] == pytest.approx(4 / 3 * math.pi * RADIUS**3 / 1000, rel=0.02)
    # a folder that is not ours is never replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    assert main(["-q", "measure", "knee", str(tmp_path / "seg.nii.gz"), "--json",
                 str(tmp_path / "m2.json"), "--meshes", str(tmp_path / "other")]) == 2
    assert not (tmp_path / "m2.json").exists()
