"""GRPOModule and GRPODataModule: gradient paths, the clipped loss, the curriculum, resume, configs, errors,
and the sanity task (a reward for one fixed first answer token, learned from chance to >= 0.9)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from llm_trm.backbone import backbone_id, load_backbone
from llm_trm.batching import position_ids
from llm_trm.cli import main
from llm_trm.data.grpo_data import CurriculumSampler, GRPODataModule
from llm_trm.data.problem_datamodule import ProblemList
from llm_trm.data.problems import load_problems
from llm_trm.data.shards import ShardWriter
from llm_trm.errors import ConfigMismatchError, DataError, NonFiniteLossError
from llm_trm.inference import LatentReasoner
from llm_trm.models.adapter import LinearAdapter
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.trm import SequenceTRM
from llm_trm.modules.grpo import GRPOModule
from llm_trm.rl.curriculum import DifficultyCurriculum

REPO_ROOT = Path(__file__).resolve().parents[1]
D, D_COMPRESSED = 64, 16
TINY_TRM = dict(n_layers=1, n_heads=2, n_latent_steps=1, n_deep_recursions=1, n_supervision_steps=2)
SMALL = dict(group_size=2, max_answer_tokens=3, lr_trm=1e-3, lr_compressor=1e-3, lr_adapter=1e-2, warmup_steps=1)


def save_parts(directory: Path, backbone: Path, d_model: int = D) -> tuple[Path, Path]:
    torch.manual_seed(0)
    meta = {"backbone": backbone_id(str(backbone)), "layer": -1}
    compressor = DimensionCompressor(d_model, D_COMPRESSED).save_pretrained(directory / "compressor", metadata=meta)
    trm = SequenceTRM(D_COMPRESSED, **TINY_TRM).save_pretrained(directory / "trm", metadata={**meta, "d_model": d_model})
    return compressor, trm


def write_problems(path: Path, count: int = 16, with_answers: bool = True) -> Path:
    with open(path, "w") as handle:
        for i in range(count):
            row = {"question": f"What is {i} + {i}?", "answer": str(2 * i) if with_answers else ""}
            handle.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def parts(tiny_backbone_dir, tmp_path_factory) -> tuple[Path, Path]:
    return save_parts(tmp_path_factory.mktemp("parts"), tiny_backbone_dir)


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory) -> Path:
    return write_problems(tmp_path_factory.mktemp("problems") / "sums.jsonl")


def make_module(backbone: Path, parts: tuple[Path, Path], seed: int = 0, **overrides) -> GRPOModule:
    torch.manual_seed(seed)
    compressor, trm = parts
    return GRPOModule(backbone=str(backbone), compressor_checkpoint=str(compressor), trm_checkpoint=str(trm),
                      **{**SMALL, **overrides})


def make_data(problems_file: Path, **overrides) -> GRPODataModule:
    settings = dict(datasets=f"jsonl:{problems_file}", num_samples=12, val_samples=4, batch_size=2,
                    batches_per_epoch=2, difficulty="none")
    return GRPODataModule(**{**settings, **overrides})


def make_trainer(**overrides) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    limit_val_batches=0)
    return L.Trainer(**{**settings, **overrides})


class RecordMetrics(Callback):
    def __init__(self, *names: str) -> None:
        self.names = names
        self.values: dict[str, list[float]] = {name: [] for name in names}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for name in self.names:
            self.values[name].append(float(trainer.callback_metrics[name]))


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def sampled_batch(module: GRPOModule, problems_file: Path, count: int = 2):
    problems = load_problems(f"jsonl:{problems_file}", num_samples=count)
    prompted = module.prompt(problems)
    module.expand_cache(prompted, module.hparams.group_size)
    return prompted, module._sample(prompted, None)


# --------------------------------------------------------------------------- gradients and the loss


def test_gradients_reach_adapter_trm_and_compressor_but_not_the_llm(tiny_backbone_dir, parts, problems_file):
    module = make_module(tiny_backbone_dir, parts)
    prompted, answers = sampled_batch(module, problems_file)
    advantages = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    loss, _ = module.grpo_loss(prompted, answers, advantages, None, None)
    loss.backward()
    for part in ("adapter", "trm", "compressor"):
        grads = [p.grad for p in getattr(module, part).parameters()]
        assert all(g is not None for g in grads), part
        assert sum(float(g.abs().sum()) for g in grads) > 0, part
    llm = module.llm.model
    assert all(p.grad is None and not p.requires_grad for p in llm.parameters())
    assert all(p.grad is None for p in module.reference_trm.parameters())


def test_llm_weights_unchanged_and_never_in_a_checkpoint(tiny_backbone_dir, parts, problems_file, tmp_path):
    # warm-start steps: teacher forcing always has a gradient (GRPO's is 0 when every reward is equal)
    records = write_records(tmp_path / "records", {i: 10 for i in range(12)}, {i: True for i in range(12)})
    module = make_module(tiny_backbone_dir, parts, warm_start_steps=2)
    llm_before = {k: v.clone() for k, v in module.llm.model.state_dict().items()}
    adapter_before = module.adapter.proj.weight.detach().clone()
    trainer = make_trainer(default_root_dir=tmp_path, enable_checkpointing=True)
    trainer.fit(module, make_data(problems_file, records_dir=str(records)))
    assert all(torch.equal(v, llm_before[k]) for k, v in module.llm.model.state_dict().items())
    assert not torch.equal(module.adapter.proj.weight, adapter_before)
    checkpoint = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True)
    prefixes = {key.split(".")[0] for key in checkpoint["state_dict"]}
    assert prefixes == {"trm", "compressor", "adapter", "reference_trm", "reference_compressor"}


def test_clipped_loss_through_the_module_by_hand(tiny_backbone_dir, parts, problems_file):
    """Old log-probs half the current ones (ratio 2): the positive-advantage answer is clipped to 1.2 and
    gives no gradient; the negative one keeps ratio 2: loss = (-1.2 + 2) / 2 = 0.4, every token clipped."""
    module = make_module(tiny_backbone_dir, parts)
    prompted, answers = sampled_batch(module, problems_file, count=1)
    advantages = torch.tensor([[1.0, -1.0]])
    _, first = module.grpo_loss(prompted, answers, advantages, None, None)
    old = {"tokens": first["old"]["tokens"] - math.log(2.0)}
    loss, out = module.grpo_loss(prompted, answers, advantages, None, old)
    assert float(out["stats"]["policy_loss"]) == pytest.approx(0.4, abs=1e-5)
    assert float(out["stats"]["clip_fraction"]) == pytest.approx(1.0)
    # only the unclipped (negative-advantage) answer pushes: its log-probability goes down
    loss.backward()
    assert module.adapter.proj.weight.grad.abs().sum() > 0


def test_kl_and_latent_noise_terms(tiny_backbone_dir, parts, problems_file):
    module = make_module(tiny_backbone_dir, parts, latent_noise_std=0.1, kl_coef=0.5)
    prompted, answers = sampled_batch(module, problems_file)
    noise = module._exploration_noise(2, 2)
    loss, out = module.grpo_loss(prompted, answers, torch.tensor([[1.0, -1.0]] * 2), noise, None)
    assert float(out["stats"]["kl"]) == pytest.approx(0.0, abs=1e-8)  # starts at the Phase 2 TRM
    assert out["old"]["latent"].shape == (4,)
    loss.backward()
    assert module.trm.reasoning_token.grad is not None  # through the latent's log-probability


# --------------------------------------------------------------------------- curriculum and data


def test_curriculum_sampler_draws_from_the_active_range_and_widens():
    difficulties = [float(d) for d in range(20)][::-1]  # problem 19 is the easiest
    curriculum = DifficultyCurriculum(difficulties, start_fraction=0.25, full_at_step=100)
    step = {"now": 0}
    sampler = CurriculumSampler(ProblemList(list(range(20))), curriculum, batch_size=4, num_batches=25,
                                current_step=lambda: step["now"], seed=3)
    drawn = set(iter(sampler))
    assert drawn <= {15, 16, 17, 18, 19} and len(drawn) == 5  # the easiest quarter, all of it
    step["now"] = 50
    assert set(iter(sampler)) <= set(curriculum.active_indices(50)) and len(curriculum.active_indices(50)) == 12
    step["now"] = 100
    assert set(iter(sampler)) == set(range(20))
    other_rank = CurriculumSampler(ProblemList(list(range(20))), curriculum, 4, 25, lambda: 100, num_replicas=2,
                                   rank=1, seed=3)
    assert list(iter(other_rank)) != list(iter(sampler))


def write_records(directory: Path, thinking_tokens: dict[int, int], correct: dict[int, bool]) -> Path:
    with ShardWriter(directory, {"backbone": "tiny", "layer": -1}, shard_size=50, dtype="float32") as writer:
        for index, tokens in thinking_tokens.items():
            record = {"sample_id": f"sums:{index}", "problem": "", "thinking": "", "answer": f"\\boxed{{{2 * index}}}",
                      "gold_answer": str(2 * index), "correct": correct[index], "closed_thinking": True,
                      "token_ids": [1, 2, 3], "pre_length": 2, "post_position": 2,
                      "num_thinking_tokens": tokens}
            writer.add(torch.zeros(2, 8), torch.zeros(8), tokens, record)
    return directory


def test_datamodule_difficulty_from_records_and_held_out_split(problems_file, tmp_path):
    records = write_records(tmp_path / "records", {i: 100 - i for i in range(12)}, {i: i % 2 == 0 for i in range(12)})
    data = make_data(problems_file, num_samples=12, val_samples=4, records_dir=str(records),
                     difficulty="thinking_tokens", curriculum_start_fraction=0.25, curriculum_full_at_step=10)
    data.setup("fit")
    assert {p.sample_id for p in data.val_problems} == {f"sums:{i}" for i in range(12, 16)}  # unrecorded first
    state = data.curriculum_state(0)
    assert state["fraction"] == 0.25 and state["min_difficulty"] == 89 and state["max_difficulty"] == 91
    assert data.curriculum_state(10)["max_difficulty"] == 100
    assert set(data.correct_answers()) == {f"sums:{i}" for i in range(0, 12, 2)}
    correctness = make_data(problems_file, records_dir=str(records), difficulty="base_correctness")
    correctness.setup("fit")
    assert correctness.curriculum_state(0)["max_difficulty"] == 0.0  # the base model's correct ones first


def test_warm_start_fits_the_llms_own_correct_answers(tiny_backbone_dir, parts, problems_file, tmp_path):
    # two problems answered correctly in datagen: the warm start draws only those and fits their answers
    records = write_records(tmp_path / "records", {i: 10 for i in range(12)}, {i: i < 2 for i in range(12)})
    # the steerable tiny backbone of the sanity task: soft vectors can move its answers
    backbone = sanity_backbone(Path(tiny_backbone_dir), tmp_path / "steerable")
    module = make_module(backbone, save_parts(tmp_path / "parts", backbone), warm_start_steps=12,
                         n_soft_vectors=4, lr_adapter=3e-3, lr_trm=1e-3, halting=False)
    recorder = RecordMetrics("train/warm_start_nll", "train/warm_start")
    data = make_data(problems_file, records_dir=str(records), batches_per_epoch=12, warm_start_steps=12)
    make_trainer(max_steps=12, callbacks=[recorder]).fit(module, data)
    nll = recorder.values["train/warm_start_nll"]
    assert len(nll) == 12 and recorder.values["train/warm_start"] == [1.0] * 12
    assert sum(nll[-3:]) / 3 < 0.8 * sum(nll[:3]) / 3  # the answers become likelier given the soft vectors


def test_warm_start_without_correct_answers_is_a_clear_error(problems_file, tmp_path):
    records = write_records(tmp_path / "records", {i: 10 for i in range(12)}, {i: False for i in range(12)})
    with pytest.raises(DataError, match="warm_start_steps"):
        make_data(problems_file, records_dir=str(records), warm_start_steps=2).setup("fit")


def test_the_prompt_cache_serves_the_group_and_the_log_prob_pass(tiny_backbone_dir, parts, problems_file):
    """One prompt pass whose KV cache is reused gives the samples and log-probabilities of re-reading the prompt."""
    reused, recomputed = (make_module(tiny_backbone_dir, parts, reuse_prompt_cache=flag, group_size=3)
                          for flag in (True, False))
    prompted, answers = sampled_batch(reused, problems_file)
    plain, plain_answers = sampled_batch(recomputed, problems_file)
    assert prompted.cache is not None and plain.cache is None
    assert answers == plain_answers  # same seed, same distribution: the same samples
    with torch.no_grad():
        embeds, mask = reused.llm_inputs(prompted, reused.latent(prompted, 3).soft)
        cached = reused.answer_log_probs(prompted, embeds, mask, answers, 1.0)[0]
        again = reused.answer_log_probs(prompted, embeds, mask, answers, 1.0)[0]  # the cache was rewound
        full = recomputed.answer_log_probs(plain, embeds, mask, answers, 1.0)[0]
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, cached)
    assert prompted.cache.get_seq_length() == prompted.width


def test_the_kl_reference_runs_only_when_it_is_used(tiny_backbone_dir, parts, problems_file):
    for kl_coef, expected_calls in ((0.0, 0), (0.5, 1)):
        module = make_module(tiny_backbone_dir, parts, kl_coef=kl_coef)
        calls = []
        module.reference_trm.register_forward_hook(lambda *args: calls.append(1))
        prompted, answers = sampled_batch(module, problems_file)
        _, out = module.grpo_loss(prompted, answers, torch.tensor([[1.0, -1.0]] * 2), None, None)
        assert len(calls) == expected_calls and ("kl" in out["stats"]) == (kl_coef > 0)


# --------------------------------------------------------------------------- resume, export, configs


def test_resume_gives_the_same_next_losses_and_state(tiny_backbone_dir, parts, problems_file, tmp_path):
    def run(root: Path, epochs: int, ckpt_path: str | None = None) -> tuple[GRPOModule, RecordMetrics]:
        module = make_module(tiny_backbone_dir, parts, seed=1)
        recorder = RecordMetrics("train/loss", "train/reward_mean")
        checkpoint = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1, filename="e{epoch}", auto_insert_metric_name=False)
        trainer = make_trainer(max_epochs=epochs, enable_checkpointing=True, callbacks=[checkpoint, recorder],
                               default_root_dir=root)
        trainer.fit(module, make_data(problems_file), ckpt_path=ckpt_path)
        return module, recorder

    straight, full = run(tmp_path / "a", 2)
    resumed, tail = run(tmp_path / "b", 2, ckpt_path=str(tmp_path / "a" / "e0.ckpt"))
    assert tail.values["train/loss"] == pytest.approx(full.values["train/loss"][2:], abs=1e-6)
    assert tail.values["train/reward_mean"] == full.values["train/reward_mean"][2:]
    for name in ("trm", "compressor", "adapter"):
        for a, b in zip(getattr(straight, name).parameters(), getattr(resumed, name).parameters()):
            assert torch.allclose(a, b, atol=1e-6)


def test_export_loads_in_the_latent_reasoner(tiny_backbone_dir, parts, tmp_path):
    module = make_module(tiny_backbone_dir, parts)
    with torch.no_grad():
        module.adapter.proj.bias.add_(0.5)  # something a fresh adapter would not have
    folder = module.export_pretrained(tmp_path / "export")
    reasoner = LatentReasoner(load_backbone(str(tiny_backbone_dir)), compressor=str(folder / "compressor"),
                              trm=str(folder), adapter="auto", device="cpu")
    assert isinstance(reasoner.adapter, LinearAdapter)
    assert torch.allclose(reasoner.adapter.proj.bias, module.adapter.proj.bias)
    assert SequenceTRM.from_pretrained(folder).metadata["phase"] == "grpo"


@pytest.mark.parametrize("config", ["configs/phase3/grpo.yaml", "configs/demo/grpo.yaml"])
def test_config_runs_with_fast_dev_run(config, tiny_backbone_dir, parts, problems_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    compressor, trm = parts
    code = main(["fit", "--config", str(REPO_ROOT / config), f"--model.init_args.backbone={tiny_backbone_dir}",
          f"--model.init_args.compressor_checkpoint={compressor}", f"--model.init_args.trm_checkpoint={trm}",
          "--model.init_args.adapter=linear",  # the demo starts from its bridge export, not here
          "--model.init_args.group_size=2", "--model.init_args.max_answer_tokens=2",
          "--model.init_args.warm_start_steps=0", "--model.init_args.backbone_dtype=float32",
          f"--data.init_args.datasets=jsonl:{problems_file}", "--data.init_args.records_dir=null",
          "--data.init_args.difficulty=none", "--data.init_args.num_samples=8", "--data.init_args.val_samples=2",
          "--data.init_args.batch_size=2", "--trainer.fast_dev_run=true"])
    assert code == 0
    # the run trained and exported the three parts where the config says (loadable by evaluation)
    export = next(path.parent for path in tmp_path.rglob("trm.safetensors"))
    reasoner = LatentReasoner(load_backbone(str(tiny_backbone_dir)), compressor=str(export / "compressor"),
                              trm=str(export), device="cpu")
    assert reasoner.trm.metadata["phase"] == "grpo" and isinstance(reasoner.adapter, LinearAdapter)


# --------------------------------------------------------------------------- bad input


def test_parts_that_do_not_fit_are_one_line_errors(tiny_backbone_dir, tiny_backbone_dir_d32, parts, tmp_path):
    with pytest.raises(ConfigMismatchError) as err:
        make_module(tiny_backbone_dir_d32, parts)
    assert "D=64" in one_line(err) and "D=32" in one_line(err)
    other_trm = SequenceTRM(8, **TINY_TRM).save_pretrained(
        tmp_path / "trm8", metadata={"backbone": backbone_id(str(tiny_backbone_dir)), "layer": -1, "d_model": D})
    with pytest.raises(ConfigMismatchError) as err:
        make_module(tiny_backbone_dir, (parts[0], other_trm))
    assert "D'=8" in one_line(err) and "D'=16" in one_line(err)
    foreign = save_parts(tmp_path / "foreign", tiny_backbone_dir_d32, d_model=D)  # records another backbone
    with pytest.raises(ConfigMismatchError) as err:
        make_module(tiny_backbone_dir, foreign)
    assert "backbone" in one_line(err)


def test_problems_without_gold_answers_are_a_clear_error(tiny_backbone_dir, parts, tmp_path):
    no_gold = write_problems(tmp_path / "nogold.jsonl", with_answers=False)
    with pytest.raises((DataError, ValueError)) as err:
        make_trainer(max_steps=1).fit(make_module(tiny_backbone_dir, parts), make_data(no_gold))
    assert "gold" in one_line(err) or "answer" in one_line(err)


def test_nonfinite_losses_are_skipped_then_stop(tiny_backbone_dir, parts, problems_file):
    module = make_module(tiny_backbone_dir, parts, max_nonfinite_steps=2)
    with torch.no_grad():
        module.adapter.proj.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError):
        make_trainer(max_steps=5).fit(module, make_data(problems_file, batches_per_epoch=5))
    assert module.guard.skipped_total == 2


def test_equal_rewards_for_many_steps_warn(tiny_backbone_dir, parts, problems_file):
    module = make_module(tiny_backbone_dir, parts, equal_reward_warn_steps=2, reward="first_token:0")
    with pytest.warns(UserWarning, match="equal rewards"):
        make_trainer(max_steps=2).fit(module, make_data(problems_file))


def test_unknown_reward_is_a_clear_error(tiny_backbone_dir, parts):
    with pytest.raises(ConfigMismatchError, match="first_token"):
        make_module(tiny_backbone_dir, parts, reward="bleu")


# --------------------------------------------------------------------------- the sanity task


def sanity_backbone(source: Path, target: Path) -> Path:
    """The tiny random backbone, made steerable: an untied lm_head with std 0.2 (so one token can reach
    probability ~1) and query/key weights x10 (so attention can focus on the soft vectors). A random
    4-layer net with std-0.02 weights averages its ~120 prompt tokens evenly and caps every token's
    probability near 0.2: no input vector could make one token likely."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source)
    model.config.tie_word_embeddings = False
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=generator) * 0.2)
        for name, param in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                param.mul_(10.0)
    model.save_pretrained(target)
    for file in source.iterdir():
        if file.name not in ("model.safetensors", "config.json", "generation_config.json"):
            shutil.copy(file, target / file.name)
    return target


def test_sanity_grpo_learns_a_fixed_first_token(tiny_backbone_dir, problems_file, tmp_path):
    backbone = sanity_backbone(Path(tiny_backbone_dir), tmp_path / "steerable")
    parts = save_parts(tmp_path / "parts", backbone)
    settings = dict(group_size=8, max_answer_tokens=1, temperature=1.0, n_soft_vectors=4, lr_adapter=3e-4,
                    lr_trm=1e-4, lr_compressor=1e-4, warmup_steps=5, halting=False)
    # the target: the most likely first answer token of the untrained model (chance ~0.1)
    probe = make_module(backbone, parts, **settings)
    problems = load_problems(f"jsonl:{problems_file}", num_samples=16)
    with torch.no_grad():
        prompted = probe.prompt(problems)
        embeds, mask = probe.llm_inputs(prompted, probe.latent(prompted, 1).soft)
        logits = probe.llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1]
    chance, target = logits.softmax(-1).mean(0).max(0)
    assert 0.03 < float(chance) < 0.3

    L.seed_everything(0)
    module = make_module(backbone, parts, reward=f"first_token:{int(target)}", **settings)
    recorder = RecordMetrics("train/reward_mean")
    data = make_data(problems_file, batch_size=4, batches_per_epoch=150)
    make_trainer(callbacks=[recorder]).fit(module, data)
    rewards = recorder.values["train/reward_mean"]
    start, end = sum(rewards[:5]) / 5, sum(rewards[-20:]) / 20
    print(f"sanity task: chance {float(chance):.3f}, reward first 5 steps {start:.3f}, last 20 steps {end:.3f}")
    assert start < 0.35
    assert end >= 0.9


def test_activation_checkpointing_recomputes_the_llm_and_gives_the_same_loss_and_gradients(
        tiny_backbone_dir, parts, problems_file):
    runs = {}
    for flag in (False, True):
        module = make_module(tiny_backbone_dir, parts, activation_checkpointing=flag)
        prompted, answers = sampled_batch(module, problems_file)
        calls = []
        layers = module.llm.model.model.layers
        hooks = [layer.self_attn.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in layers]
        try:
            loss, _ = module.grpo_loss(prompted, answers, torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), None, None)
            forward_calls = len(calls)
            loss.backward()
        finally:
            for hook in hooks:
                hook.remove()
        runs[flag] = (answers, loss.detach(), [p.grad for p in module.adapter.parameters()], len(calls) - forward_calls)
    assert runs[False][0] == runs[True][0]
    torch.testing.assert_close(runs[False][1], runs[True][1], atol=1e-5, rtol=1e-5)
    for plain, checkpointed in zip(runs[False][2], runs[True][2]):
        torch.testing.assert_close(plain, checkpointed, atol=1e-5, rtol=1e-4)
    assert runs[False][3] == 0 and runs[True][3] == len(layers)  # every layer ran again in the backward
