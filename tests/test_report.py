"""Report figures and HTML: display orientation, colours, escaping, embedded figures, units."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from conftest import random_orientation_affine

from mskmri.errors import GeometryError
from mskmri.labels import KNEE
from mskmri.report import ReportFigure, ReportSection, ReportTable, overlay_figure, render_report
from mskmri.report.colours import KNEE_COLOURS, LESION_COLOURS, colour_table, label_colour
from mskmri.report.figures import display_slices, label_centroid_world, write_png
from mskmri.report.html import format_value, write_report
from mskmri.volume import LabelVolume, Volume

SHAPE = (20, 30, 24)


# --------------------------------------------------------------------------- fixtures
def _world_grid(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """(I, J, K, 3) world coordinates (RAS+, mm) of every voxel centre."""
    idx = np.indices(shape).reshape(3, -1).T
    return (idx @ affine[:3, :3].T + affine[:3, 3]).reshape(shape + (3,))


def _quadrant_maps(affine: np.ndarray) -> tuple[Volume, list[LabelVolume], np.ndarray]:
    """An image and three half-space markers defined in WORLD coordinates.

    Marker 0 = anterior-superior (y > c, z > c), marker 1 = right-superior (x > c, z > c),
    marker 2 = right-anterior (x > c, y > c): each must fill the top-left quadrant of the
    sagittal, coronal and axial panel respectively, whatever the storage orientation.
    """
    world = _world_grid(SHAPE, affine)
    c = world.reshape(-1, 3).mean(axis=0)
    x, y, z = (world[..., k] - c[k] for k in range(3))
    # half a voxel off the centre so no voxel sits exactly on the boundary
    eps = 1e-3
    markers = [(y > eps) & (z > eps), (x > eps) & (z > eps), (x > eps) & (y > eps)]
    image = Volume(np.random.default_rng(0).normal(100, 10, SHAPE).astype(np.float32), affine)
    maps = [LabelVolume(m.astype(np.uint8), affine, {1: f"marker{i}"}, schema="test")
            for i, m in enumerate(markers)]
    return image, maps, c


@pytest.fixture
def knee_like() -> tuple[Volume, LabelVolume, LabelVolume]:
    """A small knee-schema map (femur ball, cartilage shell, tibia block) and a lesion."""
    spacing = (1.2, 0.8, 0.8)
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = (-10.0, 5.0, 20.0)
    d = (np.indices(SHAPE) - (np.asarray(SHAPE) / 2)[:, None, None, None]) * np.asarray(
        spacing)[:, None, None, None]
    lab = np.zeros(SHAPE, np.uint8)
    r = np.sqrt(d[0] ** 2 + d[1] ** 2 + (d[2] - 3) ** 2)
    lab[r < 6] = 1
    lab[(r >= 6) & (r < 7.5)] = 5
    lab[(np.abs(d[0]) < 8) & (np.abs(d[1]) < 8) & (d[2] < -6)] = 2
    img = np.where(lab > 0, 300.0, 100.0) + np.random.default_rng(1).normal(0, 5, SHAPE)
    les = ((np.sqrt(d[0] ** 2 + d[1] ** 2 + (d[2] - 4) ** 2) < 2) & (lab == 1)).astype(np.uint8)
    return (Volume(img.astype(np.float32), aff, {"source": "phantom"}),
            LabelVolume(lab, aff, dict(KNEE), schema="knee"),
            LabelVolume(les, aff, {1: "bone_marrow_lesion"}, schema="lesion"))


def _fraction_top_left(mask: np.ndarray) -> float:
    rows, cols = mask.shape
    return float(mask[: rows // 2, : cols // 2].sum() / max(1, mask.sum()))


# --------------------------------------------------------------------------- display geometry
@pytest.mark.parametrize("seed", range(6))
def test_radiological_display_from_any_orientation(seed: int) -> None:
    """Anterior/right/superior land top-left in every plane, whatever the storage axes."""
    rng = np.random.default_rng(seed)
    affine = random_orientation_affine(rng)
    image, maps, centre = _quadrant_maps(affine)
    slices = display_slices(image, maps, centre_mm=centre)
    assert [s.plane for s in slices] == ["sagittal", "coronal", "axial"]
    expected_edges = {
        "sagittal": {"left": "A", "right": "P", "top": "S", "bottom": "I"},
        "coronal": {"left": "R", "right": "L", "top": "S", "bottom": "I"},
        "axial": {"left": "R", "right": "L", "top": "A", "bottom": "P"},
    }
    for k, sl in enumerate(slices):
        assert sl.edges == expected_edges[sl.plane]
        marker = sl.labels[k] > 0
        assert marker.sum() > 0.15 * marker.size  # about a quarter of the panel
        assert _fraction_top_left(marker) > 0.97, (sl.plane, ''.join(image.orientation))


def test_panel_extent_is_true_size_in_mm() -> None:
    """Anisotropic voxels: the panel's extent is voxel count x spacing along each screen axis."""
    affine = np.diag([0.5, 2.0, 0.25, 1.0])  # R, A, S with three different spacings
    image = Volume(np.zeros(SHAPE, np.float32), affine)
    sag, cor, ax = display_slices(image)
    assert sag.extent == pytest.approx((0, 30 * 2.0, 24 * 0.25, 0))
    assert cor.extent == pytest.approx((0, 20 * 0.5, 24 * 0.25, 0))
    assert ax.extent == pytest.approx((0, 20 * 0.5, 30 * 2.0, 0))
    assert sag.image.shape == (24, 30) and cor.image.shape == (24, 20)
    assert ax.image.shape == (30, 20)


def test_slices_pass_through_the_given_point() -> None:
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    image = Volume(np.zeros(SHAPE, np.float32), affine)
    sag, cor, ax = display_slices(image, centre_mm=(3.2, 7.0, 50.0))  # z beyond the FOV
    assert (sag.index, cor.index, ax.index) == (3, 7, SHAPE[2] - 1)
    assert sag.position_mm == pytest.approx(3.0) and ax.position_mm == pytest.approx(23.0)


def test_label_centroid_world(knee_like) -> None:
    _, seg, les = knee_like
    mask = seg.mask(1)
    expected = seg.voxel_to_world(np.argwhere(mask).mean(axis=0)[None])[0]
    assert label_centroid_world(seg, [1]) == pytest.approx(expected)
    assert label_centroid_world(seg, [17]) is None


# --------------------------------------------------------------------------- colours / figure
def test_knee_colours_are_complete_distinct_and_stable() -> None:
    assert set(KNEE_COLOURS) == set(KNEE)
    assert len(set(KNEE_COLOURS.values())) == len(KNEE)
    assert LESION_COLOURS[1] not in KNEE_COLOURS.values()
    table = colour_table(KNEE, "knee")
    assert table == dict(KNEE_COLOURS)
    # by name first: a renumbered femur keeps the femur colour
    assert label_colour(42, "knee", "femur") == KNEE_COLOURS[1]
    assert label_colour(7, "other") == label_colour(7, "other")
    spine = colour_table({20: "L1", 21: "L2", 120: "disc_L1-L2", 201: "spinal_cord"}, "spine")
    assert spine[20] != spine[21]


def test_overlay_figure_is_a_nonblank_png(knee_like) -> None:
    from PIL import Image

    image, seg, les = knee_like
    png = overlay_figure(image, seg, lesions=les)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(float)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert pixels.std() > 10
    # the lesion colour (magenta) and the femur colour appear in the drawing
    magenta = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] > 200)
    assert magenta.sum() > 20


def test_plain_row_adds_an_image_only_row(knee_like) -> None:
    """With ``plain_row`` the first row is the bare image: no label colour in it."""
    from PIL import Image

    image, seg, les = knee_like
    one = Image.open(io.BytesIO(overlay_figure(image, seg, lesions=les))).size
    two_png = overlay_figure(image, seg, lesions=les, plain_row=True)
    two = Image.open(io.BytesIO(two_png)).size
    assert two[0] == one[0] and two[1] > 1.6 * one[1] - 200
    pixels = np.asarray(Image.open(io.BytesIO(two_png)).convert("RGB")).astype(int)
    top = pixels[: pixels.shape[0] // 3]
    saturation = top.max(axis=2) - top.min(axis=2)
    assert (saturation > 60).mean() < 0.001  # grey image, white letters: no tinted labels
    bottom = pixels[pixels.shape[0] // 2:]
    assert ((bottom.max(axis=2) - bottom.min(axis=2)) > 60).mean() > 0.01


def test_overlay_refuses_a_label_map_off_the_image_grid(knee_like) -> None:
    image, seg, _ = knee_like
    shifted = LabelVolume(seg.array, seg.affine + np.diag([0, 0, 0, 0]) + _shift(5.0),
                          seg.labels, schema="knee")
    with pytest.raises(GeometryError, match="not on the image's grid"):
        overlay_figure(image, shifted)


def _shift(mm: float) -> np.ndarray:
    s = np.zeros((4, 4))
    s[0, 3] = mm
    return s


def test_write_png_atomic(tmp_path, knee_like) -> None:
    image, seg, _ = knee_like
    out = write_png(tmp_path / "overlay.png", overlay_figure(image, seg, planes=("axial",)))
    assert out.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in tmp_path.iterdir()] == ["overlay.png"]
    with pytest.raises(ValueError):
        write_png(tmp_path / "bad.png", b"not a png")
    assert not (tmp_path / "bad.png").exists()


# --------------------------------------------------------------------------- HTML
class _Rows(HTMLParser):
    """Collect the measurement rows (tr.m) of the report: their data-key and cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, list[str]]] = []
        self._in_row = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "m" in (a.get("class") or "").split():
            self._in_row = True
            self.rows.append((a.get("data-key", ""), []))
        elif tag == "td" and self._in_row:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[-1][1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            self._in_row = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _measurements() -> list[dict]:
    return [
        {"name": "volume", "structure": "femur", "value": 267.1449, "unit": "mL",
         "method": "voxel count x voxel volume"},
        {"name": "volume", "structure": "<script>alert('x')</script>", "value": 1.5,
         "unit": "mL", "method": "voxel count x voxel volume"},
        {"name": "lesion_count", "structure": "femur", "value": 2, "unit": "count",
         "method": "26-connected components"},
        {"name": "wedge_ratio", "structure": "L1", "region": "anterior", "value": 0.83,
         "unit": "1", "method": "anterior / posterior height"},
        {"name": "thickness_mean", "structure": "femoral_cartilage", "value": None,
         "unit": "mm", "method": "", "reason": "no cartilage found"},
        {"name": "lesion_volume", "value": 0.4, "unit": "mL", "method": "sum"},
    ]


def test_report_escapes_embeds_and_has_units(knee_like) -> None:
    image, seg, les = knee_like
    png = overlay_figure(image, seg, lesions=les, planes=("sagittal",))
    fig = ReportFigure(title="Overlay <b>1</b>", png=png, caption="A & B")
    html = render_report(
        title="Knee & <friends>", image=image, segmentation=seg, measurements=_measurements(),
        figures=[fig], warnings=["seg <is> suspect"],
        provenance={"command": "mskmri demo --out x<y", "seed": 3},
        sections=[ReportSection(id="lesions", title="Lesions", paragraphs=["<i>n</i>"],
                                tables=[ReportTable(["Lesion", "Volume (mL)"], [[1, 0.123456]],
                                                    numeric_columns=(1,))])],
    )
    # escaping: nothing from the data becomes markup
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "Knee &amp; &lt;friends&gt;" in html
    assert "seg &lt;is&gt; suspect" in html and "<i>n</i>" not in html
    assert "mskmri demo --out x&lt;y" in html
    # self-contained: no script, no stylesheet link, nothing fetched
    assert not re.search(r"<(script|link)\b", html)
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html)
    # the figure is embedded and decodes to the same PNG
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == 1 and base64.b64decode(uris[0]) == png
    # warnings come before the figures and the table
    assert html.index('id="warnings"') < html.index('id="figures"') < html.index(
        'id="measurements"')
    # every measurement row has a value and a unit
    parser = _Rows()
    parser.feed(html)
    assert len(parser.rows) == len(_measurements())
    for key, cells in parser.rows:
        assert len(cells) == 4 and cells[1] and cells[2], (key, cells)
    by_key = {k: c for k, c in parser.rows}
    assert by_key["volume.femur"] == ["femur", "267.1", "mL", ""]
    assert by_key["lesion_count.femur"][1:] == ["2", "count", ""]
    assert by_key["wedge_ratio.L1.anterior"] == ["L1 (anterior)", "0.83", "ratio", ""]
    # not measured: said in words with the reason beside it, never a number
    assert by_key["thickness_mean.femoral_cartilage"][1:] == ["not measured", "mm",
                                                             "no cartilage found"]
    assert by_key["lesion_volume"][0] == "total"
    # structure colour swatch from the knee colour table
    assert f"background: {KNEE_COLOURS[1]}" in html
    # extra section and its formatted number
    assert 'id="lesions"' in html and "0.123" in html


def test_report_requires_a_unit_on_every_measurement() -> None:
    with pytest.raises(ValueError, match="has no unit"):
        render_report(title="t", measurements=[{"name": "volume", "value": 1.0}])
    with pytest.raises(ValueError, match="has no unit"):
        render_report(title="t", measurements=[{"name": "volume", "value": 1.0, "unit": ""}])


def test_report_warns_when_label_map_is_off_grid(knee_like) -> None:
    image, seg, _ = knee_like
    other = LabelVolume(seg.array, seg.affine + _shift(3.0), seg.labels, schema="knee")
    html = render_report(title="t", image=image, segmentation=other)
    assert "not on the image&#39;s grid" in html


def test_report_geometry_and_provenance(knee_like) -> None:
    from mskmri import __version__

    image, seg, _ = knee_like
    html = render_report(title="t", image=image, segmentation=seg,
                         provenance={"command": "mskmri demo --out d"})
    assert "1.2 × 0.8 × 0.8 mm" in html  # spacing
    assert "20 × 30 × 24" in html
    assert f"mskmri {__version__}" in html
    assert "<code>mskmri demo --out d</code>" in html


def test_write_report_atomic(tmp_path) -> None:
    out = write_report(tmp_path / "report.html", title="t")
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    with pytest.raises(ValueError):
        write_report(tmp_path / "bad.html", title="t", measurements=[{"name": "v", "value": 1}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


@pytest.mark.parametrize(
    ("value", "text"),
    [(267.1449, "267.1"), (3.14159, "3.14"), (0.012345, "0.0123"), (12, "12"), (12.0, "12"),
     (12345.6, "12,346"), (0.0, "0"), (None, "n/a"), (float("nan"), "n/a"), (-2.5, "-2.50")],
)
def test_format_value(value, text) -> None:
    assert format_value(value) == text
