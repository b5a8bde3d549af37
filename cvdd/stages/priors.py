"""A stage made of stages: one member's prior measured by distill, relabel and validate (``committee.priors=measured``).

The one module under ``cvdd/stages`` that runs the others (imported inside the function: distill and relabel hand
:func:`measure_member` down to :mod:`cvdd.committee.priors`, which decides what to measure and keeps the record).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from cvdd.artifacts import ArtifactConflictError
from cvdd.committee.priors import Measurement, teacher_fingerprint
from cvdd.config.compose import compose_stage
from cvdd.runtime import log


def measure_member(measurement: Measurement, member: str, root: Path, output_dir: Path) -> dict[str, Any]:
    """Distill with ``member`` alone, relabel with it, train the student; the entry of the record (``{}`` on ranks
    other than 0)."""
    from cvdd.stages.distill import distill  # the jobs import this module
    from cvdd.stages.relabel import relabel
    from cvdd.stages.validate import validate

    started = time.time()
    made = run_stage("distill", distill, measurement, member, output_dir)
    labels = run_stage("relabel", relabel, measurement, member, output_dir)
    result = run_stage("evaluate", validate, measurement, member, output_dir)
    if not result:
        return {}
    dataset_root = Path(root) / measurement.dataset
    return {
        "prior": result["test_top1"],
        "teacher": teacher_fingerprint(root, measurement.dataset, member),
        "set": measurement.set_name(member),
        "set_fingerprint": made["fingerprint"],
        "labels_fingerprint": labels["fingerprint"],
        "result": str(Path(result["path"]).relative_to(dataset_root)),
        "student": result["student"],
        "seconds": round(time.time() - started, 2),
    }


def run_stage(stage: str, job: Callable[[DictConfig], dict], measurement: Measurement, member: str, output_dir: Path):
    """One stage of a member's measurement. Its set and labels belong to the measurement: made with other settings
    (another recover recipe, a retrained teacher), they are redone."""
    overrides = measurement.stage_overrides(stage, member)

    def config(extra: Sequence[str] = ()) -> DictConfig:
        cfg = compose_stage(stage, [*overrides, *extra])
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir / stage)
        return cfg

    try:
        return job(config())
    except ArtifactConflictError:
        if stage == "evaluate":
            raise
        log.warning("priors: the %s of %s were made with other settings; redoing them", stage, member)
        return job(config(["overwrite=true"]))
