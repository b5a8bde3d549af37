"""A Hydra callback that summarises an ``evaluate.py -m`` sweep: mean ± std over its jobs.

Every validate job also writes its result as ``result.json`` into its own run folder, so at the end
of a multirun the sweep folder holds exactly this sweep's results; :mod:`cvdd.report` turns them into
``summary.md`` and ``summary.png`` there and the table is printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from cvdd.report import write_report


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        table = write_report(folder, out=folder, title=f"{config.task_name} sweep {folder.name}")
        print(f"\nSweep summary ({folder / 'summary.md'}):\n\n{table}", flush=True)
