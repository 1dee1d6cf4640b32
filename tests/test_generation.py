"""The one generate wrapper: explicit decoding settings, think-then-answer in one generation, first-token logits."""

from __future__ import annotations

import pytest
import torch

from llm_trm.backbone import load_backbone
from llm_trm.batching import pad_token_ids, position_ids
from llm_trm.generation import GREEDY, Decoding, ThinkingBudget, _AnswerWatcher, generate
from llm_trm.thinking import THINK_CLOSE


@pytest.fixture(scope="module")
def backbone(tiny_backbone_dir):
    return load_backbone(str(tiny_backbone_dir), "float32")


def prompts(backbone, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [backbone.tokenizer.encode(text, add_special_tokens=False) for text in texts]
    return pad_token_ids(ids, backbone.tokenizer.pad_token_id)


def test_decoding_settings_are_explicit_and_recorded():
    assert GREEDY.as_dict() == {"do_sample": False}
    sampled = Decoding(do_sample=True, temperature=0.6, top_p=0.95, top_k=20)
    assert sampled.as_dict() == {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}
    config = sampled.generation_config(8, pad_token_id=0, eos_token_id=[2])
    # nothing is left for the backbone's generation_config.json to fill in
    assert (config.temperature, config.top_p, config.top_k, config.min_p, config.repetition_penalty) == (
        0.6, 0.95, 20, 0.0, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        Decoding(do_sample=True, temperature=0.0)


def test_a_row_that_does_not_close_its_thinking_gets_the_tag_forced_then_answers(backbone):
    tokenizer = backbone.tokenizer
    input_ids, mask = prompts(backbone, ["<think>\n", "a longer prompt <think>\n"])
    close = tokenizer.encode(THINK_CLOSE, add_special_tokens=False)
    budget = ThinkingBudget(max_thinking_tokens=3, close_ids=close, max_answer_tokens=4)
    out = generate(backbone.model, tokenizer, input_ids=input_ids, attention_mask=mask, think=budget,
                   end_ids=set(), capture_first_logits=True)
    for row in range(2):
        ids = out.new_ids[row]
        # the random model does not close within 3 tokens: exactly 3 thinking tokens, then the tag, then 4 answer tokens
        assert out.closed[row] is False
        assert ids[3 : 3 + len(close)] == close and out.answer_start[row] == 3 + len(close)
        assert len(out.answer_ids(row)) == 4
        assert out.answer_times[row] is not None and out.first_token_time <= out.answer_times[row]

    # the captured first-answer-token logits are those of an uncached pass over prompt + thinking + tag
    sequences = [input_ids[row][mask[row].bool()].tolist() + out.new_ids[row][: out.answer_start[row]]
                 for row in range(2)]
    full, full_mask = pad_token_ids(sequences, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = backbone.model(input_ids=full, attention_mask=full_mask, position_ids=position_ids(full_mask)).logits
    torch.testing.assert_close(out.first_logits, logits[:, -1].float(), atol=1e-4, rtol=1e-4)
    assert [ids[0] for ids in (out.answer_ids(0), out.answer_ids(1))] == logits[:, -1].argmax(-1).tolist()


def watcher(close: list[int], end_ids: set[int], budget: int = 2, capture: bool = True,
            after_tag: tuple[int, ...] = ()) -> _AnswerWatcher:
    class Tok:  # decodes ids as letters; token 9 is the closing tag, token 7 a newline
        def decode(self, ids, skip_special_tokens=False):
            return "".join({9: THINK_CLOSE, 7: "\n"}.get(int(i), chr(97 + int(i))) for i in ids)

        def encode(self, text, add_special_tokens=False):
            return [9]

    return _AnswerWatcher(Tok(), prompt_width=1, batch=1, end_ids=end_ids, sync=lambda: None,
                          think=ThinkingBudget(budget, close, max_answer_tokens=2, after_tag_ids=after_tag),
                          capture=capture)


def step(w: _AnswerWatcher, ids: list[int], best: int, vocab: int = 10) -> torch.Tensor:
    scores = torch.zeros(1, vocab)
    scores[0, best] = 5.0
    return w(torch.tensor([ids]), scores)


def test_the_watcher_sees_a_closing_tag_the_model_wrote_itself():
    w = watcher(close=[9], end_ids={8})
    step(w, [0], best=1)
    step(w, [0, 1], best=9)  # under budget: nothing forced
    assert w.answer_start == [None]
    scores = step(w, [0, 1, 9], best=3)  # the tag is in: the next token is the first answer token
    assert w.answer_start == [2] and w.closed == [True]
    assert torch.equal(w.first_logits[0], scores[0])
    assert w.stop(torch.tensor([[0, 1, 9, 3, 4]]), None).tolist() == [True]  # 2 answer tokens: the budget


def test_after_its_own_tag_the_suffix_newline_is_forced_unless_the_model_wrote_it():
    w = watcher(close=[9, 7], end_ids={8}, budget=5, after_tag=(7,))
    scores = step(w, [0, 1, 9], best=3)  # the model closed the tag itself, without the newline
    assert scores[0].argmax() == 7 and torch.isinf(scores[0, 3]) and w.answer_start == [None]
    step(w, [0, 1, 9, 7], best=3)
    assert w.answer_start == [3] and w.closed == [True]  # the answer starts after "</think>\n", as in every mode
    w = watcher(close=[9, 7], end_ids={8}, budget=5, after_tag=(7,))
    step(w, [0, 1, 9, 7], best=3)  # tag and newline written by the model: nothing forced
    assert w.answer_start == [3] and w.closed == [True]


def test_the_watcher_forces_the_tag_at_the_budget_and_when_the_model_wants_to_end():
    w = watcher(close=[6, 7], end_ids={8}, budget=2)
    assert step(w, [0, 1], best=1)[0].argmax() == 1  # 1 thinking token: under the budget of 2
    scores = step(w, [0, 1, 2], best=1)
    assert scores[0].argmax() == 6 and torch.isinf(scores[0, 1])  # budget reached: first tag token forced
    scores = step(w, [0, 1, 2, 6], best=1)
    assert scores[0].argmax() == 7
    step(w, [0, 1, 2, 6, 7], best=1)
    assert w.answer_start == [4] and w.closed == [False]

    w = watcher(close=[6, 7], end_ids={8}, budget=5)
    scores = step(w, [0], best=8)  # wants to end its turn while thinking: the tag is forced instead
    assert scores[0].argmax() == 6
    w = watcher(close=[6], end_ids={8}, budget=5)
    scores = step(w, [0], best=3)
    assert torch.isinf(scores[0, 8]) and scores[0].argmax() == 3  # end tokens are banned inside the thinking


def test_a_static_cache_decodes_the_same_tokens_and_reaches_transformers(backbone, monkeypatch):
    """On CPU only checked to run and agree; on CUDA transformers also compiles the step (the GPU bench)."""
    tokenizer = backbone.tokenizer
    input_ids, mask = prompts(backbone, ["<think>\n", "a longer prompt <think>\n"])
    close = tokenizer.encode(THINK_CLOSE, add_special_tokens=False)
    budget = ThinkingBudget(max_thinking_tokens=4, close_ids=close, max_answer_tokens=3)
    seen = []
    real_generate = backbone.model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["generation_config"].cache_implementation)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(backbone.model, "generate", spy)
    dynamic = generate(backbone.model, tokenizer, input_ids=input_ids, attention_mask=mask, think=budget)
    static = generate(backbone.model, tokenizer, input_ids=input_ids, attention_mask=mask, think=budget,
                      cache_implementation="static")
    assert seen == [None, "static"]
    assert static.new_ids == dynamic.new_ids and static.answer_start == dynamic.answer_start
    assert all(len(ids) == 4 + len(close) + 3 for ids in static.new_ids)  # ran to the budgets, cut nowhere early


def test_datagen_rejects_an_unknown_cache_implementation(tiny_backbone_dir):
    from llm_trm.modules.datagen import DatagenModule

    assert DatagenModule(backbone=str(tiny_backbone_dir), cache_implementation="static").hparams.cache_implementation == "static"
    with pytest.raises(ValueError, match="cache_implementation must be one of"):
        DatagenModule(backbone=str(tiny_backbone_dir), cache_implementation="paged")
