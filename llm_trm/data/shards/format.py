"""The shard directory format: file names, the index, the stored config, records, and shard-vs-index checks.

A shard directory holds:

- ``datagen_config.json``: everything that determines the output (written by rank 0);
- ``index.json`` (rank 0) and ``index.rank{r}.json`` (rank r > 0): the complete shards of
  each rank, with sample count, byte sizes, sha256 checksums, hidden size and sample ids;
- ``shard-r{rank:02d}-{k:05d}.safetensors``: tensors ``pre`` [sum L_i, D], ``pre_offsets``
  [n+1], ``post`` [n, D], ``num_thinking_tokens`` [n], and optionally ``post_states``
  [n, m, D] (the states of the last m positions ending at the closing tag, so
  ``post_states[:, -1] == post``; stored only when m > 1);
- ``shard-r{rank:02d}-{k:05d}.jsonl``: one JSON record per sample, in the same order;
- ``aside-r{rank:02d}-<time>/``: files a writer found and could not account for, moved
  there instead of being deleted.

Every file has exactly one writer: rank r only writes its own shards and its own index,
so DDP ranks never race. A shard only counts once its index entry exists; the index is
replaced atomically after the shard files are complete, so a killed run loses at most
the shard in progress and never duplicates a sample.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import torch

from llm_trm.errors import DataError, LLMTRMError

FORMAT_NAME = "llm-trm-hidden-pairs"
FORMAT_VERSION = 1
CONFIG_FILE = "datagen_config.json"
INDEX_FILE = "index.json"
ASIDE_PREFIX = "aside-"
REQUIRED_RECORD_KEYS = (
    "sample_id",
    "problem",
    "thinking",
    "answer",
    "gold_answer",
    "correct",
    "closed_thinking",
    "token_ids",
    "pre_length",
    "post_position",
)
STATE_TENSORS = ("pre", "post", "post_states")
STORED_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# safetensors' dtype names, as `get_slice(name).get_dtype()` reports them
SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}

SHARD_FILE_RE = re.compile(r"^shard-r(\d+)-(\d+)\.(safetensors|jsonl)$")
_RANK_INDEX_RE = re.compile(r"^index\.rank(\d+)\.json$")


class ShardCorruptError(LLMTRMError, RuntimeError):
    """A shard is missing, fails its checksum, or cannot be parsed."""


class ShardIndexError(DataError):
    """An index file or the stored datagen config is truncated or malformed."""


class OutputDirError(LLMTRMError, OSError):
    """The output directory cannot be created or written."""


def corrupt_error(directory: Path, file: str, what: str) -> ShardCorruptError:
    return ShardCorruptError(
        f"shard {directory / file} {what}; run `llm-trm datagen --verify {directory}` to check every shard"
    )


# --------------------------------------------------------------------------- dtypes


def stored_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A storage / reading dtype by name (bfloat16, float16, float32)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in STORED_DTYPES.values():
            raise DataError(f"unsupported dtype {dtype}; use one of {sorted(STORED_DTYPES)}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in STORED_DTYPES:
        raise DataError(f"unsupported dtype {dtype!r}; use one of {sorted(STORED_DTYPES)}")
    return STORED_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- names


def shard_stem(rank: int, number: int) -> str:
    return f"shard-r{rank:02d}-{number:05d}"


def parse_shard_name(name: str) -> tuple[int, int, str] | None:
    """(rank, shard number, extension) of a shard or records file name, None for any other name."""
    match = SHARD_FILE_RE.match(name)
    return (int(match.group(1)), int(match.group(2)), match.group(3)) if match else None


def index_file_name(rank: int) -> str:
    return INDEX_FILE if rank == 0 else f"index.rank{rank}.json"


def index_files(directory: str | os.PathLike) -> list[Path]:
    """All index files of a shard directory: ``index.json`` then ``index.rank{r}.json`` by rank."""
    directory = Path(directory)
    found = [directory / INDEX_FILE] if (directory / INDEX_FILE).is_file() else []
    ranked = []
    if directory.is_dir():
        for path in directory.iterdir():
            match = _RANK_INDEX_RE.match(path.name)
            if match and path.is_file():
                ranked.append((int(match.group(1)), path))
    return found + [path for _, path in sorted(ranked)]


# --------------------------------------------------------------------------- index


@dataclass
class ShardInfo:
    """One complete shard as listed in an index file."""

    file: str
    records_file: str
    rank: int
    num_samples: int
    num_bytes: int
    sha256: str
    records_num_bytes: int
    records_sha256: str
    hidden_size: int
    dtype: str
    sample_ids: list[str]
    lengths: list[int]
    num_post_states: int = 1  # m: states stored per sample at the end of thinking (1: only `post`)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> ShardInfo:
        # fields with a default (added after format v1 shipped) may be absent
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [name for name in required if name not in entry]
        if missing:
            raise KeyError(f"shard entry lacks {missing}")
        return cls(**{f.name: entry[f.name] for f in fields(cls) if f.name in entry})


def _unreadable(path: Path, what: str, advice: str) -> ShardIndexError:
    return ShardIndexError(f"{path} {what}; {advice}")


def _index_advice(path: Path) -> str:
    return (f"move it aside (e.g. `mv {path} {path}.bad`) and rerun `llm-trm datagen` with the same config, "
            "which rebuilds it from the shards that verify")


def _config_advice(path: Path) -> str:
    return (f"move it aside (e.g. `mv {path} {path}.bad`): the copy kept in index.json is used then, "
            "and datagen writes it again")


def read_json_file(path: Path, advice: str) -> Any:
    """A JSON file, or a one-line ShardIndexError naming the file and what to do."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise _unreadable(path, f"cannot be read ({err.strerror or err})", advice) from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise _unreadable(path, f"is truncated or not valid JSON ({err})", advice) from err


def read_index_file(path: Path) -> dict[str, Any]:
    """One index file's payload, its shard entries parsed into ShardInfo under ``shards``."""
    path = Path(path)
    advice = _index_advice(path)
    payload = read_json_file(path, advice)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise _unreadable(path, f"is not a {FORMAT_NAME} index", advice)
    try:
        shards = [ShardInfo.from_json(entry) for entry in payload["shards"]]
    except (KeyError, TypeError, AttributeError) as err:
        raise _unreadable(path, f"is malformed ({err})", advice) from err
    return {**payload, "shards": shards}


def read_index(directory: str | os.PathLike) -> list[ShardInfo]:
    """The complete shards of every rank, merged and sorted by file name (rank, then shard number)."""
    shards: list[ShardInfo] = []
    for path in index_files(directory):
        shards.extend(read_index_file(path)["shards"])
    return sorted(shards, key=lambda s: s.file)


def read_datagen_config(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The stored datagen config: ``datagen_config.json``, else the copy in any index file."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if path.is_file():
        config = read_json_file(path, _config_advice(path))
        if not isinstance(config, dict):
            raise _unreadable(path, "is not a JSON object", _config_advice(path))
        return config
    for index_path in index_files(directory):
        return read_index_file(index_path).get("datagen_config")
    return None


# --------------------------------------------------------------------------- records


def read_records_file(path: Path) -> list[dict[str, Any]]:
    """The records of one ``.jsonl`` file; a malformed line is a ShardCorruptError naming the file."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise corrupt_error(path.parent, path.name, f"line {number} is not valid JSON ({err})") from err
            if not isinstance(record, dict):
                raise corrupt_error(path.parent, path.name, f"line {number} is not a JSON object")
            records.append(record)
    return records


def record_problems(info: ShardInfo, records: list[dict[str, Any]]) -> list[str]:
    """How a shard's records disagree with its index entry (count, ids, prompt lengths)."""
    if len(records) != info.num_samples:
        return [f"{info.records_file}: {len(records)} records, the shard holds {info.num_samples} samples"]
    if [r.get("sample_id") for r in records] != info.sample_ids:
        return [f"{info.records_file}: sample ids differ from the index"]
    if [r.get("pre_length") for r in records] != info.lengths:
        return [f"{info.records_file}: pre_length values differ from the index"]
    return []


def read_shard_records(directory: Path, info: ShardInfo) -> list[dict[str, Any]]:
    """A complete shard's records, checked against its entry: a mismatch is a ShardCorruptError."""
    path = directory / info.records_file
    if not path.is_file():
        raise corrupt_error(directory, info.records_file, "is missing")
    records = read_records_file(path)
    problems = record_problems(info, records)
    if problems:
        raise corrupt_error(directory, info.records_file, "does not match its shard: " + problems[0])
    return records


def iter_records(directory: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Per-sample JSON records of all complete shards, in index order."""
    directory = Path(directory)
    for info in read_index(directory):
        yield from read_records_file(directory / info.records_file)


def dataset_of(record: dict[str, Any]) -> str:
    """The dataset a record belongs to: its ``dataset`` field, else the sample id's prefix."""
    return str(record.get("dataset") or str(record.get("sample_id", "?")).rsplit(":", 1)[0])


# --------------------------------------------------------------------------- config


def normalise_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as it reads back from JSON (tuples become lists), so comparisons are fair."""
    if not isinstance(config, dict):
        raise ValueError(f"datagen_config must be a dict, got {type(config).__name__}")
    try:
        return json.loads(json.dumps(config, sort_keys=True))
    except (TypeError, ValueError) as err:
        raise ValueError(f"datagen_config must be JSON-serialisable: {err}") from err


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every top-level key whose value differs (or exists on one side only)."""

    def show(cfg: dict[str, Any], key: str) -> str:
        return json.dumps(cfg[key]) if key in cfg else "<missing>"

    return [
        f"{key}: {show(old, key)} -> {show(new, key)}"
        for key in sorted(set(old) | set(new))
        if old.get(key, ...) != new.get(key, ...)  # Ellipsis marks a missing key
    ]


# --------------------------------------------------------------------------- shard structure


def expected_shapes(info: ShardInfo) -> dict[str, list[int]]:
    n, dim = info.num_samples, info.hidden_size
    shapes = {"pre": [sum(info.lengths), dim], "pre_offsets": [n + 1], "post": [n, dim], "num_thinking_tokens": [n]}
    if info.num_post_states > 1:
        shapes["post_states"] = [n, info.num_post_states, dim]
    return shapes


def structure_problems(handle: Any, info: ShardInfo) -> list[str]:
    """Shape and offset checks of an opened shard against its index entry."""
    problems = []
    names = set(handle.keys())
    for name, shape in expected_shapes(info).items():
        if name not in names:
            problems.append(f"{info.file}: tensor {name!r} is missing")
        elif (actual := list(handle.get_slice(name).get_shape())) != shape:
            problems.append(f"{info.file}: tensor {name!r} has shape {actual}, index says {shape}")
    if info.num_post_states == 1 and "post_states" in names:
        problems.append(f"{info.file}: holds post_states but the index says m = 1")
    if not problems:
        offsets = handle.get_tensor("pre_offsets").tolist()
        expected = [0] + torch.cumsum(torch.tensor(info.lengths, dtype=torch.int64), 0).tolist()
        if offsets != expected:
            problems.append(f"{info.file}: pre_offsets do not match the sample lengths in the index")
    return problems
