"""TensorBoard output of the real configs: every scalar follows the tag scheme, the figures are there,
and the hyperparameters carry a final metric."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from llm_trm.backbone import backbone_id
from llm_trm.cli import main
from llm_trm.eval import figures
from llm_trm.models.compressor import DimensionCompressor
from tests.test_compressor_module import text_args
from tests.test_data_text import write_corpus
from tests.test_evaluate import save_latent_parts
from tests.test_notebooks import run_tiny_evaluation
from tests.test_trm_module import D, D_COMPRESSED, TINY_CLI, write_shards

REPO = Path(__file__).resolve().parents[1]
SCHEME = ("train/", "val/", "baseline/", "eval/", "lr-")
LIGHTNING_TAGS = {"epoch", "hp_metric"}


def read_events(log_root: Path) -> EventAccumulator:
    (run,) = {path.parent for path in log_root.rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def off_scheme(tags: list[str]) -> list[str]:
    return [tag for tag in tags if tag not in LIGHTNING_TAGS and not tag.startswith(SCHEME)]


def assert_hparams_logged(events: EventAccumulator, hparam: str) -> None:
    """The HPARAMS tab lists the module's hyperparameters with hp_metric, and hp_metric gets real values."""
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    assert hparam in start.session_start_info.hparams
    assert [info.name.tag for info in experiment.experiment.metric_infos] == ["hp_metric"]
    hp_metric = events.Scalars("hp_metric")
    assert len(hp_metric) >= 2 and hp_metric[-1].step > 0  # the logger's -1 placeholder, then real values


def test_compressor_fit_logs_scheme_tags_and_figures(tiny_backbone_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "corpus.txt", docs=80)
    main(text_args("configs/phase1/stage1a.yaml", tiny_backbone_dir, tmp_path, "--trainer.max_epochs", "1"))
    events = read_events(tmp_path / "runs")
    scalars = events.Tags()["scalars"]
    assert {"val/cosine", "baseline/pca_cosine", "val/cosine_ratio_to_pca", "train/loss_epoch"} <= set(scalars)
    assert off_scheme(scalars) == []
    assert {"baseline/pca_spectrum", "val/compressor_vs_pca"} <= set(events.Tags()["images"])
    assert off_scheme(events.Tags()["images"]) == []
    assert_hparams_logged(events, "d_compressed")


def test_trm_fit_logs_scheme_tags_and_figures(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shards = write_shards(tmp_path / "pairs")
    torch.manual_seed(0)
    compressor = DimensionCompressor(d_model=D, d_compressed=D_COMPRESSED).save_pretrained(
        tmp_path / "compressor", metadata={"backbone": "tiny", "layer": -1})
    main(["fit", "--config", str(REPO / "configs/phase2/trm.yaml"),   f"--data.init_args.data_path={shards}",
          f"--model.init_args.compressor_checkpoint={compressor}", "--data.init_args.num_workers=0",
          "--data.init_args.batch_size=8", "--data.init_args.val_fraction=0.25", "--trainer.accelerator=cpu",
          "--trainer.devices=1", "--trainer.precision=32-true", "--trainer.max_epochs=1",
          "--trainer.enable_progress_bar=false", *TINY_CLI])
    events = read_events(tmp_path / "runs")
    scalars = events.Tags()["scalars"]
    assert {"val/cosine_step1", "val/steps_used", "baseline/ridge_cosine", "train/loss_epoch"} <= set(scalars)
    assert off_scheme(scalars) == []
    assert {"val/cosine_per_step", "val/halting"} <= set(events.Tags()["images"])
    assert off_scheme(events.Tags()["images"]) == []
    assert_hparams_logged(events, "n_supervision_steps")


def test_evaluation_report_logs_eval_tags_and_the_accuracy_figure(tiny_backbone_dir, tmp_path):
    """A real tiny `llm-trm evaluate` run: its TensorBoard scalars are the report's numbers, under eval/<mode>/."""
    compressor, trm = save_latent_parts(tmp_path, backbone_id(str(tiny_backbone_dir)), d_model=64)
    report = run_tiny_evaluation(tmp_path / "eval", tiny_backbone_dir, compressor, trm)
    events = read_events(tmp_path / "eval" / "tensorboard")
    scalars = events.Tags()["scalars"]
    assert [tag for tag in scalars if not tag.startswith("eval/")] == []
    for summary in report["summary"]:
        for name in ("accuracy", "ci_high", "failed", "mean_answer_tokens", "mean_time_to_answer_s"):
            (logged,) = events.Scalars(f"eval/{summary['mode']}/{name}")
            assert logged.value == pytest.approx(summary[name], rel=1e-6, abs=1e-7), (summary["mode"], name)
    assert {summary["mode"] for summary in report["summary"]} == {"cot", "no_think", "trm", "trm_first_token"}
    trm = next(summary for summary in report["summary"] if summary["mode"] == "trm")
    assert 1 <= trm["mean_trm_steps"] <= 2  # the TRM's N_sup
    assert events.Scalars("eval/trm/mean_trm_steps")[0].value == pytest.approx(trm["mean_trm_steps"])
    assert sorted(events.Tags()["images"]) == ["eval/accuracy_vs_tokens", "eval/fidelity_ladder"]


@pytest.mark.parametrize("logger, is_global_zero, sanity_checking, drawn", [
    (None, True, False, False),  # no TensorBoard logger: nothing to draw for
    ("tensorboard", False, False, False),  # another rank
    ("tensorboard", True, True, False),  # the sanity check's two batches
    ("tensorboard", True, False, True),
])
def test_figures_are_drawn_only_for_tensorboard_on_rank_zero(logger, is_global_zero, sanity_checking, drawn, tmp_path):
    trainer = SimpleNamespace(loggers=[TensorBoardLogger(tmp_path)] if logger else [], global_step=3,
                              is_global_zero=is_global_zero, sanity_checking=sanity_checking)
    calls = []

    def make():
        calls.append(1)
        return figures.cosine_per_step([0.5, 0.6], {"mean": 0.7})

    figures.log_figure(trainer, "val/cosine_per_step", make)
    assert bool(calls) == drawn


def test_figure_functions_return_figures():
    spectrum = figures.pca_spectrum(torch.linspace(5, 0, 16), d_compressed=4)
    bars = figures.compressor_vs_pca({"cosine": 0.9, "explained_variance": 0.5},
                                     {"cosine": torch.tensor(0.95), "explained_variance": torch.tensor(0.6)})
    curve = figures.cosine_per_step([0.5, 0.7, 0.8], {"mean": 0.9, "ridge": 0.6})
    halting = figures.halting_histograms(torch.tensor([1.0, 3.0, 3.0]), torch.rand(7), 3, halt_decision=0.5)
    for figure in (spectrum, bars, curve, halting):
        assert figure.axes and figure.canvas.get_width_height()[0] > 0
