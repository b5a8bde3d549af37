"""Model registry: ``build_model(name, num_classes, image_size, in_chans, width=..., **kw)``.

Networks come from timm (ResNet, DenseNet) and torchvision (MobileNetV2, ShuffleNetV2); this
module only writes the adaptations. For inputs ≤ 64 px every network gets the small-input stem
used by the CIFAR/Tiny-ImageNet literature: a 3×3 stride-1 first conv, no stem max-pool, and
(MobileNetV2) the first stride-2 stage at stride 1. ``width`` multiplies channel counts so
CPU-sized committee members share the architecture of their paper-sized counterparts.
"""

from __future__ import annotations

from collections.abc import Callable

import timm
from torch import nn
from torchvision.models import MobileNetV2, ShuffleNetV2

from cvdd.models.convnet import ConvNet
from cvdd.runtime.errors import UnknownNameError

SMALL_INPUT_MAX = 64
Builder = Callable[..., nn.Module]
MODELS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def wrap(fn: Builder) -> Builder:
        MODELS[name] = fn
        return fn

    return wrap


def _scaled(channels: int, width: float, divisor: int = 1) -> int:
    return max(divisor, round(channels * width / divisor) * divisor)


def _small_stem_conv(in_chans: int, out_chans: int) -> nn.Conv2d:
    return nn.Conv2d(in_chans, out_chans, kernel_size=3, stride=1, padding=1, bias=False)


def _timm_resnet(variant: str) -> Builder:
    def build(num_classes: int, image_size: int, in_chans: int, width: float = 1.0) -> nn.Module:
        channels = tuple(_scaled(c, width) for c in (64, 128, 256, 512))
        small = image_size <= SMALL_INPUT_MAX
        kwargs = {}
        if small or width != 1.0:
            # timm's plain stem is fixed at 64 channels; its 'deep' stem scales (2 × stem_width).
            kwargs = {"stem_type": "deep", "stem_width": _scaled(32, width)}
        net = timm.create_model(
            variant, pretrained=False, num_classes=num_classes, in_chans=in_chans, channels=channels, **kwargs
        )
        if small:
            net.conv1 = _small_stem_conv(in_chans, net.bn1.num_features)
            net.maxpool = nn.Identity()
        return net

    return build


for _depth in (18, 50, 101):
    register(f"resnet{_depth}")(_timm_resnet(f"resnet{_depth}"))


DENSENET121_BLOCKS = (6, 12, 24, 16)


@register("densenet")
def densenet(
    num_classes: int, image_size: int, in_chans: int, width: float = 1.0, blocks: tuple[int, ...] = DENSENET121_BLOCKS
) -> nn.Module:
    """DenseNet-BC (timm) with growth rate ``32 × width`` and ``blocks`` dense layers per stage."""
    growth = _scaled(32, width)
    net = timm.create_model(
        "densenet121",
        pretrained=False,
        num_classes=num_classes,
        in_chans=in_chans,
        growth_rate=growth,
        block_config=tuple(blocks),
    )
    if image_size <= SMALL_INPUT_MAX:
        net.features.conv0 = _small_stem_conv(in_chans, 2 * growth)
        net.features.pool0 = nn.Identity()
    return net


@register("densenet121")
def densenet121(num_classes: int, image_size: int, in_chans: int, width: float = 1.0) -> nn.Module:
    return densenet(num_classes, image_size, in_chans, width, DENSENET121_BLOCKS)


MOBILENETV2_SETTING = [  # expansion t, channels c, repeats n, stride s (Sandler et al. 2018, Table 2)
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


@register("mobilenetv2")
def mobilenetv2(num_classes: int, image_size: int, in_chans: int, width: float = 1.0) -> nn.Module:
    small = image_size <= SMALL_INPUT_MAX
    setting = [list(row) for row in MOBILENETV2_SETTING]
    if small:
        setting[1][3] = 1  # first stride-2 stage runs at stride 1
    net = MobileNetV2(num_classes=num_classes, width_mult=width, inverted_residual_setting=setting)
    first = net.features[0][0]
    net.features[0][0] = nn.Conv2d(in_chans, first.out_channels, 3, stride=1 if small else 2, padding=1, bias=False)
    return net


SHUFFLENETV2_CHANNELS = {  # torchvision / Ma et al. 2018 channel tables per width
    0.5: [24, 48, 96, 192, 1024],
    1.0: [24, 116, 232, 464, 1024],
    1.5: [24, 176, 352, 704, 1024],
    2.0: [24, 244, 488, 976, 2048],
}


@register("shufflenetv2")
def shufflenetv2(num_classes: int, image_size: int, in_chans: int, width: float | None = None) -> nn.Module:
    """ShuffleNetV2 at ``width``; ``None`` is the released CV-DD choice: 0.5× for inputs ≤ 64 px, 1.0× above.
    Widths without a torchvision table scale the 0.5× table."""
    if width is None:
        width = 0.5 if image_size <= SMALL_INPUT_MAX else 1.0
    if width in SHUFFLENETV2_CHANNELS:
        channels = SHUFFLENETV2_CHANNELS[width]
    else:
        base = SHUFFLENETV2_CHANNELS[0.5]
        channels = [_scaled(c, width / 0.5, divisor=2) for c in base[:4]] + [_scaled(base[4], min(1.0, width / 0.5))]
    net = ShuffleNetV2(stages_repeats=[4, 8, 4], stages_out_channels=channels, num_classes=num_classes)
    small = image_size <= SMALL_INPUT_MAX
    net.conv1[0] = nn.Conv2d(in_chans, channels[0], 3, stride=1 if small else 2, padding=1, bias=False)
    if small:
        net.maxpool = nn.Identity()
    return net


@register("convnet")
def convnet(
    num_classes: int, image_size: int, in_chans: int, width: float = 1.0, depth: int = 3, norm: str = "batch"
) -> nn.Module:
    return ConvNet(num_classes, image_size, in_chans, width=_scaled(128, width), depth=depth, norm=norm)


def build_model(name: str, num_classes: int, image_size: int, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build registered model ``name`` for the given classes, input size and channels."""
    if name not in MODELS:
        raise UnknownNameError(f"unknown model '{name}'; registered: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes=num_classes, image_size=image_size, in_chans=in_chans, **kwargs)


__all__ = ["MODELS", "SMALL_INPUT_MAX", "build_model", "register"]
