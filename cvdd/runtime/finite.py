"""Non-finite numbers stop a stage before they are published.

A temperature of 0, a learning rate of 1e9 or an exploding loss used to run to the end and write NaN labels, NaN
images or a 10 % result as finished work (deleting good labels on the way). Every stage checks what it is about to
write, and its training loss as it goes, with :func:`require_finite`; the error names where it happened and the keys
that usually cause it, and nothing of the run is published (no manifest, no result).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cvdd.runtime.errors import UserError


class NonFiniteError(UserError, FloatingPointError):
    """A loss, label or image became NaN or infinite."""


def require_finite(value: torch.Tensor | bool, what: str, where: str, keys: str) -> None:
    """Raise :class:`NonFiniteError` unless every element of ``value`` is finite (or ``value`` is ``True``: found
    finite already), naming ``what`` at ``where`` and ``keys``, the settings to change."""
    finite = value if isinstance(value, bool) else bool(torch.isfinite(value).all())
    if not finite:
        raise NonFiniteError(
            f"{what} is not finite at {where}; the run stopped and published nothing. Usually a setting does this: "
            f"check {keys}"
        )


class LossWatch:
    """The first step of a stretch of training (an epoch, a recover wave) whose loss was not finite, kept on the
    device: no host synchronisation per step. :meth:`check` agrees on it over ranks once per stretch, so every rank
    stops together before anything is written. Call it from inside the stretch's last training step, where every
    rank is in step: an epoch-end hook is not (Lightning's rank-0 progress bar syncs metrics there, and a collective
    of ours in between deadlocks)."""

    def __init__(self) -> None:
        self._first: torch.Tensor | None = None

    def see(self, loss: torch.Tensor, step: int) -> None:
        if self._first is None:
            self._first = torch.full((), -1, dtype=torch.long, device=loss.device)
        late = (self._first < 0) & ~torch.isfinite(loss.detach())
        self._first = torch.where(late, torch.full_like(self._first, step), self._first)

    def see_epoch_step(self, module, loss: torch.Tensor, batch_idx: int, what: str, keys: str) -> None:
        """:meth:`see` one training step of a LightningModule ``module``, and :meth:`check` in its epoch's last step,
        where every rank is in step (a module driven by hand, without a trainer, only sees)."""
        self.see(loss, batch_idx)
        if module._trainer is not None and batch_idx == module.trainer.num_training_batches - 1:
            self.check(module.all_gather, module.device, what, f"epoch {module.current_epoch + 1}", keys)

    def check(
        self,
        gather: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        what: str,
        where: str,
        keys: str,
        also_bad: bool = False,
    ) -> None:
        """Raise :class:`NonFiniteError` on every rank if any rank saw a non-finite loss (or says ``also_bad``, e.g.
        its images), naming the first such step after ``where``; ``gather`` is the module's ``all_gather``. Every
        rank must call it. Starts a new stretch."""
        first = self._first.to(device) if self._first is not None else torch.tensor(-1, device=device)
        flags = torch.stack([first.long(), torch.tensor(int(also_bad), device=device)])
        self._first = None
        gathered = gather(flags).reshape(-1, 2)
        steps = [int(s) for s in gathered[:, 0].tolist() if s >= 0]
        if steps or bool(gathered[:, 1].any()):
            at = f"{where}, step {min(steps) + 1}" if steps else where
            require_finite(False, what, at, keys)
