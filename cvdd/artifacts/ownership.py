"""Who may write an artifact: one job at a time, and an overwrite that leaves nothing of the old one reachable.

* :func:`exclusive` holds ``.<name>.lock`` beside the artifact (an advisory ``flock``: the kernel drops it when the
  holder dies, so a killed run never leaves a stale lock) for as long as a stage writes it. A second job asking
  for it fails at once, naming the process that holds it. Only the launching process of a job (global rank 0, or
  the process a launcher has not marked with a rank) takes it: the ranks Lightning starts later are that job.
* :func:`set_aside` replaces a folder by renaming it out of the way in one step, then deleting it: an interrupted
  overwrite cannot leave the old recipe's files where a resumed run would take them as its own.

``flock`` is local to a machine on some network filesystems: jobs on different nodes writing one artifact over NFS
are not kept apart.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from cvdd.artifacts.io import ensure_writable, named_os_error
from cvdd.runtime.errors import UserError


class ArtifactBusyError(UserError, RuntimeError):
    """Another job is writing the same artifact."""


def launch_leader() -> bool:
    """Whether this process is its job's global rank 0 before any process group exists: torchrun and SLURM say so
    in ``RANK`` / ``SLURM_PROCID``; Lightning marks the ranks it starts with ``LOCAL_RANK`` (and ``NODE_RANK``)."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextmanager
def exclusive(target: Path, what: str) -> Iterator[None]:
    """Hold the lock of artifact ``target`` (a folder or a file; ``what`` names it) for the ``with`` block."""
    if not launch_leader():
        yield
        return
    path = lock_path(Path(target))
    ensure_writable(path.parent)  # an unwritable output is named here, before any work
    with open_lock(path, Path(target)) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "a process that has not said who it is"
            raise ArtifactBusyError(
                f"the {what} {target} is being written by another job ({holder}); wait for it to finish, or write "
                "another artifact (another set=, seed or paths.root)"
            ) from None
        fh.seek(0)
        fh.truncate()
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        fh.write(json.dumps(owner))
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


def open_lock(path: Path, target: Path) -> IO[str]:
    try:
        return open(path, "a+")
    except OSError as err:  # a name too long for the file system is the user's to shorten, said for the artifact
        named = named_os_error(err, target)
        if named is not None:
            raise named from err
        raise


def set_aside(folder: Path) -> None:
    """Remove ``folder`` so that none of it is reachable from the moment this returns, even if deleting it is cut
    short (it is renamed first; what a killed delete leaves behind is removed on the next call). Launch leader
    only: the ranks a launcher starts later must not remove what rank 0 has begun writing."""
    if not launch_leader():
        return
    folder = Path(folder)
    for leftover in folder.parent.glob(f".{folder.name}.replaced-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if not folder.exists():
        return
    aside = folder.parent / f".{folder.name}.replaced-{os.getpid()}-{time.time_ns()}"
    folder.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)
