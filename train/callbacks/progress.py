"""Lightning's progress bar, labelled by steps rather than by the (single, endless) epoch."""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class StepProgressBar(TQDMProgressBar):
    """Shows the training loss, read from the module only when the bar refreshes (every
    `refresh_rate` steps), so the loop is not synchronised with the device at every step."""

    def __init__(self, refresh_rate: int = 10):
        super().__init__(refresh_rate=refresh_rate)

    def init_train_tqdm(self) -> Tqdm:
        # One bar, drawn first with its final label and length: Lightning's own draws "Training" and
        # then "Epoch 0" bars before any step, which show up as empty bars in a log or a pipe.
        return Tqdm(desc="train", total=self.trainer.max_steps, initial=self.trainer.global_step,
                    position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer, *args) -> None:
        pass  # the bar counts steps over the single endless epoch: nothing to reset

    def get_metrics(self, trainer, module):
        metrics = super().get_metrics(trainer, module)
        metrics.pop("v_num", None)
        if getattr(module, "last_loss", None) is not None:
            metrics["loss"] = f"{module.last_loss.item():.3f}"
        return metrics
