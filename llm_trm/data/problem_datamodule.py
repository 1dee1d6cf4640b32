"""ProblemDataModule: the problems that datagen's predict loop works through.

Serves `Problem`s in batches (plain lists, no tensors) for `Trainer.predict`. Under DDP
every remaining problem goes to exactly one rank (rank r takes every world_size-th one,
like Lightning's unrepeated predict sampler, which however refuses a rank with nothing
to do: common near the end of a resumed run). Problems already stored (the shard
writer's index, handed over with `skip_ids`) are left out, which is how resume works.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from llm_trm.data.problems import Problem, get_source, load_problems
from llm_trm.errors import DataError


def collate_problems(problems: list[Problem]) -> list[Problem]:
    """Batches stay lists of problems: tokenization happens in the module, on the backbone's tokenizer."""
    return list(problems)


class ProblemList(Dataset):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, index: int) -> Problem:
        return self.problems[index]


class RankShardSampler(DistributedSampler):
    """Indices rank, rank + world, ...: no repeats, no padding, possibly none for a rank.

    A DistributedSampler subclass, so Lightning keeps it instead of inserting its own.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.indices = range(rank, len(dataset), num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def dataset_names(dataset: str) -> list[str]:
    """`"gsm8k, mbpp"` -> `["gsm8k", "mbpp"]`."""
    return [name.strip() for name in dataset.split(",") if name.strip()]


def check_sources(dataset: str) -> None:
    """Fail on an unknown name or a missing JSONL file before anything is downloaded."""
    names = dataset_names(dataset)
    if not names:
        raise DataError("data.dataset is empty: name a problem source, e.g. gsm8k or gsm8k,mbpp")
    for name in names:
        try:
            get_source(name)
        except ValueError as err:
            raise DataError(str(err)) from err


class ProblemDataModule(L.LightningDataModule):
    """Problems from one source or a comma-separated mix, for `Trainer.predict`.

    Args:
        dataset: source name or comma-separated mix, e.g. `gsm8k` or `gsm8k,mbpp`; offline:
            `gsm_symbolic`, `humaneval_local`, `jsonl:<path>` (seed flag `--dataset`).
        split: dataset split to draw from.
        num_samples: problems in total across the mix (seed flag `--num_samples`).
        seed: drives generated sources (gsm_symbolic).
        batch_size: problems per generation batch, per device (seed flag `--batch_size`).
        num_workers: DataLoader workers (problems are light: 0 is usually right).
    """

    def __init__(
        self,
        dataset: str = "gsm8k",
        split: str = "train",
        num_samples: PositiveInt = 1000,
        seed: int = 0,
        batch_size: PositiveInt = 4,
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.dataset = dataset
        check_sources(dataset)
        self.split = split
        self.num_samples = num_samples
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.problems: list[Problem] | None = None
        self.done_ids: set[str] = set()
        # near the end of a resumed DDP run some ranks have nothing left to do
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def datagen_settings(self) -> dict[str, Any]:
        """The problems' part of datagen_config.json."""
        return {
            "datasets": dataset_names(self.dataset),
            "split": self.split,
            "num_samples": self.num_samples,
            "seed": self.seed,
        }

    def setup(self, stage: str | None = None) -> None:
        if self.problems is None:
            self.problems = self._load()

    def _load(self) -> list[Problem]:
        try:
            problems = load_problems(self.dataset, self.split, self.num_samples, self.seed)
        except ValueError as err:  # unknown or empty source, unusable rows: the message says which
            raise DataError(str(err)) from err
        ids = [problem.sample_id for problem in problems]
        if len(set(ids)) != len(ids):
            raise DataError(f"dataset {self.dataset!r} yields duplicate sample ids; list each source once")
        return problems

    def skip_ids(self, sample_ids: Iterable[str]) -> None:
        """Leave these problems out (already stored); called by the shard writer before predict."""
        self.done_ids = set(sample_ids)

    @property
    def remaining(self) -> list[Problem]:
        self.setup()
        assert self.problems is not None
        return [problem for problem in self.problems if problem.sample_id not in self.done_ids]

    def transfer_batch_to_device(self, batch: list[Problem], device: Any, dataloader_idx: int) -> list[Problem]:
        return batch  # problems are text (frozen dataclasses Lightning cannot move); tokens are made on the device

    def _rank_sampler(self, dataset: Dataset) -> RankShardSampler | None:
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return None
        return RankShardSampler(dataset, trainer.world_size, trainer.global_rank)

    def predict_dataloader(self) -> DataLoader:
        dataset = ProblemList(self.remaining)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self._rank_sampler(dataset),
            collate_fn=collate_problems,
            num_workers=self.num_workers,
        )
