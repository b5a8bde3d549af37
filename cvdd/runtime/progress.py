"""A progress bar that says what a stage is doing in its own terms.

Lightning's bar reads "Epoch 0: 300/300" whatever runs; a recover run has one "epoch" of waves × iterations
and relabel has none. A module that defines ``progress_title(trainer)`` names the bar (``[2/5]
resnet50_small epoch 3/8``, ``recover wave 1/2``, ``relabel``, ``student epoch 12/300``) and
``progress_fields()`` adds its own numbers to the postfix (iteration, each member's CE / BN, images per
second, the last test top-1); Lightning's ``v_num`` is dropped.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class StageProgressBar(TQDMProgressBar):
    def init_validation_tqdm(self) -> Tqdm:
        """No bar of its own for the (short) test evaluations: their result shows in the training bar."""
        return Tqdm(disable=True)

    @staticmethod
    def _retitle(bar, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        title = getattr(pl_module, "progress_title", None)
        if bar is not None and title is not None:
            bar.set_description(title(trainer), refresh=False)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._retitle(self.train_progress_bar, trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._should_update(batch_idx + 1, self.train_progress_bar.total):
            self._retitle(self.train_progress_bar, trainer, pl_module)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_predict_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        self._retitle(self.predict_progress_bar, trainer, pl_module)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self._should_update(batch_idx + 1, self.predict_progress_bar.total):
            self.predict_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        fields = getattr(pl_module, "progress_fields", None)
        if fields is not None:
            metrics.update(fields())
        return metrics
