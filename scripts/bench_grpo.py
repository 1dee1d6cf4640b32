"""Phase 3 benchmark: GRPO step time at G = 8, with the prompt's KV cache reused and without.

    python scripts/bench_grpo.py                                   # the BENCHMARKS.md section: tiny + embedded
    python scripts/bench_grpo.py --backbone tiny                   # one backbone
    python scripts/bench_grpo.py --backbone <random-init 3B dir> --device cuda

Each configuration runs the real `GRPOModule.training_step` path (prompt pass, TRM,
sampling G answers, rewards, teacher-forced forward and backward, optimizer step) through
a Lightning Trainer, with `first_token:0` rewards so every answer runs to max_answer_tokens
unless the LLM stops itself. `reuse_prompt_cache` on (the default: one prompt pass whose KV
cache serves the G samples and the log-probability pass) and off (the prompt is re-read for
the sampling and for the log-probabilities, as before the change) alternate in one process,
twice each; the first step of every run warms up and is not timed. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from timing import BatchClock  # scripts/timing.py

from llm_trm.backbone import backbone_id, hidden_size_of
from llm_trm.data.grpo_data import GRPODataModule
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.trm import SequenceTRM
from llm_trm.modules.grpo import GRPOModule


class StepClock(BatchClock):
    """Wall time and sampled answer tokens of every training step."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        answers = len(batch) * pl_module.hparams.group_size
        self.tokens.append(float(trainer.callback_metrics["train/answer_length"]) * answers)


def write_parts(directory: Path, backbone: str, d_compressed: int) -> tuple[Path, Path]:
    meta = {"backbone": backbone_id(backbone), "layer": -1}
    d_model = hidden_size_of(backbone)
    compressor = DimensionCompressor(d_model, d_compressed).save_pretrained(directory / "compressor", metadata=meta)
    trm = SequenceTRM(d_compressed, n_layers=2, n_heads=4, n_latent_steps=2, n_deep_recursions=2,
                      n_supervision_steps=2).save_pretrained(directory / "trm", metadata={**meta, "d_model": d_model})
    return compressor, trm


def write_problems(path: Path, count: int) -> Path:
    with open(path, "w") as handle:
        for i in range(count):
            handle.write(json.dumps({"question": f"Tom has {i} apples and buys {i + 3} more. How many now?",
                                     "answer": str(2 * i + 3)}) + "\n")
    return path


def tiny_backbone(directory: Path) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ lives beside scripts/
    from tests.tiny import save_tiny_backbone

    return str(save_tiny_backbone(directory, hidden_size=64))


def run(backbone: str, work: Path, args: argparse.Namespace, reuse_prompt_cache: bool) -> dict[str, float]:
    compressor, trm = write_parts(work, backbone, args.d_compressed)
    problems = write_problems(work / "problems.jsonl", 64)
    torch.manual_seed(0)
    module = GRPOModule(backbone=backbone, compressor_checkpoint=str(compressor), trm_checkpoint=str(trm),
                        group_size=args.group_size, max_answer_tokens=args.max_answer_tokens, reward="first_token:0",
                        halting=False, equal_reward_warn_steps=0, backbone_dtype=args.dtype,
                        reuse_prompt_cache=reuse_prompt_cache)
    data = GRPODataModule(datasets=f"jsonl:{problems}", num_samples=48, val_samples=0, batch_size=args.batch_size,
                          batches_per_epoch=args.steps + 1, difficulty="none")
    clock = StepClock()
    trainer = L.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, max_epochs=1,
                        precision=args.precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[clock])
    trainer.fit(module, data)
    return {"times": clock.seconds[1:], "tokens": clock.tokens[1:]}  # the first step warms up


def compare(backbone: str, work: Path, args: argparse.Namespace) -> dict[bool, dict[str, float]]:
    """Both settings, alternating (off, on, off, on), so a drifting machine affects both alike."""
    times: dict[bool, list[float]] = {False: [], True: []}
    tokens: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for reuse in (False, True):
            result = run(backbone, work, args, reuse)
            times[reuse] += result["times"]
            tokens[reuse] += result["tokens"]
    summary = {}
    for reuse in (False, True):
        step = statistics.median(times[reuse])
        summary[reuse] = {"step_s": step, "problems_per_s": args.batch_size / step,
                          "tokens_per_s": sum(tokens[reuse]) / sum(times[reuse]),
                          "answer_tokens": sum(tokens[reuse]) / len(tokens[reuse]) / (args.batch_size * args.group_size),
                          "steps": len(times[reuse])}
    return summary


LABELS = {"tiny": "tiny random SmolLM3 (hidden 64, 4 layers)", "embedded": "embedded SmolLM2-135M"}
DEFAULT_SETTINGS = {"tiny": dict(max_answer_tokens=32, steps=4), "embedded": dict(max_answer_tokens=16, steps=2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", action="append", help="`tiny` (built in-process), `embedded`, or a model dir; "
                        "repeat for several (default: tiny and embedded)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--dtype", default="float32", help="backbone dtype")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-answer-tokens", type=int, default=None, help="default: 32 tiny, 16 embedded")
    parser.add_argument("--d-compressed", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default: 4 tiny, 2 embedded)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each setting, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for backbone in args.backbone or ["tiny", "embedded"]:
        settings = argparse.Namespace(**vars(args))
        defaults = DEFAULT_SETTINGS.get(backbone, DEFAULT_SETTINGS["embedded"])
        settings.max_answer_tokens = args.max_answer_tokens or defaults["max_answer_tokens"]
        settings.steps = args.steps or defaults["steps"]
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            spec = tiny_backbone(work / "tiny") if backbone == "tiny" else backbone
            rows.append((LABELS.get(backbone, backbone), settings, compare(spec, work, settings)))
    print(f"GRPO training step on {args.device}, {args.batch_size} problems x G={args.group_size}, precision "
          f"{args.precision}, {args.threads or torch.get_num_threads()} torch thread(s). Median step of "
          f"{args.repeats} runs per setting, alternating, each after one warm-up step.\n")
    print("| backbone | max answer tokens | prompt KV cache | step (s) | problems/s | sampled tokens/s | "
          "answer tokens (mean) | steps timed |")
    print("|---|---|---|---|---|---|---|---|")
    for label, settings, summary in rows:
        for reuse in (False, True):
            result = summary[reuse]
            print(f"| {label} | {settings.max_answer_tokens} | {'reused' if reuse else 're-read'} | "
                  f"{result['step_s']:.2f} | {result['problems_per_s']:.2f} | {result['tokens_per_s']:.1f} | "
                  f"{result['answer_tokens']:.1f} | {result['steps']} |")
    print()
    for label, _, summary in rows:
        ratio = summary[False]["step_s"] / summary[True]["step_s"]
        print(f"- {label}: step time re-reading the prompt / reusing its cache = **{ratio:.2f}x**")


if __name__ == "__main__":
    main()
