"""CoT fidelity: how close a mode comes to what the LLM does after its own thinking (`cot`).

Pure functions on per-problem values (no model, no files), used by `llm-trm evaluate`:

- `first_token_kl`: KL(cot || mode) of the first answer token's distribution, per problem,
  in fp32 with the natural log; a row where either side wrote no answer (NaN logits) is NaN;
- `answer_kl` / `answer_nll`: teacher-forced on cot's own answer a_1..a_T, the mean over its T
  positions of KL(p_cot(. | cot context, a_<t) || p_mode(. | mode context, a_<t)), and the mean
  NLL of cot's answer tokens under the mode, per problem (NaN where cot wrote no answer). The
  first answer token is the same in every mode of a templated answer ("The answer is ..."), so
  the first-token metrics cannot see the answer's content move; these can;
- `answers_agree`: whether two final answers (extracted, normalised) are the same;
- `proportion`: a share of yes/no values with its 95% Wilson interval (agreement, accuracy);
- `bootstrap_mean`: a mean with its 95% percentile-bootstrap interval over problems (KL);
- `share_recovered`: the share of CoT's effect a mode recovers,
  `(mode - baseline) / (reference - baseline)` with baseline = `no_think` and reference = `cot`
  (for KL the reference is cot's own KL, 0; for agreement cot's own agreement, 1), with a paired
  bootstrap interval (the same resampled problems for all three).

Every function takes per-problem values in which NaN / None marks a problem without a value
(no answer, no gold answer); such rows are left out, and `Estimate.rows` says how many counted.
They work when accuracy is 0 everywhere: a share whose gap `reference - baseline` is 0 is
undefined (`value` None), never a division by zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from llm_trm.eval.answers import normalize_math

__all__ = ["Estimate", "Z95", "wilson_interval", "proportion", "first_token_kl", "answer_kl", "answer_nll",
           "answers_agree", "bootstrap_mean", "share_recovered", "BOOTSTRAP_RESAMPLES"]

Z95 = 1.959964  # the standard normal's 97.5% quantile: two-sided 95% intervals
BOOTSTRAP_RESAMPLES = 2000
# a gap or share denominator closer to 0 than this is no gap (means of 0/1 values are exact)
_NO_GAP = 1e-12


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95% interval over `rows` problems; None where undefined."""

    value: float | None
    low: float | None
    high: float | None
    rows: int

    @classmethod
    def undefined(cls, rows: int = 0) -> Estimate:
        return cls(None, None, None, rows)


# --------------------------------------------------------------------------- proportions


def wilson_interval(successes: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a proportion (95% by default); (0, 0) when total is 0."""
    if total <= 0:
        return 0.0, 0.0
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * ((p * (1 - p) / total + z * z / (4 * total * total)) ** 0.5) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _finite(values: Sequence[float | bool | None] | Tensor) -> Tensor:
    """float64 values with None -> NaN."""
    if isinstance(values, Tensor):
        return values.detach().double().cpu().flatten()
    return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)


def proportion(flags: Sequence[float | bool | None] | Tensor) -> Estimate:
    """The share of true values among the defined ones (None / NaN left out), with its Wilson interval."""
    values = _finite(flags)
    kept = values[~values.isnan()]
    if kept.numel() == 0:
        return Estimate.undefined()
    successes, total = int((kept != 0).sum()), kept.numel()
    low, high = wilson_interval(successes, total)
    return Estimate(successes / total, low, high, total)


# --------------------------------------------------------------------------- first answer token


def first_token_kl(reference_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(reference || other) per row, in nats, from logits [N, V] (fp32; NaN rows stay NaN).

    A token the reference gives no probability adds nothing (0 log 0 = 0); one the other side
    rules out (-inf logit) while the reference does not makes the KL infinite, as it is.
    """
    if reference_logits.shape != logits.shape:
        raise ValueError(f"logits of different shapes: {tuple(reference_logits.shape)} vs {tuple(logits.shape)}")
    kl = _kl(torch.log_softmax(reference_logits.float(), dim=-1), torch.log_softmax(logits.float(), dim=-1))
    missing = reference_logits.isnan().any(dim=-1) | logits.isnan().any(dim=-1)
    return kl.masked_fill(missing, math.nan)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last dimension from log-probabilities (0 log 0 = 0)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


# --------------------------------------------------------------------------- the whole answer, teacher-forced


def _position_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Per row, the mean of `values` [N, T] over its unmasked positions; NaN for a row with none."""
    counts = mask.sum(dim=-1)
    # where, not a product: padding positions hold whatever the model gave them (inf x 0 would be NaN)
    means = torch.where(mask, values, torch.zeros_like(values)).sum(dim=-1) / counts.clamp_min(1)
    return means.masked_fill(counts == 0, math.nan)


def _check_positions(reference: Tensor, other: Tensor, mask: Tensor) -> None:
    if reference.shape != other.shape or reference.shape[:-1] != mask.shape:
        raise ValueError(f"log-probabilities {tuple(reference.shape)} and {tuple(other.shape)} do not fit the answer "
                         f"mask {tuple(mask.shape)}: both need [N, T, V] over the same N x T answer positions")


def answer_kl(reference_log_probs: Tensor, log_probs: Tensor, mask: Tensor) -> Tensor:
    """Per row, the mean over its answer positions of KL(reference || other), in nats (fp32).

    reference_log_probs, log_probs: [N, T, V] log-probabilities of the next token at each of T answer
    positions (position t predicts answer token t, teacher-forced on the same answer in both);
    mask [N, T]: the row's real answer positions. A row without any is NaN.
    """
    _check_positions(reference_log_probs, log_probs, mask)
    kl = _kl(reference_log_probs.float(), log_probs.float())
    return _position_mean(kl, mask.bool())


def answer_nll(log_probs: Tensor, answer_ids: Tensor, mask: Tensor) -> Tensor:
    """Per row, the mean negative log-likelihood per answer token (nats) of `answer_ids` [N, T] under
    `log_probs` [N, T, V] (position t predicts token t); mask [N, T]; a row without answer tokens is NaN."""
    _check_positions(log_probs, log_probs, mask)
    if answer_ids.shape != mask.shape:
        raise ValueError(f"answer ids {tuple(answer_ids.shape)} do not fit the mask {tuple(mask.shape)}")
    nll = -log_probs.float().gather(-1, answer_ids[..., None].long())[..., 0]
    return _position_mean(nll, mask.bool())


# --------------------------------------------------------------------------- final answers


def _number(answer: str) -> Fraction | None:
    try:
        return Fraction(answer.replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _normalise(answer: str, kind: str) -> str | Fraction:
    if kind == "code":
        return answer.strip()
    text = normalize_math(answer)
    number = _number(text)
    return number if number is not None else "".join(text.split())


def answers_agree(answer: str | None, reference: str | None, kind: str = "math") -> bool | None:
    """Whether `answer` is the same final answer as `reference` (both as extracted from the text).

    Math answers are normalised (dollar signs, thousands commas, a final period) and compared as
    numbers when both are numbers ("12.0" = "12", "1/2" = "0.5"), else as text without spaces; code
    as the stripped text. None when the reference has no answer (nothing to agree with); an
    answer missing where the reference has one disagrees.
    """
    if reference is None or not str(reference).strip():
        return None
    if answer is None or not str(answer).strip():
        return False
    return _normalise(str(answer), kind) == _normalise(str(reference), kind)


# --------------------------------------------------------------------------- bootstrap


def _resample_indices(rows: int, resamples: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, rows, (resamples, rows), generator=generator)


def _percentiles(values: Tensor, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=values.dtype)).tolist()
    return low, high


def bootstrap_mean(values: Sequence[float | None] | Tensor, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                   confidence: float = 0.95) -> Estimate:
    """The mean of the defined values with a percentile-bootstrap interval (resampling problems, seeded)."""
    data = _finite(values)
    kept = data[~data.isnan()]
    if kept.numel() == 0:
        return Estimate.undefined()
    means = kept[_resample_indices(kept.numel(), resamples, seed)].mean(dim=1)
    low, high = _percentiles(means, confidence)
    return Estimate(float(kept.mean()), low, high, kept.numel())


def share_recovered(mode: Sequence[float | None] | Tensor, baseline: Sequence[float | None] | Tensor,
                    reference: Sequence[float | None] | Tensor, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                    confidence: float = 0.95) -> Estimate:
    """`(mean(mode) - mean(baseline)) / (mean(reference) - mean(baseline))` over the problems where all
    three are defined, with a paired percentile-bootstrap interval.

    0 means the mode does what the baseline (no thinking) does, 1 what the reference (CoT) does.
    Undefined (value None) when the gap `reference - baseline` is 0 on the problems: there is no
    effect to recover. The interval is undefined when more than the interval's tail share of
    resamples (2.5% at 95%) have no gap: then no bounded 95% interval exists.
    """
    columns = [_finite(values) for values in (mode, baseline, reference)]
    if len({c.numel() for c in columns}) != 1:
        raise ValueError(f"mode, baseline and reference need one value per problem, got {[c.numel() for c in columns]}")
    table = torch.stack(columns, dim=1)  # [N, 3]
    table = table[~table.isnan().any(dim=1)]
    rows = table.shape[0]
    if rows == 0:
        return Estimate.undefined()
    mean_mode, mean_base, mean_ref = table.mean(dim=0).tolist()
    gap = mean_ref - mean_base
    if abs(gap) < _NO_GAP:
        return Estimate.undefined(rows)
    value = (mean_mode - mean_base) / gap + 0.0  # + 0.0: no "-0.0" when the mode is the baseline
    means = table[_resample_indices(rows, resamples, seed)].mean(dim=1)  # [R, 3]
    gaps = means[:, 2] - means[:, 1]
    defined = gaps.abs() >= _NO_GAP
    if (~defined).double().mean() > (1 - confidence) / 2:
        return Estimate(value, None, None, rows)
    shares = (means[defined, 0] - means[defined, 1]) / gaps[defined] + 0.0
    low, high = _percentiles(shares, confidence)
    return Estimate(value, low + 0.0, high + 0.0, rows)
