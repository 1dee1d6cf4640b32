"""`llm-trm evaluate`: held-out selection, summaries, report files, and the CLI on tiny and embedded models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from llm_trm.cli import main as cli_main
from llm_trm.data.shards import ShardWriter, read_index
from llm_trm.errors import DataError
from llm_trm.evaluate import (
    PLOT_PNG,
    RESULTS_CSV,
    RESULTS_JSON,
    SUMMARY_CSV,
    add_speedups,
    build_parser,
    held_out_problems,
    summarize,
)
from llm_trm.inference import AnswerResult, wilson_interval
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.trm import SequenceTRM

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [f"Tom has {n} apples and eats one. How many are left?" for n in range(2, 12)]


@pytest.fixture()
def problem_file(tmp_path) -> Path:
    """A local problem source with gold answers: ids read "toy:<line>"."""
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": str(n - 1)}) + "\n"
                            for q, n in zip(QUESTIONS, range(2, 12))))
    return path


def write_shard_index(directory: Path, sample_ids: list[str], prompts: list[str], split: str | None = None) -> Path:
    """A datagen shard directory written by the real ShardWriter (two samples a shard, tiny states)."""
    config = {"backbone": "tiny", "layer": -1, **({"split": split} if split is not None else {})}
    with ShardWriter(directory, config, shard_size=2, dtype="float32") as writer:
        for sample_id, prompt in zip(sample_ids, prompts):
            record = {"sample_id": sample_id, "problem": prompt, "thinking": "t", "answer": "a", "gold_answer": "1",
                      "correct": False, "closed_thinking": True, "token_ids": [1, 2, 3], "pre_length": 2,
                      "post_position": 2}
            writer.add(torch.randn(2, 8), torch.randn(8), 1, record)
    return directory


# ------------------------------------------------------------------------------ held-out problems


def test_held_out_selection_excludes_every_trained_problem(problem_file, tmp_path):
    source = f"jsonl:{problem_file}"
    everything = held_out_problems(source, "test", 10)
    trained_by_id = ["toy:0", "toy:2", "toy:3"]
    trained_by_prompt = [everything[5].prompt]  # the same problem under another id
    shards = write_shard_index(tmp_path / "pairs", trained_by_id + ["toy:99"], ["x", "y", "z", trained_by_prompt[0]])

    held_out = held_out_problems(source, "test", 4, exclude_from=shards)
    ids = [p.sample_id for p in held_out]
    assert ids == ["toy:1", "toy:4", "toy:6", "toy:7"]  # refilled up to num_samples, in order
    assert not set(ids) & set(trained_by_id) and "toy:5" not in ids


def test_held_out_selection_ignores_ids_of_another_split(problem_file, tmp_path):
    """Sample ids do not name their split: train:0 is not test:0, but the same prompt text is the same problem."""
    source = f"jsonl:{problem_file}"
    everything = held_out_problems(source, "test", 10)
    shards = write_shard_index(tmp_path / "pairs", ["toy:0", "toy:1"], ["other", everything[3].prompt], split="train")
    ids = [p.sample_id for p in held_out_problems(source, "test", 4, exclude_from=shards)]
    assert ids == ["toy:0", "toy:1", "toy:2", "toy:4"]
    same_split = write_shard_index(tmp_path / "same", ["toy:0", "toy:1"], ["a", "b"], split="test")
    assert [p.sample_id for p in held_out_problems(source, "test", 2, exclude_from=same_split)] == ["toy:2", "toy:3"]


def test_unreadable_records_are_an_error_not_a_silent_id_only_exclusion(problem_file, tmp_path):
    source = f"jsonl:{problem_file}"
    everything = held_out_problems(source, "test", 10)
    shards = write_shard_index(tmp_path / "pairs", ["other:0", "other:1", "other:2"],
                               ["a", everything[0].prompt, "b"])
    assert "toy:0" not in [p.sample_id for p in held_out_problems(source, "test", 10, exclude_from=shards)]
    records = shards / read_index(shards)[-1].records_file
    records.write_text("{not json\n")
    with pytest.raises(DataError, match=r"cannot read the records .* cannot be excluded by prompt text: "
                                        r"check them with `llm-trm datagen --verify"):
        held_out_problems(source, "test", 4, exclude_from=shards)
    records.unlink()
    with pytest.raises(DataError, match="cannot read the records"):
        held_out_problems(source, "test", 4, exclude_from=shards)


def test_held_out_selection_errors(problem_file, tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        held_out_problems(f"jsonl:{problem_file}", "test", 2, exclude_from=tmp_path / "missing")
    shards = write_shard_index(tmp_path / "all", [f"toy:{i}" for i in range(10)], [""] * 10)
    with pytest.raises(DataError, match="no held-out problems"):
        held_out_problems(f"jsonl:{problem_file}", "test", 2, exclude_from=shards)


# ------------------------------------------------------------------------------ summaries


def test_summary_counts_failures_as_wrong_and_computes_speedups():
    def result(mode: str, correct: bool | None, ttfa: float, error: str | None = None) -> AnswerResult:
        return AnswerResult(sample_id="x", mode=mode, correct=correct, thinking_tokens=10 if mode == "cot" else 0,
                            answer_tokens=4, time_to_first_answer_token_s=ttfa, total_time_s=ttfa + 1, error=error)

    cot = summarize("cot", [result("cot", True, 4.0), result("cot", False, 4.0)])
    trm = summarize("trm", [result("trm", True, 1.0), result("trm", None, 0.0, error="does not fit")])
    add_speedups([cot, trm])
    assert (trm.correct, trm.checked, trm.failed, trm.accuracy) == (1, 2, 1, 0.5)
    assert (trm.ci_low, trm.ci_high) == pytest.approx(wilson_interval(1, 2))
    assert trm.mean_time_to_answer_s == 1.0  # only answered problems are timed
    assert trm.speedup_vs_cot == pytest.approx(4.0) and cot.speedup_vs_cot == pytest.approx(1.0)
    assert cot.mean_generated_tokens == 14


# ------------------------------------------------------------------------------ the command


def save_latent_parts(tmp_path: Path, backbone_id: str, d_model: int, d_compressed: int = 16) -> tuple[Path, Path]:
    torch.manual_seed(0)
    compressor = DimensionCompressor(d_model, d_compressed)
    compressor_dir = compressor.save_pretrained(tmp_path / "compressor", {"backbone": backbone_id, "layer": -1})
    trm = SequenceTRM(d_compressed, n_layers=1, n_heads=2, n_latent_steps=1, n_deep_recursions=1, n_supervision_steps=2)
    trm_dir = trm.save_pretrained(tmp_path / "trm", {"backbone": backbone_id, "layer": -1, "d_model": d_model})
    return compressor_dir, trm_dir


def write_config(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def check_report(output_dir: Path, modes: list[str], problems: int) -> dict:
    payload = json.loads((output_dir / RESULTS_JSON).read_text())
    assert [s["mode"] for s in payload["summary"]] == modes
    assert all(len(payload["results"][mode]) == problems for mode in modes)
    with open(output_dir / SUMMARY_CSV) as handle:
        summary_rows = list(csv.DictReader(handle))
    assert [row["mode"] for row in summary_rows] == modes and "ci_low" in summary_rows[0]
    with open(output_dir / RESULTS_CSV) as handle:
        assert len(list(csv.DictReader(handle))) == problems * len(modes)
    assert (output_dir / PLOT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((output_dir / "tensorboard").glob("events.out.tfevents.*"))
    return payload


def test_evaluate_command_writes_a_report_that_parses(tiny_backbone_dir, problem_file, tmp_path, capsys):
    from llm_trm.backbone import backbone_id

    compressor_dir, trm_dir = save_latent_parts(tmp_path, backbone_id(str(tiny_backbone_dir)), d_model=64)
    shards = write_shard_index(tmp_path / "pairs", ["toy:0"], ["x"])
    # one problem far too long for the 512-token context: counted, and the report is still written
    long_file = tmp_path / "toy.jsonl"
    long_file.write_text(problem_file.read_text().replace(QUESTIONS[2], "apples " * 600))
    modes = ["cot", "no_think", "trm", "trm_first_token"]
    config = write_config(
        tmp_path / "eval.yaml", backbone=str(tiny_backbone_dir), compressor=str(compressor_dir), trm=str(trm_dir),
        datasets=f"jsonl:{long_file}", split="test", num_samples=3, exclude_from=str(shards), modes=modes,
        batch_size=2, max_new_tokens=3, max_thinking_tokens=2, dtype="float32", device="cpu",
        output_dir=str(tmp_path / "report"), progress=False,
    )

    assert cli_main(["evaluate", "--config", str(config)]) == 0

    payload = check_report(tmp_path / "report", modes, problems=3)
    assert payload["config"]["problems"] == ["toy:1", "toy:2", "toy:3"]
    for summary in payload["summary"]:
        assert summary["failed"] == 1 and summary["checked"] == 3
    assert "does not fit the context" in payload["results"]["trm"][1]["error"]
    printed = capsys.readouterr().out
    assert "speed-up vs cot" in printed and "trm_first_token" in printed


def test_trm_modes_without_a_trm_are_refused(problem_file, tmp_path):
    config = build_parser().parse_args(["--datasets", f"jsonl:{problem_file}", "--modes", "[no_think, trm]",
                                        "--output_dir", str(tmp_path)])
    from llm_trm.evaluate import evaluate

    with pytest.raises(DataError, match="need `compressor` and `trm`"):
        evaluate(config)


@pytest.mark.parametrize("path", ["configs/eval/gsm8k.yaml", "configs/demo/evaluate.yaml"])
def test_shipped_configs_parse(path):
    config = build_parser().parse_args(["--config", str(ROOT / path)])
    assert config.modes == ["cot", "no_think", "trm", "trm_first_token"]
    assert config.exclude_from and config.compressor and config.trm


# ------------------------------------------------------------------------------ the embedded model


@pytest.mark.slow
def test_end_to_end_on_the_embedded_model(tmp_path):
    """Two gsm_symbolic problems on SmolLM2-135M with a random compressor (D=576) and TRM, every mode."""
    compressor_dir, trm_dir = save_latent_parts(tmp_path, "embedded", d_model=576, d_compressed=64)
    modes = ["cot", "no_think", "trm", "trm_first_token"]
    config = write_config(
        tmp_path / "eval.yaml", backbone="embedded", compressor=str(compressor_dir), trm=str(trm_dir),
        datasets="gsm_symbolic", split="test", num_samples=2, modes=modes, batch_size=2, max_new_tokens=12,
        max_thinking_tokens=12, dtype="float32", device="cpu", output_dir=str(tmp_path / "report"), progress=False,
    )
    assert cli_main(["evaluate", "--config", str(config)]) == 0
    payload = check_report(tmp_path / "report", modes, problems=2)
    for summary in payload["summary"]:
        assert summary["failed"] == 0 and summary["checked"] == 2
        assert summary["mean_answer_tokens"] > 0
    cot = next(s for s in payload["summary"] if s["mode"] == "cot")
    assert cot["mean_thinking_tokens"] > 0
    for row in payload["results"]["trm"]:
        assert 1 <= row["trm_steps"] <= 2 and row["answer_text"].strip()
