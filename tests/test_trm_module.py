"""TRMModule: frozen compressor, per-step updates, halting, EMA, schedule, resume, baselines, configs, DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from llm_trm.cli import main
from llm_trm.data.shards import HiddenPairDataModule, ShardWriter
from llm_trm.errors import ConfigMismatchError, NonFiniteLossError
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.trm import SequenceTRM
from llm_trm.modules.trm import TRMModule, prompt_summaries

REPO_ROOT = Path(__file__).resolve().parents[1]
D, D_COMPRESSED = 32, 8
NUM_SAMPLES = 24
TINY = dict(n_layers=1, n_heads=2, n_latent_steps=2, n_deep_recursions=2, n_supervision_steps=3, warmup_steps=2,
            learning_rate=1e-3)
TINY_CLI = [f"--model.init_args.{key}={value}" for key, value in TINY.items()]
DATAGEN_CONFIG = {"backbone": "tiny", "layer": -1, "datasets": ["synthetic"], "seed": 0}


def write_shards(directory: Path, corrupt_post: bool = False, dim: int = D) -> Path:
    """NUM_SAMPLES pairs, prompts of 3..8 tokens, post depending on the prompt (so there is something to learn)."""
    generator = torch.Generator().manual_seed(0)
    with ShardWriter(directory, DATAGEN_CONFIG, shard_size=10, dtype="float32") as writer:
        for i in range(NUM_SAMPLES):
            length = 3 + i % 6
            pre = torch.randn(length, dim, generator=generator)
            post = torch.tanh(pre[0] * pre[-1]) + 0.1 * pre.mean(0)
            if corrupt_post:
                post = torch.full_like(post, float("nan"))
            record = {"sample_id": f"synthetic:{i}", "problem": f"p{i}", "thinking": "", "answer": "", "gold_answer": "",
                      "correct": True, "closed_thinking": True, "token_ids": list(range(length + 2)),
                      "pre_length": length, "post_position": length + 1}
            writer.add(pre, post, 5, record)
    return directory


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("pairs") / "hidden_pairs")


@pytest.fixture(scope="module")
def compressor_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    compressor = DimensionCompressor(d_model=D, d_compressed=D_COMPRESSED)
    return compressor.save_pretrained(tmp_path_factory.mktemp("compressor"), metadata={"backbone": "tiny", "layer": -1})


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared machine OpenMP threads that spin-wait
    for busy cores slow small matmuls down by two orders of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_module(compressor_dir: Path, seed: int = 0, **overrides) -> TRMModule:
    torch.manual_seed(seed)
    return TRMModule(compressor_checkpoint=str(compressor_dir), **{**TINY, **overrides})


def make_data(shards: Path, **overrides) -> HiddenPairDataModule:
    # length buckets are seeded per epoch: the batch order does not depend on the global RNG (needed for resume)
    return HiddenPairDataModule(str(shards), **{"batch_size": 8, "val_fraction": 0.25, "bucket_by_length": True,
                                                **overrides})


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
    assert module.total_optimizer_steps() == trainer.global_step  # without halting the schedule ends exactly


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


def test_nonfinite_batches_are_skipped_then_stop_with_clear_error(compressor_dir, tmp_path):
    corrupt = write_shards(tmp_path / "nan_pairs", corrupt_post=True)
    module = make_module(compressor_dir, max_nonfinite_steps=2)
    with pytest.raises(NonFiniteLossError) as err:
        make_trainer(limit_val_batches=0).fit(module, make_data(corrupt))
    assert "2 non-finite losses in a row" in one_line(err)
    assert module.guard.skipped_total == 2 and module.trainer.global_step == 0


# --------------------------------------------------------------------------- baselines


def test_baselines_match_closed_form(shards, compressor_dir):
    alpha = 0.5
    module = make_module(compressor_dir, ridge_alpha=alpha)
    data = make_data(shards)
    make_trainer(limit_train_batches=1, limit_val_batches=0).fit(module, data)

    def compressed(dataset):
        items = [dataset[i] for i in range(len(dataset))]
        weight = module.compressor.weight.detach()
        pooled = torch.stack([(item["pre"] @ weight.t()).mean(0) for item in items])
        last = torch.stack([item["pre"][-1] @ weight.t() for item in items])
        target = torch.stack([item["post"] @ weight.t() for item in items])
        return pooled.double(), last.double(), target.double()

    train_pooled, _, train_target = compressed(data.train_dataset)
    val_pooled, val_last, val_target = compressed(data.val_dataset)
    # ridge with an unpenalised intercept: solve ([X 1]^T [X 1] + alpha diag(1..1, 0)) W = [X 1]^T Y
    design = torch.cat([train_pooled, torch.ones(len(train_pooled), 1, dtype=torch.float64)], dim=1)
    penalty = alpha * torch.diag(torch.tensor([1.0] * D_COMPRESSED + [0.0], dtype=torch.float64))
    weights = torch.linalg.solve(design.t() @ design + penalty, design.t() @ train_target)
    val_design = torch.cat([val_pooled, torch.ones(len(val_pooled), 1, dtype=torch.float64)], dim=1)
    predictions = {"mean": train_target.mean(0).expand_as(val_target), "ridge": val_design @ weights,
                   "last_token": val_last}

    results = module.baseline_results
    for name, prediction in predictions.items():
        cosine = F.cosine_similarity(prediction, val_target, dim=-1).mean()
        assert results[f"{name}_cosine"] == pytest.approx(float(cosine), abs=1e-5), name
        mse = (prediction - val_target).pow(2).mean()
        assert results[f"{name}_mse"] == pytest.approx(float(mse), rel=1e-4), name
    # R^2 and centred cosine are measured around the training mean: the mean predictor scores exactly 0
    assert results["mean_explained_variance"] == pytest.approx(0.0, abs=1e-5)
    assert results["mean_centred_cosine"] == pytest.approx(0.0, abs=1e-5)
    torch.testing.assert_close(module.val_quality.reference_mean, train_target.mean(0))


def test_prompt_summaries_ignore_padding():
    x = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [4.0], [6.0]]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    pooled, last = prompt_summaries(x, mask)
    assert pooled.squeeze(1).tolist() == [2.0, 4.0] and last.squeeze(1).tolist() == [3.0, 6.0]


# --------------------------------------------------------------------------- logged metrics


def test_validation_logs_metrics_baselines_and_first_token_agreement(tiny_backbone_dir, tmp_path):
    shards64 = write_shards(tmp_path / "pairs64", dim=64)
    torch.manual_seed(0)
    compressor = DimensionCompressor(d_model=64, d_compressed=D_COMPRESSED).save_pretrained(
        tmp_path / "comp64", metadata={"backbone": str(tiny_backbone_dir), "layer": -1})
    module = make_module(compressor, first_token_backbone=str(tiny_backbone_dir))
    trainer = make_trainer(limit_train_batches=1)
    trainer.fit(module, make_data(shards64))

    logged = trainer.callback_metrics
    steps = TINY["n_supervision_steps"]
    expected = [f"val/cosine_step{k}" for k in range(1, steps + 1)] + [
        f"{prefix}{name}" for prefix in ("val/", "val/full_", "train/", "train/full_")
        for name in ("cosine", "mse", "relative_error", "explained_variance", "centred_cosine")] + [
        f"baseline/{name}_{space}cosine" for name in ("mean", "ridge", "last_token") for space in ("", "full_")] + [
        "val/loss", "val/halt_prob", "val/steps_used", "val/halt_accuracy", "train/halt_threshold"]
    assert not [tag for tag in expected if tag not in logged]
    assert 1 <= float(logged["val/steps_used"]) <= steps
    assert 0.0 <= float(logged["val/first_token_agreement"]) <= 1.0


# --------------------------------------------------------------------------- configs and DDP


@pytest.mark.parametrize("config", ["configs/phase2/trm.yaml", "configs/demo/trm.yaml"])
def test_config_runs_with_fast_dev_run(config, shards, compressor_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(REPO_ROOT / config), f"--data.init_args.data_path={shards}",
          f"--model.init_args.compressor_checkpoint={compressor_dir}", "--data.init_args.num_workers=0",
          "--trainer.fast_dev_run=true"])


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
