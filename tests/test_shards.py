"""Hidden-pair shards: writer, resume, verification, readers, splits and the DataModule."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from torch.utils.data import DistributedSampler

from llm_trm.data.shards import (
    HiddenPairDataModule,
    HiddenPairDataset,
    LengthBucketBatchSampler,
    OutputDirError,
    PairSummaries,
    ShardCorruptError,
    ShardIndexError,
    ShardWriter,
    collate_hidden_pairs,
    export_seed_pairs,
    import_seed_pairs,
    iter_records,
    read_index,
    split_sample_ids,
    split_three_ways,
    unit_hash,
    verify_shards,
)
from llm_trm.data.shards import dataset as shard_dataset
from llm_trm.errors import ConfigMismatchError, DataError, LLMTRMError

DIM = 8
CONFIG = {"backbone": "tiny", "layer": -1, "datasets": ["gsm8k"], "max_new_tokens": 16, "seed": 0}
REPO_ROOT = Path(__file__).resolve().parents[1]


def make_sample(i: int, dim: int = DIM) -> tuple[torch.Tensor, torch.Tensor, int, dict]:
    """Deterministic sample i: pre [2 + i % 5, dim], post [dim], its record."""
    generator = torch.Generator().manual_seed(i)
    length = 2 + i % 5
    pre = torch.randn(length, dim, generator=generator)
    post = torch.randn(dim, generator=generator)
    record = {
        "sample_id": f"gsm8k:{i}",
        "problem": f"problem {i}",
        "thinking": "think " * (i % 3),
        "answer": str(i),
        "gold_answer": str(i),
        "correct": i % 2 == 0,
        "closed_thinking": i % 3 != 0,
        "token_ids": list(range(length + 3)),
        "pre_length": length,
        "post_position": length + 2,
    }
    return pre, post, 10 + i, record


def write_samples(directory: Path, indices, config=CONFIG, **kwargs) -> ShardWriter:
    with ShardWriter(directory, config, **kwargs) as writer:
        for i in indices:
            writer.add(*make_sample(i))
    return writer


def stored_ids(directory: Path) -> list[str]:
    return [sid for info in read_index(directory) for sid in info.sample_ids]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- writing and reading


def test_write_then_read_back_exactly(tmp_path):
    out = tmp_path / "pairs"
    write_samples(out, range(12), shard_size=5)

    shards = read_index(out)
    assert [s.file for s in shards] == [f"shard-r00-0000{k}.safetensors" for k in range(3)]
    assert [s.num_samples for s in shards] == [5, 5, 2]
    for info in shards:
        assert sha256(out / info.file) == info.sha256
        assert sha256(out / info.records_file) == info.records_sha256
        assert (out / info.file).stat().st_size == info.num_bytes
        assert info.hidden_size == DIM and info.dtype == "bfloat16"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert json.loads((out / "datagen_config.json").read_text()) == CONFIG

    with safe_open(str(out / shards[0].file), framework="pt") as handle:
        lengths = [make_sample(i)[0].shape[0] for i in range(5)]
        assert handle.get_tensor("pre_offsets").tolist() == [0] + torch.tensor(lengths).cumsum(0).tolist()
        assert handle.get_tensor("pre").shape == (sum(lengths), DIM)
        assert handle.get_tensor("post").dtype == torch.bfloat16
        assert handle.metadata()["hidden_size"] == str(DIM)
        assert handle.metadata()["backbone"] == "tiny" and handle.metadata()["layer"] == "-1"

    dataset = HiddenPairDataset(out)
    assert len(dataset) == 12 and dataset.hidden_size == DIM
    assert dataset.sample_ids == [f"gsm8k:{i}" for i in range(12)]
    for i in range(12):
        pre, post, num_thinking, _ = make_sample(i)
        item = dataset[i]
        assert item["sample_id"] == f"gsm8k:{i}"
        assert dataset.lengths[i] == pre.shape[0]
        assert item["pre"].shape == (pre.shape[0], DIM)
        assert torch.equal(item["pre"], pre.to(torch.bfloat16))
        assert torch.equal(item["post"], post.to(torch.bfloat16))
        assert item["num_thinking_tokens"] == num_thinking
        assert torch.equal(item["post_states"], post.to(torch.bfloat16)[None])
    assert [r["sample_id"] for r in iter_records(out)] == dataset.sample_ids
    assert next(iter_records(out)) == make_sample(0)[3]


def test_float32_storage_and_subset_in_given_order(tmp_path):
    out = tmp_path / "pairs"
    write_samples(out, range(6), shard_size=4, dtype="float32")
    dataset = HiddenPairDataset(out, sample_ids=["gsm8k:5", "gsm8k:1"], verify_checksums=True)
    assert dataset.sample_ids == ["gsm8k:5", "gsm8k:1"]
    assert torch.equal(dataset[0]["pre"], make_sample(5)[0])
    assert torch.equal(dataset[1]["post"], make_sample(1)[1])
    with pytest.raises(ValueError, match="not in"):
        HiddenPairDataset(out, sample_ids=["gsm8k:99"])


def test_invalid_samples_are_rejected(tmp_path):
    pre, post, num_thinking, record = make_sample(0)
    with ShardWriter(tmp_path / "pairs", CONFIG) as writer:
        with pytest.raises(ValueError, match="missing required keys.*closed_thinking"):
            writer.add(pre, post, num_thinking, {k: v for k, v in record.items() if k != "closed_thinking"})
        with pytest.raises(ValueError, match="pre_length"):
            writer.add(pre, post, num_thinking, {**record, "pre_length": pre.shape[0] + 1})
        with pytest.raises(ValueError, match="post"):
            writer.add(pre, post[:-1], num_thinking, record)
        with pytest.raises(ValueError, match="pre must be"):
            writer.add(pre[0], post, num_thinking, record)
        assert writer.num_buffered == 0


def test_missing_parent_dir_is_a_clear_error(tmp_path):
    with pytest.raises(OutputDirError, match="parent directory .* does not exist"):
        ShardWriter(tmp_path / "missing" / "pairs", CONFIG)


def test_second_writer_for_same_rank_is_refused(tmp_path):
    with ShardWriter(tmp_path / "pairs", CONFIG):
        with pytest.raises(RuntimeError, match="already writing"):
            ShardWriter(tmp_path / "pairs", CONFIG)


# --------------------------------------------------------------------------- resume


def test_resume_skips_done_ids_and_never_duplicates(tmp_path):
    out = tmp_path / "pairs"
    write_samples(out, range(7), shard_size=3)
    with ShardWriter(out, CONFIG, shard_size=3) as writer:
        assert writer.done_ids == {f"gsm8k:{i}" for i in range(7)}
        with pytest.raises(ValueError, match="already stored"):
            writer.add(*make_sample(3))
        for i in range(9):
            if f"gsm8k:{i}" not in writer.done_ids:
                writer.add(*make_sample(i))
        assert writer.num_buffered == 2
        with pytest.raises(ValueError, match="already added"):
            writer.add(*make_sample(8))
        writer.add(*make_sample(9))
    ids = stored_ids(out)
    assert sorted(ids) == sorted(f"gsm8k:{i}" for i in range(10)) and len(ids) == 10
    assert [s.file for s in read_index(out)][-1] == "shard-r00-00003.safetensors"
    assert verify_shards(out).ok


def test_config_mismatch_lists_differing_keys(tmp_path):
    out = tmp_path / "pairs"
    write_samples(out, range(2))
    changed = {**CONFIG, "max_new_tokens": 32, "temperature": 0.6}
    with pytest.raises(ConfigMismatchError) as info:
        ShardWriter(out, changed)
    message = str(info.value)
    assert "max_new_tokens: 16 -> 32" in message
    assert "temperature: <missing> -> 0.6" in message
    assert "seed" not in message.split("(")[1]  # unchanged keys are not listed
    assert "--no_auto_resume" in message and "\n" not in message


def test_no_auto_resume_moves_old_output_aside(tmp_path):
    out = tmp_path / "pairs"
    write_samples(out, range(4), shard_size=2)
    old_files = sorted(p.name for p in out.iterdir())
    writer = write_samples(out, [10], config={**CONFIG, "seed": 1}, auto_resume=False)

    aside = writer.moved_aside_to
    assert aside is not None and aside.name.startswith("pairs.old-")
    assert sorted(p.name for p in aside.iterdir()) == old_files
    assert stored_ids(aside) == [f"gsm8k:{i}" for i in range(4)]
    assert stored_ids(out) == ["gsm8k:10"]
    assert json.loads((out / "datagen_config.json").read_text())["seed"] == 1


def test_hidden_size_mismatch_is_a_clear_error(tmp_path):
    out = tmp_path / "pairs"
    write_samples(out, range(2))
    with pytest.raises(ConfigMismatchError, match=f"hidden_size {DIM} but the backbone has hidden_size 16"):
        ShardWriter(out, CONFIG, expected_hidden_size=16)
    with ShardWriter(out, CONFIG, expected_hidden_size=DIM) as writer:
        with pytest.raises(ValueError, match="hidden size 16"):
            writer.add(*make_sample(5, dim=16))


def test_stray_files_from_a_kill_are_moved_aside_on_resume_not_deleted(tmp_path):
    out = tmp_path / "pairs"
    write_samples(out, range(3), shard_size=3)
    stray = {"shard-r00-00001.safetensors": b"half-written", "shard-r00-00001.jsonl.tmp": b"half-written records",
             "index.json.tmp": b"half an index"}
    for name, content in stray.items():
        (out / name).write_bytes(content)
    other_rank = out / "shard-r01-00000.safetensors.tmp"  # another rank's file: not ours to touch
    other_rank.write_bytes(b"busy")
    assert len(HiddenPairDataset(out)) == 3  # readers ignore files not in the index

    writer = write_samples(out, range(3, 6), shard_size=3)
    assert writer.aside_dir is not None and writer.aside_dir.parent == out
    assert writer.aside_dir.name.startswith("aside-r00-")
    for name, content in stray.items():  # moved, byte for byte, never deleted
        assert (writer.aside_dir / name).read_bytes() == content
    assert {entry.name for entry in writer.set_aside} == set(stray)
    assert other_rank.read_bytes() == b"busy"
    assert stored_ids(out) == [f"gsm8k:{i}" for i in range(6)]
    assert verify_shards(out).ok


KILLED_WRITER = """
import time
from tests.test_shards import CONFIG, make_sample
from llm_trm.data.shards import ShardWriter

writer = ShardWriter({out!r}, CONFIG, shard_size=5)
for i in range(100):
    writer.add(*make_sample(i))
    if i == 14:
        print("shard 2 written", flush=True)
    if i >= 16:
        time.sleep(60)  # killed here with two samples of shard 3 buffered
"""


def test_killed_writer_loses_at_most_the_open_shard(tmp_path):
    out = tmp_path / "pairs"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER.format(out=str(out))],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "shard 2 written"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert len(stored_ids(out)) in (15, 20)  # shards 0-2, and shard 3 only if it completed

    with ShardWriter(out, CONFIG, shard_size=5) as writer:
        for i in range(30):
            if f"gsm8k:{i}" not in writer.done_ids:
                writer.add(*make_sample(i))
    ids = stored_ids(out)
    assert sorted(ids) == sorted(f"gsm8k:{i}" for i in range(30))
    assert len(set(ids)) == len(ids) == 30
    report = verify_shards(out)
    assert report.ok, str(report)
    assert report.num_samples == 30 and report.num_shards == 6


# --------------------------------------------------------------------------- DDP ranks


def test_ranks_write_their_own_files_and_readers_merge_them(tmp_path):
    out = tmp_path / "pairs"
    rank0 = ShardWriter(out, CONFIG, rank=0, shard_size=2)
    rank1 = ShardWriter(out, CONFIG, rank=1, shard_size=2)
    for i in range(6):
        (rank0 if i % 2 == 0 else rank1).add(*make_sample(i))
    rank0.close()
    rank1.close()

    assert (out / "index.json").exists() and (out / "index.rank1.json").exists()
    rank1_index = json.loads((out / "index.rank1.json").read_text())
    assert {s["rank"] for s in rank1_index["shards"]} == {1}
    assert sorted(stored_ids(out)) == sorted(f"gsm8k:{i}" for i in range(6))
    assert ShardWriter(out, CONFIG, rank=0).done_ids == {f"gsm8k:{i}" for i in range(6)}
    assert len(HiddenPairDataset(out)) == 6
    assert verify_shards(out).ok


def test_duplicate_ids_across_ranks_are_reported(tmp_path):
    out = tmp_path / "pairs"
    # Both ranks opened before either wrote, so neither knows of the other's sample.
    writers = [ShardWriter(out, CONFIG, rank=rank) for rank in (0, 1)]
    for writer in writers:
        writer.add(*make_sample(1))
        writer.close()
    report = verify_shards(out)
    assert any("duplicate" in p and "'gsm8k:1'" in p for p in report.problems)
    with pytest.raises(DataError, match="appears twice"):
        HiddenPairDataset(out)


# --------------------------------------------------------------------------- corruption


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the tensor data, so the header still parses
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


@pytest.mark.parametrize("damage", [_flip_byte, _truncate])
def test_corrupt_shard_is_detected(tmp_path, damage):
    out = tmp_path / "pairs"
    write_samples(out, range(6), shard_size=3)
    assert verify_shards(out).ok
    damage(out / "shard-r00-00001.safetensors")

    report = verify_shards(out)
    assert report.num_shards == 2 and report.num_samples == 6
    assert len(report.problems) == 1 and "shard-r00-00001.safetensors" in report.problems[0]

    dataset = HiddenPairDataset(out, verify_checksums=True)
    assert torch.equal(dataset[0]["post"], make_sample(0)[1].to(torch.bfloat16))  # intact shard reads fine
    with pytest.raises(ShardCorruptError, match=r"shard-r00-00001\.safetensors.*llm-trm datagen --verify"):
        dataset[4]


def test_corrupt_records_are_reported(tmp_path):
    out = tmp_path / "pairs"
    write_samples(out, range(3))
    records = out / "shard-r00-00000.jsonl"
    records.write_text("\n".join(records.read_text().splitlines()[:2]) + "\n")
    report = verify_shards(out)
    assert not report.ok and "shard-r00-00000.jsonl" in report.problems[0]


# --------------------------------------------------------------------------- seed interop


def test_seed_format_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(0)
    lengths = [3, 1, 5, 2, 4]
    seed = {
        "hidden_pre": [torch.randn(n, DIM, generator=generator) for n in lengths],
        "hidden_post": torch.randn(len(lengths), DIM, generator=generator),
        "seq_lengths": lengths,
        "num_thinking_tokens": [7, 0, 12, 3, 5],
        "problems": [f"question {i}" for i in range(len(lengths))],
        "hidden_size": DIM,
    }
    torch.save(seed, tmp_path / "hidden_pairs.pt")

    out = tmp_path / "pairs"
    assert import_seed_pairs(tmp_path / "hidden_pairs.pt", out, backbone="HuggingFaceTB/SmolLM3-3B", shard_size=2) == 5
    assert import_seed_pairs(tmp_path / "hidden_pairs.pt", out, backbone="HuggingFaceTB/SmolLM3-3B", shard_size=2) == 0
    assert stored_ids(out) == [f"seed:{i}" for i in range(5)]
    record = next(iter_records(out))
    assert record["problem"] == "question 0" and record["correct"] is None and record["token_ids"] == []
    assert verify_shards(out).ok

    export_seed_pairs(out, tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert back["seq_lengths"] == lengths and back["hidden_size"] == DIM
    assert back["num_thinking_tokens"] == seed["num_thinking_tokens"]
    assert back["problems"] == seed["problems"]
    assert torch.equal(back["hidden_post"], seed["hidden_post"].to(torch.bfloat16))
    for got, want in zip(back["hidden_pre"], seed["hidden_pre"]):
        assert torch.equal(got, want.to(torch.bfloat16))


# --------------------------------------------------------------------------- batching and splits


def test_collate_pads_right_and_masks():
    items = [
        {"sample_id": "a:0", "pre": torch.ones(2, 3), "post": torch.zeros(3), "num_thinking_tokens": 4},
        {"sample_id": "a:1", "pre": torch.full((4, 3), 2.0), "post": torch.ones(3), "num_thinking_tokens": 9},
    ]
    batch = collate_hidden_pairs(items)
    assert batch["pre"].shape == (2, 4, 3) and batch["post"].shape == (2, 3)
    assert batch["pre_mask"].tolist() == [[True, True, False, False], [True, True, True, True]]
    assert torch.equal(batch["pre"][0, :2], torch.ones(2, 3)) and batch["pre"][0, 2:].abs().sum() == 0
    assert torch.equal(batch["pre"][1], torch.full((4, 3), 2.0))
    assert batch["num_thinking_tokens"].tolist() == [4, 9] and batch["num_thinking_tokens"].dtype == torch.long
    assert batch["sample_ids"] == ["a:0", "a:1"]
    assert batch["post_states"].shape == (2, 1, 3) and torch.equal(batch["post_states"][:, 0], batch["post"])


def test_split_is_deterministic_stable_and_order_independent():
    ids = [f"gsm8k:{i}" for i in range(1000)]
    train, val = split_sample_ids(ids, 0.2, seed=0)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 1000
    assert 150 < len(val) < 250
    assert split_sample_ids(ids, 0.2, seed=0) == (train, val)
    assert set(split_sample_ids(list(reversed(ids)), 0.2)[1]) == set(val)
    more_train, more_val = split_sample_ids(ids + [f"mbpp:{i}" for i in range(500)], 0.2)
    assert set(val) <= set(more_val) and set(train) <= set(more_train)
    assert set(split_sample_ids(ids, 0.2, seed=1)[1]) != set(val)




def test_three_way_split_keeps_val_and_takes_test_from_train():
    ids = [f"gsm8k:{i}" for i in range(1000)]
    train, val, test = split_three_ways(ids, 0.2, 0.1, seed=0)
    assert sorted(train + val + test) == sorted(ids) and len(set(train + val + test)) == 1000
    assert val == split_sample_ids(ids, 0.2)[1]  # adding a test split leaves val unchanged
    assert test == [sid for sid in ids if 0.2 <= unit_hash(sid, 0) < 0.3]
    assert 60 < len(test) < 140
    with pytest.raises(DataError, match="below 1"):
        split_three_ways(ids, 0.6, 0.4)


# --------------------------------------------------------------------------- recovery on resume: nothing deleted


def test_missing_index_is_rebuilt_from_the_shards_that_verify(tmp_path):
    out = tmp_path / "pairs"
    write_samples(out, range(7), shard_size=3)
    before = {p.name: sha256(p) for p in out.glob("shard-*")}
    original = read_index(out)
    (out / "index.json").unlink()

    with ShardWriter(out, CONFIG, shard_size=3) as writer:
        assert writer.rebuilt_index and writer.set_aside == []
        assert writer.done_ids == {f"gsm8k:{i}" for i in range(7)}
        for i in range(10):
            if f"gsm8k:{i}" not in writer.done_ids:
                writer.add(*make_sample(i))
    for name, digest in before.items():  # every original shard is still there, unchanged
        assert sha256(out / name) == digest
    assert [s.to_json() for s in read_index(out)[:3]] == [s.to_json() for s in original]
    ids = stored_ids(out)
    assert sorted(ids) == sorted(f"gsm8k:{i}" for i in range(10)) and len(ids) == 10  # no duplicates
    assert verify_shards(out).ok


def test_missing_index_with_a_broken_shard_adopts_the_rest_and_moves_it_aside(tmp_path):
    out = tmp_path / "pairs"
    write_samples(out, range(6), shard_size=2)
    (out / "index.json").unlink()
    broken = out / "shard-r00-00001.safetensors"
    broken_bytes = broken.read_bytes()[:-40]
    broken.write_bytes(broken_bytes)

    writer = ShardWriter(out, CONFIG, shard_size=2)
    writer.close()
    assert writer.done_ids == {f"gsm8k:{i}" for i in (0, 1, 4, 5)}  # 2 and 3 will be generated again
    assert {entry.name for entry in writer.set_aside} == {"shard-r00-00001.safetensors", "shard-r00-00001.jsonl"}
    assert "does not verify" in writer.set_aside[0].reason
    assert (writer.aside_dir / "shard-r00-00001.safetensors").read_bytes() == broken_bytes
    assert [s.file for s in read_index(out)] == ["shard-r00-00000.safetensors", "shard-r00-00002.safetensors"]


def test_shards_without_index_or_config_are_moved_aside_not_adopted(tmp_path):
    out = tmp_path / "pairs"
    write_samples(out, range(2))
    (out / "index.json").unlink()
    (out / "datagen_config.json").unlink()
    writer = ShardWriter(out, {**CONFIG, "seed": 7})
    writer.close()
    assert writer.done_ids == set() and not writer.rebuilt_index
    assert sorted(p.name for p in writer.aside_dir.iterdir()) == ["shard-r00-00000.jsonl", "shard-r00-00000.safetensors"]


def test_stray_shard_named_file_is_moved_aside_not_deleted(tmp_path):
    out = tmp_path / "pairs"
    write_samples(out, range(2))
    stray = out / "shard-r00-00009.jsonl"
    stray.write_text("the user's own notes\n")
    writer = ShardWriter(out, CONFIG)
    writer.close()
    assert not stray.exists()
    assert (writer.aside_dir / "shard-r00-00009.jsonl").read_text() == "the user's own notes\n"
    assert "not listed in index.json" in writer.set_aside[0].reason
    assert stored_ids(out) == ["gsm8k:0", "gsm8k:1"]


def _nudge_pre(path: Path) -> None:
    """Change the lowest byte of the first `pre` value: the file still parses and the state stays finite."""
    data = bytearray(path.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    start = json.loads(data[8 : 8 + header_size])["pre"]["data_offsets"][0]
    data[8 + header_size + start] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_nudge_pre, _flip_byte, _truncate])
def test_damaged_shard_is_detected_on_resume_moved_aside_and_regenerated_once(tmp_path, damage):
    out = tmp_path / "pairs"
    write_samples(out, range(6), shard_size=3)
    damaged = out / "shard-r00-00000.safetensors"
    damage(damaged)
    damaged_bytes = damaged.read_bytes()

    with ShardWriter(out, CONFIG, shard_size=3) as writer:
        assert writer.done_ids == {f"gsm8k:{i}" for i in range(3, 6)}
        assert [entry.name for entry in writer.set_aside] == ["shard-r00-00000.safetensors", "shard-r00-00000.jsonl"]
        assert "failed verification on resume" in writer.set_aside[0].reason
        for i in range(6):
            if f"gsm8k:{i}" not in writer.done_ids:
                writer.add(*make_sample(i))
    assert (writer.aside_dir / "shard-r00-00000.safetensors").read_bytes() == damaged_bytes
    ids = stored_ids(out)
    assert sorted(ids) == sorted(f"gsm8k:{i}" for i in range(6)) and len(ids) == 6  # regenerated exactly once
    assert verify_shards(out).ok
    dataset = HiddenPairDataset(out)
    assert torch.equal(dataset[dataset.sample_ids.index("gsm8k:0")]["pre"], make_sample(0)[0].to(torch.bfloat16))


def test_failed_flush_removes_only_its_own_temp_files(tmp_path, monkeypatch):
    out = tmp_path / "pairs"
    write_samples(out, range(2), shard_size=2)
    keep = out / "notes.txt"
    keep.write_text("mine")

    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("llm_trm.data.shards.writer.save_file", disk_full)
    writer = ShardWriter(out, CONFIG, shard_size=1)
    with pytest.raises(OSError, match="No space"):
        writer.add(*make_sample(5))
    assert not list(out.glob("*.tmp")) and keep.read_text() == "mine"
    assert stored_ids(out) == ["gsm8k:0", "gsm8k:1"]


# --------------------------------------------------------------------------- malformed index / config: one line


@pytest.mark.parametrize("name", ["index.json", "datagen_config.json"])
def test_truncated_index_or_config_is_a_one_line_error_naming_the_file(tmp_path, name):
    out = tmp_path / "pairs"
    write_samples(out, range(4), shard_size=2)
    path = out / name
    path.write_text(path.read_text()[:25])

    report = verify_shards(out)  # --verify reports it
    assert not report.ok and any(str(path) in p and "not valid JSON" in p for p in report.problems)
    with pytest.raises(ShardIndexError) as caught:  # datagen resume
        ShardWriter(out, CONFIG)
    message = str(caught.value)
    assert isinstance(caught.value, LLMTRMError) and "\n" not in message
    assert str(path) in message and "truncated or not valid JSON" in message and "mv " in message
    assert sorted(p.name for p in out.glob("shard-*")) == [f"shard-r00-0000{k}.{ext}" for k in range(2)
                                                           for ext in ("jsonl", "safetensors")]
    if name == "index.json":  # fit reads the index
        with pytest.raises(ShardIndexError, match="index.json is truncated"):
            HiddenPairDataModule(str(out), only_closed=False).setup("fit")
        path.unlink()  # what the message says to do (moving it aside): the next run rebuilds it
        assert ShardWriter(out, CONFIG).done_ids == {f"gsm8k:{i}" for i in range(4)}


def test_index_that_is_not_an_index_is_a_clear_error(tmp_path):
    out = tmp_path / "pairs"
    write_samples(out, range(2))
    (out / "index.json").write_text(json.dumps({"format": "llm-trm-hidden-pairs", "shards": [{"file": "x"}]}))
    with pytest.raises(ShardIndexError, match=r"index.json is malformed .*lacks"):
        read_index(out)


# --------------------------------------------------------------------------- m post states


def make_post_states(i: int, m: int, dim: int = DIM) -> torch.Tensor:
    """m states ending with sample i's post (as make_sample builds it)."""
    generator = torch.Generator().manual_seed(1000 + i)
    return torch.cat([torch.randn(m - 1, dim, generator=generator), make_sample(i, dim)[1][None]])


def test_m_post_states_round_trip_and_verify(tmp_path):
    out = tmp_path / "pairs"
    with ShardWriter(out, {**CONFIG, "num_post_states": 3}, shard_size=2) as writer:
        for i in range(5):
            writer.add(*make_sample(i), post_states=make_post_states(i, 3))
    shards = read_index(out)
    assert {s.num_post_states for s in shards} == {3}
    with safe_open(str(out / shards[0].file), framework="pt") as handle:
        assert handle.get_slice("post_states").get_shape() == [2, 3, DIM]
        assert handle.metadata()["num_post_states"] == "3"
    assert verify_shards(out).ok

    dataset = HiddenPairDataset(out)
    assert dataset.num_post_states == 3
    for index in range(5):
        item = dataset[index]
        assert item["post_states"].shape == (3, DIM)
        assert torch.equal(item["post_states"], make_post_states(index, 3).to(torch.bfloat16))
        assert torch.equal(item["post_states"][-1], item["post"])
    batch = collate_hidden_pairs([dataset[0], dataset[3]])
    assert batch["post_states"].shape == (2, 3, DIM)
    assert torch.equal(batch["post_states"][1], make_post_states(3, 3).to(torch.bfloat16))

    dm = HiddenPairDataModule(str(out), batch_size=2, val_fraction=0.4, test_fraction=0.0, only_closed=False)
    assert dm.num_post_states == 3
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["post_states"].shape[1:] == (3, DIM)

    export_seed_pairs(out, tmp_path / "back.pt")  # the seed format keeps `post` only
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert torch.equal(back["hidden_post"][4], make_sample(4)[1].to(torch.bfloat16))


def test_one_post_state_is_post_itself(tmp_path):
    out = tmp_path / "pairs"
    write_samples(out, range(2))
    with safe_open(str(out / read_index(out)[0].file), framework="pt") as handle:
        assert "post_states" not in handle.keys()  # nothing stored twice
    item = HiddenPairDataset(out)[1]
    assert item["post_states"].shape == (1, DIM) and torch.equal(item["post_states"][0], item["post"])


def test_post_states_are_validated_when_added(tmp_path):
    with ShardWriter(tmp_path / "pairs", CONFIG) as writer:
        pre, post, num_thinking, record = make_sample(0)
        with pytest.raises(ValueError, match=r"post_states\[-1\] must equal post"):
            writer.add(pre, post, num_thinking, record, post_states=torch.randn(3, DIM))
        with pytest.raises(ValueError, match="post_states is"):
            writer.add(pre, post, num_thinking, record, post_states=torch.randn(3, DIM + 1))
        writer.add(pre, post, num_thinking, record, post_states=make_post_states(0, 2))
        with pytest.raises(ValueError, match="1 post state.* stores 2"):
            writer.add(*make_sample(1))
    with pytest.raises(ConfigMismatchError, match="num_post_states"):
        ShardWriter(tmp_path / "pairs", CONFIG, num_post_states=4)


def _rewrite_shard(directory: Path, edit) -> None:
    """Apply `edit` to shard 0's tensors and fix the index's size and checksum (a consistent but wrong shard)."""
    from safetensors.torch import load_file, save_file

    info_path = directory / "index.json"
    index = json.loads(info_path.read_text())
    entry = index["shards"][0]
    path = directory / entry["file"]
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)
    entry["num_bytes"], entry["sha256"] = path.stat().st_size, sha256(path)
    info_path.write_text(json.dumps(index))


def test_post_states_that_disagree_with_post_are_reported(tmp_path):
    out = tmp_path / "pairs"
    with ShardWriter(out, CONFIG, shard_size=4) as writer:
        for i in range(4):
            writer.add(*make_sample(i), post_states=make_post_states(i, 2))

    def break_sample_2(tensors):
        tensors["post_states"][2, -1] += 1

    _rewrite_shard(out, break_sample_2)
    report = verify_shards(out)
    assert report.problems == [r"shard-r00-00000.safetensors: post_states[:, -1] differs from post in sample 'gsm8k:2'"]
    with pytest.raises(ShardCorruptError, match=r"post_states\[:, -1\] != post for sample 'gsm8k:2'"):
        HiddenPairDataModule(str(out), val_fraction=0.25, test_fraction=0.25, only_closed=False).setup("fit")


# --------------------------------------------------------------------------- --verify: records and states


def test_verify_counts_closed_thinking_and_accuracy_per_dataset_from_the_records(tmp_path):
    out = tmp_path / "pairs"
    with ShardWriter(out, CONFIG, shard_size=4) as writer:
        for i in range(6):
            pre, post, num_thinking, record = make_sample(i)
            dataset = "gsm8k" if i < 4 else "mbpp"
            writer.add(pre, post, num_thinking, {**record, "sample_id": f"{dataset}:{i}", "dataset": dataset,
                                                 "num_thinking_tokens": num_thinking})
    report = verify_shards(out)
    assert report.ok and list(report.datasets) == ["gsm8k", "mbpp"]
    gsm8k, mbpp = report.datasets["gsm8k"], report.datasets["mbpp"]
    # make_sample: closed unless i % 3 == 0, correct when i is even, 10 + i thinking tokens
    assert (gsm8k.samples, gsm8k.closed, gsm8k.closed_known, gsm8k.correct, gsm8k.checked) == (4, 2, 4, 2, 4)
    assert (mbpp.samples, mbpp.closed, mbpp.correct) == (2, 2, 1)
    assert gsm8k.thinking_tokens == 10 + 11 + 12 + 13
    text = str(report)
    assert "gsm8k: 4 samples, closed its thinking 2/4 (50.0%), accuracy 2/4 (50.0%), 11.5 thinking tokens" in text
    assert "mbpp: 2 samples, closed its thinking 2/2 (100.0%), accuracy 1/2 (50.0%)" in text


def test_verify_reports_a_non_finite_state_with_its_sample(tmp_path):
    out = tmp_path / "pairs"
    with ShardWriter(out, CONFIG, shard_size=3, dtype="float32") as writer:
        for i in range(3):
            pre, post, num_thinking, record = make_sample(i)
            if i == 1:
                pre[-1, 2] = float("inf")
            writer.add(pre, post, num_thinking, record)
    report = verify_shards(out)
    assert report.problems == ["shard-r00-00000.safetensors: non-finite (NaN/inf) pre state in sample 'gsm8k:1'"]


# --------------------------------------------------------------------------- DataModule


@pytest.fixture
def pairs_dir(tmp_path):
    out = tmp_path / "pairs"
    write_samples(out, range(40), shard_size=8)
    return out


CLOSED = [f"gsm8k:{i}" for i in range(40) if i % 3 != 0]  # make_sample: closed unless i % 3 == 0


def test_datamodule_splits_and_batches(pairs_dir):
    dm = HiddenPairDataModule(str(pairs_dir), batch_size=4, val_fraction=0.25, test_fraction=0.2, max_length=3,
                              only_closed=False)
    assert dm.hidden_size == DIM  # readable before setup
    dm.setup("fit")
    all_ids = [f"gsm8k:{i}" for i in range(40)]
    expected = split_three_ways(all_ids, 0.25, 0.2)
    assert (dm.train_sample_ids, dm.val_sample_ids, dm.test_sample_ids) == expected
    assert all(len(ids) > 0 for ids in expected) and sum(map(len, expected)) == 40
    assert dm.kept_counts == {"stored": 40, "kept": 40}

    batch = next(iter(dm.val_dataloader()))
    assert batch["pre"].dtype == torch.float32 and batch["pre"].shape[0] == min(4, len(dm.val_dataset))
    assert batch["pre"].shape[1] <= 3 and batch["pre"].shape[2] == DIM
    assert batch["post_states"].shape == (batch["pre"].shape[0], 1, DIM)
    for row, sample_id in enumerate(batch["sample_ids"]):
        pre = make_sample(int(sample_id.split(":")[1]))[0][-3:]  # truncation keeps the end
        kept = batch["pre_mask"][row].sum().item()
        assert kept == pre.shape[0]
        assert torch.equal(batch["pre"][row, :kept], pre.to(torch.bfloat16).float())
    seen = [sid for b in dm.train_dataloader() for sid in b["sample_ids"]]
    assert sorted(seen) == sorted(dm.train_sample_ids)
    tested = [sid for b in dm.test_dataloader() for sid in b["sample_ids"]]
    assert tested == dm.test_sample_ids


def test_only_closed_is_the_default_and_keeps_exactly_the_closed_samples(pairs_dir, caplog):
    dm = HiddenPairDataModule(str(pairs_dir), val_fraction=0.25)
    with caplog.at_level("INFO"):
        dm.setup("fit")
    kept = dm.train_sample_ids + dm.val_sample_ids + dm.test_sample_ids
    assert sorted(kept) == sorted(CLOSED)
    assert dm.kept_counts == {"stored": 40, "only_closed": 26, "kept": 26}
    assert "kept 26 of 40 samples (only_closed kept 26 of 40)" in caplog.text

    both = HiddenPairDataModule(str(pairs_dir), val_fraction=0.25, test_fraction=0.1, only_correct=True)
    both.setup("fit")
    expected = [f"gsm8k:{i}" for i in range(40) if i % 3 != 0 and i % 2 == 0]  # closed and correct
    assert sorted(both.train_sample_ids + both.val_sample_ids + both.test_sample_ids) == sorted(expected)
    assert both.kept_counts == {"stored": 40, "only_closed": 26, "only_correct": 13, "kept": 13}


def _write_records(out: Path, n: int, **fields) -> None:
    with ShardWriter(out, CONFIG, shard_size=n) as writer:
        for i in range(n):
            pre, post, num_thinking, record = make_sample(i)
            writer.add(pre, post, num_thinking, {**record, **fields})


def test_filters_with_nothing_left_are_a_one_line_error(tmp_path):
    _write_records(tmp_path / "forced", 6, closed_thinking=False)
    with pytest.raises(DataError) as caught:
        HiddenPairDataModule(str(tmp_path / "forced")).setup("fit")
    message = str(caught.value)
    assert "\n" not in message and "only_closed (kept 0 of 6)" in message
    assert "set data.only_closed: false" in message

    _write_records(tmp_path / "wrong", 6, closed_thinking=True, correct=False)
    with pytest.raises(DataError, match=r"only_correct \(kept 0 of 6\).*set data.only_correct: false"):
        HiddenPairDataModule(str(tmp_path / "wrong"), only_correct=True).setup("fit")


def test_filters_on_records_that_lack_the_field_say_what_to_set(tmp_path):
    generator = torch.Generator().manual_seed(0)
    seed = {"hidden_pre": [torch.randn(3, DIM, generator=generator) for _ in range(8)],
            "hidden_post": torch.randn(8, DIM, generator=generator), "num_thinking_tokens": [1] * 8}
    torch.save(seed, tmp_path / "hidden_pairs.pt")
    import_seed_pairs(tmp_path / "hidden_pairs.pt", tmp_path / "pairs")
    with pytest.raises(DataError) as caught:
        HiddenPairDataModule(str(tmp_path / "pairs")).setup("fit")
    assert "closed_thinking is null" in str(caught.value) and "set data.only_closed: false" in str(caught.value)
    with pytest.raises(DataError, match="correct is null.*set data.only_correct: false"):
        HiddenPairDataModule(str(tmp_path / "pairs"), only_closed=False, only_correct=True).setup("fit")
    dm = HiddenPairDataModule(str(tmp_path / "pairs"), only_closed=False, val_fraction=0.25, test_fraction=0.25)
    dm.setup("fit")
    assert dm.kept_counts == {"stored": 8, "kept": 8}


def test_datamodule_errors_are_clear(tmp_path, pairs_dir):
    with pytest.raises(DataError, match="run `llm-trm datagen` first"):
        HiddenPairDataModule(str(tmp_path / "nothing")).setup("fit")
    with pytest.raises(DataError, match="validation split .* is empty"):
        HiddenPairDataModule(str(pairs_dir), val_fraction=0.0).setup("fit")
    with pytest.raises(DataError, match=r"test split .* is empty \(26 samples after the filters"):
        HiddenPairDataModule(str(pairs_dir), val_fraction=0.25, test_fraction=0.001).setup("fit")
    no_test = HiddenPairDataModule(str(pairs_dir), val_fraction=0.25, test_fraction=0.0)
    no_test.setup("fit")
    assert no_test.test_sample_ids == []
    with pytest.raises(DataError, match="test_fraction is 0"):
        no_test.test_dataloader()
    with pytest.raises(DataError, match="test_fraction is 0"):
        no_test.summaries("test")
    for bad, match in (({"batch_size": 0}, "data.batch_size must be >= 1, got 0"),
                       ({"val_fraction": 0.5, "test_fraction": 0.5}, "below 1"),
                       ({"max_length": 0}, "max_length"), ({"dtype": "int8"}, "unsupported dtype")):
        with pytest.raises(DataError, match=match) as caught:
            HiddenPairDataModule(str(pairs_dir), **bad)
        assert "\n" not in str(caught.value)


def test_verify_checksums_is_an_alias_of_verify(pairs_dir):
    with pytest.warns(FutureWarning, match="renamed data.verify"):
        dm = HiddenPairDataModule(str(pairs_dir), verify_checksums=False)
    assert dm.verify is False
    assert HiddenPairDataModule(str(pairs_dir)).verify is True  # on by default


# --------------------------------------------------------------------------- checks before training


def test_setup_refuses_a_shard_that_fails_its_checksum_unless_verify_is_off(pairs_dir):
    _nudge_pre(pairs_dir / "shard-r00-00002.safetensors")
    with pytest.raises(ShardCorruptError) as caught:
        HiddenPairDataModule(str(pairs_dir), val_fraction=0.25).setup("fit")
    message = str(caught.value)
    assert "shard-r00-00002.safetensors fails its sha256 checksum" in message and "\n" not in message
    dm = HiddenPairDataModule(str(pairs_dir), val_fraction=0.25, verify=False)
    dm.setup("fit")  # opted out: sizes and structure are still checked, the checksum is not
    assert len(dm.train_sample_ids) > 0


def test_setup_refuses_records_that_do_not_match_the_shard(pairs_dir):
    records = pairs_dir / "shard-r00-00001.jsonl"
    records.write_text("".join(records.read_text().splitlines(keepends=True)[:5]))
    with pytest.raises(ShardCorruptError, match="shard-r00-00001.jsonl fails its size or sha256"):
        HiddenPairDataModule(str(pairs_dir), val_fraction=0.25).setup("fit")
    with pytest.raises(ShardCorruptError, match="shard-r00-00001.jsonl does not match its shard: .*5 records, "
                                                "the shard holds 8 samples"):
        HiddenPairDataModule(str(pairs_dir), val_fraction=0.25, verify=False).setup("fit")


@pytest.mark.parametrize("verify", [True, False])
def test_setup_refuses_a_non_finite_state_naming_shard_and_sample(tmp_path, verify):
    out = tmp_path / "pairs"
    with ShardWriter(out, CONFIG, shard_size=4, dtype="float32") as writer:
        for i in range(12):
            pre, post, num_thinking, record = make_sample(i)
            if i == 5:  # a closed sample
                post[3] = float("nan")
            if i == 6:  # a forced close: filtered out by only_closed, never read
                pre[0, 0] = float("inf")
            writer.add(pre, post, num_thinking, record)
    with pytest.raises(DataError) as caught:
        HiddenPairDataModule(str(out), val_fraction=0.25, test_fraction=0.2, verify=verify).setup("fit")
    message = str(caught.value)
    assert "shard-r00-00001.safetensors" in message and "non-finite (NaN/inf) post state in sample 'gsm8k:5'" in message
    assert "\n" not in message
    with pytest.raises(DataError, match=r"non-finite \(NaN/inf\) pre state in sample 'gsm8k:6'"):
        HiddenPairDataModule(str(out), val_fraction=0.25, test_fraction=0.2, only_closed=False).setup("fit")


# --------------------------------------------------------------------------- summaries


def _ramp_pre(i: int, length: int) -> torch.Tensor:
    """pre[r, d] = 10 i + r + d / 2: every summary has a closed form."""
    return 10.0 * i + torch.arange(length, dtype=torch.float32)[:, None] + torch.arange(DIM) / 2


RAMP_LENGTHS = [2, 5, 3, 4, 1, 6, 2, 3, 4, 5]


@pytest.fixture
def ramp_dir(tmp_path):
    out = tmp_path / "ramp"
    with ShardWriter(out, CONFIG, shard_size=3, dtype="float32") as writer:
        for i, length in enumerate(RAMP_LENGTHS):
            record = {**make_sample(i)[3], "pre_length": length, "closed_thinking": True}
            writer.add(_ramp_pre(i, length), torch.full((DIM,), -float(i)), 0, record)
    return out


def _expected(ids: list[str], max_length: int | None = None) -> dict:
    """Hand-computed summaries of the ramp samples: the mean of r over kept rows r is the midpoint."""
    half_d = torch.arange(DIM) / 2
    pooled, last, token_total, token_count = [], [], torch.zeros(DIM, dtype=torch.float64), 0
    for sid in ids:
        i = int(sid.split(":")[1])
        length = RAMP_LENGTHS[i]
        first = max(0, length - max_length) if max_length else 0
        kept = length - first
        pooled.append(10 * i + (first + length - 1) / 2 + half_d)
        last.append(10 * i + (length - 1) + half_d)
        token_total += kept * (10 * i) + sum(range(first, length)) + kept * half_d.double()
        token_count += kept
    return {"pooled": torch.stack(pooled), "last": torch.stack(last), "token_mean": token_total / token_count,
            "post": torch.stack([torch.full((DIM,), -float(sid.split(":")[1])) for sid in ids]),
            "tokens": token_count}


@pytest.mark.parametrize("max_length", [None, 2])
def test_summaries_match_hand_computed_values(ramp_dir, max_length):
    dm = HiddenPairDataModule(str(ramp_dir), val_fraction=0.3, test_fraction=0.3, max_length=max_length)
    dm.setup("fit")
    for split, ids in (("train", dm.train_sample_ids), ("val", dm.val_sample_ids), ("test", dm.test_sample_ids)):
        summary = dm.summaries(split)
        want = _expected(ids, max_length)
        assert isinstance(summary, PairSummaries) and summary.sample_ids == ids and len(ids) > 0
        assert summary.pooled.dtype == summary.last.dtype == summary.post.dtype == torch.float32
        assert summary.token_mean.dtype == torch.float64 and summary.token_mean.shape == (DIM,)
        torch.testing.assert_close(summary.pooled, want["pooled"].float(), rtol=0, atol=1e-5)
        assert torch.equal(summary.last, want["last"].float())
        assert torch.equal(summary.post, want["post"])
        torch.testing.assert_close(summary.token_mean, want["token_mean"], rtol=0, atol=1e-12)
        assert summary.token_sample.shape == (want["tokens"], DIM)  # fewer tokens than the cap: all of them
        torch.testing.assert_close(summary.token_sample.double().mean(0), want["token_mean"], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="split must be one of"):
        dm.summaries("training")


def test_token_sample_is_a_seeded_uniform_draw_of_the_split_tokens(ramp_dir, monkeypatch):
    def summary(**kwargs):
        dm = HiddenPairDataModule(str(ramp_dir), val_fraction=0.2, test_fraction=0.2, summary_tokens=5, **kwargs)
        dm.setup("fit")
        return dm, dm.summaries("train")

    dm, first = summary()
    all_tokens = torch.cat([_ramp_pre(int(s.split(":")[1]), RAMP_LENGTHS[int(s.split(":")[1])])
                            for s in dm.train_sample_ids])
    assert first.token_sample.shape == (5, DIM)
    rows = [int(((all_tokens == token).all(1)).nonzero()[0]) for token in first.token_sample]
    assert len(set(rows)) == 5  # distinct tokens of the split
    assert torch.equal(summary()[1].token_sample, first.token_sample)  # fixed seed

    monkeypatch.setattr(shard_dataset, "CHUNK_BYTES", 4 * DIM * 2)  # two rows per chunk: same result
    chunked = summary()[1]
    assert torch.equal(chunked.token_sample, first.token_sample)
    assert torch.equal(chunked.pooled, first.pooled) and torch.equal(chunked.token_mean, first.token_mean)
