"""Child processes that end with the process that started them, even one killed by SIGKILL: an
ensemble's workers and a run's data-loader workers. (Linux's PR_SET_PDEATHSIG is not enough: Lightning's
SIGTERM handler absorbs the signal. A loader worker's own check of its parent runs only between batches,
and its exit then waits for a queue that the dead process never drains.) Nothing here imports torch: a
loader worker started by spawn imports this module."""

from __future__ import annotations

import os
import threading
import time


def exit_with_parent(parent: int | None = None, poll_s: float = 0.5) -> None:
    """Exit this process within `poll_s` of its parent's end (`parent`: the pid to watch, by default
    the current parent)."""
    parent = os.getppid() if parent is None else parent

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(143)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def loader_worker_init(worker_id: int) -> None:
    """The DataLoader's `worker_init_fn`."""
    exit_with_parent()
