"""Seeds derived from identities, so a result never depends on processing order or world size."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends only on ``parts`` (e.g. seed, IPC index, class block)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int(state.view(np.uint64)[0] >> np.uint64(1))
