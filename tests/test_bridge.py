"""The concept map and the trainable bridge (models.adapter), BridgeModule (Phase 2b) and its configs.

On tiny random backbones, no network. The learning test uses the "steerable" tiny backbone of
the GRPO sanity test (a sharp untied lm_head, strong attention) and hand-written hidden-pair
shards with a short prompt, so a few thinking tokens move the first answer token and one
soft vector can move it back.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from llm_trm.backbone import backbone_id, load_backbone, run_decoder
from llm_trm.cli import main
from llm_trm.data.shards import HiddenPairDataModule, HiddenPairDataset, ShardWriter
from llm_trm.errors import ConfigMismatchError, DataError
from llm_trm.latent import LatentParts, backbone_head, build_adapter
from llm_trm.models.adapter import BridgeAdapter, ConceptAdapter, LatentAdapter
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.trm import SequenceTRM
from llm_trm.modules.bridge import BridgeModule, FidelityMeans
from llm_trm.modules.grpo import GRPOModule
from tests.test_grpo import sanity_backbone

REPO_ROOT = Path(__file__).resolve().parents[1]
RECORD_FIELDS = ["token_ids", "answer_ids"]
TINY_TRM = dict(n_layers=1, n_heads=2, n_latent_steps=1, n_deep_recursions=1, n_supervision_steps=2)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- data


def write_thinking_shards(directory: Path, backbone_dir: Path, count: int, prompt_tokens: int = 6,
                          thinking_tokens: int = 8, answer_tokens: int = 2, m: int = 1, seed: int = 0) -> Path:
    """Shards as datagen writes them, with a short random prompt and random "thinking", so the thinking
    decides the answer; states from the LLM's own pass, answers its greedy continuation after the tag."""
    llm = load_backbone(str(backbone_dir), "float32")
    tokenizer, model = llm.tokenizer, llm.model
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    ordinary = torch.tensor(sorted(set(range(len(tokenizer))) - set(tokenizer.all_special_ids)))
    generator = torch.Generator().manual_seed(seed)
    pick = lambda n: ordinary[torch.randint(len(ordinary), (n,), generator=generator)].tolist()  # noqa: E731
    config = {"backbone": backbone_id(str(backbone_dir)), "layer": -1, "hidden_size": llm.hidden_size}
    with ShardWriter(directory, config, shard_size=64, dtype="float32", num_post_states=m) as writer, torch.no_grad():
        for index in range(count):
            prompt = encode("<|im_start|>") + pick(prompt_tokens - index % 3) + encode("<think>")
            thinking = pick(thinking_tokens - index % 4)  # lengths differ: padding must not matter
            ids = prompt + thinking + encode("</think>\n")  # the closing suffix datagen writes
            answer: list[int] = []
            for _ in range(answer_tokens):
                answer.append(int(model(input_ids=torch.tensor([ids + answer])).logits[0, -1].argmax()))
            batch = torch.tensor([ids])
            states = run_decoder(model, batch, torch.ones_like(batch))[0][0]
            record = {"sample_id": f"synth:{index}", "problem": "", "thinking": "", "answer": "",
                      "answer_ids": answer, "gold_answer": "", "correct": False, "closed_thinking": True,
                      "token_ids": ids, "pre_length": len(prompt), "post_position": len(ids) - 1,
                      "num_thinking_tokens": len(thinking)}
            writer.add(states[: len(prompt)], states[-1], len(thinking), record, states[-m:] if m > 1 else None)
    return directory


def datagen_shards(backbone_dir: Path, output_dir: Path, count: int = 8) -> Path:
    """The real datagen on a tiny backbone (it never closes its thinking: use only_closed false)."""
    problems = output_dir.parent / f"{output_dir.name}_problems.jsonl"
    problems.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                                for i in range(count)))
    options = {"model.backbone": str(backbone_dir), "model.max_new_tokens": 4, "model.max_answer_tokens": 3,
               "data.dataset": f"jsonl:{problems}", "data.num_samples": count, "data.batch_size": 4,
               "writer.output_dir": str(output_dir), "writer.checkpoint_every": 4, "trainer.accelerator": "cpu",
               "trainer.devices": 1, "trainer.enable_progress_bar": "false"}
    assert main(["datagen", *[part for key, value in options.items() for part in (f"--{key}", str(value))]]) == 0
    return output_dir


@pytest.fixture(scope="module")
def steerable_dir(tiny_backbone_dir, tmp_path_factory) -> Path:
    return sanity_backbone(Path(tiny_backbone_dir), tmp_path_factory.mktemp("steerable"))


@pytest.fixture(scope="module")
def synth_pairs(steerable_dir, tmp_path_factory) -> Path:
    return write_thinking_shards(tmp_path_factory.mktemp("synth") / "pairs", steerable_dir, 512)


@pytest.fixture(scope="module")
def small_pairs(steerable_dir, tmp_path_factory) -> Path:
    return write_thinking_shards(tmp_path_factory.mktemp("small") / "pairs", steerable_dir, 12, m=2)


@pytest.fixture(scope="module")
def tiny_datagen_pairs(tiny_backbone_dir, tmp_path_factory) -> Path:
    return datagen_shards(Path(tiny_backbone_dir), tmp_path_factory.mktemp("datagen") / "pairs")


def make_data(path: Path, **overrides) -> HiddenPairDataModule:
    settings = dict(batch_size=8, val_fraction=0.25, test_fraction=0.0, only_closed=False, record_fields=RECORD_FIELDS)
    return HiddenPairDataModule(str(path), **{**settings, **overrides})


def make_module(backbone: Path, **overrides) -> BridgeModule:
    torch.manual_seed(0)
    settings = dict(backbone=str(backbone), backbone_dtype="float32", d_hidden=32, learning_rate=3e-3, warmup_steps=2)
    return BridgeModule(**{**settings, **overrides})


def make_trainer(**overrides) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    limit_val_batches=0, gradient_clip_val=1.0)
    return L.Trainer(**{**settings, **overrides})


@torch.no_grad()
def held_out(module: BridgeModule, data: HiddenPairDataModule, adapter: LatentAdapter | None = None) -> dict:
    """Every mode's metrics on the validation split, with the given (or the module's) adapter."""
    metrics = FidelityMeans(module.modes, module.hparams.nll_weight, module.hparams.kl_weight, sync_on_compute=False)
    for batch in data.val_dataloader():
        module.score_batch(adapter or module.adapter, batch, metrics)
    return metrics.compute()


# --------------------------------------------------------------------------- the adapters


def test_concept_adapter_equals_a_hand_computation(tiny_backbone_dir):
    model = load_backbone(str(tiny_backbone_dir), "float32").model
    lm_head, embeddings = backbone_head(model)
    states = torch.randn(3, 4, lm_head.shape[1]) * 5
    adapter = ConceptAdapter.for_backbone(lm_head, embeddings, n_vectors=2, n_states=4, temperature=0.5)
    W, E = lm_head.detach().double(), embeddings.detach().double()
    by_hand = torch.zeros(3, 4, E.shape[1], dtype=torch.float64)
    for row in range(3):
        for state in range(4):
            logits = W @ states[row, state].double() / 0.5
            probs = torch.exp(logits - logits.max())
            by_hand[row, state] = (probs / probs.sum()) @ E
    out = adapter(states)
    # k=2 slots over m=4 states: slot 0 averages states 0-1, slot 1 states 2-3
    expected = torch.stack([by_hand[:, :2].mean(1), by_hand[:, 2:].mean(1)], dim=1)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # one state: the k vectors start as k copies of its concept token
    single = ConceptAdapter.for_backbone(lm_head, embeddings, n_vectors=3, temperature=0.5)(states[:, 0])
    torch.testing.assert_close(single.double(), by_hand[:, :1].expand(-1, 3, -1), atol=1e-5, rtol=1e-5)
    assert len(adapter.state_dict()) == 0 and sum(p.numel() for p in adapter.parameters()) == 0


def test_a_fresh_bridge_equals_the_concept_map_then_learns(tiny_backbone_dir):
    lm_head, embeddings = backbone_head(load_backbone(str(tiny_backbone_dir), "float32").model)
    states = torch.randn(5, 2, lm_head.shape[1]) * 10
    for d_hidden in (0, 16):
        bridge = BridgeAdapter.for_backbone(lm_head, embeddings, n_vectors=3, n_states=2, d_hidden=d_hidden)
        concept = ConceptAdapter.for_backbone(lm_head, embeddings, n_vectors=3, n_states=2)
        assert torch.equal(bridge(states), concept(states))
        # the zero-initialised residual still learns: its last layer gets a gradient
        bridge(states).pow(2).sum().backward()
        assert bridge.residual[-1].weight.grad.abs().sum() > 0 and bridge.log_temperature.grad is not None
    # the LLM's weights are attached by reference: not saved, not copied
    assert set(bridge.state_dict()) == {"log_temperature", "gain", "residual.0.weight", "residual.0.bias",
                                        "residual.2.weight", "residual.2.bias"}
    clone = copy.deepcopy(bridge)
    assert clone._attached.lm_head_weight is lm_head and torch.equal(clone(states), bridge(states))
    with pytest.raises(ConfigMismatchError) as err:
        BridgeAdapter(lm_head.shape[1], embeddings.shape[1], lm_head.shape[0], n_states=2)(states)
    assert "attached" in one_line(err)


def test_states_of_another_count_or_size_are_one_line_errors(tiny_backbone_dir):
    lm_head, embeddings = backbone_head(load_backbone(str(tiny_backbone_dir), "float32").model)
    bridge = BridgeAdapter.for_backbone(lm_head, embeddings, n_states=2, d_hidden=0)
    with pytest.raises(ConfigMismatchError) as err:
        bridge(torch.randn(3, 64))  # [B, D] is one state
    assert "m=2" in one_line(err) and "m=1" in one_line(err)
    with pytest.raises(ConfigMismatchError) as err:
        bridge(torch.randn(3, 2, 32))
    assert "D=64" in one_line(err) and "D=32" in one_line(err)
    with pytest.raises(ConfigMismatchError) as err:
        ConceptAdapter(64, 64, lm_head.shape[0] + 1).attach(lm_head, embeddings)
    assert f"V={lm_head.shape[0] + 1}" in one_line(err) and f"V={lm_head.shape[0]}" in one_line(err)


# --------------------------------------------------------------------------- data and the two passes


def test_dataset_serves_the_record_fields_the_bridge_needs(small_pairs, tmp_path):
    dataset = HiddenPairDataset(small_pairs, sample_ids=["synth:3", "synth:0"], record_fields=RECORD_FIELDS)
    records = {json.loads(line)["sample_id"]: json.loads(line) for path in sorted(small_pairs.glob("*.jsonl"))
               for line in path.read_text().splitlines()}
    assert dataset[0]["record"] == {field: records["synth:3"][field] for field in RECORD_FIELDS}
    assert dataset[1]["record"]["answer_ids"] == records["synth:0"]["answer_ids"]
    with pytest.raises(DataError) as err:
        HiddenPairDataset(small_pairs, record_fields=["no_such_field"])
    assert "no_such_field" in one_line(err)


def test_teacher_and_student_passes_line_up_with_the_stored_states(steerable_dir, small_pairs):
    module = make_module(steerable_dir)
    with torch.no_grad():
        module.adapter.residual[-1].bias.normal_()  # soft vectors other than the concept token
    data = make_data(small_pairs, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    samples = module.samples(batch)
    answer_ids, answer_mask = module.answers(samples)
    teacher = module.teacher(module.prompt(samples), samples, answer_ids, answer_mask)
    model = module.llm.model
    embed = model.get_input_embeddings()
    # the teacher's first distribution is lm_head on the stored end-of-thinking state
    torch.testing.assert_close(teacher[:, 0], model.lm_head(batch["post"]).log_softmax(-1), atol=1e-4, rtol=1e-4)
    # the student (prompt KV cache, then soft vectors + tag + answer) equals one unpadded forward per sample
    with torch.no_grad():
        soft = module.adapter(module.true_states(batch))
        student = module.student(module.prompt(samples), soft, answer_ids, answer_mask)
        close = embed(torch.tensor(module.close_ids))
        for row, sample in enumerate(samples):
            answer = torch.tensor(sample.answer, dtype=torch.long)
            embeds = torch.cat([embed(torch.tensor(sample.prompt)), soft[row], close, embed(answer)])[None]
            logits = model(inputs_embeds=embeds).logits[0, -(len(answer) + 1):].log_softmax(-1)
            torch.testing.assert_close(student[row, : len(answer) + 1], logits, atol=1e-4, rtol=1e-4)
            # and the teacher, over every answer position, equals an unpadded pass over its own thinking
            own = model(input_ids=torch.tensor([sample.sequence + sample.answer])).logits[0, -(len(answer) + 1):]
            torch.testing.assert_close(teacher[row, : len(answer) + 1], own.log_softmax(-1), atol=1e-4, rtol=1e-4)


def test_student_gradient_reaches_only_the_adapter(steerable_dir, small_pairs):
    module = make_module(steerable_dir)
    data = make_data(small_pairs)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    samples = module.samples(batch)
    answer_ids, answer_mask = module.answers(samples)
    soft = module.adapter(module.true_states(batch))
    student = module.student(module.prompt(samples), soft, answer_ids, answer_mask)
    student[:, 0, 0].sum().backward()
    adapter = module.adapter
    assert all(p.grad is not None for p in adapter.parameters())
    # (the residual's first layer waits for its zero-initialised last layer to move)
    assert all(p.grad.abs().sum() > 0 for p in (adapter.gain, adapter.log_temperature, adapter.residual[-1].weight))
    assert all(p.grad is None for p in module.llm.model.parameters())


# --------------------------------------------------------------------------- training


def test_trained_bridge_lowers_held_out_kl_to_cot_and_its_shuffled_control_does_not(steerable_dir, synth_pairs):
    L.seed_everything(0)
    module = make_module(steerable_dir, d_hidden=256, nll_weight=0.1, kl_weight=1.0, warmup_steps=5)
    data = make_data(synth_pairs)
    data.setup("fit")
    before = held_out(module, data)
    make_trainer(max_epochs=8).fit(module, data)
    after = held_out(module, data)
    print({key: (round(before[key], 3), round(after[key], 3)) for key in before if "first_token_kl" in key})
    # at the start the bridge is the concept map
    assert before["bridge/first_token_kl"] == pytest.approx(before["concept/first_token_kl"], rel=1e-6)
    assert after["concept/first_token_kl"] == pytest.approx(before["concept/first_token_kl"], rel=1e-6)
    # the thinking matters on this backbone: no soft vector is far from cot
    assert after["none/first_token_kl"] > 0.5
    # trained: closer to cot on held-out samples, by at least 15% (measured: 0.80 -> 0.60)
    assert after["bridge/first_token_kl"] < 0.85 * before["bridge/first_token_kl"]
    assert after["bridge/first_token_kl_recovered"] > before["bridge/first_token_kl_recovered"] + 0.15
    # another sample's state does not get closer (measured: 0.79 -> 0.89): the gain is the state's content,
    # not a content-free prefix
    assert after["shuffled/first_token_kl"] > 0.98 * before["shuffled/first_token_kl"]
    assert after["shuffled/first_token_kl"] > after["bridge/first_token_kl"] + 0.15


def test_trm_predictions_replace_the_chosen_share_of_states(steerable_dir, small_pairs, tmp_path):
    compressor, trm = save_trm_parts(tmp_path, steerable_dir)
    module = make_module(steerable_dir, trm_checkpoint=str(trm), compressor_checkpoint=str(compressor),
                         trm_fraction=0.5)
    assert module.modes[-1] == "trm"
    data = make_data(small_pairs, batch_size=12)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    states = module.training_states(batch)
    replaced = ~torch.isclose(states, module.true_states(batch)).flatten(1).all(1)
    assert 0 < int(replaced.sum()) < len(replaced)  # a share, not all and not none
    torch.testing.assert_close(states[replaced], module.trm_states(batch)[replaced])
    with pytest.raises(ConfigMismatchError) as err:  # the TRM predicts one state, the bridge would read two
        make_module(steerable_dir, n_states=2, trm_checkpoint=str(trm), compressor_checkpoint=str(compressor))
    assert "m=1" in one_line(err) and "n_states=2" in one_line(err)
    with pytest.raises(ConfigMismatchError) as err:
        make_module(steerable_dir, trm_fraction=0.5)
    assert "trm_checkpoint" in one_line(err)


def save_trm_parts(directory: Path, backbone: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    meta = {"backbone": backbone_id(str(backbone)), "layer": -1}
    compressor = DimensionCompressor(64, 16).save_pretrained(directory / "compressor", metadata=meta)
    trm = SequenceTRM(16, **TINY_TRM).save_pretrained(directory / "trm", metadata={**meta, "d_model": 64})
    return compressor, trm


# --------------------------------------------------------------------------- checkpoints and export


def test_nothing_of_the_llm_in_the_state_dict_checkpoint_or_export(steerable_dir, small_pairs, tmp_path):
    module = make_module(steerable_dir)
    llm_shapes = {tuple(p.shape) for p in module.llm.model.parameters() if p.dim() == 2 and p.shape[0] > 200}
    assert all(key.startswith("adapter.") for key in module.state_dict())
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(max_steps=2, enable_checkpointing=True, callbacks=[checkpoint]).fit(module, make_data(small_pairs))
    saved = torch.load(checkpoint.last_model_path, weights_only=True)
    assert saved["state_dict"] and all(key.startswith("adapter.") for key in saved["state_dict"])
    assert not llm_shapes & {tuple(value.shape) for value in saved["state_dict"].values()}
    folder = module.export_pretrained(tmp_path / "export")
    weights = load_file(folder / "adapter.safetensors")
    assert set(weights) == set(module.adapter.state_dict())
    assert not llm_shapes & {tuple(value.shape) for value in weights.values()}
    meta = json.loads((folder / "config.json").read_text())["metadata"]
    assert (meta["backbone"], meta["layer"], meta["d_model"], meta["d_embed"], meta["n_vectors"], meta["n_states"]) == (
        backbone_id(str(steerable_dir)), -1, 64, 64, 1, 1)
    assert meta["trained_on"]["data_path"] == str(small_pairs) and meta["phase"] == "bridge"
    # a resumed module refuses a checkpoint made for another k
    other = make_module(steerable_dir, n_soft_vectors=2)
    with pytest.raises(ConfigMismatchError) as err:
        other.on_load_checkpoint(saved)
    assert "n_vectors=1" in one_line(err) and "n_vectors=2" in one_line(err)


def test_export_round_trips_through_latent_parts_and_grpo(steerable_dir, tmp_path):
    module = make_module(steerable_dir, n_soft_vectors=2)
    with torch.no_grad():
        module.adapter.residual[-1].bias.add_(0.5)  # something a fresh bridge would not have
    folder = module.export_pretrained(tmp_path / "bridge")
    backbone = load_backbone(str(steerable_dir), "float32")
    compressor, trm = save_trm_parts(tmp_path, steerable_dir)
    parts = LatentParts.load(backbone, str(compressor), str(trm), adapter=str(folder))
    assert isinstance(parts.adapter, BridgeAdapter) and parts.adapter.attached and parts.adapter.n_vectors == 2
    states = torch.randn(3, 64) * 20
    torch.testing.assert_close(parts.adapter(states), module.adapter(states))
    grpo = GRPOModule(backbone=str(steerable_dir), compressor_checkpoint=str(compressor), trm_checkpoint=str(trm),
                      adapter=str(folder), group_size=2, max_answer_tokens=2)
    torch.testing.assert_close(grpo.adapter(states), module.adapter(states))
    # GRPO's own export keeps the bridge, still without the LLM's weights
    exported = grpo.export_pretrained(tmp_path / "grpo")
    assert set(load_file(exported / "adapter" / "adapter.safetensors")) == set(module.adapter.state_dict())
    assert isinstance(LatentAdapter.from_pretrained(exported / "adapter"), BridgeAdapter)


def test_evaluate_runs_the_trm_mode_through_an_exported_bridge(steerable_dir, tmp_path):
    module = make_module(steerable_dir, n_soft_vectors=2)
    folder = module.export_pretrained(tmp_path / "bridge")
    compressor, trm = save_trm_parts(tmp_path, steerable_dir)
    problems = tmp_path / "sums.jsonl"
    problems.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                                for i in range(2)))
    args = {"backbone": steerable_dir, "compressor": compressor, "trm": trm, "adapter": folder,
            "datasets": f"jsonl:{problems}", "num_samples": 2, "modes": "[trm]", "max_new_tokens": 2,
            "dtype": "float32", "device": "cpu", "output_dir": tmp_path / "report", "progress": "false"}
    assert main(["evaluate", *[part for key, value in args.items() for part in (f"--{key}", str(value))]]) == 0
    results = json.loads((tmp_path / "report" / "results.json").read_text())["results"]["trm"]
    assert [row["soft_vectors"] for row in results] == [2, 2] and not any(row["error"] for row in results)


def test_an_adapter_that_does_not_fit_is_one_line(steerable_dir, tiny_backbone_dir, tiny_backbone_dir_d32, tmp_path):
    module = make_module(steerable_dir)
    folder = module.export_pretrained(tmp_path / "bridge")
    compressor, trm = save_trm_parts(tmp_path, steerable_dir)
    backbone = load_backbone(str(steerable_dir), "float32")
    with pytest.raises(ConfigMismatchError) as err:  # k
        LatentParts.load(backbone, str(compressor), str(trm), adapter=str(folder), n_soft_vectors=3)
    assert "k=1" in one_line(err) and "k=3" in one_line(err)
    with pytest.raises(ConfigMismatchError) as err:  # another backbone of the same sizes
        LatentParts.load(load_backbone(str(tiny_backbone_dir), "float32"), str(compressor), str(trm),
                         adapter=str(folder), loaded=(DimensionCompressor(64, 16), SequenceTRM(16, **TINY_TRM)))
    assert "backbone" in one_line(err) and str(steerable_dir) in one_line(err)
    small = load_backbone(str(tiny_backbone_dir_d32), "float32")  # state size
    lm_head, embeddings = backbone_head(small.model)
    with pytest.raises(ConfigMismatchError) as err:
        build_adapter(str(folder), embeddings, 32, lm_head_weight=lm_head)
    assert "64" in one_line(err) and "32" in one_line(err)
    with pytest.raises(ConfigMismatchError) as err:  # m
        make_module(steerable_dir, adapter=str(folder), n_states=2)
    assert "m=1" in one_line(err) and "m=2" in one_line(err)
    with pytest.raises(ConfigMismatchError) as err:
        make_module(steerable_dir, adapter="concept")
    assert "no parameters" in one_line(err)


def test_shards_that_do_not_fit_the_bridge_are_one_line(steerable_dir, tiny_datagen_pairs, small_pairs):
    with pytest.raises(ConfigMismatchError) as err:  # made with another backbone
        make_trainer(max_steps=1).fit(make_module(steerable_dir), make_data(tiny_datagen_pairs, batch_size=2))
    assert "backbone" in one_line(err)
    with pytest.raises(DataError) as err:  # fewer states per sample than the bridge reads
        make_trainer(max_steps=1).fit(make_module(steerable_dir, n_states=3), make_data(small_pairs))
    assert "m=3" in one_line(err) and "m=2" in one_line(err)
    with pytest.raises(DataError) as err:  # batches without the records
        make_trainer(max_steps=1).fit(make_module(steerable_dir), make_data(small_pairs, record_fields=None))
    assert "record_fields" in one_line(err)


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("config", ["configs/phase2/bridge.yaml", "configs/demo/bridge.yaml"])
def test_config_runs_with_fast_dev_run_and_exports(config, tiny_backbone_dir, tiny_datagen_pairs, tmp_path,
                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", str(REPO_ROOT / config), f"--model.init_args.backbone={tiny_backbone_dir}",
                 "--model.init_args.backbone_dtype=float32", "--model.init_args.d_hidden=16",
                 f"--data.init_args.data_path={tiny_datagen_pairs}", "--data.init_args.only_closed=false",
                 "--data.init_args.batch_size=2", "--data.init_args.num_workers=0",
                 "--data.init_args.val_fraction=0.25", "--data.init_args.test_fraction=0.25",
                 "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true",
                 "--trainer.fast_dev_run=true"])
    assert code == 0
    export = next(path.parent for path in tmp_path.rglob("adapter.safetensors"))
    meta = json.loads((export / "config.json").read_text())["metadata"]
    assert meta["phase"] == "bridge" and meta["backbone"] == backbone_id(str(tiny_backbone_dir))
    metrics = json.loads((export / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"val", "test"}
    assert math.isfinite(metrics["splits"]["test"]["metrics"]["bridge/first_token_kl"])
    lm_head, embeddings = backbone_head(load_backbone(str(tiny_backbone_dir), "float32").model)
    assert isinstance(build_adapter(str(export), embeddings, 64, lm_head_weight=lm_head), BridgeAdapter)
