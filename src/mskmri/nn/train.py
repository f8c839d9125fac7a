"""THE training loop of mskmri: every ``mskmri train ...`` task runs through :func:`fit`.

What it does, for any network and objective:

- seeded: model initialisation (by the caller, after :func:`seed_everything`), data order and
  every sample's augmentation are functions of ``config.seed`` and the step, so a run is
  reproducible and a resumed run continues exactly where the interrupted one was (bit-exact
  on CPU);
- resumable: a checkpoint (model, optimiser, scheduler, step, the RNG states of every rank,
  the config) is written atomically every ``checkpoint_every`` steps, at the end, and on
  Ctrl-C; ``resume`` continues from it;
- progress bar through :mod:`mskmri._progress`, log lines to ``OUT/train.log`` and the
  console, metrics to ``OUT/metrics.jsonl``;
- device ``"auto"`` uses CUDA when there is one; under ``torchrun`` it runs
  DistributedDataParallel (gloo on CPU, nccl on GPU), each rank on its own slice of every
  global batch, rank 0 writing all files;
- gradient clipping, bf16 autocast, a validation hook.

Data are a map-style dataset; a dataset with a ``sample(index, rng)`` method gets a
:class:`numpy.random.Generator` seeded from (seed, global sample position), which is how
on-the-fly synthesis and augmentation stay reproducible. Other datasets are called as
``dataset[index]`` with torch's, numpy's and Python's global generators seeded the same way.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import random
import shlex
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mskmri import __version__, _progress
from mskmri.errors import MskMriError

log = logging.getLogger(__name__)

#: Schema of checkpoint files.
CHECKPOINT_SCHEMA = "mskmri/checkpoint/1"
#: File names inside the output folder.
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train.log"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "train_config.json"
#: One line per start or resume of a run (its steps, schedule, batch): a model card's
#: ``command`` reproduces one segment only, so a resumed run lists its segments from here.
SEGMENTS_NAME = "segments.jsonl"
#: Exponent of the polynomial learning-rate decay (nnU-Net: 0.9).
POLY_EXPONENT = 0.9

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine", "poly")
AMP_MODES = ("none", "bf16")


class TrainingError(MskMriError):
    """Training cannot start or go on (bad options, a diverging loss, a foreign checkpoint)."""


# ============================================================================ config
@dataclass
class TrainConfig:
    """Options of one training run (the common ``mskmri train`` options and a few more).

    Parameters
    ----------
    out : path
        Output folder: checkpoint, log, metrics, final weights.
    steps : int
        Optimiser steps in total (a resumed run stops at the same total).
    batch_size : int
        Samples per step *per process* (the global batch is ``batch_size * world_size``).
    lr : float
        Peak learning rate.
    weight_decay : float
        Decoupled weight decay (AdamW) or L2 (SGD).
    optimizer : {"adamw", "sgd"}
        SGD uses Nesterov momentum 0.99 (nnU-Net).
    schedule : {"constant", "cosine", "poly"}
        Learning-rate decay over ``steps`` after ``warmup_steps`` linear warm-up.
    warmup_steps : int
    seed : int
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
    resume : str or None
        None: start fresh (an existing checkpoint in ``out`` is an error); ``"auto"``: continue
        from ``out/checkpoint.pt``; otherwise the path of a checkpoint.
    init : path or None
        safetensors weights to start from (e.g. a pretrained encoder), see
        :func:`mskmri.nn.registry.load_weights_into`.
    workers : int
        DataLoader worker processes (0: load in the training process).
    grad_clip : float or None
        Clip the global gradient norm to this (None: no clipping).
    amp : {"none", "bf16"}
        bf16 autocast for forward and loss.
    checkpoint_every, log_every, val_every : int
        Period in steps (``val_every=0``: validate only at the end, if a hook is given).
    """

    out: Path
    steps: int = 1000
    batch_size: int = 2
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    schedule: str = "poly"
    warmup_steps: int = 0
    seed: int = 0
    device: str = "auto"
    resume: str | None = None
    init: Path | None = None
    workers: int = 0
    grad_clip: float | None = 12.0
    amp: str = "none"
    checkpoint_every: int = 100
    log_every: int = 10
    val_every: int = 0

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.init is not None:
            self.init = Path(self.init)
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise TrainingError(f"{name} must be >= 1, not {getattr(self, name)}")
        for name in ("warmup_steps", "workers", "val_every"):
            if int(getattr(self, name)) < 0:
                raise TrainingError(f"{name} must be >= 0, not {getattr(self, name)}")
        if not self.lr > 0:
            raise TrainingError(f"lr must be > 0, not {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise TrainingError(f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise TrainingError(f"schedule must be one of {SCHEDULES}, not {self.schedule!r}")
        if self.amp not in AMP_MODES:
            raise TrainingError(f"amp must be one of {AMP_MODES}, not {self.amp!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise TrainingError(f"grad_clip must be > 0 or None, not {self.grad_clip}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of all options."""
        return [f.name for f in fields(cls)]


# ============================================================================ runtime
@dataclass(frozen=True)
class Runtime:
    """Where this process trains: device, rank and world size (1 without ``torchrun``)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """True under ``torchrun`` with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() \
            else torch.device("cpu")
    from mskmri.nn.registry import check_device

    dev = check_device(spec, TrainingError)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_runtime(device: str = "auto") -> Runtime:
    """Set up this process: device, and the process group when launched by ``torchrun``.

    ``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; the backend is nccl on GPUs
    and gloo on CPUs. Safe to call when the group already exists.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
        log.debug("rank %d/%d joined the %s process group", rank, world, backend)
    return Runtime(device=dev, rank=rank, world_size=world, local_rank=local)


def shutdown_runtime() -> None:
    """Leave the process group, if this process joined one, once every rank got here.

    Call it after the last collective: the barrier keeps a rank that finishes early from
    tearing its connections down while another still talks to it, and an explicit
    ``destroy_process_group`` keeps the teardown out of interpreter shutdown.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (call before building a model)."""
    random.seed(seed)
    # The legacy global numpy generator is seeded on purpose: third-party code draws from it.
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


# ============================================================================ data order
class SeededDataset(Protocol):
    """A dataset whose samples are drawn with an explicit generator (synthesis, augmentation)."""

    def __len__(self) -> int: ...

    def sample(self, index: int, rng: np.random.Generator) -> Any: ...


def sample_seed(seed: int, position: int) -> int:
    """The seed of the sample at global ``position`` of a run with ``seed`` (64-bit)."""
    return int(np.random.SeedSequence([seed, position]).generate_state(2, np.uint32)
               .view(np.uint64)[0])


class _StepBatches(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """Yields, for each step from ``start`` to ``steps``, this rank's ``(index, seed)`` keys.

    The global sample position of step ``s``, rank ``r``, slot ``b`` is
    ``(s * world + r) * batch + b``; positions run through seeded permutations of the
    dataset, one per epoch, so the order does not depend on where a run was resumed.
    """

    def __init__(self, n: int, batch: int, seed: int, start: int, steps: int,
                 rank: int, world: int) -> None:
        self.n, self.batch, self.seed = n, batch, seed
        self.start, self.steps, self.rank, self.world = start, steps, rank, world
        self._perm: tuple[int, np.ndarray] | None = None

    def _index(self, position: int) -> int:
        epoch, k = divmod(position, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return int(self._perm[1][k])

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for s in range(self.start, self.steps):
            base = (s * self.world + self.rank) * self.batch
            yield [(self._index(p), sample_seed(self.seed, p))
                   for p in range(base, base + self.batch)]


class _KeyedDataset(torch.utils.data.Dataset[Any]):
    """Maps ``(index, seed)`` keys to samples of the wrapped dataset."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if hasattr(self.dataset, "sample"):
            return self.dataset.sample(index, np.random.default_rng(seed))
        # Plain dataset: seed the global generators for this sample only, then restore them.
        py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                np.random.seed(seed % 2**32)  # noqa: NPY002
                torch.manual_seed(seed)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)  # noqa: NPY002


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside nested tuples, lists and dicts to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch) if not hasattr(batch, "_fields") \
            else type(batch)(*(to_device(v, device) for v in batch))
    return batch


# ============================================================================ schedule
class LRSchedule:
    """Learning-rate factor per step: linear warm-up, then constant, cosine or poly decay.

    A plain callable object (not a lambda) so LambdaLR's state holds its parameters.
    """

    def __init__(self, kind: str, steps: int, warmup: int) -> None:
        self.kind, self.steps, self.warmup = kind, steps, warmup

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        frac = min(max(step - self.warmup, 0) / max(self.steps - self.warmup, 1), 1.0)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return (1.0 - frac) ** POLY_EXPONENT


def _refresh_schedule(scheduler: Any, config: TrainConfig) -> None:
    """Make a resumed scheduler follow *this* run's schedule.

    ``LambdaLR.load_state_dict`` restores the saved :class:`LRSchedule`'s fields, so resuming
    with a larger ``steps`` would keep the old end (learning rate 0 past it). The schedule is
    reset to the current config and the optimiser's rates recomputed at the resumed step.
    """
    for fn in scheduler.lr_lambdas:
        if isinstance(fn, LRSchedule):
            if (fn.kind, fn.steps, fn.warmup) != (config.schedule, config.steps,
                                                  config.warmup_steps):
                log.info("schedule changed on resume: %s/%d/%d -> %s/%d/%d", fn.kind, fn.steps,
                         fn.warmup, config.schedule, config.steps, config.warmup_steps)
            fn.kind, fn.steps, fn.warmup = config.schedule, config.steps, config.warmup_steps
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                               scheduler.lr_lambdas, strict=True):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


def make_optimizer(params: Sequence[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum 0.99 (nnU-Net)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.99, nesterov=True,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


# ============================================================================ checkpoints
def _rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()  # noqa: NPY002  (the global one, saved for resume)
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np_state = ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                n["cached_gaussian"])
    np.random.set_state(np_state)  # noqa: NPY002
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, step: int, config: TrainConfig,
                    rng_states: list[dict[str, Any]]) -> Path:
    """Write a checkpoint atomically (loadable with ``torch.load(weights_only=True)``)."""
    from mskmri.io import atomic_path

    ckpt = {
        "schema": CHECKPOINT_SCHEMA,
        "step": step,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states,
        "config": json.dumps(config.to_dict()),
        "mskmri_version": __version__,
    }
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint without unpickling arbitrary objects (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"no checkpoint at {path} to resume from; start without --resume "
                            "or give the checkpoint's path")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises several types for a broken or foreign file
        raise TrainingError(f"{path} is not a readable mskmri checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("schema") != CHECKPOINT_SCHEMA:
        raise TrainingError(f"{path} is not an mskmri checkpoint (schema "
                            f"{ckpt.get('schema') if isinstance(ckpt, dict) else None!r}, "
                            f"expected {CHECKPOINT_SCHEMA!r})")
    return ckpt


def _gather_rng(rt: Runtime) -> list[dict[str, Any]]:
    mine = _rng_state()
    if not rt.distributed:
        return [mine]
    every: list[Any] = [None] * rt.world_size
    dist.all_gather_object(every, mine)
    return every


# ============================================================================ logging
@contextlib.contextmanager
def _log_file(path: Path | None) -> Iterator[None]:
    """Copy the ``mskmri`` log to ``path`` while the block runs."""
    if path is None:
        yield
        return
    root = logging.getLogger("mskmri")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    old_level = root.level
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def _append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


# ============================================================================ the loop
Objective = Callable[[nn.Module, Any], "torch.Tensor | tuple[torch.Tensor, Mapping[str, float]]"]
Validate = Callable[[nn.Module, int], Mapping[str, float]]


@dataclass(frozen=True)
class StepInfo:
    """Passed to hooks after every optimiser step."""

    step: int
    loss: float
    lr: float
    metrics: Mapping[str, float]
    runtime: Runtime


@dataclass
class TrainResult:
    """What :func:`fit` returns: the trained (unwrapped) model and the run's record."""

    model: nn.Module
    step: int
    out: Path
    runtime: Runtime
    history: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def segments(self) -> list[dict[str, Any]]:
        """Every start/resume of the run in ``out`` so far (see :data:`SEGMENTS_NAME`)."""
        path = self.out / SEGMENTS_NAME
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]


def fit(model: nn.Module, objective: Objective, dataset: Any, config: TrainConfig, *,
        validate: Validate | None = None, collate: Callable[[list[Any]], Any] | None = None,
        hooks: Sequence[Callable[[StepInfo], None]] = (), runtime: Runtime | None = None,
        command: str | None = None) -> TrainResult:
    """Train ``model`` on ``dataset`` by minimising ``objective`` for ``config.steps`` steps.

    Parameters
    ----------
    model : nn.Module
        Built and seeded by the caller (:func:`seed_everything` first). Only parameters with
        ``requires_grad`` are optimised (freeze a teacher by switching it off).
    objective : callable
        ``objective(model, batch) -> loss`` or ``(loss, {name: float})``. ``model`` is the
        DistributedDataParallel wrapper under ``torchrun``: call ``model(...)`` for the
        forward pass (gradients are synchronised there); ``batch`` is already on the device.
    dataset : map-style dataset
        ``len()`` and ``dataset[i]``, or :class:`SeededDataset` (``sample(index, rng)``).
    config : TrainConfig
    validate : callable, optional
        ``validate(model, step) -> {metric: value}``, run on rank 0 in eval mode under
        ``torch.no_grad`` every ``val_every`` steps and at the end.
    collate : callable, optional
        DataLoader collate function (default: torch's).
    hooks : sequence of callable
        Called with :class:`StepInfo` after every step (on every rank).
    runtime : Runtime, optional
        From :func:`init_runtime`; made here when omitted.
    command : str, optional
        The command line recorded in ``train_config.json``.

    Returns
    -------
    TrainResult
    """
    t_begin = time.perf_counter()
    rt = runtime or init_runtime(config.device)
    out = config.out
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT_NAME
    resume_from: Path | None = None
    if config.resume is not None:
        resume_from = ckpt_path if config.resume == "auto" else Path(config.resume)
    elif ckpt_path.exists():
        raise TrainingError(f"{out} already holds a checkpoint; pass --resume to continue it "
                            "or choose another --out")
    if len(dataset) == 0:
        raise TrainingError("the training dataset is empty; check the --images/--data options")

    with _log_file(out / LOG_NAME if rt.is_main else None):
        model.to(rt.device)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise TrainingError("the model has no trainable parameters")
        optimizer = make_optimizer(params, config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, LRSchedule(config.schedule, config.steps, config.warmup_steps))
        start = 0
        if resume_from is not None:
            ckpt = load_checkpoint(resume_from, rt.device)
            unwrap(model).load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            _refresh_schedule(scheduler, config)
            start = int(ckpt["step"])
            rngs = ckpt["rng"]
            if len(rngs) == rt.world_size:
                _set_rng_state(rngs[rt.rank])
            else:
                log.warning("checkpoint was written by %d processes, now %d: random streams "
                            "restart from the seed", len(rngs), rt.world_size)
                seed_everything(config.seed + 1_000_003 * start + rt.rank)
            log.info("resumed from %s at step %d of %d", resume_from, start, config.steps)
        else:
            if config.init is not None:
                from mskmri.nn.registry import load_weights_into

                load_weights_into(unwrap(model), config.init)
            seed_everything(config.seed + rt.rank)  # dropout etc.; init was seeded by caller
        if rt.is_main:
            from mskmri.io import atomic_write_json

            atomic_write_json(out / CONFIG_NAME, {
                "schema": "mskmri/train-config/1", "config": config.to_dict(),
                "command": command, "world_size": rt.world_size, "device": str(rt.device),
                "torch": torch.__version__, "mskmri_version": __version__,
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "start_step": start})
            if start < config.steps:
                with open(out / SEGMENTS_NAME, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({
                        "start_step": start, "steps": config.steps,
                        "batch_size": config.batch_size, "lr": config.lr,
                        "schedule": config.schedule, "warmup_steps": config.warmup_steps,
                        "world_size": rt.world_size,
                        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(
                            timespec="seconds")}) + "\n")
        if start >= config.steps:
            log.info("nothing to do: checkpoint is at step %d of %d", start, config.steps)
            return TrainResult(unwrap(model), start, out, rt,
                               seconds=time.perf_counter() - t_begin)

        net: nn.Module = model
        if rt.distributed:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        sampler = _StepBatches(len(dataset), config.batch_size, config.seed, start,
                               config.steps, rt.rank, rt.world_size)
        loader = torch.utils.data.DataLoader(
            _KeyedDataset(dataset), batch_sampler=sampler, num_workers=config.workers,
            collate_fn=collate, pin_memory=rt.device.type == "cuda",
            persistent_workers=False,
            # Its own generator: creating the iterator must not draw from the global torch
            # RNG, or a resumed run's dropout stream would differ from an uninterrupted one.
            generator=torch.Generator().manual_seed(config.seed))
        result = TrainResult(unwrap(model), start, out, rt)
        amp = torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=config.amp == "bf16")
        log.info("training %s for steps %d..%d on %s x%d, batch %d/process, lr %g",
                 type(unwrap(model)).__name__, start + 1, config.steps, rt.device,
                 rt.world_size, config.batch_size, config.lr)
        step = start
        saved_at = start
        window_t = time.perf_counter()
        batches = iter(loader)
        steps_iter = range(start, config.steps)
        if rt.is_main:
            steps_iter = _progress.progress(steps_iter, desc="train",  # type: ignore[assignment]
                                            total=config.steps - start)
        try:
            for step0 in steps_iter:
                batch = to_device(next(batches), rt.device)
                net.train()
                with amp:
                    res = objective(net, batch)
                loss, metrics = res if isinstance(res, tuple) else (res, {})
                if not torch.isfinite(loss.detach()):
                    raise TrainingError(f"loss is {loss.item()} at step {step0 + 1}; lower --lr, "
                                        "enable gradient clipping, or check the data")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = float("nan")
                if config.grad_clip is not None:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                step = step0 + 1
                loss_value = float(loss.detach())
                if step % config.log_every == 0 or step == config.steps:
                    loss_value = _mean_over_ranks(loss_value, rt)
                    now = time.perf_counter()
                    record = {"step": step, "loss": loss_value, "lr": lr,
                              "grad_norm": grad_norm,
                              "s_per_step": (now - window_t) / config.log_every,
                              **{k: float(v) for k, v in metrics.items()}}
                    window_t = now
                    result.history.append(record)
                    if rt.is_main:
                        _append_jsonl(out / METRICS_NAME, {"kind": "train", **record})
                        log.info("step %d/%d loss %.5g lr %.3g", step, config.steps,
                                 loss_value, lr)
                if validate is not None and (step == config.steps or (
                        config.val_every and step % config.val_every == 0)):
                    _run_validation(net, validate, step, rt, result, amp)
                if step % config.checkpoint_every == 0 or step == config.steps:
                    rngs = _gather_rng(rt)
                    if rt.is_main:
                        save_checkpoint(ckpt_path, model=net, optimizer=optimizer,
                                        scheduler=scheduler, step=step, config=config,
                                        rng_states=rngs)
                    saved_at = step
                info = StepInfo(step, loss_value, lr, metrics, rt)
                for hook in hooks:
                    hook(info)
        except KeyboardInterrupt:
            if not rt.distributed and step > saved_at:
                save_checkpoint(ckpt_path, model=net, optimizer=optimizer, scheduler=scheduler,
                                step=step, config=config, rng_states=_gather_rng(rt))
                log.warning("interrupted: checkpoint at step %d written to %s; continue with "
                            "--resume", step, ckpt_path)
            raise
        finally:
            del batches
        result.step = step
        result.seconds = time.perf_counter() - t_begin
        log.info("finished %d steps in %.1f s", step - start, result.seconds)
        return result


def _mean_over_ranks(value: float, rt: Runtime) -> float:
    if not rt.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return float(t.item()) / rt.world_size


def _run_validation(net: nn.Module, validate: Validate, step: int, rt: Runtime,
                    result: TrainResult, amp: Any) -> None:
    if rt.is_main:
        module = unwrap(net)
        module.eval()
        t0 = time.perf_counter()
        with torch.no_grad(), amp:
            metrics = {k: float(v) for k, v in validate(module, step).items()}
        module.train()
        record = {"step": step, **metrics, "seconds": time.perf_counter() - t0}
        result.validation.append(record)
        _append_jsonl(result.out / METRICS_NAME, {"kind": "validation", **record})
        log.info("validation at step %d: %s", step,
                 ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    if rt.distributed:
        dist.barrier()


# ============================================================================ CLI glue
def format_command(task: str, config: TrainConfig, options: Mapping[str, Any]) -> str:
    """The full ``mskmri train`` command line that reproduces a run (for model cards)."""
    parts = ["mskmri", "train", task, "--out", str(config.out), "--steps", str(config.steps),
             "--batch-size", str(config.batch_size), "--lr", repr(config.lr),
             "--seed", str(config.seed), "--workers", str(config.workers), "--amp", config.amp]
    if config.init is not None:
        parts += ["--init", str(config.init)]
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def run_task(name: str, config: TrainConfig, options: Mapping[str, Any]) -> Any:
    """Run the registered training task ``name`` (what ``mskmri train NAME`` calls)."""
    from mskmri.nn.registry import train_entry, train_task

    task = train_task(name)
    entry = train_entry(task)
    result = entry(config, dict(options))
    shutdown_runtime()
    return result
