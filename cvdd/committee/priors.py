"""Committee priors measured as the paper measures them (``committee.priors=measured``).

CV-DD weights a member's vote by ``softmax(α / T)`` over the members' priors α. In the paper (and the authors'
released code) a member's α is the top-1 of a student trained on a set that member distilled *alone* —
SRe2L++ with that member, relabelled by it — so α measures how well the member distills; the presets carry the
published values. Each teacher's own test accuracy, the fallback when no prior is given, is a different and
far flatter score (Fashion-MNIST's pool: 91.0–92.6 %, near-equal votes).

Here the procedure runs on any dataset: for every pool member, the three ordinary jobs — distill
(``method=sre2l method.member=<member>``, set ``priors_<member>_ipc<n>_s<seed>``), relabel with that member,
validate the configured student — in this process, under this run's hardware. The students' final top-1s are
kept in ``priors/<committee>_ipc<n>_s<seed>.json`` (:class:`~cvdd.artifacts.priors.PriorsArtifact`) with the
sets, labels and results they came from, the stages' overrides, the recipe's fingerprint and each member's
teacher fingerprint. Who uses them:

* distill measures with *its* settings (the run's recover recipe, ``committee.priors_measure.*``); a record of
  other settings is measured again;
* relabel uses the record as it stands (it does not know distill's recover recipe), measures it when there is
  none, and measures again with the record's own overrides a member whose teacher has changed;
* validate only reads the record (to check the labels' teacher weights).

A member whose teacher changed is measured again, the others are reused; each stage of a measurement resumes as
the jobs do, and a member's prior is recorded as soon as its student finishes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from cvdd.artifacts import (
    ArtifactCorruptError,
    TeacherArtifact,
    fingerprint,
    load_json,
    load_json_if_intact,
    save_json,
)
from cvdd.artifacts.identity import dataset_identity
from cvdd.artifacts.priors import PriorsArtifact
from cvdd.committee.committee import voting_weights
from cvdd.config.compose import compose_stage, select_overrides
from cvdd.runtime import log
from cvdd.runtime.errors import ConfigError, MissingInputError
from cvdd.runtime.provenance import provenance
from cvdd.runtime.trainer import task_overrides

MEASURED = "measured"
STAGES = ("distill", "relabel", "evaluate")
# What every stage of a measurement takes from the run's command line; the priors' own keys are left out.
SHARED_KEYS = (
    "dataset",
    "paths",
    "hardware",
    "experiment",
    "verbose",
    "committee",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
)
OWN_KEYS = ("committee.priors", "committee.priors_measure")
MEMORY_KEYS = ("group_images", "wave_images", "keep_units", "snapshot_every")  # recover keys that change no result
Use = Literal["measure", "reuse", "read"]
# Runs one member's measurement (distill, relabel, validate): cvdd.stages.priors.measure_member, handed down by the
# jobs that may measure (distill, relabel), since this layer does not import jobs.
MeasureMember = Callable[["Measurement", str, Path, Path], dict[str, Any]]


@dataclass(frozen=True)
class Measurement:
    """How one committee's priors are measured: its members and each stage's overrides shared by them all."""

    dataset: str
    committee: str
    members: tuple[str, ...]
    ipc: int
    seed: int
    overrides: dict[str, list[str]]  # stage -> overrides

    @property
    def name(self) -> str:
        return record_name(self.committee, self.ipc, self.seed)

    def set_name(self, member: str) -> str:
        return f"priors_{member}_ipc{self.ipc}_s{self.seed}"

    def stage_overrides(self, stage: str, member: str) -> list[str]:
        """``stage``'s overrides for ``member``: SRe2L++ with that member (which also labels the set)."""
        own = [f"ipc={self.ipc}", f"seed={self.seed}", "method=sre2l", f"method.member={member}"]
        own.append(f"set={self.set_name(member)}")
        return [*self.overrides[stage], *own, "committee.priors=null", "logger=none"]


def configured_priors(
    cfg: DictConfig, root: Path, use: Use, measure: MeasureMember | None = None
) -> dict[str, float] | None:
    """The priors ``cfg.committee`` votes with: given ones (``{member: score}``, the presets), measured ones
    (``committee.priors=measured``; ``use`` says what this stage may do, see the module), or ``None``: each
    teacher's recorded test top-1."""
    priors = cfg.committee.get("priors")
    if priors is None:
        return None
    if priors == MEASURED:
        return measured_priors(cfg, root, use, measure)
    if not isinstance(priors, Mapping):
        raise ConfigError(f"committee.priors={priors!r}: give {{member: score}}, '{MEASURED}', or null (teacher top-1)")
    return {str(member): float(score) for member, score in priors.items()}


def record_name(committee: str, ipc: int, seed: int) -> str:
    return f"{committee}_ipc{ipc}_s{seed}"


def measured_ipc_seed(cfg: DictConfig) -> tuple[int, int]:
    """The IPC and seed the priors are measured at (``committee.priors_measure``; null: the run's own)."""
    options = cfg.committee.get("priors_measure") or {}
    ipc, seed = options.get("ipc"), options.get("seed")
    return int(cfg.ipc if ipc is None else ipc), int(cfg.seed if seed is None else seed)


def measurement_of(cfg: DictConfig) -> Measurement:
    """The measurement this run asks for: its shared command-line overrides (and its recover recipe for
    distill), ``committee.priors_measure.overrides`` where a stage has the key, and the cost options."""
    task = task_overrides()
    if task is None:  # a config built without Hydra's command line: what names the data and the device
        task = [f"dataset={cfg.dataset.name}", f"hardware={cfg.hardware.name}", f"paths.root={cfg.paths.root}"]
    options = cfg.committee.get("priors_measure") or {}
    shared = select_overrides(task, SHARED_KEYS, exclude=OWN_KEYS)
    overrides = {}
    for stage in STAGES:
        base = [*shared, *(select_overrides(task, ("method.recover",)) if stage == "distill" else [])]
        config = compose_stage(stage, base)
        extra = [o for o in options.get("overrides") or [] if override_key(o).split(".")[0] in config]
        if stage == "distill" and options.get("iterations") is not None:
            extra.append(f"method.recover.iterations={int(options.iterations)}")
        if stage != "distill" and options.get("epochs") is not None:
            extra.append(f"relabel.epochs={int(options.epochs)}")
        overrides[stage] = [*base, *extra]
    members = tuple(str(m) for m in cfg.committee.members)
    return Measurement(str(cfg.dataset.name), str(cfg.committee.name), members, *measured_ipc_seed(cfg), overrides)


def override_key(text: str) -> str:
    return text.lstrip("+~").split("=", 1)[0]


def measurement_recipe(measurement: Measurement) -> dict[str, Any]:
    """What the priors depend on besides the teachers: the data, IPC, seed, members and every setting of the
    three stages as composed (not the overrides' spelling)."""
    member = measurement.members[0]
    distill, relabel, evaluate = (compose_stage(s, measurement.stage_overrides(s, member)) for s in STAGES)
    recover = {
        k: v for k, v in OmegaConf.to_container(distill.method.recover, resolve=True).items() if k not in MEMORY_KEYS
    }
    labels = OmegaConf.to_container(relabel.relabel, resolve=True)
    labels.pop("teachers")  # the member itself
    return {
        "dataset": dataset_identity(distill.dataset),
        "members": list(measurement.members),
        "ipc": measurement.ipc,
        "seed": measurement.seed,
        "recover": recover,
        "relabel": labels,
        "validate": OmegaConf.to_container(evaluate.validate, resolve=True),
        "student": str(evaluate.student),
    }


def teacher_fingerprint(root: Path, dataset: str, member: str) -> str | None:
    artifact = TeacherArtifact(root, dataset, member)
    return artifact.read_record()["fingerprint"] if artifact.exists() else None


def read_record(artifact: PriorsArtifact) -> dict | None:
    return load_json_if_intact(artifact.record, "measuring the priors again")


def still_valid(record: dict, root: Path, dataset: str) -> dict[str, dict]:
    """The record's members whose teacher is unchanged and whose student's result is on disk with that prior."""
    kept = {}
    for member, entry in record.get("members", {}).items():
        result = Path(root) / dataset / entry["result"]
        if entry["teacher"] != teacher_fingerprint(root, dataset, member) or not result.is_file():
            continue
        try:
            if load_json(result)["test_top1"] == entry["prior"]:
                kept[member] = entry
        except (ArtifactCorruptError, KeyError):
            continue
    return kept


def measured_priors(cfg: DictConfig, root: Path, use: Use, measure: MeasureMember | None = None) -> dict[str, float]:
    """The committee's measured priors (module docstring: which stage measures what), printed with the voting
    weights they give; ``measure`` runs a member's measurement when one is needed."""
    name = record_name(str(cfg.committee.name), *measured_ipc_seed(cfg))
    artifact = PriorsArtifact(root, str(cfg.dataset.name), name)
    record = read_record(artifact)
    # the stages' overrides are composed only when this run's own settings make the measurement
    measurement = measurement_of(cfg) if use == "measure" or record is None else recorded_measurement(record)
    home = Path(compose_stage("distill", measurement.overrides["distill"]).paths.artifacts)  # its sets and teachers
    if use == "read":
        valid = still_valid(record, home, measurement.dataset) if record is not None else {}
        missing = [m for m in measurement.members if m not in valid]
        if missing:
            raise MissingInputError(
                f"committee.priors=measured: no valid measured priors for {missing} in {artifact.record} (not "
                f"measured yet, or their teachers changed since); measure them with relabel.py or distill.py and "
                f"the same committee.priors=measured"
            )
        return report(record, artifact, float(cfg.committee.temperature))
    recipe = measurement_recipe(measurement)
    recipe_hash = fingerprint(recipe)
    done = {}
    if record is not None and record["fingerprint"] == recipe_hash:
        done = still_valid(record, home, measurement.dataset)
    elif record is not None:
        log.warning("priors %s were measured with other settings; measuring them again", artifact.record)
    todo = [m for m in measurement.members if m not in done]
    if todo and measure is None:
        raise RuntimeError(f"priors for {todo} must be measured, and this stage was given no job runner to do it")
    for place, member in enumerate(todo, start=1):
        log.info("[priors %d/%d] %s: distill alone, relabel with it, train the student", place, len(todo), member)
        entry = measure(measurement, member, home, Path(cfg.paths.output_dir) / "priors" / member)
        if entry:  # rank 0 (the result is written there)
            done[member] = entry
            write_record(artifact, measurement, recipe, recipe_hash, done)
    if todo and dist.is_available() and dist.is_initialized():
        dist.barrier()
    if not todo and not record.get("complete"):
        write_record(artifact, measurement, recipe, recipe_hash, done)  # every member's result was still there
    return report(load_json(artifact.record), artifact, float(cfg.committee.temperature))


def recorded_measurement(record: dict) -> Measurement:
    fields = record["measurement"]
    return Measurement(**{**fields, "members": tuple(fields["members"])})


def write_record(
    artifact: PriorsArtifact, measurement: Measurement, recipe: dict, recipe_hash: str, done: dict[str, dict]
) -> None:
    members = {m: done[m] for m in measurement.members if m in done}
    complete = len(members) == len(measurement.members)
    save_json(
        artifact.record,
        {
            "priors": {m: entry["prior"] for m, entry in members.items()} if complete else None,
            "complete": complete,
            "fingerprint": recipe_hash,
            "members": members,
            "seconds": round(sum(entry["seconds"] for entry in members.values()), 2),
            "measurement": asdict(measurement),
            "recipe": recipe,
            "provenance": provenance(),
        },
    )


def report(record: dict, artifact: PriorsArtifact, temperature: float) -> dict[str, float]:
    """The record's priors, logged with the weights ``softmax(α / T)`` they give the whole pool."""
    priors = {m: float(score) for m, score in record["priors"].items()}
    weights = voting_weights(list(priors), priors, "prior", temperature, ())
    rows = ", ".join(f"{m} {p:.2f} → {w:.2f}" for (m, p), w in zip(priors.items(), weights, strict=True))
    log.info("committee priors measured (%s), pool weights at T = %g: %s", artifact.record, temperature, rows)
    return priors
