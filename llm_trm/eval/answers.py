"""Answer checking: pull the final answer out of a model's text and check it.

Math answers are compared with math-verify (symbolic equivalence, so "0.5" and
"\\frac{1}{2}" match); code answers run against the problem's tests in the sandbox, through
`run_checked`: the answer runs first, then the harness runs the tests itself, and only its report,
signed with a per-run secret, counts as a pass (an answer that exits early or prints a fake verdict
fails). Code answers may import only the standard library.
"""

from __future__ import annotations

import json
import re
import threading
from fractions import Fraction
from typing import Any

from llm_trm.data.problems import COMPLETION_PLACEHOLDER, THINK_CLOSE, Problem
from llm_trm.eval.sandbox import run_checked

BOXED_COMMANDS = ("\\boxed", "\\fbox")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
ANSWER_IS = re.compile(r"the (?:final )?answer is\s*:?\s*(.+)", re.IGNORECASE)
THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
CODE_BLOCK = re.compile(r"```([\w+-]*)[^\n]*\n(.*?)(?:```|$)", re.DOTALL)
PYTHON_LANGS = {"python", "py", "python3"}


def answer_part(text: str) -> str:
    """The text after the thinking, when there is thinking and something after it."""
    if THINK_CLOSE in text:
        after = text.rsplit(THINK_CLOSE, 1)[1]
        if after.strip():
            return after
    return text


# ------------------------------------------------------------------------------ math


def _last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...}, braces balanced."""
    starts = [text.rfind(command + "{") for command in BOXED_COMMANDS]
    start = max(starts)
    if start < 0:
        return None
    open_brace = text.index("{", start)
    depth = 0
    for position in range(open_brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[open_brace + 1 : position].strip()
    return None  # unclosed: the generation was cut off


def _clean_phrase(phrase: str) -> str:
    return phrase.strip().strip("$").rstrip(".").strip()


def extract_math_answer(text: str) -> str | None:
    """The final answer: \\boxed{...}, else after '####', else after 'the answer is', else the last number."""
    text = answer_part(text)
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    if "####" in text:
        after = text.rsplit("####", 1)[1].strip().splitlines()
        if after and _clean_phrase(after[0]):
            return _clean_phrase(after[0])
    stated = ANSWER_IS.findall(text)
    if stated and _clean_phrase(stated[-1]):
        return _clean_phrase(stated[-1])
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def normalize_math(answer: str) -> str:
    """Drop what math-verify should not have to judge: $ signs, thousands commas, a final period."""
    answer = answer.replace("\\$", "").replace("$", "").replace("\\!", "")
    answer = THOUSANDS_COMMA.sub("", answer)
    return answer.strip().rstrip(".").strip()


def _as_number(answer: str) -> Fraction | None:
    try:
        return Fraction(answer.replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _math_verify_equal(gold: str, answer: str) -> bool:
    from math_verify import parse, verify

    # math-verify times out with signal.alarm, which only works in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None

    def parsed(expression: str) -> list[Any]:
        return parse(f"${expression}$", parsing_timeout=timeout) or parse(expression, parsing_timeout=timeout)

    gold_parsed, answer_parsed = parsed(gold), parsed(answer)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=timeout))


def check_math(answer_text: str, gold: str) -> bool:
    """Whether the model's final answer in `answer_text` equals `gold`; never raises."""
    try:
        extracted = extract_math_answer(answer_text)
        if extracted is None or not str(gold).strip():
            return False
        answer, gold = normalize_math(extracted), normalize_math(str(gold))
        answer_number, gold_number = _as_number(answer), _as_number(gold)
        if answer_number is not None and gold_number is not None:
            return answer_number == gold_number
        return _math_verify_equal(gold, answer)
    except Exception:  # noqa: BLE001 - a malformed answer is a wrong answer
        return False


# ------------------------------------------------------------------------------ code


def extract_code(text: str) -> str:
    """The last ```python block (else the last unlabelled block, else the whole text)."""
    text = answer_part(text)
    blocks = CODE_BLOCK.findall(text)
    python_blocks = [body for lang, body in blocks if lang.lower() in PYTHON_LANGS]
    plain_blocks = [body for lang, body in blocks if not lang]
    for candidates in (python_blocks, plain_blocks):
        if candidates:
            return candidates[-1].strip("\n")
    return text


def code_tests_job(code: str, tests: str, entry_point: str = "") -> dict[str, str]:
    """A harness job for test code: the answer (after the prompt stub when the tests hold the
    completion placeholder) and, apart, the tests the harness runs once the answer has run."""
    if COMPLETION_PLACEHOLDER in tests:
        stub, after = tests.split(COMPLETION_PLACEHOLDER, 1)
        return {"mode": "tests", "solution": stub + code, "tests": after, "trusted": stub, "entry_point": entry_point}
    return {"mode": "tests", "solution": code, "tests": tests, "trusted": "", "entry_point": entry_point}


def parse_io_cases(tests: str) -> dict[str, Any] | None:
    """APPS-style cases ({"inputs": [...], "outputs": [...]}), or None for test code."""
    if not tests.lstrip().startswith("{"):
        return None
    try:
        cases = json.loads(tests)
    except json.JSONDecodeError:
        return None
    return cases if isinstance(cases, dict) and "inputs" in cases and "outputs" in cases else None


def _as_text(value: Any) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def check_io_cases(code: str, cases: dict[str, Any], timeout_s: float) -> bool:
    """Call-based cases: the harness calls the named function (or Solution method) and compares.
    Stdin/stdout cases: on each case's stdin the program must run to its end (`exit(0)` ends it;
    `os._exit` skips the harness and fails) and print the expected output, token for token."""
    if cases.get("fn_name"):
        pairs = list(zip(cases["inputs"], cases["outputs"]))
        job = {"mode": "calls", "solution": code, "fn_name": cases["fn_name"], "cases": pairs}
        return run_checked(job, timeout_s=timeout_s).passed
    for stdin, expected in zip(cases["inputs"], cases["outputs"]):
        result = run_checked({"mode": "script", "solution": code}, stdin=_as_text(stdin), timeout_s=timeout_s)
        if not result.passed or result.stdout.split() != _as_text(expected).split():
            return False
    return True


def check_code(problem: Problem, answer_text: str, timeout_s: float = 10.0) -> bool:
    if not problem.tests.strip():
        raise ValueError(f"{problem.sample_id}: a code problem needs tests to be checked")
    code = extract_code(answer_text)
    cases = parse_io_cases(problem.tests)
    if cases is not None:
        return check_io_cases(code, cases, timeout_s)
    return run_checked(code_tests_job(code, problem.tests, problem.entry_point), timeout_s=timeout_s).passed


def check_answer(problem: Problem, answer_text: str, timeout_s: float = 10.0) -> bool:
    """Whether `answer_text` answers `problem` correctly (math: gold answer; code: tests)."""
    if problem.kind == "math":
        return check_math(answer_text, problem.gold_answer)
    if problem.kind == "code":
        return check_code(problem, answer_text, timeout_s)
    raise ValueError(f"{problem.sample_id}: unknown problem kind {problem.kind!r} (expected 'math' or 'code')")
