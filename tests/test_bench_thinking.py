"""scripts/bench_thinking.py picks the demo's setup by the rule BENCHMARKS.md states."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_thinking import AccuracyRow, CloseCell, choose  # noqa: E402

from llm_trm.data.problems import PROMPT_STYLE  # noqa: E402


def cell(family: str, closed: int, decoding: str = "greedy", style: str = PROMPT_STYLE) -> CloseCell:
    return CloseCell(family, style, decoding, closed, 16, [20] * closed, 1.0)


def row(family: str, cot: int, no_think: int) -> AccuracyRow:
    return AccuracyRow(family, cot, no_think, 24, 24, cot, 0, 1.0)


def test_the_family_with_the_largest_cot_gain_among_those_that_close_wins():
    cells = [cell("a", 16), cell("b", 9), cell("b", 12, "sampling"), cell("c", 7), cell("a", 16, style="system_line")]
    rows = [row("a", 1, 0), row("b", 4, 1), row("c", 9, 0)]  # c gains most but closes under half
    best, chosen_row, why = choose(cells, rows)
    assert (best.family, best.decoding, best.closed) == ("b", "sampling", 12)  # b's cell that closes most
    assert chosen_row.cot == 4 and "CoT beats no-thinking" in why


def test_without_a_cot_gain_the_highest_closed_share_wins_and_greedy_breaks_ties():
    cells = [cell("a", 10, "sampling"), cell("a", 10), cell("b", 9), cell("c", 16, style="system_line")]
    best, _, why = choose(cells, [row("a", 0, 0), row("b", 0, 2)])
    assert (best.family, best.decoding) == ("a", "greedy") and "no family answers better" in why


def test_nothing_is_chosen_when_no_setup_of_the_pipeline_prompt_closes_half():
    cells = [cell("a", 7), cell("b", 16, style="system_line")]
    assert choose(cells, [row("a", 3, 0)])[0] is None
