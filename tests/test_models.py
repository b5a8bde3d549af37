"""Every registry model builds and trains (forward + backward) at the sizes it supports."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cvdd.models import MODELS, build_model
from cvdd.models.registry import SHUFFLENETV2_CHANNELS

SIZES = [16, 28, 32, 64]  # every small-input dataset size; 224 px below for the ImageNet-style stems
SMALL_WIDTH = {"shufflenetv2": 0.25}


def first_conv(net: nn.Module) -> nn.Conv2d:
    return next(m for m in net.modules() if isinstance(m, nn.Conv2d))


def total_stride(net: nn.Module, size: int, in_chans: int) -> int:
    """Spatial downsampling of the feature extractor, read from a forward hook on the last BN."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    shapes = []
    handle = bns[-1].register_forward_hook(lambda m, i, o: shapes.append(o.shape))
    net.eval()
    with torch.no_grad():
        net(torch.zeros(1, in_chans, size, size))
    handle.remove()
    return size // shapes[-1][-1]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("size", SIZES)
def test_small_inputs_forward_backward(name: str, in_chans: int, size: int):
    width = SMALL_WIDTH.get(name, 0.25)
    net = build_model(name, num_classes=7, image_size=size, in_chans=in_chans, width=width)
    x = torch.randn(2, in_chans, size, size, requires_grad=True)
    logits = net(x)
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    conv = first_conv(net)
    assert conv.in_channels == in_chans
    assert conv.stride == (1, 1) and conv.kernel_size == (3, 3), "small-input stem: 3×3 stride-1"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_standard_stem_at_224(name: str):
    net = build_model(name, num_classes=5, image_size=224, in_chans=3)
    assert net(torch.randn(1, 3, 224, 224)).shape == (1, 5)
    if name != "convnet":
        assert first_conv(net).stride == (2, 2)


@pytest.mark.parametrize(
    ("name", "stride"),
    [("resnet18", 8), ("resnet50", 8), ("densenet121", 8), ("mobilenetv2", 8), ("shufflenetv2", 8), ("convnet", 4)],
)
def test_small_input_downsampling_matches_cifar_variants(name: str, stride: int):
    # CIFAR-style nets keep a 4×4 map at 32 px (the hook sees ConvNet's last BN before its last pool: 8×8)
    net = build_model(name, num_classes=10, image_size=32, in_chans=3, width=SMALL_WIDTH.get(name, 0.25))
    assert total_stride(net, 32, 3) == stride


def test_every_model_has_batchnorm_for_recover():
    for name in MODELS:
        net = build_model(name, 10, 32, 3, width=SMALL_WIDTH.get(name, 0.25))
        assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def test_width_scales_parameters():
    small = sum(p.numel() for p in build_model("resnet18", 10, 32, 3, width=0.25).parameters())
    full = sum(p.numel() for p in build_model("resnet18", 10, 32, 3, width=1.0).parameters())
    assert 10 < full / small < 20  # ~ width² for conv weights


def test_shufflenet_paper_width_uses_torchvision_table():
    net = build_model("shufflenetv2", 10, 32, 3, width=0.5)
    assert net.stage2[0].branch1[0].in_channels == SHUFFLENETV2_CHANNELS[0.5][0]
    assert net.conv5[0].out_channels == 1024


def test_unknown_model_and_too_deep_convnet():
    with pytest.raises(KeyError, match="resnet18"):
        build_model("vgg11", 10, 32, 3)
    with pytest.raises(ValueError, match=r"model\.depth"):
        build_model("convnet", 10, 4, 1, depth=3)
