"""Spellings earlier versions took, refused before Hydra composes, each with what replaces it.

Hydra alone would answer an old key with "Key 'recover' is not in struct", which says nothing of where the setting
went. Every entry point passes its command line through :func:`refuse_old_spellings` first; this table is the one
place that knows the old spellings (artifacts written by earlier versions still load: they are not configs).
"""

from __future__ import annotations

from collections.abc import Sequence

from cvdd.runtime.errors import ConfigError, reported_errors

MOVED_KEYS = {  # an old key (and every key below it) → where it lives now
    "name": "set",
    "recover": "method.recover",
}
REPLACED_CHOICES = {  # an old group choice → what replaces it, and why
    "distilled=random_real": (
        "method=random_real",
        "random real images are a distilled set like any other: make it once with "
        "`python distill.py method=random_real`, then relabel.py and evaluate.py with method=random_real",
    ),
}


def migration(override: str) -> str | None:
    """What to write instead of ``override`` (``key=value`` as on the command line), ``None`` if it is current."""
    key, _, value = override.lstrip("+~").partition("=")
    if f"{key}={value}" in REPLACED_CHOICES:
        new, why = REPLACED_CHOICES[f"{key}={value}"]
        return f"{key}={value} is replaced by {new}: {why}"
    for old, new in MOVED_KEYS.items():
        if key == old or key.startswith(old + "."):
            moved = new + key[len(old) :]
            return f"{key}={value} is now {moved}={value}" + (
                f" (every {old}.* key moved to {new}.*)" if "." in key else ""
            )
    return None


def refuse_old_spellings(argv: Sequence[str]) -> None:
    """Stop with the migration of the first old spelling in ``argv`` (Hydra's flags such as ``-m`` are skipped)."""
    with reported_errors():
        for arg in argv:
            if arg.startswith("-") or "=" not in arg:
                continue
            hint = migration(arg)
            if hint is not None:
                raise ConfigError(hint)
