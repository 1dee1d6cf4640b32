"""Latency of each answer mode on the embedded SmolLM2-135M on CPU; prints a markdown body.

    python scripts/bench_evaluate.py [--problems 4] [--max-thinking-tokens 128]
    python scripts/bench.py evaluate          # rewrites its section of BENCHMARKS.md

For a fixed set of gsm_symbolic test problems, answered one at a time (batch 1, greedy;
modes interleaved, the fastest of `--repeats` runs), it measures the time to the first
answer token of `cot`, `no_think`, `trm` and `trm_first_token`, and the TRM's own
overhead (compression + recursion + decompression + adapter). Targets: `trm` time to answer <= 1/5 of `cot`'s; TRM overhead <= 10% of
`no_think`'s time to answer.

Steady state, as `llm-trm evaluate` times it: every mode answers a warm-up batch first
(`llm_trm.evaluate.warm_up`, discarded), so no mode pays the one-time costs; `cot` is one
continuous generation (thinking, then the answer) with its own KV cache.

It uses the demo's trained compressor and TRM when `make demo` has written them
(runs/demo/compressor_1b, runs/demo/trm_model), else a random compressor (D'=64) and a
random TRM with the demo's architecture (2 layers, n=2, T=2, N_sup=4, no halting
learnt, so every problem runs all 4 steps): latency does not depend on the weights.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from llm_trm.backbone import load_backbone
from llm_trm.data.problems import load_problems
from llm_trm.evaluate import warm_up
from llm_trm.inference import AnswerResult, LatentReasoner
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.trm import SequenceTRM

ROOT = Path(__file__).resolve().parents[1]
DEMO_COMPRESSOR, DEMO_TRM = ROOT / "runs/demo/compressor_1b", ROOT / "runs/demo/trm_model"
# the modes whose latency is compared (the oracle modes think as cot does: they save no time)
MODES = ("cot", "no_think", "trm", "trm_first_token")
# the demo TRM's architecture (configs/demo/trm.yaml)
SMALL_TRM = dict(n_layers=2, n_heads=4, n_latent_steps=2, n_deep_recursions=2, n_supervision_steps=4)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=4, help="gsm_symbolic test problems, answered one by one")
    parser.add_argument("--max-thinking-tokens", type=int, default=128, help="cot thinking budget")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer budget")
    parser.add_argument("--repeats", type=int, default=2, help="runs per (mode, problem); the fastest counts")
    parser.add_argument("--compressor", default=None, help="compressor folder (default: the demo's, else random)")
    parser.add_argument("--trm", default=None, help="TRM folder (default: the demo's, else random)")
    return parser.parse_args()


def latent_parts(args: argparse.Namespace, workdir: Path) -> tuple[str, str, str]:
    """(compressor, trm, description): the given or demo artifacts, else random ones saved in workdir."""
    if args.compressor and args.trm:
        return args.compressor, args.trm, f"compressor {args.compressor}, TRM {args.trm}"
    if DEMO_COMPRESSOR.is_dir() and DEMO_TRM.is_dir():
        return str(DEMO_COMPRESSOR), str(DEMO_TRM), "the demo's trained compressor and TRM"
    torch.manual_seed(0)
    compressor = DimensionCompressor(576, 64).save_pretrained(workdir / "compressor", {"backbone": "embedded", "layer": -1})
    trm = SequenceTRM(64, **SMALL_TRM).save_pretrained(workdir / "trm", {"backbone": "embedded", "layer": -1})
    return str(compressor), str(trm), "a random compressor (D'=64) and a random TRM of the demo's architecture (N_sup=4)"


def run_interleaved(reasoner: LatentReasoner, problems, args: argparse.Namespace) -> dict[str, list[AnswerResult]]:
    """Each problem in every mode in turn, `repeats` times; per (mode, problem) the fastest run.

    The machines are shared: interleaving spreads a load spike over all modes instead of
    one, and the fastest of a few runs estimates the cost of the work itself.
    """
    warm_up(reasoner, MODES, problems, batch_size=1, max_new_tokens=args.max_new_tokens,
            max_thinking_tokens=args.max_thinking_tokens)
    best: dict[str, list[AnswerResult]] = {mode: [] for mode in MODES}
    for problem in problems:
        runs: dict[str, list[AnswerResult]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                runs[mode] += reasoner.answer([problem], mode=mode, max_new_tokens=args.max_new_tokens,
                                              max_thinking_tokens=args.max_thinking_tokens)
        for mode, results in runs.items():
            best[mode].append(min(results, key=lambda r: r.time_to_first_answer_token_s))
    return best


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    problems = load_problems("gsm_symbolic", "test", args.problems, seed=0)
    with tempfile.TemporaryDirectory() as workdir:
        compressor, trm, description = latent_parts(args, Path(workdir))
        backbone = load_backbone("embedded", "float32")
        reasoner = LatentReasoner(backbone, compressor=compressor, trm=trm, device="cpu")
        results = run_interleaved(reasoner, problems, args)

    ttfa = {mode: median([r.time_to_first_answer_token_s for r in rows]) for mode, rows in results.items()}
    overhead = median([r.trm_overhead_s for mode in ("trm", "trm_first_token") for r in results[mode]
                       if r.trm_overhead_s is not None])
    print(f"{len(problems)} gsm_symbolic test problems, batch 1, greedy, fp32, {torch.get_num_threads()} threads; "
          f"cot thinks up to {args.max_thinking_tokens} tokens, answers up to {args.max_new_tokens}; "
          f"TRM modes use {description}, adapter {type(reasoner.adapter).__name__}. Steady state: every mode "
          f"answered a warm-up batch first (discarded); cot is one continuous generation (thinking, then the "
          f"answer) with its own KV cache. Modes interleaved per problem, fastest of {args.repeats} runs per "
          f"(mode, problem), medians over problems.\n")
    print("| mode | time to answer (s) | total (s) | thinking tokens | answer tokens | TRM steps | vs cot |")
    print("|---|---|---|---|---|---|---|")
    for mode, rows in results.items():
        steps = [r.trm_steps for r in rows if r.trm_steps is not None]
        print(f"| {mode} | {ttfa[mode]:.3f} | {median([r.total_time_s for r in rows]):.3f} | "
              f"{median([r.thinking_tokens for r in rows]):.0f} | {median([r.answer_tokens for r in rows]):.0f} | "
              f"{median(steps) if steps else '-'} | {ttfa[mode] / ttfa['cot']:.3f} |")
    print()
    trm_ratio, overhead_ratio = ttfa["trm"] / ttfa["cot"], overhead / ttfa["no_think"]
    print(f"- `trm` time to answer / `cot`'s: **{trm_ratio:.3f}** (target <= 0.2: "
          f"{'met' if trm_ratio <= 0.2 else 'NOT met'})")
    print(f"- TRM overhead (compress + recursion + decompress + adapter): {overhead * 1000:.1f} ms = "
          f"**{overhead_ratio:.1%}** of `no_think`'s time to answer (target <= 10%: "
          f"{'met' if overhead_ratio <= 0.10 else 'NOT met'})")


if __name__ == "__main__":
    main()
