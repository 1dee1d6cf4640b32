"""CoT-fidelity metrics (llm_trm/eval/fidelity.py) against values computed by hand on tiny distributions."""

from __future__ import annotations

import math

import pytest
import torch

from llm_trm.eval.fidelity import (Estimate, answer_kl, answer_nll, answers_agree, bootstrap_mean, first_token_kl,
                                   proportion, share_recovered, wilson_interval)

NAN = math.nan


def logits_of(*probabilities: float) -> torch.Tensor:
    """Logits [V] of a distribution (log probabilities; 0 probability -> -inf), shifted to show the
    metric does not care about the softmax's constant."""
    return torch.tensor([math.log(p) if p > 0 else -math.inf for p in probabilities]) + 3.0


# ------------------------------------------------------------------------------ KL of the first answer token


def test_kl_of_two_tiny_distributions_matches_the_hand_computation():
    cot = torch.stack([logits_of(0.5, 0.5), logits_of(1.0, 0.0)])
    mode = torch.stack([logits_of(0.25, 0.75), logits_of(0.5, 0.5)])
    kl = first_token_kl(cot, mode)
    # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3); a token cot rules out adds nothing: 1 ln(1/0.5) = ln 2
    assert kl.tolist() == pytest.approx([0.5 * math.log(4 / 3), math.log(2)], rel=1e-6)
    assert kl.dtype == torch.float32


def test_kl_is_zero_against_itself_and_infinite_where_the_mode_rules_out_cot_s_token():
    cot = torch.stack([logits_of(0.2, 0.3, 0.5)])
    assert first_token_kl(cot, cot).tolist() == [0.0]
    assert first_token_kl(cot, torch.stack([logits_of(0.5, 0.5, 0.0)])).tolist() == [math.inf]
    # KL is not symmetric: KL(cot || mode) is the one reported
    p, q = logits_of(0.9, 0.1)[None], logits_of(0.5, 0.5)[None]
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert first_token_kl(p, q).item() == pytest.approx(expected, rel=1e-6)
    assert first_token_kl(q, p).item() != pytest.approx(expected, rel=1e-3)


def test_rows_without_an_answer_stay_nan_and_shapes_must_match():
    cot = torch.stack([logits_of(0.5, 0.5), torch.full((2,), NAN)])
    mode = torch.stack([torch.full((2,), NAN), logits_of(0.5, 0.5)])
    assert all(math.isnan(v) for v in first_token_kl(cot, mode).tolist())
    with pytest.raises(ValueError, match="different shapes"):
        first_token_kl(torch.zeros(2, 3), torch.zeros(2, 4))


# ------------------------------------------------------------------------------ the whole answer, teacher-forced


def log_probs_of(*rows: list[tuple[float, ...]]) -> torch.Tensor:
    """[N, T, V] log-probabilities from per-position distributions."""
    return torch.stack([torch.stack([logits_of(*p) - 3.0 for p in positions]) for positions in rows])


def test_answer_kl_averages_the_kl_over_each_row_s_answer_positions():
    cot = log_probs_of([(0.5, 0.5), (0.9, 0.1)], [(1.0, 0.0), (0.5, 0.5)])
    mode = log_probs_of([(0.25, 0.75), (0.9, 0.1)], [(0.5, 0.5), (0.0, 1.0)])  # row 1, position 2 is padding
    mask = torch.tensor([[1, 1], [1, 0]])
    kl = answer_kl(cot, mode, mask)
    # row 0: (0.5 ln(4/3) + 0) / 2; row 1: ln 2 at its one position (the padding's infinite KL is left out)
    assert kl.tolist() == pytest.approx([0.25 * math.log(4 / 3), math.log(2)], rel=1e-6)
    assert kl.dtype == torch.float32


def test_answer_kl_is_zero_against_itself_infinite_where_the_mode_rules_out_cot_s_token_nan_without_an_answer():
    cot = log_probs_of([(0.2, 0.8), (0.6, 0.4)], [(0.5, 0.5), (0.5, 0.5)])
    mask = torch.tensor([[1, 1], [0, 0]])
    same = answer_kl(cot, cot, mask).tolist()
    assert same[0] == 0.0 and math.isnan(same[1])
    ruled_out = log_probs_of([(0.2, 0.8), (0.0, 1.0)], [(0.5, 0.5), (0.5, 0.5)])
    assert answer_kl(cot, ruled_out, mask).tolist()[0] == math.inf


def test_answer_nll_is_the_mean_nll_per_answer_token():
    mode = log_probs_of([(0.25, 0.75), (0.9, 0.1), (0.5, 0.5)], [(0.2, 0.8), (0.0, 1.0), (0.0, 1.0)])
    ids = torch.tensor([[1, 0, 1], [0, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])  # row 1's padding holds a token the mode rules out
    nll = answer_nll(mode, ids, mask)
    assert nll.tolist() == pytest.approx([-(math.log(0.75) + math.log(0.9) + math.log(0.5)) / 3, -math.log(0.2)])
    assert math.isnan(answer_nll(mode, ids, torch.zeros_like(mask)).tolist()[0])


def test_answer_metrics_check_their_shapes():
    cot = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match="do not fit the answer mask"):
        answer_kl(cot, torch.zeros(2, 3, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="do not fit the answer mask"):
        answer_kl(cot, cot, torch.ones(2, 2))
    with pytest.raises(ValueError, match="do not fit the mask"):
        answer_nll(cot, torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 3))


def test_the_answer_kl_share_has_cot_s_zero_as_its_reference():
    # share = (KL_no_think - KL_mode) / (KL_no_think - 0): (4 - 1.5) / 4 on these three problems
    share = share_recovered([1.0, 1.5, 2.0], [2.0, 4.0, 6.0], [0.0, 0.0, 0.0], resamples=300, seed=1)
    assert share.value == pytest.approx(1 - 1.5 / 4) and share.rows == 3
    # each resample's share is 1 - mean(mode) / mean(no_think): between the problems' extremes 1 - 1/2 and 1 - 2/6
    assert 1 - 1 / 2 <= share.low <= share.value <= share.high <= 1 - 2 / 6


# ------------------------------------------------------------------------------ final answers


@pytest.mark.parametrize(("answer", "reference", "agree"), [
    ("12", "12.0", True),
    ("1,000", "1000", True),
    ("$5", "5.", True),
    ("1/2", "0.5", True),
    ("x + 1", "x+1", True),
    ("7", "8", False),
    (None, "7", False),  # no answer where cot has one: disagrees
    ("", "7", False),
    ("7", None, None),  # cot has no answer: nothing to agree with
])
def test_final_answers_agree_after_normalisation(answer, reference, agree):
    assert answers_agree(answer, reference) is agree


def test_code_answers_agree_on_the_stripped_text():
    assert answers_agree("def f():\n    return 1\n", "def f():\n    return 1", kind="code") is True
    assert answers_agree("def f():\n    return 2", "def f():\n    return 1", kind="code") is False


# ------------------------------------------------------------------------------ intervals


def test_proportion_leaves_undefined_rows_out_and_uses_the_wilson_interval():
    estimate = proportion([True, False, True, None, NAN])
    assert (estimate.value, estimate.rows) == (pytest.approx(2 / 3), 3)
    assert (estimate.low, estimate.high) == pytest.approx(wilson_interval(2, 3))
    assert estimate.low < estimate.value < estimate.high
    assert proportion([None, NAN]) == Estimate(None, None, None, 0)
    # all agree: the interval still covers the point and is not degenerate; at p = 1 Wilson's lower
    # bound is n / (n + z^2)
    full = proportion([1.0] * 8)
    assert (full.value, full.high, full.rows) == (1.0, 1.0, 8)
    assert full.low == pytest.approx(8 / (8 + 1.959964**2))


def test_bootstrap_mean_is_seeded_and_covers_the_point_estimate():
    values = [0.1, 0.4, 0.35, 0.8, 0.05, 0.6, 0.2, 0.9, None, NAN]
    estimate = bootstrap_mean(values, resamples=2000, seed=0)
    assert estimate.rows == 8 and estimate.value == pytest.approx(sum(v for v in values[:8]) / 8)
    assert 0.05 <= estimate.low < estimate.value < estimate.high <= 0.9
    assert bootstrap_mean(values, resamples=2000, seed=0) == estimate  # the same seed, the same interval
    assert bootstrap_mean(values, resamples=2000, seed=1) != estimate
    assert bootstrap_mean([0.3, 0.3, 0.3]) == Estimate(pytest.approx(0.3), pytest.approx(0.3), pytest.approx(0.3), 3)
    assert bootstrap_mean([None]) == Estimate(None, None, None, 0)


# ------------------------------------------------------------------------------ share of CoT's effect recovered


def test_share_recovered_matches_the_hand_computation():
    # accuracy: no_think 1/4, cot 3/4, the mode 2/4: it recovers half of CoT's gain
    share = share_recovered(mode=[1, 1, 0, 0], baseline=[1, 0, 0, 0], reference=[1, 1, 1, 0])
    assert share.value == pytest.approx(0.5) and share.rows == 4
    # KL: no_think 1.2, cot 0 (its own KL), the mode 0.3 -> (0.3 - 1.2) / (0 - 1.2) = 0.75
    kl = share_recovered(mode=[0.2, 0.4], baseline=[1.0, 1.4], reference=[0.0, 0.0])
    assert kl.value == pytest.approx(0.75)
    # the baseline itself recovers 0, the reference 1
    assert share_recovered([1.0, 1.4], [1.0, 1.4], [0.0, 0.0]).value == 0.0
    assert share_recovered([0.0, 0.0], [1.0, 1.4], [0.0, 0.0]).value == 1.0


def test_share_is_undefined_when_cot_and_no_think_do_not_differ():
    """Accuracy 0 everywhere (the embedded model): no effect to recover, reported as undefined, no division."""
    zeros = [0.0] * 6
    assert share_recovered(zeros, zeros, zeros) == Estimate(None, None, None, 6)
    assert share_recovered([1, 0, 1], [1, 0, 0], [1, 0, 0]) == Estimate(None, None, None, 3)


def test_share_uses_only_problems_where_all_three_are_defined():
    share = share_recovered(mode=[1, NAN, 0, 1], baseline=[0, 0, None, 0], reference=[1, 1, 1, 1])
    assert share.rows == 2 and share.value == pytest.approx(1.0)  # rows 0 and 3: mode 1, 1
    with pytest.raises(ValueError, match="one value per problem"):
        share_recovered([1, 0], [0], [1, 1])


def test_share_interval_is_a_seeded_paired_bootstrap_that_covers_the_point():
    generator = torch.Generator().manual_seed(0)
    baseline = torch.rand(40, generator=generator) + 1.0  # KL without thinking: 1..2
    mode = baseline * 0.4 + 0.1 * torch.rand(40, generator=generator)  # recovers about 0.6 of it
    reference = torch.zeros(40)
    share = share_recovered(mode, baseline, reference, resamples=2000, seed=0)
    assert share.low < share.value < share.high
    assert 0.5 < share.low and share.high < 0.7
    assert share_recovered(mode, baseline, reference, resamples=2000, seed=0) == share
    # paired: the same problems are resampled for all three, so a mode equal to the baseline has a
    # degenerate interval at exactly 0 (unpaired resampling would scatter it around 0)
    same = share_recovered(baseline, baseline, reference)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)


def test_share_interval_is_undefined_when_resamples_often_have_no_gap():
    # cot right on 1 problem of 10, no_think on none: most resamples that miss that problem have no gap
    reference = [1.0] + [0.0] * 9
    share = share_recovered(mode=[1.0] + [0.0] * 9, baseline=[0.0] * 10, reference=reference)
    assert share.value == pytest.approx(1.0) and (share.low, share.high) == (None, None) and share.rows == 10
