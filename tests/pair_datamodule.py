"""The hidden-pair DataModule interface TRMModule consumes (notes/interfaces.md, round 1), over in-memory tensors.

A stand-in for tests until `llm_trm.data.shards.HiddenPairDataModule` implements the same
interface (train / val / test split by a stable hash of the sample id, `*_sample_ids`,
`summaries(split)`). `PairSummaries` is only used through its attributes, so the real one
replaces `Summaries` as is. Samples come from a list or are read whole from a shard directory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from llm_trm.data.shards import HiddenPairDataset, collate_hidden_pairs

SPLITS = ("train", "val", "test")


@dataclass
class Summaries:
    """Same attributes as `llm_trm.data.shards.PairSummaries`."""

    sample_ids: list[str]
    pooled: Tensor  # [N, D] mean of each sample's pre states
    last: Tensor  # [N, D] last pre state
    post: Tensor  # [N, D]
    token_mean: Tensor  # [D] fp64, mean over every pre token of the split
    token_sample: Tensor  # [K, D] up to max_tokens pre tokens, drawn with a fixed seed


def split_of(sample_id: str, val_fraction: float, test_fraction: float, seed: int) -> str:
    unit = int.from_bytes(hashlib.sha256(f"{seed}\x00{sample_id}".encode()).digest()[:8], "big") / 2**64
    return "val" if unit < val_fraction else "test" if unit < val_fraction + test_fraction else "train"


def read_samples(data_path: str) -> list[dict[str, Any]]:
    dataset = HiddenPairDataset(data_path)
    return [dataset[i] for i in range(len(dataset))]


class InMemoryPairs(L.LightningDataModule):
    """Hidden pairs held in memory, split into train / val / test by a stable hash of the sample id.

    Args:
        data_path: a shard directory read whole at setup (or pass `samples`).
        samples: dicts with `sample_id`, `pre` [L, D], `post` [D], `num_thinking_tokens`.
        with_summaries: False hides `summaries`, as a datamodule without the interface.
        max_tokens: size of `token_sample`.
    """

    def __init__(self, data_path: str | None = None, batch_size: int = 8, val_fraction: float = 0.25,
                 test_fraction: float = 0.25, split_seed: int = 0, num_workers: int = 0,
                 bucket_by_length: bool = False, samples: list[dict[str, Any]] | None = None,
                 with_summaries: bool = True, max_tokens: int = 65536) -> None:
        super().__init__()
        self.data_path, self.samples = data_path, samples
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.max_tokens = max_tokens
        self.splits: dict[str, list[dict[str, Any]]] = {}
        if not with_summaries:
            self.summaries = None  # type: ignore[assignment]

    @property
    def hidden_size(self) -> int:
        self.setup("fit")
        return int(self.splits["train"][0]["pre"].shape[-1])

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        samples = self.samples if self.samples is not None else read_samples(str(self.data_path))
        self.splits = {split: [] for split in SPLITS}
        for sample in samples:
            self.splits[split_of(sample["sample_id"], self.val_fraction, self.test_fraction, self.split_seed)].append(
                sample)
        for split in SPLITS:
            setattr(self, f"{split}_sample_ids", [s["sample_id"] for s in self.splits[split]])

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=False,
                          collate_fn=collate_hidden_pairs, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def summaries(self, split: str) -> Summaries:
        samples = self.splits[split]
        if not samples:
            dim = self.hidden_size
            return Summaries([], *(torch.zeros(0, dim) for _ in range(3)), torch.zeros(dim, dtype=torch.float64),
                             torch.zeros(0, dim))
        tokens = torch.cat([s["pre"].float() for s in samples])
        token_sample = tokens
        if len(tokens) > self.max_tokens:
            generator = torch.Generator().manual_seed(0)
            token_sample = tokens[torch.randperm(len(tokens), generator=generator)[: self.max_tokens]]
        return Summaries(
            sample_ids=[s["sample_id"] for s in samples],
            pooled=torch.stack([s["pre"].float().mean(0) for s in samples]),
            last=torch.stack([s["pre"][-1].float() for s in samples]),
            post=torch.stack([s["post"].float() for s in samples]),
            token_mean=tokens.double().mean(0),
            token_sample=token_sample,
        )
