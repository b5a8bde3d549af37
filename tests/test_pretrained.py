"""torchvision ImageNet weights from the local hub cache (no download anywhere): placed by hand in a temporary
``TORCH_HOME`` as torchvision's own architectures' state dicts, under torchvision's file names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from minidata import write_image_folder
from torchvision import models as tvm

from cvdd.data.formats import IMAGENETTE_NAMES
from cvdd.models import build_model
from cvdd.models.pretrained import IMAGENET_WEIGHTS, classifier_name, load_imagenet_weights, weights_file
from cvdd.stages.squeeze import squeeze_teacher

TORCHVISION = {
    "resnet18": tvm.resnet18,
    "resnet50": tvm.resnet50,
    "resnet101": tvm.resnet101,
    "densenet121": tvm.densenet121,
    "mobilenetv2": tvm.mobilenet_v2,
    "shufflenetv2": tvm.shufflenet_v2_x1_0,
}


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def place_weights(name: str, old_densenet_keys: bool = False) -> dict[str, torch.Tensor]:
    """A torchvision-architecture state dict (seeded random init) saved where torchvision caches ``name``."""
    torch.manual_seed(0)
    state = TORCHVISION[name]().state_dict()
    stored = state
    if old_densenet_keys:  # the layout of torchvision's published densenet121-a639ec97.pth: 'norm.1', 'conv.2'
        renames = [(f".{kind}{i}.", f".{kind}.{i}.") for kind in ("norm", "conv") for i in (1, 2)]
        stored = {}
        for key, value in state.items():
            for new, old in renames:
                key = key.replace(new, old)
            stored[key] = value
        assert "features.denseblock1.denselayer1.norm.1.weight" in stored
    path = weights_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(stored, path)
    return state


def test_every_pretrained_architecture_is_torchvision_compatible():
    assert set(IMAGENET_WEIGHTS) == set(TORCHVISION)
    for name, build in TORCHVISION.items():
        ours = build_model(name, 1000, 224, 3).state_dict()
        theirs = build().state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}, name


@pytest.mark.parametrize(("name", "old_keys"), [("resnet18", False), ("densenet121", True), ("shufflenetv2", False)])
def test_weights_load_from_the_cache_with_a_new_classifier(torch_home: Path, name: str, old_keys: bool):
    state = place_weights(name, old_densenet_keys=old_keys)
    net = build_model(name, num_classes=10, image_size=224, in_chans=3)
    head = classifier_name(net) + "."
    fresh_head = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(head)}
    info = load_imagenet_weights(net, name, 224, 3, None)
    assert info["weights"].endswith("IMAGENET1K_V1") and Path(info["file"]).parent == torch_home / "hub/checkpoints"
    loaded = net.state_dict()
    for key, value in state.items():
        if key.startswith(head):
            assert torch.equal(loaded[key], fresh_head[key]) and loaded[key].shape[0] == 10
        else:
            assert torch.equal(loaded[key], value), key


def test_imagenet_class_count_keeps_the_published_classifier(torch_home: Path):
    state = place_weights("mobilenetv2")
    net = build_model("mobilenetv2", 1000, 224, 3)
    load_imagenet_weights(net, "mobilenetv2", 224, 3, 1.0)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


def test_missing_weights_name_the_file_and_where_to_put_it(torch_home: Path):
    net = build_model("resnet50", 10, 224, 3)
    with pytest.raises(FileNotFoundError) as err:
        load_imagenet_weights(net, "resnet50", 224, 3, 1.0)
    message = str(err.value)
    assert str(torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in message
    assert (
        "https://download.pytorch.org/models/resnet50-0676ba61.pth" in message and "model.pretrained=false" in message
    )


def test_small_inputs_and_unknown_models_are_refused():
    with pytest.raises(ValueError, match="224-px"):
        load_imagenet_weights(build_model("resnet18", 10, 32, 3), "resnet18", 32, 3, 1.0)
    with pytest.raises(ValueError, match="not for 'convnet'"):
        load_imagenet_weights(build_model("convnet", 10, 224, 3), "convnet", 224, 3, 1.0)


def test_squeeze_publishes_pretrained_weights_without_training(make_cfg, torch_home: Path, tmp_path: Path):
    root = tmp_path / "data" / "imagenette2"
    write_image_folder(root, list(IMAGENETTE_NAMES), per_class=1)
    state = place_weights("resnet18")
    record = squeeze_teacher(
        make_cfg("train", "dataset=imagenette", "model=resnet18", "model.pretrained=true", "squeeze.epochs=0")
    )
    assert record["epochs"] == 0 and record["recipe"]["pretrained"] is True
    assert record["pretrained"]["weights"] == "resnet18.IMAGENET1K_V1" and record["test_samples"] == 10
    saved = torch.load(tmp_path / "artifacts/imagenette/teachers/resnet18.ckpt", weights_only=True)
    assert torch.equal(saved["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    assert json.loads((tmp_path / "artifacts/imagenette/teachers/resnet18.json").read_text())["fingerprint"]
    with pytest.raises(ValueError, match=r"squeeze\.epochs=0 trains nothing"):
        squeeze_teacher(make_cfg("train", "dataset=imagenette", "model=resnet50", "squeeze.epochs=0"))
