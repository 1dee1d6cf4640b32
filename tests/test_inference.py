"""LatentReasoner and the input adapters on the tiny random backbone (no network, a few seconds)."""

from __future__ import annotations

import math

import pytest
import torch

from llm_trm.backbone import load_backbone
from llm_trm.data.problems import Problem
from llm_trm.errors import ConfigMismatchError, LLMTRMError
from llm_trm.eval.answers import check_answer, extract_math_answer
from llm_trm.batching import position_ids
from llm_trm.inference import MODES, ORACLE_MODES, AnswerResult, LatentReasoner, derangement, wilson_interval
from llm_trm.latent import encode_prompt
from llm_trm.models.adapter import (ConceptAdapter, LatentAdapter, LinearAdapter, NormMatchAdapter,
                                   mean_embedding_norm)
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.trm import SequenceTRM

D_COMPRESSED = 16
N_SUP = 3


def make_problems(count: int = 2) -> list[Problem]:
    questions = ["Natalia sold 48 clips in April. How many?", "What is 3 + 4?", "Weng earns $12 an hour."]
    return [
        Problem(sample_id=f"toy:{i}", dataset="toy", index=i, prompt=questions[i % 3], gold_answer="7", kind="math")
        for i in range(count)
    ]


def make_compressor(backbone, d_compressed: int = D_COMPRESSED, d_model: int | None = None) -> DimensionCompressor:
    torch.manual_seed(0)
    compressor = DimensionCompressor(d_model or backbone.hidden_size, d_compressed)
    compressor.metadata = {"backbone": backbone.backbone_id, "layer": -1}
    return compressor


def make_trm(backbone, d_compressed: int = D_COMPRESSED, seed: int = 0) -> SequenceTRM:
    torch.manual_seed(seed)
    trm = SequenceTRM(d_compressed, n_layers=1, n_heads=2, n_latent_steps=1, n_deep_recursions=1,
                      n_supervision_steps=N_SUP)
    trm.metadata = {"backbone": backbone.backbone_id, "layer": -1, "d_model": backbone.hidden_size,
                    "d_compressed": d_compressed}
    return trm


@pytest.fixture(scope="module")
def backbone(tiny_backbone_dir):
    return load_backbone(str(tiny_backbone_dir), "float32")


@pytest.fixture(scope="module")
def reasoner(backbone):
    return LatentReasoner(backbone, make_compressor(backbone), make_trm(backbone), device="cpu")


# ------------------------------------------------------------------------------ every mode


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_returns_the_documented_fields(reasoner, mode):
    problems = make_problems(3)
    results = reasoner.answer(problems, mode=mode, max_new_tokens=4, max_thinking_tokens=3, batch_size=2)

    assert [r.sample_id for r in results] == [p.sample_id for p in problems]
    for problem, result in zip(problems, results):
        assert isinstance(result, AnswerResult) and result.mode == mode and result.error is None
        assert isinstance(result.answer_text, str)
        assert result.extracted_answer == (extract_math_answer(result.answer_text) if result.answer_text.strip()
                                           else None)
        # graded against the problem's gold answer: the checker's verdict on this very answer
        assert result.correct is check_answer(problem, result.answer_text)
        assert 0 <= result.answer_tokens <= 4
        assert 0 <= result.time_to_first_answer_token_s <= result.total_time_s
        if mode == "cot" or mode in ORACLE_MODES:
            assert 0 <= result.thinking_tokens <= 3
            # a forced close happens only when the thinking budget ran out
            assert result.closed_thinking is True or (result.closed_thinking is False and result.thinking_tokens == 3)
        else:
            assert result.thinking_tokens == 0
        if mode in ("trm", "trm_first_token"):
            assert 1 <= result.trm_steps <= N_SUP
        else:
            assert result.trm_steps is None
        if mode in ("trm", "trm_first_token") or mode in ORACLE_MODES:
            assert result.trm_overhead_s is not None and result.trm_overhead_s >= 0
            assert result.soft_vectors == 1
        else:
            assert result.trm_overhead_s is None and result.soft_vectors == 0
        if mode in ORACLE_MODES:  # whose true state was fed: its own, except in `shuffled`
            assert (result.state_source == problem.sample_id) is (mode != "shuffled")
        else:
            assert result.state_source is None
        assert result.first_token_logits is None and result.first_answer_token is None  # not asked for
    assert set(results[0].to_dict()) >= {
        "answer_text", "extracted_answer", "correct", "thinking_tokens", "answer_tokens", "trm_steps",
        "time_to_first_answer_token_s", "total_time_s", "checker_error", "crashed", "kl_to_cot",
    }
    assert "first_token_logits" not in results[0].to_dict()  # a side channel, never serialised


def test_cot_no_think_and_oracle_full_run_without_a_trm(backbone):
    plain = LatentReasoner(backbone, device="cpu")
    assert plain.answer(make_problems(1), mode="no_think", max_new_tokens=2)[0].error is None
    # oracle_full needs only the adapter (norm matching by default)
    assert plain.answer(make_problems(2), mode="oracle_full", max_new_tokens=2, max_thinking_tokens=2)[0].error is None
    for mode in ("trm", "trm_first_token"):
        with pytest.raises(LLMTRMError, match="needs a compressor and a TRM"):
            plain.answer(make_problems(1), mode=mode)
    for mode in ("oracle", "shuffled"):
        with pytest.raises(LLMTRMError, match="through the compressor"):
            plain.answer(make_problems(2), mode=mode)
    # the oracle modes need a compressor, not a TRM
    lone = LatentReasoner(backbone, compressor=make_compressor(backbone), device="cpu")
    assert not lone.has_trm and lone.has_compressor
    assert lone.answer(make_problems(2), mode="oracle", max_new_tokens=2, max_thinking_tokens=2)[0].error is None
    with pytest.raises(LLMTRMError, match="needs a compressor and a TRM"):
        lone.answer(make_problems(1), mode="trm")
    with pytest.raises(ConfigMismatchError, match="pass `compressor=` as well"):
        LatentReasoner(backbone, trm=make_trm(backbone), device="cpu")
    with pytest.raises(ConfigMismatchError, match="D=32.*D=64"):
        LatentReasoner(backbone, compressor=make_compressor(backbone, d_model=32), device="cpu")


def test_cot_stops_at_the_closing_tag_and_splits_the_thinking(reasoner):
    from llm_trm.generation import _StopAfterText

    tokenizer = reasoner.tokenizer
    prompt = tokenizer.encode("<think>\n", add_special_tokens=False)
    closed = prompt + tokenizer.encode("3 + 4 = 7</think>", add_special_tokens=False)
    still_thinking = prompt + tokenizer.encode("3 + 4 = 7 and", add_special_tokens=False)
    stop = _StopAfterText(tokenizer, "</think>", prompt_width=len(prompt))
    assert stop(torch.tensor([closed]), None).tolist() == [True]
    assert stop(torch.tensor([still_thinking]), None).tolist() == [False]
    assert stop(torch.tensor([prompt]), None).tolist() == [False]  # the prompt's own tags do not count



# ------------------------------------------------------------------- the soft vectors are used


def test_trm_output_changes_the_answer_logits(backbone):
    problems = make_problems(2)
    compressor = make_compressor(backbone)
    first = LatentReasoner(backbone, compressor, make_trm(backbone, seed=0), device="cpu")
    same = LatentReasoner(backbone, compressor, make_trm(backbone, seed=0), device="cpu")
    other = LatentReasoner(backbone, compressor, make_trm(backbone, seed=1), device="cpu")

    logits = first.first_answer_logits(problems, "trm")
    assert torch.allclose(logits, same.first_answer_logits(problems, "trm"), atol=1e-5)
    assert not torch.allclose(logits, other.first_answer_logits(problems, "trm"), atol=1e-3)


def test_trm_answer_generates_from_the_soft_vector_inputs(reasoner):
    """The cached prompt + soft vectors give the same logits as one uncached pass, and generation starts there."""
    problems = make_problems(2)
    latent = reasoner.latent_inputs(problems)
    uncached = reasoner.model(inputs_embeds=latent.inputs_embeds, attention_mask=latent.attention_mask,
                              position_ids=position_ids(latent.attention_mask)).logits[:, -1]
    logits = reasoner.first_answer_logits(problems, "trm")
    assert torch.allclose(logits, uncached, atol=1e-4)

    # 1 new token: the generated token is the argmax of those logits
    results = reasoner.answer(problems, mode="trm", max_new_tokens=1)
    expected = [reasoner.decode([token]) for token in logits.argmax(-1).tolist()]
    end_ids = reasoner.end_ids
    for result, token, text in zip(results, logits.argmax(-1).tolist(), expected):
        assert result.answer_text == ("" if token in end_ids else text)


def test_trm_first_token_comes_from_lm_head_on_the_prediction(reasoner):
    problems = make_problems(2)
    latent = reasoner.latent_inputs(problems, first_token=True)
    head = reasoner.model.get_output_embeddings()
    assert torch.equal(latent.first_token, head(latent.predicted_state).argmax(-1))
    # the first token's embedding is the last input: the LLM continues after it
    assert torch.allclose(latent.inputs_embeds[:, -1], reasoner.model.get_input_embeddings()(latent.first_token))


# ------------------------------------------------------------------------------ bad input


def test_mismatched_d_compressed_is_a_clear_error(backbone):
    with pytest.raises(ConfigMismatchError, match=r"D'=8.*D'=16"):
        LatentReasoner(backbone, make_compressor(backbone), make_trm(backbone, d_compressed=8), device="cpu")


def test_compressor_for_another_backbone_is_a_clear_error(backbone):
    with pytest.raises(ConfigMismatchError, match="D=32.*D=64"):
        LatentReasoner(backbone, make_compressor(backbone, d_model=32), make_trm(backbone), device="cpu")
    trm = make_trm(backbone)
    trm.metadata["backbone"] = "someone/else"
    with pytest.raises(ConfigMismatchError, match="backbone='someone/else'"):
        LatentReasoner(backbone, make_compressor(backbone), trm, device="cpu")


def test_a_missing_artifact_is_a_one_line_error(backbone, tmp_path):
    with pytest.raises(LLMTRMError, match="missing is neither an existing export folder"):
        LatentReasoner(backbone, str(tmp_path / "missing"), make_trm(backbone), device="cpu")
    compressor_dir = make_compressor(backbone).save_pretrained(tmp_path / "compressor")
    with pytest.raises(LLMTRMError, match="compressor holds a 'dimension_compressor', not a 'sequence_trm'"):
        LatentReasoner(backbone, make_compressor(backbone), str(compressor_dir), device="cpu")


def test_a_problem_that_does_not_fit_the_context_is_a_counted_failure(reasoner):
    problems = make_problems(2)
    too_long = Problem("toy:long", "toy", 9, "seven " * 600, "7", "math")
    results = reasoner.answer([problems[0], too_long, problems[1]], mode="no_think", max_new_tokens=2)
    assert [r.sample_id for r in results] == ["toy:0", "toy:long", "toy:1"]
    assert "does not fit the context" in results[1].error and results[1].answer_text == ""
    assert results[0].error is None and results[2].error is None


def test_a_problem_without_gold_answer_is_not_scored(reasoner):
    no_gold = Problem("toy:x", "toy", 0, "Say hi.", "", "math")
    assert reasoner.answer([no_gold], mode="no_think", max_new_tokens=2)[0].correct is None


# ------------------------------------------------------------------------------ adapters


def test_norm_match_adapter_rescales_to_the_embedding_norm(backbone):
    embeddings = backbone.model.get_input_embeddings().weight
    adapter = NormMatchAdapter.for_embeddings(embeddings, n_vectors=2)
    assert sum(p.numel() for p in adapter.parameters()) == 0
    out = adapter(torch.randn(3, backbone.hidden_size) * 50)
    assert out.shape == (3, 2, backbone.hidden_size)
    assert torch.allclose(out.norm(dim=-1), torch.full((3, 2), mean_embedding_norm(embeddings)), rtol=1e-4)


def test_linear_adapter_starts_near_norm_matching():
    embeddings = torch.randn(100, 24)
    linear = LinearAdapter.for_embeddings(embeddings, d_model=24, n_vectors=3)
    norm_match = NormMatchAdapter.for_embeddings(embeddings, n_vectors=3)
    hidden = torch.randn(5, 24) * 40
    out, reference = linear(hidden), norm_match(hidden)
    assert out.shape == (5, 3, 24)
    assert torch.nn.functional.cosine_similarity(out, reference, dim=-1).min() > 0.99
    assert not torch.allclose(out[:, 0], out[:, 1])  # the k vectors differ
    assert LinearAdapter(32, 24, n_vectors=2)(torch.randn(4, 32)).shape == (4, 2, 24)  # D != E


def test_adapters_save_and_load(tmp_path):
    linear = LinearAdapter(8, 8, n_vectors=2, init_norm=3.0)
    linear.save_pretrained(tmp_path / "linear")
    loaded = LatentAdapter.from_pretrained(tmp_path / "linear")
    assert isinstance(loaded, LinearAdapter) and loaded.n_vectors == 2
    assert torch.equal(loaded.proj.weight, linear.proj.weight)
    assert (tmp_path / "linear" / "adapter.safetensors").is_file()

    NormMatchAdapter(8, n_vectors=3, target_norm=2.5).save_pretrained(tmp_path / "norm")
    loaded = LatentAdapter.from_pretrained(tmp_path / "norm")
    assert isinstance(loaded, NormMatchAdapter) and loaded.target_norm == 2.5 and loaded.n_vectors == 3
    with pytest.raises(ValueError, match="NormMatchAdapter"):
        LinearAdapter.from_pretrained(tmp_path / "norm")


def test_norm_match_and_linear_adapters_pool_m_states_onto_k_slots():
    embeddings = torch.randn(50, 16)
    states = torch.randn(3, 4, 16) * 30
    norm_match = NormMatchAdapter.for_embeddings(embeddings, n_vectors=2, n_states=4)
    units = torch.nn.functional.normalize(states, dim=-1)
    # slot 0 pools states 0-1, slot 1 states 2-3, each rescaled to the embeddings' mean norm
    expected = torch.stack([units[:, :2].mean(1), units[:, 2:].mean(1)], 1)
    expected = torch.nn.functional.normalize(expected, dim=-1) * mean_embedding_norm(embeddings)
    torch.testing.assert_close(norm_match(states), expected)
    linear = LinearAdapter.for_embeddings(embeddings, d_model=16, n_vectors=2, n_states=4)
    assert linear.proj.weight.shape == (2 * 16, 4 * 16)
    assert torch.nn.functional.cosine_similarity(linear(states), norm_match(states), dim=-1).min() > 0.99
    with pytest.raises(ConfigMismatchError, match="m=4.*m=1"):
        linear(states[:, 0])


def test_concept_adapter_in_the_trm_mode_and_k_of_a_folder(backbone, tmp_path):
    reasoner = LatentReasoner(backbone, make_compressor(backbone), make_trm(backbone), adapter="concept",
                              n_soft_vectors=2, device="cpu")
    assert isinstance(reasoner.adapter, ConceptAdapter) and reasoner.adapter.attached
    result = reasoner.answer(make_problems(1), mode="trm", max_new_tokens=2)[0]
    assert result.error is None and result.soft_vectors == 2
    folder = LinearAdapter(backbone.hidden_size, backbone.hidden_size, n_vectors=3).save_pretrained(tmp_path / "k3")
    loaded = LatentReasoner(backbone, make_compressor(backbone), make_trm(backbone), adapter=str(folder), device="cpu")
    assert loaded.adapter.n_vectors == 3  # n_soft_vectors unset: the folder's own k
    with pytest.raises(ConfigMismatchError) as err:
        LatentReasoner(backbone, make_compressor(backbone), make_trm(backbone), adapter=str(folder), n_soft_vectors=2,
                       device="cpu")
    assert "k=3" in str(err.value) and "k=2" in str(err.value) and "\n" not in str(err.value)


def test_adapter_saved_with_the_trm_is_used(backbone, tmp_path):
    trm_dir = make_trm(backbone).save_pretrained(tmp_path / "trm")
    LinearAdapter(backbone.hidden_size, backbone.hidden_size, n_vectors=2).save_pretrained(trm_dir / "adapter")
    reasoner = LatentReasoner(backbone, make_compressor(backbone), str(trm_dir), device="cpu")
    assert isinstance(reasoner.adapter, LinearAdapter) and reasoner.adapter.n_vectors == 2
    result = reasoner.answer(make_problems(1), mode="trm", max_new_tokens=2)[0]
    assert result.soft_vectors == 2 and result.error is None


# ------------------------------------------------------------------------------ statistics


def test_wilson_interval_matches_a_hand_computation():
    # 8/10 at z=1.96: centre (0.8 + 1.96²/20) / (1 + 1.96²/10), half-width 1.96 sqrt(0.016 + 1.96²/400) / (1 + 1.96²/10)
    z = 1.959964
    denominator = 1 + z**2 / 10
    centre = (0.8 + z**2 / 20) / denominator
    half = z * math.sqrt(0.8 * 0.2 / 10 + z**2 / 400) / denominator
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(centre - half) and high == pytest.approx(centre + half)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)  # the textbook value
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 0.0)


# ------------------------------------------------------------------------------ oracle modes


def distinct_problems(count: int) -> list[Problem]:
    """Problems with distinct prompts (so distinct true states)."""
    return [Problem(f"toy:{i}", "toy", i, f"What is {i} + {2 * i + 3}?", str(3 * i + 3), "math") for i in range(count)]


class GenerateSpy:
    """Records the keyword arguments of every `generate` call the reasoner makes."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        return self.real(*args, **kwargs)

    def soft_vectors(self, reasoner) -> torch.Tensor:
        """The k soft vectors of every latent generation so far, in order: `[prompt][soft]</think>`."""
        close, k = len(reasoner.close_ids), reasoner.adapter.n_vectors
        return torch.cat([c["inputs_embeds"][:, -close - k : -close] for c in self.calls
                          if c.get("inputs_embeds") is not None])


@pytest.fixture()
def generate_spy(monkeypatch):
    import llm_trm.inference as inference

    spy = GenerateSpy(inference.generate)
    monkeypatch.setattr(inference, "generate", spy)
    return spy


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative distance ||a - b|| / ||b|| (soft vectors are small: the tiny model's embeddings are)."""
    return float((a - b).norm() / b.norm())


def extraction_state(reasoner, problem: Problem, thinking_ids, offset: int = 0) -> torch.Tensor:
    """The final-layer state at the last token of prompt + thinking + closing tag, from one unpadded pass
    (offset: that many positions earlier)."""
    ids = encode_prompt(reasoner.tokenizer, problem).ids + list(thinking_ids) + reasoner.close_ids
    out = reasoner.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1 - offset]


def test_oracle_hands_the_llm_the_state_an_extraction_pass_gives(reasoner, generate_spy):
    problems = distinct_problems(3)
    cot = reasoner.answer(problems, mode="cot", max_new_tokens=2, max_thinking_tokens=3)
    generate_spy.calls.clear()
    reasoner.answer(problems, mode="oracle", max_new_tokens=2, max_thinking_tokens=3, batch_size=3)
    # cot's very thinking is reused: the only generation is the answer's
    assert len(generate_spy.calls) == 1 and generate_spy.calls[0]["inputs_embeds"] is not None
    thoughts = reasoner.thoughts(problems, 3)
    assert [reasoner.decode(t.ids) for t in thoughts] == [r.thinking_text for r in cot]

    with torch.no_grad():
        states = torch.stack([extraction_state(reasoner, p, t.ids) for p, t in zip(problems, thoughts)])
        earlier = torch.stack([extraction_state(reasoner, p, t.ids, offset=1) for p, t in zip(problems, thoughts)])
        compressor, adapter = reasoner.compressor, reasoner.adapter
        expected = adapter(compressor.decompress(compressor.compress(states)))
        handed = generate_spy.soft_vectors(reasoner)
        assert gap(handed, expected) < 1e-4
        # the test can tell: the state one position earlier, or skipping the compressor, gives other vectors
        assert gap(handed, adapter(compressor.decompress(compressor.compress(earlier)))) > 1e-2
        assert gap(handed, adapter(states)) > 1e-2

        generate_spy.calls.clear()
        reasoner.answer(problems, mode="oracle_full", max_new_tokens=2, max_thinking_tokens=3, batch_size=2)
        assert gap(generate_spy.soft_vectors(reasoner), adapter(states)) < 1e-4


def test_oracle_thinks_itself_when_cot_did_not_run(backbone, generate_spy):
    fresh = LatentReasoner(backbone, compressor=make_compressor(backbone), device="cpu")
    problems = distinct_problems(2)
    results = fresh.answer(problems, mode="oracle", max_new_tokens=2, max_thinking_tokens=3)
    thinking_calls = [c for c in generate_spy.calls if c.get("think") is not None]
    assert len(thinking_calls) == 1 and thinking_calls[0]["think"].max_thinking_tokens == 3
    # the same thinking cot does: cot afterwards thinks the same tokens
    cot = fresh.answer(problems, mode="cot", max_new_tokens=2, max_thinking_tokens=3)
    assert [r.thinking_tokens for r in results] == [r.thinking_tokens for r in cot]
    assert [fresh.decode(t.ids) for t in fresh.thoughts(problems, 3)] == [r.thinking_text for r in cot]


def test_derangement_never_pairs_an_item_with_itself():
    for count in range(2, 12):
        for seed in range(3):
            order = derangement(count, seed)
            assert sorted(order) == list(range(count))
            assert all(order[i] != i for i in range(count))
    assert derangement(6, 0) == derangement(6, 0)
    assert any(derangement(6, seed) != derangement(6, 0) for seed in range(1, 5))
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1)


def test_shuffled_gives_each_problem_another_problems_true_state(reasoner, generate_spy):
    problems = distinct_problems(5)
    ids = [p.sample_id for p in problems]
    reasoner.answer(problems, mode="oracle", max_new_tokens=2, max_thinking_tokens=3, batch_size=5)
    own = generate_spy.soft_vectors(reasoner)
    generate_spy.calls.clear()
    # batches of 2: partners lie in other batches
    results = reasoner.answer(problems, mode="shuffled", max_new_tokens=2, max_thinking_tokens=3, batch_size=2)
    handed = generate_spy.soft_vectors(reasoner)

    sources = [r.state_source for r in results]
    assert sources == [ids[j] for j in derangement(5, 0)]
    assert sorted(sources) == sorted(ids) and all(source != own_id for source, own_id in zip(sources, ids))
    for row, source in enumerate(sources):
        assert gap(handed[row], own[ids.index(source)]) < 1e-4  # the partner's true state
        assert gap(handed[row], own[row]) > 1e-2  # not its own
    # another seed, another pairing
    other = reasoner.answer(problems, mode="shuffled", max_new_tokens=1, max_thinking_tokens=3, shuffle_seed=3)
    assert [r.state_source for r in other] == [ids[j] for j in derangement(5, 3)] != sources
    with pytest.raises(LLMTRMError, match="at least 2 problems"):
        reasoner.answer(problems[:1], mode="shuffled", max_thinking_tokens=3)


def test_modes_that_think_refuse_a_zero_thinking_budget_before_running(reasoner, generate_spy):
    for mode in ("cot", "oracle", "oracle_full", "shuffled"):
        with pytest.raises(LLMTRMError, match=f"mode '{mode}' needs the LLM to think, but max_thinking_tokens is 0"):
            reasoner.answer(distinct_problems(2), mode=mode, max_thinking_tokens=0)
    assert generate_spy.calls == []
    assert reasoner.answer(distinct_problems(1), mode="trm", max_new_tokens=1, max_thinking_tokens=0)[0].error is None


# ------------------------------------------------------------------------------ first-token logits, checking


def test_captured_first_token_logits_are_the_ones_the_answer_starts_from(reasoner):
    problems = distinct_problems(2)
    tokenizer, model = reasoner.tokenizer, reasoner.model
    cot = reasoner.answer(problems, mode="cot", max_new_tokens=2, max_thinking_tokens=3, capture_logits=True)
    no_think = reasoner.answer(problems, mode="no_think", max_new_tokens=2, capture_logits=True)
    with torch.no_grad():
        for problem, result, thought in zip(problems, cot, reasoner.thoughts(problems, 3)):
            assert not thought.closed  # forced close: the context is prompt + thinking + the canonical tag
            ids = encode_prompt(tokenizer, problem).ids + list(thought.ids) + reasoner.close_ids
            expected = model(input_ids=torch.tensor([ids])).logits[0, -1]
            assert torch.allclose(result.first_token_logits, expected, atol=1e-4)
            assert result.first_answer_token == int(expected.argmax())
        for problem, result in zip(problems, no_think):
            expected = model(input_ids=torch.tensor([encode_prompt(tokenizer, problem, thinking=False).ids])).logits[0, -1]
            assert torch.allclose(result.first_token_logits, expected, atol=1e-4)
        first = reasoner.answer(problems, mode="trm_first_token", max_new_tokens=2, capture_logits=True)
        latent = reasoner.latent_inputs(problems, first_token=True)
        head = model.get_output_embeddings()(latent.predicted_state)
        assert torch.allclose(torch.stack([r.first_token_logits for r in first]), head, atol=1e-4)
        assert [r.first_answer_token for r in first] == latent.first_token.tolist()
    # first_answer_logits is the same capture
    assert torch.allclose(reasoner.first_answer_logits(problems, "cot", max_thinking_tokens=3),
                          torch.stack([r.first_token_logits for r in cot]), atol=1e-4)


def test_an_answer_checker_that_raises_is_counted_apart(reasoner, monkeypatch):
    import llm_trm.inference as inference

    def broken(problem, text):
        raise RuntimeError("sandbox unavailable\nsecond line")

    monkeypatch.setattr(inference, "check_answer", broken)
    results = reasoner.answer(make_problems(2), mode="no_think", max_new_tokens=2)
    assert [(r.correct, r.checker_error, r.error) for r in results] == [(None, "RuntimeError: sandbox unavailable", None)] * 2


def test_a_crash_in_record_mode_is_flagged(reasoner, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(reasoner, "latent_inputs", crash)
    results = reasoner.answer(make_problems(2), mode="trm", on_error="record")
    assert [(r.error, r.crashed) for r in results] == [("RuntimeError: out of memory", True)] * 2
    too_long = Problem("toy:long", "toy", 9, "seven " * 600, "7", "math")
    assert reasoner.answer([too_long], mode="no_think", on_error="record")[0].crashed is False


class LastStatesStub(LatentAdapter):
    """An adapter that takes m states [B, m, D] (as the bridge's will, `n_states = m`): one soft vector each."""

    kind = "test_last_states"

    def __init__(self, d_model: int, n_states: int) -> None:
        super().__init__()
        self.d_model = self.d_embed = d_model
        self.n_states = self.n_vectors = n_states
        self.metadata = {}

    def config(self):
        return {"kind": self.kind, "d_model": self.d_model, "n_states": self.n_states}

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        assert states.shape[1:] == (self.n_states, self.d_model), states.shape
        return torch.nn.functional.normalize(states.float(), dim=-1) * 0.5


def test_oracle_hands_the_last_m_states_to_an_adapter_that_takes_m(backbone, generate_spy):
    m = 3
    compressor = make_compressor(backbone)
    reasoner = LatentReasoner(backbone, compressor=compressor, adapter=LastStatesStub(backbone.hidden_size, m),
                              device="cpu")
    assert reasoner.n_states == m
    problems = distinct_problems(2)
    reasoner.answer(problems, mode="oracle_full", max_new_tokens=1, max_thinking_tokens=3)
    reasoner.answer(problems, mode="oracle", max_new_tokens=1, max_thinking_tokens=3)
    full, compressed = generate_spy.soft_vectors(reasoner).split(2)
    with torch.no_grad():
        states = torch.stack([torch.stack([extraction_state(reasoner, p, t.ids, offset) for offset in (2, 1, 0)])
                              for p, t in zip(problems, reasoner.thoughts(problems, 3))])  # [B, m, D], in order
        assert gap(full, reasoner.adapter(states)) < 1e-4
        assert gap(compressed, reasoner.adapter(compressor.decompress(compressor.compress(states)))) < 1e-4
        assert gap(full, reasoner.adapter(states.flip(1))) > 1e-2  # the order of the m states matters


def test_use_adapter_swaps_the_way_in_and_keeps_the_remembered_thinking(backbone):
    reasoner = LatentReasoner(backbone, make_compressor(backbone), make_trm(backbone), adapter="norm_match",
                              device="cpu")
    problems = make_problems(2)
    reasoner.answer(problems, mode="cot", max_new_tokens=2, max_thinking_tokens=3)
    thoughts = dict(reasoner.remembered_thinking)
    before = reasoner.latent_inputs(problems).inputs_embeds
    assert reasoner.use_adapter("concept") is reasoner
    assert isinstance(reasoner.adapter, ConceptAdapter) and reasoner.parts.adapter is reasoner.adapter
    after = reasoner.latent_inputs(problems).inputs_embeds
    assert not torch.allclose(before, after)  # the soft vector changed, the prompt part did not
    soft = -1 - len(reasoner.close_ids)  # [prompt][soft vector][closing suffix]
    assert torch.equal(before[:, :soft], after[:, :soft]) and reasoner.remembered_thinking == thoughts


# ------------------------------------------------------------------------------ cot's answer under a mode


def cot_context_ids(reasoner, problem: Problem, budget: int) -> list[int]:
    """What cot answered from: prompt + its remembered thinking + the closing suffix."""
    prompt = encode_prompt(reasoner.tokenizer, problem).ids
    return prompt + list(reasoner.remembered_thinking[(tuple(prompt), budget)].ids) + reasoner.close_ids


def forced_log_probs(reasoner, context_embeds: torch.Tensor, answer: list[int]) -> torch.Tensor:
    """One unpadded, uncached pass over [context][answer]: log p(a_t | context, a_<t), [T, V]."""
    with torch.no_grad():
        answer_embeds = reasoner.model.get_input_embeddings()(torch.tensor(answer[:-1], dtype=torch.long))
        logits = reasoner.model(inputs_embeds=torch.cat([context_embeds, answer_embeds])[None]).logits[0]
    return logits[context_embeds.shape[0] - 1:].float().log_softmax(-1)


def ids_log_probs(reasoner, context_ids: list[int], answer: list[int]) -> torch.Tensor:
    return forced_log_probs(reasoner, reasoner.model.get_input_embeddings()(torch.tensor(context_ids)), answer)


def hand_kl_and_nll(cot: torch.Tensor, mode: torch.Tensor, answer: list[int]) -> tuple[float, float]:
    kl = (cot.exp() * (cot - mode)).sum(-1).mean()
    nll = -mode[torch.arange(len(answer)), torch.tensor(answer)].mean()
    return float(kl), float(nll)


def shortened(rows: list[AnswerResult], row: int, length: int) -> list[AnswerResult]:
    """cot's results with one answer cut short: rows of different answer lengths in one batch."""
    from dataclasses import replace

    return [replace(r, answer_ids=r.answer_ids[:length]) if i == row else r for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def precise(tiny_backbone_dir):
    """The tiny backbone in float64: its next-token distributions are nearly flat (answer KLs of 1e-5 to 1e-4),
    so a hand computation can tell a right context from a wrong one only without fp32 noise in the passes
    (the metrics themselves are fp32 on both sides)."""
    backbone = load_backbone(str(tiny_backbone_dir), torch.float64)
    return LatentReasoner(backbone, make_compressor(backbone), make_trm(backbone), device="cpu")


def test_the_answer_kl_of_cot_against_itself_is_zero(reasoner):
    problems = make_problems(2)
    cot = reasoner.answer(problems, mode="cot", max_new_tokens=4, max_thinking_tokens=3, reference="own")
    assert all(len(r.answer_ids) == r.answer_tokens > 0 for r in cot)
    for problem, row in zip(problems, cot):
        assert row.answer_kl_to_cot == pytest.approx(0.0, abs=1e-6)
        own = ids_log_probs(reasoner, cot_context_ids(reasoner, problem, 3), list(row.answer_ids))
        assert row.cot_answer_nll == pytest.approx(hand_kl_and_nll(own, own, list(row.answer_ids))[1], rel=1e-4)
    # against an earlier cot run: its thinking is the same, so is its context
    again = reasoner.answer(problems, mode="cot", max_new_tokens=4, max_thinking_tokens=3, reference=cot)
    assert [r.answer_kl_to_cot for r in again] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert "answer_ids" not in cot[0].to_dict() and "answer_kl_to_cot" in cot[0].to_dict()


def test_no_think_answer_kl_is_two_unpadded_passes_by_hand(precise):
    reasoner = precise
    problems = make_problems(2)
    tokenizer = reasoner.tokenizer
    assert len({len(encode_prompt(tokenizer, p, thinking=False).ids) for p in problems}) == 2  # padding is exercised
    cot = shortened(reasoner.answer(problems, mode="cot", max_new_tokens=4, max_thinking_tokens=3), 1, 2)
    rows = reasoner.answer(problems, mode="no_think", max_new_tokens=4, max_thinking_tokens=3, batch_size=2,
                           reference=cot)
    for problem, reference, row in zip(problems, cot, rows):
        answer = list(reference.answer_ids)
        mine = ids_log_probs(reasoner, encode_prompt(tokenizer, problem, thinking=False).ids, answer)
        context = cot_context_ids(reasoner, problem, 3)
        kl, nll = hand_kl_and_nll(ids_log_probs(reasoner, context, answer), mine, answer)
        assert row.answer_kl_to_cot == pytest.approx(kl, rel=1e-4)
        assert row.cot_answer_nll == pytest.approx(nll, rel=1e-5)
        # the test can tell: cot's context without its suffix's last token gives another KL
        wrong_kl = hand_kl_and_nll(ids_log_probs(reasoner, context[:-1], answer), mine, answer)[0]
        assert wrong_kl != pytest.approx(kl, rel=0.1)


def test_trm_answer_kl_is_a_hand_computation_through_soft_inputs(precise):
    reasoner = precise
    from llm_trm.latent import PromptBatch, pre_states, predict, prompt_pass, soft_inputs, soft_vectors

    problems = make_problems(2)
    cot = shortened(reasoner.answer(problems, mode="cot", max_new_tokens=4, max_thinking_tokens=3), 0, 3)
    rows = reasoner.answer(problems, mode="trm", max_new_tokens=4, max_thinking_tokens=3, batch_size=2,
                           reference=cot)
    model, tokenizer = reasoner.model, reasoner.tokenizer
    for problem, reference, row in zip(problems, cot, rows):
        answer = list(reference.answer_ids)
        with torch.no_grad():  # one problem alone: [prompt][soft vector]</think>\n, no padding, no cache
            alone = PromptBatch.of([encode_prompt(tokenizer, problem)], tokenizer.pad_token_id)
            states, _ = prompt_pass(model, alone.input_ids, alone.mask, use_cache=False)
            prediction = predict(reasoner.compressor, reasoner.trm, *pre_states(states, alone.mask, alone.pre_lengths))
            _, soft = soft_vectors(reasoner.compressor, reasoner.adapter, prediction.prediction)
            embeds, _ = soft_inputs(model, alone, soft, reasoner.close_ids)
        mine = forced_log_probs(reasoner, embeds[0], answer)
        theirs = ids_log_probs(reasoner, cot_context_ids(reasoner, problem, 3), answer)
        kl, nll = hand_kl_and_nll(theirs, mine, answer)
        assert row.answer_kl_to_cot == pytest.approx(kl, rel=1e-4)
        assert row.cot_answer_nll == pytest.approx(nll, rel=1e-5)
        # the test can tell: the soft vector left out ([prompt]</think>\n) gives another NLL and KL
        close = len(reasoner.close_ids)
        without = forced_log_probs(reasoner, torch.cat([embeds[0, : -close - 1], embeds[0, -close:]]), answer)
        wrong_kl, wrong_nll = hand_kl_and_nll(theirs, without, answer)
        assert wrong_kl != pytest.approx(kl, rel=0.1) and wrong_nll != pytest.approx(nll, rel=1e-4)


def test_every_scored_mode_fills_the_answer_kl_and_trm_first_token_is_left_out(reasoner):
    problems = distinct_problems(3)
    cot = reasoner.answer(problems, mode="cot", max_new_tokens=3, max_thinking_tokens=3)
    kl = {}
    for mode in ("no_think", "trm", "trm_first_token", "oracle", "oracle_full", "shuffled"):
        rows = reasoner.answer(problems, mode=mode, max_new_tokens=3, max_thinking_tokens=3, batch_size=2,
                               reference=cot)
        kl[mode] = [r.answer_kl_to_cot for r in rows]
        nll = [r.cot_answer_nll for r in rows]
        if mode == "trm_first_token":
            assert kl[mode] == [None] * 3 and nll == [None] * 3
        else:
            assert all(v is not None and v >= 0 for v in kl[mode]) and all(v is not None and v > 0 for v in nll)
    assert kl["oracle"] != kl["shuffled"]  # another problem's state is another context
    # without a reference nothing is scored
    plain = reasoner.answer(problems, mode="trm", max_new_tokens=3)
    assert [r.answer_kl_to_cot for r in plain] == [None] * 3 and plain[0].answer_ids


def test_a_reference_that_does_not_fit_is_a_one_line_error(reasoner, backbone):
    problems = make_problems(2)
    cot = reasoner.answer(problems, mode="cot", max_new_tokens=2, max_thinking_tokens=3)
    with pytest.raises(LLMTRMError, match="not these 2 in this order"):
        reasoner.answer(problems, mode="no_think", max_new_tokens=2, reference=cot[::-1])
    with pytest.raises(LLMTRMError, match="only mode cot takes 'own'"):
        reasoner.answer(problems, mode="trm", max_new_tokens=2, reference="own")
    # cot's thinking under another budget, or on another reasoner, is not what cot answered from
    with pytest.raises(LLMTRMError, match="max_thinking_tokens=5\\) is not remembered"):
        reasoner.answer(problems, mode="no_think", max_new_tokens=2, max_thinking_tokens=5, reference=cot)
    with pytest.raises(LLMTRMError, match="is not remembered"):
        LatentReasoner(backbone, device="cpu").answer(problems, mode="no_think", max_new_tokens=2,
                                                      max_thinking_tokens=3, reference=cot)
