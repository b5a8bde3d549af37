"""CV-DD (committee voting) and SRe2L++ (one model): synthetic images optimised against frozen teachers.

The set is split into units (one IPC index × one class block); each unit has its own seed, members and voting
weights (:mod:`.recover`). Finished units are written atomically to the set's ``units/`` as they complete,
so a restarted run skips them (reading only their metadata) and ends with bitwise the same images. Units are
sharded across ranks; once every unit is on disk each rank exports a share of them as PNGs and rank 0 streams them
into ``images.pt`` (:func:`cvdd.artifacts.distilled.write_set`).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from cvdd.artifacts import load_tensors, save_tensors
from cvdd.artifacts.distilled import DistilledArtifact, SetPiece
from cvdd.committee.committee import select_members, voting_weights, warn_if_nearly_equal
from cvdd.committee.passes import plan_passes
from cvdd.committee.priors import configured_priors
from cvdd.methods.base import DistillContext, ImageSet, Method, finished_piece, require_real_images
from cvdd.methods.committee_voting.memory import named_memory_keys
from cvdd.methods.committee_voting.options import RecoverOptions
from cvdd.methods.committee_voting.recover import Layout, RecoverModule, RecoverSettings, Unit, class_blocks
from cvdd.methods.committee_voting.snapshots import GroupSnapshots
from cvdd.methods.init_images import Initializer
from cvdd.runtime import log
from cvdd.runtime.distributed import HydraDDPStrategy
from cvdd.runtime.hardware import check_same_threads, cpu_threads
from cvdd.runtime.seeding import derive_seed


class CommitteeVoting(Method):
    """``member=None``: CV-DD, the ``committee`` votes (``committee.k`` members per unit, weighted by their
    priors). ``member=<model id>``: SRe2L++, that one model recovers every unit alone."""

    def __init__(
        self,
        name: str,
        set_name: str,
        labels_by: str,
        recover: Mapping[str, Any] | RecoverOptions,
        member: str | None = None,
    ):
        super().__init__(name, set_name, labels_by)
        self.recover = recover if isinstance(recover, RecoverOptions) else RecoverOptions.parse(recover)
        self.member = member
        self._priors: dict[str, float] | None = None
        self._priors_resolved = False  # resolved once per run (a measurement runs three jobs per member)

    def committee_config(self, cfg: DictConfig) -> DictConfig:
        """``cfg.committee``, or for one ``member`` a committee of it alone (k = 1, weight 1)."""
        if self.member is None:
            return cfg.committee
        single = {"name": self.name, "members": [self.member], "k": 1, "schedule": "fixed", "fixed": None}
        return OmegaConf.merge(cfg.committee, {**single, "weighting": "equal", "priors": None})

    def check(self, ctx: DistillContext) -> None:
        self.recover.check()
        self.recover.patch_settings(ctx.ipc)
        if self.recover.init_mode == "real":
            require_real_images(ctx, "method.recover.init.mode=real")

    def summary(self, made: ImageSet) -> list[tuple[str, str]]:
        """Each member's final CE / BN term, averaged over the units it recovered, on one row."""
        terms: dict[str, list[tuple[float, float]]] = {}
        for unit in made.metadata["units"]:
            for member, losses in unit["losses"].items():
                terms.setdefault(member, []).append((losses["ce"], losses["bn"]))
        means = {m: [sum(t) / len(t) for t in zip(*v, strict=True)] for m, v in sorted(terms.items())}
        rows = [
            ("CE / BN", ", ".join(f"{m.removesuffix('_small')} {ce:.2f} / {bn:.1f}" for m, (ce, bn) in means.items()))
        ]
        priors = made.metadata["priors"]
        if len(priors) > 1:
            rows.append(("priors", ", ".join(f"{m.removesuffix('_small')} {p:.1f}" for m, p in priors.items())))
        return rows

    def _committee(self, ctx: DistillContext):
        comm = self.committee_config(ctx.cfg)
        if not self._priors_resolved:
            cfg = OmegaConf.merge(ctx.cfg, {"committee": comm})
            self._priors = configured_priors(cfg, ctx.root, "measure", ctx.measure)
            self._priors_resolved = True
        committee = ctx.committee(list(comm.members), self._priors, self.recover.first_bn_multiplier)
        if self._priors is None and comm.weighting == "prior" and int(comm.k) > 1:
            warn_if_nearly_equal(committee.priors, float(comm.temperature), "distill (committee.priors=null)")
        return committee

    def recipe(self, ctx: DistillContext) -> dict[str, Any]:
        """Dataset, IPC, seed, recover and committee settings, priors, the teachers' own fingerprints and each
        member's numerics (bf16/fp32, memory format); not the wave size or device count."""
        committee = self._committee(ctx)
        comm = OmegaConf.to_container(self.committee_config(ctx.cfg), resolve=True)
        comm.pop("train_missing", None)
        comm.pop("train_overrides", None)
        return {
            **ctx.base_recipe(),
            "recover": self.recover.recipe(),
            "committee": comm,
            "priors": committee.priors,
            "teachers": ctx.teacher_fingerprints(list(comm["members"])),
            "numerics": committee.numerics_tags,
        }

    def make(self, ctx: DistillContext, recipe_hash: str) -> ImageSet | None:
        cfg, committee, artifact, trainer = ctx.cfg, self._committee(ctx), ctx.artifact, ctx.trainer
        if isinstance(trainer.strategy, HydraDDPStrategy):
            trainer.strategy.wrap_model = False  # each rank owns its images: no broadcast, no gradient averaging
        units = plan_units(self.committee_config(cfg), ctx, self.recover.class_block, committee.priors)
        members = len({m for unit in units for m in unit.members})
        workers, threads = plan_passes(cfg.hardware.get("member_threads"), cpu_threads(trainer), members)
        done = set() if cfg.get("overwrite", False) else finished_units(artifact, units, recipe_hash, threads)
        if done:
            log.info("resuming %s: %d of %d units already finished", artifact.folder, len(done), len(units))
        rec = self.recover
        settings = RecoverSettings(rec.iterations, rec.lr, rec.r_bn, rec.jitter, rec.crop_scale, ctx.spec.hflip)
        initializer = Initializer(
            rec.init_mode,
            ctx.seed,
            ctx.image_shape,
            real=ctx.data.view("train"),
            patches=rec.patch_settings(ctx.ipc),
            committee=committee,
            cache=ctx.patch_cache(committee),
        )

        def save_unit(unit: Unit, images: torch.Tensor, losses: dict) -> None:
            save_tensors(
                artifact.unit_path(unit.key),
                {
                    "recipe": recipe_hash,
                    "cpu_threads": threads,
                    "group_images": module.group_images,  # the group size it ran in (rounding-level effect)
                    "images": images,
                    "classes": list(unit.classes),
                    "ipc_index": unit.ipc_index,
                    "block": unit.block,
                    "members": list(unit.members),
                    "weights": list(unit.weights),
                    "losses": losses,
                },
            )

        layout = Layout(rec.grouping, rec.group_images, rec.wave_images)
        snapshots = GroupSnapshots(artifact.folder / "units" / "snapshots", rec.snapshot_every, recipe_hash)
        module = RecoverModule(
            committee,
            units=units,
            init_images=initializer,
            settings=settings,
            pixel_range=ctx.spec.pixel_range,
            on_unit_done=save_unit,
            layout=layout,
            done=frozenset(done),
            image_shape=ctx.image_shape,
            member_workers=workers,
            snapshots=snapshots,
        )
        if len(done) < len(units):
            with named_memory_keys():
                trainer.fit(module)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        shutil.rmtree(snapshots.folder, ignore_errors=True)  # every group finished: its units hold the result
        return collect_units(artifact, units, committee.priors)

    def finish(self, ctx: DistillContext) -> None:
        """``method.recover.keep_units=false``: the unit files go once ``images.pt`` holds them (a damaged set is
        then redone from scratch instead of repaired from its units)."""
        if not self.recover.keep_units:
            shutil.rmtree(ctx.artifact.folder / "units", ignore_errors=True)


def plan_units(comm: DictConfig, ctx: DistillContext, class_block: int, priors: dict[str, float]) -> list[Unit]:
    """Every unit of the set: its classes, members and voting weights, and its own seed."""
    ipc, seed = ctx.ipc, ctx.seed
    chosen = select_members(comm.members, comm.k, comm.schedule, ipc, seed, priors, comm.get("fixed"))
    units = []
    for i in range(ipc):
        for b, classes in enumerate(class_blocks(ctx.spec.num_classes, class_block)):
            weights = voting_weights(chosen[i], priors, comm.weighting, comm.temperature, (seed, i, b))
            units.append(Unit(i, b, classes, chosen[i], tuple(weights), derive_seed(seed, i, b)))
    return units


def finished_units(artifact: DistilledArtifact, units: list[Unit], recipe_hash: str, threads: int | None) -> set[str]:
    """Units already on disk for this recipe; a damaged unit file is left to be recomputed. Units whose member
    passes ran at another CPU thread count (``threads``, see :func:`cvdd.committee.passes.threads_per_pass`) are
    refused (:func:`check_same_threads`)."""
    done = set()
    for unit in units:
        saved = finished_piece(artifact.unit_path(unit.key), recipe_hash, f"unit {unit.key}")
        if saved is not None:
            check_same_threads(
                saved.get("cpu_threads"), threads, f"distilled set {artifact.folder} (its member passes)"
            )
            done.add(unit.key)
    return done


REDO_UNITS = "run the same command again: it recomputes damaged units"


def unit_images(path: Path) -> torch.Tensor:
    return load_tensors(path, REDO_UNITS)["images"]


def collect_units(artifact: DistilledArtifact, units: list[Unit], priors: dict[str, float]) -> ImageSet:
    """The set as one piece per unit file, with each unit's members, weights and final losses for the manifest.
    Only the files' metadata is read here (memory-mapped); a unit's images are read when the writer takes it."""
    pieces, records = [], []
    for unit in sorted(units, key=lambda u: (u.ipc_index, u.block)):
        path = artifact.unit_path(unit.key)
        if not path.is_file():
            raise RuntimeError(f"unit {unit.key} is missing from {path.parent}; run the same command again to finish")
        saved = load_tensors(path, REDO_UNITS, mapped=True)
        classes = torch.tensor(saved["classes"])
        pieces.append(SetPiece(classes, torch.full_like(classes, unit.ipc_index), partial(unit_images, path)))
        records.append({k: saved[k] for k in ("ipc_index", "block", "classes", "members", "weights", "losses")})
        records[-1]["cpu_threads"] = saved.get("cpu_threads")
        records[-1]["group_images"] = saved.get("group_images")
    return ImageSet(pieces, {"priors": priors, "units": records})
