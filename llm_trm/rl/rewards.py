"""GRPO rewards as plain functions, the way TRL's `reward_funcs` are plain callables.

A reward function scores one sampled answer: `reward(completion) -> float`. `GRPOModule`
resolves its `reward` and `format_reward` settings into weighted functions with
`resolve_rewards` and sums them; each is also logged on its own.

    correctness        1 when the answer checks out against the gold answer or tests
    format_bonus       1 when the answer is in the checkable format (\\boxed{...} / a code block)
    first_token_is(t)  1 when the first answer token is t (the sanity task: a reward any
                       policy can reach, so the optimisation itself can be checked)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from llm_trm.data.problems import Problem
from llm_trm.errors import ConfigMismatchError, DataError
from llm_trm.eval.answers import check_answer

FORMAT_MARKERS = {"math": "\\boxed{", "code": "```"}
FIRST_TOKEN_REWARD = re.compile(r"^first_token:(\d+)$")


@dataclass(frozen=True)
class Completion:
    """One sampled answer to a problem: its token ids (ending with the end-of-turn token when the
    LLM stopped) and its text."""

    problem: Problem
    ids: list[int]
    text: str


RewardFunction = Callable[[Completion], float]


class CheckerError(DataError):
    """The answer checker failed on a completion (counted apart from wrong answers)."""


def correctness(completion: Completion) -> float:
    """1.0 when the answer is right, 0.0 when it is wrong; CheckerError when it cannot be checked."""
    problem = completion.problem
    if not problem.has_gold:
        raise DataError(f"problem {problem.sample_id} has no gold answer or tests: the answer reward cannot "
                        "score it; use a dataset with answers.")
    try:
        return float(bool(check_answer(problem, completion.text)))
    except Exception as err:  # noqa: BLE001 - reported apart, never a crash of the training step
        raise CheckerError(f"checking {problem.sample_id} failed: {type(err).__name__}: {err}".splitlines()[0]) from err


def format_bonus(completion: Completion) -> float:
    return float(FORMAT_MARKERS.get(completion.problem.kind, "\0") in completion.text)


def first_token_is(token_id: int) -> RewardFunction:
    def first_token(completion: Completion) -> float:
        return float(bool(completion.ids) and completion.ids[0] == token_id)

    first_token.__name__ = f"first_token_{token_id}"
    return first_token


def resolve_rewards(reward: str, format_reward: float = 0.0) -> dict[str, tuple[RewardFunction, float]]:
    """name -> (function, weight) from GRPOModule's settings; the first entry is what counts as correct."""
    match = FIRST_TOKEN_REWARD.match(reward)
    if reward == "answer":
        rewards: dict[str, tuple[RewardFunction, float]] = {"correctness": (correctness, 1.0)}
    elif match is not None:
        rewards = {"first_token": (first_token_is(int(match.group(1))), 1.0)}
    else:
        raise ConfigMismatchError(f"reward must be `answer` or `first_token:<token id>`, got {reward!r}.")
    if format_reward:
        rewards["format"] = (format_bonus, float(format_reward))
    return rewards
