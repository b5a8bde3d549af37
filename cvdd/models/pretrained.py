"""torchvision's ImageNet-1K weights for the 224-px committee architectures, read from the local hub cache.

The CV-DD paper's ImageNet-1K teachers are torchvision's ``IMAGENET1K_V1`` weights. Nothing here
downloads: the file must already be in ``$TORCH_HOME/hub/checkpoints`` (where ``torchvision`` itself
caches it), otherwise the error names the file, its URL and the folder to put it in. Our 224-px
builds (timm ResNet/DenseNet, torchvision MobileNetV2/ShuffleNetV2) have torchvision's parameter
names, so the state dict loads strictly; for another class count the classifier keeps its fresh init.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from cvdd.models.registry import SMALL_INPUT_MAX
from cvdd.runtime.errors import ConfigError, MissingInputError

IMAGENET_WEIGHTS = {  # registry name → torchvision weights enum (the paper's IMAGENET1K_V1)
    "resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1,
    "resnet50": tvm.ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": tvm.ResNet101_Weights.IMAGENET1K_V1,
    "densenet121": tvm.DenseNet121_Weights.IMAGENET1K_V1,
    "mobilenetv2": tvm.MobileNet_V2_Weights.IMAGENET1K_V1,
    "shufflenetv2": tvm.ShuffleNet_V2_X1_0_Weights.IMAGENET1K_V1,
}
IMAGENET_CLASSES = 1000
# torchvision's published DenseNet files predate its module names: 'denselayer1.norm.1' is now 'denselayer1.norm1'
_DENSENET_OLD_KEY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")


def weights_file(name: str) -> Path:
    """Where torchvision caches ``name``'s ImageNet weights (``$TORCH_HOME/hub/checkpoints/<file>``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET_WEIGHTS[name].url).name


def classifier_name(net: nn.Module) -> str:
    """The last ``nn.Linear`` of ``net``: the head a new class count replaces."""
    return [name for name, module in net.named_modules() if isinstance(module, nn.Linear)][-1]


def load_imagenet_weights(
    net: nn.Module, name: str, image_size: int, in_chans: int, width: float | None
) -> dict[str, str]:
    """Load torchvision's ``IMAGENET1K_V1`` weights for registry model ``name`` into ``net`` (in place).

    Returns what was loaded (weights id, file), for the teacher's record.
    """
    if name not in IMAGENET_WEIGHTS:
        raise ConfigError(
            f"model.pretrained=true: torchvision has ImageNet weights for {', '.join(IMAGENET_WEIGHTS)}, "
            f"not for '{name}'; set model.pretrained=false (and squeeze.epochs > 0) to train it from scratch"
        )
    if image_size <= SMALL_INPUT_MAX or in_chans != 3 or width not in (None, 1.0):
        raise ConfigError(
            f"model.pretrained=true needs the standard 224-px, 3-channel, width-1.0 {name}; this one is "
            f"{image_size} px, {in_chans} channels, width {width} (small-input networks have other stems). "
            f"Set model.pretrained=false"
        )
    path = weights_file(name)
    weights = IMAGENET_WEIGHTS[name]
    if not path.is_file():
        raise MissingInputError(
            f"model.pretrained=true: torchvision's {name} {weights.name} weights are not in the local cache.\n"
            f"  Download {weights.url} on a machine with internet and copy it to {path}\n"
            f"  (the folder is $TORCH_HOME/hub/checkpoints; set TORCH_HOME to use another cache), "
            f"or set model.pretrained=false"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {_DENSENET_OLD_KEY.sub(r"\1\2.", key): value for key, value in state.items()}
    own = net.state_dict()
    head = classifier_name(net) + "."
    if own[head + "weight"].shape[0] != IMAGENET_CLASSES:  # a new classifier for another class count
        state = {k: v for k, v in state.items() if not k.startswith(head)}
        state.update({k: v for k, v in own.items() if k.startswith(head)})
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"{path} does not fit the {name} built here: {err}") from err
    return {"weights": f"{name}.{weights.name}", "file": str(path)}
