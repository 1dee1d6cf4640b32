"""The seed's ``hidden_pairs.pt``: import it into shards (ids ``seed:<i>``) and export shards back to it.

The seed format has no records, so imported samples carry ``closed_thinking`` / ``correct``
null: train on them with ``data.only_closed: false``. Export writes ``post`` only (not
``post_states``), as the seed reads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from llm_trm.errors import DataError
from llm_trm.files import tmp_path

from .dataset import HiddenPairDataset
from .format import iter_records
from .writer import ShardWriter


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
