"""The distill job: one outline for every method (``method=cvdd|sre2l|rded|random_real|herding``).

Fingerprint the method's recipe → reuse a finished set of the same recipe (or repair its damaged files from
what the method resumes) or refuse one of another → let the method make the images → write the set's files
and, last, its manifest on rank 0 (every rank writes a share of the PNGs).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cvdd.artifacts import (
    ArtifactConflictError,
    damaged_files,
    ensure_writable,
    fingerprint,
    load_json_if_intact,
)
from cvdd.artifacts.distilled import DistilledArtifact, write_set
from cvdd.artifacts.identity import set_name
from cvdd.data import load_dataset
from cvdd.methods.base import DistillContext, Method
from cvdd.report.summary import SET_KEYS, next_command, size_on_disk, stage_summary
from cvdd.runtime import log
from cvdd.runtime.trainer import stage_trainer
from cvdd.stages.priors import measure_member
from cvdd.stages.squeeze import ensure_teachers


def finished_manifest(artifact: DistilledArtifact) -> dict | None:
    """The manifest of a finished set, ``None`` if there is none or it is damaged (then the set is rebuilt)."""
    return load_json_if_intact(artifact.manifest, "rebuilding the set") if artifact.complete() else None


def reusable(artifact: DistilledArtifact, recipe_hash: str, overwrite: bool) -> dict | None:
    """A finished, intact set of this recipe (nothing to do), or ``None`` to make it; a set of another recipe is
    refused."""
    manifest = None if overwrite else finished_manifest(artifact)
    if manifest is None:
        return None
    if manifest["fingerprint"] != recipe_hash:
        raise ArtifactConflictError(
            f"{artifact.folder} was distilled with a different recipe; choose another set=... or add overwrite=true"
        )
    damaged = damaged_files(artifact.folder, manifest.get("files", {}))
    if damaged:
        log.warning("distilled set %s has damaged files (%s); rebuilding it", artifact.folder, damaged[0])
        return None
    log.info("distilled set %s exists with the same recipe; nothing to do (overwrite=true redoes it)", artifact.folder)
    return manifest


def distill(cfg: DictConfig) -> dict[str, Any]:
    """Make the set of ``cfg.method`` and return its manifest (empty on ranks other than 0)."""
    artifact = DistilledArtifact(Path(cfg.paths.artifacts), cfg.dataset.name, set_name(cfg))
    method: Method = instantiate(cfg.method)
    data = load_dataset(cfg.dataset)
    with stage_trainer(cfg) as (trainer, loggers):
        ctx = DistillContext(cfg, artifact.root, data, artifact, trainer, ensure_teachers, measure_member)
        method.check(ctx)  # bad settings are refused before anything is written
        ensure_writable(artifact.folder)
        recipe = method.recipe(ctx)
        recipe_hash = fingerprint(recipe)
        manifest = reusable(artifact, recipe_hash, bool(cfg.get("overwrite", False)))
        if manifest is not None:
            return manifest
        started = time.time()
        made = method.make(ctx, recipe_hash)
        spec = ctx.spec
        fields = {
            "dataset": cfg.dataset.name,
            "method": method.name,
            "classes": data.classes,
            "class_names": data.class_names,
            "ipc": ctx.ipc,
            "seed": ctx.seed,
            "fingerprint": recipe_hash,
            **made.metadata,
            "wall_seconds": round(time.time() - started, 2),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "recipe": recipe,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        manifest = write_set(artifact, made.pieces, data.class_names, spec.mean, spec.std, ctx.seed, fields)
        if not manifest:  # ranks other than 0 wrote their share of the PNGs
            return {}
        method.finish(ctx)
        stage_summary(
            f"distill ({method.name})",
            [
                ("set", f"{artifact.folder} ({len(made)} images, {size_on_disk(artifact.folder)})"),
                ("grid", str(artifact.grid)),
                *method.summary(made),
            ],
            time.time() - started,
            next_command("relabel.py", SET_KEYS),
        )
        for logger in loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="distilled/grid", images=[str(artifact.grid)])
        return manifest
