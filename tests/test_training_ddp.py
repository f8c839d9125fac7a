"""DistributedDataParallel under torchrun: 2 CPU processes (gloo) train like one process with
the same global batch.

Run as a script by ``torch.distributed.run`` (the worker half) and as a test (the launcher).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

#: Per-process batch in the DDP run; the single-process reference uses twice this.
BATCH = 2
STEPS = 4


class Blobs:
    """Deterministic tiny samples (index, rng) -> (image, label)."""

    def __len__(self) -> int:
        return 6

    def sample(self, index: int, rng: np.random.Generator) -> tuple[Any, Any]:
        img = rng.normal(0.0, 0.5, (1, 8, 8)).astype(np.float32)
        lab = (img[0] > 0.2).astype(np.int64)
        return torch.from_numpy(img + 0.1 * index), torch.from_numpy(lab)


def _objective(model: Any, batch: Any) -> Any:
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def _train(out: Path, batch_size: int) -> Any:
    from mskmri.nn.train import TrainConfig, fit, seed_everything
    from mskmri.nn.unet import UNet, UNetConfig

    seed_everything(0)
    model = UNet(UNetConfig(spatial_dims=2, out_channels=2, features=(4, 8), strides=(1, 2)))
    # SGD: linear in the gradient, so averaging over ranks equals one big batch up to rounding
    cfg = TrainConfig(out=out, steps=STEPS, batch_size=batch_size, lr=0.05, optimizer="sgd",
                      seed=7, device="cpu", log_every=1, checkpoint_every=2)
    return fit(model, _objective, Blobs(), cfg)


def _worker(out: Path) -> None:
    import torch.distributed as dist
    from _ddp_exit import finish_worker
    from safetensors.torch import save_file

    res = _train(out, BATCH)
    rank = dist.get_rank()
    state = {k: v.contiguous() for k, v in res.model.state_dict().items()}
    save_file(state, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"world": res.runtime.world_size,
                                                      "step": res.step}))
    finish_worker(out, rank)


@pytest.mark.torch
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    from _ddp_exit import ranks_done
    from safetensors.torch import load_file

    from mskmri.nn.train import load_checkpoint

    out = tmp_path / "ddp"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MSKMRI_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
           "--nproc_per_node=2", __file__, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"ranks done: {ranks_done(out)}\n{proc.stderr[-3000:]}"
    for r in (0, 1):
        assert json.loads((out / f"rank{r}.json").read_text()) == {"world": 2, "step": STEPS}
    w0, w1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"ranks disagree on {k}"
    # rank 0 alone wrote the shared files; the checkpoint holds both ranks' RNG states
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == STEPS and len(ckpt["rng"]) == 2
    log = (out / "train.log").read_text()
    assert "on cpu x2" in log and log.count("finished") == 1
    # one process with the same global batch (2 x 2) reaches the same weights
    single = _train(tmp_path / "single", 2 * BATCH).model.state_dict()
    for k, v in single.items():
        torch.testing.assert_close(w0[k], v, rtol=1e-4, atol=1e-6, msg=f"{k} differs")
    ddp_losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    one_losses = [json.loads(x)["loss"]
                  for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(ddp_losses, one_losses, rtol=1e-5)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
