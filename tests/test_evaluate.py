"""`llm-trm evaluate`: held-out selection, summaries, report files, and the CLI on tiny and embedded models."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from llm_trm.cli import main as cli_main
from llm_trm.data.shards import ShardWriter, read_index
from llm_trm.errors import DataError
from llm_trm.evaluate import (
    FIDELITY_PNG,
    PLOT_PNG,
    RESULTS_CSV,
    RESULTS_JSON,
    SUMMARY_CSV,
    add_fidelity,
    add_speedups,
    build_parser,
    check_modes,
    compare_with_cot,
    held_out_problems,
    markdown_table,
    summarize,
)
from llm_trm.data.problems import Problem
from llm_trm.eval.fidelity import share_recovered
from llm_trm.inference import MODES, AnswerResult, LatentReasoner, wilson_interval
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
    """The report's files exist and parse, with one summary per mode and one row per (mode, problem)."""
    payload = json.loads((output_dir / RESULTS_JSON).read_text())
    assert [s["mode"] for s in payload["summary"]] == modes
    assert all(len(payload["results"][mode]) == problems for mode in modes)
    with open(output_dir / SUMMARY_CSV) as handle:
        summary_rows = list(csv.DictReader(handle))
    assert [row["mode"] for row in summary_rows] == modes and "ci_low" in summary_rows[0]
    with open(output_dir / RESULTS_CSV) as handle:
        assert len(list(csv.DictReader(handle))) == problems * len(modes)
    assert (output_dir / PLOT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (output_dir / FIDELITY_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((output_dir / "tensorboard").glob("events.out.tfevents.*"))
    return payload


def tensorboard_tags(directory: Path) -> tuple[set[str], set[str]]:
    """(scalar tags, image tags) written under `directory`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"images": 0, "scalars": 0}).Reload()
    return set(events.Tags()["scalars"]), set(events.Tags()["images"])


def test_evaluate_command_writes_a_report_that_parses(tiny_backbone_dir, problem_file, tmp_path, capsys):
    from llm_trm.backbone import backbone_id

    compressor_dir, trm_dir = save_latent_parts(tmp_path, backbone_id(str(tiny_backbone_dir)), d_model=64)
    shards = write_shard_index(tmp_path / "pairs", ["toy:0"], ["x"])
    # one problem far too long for the 512-token context: counted, and the report is still written
    long_file = tmp_path / "toy.jsonl"
    long_file.write_text(problem_file.read_text().replace(QUESTIONS[2], "apples " * 600))
    modes = list(MODES)  # every mode: cot, no_think, the TRM modes and the oracles
    config = write_config(
        tmp_path / "eval.yaml", backbone=str(tiny_backbone_dir), compressor=str(compressor_dir), trm=str(trm_dir),
        datasets=f"jsonl:{long_file}", split="test", num_samples=3, exclude_from=str(shards), modes=modes,
        batch_size=2, max_new_tokens=3, max_thinking_tokens=2, dtype="float32", device="cpu",
        output_dir=str(tmp_path / "report"), progress=False, bootstrap_resamples=200,
    )

    assert cli_main(["evaluate", "--config", str(config)]) == 0

    payload = check_report(tmp_path / "report", modes, problems=3)
    assert payload["config"]["problems"] == ["toy:1", "toy:2", "toy:3"]
    summaries = {s["mode"]: s for s in payload["summary"]}
    for summary in summaries.values():
        assert summary["failed"] == 1 and summary["checked"] == 3 and summary["crashed"] == 0
        # the over-long problem has no first token in cot either: left out, not counted as missing
        assert (summary["kl_rows"], summary["kl_missing"], summary["first_token_rows"]) == (2, 0, 2)
        assert summary["kl_to_cot"] >= 0 and summary["kl_ci_low"] <= summary["kl_to_cot"] <= summary["kl_ci_high"]
    assert (summaries["cot"]["kl_to_cot"], summaries["cot"]["first_token_agreement"]) == (0.0, 1.0)
    assert summaries["cot"]["share_kl"] == 1.0 and summaries["no_think"]["share_kl"] == 0.0
    # the answer KL: cot's answer teacher-forced; cot's own is 0, trm_first_token is not scored
    assert summaries["cot"]["answer_kl"] == pytest.approx(0.0, abs=1e-6) and summaries["cot"]["answer_nll"] > 0
    assert summaries["cot"]["share_answer_kl"] == pytest.approx(1.0) and summaries["no_think"]["share_answer_kl"] == 0.0
    assert summaries["trm_first_token"]["answer_kl"] is None and summaries["trm_first_token"]["answer_kl_rows"] == 0
    for mode in ("no_think", "trm", "oracle", "oracle_full", "shuffled"):
        summary = summaries[mode]
        assert summary["answer_kl_rows"] == 2 and summary["answer_kl"] > 0 and summary["answer_nll"] > 0
        assert summary["answer_kl_ci_low"] <= summary["answer_kl"] <= summary["answer_kl_ci_high"]
        rows = payload["results"][mode]
        assert rows[1]["answer_kl_to_cot"] is None and all(rows[i]["answer_kl_to_cot"] > 0 for i in (0, 2))
        assert "answer_ids" not in rows[0]
    assert summaries["oracle"]["speedup_vs_cot"] is None and summaries["trm"]["speedup_vs_cot"] is not None
    assert "does not fit the context" in payload["results"]["trm"][1]["error"]
    for mode in modes:
        rows = payload["results"][mode]
        assert rows[1]["kl_to_cot"] is None and all(isinstance(rows[i]["kl_to_cot"], float) for i in (0, 2))
        assert "first_token_logits" not in rows[0]
    assert [r["state_source"] for r in payload["results"]["shuffled"]] == ["toy:3", None, "toy:1"]
    assert any("steady state" in note for note in payload["config"]["notes"])
    assert payload["config"]["warmup_s"] > 0

    scalars, images = tensorboard_tags(tmp_path / "report" / "tensorboard")
    assert {"eval/trm/kl_to_cot", "eval/oracle/share_kl", "eval/shuffled/first_token_agreement",
            "eval/cot/accuracy", "eval/trm/answer_kl", "eval/oracle/share_answer_kl",
            "eval/no_think/answer_nll"} <= scalars
    assert {"eval/fidelity_ladder", "eval/accuracy_vs_tokens"} <= images
    printed = capsys.readouterr().out
    assert "speed-up vs cot" in printed and "trm_first_token" in printed and "CoT fidelity" in printed
    assert "checker errors" in printed and "one continuous generation" in printed
    assert "answer NLL" in printed and "Answer KL: cot's own answer" in printed
    with open(tmp_path / "report" / SUMMARY_CSV) as handle:
        columns = set(next(csv.DictReader(handle)))
    assert {"answer_kl", "answer_nll", "share_answer_kl", "share_answer_kl_ci_low"} <= columns


# ------------------------------------------------------------------------------ modes, failures, warm-up


def test_bad_mode_lists_are_one_line_errors():
    with pytest.raises(DataError, match="modes lists trm more than once: list each mode once"):
        check_modes(["no_think", "trm", "trm"], has_trm=True)
    with pytest.raises(DataError, match="unknown or no modes \\['oracel'\\]"):
        check_modes(["oracel"], has_trm=True)
    with pytest.raises(DataError, match="oracle / shuffled send the true state through the compressor"):
        check_modes(["oracle"], has_trm=False, has_compressor=False)
    assert check_modes(["oracle_full", "oracle"], has_trm=False, has_compressor=True) == ["oracle_full", "oracle"]
    with pytest.raises(DataError, match="modes cot, shuffled need the LLM to think, but max_thinking_tokens is 0"):
        check_modes(["cot", "no_think", "shuffled"], has_trm=True, max_thinking_tokens=0)
    assert check_modes(["no_think", "trm"], has_trm=True, max_thinking_tokens=0) == ["no_think", "trm"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--modes", "[no_think, trm, trm]"], "modes lists trm more than once"),
    (["--modes", "[no_think, oracle_full]", "--max_thinking_tokens", "0"], "oracle_full need the LLM to think"),
])
def test_bad_modes_stop_the_command_before_anything_is_written(problem_file, tmp_path, capsys, extra, message):
    output_dir = tmp_path / "report"
    args = ["evaluate", "--datasets", f"jsonl:{problem_file}", "--compressor", "c", "--trm", "t",
            "--output_dir", str(output_dir), *extra]
    with pytest.raises(DataError, match=message):
        cli_main(args)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("llm-trm: error: ") and message in line
    assert not output_dir.exists()


def tiny_run(tmp_path: Path, backbone_dir: Path, problem_file: Path, modes: list[str], **values) -> Path:
    """A config for `llm-trm evaluate` on the tiny backbone with random parts, 2 problems, a few tokens."""
    from llm_trm.backbone import backbone_id

    compressor_dir, trm_dir = save_latent_parts(tmp_path, backbone_id(str(backbone_dir)), d_model=64)
    settings = dict(backbone=str(backbone_dir), compressor=str(compressor_dir), trm=str(trm_dir),
                    datasets=f"jsonl:{problem_file}", split="test", num_samples=2, modes=modes, batch_size=2,
                    max_new_tokens=3, max_thinking_tokens=3, dtype="float32", device="cpu",
                    output_dir=str(tmp_path / "report"), progress=False, bootstrap_resamples=100)
    return write_config(tmp_path / "eval.yaml", **{**settings, **values})


def test_a_crashing_mode_makes_the_command_fail_after_writing_the_report(tiny_backbone_dir, problem_file, tmp_path,
                                                                         monkeypatch, capsys):
    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(LatentReasoner, "latent_inputs", crash)
    config = tiny_run(tmp_path, tiny_backbone_dir, problem_file, ["cot", "no_think", "trm"])

    assert cli_main(["evaluate", "--config", str(config)]) == 1

    payload = check_report(tmp_path / "report", ["cot", "no_think", "trm"], problems=2)
    summaries = {s["mode"]: s for s in payload["summary"]}
    assert (summaries["trm"]["crashed"], summaries["trm"]["first_crash"]) == (2, "RuntimeError: boom")
    assert summaries["cot"]["crashed"] == summaries["no_think"]["crashed"] == 0
    assert summaries["trm"]["kl_missing"] == 2 and summaries["trm"]["kl_to_cot"] is None
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("llm-trm: error: mode(s) crashed: trm on 2 of 2 problems (RuntimeError: boom)")
    assert str(tmp_path / "report") in line


@pytest.mark.parametrize("warmup", [True, False])
def test_every_mode_is_warmed_up_before_any_mode_is_timed(tiny_backbone_dir, problem_file, tmp_path, monkeypatch,
                                                          warmup):
    calls = []
    real_answer = LatentReasoner.answer

    def recording_answer(self, problems, mode="trm", **kwargs):
        calls.append((mode, kwargs["max_new_tokens"], kwargs.get("capture_logits", False)))
        return real_answer(self, problems, mode=mode, **kwargs)

    monkeypatch.setattr(LatentReasoner, "answer", recording_answer)
    config = tiny_run(tmp_path, tiny_backbone_dir, problem_file, ["no_think", "trm", "cot", "oracle"], warmup=warmup)

    assert cli_main(["evaluate", "--config", str(config)]) == 0

    timed = [(mode, 3, True) for mode in ["cot", "no_think", "trm", "oracle"]]  # cot first: the reference
    warm = [(mode, 2, False) for mode in ["cot", "no_think", "trm", "oracle"]]
    assert calls == (warm + timed if warmup else timed)
    payload = json.loads((tmp_path / "report" / RESULTS_JSON).read_text())
    assert [s["mode"] for s in payload["summary"]] == ["no_think", "trm", "cot", "oracle"]  # the order asked for
    notes = " ".join(payload["config"]["notes"])
    assert ("every mode answered one warm-up batch" in notes) is warmup and ("No warm-up" in notes) is not warmup
    assert "cot is timed as a user of the LLM runs it: one continuous generation" in notes


# ------------------------------------------------------------------------------ CoT fidelity in the summary


def result(mode: str, index: int, **values) -> AnswerResult:
    return AnswerResult(sample_id=f"toy:{index}", mode=mode, **values)


def test_rows_are_compared_with_cot_by_answer_first_token_and_kl():
    def logits(*probabilities):
        return torch.tensor(probabilities).log()

    problems = [Problem(f"toy:{i}", "toy", i, "q", "1", "math") for i in range(3)]
    cot = [result("cot", 0, extracted_answer="12", first_token_logits=logits(0.5, 0.5), first_answer_token=0),
           result("cot", 1, extracted_answer=None, first_token_logits=logits(0.9, 0.1), first_answer_token=0),
           result("cot", 2, extracted_answer="4", first_token_logits=logits(0.9, 0.1), first_answer_token=0)]
    trm = [result("trm", 0, extracted_answer="12.0", first_token_logits=logits(0.25, 0.75), first_answer_token=1),
           result("trm", 1, extracted_answer="3", first_token_logits=None),  # wrote no answer
           result("trm", 2, extracted_answer="4", error="crashed", first_token_logits=None)]
    compare_with_cot(trm, cot, problems)
    assert trm[0].answer_agrees_with_cot is True and trm[0].first_token_agrees_with_cot is False
    assert trm[0].kl_to_cot == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert (trm[1].answer_agrees_with_cot, trm[1].kl_to_cot, trm[1].first_token_agrees_with_cot) == (None, None, None)
    assert trm[2].answer_agrees_with_cot is False  # a failed problem gave no answer
    compare_with_cot(cot, cot, problems)
    assert [r.kl_to_cot for r in cot] == [0.0, 0.0, 0.0] and all(r.first_token_agrees_with_cot for r in cot)


def test_fidelity_summary_matches_hand_values_when_accuracy_is_zero_everywhere():
    kl = {"cot": [0.0, 0.0, 0.0, 0.0], "no_think": [1.0, 2.0, 1.0, None], "trm": [0.5, 1.0, 0.5, 0.2]}
    agree = {"cot": [True] * 4, "no_think": [False, False, True, None], "trm": [True, False, True, False]}
    first = {"cot": [True] * 4, "no_think": [False, True, False, False], "trm": [True, True, False, True]}
    results = {mode: [result(mode, i, correct=False, kl_to_cot=kl[mode][i], answer_agrees_with_cot=agree[mode][i],
                             first_token_agrees_with_cot=first[mode][i]) for i in range(4)] for mode in kl}
    summaries = [summarize(mode, rows) for mode, rows in results.items()]
    add_fidelity(summaries, results, resamples=500, seed=0)
    cot, no_think, trm = summaries

    assert trm.answer_agreement == 0.5 and trm.answer_agreement_rows == 4
    assert (trm.answer_agreement_ci_low, trm.answer_agreement_ci_high) == pytest.approx(wilson_interval(2, 4))
    assert no_think.answer_agreement == pytest.approx(1 / 3) and no_think.answer_agreement_rows == 3
    assert trm.kl_to_cot == pytest.approx((0.5 + 1.0 + 0.5 + 0.2) / 4) and trm.kl_rows == 4
    assert no_think.kl_missing == 1 and trm.kl_missing == 0 and no_think.kl_rows == 3
    # shares over the problems where mode, no_think and cot are all defined (rows 0-2 for KL and answers)
    assert trm.share_kl == pytest.approx(((2 / 3) - (4 / 3)) / (0 - 4 / 3))  # 0.5
    assert trm.share_answer_agreement == pytest.approx(((2 / 3) - (1 / 3)) / (1 - 1 / 3))  # 0.5
    assert trm.share_first_token_agreement == pytest.approx((3 / 4 - 1 / 4) / (1 - 1 / 4))
    assert trm.share_kl == share_recovered(kl["trm"], kl["no_think"], kl["cot"], 500, 0).value
    assert (cot.share_kl, no_think.share_kl) == (1.0, 0.0)
    # accuracy 0 everywhere: no effect to recover, reported as undefined, not a division by zero
    assert all(s.accuracy == 0.0 and s.share_accuracy is None and s.share_accuracy_ci_low is None for s in summaries)
    table = markdown_table(summaries)
    assert "| trm | 0.50 [0.15, 0.85] |" in table and "| 0.55 [" in table  # answer agreement, mean KL


def test_answer_kl_summary_and_its_share_match_hand_values():
    # per problem, the mean KL(cot || mode) per answer token; None: cot wrote no answer (row 3), or not scored
    answer_kl = {"cot": [0.0, 0.0, 0.0, None], "no_think": [2.0, 4.0, 6.0, None], "trm": [1.0, 2.0, 3.0, None],
                 "trm_first_token": [None] * 4}
    nll = {"cot": [0.5, 0.7, 0.9, None], "no_think": [3.0, 3.0, 3.0, None], "trm": [1.0, 2.0, 6.0, None],
           "trm_first_token": [None] * 4}
    results = {mode: [result(mode, i, correct=False, kl_to_cot=0.1, answer_kl_to_cot=answer_kl[mode][i],
                             cot_answer_nll=nll[mode][i]) for i in range(4)] for mode in answer_kl}
    summaries = [summarize(mode, rows) for mode, rows in results.items()]
    add_fidelity(summaries, results, resamples=400, seed=0)
    cot, no_think, trm, first_token = summaries

    assert (trm.answer_kl, trm.answer_kl_rows) == (pytest.approx(2.0), 3) and trm.answer_nll == pytest.approx(3.0)
    assert trm.answer_kl_ci_low < 2.0 < trm.answer_kl_ci_high and 1.0 <= trm.answer_kl_ci_low
    assert trm.answer_kl_ci_high <= 3.0  # a mean of resampled values in [1, 3]
    assert (no_think.answer_nll, no_think.answer_nll_ci_low, no_think.answer_nll_ci_high) == (3.0, 3.0, 3.0)
    # (KL_no_think - KL_trm) / (KL_no_think - 0) = (4 - 2) / 4; trm's KL is half no_think's on every problem, so
    # every resample gives 1/2 too: the interval is [0.5, 0.5]
    assert (trm.share_answer_kl, trm.share_answer_kl_ci_low, trm.share_answer_kl_ci_high) == pytest.approx((0.5,) * 3)
    assert (cot.share_answer_kl, no_think.share_answer_kl) == (1.0, 0.0)
    assert first_token.answer_kl is None and first_token.share_answer_kl is None and first_token.answer_kl_rows == 0
    # the share's reference is 0 by definition, whatever cot's own computed value (0 up to rounding)
    results["cot"] = [result("cot", i, correct=False, kl_to_cot=0.0, answer_kl_to_cot=None) for i in range(4)]
    again = [summarize(mode, rows) for mode, rows in results.items()]
    add_fidelity(again, results, resamples=400, seed=0)
    assert again[2].share_answer_kl == pytest.approx(0.5) and again[0].answer_kl is None
    table = markdown_table(summaries)
    assert "answer KL | answer NLL |" in table and "share: answer KL |" in table
    assert "| trm | - | - | 0.1 [0.1, 0.1] | 0 | 2 [1, 3] | 3 |" in table  # answer KL [95% CI], answer NLL
    assert table.splitlines()[-1].endswith("| - |")  # trm_first_token: no answer KL share


def test_the_ladder_figure_shows_the_answer_kl_share_beside_the_first_token_one():
    from llm_trm.evaluate import plot_fidelity_ladder

    summaries = [summarize(mode, [result(mode, 0, correct=False)]) for mode in ("cot", "no_think", "trm")]
    for s, (kl, share, answer, answer_share) in zip(summaries, [(0.0, 1.0, 0.0, 1.0), (0.05, 0.0, 0.8, 0.0),
                                                                (0.01, 0.8, 0.6, 0.25)]):
        s.kl_to_cot, s.share_kl, s.answer_kl, s.share_answer_kl = kl, share, answer, answer_share
    figure = plot_fidelity_ladder(summaries)
    left, right = figure.axes
    labels = right.get_legend_handles_labels()[1]
    assert labels == ["first answer token", "whole answer (teacher-forced)"]

    def points(axes):  # (x, y) of every point drawn
        return sorted((round(float(line.get_xdata()[0]), 6), round(float(line.get_ydata()[0]), 6))
                      for line in axes.lines if len(line.get_xdata()) == 1)

    # the ladder order is no_think, trm, cot; the answer-level series sits just right of the first-token one
    assert points(right) == [(-0.12, 0.0), (0.12, 0.0), (0.88, 0.8), (1.12, 0.25), (1.88, 1.0), (2.12, 1.0)]
    assert points(left) == [(-0.12, 0.05), (0.12, 0.8), (0.88, 0.01), (1.12, 0.6), (1.88, 0.0), (2.12, 0.0)]


def ladder_summaries(**shares) -> list:
    """cot, no_think and the study's labelled rungs, with hand-set answer KLs and shares (name: (first, answer))."""
    summaries = [summarize(mode, [result(mode, 0, correct=False)]) for mode in shares]
    for s in summaries:
        (s.share_kl, s.share_kl_ci_low, s.share_kl_ci_high), (s.share_answer_kl, s.share_answer_kl_ci_low,
                                                              s.share_answer_kl_ci_high) = shares[s.mode]
        s.answer_kl, s.answer_kl_ci_low, s.answer_kl_ci_high, s.answer_nll = 0.5, 0.25, 0.75, 1.5
    return summaries


def test_the_study_checks_its_targets_on_both_the_first_token_and_the_answer_kl_share():
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_study

    summaries = ladder_summaries(**{
        "cot": ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)), "no_think": ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
        "oracle (bridge)": ((0.6, 0.4, 0.8), (0.1, -0.05, 0.2)),
        "shuffled (bridge)": ((0.2, 0.1, 0.3), (0.0, -0.1, 0.1)),
        "trm (bridge)": ((0.3, 0.1, 0.5), (0.01, -0.1, 0.1))})
    table = bench_study.ladder_table(summaries)
    assert "share of answer KL recovered" in table[0] and "answer NLL" in table[0]
    assert table[4].startswith("| oracle (bridge) |")
    assert "| 0.50 [0.25, 0.75] | 1.50 | 0.10 [-0.05, 0.20] |" in table[4]  # answer KL, NLL, share
    checks = bench_study.targets(summaries, {})
    assert checks == [
        "- met: [first-token KL] the oracle with the trained bridge recovers a share of CoT's KL reduction whose 95% "
        "interval excludes 0 (0.60 [0.40, 0.80])",
        "- met: [first-token KL] ... and clearly more than the shuffled control (its interval above the control's "
        "value) (0.60 vs 0.20)",
        "- met: [first-token KL] trm with the bridge recovers at least 30% of the oracle's gain (0.50 of the oracle's "
        "share)",
        "- **missed**: [answer KL, content-bearing] the oracle with the trained bridge recovers a share of CoT's KL "
        "reduction whose 95% interval excludes 0 (0.10 [-0.05, 0.20])",
        "- **missed**: [answer KL, content-bearing] ... and clearly more than the shuffled control (its interval "
        "above the control's value) (0.10 vs 0.00)",
        "- **missed**: [answer KL, content-bearing] trm with the bridge recovers at least 30% of the oracle's gain "
        "(0.10 of the oracle's share; hollow: the oracle does no better than shuffled)",
    ]


def test_the_study_refuses_to_draw_every_problem_of_a_small_family(capsys):
    """The demo's family has 200 distinct problems: 256 datagen draws would leave the ladder none held out."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_study

    bench_study.check_room_for_held_out(128, 64)  # 71 left unseen: enough
    with pytest.raises(SystemExit, match="leaves only 0 problems unseen by 256 datagen problems"):
        bench_study.check_room_for_held_out(256, 64)
    with pytest.raises(SystemExit, match="leaves only 71 problems unseen by 128"):
        bench_study.check_room_for_held_out(128, 80)


def test_the_study_times_a_reused_step_as_it_ran_before(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_study

    record = tmp_path / "step_seconds.json"
    assert bench_study.with_recorded_times({"datagen": 5.0, "stage1a": 0.0}, record) == {"datagen": 5.0}
    # a rerun that reuses datagen (0 s now) and trains the TRM: datagen keeps its recorded 5 s
    assert bench_study.with_recorded_times({"datagen": 0.0, "trm": 3.0}, record) == {"datagen": 5.0, "trm": 3.0}


def test_the_demo_summary_shows_the_answer_kl_columns(tmp_path):
    import sys
    from dataclasses import asdict

    sys.path.insert(0, str(ROOT / "scripts"))
    import demo_summary

    summaries = ladder_summaries(cot=((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)), trm=((0.8, 0.7, 0.9), (0.2, 0.1, 0.3)))
    (tmp_path / "eval").mkdir()
    rows = [asdict(s) for s in summaries]
    (tmp_path / "eval" / RESULTS_JSON).write_text(json.dumps({"config": {"problems": ["toy:0"]}, "summary": rows}))
    lines, _ = demo_summary.evaluation_part(tmp_path / "eval", "Evaluation")
    text = "\n".join(lines)
    assert "| answer KL | answer NLL |" in text and "| share: answer KL |" in text
    assert "| 0.5 [0.25, 0.75] | 1.5 |" in text and text.count("| 0.20 [0.10, 0.30] |") == 1
    # a report written before the answer KL existed still reads, its new columns empty
    old = [{k: v for k, v in row.items() if "answer_kl" not in k and "answer_nll" not in k} for row in rows]
    (tmp_path / "eval" / RESULTS_JSON).write_text(json.dumps({"config": {"problems": ["toy:0"]}, "summary": old}))
    assert "| - | - |" in "\n".join(demo_summary.evaluation_part(tmp_path / "eval", "Evaluation")[0])


def test_without_cot_there_is_no_fidelity_and_without_no_think_no_share():
    rows = [result("trm", 0, correct=True, kl_to_cot=None)]
    only_trm = [summarize("trm", rows)]
    add_fidelity(only_trm, {"trm": rows})
    assert only_trm[0].kl_to_cot is None and only_trm[0].answer_agreement is None
    results = {"cot": [result("cot", 0, correct=True, kl_to_cot=0.0, answer_agrees_with_cot=True)],
               "trm": [result("trm", 0, correct=False, kl_to_cot=0.3, answer_agrees_with_cot=False)]}
    summaries = [summarize(mode, r) for mode, r in results.items()]
    add_fidelity(summaries, results)
    assert summaries[1].kl_to_cot == pytest.approx(0.3) and summaries[1].share_kl is None


def test_checker_errors_are_counted_apart_from_wrong_answers():
    rows = [result("trm", 0, correct=True), result("trm", 1, correct=False),
            result("trm", 2, correct=None, checker_error="RuntimeError: sandbox unavailable")]
    summary = summarize("trm", rows)
    assert (summary.checker_errors, summary.checked, summary.correct, summary.accuracy) == (1, 2, 1, 0.5)
    assert "| trm | 0.500 [" in markdown_table([summary]) and "| 0 | 1 |" in markdown_table([summary])


def test_trm_modes_without_a_trm_are_refused(problem_file, tmp_path):
    config = build_parser().parse_args(["--datasets", f"jsonl:{problem_file}", "--modes", "[no_think, trm]",
                                        "--output_dir", str(tmp_path)])
    from llm_trm.evaluate import evaluate

    with pytest.raises(DataError, match="need `compressor` and `trm`"):
        evaluate(config)


@pytest.mark.parametrize("path", ["configs/eval/gsm8k.yaml", "configs/demo/evaluate.yaml"])
def test_shipped_configs_parse(path):
    config = build_parser().parse_args(["--config", str(ROOT / path)])
    assert config.modes == ["cot", "no_think", "trm", "trm_first_token", "oracle", "oracle_full", "shuffled"]
    assert config.exclude_from and config.compressor and config.trm
    assert config.warmup is True and config.bootstrap_resamples == 2000
    assert check_modes(config.modes, has_trm=True, max_thinking_tokens=config.max_thinking_tokens) == config.modes


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
