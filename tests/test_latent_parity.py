"""One latent path: datagen, evaluation (LatentReasoner) and GRPO see the same prompt states and
hand the LLM the same soft inputs.

The TRM is trained on datagen's stored `hidden_pre` and used by LatentReasoner and GRPOModule,
which recompute those states from the problem text. If any of the three built the thinking
prompt, cut it at the opening tag, or ran the prompt pass differently, the TRM would be
trained on one input and used on another; these tests compare them directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm_trm import cli
from llm_trm.backbone import backbone_id, load_backbone
from llm_trm.data.problems import load_problems
from llm_trm.data.shards import HiddenPairDataset
from llm_trm.inference import LatentReasoner
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.trm import SequenceTRM
from llm_trm.modules.grpo import GRPOModule

QUESTIONS = ["What is 3 + 4?", "Natalia sold 48 clips in April and half as many in May. How many in total?",
             "What is 2 * 5?"]


def write_problems(path: Path) -> Path:
    path.write_text("".join(json.dumps({"question": q, "answer": "7"}) + "\n" for q in QUESTIONS))
    return path


def stored_pre_states(backbone: str, dataset: str, out: Path, extra: list[str] = ()) -> dict[str, torch.Tensor]:
    """Run `llm-trm datagen` and read back each sample's stored pre states (bf16 on disk)."""
    args = ["datagen", "--model.backbone", backbone, "--model.max_new_tokens", "4", "--model.max_answer_tokens", "0",
            "--data.dataset", dataset, "--data.num_samples", str(len(QUESTIONS)), "--data.batch_size", "2",
            "--writer.output_dir", str(out), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.enable_progress_bar", "false", *extra]
    assert cli.main(args) == 0
    data = HiddenPairDataset(out, dtype="float32")
    return {data[i]["sample_id"]: data[i]["pre"] for i in range(len(data))}


def save_parts(directory: Path, backbone: str, d_model: int, d_compressed: int = 16) -> tuple[str, str]:
    torch.manual_seed(0)
    meta = {"backbone": backbone_id(backbone), "layer": -1}
    compressor = DimensionCompressor(d_model, d_compressed).save_pretrained(directory / "compressor", metadata=meta)
    trm = SequenceTRM(d_compressed, n_layers=1, n_heads=2, n_latent_steps=1, n_deep_recursions=1,
                      n_supervision_steps=3).save_pretrained(directory / "trm", metadata={**meta, "d_model": d_model})
    return str(compressor), str(trm)


# ---- how each user computes the prompt states and the soft inputs (their public entry points)


def reasoner_pre_states(reasoner: LatentReasoner, problems) -> tuple[torch.Tensor, torch.Tensor]:
    latent = reasoner.latent_inputs(problems)
    return latent.pre, latent.pre_mask


def grpo_pre_states(module: GRPOModule, problems) -> tuple[torch.Tensor, torch.Tensor]:
    prompted = module.prompt(problems)
    return prompted.pre, prompted.pre_mask


def grpo_soft_inputs(module: GRPOModule, problems) -> tuple[torch.Tensor, torch.Tensor]:
    prompted = module.prompt(problems)
    with torch.no_grad():
        return module.llm_inputs(prompted, module.latent(prompted, 1).soft)


# ---- the checks


def assert_same_pre_states(stored: dict[str, torch.Tensor], problems, pre: torch.Tensor, mask: torch.Tensor,
                           who: str) -> None:
    assert [p.sample_id for p in problems] == sorted(stored, key=[p.sample_id for p in problems].index)
    for row, problem in enumerate(problems):
        expected = stored[problem.sample_id]
        length = int(mask[row].sum())
        assert length == expected.shape[0], f"{who}: {problem.sample_id} has {length} pre states, datagen stored " \
                                            f"{expected.shape[0]}"
        assert not mask[row, length:].any(), f"{who}: the pre-state mask is not right-padded"
        # datagen stores bf16: agree within its rounding (relative 2^-8 of the largest value)
        scale = float(expected.abs().max())
        torch.testing.assert_close(pre[row, :length].float(), expected, rtol=1e-2, atol=1e-2 * scale,
                                   msg=lambda m: f"{who} vs datagen, {problem.sample_id}: {m}")


def check_parity(backbone: str, dataset: str, tmp_path: Path, d_model: int) -> None:
    stored = stored_pre_states(backbone, dataset, tmp_path / "pairs")
    problems = load_problems(dataset, split="train", num_samples=len(QUESTIONS))
    compressor, trm = save_parts(tmp_path, backbone, d_model)
    module = GRPOModule(backbone=backbone, compressor_checkpoint=compressor, trm_checkpoint=trm, adapter="linear",
                        group_size=2, max_answer_tokens=2, backbone_dtype="float32")
    reasoner = LatentReasoner(module.llm, compressor=module.compressor, trm=module.trm, adapter=module.adapter,
                              device="cpu")

    assert_same_pre_states(stored, problems, *reasoner_pre_states(reasoner, problems), who="LatentReasoner")
    assert_same_pre_states(stored, problems, *grpo_pre_states(module, problems), who="GRPOModule")

    # the same trained parts give the same [prompt][soft vectors]</think> inputs on both paths
    embeds, mask = grpo_soft_inputs(module, problems)
    latent = reasoner.latent_inputs(problems)
    assert torch.equal(mask, latent.attention_mask)
    torch.testing.assert_close(embeds, latent.inputs_embeds, rtol=1e-5, atol=1e-5)


def test_datagen_reasoner_and_grpo_see_the_same_states_on_a_tiny_backbone(tiny_backbone_dir, tmp_path):
    dataset = f"jsonl:{write_problems(tmp_path / 'toy.jsonl')}"
    check_parity(str(tiny_backbone_dir), dataset, tmp_path, d_model=64)


@pytest.mark.slow
def test_datagen_reasoner_and_grpo_see_the_same_states_on_the_embedded_model(tmp_path):
    dataset = f"jsonl:{write_problems(tmp_path / 'toy.jsonl')}"
    check_parity("embedded", dataset, tmp_path, d_model=load_backbone("embedded", "float32").hidden_size)
