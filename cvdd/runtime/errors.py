"""How an entry point reports a mistake in its inputs: the message (what is wrong, how to fix it), no stack trace.

Every check of a run's inputs raises a :class:`UserError` whose message names the key, file or value and the fix;
a traceback through Hydra and Lightning would only bury it. Anything else is a bug and keeps its traceback.
``HYDRA_FULL_ERROR=1`` re-raises user errors too, as Hydra itself does for its own errors. Each subclass is also
the built-in exception it refines, so ``except ValueError`` still catches a :class:`ConfigError`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """A mistake in a run's inputs: the message says what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work: a config value out of range, an unknown choice, settings that contradict."""


class DataError(UserError, ValueError):
    """A dataset's files are not what its format promises (bad header, missing classes, an empty class)."""


class MissingInputError(UserError, FileNotFoundError):
    """Something a stage reads is not there: a teacher, a set, labels, measured priors, a cached download."""


class UnknownNameError(UserError, KeyError):
    """A name that is not registered (a model, a dataset, a dataset field)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


SIGTERM_EXIT = 128 + 15  # what a shell reports for a process SIGTERM ended; schedulers read it as "not completed"


def stopped_by_sigterm(stop: SystemExit) -> bool:
    """Whether ``stop`` is Lightning's way of ending a run on SIGTERM (a ``SystemExit`` without a code, i.e. 0)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException  # Lightning raised it: already imported

    return isinstance(stop, SIGTERMException)


def fresh_line() -> str:
    """A newline on a terminal, where a progress bar may hold the line the message would continue; none in a log."""
    return "\n" if sys.stderr.isatty() else ""


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn a :class:`UserError` into ``error: <message>`` on stderr and exit status 1, and a run ended by SIGTERM
    into exit status 143 with the way to resume (Lightning would exit 0, so ``a && b`` chains and schedulers would
    take the stopped run for a finished one)."""
    try:
        yield
    except SystemExit as stop:
        if not stopped_by_sigterm(stop):
            raise
        print(
            f"{fresh_line()}stopped by SIGTERM: finished work is kept (finished epochs, classes, units); run the same "
            "command to resume",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(SIGTERM_EXIT) from None
    except UserError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{fresh_line()}error: {err}\n(HYDRA_FULL_ERROR=1 shows the stack trace)", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
