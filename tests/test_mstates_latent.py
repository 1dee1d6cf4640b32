"""A TRM with m > 1 reasoning tokens on the latent path: predict -> soft_vectors -> adapter, the state count
checked against the adapter's, LatentReasoner's trm modes and GRPO's exploration noise.

The bridge's adapters take m states (`n_states`) on another branch; until then `StatesStub` stands in:
one norm-matched soft vector per state, and it keeps what it was handed."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_trm.backbone import backbone_id, load_backbone
from llm_trm.data.problems import Problem
from llm_trm.errors import ConfigMismatchError
from llm_trm.inference import LatentReasoner
from llm_trm.latent import LatentParts, predict, soft_vectors
from llm_trm.models.adapter import LatentAdapter, LinearAdapter, NormMatchAdapter
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.trm import SequenceTRM
from llm_trm.modules.grpo import GRPOModule
from llm_trm.rl.objective import gaussian_log_prob

D_COMPRESSED = 16
M = 4
TINY_TRM = dict(n_layers=1, n_heads=2, n_latent_steps=1, n_deep_recursions=1, n_supervision_steps=2)


class StatesStub(LatentAdapter):
    """[B, m, D] -> [B, m, E]: each state's direction at a learnable norm (D == E); refuses another count."""

    kind = "states_stub"

    def __init__(self, d_model: int, n_states: int, norm: float = 1.0) -> None:
        super().__init__()
        self.d_model = self.d_embed = d_model
        self.n_states = self.n_vectors = n_states
        self.norm = nn.Parameter(torch.tensor(float(norm)))
        self.metadata: dict[str, Any] = {}
        self.seen: list[Tensor] = []

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "d_model": self.d_model, "n_states": self.n_states}

    def forward(self, states: Tensor) -> Tensor:
        if states.ndim != 3 or states.shape[1] != self.n_states:
            raise ConfigMismatchError(f"StatesStub takes [B, {self.n_states}, D], got {list(states.shape)}")
        self.seen.append(states.detach().clone())
        return F.normalize(states, dim=-1) * self.norm


@pytest.fixture(scope="module")
def backbone(tiny_backbone_dir):
    return load_backbone(str(tiny_backbone_dir), "float32")


def make_parts(bid: str, hidden: int, m: int = M) -> tuple[DimensionCompressor, SequenceTRM]:
    torch.manual_seed(0)
    compressor = DimensionCompressor(hidden, D_COMPRESSED)
    compressor.metadata = {"backbone": bid, "layer": -1}
    trm = SequenceTRM(D_COMPRESSED, n_reasoning_tokens=m, **TINY_TRM)
    trm.metadata = {"backbone": bid, "layer": -1, "d_model": hidden, "d_compressed": D_COMPRESSED, "n_states": m}
    return compressor, trm


def make_problems(count: int = 2) -> list[Problem]:
    questions = ["What is 3 + 4?", "Natalia sold 48 clips in April. How many?", "What is 2 + 5?"]
    return [Problem(sample_id=f"toy:{i}", dataset="toy", index=i, prompt=questions[i % 3], gold_answer="7",
                    kind="math") for i in range(count)]


# ------------------------------------------------------------------------- predict and soft_vectors


def test_predict_and_soft_vectors_hand_the_adapter_m_decompressed_states():
    compressor, trm = make_parts("tiny", 64)
    adapter = StatesStub(64, M)
    pre, mask = torch.randn(3, 5, 64), torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    with torch.no_grad():
        output = predict(compressor, trm, pre, mask)
        expected = trm(compressor.compress(pre), mask)
        state, soft = soft_vectors(compressor, adapter, output.prediction)
    assert output.prediction.shape == (3, M, D_COMPRESSED)
    assert torch.equal(output.prediction, expected.prediction)  # the TRM's output as is
    assert state.shape == (3, M, 64) and soft.shape == (3, M, 64)
    torch.testing.assert_close(state, output.prediction @ compressor.weight)  # each state decompressed
    assert len(adapter.seen) == 1 and torch.equal(adapter.seen[0], state)


def test_the_trms_state_count_must_match_the_adapters(backbone):
    compressor, trm = make_parts(backbone.backbone_id, backbone.hidden_size)
    with pytest.raises(ConfigMismatchError) as err:  # an adapter made for 2 states, a TRM predicting 4
        LatentParts.load(backbone, compressor, trm, StatesStub(backbone.hidden_size, 2))
    message = str(err.value)
    assert "\n" not in message and "n_reasoning_tokens=4" in message and "n_states=2" in message
    # a fresh adapter is built for the TRM's m
    assert LatentParts.load(backbone, compressor, trm, "norm_match").adapter.n_states == M
    one_state_trm = make_parts(backbone.backbone_id, backbone.hidden_size, m=1)[1]
    with pytest.raises(ConfigMismatchError, match="n_reasoning_tokens=1.*n_states=4"):
        LatentParts.load(backbone, compressor, one_state_trm, StatesStub(backbone.hidden_size, M))
    parts = LatentParts.load(backbone, compressor, trm, StatesStub(backbone.hidden_size, M))
    assert parts.trm.n_reasoning_tokens == parts.adapter.n_states == M
    # one state and an adapter that says nothing about n_states: today's pairing
    assert isinstance(LatentParts.load(backbone, compressor, one_state_trm, "norm_match").adapter, NormMatchAdapter)


# ------------------------------------------------------------------------- LatentReasoner


def test_latent_reasoner_trm_modes_with_m_states(backbone):
    compressor, trm = make_parts(backbone.backbone_id, backbone.hidden_size)
    adapter = StatesStub(backbone.hidden_size, M, norm=3.0)
    reasoner = LatentReasoner(backbone, compressor, trm, adapter=adapter, device="cpu")
    problems = make_problems(2)
    latent = reasoner.latent_inputs(problems, first_token=True)
    assert latent.predicted_state.shape == (2, M, backbone.hidden_size)
    torch.testing.assert_close(latent.predicted_state,
                               latent.trm_output.prediction @ reasoner.compressor.weight)
    head = reasoner.model.get_output_embeddings()
    # trm_first_token: lm_head on the closing tag's state, the last of the m
    assert torch.equal(latent.first_token, head(latent.predicted_state[:, -1]).argmax(-1))
    logits = reasoner.first_answer_logits(problems, mode="trm_first_token")
    torch.testing.assert_close(logits, head(latent.predicted_state[:, -1]))
    for mode in ("trm", "trm_first_token"):
        results = reasoner.answer(problems, mode=mode, max_new_tokens=3)
        assert all(r.error is None and r.soft_vectors == M for r in results), mode
    # the m soft vectors sit between the prompt and the closing tag: the adapter's output, in order
    plain = reasoner.latent_inputs(problems)
    soft = adapter(plain.predicted_state)
    close = len(reasoner.close_ids)
    torch.testing.assert_close(plain.inputs_embeds[:, -close - M : -close], soft)


# ------------------------------------------------------------------------- GRPO


@pytest.fixture(scope="module")
def grpo_parts(tiny_backbone_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("grpo_parts")
    compressor, trm = make_parts(backbone_id(str(tiny_backbone_dir)), 64)
    return (compressor.save_pretrained(directory / "compressor", metadata=compressor.metadata),
            trm.save_pretrained(directory / "trm", metadata=trm.metadata))


def test_grpo_explores_m_states_with_one_gaussian_per_copy(tiny_backbone_dir, grpo_parts):
    compressor, trm = grpo_parts
    std = 0.1
    torch.manual_seed(0)
    module = GRPOModule(backbone=str(tiny_backbone_dir), compressor_checkpoint=str(compressor),
                        trm_checkpoint=str(trm), adapter=StatesStub(64, M), group_size=2, max_answer_tokens=2,
                        latent_noise_std=std, kl_coef=0.5, lr_adapter=1e-2)
    assert module.metadata["n_states"] == M
    problems = make_problems(2)
    prompted = module.prompt(problems)
    module.expand_cache(prompted, 2)
    noise = module._exploration_noise(2, 2)
    assert noise.shape == (2, 2, M, D_COMPRESSED)
    latent = module.latent(prompted, 2, noise)
    assert latent.prediction.shape == (2, M, D_COMPRESSED) and latent.soft.shape == (4, M, 64)
    # the adapter read each copy's own m noisy states, decompressed
    sample = latent.prediction.detach()[:, None] + noise
    torch.testing.assert_close(module.adapter.seen[-1], (sample @ module.compressor.weight).flatten(0, 1))
    # the latent's log-probability: one Gaussian over all m x D' numbers of a copy
    expected = gaussian_log_prob(sample.flatten(2), latent.prediction.detach().flatten(1)[:, None], std).flatten()
    torch.testing.assert_close(latent.latent_logp.detach(), expected)
    answers = module._sample(prompted, noise)
    loss, out = module.grpo_loss(prompted, answers, torch.tensor([[1.0, -1.0]] * 2), noise, None)
    assert float(out["stats"]["kl"]) == pytest.approx(0.0, abs=1e-8)  # starts at the Phase 2 TRM
    loss.backward()
    assert (module.trm.reasoning_token.grad.abs().sum(1) > 0).all()  # every token, through the log-probability
    assert module.adapter.norm.grad is not None


def test_grpo_refuses_an_adapter_for_another_state_count(tiny_backbone_dir, grpo_parts, tmp_path):
    compressor, trm = grpo_parts
    one_state = LinearAdapter(64, 64, n_vectors=1)  # an adapter folder made for one state
    one_state.save_pretrained(tmp_path / "adapter", metadata={"backbone": backbone_id(str(tiny_backbone_dir))})
    with pytest.raises(ConfigMismatchError, match="n_reasoning_tokens=4.*n_states=1"):
        GRPOModule(backbone=str(tiny_backbone_dir), compressor_checkpoint=str(compressor), trm_checkpoint=str(trm),
                   adapter=str(tmp_path / "adapter"), group_size=2)
    fresh = GRPOModule(backbone=str(tiny_backbone_dir), compressor_checkpoint=str(compressor),
                       trm_checkpoint=str(trm), adapter="linear", group_size=2)
    assert fresh.adapter.n_states == 4  # a fresh adapter is built for the TRM's m
