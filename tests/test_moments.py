"""BatchNormMoments: an eval BatchNorm's output and its input's per-group moments, with a fused backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvdd.committee import Committee
from cvdd.models import build_model
from cvdd.moments import BatchNormMoments


def eval_bn(channels: int, dtype: torch.dtype = torch.float32) -> nn.BatchNorm2d:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(channels).to(dtype).eval()
    bn.running_mean.normal_(0, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.normal_(0, 0.3)
    return bn


def reference(x: torch.Tensor, bn: nn.BatchNorm2d, groups: int) -> tuple[torch.Tensor, ...]:
    """Plain autograd: the layer's own forward and ``var_mean`` over each group's samples and pixels."""
    var, mean = torch.var_mean(x.unflatten(0, (groups, -1)), dim=(1, 3, 4), correction=0)
    return bn(x), mean, var


@pytest.mark.parametrize("channels_last", [False, True])
def test_output_moments_and_gradient_match_plain_autograd(channels_last):
    torch.manual_seed(1)
    x = torch.randn(6, 5, 4, 3, dtype=torch.float64) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    bn = eval_bn(5, torch.float64)
    fused = BatchNormMoments.apply(x, bn, 3)
    plain = reference(x, bn, 3)
    for got, want in zip(fused, plain, strict=True):
        assert torch.allclose(got.double(), want, atol=1e-6)
    weights = [torch.randn_like(t) for t in plain]
    (grad,) = torch.autograd.grad(sum((w * t.double()).sum() for w, t in zip(weights, fused, strict=True)), x)
    (want,) = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, plain, strict=True)), x)
    assert grad.dtype == x.dtype and torch.allclose(grad, want, atol=1e-6)
    assert grad.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_bf16_activations_give_fp32_moments_and_a_bf16_gradient_close_to_exact():
    torch.manual_seed(2)
    exact_x = (torch.randn(8, 6, 5, 5, dtype=torch.float64) + 0.5).contiguous(memory_format=torch.channels_last)
    x = exact_x.bfloat16().requires_grad_(True)
    bn = eval_bn(6)
    out, mean, var = BatchNormMoments.apply(x, bn, 2)
    assert out.dtype == torch.bfloat16 and mean.dtype == var.dtype == torch.float32 and mean.shape == (2, 6)
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    g_mean, g_var = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    (out.double() * grad_out).sum().add((mean.double() * g_mean).sum() + (var.double() * g_var).sum()).backward()
    same_x = x.detach().double().requires_grad_(True)  # the rounded input, so only the arithmetic differs
    ref = reference(same_x, eval_bn(6).double(), 2)
    (ref[0] * grad_out).sum().add((ref[1] * g_mean).sum() + (ref[2] * g_var).sum()).backward()
    assert x.grad.dtype == torch.bfloat16
    assert (x.grad.double() - same_x.grad).norm() / same_x.grad.norm() < 1e-2  # bf16 rounding (2⁻⁸ ≈ 0.004)


def test_a_training_mode_batch_norm_is_refused():
    bn = eval_bn(3).train()
    with pytest.raises(ValueError, match="eval-mode BatchNorm"):
        BatchNormMoments.apply(torch.randn(4, 3, 2, 2), bn, 2)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2", "shufflenetv2", "densenet"])
def test_committee_members_keep_their_exact_outputs(arch):
    """Every member gives the logits of its plain network, with statistics read or not (DenseNet's timm
    ``BatchNormAct2d`` layers also apply their activation)."""
    torch.manual_seed(0)
    net = build_model(arch, num_classes=10, image_size=16, in_chans=1, width=0.25).eval()
    images, labels = torch.randn(6, 1, 16, 16), torch.arange(6)
    with torch.no_grad():
        plain = net(images)
    committee = Committee({"m": net}, {"m": 1.0})
    with torch.no_grad():
        assert torch.equal(committee.members["m"](images), plain)
    ce, _ = committee.losses("m", images, labels, units=2)
    assert torch.allclose(ce, F.cross_entropy(plain, labels, reduction="none").view(2, 3).mean(dim=1), atol=1e-6)


def test_an_unknown_batch_norm_subclass_is_refused_by_name():
    class ScaledBatchNorm(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    net = nn.Sequential(nn.Conv2d(1, 2, 3), ScaledBatchNorm(2), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(TypeError, match="ScaledBatchNorm"):
        Committee({"m": net}, {"m": 1.0})
