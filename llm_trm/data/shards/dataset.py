"""Reading shards: a checked lazy opener, row chunks of ``pre``, the map-style dataset and its collate."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from llm_trm.errors import DataError
from llm_trm.files import sha256_file

from .format import ShardInfo, corrupt_error, index_files, read_index, stored_dtype, structure_problems

CHUNK_BYTES = 16 << 20  # rows of `pre` read at a time when a whole shard is scanned


def open_shard(directory: Path, info: ShardInfo, verify_checksum: bool = False) -> Any:
    """A ``safe_open`` handle on a complete shard, after its size (and sha256) and structure are checked."""
    path = directory / info.file
    if not path.is_file():
        raise corrupt_error(directory, info.file, "is missing")
    # A size check is cheap and catches truncation before anything is memory-mapped.
    if path.stat().st_size != info.num_bytes:
        raise corrupt_error(directory, info.file, f"has {path.stat().st_size} bytes, index says {info.num_bytes}")
    if verify_checksum and sha256_file(path) != info.sha256:
        raise corrupt_error(directory, info.file, "fails its sha256 checksum (corrupt or altered)")
    try:
        handle = safe_open(str(path), framework="pt")
        problems = structure_problems(handle, info)
    except Exception as err:  # safetensors raises its own error types
        raise corrupt_error(directory, info.file, f"cannot be parsed ({err})") from err
    if problems:
        raise corrupt_error(directory, info.file, "does not match the index: " + "; ".join(problems))
    return handle


def pre_chunks(handle: Any, lengths: Sequence[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A shard's ``pre`` in row chunks: (rows [k, D] as stored, sample of each row, position of each row
    within its sample), so a whole shard is scanned with bounded memory."""
    lengths_t = torch.as_tensor(list(lengths), dtype=torch.int64)
    ends = torch.cumsum(lengths_t, 0)
    total = int(ends[-1]) if len(ends) else 0
    pre = handle.get_slice("pre")
    dim = pre.get_shape()[1]
    rows_per_chunk = max(1, CHUNK_BYTES // (4 * max(dim, 1)))
    for start in range(0, total, rows_per_chunk):
        stop = min(start + rows_per_chunk, total)
        rows = torch.arange(start, stop)
        sample = torch.searchsorted(ends, rows, right=True)
        position = rows - (ends[sample] - lengths_t[sample])
        yield pre[start:stop], sample, position


def nonfinite_rows(states: torch.Tensor) -> torch.Tensor:
    """Rows (along the first dim) holding any NaN or inf."""
    return ~torch.isfinite(states.reshape(states.shape[0], -1)).all(1)


class HiddenPairDataset(Dataset):
    """Map-style dataset over the samples of a shard directory (all ranks).

    Shards are opened lazily with ``safe_open`` in each worker process, and at most
    ``max_open_files`` stay open (least recently used are closed); each item reads only
    its own rows, so memory stays bounded whatever the dataset size. An open shard is
    memory-mapped and the pages it has served count towards the process's RSS, so the
    bound is about ``max_open_files`` shards: keep it small (reopening costs a header read). ``max_length`` keeps
    the last ``max_length`` prompt states; ``dtype`` casts the returned states.

    Items: ``sample_id``, ``pre`` [L, D], ``post`` [D], ``post_states`` [m, D] (``post[None]``
    when the shards hold one state per sample) and ``num_thinking_tokens``; with ``record_fields``
    also ``record``: those fields of the sample's JSON record (e.g. ``token_ids``, ``answer_ids``),
    read line by line from its ``.jsonl`` at a byte offset found once at construction (which also
    checks that every chosen record has them), so memory stays bounded here too.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        sample_ids: Sequence[str] | None = None,
        verify_checksums: bool = False,
        max_length: int | None = None,
        dtype: str | torch.dtype | None = None,
        max_open_files: int = 2,
        record_fields: Sequence[str] = (),
    ) -> None:
        self.directory = Path(directory)
        if not index_files(self.directory):
            raise DataError(f"no hidden-pair shards at {self.directory}: run `llm-trm datagen` first")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self._shards = read_index(self.directory)
        self.verify_checksums = verify_checksums
        self.max_length = max_length
        self.dtype = stored_dtype(dtype) if dtype is not None else None
        self.max_open_files = max_open_files
        self.hidden_size = self._common("hidden_size", "hidden sizes")
        self.num_post_states = self._common("num_post_states", "numbers of post states (m)")
        self._build_locations(sample_ids)
        self.record_fields = tuple(record_fields)
        self._record_offsets = self._find_records() if self.record_fields else None
        self._reset_handles()

    def _common(self, field: str, what: str) -> int:
        values = {getattr(s, field) for s in self._shards}
        if len(values) != 1:
            raise DataError(f"shards in {self.directory} have {what} {sorted(values)}")
        return values.pop()

    def _build_locations(self, sample_ids: Sequence[str] | None) -> None:
        """Per sample: shard number, row in the shard, first `pre` row and length (compact tensors)."""
        location: dict[str, tuple[int, int, int, int]] = {}
        for shard_idx, info in enumerate(self._shards):
            start = 0
            for row, (sample_id, length) in enumerate(zip(info.sample_ids, info.lengths)):
                if sample_id in location:
                    raise DataError(
                        f"sample {sample_id!r} appears twice in {self.directory}; run `llm-trm datagen --verify`"
                    )
                location[sample_id] = (shard_idx, row, start, length)
                start += length
        if sample_ids is None:
            chosen = list(location)
        else:
            chosen = list(sample_ids)
            unknown = [sid for sid in chosen if sid not in location]
            if unknown:
                raise ValueError(f"{len(unknown)} sample id(s) are not in {self.directory}, e.g. {unknown[:3]}")
            if len(set(chosen)) != len(chosen):
                raise ValueError("sample_ids contains duplicates")
        self.sample_ids: list[str] = chosen
        self._locations = torch.tensor([location[sid] for sid in chosen], dtype=torch.int64).reshape(-1, 4)
        stored_lengths = self._locations[:, 3]
        if self.max_length is not None:
            stored_lengths = stored_lengths.clamp(max=self.max_length)
        self.lengths: list[int] = stored_lengths.tolist()

    def _find_records(self) -> torch.Tensor:
        """Per chosen sample: (its shard, the byte offset of its record line), after checking the fields exist."""
        wanted = {sid: row for row, sid in enumerate(self.sample_ids)}
        offsets = torch.full((len(self.sample_ids), 2), -1, dtype=torch.int64)
        for shard_idx, info in enumerate(self._shards):
            if not wanted.keys() & set(info.sample_ids):
                continue
            path = self.directory / info.records_file
            if not path.is_file():
                raise corrupt_error(self.directory, info.records_file, "is missing")
            with open(path, "rb") as handle:
                offset = handle.tell()
                for number, line in enumerate(iter(handle.readline, b""), start=1):
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise corrupt_error(self.directory, info.records_file,
                                            f"line {number} is not valid JSON ({err})") from err
                    row = wanted.get(record.get("sample_id"))
                    if row is not None:
                        missing = [field for field in self.record_fields if field not in record]
                        if missing:
                            raise DataError(
                                f"the records in {path} lack {', '.join(missing)} (written by an older datagen): "
                                f"generate the shards again with `llm-trm datagen`"
                            )
                        offsets[row] = torch.tensor([shard_idx, offset])
                    offset = handle.tell()
        if (offsets[:, 0] < 0).any():
            raise corrupt_error(self.directory, "*.jsonl", "lack records for some indexed samples")
        return offsets

    def _record(self, index: int) -> dict[str, Any]:
        shard_idx, offset = self._record_offsets[index].tolist()
        with open(self.directory / self._shards[shard_idx].records_file, "rb") as handle:
            handle.seek(offset)
            record = json.loads(handle.readline())
        return {field: record[field] for field in self.record_fields}

    def _reset_handles(self) -> None:
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._handles_pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        # Open file handles do not cross process boundaries: each worker opens its own.
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        state["_handles_pid"] = None
        return state

    def __len__(self) -> int:
        return len(self.sample_ids)

    def _open(self, shard_idx: int) -> Any:
        if self._handles_pid != os.getpid():
            self._reset_handles()
        handle = self._handles.get(shard_idx)
        if handle is not None:
            self._handles.move_to_end(shard_idx)
            return handle
        handle = open_shard(self.directory, self._shards[shard_idx], self.verify_checksums)
        self._handles[shard_idx] = handle
        if len(self._handles) > self.max_open_files:
            self._handles.popitem(last=False)
        return handle

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard_idx, row, start, length = self._locations[index].tolist()
        if self.max_length is not None and length > self.max_length:
            start, length = start + length - self.max_length, self.max_length  # keep the end
        handle = self._open(shard_idx)
        pre = handle.get_slice("pre")[start : start + length]
        post = handle.get_slice("post")[row : row + 1][0]
        if self.num_post_states > 1:
            post_states = handle.get_slice("post_states")[row : row + 1][0]
        else:
            post_states = post[None]
        num_thinking = handle.get_slice("num_thinking_tokens")[row : row + 1]
        if self.dtype is not None:
            pre, post, post_states = pre.to(self.dtype), post.to(self.dtype), post_states.to(self.dtype)
        item = {
            "sample_id": self.sample_ids[index],
            "pre": pre,
            "post": post,
            "post_states": post_states,
            "num_thinking_tokens": int(num_thinking[0]),
        }
        if self.record_fields:
            item["record"] = self._record(index)
        return item


def collate_hidden_pairs(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Right-pad ``pre`` to the longest sample; ``pre_mask`` is True on real tokens.

    ``post_states`` [B, m, D] is stacked from the items, or ``post[:, None]`` for items without it;
    items with a ``record`` give ``records``, a list of them.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    lengths = [item["pre"].shape[0] for item in items]
    first = items[0]["pre"]
    pre = first.new_zeros(len(items), max(lengths), first.shape[1])
    pre_mask = torch.zeros(len(items), max(lengths), dtype=torch.bool)
    for i, (item, length) in enumerate(zip(items, lengths)):
        pre[i, :length] = item["pre"]
        pre_mask[i, :length] = True
    post = torch.stack([item["post"] for item in items])
    post_states = [item.get("post_states") for item in items]
    batch = {
        "pre": pre,
        "pre_mask": pre_mask,
        "post": post,
        "post_states": torch.stack(post_states) if all(p is not None for p in post_states) else post[:, None],
        "num_thinking_tokens": torch.tensor([item["num_thinking_tokens"] for item in items], dtype=torch.long),
        "sample_ids": [item["sample_id"] for item in items],
    }
    if "record" in items[0]:
        batch["records"] = [item["record"] for item in items]
    return batch
