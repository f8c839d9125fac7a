"""``mskmri train pretrain``: self-supervised pretraining of the segmentation encoder.

Writes into ``--out``: ``model.safetensors`` + ``model.json`` (the encoder alone, architecture
``unet-encoder``: give it to ``mskmri train knee-seg|spine-seg --init``), ``pretrain_net``
``.safetensors`` + ``.json`` (the whole pretraining network, to continue or to inspect its
detections), ``images.json`` (how each input image was used), plus the shared loop's
checkpoint, ``train.log`` and ``metrics.jsonl``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from mskmri.errors import MskMriError

log = logging.getLogger(__name__)

#: Default network: 4 levels of 16-128 channels (small enough for CPU training).
DEFAULT_FEATURES = (16, 32, 64, 128)
#: Default in-plane (2-D) / isotropic (3-D) spacing of the pretraining images, mm.
DEFAULT_SPACING_MM = 1.0
#: Default patch edge, voxels (2-D; 3-D uses :data:`DEFAULT_PATCH_3D`).
DEFAULT_PATCH_2D = 96
DEFAULT_PATCH_3D = 64


def build_network(dims: int, features: tuple[int, ...] = DEFAULT_FEATURES) -> Any:
    """The pretraining network whose encoder matches a ``features`` U-Net (strides 1, 2, ...)."""
    from mskmri.nn.unet import UNetConfig
    from mskmri.pretrain.model import PretrainConfig, PretrainNet

    unet = UNetConfig(spatial_dims=dims, features=tuple(features),
                      strides=(1,) + (2,) * (len(features) - 1), out_channels=2)
    return PretrainNet(PretrainConfig(unet=unet, det_level=min(2, len(features) - 2)))


def save_encoder(net: Any, path: Any, *, name: str, command: str, seed: int,
                 training_data: list[dict[str, Any]], spacing_mm: float | None, dims: int,
                 validation: Mapping[str, Any] | None = None, notes: str = "",
                 extra: Mapping[str, Any] | None = None) -> Any:
    """Save ``net.encoder`` (a :class:`~mskmri.nn.unet.UNetEncoder`) with its model card."""
    from mskmri.nn.registry import ModelCard, save_model

    card = ModelCard(
        name=name, task="pretrain",
        input_spacing_mm=None if spacing_mm is None else [float(spacing_mm)] * dims,
        normalisation={"method": "percentile", "low": 0.5, "high": 99.5, "clip": [0.0, 1.5]},
        label_schema="none", labels={}, training_data=training_data, command=command,
        seed=int(seed), validation=dict(validation or {}),
        notes=notes or ("Encoder of a U-Net pretrained without labels by distortion "
                        "restoration (find, classify, outline and restore distorted areas; "
                        "mskmri.pretrain.model). Load into a segmentation U-Net with --init."),
        extra={"pretraining": f"{dims}-D", **dict(extra or {})})
    return save_model(net.encoder, path, card)


def run(config: Any, options: dict[str, Any]) -> Any:
    """Entry of ``mskmri train pretrain`` (see :class:`mskmri.nn.registry.TrainTask`)."""
    import json

    from mskmri.io import atomic_write_json
    from mskmri.nn.registry import ModelCard, save_model
    from mskmri.nn.train import fit, format_command, seed_everything
    from mskmri.pretrain.data import PretextDataset, collect_images
    from mskmri.pretrain.model import pretrain_loss

    dims = int(options.get("dims") or 2)
    spacing = options.get("spacing_mm")
    spacing = DEFAULT_SPACING_MM if spacing is None else float(spacing)
    spacing_mm = None if spacing <= 0 else spacing
    patch = int(options.get("patch") or (DEFAULT_PATCH_2D if dims == 2 else DEFAULT_PATCH_3D))
    features = tuple(int(f) for f in (options.get("features") or DEFAULT_FEATURES))
    if patch % 2 ** (len(features) - 1):
        raise MskMriError(f"--patch {patch} must be a multiple of {2 ** (len(features) - 1)} "
                          f"for a {len(features)}-level network")
    images = options.get("images") or []
    data = collect_images(images, dims=dims, spacing_mm=spacing_mm,
                          unknown_geometry=options.get("unknown_geometry") or "error")
    mode = f"{dims}-D pretraining on {len(data.images)} " + \
        ("slices" if dims == 2 else "volumes")
    log.info("%s (spacing %s mm, patch %d)", mode, spacing_mm, patch)
    seed_everything(config.seed)
    net = build_network(dims, features)
    dataset = PretextDataset(data.images, (patch,) * dims)
    command = format_command("pretrain", config, options)
    result = fit(net, pretrain_loss, dataset, config, command=command)
    out = config.out
    atomic_write_json(out / "images.json", {"mode": mode, "spacing_mm": spacing_mm,
                                            "images": [r.to_dict() for r in data.records]})
    last = result.history[-1] if result.history else {}
    training = [{"name": r.path, "licence": "see the source's licence", "n": r.n_samples,
                 "notes": f"{r.used_as}; geometry {r.geometry}"} for r in data.records]
    save_encoder(net, out / "model.safetensors", name=options.get("name") or "pretrain-encoder",
                 command=command, seed=config.seed, training_data=training,
                 spacing_mm=spacing_mm, dims=dims,
                 validation={"final_losses": {k: v for k, v in last.items()
                                              if k not in ("step", "lr", "s_per_step")}},
                 extra={"mode": mode, "patch": patch, "steps": result.step})
    full = ModelCard(name="pretrain-net", task="pretrain", input_spacing_mm=None,
                     normalisation={"method": "percentile", "low": 0.5, "high": 99.5},
                     label_schema="none", labels={}, training_data=training, command=command,
                     seed=config.seed, notes="whole pretraining network; " + mode,
                     extra={"mode": mode})
    save_model(net, out / "pretrain_net.safetensors", full)
    log.info("wrote %s (%s)", out / "model.safetensors", json.dumps({"mode": mode}))
    return result
