"""The GPU benchmark (scripts/bench_gpu.py): its --tiny CPU run exercises every part end to end,
its bandwidth arithmetic matches hand-computed values, and without CUDA it stops with one line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_gpu  # noqa: E402

BENCHMARKS = ROOT / "BENCHMARKS.md"
COMMITTED_JSON = ROOT / "benchmarks" / "gpu.json"


def _fingerprint(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=environment,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One --tiny run on CPU (a bandwidth given, so the bound's code path runs too)."""
    out = tmp_path_factory.mktemp("bench_gpu")
    before = (_fingerprint(BENCHMARKS), _fingerprint(COMMITTED_JSON))
    started = time.perf_counter()
    run = _run("scripts/bench_gpu.py", "--tiny", "--device", "cpu", "--json", str(out / "gpu.json"),
               "--markdown", str(out / "gpu.md"), "--bandwidth-tb-s", "0.001")
    seconds = time.perf_counter() - started
    after = (_fingerprint(BENCHMARKS), _fingerprint(COMMITTED_JSON))
    assert run.returncode == 0, run.stderr[-3000:]
    return {"report": json.loads((out / "gpu.json").read_text()), "markdown": (out / "gpu.md").read_text(),
            "stdout": run.stdout, "seconds": seconds, "unchanged": before == after}


def test_tiny_run_finishes_every_part_quickly_and_leaves_committed_files_alone(tiny_run):
    parts = tiny_run["report"]["parts"]
    assert list(parts) == ["setup", *bench_gpu.PARTS]
    assert {name: entry["status"] for name, entry in parts.items()} == {name: "ok" for name in parts}
    assert tiny_run["unchanged"], "the --tiny run touched BENCHMARKS.md or benchmarks/gpu.json"
    assert tiny_run["seconds"] < 120
    # the table printed is the one written to --markdown, one status row per part
    assert tiny_run["stdout"] == tiny_run["markdown"]
    for name in parts:
        assert f"| {name} | ok |" in tiny_run["markdown"]


def test_tiny_run_writes_every_expected_key(tiny_run):
    report = tiny_run["report"]
    assert report["format"] == bench_gpu.FORMAT and report["tiny"] is True
    assert {"python", "torch", "cuda", "transformers", "lightning"} <= set(report["versions"])
    assert report["options"]["attn_implementation"] == "sdpa"
    assert report["backbone"]["attn_implementation"] == "sdpa" and report["backbone"]["nope_layers"] == [3]
    for name, keys in bench_gpu.RESULT_KEYS.items():
        results = report["parts"][name]["results"]
        assert set(keys) <= set(results), f"{name} lacks {set(keys) - set(results)}"
        for key in ("seconds", "budget_s", "peak_memory_gib", "error", "status"):
            assert key in report["parts"][name]


def test_tiny_model_is_the_smollm3_layout_with_hand_counted_parameters(tiny_run):
    backbone = tiny_run["report"]["backbone"]
    # vocab 512 x hidden 64 (tied), 4 layers of q/o 64x64, k/v 64x32 (2 KV heads of 16), MLP 3 x 64x128,
    # two norms; the final norm
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    assert backbone["parameters"] == 512 * 64 + 4 * per_layer + 64 == 180800
    assert backbone["weight_bytes_per_token"] == 4 * 180800  # fp32 on CPU


def test_datagen_rows_run_to_the_token_budget_and_the_bound_is_consistent(tiny_run):
    results = tiny_run["report"]["parts"]["datagen"]["results"]
    scale = bench_gpu.TINY
    assert [row["batch"] for row in results["rows"]] == list(scale.datagen_batches)
    for row in results["rows"]:
        assert set(bench_gpu.DATAGEN_ROW_KEYS) <= set(row)
        # the silenced end tokens make every sequence think for the whole budget
        assert row["thinking_tokens"] == row["batch"] * scale.datagen_tokens
        assert row["seconds"] > 0 and row["prefill_s"] > 0
        # the decode rate comes from two separately timed runs: undefined, not huge, when noise inverts them
        expected = ((row["thinking_tokens"] - row["batch"]) / (row["seconds"] - row["prefill_s"])
                    if row["seconds"] > row["prefill_s"] else None)
        assert row["decode_tokens_per_s"] == pytest.approx(expected)
    bound = results["bandwidth_bound"]
    assert bound["bandwidth_bytes_per_s"] == 1e9 and bound["source"] == "--bandwidth-tb-s 0.001"
    assert bound["bound_tokens_per_s"] == pytest.approx(1e9 / 723200)
    single = results["rows"][0]["decode_tokens_per_s"]
    assert bound["ratio_at_batch_1"] == (None if single is None else pytest.approx(single / (1e9 / 723200)))
    generation = tiny_run["report"]["parts"]["generation"]["results"]
    assert generation["option"] and [row["batch"] for row in generation["rows"]] == list(scale.static_batches)
    assert all(row["thinking_tokens"] == row["batch"] * scale.datagen_tokens for row in generation["rows"])


def test_evaluate_and_grpo_rows(tiny_run):
    parts, scale = tiny_run["report"]["parts"], bench_gpu.TINY
    rows = parts["evaluate"]["results"]["rows"]
    assert [(r["mode"], r["batch"]) for r in rows] == [(m, b) for b in scale.eval_batches for m in bench_gpu.EVAL_MODES]
    for row in rows:
        assert set(bench_gpu.EVAL_ROW_KEYS) <= set(row)
        assert row["thinking_tokens"] == (scale.eval_thinking_tokens if row["mode"] == "cot" else 0)
        assert (row["trm_steps"] is not None) == (row["mode"] == "trm")
        assert 0 < row["time_to_first_answer_token_s"] <= row["total_s"]
    grpo = parts["grpo"]["results"]["rows"]
    assert [row["activation_checkpointing"] for row in grpo] == [False, True]
    for row in grpo:
        assert set(bench_gpu.GRPO_ROW_KEYS) <= set(row) and row["step_s"] > 0
    trm = parts["trm"]["results"]
    assert trm["samples_per_s"] == pytest.approx(scale.trm_batch / trm["seconds_per_batch"])
    stage1a = parts["stage1a"]["results"]
    assert stage1a["step_tokens_per_s"] == pytest.approx(scale.stage1a_batch * scale.stage1a_seq_len / stage1a["step_s"])


def test_bandwidth_bound_of_smollm3_3b_matches_hand_computed_values():
    from transformers import AutoModelForCausalLM, SmolLM3Config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(SmolLM3Config(**bench_gpu.SMOLLM3_3B), dtype=torch.bfloat16)
    # embeddings (tied with lm_head) 128256 x 2048; 36 layers of q/o 2048x2048, k/v 2048x512 (4 KV heads of
    # 128), MLP 3 x 2048x11008, two norms; the final norm
    per_layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 11008 + 2 * 2048
    assert sum(p.numel() for p in model.parameters()) == 128256 * 2048 + 36 * per_layer + 2048 == 3_075_098_624
    weight_bytes = bench_gpu.weight_bytes_per_token(model)
    assert weight_bytes == 6_150_197_248  # bf16: 2 bytes each
    # 3.35e12 / 6.150197248e9 and 4.8e12 / 6.150197248e9
    assert bench_gpu.bandwidth_bound_tokens_per_s(weight_bytes, 3.35e12) == pytest.approx(544.698, abs=1e-3)
    assert bench_gpu.bandwidth_bound_tokens_per_s(weight_bytes, 4.8e12) == pytest.approx(780.463, abs=1e-3)
    assert [layer for layer, rope in enumerate(model.config.no_rope_layers) if not rope] == list(range(3, 36, 4))


@pytest.mark.parametrize("name,tb_s", [
    ("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0), ("NVIDIA H100 NVL", 3.9), ("NVIDIA H200", 4.8),
    ("NVIDIA GH200 480GB", 4.0), ("NVIDIA A100-SXM4-80GB", 2.039), ("NVIDIA A100 80GB PCIe", 1.935),
    ("NVIDIA L40S", 0.864), ("NVIDIA L4", 0.3), ("NVIDIA A10G", 0.6), ("NVIDIA GeForce RTX 4090", 1.008),
])
def test_known_cards_get_their_vendor_bandwidth(name, tb_s):
    bandwidth, source = bench_gpu.table_bandwidth(name)
    assert bandwidth == pytest.approx(tb_s * 1e12) and "table" in source


def test_unknown_card_is_not_guessed():
    assert bench_gpu.table_bandwidth("Some Future Accelerator 9000") is None
    assert bench_gpu.device_bandwidth(torch.device("cpu")) == (None, "none: not a CUDA device")


def test_a_part_that_runs_out_of_time_or_fails_is_reported_and_keeps_what_it_measured(tmp_path):
    bench = bench_gpu.Bench(bench_gpu.TINY, torch.device("cpu"), "auto", "sdpa", tmp_path)
    report: dict = {"parts": {}}

    def slow(bench, out):
        out["first"] = 1.0
        while True:
            time.sleep(0.01)

    def broken(bench, out):
        raise ValueError("bad number\nsecond line")

    bench_gpu.run_part(bench, "slow", slow, 0.3, report)
    bench_gpu.run_part(bench, "broken", broken, 5, report)
    slow_entry, broken_entry = report["parts"]["slow"], report["parts"]["broken"]
    assert slow_entry["status"] == "timed out" and slow_entry["results"] == {"first": 1.0}
    assert 0.3 <= slow_entry["seconds"] < 3
    assert broken_entry["status"] == "failed" and broken_entry["error"] == "ValueError: bad number"
    text = bench_gpu.markdown({"device": {"name": "cpu", "bandwidth_source": "none"}, "versions": bench_gpu.versions(),
                               "command": "x", "started": "now", "json": "x.json", "scale": "tiny", "parts": report["parts"]})
    assert "| slow | timed out: ran past its 0 s budget |" in text and "| broken | failed: ValueError: bad number |" in text


def test_without_cuda_the_real_run_stops_with_one_line_and_exit_2():
    before = _fingerprint(COMMITTED_JSON)
    run = _run("scripts/bench_gpu.py", env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("bench_gpu: error: no CUDA device")
    assert _fingerprint(COMMITTED_JSON) == before


def test_make_bench_gpu_without_cuda_keeps_benchmarks_md(tmp_path):
    before = _fingerprint(BENCHMARKS)
    run = _run("scripts/bench.py", "gpu", env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert run.returncode == 2
    assert "no CUDA device" in run.stderr and "keeps its old gpu section" in run.stderr
    assert _fingerprint(BENCHMARKS) == before


def test_tiny_needs_an_explicit_json_path():
    run = _run("scripts/bench_gpu.py", "--tiny", "--device", "cpu", timeout=120)
    assert run.returncode == 2 and "--tiny needs --json" in run.stderr
