"""Non-finite numbers stop a stage before they are published.

A temperature of 0, a learning rate of 1e9 or an exploding loss used to run to the end and write NaN labels, NaN
images or a 10 % result as finished work (deleting good labels on the way). Every stage checks what it is about to
write, and its training loss as it goes, with :func:`require_finite`; the error names where it happened and the keys
that usually cause it, and nothing of the run is published (no manifest, no result).
"""

from __future__ import annotations

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
