"""Hidden-pair shards: the Phase 2 datagen output, its writer, verifier and readers.

A shard directory holds:

- ``datagen_config.json``: everything that determines the output (written by rank 0);
- ``index.json`` (rank 0) and ``index.rank{r}.json`` (rank r > 0): the complete shards of
  each rank, with sample count, byte sizes, sha256 checksums, hidden size and sample ids;
- ``shard-r{rank:02d}-{k:05d}.safetensors``: tensors ``pre`` [sum L_i, D], ``pre_offsets``
  [n+1], ``post`` [n, D] and ``num_thinking_tokens`` [n];
- ``shard-r{rank:02d}-{k:05d}.jsonl``: one JSON record per sample, in the same order.

Every file has exactly one writer: rank r only writes its own shards and its own index,
so DDP ranks never race. A shard only counts once its index entry exists; the index is
replaced atomically after the shard files are complete, so a killed run loses at most
the shard in progress and never duplicates a sample.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler

from llm_trm.errors import ConfigMismatchError, DataError, LLMTRMError
from llm_trm.files import TMP_SUFFIX, atomic_write_text, fsync_dir, fsync_file, move_aside, sha256_file, tmp_path

try:  # advisory lock against two writers of the same rank; POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

FORMAT_NAME = "llm-trm-hidden-pairs"
FORMAT_VERSION = 1
CONFIG_FILE = "datagen_config.json"
INDEX_FILE = "index.json"
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
STORED_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

_RANK_INDEX_RE = re.compile(r"^index\.rank(\d+)\.json$")


class ShardCorruptError(LLMTRMError, RuntimeError):
    """A shard is missing, fails its checksum, or cannot be parsed."""


class OutputDirError(LLMTRMError, OSError):
    """The output directory cannot be created or written."""


def _corrupt(directory: Path, file: str, what: str) -> ShardCorruptError:
    return ShardCorruptError(
        f"shard {directory / file} {what}; run `llm-trm datagen --verify {directory}` to check every shard"
    )


# --------------------------------------------------------------------------- file helpers


def _dtype_from_name(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in STORED_DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use one of {sorted(STORED_DTYPES)}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in STORED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(STORED_DTYPES)}")
    return STORED_DTYPES[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> ShardInfo:
        return cls(**{f.name: entry[f.name] for f in fields(cls)})


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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err


def _read_index_file(path: Path) -> dict[str, Any]:
    payload = _read_json(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a {FORMAT_NAME} index")
    return payload


def read_index(directory: str | os.PathLike) -> list[ShardInfo]:
    """The complete shards of every rank, merged and sorted by file name (rank, then shard number)."""
    shards: list[ShardInfo] = []
    for path in index_files(directory):
        try:
            shards.extend(ShardInfo.from_json(e) for e in _read_index_file(path)["shards"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed index {path}: {err!r}") from err
    return sorted(shards, key=lambda s: s.file)


def read_datagen_config(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The stored datagen config: ``datagen_config.json``, else the copy in any index file."""
    directory = Path(directory)
    if (directory / CONFIG_FILE).is_file():
        return _read_json(directory / CONFIG_FILE)
    for path in index_files(directory):
        return _read_index_file(path).get("datagen_config")
    return None


def iter_records(directory: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Per-sample JSON records of all complete shards, in index order."""
    directory = Path(directory)
    for info in read_index(directory):
        with open(directory / info.records_file, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


# --------------------------------------------------------------------------- config


def _normalise_config(config: dict[str, Any]) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- writer


@dataclass
class _PendingSample:
    sample_id: str
    pre: torch.Tensor
    post: torch.Tensor
    num_thinking_tokens: int
    record_line: str


def _validate_record(record: dict[str, Any]) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"record must be a dict, got {type(record).__name__}")
    missing = [key for key in REQUIRED_RECORD_KEYS if key not in record]
    if missing:
        raise ValueError(f"record {record.get('sample_id', '?')!r} is missing required keys: {missing}")
    sample_id = record["sample_id"]
    if not isinstance(sample_id, str) or not sample_id:
        raise ValueError(f"record sample_id must be a non-empty str like 'dataset:index', got {sample_id!r}")
    if not isinstance(record["pre_length"], int) or isinstance(record["pre_length"], bool):
        raise ValueError(f"record {sample_id!r}: pre_length must be an int, got {record['pre_length']!r}")
    return sample_id


def _validate_states(sample_id: str, pre: torch.Tensor, post: torch.Tensor, pre_length: int) -> None:
    if not (isinstance(pre, torch.Tensor) and pre.ndim == 2 and pre.is_floating_point()):
        raise ValueError(f"sample {sample_id!r}: pre must be a float tensor [L, D], got {_describe(pre)}")
    if not (isinstance(post, torch.Tensor) and post.ndim == 1 and post.is_floating_point()):
        raise ValueError(f"sample {sample_id!r}: post must be a float tensor [D], got {_describe(post)}")
    if pre.shape[0] < 1 or pre.shape[0] != pre_length:
        raise ValueError(
            f"sample {sample_id!r}: pre has {pre.shape[0]} rows but record pre_length is {pre_length}"
        )
    if pre.shape[1] != post.shape[0]:
        raise ValueError(f"sample {sample_id!r}: pre is {list(pre.shape)} but post is {list(post.shape)}")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__


def _check_output_dir_usable(output_dir: Path) -> None:
    parent = output_dir.absolute().parent
    if not parent.is_dir():
        raise OutputDirError(
            f"cannot create output_dir {output_dir}: its parent directory {parent} does not exist"
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"output_dir {output_dir} exists and is not a directory")
    target = output_dir if output_dir.exists() else parent
    if not os.access(target, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot write to {target}: check the permissions of output_dir {output_dir}")


class ShardWriter:
    """Writes hidden pairs into shards of ``shard_size`` samples, resumably.

    One writer per DDP rank, each writing only its own files. With ``auto_resume=False``
    rank 0 moves a non-empty ``output_dir`` aside, so in DDP create rank 0's writer first
    and barrier before creating the others.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        datagen_config: dict[str, Any],
        rank: int = 0,
        shard_size: int = 100,
        auto_resume: bool = True,
        expected_hidden_size: int | None = None,
        dtype: str | torch.dtype = "bfloat16",
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.output_dir = Path(output_dir)
        self.config = _normalise_config(datagen_config)
        self.rank = rank
        self.shard_size = shard_size
        self.dtype = _dtype_from_name(dtype)
        self.expected_hidden_size = expected_hidden_size
        self.moved_aside_to: Path | None = None
        self._closed = False

        _check_output_dir_usable(self.output_dir)
        if not auto_resume:
            self._start_fresh()
        self.output_dir.mkdir(exist_ok=True)
        self._lock_fd = self._acquire_lock()
        try:
            self._check_config_matches()
            existing = read_index(self.output_dir)
            self.hidden_size = self._resolve_hidden_size(existing)
            self._own_shards = [s for s in existing if s.rank == rank]
            self._done_ids = {sid for s in existing for sid in s.sample_ids}
            self._next_shard = 1 + max((self._shard_number(s.file) for s in self._own_shards), default=-1)
            self._remove_incomplete_files()
            if rank == 0 and not (self.output_dir / CONFIG_FILE).exists():
                atomic_write_text(self.output_dir / CONFIG_FILE, json.dumps(self.config, indent=2, sort_keys=True))
        except BaseException:
            self._release_lock()
            raise
        self._buffer: list[_PendingSample] = []
        self._buffered_ids: set[str] = set()

    # ---- setup

    def _start_fresh(self) -> None:
        if self.rank != 0:
            if (self.output_dir / index_file_name(self.rank)).exists():
                raise ValueError(
                    f"rank {self.rank}: auto_resume is off but {self.output_dir} still holds this rank's "
                    "index; create rank 0's writer first (it moves the old output aside), then barrier"
                )
            return
        if self.output_dir.is_dir() and any(self.output_dir.iterdir()):
            self.moved_aside_to = move_aside(self.output_dir)

    def _acquire_lock(self) -> int | None:
        if fcntl is None:
            return None
        fd = os.open(self.output_dir / f".writer.rank{self.rank}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(
                f"another ShardWriter for rank {self.rank} is already writing to {self.output_dir}"
            ) from None
        return fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _check_config_matches(self) -> None:
        stored = read_datagen_config(self.output_dir)
        if stored is None:
            return
        differences = config_differences(stored, self.config)
        if differences:
            raise ConfigMismatchError(
                f"datagen_config differs from the one stored in {self.output_dir} ({'; '.join(differences)}); "
                "use a new output_dir, or --no_auto_resume to move the old output aside and start fresh"
            )

    def _resolve_hidden_size(self, existing: list[ShardInfo]) -> int | None:
        sizes = {s.hidden_size for s in existing}
        if len(sizes) > 1:
            raise DataError(f"shards in {self.output_dir} mix hidden sizes {sorted(sizes)}")
        stored = sizes.pop() if sizes else None
        expected = self.expected_hidden_size
        if stored is not None and expected is not None and stored != expected:
            raise ConfigMismatchError(
                f"shards in {self.output_dir} have hidden_size {stored} but the backbone has "
                f"hidden_size {expected}; use a new output_dir or --no_auto_resume"
            )
        return stored if stored is not None else expected

    def _shard_stem(self, number: int) -> str:
        return f"shard-r{self.rank:02d}-{number:05d}"

    @staticmethod
    def _shard_number(file: str) -> int:
        return int(file.split("-")[2].split(".")[0])

    def _remove_incomplete_files(self) -> None:
        """Delete this rank's shard and temp files that no index entry references (left by a kill)."""
        referenced = {name for s in self._own_shards for name in (s.file, s.records_file)}
        own_pattern = re.compile(rf"^shard-r{self.rank:02d}-\d+\.(safetensors|jsonl)({re.escape(TMP_SUFFIX)})?$")
        own_index_tmp = index_file_name(self.rank) + TMP_SUFFIX
        for path in self.output_dir.iterdir():
            stray_shard = own_pattern.match(path.name) and path.name not in referenced
            if stray_shard or path.name == own_index_tmp:
                path.unlink()

    # ---- public API

    @property
    def done_ids(self) -> set[str]:
        """Sample ids already in a complete shard (every rank's, as of opening, plus this writer's)."""
        return set(self._done_ids)

    @property
    def num_buffered(self) -> int:
        return len(self._buffer)

    def add(
        self,
        sample_pre: torch.Tensor,
        sample_post: torch.Tensor,
        num_thinking_tokens: int,
        record: dict[str, Any],
    ) -> ShardInfo | None:
        """Buffer one sample; returns the shard's index entry when this sample completed a shard."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        sample_id = _validate_record(record)
        if sample_id in self._done_ids:
            raise ValueError(f"sample {sample_id!r} is already stored in {self.output_dir}; skip writer.done_ids")
        if sample_id in self._buffered_ids:
            raise ValueError(f"sample {sample_id!r} was already added to this writer")
        _validate_states(sample_id, sample_pre, sample_post, record["pre_length"])
        self._check_hidden_size(sample_id, sample_pre.shape[1])
        try:
            record_line = json.dumps(record, ensure_ascii=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"record {sample_id!r} is not JSON-serialisable: {err}") from err
        self._buffer.append(
            _PendingSample(
                sample_id=sample_id,
                pre=sample_pre.detach().to("cpu", self.dtype),
                post=sample_post.detach().to("cpu", self.dtype),
                num_thinking_tokens=int(num_thinking_tokens),
                record_line=record_line,
            )
        )
        self._buffered_ids.add(sample_id)
        if len(self._buffer) >= self.shard_size:
            return self.flush()
        return None

    def _check_hidden_size(self, sample_id: str, hidden_size: int) -> None:
        if self.hidden_size is None:
            self.hidden_size = hidden_size
        elif hidden_size != self.hidden_size:
            raise ValueError(
                f"sample {sample_id!r} has hidden size {hidden_size} but this output has {self.hidden_size}"
            )

    def flush(self) -> ShardInfo | None:
        """Write the buffered samples as one shard and list it in the index."""
        if not self._buffer:
            return None
        stem = self._shard_stem(self._next_shard)
        tensor_path = self.output_dir / f"{stem}.safetensors"
        records_path = self.output_dir / f"{stem}.jsonl"
        tensor_tmp, records_tmp = tmp_path(tensor_path), tmp_path(records_path)

        save_file(self._shard_tensors(), str(tensor_tmp), metadata=self._shard_metadata())
        fsync_file(tensor_tmp)
        with open(records_tmp, "w", encoding="utf-8") as f:
            f.writelines(sample.record_line + "\n" for sample in self._buffer)
            f.flush()
            os.fsync(f.fileno())
        info = ShardInfo(
            file=tensor_path.name,
            records_file=records_path.name,
            rank=self.rank,
            num_samples=len(self._buffer),
            num_bytes=tensor_tmp.stat().st_size,
            sha256=sha256_file(tensor_tmp),
            records_num_bytes=records_tmp.stat().st_size,
            records_sha256=sha256_file(records_tmp),
            hidden_size=int(self.hidden_size),  # type: ignore[arg-type]
            dtype=_dtype_name(self.dtype),
            sample_ids=[sample.sample_id for sample in self._buffer],
            lengths=[sample.pre.shape[0] for sample in self._buffer],
        )
        os.replace(tensor_tmp, tensor_path)
        os.replace(records_tmp, records_path)
        fsync_dir(self.output_dir)

        self._own_shards.append(info)
        self._write_index()  # the shard exists from here on
        self._done_ids.update(info.sample_ids)
        self._buffer.clear()
        self._buffered_ids.clear()
        self._next_shard += 1
        return info

    def _shard_tensors(self) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([0] + [s.pre.shape[0] for s in self._buffer], dtype=torch.int64)
        return {
            "pre": torch.cat([s.pre for s in self._buffer]).contiguous(),
            "pre_offsets": torch.cumsum(lengths, 0),
            "post": torch.stack([s.post for s in self._buffer]).contiguous(),
            "num_thinking_tokens": torch.tensor([s.num_thinking_tokens for s in self._buffer], dtype=torch.int64),
        }

    def _shard_metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "hidden_size": str(self.hidden_size),
            "backbone": str(self.config.get("backbone", "unknown")),
            "layer": str(self.config.get("layer", "unknown")),
        }

    def _write_index(self) -> None:
        payload = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "rank": self.rank,
            "datagen_config": self.config,
            "shards": [s.to_json() for s in self._own_shards],
        }
        atomic_write_text(self.output_dir / index_file_name(self.rank), json.dumps(payload))

    def close(self) -> None:
        """Flush the partial last shard and release the directory."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._release_lock()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --------------------------------------------------------------------------- verification


@dataclass
class VerifyReport:
    num_shards: int = 0
    num_samples: int = 0
    total_bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = f"{self.num_shards} shards, {self.num_samples} samples, {self.total_bytes / 2**20:.1f} MiB"
        if self.ok:
            return head + ": OK"
        return "\n".join([f"{head}: {len(self.problems)} problem(s)"] + [f"  - {p}" for p in self.problems])


def _structure_problems(handle: Any, info: ShardInfo) -> list[str]:
    """Shape and offset checks of an opened shard against its index entry."""
    n, dim, total = info.num_samples, info.hidden_size, sum(info.lengths)
    expected_shapes = {"pre": [total, dim], "pre_offsets": [n + 1], "post": [n, dim], "num_thinking_tokens": [n]}
    problems = []
    names = set(handle.keys())
    for name, shape in expected_shapes.items():
        if name not in names:
            problems.append(f"{info.file}: tensor {name!r} is missing")
        elif (actual := list(handle.get_slice(name).get_shape())) != shape:
            problems.append(f"{info.file}: tensor {name!r} has shape {actual}, index says {shape}")
    if not problems:
        offsets = handle.get_tensor("pre_offsets").tolist()
        expected = [0] + torch.cumsum(torch.tensor(info.lengths), 0).tolist()
        if offsets != expected:
            problems.append(f"{info.file}: pre_offsets do not match the sample lengths in the index")
    return problems


def _verify_records(directory: Path, info: ShardInfo) -> list[str]:
    path = directory / info.records_file
    if not path.is_file():
        return [f"{info.records_file}: missing"]
    if sha256_file(path) != info.records_sha256:
        return [f"{info.records_file}: sha256 mismatch (corrupt or truncated)"]
    try:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    except json.JSONDecodeError as err:
        return [f"{info.records_file}: not valid JSON lines ({err})"]
    if len(records) != info.num_samples:
        return [f"{info.records_file}: {len(records)} records, index says {info.num_samples}"]
    if [r.get("sample_id") for r in records] != info.sample_ids:
        return [f"{info.records_file}: sample ids differ from the index"]
    if [r.get("pre_length") for r in records] != info.lengths:
        return [f"{info.records_file}: pre_length values differ from the index"]
    return []


def _verify_tensors(directory: Path, info: ShardInfo) -> list[str]:
    path = directory / info.file
    if not path.is_file():
        return [f"{info.file}: missing"]
    size = path.stat().st_size
    if size != info.num_bytes:
        return [f"{info.file}: {size} bytes, index says {info.num_bytes} (truncated or overwritten)"]
    if sha256_file(path) != info.sha256:
        return [f"{info.file}: sha256 mismatch (corrupt)"]
    try:
        with safe_open(str(path), framework="pt") as handle:
            return _structure_problems(handle, info)
    except Exception as err:  # safetensors raises its own error types
        return [f"{info.file}: cannot be parsed ({err})"]


def _verify_entry(info: ShardInfo) -> list[str]:
    if not (len(info.sample_ids) == len(info.lengths) == info.num_samples):
        return [f"{info.file}: index entry lists {len(info.sample_ids)} ids for {info.num_samples} samples"]
    return []


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


def verify_shards(directory: str | os.PathLike) -> VerifyReport:
    """Recompute every checksum and check shapes, offsets, records and duplicates; report, never raise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"no shard directory at {directory}: run `llm-trm datagen` first")
    report = VerifyReport()
    if not (directory / CONFIG_FILE).is_file():
        report.problems.append(f"{CONFIG_FILE}: missing")
    if not index_files(directory):
        report.problems.append(f"{INDEX_FILE}: missing (no complete shard was written)")
        return report
    try:
        shards = read_index(directory)
    except ValueError as err:
        report.problems.append(str(err))
        return report
    for info in shards:
        report.num_shards += 1
        report.num_samples += info.num_samples
        report.total_bytes += info.num_bytes + info.records_num_bytes
        report.problems += _verify_entry(info) + _verify_tensors(directory, info) + _verify_records(directory, info)
    report.problems += _duplicate_problems(shards)
    return report


# --------------------------------------------------------------------------- reader


class HiddenPairDataset(Dataset):
    """Map-style dataset over the samples of a shard directory (all ranks).

    Shards are opened lazily with ``safe_open`` in each worker process, and at most
    ``max_open_files`` stay open (least recently used are closed); each item reads only
    its own rows, so memory stays bounded whatever the dataset size. An open shard is
    memory-mapped and the pages it has served count towards the process's RSS, so the
    bound is about ``max_open_files`` shards: keep it small (reopening costs a header read). ``max_length`` keeps
    the last ``max_length`` prompt states; ``dtype`` casts the returned states.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        sample_ids: Sequence[str] | None = None,
        verify_checksums: bool = False,
        max_length: int | None = None,
        dtype: str | torch.dtype | None = None,
        max_open_files: int = 2,
    ) -> None:
        self.directory = Path(directory)
        if not index_files(self.directory):
            raise DataError(f"no hidden-pair shards at {self.directory}: run `llm-trm datagen` first")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self._shards = read_index(self.directory)
        self.verify_checksums = verify_checksums
        self.max_length = max_length
        self.dtype = _dtype_from_name(dtype) if dtype is not None else None
        self.max_open_files = max_open_files
        self.hidden_size = self._common_hidden_size()
        self._build_locations(sample_ids)
        self._reset_handles()

    def _common_hidden_size(self) -> int:
        sizes = {s.hidden_size for s in self._shards}
        if len(sizes) != 1:
            raise DataError(f"shards in {self.directory} have hidden sizes {sorted(sizes)}")
        return sizes.pop()

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
        handle = self._open_checked(self._shards[shard_idx])
        self._handles[shard_idx] = handle
        if len(self._handles) > self.max_open_files:
            self._handles.popitem(last=False)
        return handle

    def _open_checked(self, info: ShardInfo) -> Any:
        path = self.directory / info.file
        if not path.is_file():
            raise _corrupt(self.directory, info.file, "is missing")
        # A size check is cheap and catches truncation before anything is memory-mapped.
        if path.stat().st_size != info.num_bytes:
            raise _corrupt(self.directory, info.file, f"has {path.stat().st_size} bytes, index says {info.num_bytes}")
        if self.verify_checksums and sha256_file(path) != info.sha256:
            raise _corrupt(self.directory, info.file, "fails its sha256 checksum")
        try:
            handle = safe_open(str(path), framework="pt")
            problems = _structure_problems(handle, info)
        except Exception as err:
            raise _corrupt(self.directory, info.file, f"cannot be parsed ({err})") from err
        if problems:
            raise _corrupt(self.directory, info.file, "does not match the index: " + "; ".join(problems))
        return handle

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard_idx, row, start, length = self._locations[index].tolist()
        if self.max_length is not None and length > self.max_length:
            start, length = start + length - self.max_length, self.max_length  # keep the end
        handle = self._open(shard_idx)
        pre = handle.get_slice("pre")[start : start + length]
        post = handle.get_slice("post")[row : row + 1][0]
        num_thinking = handle.get_slice("num_thinking_tokens")[row : row + 1]
        if self.dtype is not None:
            pre, post = pre.to(self.dtype), post.to(self.dtype)
        return {
            "sample_id": self.sample_ids[index],
            "pre": pre,
            "post": post,
            "num_thinking_tokens": int(num_thinking[0]),
        }


def collate_hidden_pairs(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Right-pad ``pre`` to the longest sample; ``pre_mask`` is True on real tokens."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    lengths = [item["pre"].shape[0] for item in items]
    first = items[0]["pre"]
    pre = first.new_zeros(len(items), max(lengths), first.shape[1])
    pre_mask = torch.zeros(len(items), max(lengths), dtype=torch.bool)
    for i, (item, length) in enumerate(zip(items, lengths)):
        pre[i, :length] = item["pre"]
        pre_mask[i, :length] = True
    return {
        "pre": pre,
        "pre_mask": pre_mask,
        "post": torch.stack([item["post"] for item in items]),
        "num_thinking_tokens": torch.tensor([item["num_thinking_tokens"] for item in items], dtype=torch.long),
        "sample_ids": [item["sample_id"] for item in items],
    }


# --------------------------------------------------------------------------- splits and sampling


def _unit_hash(sample_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\x00{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_sample_ids(ids: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Held-out split decided per id by a stable hash: independent of order and of the other ids."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    train, val = [], []
    for sample_id in ids:
        (val if _unit_hash(sample_id, seed) < val_fraction else train).append(sample_id)
    return train, val


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


# --------------------------------------------------------------------------- DataModule


class HiddenPairDataModule(L.LightningDataModule):
    """Train/val hidden pairs from a shard directory, split by a stable hash of the sample id."""

    def __init__(
        self,
        data_path: str,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 0,
        bucket_by_length: bool = False,
        max_length: int | None = None,
        dtype: str = "float32",
        verify_checksums: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_path = data_path
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.bucket_by_length = bucket_by_length
        self.max_length = max_length
        self.dtype = _dtype_from_name(dtype)
        self.verify_checksums = verify_checksums
        self.train_dataset: HiddenPairDataset | None = None
        self.val_dataset: HiddenPairDataset | None = None
        self.train_sample_ids: list[str] = []
        self.val_sample_ids: list[str] = []

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

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        all_ids = [sid for info in self._require_shards() for sid in info.sample_ids]
        self.train_sample_ids, self.val_sample_ids = split_sample_ids(all_ids, self.val_fraction, self.split_seed)
        for name, ids in (("train", self.train_sample_ids), ("validation", self.val_sample_ids)):
            if not ids:
                raise DataError(
                    f"the {name} split of {self.data_path} is empty ({len(all_ids)} samples, "
                    f"val_fraction={self.val_fraction}); generate more samples or change val_fraction"
                )
        self.train_dataset = self._dataset(self.train_sample_ids)
        self.val_dataset = self._dataset(self.val_sample_ids)

    def _dataset(self, ids: list[str]) -> HiddenPairDataset:
        return HiddenPairDataset(
            self.data_path,
            sample_ids=ids,
            verify_checksums=self.verify_checksums,
            max_length=self.max_length,
            dtype=self.dtype,
        )

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


# --------------------------------------------------------------------------- seed interop


def _seed_record(sample_id: str, problem: str, pre_length: int) -> dict[str, Any]:
    return {
        "sample_id": sample_id,
        "problem": problem,
        "thinking": "",
        "answer": "",
        "gold_answer": None,
        "correct": None,
        "closed_thinking": None,
        "token_ids": [],
        "pre_length": pre_length,
        "post_position": None,
    }


def _check_seed_pairs(data: Any, pt_path: Path) -> None:
    if not isinstance(data, dict) or not {"hidden_pre", "hidden_post", "num_thinking_tokens"} <= set(data):
        raise DataError(f"{pt_path} is not a seed hidden_pairs.pt (needs hidden_pre, hidden_post, num_thinking_tokens)")
    n = len(data["hidden_pre"])
    sizes = {
        "hidden_post": len(data["hidden_post"]),
        "num_thinking_tokens": len(data["num_thinking_tokens"]),
        "seq_lengths": len(data.get("seq_lengths", data["hidden_pre"])),
        "problems": len(data.get("problems", data["hidden_pre"])),
    }
    bad = {key: size for key, size in sizes.items() if size != n}
    if bad:
        raise DataError(f"{pt_path}: hidden_pre has {n} samples but {bad}")
    lengths = [int(pre.shape[0]) for pre in data["hidden_pre"]]
    if "seq_lengths" in data and [int(x) for x in data["seq_lengths"]] != lengths:
        raise DataError(f"{pt_path}: seq_lengths do not match the hidden_pre tensors")
    dims = {int(pre.shape[-1]) for pre in data["hidden_pre"]} | {int(data["hidden_post"].shape[-1])}
    if "hidden_size" in data:
        dims.add(int(data["hidden_size"]))
    if len(dims) != 1:
        raise DataError(f"{pt_path}: inconsistent hidden sizes {sorted(dims)}")


def import_seed_pairs(
    pt_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    backbone: str = "unknown",
    layer: int = -1,
    shard_size: int = 100,
    dtype: str | torch.dtype = "bfloat16",
    auto_resume: bool = True,
) -> int:
    """Convert the seed's ``hidden_pairs.pt`` into shards (ids ``seed:<i>``); returns samples written."""
    pt_path = Path(pt_path)
    data = torch.load(pt_path, map_location="cpu", weights_only=True)
    _check_seed_pairs(data, pt_path)
    hidden_size = int(data["hidden_post"].shape[-1])
    config = {
        "source": "seed_hidden_pairs",
        "backbone": backbone,
        "layer": layer,
        "hidden_size": hidden_size,
        "num_samples": len(data["hidden_pre"]),
    }
    problems = data.get("problems") or [""] * len(data["hidden_pre"])
    written = 0
    with ShardWriter(
        output_dir, config, shard_size=shard_size, auto_resume=auto_resume,
        expected_hidden_size=hidden_size, dtype=dtype,
    ) as writer:
        done = writer.done_ids
        for i, pre in enumerate(data["hidden_pre"]):
            sample_id = f"seed:{i}"
            if sample_id in done:
                continue
            record = _seed_record(sample_id, str(problems[i]), int(pre.shape[0]))
            writer.add(pre, data["hidden_post"][i], int(data["num_thinking_tokens"][i]), record)
            written += 1
    return written


def export_seed_pairs(
    directory: str | os.PathLike, pt_path: str | os.PathLike, dtype: str | torch.dtype | None = None
) -> int:
    """Write the shards back as a seed-format ``hidden_pairs.pt`` (loads everything); returns samples."""
    dataset = HiddenPairDataset(directory, dtype=dtype)
    problems = {record["sample_id"]: record.get("problem") or "" for record in iter_records(directory)}
    items = [dataset[i] for i in range(len(dataset))]
    data = {
        "hidden_pre": [item["pre"] for item in items],
        "hidden_post": torch.stack([item["post"] for item in items]),
        "seq_lengths": [int(item["pre"].shape[0]) for item in items],
        "num_thinking_tokens": [item["num_thinking_tokens"] for item in items],
        "problems": [problems[item["sample_id"]] for item in items],
        "hidden_size": dataset.hidden_size,
    }
    pt_path = Path(pt_path)
    tmp = tmp_path(pt_path)
    torch.save(data, tmp)
    os.replace(tmp, pt_path)
    return len(items)
