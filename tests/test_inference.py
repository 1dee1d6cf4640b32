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
from llm_trm.inference import MODES, AnswerResult, LatentReasoner, wilson_interval
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
        if mode == "cot":
            assert 0 <= result.thinking_tokens <= 3
            # a forced close happens only when the thinking budget ran out
            assert result.closed_thinking is True or (result.closed_thinking is False and result.thinking_tokens == 3)
        else:
            assert result.thinking_tokens == 0
        if mode in ("trm", "trm_first_token"):
            assert 1 <= result.trm_steps <= N_SUP
            assert result.trm_overhead_s is not None and result.trm_overhead_s >= 0
            assert result.soft_vectors == 1
        else:
            assert result.trm_steps is None and result.trm_overhead_s is None
    assert set(results[0].to_dict()) >= {
        "answer_text", "extracted_answer", "correct", "thinking_tokens", "answer_tokens", "trm_steps",
        "time_to_first_answer_token_s", "total_time_s",
    }


def test_cot_and_no_think_run_without_a_trm(backbone):
    plain = LatentReasoner(backbone, device="cpu")
    assert plain.answer(make_problems(1), mode="no_think", max_new_tokens=2)[0].error is None
    with pytest.raises(Exception, match="compressor"):
        plain.answer(make_problems(1), mode="trm")


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
