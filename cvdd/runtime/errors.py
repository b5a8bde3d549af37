"""How an entry point reports a mistake in its inputs: the message (what is wrong, how to fix it), no stack trace.

Every check in the stages raises one of :data:`USER_ERRORS` with a message that names the key or file and
the fix; a traceback through Hydra and Lightning would only bury it. ``HYDRA_FULL_ERROR=1`` re-raises, as
Hydra itself does for its own errors.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from cvdd.artifacts import ArtifactConflictError, ArtifactNotWritableError

USER_ERRORS = (ValueError, FileNotFoundError, ArtifactConflictError, ArtifactNotWritableError, KeyError)


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn a user error into ``error: <message>`` on stderr and exit status 1."""
    try:
        yield
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {message}\n(HYDRA_FULL_ERROR=1 shows the stack trace)", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
