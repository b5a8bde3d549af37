"""The recover job: plan units, make sure the committee exists, optimise, assemble the set.

Finished units are written atomically as they complete; a restarted run skips them, and
because every unit depends only on its own seed the final set equals an uninterrupted run's.
Units are sharded across ranks; rank 0 assembles the set once every unit is on disk.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from cvdd.artifacts import (
    ArtifactConflictError,
    ArtifactCorruptError,
    TeacherArtifact,
    damaged_files,
    ensure_writable,
    fingerprint,
    load_json,
    load_tensors,
    save_json,
    save_tensors,
)
from cvdd.committee import load_committee, select_members, voting_weights
from cvdd.data import get_spec, load_dataset
from cvdd.data.distilled import DistilledArtifact, save_set, set_files, to_pixels, write_pngs
from cvdd.distributed import HydraDDPStrategy
from cvdd.grid import distilled_grid, save_image_atomic
from cvdd.hardware import check_same_threads, cpu_threads, numerics_for
from cvdd.init import INIT_MODES, Initializer, PatchSettings
from cvdd.jobs.common import build_trainer, finish_loggers, log, task_overrides
from cvdd.jobs.squeeze import dataset_identity
from cvdd.recover import RecoverModule, RecoverSettings, Unit, class_blocks, plan_groups
from cvdd.seeding import derive_seed

SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def distilled_name(cfg: DictConfig) -> str:
    """``<committee>_ipc<n>_<init>_s<seed>`` unless ``name`` is given: every stage derives the same name.

    A given name is one folder name (letters, digits, ``._-``), so a set never lands outside ``distilled/``."""
    name = cfg.get("name")
    if name is None:
        return f"{cfg.committee.name}_ipc{cfg.ipc}_{cfg.recover.init.mode}_s{cfg.seed}"
    if not SET_NAME.fullmatch(str(name)):
        raise ValueError(
            f"name={name!r} must be a plain folder name (letters, digits, '.', '_', '-'; no '/' or leading '.')"
        )
    return str(name)


def check_ipc(cfg: DictConfig) -> None:
    if int(cfg.ipc) < 1:
        raise ValueError(f"ipc={cfg.ipc} must be at least 1 (images per class)")


def train_command(dataset: str, members: list[str]) -> str:
    return f"python train.py -m dataset={dataset} model={','.join(members)}"


def ensure_teachers(cfg: DictConfig) -> None:
    """Squeeze missing committee members first (``committee.train_missing``) or say how to."""
    root = Path(cfg.paths.artifacts)
    missing = [m for m in cfg.committee.members if not TeacherArtifact(root, cfg.dataset.name, m).exists()]
    if not missing:
        return
    if not cfg.committee.train_missing:
        raise FileNotFoundError(
            f"committee '{cfg.committee.name}' lacks teachers {missing} in {root / cfg.dataset.name / 'teachers'}; "
            f"squeeze them first:\n  {train_command(cfg.dataset.name, missing)}\n"
            f"or add committee.train_missing=true"
        )
    from cvdd.jobs.squeeze import squeeze_teacher

    for member in missing:
        log.info("squeezing missing committee member %s on %s", member, cfg.dataset.name)
        squeeze_teacher(compose_train_config(cfg, member))


SQUEEZE_KEYS = ("dataset", "paths", "hardware", "seed", "experiment", "trainer.accelerator", "trainer.precision")
SINGLE_DEVICE = {"ddp": "gpu", "ddp_cpu": "cpu"}  # members are squeezed one at a time, on one device


def squeeze_overrides(task_overrides: list[str]) -> list[str]:
    """The user's overrides of this run that ``train.py`` understands: dataset, paths, hardware (on one
    device), seed, the preset, precision. Recover's own keys (ipc, recover.*, committee.*) are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    kept = []
    for text, override in zip(task_overrides, OverridesParser.create().parse_overrides(task_overrides), strict=True):
        key = override.key_or_group
        if not any(key == k or key.startswith(k + ".") for k in SQUEEZE_KEYS):
            continue
        if key == "hardware":
            text = f"hardware={SINGLE_DEVICE.get(override.value(), override.value())}"
        kept.append(text)
    return kept


def compose_train_config(cfg: DictConfig, member: str) -> DictConfig:
    """The ``train.py`` config for one member: this run's dataset, paths, hardware, seed and preset as the
    user gave them, then ``committee.train_overrides``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cvdd.compose import CONF

    task = task_overrides()
    if task is None:  # a config built without Hydra's command line: what names the data and the device
        task = [f"dataset={cfg.dataset.name}", f"hardware={cfg.hardware.name}", f"paths.root={cfg.paths.root}"]
    overrides = [
        *squeeze_overrides(task),
        f"model={member}",
        "logger=none",
        *(cfg.committee.get("train_overrides") or []),
    ]
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def plan_units(cfg: DictConfig, num_classes: int, priors: dict[str, float]) -> list[Unit]:
    comm = cfg.committee
    chosen = select_members(comm.members, comm.k, comm.schedule, cfg.ipc, cfg.seed, priors, comm.get("fixed"))
    units = []
    for i in range(cfg.ipc):
        for b, classes in enumerate(class_blocks(num_classes, cfg.recover.class_block)):
            weights = voting_weights(chosen[i], priors, comm.weighting, comm.temperature, (cfg.seed, i, b))
            units.append(Unit(i, b, classes, chosen[i], tuple(weights), derive_seed(cfg.seed, i, b)))
    return units


def recover_recipe(
    cfg: DictConfig, priors: dict[str, float], teacher_hashes: dict[str, str], numerics: dict[str, str]
) -> dict[str, Any]:
    """What decides the images: dataset, IPC, seed, recover and committee settings, priors, the teachers' own
    fingerprints and each member's numerics (bf16/fp32, memory format); not the wave size or device count."""
    recover = OmegaConf.to_container(cfg.recover, resolve=True)
    recover.pop("wave_images", None)  # changes memory and speed, not results (groups are fixed by the recipe)
    committee = OmegaConf.to_container(cfg.committee, resolve=True)
    committee.pop("train_missing", None)
    committee.pop("train_overrides", None)
    return {
        "dataset": dataset_identity(cfg.dataset),
        "ipc": int(cfg.ipc),
        "seed": int(cfg.seed),
        "recover": recover,
        "committee": committee,
        "priors": priors,
        "teachers": teacher_hashes,
        "numerics": numerics,
    }


def _finished(artifact: DistilledArtifact, units: list[Unit], recipe_hash: str, threads: int | None) -> set[str]:
    """Units already on disk for this recipe; a damaged unit file is left to be recomputed. Units computed at
    another CPU thread count are refused (:func:`check_same_threads`)."""
    done = set()
    for unit in units:
        path = artifact.unit_path(unit.key)
        if not path.is_file():
            continue
        try:
            saved = load_tensors(path, "the run recomputes it")
        except ArtifactCorruptError:
            log.warning("unit file %s is damaged; recomputing that unit", path)
            continue
        if saved["recipe"] == recipe_hash:
            check_same_threads(saved.get("cpu_threads"), threads, f"distilled set {artifact.folder}")
            done.add(unit.key)
    return done


def finished_manifest(artifact: DistilledArtifact) -> dict | None:
    """The manifest of a finished set, ``None`` if there is none or it is damaged (then the set is rebuilt)."""
    if not artifact.complete():
        return None
    try:
        return load_json(artifact.manifest)
    except ArtifactCorruptError:
        log.warning("manifest %s is damaged; rebuilding the set from its finished units", artifact.manifest)
        return None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def check_recover_settings(cfg: DictConfig) -> PatchSettings | None:
    """``ipc``, ``recover.*`` and ``recover.init`` checked before any work starts; the patch settings if
    the initialisation is ``patches``."""
    check_ipc(cfg)
    if int(cfg.recover.iterations) < 1:
        raise ValueError(f"recover.iterations={cfg.recover.iterations} must be at least 1")
    if cfg.recover.wave_images is not None and int(cfg.recover.wave_images) < int(cfg.recover.group_images):
        raise ValueError(
            f"recover.wave_images={cfg.recover.wave_images} is below recover.group_images={cfg.recover.group_images}: "
            f"a group is optimised at once; raise wave_images, or lower group_images (which changes the results)"
        )
    init = cfg.recover.init
    if init.mode not in INIT_MODES:
        raise ValueError(f"recover.init.mode={init.mode!r}; choose from {', '.join(INIT_MODES)}")
    if init.mode != "patches":
        return None
    return PatchSettings(int(cfg.ipc), str(init.difficulty), int(init.factor), int(init.candidates), tuple(init.scale))


def check_real_images(targets: torch.Tensor, ipc: int, classes: list[str]) -> None:
    """Real-image initialisation gives every image of a class its own real image: refuse to repeat them."""
    counts = torch.bincount(targets, minlength=len(classes))
    short = [(classes[c], int(n)) for c, n in enumerate(counts.tolist()) if n < ipc]
    if short:
        raise ValueError(
            f"recover.init.mode=real needs ipc={ipc} distinct real images per class, but class {short[0][0]!r} has "
            f"{short[0][1]} ({len(short)} classes are short); lower ipc or use recover.init.mode=patches"
        )


def distill(cfg: DictConfig) -> dict[str, Any]:
    """Run recover for ``cfg`` and return the manifest (empty on ranks other than 0)."""
    patches = check_recover_settings(cfg)
    root = Path(cfg.paths.artifacts)
    artifact = DistilledArtifact(root, cfg.dataset.name, distilled_name(cfg))
    ensure_writable(artifact.folder)
    spec = get_spec(cfg.dataset.name)
    data = load_dataset(cfg.dataset)
    if cfg.recover.init.mode == "real":
        check_real_images(data.view("train").targets, int(cfg.ipc), data.classes)
    ensure_teachers(cfg)
    comm = cfg.committee
    priors_cfg = OmegaConf.to_container(comm.priors, resolve=True) if comm.get("priors") else None
    committee = load_committee(
        root,
        cfg.dataset.name,
        comm.members,
        data.classes,
        priors_cfg,
        cfg.recover.first_bn_multiplier,
        numerics=lambda arch: numerics_for(cfg, arch, "recover"),
    )
    numerics = {name: n.tag for name, n in committee.numerics.items()}
    teacher_hashes = {
        m: load_json(TeacherArtifact(root, cfg.dataset.name, m).record)["fingerprint"] for m in comm.members
    }
    recipe = recover_recipe(cfg, committee.priors, teacher_hashes, numerics)
    recipe_hash = fingerprint(recipe)
    manifest = finished_manifest(artifact) if not cfg.get("overwrite", False) else None
    if manifest is not None:
        if manifest["fingerprint"] == recipe_hash:
            damaged = damaged_files(artifact.folder, manifest.get("files", {}))
            if not damaged:
                log.info(
                    "distilled set %s exists with the same recipe; nothing to do (overwrite=true redoes it)",
                    artifact.folder,
                )
                return manifest
            log.warning("distilled set %s has damaged files (%s); rebuilding it", artifact.folder, damaged[0])
        else:
            raise ArtifactConflictError(
                f"{artifact.folder} was distilled with a different recipe; choose another name=... or add "
                f"overwrite=true"
            )

    started = time.time()
    trainer, loggers = build_trainer(cfg)
    try:
        if isinstance(trainer.strategy, HydraDDPStrategy):
            trainer.strategy.wrap_model = False  # each rank owns its images: no broadcast, no gradient averaging
        threads = cpu_threads(trainer)
        units = plan_units(cfg, spec.num_classes, committee.priors)
        done = set() if cfg.get("overwrite", False) else _finished(artifact, units, recipe_hash, threads)
        groups = plan_groups(units, int(cfg.recover.group_images), bool(cfg.recover.grouping))
        todo = [g for g in groups if not all(u.key in done for u in g)]  # groups are redone whole: same company
        if done:
            log.info("resuming %s: %d of %d units already finished", artifact.folder, len(done), len(units))

        rec = cfg.recover
        settings = RecoverSettings(
            int(rec.iterations), float(rec.lr), float(rec.r_bn), int(rec.jitter), tuple(rec.crop_scale), spec.hflip
        )
        init = rec.init
        real = data.view("train")
        initializer = Initializer(
            init.mode,
            int(cfg.seed),
            (spec.channels, spec.image_size, spec.image_size),
            real=real,
            patches=patches,
            committee=committee,
            cache_dir=root / cfg.dataset.name / "patches",
            cache_identity={"dataset": dataset_identity(cfg.dataset), "teachers": teacher_hashes, "numerics": numerics},
        )

        def save_unit(unit: Unit, images: torch.Tensor, losses: dict) -> None:
            save_tensors(
                artifact.unit_path(unit.key),
                {
                    "recipe": recipe_hash,
                    "cpu_threads": threads,
                    "images": images,
                    "classes": list(unit.classes),
                    "ipc_index": unit.ipc_index,
                    "block": unit.block,
                    "members": list(unit.members),
                    "weights": list(unit.weights),
                    "losses": losses,
                },
            )

        if todo:
            module = RecoverModule(
                committee,
                todo,
                initializer,
                settings,
                spec.pixel_range,
                save_unit,
                grouping=bool(rec.grouping),
                wave_images=None if rec.wave_images is None else int(rec.wave_images),
                image_shape=(spec.channels, spec.image_size, spec.image_size),
            )
            trainer.fit(module)
        _barrier()
        if trainer.global_rank != 0:
            return {}
        manifest = assemble(
            cfg,
            artifact,
            units,
            recipe,
            recipe_hash,
            data.classes,
            data.class_names,
            committee.priors,
            time.time() - started,
        )
        for logger in loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="distilled/grid", images=[str(artifact.grid)])
        return manifest
    finally:
        finish_loggers(loggers)


def assemble(
    cfg: DictConfig,
    artifact: DistilledArtifact,
    units: list[Unit],
    recipe: dict,
    recipe_hash: str,
    classes: list[str],
    class_names: list[str],
    priors: dict[str, float],
    seconds: float,
) -> dict[str, Any]:
    """Collect every unit file into images.pt, PNGs, grid.png and (last) manifest.json."""
    spec = get_spec(cfg.dataset.name)
    images, labels, ipc_index, records = [], [], [], []
    for unit in sorted(units, key=lambda u: (u.ipc_index, u.block)):
        path = artifact.unit_path(unit.key)
        if not path.is_file():
            raise RuntimeError(f"unit {unit.key} is missing from {path.parent}; run the same command again to finish")
        saved = load_tensors(path, "run the same command again: it recomputes damaged units")
        images.append(saved["images"])
        labels += saved["classes"]
        ipc_index += [unit.ipc_index] * len(saved["classes"])
        records.append({k: saved[k] for k in ("ipc_index", "block", "classes", "members", "weights", "losses")})
        records[-1]["cpu_threads"] = saved.get("cpu_threads")
    images = torch.cat(images)
    labels_t, ipc_t = torch.tensor(labels), torch.tensor(ipc_index)
    order = torch.argsort(labels_t * (max(ipc_index) + 1) + ipc_t)  # class-major, then IPC index
    images, labels_t, ipc_t = images[order], labels_t[order], ipc_t[order]
    save_set(artifact, images, labels_t, ipc_t)
    pixels = to_pixels(images, spec.mean, spec.std)
    write_pngs(artifact.folder, pixels, labels_t, ipc_t, class_names)
    save_image_atomic(distilled_grid(pixels, labels_t, ipc_t, class_names, int(cfg.seed)), artifact.grid)
    manifest = {
        "files": set_files(artifact),
        "name": artifact.name,
        "dataset": cfg.dataset.name,
        "classes": classes,
        "class_names": class_names,
        "ipc": int(cfg.ipc),
        "seed": int(cfg.seed),
        "images": len(images),
        "fingerprint": recipe_hash,
        "priors": priors,
        "units": records,
        "wall_seconds": round(seconds, 2),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    save_json(artifact.manifest, manifest)
    log.info("distilled %d images (%s, IPC %d) -> %s", len(images), cfg.committee.name, cfg.ipc, artifact.folder)
    return manifest
