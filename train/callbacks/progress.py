"""Lightning's progress bar, labelled by steps rather than by the (single, endless) epoch."""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """Shows the training loss, read from the module only when the bar refreshes (every
    `refresh_rate` steps), so the loop is not synchronised with the device at every step."""

    def __init__(self, refresh_rate: int = 10):
        super().__init__(refresh_rate=refresh_rate)

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description("train")
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.update(trainer.global_step)  # a resumed run starts part-way

    def get_metrics(self, trainer, module):
        metrics = super().get_metrics(trainer, module)
        metrics.pop("v_num", None)
        if getattr(module, "last_loss", None) is not None:
            metrics["loss"] = f"{module.last_loss.item():.3f}"
        return metrics
