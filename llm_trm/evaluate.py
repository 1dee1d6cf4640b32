"""`llm-trm evaluate`: answer held-out problems with CoT, without thinking and with the TRM; compare.

    llm-trm evaluate --config configs/eval/gsm8k.yaml [--num_samples 100 --modes '[no_think, trm]']
    llm-trm evaluate --config configs/demo/evaluate.yaml

Problems come from the registry (`datasets`, `split`, `seed`); every problem the TRM
trained on is left out: each problem whose prompt text appears in the records of the
datagen shards at `exclude_from`, and each sample id in their index (when the shards
come from the same split: ids do not name their split).
The report (printed as a table; written to `output_dir` as results.json,
summary.csv, results.csv and accuracy_vs_tokens.png; logged to TensorBoard under
`eval/<mode>/...`) gives per mode: accuracy with a 95% Wilson interval, mean
thinking/answer tokens, mean time to the first answer token and to the end, and
the speed-up over `cot`. A problem that fails (does not fit the context, crashes
the generation) is counted and reported; the evaluation always finishes.
"""

from __future__ import annotations

import csv
import json
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from jsonargparse.typing import PositiveInt

from llm_trm.data.problems import Problem, load_problems
from llm_trm.data.shards import ShardCorruptError, iter_records, read_datagen_config, read_index
from llm_trm.errors import DataError
from llm_trm.inference import LATENT_MODES, MODES, AnswerResult, LatentReasoner, wilson_interval

DESCRIPTION = "answer held-out problems with CoT / no thinking / the TRM; report accuracy, tokens, latency"

RESULTS_JSON, SUMMARY_CSV, RESULTS_CSV, PLOT_PNG = "results.json", "summary.csv", "results.csv", "accuracy_vs_tokens.png"


# --------------------------------------------------------------------------- config


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="llm-trm evaluate", description=DESCRIPTION, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (configs/eval/gsm8k.yaml)")
    parser.add_argument("--backbone", type=str, default="HuggingFaceTB/SmolLM3-3B",
                        help="frozen LLM: Hub id, local dir, .gguf file or `embedded`")
    parser.add_argument("--compressor", type=str | None, default=None,
                        help="compressor export folder, Hub id or .ckpt (needed for the TRM modes)")
    parser.add_argument("--trm", type=str | None, default=None, help="TRM export folder, Hub id or .ckpt")
    parser.add_argument("--adapter", type=str, default="auto",
                        help="auto (the TRM folder's adapter/, else norm_match), norm_match, linear, concept, or a folder "
                             "(e.g. a Phase 2b bridge export)")
    parser.add_argument("--n_soft_vectors", type=PositiveInt | None, default=None,
                        help="k soft vectors inside the think block (unset: an adapter folder's own k, else 1)")
    parser.add_argument("--layer", type=int | None, default=None, help="hidden-state layer (default: the compressor's)")
    parser.add_argument("--datasets", type=str, default="gsm8k", help="problem sources, comma-separated")
    parser.add_argument("--split", type=str, default="test")
    parser.add_argument("--num_samples", type=PositiveInt, default=100, help="held-out problems to evaluate")
    parser.add_argument("--exclude_from", type=str | None, default=None,
                        help="datagen shard directory: its problems are left out (the TRM trained on them)")
    parser.add_argument("--modes", type=list[str], default=list(MODES), help=f"any of {', '.join(MODES)}")
    parser.add_argument("--batch_size", type=PositiveInt, default=8)
    parser.add_argument("--max_new_tokens", type=PositiveInt, default=256, help="answer budget")
    parser.add_argument("--max_thinking_tokens", type=PositiveInt, default=512, help="thinking budget (cot)")
    parser.add_argument("--n_supervision_steps", type=PositiveInt | None, default=None, help="override the TRM's N_sup")
    parser.add_argument("--seed", type=int, default=0, help="problem generation seed")
    parser.add_argument("--dtype", type=str, default="auto", help="backbone dtype: auto, bfloat16, float32")
    parser.add_argument("--device", type=str | None, default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--trust_remote_code", type=bool, default=False)
    parser.add_argument("--attn_implementation", type=str, default="sdpa",
                        help="backbone attention: sdpa, flash_attention_2 (needs flash-attn) or eager")
    parser.add_argument("--allow_unchecked_artifacts", type=bool, default=False,
                        help="use a compressor / TRM that does not record its backbone, layer, D and D' (unchecked)")
    parser.add_argument("--output_dir", type=str, default="runs/eval")
    parser.add_argument("--progress", type=bool, default=True, help="show a progress bar")
    return parser


def check_modes(modes: Sequence[str], has_trm: bool) -> list[str]:
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise DataError(f"unknown or no modes {unknown or list(modes)}: use any of {', '.join(MODES)}.")
    if not has_trm and any(m in LATENT_MODES for m in modes):
        raise DataError("modes trm / trm_first_token need `compressor` and `trm`: set both or drop those modes.")
    return list(dict.fromkeys(modes))


# --------------------------------------------------------------------------- held-out problems


@dataclass
class TrainedProblems:
    """What a datagen shard directory says the TRM trained on."""

    sample_ids: set[str]
    prompts: set[str]
    split: str | None  # the datagen split; None when not recorded


def trained_problems(shards_dir: str | Path) -> TrainedProblems:
    """Sample ids (from the index), prompt texts (from the records) and split of a datagen shard directory."""
    directory = Path(shards_dir)
    if not directory.is_dir():
        raise DataError(f"exclude_from={shards_dir} is not a directory: point it at the TRM's datagen shards.")
    try:
        shards = read_index(directory)
        datagen_config = read_datagen_config(directory) or {}
    except ValueError as err:
        raise DataError(f"cannot read the shard index in {shards_dir}: {err}") from err
    if not shards:
        warnings.warn(f"{shards_dir} lists no complete shards: nothing is excluded", stacklevel=2)
    ids = {sample_id for shard in shards for sample_id in shard.sample_ids}
    try:
        prompts = {record["problem"] for record in iter_records(directory) if record.get("problem")}
    except (OSError, ValueError, ShardCorruptError) as err:  # ids alone would miss the same problem elsewhere
        raise DataError(
            f"cannot read the records of the shards in {shards_dir} ({type(err).__name__}: {err}), so their "
            f"problems cannot be excluded by prompt text: check them with `llm-trm datagen --verify {shards_dir}`."
        ) from err
    return TrainedProblems(ids, prompts, datagen_config.get("split"))


def held_out_problems(
    datasets: str,
    split: str,
    num_samples: int,
    seed: int = 0,
    exclude_from: str | Path | None = None,
) -> list[Problem]:
    """Up to `num_samples` problems the TRM never saw: the datagen shards at `exclude_from` hold none of them.

    A problem is left out when its prompt text is in the shards' records, or its sample id is in
    their index. Sample ids ("dataset:index") do not name the split, so ids only count when the
    shards were generated from the same split (or do not record theirs): GSM8K test problem 3 is
    not train problem 3, while the same text in both splits is caught by the prompt.
    """
    trained = trained_problems(exclude_from) if exclude_from else TrainedProblems(set(), set(), None)
    same_split = trained.split is None or trained.split == split
    excluded_ids = trained.sample_ids if same_split else set()
    # ask for enough to replace every excluded one
    candidates = load_problems(datasets, split, num_samples + len(trained.sample_ids), seed)
    kept = [p for p in candidates if p.sample_id not in excluded_ids and p.prompt not in trained.prompts]
    kept = kept[:num_samples]
    if not kept:
        raise DataError(f"no held-out problems left in {datasets} ({split}) after excluding {exclude_from}.")
    if len(kept) < num_samples:
        warnings.warn(f"only {len(kept)} held-out problems available (asked for {num_samples})", stacklevel=2)
    return kept


# --------------------------------------------------------------------------- summary


@dataclass
class ModeSummary:
    mode: str
    problems: int
    checked: int  # problems with a gold answer / tests, answered or failed
    correct: int
    failed: int  # errors: did not fit the context, generation crashed
    accuracy: float
    ci_low: float
    ci_high: float
    mean_thinking_tokens: float
    mean_answer_tokens: float
    mean_generated_tokens: float
    mean_time_to_answer_s: float  # to the first answer token
    mean_total_time_s: float
    mean_trm_steps: float | None
    mean_trm_overhead_s: float | None
    speedup_vs_cot: float | None  # cot's mean time to answer / this mode's
    speedup_total_vs_cot: float | None


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(mode: str, results: Sequence[AnswerResult]) -> ModeSummary:
    """Accuracy counts a failed problem as wrong; tokens and times average the answered ones."""
    answered = [r for r in results if r.error is None]
    checked = [r for r in results if r.correct is not None or r.error is not None]
    correct = sum(1 for r in checked if r.correct)
    low, high = wilson_interval(correct, len(checked))
    trm_steps = [r.trm_steps for r in answered if r.trm_steps is not None]
    overheads = [r.trm_overhead_s for r in answered if r.trm_overhead_s is not None]
    return ModeSummary(
        mode=mode,
        problems=len(results),
        checked=len(checked),
        correct=correct,
        failed=len(results) - len(answered),
        accuracy=correct / len(checked) if checked else 0.0,
        ci_low=low,
        ci_high=high,
        mean_thinking_tokens=_mean([r.thinking_tokens for r in answered]),
        mean_answer_tokens=_mean([r.answer_tokens for r in answered]),
        mean_generated_tokens=_mean([r.generated_tokens for r in answered]),
        mean_time_to_answer_s=_mean([r.time_to_first_answer_token_s for r in answered]),
        mean_total_time_s=_mean([r.total_time_s for r in answered]),
        mean_trm_steps=_mean(trm_steps) if trm_steps else None,
        mean_trm_overhead_s=_mean(overheads) if overheads else None,
        speedup_vs_cot=None,
        speedup_total_vs_cot=None,
    )


def add_speedups(summaries: list[ModeSummary]) -> None:
    cot = next((s for s in summaries if s.mode == "cot"), None)
    if cot is None:
        return
    for summary in summaries:
        if summary.mean_time_to_answer_s > 0:
            summary.speedup_vs_cot = cot.mean_time_to_answer_s / summary.mean_time_to_answer_s
        if summary.mean_total_time_s > 0:
            summary.speedup_total_vs_cot = cot.mean_total_time_s / summary.mean_total_time_s


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def render_table(summaries: Sequence[ModeSummary], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for column in ("mode", "accuracy (95% CI)", "failed", "think tok", "answer tok",
                   "time to answer", "total time", "TRM steps", "speed-up vs cot"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for s in summaries:
        table.add_row(
            s.mode,
            f"{s.accuracy:.1%} [{s.ci_low:.1%}, {s.ci_high:.1%}] ({s.correct}/{s.checked})",
            str(s.failed),
            f"{s.mean_thinking_tokens:.1f}",
            f"{s.mean_answer_tokens:.1f}",
            f"{s.mean_time_to_answer_s:.2f} s",
            f"{s.mean_total_time_s:.2f} s",
            _fmt(s.mean_trm_steps, "{:.2f}"),
            _fmt(s.speedup_vs_cot, "{:.1f}x"),
        )
    return table


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        if not rows:
            return
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_accuracy_vs_tokens(summaries: Sequence[ModeSummary], path: Path | None = None) -> Any:
    """One point per mode: mean generated tokens vs accuracy, with the 95% interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for s in summaries:
        error = [[s.accuracy - s.ci_low], [s.ci_high - s.accuracy]]
        axes.errorbar(s.mean_generated_tokens, s.accuracy, yerr=error, fmt="o", capsize=4, label=s.mode)
    axes.set_xlabel("mean generated tokens per problem (thinking + answer)")
    axes.set_ylabel("accuracy (95% Wilson CI)")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(loc="best")
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def log_to_tensorboard(output_dir: Path, summaries: Sequence[ModeSummary], figure: Any, table_markdown: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
    try:
        for s in summaries:
            for name, value in asdict(s).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "mode":
                    writer.add_scalar(f"eval/{s.mode}/{name}", value, 0)
        writer.add_figure("eval/accuracy_vs_tokens", figure, 0)
        writer.add_text("eval/summary", table_markdown, 0)
    finally:
        writer.close()


def markdown_table(summaries: Sequence[ModeSummary]) -> str:
    lines = ["| mode | accuracy [95% CI] | failed | mean tokens | time to answer (s) | total (s) | speed-up vs cot |",
             "|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s.mode} | {s.accuracy:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}] | {s.failed} | "
                     f"{s.mean_generated_tokens:.1f} | {s.mean_time_to_answer_s:.3f} | {s.mean_total_time_s:.3f} | "
                     f"{_fmt(s.speedup_vs_cot, '{:.1f}x')} |")
    return "\n".join(lines)


def write_report(output_dir: str | Path, config: dict[str, Any], summaries: list[ModeSummary],
                 results: dict[str, list[AnswerResult]]) -> dict[str, Path]:
    """results.json, summary.csv, results.csv, accuracy_vs_tokens.png and TensorBoard logs in `output_dir`."""
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: output_dir / name for name in (RESULTS_JSON, SUMMARY_CSV, RESULTS_CSV, PLOT_PNG)}
    payload = {
        "config": config,
        "summary": [asdict(s) for s in summaries],
        "results": {mode: [r.to_dict() for r in rows] for mode, rows in results.items()},
    }
    paths[RESULTS_JSON].write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    _write_csv(paths[SUMMARY_CSV], [asdict(s) for s in summaries])
    _write_csv(paths[RESULTS_CSV], [r.to_dict() for rows in results.values() for r in rows])
    figure = plot_accuracy_vs_tokens(summaries, paths[PLOT_PNG])
    log_to_tensorboard(output_dir, summaries, figure, markdown_table(summaries))
    plt.close(figure)
    return paths


# --------------------------------------------------------------------------- run


def _progress_bar(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled)


def failed_results(problems: Sequence[Problem], mode: str, error: BaseException) -> list[AnswerResult]:
    message = f"{type(error).__name__}: {error}".splitlines()[0]
    return [AnswerResult(sample_id=p.sample_id, mode=mode, error=message) for p in problems]


def run_modes(reasoner: LatentReasoner, problems: Sequence[Problem], config: Namespace) -> dict[str, list[AnswerResult]]:
    """Every mode over the same problems, with a progress bar; a mode that crashes counts as failed."""
    results: dict[str, list[AnswerResult]] = {}
    with _progress_bar(config.progress) as progress:
        for mode in config.modes:
            task = progress.add_task(f"{mode:<16}", total=len(problems))
            try:
                results[mode] = reasoner.answer(
                    problems,
                    mode=mode,
                    max_new_tokens=config.max_new_tokens,
                    max_thinking_tokens=config.max_thinking_tokens,
                    batch_size=config.batch_size,
                    n_supervision_steps=config.n_supervision_steps,
                    on_error="record",
                    progress=lambda n, task=task: progress.advance(task, n),
                )
            except Exception as error:  # noqa: BLE001 - the report is written whatever happens
                results[mode] = failed_results(problems, mode, error)
            progress.update(task, completed=len(problems))
    return results


def evaluate(config: Namespace, reasoner: LatentReasoner | None = None) -> tuple[list[ModeSummary], dict[str, Path]]:
    """Run the evaluation a parsed config describes; returns the summaries and the report files."""
    from rich.console import Console

    has_trm = reasoner.has_trm if reasoner is not None else bool(config.compressor and config.trm)
    config.modes = check_modes(config.modes, has_trm)
    problems = held_out_problems(config.datasets, config.split, config.num_samples, config.seed, config.exclude_from)
    if reasoner is None:
        reasoner = LatentReasoner(
            config.backbone,
            compressor=config.compressor,
            trm=config.trm,
            adapter=config.adapter,
            n_soft_vectors=config.n_soft_vectors,
            layer=config.layer,
            dtype=config.dtype,
            device=config.device,
            trust_remote_code=config.trust_remote_code,
            attn_implementation=config.attn_implementation,
            allow_unchecked_artifacts=config.allow_unchecked_artifacts,
        )
    started = time.perf_counter()
    results = run_modes(reasoner, problems, config)
    summaries = [summarize(mode, rows) for mode, rows in results.items()]
    add_speedups(summaries)
    plain_config = {k: v for k, v in config.as_dict().items() if k != "config"}
    plain_config["problems"] = [p.sample_id for p in problems]
    plain_config["wall_time_s"] = time.perf_counter() - started
    paths = write_report(config.output_dir, plain_config, summaries, results)
    # piped output (logs, CI) gets a wide console so the table is not squeezed into 80 columns
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(render_table(summaries, f"{config.datasets} ({config.split}), {len(problems)} held-out problems"))
    console.print(f"report: {', '.join(str(p) for p in paths.values())}; TensorBoard: {Path(config.output_dir) / 'tensorboard'}")
    return summaries, paths


def main(argv: list[str]) -> int:
    config = build_parser().parse_args(argv)
    evaluate(config)
    return 0
