"""What every stage does around its own work, written once: decide whether a finished artifact is reused, redone
or refused, and stamp the record it writes.

A stage's Trainer and loggers are the third shared piece (:func:`cvdd.runtime.trainer.stage_trainer`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cvdd.artifacts import ArtifactConflictError, damaged_files, load_json_if_intact
from cvdd.artifacts.ownership import set_aside
from cvdd.runtime import log
from cvdd.runtime.provenance import provenance


def same_fingerprint(record: dict, recipe_hash: str) -> bool:
    return record.get("fingerprint") == recipe_hash


def finished_artifact(
    manifest: Path,
    recipe_hash: str,
    *,
    overwrite: bool,
    what: str,
    hashes: bool = True,
    matches: Callable[[dict, str], bool] = same_fingerprint,
    keep_hint: str = "",
    folder: Path | None = None,
) -> dict | None:
    """The one reuse policy of every stage for the artifact whose record is ``manifest`` (its files are listed there,
    relative to its folder); ``what`` names it in messages.

    * ``overwrite``: the artifact's own ``folder`` (if it has one) set aside at once, ``None``: the stage makes it anew
      and nothing of the old one (files of another recipe, more images) survives, even if this run is cut short;
    * no record, or a damaged record (not JSON, or JSON that is not a record; warned): ``None``, the stage makes it;
    * a record of another recipe: refused (:class:`ArtifactConflictError`, naming the record to keep it by and
      ``overwrite=true`` to replace it; ``keep_hint`` adds a stage's own way out);
    * this recipe with damaged files (digests checked, or sizes only with ``hashes=False``): warned, the damaged
      files and the record removed, ``None``: the stage redoes them (a stage that resumes its work redoes only
      those);
    * this recipe, intact: logged as nothing to do, the record returned.
    """
    if overwrite:
        if folder is not None:
            set_aside(folder)
            folder.mkdir(parents=True, exist_ok=True)
        return None
    record = load_json_if_intact(manifest, f"making the {what} again", keys=("fingerprint",))
    if record is None:
        return None
    if not matches(record, recipe_hash):
        raise ArtifactConflictError(
            f"the {what} of {manifest} was made with a different recipe (fingerprint "
            f"{record.get('fingerprint')}, {recipe_hash} now).\n"
            f"  Keep it: run with the settings recorded in {manifest}{keep_hint}\n"
            f"  Replace it: add overwrite=true"
        )
    damaged = damaged_files(manifest.parent, record.get("files", {}), hashes=hashes)
    if damaged:
        log.warning("%s %s: %d damaged file(s), %s first; making them again", what, manifest, len(damaged), damaged[0])
        for name in damaged:  # every rank, before any starts work: the others only find them gone
            (manifest.parent / name).unlink(missing_ok=True)
        manifest.unlink(missing_ok=True)
        return None
    log.info("%s %s: the same recipe, intact; nothing to do (overwrite=true redoes it)", what, manifest)
    return record


def stamped(record: dict[str, Any], cfg: DictConfig, started: float) -> dict[str, Any]:
    """``record`` with what every stage's record ends with: the stage's wall time since ``started``, when it ended,
    what made it (versions, commit, device) and the whole config it ran with."""
    return {
        **record,
        "wall_seconds": round(time.time() - started, 2),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "provenance": provenance(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
