"""The LightningDataModule: an endless, seeded stream of batches, and the fixed evaluation set."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .synthetic import batch_rng

Generator = Callable[[np.random.Generator, int], np.ndarray]


class _Stream(IterableDataset):
    def __init__(self, owner: "StreamDataModule"):
        self.owner = owner

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Start where the run left off: `next_batch` is restored from the checkpoint before iteration.
        # Under data parallelism, step `index` of rank r trains on stream batch index * world + r.
        # With n loader workers, worker w makes steps w, w + n, ...: the DataLoader takes one batch from
        # each worker in turn, so the steps arrive in order.
        owner, worker = self.owner, get_worker_info()
        index, stride = owner.next_batch, 1
        if worker is not None:
            index, stride = index + worker.id, worker.num_workers
        while True:
            rng = batch_rng(owner.seed, index * owner.world_size + owner.rank)
            yield {"tokens": owner.generator(rng, owner.batch_size), "index": index}
            index += stride


def _as_made(batch: dict[str, Any]) -> dict[str, Any]:
    # Numpy arrays cross from a worker through its pipe in about 0.1 ms; a tensor goes through shared
    # memory, whose per-batch set-up costs more than making the batch. Tensors are made on arrival.
    return batch


class StreamDataModule(L.LightningDataModule):
    """Batch `i` is `generator(batch_rng(seed, i))`: deterministic from the seed, never repeated.

    The stream position is the index of the next batch to train on; it is saved in every checkpoint
    (`state_dict`) so a resumed run sees exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, generator: Generator, batch_size: int, seed: int, eval_size: int, eval_seed: int,
                 num_workers: int = 0):
        super().__init__()
        self.generator, self.batch_size, self.seed = generator, batch_size, seed
        self.num_workers = num_workers
        self.eval_size, self.eval_seed = eval_size, eval_seed
        self.next_batch = 0
        self.rank, self.world_size = 0, 1

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        # Workers make batches in other processes while this one trains: batch making leaves the step.
        return DataLoader(_Stream(self), batch_size=None, num_workers=self.num_workers, collate_fn=_as_made)

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
