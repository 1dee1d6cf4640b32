"""Issue 13 as an adversary tries it, through the real console entry (`python -m llm_trm.cli`):
a checkpoint URL serving a pickled payload, corrupt checkpoints, bad numbers, inconsistent or
unidentified artifacts. Each must fail with exit code 2 and one line `llm-trm: error: ...`,
no traceback, and nothing from the payload may run."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from llm_trm.backbone import backbone_id
from llm_trm.cli import main
from llm_trm.errors import UncheckedArtifactError
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.trm import SequenceTRM
from tests.test_compressor_module import text_args
from tests.test_data_text import write_corpus
from tests.test_hub import served, write_malicious_checkpoint  # noqa: F401  (served is a fixture)

REPO = Path(__file__).resolve().parents[1]
TINY_TRM = dict(n_layers=1, n_heads=2, n_latent_steps=1, n_deep_recursions=1, n_supervision_steps=2)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("LLM_TRM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "llm_trm.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    """Exit code 2, exactly one stderr line, `llm-trm: error: ...`, no traceback; returns the line."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("llm-trm: error: "), result.stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------- 13.1 checkpoints never run code


def test_ckpt_path_url_with_a_pickled_payload_is_refused_and_never_runs(tiny_backbone_dir, tmp_path, served):
    folder, url = served
    marker = tmp_path / "payload-ran"
    write_malicious_checkpoint(folder / "last.ckpt", marker)
    write_corpus(tmp_path / "corpus.txt", docs=40)
    result = run_cli(*text_args("configs/phase1/stage1a.yaml", tiny_backbone_dir, tmp_path,
                                "--trainer.max_epochs", "1", "--ckpt_path", f"{url}/last.ckpt"), cwd=tmp_path)
    line = assert_one_line_error(result)
    assert not marker.exists()
    assert f"{url}/last.ckpt" in line and "pickled objects" in line and "weights_only=False" not in line


def test_weights_only_false_is_refused(tiny_backbone_dir, tmp_path):
    write_corpus(tmp_path / "corpus.txt", docs=40)
    result = run_cli(*text_args("configs/phase1/stage1a.yaml", tiny_backbone_dir, tmp_path,
                                "--weights_only", "false"), cwd=tmp_path)
    assert "--weights_only false is refused" in assert_one_line_error(result)


def test_lightning_is_always_told_to_read_weights_only(tiny_backbone_dir, tmp_path, monkeypatch):
    # covers the ckpt_path values Lightning resolves itself (last, best, hpc, registry) too
    seen = {}

    @functools.wraps(L.Trainer.fit)  # the CLI builds `fit`'s options from its signature
    def record(self, *args, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(L.Trainer, "fit", record)
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "corpus.txt", docs=40)
    assert main(text_args("configs/phase1/stage1a.yaml", tiny_backbone_dir, tmp_path, "--ckpt_path", "last")) == 0
    assert seen["weights_only"] is True and seen["ckpt_path"] == "last"


def test_random_bytes_ckpt_is_one_line_that_does_not_suggest_unpickling(tmp_path):
    ckpt = tmp_path / "random.ckpt"
    ckpt.write_bytes(os.urandom(4096))
    result = run_cli("fit", "--config", "configs/demo/stage1a.yaml", "--ckpt_path", str(ckpt))
    line = assert_one_line_error(result)
    assert str(ckpt) in line and "not a torch checkpoint" in line
    assert "weights_only" not in line


def test_ckpt_path_from_a_url_resumes_a_real_run(tiny_backbone_dir, tmp_path, served, monkeypatch):
    # the safe path is not a refusal of every URL: a checkpoint llm-trm wrote resumes from one
    folder, url = served
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "corpus.txt", docs=40)
    args = text_args("configs/phase1/stage1a.yaml", tiny_backbone_dir, tmp_path, "--trainer.enable_progress_bar",
                     "false")
    assert main([*args, "--trainer.max_epochs", "1", "--trainer.logger.init_args.name", "first"]) == 0
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    steps = torch.load(last, weights_only=True)["global_step"]
    (folder / "last.ckpt").write_bytes(last.read_bytes())
    assert main([*args, "--trainer.max_epochs", "2", "--trainer.logger.init_args.name", "resumed",
                 "--ckpt_path", f"{url}/last.ckpt"]) == 0
    resumed = next((tmp_path / "runs").rglob("resumed/**/last.ckpt"))
    assert torch.load(resumed, weights_only=True)["global_step"] == 2 * steps  # continued, not restarted


# ---------------------------------------------------------------------------- 13.6 bad numbers, parsed first


BAD_NUMBERS = {
    # the backbone does not exist: the number must be reported first, before any model loads
    "fit d_compressed 0": (["fit", "--config", "configs/demo/stage1a.yaml", "--model.backbone", "/no/such/model",
                            "--model.d_compressed", "0"], "--model.d_compressed 0"),
    "fit batch_size 0": (["fit", "--config", "configs/demo/stage1a.yaml", "--data.batch_size", "0"],
                         "--data.batch_size 0"),
    "datagen batch_size 0": (["datagen", "--config", "configs/demo/datagen.yaml", "--model.backbone", "/no/such/model",
                              "--data.batch_size", "0"], "--data.batch_size 0"),
    "datagen max_new_tokens 0": (["datagen", "--config", "configs/demo/datagen.yaml", "--model.max_new_tokens", "0"],
                                 "--model.max_new_tokens 0"),
    "datagen num_samples -1": (["datagen", "--config", "configs/demo/datagen.yaml", "--num_samples", "-1"],
                               "--data.num_samples -1"),
    "evaluate num_samples 0": (["evaluate", "--config", "configs/demo/evaluate.yaml", "--num_samples", "0"],
                               "--num_samples 0"),
    "evaluate num_samples -1": (["evaluate", "--config", "configs/demo/evaluate.yaml", "--num_samples", "-1"],
                                "--num_samples -1"),
    "evaluate num_samples -3": (["evaluate", "--config", "configs/demo/evaluate.yaml", "--num_samples", "-3"],
                                "--num_samples -3"),
}


@pytest.mark.parametrize("case", list(BAD_NUMBERS))
def test_bad_numbers_are_one_line_errors_at_parse_time(case, tmp_path):
    args, named = BAD_NUMBERS[case]
    line = assert_one_line_error(run_cli(*args, cwd=REPO))
    assert named in line and "must be an integer > 0" in line


def test_other_parse_errors_are_one_line_too():
    assert "--model.foo is not an option of llm_trm.modules.CompressorModule" in assert_one_line_error(
        run_cli("fit", "--config", "configs/demo/stage1a.yaml", "--model.foo", "1"))
    assert "--num_samples many is not valid" in assert_one_line_error(run_cli("evaluate", "--num_samples", "many"))


# ---------------------------------------------------------------------------- 13.6 / 13.7 artifacts


def test_compressor_whose_config_does_not_match_its_weights_is_one_line(tmp_path):
    folder = DimensionCompressor(576, 32).save_pretrained(tmp_path / "c", {"backbone": "embedded", "layer": -1})
    (folder / "config.json").write_text((folder / "config.json").read_text().replace('"d_compressed": 32',
                                                                                     '"d_compressed": 64'))
    result = run_cli("evaluate", "--config", "configs/demo/evaluate.yaml", "--compressor", str(folder),
                     "--trm", str(tmp_path / "c"), "--exclude_from", "null")
    line = assert_one_line_error(result)
    assert "config.json does not match compressor.safetensors" in line and "[32, 576]" in line


def test_evaluate_refuses_unidentified_artifacts_unless_told(tmp_path):
    compressor = DimensionCompressor(576, 8).save_pretrained(tmp_path / "c")  # records no backbone, layer
    trm = SequenceTRM(8, **TINY_TRM).save_pretrained(tmp_path / "t", {"backbone": "embedded", "layer": -1,
                                                                      "d_model": 576})
    args = ["evaluate", "--config", "configs/demo/evaluate.yaml", "--compressor", str(compressor), "--trm", str(trm),
            "--exclude_from", "null"]
    line = assert_one_line_error(run_cli(*args))
    assert str(compressor) in line and "does not record backbone, layer" in line
    assert "--allow_unchecked_artifacts" in line


def test_modules_refuse_unidentified_artifacts_unless_told(tiny_backbone_dir, tmp_path):
    from llm_trm.inference import LatentReasoner
    from llm_trm.modules.compressor import CompressorModule
    from llm_trm.modules.grpo import GRPOModule
    from llm_trm.modules.trm import TRMModule

    bare = DimensionCompressor(64, 8).save_pretrained(tmp_path / "bare")
    trm = SequenceTRM(8, **TINY_TRM).save_pretrained(tmp_path / "trm", {"backbone": backbone_id(str(tiny_backbone_dir)),
                                                                        "layer": -1, "d_model": 64})
    attempts = {
        "TRMModule": lambda **kw: TRMModule(compressor_checkpoint=str(bare), **kw),
        "CompressorModule": lambda **kw: CompressorModule(backbone=str(tiny_backbone_dir), d_compressed=8,
                                                          stage="1b", init_from=str(bare), **kw),
        "LatentReasoner": lambda **kw: LatentReasoner(str(tiny_backbone_dir), compressor=str(bare), trm=str(trm),
                                                      device="cpu", **kw),
    }
    for name, build in attempts.items():
        with pytest.raises(UncheckedArtifactError, match="does not record backbone, layer"):
            build()
        with pytest.warns(UserWarning, match="used unchecked"):
            build(allow_unchecked_artifacts=True)
    with pytest.raises(UncheckedArtifactError, match="does not record backbone, layer"):
        GRPOModule(backbone=str(tiny_backbone_dir), compressor_checkpoint=str(bare), trm_checkpoint=str(trm))
