"""GRPO's reward functions: plain callables, resolved from the module's settings."""

from __future__ import annotations

import pytest

from llm_trm.data.problems import Problem
from llm_trm.errors import ConfigMismatchError, DataError
from llm_trm.rl.rewards import (CheckerError, Completion, correctness, first_token_is, format_bonus,
                                resolve_rewards)

MATH = Problem(sample_id="toy:0", dataset="toy", index=0, prompt="2+2?", gold_answer="4", kind="math")


def completion(text: str, ids: list[int] | None = None, problem: Problem = MATH) -> Completion:
    return Completion(problem, ids or [1, 2], text)


def test_correctness_and_format_bonus():
    assert correctness(completion("The answer is \\boxed{4}.")) == 1.0
    assert correctness(completion("The answer is \\boxed{5}.")) == 0.0
    assert format_bonus(completion("so \\boxed{5}")) == 1.0 and format_bonus(completion("5")) == 0.0
    code = Problem(sample_id="c:0", dataset="c", index=0, prompt="", gold_answer="", kind="code", tests="assert f()")
    assert format_bonus(completion("```python\ndef f(): return 1\n```", problem=code)) == 1.0


def test_first_token_reward_reads_the_first_id():
    reward = first_token_is(7)
    assert reward(completion("", [7, 3])) == 1.0
    assert reward(completion("", [3, 7])) == 0.0 and reward(completion("", [])) == 0.0


def test_unanswerable_problems_and_checker_failures_are_reported():
    no_gold = Problem(sample_id="toy:1", dataset="toy", index=1, prompt="?", gold_answer="", kind="math")
    with pytest.raises(DataError, match="no gold answer"):
        correctness(completion("4", problem=no_gold))
    weird = Problem(sample_id="toy:2", dataset="toy", index=2, prompt="?", gold_answer="4", kind="poetry")
    with pytest.raises(CheckerError, match="toy:2"):
        correctness(completion("4", problem=weird))


def test_resolve_rewards_from_the_settings():
    assert list(resolve_rewards("answer")) == ["correctness"]
    rewards = resolve_rewards("first_token:12", format_reward=0.25)
    assert list(rewards) == ["first_token", "format"] and rewards["format"][1] == 0.25
    assert rewards["first_token"][0](completion("", [12])) == 1.0
    with pytest.raises(ConfigMismatchError, match="first_token"):
        resolve_rewards("bleu")
