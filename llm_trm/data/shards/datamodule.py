"""HiddenPairDataModule: filtered, checked train / val / test hidden pairs from a shard directory."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from llm_trm.errors import DataError
from llm_trm.files import sha256_file

from .dataset import HiddenPairDataset, collate_hidden_pairs
from .format import ShardInfo, corrupt_error, index_files, read_index, read_shard_records, stored_dtype
from .samplers import LengthBucketBatchSampler
from .splits import check_fractions, split_three_ways
from .summaries import DEFAULT_MAX_TOKENS, PairSummaries, check_and_summarise

SPLITS = ("train", "val", "test")
_SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}

# what each filter needs from the records, and what to do when the records lack it
_FILTERS = {
    "only_closed": ("closed_thinking", "whether the LLM closed its thinking itself"),
    "only_correct": ("correct", "whether the answer was correct"),
}
_LACKING = {
    "only_closed": "closed_thinking is null, e.g. shards imported from the seed's hidden_pairs.pt",
    "only_correct": "correct is null: answers were not checked (max_answer_tokens 0) or the shards were imported",
}
_NONE_KEPT = {
    "only_closed": "the LLM closed its thinking itself in none of them (every close was forced by the budget); "
                   "generate data where it does (a larger max_new_tokens, a prompt with a worked example)",
    "only_correct": "none of them was answered correctly",
}


class HiddenPairDataModule(L.LightningDataModule):
    """Train / val / test hidden pairs from a shard directory, split by a stable hash of the sample id.

    Before the split, samples can be filtered by their records: ``only_closed`` keeps the
    samples whose thinking the LLM closed itself (the others end where the budget cut the
    thought off, not where thinking ended), ``only_correct`` those answered correctly. In
    ``setup()`` every shard it will read is checked before any training step: sizes and
    sha256 (``verify``; opt out with ``verify: false``), record counts against the shards, and
    every state it serves must be finite. The same pass builds `summaries(split)`.

    Args:
        data_path: datagen shard directory (seed flag `--data_path`).
        batch_size: per device (seed flag `--batch_size`).
        val_fraction: share of samples held out for validation (model selection).
        test_fraction: share held out for the final report only.
        split_seed: seed of the split's hash.
        num_workers: DataLoader workers.
        bucket_by_length: batch prompts of similar length together (less padding).
        max_length: keep only the last `max_length` prompt states (null: all).
        dtype: dtype of the served states (float32, bfloat16, float16).
        only_closed: keep only samples whose thinking the LLM closed itself.
        only_correct: keep only samples whose answer was correct.
        verify: check every shard's size and sha256 before training.
        summary_tokens: pre tokens drawn into each split's `token_sample`.
        record_fields: record fields each batch carries under `records` (e.g. the bridge's `token_ids`,
            `answer_ids`); none by default.
        verify_checksums: deprecated name of `verify`.
    """

    def __init__(
        self,
        data_path: str,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 0,
        bucket_by_length: bool = False,
        max_length: int | None = None,
        dtype: str = "float32",
        only_closed: bool = True,
        only_correct: bool = False,
        verify: bool = True,
        summary_tokens: int = DEFAULT_MAX_TOKENS,
        record_fields: list[str] | None = None,
        verify_checksums: bool | None = None,
    ) -> None:
        super().__init__()
        for name, value, minimum in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                     ("summary_tokens", summary_tokens, 1)):
            if value < minimum:
                raise DataError(f"data.{name} must be >= {minimum}, got {value}")
        if max_length is not None and max_length < 1:
            raise DataError(f"data.max_length must be >= 1 or null, got {max_length}")
        check_fractions(val_fraction, test_fraction)
        if verify_checksums is not None:
            warnings.warn("data.verify_checksums is renamed data.verify", FutureWarning, stacklevel=2)
            verify = verify_checksums
        self.save_hyperparameters()
        self.data_path = data_path
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.bucket_by_length = bucket_by_length
        self.max_length = max_length
        self.dtype = stored_dtype(dtype)
        self.only_closed = only_closed
        self.only_correct = only_correct
        self.verify = verify
        self.summary_tokens = summary_tokens
        self.record_fields = tuple(record_fields or ())
        self.train_dataset: HiddenPairDataset | None = None
        self.val_dataset: HiddenPairDataset | None = None
        self.test_dataset: HiddenPairDataset | None = None
        self.train_sample_ids: list[str] = []
        self.val_sample_ids: list[str] = []
        self.test_sample_ids: list[str] = []
        self.kept_counts: dict[str, int] = {}
        self._summaries: dict[str, PairSummaries] = {}

    # ---- facts readable before setup

    def _require_shards(self) -> list[ShardInfo]:
        shards = read_index(self.data_path) if index_files(self.data_path) else []
        if not shards:
            raise DataError(f"no hidden-pair shards at {self.data_path}: run `llm-trm datagen` first")
        return shards

    @property
    def hidden_size(self) -> int:
        if self.train_dataset is not None:
            return self.train_dataset.hidden_size
        return self._require_shards()[0].hidden_size

    @property
    def num_post_states(self) -> int:
        """m: end-of-thinking states per sample (batches carry `post_states` [B, m, D])."""
        if self.train_dataset is not None:
            return self.train_dataset.num_post_states
        return self._require_shards()[0].num_post_states

    # ---- setup: records, filters, split, checks, summaries

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        directory = Path(self.data_path)
        shards = self._require_shards()
        kept = self._filter(shards, self._read_flags(directory, shards))
        split = dict(zip(SPLITS, split_three_ways(kept, self.val_fraction, self.test_fraction, self.split_seed)))
        self._check_splits(split, len(kept))
        self.train_sample_ids, self.val_sample_ids, self.test_sample_ids = (split[name] for name in SPLITS)
        used = {name: ids for name, ids in split.items() if ids}
        self._summaries = check_and_summarise(
            directory, shards, used, max_length=self.max_length, verify_checksums=self.verify,
            max_tokens=self.summary_tokens, seed=self.split_seed,
        )
        self.train_dataset = self._dataset(self.train_sample_ids)
        self.val_dataset = self._dataset(self.val_sample_ids)
        self.test_dataset = self._dataset(self.test_sample_ids) if self.test_sample_ids else None

    def _read_flags(self, directory: Path, shards: list[ShardInfo]) -> dict[str, dict[str, Any]]:
        """Per sample id, the record fields the filters read; record files are checked on the way."""
        flags: dict[str, dict[str, Any]] = {}
        for info in shards:
            if self.verify:
                path = directory / info.records_file
                if path.is_file() and (path.stat().st_size != info.records_num_bytes
                                       or sha256_file(path) != info.records_sha256):
                    raise corrupt_error(directory, info.records_file, "fails its size or sha256 check (corrupt or altered)")
            for record in read_shard_records(directory, info):
                flags[record["sample_id"]] = {field: record.get(field) for field, _ in _FILTERS.values()}
        return flags

    def _filter(self, shards: list[ShardInfo], flags: dict[str, dict[str, Any]]) -> list[str]:
        ids = [sid for info in shards for sid in info.sample_ids]
        self.kept_counts = {"stored": len(ids)}
        notes = []
        for name, (field, meaning) in _FILTERS.items():
            if not getattr(self, name):
                continue
            known = [sid for sid in ids if isinstance(flags[sid][field], bool)]
            if not known:
                raise DataError(
                    f"data.{name} needs {meaning}, but the records in {self.data_path} do not say "
                    f"({_LACKING[name]}); set data.{name}: false"
                )
            before = len(ids)
            ids = [sid for sid in known if flags[sid][field]]
            self.kept_counts[name] = len(ids)
            unknown = before - len(known)
            notes.append(f"{name} kept {len(ids)} of {before}" + (f" ({unknown} without {field})" if unknown else ""))
            if not ids:
                raise DataError(
                    f"no samples of {self.data_path} are left after data.{name} (kept 0 of {before}): "
                    f"{_NONE_KEPT[name]}, or set data.{name}: false"
                )
        self.kept_counts["kept"] = len(ids)
        rank_zero_info(f"{self.data_path}: kept {len(ids)} of {self.kept_counts['stored']} samples"
                       + (f" ({'; '.join(notes)})" if notes else " (no filter)"))
        return ids

    def _check_splits(self, split: dict[str, list[str]], total: int) -> None:
        for name in SPLITS:
            if split[name] or (name == "test" and self.test_fraction == 0.0):
                continue
            raise DataError(
                f"the {_SPLIT_NAMES[name]} split of {self.data_path} is empty ({total} samples after the filters, "
                f"val_fraction={self.val_fraction}, test_fraction={self.test_fraction}); generate more samples "
                f"or change the fractions"
            )

    def summaries(self, split: str) -> PairSummaries:
        """The split's pooled / last / post states, exact token mean and a seeded token sample (see PairSummaries)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if self.train_dataset is None:
            raise RuntimeError("call setup() before summaries()")
        if split not in self._summaries:
            raise DataError(f"there is no {split} split: data.test_fraction is 0; set it above 0 to have one")
        return self._summaries[split]

    # ---- loaders

    def _dataset(self, ids: list[str]) -> HiddenPairDataset:
        # checksums were verified in setup; the loaders still check sizes and structure on open
        return HiddenPairDataset(self.data_path, sample_ids=ids, max_length=self.max_length, dtype=self.dtype,
                                 record_fields=self.record_fields)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _loader(self, dataset: HiddenPairDataset, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            collate_fn=collate_hidden_pairs,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_dataset is not None, "call setup() first"
        if not self.bucket_by_length:
            return self._loader(self.train_dataset, batch_size=self.batch_size, shuffle=True)
        num_replicas, rank = self._world()
        batch_sampler = LengthBucketBatchSampler(
            None,
            self.batch_size,
            lengths=self.train_dataset.lengths,
            num_replicas=num_replicas,
            rank=rank,
            seed=self.split_seed,
        )
        return self._loader(self.train_dataset, batch_sampler=batch_sampler)

    def val_dataloader(self) -> DataLoader:
        assert self.val_dataset is not None, "call setup() first"
        return self._loader(self.val_dataset, batch_size=self.batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        assert self.train_dataset is not None, "call setup() first"
        if self.test_dataset is None:
            raise DataError(f"there is no test split of {self.data_path}: data.test_fraction is 0; set it above 0")
        return self._loader(self.test_dataset, batch_size=self.batch_size, shuffle=False)
