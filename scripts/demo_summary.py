"""The demo's own summary: every number it reports is read from the artifacts the demo wrote.

    python scripts/demo_summary.py [runs/demo]     # writes runs/demo/summary.md and summary.json, prints the markdown

`scripts/demo.sh` runs it last; `python scripts/bench.py demo` runs the demo and copies this summary into
BENCHMARKS.md. Sources: the datagen records (closed share, accuracy, thinking tokens), the TensorBoard
logs of the compressor runs (held-out cosine vs the PCA optimum), the TRM's and the bridge's
`metrics.json` (their exported weights re-scored on val, which selected them, and on test, which only
reports), the evaluation reports (`results.json`), GRPO's logged rewards, and the step times demo.sh
recorded (`timings.tsv`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from llm_trm.cards import read_scalars
from llm_trm.data.shards import count_records, iter_records, sum_counts


def _f(value: Any, pattern: str = "{:.3f}") -> str:
    return "-" if value is None else pattern.format(value)


def latest_run(directory: Path) -> Path | None:
    versions = sorted(directory.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return versions[-1] if versions else None


def step_times(demo: Path) -> list[tuple[str, float]]:
    path = demo / "timings.tsv"
    if not path.is_file():
        return []
    return [(name, float(seconds)) for name, seconds in
            (line.rsplit("\t", 1) for line in path.read_text().splitlines() if "\t" in line)]


def datagen_part(demo: Path) -> tuple[list[str], dict[str, Any]]:
    pairs = demo / "hidden_pairs"
    counts = count_records(iter_records(pairs))
    total = sum_counts(counts)
    lines = ["### Datagen", "", f"`llm-trm datagen --config configs/demo/datagen.yaml` -> `{pairs}`: "
             f"{total.describe()}.", ""]
    lines += [f"- {name}: {c.describe()}" for name, c in sorted(counts.items())]
    facts = {"samples": total.samples, "closed_share": total.closed_share, "accuracy": total.accuracy,
             "thinking_tokens_per_sample": total.thinking_tokens_per_sample}
    return lines + [""], facts


def compressor_part(demo: Path) -> tuple[list[str], dict[str, Any]]:
    lines = ["### Compressor (held-out text, last validation)", "",
             "| stage | cosine | PCA cosine | ratio to PCA | R^2 |", "|---|---|---|---|---|"]
    facts = {}
    for stage in ("stage1a", "stage1b"):
        run = latest_run(demo / stage)
        if run is None:
            continue
        scalars = read_scalars(run)
        facts[stage] = {key: scalars.get(key) for key in ("val/cosine", "baseline/pca_cosine", "val/cosine_ratio_to_pca",
                                                          "val/explained_variance")}
        lines.append(f"| {stage} | {_f(scalars.get('val/cosine'), '{:.4f}')} | "
                     f"{_f(scalars.get('baseline/pca_cosine'), '{:.4f}')} | "
                     f"{_f(scalars.get('val/cosine_ratio_to_pca'), '{:.4f}')} | "
                     f"{_f(scalars.get('val/explained_variance'), '{:.3f}')} |")
    return lines + [""], facts


def trm_part(demo: Path) -> tuple[list[str], dict[str, Any]]:
    metrics = json.loads((demo / "trm_model" / "metrics.json").read_text())["splits"]
    lines = ["### TRM (exported EMA weights re-scored; val selected them, test only reports)", "",
             "| split | predictor | R^2 (D') | centred cosine | cosine | R^2 (full D) |", "|---|---|---|---|---|---|"]
    for split in ("val", "test"):
        if split not in metrics:
            continue
        rows = [("TRM", metrics[split]["model"], "")] + [(name, metrics[split]["baselines"], f"{name}_")
                                                          for name in ("mean", "ridge", "last_token")]
        for label, values, prefix in rows:
            lines.append(f"| {split} ({metrics[split]['num_samples']}) | {label} | "
                         f"{_f(values.get(prefix + 'explained_variance'))} | {_f(values.get(prefix + 'centred_cosine'))} | "
                         f"{_f(values.get(prefix + 'cosine'))} | {_f(values.get(prefix + 'full_explained_variance'))} |")
    return lines + [""], metrics


def bridge_part(demo: Path) -> tuple[list[str], dict[str, Any]]:
    path = demo / "bridge_model" / "metrics.json"
    if not path.is_file():
        return [], {}
    splits = json.loads(path.read_text())["splits"]
    lines = ["### Bridge (exported weights re-scored; first answer token after `[prompt][soft]</think>`)", "",
             "| split | way in | KL(cot ‖ ·) | top-1 = cot | answer NLL |", "|---|---|---|---|---|"]
    for split, record in splits.items():
        values = record["metrics"]
        for way in ("none", "concept", "bridge", "shuffled", "trm"):
            if f"{way}/first_token_kl" in values:
                lines.append(f"| {split} | {way} | {_f(values[f'{way}/first_token_kl'])} | "
                             f"{_f(values.get(f'{way}/top1_agreement'), '{:.2f}')} | "
                             f"{_f(values.get(f'{way}/answer_nll'))} |")
    return lines + [""], splits


def evaluation_part(directory: Path, title: str) -> tuple[list[str], dict[str, Any]]:
    path = directory / "results.json"
    if not path.is_file():
        return [], {}
    from llm_trm.evaluate import ModeSummary, markdown_table

    report = json.loads(path.read_text())
    summaries = [ModeSummary(**row) for row in report["summary"]]
    problems = len(report["config"].get("problems", []))
    lines = [f"### {title} ({problems} held-out problems)", "", markdown_table(summaries, report["config"].get("notes", ())),
             ""]
    return lines, {"summary": report["summary"]}


def grpo_part(demo: Path) -> tuple[list[str], dict[str, Any]]:
    run = latest_run(demo / "grpo")
    if run is None:
        return [], {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    rewards = [e.value for e in events.Scalars("train/reward_mean")] if "train/reward_mean" in tags else []
    accuracy = [e.value for e in events.Scalars("train/accuracy")] if "train/accuracy" in tags else []
    facts = {"steps": len(rewards), "reward_mean": rewards, "accuracy": accuracy}
    if not rewards:
        return [], facts
    line = (f"### GRPO\n\n{len(rewards)} steps: mean reward (answer correctness + format bonus) "
            f"{rewards[0]:.3f} at the first step, {rewards[-1]:.3f} at the last "
            f"(max {max(rewards):.3f}); training accuracy {100 * sum(accuracy) / max(len(accuracy), 1):.1f}% on average.\n")
    return [line], facts


def summarize(demo: Path) -> tuple[str, dict[str, Any]]:
    times = step_times(demo)
    header = ["## The demo (`make demo`): what it produced", ""]
    if times:
        total = sum(seconds for _, seconds in times)
        header.append(f"Wall time {total / 60:.1f} min (" + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in times)
                      + ").")
        header.append("")
    parts = [datagen_part(demo), compressor_part(demo), trm_part(demo), bridge_part(demo),
             evaluation_part(demo / "eval", "Evaluation"), grpo_part(demo),
             evaluation_part(demo / "eval_after_grpo", "Evaluation after GRPO")]
    names = ("datagen", "compressor", "trm", "bridge", "evaluation", "grpo", "evaluation_after_grpo")
    markdown = "\n".join(header + [line for lines, _ in parts for line in lines])
    facts = {"step_seconds": dict(times), **{name: facts for name, (_, facts) in zip(names, parts)}}
    return markdown, facts


def main(argv: list[str]) -> None:
    demo = Path(argv[0] if argv else "runs/demo")
    markdown, facts = summarize(demo)
    (demo / "summary.md").write_text(markdown + "\n")
    (demo / "summary.json").write_text(json.dumps(facts, indent=2, default=str))
    print(markdown)


if __name__ == "__main__":
    main(sys.argv[1:])
