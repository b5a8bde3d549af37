"""Per-network numerics: the policy, what a member's forward really runs in, fp32 kept exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cvdd.runtime.precision as precision
from cvdd.committee.committee import Committee
from cvdd.labels.bssl import soft_label_logits
from cvdd.models import build_model
from cvdd.runtime.precision import BF16, BF16_CL, CPU_TABLE, FP32, FP32_CL, Numerics, choose_numerics
from cvdd.training.student import StudentModule
from cvdd.training.teacher import TeacherModule


@pytest.fixture
def native_bf16(monkeypatch):
    def set_native(value: bool) -> None:
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: value)

    return set_native


def test_policy_follows_the_table_only_on_cpus_with_native_bf16(native_bf16):
    native_bf16(True)
    assert choose_numerics("resnet18", "recover", "auto", "auto", "cpu") == BF16_CL
    assert choose_numerics("shufflenetv2", "recover", "auto", "auto", "cpu") == FP32
    assert choose_numerics("mobilenetv2", "recover", "auto", "auto", "cpu") == FP32_CL
    assert choose_numerics("densenet", "squeeze", "auto", "auto", "cpu") == BF16
    assert choose_numerics("unknown_arch", "recover", "auto", "auto", "cpu") == FP32
    native_bf16(False)
    assert choose_numerics("resnet18", "recover", "auto", "auto", "cpu") == FP32, "emulated bf16 is slow"
    assert choose_numerics("resnet18", "recover", "bf16", "auto", "cpu") == BF16_CL, "asked for explicitly"


def test_fp32_on_request_and_bf16_channels_last_on_gpus(native_bf16):
    native_bf16(True)
    for arch in CPU_TABLE:
        assert choose_numerics(arch, "relabel", 32, "auto", "cpu") == FP32
        assert choose_numerics(arch, "relabel", "32", "auto", "cuda") == FP32
        assert choose_numerics(arch, "relabel", "auto", "auto", "cuda") == BF16_CL
    assert choose_numerics("resnet18", "recover", "auto", False, "cpu") == BF16
    assert choose_numerics("shufflenetv2", "recover", "auto", "true", "cpu") == FP32_CL


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (("resnet18", "recover", "fp16", "auto", "cpu"), "hardware.precision"),
        (("resnet18", "recover", "auto", "maybe", "cpu"), "hardware.channels_last"),
    ],
)
def test_bad_settings_name_the_key(args, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        choose_numerics(*args)


def seen_inside(net: nn.Module) -> list[tuple[torch.dtype, bool]]:
    """(output dtype, channels-last input) of every convolution of ``net``'s next forward pass."""
    seen: list[tuple[torch.dtype, bool]] = []

    def hook(module, inputs, output):
        seen.append((output.dtype, inputs[0].is_contiguous(memory_format=torch.channels_last)))

    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(hook)
    return seen


def small_net(arch: str = "resnet18") -> nn.Module:
    torch.manual_seed(0)
    return build_model(arch, num_classes=10, image_size=16, in_chans=1, width=0.25)


def test_committee_members_run_in_their_own_numerics_and_losses_stay_fp32():
    nets = {"a": small_net(), "b": small_net()}
    committee = Committee(nets, {"a": 1.0, "b": 1.0}, numerics={"a": BF16_CL, "b": FP32})
    inside = {name: seen_inside(net) for name, net in committee.members.items()}
    images, labels = torch.randn(20, 1, 16, 16, requires_grad=True), torch.arange(10).repeat(2)
    for name in ("a", "b"):
        ce, bn = committee.losses(name, images, labels, units=2)
        assert ce.dtype == bn.dtype == torch.float32
        (ce.sum() + bn.sum()).backward()
    # [1:]: the stem's 1-channel input is contiguous in both memory formats
    assert inside["a"] and all(seen == (torch.bfloat16, True) for seen in inside["a"][1:])
    assert inside["b"] and all(seen == (torch.float32, False) for seen in inside["b"][1:])
    assert images.grad.dtype == torch.float32


def test_fp32_numerics_are_exactly_the_plain_network():
    net = small_net().eval()
    committee = Committee({"a": net}, {"a": 1.0}, numerics={"a": FP32})
    images, labels = torch.randn(10, 1, 16, 16), torch.arange(10)
    ce, _ = committee.losses("a", images, labels, units=1)
    with torch.no_grad():
        plain = nn.functional.cross_entropy(net(images), labels, reduction="none").mean()
    assert torch.equal(ce[0], plain)


def test_bf16_soft_labels_are_fp32_and_close_to_fp32_labels():
    teachers = {"a": small_net(), "b": small_net("convnet")}
    weights = {"a": 0.5, "b": 0.5}
    images = torch.randn(16, 1, 16, 16)
    exact = soft_label_logits(teachers, weights, images)
    fast = soft_label_logits(teachers, weights, images, numerics={"a": BF16_CL, "b": BF16})
    assert fast.dtype == torch.float32
    assert not torch.equal(fast, exact) and torch.allclose(fast, exact, atol=0.1, rtol=0.05)


def test_teacher_and_student_modules_train_their_network_in_the_given_numerics():
    teacher = TeacherModule(small_net(), 10, optimizer=torch.optim.SGD, numerics=BF16_CL)
    inside = seen_inside(teacher.net)
    assert teacher(torch.randn(4, 1, 16, 16)).dtype == torch.float32
    assert inside and all(seen == (torch.bfloat16, True) for seen in inside[1:])

    from cvdd.labels.plan import EpochPlan

    plan = EpochPlan(0, 20, 1, 10, (16, 16), "cutmix", (0.5, 1.0), False)
    student = StudentModule(
        small_net("convnet"),
        images=torch.randn(20, 1, 16, 16),
        targets=torch.arange(20) % 10,
        plan=plan,
        soft_labels=None,
        numerics=BF16,
    )
    inside = seen_inside(student.net)
    student.training_step(torch.tensor(0), 0)
    assert inside and all(seen == (torch.bfloat16, False) for seen in inside[1:])


def test_numerics_tags_name_precision_and_format():
    assert [n.tag for n in (FP32, FP32_CL, BF16, BF16_CL)] == ["fp32", "fp32_cl", "bf16", "bf16_cl"]
    assert Numerics(True, False) == BF16


@pytest.mark.parametrize("channels_last", [False, True])
def test_unit_moments_match_autograd_reference(channels_last):
    from cvdd.committee.committee import UnitMoments

    torch.manual_seed(0)
    x = torch.randn(6, 5, 4, 3, dtype=torch.float64) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    mean, var = UnitMoments.apply(x, 3)
    per_unit = x.unflatten(0, (3, -1))
    ref_var, ref_mean = torch.var_mean(per_unit, dim=(1, 3, 4), correction=0)
    assert torch.allclose(mean.double(), ref_mean, atol=1e-6) and torch.allclose(var.double(), ref_var, atol=1e-5)
    g_mean, g_var = torch.randn_like(ref_mean), torch.randn_like(ref_var)
    (grad,) = torch.autograd.grad((mean.double() * g_mean).sum() + (var.double() * g_var).sum(), x)
    (ref,) = torch.autograd.grad((ref_mean * g_mean).sum() + (ref_var * g_var).sum(), x)
    assert grad.dtype == x.dtype and torch.allclose(grad, ref, atol=1e-6)


def test_unit_moments_of_bf16_activations_are_fp32():
    from cvdd.committee.committee import UnitMoments

    x = torch.randn(8, 4, 5, 5).bfloat16().requires_grad_(True)
    mean, var = UnitMoments.apply(x, 2)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == (2, 4)
    (mean.sum() + var.sum()).backward()
    assert x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "table", ["arch_precision.json", "arch_precision_full_32px.json", "arch_precision_full_64px.json"]
)
def test_auto_is_never_slower_than_fp32_where_it_was_measured(native_bf16, table: str):
    """Every (architecture, workload) row the benchmark measured on this project's CPU (AVX512-BF16): the numerics
    ``auto`` picks ran at least as fast as fp32 (5 % timing noise allowed)."""
    import json
    from pathlib import Path

    from omegaconf import OmegaConf

    native_bf16(True)
    root = Path(__file__).resolve().parents[1]
    rows = json.loads((root / "bench" / "results" / table).read_text())["rows"]
    assert rows
    for row in rows:
        arch = OmegaConf.load(root / "conf" / "model" / f"{row['model']}.yaml").net.name
        chosen = choose_numerics(arch, row["workload"], "auto", "auto", "cpu")
        assert row["speedup"][chosen.tag] >= 0.95, (row["model"], row["workload"], chosen.tag, row["speedup"])
