"""Lightning's and PyTorch's messages that say nothing useful about a cvdd run, dropped by message.

Only these exact messages go (a filter on the loggers that emit them, and warning filters by text), so every
other warning still shows; ``verbose=true`` keeps them all. Each entry says why it is noise here.
"""

from __future__ import annotations

import logging
import re
import warnings

NOISE: dict[str, str] = {
    r"💡 Tip: For seamless cloud logging": "Lightning's advertisement for its own logger, once per Trainer",
    r"^GPU available: ": "the device banner of every Trainer; jobs log the device and thread count they use",
    r"^TPU available: ": "the same banner's TPU line",
    r"Loading `train_dataloader` to estimate number of stepping batches": "an internal step of every fit",
    r"`LightningModule.configure_optimizers` returned `None`": "recover optimises every group with its own Adam",
    r"Found \d+ module\(s\) in eval mode at the start of training": "the frozen committee is in eval mode on purpose",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated": "a PyTorch deprecation inside Lightning, not in cvdd",
    r"`Trainer.fit` stopped: `max_epochs=\d+` reached": "every stage ends with its own summary",
    r"^Seed set to \d+$": "the seed is in every run's config and artifacts",
    r"predict returned None if it was on purpose": "relabel writes each epoch's labels to disk as it goes",
}
PATTERN = re.compile("|".join(f"(?:{p})" for p in NOISE))
EMITTERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
)


class DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not PATTERN.search(record.getMessage())


def quiet_libraries(verbose: bool) -> None:
    """Drop the :data:`NOISE` messages in this process (idempotent), unless ``verbose``."""
    if verbose:
        return
    for name in EMITTERS:
        emitter = logging.getLogger(name)
        if not any(isinstance(f, DropNoise) for f in emitter.filters):
            emitter.addFilter(DropNoise())
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=f".*{pattern.lstrip('^')}")
