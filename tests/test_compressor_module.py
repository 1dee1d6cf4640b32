"""CompressorModule through the CLI, as users run it, on a tiny random SmolLM3."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from llm_trm.cli import LLMTRMCLI, main
from llm_trm.errors import ArtifactNotFoundError, ConfigError, ConfigMismatchError, DataError, NonFiniteLossError
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.hub import load_compressor, load_torch_checkpoint
from llm_trm.modules.compressor import CompressorModule
from tests.test_data_text import write_corpus, write_datagen_records

REPO = Path(__file__).resolve().parents[1]
TEXT_CONFIGS = ["configs/phase1/stage1a.yaml", "configs/demo/stage1a.yaml"]
COT_CONFIGS = ["configs/phase1/stage1b.yaml", "configs/demo/stage1b.yaml"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs write to relative runs/...
    write_corpus(tmp_path / "corpus.txt", docs=80)
    return tmp_path


def text_args(config, backbone, workdir, *extra):
    return ["fit", "--config", str(REPO / config), "--model.backbone", str(backbone), "--model.d_compressed", "8",
            "--model.pca_batches", "2", "--data.source", str(workdir / "corpus.txt"), "--data.seq_len", "16",
            "--data.num_samples", "16", "--data.val_samples", "4", "--data.val_fraction", "0.2",
            "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.precision", "32-true",
            "--trainer.val_check_interval", "1.0",
            "--trainer.logger.init_args.save_dir", str(workdir / "runs"), *extra]


def export_tiny_1a(backbone, directory, d_compressed=8):
    module = CompressorModule(backbone=str(backbone), d_compressed=d_compressed)
    return module.export_pretrained(directory)


@pytest.mark.parametrize("config", TEXT_CONFIGS)
def test_stage1a_configs_fast_dev_run(config, tiny_backbone_dir, workdir):
    assert main(text_args(config, tiny_backbone_dir, workdir, "--trainer.fast_dev_run", "true")) == 0


# (config, where it expects the 1a export, where it expects the datagen output, where it exports)
COT_DEFAULTS = {
    "configs/phase1/stage1b.yaml": ("runs/phase1/compressor_1a", "./data/hidden_pairs", "runs/phase1/compressor_1b"),
    "configs/demo/stage1b.yaml": ("runs/demo/compressor_1a", "runs/demo/hidden_pairs", "runs/demo/compressor_1b"),
}


def cot_args(config, backbone, *extra):
    """The stage 1b config with only the sizes changed: its own 1a export and datagen records are used."""
    return ["fit", "--config", str(REPO / config), "--model.backbone", str(backbone), "--model.d_compressed", "8",
            "--model.pca_batches", "1", "--data.num_workers", "0", "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.precision", "32-true", *extra]


@pytest.mark.parametrize("config", COT_CONFIGS)
def test_stage1b_configs_start_from_the_users_1a_export_and_datagen_records(config, tiny_backbone_dir, workdir):
    init_from, records_dir, export = COT_DEFAULTS[config]
    init = export_tiny_1a(tiny_backbone_dir, workdir / init_from)
    distinct = DimensionCompressor.from_pretrained(init)  # unlike any fresh initialisation
    distinct.weight.data.mul_(-1)
    distinct.save_pretrained(init)
    stored = write_datagen_records(workdir / records_dir, tiny_backbone_dir, count=20)  # one held out at 0.1
    cli = LLMTRMCLI(args=cot_args(config, tiny_backbone_dir, "--trainer.max_steps", "1",
                                  "--trainer.limit_val_batches", "1"))
    model, data = cli.model, cli.datamodule
    assert (model.hparams.stage, model.hparams.init_from, data.hparams.source) == ("1b", init_from, records_dir)
    # trained on the LLM's own thinking: every sequence is a datagen record's token ids
    train = [data.train_set[i]["input_ids"].tolist() for i in range(len(data.train_set))]
    assert train and all(ids in stored for ids in train)
    # started from the 1a export: one step of AdamW moves each weight by at most ~lr (first step: exactly)
    start = DimensionCompressor.from_pretrained(init).weight
    moved = (model.compressor.weight.detach() - start).abs().max()
    assert 0 < moved <= model.hparams.learning_rate * 1.01
    assert DimensionCompressor.from_pretrained(workdir / export).metadata["stage"] == "1b"


def test_phase1_stage1b_keeps_the_seed_defaults(tiny_backbone_dir):
    """The README's seed-flag table says 1a and 1b share the seed's defaults."""
    stages = {}
    for stage in ("1a", "1b"):
        config = yaml.safe_load((REPO / f"configs/phase1/stage{stage}.yaml").read_text())
        stages[stage] = (config["model"]["init_args"], config["data"]["init_args"], config["trainer"])
    for stage, (model, data, trainer) in stages.items():
        assert model["stage"] == stage and model["d_compressed"] == 256 and model["learning_rate"] == 1e-3
        assert data["num_samples"] == 50000 and data["batch_size"] == 8 and trainer["max_epochs"] == 10
        assert trainer["precision"] == "bf16-mixed"
    assert stages["1b"][0]["init_from"] == "runs/phase1/compressor_1a"
    exports = yaml.safe_load((REPO / "configs/phase1/stage1a.yaml").read_text())["trainer"]["callbacks"]
    assert {"path": "runs/phase1/compressor_1a"} in [c.get("init_args") for c in exports]


def test_stage1b_without_a_1a_export_says_to_run_stage_1a(tiny_backbone_dir, workdir):
    write_datagen_records(workdir / "data" / "hidden_pairs", tiny_backbone_dir)
    with pytest.raises(ArtifactNotFoundError, match=r"runs/phase1/compressor_1a cannot be loaded: run stage 1a first "
                                                    r"\(`llm-trm fit --config configs/phase1/stage1a.yaml`"):
        main(cot_args("configs/phase1/stage1b.yaml", tiny_backbone_dir, "--trainer.fast_dev_run", "true"))


def test_stage1b_without_datagen_records_says_to_run_datagen(tiny_backbone_dir, workdir):
    export_tiny_1a(tiny_backbone_dir, workdir / "runs" / "phase1" / "compressor_1a")
    with pytest.raises(DataError, match=r"./data/hidden_pairs does not exist: run `llm-trm datagen` first"):
        main(cot_args("configs/phase1/stage1b.yaml", tiny_backbone_dir, "--trainer.fast_dev_run", "true"))


def test_fit_exports_best_and_checkpoint_holds_only_the_compressor(tiny_backbone_dir, workdir):
    cli = LLMTRMCLI(args=text_args("configs/phase1/stage1a.yaml", tiny_backbone_dir, workdir,
                                   "--trainer.max_epochs", "2"))
    metrics = cli.trainer.callback_metrics
    for key in ("val/cosine", "val/relative_error", "val/explained_variance", "baseline/pca_cosine",
                "val/cosine_ratio_to_pca", "train/cosine"):
        assert key in metrics, key
    ckpt_path = cli.trainer.checkpoint_callback.last_model_path
    checkpoint = load_torch_checkpoint(ckpt_path)
    assert set(checkpoint["state_dict"]) == {"compressor.weight"}  # the frozen LLM is never saved
    meta = checkpoint["llm_trm"]
    assert meta["d_model"] == 64 and meta["d_compressed"] == 8 and meta["layer"] == -1
    assert meta["backbone"] == str(Path(tiny_backbone_dir).resolve())
    export = Path(cli.trainer.log_dir) / "compressor"
    loaded = DimensionCompressor.from_pretrained(export)
    best = load_torch_checkpoint(cli.trainer.checkpoint_callback.best_model_path)["state_dict"]
    assert torch.equal(loaded.weight, best["compressor.weight"])
    assert loaded.metadata["backbone"] == meta["backbone"]


def test_resume_continues_from_checkpoint(tiny_backbone_dir, workdir):
    first = LLMTRMCLI(args=text_args("configs/phase1/stage1a.yaml", tiny_backbone_dir, workdir,
                                     "--trainer.max_epochs", "1"))
    last = first.trainer.checkpoint_callback.last_model_path
    steps = load_torch_checkpoint(last)["global_step"]
    assert steps == 4  # 16 samples / batch 4, one optimizer step per batch
    resumed = LLMTRMCLI(args=text_args("configs/phase1/stage1a.yaml", tiny_backbone_dir, workdir,
                                       "--trainer.max_epochs", "2", "--ckpt_path", last))
    assert resumed.trainer.global_step == 8
    scheduler = resumed.model.lr_schedulers()
    assert scheduler.last_epoch == 8  # the schedule resumed too, counted in optimizer steps


def test_resume_with_another_backbone_is_a_clear_error(tiny_backbone_dir, tiny_backbone_dir_d32, workdir):
    first = LLMTRMCLI(args=text_args("configs/phase1/stage1a.yaml", tiny_backbone_dir, workdir,
                                     "--trainer.max_epochs", "1"))
    last = first.trainer.checkpoint_callback.last_model_path
    with pytest.raises(ConfigMismatchError, match=f"backbone='{tiny_backbone_dir}' but this run has backbone="):
        main(text_args("configs/phase1/stage1a.yaml", tiny_backbone_dir_d32, workdir,
                       "--trainer.max_epochs", "2", "--ckpt_path", last))
    # a checkpoint whose recorded D differs from the module's is caught when it is loaded, too
    module = CompressorModule(backbone=str(tiny_backbone_dir_d32), d_compressed=8)
    with pytest.raises(ConfigMismatchError, match="d_model=64 but this run has d_model=32"):
        module.on_load_checkpoint(load_torch_checkpoint(last))


def test_stage_1b_needs_a_matching_1a_compressor(tiny_backbone_dir, tiny_backbone_dir_d32, tmp_path):
    with pytest.raises(ConfigMismatchError, match="init_from"):
        CompressorModule(backbone=str(tiny_backbone_dir), d_compressed=8, stage="1b")
    other = export_tiny_1a(tiny_backbone_dir_d32, tmp_path / "d32")
    with pytest.raises(ConfigMismatchError, match="d_model=32 but this run has d_model=64"):
        CompressorModule(backbone=str(tiny_backbone_dir), d_compressed=8, stage="1b", init_from=str(other))
    wrong_rank = export_tiny_1a(tiny_backbone_dir, tmp_path / "r4", d_compressed=4)
    with pytest.raises(ConfigMismatchError, match="d_compressed=4 but this run has d_compressed=8"):
        CompressorModule(backbone=str(tiny_backbone_dir), d_compressed=8, stage="1b", init_from=str(wrong_rank))
    good = export_tiny_1a(tiny_backbone_dir, tmp_path / "ok")
    module = CompressorModule(backbone=str(tiny_backbone_dir), d_compressed=8, stage="1b", init_from=str(good))
    assert torch.equal(module.compressor.weight, DimensionCompressor.from_pretrained(good).weight)


def _tiny_datamodule(backbone, workdir):
    from llm_trm.data.text import TextDataModule

    return TextDataModule(backbone=str(backbone), source=str(workdir / "corpus.txt"), seq_len=16, num_samples=16,
                          val_samples=4, val_fraction=0.2, batch_size=4)


def test_nonfinite_losses_are_skipped_then_stop_the_run(tiny_backbone_dir, workdir, monkeypatch):
    module = CompressorModule(backbone=str(tiny_backbone_dir), d_compressed=8, pca_batches=0, max_nonfinite_steps=3)
    calls = {"n": 0}
    real_loss = module.reconstruction_loss

    def flaky(states, recon):  # two NaN steps, then healthy, then NaN forever
        calls["n"] += 1
        loss = real_loss(states, recon)
        return loss * float("nan") if calls["n"] in (1, 2) or calls["n"] > 3 else loss

    monkeypatch.setattr(module, "reconstruction_loss", flaky)
    before = module.compressor.weight.detach().clone()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, enable_progress_bar=False)
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        trainer.fit(module, datamodule=_tiny_datamodule(tiny_backbone_dir, workdir))
    assert module.guard.skipped_total == 5  # 2 skipped, 1 real step, then 3 in a row
    assert trainer.global_step == 1  # only the healthy batch stepped the optimizer
    assert not torch.equal(before, module.compressor.weight.detach())


def test_padding_never_enters_the_states(tiny_backbone_dir):
    module = CompressorModule(backbone=str(tiny_backbone_dir), d_compressed=8)
    ids = torch.randint(5, 200, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    rows = module.token_states({"input_ids": ids, "attention_mask": mask})
    assert rows.shape == (8, 64)
    alone = module.token_states({"input_ids": ids[1:, :2], "attention_mask": mask[1:, :2]})
    assert torch.allclose(rows[6:], alone, atol=1e-5)


def test_cached_states_equal_fresh_ones(tiny_backbone_dir, workdir):
    module = CompressorModule(backbone=str(tiny_backbone_dir), d_compressed=8, cache_hidden_states=True)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    module.trainer = trainer
    dm = _tiny_datamodule(tiny_backbone_dir, workdir)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    first = module.token_states(batch)
    assert len(module._state_cache) == 4
    module._llm = None  # a second call must come from the cache, without the LLM
    module.backbone = "/nonexistent/so/loading/fails"
    assert torch.equal(module.token_states(batch), first)


def test_cli_help_lists_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict"):
        assert f"  {command}" in out


def test_unknown_config_key_is_rejected(tiny_backbone_dir, workdir, capsys):
    with pytest.raises(ConfigError, match="--model.no_such_key is not an option of .*CompressorModule"):
        main(text_args("configs/phase1/stage1a.yaml", tiny_backbone_dir, workdir, "--model.no_such_key", "1"))
    (line,) = capsys.readouterr().err.strip().splitlines()  # one line, from the console exit code 2
    assert line.startswith("llm-trm: error: --model.no_such_key")


def test_ddp_two_processes_on_cpu(tiny_backbone_dir, workdir):
    """`--trainer.devices 2 --trainer.strategy ddp` as a user runs it (Lightning launches the second process)."""
    args = text_args("configs/phase1/stage1a.yaml", tiny_backbone_dir, workdir, "--trainer.max_epochs", "1")
    args = [a for a in args]
    args[args.index("--trainer.devices") + 1] = "2"
    args += ["--trainer.strategy", "ddp"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "llm_trm.cli", *args], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = next((workdir / "runs").rglob("last.ckpt"))
    checkpoint = load_torch_checkpoint(ckpt)
    # 16 samples split over 2 ranks, batch 4: 2 optimizer steps per rank
    assert checkpoint["global_step"] == 2
    assert set(checkpoint["state_dict"]) == {"compressor.weight"}


def test_bf16_mixed_precision_on_cpu(tiny_backbone_dir, workdir, monkeypatch):
    """bf16-mixed runs the compressor under bf16 autocast with fp32 master weights, and the loss stays finite."""
    seen = []
    real_loss = CompressorModule.reconstruction_loss

    def watched(self, states, recon):
        loss = real_loss(self, states, recon)
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), recon.dtype, loss.detach()))
        return loss

    monkeypatch.setattr(CompressorModule, "reconstruction_loss", watched)
    args = text_args("configs/phase1/stage1a.yaml", tiny_backbone_dir, workdir, "--trainer.max_steps", "2",
                     "--trainer.limit_val_batches", "1")
    args[args.index("--trainer.precision") + 1] = "bf16-mixed"
    cli = LLMTRMCLI(args=args)
    assert cli.trainer.global_step == 2 and cli.model.guard.skipped_total == 0  # both steps taken, none skipped
    assert len(seen) >= 3  # 2 training steps + validation
    for autocast, dtype, recon_dtype, loss in seen:
        assert autocast and dtype == torch.bfloat16 and recon_dtype == torch.bfloat16
        assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss > 0
    assert cli.model.compressor.weight.dtype == torch.float32
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_step"])


def test_validate_subcommand_reports_the_pca_baseline(tiny_backbone_dir, workdir):
    fast = ("--model.learning_rate", "0.05", "--model.warmup_steps", "0")  # so training moves the weights
    fit = LLMTRMCLI(args=text_args("configs/phase1/stage1a.yaml", tiny_backbone_dir, workdir,
                                   "--trainer.max_epochs", "1", *fast))
    last = fit.trainer.checkpoint_callback.last_model_path
    args = text_args("configs/phase1/stage1a.yaml", tiny_backbone_dir, workdir, "--ckpt_path", last, *fast)
    args[0] = "validate"
    args.remove("--trainer.val_check_interval"), args.remove("1.0")
    cli = LLMTRMCLI(args=args)
    assert "baseline/pca_cosine" in cli.trainer.callback_metrics
    # the checkpoint's weights on the same held-out chunks: the value the fit's last validation logged
    fitted = float(fit.trainer.callback_metrics["val/cosine"])
    assert float(cli.trainer.callback_metrics["val/cosine"]) == pytest.approx(fitted, abs=1e-6)
    assert float(cli.trainer.callback_metrics["val/loss"]) == pytest.approx(
        float(fit.trainer.callback_metrics["val/loss"]), rel=1e-5)


def test_console_prints_user_errors_as_one_line(tmp_path):
    """Errors raised while LightningCLI builds the model reach the user as one `llm-trm: error:` line."""
    result = subprocess.run([sys.executable, "-m", "llm_trm.cli", "fit", "--config",
                             str(REPO / "configs/demo/trm.yaml"), "--model.compressor_checkpoint",
                             str(tmp_path / "missing")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("llm-trm: error:") and "missing" in last and "check the path" in last
    assert "Traceback" not in result.stderr


def test_load_compressor_reads_a_lightning_checkpoint_and_from_pretrained_points_there(tiny_backbone_dir, workdir):
    cli = LLMTRMCLI(args=text_args("configs/phase1/stage1a.yaml", tiny_backbone_dir, workdir,
                                   "--trainer.max_epochs", "1"))
    last = cli.trainer.checkpoint_callback.last_model_path
    with pytest.raises(ArtifactNotFoundError, match="load_compressor"):  # models know nothing of .ckpt files
        DimensionCompressor.from_pretrained(last)
    loaded = load_compressor(last)
    assert torch.equal(loaded.weight, load_torch_checkpoint(last)["state_dict"]["compressor.weight"])
    assert loaded.metadata["d_compressed"] == 8
