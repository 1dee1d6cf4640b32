"""Verifying shards: checksums, structure, finite states, records; rebuilding an index entry from files.

`verify_shards` is what `llm-trm datagen --verify` prints; `checksum_problems` is what a resuming
writer runs on its completed shards; `shard_info_from_files` is how a writer whose index is missing
takes back the shards that verify.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from llm_trm.errors import DataError
from llm_trm.files import sha256_file

from .dataset import nonfinite_rows, pre_chunks
from .format import (
    ASIDE_PREFIX,
    CONFIG_FILE,
    FORMAT_NAME,
    INDEX_FILE,
    REQUIRED_RECORD_KEYS,
    SAFETENSORS_DTYPES,
    ShardCorruptError,
    ShardIndexError,
    ShardInfo,
    index_files,
    read_datagen_config,
    read_index,
    read_records_file,
    record_problems,
    structure_problems,
)
from .stats import DatasetCounts, count_records


@dataclass
class VerifyReport:
    num_shards: int = 0
    num_samples: int = 0
    total_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    datasets: dict[str, DatasetCounts] = field(default_factory=dict)  # from the records that verify
    aside: list[str] = field(default_factory=list)  # folders of files a writer moved aside

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = f"{self.num_shards} shards, {self.num_samples} samples, {self.total_bytes / 2**20:.1f} MiB"
        lines = [head + (": OK" if self.ok else f": {len(self.problems)} problem(s)")]
        lines += [f"  - {p}" for p in self.problems]
        lines += [f"  {name}: {counts.describe()}" for name, counts in self.datasets.items()]
        if self.aside:
            lines.append(f"  note: files set aside by datagen (not part of the data) in {', '.join(self.aside)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- single checks


def checksum_problems(directory: Path, info: ShardInfo) -> list[str]:
    """Sizes and sha256 of a shard's two files against its index entry."""
    problems = []
    for name, size, digest in (
        (info.file, info.num_bytes, info.sha256),
        (info.records_file, info.records_num_bytes, info.records_sha256),
    ):
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif (actual := path.stat().st_size) != size:
            problems.append(f"{name}: {actual} bytes, index says {size} (truncated or overwritten)")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: sha256 mismatch (corrupt or altered)")
    return problems


def nonfinite_problem(handle: Any, info: ShardInfo) -> str | None:
    """Where the first NaN/inf state of a shard is (tensor and sample id), None when all are finite."""
    for rows, sample, _ in pre_chunks(handle, info.lengths):
        bad = nonfinite_rows(rows)
        if bad.any():
            return f"{info.file}: non-finite (NaN/inf) pre state in sample {info.sample_ids[int(sample[bad][0])]!r}"
    for name in ("post", "post_states") if info.num_post_states > 1 else ("post",):
        bad = nonfinite_rows(handle.get_tensor(name))
        if bad.any():
            return f"{info.file}: non-finite (NaN/inf) {name} in sample {info.sample_ids[int(bad.nonzero()[0])]!r}"
    return None


def post_states_problem(handle: Any, info: ShardInfo) -> str | None:
    """``post_states[:, -1]`` must equal ``post`` (the last of the m states is the closing tag's)."""
    if info.num_post_states == 1:
        return None
    differs = (handle.get_tensor("post_states")[:, -1] != handle.get_tensor("post")).any(1)
    if differs.any():
        return f"{info.file}: post_states[:, -1] differs from post in sample {info.sample_ids[int(differs.nonzero()[0])]!r}"
    return None


def _entry_problems(info: ShardInfo) -> list[str]:
    if not (len(info.sample_ids) == len(info.lengths) == info.num_samples):
        return [f"{info.file}: index entry lists {len(info.sample_ids)} ids for {info.num_samples} samples"]
    if info.num_post_states < 1:
        return [f"{info.file}: index entry says {info.num_post_states} post states"]
    return []


def _tensor_problems(directory: Path, info: ShardInfo) -> list[str]:
    try:
        with safe_open(str(directory / info.file), framework="pt") as handle:
            problems = structure_problems(handle, info)
            if not problems:
                problems = [p for p in (nonfinite_problem(handle, info), post_states_problem(handle, info)) if p]
            return problems
    except Exception as err:  # safetensors raises its own error types
        return [f"{info.file}: cannot be parsed ({err})"]


def _records(directory: Path, info: ShardInfo) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        records = read_records_file(directory / info.records_file)
    except ShardCorruptError as err:
        return [], [f"{info.records_file}: {err}"]
    problems = record_problems(info, records)
    return ([] if problems else records), problems


def _duplicate_problems(shards: list[ShardInfo]) -> list[str]:
    first_seen: dict[str, str] = {}
    clashes: dict[tuple[str, str], list[str]] = {}
    for info in shards:
        for sample_id in info.sample_ids:
            if sample_id in first_seen:
                clashes.setdefault((first_seen[sample_id], info.file), []).append(sample_id)
            else:
                first_seen[sample_id] = info.file
    return [
        f"{len(ids)} duplicate sample id(s) in {a} and {b}, e.g. {ids[0]!r}"
        if a != b
        else f"{len(ids)} duplicate sample id(s) within {a}, e.g. {ids[0]!r}"
        for (a, b), ids in clashes.items()
    ]


# --------------------------------------------------------------------------- the whole directory


def verify_shards(directory: str | os.PathLike) -> VerifyReport:
    """Recompute every checksum and check shapes, offsets, finite states, post_states, records and
    duplicates; count closed thinking, accuracy and thinking tokens per dataset from the records.
    Reports problems, never raises on them."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"no shard directory at {directory}: run `llm-trm datagen` first")
    report = VerifyReport()
    report.aside = sorted(p.name for p in directory.iterdir() if p.is_dir() and p.name.startswith(ASIDE_PREFIX))
    if not (directory / CONFIG_FILE).is_file():
        report.problems.append(f"{CONFIG_FILE}: missing")
    else:
        try:
            read_datagen_config(directory)
        except ShardIndexError as err:
            report.problems.append(str(err))
    if not index_files(directory):
        report.problems.append(f"{INDEX_FILE}: missing (no complete shard was written)")
        return report
    try:
        shards = read_index(directory)
    except ShardIndexError as err:
        report.problems.append(str(err))
        return report
    records: list[dict[str, Any]] = []
    for info in shards:
        report.num_shards += 1
        report.num_samples += info.num_samples
        report.total_bytes += info.num_bytes + info.records_num_bytes
        problems = _entry_problems(info) or checksum_problems(directory, info)
        if not problems:
            shard_records, problems = _records(directory, info)
            problems += _tensor_problems(directory, info)
            records += shard_records
        report.problems += problems
    report.problems += _duplicate_problems(shards)
    report.datasets = count_records(records)
    return report


# --------------------------------------------------------------------------- rebuilding an index entry


def shard_info_from_files(
    directory: Path, stem: str, rank: int, expected_metadata: dict[str, str] | None = None
) -> ShardInfo | str:
    """The index entry of a shard found on disk without one, if it verifies on its own (tensors parse
    and agree with each other, records agree with the tensors, states are finite); else why not."""
    file, records_file = f"{stem}.safetensors", f"{stem}.jsonl"
    for name in (file, records_file):
        if not (directory / name).is_file():
            return f"{name} is missing"
    try:
        records = read_records_file(directory / records_file)
    except ShardCorruptError as err:
        return str(err)
    for record in records:
        missing = [key for key in REQUIRED_RECORD_KEYS if key not in record]
        if missing:
            return f"{records_file}: record {record.get('sample_id', '?')!r} lacks {missing}"
    ids = [record["sample_id"] for record in records]
    if len(set(ids)) != len(ids) or not all(isinstance(i, str) and i for i in ids):
        return f"{records_file}: sample ids are not unique non-empty strings"
    try:
        with safe_open(str(directory / file), framework="pt") as handle:
            return _info_from_handle(handle, directory, file, records_file, rank, ids, expected_metadata or {})
    except Exception as err:  # safetensors raises its own error types
        return f"{file}: cannot be parsed ({err})"


def _info_from_handle(
    handle: Any, directory: Path, file: str, records_file: str, rank: int, ids: list[str], expected: dict[str, str]
) -> ShardInfo | str:
    metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT_NAME:
        return f"{file}: not a {FORMAT_NAME} shard"
    for key, value in expected.items():
        if metadata.get(key) != value:
            return f"{file}: written with {key} {metadata.get(key)!r}, this run has {value!r}"
    names = set(handle.keys())
    if not {"pre", "pre_offsets", "post", "num_thinking_tokens"} <= names:
        return f"{file}: lacks tensors {sorted({'pre', 'pre_offsets', 'post', 'num_thinking_tokens'} - names)}"
    num_samples, hidden_size = handle.get_slice("post").get_shape()
    if metadata.get("hidden_size") != str(hidden_size):
        return f"{file}: metadata hidden_size {metadata.get('hidden_size')!r} but post is [{num_samples}, {hidden_size}]"
    lengths = torch.diff(handle.get_tensor("pre_offsets")).tolist()
    if len(lengths) != num_samples or any(length < 1 for length in lengths):
        return f"{file}: pre_offsets do not describe {num_samples} non-empty prompts"
    dtype = SAFETENSORS_DTYPES.get(handle.get_slice("pre").get_dtype())
    if dtype is None:
        return f"{file}: unsupported dtype {handle.get_slice('pre').get_dtype()}"
    info = ShardInfo(
        file=file,
        records_file=records_file,
        rank=rank,
        num_samples=num_samples,
        num_bytes=(directory / file).stat().st_size,
        sha256=sha256_file(directory / file),
        records_num_bytes=(directory / records_file).stat().st_size,
        records_sha256=sha256_file(directory / records_file),
        hidden_size=hidden_size,
        dtype=dtype,
        sample_ids=ids,
        lengths=lengths,
        num_post_states=handle.get_slice("post_states").get_shape()[1] if "post_states" in names else 1,
    )
    problems = [f"{records_file}: {len(ids)} records, the shard holds {num_samples} samples"] if len(ids) != num_samples else []
    problems = problems or structure_problems(handle, info)
    if not problems:
        problems = [p for p in (nonfinite_problem(handle, info), post_states_problem(handle, info)) if p]
    if not problems:
        problems = record_problems(info, read_records_file(directory / records_file))
    return problems[0] if problems else info
