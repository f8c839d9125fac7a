"""The demo's phantoms: the spine phantom's truth and known wedge, the knee's cartilage scale."""

from __future__ import annotations

import numpy as np
import pytest

from mskmri.labels import CSF, DISC_OFFSET, SPINAL_CORD, VERTEBRA_ID
from mskmri.synth._common import SynthesisError
from mskmri.synth.phantom import phantom_knee, phantom_spine

LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5")


@pytest.fixture(scope="module")
def spine():
    return phantom_spine(seed=0, wedge={"L2": 0.7})


def test_spine_phantom_truth(spine) -> None:
    labels, image = spine.labels, spine.image
    assert labels.schema == "spine" and labels.same_geometry(image)
    assert image.array.dtype == np.float32 and image.array.min() >= 0
    present = set(labels.present_values())
    bodies = {VERTEBRA_ID[lv] for lv in LEVELS}
    discs = {DISC_OFFSET + VERTEBRA_ID[lv] for lv in LEVELS}  # T12-L1 ... L5-S1
    assert present == bodies | discs | {VERTEBRA_ID["sacrum"], SPINAL_CORD, CSF}
    # bodies are stacked top (T12) to bottom (L5) along z (superior = +z in this RAS grid)
    z = [np.argwhere(labels.array == VERTEBRA_ID[lv])[:, 2].mean() for lv in LEVELS]
    assert z == sorted(z, reverse=True)
    # T2-like: CSF and disc nuclei brighter than vertebral marrow
    body = np.isin(labels.array, list(bodies))
    assert image.array[labels.array == CSF].mean() > 1.5 * image.array[body].mean()
    # the top body (T12) is cut by the field of view, as in a lumbar scan
    assert np.any(labels.array[:, :, -1] == VERTEBRA_ID["T12"])


def test_spine_phantom_is_seeded() -> None:
    a, b, c = phantom_spine(seed=3), phantom_spine(seed=3), phantom_spine(seed=4)
    np.testing.assert_array_equal(a.image.array, b.image.array)
    np.testing.assert_array_equal(a.labels.array, b.labels.array)
    assert not np.array_equal(a.labels.array, c.labels.array)
    assert a.params["seed"] == 3 and set(a.params["levels"]) == set(LEVELS)


def test_spine_phantom_wedge_is_measured(spine) -> None:
    """The wedged body measures a clearly lower anterior/posterior ratio than the others.

    The phantom's ratio (0.7) holds at the body walls; the measurement takes its heights a
    little inside them, where the linear wedge is milder, hence the range.
    """
    from mskmri.measure.spine import analyse_spine

    res = analyse_spine(spine.labels, image=spine.image)
    ratio = {m.structure or m.key.split(".")[-1]: m.value for m in res.measurements
             if m.name == "wedge_ratio"}
    assert 0.7 <= ratio["L2"] <= 0.85
    for lv in ("L1", "L3", "L4", "L5"):
        assert ratio[lv] == pytest.approx(1.0, abs=0.05)


def test_spine_phantom_rejects_bad_requests() -> None:
    with pytest.raises(SynthesisError, match="unknown vertebra"):
        phantom_spine(levels=("L1", "L9"))
    with pytest.raises(SynthesisError, match="wedge"):
        phantom_spine(wedge={"L1": 0.1})


def test_knee_cartilage_scale_thins_cartilage() -> None:
    from mskmri.measure.knee import measure_knee_with_warnings

    def femoral_mean_mm(scale: float) -> float:
        truth, _ = phantom_knee(seed=2, lesion_ml=None, cartilage_scale=scale)
        ms, _ = measure_knee_with_warnings(truth)
        return next(m.value for m in ms if m.key == "thickness_mean.femoral_cartilage")

    full, thin = femoral_mean_mm(1.0), femoral_mean_mm(0.7)
    assert thin < 0.9 * full
    with pytest.raises(SynthesisError, match="cartilage_scale"):
        phantom_knee(cartilage_scale=0.1)
