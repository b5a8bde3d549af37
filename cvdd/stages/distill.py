"""The distill job: one outline for every method (``method=cvdd|sre2l|rded|random_real|herding``).

Fingerprint the method's recipe → reuse a finished set of the same recipe (or repair its damaged files from
what the method resumes) or refuse one of another → let the method make the images → write the set's files
and, last, its manifest on rank 0 (every rank writes a share of the PNGs).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from cvdd.artifacts import ensure_writable, fingerprint
from cvdd.artifacts.distilled import DistilledArtifact, write_set
from cvdd.artifacts.identity import set_name
from cvdd.artifacts.ownership import exclusive
from cvdd.config.checks import check_settings
from cvdd.data import load_dataset
from cvdd.methods.base import DistillContext, Method
from cvdd.report.summary import SET_KEYS, next_command, size_on_disk, stage_summary
from cvdd.runtime.trainer import stage_trainer
from cvdd.stages.outline import finished_artifact, stamped
from cvdd.stages.priors import measure_member
from cvdd.stages.squeeze import ensure_teachers


def distill(cfg: DictConfig) -> dict[str, Any]:
    """Make the set of ``cfg.method`` and return its manifest (empty on ranks other than 0)."""
    check_settings(cfg)
    artifact = DistilledArtifact(Path(cfg.paths.artifacts), cfg.dataset.name, set_name(cfg))
    method: Method = instantiate(cfg.method)
    data = load_dataset(cfg.dataset)
    with stage_trainer(cfg) as (trainer, loggers):
        ctx = DistillContext(cfg, artifact.root, data, artifact, trainer, ensure_teachers, measure_member)
        method.check(ctx)  # bad settings are refused before anything is written
        with exclusive(artifact.folder, "distilled set"):
            return make_set(cfg, method, ctx, loggers)


def make_set(cfg: DictConfig, method: Method, ctx: DistillContext, loggers: list) -> dict[str, Any]:
    """The set of ``method`` written into ``ctx.artifact`` (its lock held), unless a finished set of this recipe is
    there."""
    artifact, data = ctx.artifact, ctx.data
    ensure_writable(artifact.folder)
    recipe = method.recipe(ctx)
    recipe_hash = fingerprint(recipe)
    manifest = finished_artifact(
        artifact.manifest,
        recipe_hash,
        overwrite=bool(cfg.get("overwrite", False)),
        what="distilled set",
        keep_hint=", or name another set with set=<name>",
        folder=artifact.folder,
    )
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
        "recipe": recipe,
    }
    manifest = write_set(
        artifact,
        made.pieces,
        class_names=data.class_names,
        mean=spec.mean,
        std=spec.std,
        seed=ctx.seed,
        fields=stamped(fields, cfg, started),
    )
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
