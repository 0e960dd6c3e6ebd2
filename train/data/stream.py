"""The training stream as a DataLoader dataset, apart from Lightning: a loader worker started by spawn
or forkserver (macOS, Windows, joblib's processes) unpickles it, and so imports only this and the
generator's module."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .synthetic import batch_rng

Generator = Callable[[np.random.Generator, int], np.ndarray]


class BatchStream(IterableDataset):
    """Steps `start, start + 1, ...`: step `index` of rank r is `generator(batch_rng(seed, index * world
    + r))`. With n loader workers, worker w makes steps start + w, start + w + n, ...: the DataLoader
    takes one batch from each worker in turn, so the steps arrive in order."""

    def __init__(self, generator: Generator, batch_size: int, seed: int, start: int, rank: int, world_size: int):
        self.generator, self.batch_size, self.seed = generator, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        index, stride = self.start, 1
        if worker is not None:
            index, stride = index + worker.id, worker.num_workers
        while True:
            i = index * self.world_size + self.rank
            if isinstance(self.seed, tuple):
                tokens = np.stack([self.generator(batch_rng(seed, i), self.batch_size) for seed in self.seed])
            else:
                tokens = self.generator(batch_rng(self.seed, i), self.batch_size)
            yield {"tokens": tokens, "index": index}
            index += stride


def as_made(batch: dict[str, Any]) -> dict[str, Any]:
    """The loader's collate function: none. Numpy arrays cross from a worker through its pipe in about
    0.1 ms; a tensor goes through shared memory, whose per-batch set-up costs more than making the
    batch. The datamodule makes the tensor on arrival."""
    return batch
