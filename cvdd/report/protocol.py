"""What a result's number depends on besides its seed: the protocol behind a report cell.

A cell averages the seeds of one recipe. Two results of one method and IPC that differ in a setting that moves the
number (epochs, learning rate, temperatures, label settings, image format, the student's numerics, the method's own
recipe) are two rows of a table, each saying how it differs, never one cell: a re-run with other settings cannot
replace a published number silently. The settings are read from the config every result records; what does not
change the number (paths, loggers, thread counts, memory sizing, set names) is left out.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

from cvdd.artifacts import fingerprint

PREFIXES = ("validate.", "relabel.", "method.", "committee.")
KEYS = ("student", "labels", "distilled.format")
IGNORED = (  # no effect on the number, or named elsewhere (the method's label, the set's name)
    "relabel.stack_images",
    "method.name",
    "method.set_name",
    "method._target_",
    "method.labels_by",
    "method.recover.keep_units",
    "method.recover.snapshot_every",
    "method.recover.wave_images",
    "method.recover.group_images",
    "committee.name",
    "committee.train_missing",
    "committee.train_overrides",
)
RECORD_FIELDS = ("student_numerics",)  # what the hardware settings resolved to (bf16 or fp32)
SET_MAKING = ("method.", "committee.")  # how the set was made, as opposed to how it was evaluated

T = TypeVar("T")


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def settings_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``record`` that change its number, as dotted keys (empty for a result without a config)."""
    flat = flatten(record.get("config") or {})
    chosen = {
        key: value
        for key, value in flat.items()
        if (key in KEYS or key.startswith(PREFIXES)) and not key.startswith(IGNORED)
    }
    chosen.update({field: record[field] for field in RECORD_FIELDS if field in record})
    return chosen


def protocol_key(settings: Mapping[str, Any], leave_out: Sequence[str] = (), only: Sequence[str] = ()) -> str:
    """A fingerprint of ``settings`` without the keys starting with any of ``leave_out`` (and, given ``only``, of
    just the keys starting with one of those)."""
    return fingerprint(
        {
            k: v
            for k, v in sorted(settings.items())
            if not k.startswith(tuple(leave_out)) and (not only or k.startswith(tuple(only)))
        }
    )


def differing(settings: Sequence[Mapping[str, Any]]) -> list[str]:
    """The keys whose values are not the same in all of ``settings`` (a key one of them lacks counts as differing)."""
    keys = sorted(set().union(*settings)) if settings else []
    return [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1]


def describe(settings: Mapping[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={json.dumps(settings.get(k))}" for k in keys)


def variants(items: Sequence[T], cell: Callable[[T], Hashable], settings: Callable[[T], Mapping]) -> dict[int, str]:
    """For items that share a ``cell`` with items of other settings: what tells them apart (``id(item)`` → the
    differing settings, described), the keys taken over every cell of the same row so one row is one protocol."""
    by_cell: dict[Hashable, list[T]] = defaultdict(list)
    for item in items:
        by_cell[cell(item)].append(item)
    keys = sorted({k for members in by_cell.values() for k in differing([settings(m) for m in members])})
    if not keys:
        return {}
    return {id(item): describe(settings(item), keys) for item in items}
