"""The one training loop: seeded, resumable bit-exactly, logged, validated; the train CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mskmri.nn import registry  # noqa: E402
from mskmri.nn.registry import ModelCard, TrainOption, TrainTask  # noqa: E402
from mskmri.nn.train import (  # noqa: E402
    CHECKPOINT_NAME,
    LRSchedule,
    StepInfo,
    TrainConfig,
    TrainingError,
    _StepBatches,
    fit,
    load_checkpoint,
    resolve_device,
    seed_everything,
)
from mskmri.nn.unet import UNet, UNetConfig  # noqa: E402

pytestmark = pytest.mark.torch

TINY = UNetConfig(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 8),
                  strides=(1, 2), dropout=0.2)  # dropout: the resumed RNG stream matters


class Squares:
    """A bright square on noise; the sample depends on (index, rng) only."""

    def __len__(self) -> int:
        return 5

    def sample(self, index: int, rng: np.random.Generator) -> tuple[Any, Any]:
        img = rng.normal(0.0, 0.3, (1, 16, 16)).astype(np.float32)
        lab = np.zeros((16, 16), np.int64)
        y, x = rng.integers(0, 10, 2)
        lab[y:y + 6, x:x + 6] = 1
        img[0][lab == 1] += 1.0 + 0.1 * index
        return torch.from_numpy(img), torch.from_numpy(lab)


def objective(model: Any, batch: Any) -> Any:
    x, y = batch
    loss = torch.nn.functional.cross_entropy(model(x), y)
    return loss, {"ce": float(loss.detach())}


def _model(seed: int = 0) -> UNet:
    seed_everything(seed)
    return UNet(TINY)


def _cfg(out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {"out": out, "steps": 6, "batch_size": 2, "lr": 1e-2, "seed": 3,
                            "device": "cpu", "log_every": 1, "checkpoint_every": 100}
    return TrainConfig(**{**base, **kw})


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


class _Stop(Exception):
    pass


def _stop_at(step: int, exc: type[BaseException]) -> Any:
    def hook(info: StepInfo) -> None:
        if info.step == step:
            raise exc()
    return hook


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one_bit_exactly(
        tmp_path: Path) -> None:
    full = fit(_model(), objective, Squares(), _cfg(tmp_path / "full"))
    assert full.step == 6 and len(full.history) == 6
    # Ctrl-C after step 3: the loop writes a checkpoint at step 3 before re-raising
    with pytest.raises(KeyboardInterrupt):
        fit(_model(), objective, Squares(), _cfg(tmp_path / "cut"),
            hooks=[_stop_at(3, KeyboardInterrupt)])
    assert load_checkpoint(tmp_path / "cut" / CHECKPOINT_NAME)["step"] == 3
    resumed = fit(_model(seed=99), objective, Squares(), _cfg(tmp_path / "cut", resume="auto"))
    assert resumed.step == 6
    _assert_same_weights(full.model, resumed.model)
    # the losses logged after resuming are those of the uninterrupted run
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[3:]]
    # each start and resume is recorded (a card's command reproduces only the last one)
    assert [g["start_step"] for g in resumed.segments] == [0, 3]
    assert [g["start_step"] for g in full.segments] == [0]
    assert {g["steps"] for g in resumed.segments} == {6}


def test_crash_resumes_from_the_last_periodic_checkpoint(tmp_path: Path) -> None:
    full = fit(_model(), objective, Squares(), _cfg(tmp_path / "full", optimizer="sgd",
                                                    schedule="cosine", warmup_steps=2))
    out = tmp_path / "crash"
    with pytest.raises(_Stop):
        fit(_model(), objective, Squares(), _cfg(out, checkpoint_every=2, optimizer="sgd",
                                                 schedule="cosine", warmup_steps=2),
            hooks=[_stop_at(5, _Stop)])
    ckpt = load_checkpoint(out / CHECKPOINT_NAME)
    assert ckpt["step"] == 4  # no checkpoint is written on a crash, the periodic one stays
    resumed = fit(_model(), objective, Squares(), _cfg(out, checkpoint_every=2,
                                                       optimizer="sgd", schedule="cosine",
                                                       warmup_steps=2, resume="auto"))
    _assert_same_weights(full.model, resumed.model)


def test_resuming_with_more_steps_follows_the_new_schedule(tmp_path: Path) -> None:
    out = tmp_path / "extend"
    fit(_model(), objective, Squares(), _cfg(out, steps=4, checkpoint_every=4))
    longer = fit(_model(), objective, Squares(), _cfg(out, steps=8, resume="auto"))
    assert longer.step == 8
    lrs = [h["lr"] for h in longer.history]
    # the poly schedule of an 8-step run: still positive after the old end (step 4)
    assert len(lrs) == 4 and all(lr > 0 for lr in lrs[:-1])
    assert lrs == sorted(lrs, reverse=True)


def test_worker_processes_load_the_same_samples(tmp_path: Path) -> None:
    inline = fit(_model(), objective, Squares(), _cfg(tmp_path / "w0", steps=3))
    worker = fit(_model(), objective, Squares(), _cfg(tmp_path / "w1", steps=3, workers=1))
    _assert_same_weights(inline.model, worker.model)


def test_outputs_log_metrics_and_config(tmp_path: Path) -> None:
    out = tmp_path / "run"
    fit(_model(), objective, Squares(), _cfg(out, log_every=2), command="mskmri train toy")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6]
    assert all(r["kind"] == "train" and "ce" in r and r["loss"] > 0 for r in lines)
    log = (out / "train.log").read_text()
    assert "step 6/6" in log and "finished 6 steps" in log
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["config"]["seed"] == 3 and cfg["command"] == "mskmri train toy"
    ckpt = load_checkpoint(out / CHECKPOINT_NAME)
    assert ckpt["step"] == 6 and len(ckpt["rng"]) == 1


def test_training_reduces_the_loss(tmp_path: Path) -> None:
    res = fit(_model(), objective, Squares(),
              _cfg(tmp_path, steps=40, lr=3e-2, schedule="constant", log_every=5))
    first, last = res.history[0]["loss"], res.history[-1]["loss"]
    assert last < 0.5 * first, (first, last)


def test_validation_hook_runs_in_eval_mode_at_its_period_and_the_end(tmp_path: Path) -> None:
    seen: list[tuple[int, bool, bool]] = []

    def validate(model: torch.nn.Module, step: int) -> dict[str, float]:
        seen.append((step, model.training, torch.is_grad_enabled()))
        return {"dice": 0.5}

    res = fit(_model(), objective, Squares(), _cfg(tmp_path, steps=5, val_every=2),
              validate=validate)
    assert seen == [(2, False, False), (4, False, False), (5, False, False)]
    assert [v["step"] for v in res.validation] == [2, 4, 5]
    assert res.model.training  # back to training mode afterwards


def test_existing_checkpoint_is_not_overwritten_without_resume(tmp_path: Path) -> None:
    fit(_model(), objective, Squares(), _cfg(tmp_path, steps=2))
    with pytest.raises(TrainingError, match="--resume"):
        fit(_model(), objective, Squares(), _cfg(tmp_path, steps=2))
    # resuming a finished run is a no-op
    assert fit(_model(), objective, Squares(), _cfg(tmp_path, steps=2, resume="auto")).step == 2


def test_diverging_loss_stops_with_a_clear_error(tmp_path: Path) -> None:
    def nan_objective(model: Any, batch: Any) -> Any:
        return model(batch[0]).sum() * float("nan")

    with pytest.raises(TrainingError, match="loss is nan at step 1"):
        fit(_model(), nan_objective, Squares(), _cfg(tmp_path))


def test_bf16_autocast_trains(tmp_path: Path) -> None:
    res = fit(_model(), objective, Squares(), _cfg(tmp_path, steps=3, amp="bf16"))
    assert all(np.isfinite(h["loss"]) for h in res.history)
    assert all(p.dtype == torch.float32 for p in res.model.parameters())


def test_plain_dataset_gets_seeded_global_generators_per_sample(tmp_path: Path) -> None:
    class Plain(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> Any:
            return torch.rand(1, 8, 8), torch.randint(0, 2, (8, 8))

    drawn: list[torch.Tensor] = []

    def recording(model: Any, batch: Any) -> Any:
        drawn.append(batch[0].clone())
        return objective(model, batch)

    fit(_model(), recording, Plain(), _cfg(tmp_path / "a", steps=2))
    first = list(drawn)
    drawn.clear()
    torch.manual_seed(12345)  # the caller's global state must not matter
    fit(_model(), recording, Plain(), _cfg(tmp_path / "b", steps=2))
    assert all(torch.equal(a, b) for a, b in zip(first, drawn, strict=True))
    assert not torch.equal(first[0], first[1])


def test_data_order_splits_a_global_batch_across_ranks() -> None:
    one = list(_StepBatches(7, 4, seed=1, start=0, steps=5, rank=0, world=1))
    r0 = list(_StepBatches(7, 2, seed=1, start=0, steps=5, rank=0, world=2))
    r1 = list(_StepBatches(7, 2, seed=1, start=0, steps=5, rank=1, world=2))
    assert [a + b for a, b in zip(r0, r1, strict=True)] == one
    resumed = list(_StepBatches(7, 4, seed=1, start=3, steps=5, rank=0, world=1))
    assert resumed == one[3:]
    first_epoch = [k[0] for batch in one for k in batch][:7]
    assert sorted(first_epoch) == list(range(7))  # every sample once per epoch


def test_lr_schedules() -> None:
    poly = LRSchedule("poly", steps=10, warmup=0)
    assert poly(0) == 1.0 and poly(5) == pytest.approx(0.5 ** 0.9) and poly(10) == 0.0
    cos = LRSchedule("cosine", steps=12, warmup=2)
    assert [cos(0), cos(1)] == [0.5, 1.0] and cos(2) == 1.0
    assert cos(7) == pytest.approx(0.5) and cos(12) == pytest.approx(0.0)
    assert LRSchedule("constant", 5, 0)(4) == 1.0


def test_config_and_device_errors(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="steps must be >= 1"):
        TrainConfig(out=tmp_path, steps=0)
    with pytest.raises(TrainingError, match="amp"):
        TrainConfig(out=tmp_path, amp="fp16")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="CUDA is not available"):
            resolve_device("cuda")
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(TrainingError, match="not an mskmri checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(TrainingError, match="no checkpoint"):
        load_checkpoint(tmp_path / "none.pt")


# ---------------------------------------------------------------- the `mskmri train` command
def toy_entry(config: TrainConfig, options: dict[str, Any]) -> Path:
    """A task entry as later issues write them: build, fit, save weights with a card."""
    from mskmri.nn.registry import save_model
    from mskmri.nn.train import format_command

    seed_everything(config.seed)
    model = UNet(UNetConfig(spatial_dims=2, out_channels=2, features=(4, 8), strides=(1, 2)))
    res = fit(model, objective, Squares(), config,
              command=format_command("toy", config, options))
    card = ModelCard(name="toy", task="toy", input_spacing_mm=None,
                     normalisation={"method": "none"}, label_schema="none",
                     labels={"0": "background", "1": "square"},
                     training_data=[{"name": "synthetic squares", "licence": "MIT"}],
                     command=format_command("toy", config, options), seed=config.seed,
                     extra={"size": options["size"]})
    return save_model(res.model, config.out / "model.safetensors", card)


def test_train_command_lists_and_runs_registered_tasks(tmp_path: Path, monkeypatch: Any,
                                                       capsys: Any) -> None:
    from mskmri.cli import main

    monkeypatch.setattr(registry, "TRAIN_TASKS", {})
    assert main(["train"]) == 0
    assert "no training tasks are registered yet" in capsys.readouterr().out
    toy = TrainTask(name="toy", help="a toy task for tests", entry=f"{__name__}:toy_entry",
                    options=(TrainOption(("--size",), {"type": int, "default": 16}),),
                    defaults={"steps": 2, "device": "cpu"})
    monkeypatch.setattr(registry, "TRAIN_TASKS", {"toy": toy})
    assert main(["train"]) == 0
    assert "toy" in capsys.readouterr().out
    out = tmp_path / "toy"
    assert main(["-q", "train", "toy", "--out", str(out), "--seed", "5", "--size", "8"]) == 0
    model, card = registry.load_model(out / "model.safetensors")
    assert card.seed == 5 and card.extra == {"size": 8}
    assert card.command.startswith("mskmri train toy --out") and "--size 8" in card.command
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 2  # the task default
    # again without --resume: refused with exit 2 and one line
    assert main(["-q", "train", "toy", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    # more steps with --resume continues from step 2
    assert main(["-q", "train", "toy", "--out", str(out), "--steps", "3", "--resume"]) == 0
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 3
    # unknown task: argparse's one-line usage error
    assert main(["train", "tyo"]) == 2
