"""Figures for TensorBoard and the notebooks.

The plotting functions are pure: they take numbers and return a `matplotlib.figure.Figure`
built with the object-oriented API (never pyplot), so they need no display, leave nothing
open in pyplot's registry and render with the Agg canvas. `log_figure` adds one to the
TensorBoard loggers of a Lightning run, from global rank zero, building it only when
some logger will receive it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from matplotlib.figure import Figure
from torch import Tensor

QUALITY_LABELS = {"cosine": "cosine", "centred_cosine": "centred cosine", "explained_variance": "R² (explained variance)"}


def _values(values: Tensor | Sequence[float]) -> list[float]:
    return torch.as_tensor(values, dtype=torch.float64).flatten().tolist()


def pca_spectrum(eigenvalues: Tensor | Sequence[float], d_compressed: int) -> Figure:
    """Eigenvalues of the uncentred second moment (log scale) and the energy they capture, D' marked."""
    values = torch.as_tensor(eigenvalues, dtype=torch.float64).flatten().clamp_min(0)
    energy = (values.cumsum(0) / values.sum().clamp_min(1e-30)).tolist()
    ranks = list(range(1, len(values) + 1))
    figure = Figure(figsize=(6, 3.5), layout="constrained")
    axes = figure.subplots()
    axes.semilogy(ranks, values.clamp_min(1e-12).tolist(), color="C0")
    axes.set_xlabel("principal direction (uncentred)")
    axes.set_ylabel("eigenvalue", color="C0")
    share = axes.twinx()
    share.plot(ranks, energy, color="C1")
    share.set_ylabel("energy captured", color="C1")
    share.set_ylim(0, 1.02)
    kept = energy[min(d_compressed, len(energy)) - 1] if energy else 0.0
    axes.axvline(d_compressed, color="k", linestyle="--", label=f"D' = {d_compressed} ({kept:.1%} of the energy)")
    axes.legend(loc="center right")
    axes.set_title("Hidden-state spectrum")
    return figure


def compressor_vs_pca(compressor: Mapping[str, Tensor | float], pca: Mapping[str, Tensor | float],
                      metrics: Sequence[str] = ("cosine", "explained_variance")) -> Figure:
    """Grouped bars: the trained compressor beside the same-rank PCA optimum, one group per metric."""
    figure = Figure(figsize=(5, 3.5), layout="constrained")
    axes = figure.subplots()
    positions = list(range(len(metrics)))
    for offset, (label, values) in zip((-0.2, 0.2), (("compressor", compressor), ("PCA (same rank)", pca))):
        heights = [float(values[name]) for name in metrics]
        bars = axes.bar([p + offset for p in positions], heights, width=0.4, label=label)
        axes.bar_label(bars, fmt="%.3f", fontsize=8)
    axes.set_xticks(positions, [QUALITY_LABELS.get(name, name) for name in metrics])
    axes.set_ylim(min(0.0, *(float(v[m]) for v in (compressor, pca) for m in metrics)), 1.25)
    axes.legend(loc="upper center", ncols=2)
    axes.set_title("Held-out reconstruction")
    return figure


def cosine_per_step(step_cosines: Tensor | Sequence[float], baselines: Mapping[str, float],
                    ylabel: str = "cosine to the target") -> Figure:
    """The TRM's held-out cosine after each supervision step, baselines as horizontal lines."""
    values = _values(step_cosines)
    figure = Figure(figsize=(6, 3.5), layout="constrained")
    axes = figure.subplots()
    axes.plot(range(1, len(values) + 1), values, marker="o", color="k", label="TRM")
    for index, (name, value) in enumerate(baselines.items()):
        axes.axhline(float(value), linestyle="--", color=f"C{index}", label=f"{name} baseline")
    axes.set_xlabel("supervision step")
    axes.set_ylabel(ylabel)
    axes.set_xticks(range(1, len(values) + 1))
    axes.legend(loc="best", fontsize=8)
    axes.grid(alpha=0.3)
    axes.set_title("Prediction quality per supervision step")
    return figure


def halting_histograms(steps_used: Tensor | Sequence[float], halt_probs: Tensor | Sequence[float],
                       n_supervision_steps: int, halt_decision: float | None = None) -> Figure:
    """Left: how many supervision steps samples used. Right: halt probabilities seen at every step,
    with the decision threshold marked when given."""
    steps = [int(round(s)) for s in _values(steps_used)]
    figure = Figure(figsize=(8, 3.2), layout="constrained")
    left, right = figure.subplots(1, 2)
    counts = [steps.count(step) for step in range(1, n_supervision_steps + 1)]
    left.bar(range(1, n_supervision_steps + 1), counts)
    left.set_xticks(range(1, n_supervision_steps + 1))
    left.set_xlabel("supervision steps used")
    left.set_ylabel("samples")
    right.hist(_values(halt_probs), bins=20, range=(0, 1))
    if halt_decision is not None:
        right.axvline(halt_decision, color="k", linestyle="--", label="halt decision")
        right.legend(loc="best", fontsize=8)
    right.set_xlabel("halt probability (every step run)")
    figure.suptitle("Halting")
    return figure


def log_figure(trainer, tag: str, make: Callable[[], Figure]) -> None:
    """Add `make()` under `tag` to every TensorBoard logger of `trainer` (global rank zero, not in the
    sanity check); the figure is not built at all when no TensorBoard logger would get it."""
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
    if not loggers or not trainer.is_global_zero or trainer.sanity_checking:
        return
    figure = make()
    for logger in loggers:
        logger.experiment.add_figure(tag, figure, global_step=trainer.global_step, close=False)


Interval = tuple[float | None, float | None, float | None]  # (value, low, high); None: undefined


def _interval_points(axes, positions: Sequence[float], intervals: Sequence[Interval], color: str,
                     label: str | None = None) -> None:
    """Points with error bars; an undefined value is written as n/a, an undefined interval drawn without bars."""
    for position, (value, low, high) in zip(positions, intervals):
        if value is None:
            axes.annotate("n/a", (position, 0), ha="center", va="bottom", fontsize=8, color="grey")
            continue
        error = None if low is None or high is None else [[value - low], [high - value]]
        axes.errorbar(position, value, yerr=error, fmt="o", capsize=4, color=color, label=label)
        label = None  # one legend entry per series


def fidelity_ladder(modes: Sequence[str], kl: Sequence[Interval], share_kl: Sequence[Interval],
                    answer_kl: Sequence[Interval] | None = None,
                    share_answer_kl: Sequence[Interval] | None = None) -> Figure:
    """The ladder of modes (no thinking ... the LLM's own thinking) on CoT fidelity, 95% intervals as error bars.

    Left: KL(cot || mode) of the first answer token, and (given `answer_kl`) averaged over cot's whole answer,
    teacher-forced (0 at cot). Right: the share of CoT's KL reduction the mode recovers on each,
    (mode - no_think) / (cot - no_think): 0 at no_think, 1 at cot (dashed). The answer-level series sits
    beside the first-token one: a templated answer's first token is the same in every mode, its content is not.
    """
    positions = list(range(len(modes)))
    both = answer_kl is not None or share_answer_kl is not None
    offset = 0.12 if both else 0.0
    first_at, answer_at = [p - offset for p in positions], [p + offset for p in positions]
    figure = Figure(figsize=(max(6.0, 1.4 * len(modes) + 2), 3.6), layout="constrained")
    left, right = figure.subplots(1, 2)
    _interval_points(left, first_at, kl, "C0", "first answer token" if both else None)
    _interval_points(right, first_at, share_kl, "C1", "first answer token" if both else None)
    if answer_kl is not None:
        _interval_points(left, answer_at, answer_kl, "C2", "whole answer (teacher-forced)")
    if share_answer_kl is not None:
        _interval_points(right, answer_at, share_answer_kl, "C3", "whole answer (teacher-forced)")
    left.set_ylabel("KL(cot ‖ mode) per answer token (nats)" if both else
                    "KL(cot ‖ mode), first answer token (nats)")
    left.set_ylim(bottom=0)
    for level in (0.0, 1.0):
        right.axhline(level, color="k", linestyle="--", linewidth=0.8)
    right.set_ylabel("share of CoT's KL reduction recovered")
    for axes in (left, right):
        axes.set_xticks(positions, list(modes), rotation=30, ha="right")
        axes.set_xlim(-0.5, len(modes) - 0.5)
        axes.grid(alpha=0.3)
        if both and axes.get_legend_handles_labels()[0]:
            axes.legend(loc="best", fontsize=8)
    figure.suptitle("CoT fidelity: the ladder of modes (95% intervals)")
    return figure
