"""Recover: synthetic images as parameters, optimised against a frozen committee.

Work is split into *units*: one IPC index × one block of classes, one image per class. Each
unit has its own seed (from ``(seed, ipc index, class block)``), members, voting weights and
augmentation stream, so its result does not depend on which other units share its forward
pass, its wave or its rank. Units with the same members are stacked into one forward pass per member; a
step's member passes each take their own input gradient, run one after another or side by side on CPU
(:mod:`cvdd.committee.passes`), and are summed in a fixed order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from cvdd.committee.committee import Committee
from cvdd.committee.passes import MemberPasses
from cvdd.labels.plan import crop_flip_theta, resized_crop, sample_crop_box
from cvdd.methods.committee_voting.memory import (
    BUDGET_FRACTION,
    GROUP_MEMORY_CAP,
    HEADROOM,
    auto_group_images,
    auto_wave_images,
    free_bytes,
    image_state_bytes,
    member_bytes_per_image,
    wave_bytes_per_image,
)
from cvdd.methods.committee_voting.snapshots import GroupSnapshots, on_cpu
from cvdd.runtime import log
from cvdd.runtime.finite import LossWatch
from cvdd.runtime.hardware import peak_memory_mib
from cvdd.runtime.packing import pack_consecutive
from cvdd.training.optim import cosine_factor


@dataclass(frozen=True)
class Unit:
    """One IPC index × one class block: ``len(classes)`` images optimised together (BN stats over them)."""

    ipc_index: int
    block: int
    classes: tuple[int, ...]
    members: tuple[str, ...]
    weights: tuple[float, ...]
    seed: int

    @property
    def key(self) -> str:
        return f"{self.ipc_index:04d}_{self.block:04d}"


def member_batches(units: Sequence[Unit], grouping: bool) -> list[tuple[str, list[int]]]:
    """The forward passes of one step: ``(member, unit indices)``.

    With grouping every member sees all units that chose it in one stacked pass (a forward pass
    in eval mode is per-sample independent and the losses are per unit, so this equals running
    the units one by one); without grouping each unit runs each of its members alone.
    """
    if not grouping:
        return [(m, [i]) for i, unit in enumerate(units) for m in unit.members]
    batches: dict[str, list[int]] = {}
    for i, unit in enumerate(units):
        for member in unit.members:
            batches.setdefault(member, []).append(i)
    return list(batches.items())


@dataclass(frozen=True)
class RecoverSettings:
    iterations: int
    lr: float
    r_bn: float
    jitter: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True


class UnitAugmenter:
    """Per-unit random-resized-crop + flip, then a roll by up to ``jitter`` pixels, from the unit's own RNG."""

    def __init__(self, units: Sequence[Unit], settings: RecoverSettings):
        self.settings = settings
        self.generators = [torch.Generator().manual_seed(u.seed) for u in units]

    def __call__(self, images: torch.Tensor, unit_ids: Sequence[int]) -> torch.Tensor:
        """``images``: (g, B, C, H, W) for units ``unit_ids`` → augmented (g·B, C, H, W)."""
        unit_ids = list(unit_ids)
        g, b, c, h, w = images.shape
        boxes, flips, shifts = [], [], []
        for uid in unit_ids:
            gen = self.generators[uid]
            boxes.append(sample_crop_box(gen, h, w, self.settings.crop_scale))
            flip = bool(torch.rand(1, generator=gen).item() < 0.5) and self.settings.hflip
            flips.append(flip)
            j = self.settings.jitter
            shifts.append(tuple(torch.randint(0, j + 1, (2,), generator=gen).tolist()) if j > 0 else (0, 0))
        theta = crop_flip_theta(torch.tensor(boxes), torch.tensor(flips), h, w)
        theta = theta.repeat_interleave(b, dim=0)
        out = resized_crop(images.reshape(g * b, c, h, w), theta, (h, w)).reshape(g, b, c, h, w)
        rolled = [torch.roll(out[i], shifts=shifts[i], dims=(-2, -1)) for i in range(g)]
        return torch.stack(rolled).reshape(g * b, c, h, w)


UnitCallback = Callable[[Unit, torch.Tensor, dict[str, dict[str, float]]], None]


class GroupState:
    """One group of units being optimised: its own images parameter, Adam, augmentation streams and forward
    passes, so nothing it computes depends on which other groups share its wave or its rank."""

    def __init__(self, units: Sequence[Unit], images: torch.Tensor, settings: RecoverSettings, grouping: bool):
        device = images.device
        self.units = list(units)
        self.batches = member_batches(self.units, grouping)
        self.augment = UnitAugmenter(self.units, settings)
        self.images = nn.Parameter(images)
        self.labels = torch.tensor([u.classes for u in self.units], device=device)
        self.optimizer = torch.optim.Adam([self.images], lr=settings.lr, betas=(0.5, 0.9), eps=1e-8)
        members = sorted({m for u in self.units for m in u.members})
        self.last_losses = {m: torch.zeros(len(self.units), 2, device=device) for m in members}
        # voting weight of each member in each unit (0 where the unit did not choose it)
        self.weights = {
            m: torch.tensor(
                [u.weights[u.members.index(m)] if m in u.members else 0.0 for u in self.units], device=device
            )
            for m in members
        }
        self.index = torch.arange(len(self.units), device=device)
        self.resume_at = 0  # the first iteration to compute: later when restored from a snapshot

    def state(self) -> dict[str, Any]:
        """Everything the group's remaining iterations read: images, Adam, augmentation streams, last losses."""
        return {
            "units": [u.key for u in self.units],
            "images": self.images.detach().cpu(),
            "optimizer": on_cpu(self.optimizer.state_dict()),
            "generators": [g.get_state() for g in self.augment.generators],
            "last_losses": {m: t.cpu() for m, t in self.last_losses.items()},
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state` (Adam's moments follow the images onto their device)."""
        with torch.no_grad():
            self.images.copy_(state["images"])
        self.optimizer.load_state_dict(state["optimizer"])
        for generator, saved in zip(self.augment.generators, state["generators"], strict=True):
            generator.set_state(saved)
        for member, losses in state["last_losses"].items():
            self.last_losses[member].copy_(losses)

    def start_step(self) -> None:
        """Draw this step's augmentation of the group's images; member passes read it, detached."""
        count, batch_size = self.images.shape[:2]
        self._augmented = self.augment(self.images, range(count)).reshape(count, batch_size, *self.images.shape[2:])
        self._inputs = self._augmented.detach()
        self._grad = torch.zeros_like(self._inputs)

    def member_pass(
        self, committee: Committee, r_bn: float, member: str, ids: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradient of ``Σ_units w_member (CE + r_bn · R_bn)`` over units ``ids`` w.r.t. their augmented images,
        with the per-unit CE and BN terms. Reads the group, writes nothing: passes may run in threads."""
        x = self._inputs[ids].flatten(0, 1).requires_grad_(True)
        ce, bn = committee.losses(member, x, self.labels[ids].reshape(-1), units=len(ids))
        (grad,) = torch.autograd.grad((self.weights[member][ids] * (ce + r_bn * bn)).sum(), x)
        return grad.view(len(ids), *self._inputs.shape[1:]), ce.detach(), bn.detach()

    def add_pass(self, member: str, ids: list[int], result: tuple[torch.Tensor, ...]) -> None:
        grad, ce, bn = result
        self._grad.index_add_(0, self.index[ids], grad)
        self.last_losses[member][ids] = torch.stack([ce, bn], dim=1)

    def surrogate(self) -> torch.Tensor:
        """A scalar whose gradient w.r.t. the images is the step's: the passes' gradients, summed in pass order,
        carried back through the augmentation."""
        return (self._augmented * self._grad).sum()


def step_surrogate(
    groups: Sequence[GroupState], committee: Committee, r_bn: float, passes: MemberPasses
) -> torch.Tensor:
    """One step's member passes of every group (run by ``passes``), summed per group in a fixed order; the
    returned scalar's backward gives each group's images ``∇ Σ_units Σ_m w_m (CE_m + r_bn · R_m)``."""
    for group in groups:
        group.start_step()
    jobs = [(group, member, ids) for group in groups for member, ids in group.batches]
    results = passes.run(jobs, lambda job: job[0].member_pass(committee, r_bn, job[1], job[2]), kind=lambda job: job[1])
    for (group, member, ids), result in zip(jobs, results, strict=True):
        group.add_pass(member, ids, result)
    return torch.stack([group.surrogate() for group in groups]).sum()


class ImageInit(Protocol):
    """Where a group's images start (:class:`cvdd.methods.init_images.Initializer`)."""

    def prepare(self) -> None:
        """Work shared by all units, done on every rank together before the first step."""

    def __call__(self, units: Sequence[Unit]) -> torch.Tensor:
        """``(len(units), B, C, H, W)`` normalised starting images."""


@dataclass(frozen=True)
class Layout:
    """How a run's units are laid out in memory; none of it changes results beyond float rounding.

    ``grouping`` stacks a group's units into one forward pass per member; ``group_images`` caps a group (``None``:
    from free memory, :func:`.memory.auto_group_images`); ``wave_images`` caps what one rank optimises at once
    (``None``: from free memory, :func:`.memory.auto_wave_images`)."""

    grouping: bool = True
    group_images: int | None = None
    wave_images: int | None = None


class RecoverModule(L.LightningModule):
    """Optimises a rank's groups of units wave by wave; each step is one Adam step on every group of the wave.

    The committee is a frozen sub-module kept out of checkpoints. Every group has its own parameter and
    Adam, and its loss touches only its own images, so a group's result is the same whichever wave or rank
    it runs in. At the start of fit, once the committee sits on its device, the ``units`` are cut into groups
    (:func:`plan_groups`; groups whose units are all in ``done`` are skipped), the groups dealt to the ranks in
    turn and packed into waves; sizes left to free memory are the smallest choice of any rank, so every rank
    plans the same groups. Every rank walks the same number of waves (idle ranks take no-op steps), so
    distributed ranks stay in step.
    """

    def __init__(
        self,
        committee: Committee,
        *,
        units: Sequence[Unit],
        init_images: ImageInit,
        settings: RecoverSettings,
        pixel_range: tuple[Sequence[float], Sequence[float]],
        on_unit_done: UnitCallback,
        layout: Layout = Layout(),
        done: frozenset[str] = frozenset(),
        image_shape: Sequence[int] = (),
        member_workers: int = 1,
        snapshots: GroupSnapshots | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False
        self.committee = committee
        self.units = list(units)
        self.done = done
        self.layout = layout
        self.image_shape = tuple(image_shape)
        self.init_images = init_images
        self.settings = settings
        self.on_unit_done = on_unit_done
        self.member_workers = member_workers
        self.snapshots = snapshots
        self.passes = MemberPasses(1, 1)
        low, high = (torch.tensor(v, dtype=torch.float32).view(1, 1, -1, 1, 1) for v in pixel_range)
        self.register_buffer("low", low, persistent=False)
        self.register_buffer("high", high, persistent=False)
        self.group_images = layout.group_images
        self.waves: list[list[list[Unit]]] = []
        self.n_waves = 0
        self.groups: list[GroupState] = []
        self._wave = -1
        self.loss_watch = LossWatch()  # the wave's first non-finite iteration, kept on the device
        self._step = 0

    def on_fit_start(self) -> None:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        unit_images = max((len(u.classes) for u in self.units), default=1)
        per_image, free = None, None
        if self.layout.group_images is None or self.layout.wave_images is None:
            per_image = self._bytes_per_image()
            free = free_bytes(self.device, self.trainer.num_devices if self.device.type == "cpu" else 1)
        if self.group_images is None:
            total = sum(len(u.classes) for u in self.units)
            self.group_images = min(total, self._agreed(auto_group_images(per_image, free, unit_images)))
            log.info(
                "method.recover.group_images=null: %d images per group (%.1f MiB per image for the costliest unit, "
                "sized for at most %.0f GiB)",
                self.group_images,
                per_image / 2**20,
                GROUP_MEMORY_CAP / 2**30,
            )
        groups = plan_groups(self.units, self.group_images, self.layout.grouping)
        todo = [g for g in groups if not all(u.key in self.done for u in g)]  # groups are redone whole: same company
        sizes = [sum(len(u.classes) for u in g) for g in todo]
        wave_images = self.layout.wave_images or self._auto_wave_images(
            per_image, free, max(sizes, default=1), sum(sizes)
        )
        per_rank = [plan_waves(todo[r::world], wave_images) for r in range(world)]
        self.waves = per_rank[rank]
        self.n_waves = max(len(w) for w in per_rank)
        self.passes = MemberPasses(self.member_workers, torch.get_num_threads())
        self.init_images.prepare()  # e.g. patch scoring: sharded over the ranks, before any rank's first step
        if self.device.type == "cpu":
            log.info(
                "recover: member passes %s, %d intra-op thread(s) each",
                "one at a time" if self.passes.workers == 1 else f"{self.passes.workers} at a time",
                self.passes.pass_threads,
            )

    def teardown(self, stage: str) -> None:
        self.passes.close()

    def _bytes_per_image(self) -> float:
        """The costliest unit's bytes per image (its members' saved activations and its own state), measured."""
        member_bytes = {
            m: member_bytes_per_image(self.committee, m, self.image_shape, self.device) for m in self.committee.members
        }
        return wave_bytes_per_image(member_bytes, [u.members for u in self.units], image_state_bytes(self.image_shape))

    def _agreed(self, choice: int) -> int:
        """The smallest of every rank's ``choice``: sizes from free memory are the same on all ranks."""
        return int(self.all_gather(torch.tensor(choice, device=self.device)).min())

    def _auto_wave_images(self, per_image: float, free: int | None, largest_group: int, total: int) -> int:
        """Images per wave from this device's free memory, the smallest of all ranks' choices."""
        chosen = self._agreed(total if free is None else auto_wave_images(per_image, free, largest_group, total))
        need = HEADROOM * per_image * largest_group
        if free is not None and need > BUDGET_FRACTION * free:
            log.warning(
                "one group of %d images needs about %.1f GiB on %s, more than %.0f %% of the %.1f GiB free: it may "
                "run out of memory. Lower method.recover.group_images (results change by float rounding only) or keep "
                "hardware.precision=auto (bf16 activations)",
                largest_group,
                need / 2**30,
                self.device,
                100 * BUDGET_FRACTION,
                free / 2**30,
            )
        log.info(
            "method.recover.wave_images=null: %d images per wave (about %.1f MiB per image for the costliest unit, "
            "%s free on %s)",
            chosen,
            per_image / 2**20,
            "unknown" if free is None else f"{free / 2**30:.1f} GiB",
            self.device,
        )
        return chosen

    def progress_title(self, trainer) -> str:
        return f"recover wave {self._wave + 1}/{max(self.n_waves, 1)}"

    def progress_fields(self) -> dict[str, str]:
        """This wave's iteration and each member's mean CE / BN term over its units."""
        if not self.groups:
            return {}
        fields = {"iteration": f"{self._step + 1}/{self.settings.iterations}"}
        losses = self._member_losses()
        for member in sorted({key.split("/")[1] for key in losses}):
            ce, bn = (float(losses[f"recover/{member}/{term}"]) for term in ("ce", "bn"))
            fields[member.removesuffix("_small")] = f"CE {ce:.3f} BN {bn:.3f}"
        return fields

    def train_dataloader(self) -> DataLoader:
        """One step per wave and iteration; the steps carry no data (the images are this module's state)."""
        return DataLoader(range(self.n_waves * self.settings.iterations), batch_size=None)

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        return {k: v for k, v in state.items() if not k.startswith("committee.")}

    def configure_optimizers(self):
        return None  # one Adam per group, created in _start_wave

    def _start_wave(self, wave: int) -> None:
        self._wave = wave
        groups = self.waves[wave] if wave < len(self.waves) else []
        self.groups = [
            GroupState(units, self.init_images(units).to(self.device), self.settings, self.layout.grouping)
            for units in groups
        ]
        self._restore_snapshots()

    def _restore_snapshots(self) -> None:
        """Each group of the wave goes on from its own snapshot, if it has one: a group's steps touch only its own
        state, so groups (and ranks: a wave's steps hold no collective) may resume at different iterations — after a
        kill between two groups' writes, or on another number of ranks."""
        if self.snapshots is None:
            return
        for group in self.groups:
            state = self.snapshots.load(group.units)
            if state is not None:
                group.restore(state)
                group.resume_at = int(state["iterations_done"])
        resumed = [g for g in self.groups if g.resume_at]
        if resumed:
            log.info(
                "recover wave %d: %d of %d group(s) resume at iteration %s of %d (snapshots)",
                self._wave + 1,
                len(resumed),
                len(self.groups),
                "/".join(map(str, sorted({g.resume_at for g in resumed}))),
                self.settings.iterations,
            )

    def training_step(self, batch, batch_idx: int) -> None:
        iters = self.settings.iterations
        wave, step = divmod(batch_idx, iters)
        self._step = step
        if wave != self._wave:
            self._start_wave(wave)
        active = [group for group in self.groups if step >= group.resume_at]
        if active:
            self._optimise(active, step)
            if self.snapshots is not None and self.snapshots.due(step + 1, iters):
                for group in active:
                    self.snapshots.save(group, step + 1)
        if step == iters - 1:
            self._refuse_non_finite()  # every rank, groups or not: the ranks agree before any unit is written
            if self.groups:
                self._finish_wave()
        return None

    def _optimise(self, groups: list[GroupState], step: int) -> None:
        """One iteration of ``groups`` (this rank's wave, less groups resumed at a later iteration)."""
        self.committee.assert_frozen()
        lr = self.settings.lr * cosine_factor(step / self.settings.iterations)
        for group in groups:
            for param_group in group.optimizer.param_groups:
                param_group["lr"] = lr
            group.optimizer.zero_grad(set_to_none=True)
        surrogate = step_surrogate(groups, self.committee, self.settings.r_bn, self.passes)
        self.loss_watch.see(surrogate, step)
        self.manual_backward(surrogate)  # the groups' graphs are disjoint: each gets exactly its own gradient
        for group in groups:
            group.optimizer.step()
            with torch.no_grad():
                group.images.copy_(torch.maximum(torch.minimum(group.images, self.high), self.low))
        self.log_dict(self._member_losses(), on_step=True)
        self.log("recover/lr", lr, on_step=True)

    def _member_losses(self) -> dict[str, torch.Tensor]:
        """Mean CE, BN term and voting weight of each member over the units of the wave that chose it."""
        logged = {}
        for member in sorted({m for g in self.groups for m in g.last_losses}):
            parts = [(g.last_losses[member], g.weights[member]) for g in self.groups if member in g.last_losses]
            losses = torch.cat([loss[weight > 0] for loss, weight in parts])
            logged[f"recover/{member}/ce"] = losses[:, 0].mean()
            logged[f"recover/{member}/bn"] = losses[:, 1].mean()
            logged[f"recover/{member}/weight"] = torch.cat([weight[weight > 0] for _, weight in parts]).mean()
        return logged

    def _finish_wave(self) -> None:
        images = sum(g.images.shape[0] * g.images.shape[1] for g in self.groups)
        log.info(
            "wave %d/%d: %d images done, peak memory %.0f MiB",
            self._wave + 1,
            len(self.waves),
            images,
            peak_memory_mib(self.device),
        )
        for group in self.groups:
            images = group.images.detach().cpu()
            losses = {m: t.cpu() for m, t in group.last_losses.items()}
            for i, unit in enumerate(group.units):
                per_member = {m: {"ce": float(losses[m][i, 0]), "bn": float(losses[m][i, 1])} for m in unit.members}
                self.on_unit_done(unit, images[i], per_member)
            if self.snapshots is not None:
                self.snapshots.drop(group.units)
        self.groups = []

    def _refuse_non_finite(self) -> None:
        """Stop every rank before this wave's units are written if any rank's loss or images became non-finite (one
        agreement per wave; every rank calls it, with or without groups)."""
        self.loss_watch.check(
            self.all_gather,
            self.device,
            "the recover loss or the images",
            f"wave {self._wave + 1}",
            "method.recover.lr, committee.temperature (> 0), method.recover.r_bn and the teachers",
            also_bad=any(not bool(torch.isfinite(g.images).all()) for g in self.groups),
        )


def plan_groups(units: Sequence[Unit], group_images: int, grouping: bool) -> list[list[Unit]]:
    """A fixed partition of the whole set's units into groups that are optimised together.

    With ``grouping`` units are ordered by their members (so a group shares forward passes) and cut into
    groups of at most ``group_images`` images of one unit size; without, every unit is its own group. The
    partition depends on the units and these two settings only, never on waves, ranks or what a resumed run
    has already finished, so every unit is computed in the same company every time.
    """
    if not grouping:
        return [[u] for u in sorted(units, key=lambda u: (u.ipc_index, u.block))]
    ordered = sorted(units, key=lambda u: (-len(u.classes), u.members, u.ipc_index, u.block))
    return pack_consecutive(ordered, lambda u: len(u.classes), group_images, kind=lambda u: len(u.classes))


def plan_waves(groups: Sequence[Sequence[Unit]], max_images: int) -> list[list[list[Unit]]]:
    """Consecutive groups packed into waves of at most ``max_images`` images (a larger group is a wave alone)."""
    return pack_consecutive([list(g) for g in groups], lambda g: sum(len(u.classes) for u in g), max_images)


def class_blocks(num_classes: int, block: int) -> list[tuple[int, ...]]:
    return [tuple(range(s, min(s + block, num_classes))) for s in range(0, num_classes, block)]
