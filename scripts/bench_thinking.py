"""Does the embedded model close its own thinking, and does thinking help it? Chooses the demo's setup.

(a) The share of problems whose thinking the model closes itself within the demo's thinking budget
    (`configs/demo/datagen.yaml` model.max_new_tokens), per prompt style (the earlier system-line
    prompt vs the worked-example prompt) x problem family x decoding (greedy, and the sampling
    DatagenModule records: temperature 0.6, top_p 0.95), on the demo's datagen split. It runs
    DatagenModule's own thinking generation (batched, stop at `</think>`).
(b) Accuracy with thinking (`cot`) vs without (`no_think`: the same prompt with an empty think
    block) per family, with 95% Wilson intervals, on the held-out split, through LatentReasoner
    (what `llm-trm evaluate` runs), greedy.

The text under the tables says which setup the demo should use: at least half of the problems
closed by the model itself within the budget, on a family where CoT beats no-thinking if there is
one, and whether configs/demo/datagen.yaml uses it. Prints markdown (for BENCHMARKS.md).

    python scripts/bench_thinking.py                          # the full bench (~20 min on 2 CPU cores)
    python scripts/bench_thinking.py --families rg:chain_sum --close_problems 8 --accuracy_problems 8
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from llm_trm.data.problems import PROMPT_STYLE, PROMPT_STYLES, Problem, load_problems
from llm_trm.inference import LatentReasoner, wilson_interval
from llm_trm.latent import encode_prompt
from llm_trm.modules.datagen import DatagenModule

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATAGEN = ROOT / "configs" / "demo" / "datagen.yaml"
# the demo's earlier family, reasoning-gym families with short reasoning at their default settings, and
# chain_sum with two terms (one- and up-to-two-digit numbers)
FAMILIES = ("gsm_symbolic,rg:basic_arithmetic,rg:chain_sum,rg:leg_counting,"
            "rg:chain_sum?max_terms=2&max_digits=2,rg:chain_sum?max_terms=2&max_digits=1")
STYLES = ("system_line", PROMPT_STYLE)
MIN_CLOSED_SHARE = 0.5


def parse_args() -> argparse.Namespace:
    demo = yaml.safe_load(DEMO_DATAGEN.read_text())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="embedded")
    parser.add_argument("--families", default=FAMILIES, help="comma-separated problem sources")
    parser.add_argument("--close_problems", type=int, default=16, help="problems per cell of (a)")
    parser.add_argument("--accuracy_problems", type=int, default=24, help="problems per family in (b)")
    parser.add_argument("--budget", type=int, default=int(demo["model"]["max_new_tokens"]),
                        help="thinking budget (default: the demo datagen's max_new_tokens)")
    parser.add_argument("--answer_tokens", type=int, default=int(demo["model"]["max_answer_tokens"]),
                        help="answer budget in (b) (default: the demo datagen's max_answer_tokens)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=int(demo.get("seed", 0)))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, e.g. OMP_NUM_THREADS, at most 2)")
    return parser.parse_args()


@dataclass
class CloseCell:
    family: str
    style: str
    decoding: str
    closed: int
    total: int
    closed_tokens: list[int]  # thinking tokens of the rows the model closed itself
    seconds: float

    @property
    def share(self) -> float:
        return self.closed / self.total


@dataclass
class AccuracyRow:
    family: str
    cot: int
    no_think: int
    total: int
    cot_closed: int
    cot_only: int  # right with thinking, wrong without
    no_think_only: int
    seconds: float

    @property
    def gain(self) -> float:
        return (self.cot - self.no_think) / self.total


def batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def measure_closing(module: DatagenModule, family: str, problems: list[Problem], style: str, decoding: str,
                    batch_size: int, seed: int) -> CloseCell:
    """DatagenModule's thinking generation on `problems` rendered in `style`: who closed it themselves."""
    module.hparams.do_sample = decoding == "sampling"
    torch.manual_seed(seed)
    prompts = [encode_prompt(module.tokenizer, problem, thinking=True, style=style) for problem in problems]
    started = time.perf_counter()
    thoughts = [thought for batch in batches(prompts, batch_size) for thought in module._think(batch)]
    seconds = time.perf_counter() - started
    closed = [len(t.thinking_ids) for t in thoughts if t.closed]
    return CloseCell(family, style, decoding, len(closed), len(thoughts), closed, seconds)


def measure_accuracy(reasoner: LatentReasoner, family: str, problems: list[Problem], budget: int,
                     answer_tokens: int, batch_size: int) -> AccuracyRow:
    started = time.perf_counter()
    cot = reasoner.answer(problems, "cot", max_new_tokens=answer_tokens, max_thinking_tokens=budget,
                          batch_size=batch_size)
    plain = reasoner.answer(problems, "no_think", max_new_tokens=answer_tokens, batch_size=batch_size)
    seconds = time.perf_counter() - started
    with_cot = [bool(r.correct) for r in cot]
    without = [bool(r.correct) for r in plain]
    return AccuracyRow(
        family, sum(with_cot), sum(without), len(problems), sum(bool(r.closed_thinking) for r in cot),
        sum(a and not b for a, b in zip(with_cot, without)), sum(b and not a for a, b in zip(with_cot, without)),
        seconds,
    )


def interval(successes: int, total: int) -> str:
    low, high = wilson_interval(successes, total)
    return f"{successes}/{total} = {successes / total:.2f} [{low:.2f}, {high:.2f}]"


def choose(cells: list[CloseCell], rows: list[AccuracyRow]) -> tuple[CloseCell | None, AccuracyRow | None, str]:
    """The demo's setup: cells of the pipeline's prompt style (the only one datagen renders; the other is
    the baseline) closing at least MIN_CLOSED_SHARE; among them the family with the largest CoT gain
    when one is positive, else the highest closed share; greedy on ties."""
    eligible = [c for c in cells if c.style == PROMPT_STYLE and c.share >= MIN_CLOSED_SHARE]
    if not eligible:
        return None, None, "no setup reached the target"
    gains = {row.family: row for row in rows}
    helped = [c for c in eligible if c.family in gains and gains[c.family].gain > 0]
    pool = helped or eligible
    rank = lambda c: (gains[c.family].gain if helped else 0.0, c.share, c.decoding == "greedy")  # noqa: E731
    best = max(pool, key=rank)
    why = ("the family where CoT beats no-thinking by the most" if helped else
           "no family answers better with CoT than without here, so the highest closed share")
    return best, gains.get(best.family), why


def demo_setup() -> dict[str, object]:
    demo = yaml.safe_load(DEMO_DATAGEN.read_text())
    return {"dataset": demo["data"]["dataset"], "decoding": "sampling" if demo["model"].get("do_sample") else "greedy",
            "budget": demo["model"]["max_new_tokens"]}


def report(args: argparse.Namespace, sampling: str, cells: list[CloseCell], rows: list[AccuracyRow], wall: float,
           timings: dict[str, float]) -> None:
    print(f"\nbackbone `{args.backbone}` on CPU, {torch.get_num_threads()} torch threads, batch {args.batch_size}, "
          f"thinking budget {args.budget} tokens (configs/demo/datagen.yaml), answer budget {args.answer_tokens}, "
          f"sampling = {sampling}. Prompt styles: `system_line` (a system line asking for step-by-step reasoning in "
          f"think tags) and `{PROMPT_STYLE}` (a system line asking for brief thinking, then worked exchanges of the "
          "format: the prompt every pipeline step renders for templates without think tags).\n")
    print(f"### (a) Thinking closed by the model itself within {args.budget} tokens "
          f"({args.close_problems} `train` problems per cell, DatagenModule's generation)\n")
    print("| family | prompt | decoding | closed itself | share | thinking tokens when closed (mean) | seconds |")
    print("|---|---|---|---:|---:|---:|---:|")
    for c in cells:
        mean = f"{sum(c.closed_tokens) / len(c.closed_tokens):.1f}" if c.closed_tokens else "-"
        print(f"| {c.family} | {c.style} | {c.decoding} | {c.closed}/{c.total} | {c.share:.2f} | {mean} "
              f"| {c.seconds:.0f} |")
    if rows:
        print(f"\n### (b) Accuracy with vs without thinking ({args.accuracy_problems} `test` problems per family, "
              f"`{PROMPT_STYLE}` prompt, greedy, LatentReasoner `cot` / `no_think`, 95% Wilson intervals)\n")
        print("| family | cot correct | no_think correct | cot - no_think | right only with cot | right only without "
              "| cot closed itself | seconds |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r.family} | {interval(r.cot, r.total)} | {interval(r.no_think, r.total)} | {r.gain:+.2f} "
                  f"| {r.cot_only} | {r.no_think_only} | {r.cot_closed}/{r.total} | {r.seconds:.0f} |")
    best, row, why = choose(cells, rows)
    print()
    if best is None:
        print(f"No setup had the model close its own thinking in at least {MIN_CLOSED_SHARE:.0%} of the problems "
              f"within {args.budget} tokens: the demo keeps forced closes (the TRM then learns cut-off thoughts).")
    else:
        gain = (f"accuracy with CoT {interval(row.cot, row.total)} vs without thinking "
                f"{interval(row.no_think, row.total)} on this family" if row is not None
                else "accuracy not measured for this family")
        print(f"**Chosen for the demo:** `{best.family}`, `{best.style}` prompt, {best.decoding} decoding, "
              f"{args.budget} thinking tokens: the model closed its own thinking in {best.closed}/{best.total} "
              f"problems ({best.share:.0%}, target at least {MIN_CLOSED_SHARE:.0%}); chosen as {why} ({gain}). "
              "Greedy is preferred on ties: it is deterministic, so the demo's data do not depend on a seed.")
        helped = [r.family for r in rows if r.gain > 0]
        print(f"\nFamilies where CoT beat no-thinking (point estimates; with {args.accuracy_problems} problems the "
              f"intervals overlap unless the gap is large): {', '.join(helped) if helped else 'none'}.")
        demo = demo_setup()
        matches = (demo["dataset"] == best.family and demo["decoding"] == best.decoding
                   and best.style == PROMPT_STYLE and int(demo["budget"]) == args.budget)
        print(f"\nconfigs/demo/datagen.yaml: dataset `{demo['dataset']}`, {demo['decoding']}, "
              f"{demo['budget']} thinking tokens, `{PROMPT_STYLE}` prompt: "
              + ("it uses the chosen setup." if matches else "it does NOT use the chosen setup."))
    print(f"\nWall time {wall:.0f} s (a: {timings['close']:.0f} s, b: {timings['accuracy']:.0f} s, "
          f"loading: {timings['load']:.0f} s).")


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    torch.set_num_threads(max(1, args.threads or min(2, torch.get_num_threads())))
    families = [name.strip() for name in args.families.split(",") if name.strip()]
    module = DatagenModule(backbone=args.backbone, max_new_tokens=args.budget, max_answer_tokens=0,
                           backbone_dtype="float32")
    module.llm  # noqa: B018 - load the backbone before timing
    timings = {"load": time.perf_counter() - started}

    cells = []
    for family in families:
        problems = load_problems(family, split="train", num_samples=args.close_problems, seed=args.seed)
        for style in STYLES:
            assert style in PROMPT_STYLES
            for decoding in ("greedy", "sampling"):
                cells.append(measure_closing(module, family, problems, style, decoding, args.batch_size, args.seed))
    timings["close"] = time.perf_counter() - started - timings["load"]

    rows = []
    if args.accuracy_problems > 0:
        reasoner = LatentReasoner(module.llm, device="cpu")
        for family in families:
            problems = load_problems(family, split="test", num_samples=args.accuracy_problems, seed=args.seed)
            rows.append(measure_accuracy(reasoner, family, problems, args.budget, args.answer_tokens, args.batch_size))
    timings["accuracy"] = time.perf_counter() - started - timings["load"] - timings["close"]
    sampling = f"temperature {module.hparams.temperature}, top_p {module.hparams.top_p} (DatagenModule's defaults)"
    report(args, sampling, cells, rows, time.perf_counter() - started, timings)


if __name__ == "__main__":
    main()
