"""ShardWriter: resumable shards of hidden pairs, one writer per DDP rank; it never deletes what it did not write.

On opening an existing directory a writer checks the stored config, then verifies its own
rank's completed shards (sizes + sha256). Whatever it cannot account for is moved into
``<output_dir>/aside-r{rank:02d}-<time>/``, never deleted: shards that fail verification
(their samples are generated again), files named like its shards that no index entry lists,
and temp files an interrupted run left. When its index file is missing it is rebuilt from
the shard files that verify on their own.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file

from llm_trm.errors import ConfigMismatchError, DataError
from llm_trm.files import TMP_SUFFIX, atomic_write_text, fsync_dir, fsync_file, move_aside, sha256_file, tmp_path

from .format import (
    ASIDE_PREFIX,
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    REQUIRED_RECORD_KEYS,
    OutputDirError,
    ShardInfo,
    dtype_name,
    index_file_name,
    normalise_config,
    parse_shard_name,
    read_datagen_config,
    read_index,
    read_index_file,
    config_differences,
    shard_stem,
    stored_dtype,
)
from .verify import checksum_problems, shard_info_from_files

try:  # advisory lock against two writers of the same rank; POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


class SetAside(NamedTuple):
    """A file a writer moved out of the way instead of deleting it."""

    name: str
    reason: str


@dataclass
class _PendingSample:
    sample_id: str
    pre: torch.Tensor
    post: torch.Tensor
    post_states: torch.Tensor | None  # [m, D], kept only when m > 1
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


def _validate_post_states(sample_id: str, post_states: torch.Tensor, post: torch.Tensor, dtype: torch.dtype) -> int:
    """m of a sample's post_states [m, D], whose last row must be `post` (as stored)."""
    if not (isinstance(post_states, torch.Tensor) and post_states.ndim == 2 and post_states.is_floating_point()):
        raise ValueError(f"sample {sample_id!r}: post_states must be a float tensor [m, D], got {_describe(post_states)}")
    if post_states.shape[0] < 1 or post_states.shape[1] != post.shape[0]:
        raise ValueError(f"sample {sample_id!r}: post_states is {list(post_states.shape)} but post is {list(post.shape)}")
    if not torch.equal(post_states[-1].detach().cpu().to(dtype), post.detach().cpu().to(dtype)):
        raise ValueError(f"sample {sample_id!r}: post_states[-1] must equal post (the closing tag's state)")
    return int(post_states.shape[0])


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


def make_aside_dir(output_dir: Path, rank: int) -> Path:
    """A new, empty ``aside-r{rank}-<time>[-n]`` folder inside `output_dir` (never an existing one)."""
    stem = f"{ASIDE_PREFIX}r{rank:02d}-{time.strftime('%Y%m%d-%H%M%S')}"
    for suffix in range(1000):
        path = output_dir / (stem if suffix == 0 else f"{stem}-{suffix}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise OutputDirError(f"cannot create a folder to move files aside in {output_dir}")


class ShardWriter:
    """Writes hidden pairs into shards of ``shard_size`` samples, resumably.

    One writer per DDP rank, each writing only its own files. With ``auto_resume=False``
    rank 0 moves a non-empty ``output_dir`` aside, so in DDP create rank 0's writer first
    and barrier before creating the others. On resume, files it cannot account for are
    moved aside (see the module docstring); `set_aside` lists them and `aside_dir` is where.

    ``num_post_states`` (m) is the number of end-of-thinking states per sample; null takes it
    from the existing shards, the config's ``num_post_states`` or the first sample added.
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
        num_post_states: int | None = None,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        if num_post_states is not None and num_post_states < 1:
            raise ValueError(f"num_post_states must be >= 1, got {num_post_states}")
        self.output_dir = Path(output_dir)
        self.config = normalise_config(datagen_config)
        self.rank = rank
        self.shard_size = shard_size
        self.dtype = stored_dtype(dtype)
        self.expected_hidden_size = expected_hidden_size
        self.moved_aside_to: Path | None = None  # the whole old output (auto_resume=False)
        self.aside_dir: Path | None = None  # where files this writer could not account for went
        self.set_aside: list[SetAside] = []
        self.rebuilt_index = False
        self._closed = False

        _check_output_dir_usable(self.output_dir)
        if not auto_resume:
            self._start_fresh()
        self.output_dir.mkdir(exist_ok=True)
        self._lock_fd = self._acquire_lock()
        try:
            config_known = self._check_config_matches()
            self._own_shards = self._recover_own_shards(config_known)
            existing = [s for s in read_index(self.output_dir) if s.rank != rank] + self._own_shards
            self.hidden_size = self._resolve_hidden_size(existing)
            self.num_post_states = self._resolve_num_post_states(existing, num_post_states)
            self._done_ids = {sid for s in existing for sid in s.sample_ids}
            self._next_shard = 1 + max((self._shard_number(s.file) for s in self._own_shards), default=-1)
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

    def _check_config_matches(self) -> bool:
        """Whether a stored config exists (and matches: a difference is an error listing the keys)."""
        stored = read_datagen_config(self.output_dir)
        if stored is None:
            return False
        differences = config_differences(stored, self.config)
        if differences:
            raise ConfigMismatchError(
                f"datagen_config differs from the one stored in {self.output_dir} ({'; '.join(differences)}); "
                "use a new output_dir, or --no_auto_resume to move the old output aside and start fresh"
            )
        return True

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

    def _resolve_num_post_states(self, existing: list[ShardInfo], requested: int | None) -> int | None:
        known = {s.num_post_states for s in existing}
        if isinstance(self.config.get("num_post_states"), int):
            known.add(self.config["num_post_states"])
        if requested is not None:
            known.add(requested)
        if len(known) > 1:
            raise ConfigMismatchError(
                f"{self.output_dir}: the shards, the datagen config and this writer disagree on num_post_states "
                f"{sorted(known)}; use a new output_dir or --no_auto_resume"
            )
        return known.pop() if known else None

    @staticmethod
    def _shard_number(file: str) -> int:
        parsed = parse_shard_name(file)
        assert parsed is not None, file
        return parsed[1]

    # ---- resume: account for every file of this rank

    def _is_own_file(self, name: str) -> bool:
        """Shard / records files of this rank, their temp files, and this rank's index temp file."""
        parsed = parse_shard_name(name.removesuffix(TMP_SUFFIX))
        if parsed is not None:
            return parsed[0] == self.rank
        return name == index_file_name(self.rank) + TMP_SUFFIX

    def _recover_own_shards(self, config_known: bool) -> list[ShardInfo]:
        own_files = sorted(p.name for p in self.output_dir.iterdir() if p.is_file() and self._is_own_file(p.name))
        index_path = self.output_dir / index_file_name(self.rank)
        if index_path.is_file():
            shards = self._verify_listed(read_index_file(index_path)["shards"])
        else:
            shards = self._rebuild_index(own_files, config_known)
        referenced = {name for s in shards for name in (s.file, s.records_file)}
        for name in own_files:
            if name in referenced or not (self.output_dir / name).exists():
                continue
            if name.endswith(TMP_SUFFIX):
                self._move_aside([name], "temp file left by an interrupted run")
            else:
                self._move_aside([name], f"named like a shard but not listed in {index_file_name(self.rank)}")
        return shards

    def _verify_listed(self, listed: list[ShardInfo]) -> list[ShardInfo]:
        """The index's shards whose files still match their sizes and sha256; the others go aside."""
        kept = []
        for info in listed:
            if info.rank != self.rank:
                raise DataError(
                    f"{self.output_dir / index_file_name(self.rank)} lists {info.file} of rank {info.rank}; "
                    "run `llm-trm datagen --verify` on the directory"
                )
            problems = checksum_problems(self.output_dir, info)
            if problems:
                self._move_aside([info.file, info.records_file],
                                 f"failed verification on resume: {problems[0]}; its samples are generated again")
            else:
                kept.append(info)
        if len(kept) < len(listed):
            self._write_index(kept)
        return kept

    def _rebuild_index(self, own_files: list[str], config_known: bool) -> list[ShardInfo]:
        stems = sorted({name.rsplit(".", 1)[0] for name in own_files if parse_shard_name(name)})
        if not stems:
            return []
        index_name = index_file_name(self.rank)
        if not config_known:
            for stem in stems:
                self._move_aside([f"{stem}.safetensors", f"{stem}.jsonl"],
                                 f"{index_name} and {CONFIG_FILE} are missing: nothing says which run wrote it")
            return []
        expected = {key: str(self.config.get(key, "unknown")) for key in ("backbone", "layer")}  # as in metadata
        seen = {sid for s in read_index(self.output_dir) if s.rank != self.rank for sid in s.sample_ids}
        shards: list[ShardInfo] = []
        for stem in stems:
            files = [f"{stem}.safetensors", f"{stem}.jsonl"]
            result = shard_info_from_files(self.output_dir, stem, self.rank, expected)
            if isinstance(result, str):
                self._move_aside(files, f"{index_name} is missing and the shard does not verify: {result}")
            elif result.dtype != dtype_name(self.dtype):
                self._move_aside(files, f"{index_name} is missing and the shard is stored as {result.dtype}, "
                                        f"this run stores {dtype_name(self.dtype)}")
            elif self.expected_hidden_size is not None and result.hidden_size != self.expected_hidden_size:
                self._move_aside(files, f"{index_name} is missing and the shard has hidden size "
                                        f"{result.hidden_size}, the backbone {self.expected_hidden_size}")
            elif seen.intersection(result.sample_ids):
                self._move_aside(files, f"{index_name} is missing and the shard repeats samples already stored")
            else:
                shards.append(result)
                seen.update(result.sample_ids)
        if not shards:
            return []
        self._write_index(shards)
        self.rebuilt_index = True
        log.warning(
            "%s was missing: rebuilt it from %d shard(s) that verify (%d samples)%s",
            self.output_dir / index_name, len(shards), sum(s.num_samples for s in shards),
            f"; the others were moved to {self.aside_dir}" if self.aside_dir else "",
        )
        return shards

    def _move_aside(self, names: list[str], reason: str) -> None:
        present = [name for name in names if (self.output_dir / name).exists()]
        if not present:
            return
        if self.aside_dir is None:
            self.aside_dir = make_aside_dir(self.output_dir, self.rank)
        for name in present:
            os.rename(self.output_dir / name, self.aside_dir / name)
            self.set_aside.append(SetAside(name, reason))
            log.warning("%s: moved %s aside to %s (%s)", self.output_dir, name, self.aside_dir, reason)
        fsync_dir(self.output_dir)

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
        post_states: torch.Tensor | None = None,
    ) -> ShardInfo | None:
        """Buffer one sample; returns the shard's index entry when this sample completed a shard.

        ``post_states`` [m, D]: the states of the last m positions ending at the closing tag
        (so ``post_states[-1] == post``); None means m = 1.
        """
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        sample_id = _validate_record(record)
        if sample_id in self._done_ids:
            raise ValueError(f"sample {sample_id!r} is already stored in {self.output_dir}; skip writer.done_ids")
        if sample_id in self._buffered_ids:
            raise ValueError(f"sample {sample_id!r} was already added to this writer")
        _validate_states(sample_id, sample_pre, sample_post, record["pre_length"])
        self._check_hidden_size(sample_id, sample_pre.shape[1])
        m = 1 if post_states is None else _validate_post_states(sample_id, post_states, sample_post, self.dtype)
        self._check_num_post_states(sample_id, m)
        try:
            record_line = json.dumps(record, ensure_ascii=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"record {sample_id!r} is not JSON-serialisable: {err}") from err
        self._buffer.append(
            _PendingSample(
                sample_id=sample_id,
                pre=sample_pre.detach().to("cpu", self.dtype),
                post=sample_post.detach().to("cpu", self.dtype),
                post_states=post_states.detach().to("cpu", self.dtype) if m > 1 else None,
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

    def _check_num_post_states(self, sample_id: str, m: int) -> None:
        if self.num_post_states is None:
            self.num_post_states = m
        elif m != self.num_post_states:
            raise ValueError(
                f"sample {sample_id!r} has {m} post state(s) but this output stores {self.num_post_states}"
            )

    def flush(self) -> ShardInfo | None:
        """Write the buffered samples as one shard and list it in the index."""
        if not self._buffer:
            return None
        stem = shard_stem(self.rank, self._next_shard)
        tensor_path = self.output_dir / f"{stem}.safetensors"
        records_path = self.output_dir / f"{stem}.jsonl"
        tensor_tmp, records_tmp = tmp_path(tensor_path), tmp_path(records_path)
        try:
            save_file(self._shard_tensors(), str(tensor_tmp), metadata=self._shard_metadata())
            fsync_file(tensor_tmp)
            with open(records_tmp, "w", encoding="utf-8") as f:
                f.writelines(sample.record_line + "\n" for sample in self._buffer)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            for tmp in (tensor_tmp, records_tmp):  # this writer's own half-written temp files
                tmp.unlink(missing_ok=True)
            raise
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
            dtype=dtype_name(self.dtype),
            sample_ids=[sample.sample_id for sample in self._buffer],
            lengths=[sample.pre.shape[0] for sample in self._buffer],
            num_post_states=int(self.num_post_states or 1),
        )
        os.replace(tensor_tmp, tensor_path)
        os.replace(records_tmp, records_path)
        fsync_dir(self.output_dir)

        self._write_index(self._own_shards + [info])  # the shard exists from here on
        self._own_shards.append(info)
        self._done_ids.update(info.sample_ids)
        self._buffer.clear()
        self._buffered_ids.clear()
        self._next_shard += 1
        return info

    def _shard_tensors(self) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([0] + [s.pre.shape[0] for s in self._buffer], dtype=torch.int64)
        tensors = {
            "pre": torch.cat([s.pre for s in self._buffer]).contiguous(),
            "pre_offsets": torch.cumsum(lengths, 0),
            "post": torch.stack([s.post for s in self._buffer]).contiguous(),
            "num_thinking_tokens": torch.tensor([s.num_thinking_tokens for s in self._buffer], dtype=torch.int64),
        }
        if (self.num_post_states or 1) > 1:
            tensors["post_states"] = torch.stack([s.post_states for s in self._buffer]).contiguous()  # type: ignore[misc]
        return tensors

    def _shard_metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "hidden_size": str(self.hidden_size),
            "num_post_states": str(self.num_post_states or 1),
            "backbone": str(self.config.get("backbone", "unknown")),
            "layer": str(self.config.get("layer", "unknown")),
        }

    def _write_index(self, shards: list[ShardInfo]) -> None:
        payload = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "rank": self.rank,
            "datagen_config": self.config,
            "shards": [s.to_json() for s in shards],
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
