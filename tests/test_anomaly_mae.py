"""Cord T2 hyperintensity by mask-and-reconstruct (mskmri.anomaly.mae): phantoms first."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mskmri.anomaly import mae  # noqa: E402
from mskmri.anomaly.mae_net import MaskedAutoencoderViT, reconstruction_loss  # noqa: E402
from mskmri.errors import LabelError  # noqa: E402
from mskmri.labels import CSF, SPINAL_CORD  # noqa: E402
from mskmri.volume import LabelVolume, Volume  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread (the machine is shared; more threads only contend)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ConstantCord(torch.nn.Module):
    """Reconstructs every pixel as the normalised healthy cord level (an oracle for a
    phantom whose cord is uniform)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, mae.CORD_LEVEL) + 0 * self.w


def cord_phantom(lesion: bool = True) -> tuple[Volume, LabelVolume, np.ndarray]:
    """Sagittal phantom, canonical R I P: 5 slices of 120 x 80 at 1 mm; cord 100, CSF 200,
    lesion 180 (rows 50..57, cols 38..41 on slices 1..3)."""
    shape = (5, 120, 80)
    img = np.full(shape, 20.0, np.float32)
    lab = np.zeros(shape, np.int32)
    lab[:, 10:110, 32:48] = CSF
    lab[:, 10:110, 36:44] = SPINAL_CORD
    img[lab == CSF] = 200.0
    img[lab == SPINAL_CORD] = 100.0
    truth = np.zeros(shape, bool)
    if lesion:
        truth[1:4, 50:58, 38:42] = True
        img[truth] = 180.0
    # affine of axes R, I, P with 1 mm voxels
    aff = np.array([[1.0, 0, 0, 0], [0, 0, -1.0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])
    return (Volume(img, aff), LabelVolume(lab, aff, {SPINAL_CORD: "spinal_cord", CSF: "csf"},
                                          schema="spine"), truth)


# ----------------------------------------------------------------------------- network
def test_network_shapes_and_hidden_patches_are_unseen() -> None:
    torch.manual_seed(0)
    net = MaskedAutoencoderViT(image_size=32, patch=8, dim=32, depth=2, heads=4,
                               decoder_dim=16, decoder_depth=1, decoder_heads=2).eval()
    x = torch.rand(2, 1, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 5] = True
    out = net(x, mask)
    assert out.shape == (2, 2, 32, 32)  # image and edges
    # changing a hidden patch's pixels must not change anything (the encoder never sees it)
    x2 = x.clone()
    x2[:, :, 8:16, 8:16] += 5.0  # patch 5 = row 1, col 1
    assert torch.allclose(net(x2, mask), out, atol=1e-5)
    x3 = x.clone()
    x3[:, :, 0:8, 0:8] += 5.0  # patch 0 is visible: the output changes
    assert not torch.allclose(net(x3, mask), out, atol=1e-3)


def test_loss_counts_hidden_patches_only() -> None:
    img = torch.zeros(1, 1, 16, 16)
    rec = torch.zeros(1, 1, 16, 16)
    rec[:, :, :8, :8] = 1.0  # error in patch 0 only
    hide0 = torch.tensor([[True, False, False, False]])
    hide1 = torch.tensor([[False, True, False, False]])
    assert float(reconstruction_loss(rec, img, hide1, patch=8, edge_weight=0.0)) == 0.0
    assert float(reconstruction_loss(rec, img, hide0, patch=8, edge_weight=0.0)) == \
        pytest.approx(1.0)


# ----------------------------------------------------------------------------- masking
def test_mc_masks_reconstruct_every_candidate_once_per_repeat() -> None:
    rng = np.random.default_rng(0)
    cand = np.zeros((3, 64), bool)
    cand[0, 10:30] = True
    cand[1, ::3] = True
    cand[2, 40] = True
    masks, targets = mae.mc_masks(cand, rng)
    np.testing.assert_array_equal(targets.sum(axis=0), cand.astype(int))
    assert not (masks & ~cand[None]).any()  # only cord/CSF patches are ever hidden
    assert (masks | ~targets).all()  # a target is always hidden
    assert masks[:, 0].sum(axis=1).tolist() == [15] * 4  # 75 % of 20 candidates


def test_guided_masks_prefer_uncertain_patches() -> None:
    rng = np.random.default_rng(1)
    cand = np.ones((1, 64), bool)
    weight = np.zeros((1, 64))
    weight[0, :8] = 100.0
    hits = np.zeros(64)
    for _ in range(200):
        m = mae.guided_masks(cand, weight, rng, ratio=0.25)
        assert m.sum() == 16
        hits += m[0]
    assert hits[:8].mean() > 3 * hits[8:].mean()


def test_windows_cover_the_region() -> None:
    region = np.zeros((200, 90), bool)
    region[5:195, 40:52] = True
    origins = mae.window_origins(region)
    cover = np.zeros_like(region)
    for r, c in origins:
        cover[max(r, 0):r + mae.WINDOW, max(c, 0):c + mae.WINDOW] = True
    assert cover[region].all()


# ----------------------------------------------------------------------------- decisions
def test_flag_and_decide_hand_computed() -> None:
    anomaly = np.zeros((1, 20, 20), np.float32)
    anomaly[0, 2:5, 2:5] = 1.0  # 9 mm^2 group in segment 1
    anomaly[0, 15, 15] = 1.0  # 1 mm^2: below MIN_LESION_AREA_MM2, dropped
    flagged = mae.flag_pixels(anomaly, 0.5, (1.0, 1.0))
    assert flagged.sum() == 9 and not flagged[0, 15, 15]
    inner = np.ones_like(flagged)
    segments = np.ones((1, 20, 20), np.int32)
    segments[0, 10:] = 2
    rows, patient = mae.decide(flagged, anomaly, inner, segments, {1: "C3", 2: "C4"}, 1.0)
    assert [(r["structure"], r["flagged_area_mm2"], r["positive"]) for r in rows] == \
        [("C3", 9.0, True), ("C4", 0.0, False)]
    assert patient["positive"] and patient["positive_segments"] == ["C3"]
    _, patient0 = mae.decide(np.zeros_like(flagged), anomaly, inner, None, {}, 1.0)
    assert not patient0["positive"] and patient0["basis"].startswith("no level")


# ----------------------------------------------------------------------------- detection
@pytest.mark.parametrize("codes", ["RIP", "LPS", "PSR"])
def test_detect_finds_phantom_lesion_in_any_orientation(codes: str) -> None:
    image, seg, truth = cord_phantom()
    image_o, seg_o = image.reorient(codes), seg.reorient(codes)
    truth_o = Volume(truth.astype(np.uint8), image.affine).reorient(codes).array > 0
    res = mae.detect_cord_hyperintensity(image_o, seg_o, model=ConstantCord(), threshold=0.1,
                                         adapt_steps=0, repeats=1)
    pred = res.mask.array > 0
    assert res.mask.shape == image_o.shape and res.mask.same_geometry(image_o)
    inner_truth = truth_o & res.inner
    assert (pred & inner_truth).sum() == inner_truth.sum() > 0
    assert not (pred & ~truth_o).any()
    # (180 - 100) / 100 x CORD_LEVEL in the lesion, 0 in healthy cord
    assert res.anomaly.array[inner_truth].mean() == pytest.approx(0.8 * mae.CORD_LEVEL, rel=1e-3)
    assert res.patient["positive"] and res.record["ran_on"].startswith("3-D (5 sagittal")


def test_detect_healthy_phantom_is_negative_and_2d_runs() -> None:
    image, seg, _ = cord_phantom(lesion=False)
    one = [slice(2, 3), slice(None), slice(None)]
    res = mae.detect_cord_hyperintensity(image.crop(one), seg.crop(one), model=ConstantCord(),
                                         threshold=0.1, adapt_steps=0, repeats=1)
    assert res.record["ran_on"].startswith("2-D")
    assert not res.patient["positive"] and res.mask.array.sum() == 0


def test_adaptation_changes_a_copy_only() -> None:
    image, seg, _ = cord_phantom()
    torch.manual_seed(0)
    net = MaskedAutoencoderViT(dim=32, depth=1, heads=4, decoder_dim=16, decoder_depth=1,
                               decoder_heads=2).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    _, _, slices, _ = mae.prepare_slices(image, seg.mask(SPINAL_CORD), seg.mask(CSF))
    adapted = mae.adapt_model(net, slices, np.random.default_rng(0), steps=2)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in adapted.state_dict().items())


def test_no_cord_and_axial_input_are_refused() -> None:
    image, seg, _ = cord_phantom()
    empty = LabelVolume(np.zeros(seg.shape, np.int32), seg.affine, {}, schema="spine")
    with pytest.raises(LabelError, match="201"):
        mae.detect_cord_hyperintensity(image, empty, model=ConstantCord(), threshold=0.1)
    coarse = np.diag([1.0, 5.0, 1.0, 1.0])  # rows along S-I 5 mm apart: not sagittal
    coarse[:3, :3] = image.affine[:3, :3] @ np.diag([1.0, 5.0, 1.0])
    with pytest.raises(mae.CordHyperintensityError, match="sagittal"):
        mae.detect_cord_hyperintensity(Volume(image.array, coarse), LabelVolume(
            seg.array, coarse, seg.labels, schema="spine"), model=ConstantCord(),
            threshold=0.1)


# ----------------------------------------------------------------------------- shipped model
def test_shipped_model_card_and_size() -> None:
    from mskmri.nn.registry import read_card
    from mskmri.weights import MODELS

    if mae.DEFAULT_MODEL not in MODELS:
        pytest.skip("cord-mae is not shipped in this checkout")
    entry = MODELS[mae.DEFAULT_MODEL]
    assert entry.path.stat().st_size < 10_000_000
    card = read_card(entry.path)
    assert card.architecture == "mae-vit" and card.task == "mae"
    assert card.extra["z_threshold"] > 0 and card.extra["calibration"]["pixel_fpr"] == \
        mae.PIXEL_FPR


def test_cli_detect_cord_writes_outputs(tmp_path: Path) -> None:
    from mskmri.cli import main
    from mskmri.io import read, write
    from mskmri.weights import MODELS

    if mae.DEFAULT_MODEL not in MODELS:
        pytest.skip("cord-mae is not shipped in this checkout")
    image, seg, _ = cord_phantom()
    three = [slice(1, 4), slice(None), slice(None)]
    image, seg = image.crop(three), seg.crop(three)
    write(image, tmp_path / "img.nii.gz")
    write(seg, tmp_path / "seg.nii.gz")
    out = tmp_path / "cord.nii.gz"
    rc = main(["-q", "detect", "cord-hyperintensity", str(tmp_path / "img.nii.gz"), str(out),
               "--seg", str(tmp_path / "seg.nii.gz"), "--uncertainty",
               str(tmp_path / "epi.nii.gz"), "--table", str(tmp_path / "levels.csv"),
               "--adapt-steps", "0"])
    assert rc == 0
    mask = read(out)
    assert mask.same_geometry(image)
    doc = json.loads(mae.report_path(out).read_text())
    assert doc["schema"] == mae.RECORD_SCHEMA and "positive" in doc["patient"]
    assert doc["record"]["ran_on"].startswith("3-D")
    assert read(tmp_path / "epi.nii.gz").same_geometry(image)
    assert (tmp_path / "levels.csv").read_text().startswith("structure,")


def test_cli_without_seg_names_seg_when_no_cord_model(tmp_path: Path, monkeypatch) -> None:
    from mskmri.cli import main
    from mskmri.io import write

    image, _, _ = cord_phantom()
    write(image, tmp_path / "img.nii.gz")

    def no_cord(*args, **kwargs):  # the shipped spine model without a cord class
        raise mae.CordHyperintensityError("the shipped spine model 'spine-seg' does not segment "
                                          "the spinal cord; pass --seg SEG")

    monkeypatch.setattr(mae, "cord_from_segmentation", no_cord)
    rc = main(["-q", "detect", "cord-hyperintensity", str(tmp_path / "img.nii.gz"),
               str(tmp_path / "o.nii.gz")])
    assert rc == 2 and not (tmp_path / "o.nii.gz").exists()


def test_real_u2ad_clinical_slice(shared_data: Path) -> None:
    """The shipped model on the clinical slice with the labelled hyperintensity (label 6):
    maps are finite and confined to the cord; the record says 2-D."""
    from mskmri.labels import U2AD
    from mskmri.measure.spine import slice_image_volume, slice_label_volume
    from mskmri.weights import MODELS

    if mae.DEFAULT_MODEL not in MODELS:
        pytest.skip("cord-mae is not shipped in this checkout")
    with np.load(shared_data / "spine" / "u2ad_cervical_slices" / "u2ad_samples.npz") as z:
        labels, img = z["private_2_labels"], z["private_2_img"]
    seg = slice_label_volume(U2AD.apply(labels).astype(np.int32), (1.0, 1.0))
    image = slice_image_volume(img.astype(np.float32), (1.0, 1.0))
    res = mae.detect_cord_hyperintensity(image, seg, adapt_steps=0, repeats=1)
    assert res.record["ran_on"].startswith("2-D")
    a = res.anomaly.array
    assert np.isfinite(a).all() and (a[~res.inner] == 0).all() and a[res.inner].max() > 0
    assert set(np.unique(res.mask.array)) <= {0, mae.OUTPUT_VALUE}


def test_non_sagittal_2d_slice_is_refused() -> None:
    image, seg, _ = cord_phantom()
    # an axial-like 2-D slice: one row along S-I
    one = [slice(None), slice(60, 61), slice(None)]
    with pytest.raises(mae.CordHyperintensityError, match="sagittal slice"):
        mae.detect_cord_hyperintensity(image.crop(one), seg.crop(one), model=ConstantCord(),
                                       threshold=0.1)


def test_real_sct_synthetic_lesion_scores_above_the_cord(shared_data: Path) -> None:
    """SCT's own synthetic lesion (3-D, 0.8 mm, not seen in training): the shipped model's
    anomaly ranks lesion pixels above healthy cord pixels (benchmark: AUROC 0.98 with 8
    repeats; 2 repeats here)."""
    from sklearn.metrics import roc_auc_score

    from mskmri.io import read
    from mskmri.weights import MODELS

    if mae.DEFAULT_MODEL not in MODELS:
        pytest.skip("cord-mae is not shipped in this checkout")
    base = shared_data / "spine" / "sct" / "sct_testing_data" / "t2"
    image = read(base / "t2_fake_lesion.nii.gz")
    cord = read(base / "t2_fake_lesion_sc_seg.nii.gz").array > 0
    lesion = read(base / "t2_fake_lesion_lesion_seg.nii.gz").array > 0
    seg = LabelVolume(np.where(cord | lesion, SPINAL_CORD, 0).astype(np.int32), image.affine,
                      {SPINAL_CORD: "spinal_cord"}, schema="spine")
    res = mae.detect_cord_hyperintensity(image, seg, repeats=2)
    assert res.record["ran_on"].startswith("3-D")
    read_zone = res.inner
    auc = roc_auc_score(lesion[read_zone], res.anomaly.array[read_zone])
    assert auc > 0.85
    assert res.patient["positive"]
