"""PairSummaries, and the one pass over the shards that checks and summarises them before training.

The pass reads every stored state the DataModule will serve once, shard by shard in row
chunks (memory bounded by the chunk and the per-sample summaries, never by the prompts'
total length): it refuses a non-finite state naming the shard and the sample, and builds
each split's summaries on the way (sums in fp64), so the TRM never needs its own loaders
for its baselines and normalisation statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from llm_trm.errors import DataError

from .dataset import nonfinite_rows, open_shard, pre_chunks
from .format import ShardInfo, corrupt_error
from .splits import unit_hash

DEFAULT_MAX_TOKENS = 65536


@dataclass
class PairSummaries:
    """One split's samples summarised (rows follow ``sample_ids``)."""

    sample_ids: list[str]
    pooled: Tensor  # [N, D] float32: mean of each sample's pre states (padding excluded)
    last: Tensor  # [N, D] float32: each sample's last pre state
    post: Tensor  # [N, D] float32: the end-of-thinking state (the shards' `post`)
    token_mean: Tensor  # [D] float64: mean over every pre token of the split (exact)
    token_sample: Tensor  # [K, D] float32: up to max_tokens pre tokens drawn uniformly with a fixed seed
    post_states: Tensor | None = None  # [N, m, D] float32: the shards' `post_states` when they hold m > 1, else None

    def __len__(self) -> int:
        return len(self.sample_ids)


def uniform_positions(total: int, count: int, seed: int) -> Tensor:
    """`count` distinct positions of [0, total) drawn uniformly (sorted); all of them when total <= count."""
    if total <= count:
        return torch.arange(total)
    chosen = np.random.default_rng(seed).choice(total, size=count, replace=False)
    return torch.from_numpy(np.sort(chosen)).long()


class _SplitSummary:
    """Accumulates one split's summaries while the shards stream past in a fixed order."""

    def __init__(self, sample_ids: list[str], kept_lengths: list[int], dim: int, max_tokens: int, seed: int,
                 num_post_states: int = 1) -> None:
        n = len(sample_ids)
        self.sample_ids = sample_ids
        self.pooled = torch.zeros(n, dim)
        self.last = torch.zeros(n, dim)
        self.post = torch.zeros(n, dim)
        self.post_states = torch.zeros(n, num_post_states, dim) if num_post_states > 1 else None
        self.filled = torch.zeros(n, dtype=torch.bool)
        self.token_sum = torch.zeros(dim, dtype=torch.float64)
        self.token_count = 0
        self.picks = uniform_positions(sum(kept_lengths), max_tokens, seed)
        self.token_sample = torch.empty(len(self.picks), dim)

    def add_tokens(self, states: Tensor, rows: Tensor) -> None:
        """The split's next pre tokens, `states[rows]` in stream order; those at drawn positions are kept."""
        start, stop = self.token_count, self.token_count + rows.numel()
        lo, hi = torch.searchsorted(self.picks, torch.tensor([start, stop])).tolist()
        if hi > lo:
            self.token_sample[lo:hi] = states[rows[self.picks[lo:hi] - start]].float()
        self.token_count = stop

    def result(self) -> PairSummaries:
        assert bool(self.filled.all()), "every sample of the split is summarised"
        return PairSummaries(
            sample_ids=list(self.sample_ids),
            pooled=self.pooled,
            last=self.last,
            post=self.post,
            token_mean=self.token_sum / max(self.token_count, 1),
            token_sample=self.token_sample,
            post_states=self.post_states,
        )


def _nonfinite_error(directory: Path, info: ShardInfo, tensor: str, sample_id: str) -> DataError:
    return DataError(
        f"shard {directory / info.file} holds a non-finite (NaN/inf) {tensor} state in sample {sample_id!r}; "
        "training on it would make the model non-finite: move the shard and its .jsonl aside and rerun "
        "`llm-trm datagen` with the same config to regenerate it (check the backbone dtype if it recurs)"
    )


def check_and_summarise(
    directory: Path,
    shards: Sequence[ShardInfo],
    splits: dict[str, list[str]],
    max_length: int | None = None,
    verify_checksums: bool = True,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seed: int = 0,
) -> dict[str, PairSummaries]:
    """Check every shard that holds a sample of `splits` (size, sha256 when `verify_checksums`,
    structure, finite states, ``post_states[:, -1] == post``) and summarise each split.

    ``max_length`` truncates each prompt to its last states as the dataset does, so the
    summaries describe what the model is fed. Raises on the first problem.
    """
    names = list(splits)
    owner: dict[str, tuple[int, int]] = {sid: (code, row) for code, name in enumerate(names)
                                         for row, sid in enumerate(splits[name])}
    length_of = {sid: length for info in shards for sid, length in zip(info.sample_ids, info.lengths)}
    dim = shards[0].hidden_size if shards else 0
    num_post_states = shards[0].num_post_states if shards else 1  # the same in every shard (the dataset checks)
    summaries = []
    for name in names:
        kept = [min(length_of[sid], max_length or length_of[sid]) for sid in splits[name]]
        summaries.append(_SplitSummary(splits[name], kept, dim, max_tokens, int(unit_hash(name, seed) * 2**32),
                                       num_post_states))
    for info in shards:
        if any(sid in owner for sid in info.sample_ids):
            _summarise_shard(directory, info, owner, summaries, max_length, verify_checksums)
    return {name: summary.result() for name, summary in zip(names, summaries)}


def _summarise_shard(
    directory: Path,
    info: ShardInfo,
    owner: dict[str, tuple[int, int]],
    summaries: list[_SplitSummary],
    max_length: int | None,
    verify_checksums: bool,
) -> None:
    handle = open_shard(directory, info, verify_checksums)
    n = info.num_samples
    code = torch.full((n,), -1, dtype=torch.int64)  # which split each sample of the shard belongs to
    row = torch.full((n,), -1, dtype=torch.int64)  # its row within that split
    for i, sid in enumerate(info.sample_ids):
        code[i], row[i] = owner.get(sid, (-1, -1))
    selected = code >= 0
    lengths = torch.tensor(info.lengths, dtype=torch.int64)
    keep_from = (lengths - max_length).clamp(min=0) if max_length else torch.zeros_like(lengths)
    sums = torch.zeros(n, info.hidden_size, dtype=torch.float64)
    present = sorted(set(code[selected].tolist()))

    for states, sample, position in pre_chunks(handle, info.lengths):
        keep = selected[sample] & (position >= keep_from[sample])
        if not bool(keep.all()):
            states, sample, position = states[keep], sample[keep], position[keep]
        sums.index_add_(0, sample, states.double())  # a NaN / inf makes its sample's sum non-finite
        is_last = position == lengths[sample] - 1
        last_sample, last_states = sample[is_last], states[is_last].float()
        for c in present:
            mine = code[sample] == c
            summaries[c].add_tokens(states, mine.nonzero().squeeze(1))
            mine_last = code[last_sample] == c
            summaries[c].last[row[last_sample[mine_last]]] = last_states[mine_last]
    bad = nonfinite_rows(sums) & selected
    if bad.any():
        raise _nonfinite_error(directory, info, "pre", info.sample_ids[int(bad.nonzero()[0])])

    post = handle.get_tensor("post")
    bad = nonfinite_rows(post) & selected
    if bad.any():
        raise _nonfinite_error(directory, info, "post", info.sample_ids[int(bad.nonzero()[0])])
    post_states = None
    if info.num_post_states > 1:
        post_states = handle.get_tensor("post_states")
        bad = nonfinite_rows(post_states) & selected
        if bad.any():
            raise _nonfinite_error(directory, info, "post_states", info.sample_ids[int(bad.nonzero()[0])])
        differs = (post_states[:, -1] != post).any(1) & selected
        if differs.any():
            sample_id = info.sample_ids[int(differs.nonzero()[0])]
            raise corrupt_error(directory, info.file, f"has post_states[:, -1] != post for sample {sample_id!r}")

    kept_lengths = (lengths - keep_from).to(torch.float64)
    for c in present:
        mine = code == c
        target = row[mine]
        summary = summaries[c]
        summary.pooled[target] = (sums[mine] / kept_lengths[mine, None]).float()
        summary.token_sum += sums[mine].sum(0)
        summary.post[target] = post[mine].float()
        if summary.post_states is not None and post_states is not None:
            summary.post_states[target] = post_states[mine].float()
        summary.filled[target] = True
