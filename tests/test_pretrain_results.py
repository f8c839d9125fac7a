"""The committed pretraining experiment: structure, and evaluation volumes kept apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "pretraining.json"


@pytest.fixture(scope="module")
def doc() -> dict:
    if not RESULTS.is_file():
        pytest.fail(f"{RESULTS} is missing; run benchmarks/pretraining.py")
    return json.loads(RESULTS.read_text(encoding="utf-8"))


def test_structure(doc: dict) -> None:
    assert not doc["quick"], "the committed result must not be a --quick smoke run"
    tasks = doc["tasks"]
    assert tasks and tasks[0]["task"].startswith("vertebral-body")
    assert [b["labelled_volumes"] for b in tasks[0]["budgets"]] == [1, 2, 5, 10]
    for t in tasks:
        for key in ("task", "eval_volumes", "command", "machine", "budgets"):
            assert t[key], key
        for b in t["budgets"]:
            assert isinstance(b["labelled_volumes"], int)
            assert len(b["scratch_dice"]) == len(b["pretrained_dice"]) == len(b["seeds"]) >= 3
            assert all(0.0 <= v <= 1.0 for v in b["scratch_dice"] + b["pretrained_dice"])
            assert all(len(v) == b["labelled_volumes"] for v in b["train_volumes"])
    assert Path(RESULTS.with_suffix(".png")).is_file()


def test_evaluation_volumes_never_trained_or_pretrained_on(doc: dict) -> None:
    for t in doc["tasks"]:
        ev = set(t["eval_volumes"])
        assert not ev & set(t["train_pool"])
        for b in t["budgets"]:
            for names in b["train_volumes"]:
                assert set(names) <= set(t["train_pool"])
        pre = t["pretraining_images"]
        assert not any(e in p for e in ev for p in pre), "an evaluation volume was pretrained on"
    # The spine exams named as pretraining images are exactly the training pool.
    spine = doc["tasks"][0]
    assert {p for p in spine["pretraining_images"] if p.startswith(("myosegmentum/",
                                                                     "chu2015/"))} \
        == set(spine["train_pool"])


def test_shipped_encoder_loads_into_the_experiment_network() -> None:
    pytest.importorskip("torch")
    from mskmri.nn.registry import load_model, resolve_weights
    from mskmri.weights import MODELS

    assert "pretrain-encoder-2d" in MODELS
    path, _ = resolve_weights("pretrain-encoder-2d")
    assert path.stat().st_size < 5_000_000
    enc, card = load_model("pretrain-encoder-2d")
    assert card.task == "pretrain" and card.architecture == "unet-encoder"
    assert card.extra["pretraining"] == "2-D"
    # No evaluation exam of the vertebral-body task was pretrained on.
    names = " ".join(d["name"] for d in card.training_data)
    assert not any(e in names for e in card.extra["spine_eval_excluded"])


def test_run_is_complete_and_its_recipe_recorded(doc: dict) -> None:
    assert doc.get("complete", True), "the committed result is a partial (interrupted) run"
    s = doc["settings"]
    assert s["finetune_steps"] >= 1 and s["finetune_choice"], "say how the steps were chosen"
    # Every (task, budget, arm, seed) appears once in the raw runs.
    keys = [(r["task"], r["budget"], r["arm"], r["seed"]) for r in doc.get("runs", [])]
    assert len(keys) == len(set(keys))


def test_effusion_renders_are_fluid_sensitive(doc: dict) -> None:
    knee = [t for t in doc["tasks"] if "effusion" in t["task"]]
    assert knee, "the knee effusion task is missing"
    vols = knee[0]["volumes"]
    names = set(knee[0]["eval_volumes"]) | set(knee[0]["train_pool"])
    assert names <= set(vols)
    assert {vols[n]["contrast"] for n in names} <= set(doc["settings"]["knee_contrasts"])
    assert "random" not in doc["settings"]["knee_contrasts"]


def test_shipped_encoder_card_quotes_these_results(doc: dict) -> None:
    """The encoder's model card carries the committed experiment's gains, not older ones."""
    card = Path(__file__).resolve().parents[1] / "src" / "mskmri" / "weights" / \
        "pretrain-encoder-2d.json"
    quoted = json.loads(card.read_text(encoding="utf-8"))["validation"][
        "relative_dice_gain_over_scratch"]
    for b in doc["tasks"][0]["budgets"]:
        scratch = sum(b["scratch_dice"]) / len(b["scratch_dice"])
        pre = sum(b["pretrained_dice"]) / len(b["pretrained_dice"])
        assert quoted[str(b["labelled_volumes"])] == pytest.approx(pre / scratch - 1, abs=2e-3)
