"""Weights registry: safetensors + model card round trip, checks, helpful errors, --init."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from mskmri.errors import ModelError  # noqa: E402
from mskmri.nn import registry  # noqa: E402
from mskmri.nn.ffc import FFCConfig, FFCInpainter  # noqa: E402
from mskmri.nn.registry import (  # noqa: E402
    MODEL_CARD_SCHEMA,
    ModelCard,
    build_model,
    load_model,
    load_weights_into,
    read_card,
    save_model,
)
from mskmri.nn.unet import UNet, UNetConfig, UNetEncoder  # noqa: E402
from mskmri.weights import ModelEntry  # noqa: E402

pytestmark = pytest.mark.torch

TINY = UNetConfig(spatial_dims=3, out_channels=3, features=(4, 8, 16), strides=(1, 2, 2))


def _card(**kw: Any) -> ModelCard:
    base: dict[str, Any] = dict(
        name="tiny", task="knee-seg", input_spacing_mm=[0.7, 0.36, 0.36],
        normalisation={"method": "percentile", "low": 0.5, "high": 99.5},
        label_schema="knee", labels={"0": "background", "1": "femur", "2": "tibia"},
        training_data=[{"name": "synthetic phantoms", "licence": "MIT"}],
        command="mskmri train knee-seg --out x --seed 1", seed=1,
        validation={"dice_femur": 0.9})
    return ModelCard(**{**base, **kw})


@pytest.fixture
def saved(tmp_path: Path) -> tuple[UNet, Path]:
    torch.manual_seed(0)
    net = UNet(TINY)
    return net, save_model(net, tmp_path / "tiny.safetensors", _card())


@pytest.mark.parametrize("make", [lambda: UNet(TINY),
                                  lambda: UNetEncoder(TINY),
                                  lambda: FFCInpainter(FFCConfig(base_channels=8, n_blocks=1))])
def test_save_and_load_round_trip(tmp_path: Path, make: Any) -> None:
    torch.manual_seed(0)
    net = make()
    path = save_model(net, tmp_path / "m.safetensors", _card())
    card_doc = json.loads((tmp_path / "m.json").read_text())
    assert card_doc["schema"] == MODEL_CARD_SCHEMA
    assert card_doc["architecture"] == net.architecture
    assert card_doc["config"] == net.config_dict()
    assert len(card_doc["sha256"]) == 64 and card_doc["created"] and card_doc["mskmri_version"]
    loaded, card = load_model(path)
    assert type(loaded) is type(net) and not loaded.training
    assert card.training_data[0]["licence"] == "MIT"
    for (k, a), (k2, b) in zip(net.state_dict().items(), loaded.state_dict().items(),
                               strict=True):
        assert k == k2 and torch.equal(a, b)


def test_loading_never_unpickles(saved: tuple[UNet, Path], tmp_path: Path) -> None:
    _, path = saved
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> Any:
            return (open, (str(marker), "w"))

    path.write_bytes(pickle.dumps({"encoder.x": Evil()}))
    doc = json.loads(path.with_suffix(".json").read_text())
    doc["sha256"] = registry.sha256_file(path)  # a consistent card: only the format can stop it
    path.with_suffix(".json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="not a readable safetensors"):
        load_model(path)
    with pytest.raises(ModelError, match="not a readable safetensors"):
        load_weights_into(UNet(TINY), path)
    assert not marker.exists()


def test_checksum_card_and_config_are_checked(saved: tuple[UNet, Path]) -> None:
    _, path = saved
    card_file = path.with_suffix(".json")
    good = json.loads(card_file.read_text())

    def with_card(**changes: Any) -> None:
        card_file.write_text(json.dumps({**good, **changes}))

    with_card(sha256="0" * 64)
    with pytest.raises(ModelError, match="does not match its card"):
        load_model(path)
    with_card(config={**good["config"], "features": [4, 8, 32]})
    with pytest.raises(ModelError, match="does not fit the 'unet' config"):
        load_model(path)
    with_card(config={**good["config"], "width": 3})
    with pytest.raises(ModelError, match="unknown U-Net config keys"):
        load_model(path)
    with_card(schema="mskmri/model-card/0")
    with pytest.raises(ModelError, match="expected 'mskmri/model-card/1'"):
        load_model(path)
    with_card(training_data=[{"name": "OAI"}])
    with pytest.raises(ModelError, match="licence"):
        load_model(path)
    with_card(architecture="unte")
    with pytest.raises(ModelError, match="did you mean 'unet'"):
        load_model(path)
    card_file.unlink()
    with pytest.raises(ModelError, match="model card .* is missing"):
        load_model(path)


def test_missing_weights_name_the_training_command(monkeypatch: Any, tmp_path: Path) -> None:
    monkeypatch.setattr(registry, "MODELS", {
        "knee-seg-fine": ModelEntry("does_not_exist.safetensors", "knee-seg", "test entry")})
    with pytest.raises(ModelError, match=r"`mskmri train knee-seg --out DIR`"):
        load_model("knee-seg-fine")
    with pytest.raises(ModelError, match="did you mean 'knee-seg-fine'"):
        load_model("knee-seg-fin")
    with pytest.raises(ModelError, match="no weight file at"):
        load_model(tmp_path / "nothing.safetensors")


def test_save_refuses_what_it_could_not_load_again(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no `architecture` name"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "l.safetensors", _card())
    with pytest.raises(ModelError, match=r"\.safetensors"):
        save_model(UNet(TINY), tmp_path / "m.pt", _card())
    with pytest.raises(ModelError, match="card says architecture"):
        save_model(UNet(TINY), tmp_path / "m.safetensors", _card(architecture="ffc-inpainter"))
    with pytest.raises(ModelError, match="command"):
        save_model(UNet(TINY), tmp_path / "m.safetensors", _card(command=""))
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(ModelError, match="known"):
        build_model("vit", {})


def test_init_loads_an_encoder_into_a_unet_and_back(tmp_path: Path) -> None:
    torch.manual_seed(1)
    enc = UNetEncoder(TINY)
    enc_path = save_model(enc, tmp_path / "enc.safetensors", _card(task="pretrain"))
    net = UNet(TINY)
    dec_before = {k: v.clone() for k, v in net.decoder.state_dict().items()}
    counts = load_weights_into(net, enc_path)  # bare encoder keys -> "encoder." prefix added
    assert counts["loaded"] == len(enc.state_dict()) and counts["skipped"] == 0
    for k, v in enc.state_dict().items():
        assert torch.equal(net.encoder.state_dict()[k], v)
    assert all(torch.equal(v, dec_before[k]) for k, v in net.decoder.state_dict().items())

    class Pretrainer(torch.nn.Module):  # an encoder plus heads, as issue 5 builds it
        def __init__(self) -> None:
            super().__init__()
            self.encoder = UNetEncoder(TINY)
            self.restore = torch.nn.Conv3d(4, 1, 1)

    pre = Pretrainer()
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in pre.state_dict().items()},
              str(tmp_path / "pre.safetensors"))
    fresh = UNet(TINY)
    counts = load_weights_into(fresh, tmp_path / "pre.safetensors")
    assert counts["loaded"] == len(enc.state_dict()) and counts["skipped"] == 2
    teacher = UNetEncoder(TINY)  # the MKD teacher: the encoder alone, "encoder." stripped
    assert load_weights_into(teacher, tmp_path / "pre.safetensors")["loaded"] == counts["loaded"]
    assert torch.equal(teacher.stages[0].convs[0][0].weight,
                       pre.encoder.stages[0].convs[0][0].weight)
    with pytest.raises(ModelError, match="other shapes"):
        load_weights_into(UNet(UNetConfig(spatial_dims=3, features=(8, 8, 16),
                                          strides=(1, 2, 2))), enc_path)
    with pytest.raises(ModelError, match="no tensor"):
        load_weights_into(torch.nn.Linear(2, 2), enc_path)


def test_registry_and_parser_do_not_import_torch() -> None:
    code = ("import sys; import mskmri.nn.registry, mskmri.weights; "
            "from mskmri.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_read_card_reports_bad_json(saved: tuple[UNet, Path]) -> None:
    _, path = saved
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(ModelError, match="not readable JSON"):
        read_card(path)


def test_unusable_device_is_one_clear_error(saved: tuple[UNet, Path]) -> None:
    _, path = saved
    with pytest.raises(ModelError, match="not a torch device"):
        load_model(path, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            load_model(path, device="cuda")
    model, _ = load_model(path, device="cpu")
    assert next(model.parameters()).device.type == "cpu"
