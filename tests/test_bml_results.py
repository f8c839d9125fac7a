"""The committed BML benchmark: its structure, held-out data, and the shipped cards' thresholds.

The CLI's default threshold comes from each model card; the card must carry the threshold
that the committed benchmark calibrated on validation knees, so the numbers in
``benchmarks/results/bml.json`` are the numbers of the shipped detector.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bml.json"
WEIGHTS = ROOT / "src" / "mskmri" / "weights"
#: Method name in the results -> shipped model card.
CARDS = {"inpaint-ffc": "bml-inpaint", "mkd": "bml-mkd"}


@pytest.fixture(scope="module")
def doc() -> dict:
    if not RESULTS.is_file():
        pytest.fail(f"{RESULTS} is missing; run benchmarks/bml.py")
    return json.loads(RESULTS.read_text(encoding="utf-8"))


def test_every_resolution_contrast_and_set_was_run(doc: dict) -> None:
    assert doc["schema"] == "mskmri/benchmark/bml/2"
    assert doc["data"]["inplanes"] == [112, 224, 448]
    assert doc["data"]["contrasts"] == ["iw-fs", "dess"]
    for method in ("inpaint-ffc", "mkd", "local-mean-stub"):
        groups = set(doc["methods"][method]["summary"])
        for s in ("real", "inserted"):
            for c in ("iw-fs", "dess"):
                for ip in (112, 224, 448):
                    assert f"{s}/{c}/{ip}" in groups, (method, s, c, ip)
        assert {"free/iw-fs/448", "foreign/iw-fs/384"} <= groups
    assert doc["speed"]["shape"] == [160, 384, 384]


def test_test_and_calibration_knees_are_apart(doc: dict) -> None:
    data = doc["data"]
    test = set(data["test_with_femoral_lesions"]) | set(data["test_lesion_free"])
    calib = set(data["calibration_val_lesion_free"])
    subject = lambda name: name.split(".")[0].rsplit("_", 1)[0] if name.startswith(  # noqa: E731
        "akoa") else name.split(".")[0]
    assert not {subject(n) for n in test} & {subject(n) for n in calib}
    for res in doc["methods"].values():
        assert {c["map"] for c in res["cases"]} <= test


@pytest.mark.parametrize("method", sorted(CARDS))
def test_shipped_card_threshold_is_the_benchmarks(doc: dict, method: str) -> None:
    card = json.loads((WEIGHTS / f"{CARDS[method]}.json").read_text(encoding="utf-8"))
    res = doc["methods"][method]
    table = card["extra"]["thresholds_by_inplane_mm"]
    assert len(table) == len(doc["data"]["inplanes"]) == len(res["thresholds_by_inplane_mm"])
    for (mm, level), (mm_res, level_res) in zip(table, res["thresholds_by_inplane_mm"],
                                                strict=True):
        assert mm == pytest.approx(mm_res) and level == pytest.approx(level_res, rel=1e-6)
    cal = card["extra"]["threshold_calibration"]
    assert cal["fpr_voxel"] == res["calibration_fpr"] == doc["data"]["calibration_fpr"]
    assert cal["knees"] == doc["data"]["calibration_val_lesion_free"]
    assert "benchmarks/bml.py" in cal["by"]
