"""Greedy packing of consecutive items into bins of bounded size: recover's groups and waves, relabel's
stacked batches."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

T = TypeVar("T")


def pack_consecutive(
    items: Iterable[T], size: Callable[[T], int], limit: int, kind: Callable[[T], Hashable] | None = None
) -> list[list[T]]:
    """``items`` in order, cut into bins of at most ``limit`` total ``size``; a bin also holds one ``kind`` only.
    An item larger than ``limit`` fills a bin alone."""
    bins: list[list[T]] = []
    total = 0
    for item in items:
        n = size(item)
        if not bins or total + n > limit or (kind is not None and kind(bins[-1][0]) != kind(item)):
            bins.append([])
            total = 0
        bins[-1].append(item)
        total += n
    return bins
