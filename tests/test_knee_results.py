"""The committed knee segmentation benchmark and the shipped knee models' cards agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "knee_segmentation.json"
WEIGHTS = ROOT / "src" / "mskmri" / "weights"


@pytest.fixture(scope="module")
def doc() -> dict:
    return json.loads(RESULTS.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", ["knee-seg-coarse", "knee-seg-fine"])
def test_cards_quote_the_committed_benchmark_of_the_shipped_weights(doc: dict, name: str) -> None:
    from mskmri.nn.registry import sha256_file

    card = json.loads((WEIGHTS / f"{name}.json").read_text(encoding="utf-8"))
    # the benchmark was run on exactly the shipped weights
    assert doc["models"][name]["sha256"] == card["sha256"] == sha256_file(
        WEIGHTS / f"{name}.safetensors")
    quoted = card["validation"]["benchmark"]
    assert quoted["group_mean_dice"] == doc["held_out_renders"]["group_mean_dice"]
    assert quoted["date"] == doc["date"]


def test_caveat_quotes_the_committed_held_out_dice(doc: dict) -> None:
    from mskmri.weights import MODELS

    groups = doc["held_out_renders"]["group_mean_dice"]
    caveat = MODELS["knee-seg-fine"].caveat
    for group in ("bones", "cartilage", "menisci"):
        assert f"{group} {groups[group]:.2f}" in caveat, (group, groups[group])


def test_resumed_run_lists_its_training_segments() -> None:
    card = json.loads((WEIGHTS / "knee-seg-fine.json").read_text(encoding="utf-8"))
    segs = card["extra"].get("training_segments", [])
    if len(segs) > 1:
        assert segs[-1]["steps"] == card["extra"]["trained_steps"]
        assert [s["start_step"] for s in segs] == sorted(s["start_step"] for s in segs)
