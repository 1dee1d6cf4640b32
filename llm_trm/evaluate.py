"""`llm-trm evaluate`: answer held-out problems with CoT, without thinking, with the TRM and the oracles; compare.

    llm-trm evaluate --config configs/eval/gsm8k.yaml [--num_samples 100 --modes '[no_think, trm]']
    llm-trm evaluate --config configs/demo/evaluate.yaml

Problems come from the registry (`datasets`, `split`, `seed`); every problem the TRM
trained on is left out: each problem whose prompt text appears in the records of the
datagen shards at `exclude_from`, and each sample id in their index (when the shards
come from the same split: ids do not name their split).

The report (printed as two tables; written to `output_dir` as results.json, summary.csv,
results.csv, accuracy_vs_tokens.png and fidelity_ladder.png; logged to TensorBoard under
`eval/<mode>/...`) gives per mode, on the same problems:

- accuracy with a 95% Wilson interval (a failed problem counts as wrong; one whose answer
  checker raised is counted apart, `checker_errors`), mean thinking/answer tokens, mean time
  to the first answer token and to the end, and the speed-up over `cot`;
- CoT fidelity (`llm_trm.eval.fidelity`), which works when accuracy is 0 everywhere:
  agreement of the final answer and of the first answer token with `cot`'s (Wilson),
  KL(cot || mode) of the first answer token's distribution (rows where a mode wrote no
  answer are left out and counted), the answer KL (cot's own answer teacher-forced under cot's
  context and under the mode's, KL(cot || mode) averaged over its tokens: the content-bearing
  one, since a templated answer starts with the same token in every mode) with the answer's NLL
  under the mode, and the share of CoT's effect recovered, `(mode - no_think) / (cot - no_think)`,
  for accuracy, both agreements and both KLs (paired bootstrap over problems, seeded; cot's KLs
  are 0). `trm_first_token` gets no answer KL (its first token is lm_head's, not the LLM's).

Timing is steady state: every mode answers one small batch, discarded, before any timed run,
so one-time costs are not paid by whichever mode runs first; `cot` is one continuous
generation (thinking, then answer) with its own KV cache. `cot` runs first (its first-token
distributions are the reference); the report keeps the order of `modes`.

A problem that fails (does not fit the context, crashes the generation) is counted and reported
and the report is always written; the command exits non-zero when a mode crashed.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from jsonargparse.typing import NonNegativeInt, PositiveInt

from llm_trm.data.problems import Problem, load_problems
from llm_trm.data.shards import ShardCorruptError, iter_records, read_datagen_config, read_index
from llm_trm.errors import DataError
from llm_trm.eval.fidelity import (BOOTSTRAP_RESAMPLES, Estimate, answers_agree, bootstrap_mean, first_token_kl,
                                   proportion, share_recovered)
from llm_trm.inference import (COMPRESSOR_MODES, LATENT_MODES, MODES, ORACLE_MODES, THINKING_MODES, AnswerResult,
                               LatentReasoner, wilson_interval)

DESCRIPTION = ("answer held-out problems with CoT / no thinking / the TRM / the oracles; report accuracy, "
               "CoT fidelity, tokens, latency")

RESULTS_JSON, SUMMARY_CSV, RESULTS_CSV, PLOT_PNG = "results.json", "summary.csv", "results.csv", "accuracy_vs_tokens.png"
FIDELITY_PNG = "fidelity_ladder.png"
# the ladder the fidelity figure draws, from no thinking to the LLM's own thinking
LADDER = ("no_think", "shuffled", "trm_first_token", "trm", "oracle", "oracle_full", "cot")
# warm-up: one small batch per mode (two problems: `shuffled` needs a pair), this many answer / thinking tokens
WARMUP_PROBLEMS, WARMUP_TOKENS = 2, 2


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
    parser.add_argument("--modes", type=list[str], default=list(MODES),
                        help=f"any of {', '.join(MODES)}, each once")
    parser.add_argument("--batch_size", type=PositiveInt, default=8)
    parser.add_argument("--max_new_tokens", type=PositiveInt, default=256, help="answer budget")
    parser.add_argument("--max_thinking_tokens", type=NonNegativeInt, default=512,
                        help="thinking budget (cot and the oracle modes; 0 only without them)")
    parser.add_argument("--n_supervision_steps", type=PositiveInt | None, default=None, help="override the TRM's N_sup")
    parser.add_argument("--warmup", type=bool, default=True,
                        help="answer one small batch per mode, discarded, before timing (steady-state times)")
    parser.add_argument("--bootstrap_resamples", type=PositiveInt, default=BOOTSTRAP_RESAMPLES,
                        help="resamples of the paired bootstrap behind the KL and share intervals")
    parser.add_argument("--bootstrap_seed", type=int, default=0, help="seed of the bootstrap resamples")
    parser.add_argument("--shuffle_seed", type=int, default=0,
                        help="seed of the derangement that gives each problem another's state (`shuffled`)")
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


def check_modes(modes: Sequence[str], has_trm: bool, has_compressor: bool | None = None,
                max_thinking_tokens: int = 1) -> list[str]:
    """The modes, checked before anything runs: known, each once, their parts given, a thinking budget
    for the modes that think. One line each."""
    has_compressor = has_trm if has_compressor is None else has_compressor
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise DataError(f"unknown or no modes {unknown or list(modes)}: use any of {', '.join(MODES)}.")
    repeated = sorted({m for m in modes if list(modes).count(m) > 1})
    if repeated:
        raise DataError(f"modes lists {', '.join(repeated)} more than once: list each mode once.")
    if not has_trm and any(m in LATENT_MODES for m in modes):
        raise DataError("modes trm / trm_first_token need `compressor` and `trm`: set both or drop those modes.")
    if not has_compressor and any(m in COMPRESSOR_MODES for m in modes):
        raise DataError("modes oracle / shuffled send the true state through the compressor: set `compressor` "
                        "or drop those modes (oracle_full needs none).")
    thinking = [m for m in modes if m in THINKING_MODES]
    if thinking and max_thinking_tokens < 1:
        raise DataError(f"modes {', '.join(thinking)} need the LLM to think, but max_thinking_tokens is "
                        f"{max_thinking_tokens}: raise it or drop those modes.")
    return list(modes)


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
    checked: int  # problems with a gold answer / tests, answered (and checked) or failed
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
    speedup_vs_cot: float | None  # cot's mean time to answer / this mode's (None for the oracle modes)
    speedup_total_vs_cot: float | None
    crashed: int = 0  # problems whose generation raised (the mode failed)
    checker_errors: int = 0  # answers whose checker raised: neither right nor wrong, left out of `checked`
    first_crash: str | None = None
    # CoT fidelity (None without cot, or where undefined); intervals are 95%
    answer_agreement: float | None = None  # final answer (extracted, normalised) = cot's
    answer_agreement_ci_low: float | None = None
    answer_agreement_ci_high: float | None = None
    answer_agreement_rows: int = 0
    first_token_agreement: float | None = None  # first answer token = cot's
    first_token_agreement_ci_low: float | None = None
    first_token_agreement_ci_high: float | None = None
    first_token_rows: int = 0
    kl_to_cot: float | None = None  # mean KL(cot || mode) of the first answer token, nats
    kl_ci_low: float | None = None
    kl_ci_high: float | None = None
    kl_rows: int = 0
    kl_missing: int = 0  # problems where cot answered and this mode wrote no answer: left out of the KL
    # cot's answer teacher-forced after cot's context and after this mode's (None for trm_first_token)
    answer_kl: float | None = None  # mean over problems of the mean KL(cot || mode) per answer token, nats
    answer_kl_ci_low: float | None = None
    answer_kl_ci_high: float | None = None
    answer_kl_rows: int = 0
    answer_nll: float | None = None  # mean over problems of the NLL per token of cot's answer under this mode
    answer_nll_ci_low: float | None = None
    answer_nll_ci_high: float | None = None
    # share of CoT's effect recovered: (mode - no_think) / (cot - no_think); None when cot = no_think
    share_accuracy: float | None = None
    share_accuracy_ci_low: float | None = None
    share_accuracy_ci_high: float | None = None
    share_answer_agreement: float | None = None
    share_answer_agreement_ci_low: float | None = None
    share_answer_agreement_ci_high: float | None = None
    share_first_token_agreement: float | None = None
    share_first_token_agreement_ci_low: float | None = None
    share_first_token_agreement_ci_high: float | None = None
    share_kl: float | None = None
    share_kl_ci_low: float | None = None
    share_kl_ci_high: float | None = None
    share_answer_kl: float | None = None  # (answer KL of no_think - this mode's) / (no_think's - 0)
    share_answer_kl_ci_low: float | None = None
    share_answer_kl_ci_high: float | None = None


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(mode: str, results: Sequence[AnswerResult]) -> ModeSummary:
    """Accuracy counts a failed problem as wrong and leaves a checker error out; tokens and times
    average the answered problems."""
    answered = [r for r in results if r.error is None]
    checked = [r for r in results if r.correct is not None or r.error is not None]
    correct = sum(1 for r in checked if r.correct)
    low, high = wilson_interval(correct, len(checked))
    trm_steps = [r.trm_steps for r in answered if r.trm_steps is not None]
    overheads = [r.trm_overhead_s for r in answered if r.trm_overhead_s is not None]
    crashes = [r for r in results if r.crashed]
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
        crashed=len(crashes),
        checker_errors=sum(1 for r in results if r.checker_error is not None),
        first_crash=crashes[0].error if crashes else None,
    )


def add_speedups(summaries: list[ModeSummary]) -> None:
    """cot's times over each mode's; none for the oracle modes, which think as cot does and save no time."""
    cot = next((s for s in summaries if s.mode == "cot"), None)
    if cot is None:
        return
    for summary in summaries:
        if summary.mode in ORACLE_MODES:
            continue
        if summary.mean_time_to_answer_s > 0:
            summary.speedup_vs_cot = cot.mean_time_to_answer_s / summary.mean_time_to_answer_s
        if summary.mean_total_time_s > 0:
            summary.speedup_total_vs_cot = cot.mean_total_time_s / summary.mean_total_time_s


# --------------------------------------------------------------------------- CoT fidelity


def compare_with_cot(rows: Sequence[AnswerResult], cot_rows: Sequence[AnswerResult],
                     problems: Sequence[Problem]) -> None:
    """Fill each row's `kl_to_cot`, `answer_agrees_with_cot` and `first_token_agrees_with_cot` against the
    cot row of the same problem (from the captured first-token logits and the extracted answers)."""
    for row, cot, problem in zip(rows, cot_rows, problems, strict=True):
        cot_answer = cot.extracted_answer if cot.error is None else None
        row.answer_agrees_with_cot = answers_agree(row.extracted_answer if row.error is None else None, cot_answer,
                                                   problem.kind)
        if cot.first_token_logits is None or row.first_token_logits is None:
            row.kl_to_cot = row.first_token_agrees_with_cot = None
            continue
        kl = first_token_kl(cot.first_token_logits[None], row.first_token_logits[None])
        row.kl_to_cot = float(kl[0])
        row.first_token_agrees_with_cot = row.first_answer_token == cot.first_answer_token


def _correct_values(rows: Sequence[AnswerResult]) -> list[float]:
    """Per problem: 1 right, 0 wrong or failed (as accuracy counts them), NaN nothing to check / checker error."""
    return [0.0 if r.error is not None else math.nan if r.correct is None else float(r.correct) for r in rows]


def _float_values(rows: Sequence[AnswerResult], name: str) -> list[float]:
    """Per problem, the field `name` as a float (a yes/no as 1/0), NaN where it is None."""
    return [math.nan if getattr(r, name) is None else float(getattr(r, name)) for r in rows]


def _set(summary: ModeSummary, name: str, estimate: Estimate, low: str | None = None, high: str | None = None) -> None:
    setattr(summary, name, estimate.value)
    setattr(summary, low or f"{name}_ci_low", estimate.low)
    setattr(summary, high or f"{name}_ci_high", estimate.high)


def add_fidelity(summaries: Sequence[ModeSummary], results: dict[str, list[AnswerResult]],
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> None:
    """The CoT-fidelity fields of each summary from the rows' per-problem values (after `compare_with_cot`).

    Needs `cot` (the reference); the shares also need `no_think` (the baseline). All modes answered
    the same problems in the same order, so problem i is row i of every mode.
    """
    if "cot" not in results:
        return
    values = {mode: {"accuracy": _correct_values(rows),
                     "answer_agreement": _float_values(rows, "answer_agrees_with_cot"),
                     "first_token_agreement": _float_values(rows, "first_token_agrees_with_cot"),
                     "kl": _float_values(rows, "kl_to_cot"),
                     "answer_kl": _float_values(rows, "answer_kl_to_cot"),
                     "answer_nll": _float_values(rows, "cot_answer_nll")} for mode, rows in results.items()}
    cot, baseline = values["cot"], values.get("no_think")
    # cot's answer KL to itself is 0 by definition: the share's reference
    cot = {**cot, "answer_kl": [0.0] * len(cot["answer_kl"])}
    cot_has_kl = [not math.isnan(v) for v in cot["kl"]]
    for summary in summaries:
        mine = values[summary.mode]
        agreement = proportion(mine["answer_agreement"])
        _set(summary, "answer_agreement", agreement)
        summary.answer_agreement_rows = agreement.rows
        first = proportion(mine["first_token_agreement"])
        _set(summary, "first_token_agreement", first)
        summary.first_token_rows = first.rows
        kl = bootstrap_mean(mine["kl"], resamples, seed)
        _set(summary, "kl_to_cot", kl, "kl_ci_low", "kl_ci_high")
        summary.kl_rows = kl.rows
        summary.kl_missing = sum(1 for has, v in zip(cot_has_kl, mine["kl"]) if has and math.isnan(v))
        answer_kl = bootstrap_mean(mine["answer_kl"], resamples, seed)
        _set(summary, "answer_kl", answer_kl)
        summary.answer_kl_rows = answer_kl.rows
        _set(summary, "answer_nll", bootstrap_mean(mine["answer_nll"], resamples, seed))
        if baseline is None:
            continue
        for name, share in (("accuracy", "share_accuracy"), ("answer_agreement", "share_answer_agreement"),
                            ("first_token_agreement", "share_first_token_agreement"), ("kl", "share_kl"),
                            ("answer_kl", "share_answer_kl")):
            _set(summary, share, share_recovered(mine[name], baseline[name], cot[name], resamples, seed))


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _fmt_interval(value: float | None, low: float | None, high: float | None, pattern: str = "{:.2f}") -> str:
    """`value [low, high]`; `-` when undefined; `value [-]` when only the interval is."""
    if value is None:
        return "-"
    if low is None or high is None:
        return f"{pattern.format(value)} [-]"
    return f"{pattern.format(value)} [{pattern.format(low)}, {pattern.format(high)}]"


def render_table(summaries: Sequence[ModeSummary], title: str) -> Any:
    """Accuracy, failures, tokens and times per mode."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("mode", "accuracy (95% CI)", "failed", "checker errors", "think tok", "answer tok",
                   "time to answer", "total time", "TRM steps", "speed-up vs cot"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for s in summaries:
        table.add_row(
            s.mode,
            f"{s.accuracy:.1%} [{s.ci_low:.1%}, {s.ci_high:.1%}] ({s.correct}/{s.checked})",
            str(s.failed),
            str(s.checker_errors),
            f"{s.mean_thinking_tokens:.1f}",
            f"{s.mean_answer_tokens:.1f}",
            f"{s.mean_time_to_answer_s:.2f} s",
            f"{s.mean_total_time_s:.2f} s",
            _fmt(s.mean_trm_steps, "{:.2f}"),
            _fmt(s.speedup_vs_cot, "{:.1f}x"),
        )
    return table


def render_fidelity_table(summaries: Sequence[ModeSummary], title: str) -> Any:
    """CoT fidelity per mode, with 95% intervals."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("mode", "answer = cot's", "1st token = cot's", "KL(cot‖mode)", "no answer", "answer KL",
                   "answer NLL", "share: accuracy", "share: answer", "share: 1st token", "share: KL",
                   "share: answer KL"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for s in summaries:
        table.add_row(
            s.mode,
            _fmt_interval(s.answer_agreement, s.answer_agreement_ci_low, s.answer_agreement_ci_high),
            _fmt_interval(s.first_token_agreement, s.first_token_agreement_ci_low, s.first_token_agreement_ci_high),
            _fmt_interval(s.kl_to_cot, s.kl_ci_low, s.kl_ci_high, "{:.3g}"),
            str(s.kl_missing),
            _fmt_interval(s.answer_kl, s.answer_kl_ci_low, s.answer_kl_ci_high, "{:.3g}"),
            _fmt(s.answer_nll, "{:.3g}"),
            _fmt_interval(s.share_accuracy, s.share_accuracy_ci_low, s.share_accuracy_ci_high),
            _fmt_interval(s.share_answer_agreement, s.share_answer_agreement_ci_low, s.share_answer_agreement_ci_high),
            _fmt_interval(s.share_first_token_agreement, s.share_first_token_agreement_ci_low,
                          s.share_first_token_agreement_ci_high),
            _fmt_interval(s.share_kl, s.share_kl_ci_low, s.share_kl_ci_high),
            _fmt_interval(s.share_answer_kl, s.share_answer_kl_ci_low, s.share_answer_kl_ci_high),
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


def plot_fidelity_ladder(summaries: Sequence[ModeSummary], path: Path | None = None) -> Any:
    """The ladder of modes (no_think ... cot): KL(cot || mode) of the first answer token and of the whole answer,
    and the share of CoT's KL reduction recovered on each."""
    from llm_trm.eval.figures import fidelity_ladder

    ordered = sorted(summaries, key=lambda s: LADDER.index(s.mode) if s.mode in LADDER else len(LADDER))
    figure = fidelity_ladder([s.mode for s in ordered],
                             [(s.kl_to_cot, s.kl_ci_low, s.kl_ci_high) for s in ordered],
                             [(s.share_kl, s.share_kl_ci_low, s.share_kl_ci_high) for s in ordered],
                             [(s.answer_kl, s.answer_kl_ci_low, s.answer_kl_ci_high) for s in ordered],
                             [(s.share_answer_kl, s.share_answer_kl_ci_low, s.share_answer_kl_ci_high)
                              for s in ordered])
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def log_to_tensorboard(output_dir: Path, summaries: Sequence[ModeSummary], figures: dict[str, Any],
                       table_markdown: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
    try:
        for s in summaries:
            for name, value in asdict(s).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "mode":
                    writer.add_scalar(f"eval/{s.mode}/{name}", value, 0)
        for name, figure in figures.items():
            writer.add_figure(f"eval/{name}", figure, 0, close=False)
        writer.add_text("eval/summary", table_markdown, 0)
    finally:
        writer.close()


def markdown_table(summaries: Sequence[ModeSummary], notes: Sequence[str] = ()) -> str:
    lines = ["| mode | accuracy [95% CI] | failed | checker errors | mean tokens | time to answer (s) | total (s) "
             "| speed-up vs cot |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s.mode} | {s.accuracy:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}] | {s.failed} | "
                     f"{s.checker_errors} | {s.mean_generated_tokens:.1f} | {s.mean_time_to_answer_s:.3f} | "
                     f"{s.mean_total_time_s:.3f} | {_fmt(s.speedup_vs_cot, '{:.1f}x')} |")
    lines += ["", "| mode | answer = cot's | first token = cot's | KL(cot ‖ mode) | no answer | answer KL "
              "| answer NLL | share: accuracy | share: answer | share: first token | share: KL | share: answer KL |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(
            f"| {s.mode} | {_fmt_interval(s.answer_agreement, s.answer_agreement_ci_low, s.answer_agreement_ci_high)} "
            f"| {_fmt_interval(s.first_token_agreement, s.first_token_agreement_ci_low, s.first_token_agreement_ci_high)} "
            f"| {_fmt_interval(s.kl_to_cot, s.kl_ci_low, s.kl_ci_high, '{:.3g}')} | {s.kl_missing} "
            f"| {_fmt_interval(s.answer_kl, s.answer_kl_ci_low, s.answer_kl_ci_high, '{:.3g}')} "
            f"| {_fmt(s.answer_nll, '{:.3g}')} "
            f"| {_fmt_interval(s.share_accuracy, s.share_accuracy_ci_low, s.share_accuracy_ci_high)} "
            f"| {_fmt_interval(s.share_answer_agreement, s.share_answer_agreement_ci_low, s.share_answer_agreement_ci_high)} "
            f"| {_fmt_interval(s.share_first_token_agreement, s.share_first_token_agreement_ci_low, s.share_first_token_agreement_ci_high)} "
            f"| {_fmt_interval(s.share_kl, s.share_kl_ci_low, s.share_kl_ci_high)} "
            f"| {_fmt_interval(s.share_answer_kl, s.share_answer_kl_ci_low, s.share_answer_kl_ci_high)} |")
    return "\n".join(lines + ([""] + [f"- {note}" for note in notes] if notes else []))


def write_report(output_dir: str | Path, config: dict[str, Any], summaries: list[ModeSummary],
                 results: dict[str, list[AnswerResult]]) -> dict[str, Path]:
    """results.json, summary.csv, results.csv, the two figures and TensorBoard logs in `output_dir`."""
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: output_dir / name for name in (RESULTS_JSON, SUMMARY_CSV, RESULTS_CSV, PLOT_PNG, FIDELITY_PNG)}
    payload = {
        "config": config,
        "summary": [asdict(s) for s in summaries],
        "results": {mode: [r.to_dict() for r in rows] for mode, rows in results.items()},
    }
    paths[RESULTS_JSON].write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    _write_csv(paths[SUMMARY_CSV], [asdict(s) for s in summaries])
    _write_csv(paths[RESULTS_CSV], [r.to_dict() for rows in results.values() for r in rows])
    figures = {"accuracy_vs_tokens": plot_accuracy_vs_tokens(summaries, paths[PLOT_PNG]),
               "fidelity_ladder": plot_fidelity_ladder(summaries, paths[FIDELITY_PNG])}
    log_to_tensorboard(output_dir, summaries, figures, markdown_table(summaries, config.get("notes", [])))
    plt.close(figures["accuracy_vs_tokens"])
    return paths


# --------------------------------------------------------------------------- run


def _progress_bar(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled)


def failed_results(problems: Sequence[Problem], mode: str, error: BaseException) -> list[AnswerResult]:
    message = f"{type(error).__name__}: {error}".splitlines()[0]
    return [AnswerResult(sample_id=p.sample_id, mode=mode, error=message, crashed=True) for p in problems]


def execution_order(modes: Sequence[str]) -> list[str]:
    """cot first (its first-token distributions are the reference the others are compared with as they
    finish, so only cot's are kept), then the others in the order given."""
    return sorted(modes, key=lambda mode: mode != "cot")


def warm_up(reasoner: LatentReasoner, modes: Sequence[str], problems: Sequence[Problem], batch_size: int,
            max_new_tokens: int, max_thinking_tokens: int) -> float:
    """Answer one small batch (WARMUP_PROBLEMS problems, at most WARMUP_TOKENS answer / thinking tokens) in
    every mode and discard it: the one-time costs (first kernels, allocations, lazy initialisation) are paid
    here, not by whichever mode is timed first. Returns the seconds it took."""
    started = time.perf_counter()
    batch = list(problems[:WARMUP_PROBLEMS])
    for mode in modes:
        try:
            reasoner.answer(batch, mode=mode, max_new_tokens=min(WARMUP_TOKENS, max_new_tokens),
                            max_thinking_tokens=min(WARMUP_TOKENS, max_thinking_tokens),
                            batch_size=min(batch_size, WARMUP_PROBLEMS), on_error="record")
        except Exception:  # noqa: BLE001 - a mode that cannot run fails (and is recorded) in its timed run
            continue
    return time.perf_counter() - started


def cot_reference(mode: str, results: dict[str, list[AnswerResult]]) -> list[AnswerResult] | str | None:
    """What a mode's answers are scored against (`LatentReasoner.answer(reference=...)`): cot's results, which
    cot (run first) scores as its own; None without cot."""
    if mode == "cot":
        return "own"
    return results.get("cot")


def run_modes(reasoner: LatentReasoner, problems: Sequence[Problem], config: Namespace) -> dict[str, list[AnswerResult]]:
    """Every mode over the same problems (cot first), with a progress bar; a mode that crashes is recorded as
    failed on every problem. Each mode's rows are compared with cot's as soon as they exist. Returned in the
    order of `config.modes`."""
    results: dict[str, list[AnswerResult]] = {}
    with _progress_bar(config.progress) as progress:
        for mode in execution_order(config.modes):
            task = progress.add_task(f"{mode:<16}", total=len(problems))
            try:
                rows = reasoner.answer(
                    problems,
                    mode=mode,
                    max_new_tokens=config.max_new_tokens,
                    max_thinking_tokens=config.max_thinking_tokens,
                    batch_size=config.batch_size,
                    n_supervision_steps=config.n_supervision_steps,
                    on_error="record",
                    progress=lambda n, task=task: progress.advance(task, n),
                    capture_logits=True,
                    shuffle_seed=config.shuffle_seed,
                    reference=cot_reference(mode, results),
                )
            except Exception as error:  # noqa: BLE001 - the report is written whatever happens
                rows = failed_results(problems, mode, error)
            progress.update(task, completed=len(problems))
            results[mode] = rows
            if "cot" in results:
                compare_with_cot(rows, results["cot"], problems)
            if mode != "cot":  # only the reference's distributions are kept (one [V] row per problem)
                for row in rows:
                    row.first_token_logits = None
    for row in results.get("cot", []):
        row.first_token_logits = None
    return {mode: results[mode] for mode in config.modes}


def report_notes(config: Namespace, warmup_s: float | None) -> list[str]:
    """What the numbers mean: how each mode was timed, and how the fidelity intervals were made."""
    budget = (f"{min(WARMUP_TOKENS, config.max_new_tokens)} answer / "
              f"{min(WARMUP_TOKENS, config.max_thinking_tokens)} thinking tokens")
    notes = [
        (f"Times are steady state: before any timed run every mode answered one warm-up batch of "
         f"{WARMUP_PROBLEMS} problems ({budget}), discarded ({warmup_s:.1f} s), so one-time costs are not paid "
         "by the first mode timed."
         if warmup_s is not None else
         "No warm-up (warmup: false): the first mode timed pays the one-time costs (first kernels, allocations)."),
        ("cot is timed as a user of the LLM runs it: one continuous generation (thinking, then the answer) with "
         "its own KV cache; trm / trm_first_token from the prompt pass (KV cache + states) to the answer; times "
         f"per problem from the start of its batch (batch size {config.batch_size})."),
        ("Oracle modes (oracle, oracle_full, shuffled) think as cot does (the same thinking, remembered) and are "
         "timed from when the true state exists; they save no time, so no speed-up is given."),
        (f"Modes ran in the order {', '.join(execution_order(config.modes))} (cot first: the fidelity reference)."),
        ("Fidelity: reference cot, baseline no_think; share = (mode - no_think) / (cot - no_think), '-' where cot "
         "and no_think do not differ (nothing to recover); agreement intervals are Wilson 95%, KL and share "
         f"intervals a paired percentile bootstrap over problems ({config.bootstrap_resamples} resamples, seed "
         f"{config.bootstrap_seed}); 'no answer' counts problems left out of the KL because the mode wrote no answer."),
        # no square brackets: the console reads them as markup
        ("Answer KL: cot's own answer (at most max_new_tokens, cut at the end of the turn) teacher-forced after "
         "cot's context (prompt, its thinking, the closing suffix) and after the mode's (no_think: its prompt; the "
         "latent and oracle modes: prompt, soft vectors, closing suffix), KL(cot || mode) averaged over the answer's "
         "tokens, then over problems (nats); answer NLL: cot's answer tokens under the mode, per token. Unlike the "
         "first answer token (the same word in every mode of a templated answer), it sees the answer's content "
         "move. trm_first_token is not scored (its first token is lm_head's, not the LLM's)."),
    ]
    return notes


def evaluate(config: Namespace, reasoner: LatentReasoner | None = None) -> tuple[list[ModeSummary], dict[str, Path]]:
    """Run the evaluation a parsed config describes; returns the summaries and the report files."""
    from rich.console import Console

    has_trm = reasoner.has_trm if reasoner is not None else bool(config.compressor and config.trm)
    has_compressor = reasoner.has_compressor if reasoner is not None else bool(config.compressor)
    config.modes = check_modes(config.modes, has_trm, has_compressor, config.max_thinking_tokens)
    problems = held_out_problems(config.datasets, config.split, config.num_samples, config.seed, config.exclude_from)
    if "shuffled" in config.modes and len(problems) < 2:
        raise DataError("mode shuffled gives each problem another problem's state: it needs at least 2 problems, "
                        f"got {len(problems)}: raise num_samples or drop the mode.")
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
    warmup_s = (warm_up(reasoner, execution_order(config.modes), problems, config.batch_size, config.max_new_tokens,
                        config.max_thinking_tokens) if config.warmup else None)
    results = run_modes(reasoner, problems, config)
    summaries = [summarize(mode, rows) for mode, rows in results.items()]
    add_speedups(summaries)
    add_fidelity(summaries, results, config.bootstrap_resamples, config.bootstrap_seed)
    notes = report_notes(config, warmup_s)
    plain_config = {k: v for k, v in config.as_dict().items() if k != "config"}
    plain_config["problems"] = [p.sample_id for p in problems]
    plain_config["wall_time_s"] = time.perf_counter() - started
    plain_config["warmup_s"] = warmup_s
    plain_config["notes"] = notes
    paths = write_report(config.output_dir, plain_config, summaries, results)
    # piped output (logs, CI) gets a wide console so the table is not squeezed into 80 columns
    console = Console(width=None if sys.stdout.isatty() else 200)
    title = f"{config.datasets} ({config.split}), {len(problems)} held-out problems"
    console.print(render_table(summaries, title))
    if "cot" in results:
        console.print(render_fidelity_table(summaries, "CoT fidelity (95% intervals; reference cot, baseline no_think)"))
    for note in notes:
        console.print(f"- {note}", soft_wrap=True, highlight=False)
    console.print(f"report: {', '.join(str(p) for p in paths.values())}; TensorBoard: {Path(config.output_dir) / 'tensorboard'}")
    return summaries, paths


def main(argv: list[str]) -> int:
    config = build_parser().parse_args(argv)
    summaries, paths = evaluate(config)
    crashed = [s for s in summaries if s.crashed]
    if crashed:
        what = "; ".join(f"{s.mode} on {s.crashed} of {s.problems} problems ({s.first_crash})" for s in crashed)
        print(f"llm-trm: error: mode(s) crashed: {what}. The report is written to {paths[RESULTS_JSON].parent} "
              f"({RESULTS_JSON} holds each crashed problem's error).", file=sys.stderr)
        return 1
    return 0
