"""The harness's errors: each stops a run with a one-line message naming the bad key or file."""


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the key."""


class RunError(ValueError):
    """A run directory or checkpoint that cannot be read; the message names the file."""


class NonFiniteLoss(RuntimeError):
    """The training loss or gradients became NaN or infinite at `step`; the run stops without saving the
    broken state (train/callbacks/checkpoint.py:FiniteGuard finds it)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step
