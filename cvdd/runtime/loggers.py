"""Experiment loggers: W&B that falls back to offline runs without a login."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger


def wandb_logged_in() -> bool:
    """True when an API key is available (``WANDB_API_KEY`` or ``wandb login``'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode(mode: str = "auto") -> str:
    """``auto``: ``WANDB_MODE`` if set, else ``online`` with a login and ``offline`` without; others as given."""
    if mode == "auto":
        return os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
    return mode


def wandb_logger(project: str, save_dir: str | Path, mode: str = "auto", **kwargs: Any) -> WandbLogger:
    """A ``WandbLogger`` whose ``mode`` is ``online``/``offline``/``disabled`` or ``auto``.

    ``auto`` honours ``WANDB_MODE`` and otherwise goes online only with a login, so a
    researcher without an account still gets a local run that ``wandb sync`` can upload later.
    """
    mode = wandb_mode(mode)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project, save_dir=str(save_dir), offline=mode == "offline", mode=mode, **kwargs)
