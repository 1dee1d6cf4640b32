"""Phase 2 datagen: generation post-processing, state positions, the CLI, resume and verification.

Most tests use the tiny random SmolLM3 (hidden 64) whose tokenizer has single-token think
tags; problems come from small local JSONL files. One slow test runs the embedded model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LogitsProcessor

from llm_trm import cli
from llm_trm.backbone import THINK_CLOSE, THINK_OPEN, load_backbone
from llm_trm.data.problem_datamodule import ProblemDataModule
from llm_trm.data.problems import load_problems
from llm_trm.data.shards import HiddenPairDataset, ShardIndexError, count_records, iter_records, read_index, verify_shards
from llm_trm.datagen import build_parser, expand_seed_flags, format_summary
from llm_trm.errors import ConfigMismatchError, DataError, LLMTRMError
from llm_trm.modules.datagen import (
    DatagenBatch,
    DatagenModule,
    DatagenStats,
    DatagenSummary,
    HiddenPair,
    progress_postfix,
    write_tensorboard,
)
from llm_trm.thinking import CLOSE_SUFFIX, close_suffix_ids

REPO = Path(__file__).resolve().parents[1]

MATH_ROWS = [
    {"question": "What is 3 + 4?", "answer": "7"},
    {"question": "Natalia sold 48 clips in April and half as many in May. How many clips in total?", "answer": "72"},
    {"question": "What is 2 * 5?", "answer": "10"},
    {"question": "Weng earns $12 an hour. How much for 2 hours?", "answer": "24"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def math_jsonl(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "mathp.jsonl", MATH_ROWS)


def tiny_module(backbone_dir: Path, **overrides) -> DatagenModule:
    settings = {"max_new_tokens": 6, "max_answer_tokens": 3} | overrides
    return DatagenModule(backbone=str(backbone_dir), **settings)


def recompute(backbone_dir: Path, token_ids: list[int]) -> torch.Tensor:
    """Final-layer states of an unpadded, separate forward pass over a record's token ids."""
    llm = load_backbone(str(backbone_dir))
    ids = torch.tensor([token_ids])
    return llm.hidden_states(ids, torch.ones_like(ids), -1)[0]


def datagen_args(backbone: Path, dataset: str, output_dir: Path, **overrides) -> list[str]:
    options = {
        "model.backbone": str(backbone),
        "model.max_new_tokens": 6,
        "model.max_answer_tokens": 3,
        "data.dataset": dataset,
        "data.num_samples": 4,
        "data.batch_size": 2,
        "writer.output_dir": str(output_dir),
        "writer.checkpoint_every": 3,
        "trainer.accelerator": "cpu",
        "trainer.devices": 1,
        "trainer.enable_progress_bar": "false",
    } | overrides
    return [part for key, value in options.items() for part in (f"--{key}", str(value))]


def run_datagen(*args: str) -> int:
    return cli.main(["datagen", *args])


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of every event file under log_dir: tag -> [(step, value)] in write order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return scalars


# --------------------------------------------------------------------------- the module


def test_pairs_have_the_documented_shapes_and_positions(tiny_backbone_dir, math_jsonl):
    module = tiny_module(tiny_backbone_dir)
    problems = load_problems(f"jsonl:{math_jsonl}", num_samples=3)
    batch = module.predict_step(problems, 0)
    tokenizer = module.tokenizer
    open_id, close_id = tokenizer.convert_tokens_to_ids([THINK_OPEN, THINK_CLOSE])

    assert [pair.record["sample_id"] for pair in batch.pairs] == ["mathp:0", "mathp:1", "mathp:2"]
    assert len({len(pair.record["token_ids"]) for pair in batch.pairs}) > 1  # padding was exercised
    for pair in batch.pairs:
        record = pair.record
        ids = record["token_ids"]
        assert pair.pre.shape == (record["pre_length"], 64) and pair.post.shape == (64,)
        assert ids[record["pre_length"] - 1] == open_id  # pre ends with the opening tag
        # ... and the thinking ends with the closing suffix "</think>\n": post is its last token
        assert record["post_position"] == len(ids) - 1 and ids[-2:] == close_suffix_ids(tokenizer)
        assert ids[-2] == close_id
        # the "\n" after <think>, the thinking, the closing suffix
        assert len(ids) == record["pre_length"] + 1 + record["num_thinking_tokens"] + len(close_suffix_ids(tokenizer))
        # a separate, unpadded forward pass gives the same states
        states = recompute(tiny_backbone_dir, ids)
        torch.testing.assert_close(pair.post, states[record["post_position"]], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pair.pre, states[: record["pre_length"]], atol=1e-4, rtol=1e-4)
        assert set(record) >= {"thinking", "answer", "gold_answer", "correct", "closed_thinking", "dataset"}
        assert record["correct"] in (True, False)


class CloseThinkingAt(LogitsProcessor):
    """Forces the closing tag as row 0's `step`-th generated token (other rows untouched)."""

    def __init__(self, close_id: int, step: int) -> None:
        self.close_id, self.step, self.start = close_id, step, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.start = input_ids.shape[1] if self.start is None else self.start
        if input_ids.shape[1] - self.start == self.step:
            scores[0] = float("-inf")
            scores[0, self.close_id] = 0.0
        else:
            scores[:, self.close_id] = float("-inf")  # the random model must not close by chance
        return scores


def test_early_stop_per_sequence_and_forced_close(tiny_backbone_dir, math_jsonl, monkeypatch):
    module = tiny_module(tiny_backbone_dir, max_new_tokens=8)
    close_id = module.tokenizer.convert_tokens_to_ids(THINK_CLOSE)
    monkeypatch.setattr(module, "_extra_logits_processors", lambda: [CloseThinkingAt(close_id, step=3)])
    batch = module.predict_step(load_problems(f"jsonl:{math_jsonl}", num_samples=2), 0)
    closed, forced = (pair.record for pair in batch.pairs)

    assert closed["closed_thinking"] is True and closed["num_thinking_tokens"] == 3
    assert THINK_CLOSE not in closed["thinking"]
    assert forced["closed_thinking"] is False and forced["num_thinking_tokens"] <= 8
    assert module.stats.forced_closes == 1 and module.stats.generated == 2
    for pair in batch.pairs:  # both end with exactly one canonical closing tag
        ids = pair.record["token_ids"]
        assert ids[-2:] == close_suffix_ids(module.tokenizer) and ids.count(close_id) == 1
        states = recompute(tiny_backbone_dir, pair.record["token_ids"])
        torch.testing.assert_close(pair.post, states[-1], atol=1e-4, rtol=1e-4)


def test_problem_longer_than_the_context_window_is_skipped_and_counted(tiny_backbone_dir, tmp_path):
    rows = [MATH_ROWS[0], {"question": "Count: " + "1 2 3 4 5 6 7 8 9 10 " * 20, "answer": "1"}, MATH_ROWS[2]]
    problems = load_problems(f"jsonl:{write_jsonl(tmp_path / 'mixed.jsonl', rows)}")
    module = tiny_module(tiny_backbone_dir, max_context_tokens=200)
    batch = module.predict_step(problems, 0)

    assert batch.skipped_too_long == ["mixed:1"]
    assert [pair.record["sample_id"] for pair in batch.pairs] == ["mixed:0", "mixed:2"]
    assert module.stats.skipped_too_long == 1 and module.stats.generated == 2
    assert all(len(pair.record["token_ids"]) + 3 <= 200 for pair in batch.pairs)


def test_problem_datamodule_mixes_sources_and_skips_done_ids(tmp_path, math_jsonl):
    other = write_jsonl(tmp_path / "other.jsonl", [{"question": "1 + 1?", "answer": "2"}] * 3)
    datamodule = ProblemDataModule(dataset=f"jsonl:{math_jsonl}, jsonl:{other}", num_samples=5, batch_size=2)
    datamodule.skip_ids({"other:0"})
    batches = list(datamodule.predict_dataloader())
    ids = [problem.sample_id for batch in batches for problem in batch]
    assert ids == ["mathp:0", "mathp:1", "other:1", "mathp:2"]
    assert [len(batch) for batch in batches] == [2, 2]
    assert datamodule.datagen_settings()["datasets"] == [f"jsonl:{math_jsonl}", f"jsonl:{other}"]


# --------------------------------------------------------------------------- the command


def test_cli_writes_mixed_shards_that_verify_and_resume_skips_them(tiny_backbone_dir, tmp_path, math_jsonl, capsys):
    other = write_jsonl(tmp_path / "other.jsonl", [{"question": "1 + 1?", "answer": "2"}] * 2)
    out = tmp_path / "pairs"
    args = datagen_args(tiny_backbone_dir, f"jsonl:{math_jsonl},jsonl:{other}", out)
    assert run_datagen(*args) == 0

    records = list(iter_records(out))
    assert [r["sample_id"] for r in records] == ["mathp:0", "other:0", "mathp:1", "other:1"]
    assert {r["dataset"] for r in records} == {"mathp", "other"}
    assert [info.num_samples for info in read_index(out)] == [3, 1]  # checkpoint_every 3
    assert verify_shards(out).ok
    config = json.loads((out / "datagen_config.json").read_text())
    assert config["max_new_tokens"] == 6 and config["hidden_size"] == 64 and config["layer"] == -1
    assert config["datasets"] == [f"jsonl:{math_jsonl}", f"jsonl:{other}"]
    summary = capsys.readouterr().out
    assert "samples written     4" in summary and "forced closes" in summary and str(out) in summary
    # the closed share, per run and per dataset, as the records say, in the summary and in TensorBoard
    counts = count_records(records)
    closed = sum(c.closed for c in counts.values())
    assert f"closed thinking     {100 * closed / 4:.1f}% ({closed} / 4) closed by the LLM itself" in summary
    for name in ("mathp", "other"):
        assert f"    {name}: {counts[name].describe()}" in summary
    scalars = tensorboard_scalars(out / "tensorboard")
    assert scalars["datagen/closed_share/mathp"] == [(4, pytest.approx(counts["mathp"].closed_share))]
    assert scalars["datagen/samples/_all"] == [(4, 4.0)]

    # stored bf16 states match a fresh forward pass on the stored token ids
    dataset = HiddenPairDataset(out, dtype="float32")
    for index, record in enumerate(records):
        item = dataset[index]
        states = recompute(tiny_backbone_dir, record["token_ids"])
        torch.testing.assert_close(item["post"], states[record["post_position"]], atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(item["pre"], states[: record["pre_length"]], atol=2e-2, rtol=2e-2)

    # a rerun finds every sample done and writes nothing
    assert run_datagen(*args) == 0
    assert "samples written     0   (in output: 4)" in capsys.readouterr().out
    assert len(list(iter_records(out))) == 4


def test_the_last_m_thinking_states_are_stored_and_verify(tiny_backbone_dir, tmp_path, math_jsonl):
    out = tmp_path / "pairs"
    assert run_datagen(*datagen_args(tiny_backbone_dir, f"jsonl:{math_jsonl}", out, **{"model.num_post_states": 3})) == 0
    assert verify_shards(out).ok
    assert json.loads((out / "datagen_config.json").read_text())["num_post_states"] == 3
    dataset = HiddenPairDataset(out, dtype="float32")
    for index, record in enumerate(iter_records(out)):
        item = dataset[index]
        states = recompute(tiny_backbone_dir, record["token_ids"])
        # the states of the closing tag's last token and the two positions before it, in order
        assert item["post_states"].shape == (3, 64) and torch.equal(item["post_states"][-1], item["post"])
        torch.testing.assert_close(item["post_states"], states[-3:], atol=2e-2, rtol=2e-2)


def test_resume_with_a_different_config_is_an_error_naming_the_key(tiny_backbone_dir, tmp_path, math_jsonl):
    out = tmp_path / "pairs"
    run_datagen(*datagen_args(tiny_backbone_dir, f"jsonl:{math_jsonl}", out, **{"data.num_samples": 2}))
    with pytest.raises(ConfigMismatchError, match=r"max_new_tokens: 6 -> 7"):
        run_datagen(*datagen_args(tiny_backbone_dir, f"jsonl:{math_jsonl}", out,
                                  **{"data.num_samples": 2, "model.max_new_tokens": 7}))
    # --no_auto_resume starts fresh and moves the old output aside, never deleting it
    args = datagen_args(tiny_backbone_dir, f"jsonl:{math_jsonl}", out,
                        **{"data.num_samples": 2, "model.max_new_tokens": 7})
    assert run_datagen(*args, "--no_auto_resume") == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("pairs.old-")]
    assert len(moved) == 1 and (moved[0] / "index.json").is_file()
    assert json.loads((out / "datagen_config.json").read_text())["max_new_tokens"] == 7


def test_verify_detects_a_corrupted_shard(tiny_backbone_dir, tmp_path, math_jsonl, capsys):
    out = tmp_path / "pairs"
    run_datagen(*datagen_args(tiny_backbone_dir, f"jsonl:{math_jsonl}", out, **{"data.num_samples": 2}))
    capsys.readouterr()
    assert run_datagen("--verify", str(out)) == 0
    assert "1 shards, 2 samples" in capsys.readouterr().out

    shard = out / read_index(out)[0].file
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert run_datagen("--verify", str(out)) == 1
    assert "sha256 mismatch" in capsys.readouterr().out


def test_verify_reports_the_closed_share_per_dataset(tiny_backbone_dir, tmp_path, math_jsonl, capsys):
    out = tmp_path / "pairs"
    run_datagen(*datagen_args(tiny_backbone_dir, f"jsonl:{math_jsonl}", out, **{"data.num_samples": 3}))
    records = list(iter_records(out))
    records[1]["closed_thinking"] = True  # one closed, whatever the random model did
    records[0]["closed_thinking"] = records[2]["closed_thinking"] = False
    rewrite_records(out, records)
    capsys.readouterr()
    assert run_datagen("--verify", str(out)) == 0
    report = capsys.readouterr().out
    assert "3 samples, closed its thinking 1/3 (33.3%)" in report and "mathp: " in report


def rewrite_records(out: Path, records: list[dict]) -> None:
    """Replace the records of a one-shard output and fix its index entry (an intact, edited output)."""
    info = read_index(out)[0]
    path = out / info.records_file
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    index = json.loads((out / "index.json").read_text())
    index["shards"][0]["records_num_bytes"] = path.stat().st_size
    index["shards"][0]["records_sha256"] = __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    (out / "index.json").write_text(json.dumps(index))


# --------------------------------------------------------------------------- resume never deletes


def test_rerun_without_index_keeps_every_shard_and_duplicates_nothing(tiny_backbone_dir, tmp_path, math_jsonl, capsys):
    out = tmp_path / "pairs"
    args = datagen_args(tiny_backbone_dir, f"jsonl:{math_jsonl}", out, **{"writer.checkpoint_every": 2})
    run_datagen(*args)
    shards = {p.name: p.read_bytes() for p in out.glob("shard-*")}
    assert len(shards) == 4
    (out / "index.json").unlink()
    capsys.readouterr()

    assert run_datagen(*args) == 0
    summary = capsys.readouterr().out
    assert "samples written     0   (in output: 4)" in summary
    assert "index               was missing: rebuilt from the shards that verify" in summary
    for name, content in shards.items():
        assert (out / name).read_bytes() == content
    ids = [record["sample_id"] for record in iter_records(out)]
    assert sorted(ids) == [f"mathp:{i}" for i in range(4)]
    assert verify_shards(out).ok


def test_bit_flipped_shard_is_moved_aside_and_its_samples_generated_again_once(
        tiny_backbone_dir, tmp_path, math_jsonl, capsys):
    out = tmp_path / "pairs"
    args = datagen_args(tiny_backbone_dir, f"jsonl:{math_jsonl}", out, **{"writer.checkpoint_every": 2})
    run_datagen(*args)
    first = read_index(out)[0]
    shard = out / first.file
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x10
    shard.write_bytes(bytes(data))
    capsys.readouterr()

    assert run_datagen(*args) == 0
    summary = capsys.readouterr().out
    assert "samples written     2   (in output: 4)" in summary
    assert "set aside           2 file(s) this run could not account for, moved (not deleted)" in summary
    aside = [p for p in out.iterdir() if p.is_dir() and p.name.startswith("aside-r00-")]
    assert len(aside) == 1 and (aside[0] / first.file).read_bytes() == bytes(data)
    ids = [record["sample_id"] for record in iter_records(out)]
    assert sorted(ids) == [f"mathp:{i}" for i in range(4)]  # regenerated exactly once
    assert sorted(first.sample_ids) == ["mathp:0", "mathp:1"] and verify_shards(out).ok


@pytest.mark.parametrize("name", ["index.json", "datagen_config.json"])
def test_truncated_index_or_config_is_one_line_on_resume_and_in_verify(
        tiny_backbone_dir, tmp_path, math_jsonl, capsys, name):
    out = tmp_path / "pairs"
    args = datagen_args(tiny_backbone_dir, f"jsonl:{math_jsonl}", out, **{"data.num_samples": 2})
    run_datagen(*args)
    (out / name).write_text((out / name).read_text()[:30])
    capsys.readouterr()
    with pytest.raises(ShardIndexError):
        run_datagen(*args)
    err = capsys.readouterr().err.strip()
    assert err.startswith("llm-trm: error: ") and "\n" not in err and "Traceback" not in err
    assert f"{out / name} is truncated or not valid JSON" in err
    assert run_datagen("--verify", str(out)) == 1
    assert f"{out / name} is truncated or not valid JSON" in capsys.readouterr().out


# --------------------------------------------------------------------------- counts per dataset


def _pair(sample_id: str, closed: bool | None, correct: bool | None, tokens: int) -> HiddenPair:
    dataset = sample_id.split(":")[0]
    record = {"sample_id": sample_id, "dataset": dataset, "closed_thinking": closed, "correct": correct,
              "num_thinking_tokens": tokens}
    return HiddenPair(torch.zeros(1, 4), torch.zeros(4), record)


def test_datagen_stats_count_per_dataset_and_sum_over_ranks(tmp_path):
    stats = DatagenStats()
    stats.add(DatagenBatch(pairs=[_pair("gsm8k:0", True, True, 10), _pair("gsm8k:1", False, False, 30),
                                  _pair("mbpp:0", True, None, 5)], skipped_too_long=["mbpp:7"]))
    stats.add(DatagenBatch(pairs=[_pair("gsm8k:2", True, False, 20)]))
    gsm8k, mbpp = stats.per_dataset["gsm8k"], stats.per_dataset["mbpp"]
    assert (gsm8k.samples, gsm8k.closed, gsm8k.correct, gsm8k.checked, gsm8k.thinking_tokens) == (3, 2, 1, 3, 60)
    assert (mbpp.samples, mbpp.closed, mbpp.checked, mbpp.skipped_too_long) == (1, 1, 0, 1)
    assert (stats.generated, stats.forced_closes, stats.skipped_too_long) == (4, 1, 1)
    assert stats.closed_share == 0.75 and stats.accuracy == 1 / 3

    two_ranks = SimpleNamespace(root_device=torch.device("cpu"), world_size=1,
                                reduce=lambda values, reduce_op: 2 * values)  # as if a second rank had the same
    summed = stats.summed_over_ranks(two_ranks)
    assert summed.per_dataset["gsm8k"].closed == 4 and summed.generated == 8 and summed.closed_share == 0.75

    postfix = progress_postfix(stats, elapsed=2.0)
    assert postfix["closed"] == "3/4" and postfix["closed by dataset"] == "gsm8k 67% mbpp 100%"
    assert postfix["samples/s"] == "2.00" and postfix["think tok/s"] == "32.5"

    summary = DatagenSummary(stats=stats, written=4, total_in_output=9, output_dir=str(tmp_path))
    text = format_summary(summary, 2.0)
    assert "closed thinking     75.0% (3 / 4) closed by the LLM itself" in text
    assert "    gsm8k: 3 samples, closed its thinking 2/3 (66.7%), accuracy 1/3 (33.3%), 20.0 thinking tokens" in text
    assert "    mbpp: 1 samples, closed its thinking 1/1 (100.0%), accuracy n/a" in text

    scalars = tensorboard_scalars(write_tensorboard(summary))
    assert scalars["datagen/closed_share/gsm8k"] == [(9, pytest.approx(2 / 3))]
    assert scalars["datagen/closed_share/_all"] == [(9, 0.75)]
    assert scalars["datagen/accuracy/gsm8k"] == [(9, pytest.approx(1 / 3))]
    assert "datagen/accuracy/mbpp" not in scalars  # nothing checked: no number rather than a made-up one
    assert scalars["datagen/thinking_tokens_per_sample/gsm8k"] == [(9, 20.0)]


def test_unknown_dataset_is_a_one_line_error(tiny_backbone_dir, tmp_path, capsys):
    with pytest.raises(DataError, match="known sources: gsm8k") as caught:
        run_datagen(*datagen_args(tiny_backbone_dir, "gsm8k,no_such_set", tmp_path / "pairs"))
    assert isinstance(caught.value, LLMTRMError) and "\n" not in str(caught.value)
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert not (tmp_path / "pairs").exists()  # nothing was written


def test_seed_format_round_trip_through_the_cli(tiny_backbone_dir, tmp_path, math_jsonl):
    out = tmp_path / "pairs"
    run_datagen(*datagen_args(tiny_backbone_dir, f"jsonl:{math_jsonl}", out, **{"data.num_samples": 3}))
    pt = tmp_path / "hidden_pairs.pt"
    assert run_datagen("--export-seed", str(out), "--output", str(pt)) == 0
    seed = torch.load(pt, weights_only=True)
    assert len(seed["hidden_pre"]) == 3 and seed["hidden_post"].shape == (3, 64) and seed["hidden_size"] == 64

    imported = tmp_path / "imported"
    assert run_datagen("--import-seed", str(pt), "--output_dir", str(imported), "--checkpoint_every", "2") == 0
    assert verify_shards(imported).ok
    original, copy = HiddenPairDataset(out), HiddenPairDataset(imported)
    assert len(copy) == 3
    for index in range(3):
        assert torch.equal(original[index]["post"], copy[index]["post"])
        assert torch.equal(original[index]["pre"], copy[index]["pre"])


def test_shipped_configs_and_seed_flags_parse():
    parser = build_parser()
    real = parser.parse_args(["--config", str(REPO / "configs/phase2/datagen.yaml")])
    assert real.model.backbone == "HuggingFaceTB/SmolLM3-3B" and real.data.dataset == "gsm8k"
    assert (real.data.num_samples, real.data.batch_size, real.model.max_new_tokens) == (1000, 4, 512)
    assert (real.writer.output_dir, real.writer.checkpoint_every, real.writer.auto_resume) == (
        "./data/hidden_pairs", 100, True)
    demo = parser.parse_args(["--config", str(REPO / "configs/demo/datagen.yaml")])
    assert demo.model.backbone == "embedded" and demo.data.dataset == "rg:chain_sum?max_terms=2&max_digits=1"
    assert (demo.model.max_new_tokens, demo.model.do_sample) == (64, False)

    seed_style = ["--config", str(REPO / "configs/phase2/datagen.yaml"), "--dataset", "gsm8k,mbpp",
                  "--num_samples=50", "--batch_size", "8", "--max_new_tokens", "64", "--output_dir", "x",
                  "--checkpoint_every", "10", "--no_auto_resume", "--trainer.devices", "2"]
    parsed = parser.parse_args(expand_seed_flags(seed_style))
    assert (parsed.data.dataset, parsed.data.num_samples, parsed.data.batch_size) == ("gsm8k,mbpp", 50, 8)
    assert (parsed.model.max_new_tokens, parsed.writer.output_dir, parsed.writer.checkpoint_every) == (64, "x", 10)
    assert parsed.writer.auto_resume is False and parsed.trainer.devices == 2


def _wait_for_first_shard(process: subprocess.Popen, out: Path, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (out / "index.json").exists():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no shard appeared"
        time.sleep(0.01)


def test_resume_after_kill_9_keeps_every_sample_exactly_once(tiny_backbone_dir, tmp_path, math_jsonl):
    total = 30
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(total)]
    dataset = f"jsonl:{write_jsonl(tmp_path / 'many.jsonl', rows)}"
    out = tmp_path / "pairs"
    args = datagen_args(tiny_backbone_dir, dataset, out, **{
        "data.num_samples": total, "writer.checkpoint_every": 2, "model.max_new_tokens": 24})
    command = [sys.executable, "-m", "llm_trm.cli", "datagen", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_first_shard(first, out)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    stored_after_kill = sum(info.num_samples for info in read_index(out))
    assert 0 < stored_after_kill < total, "the run was not interrupted mid-way"

    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    ids = [record["sample_id"] for record in iter_records(out)]
    assert sorted(ids) == sorted(f"many:{i}" for i in range(total))  # every id, exactly once
    assert verify_shards(out).ok
    assert not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_two_ddp_ranks_write_their_own_shards_and_resume_unevenly(tiny_backbone_dir, tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(5)]
    dataset = f"jsonl:{write_jsonl(tmp_path / 'five.jsonl', rows)}"
    out = tmp_path / "pairs"
    args = datagen_args(tiny_backbone_dir, dataset, out, **{
        "data.num_samples": 5, "data.batch_size": 1, "writer.checkpoint_every": 2,
        "trainer.devices": 2, "trainer.strategy": "ddp"})
    command = [sys.executable, "-m", "llm_trm.cli", "datagen", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "index.json").is_file() and (out / "index.rank1.json").is_file()
    assert {info.rank for info in read_index(out)} == {0, 1}
    assert "samples written     5" in first.stdout
    assert "    five: 5 samples, closed its thinking" in first.stdout  # per-dataset counts summed over both ranks

    # lose rank 0's last shard (1 sample): on resume rank 1 has nothing to do
    index = json.loads((out / "index.json").read_text())
    dropped = index["shards"].pop()
    assert dropped["num_samples"] == 1
    (out / "index.json").write_text(json.dumps(index))
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "samples written     1   (in output: 5)" in second.stdout
    # the shard whose entry was dropped is moved aside, not deleted
    assert "set aside           2 file(s)" in second.stdout
    assert sorted(p.name for p in out.glob("aside-r00-*/*")) == sorted([dropped["file"], dropped["records_file"]])
    ids = [record["sample_id"] for record in iter_records(out)]
    assert sorted(ids) == [f"five:{i}" for i in range(5)]
    assert verify_shards(out).ok


# --------------------------------------------------------------------------- the real embedded model


@pytest.mark.slow
def test_end_to_end_on_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "pairs"
    args = ["--config", str(REPO / "configs/demo/datagen.yaml"), "--data.num_samples", "2",
            "--model.max_new_tokens", "12", "--model.max_answer_tokens", "6",
            "--writer.output_dir", str(out), "--trainer.enable_progress_bar", "false"]
    assert run_datagen(*args) == 0
    records = list(iter_records(out))
    family = "rg:chain_sum?max_terms=2&max_digits=1"  # the demo's problems
    assert [r["sample_id"] for r in records] == [f"{family}:0", f"{family}:1"]
    assert verify_shards(out).ok
    assert "datagen summary" in capsys.readouterr().out

    llm = load_backbone("embedded", "float32")
    dataset = HiddenPairDataset(out, dtype="float32")
    for index, record in enumerate(records):
        assert llm.tokenizer.decode(record["token_ids"][: record["pre_length"]]).endswith(THINK_OPEN)
        assert llm.tokenizer.decode(record["token_ids"]).endswith(CLOSE_SUFFIX)
        assert dataset[index]["pre"].shape == (record["pre_length"], 576)
        ids = torch.tensor([record["token_ids"]])
        states = llm.hidden_states(ids, torch.ones_like(ids), -1)[0]
        expected = states[record["post_position"]]
        cosine = torch.nn.functional.cosine_similarity(dataset[index]["post"], expected, dim=0)
        assert cosine > 0.999
        torch.testing.assert_close(dataset[index]["post"], expected, atol=0.5, rtol=2e-2)
