"""Registries of architectures, shipped models and trainable tasks; saving and loading weights.

Everything here is data the command line can read without torch: :data:`ARCHITECTURES` maps
an architecture name to the class that builds it (``"module:Class"``, imported on use),
:data:`TRAIN_TASKS` maps an ``mskmri train`` subcommand to the function that runs it, and
:data:`mskmri.weights.MODELS` maps a shipped model's name to its weight file. torch and
safetensors are imported inside the functions that need them.

Weights are stored as safetensors (never pickled) beside a model card ``<name>.json`` with
schema :data:`MODEL_CARD_SCHEMA`. :func:`load_model` checks the card (schema, architecture,
config, sha256) before any tensor reaches a network.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import hashlib
import importlib
import json
import logging
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mskmri import __version__
from mskmri.errors import ModelError, MskMriError
from mskmri.weights import MODEL_SIZE_BUDGET_MB, MODELS, ModelEntry

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

log = logging.getLogger(__name__)

#: Schema string of model cards written by this version.
MODEL_CARD_SCHEMA = "mskmri/model-card/1"
#: Key prefix of an encoder inside a segmentation network (``UNet.encoder``).
ENCODER_PREFIX = "encoder."
#: Bytes per MB in size budgets.
_MB = 1_000_000

#: Architecture name -> ``"module:Class"``; the class has ``from_config_dict(dict)`` and
#: ``config_dict()``. Later issues add theirs here (MAE-ViT, pretraining network, ...).
ARCHITECTURES: dict[str, str] = {
    "unet": "mskmri.nn.unet:UNet",
    "unet-encoder": "mskmri.nn.unet:UNetEncoder",
    "ffc-inpainter": "mskmri.nn.ffc:FFCInpainter",
    "pretrain-net": "mskmri.pretrain.model:PretrainNet",
    "mae-vit": "mskmri.anomaly.mae_net:MaskedAutoencoderViT",
}


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _import_target(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


# ============================================================================ model cards
@dataclass
class ModelCard:
    """What a weight file is, how it was made and how to feed it (JSON beside the weights).

    Parameters
    ----------
    name : str
        Model name (e.g. ``"knee-seg-fine"``).
    task : str
        The ``mskmri train`` task that made it (``"knee-seg"``, ``"inpaint"``, ...).
    input_spacing_mm : list of float or None
        Voxel spacing the network expects, mm per array axis; None for spacing-free models.
    normalisation : dict
        How intensities are normalised before the network, e.g.
        ``{"method": "percentile", "low": 0.5, "high": 99.5}``.
    label_schema : str
        ``"knee"``, ``"spine"`` (see :mod:`mskmri.labels`), or ``"none"`` for image outputs.
    labels : dict
        Output channel -> name (``{"0": "background", "1": "femur", ...}``); empty for images.
    training_data : list of dict
        Each ``{"name": ..., "licence": ...}`` (and optionally ``"n"``, ``"notes"``).
    command : str
        The exact command that trained it.
    seed : int
        Its seed.
    validation : dict
        Validation figures (metric -> value, with units or the metric's name).
    architecture, config : str, dict
        Filled by :func:`save_model` from the model.
    created, sha256, mskmri_version : str
        Filled by :func:`save_model`.
    notes : str
        Anything a user must know (losses chosen and why, proxy teacher, limits).
    extra : dict
        Task-specific fields (patch size, thresholds, ...).
    """

    name: str
    task: str
    input_spacing_mm: list[float] | None
    normalisation: dict[str, Any]
    label_schema: str
    labels: dict[str, str]
    training_data: list[dict[str, Any]]
    command: str
    seed: int
    validation: dict[str, Any] = field(default_factory=dict)
    architecture: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    sha256: str = ""
    mskmri_version: str = ""
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with ``"schema"`` first."""
        return {"schema": MODEL_CARD_SCHEMA, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "model card") -> ModelCard:
        """Validate and build; raises :class:`ModelError` naming what is wrong."""
        schema = data.get("schema")
        if schema != MODEL_CARD_SCHEMA:
            raise ModelError(f"{source} has schema {schema!r}, expected {MODEL_CARD_SCHEMA!r}; "
                             "re-save the model with this mskmri version")
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls)
                    if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ModelError(f"{source} lacks required fields {missing}")
        unknown = sorted(set(data) - names - {"schema"})
        if unknown:
            raise ModelError(f"{source} has unknown fields {unknown}; known: {sorted(names)}")
        card = cls(**{k: v for k, v in data.items() if k != "schema"})
        card.validate(source=source)
        return card

    def validate(self, *, source: str = "model card") -> None:
        """Check field types and the training-data licences."""
        if self.input_spacing_mm is not None and (
                not isinstance(self.input_spacing_mm, (list, tuple))
                or not all(isinstance(s, (int, float)) and s > 0 for s in self.input_spacing_mm)):
            raise ModelError(f"{source}: input_spacing_mm must be a list of positive mm values "
                             f"or null, not {self.input_spacing_mm!r}")
        if not isinstance(self.normalisation, dict) or "method" not in self.normalisation:
            raise ModelError(f"{source}: normalisation must be a dict with a 'method', not "
                             f"{self.normalisation!r}")
        if not isinstance(self.training_data, list) or not all(
                isinstance(d, dict) and d.get("name") and d.get("licence")
                for d in self.training_data):
            raise ModelError(f"{source}: training_data must list {{'name', 'licence'}} dicts, "
                             f"not {self.training_data!r}")
        if not isinstance(self.seed, int):
            raise ModelError(f"{source}: seed must be an integer, not {self.seed!r}")
        if not self.command:
            raise ModelError(f"{source}: command (how the weights were trained) is empty")


def card_path(weights: str | Path) -> Path:
    """The model card beside a weight file: ``x.safetensors`` -> ``x.json``."""
    return Path(weights).with_suffix(".json")


def read_card(weights: str | Path) -> ModelCard:
    """Read and validate the model card beside ``weights``."""
    cpath = card_path(weights)
    if not cpath.is_file():
        raise ModelError(f"model card {cpath} is missing; every weight file needs its card "
                         "(written by mskmri.nn.registry.save_model)")
    try:
        data = json.loads(cpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"model card {cpath} is not readable JSON ({exc}); re-save the model")\
            from exc
    return ModelCard.from_dict(data, source=f"model card {cpath}")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_MB), b""):
            h.update(block)
    return h.hexdigest()


# ============================================================================ architectures
def architecture_class(name: str) -> Any:
    """The class registered under ``name`` in :data:`ARCHITECTURES`."""
    if name not in ARCHITECTURES:
        raise ModelError(f"unknown architecture {name!r}{_did_you_mean(name, list(ARCHITECTURES))}"
                         f"; known: {sorted(ARCHITECTURES)}")
    return _import_target(ARCHITECTURES[name])


def build_model(architecture: str, config: Mapping[str, Any]) -> nn.Module:
    """Build an untrained network from an architecture name and its config dict."""
    cls = architecture_class(architecture)
    try:
        return cls.from_config_dict(dict(config))  # type: ignore[no-any-return]
    except TypeError as exc:
        raise ModelError(f"config does not fit architecture {architecture!r}: {exc}") from exc


def _architecture_of(model: nn.Module) -> tuple[str, dict[str, Any]]:
    name = getattr(model, "architecture", None)
    if not isinstance(name, str) or not hasattr(model, "config_dict"):
        raise ModelError(f"{type(model).__name__} has no `architecture` name and `config_dict()`;"
                         " only registered architectures can be saved (see ARCHITECTURES)")
    return name, model.config_dict()  # type: ignore[operator]


def _state_signature(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


# ============================================================================ save / load
def save_model(model: nn.Module, path: str | Path, card: ModelCard) -> Path:
    """Write ``model``'s weights as safetensors and its card beside them, atomically.

    Parameters
    ----------
    model : nn.Module
        A registered architecture (has ``architecture`` and ``config_dict()``).
    path : path
        Target ``*.safetensors``; the card goes to ``*.json`` beside it.
    card : ModelCard
        Its ``architecture``/``config`` are filled from the model (an existing, different
        value is an error); ``sha256``, ``created`` and ``mskmri_version`` are filled here.

    Returns
    -------
    Path
        The weight file.
    """
    from safetensors.torch import save_file

    from mskmri.io import atomic_path, atomic_write_json

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelError(f"weights are saved as .safetensors, not {path.name!r}")
    arch, config = _architecture_of(model)
    if card.architecture and card.architecture != arch:
        raise ModelError(f"card says architecture {card.architecture!r} but the model is {arch!r}")
    if card.config and card.config != config:
        raise ModelError(f"card config {card.config} differs from the model's {config}")
    card.validate(source=f"card for {path.name}")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # The card must rebuild exactly this network: check before anything is written.
    rebuilt = build_model(arch, config).state_dict()
    if _state_signature(rebuilt) != _state_signature(state):
        raise ModelError(f"the {arch!r} config {config} does not rebuild this model's tensors; "
                         "was the model changed after it was built?")
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"schema": MODEL_CARD_SCHEMA,
                                             "architecture": arch, "name": card.name})
        digest = sha256_file(tmp)
        size_mb = tmp.stat().st_size / _MB
    if size_mb > MODEL_SIZE_BUDGET_MB:
        log.warning("%s is %.1f MB, over the %.0f MB budget of a shipped model",
                    path, size_mb, MODEL_SIZE_BUDGET_MB)
    card.architecture, card.config = arch, config
    card.sha256 = digest
    card.created = card.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    card.mskmri_version = __version__
    atomic_write_json(card_path(path), card.to_dict())
    log.info("saved %s (%s, %.1f MB) and its card", path, arch, size_mb)
    return path


def resolve_weights(name_or_path: str | Path) -> tuple[Path, ModelEntry | None]:
    """Find the weight file of a registered model name or a path.

    Raises :class:`ModelError` when it is missing, naming the command that makes it.
    """
    key = str(name_or_path)
    entry = MODELS.get(key)
    if entry is not None:
        path = entry.path
        if not path.is_file():
            raise ModelError(
                f"weights of model {key!r} are missing (expected {path}); make them with "
                f"`mskmri train {entry.task} --out DIR` and copy DIR/model.safetensors and "
                f"DIR/model.json to {path.with_suffix('')}.*, or reinstall mskmri")
        return path, entry
    path = Path(name_or_path)
    if path.is_file():
        return path, None
    if path.suffix == ".safetensors" or "/" in key or path.suffix:
        raise ModelError(f"no weight file at {path}; give an existing *.safetensors file or a "
                         f"registered model name ({sorted(MODELS) or 'none registered yet'})")
    raise ModelError(f"no model named {key!r}{_did_you_mean(key, list(MODELS))}; registered "
                     f"models: {sorted(MODELS) or 'none yet'}; or give a *.safetensors path")


def check_device(device: str, error: type[MskMriError] = ModelError) -> torch.device:
    """``device`` as a torch device, or ``error`` when it is not one usable here.

    Checked before anything is loaded or trained, so ``--device cuda`` on a machine without
    CUDA (or a misspelt device) is one clear line, not a traceback from deep inside torch.
    Shared by :func:`load_model` and :func:`mskmri.nn.train.resolve_device`.

    Parameters
    ----------
    device : str
        ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ...
    error : type
        The :class:`~mskmri.errors.MskMriError` subclass raised.
    """
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise error(f"--device {device!r} is not a torch device; use cpu, cuda or "
                    "cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error(f"--device {device} asked for, but CUDA is not available on this "
                    "machine (or this torch build); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise error(f"--device {device}: this machine has "
                    f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def load_model(name_or_path: str | Path, *, device: str = "cpu",
               verify: bool = True) -> tuple[nn.Module, ModelCard]:
    """Load a registered model or a ``*.safetensors`` file with its card; never unpickles.

    Parameters
    ----------
    name_or_path : str or path
        A name in :data:`mskmri.weights.MODELS` or a weight file with its ``.json`` card.
    device : str
        Where to put the model (``"cpu"``, ``"cuda"``, ...).
    verify : bool
        Check the file's sha256 against the card.

    Returns
    -------
    model : nn.Module
        In eval mode, on ``device``.
    card : ModelCard

    Raises
    ------
    ModelError
        Unknown model, missing or altered weights, a card that does not fit, or a device
        that is not usable here (:func:`check_device`).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_device(device)
    path, _ = resolve_weights(name_or_path)
    card = read_card(path)
    if verify:
        digest = sha256_file(path)
        if card.sha256 and digest != card.sha256:
            raise ModelError(f"{path} does not match its card (sha256 {digest[:12]}... vs "
                             f"{card.sha256[:12]}...); the file was changed or truncated: "
                             "re-copy or re-train it")
    model = build_model(card.architecture, card.config)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path} is not a readable safetensors file ({exc})") from exc
    want, got = _state_signature(model.state_dict()), _state_signature(state)
    if want != got:
        missing = sorted(set(want) - set(got))[:5]
        unexpected = sorted(set(got) - set(want))[:5]
        shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])[:5]
        raise ModelError(f"{path} does not fit the {card.architecture!r} config of its card: "
                         f"missing {missing}, unexpected {unexpected}, other shapes {shapes}")
    model.load_state_dict(state, strict=True)
    log.debug("loaded %s (%s)", path, card.architecture)
    return model.to(device).eval(), card


def load_weights_into(model: nn.Module, path: str | Path) -> dict[str, int]:
    """Initialise ``model`` from a safetensors file whose tensors fit part of it (``--init``).

    Keys are matched as they are, with ``encoder.`` added (a bare encoder's weights into a
    U-Net) or with ``encoder.`` removed (a U-Net's or a pretraining network's encoder into a
    bare encoder); the mapping that matches most keys wins. Tensors without a partner are
    skipped and counted.

    Returns
    -------
    dict
        ``{"loaded": n, "skipped": n, "not_initialised": n}`` tensor counts.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no weight file at {path} for --init; give a *.safetensors file "
                         "written by `mskmri train ...`")
    if card_path(path).is_file():
        read_card(path)  # validates the card when there is one
    try:
        src = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path} is not a readable safetensors file ({exc})") from exc
    dst = model.state_dict()

    def mapped(fn: Any) -> dict[str, str]:
        return {fn(k): k for k in src if fn(k) in dst}

    candidates = [
        mapped(lambda k: k),
        mapped(lambda k: ENCODER_PREFIX + k),
        mapped(lambda k: k[len(ENCODER_PREFIX):] if k.startswith(ENCODER_PREFIX) else "\0"),
    ]
    best = max(candidates, key=len)
    if not best:
        raise ModelError(f"no tensor of {path} fits {type(model).__name__} (checked with and "
                         "without the 'encoder.' prefix); is it the same architecture?")
    bad = [k for k, s in best.items() if tuple(src[s].shape) != tuple(dst[k].shape)]
    if bad:
        raise ModelError(f"{len(bad)} tensors of {path} have other shapes than the model's "
                         f"(first: {bad[0]} {tuple(src[best[bad[0]]].shape)} vs "
                         f"{tuple(dst[bad[0]].shape)}); the architecture configs differ")
    model.load_state_dict({k: src[s] for k, s in best.items()}, strict=False)
    counts = {"loaded": len(best), "skipped": len(src) - len(best),
              "not_initialised": len(dst) - len(best)}
    log.info("initialised %d tensors from %s (%d skipped, %d left as initialised)",
             counts["loaded"], path, counts["skipped"], counts["not_initialised"])
    return counts


# ============================================================================ train tasks
@dataclass(frozen=True)
class TrainOption:
    """A task-specific ``mskmri train TASK`` option: ``parser.add_argument(*flags, **kwargs)``."""

    flags: tuple[str, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainTask:
    """One ``mskmri train`` subcommand.

    Parameters
    ----------
    name : str
        Subcommand (``"knee-seg"``).
    help : str
        One line for ``mskmri train --help``.
    entry : str
        ``"module:function"`` called as ``function(config: TrainConfig, options: dict)``
        (imported only when the task runs). It calls ``seed_everything(config.seed)``, builds
        the network, trains it with :func:`mskmri.nn.train.fit` and writes
        ``model.safetensors`` + ``model.json`` under ``config.out`` with :func:`save_model`,
        the card's ``command`` from :func:`mskmri.nn.train.format_command`.
    options : tuple of TrainOption
        Options of this task beyond the common ones (``--images`` ...).
    defaults : mapping
        Task defaults for common options the user leaves out (``{"steps": 20000}``).
    """

    name: str
    help: str
    entry: str
    options: tuple[TrainOption, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)


#: ``mskmri train`` subcommand -> task. Issues that add a trainable model register it here
#: (knee-seg, spine-seg, inpaint, mkd, mae, pretrain); the parser reads this table.
TRAIN_TASKS: dict[str, TrainTask] = {}

#: ``--threads``, shared by every training task.
THREADS_OPTION = TrainOption(("--threads",), {"type": int, "help": "torch CPU threads"})
#: ``--data`` of the tasks that read ``shared/data/spine``.
SPINE_DATA_OPTION = TrainOption(("--data",), {
    "metavar": "DIR", "help": "shared data folder holding spine/ (default: the configured "
    "shared data)"})

TRAIN_TASKS["pretrain"] = TrainTask(
    name="pretrain",
    help="self-supervised pretraining of the U-Net encoder by distortion restoration "
         "(unlabelled images; writes encoder weights for --init)",
    entry="mskmri.pretrain.task:run",
    options=(
        TrainOption(("--images",), {"nargs": "+", "required": True, "metavar": "PATH",
                                    "help": "unlabelled image files or folders (labels unused; "
                                            "*_gt*, *label*, *seg* files in folders skipped)"}),
        TrainOption(("--dims",), {"type": int, "choices": [2, 3], "help": "2: slices (volumes "
                                  "are cut, 2-D images mix in; default), 3: volumes only"}),
        TrainOption(("--spacing-mm",), {"type": float, "help": "resample to this in-plane "
                                        "(2-D) / isotropic (3-D) spacing, mm; 0 keeps each "
                                        "grid (default 1.0)"}),
        TrainOption(("--patch",), {"type": int, "help": "crop edge, voxels (96 in 2-D, 64 "
                                   "in 3-D)"}),
        TrainOption(("--features",), {"type": int, "nargs": "+", "help": "U-Net channels per "
                                      "level; must match the network fine-tuned later "
                                      "(default 16 32 64 128)"}),
        TrainOption(("--unknown-geometry",), {"choices": ["error", "native"],
                                              "help": "images without spacing: stop (default) "
                                                      "or use them at their pixel grid"}),
        TrainOption(("--name",), {"help": "model name in the card (pretrain-encoder)"}),
    ),
    defaults={"steps": 5000, "batch_size": 8, "lr": 1e-3, "schedule": "cosine",
              "checkpoint_every": 250, "seed": 0},
)

TRAIN_TASKS["spine-seg"] = TrainTask(
    name="spine-seg",
    help="2-D U-Net for vertebral bodies, sacrum, discs, cord and CSF on sagittal spine MRI "
         "(real, partially labelled sources; marginal loss)",
    entry="mskmri.segment.spine_train:run",
    options=(
        SPINE_DATA_OPTION,
        THREADS_OPTION,
        TrainOption(("--u2ad-fold",), {"choices": ["a", "b", "none"],
                                       "help": "U2AD slices trained on (default a; see "
                                               "segment._spine_data.U2AD_FOLDS)"}),
        TrainOption(("--warm-start",), {"metavar": "PATH", "help": "earlier spine-seg "
                                        "*.safetensors: fitting tensors copied, the output "
                                        "layer extended"}),
    ),
    defaults={"steps": 1800, "batch_size": 8, "lr": 2e-3, "val_every": 300,
              "checkpoint_every": 300, "seed": 0, "device": "cpu"},
)

TRAIN_TASKS["knee-seg"] = TrainTask(
    name="knee-seg",
    help="coarse-to-fine 3-D U-Nets for the 17 knee classes, trained on renders of the real "
         "knee label maps (mskmri.synth)",
    entry="mskmri.segment.knee_train:run",
    options=(
        TrainOption(("--data",), {"metavar": "DIR", "help": "shared/data/knee folder "
                                  "(default: the configured shared data)"}),
        TrainOption(("--cache",), {"metavar": "DIR", "help": "render cache folder "
                                   "(default OUT/cache; never inside the repository)"}),
        TrainOption(("--renders",), {"type": int, "help": "distinct training renders (400)"}),
        TrainOption(("--val-renders",), {"type": int, "help": "validation renders (6)"}),
        TrainOption(("--stage",), {"choices": ["coarse", "fine", "both"],
                                   "help": "which network to train (both)"}),
        TrainOption(("--coarse-steps",), {"type": int, "help": "steps of the coarse network "
                                          "(default steps/4)"}),
        THREADS_OPTION,
    ),
    defaults={"steps": 20000, "batch_size": 2, "lr": 2e-3, "val_every": 500,
              "checkpoint_every": 100, "seed": 0, "workers": 1},
)


TRAIN_TASKS["inpaint"] = TrainTask(
    name="inpaint",
    help="2-D FFC (LaMa-style) inpainter of healthy femoral marrow for BML detection, trained "
         "on lesion-free renders of the OAI training subjects (mskmri.synth)",
    entry="mskmri.anomaly.inpaint_train:run",
    options=(
        TrainOption(("--data",), {"metavar": "DIR", "help": "OAI lesion label-map folder "
                                  "(default: the configured shared data)"}),
        TrainOption(("--cache",), {"metavar": "DIR", "help": "render cache folder "
                                   "(default OUT/cache; never inside the repository)"}),
        TrainOption(("--renders",), {"type": int, "help": "distinct lesion-free renders (8)"}),
        TrainOption(("--width",), {"type": int, "help": "channels after the stem (16)"}),
        TrainOption(("--blocks",), {"type": int, "help": "residual FFC blocks (3)"}),
        TrainOption(("--name",), {"help": "model name in the card (bml-inpaint)"}),
        THREADS_OPTION,
    ),
    defaults={"steps": 3000, "batch_size": 8, "lr": 1e-3, "schedule": "cosine",
              "checkpoint_every": 100, "seed": 0},
)


TRAIN_TASKS["mkd"] = TrainTask(
    name="mkd",
    help="MKD baseline of the BML detector: 2-D student distilled from the frozen "
         "bml-mkd-teacher (a pretrained encoder) on lesion-free femur renders (mskmri.synth)",
    entry="mskmri.anomaly.mkd_train:run",
    options=(
        TrainOption(("--data",), {"metavar": "DIR", "help": "OAI lesion label-map folder "
                                  "(default: the configured shared data)"}),
        TrainOption(("--cache",), {"metavar": "DIR", "help": "render cache folder "
                                   "(default OUT/cache; never inside the repository)"}),
        TrainOption(("--renders",), {"type": int, "help": "distinct lesion-free renders (4)"}),
        TrainOption(("--val-renders",), {"type": int, "help": "validation renders for the "
                                         "threshold (2; 0: no calibration)"}),
        TrainOption(("--name",), {"help": "model name in the card (bml-mkd)"}),
        THREADS_OPTION,
    ),
    defaults={"steps": 1500, "batch_size": 8, "lr": 1e-3, "schedule": "cosine",
              "checkpoint_every": 100, "seed": 0, "device": "cpu"},
)

TRAIN_TASKS["vertebra-inpaint"] = TrainTask(
    name="vertebra-inpaint",
    help="2-D FFC painter of a vertebral body's pseudo-healthy shape from its neighbours "
         "(real spine label maps; used by fracture grading, mskmri.measure.grading)",
    entry="mskmri.anomaly.vertebra_inpaint:run",
    options=(
        SPINE_DATA_OPTION,
        TrainOption(("--sections",), {"type": int, "help": "augmented training sections "
                                      "(4000)"}),
        TrainOption(("--width",), {"type": int, "help": "channels after the stem (16)"}),
        TrainOption(("--blocks",), {"type": int, "help": "residual FFC blocks (3)"}),
        TrainOption(("--name",), {"help": "model name in the card (vertebra-inpaint)"}),
        THREADS_OPTION,
    ),
    defaults={"steps": 2000, "batch_size": 16, "lr": 2e-3, "schedule": "cosine",
              "checkpoint_every": 100, "seed": 0, "device": "cpu"},
)


TRAIN_TASKS["mae"] = TrainTask(
    name="mae",
    help="ViT masked autoencoder of cord T2 hyperintensity detection (U2AD), trained on "
         "healthy cords only (SCT T2 + U2AD public slices); calibrates its z threshold",
    entry="mskmri.anomaly.mae_train:run",
    options=(
        SPINE_DATA_OPTION,
        TrainOption(("--dim",), {"type": int, "help": "encoder width (128)"}),
        TrainOption(("--depth",), {"type": int, "help": "encoder layers (4)"}),
        TrainOption(("--name",), {"help": "model name in the card (cord-mae)"}),
        THREADS_OPTION,
    ),
    defaults={"steps": 2000, "batch_size": 16, "lr": 5e-4, "schedule": "cosine",
              "warmup_steps": 100, "checkpoint_every": 200, "seed": 0, "device": "cpu",
              "weight_decay": 0.05},
)


def train_task(name: str) -> TrainTask:
    """The registered task ``name``; a helpful error otherwise."""
    if name not in TRAIN_TASKS:
        raise ModelError(f"no training task {name!r}{_did_you_mean(name, list(TRAIN_TASKS))}; "
                         f"registered: {sorted(TRAIN_TASKS) or 'none yet'}")
    return TRAIN_TASKS[name]


def train_entry(task: TrainTask) -> Any:
    """Import and return the function that runs ``task``."""
    return _import_target(task.entry)


#: Options every ``mskmri train TASK`` takes; each ``dest`` is a :class:`TrainConfig` field.
#: Defaults are None here: the task's ``defaults``, then TrainConfig's, fill what is left out.
COMMON_TRAIN_OPTIONS: tuple[TrainOption, ...] = (
    TrainOption(("--out",), {"required": True, "metavar": "DIR",
                             "help": "output folder: checkpoint, log, metrics, final weights"}),
    TrainOption(("--steps",), {"type": int, "help": "optimiser steps in total"}),
    TrainOption(("--batch-size",), {"type": int, "help": "samples per step per process"}),
    TrainOption(("--lr",), {"type": float, "help": "peak learning rate"}),
    TrainOption(("--seed",), {"type": int, "help": "seed of initialisation, data order and "
                                                   "augmentation"}),
    TrainOption(("--device",), {"help": "auto (CUDA when available, default), cpu, cuda, "
                                        "cuda:N"}),
    TrainOption(("--resume",), {"nargs": "?", "const": "auto", "metavar": "CHECKPOINT",
                                "help": "continue from OUT/checkpoint.pt (or the given one)"}),
    TrainOption(("--init",), {"metavar": "WEIGHTS", "help": "start from these safetensors "
                                                            "weights (e.g. a pretrained encoder)"}),
    TrainOption(("--workers",), {"type": int, "help": "data-loading worker processes"}),
    TrainOption(("--amp",), {"choices": ["none", "bf16"], "help": "bf16 autocast"}),
    TrainOption(("--checkpoint-every",), {"type": int, "metavar": "STEPS",
                                          "help": "checkpoint period"}),
    TrainOption(("--val-every",), {"type": int, "metavar": "STEPS",
                                   "help": "validation period (0: at the end only)"}),
)


def option_dest(option: TrainOption) -> str:
    """argparse's destination name of an option (``--batch-size`` -> ``batch_size``)."""
    if "dest" in option.kwargs:
        return str(option.kwargs["dest"])
    long = next((f for f in option.flags if f.startswith("--")), option.flags[0])
    return long.lstrip("-").replace("-", "_")
