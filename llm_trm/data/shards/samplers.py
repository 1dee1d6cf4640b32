"""Length-bucketed batches for hidden pairs, split disjointly across DDP ranks."""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, DistributedSampler, Sampler


class _EpochSampler(Sampler[int]):
    """Placeholder ``sampler`` that carries the epoch; Lightning calls ``set_epoch`` on it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.size))

    def __len__(self) -> int:
        return self.size


class LengthBucketBatchSampler(BatchSampler):
    """Batches of similar lengths, reshuffled each epoch, split disjointly across DDP ranks.

    Each epoch: shuffle all indices (seed + epoch), sort by length within windows of
    ``batch_size * window_batches``, cut into batches, shuffle the batches and deal them
    out to the ranks. The number of batches is rounded up to a multiple of the world size
    (batches get slightly smaller rather than padded with repeats), so every rank takes
    the same number of steps and every sample is used exactly once per epoch.

    If Lightning injects a ``DistributedSampler`` as ``sampler``, its world size, rank and
    epoch are used; its order is not (the bucketing does its own shuffling).
    """

    def __init__(
        self,
        sampler: Sampler[int] | None,
        batch_size: int,
        drop_last: bool = False,
        *,
        lengths: Sequence[int],
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        window_batches: int = 50,
    ) -> None:
        if isinstance(sampler, DistributedSampler):
            num_replicas, rank = sampler.num_replicas, sampler.rank
        elif sampler is None:
            sampler = _EpochSampler(len(lengths))
        super().__init__(sampler, batch_size, drop_last)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside world size {num_replicas}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.int64)
        self.num_replicas, self.rank = num_replicas, rank
        self.seed, self.shuffle, self.window_batches = seed, shuffle, window_batches
        self._num_batches = self._count_batches()
        self._epoch = 0

    def _count_batches(self) -> int:
        n, world = len(self.lengths), self.num_replicas
        if self.drop_last:
            total = (n // self.batch_size) // world * world
        else:
            total = math.ceil(math.ceil(n / self.batch_size) / world) * world
        if total == 0 or total > n:
            raise ValueError(
                f"{n} samples cannot fill {max(total, world)} batches across {world} rank(s) "
                f"with batch_size {self.batch_size}"
            )
        return total

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return getattr(self.sampler, "epoch", self._epoch)

    def _all_batches(self) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self.lengths)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        window = self.batch_size * self.window_batches
        sorted_windows = []
        for chunk in order.split(window):
            by_length = torch.argsort(self.lengths[chunk], stable=True)
            sorted_windows.append(chunk[by_length])
        order = torch.cat(sorted_windows)
        if self.drop_last:
            order = order[: self._num_batches * self.batch_size]
        batches = list(torch.tensor_split(order, self._num_batches))
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._all_batches()[self.rank :: self.num_replicas]:
            yield batch.tolist()

    def __len__(self) -> int:
        return self._num_batches // self.num_replicas


