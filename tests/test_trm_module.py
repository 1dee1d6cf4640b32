"""TRMModule: frozen compressor, per-step updates, halting, EMA, schedule, resume, baselines, held-out
splits, the export (finite, never replaced by a worse one, re-validated), configs, DDP."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import load_file

from llm_trm.cli import LLMTRMCLI
from llm_trm.data.shards import HiddenPairDataModule, ShardWriter, collate_hidden_pairs
from llm_trm.errors import ConfigMismatchError, DataError, NonFiniteLossError
from llm_trm.files import sha256_file
from llm_trm.hub import load_trm
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.trm import SequenceTRM
from llm_trm.modules.export import ExportBestModel, write_export
from llm_trm.modules.trm import TRMModule, prompt_summaries
from llm_trm.weights import NonFiniteWeightsError

REPO_ROOT = Path(__file__).resolve().parents[1]
D, D_COMPRESSED = 32, 8
NUM_SAMPLES = 24
TINY = dict(n_layers=1, n_heads=2, n_latent_steps=2, n_deep_recursions=2, n_supervision_steps=3, warmup_steps=2,
            learning_rate=1e-3)
TINY_CLI = [f"--model.init_args.{key}={value}" for key, value in TINY.items()]
# how each of m = 4 synthetic end-of-thinking states depends on the prompt (a state that depends on it with
# the opposite sign of another, e.g. -1, was not learned by the tiny TRM within 60 epochs: the m tokens share
# the network, and only an MLP gate conditioned on the token can flip a sign)
STATE_SCALES = (1.0, 0.5, 2.0, 1.5)
DATAGEN_CONFIG = {"backbone": "tiny", "layer": -1, "datasets": ["synthetic"], "seed": 0}


def write_shards(directory: Path, corrupt_post: bool = False, dim: int = D, num_post_states: int = 1,
                 num_samples: int = NUM_SAMPLES) -> Path:
    """Pairs with prompts of 3..8 tokens, post depending on the prompt (so there is something to learn).

    With num_post_states m > 1 the shards also hold `post_states` [m, D] whose last row is `post`: state j is
    its own function of the prompt, scale_j x the prompt's mean state + shift_j (a permutation-invariant
    target, which a TRM without positions can learn).
    """
    generator = torch.Generator().manual_seed(0)
    shifts = torch.randn(num_post_states, dim, generator=torch.Generator().manual_seed(1))
    config = {**DATAGEN_CONFIG, **({"num_post_states": num_post_states} if num_post_states > 1 else {})}
    with ShardWriter(directory, config, shard_size=10, dtype="float32") as writer:
        for i in range(num_samples):
            length = 3 + i % 6
            pre = torch.randn(length, dim, generator=generator)
            post = torch.tanh(pre[0] * pre[-1]) + 0.1 * pre.mean(0)
            post_states = None
            if num_post_states > 1:
                post_states = torch.stack([STATE_SCALES[j % len(STATE_SCALES)] * 2 * pre.mean(0) + shifts[j]
                                           for j in range(num_post_states)])
                post = post_states[-1]
            if corrupt_post:
                post = torch.full_like(post, float("nan"))
            record = {"sample_id": f"synthetic:{i}", "problem": f"p{i}", "thinking": "", "answer": "", "gold_answer": "",
                      "correct": True, "closed_thinking": True, "token_ids": list(range(length + 2)),
                      "pre_length": length, "post_position": length + 1}
            writer.add(pre, post, 5, record, post_states=post_states)
    return directory


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("pairs") / "hidden_pairs")


@pytest.fixture(scope="module")
def compressor_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    compressor = DimensionCompressor(d_model=D, d_compressed=D_COMPRESSED)
    return compressor.save_pretrained(tmp_path_factory.mktemp("compressor"), metadata={"backbone": "tiny", "layer": -1})


def make_module(compressor_dir: Path, seed: int = 0, **overrides) -> TRMModule:
    torch.manual_seed(seed)
    return TRMModule(compressor_checkpoint=str(compressor_dir), **{**TINY, **overrides})


SPLIT_SEED = 3  # 12 train / 5 val / 7 test samples of the 24


def make_data(shards: Path, **overrides) -> HiddenPairDataModule:
    """The shards split train / val / test by sample id, batches in a seeded order (resumption needs an order
    that does not depend on the global RNG)."""
    settings = dict(batch_size=8, val_fraction=0.25, test_fraction=0.25, split_seed=SPLIT_SEED, bucket_by_length=True)
    return HiddenPairDataModule(str(shards), **{**settings, **overrides})


def split_items(data: HiddenPairDataModule, name: str) -> list[dict]:
    """Every sample of one split, as the datamodule serves them."""
    dataset = getattr(data, f"{name}_dataset")
    return [dataset[i] for i in range(len(dataset))]


class WithoutSummaries(HiddenPairDataModule):
    """A datamodule that does not offer `summaries` (as a user's own one might)."""

    summaries = None


def compressed(module: TRMModule, samples: list[dict]) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A batch of samples, its compressed prompt [B, L, D'] and target [B, D'], computed directly."""
    batch = collate_hidden_pairs(samples)
    weight = module.compressor.weight.detach()
    return batch, batch["pre"] @ weight.t(), batch["post"] @ weight.t()


def make_trainer(**overrides) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**settings, **overrides})


class RecordOutputs(Callback):
    """Keeps every training_step output, with the epoch it came from."""

    def __init__(self) -> None:
        self.outputs: list[tuple[int, dict]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.outputs.append((trainer.current_epoch, outputs))

    def losses(self, epoch: int | None = None) -> list[float]:
        return [float(out["loss"]) for e, out in self.outputs if epoch is None or e == epoch]


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- gradients and updates


def test_gradients_reach_only_the_trm(shards, compressor_dir):
    module = make_module(compressor_dir)
    compressor_before = module.compressor.weight.detach().clone()
    trm_before = {k: v.detach().clone() for k, v in module.trm.named_parameters()}
    make_trainer(limit_train_batches=1, limit_val_batches=0).fit(module, make_data(shards))

    assert torch.equal(module.compressor.weight, compressor_before)
    assert module.compressor.weight.grad is None and not module.compressor.weight.requires_grad
    assert all(not p.requires_grad for p in module.ema.parameters())
    optimized = {id(p) for group in module.optimizers().optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.trm.parameters()}
    changed = [k for k, v in module.trm.named_parameters() if not torch.equal(v, trm_before[k])]
    assert "halt_head.weight" in changed and "reasoning_token" in changed


def _force_halting(module: TRMModule, halts) -> list[int]:
    """Make the halt head's decision a function of the sample (its first input feature); return batch sizes seen."""
    sizes: list[int] = []
    original = module.trm.deep_recursion

    def deep_recursion(state):
        new_state, prediction, halt_logit = original(state)
        sizes.append(state.batch_size())
        forced = torch.where(halts(state.x), 10.0, -10.0).to(halt_logit.dtype)
        return new_state, prediction, halt_logit + (forced - halt_logit).detach()  # keep the halt head in the graph

    module.trm.deep_recursion = deep_recursion
    return sizes


def test_halted_samples_stop_contributing(shards, compressor_dir):
    module = make_module(compressor_dir, n_supervision_steps=3)
    sizes = _force_halting(module, lambda x: x[:, 0, 0] > 0)
    recorder = RecordOutputs()
    trainer = make_trainer(limit_train_batches=1, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(module, make_data(shards))

    steps_used = recorder.outputs[0][1]["steps_used"]
    halted_at_once = int((steps_used == 1).sum())
    assert 0 < halted_at_once < len(steps_used)
    assert set(steps_used.tolist()) == {1, 3}
    remaining = len(steps_used) - halted_at_once
    assert sizes == [len(steps_used), remaining, remaining]
    assert trainer.global_step == 3  # one optimizer step per supervision step


def test_loop_ends_when_every_sample_halted(shards, compressor_dir):
    module = make_module(compressor_dir, n_supervision_steps=3)
    sizes = _force_halting(module, lambda x: torch.ones(len(x), dtype=torch.bool))
    recorder = RecordOutputs()
    trainer = make_trainer(limit_train_batches=1, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(module, make_data(shards))
    assert sizes == [len(recorder.outputs[0][1]["steps_used"])] and trainer.global_step == 1


@pytest.mark.parametrize("per_step_updates", [True, False])
def test_scheduler_steps_equal_optimizer_steps(shards, compressor_dir, per_step_updates):
    module = make_module(compressor_dir, use_halting=False, per_step_updates=per_step_updates)
    data = make_data(shards)
    trainer = make_trainer(max_epochs=2, limit_val_batches=0)
    trainer.fit(module, data)
    batches_per_epoch = trainer.num_training_batches
    steps_per_batch = TINY["n_supervision_steps"] if per_step_updates else 1
    assert trainer.global_step == 2 * batches_per_epoch * steps_per_batch
    assert module.lr_schedulers().last_epoch == trainer.global_step
    assert module.total_schedule_steps() == trainer.global_step  # without halting the schedule ends exactly


class RecordLearningRates(Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_lr_schedule_follows_batches_when_samples_halt(shards, compressor_dir):
    """Every sample halting at step 1 takes 1 update per batch instead of N_sup: the LR of each batch,
    and the final LR (the schedule's end, min_lr_ratio x peak), are the same as without halting."""
    learning_rate, epochs, steps = 1e-3, 3, TINY["n_supervision_steps"]
    runs = {}
    for use_halting in (True, False):
        module = make_module(compressor_dir, use_halting=use_halting, learning_rate=learning_rate)
        if use_halting:
            _force_halting(module, lambda x: torch.ones(len(x), dtype=torch.bool))
        rates = RecordLearningRates()
        trainer = make_trainer(max_epochs=epochs, limit_val_batches=0, callbacks=[rates])
        trainer.fit(module, make_data(shards))
        batches = epochs * trainer.num_training_batches
        assert trainer.global_step == batches * (1 if use_halting else steps)
        assert module.lr_schedulers().last_epoch == module.total_schedule_steps() == batches * steps
        assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.1 * learning_rate, rel=1e-9)
        runs[use_halting] = rates.rates
    assert len(runs[True]) == epochs * 2 and runs[True] == pytest.approx(runs[False], rel=1e-12)
    assert runs[True][1] > runs[True][-1] > 0.1 * learning_rate  # it did decay, batch by batch


def test_ema_after_k_steps_matches_hand_computation(shards, compressor_dir, tmp_path):
    decay = 0.5
    module = make_module(compressor_dir, use_halting=False, n_supervision_steps=2, ema_decay=decay)
    seen: list[dict[str, torch.Tensor]] = []
    update = module.ema.update_parameters

    def recording_update(model):
        seen.append({k: v.detach().clone() for k, v in model.named_parameters()})
        update(model)

    module.ema.update_parameters = recording_update
    trainer = make_trainer(limit_train_batches=2, limit_val_batches=0)
    trainer.fit(module, make_data(shards))

    assert len(seen) == trainer.global_step == 4
    expected = seen[0]  # AveragedModel copies the weights at its first update
    for weights in seen[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    for name, value in module.ema.module.named_parameters():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)

    exported = SequenceTRM.from_pretrained(module.export_pretrained(tmp_path / "trm"))
    for name, value in exported.state_dict().items():
        assert torch.equal(value, module.ema.module.state_dict()[name])
    assert exported.metadata["d_compressed"] == D_COMPRESSED and exported.metadata["d_model"] == D
    assert exported.metadata["compressor"] == str(compressor_dir) and exported.metadata["backbone"] == "tiny"


# --------------------------------------------------------------------------- halting threshold


@pytest.mark.parametrize("adaptive", [True, False])
def test_halt_threshold_follows_epoch_mean_cosine(shards, compressor_dir, adaptive):
    module = make_module(compressor_dir, bce_halt_loss=True, adaptive_halt_threshold=adaptive)
    recorder = RecordOutputs()
    make_trainer(limit_val_batches=0, callbacks=[recorder]).fit(module, make_data(shards))
    cosines = torch.cat([out["final_cosine"] for _, out in recorder.outputs]).double()
    expected = 0.95 * float(cosines.mean()) if adaptive else 0.7
    assert module.halt_threshold == pytest.approx(expected, rel=1e-9)


# --------------------------------------------------------------------------- checkpoints


def test_resume_gives_the_same_next_losses(shards, compressor_dir, tmp_path):
    hparams = dict(bce_halt_loss=True, adaptive_halt_threshold=True)
    full_run, recorder = make_module(compressor_dir, **hparams), RecordOutputs()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, monitor="val/loss")
    make_trainer(max_epochs=2, callbacks=[recorder, checkpoints], enable_checkpointing=True).fit(
        full_run, make_data(shards))

    resumed, resumed_recorder = make_module(compressor_dir, seed=1, **hparams), RecordOutputs()
    make_trainer(max_epochs=2, callbacks=[resumed_recorder]).fit(
        resumed, make_data(shards), ckpt_path=str(tmp_path / "epoch=0.ckpt"))

    assert resumed_recorder.losses() == recorder.losses(epoch=1)
    assert resumed.halt_threshold == full_run.halt_threshold != 0.7
    for name, value in full_run.state_dict().items():
        if name.startswith(("trm.", "ema.")):
            assert torch.equal(value, resumed.state_dict()[name]), name


def test_resume_from_another_architecture_is_one_line_error(shards, compressor_dir, tmp_path):
    module = make_module(compressor_dir)
    trainer = make_trainer(limit_train_batches=1, limit_val_batches=0)
    trainer.fit(module, make_data(shards))
    trainer.save_checkpoint(tmp_path / "small.ckpt")

    with pytest.raises(ConfigMismatchError) as err:
        make_trainer(max_epochs=2).fit(make_module(compressor_dir, n_layers=2), make_data(shards),
                                       ckpt_path=str(tmp_path / "small.ckpt"))
    assert "n_layers=1" in one_line(err) and "n_layers=2" in str(err.value)


# --------------------------------------------------------------------------- bad input


def test_compressor_of_another_hidden_size_is_one_line_error(shards, tmp_path):
    wrong = DimensionCompressor(d_model=16, d_compressed=D_COMPRESSED).save_pretrained(
        tmp_path / "wrong", metadata={"backbone": "tiny", "layer": -1})
    with pytest.raises(ConfigMismatchError) as err:
        make_trainer().fit(make_module(wrong), make_data(shards))
    assert "D=32" in one_line(err) and "D=16" in str(err.value)


def test_nonfinite_batches_are_skipped_then_stop_with_clear_error(shards, compressor_dir, monkeypatch):
    module = make_module(compressor_dir, max_nonfinite_steps=2)
    compress = module.compress_batch

    def poisoned(batch):  # what a NaN that slips past the data checks (e.g. an overflow) would look like
        x, mask, target = compress(batch)
        return x * float("nan"), mask, target

    monkeypatch.setattr(module, "compress_batch", poisoned)
    with pytest.raises(NonFiniteLossError) as err:
        make_trainer(limit_val_batches=0).fit(module, make_data(shards))
    assert "2 non-finite losses in a row" in one_line(err)
    assert module.guard.skipped_total == 2 and module.trainer.global_step == 0


def test_a_nan_state_in_the_shards_is_refused_before_training(compressor_dir, tmp_path):
    corrupt = write_shards(tmp_path / "nan_pairs", corrupt_post=True)
    module = make_module(compressor_dir)
    with pytest.raises(DataError, match=r"shard .*shard-r00-00000\.safetensors holds a non-finite .*synthetic:0") as err:
        make_trainer(limit_val_batches=0).fit(module, make_data(corrupt))
    one_line(err)
    assert module.trainer.global_step == 0


def test_nonfinite_statistics_are_refused_by_the_model():
    trm = SequenceTRM(4, n_layers=1, n_heads=2)
    good = dict(input_mean=torch.zeros(4), input_scale=1.0, target_mean=torch.zeros(4), target_scale=torch.ones(4))
    for name, bad in (("input_mean", torch.tensor([0.0, float("nan"), 0.0, 0.0])), ("input_scale", float("inf")),
                      ("target_scale", torch.full((4,), float("-inf")))):
        with pytest.raises(DataError, match=f"statistic {name} is not finite") as err:
            trm.set_normalization(**{**good, name: bad})
        one_line(err)
    assert not bool(trm.normalization_fitted) and torch.equal(trm.input_mean, torch.zeros(4))


@pytest.mark.parametrize("field, statistic", [("pre", "input_mean"), ("post", "target_mean")])
def test_nan_state_fails_fit_without_touching_the_export(shards, compressor_dir, tmp_path, field, statistic):
    export = tmp_path / "trm"
    make_trainer(max_epochs=1, callbacks=[ExportBestModel(path=str(export))]).fit(
        make_module(compressor_dir), make_data(shards))
    before = {p.name: p.read_bytes() for p in export.iterdir()}

    module = make_module(compressor_dir)
    broken = make_data(shards)
    broken.setup("fit")
    # a state that turned non-finite after the shard checks (they refuse NaN in stored shards, tested above)
    summaries = broken.summaries

    def poisoned(split: str):
        result = summaries(split)
        getattr(result, "token_mean" if field == "pre" else "post").view(-1)[3] = float("nan")
        return result

    broken.summaries = poisoned
    with pytest.raises(DataError, match=f"statistic {statistic} is not finite") as err:
        make_trainer(max_epochs=1, callbacks=[ExportBestModel(path=str(export))]).fit(module, broken)
    one_line(err)
    assert module.trainer.global_step == 0
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["trm"]  # nothing written beside it either


def test_nonfinite_weights_are_never_exported(shards, compressor_dir, tmp_path):
    module, export = make_module(compressor_dir), tmp_path / "trm"
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module, make_data(shards))
    exporter = ExportBestModel(path=str(export))
    exporter.on_train_end(trainer, module)
    before = {p.name: p.read_bytes() for p in export.iterdir()}

    module.ema.module.halt_head.bias.data.fill_(float("inf"))
    with pytest.raises(NonFiniteWeightsError, match="trm.safetensors holds NaN/inf values in halt_head.bias") as err:
        exporter.on_train_end(trainer, module)
    assert "existing export is untouched" in one_line(err)
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["trm"]  # no staging folder left


def _trm_writer(seed: int):
    def write(folder: Path) -> Path:
        torch.manual_seed(seed)
        return SequenceTRM(4, n_layers=1, n_heads=2).save_pretrained(folder)
    return write


def test_a_better_export_is_never_replaced_by_a_worse_one(tmp_path):
    target = tmp_path / "trm"
    selection = {"monitor": "val/loss", "mode": "min", "split": "val", "val_sample_ids_sha256": "ids",
                 "context": {"compressor_sha256": "c"}}

    def weights(folder: Path) -> bytes:
        return (folder / "trm.safetensors").read_bytes()

    assert write_export(target, _trm_writer(0), {**selection, "score": 0.5}) == target
    first = weights(target)
    assert SequenceTRM.from_pretrained(target).metadata["selection"]["score"] == 0.5
    with pytest.warns(UserWarning, match="kept the export .* scored better \\(0.5 vs 0.7\\)"):
        beside = write_export(target, _trm_writer(1), {**selection, "score": 0.7})
    assert beside.name.startswith("trm.not-better-") and weights(target) == first and weights(beside) != first

    # a better one replaces it, moving the previous one aside
    assert write_export(target, _trm_writer(2), {**selection, "score": 0.25}) == target
    (previous,) = tmp_path.glob("trm.previous-*")
    assert weights(previous) == first and weights(target) != first
    # not comparable (other validation samples, another compressor, another monitor): replaced, moved aside
    for change in ({"val_sample_ids_sha256": "other"}, {"context": {"compressor_sha256": "d"}},
                   {"monitor": "val/cosine", "mode": "max"}):
        assert write_export(target, _trm_writer(3), {**selection, "score": 0.9, **change}) == target
    assert len(list(tmp_path.glob("trm.previous-*"))) == 4 and len(list(tmp_path.iterdir())) == 6


# --------------------------------------------------------------------------- baselines and normalisation


def test_baselines_and_normalisation_match_a_direct_computation(shards, compressor_dir):
    """From the datamodule's summaries: the same numbers as computing everything from the samples."""
    alpha = 0.5
    module = make_module(compressor_dir, ridge_alpha=alpha)
    data = make_data(shards)
    make_trainer(limit_train_batches=1, limit_val_batches=0).fit(module, data)

    def split(name: str):
        items = split_items(data, name)
        weight = module.compressor.weight.detach().double()
        pooled = torch.stack([(item["pre"].double() @ weight.t()).mean(0) for item in items])
        last = torch.stack([item["pre"][-1].double() @ weight.t() for item in items])
        target = torch.stack([item["post"].double() @ weight.t() for item in items])
        tokens = torch.cat([item["pre"].double() @ weight.t() for item in items])
        return pooled, last, target, tokens

    train_pooled, _, train_target, train_tokens = split("train")
    # ridge with an unpenalised intercept: solve ([X 1]^T [X 1] + alpha diag(1..1, 0)) W = [X 1]^T Y
    design = torch.cat([train_pooled, torch.ones(len(train_pooled), 1, dtype=torch.float64)], dim=1)
    penalty = alpha * torch.diag(torch.tensor([1.0] * D_COMPRESSED + [0.0], dtype=torch.float64))
    weights = torch.linalg.solve(design.t() @ design + penalty, design.t() @ train_target)
    for name in ("val", "test"):
        pooled, last, target, _ = split(name)
        held_out_design = torch.cat([pooled, torch.ones(len(pooled), 1, dtype=torch.float64)], dim=1)
        predictions = {"mean": train_target.mean(0).expand_as(target), "ridge": held_out_design @ weights,
                       "last_token": last}
        results = module.baseline_results[name]
        for baseline, prediction in predictions.items():
            cosine = F.cosine_similarity(prediction, target, dim=-1).mean()
            assert results[f"{baseline}_cosine"] == pytest.approx(float(cosine), abs=1e-5), (name, baseline)
            mse = (prediction - target).pow(2).mean()
            assert results[f"{baseline}_mse"] == pytest.approx(float(mse), rel=1e-4), (name, baseline)
        # R^2 and centred cosine are measured around the training mean: the mean predictor scores exactly 0
        assert results["mean_explained_variance"] == pytest.approx(0.0, abs=1e-5)
        assert results["mean_centred_cosine"] == pytest.approx(0.0, abs=1e-5)
    torch.testing.assert_close(module.val_metrics.quality.reference_mean, train_target.mean(0))
    torch.testing.assert_close(module.test_metrics.quality.reference_mean, train_target.mean(0))
    # the normalisation statistics: every prompt token's mean in D' and its RMS spread, the targets' mean and std
    trm = module.trm
    token_mean = train_tokens.mean(0)
    torch.testing.assert_close(trm.input_mean.double(), token_mean, rtol=1e-5, atol=1e-6)
    assert float(trm.input_scale) == pytest.approx(float((train_tokens - token_mean).pow(2).mean().sqrt()), rel=1e-5)
    torch.testing.assert_close(trm.target_mean.double(), train_target.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trm.target_scale.double(), train_target.std(0), rtol=1e-5, atol=1e-6)
    assert torch.equal(module.ema.module.input_mean, trm.input_mean)


def test_without_summaries_baselines_are_skipped_with_one_warning(shards, compressor_dir):
    module = make_module(compressor_dir)
    trainer = make_trainer(limit_train_batches=1, limit_val_batches=1)
    with pytest.warns(UserWarning, match="no summaries") as warned:
        trainer.fit(module, WithoutSummaries(str(shards), batch_size=8, val_fraction=0.25, test_fraction=0.25, split_seed=SPLIT_SEED))
        trainer.test(module, WithoutSummaries(str(shards), batch_size=8, val_fraction=0.25, test_fraction=0.25, split_seed=SPLIT_SEED), verbose=False)
    assert sum("no summaries" in str(w.message) for w in warned) == 1
    assert module.baseline_results == {} and not bool(module.trm.normalization_fitted)
    assert not [tag for tag in trainer.callback_metrics if "baseline/" in tag]


def test_prompt_summaries_ignore_padding():
    x = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [4.0], [6.0]]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    pooled, last = prompt_summaries(x, mask)
    assert pooled.squeeze(1).tolist() == [2.0, 4.0] and last.squeeze(1).tolist() == [3.0, 6.0]


# --------------------------------------------------------------------------- held-out metrics


def direct_scores(module: TRMModule, trm: SequenceTRM, samples: list[dict]) -> dict[str, float]:
    """Held-out metrics of `trm` computed straight from the samples, with SequenceTRM.forward's halting."""
    batch, x, target = compressed(module, samples)
    with torch.no_grad():
        out = trm(x, batch["pre_mask"])
    prediction, full = out.prediction.float(), module.compressor.decompress(out.prediction.float()).detach()
    return {"mse": float((prediction - target).pow(2).mean()),
            "cosine": float(F.cosine_similarity(prediction, target, dim=-1).mean()),
            "full_cosine": float(F.cosine_similarity(full, batch["post"], dim=-1).mean()),
            "steps_used": float(out.steps_used.float().mean()),
            "halt_prob": float(out.halt_prob.mean())}


def test_validation_logs_metrics_baselines_and_first_token_agreement(tiny_backbone_dir, tmp_path):
    shards64 = write_shards(tmp_path / "pairs64", dim=64)
    torch.manual_seed(0)
    compressor = DimensionCompressor(d_model=64, d_compressed=D_COMPRESSED).save_pretrained(
        tmp_path / "comp64", metadata={"backbone": str(tiny_backbone_dir), "layer": -1})
    module = make_module(compressor, first_token_backbone=str(tiny_backbone_dir))
    data = make_data(shards64)
    trainer = make_trainer(limit_train_batches=1)
    trainer.fit(module, data)

    logged = trainer.callback_metrics
    steps = TINY["n_supervision_steps"]
    expected = [f"val/cosine_step{k}" for k in range(1, steps + 1)] + [
        f"{prefix}{name}" for prefix in ("val/", "val/full_", "train/", "train/full_")
        for name in ("cosine", "mse", "relative_error", "explained_variance", "centred_cosine")] + [
        f"baseline/{name}_{space}cosine" for name in ("mean", "ridge", "last_token") for space in ("", "full_")] + [
        "val/loss", "val/halt_prob", "val/steps_used", "val/halt_accuracy", "train/halt_threshold"]
    assert not [tag for tag in expected if tag not in logged]
    direct = direct_scores(module, module.ema.module, split_items(data, "val"))
    for name, value in direct.items():
        assert float(logged[f"val/{name}"]) == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert float(logged["val/loss"]) == pytest.approx(direct["mse"], rel=1e-5)
    assert float(logged["val/cosine_step3"]) == pytest.approx(direct["cosine"], rel=1e-5)  # nothing halted yet
    # first-token agreement: lm_head of the tiny backbone on the decompressed prediction vs the real state
    batch, x, _ = compressed(module, split_items(data, "val"))
    with torch.no_grad():
        predicted = module.compressor.decompress(module.ema.module(x, batch["pre_mask"]).prediction)
        head = module.llm.model.get_output_embeddings()
        agreement = (head(predicted).argmax(-1) == head(batch["post"]).argmax(-1)).float().mean()
    assert float(logged["val/first_token_agreement"]) == pytest.approx(float(agreement))


def test_test_split_is_reported_with_the_validation_metrics(shards, compressor_dir):
    module, data = make_module(compressor_dir), make_data(shards)
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module, data)
    val_tags = {tag for tag in trainer.callback_metrics if tag.startswith("val/")}
    (tested,) = trainer.test(module, data, verbose=False)

    assert {tag.replace("test/", "val/", 1) for tag in tested if not tag.startswith("test/baseline/")} == val_tags
    assert {tag: value for tag, value in tested.items() if tag.startswith("test/baseline/")} == pytest.approx(
        {f"test/baseline/{name}": value for name, value in module.baseline_results["test"].items()})
    for name, value in direct_scores(module, module.ema.module, split_items(data, "test")).items():
        assert tested[f"test/{name}"] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert module.baseline_results["test"] != module.baseline_results["val"]
    # `llm-trm validate` without a fit first: the baselines are fitted at validation start
    (validated,) = make_trainer().validate(make_module(compressor_dir), data, verbose=False)
    assert validated["baseline/ridge_cosine"] == pytest.approx(module.baseline_results["val"]["ridge_cosine"])


def test_metrics_json_describes_exactly_the_exported_weights(shards, compressor_dir, tmp_path):
    module, data = make_module(compressor_dir), make_data(shards)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/loss", mode="min")
    trainer = make_trainer(max_epochs=3, enable_checkpointing=True,
                           callbacks=[checkpoints, ExportBestModel(path=str(tmp_path / "trm"))])
    trainer.fit(module, data)

    metrics = json.loads((tmp_path / "trm" / "metrics.json").read_text())
    exported = SequenceTRM.from_pretrained(tmp_path / "trm")
    for split in ("val", "test"):
        reported = metrics["splits"][split]
        assert reported["role"] == {"val": "selection", "test": "report"}[split]
        assert reported["num_samples"] == len(split_items(data, split))
        for name, value in direct_scores(module, exported, split_items(data, split)).items():
            assert reported["model"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (split, name)
        assert reported["baselines"] == module.baseline_results[split]
    assert metrics["weights_sha256"] == {"trm.safetensors": sha256_file(tmp_path / "trm" / "trm.safetensors")}

    # the exported weights are the best checkpoint's EMA, selected on the validation split
    selection = exported.metadata["selection"]
    assert metrics["selection"] == selection
    assert selection["checkpoint"] == checkpoints.best_model_path and selection["source"] == "best checkpoint"
    assert (selection["monitor"], selection["mode"], selection["split"]) == ("val/loss", "min", "val")
    assert selection["score"] == pytest.approx(float(checkpoints.best_model_score))
    assert metrics["splits"]["val"]["model"]["loss"] == pytest.approx(selection["score"], rel=1e-5)
    ids = "\n".join(sorted(data.val_sample_ids)).encode()
    assert selection["val_sample_ids_sha256"] == hashlib.sha256(ids).hexdigest() and selection["val_samples"] == 5
    best = torch.load(checkpoints.best_model_path, weights_only=True)["state_dict"]
    for name, value in exported.state_dict().items():
        assert torch.equal(value, best[f"ema.module.{name}"]), name


def test_checkpoints_from_before_the_test_split_still_load(shards, compressor_dir, tmp_path):
    module = make_module(compressor_dir)
    trainer = make_trainer(limit_train_batches=1, limit_val_batches=0)
    trainer.fit(module, make_data(shards))
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    state = checkpoint["state_dict"]
    for key in [k for k in state if k.startswith(("val_metrics.", "test_metrics."))]:
        value = state.pop(key)
        if key.startswith("val_metrics.quality"):  # the old names
            state[key.replace("val_metrics.quality", "val_quality")] = value
    torch.save(checkpoint, tmp_path / "old.ckpt")

    loaded = TRMModule.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True)
    reference = module.train_quality.reference_mean
    assert torch.equal(loaded.val_metrics.quality.reference_mean, reference)
    assert torch.equal(loaded.test_metrics.quality.reference_mean, reference) and reference.abs().sum() > 0


# --------------------------------------------------------------------------- configs and DDP


def check_export(export: Path, datamodule, module: TRMModule | None = None) -> dict:
    """The export folder loads, holds `module`'s EMA weights, and its metrics.json is finite; returns it."""
    exported = SequenceTRM.from_pretrained(export)
    if module is not None:
        assert exported.config() == module.trm.config()
        for name, value in exported.state_dict().items():
            assert torch.equal(value, module.ema.module.state_dict()[name].cpu()), name
    metrics = json.loads((export / "metrics.json").read_text())
    assert "val" in metrics["splits"] and set(metrics["splits"]) <= {"val", "test"}
    for split, reported in metrics["splits"].items():
        assert reported["num_samples"] == len(getattr(datamodule, f"{split}_sample_ids")) > 0
        assert all(math.isfinite(v) for v in reported["model"].values()) and "full_explained_variance" in \
            reported["model"]
        assert bool(reported["baselines"]) == hasattr(datamodule, "summaries")
    return metrics


@pytest.mark.parametrize("config", ["configs/phase2/trm.yaml", "configs/demo/trm.yaml"])
def test_config_runs_with_fast_dev_run(config, shards, compressor_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = LLMTRMCLI(args=["fit", "--config", str(REPO_ROOT / config), f"--data.init_args.data_path={shards}",
                          f"--model.init_args.compressor_checkpoint={compressor_dir}",
                          "--data.init_args.num_workers=0", "--trainer.fast_dev_run=true",
                          "--trainer.enable_progress_bar=false"])
    trainer, module = cli.trainer, cli.model
    # one training batch with one optimizer step per supervision step (nothing halts at the first step)
    assert trainer.global_step == module.hparams.n_supervision_steps == {"configs/phase2/trm.yaml": 8,
                                                                         "configs/demo/trm.yaml": 4}[config]
    logged = {tag: float(value) for tag, value in trainer.callback_metrics.items()}
    for tag in ("train/loss", "train/halt_prob", "val/loss", "val/cosine", "val/full_explained_variance",
                "val/steps_used", "val/halt_accuracy"):
        assert math.isfinite(logged[tag]), tag
    assert logged["val/steps_used"] == module.hparams.n_supervision_steps  # a fresh halt head does not halt
    (exporter,) = [c for c in trainer.callbacks if isinstance(c, ExportBestModel)]
    expected = {"configs/phase2/trm.yaml": tmp_path / "trm", "configs/demo/trm.yaml": Path("runs/demo/trm_model")}
    assert exporter.exported_to == expected[config]
    metrics = check_export(exporter.exported_to, cli.datamodule, module)  # fast_dev_run: the final weights
    assert metrics["selection"]["source"] == "final weights"


def test_two_process_ddp_cpu_run(shards, compressor_dir, tmp_path):
    command = [str(Path(sys.executable).with_name("llm-trm")), "fit", "--config",
               str(REPO_ROOT / "configs/demo/trm.yaml"), "--trainer.accelerator=cpu", "--trainer.devices=2",
               "--trainer.strategy=ddp", "--trainer.max_epochs=2", f"--data.init_args.data_path={shards}",
               f"--model.init_args.compressor_checkpoint={compressor_dir}", *TINY_CLI]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = list(tmp_path.glob("runs/demo/trm_model/config.json"))
    assert exported, result.stderr[-3000:]
    assert SequenceTRM.from_pretrained(exported[0].parent).d_compressed == D_COMPRESSED
    metrics = json.loads((exported[0].parent / "metrics.json").read_text())
    assert metrics["selection"]["source"] == "best checkpoint" and metrics["selection"]["monitor"] == "val/loss"
    assert all(math.isfinite(v) for v in metrics["splits"]["val"]["model"].values())


# --------------------------------------------------------------------------- m reasoning tokens

M1_TRAINING_REFERENCE = REPO_ROOT / "tests" / "data" / "trm_module_m1_reference.safetensors"


def m1_training_values(shards: Path, compressor_dir: Path) -> dict[str, torch.Tensor]:
    """Two epochs of an m = 1 TRMModule on the tiny shards: every batch's loss, the last validation's logged
    metrics and the validation baselines."""
    module, recorder = make_module(compressor_dir), RecordOutputs()
    trainer = make_trainer(max_epochs=2, callbacks=[recorder])
    trainer.fit(module, make_data(shards))
    values = {"losses": torch.tensor(recorder.losses(), dtype=torch.float64)}
    values.update({tag: value.detach().double().reshape(()) for tag, value in trainer.callback_metrics.items()
                   if tag.startswith(("val/", "baseline/"))})
    return values


def test_one_reasoning_token_trains_bit_for_bit_as_before_m_states(shards, compressor_dir):
    """Losses, validation metrics and baselines saved from main before `n_reasoning_tokens` existed."""
    expected = load_file(str(M1_TRAINING_REFERENCE))
    actual = m1_training_values(shards, compressor_dir)
    assert sorted(actual) == sorted(expected)  # no new metric names at m = 1
    for name, value in expected.items():
        assert torch.equal(actual[name], value), (name, actual[name], value)


M = 4


@pytest.fixture(scope="module")
def shards_m4(tmp_path_factory) -> Path:
    """Shards written by ShardWriter with m = 4 end-of-thinking states per sample."""
    return write_shards(tmp_path_factory.mktemp("pairs_m4") / "hidden_pairs", num_post_states=M)


def test_m_states_train_on_the_last_m_post_states(shards_m4, compressor_dir):
    data = make_data(shards_m4)
    data.setup("fit")
    batch = collate_hidden_pairs(split_items(data, "train")[:5])
    for m in (M, 2):
        module = make_module(compressor_dir, n_reasoning_tokens=m)
        x, mask, target = module.compress_batch(batch)
        expected = batch["post_states"][:, -m:] @ module.compressor.weight.detach().t()
        assert target.shape == (5, m, D_COMPRESSED)
        torch.testing.assert_close(target, expected)
        with torch.no_grad():
            assert module.trm(x, mask).prediction.shape == (5, m, D_COMPRESSED)
    # the last state is `post`: one reasoning token trains on it, as before
    one = make_module(compressor_dir)
    torch.testing.assert_close(one.compress_batch(batch)[2], batch["post"] @ one.compressor.weight.detach().t())


def test_m_states_loss_falls_on_a_task_where_each_state_depends_on_the_prompt(compressor_dir, tmp_path):
    shards = write_shards(tmp_path / "pairs", num_post_states=M, num_samples=48)
    module, recorder = make_module(compressor_dir, n_reasoning_tokens=M, learning_rate=3e-3), RecordOutputs()
    make_trainer(max_epochs=12, limit_val_batches=0, callbacks=[recorder]).fit(module, make_data(shards))
    first, last = recorder.losses(epoch=0), recorder.losses(epoch=11)
    assert sum(last) / len(last) < 0.5 * sum(first) / len(first), (first, last)
    # each of the m states is learned: on the training split the TRM's error on every state is well below
    # that of predicting the state's training mean
    data = make_data(shards)
    data.setup("fit")
    x, mask, target = module.compress_batch(collate_hidden_pairs(split_items(data, "train")))
    with torch.no_grad():
        error = (module.trm(x, mask).prediction - target).pow(2).mean((0, 2))
    mean_error = (target - target.mean(0)).pow(2).mean((0, 2))
    assert error.shape == (M,) and (error < 0.5 * mean_error).all(), (error, mean_error)


def test_too_few_stored_states_is_one_line_error(shards, shards_m4, compressor_dir):
    for stored, data_path in ((1, shards), (M, shards_m4)):
        module = make_module(compressor_dir, n_reasoning_tokens=M + 1)
        with pytest.raises(ConfigMismatchError) as err:
            make_trainer(limit_train_batches=1, limit_val_batches=0).fit(module, make_data(data_path))
        message = one_line(err)
        assert f"hold {stored} end-of-thinking state(s)" in message and f"n_reasoning_tokens={M + 1}" in message
        assert "num_post_states" in message
    # a batch without enough states (a user's own datamodule): the same line
    module = make_module(compressor_dir, n_reasoning_tokens=M)
    batch = collate_hidden_pairs([{"sample_id": "a", "pre": torch.randn(3, D), "post": torch.randn(D),
                                   "num_thinking_tokens": 5}])
    with pytest.raises(ConfigMismatchError, match=f"hold 1 end-of-thinking state.*n_reasoning_tokens={M}"):
        module.compress_batch(batch)


def test_m_states_baselines_and_normalisation_match_a_direct_computation(shards_m4, compressor_dir):
    alpha = 0.5
    module = make_module(compressor_dir, ridge_alpha=alpha, n_reasoning_tokens=M)
    data = make_data(shards_m4)
    make_trainer(limit_train_batches=1, limit_val_batches=0).fit(module, data)
    weight = module.compressor.weight.detach().double()

    def split(name: str):
        items = split_items(data, name)
        pooled = torch.stack([(item["pre"].double() @ weight.t()).mean(0) for item in items])
        last = torch.stack([item["pre"][-1].double() @ weight.t() for item in items])
        post = torch.stack([item["post_states"].double() for item in items])  # [N, m, D]
        return pooled, last, post @ weight.t(), post

    train_pooled, _, train_target, train_post = split("train")
    design = torch.cat([train_pooled, torch.ones(len(train_pooled), 1, dtype=torch.float64)], dim=1)
    penalty = alpha * torch.diag(torch.tensor([1.0] * D_COMPRESSED + [0.0], dtype=torch.float64))
    target_mean, post_mean = train_target.mean(0), train_post.mean(0)  # [m, D'], [m, D]

    def r2(prediction, target, mean):
        return 1 - (prediction - target).pow(2).sum() / (target - mean).pow(2).sum()

    for name in ("val", "test"):
        pooled, last, target, post = split(name)
        held_out_design = torch.cat([pooled, torch.ones(len(pooled), 1, dtype=torch.float64)], dim=1)
        ridge = torch.stack([held_out_design @ torch.linalg.solve(design.t() @ design + penalty,
                                                                  design.t() @ train_target[:, j])
                             for j in range(M)], dim=1)  # one ridge per state
        predictions = {"mean": target_mean.expand_as(target), "ridge": ridge,
                       "last_token": last[:, None].expand_as(target)}
        results = module.baseline_results[name]
        for baseline, prediction in predictions.items():
            cosines = F.cosine_similarity(prediction, target, dim=-1).mean(0)  # [m]
            assert results[f"{baseline}_cosine"] == pytest.approx(float(cosines.mean()), abs=1e-5), (name, baseline)
            assert results[f"{baseline}_last_cosine"] == pytest.approx(float(cosines[-1]), abs=1e-5)
            assert results[f"{baseline}_mse"] == pytest.approx(float((prediction - target).pow(2).mean()), rel=1e-4)
            r2s = [r2(prediction[:, j], target[:, j], target_mean[j]) for j in range(M)]
            assert results[f"{baseline}_explained_variance"] == pytest.approx(float(sum(r2s) / M), abs=1e-4)
            assert results[f"{baseline}_last_explained_variance"] == pytest.approx(float(r2s[-1]), abs=1e-4)
            full = prediction @ weight  # decompressed
            full_cosines = F.cosine_similarity(full, post, dim=-1).mean(0)
            assert results[f"{baseline}_full_cosine"] == pytest.approx(float(full_cosines.mean()), abs=1e-5)
            centred = F.cosine_similarity(full - post_mean, post - post_mean, dim=-1).mean(0)
            assert results[f"{baseline}_full_last_centred_cosine"] == pytest.approx(float(centred[-1]), abs=1e-5)
        assert results["mean_explained_variance"] == pytest.approx(0.0, abs=1e-5)
    torch.testing.assert_close(module.val_metrics.quality.reference_mean, target_mean)
    torch.testing.assert_close(module.test_metrics.quality_full.reference_mean, post_mean)
    # the TRM's normalisation: per target state
    torch.testing.assert_close(module.trm.target_mean.double(), target_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.trm.target_scale.double(), train_target.std(0), rtol=1e-5, atol=1e-6)


def test_m_states_held_out_metrics_match_a_direct_computation(shards_m4, compressor_dir):
    module, data = make_module(compressor_dir, n_reasoning_tokens=M), make_data(shards_m4)
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module, data)
    (tested,) = trainer.test(module, data, verbose=False)
    items = split_items(data, "test")
    batch = collate_hidden_pairs(items)
    weight = module.compressor.weight.detach()
    target = batch["post_states"] @ weight.t()
    with torch.no_grad():
        out = module.ema.module(batch["pre"] @ weight.t(), batch["pre_mask"])
    prediction = out.prediction
    cosines = F.cosine_similarity(prediction, target, dim=-1).mean(0)
    full_cosines = F.cosine_similarity(prediction @ weight, batch["post_states"], dim=-1).mean(0)
    expected = {"loss": (prediction - target).pow(2).mean(), "cosine": cosines.mean(), "last_cosine": cosines[-1],
                "full_cosine": full_cosines.mean(), "full_last_cosine": full_cosines[-1],
                "steps_used": out.steps_used.float().mean(), "halt_prob": out.halt_prob.mean()}
    for name, value in expected.items():
        assert tested[f"test/{name}"] == pytest.approx(float(value), rel=1e-5, abs=1e-6), name
    assert "test/baseline/ridge_last_explained_variance" in tested


def test_m_states_export_records_m_and_reloads(shards_m4, compressor_dir, tmp_path):
    module, data = make_module(compressor_dir, n_reasoning_tokens=M), make_data(shards_m4)
    trainer = make_trainer(max_epochs=1, enable_checkpointing=True, default_root_dir=tmp_path,
                           callbacks=[ExportBestModel(path=str(tmp_path / "trm"))])
    trainer.fit(module, data)
    exported = SequenceTRM.from_pretrained(tmp_path / "trm")
    assert exported.n_reasoning_tokens == M and exported.metadata["n_states"] == M
    assert json.loads((tmp_path / "trm" / "config.json").read_text())["n_reasoning_tokens"] == M
    for name, value in exported.state_dict().items():
        assert torch.equal(value, module.ema.module.state_dict()[name]), name
    metrics = json.loads((tmp_path / "trm" / "metrics.json").read_text())
    assert {"last_cosine", "full_last_explained_variance"} <= set(metrics["splits"]["val"]["model"])
    # from the Lightning checkpoint too (the architecture it records)
    (checkpoint,) = tmp_path.glob("**/checkpoints/*.ckpt")
    from_checkpoint = load_trm(checkpoint)
    assert from_checkpoint.n_reasoning_tokens == M and from_checkpoint.metadata["n_states"] == M
    x, mask = torch.randn(2, 3, D_COMPRESSED), torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        assert exported(x, mask).prediction.shape == (2, M, D_COMPRESSED)


def test_m_states_first_token_agreement_reads_the_closing_tags_state(shards_m4, compressor_dir, tiny_backbone_dir):
    module = make_module(compressor_dir, n_reasoning_tokens=M, first_token_backbone=str(tiny_backbone_dir))
    handed: list[tuple[torch.Tensor, torch.Tensor]] = []
    module.first_token_agreement = lambda predicted, real: handed.append((predicted, real)) or torch.ones(len(real))
    data = make_data(shards_m4)
    data.setup("fit")
    batch = collate_hidden_pairs(split_items(data, "val"))
    scored = module.score_batch(module.trm, batch)
    ((predicted, real),) = handed
    assert predicted.shape == real.shape == (len(batch["post"]), D)
    assert torch.equal(predicted, scored.decompressed[:, -1]) and torch.equal(real, batch["post"])
