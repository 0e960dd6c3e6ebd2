"""The LightningDataModule: an endless, seeded stream of batches, and the fixed evaluation set."""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from ..parent_watch import loader_worker_init
from .stream import BatchStream, Generator, as_made
from .synthetic import batch_rng


class StreamDataModule(L.LightningDataModule):
    """Batch `i` is `generator(batch_rng(seed, i))`: deterministic from the seed, never repeated.

    The stream position is the index of the next batch to train on; it is saved in every checkpoint
    (`state_dict`) so a resumed run sees exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, generator: Generator, batch_size: int, seed: int | tuple[int, ...], eval_size: int,
                 eval_seed: int, num_workers: int = 0):
        super().__init__()
        self.generator, self.batch_size, self.seed = generator, batch_size, seed
        self.num_workers = num_workers
        self.eval_size, self.eval_seed = eval_size, eval_seed
        self.next_batch = 0
        self.rank, self.world_size = 0, 1

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        # Start where the run left off: a resumed run has restored `next_batch` by now. Workers make
        # batches in other processes while this one trains: batch making leaves the step.
        stream = BatchStream(self.generator, self.batch_size, self.seed, self.next_batch, self.rank, self.world_size)
        # An explicit start method: inside joblib's processes the default is loky's, which cannot start a
        # loader worker. Fork (Linux) starts one at once; spawn (elsewhere) pickles the stream.
        # A worker ends with this process, even when it is killed (train/parent_watch.py).
        context, init = (("fork" if sys.platform == "linux" else "spawn"), loader_worker_init) if self.num_workers \
            else (None, None)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, collate_fn=as_made,
                          multiprocessing_context=context, worker_init_fn=init)

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        # Called for the batch about to be trained on (not for prefetched ones).
        self.next_batch = batch["index"] + 1
        return {**batch, "tokens": torch.from_numpy(batch["tokens"])}

    def eval_tokens(self) -> torch.Tensor:
        """The fixed evaluation set: the same sequences for every checkpoint and every run sharing
        `eval_seed` (and the generator's language). A generator with an `eval_batch` method (text
        data) draws it from its held-out split instead."""
        draw = getattr(self.generator, "eval_batch", self.generator)
        return torch.from_numpy(draw(batch_rng(self.eval_seed, 0, "eval"), self.eval_size))

    def state_dict(self) -> dict[str, Any]:
        return {"next_batch": self.next_batch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.next_batch = int(state_dict["next_batch"])
