"""`llm-trm push` and loading from anywhere: dry-run folder, model card, Hub client at its boundary, errors,
and from_pretrained / load_* round trips from export folders and Lightning checkpoints. No network."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from llm_trm import push
from llm_trm.cards import EMBEDDED_BACKBONE_HUB_ID, ModelCardError, base_model_id, dataset_ids, read_scalars
from llm_trm.cli import LLMTRMCLI, main
from llm_trm.errors import ConfigMismatchError
from llm_trm.hub import UnknownArtifactError, detect_kind, load_compressor, load_torch_checkpoint, load_trm
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.trm import SequenceTRM
from llm_trm.weights import NonFiniteWeightsError
from tests.test_compressor_module import text_args
from tests.test_data_text import write_corpus
from tests.test_trm_module import TINY_CLI, write_shards

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_MODEL = "HuggingFaceTB/SmolLM3-3B"  # the tiny backbone is a local folder: the card needs the id it stands for
UPLOAD_FILES = {"model.safetensors", "config.json", "README.md"}


# --------------------------------------------------------------------------- real runs (one of each phase)


@pytest.fixture(scope="module")
def compressor_run(tiny_backbone_dir, tmp_path_factory) -> SimpleNamespace:
    """A Phase 1 fit through the CLI: run dir with events, config.yaml, checkpoints and the export folder."""
    workdir = tmp_path_factory.mktemp("phase1")
    write_corpus(workdir / "corpus.txt", docs=80)
    previous = os.getcwd()
    os.chdir(workdir)  # the config also exports to the relative runs/phase1/compressor_1a: keep it in here
    try:
        cli = LLMTRMCLI(args=text_args("configs/phase1/stage1a.yaml", tiny_backbone_dir, workdir,
                                       "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"))
    finally:
        os.chdir(previous)
    run_dir = Path(cli.trainer.log_dir)
    return SimpleNamespace(run_dir=run_dir, export=run_dir / "compressor",
                           last=Path(cli.trainer.checkpoint_callback.last_model_path),
                           metrics={k: float(v) for k, v in cli.trainer.callback_metrics.items()})


@pytest.fixture(scope="module")
def trm_run(compressor_run, tmp_path_factory) -> SimpleNamespace:
    """A Phase 2 fit whose compressor_checkpoint is the Phase 1 run's Lightning checkpoint."""
    workdir = tmp_path_factory.mktemp("phase2")
    shards = write_shards(workdir / "hidden_pairs", dim=64)
    cli = LLMTRMCLI(args=[
        "fit", "--config", str(REPO_ROOT / "configs/phase2/trm.yaml"), f"--data.init_args.data_path={shards}",
        "--data.init_args.val_fraction=0.25", "--data.init_args.split_seed=3",
        f"--model.init_args.compressor_checkpoint={compressor_run.last}", "--data.init_args.num_workers=0",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true", "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={workdir / 'runs'}", *TINY_CLI])
    run_dir = Path(cli.trainer.log_dir)
    return SimpleNamespace(run_dir=run_dir, export=run_dir / "trm",
                           best=Path(cli.trainer.checkpoint_callback.best_model_path),
                           metrics={k: float(v) for k, v in cli.trainer.callback_metrics.items()})


# --------------------------------------------------------------------------- the Hub client, replaced


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records each call and a copy of the uploaded folder."""

    def __init__(self, token: str | None = None, fail_with: Exception | None = None) -> None:
        self.token, self.fail_with = token, fail_with
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, repo_id: str, **kwargs) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if self.fail_with:
            raise self.fail_with

    def create_branch(self, repo_id: str, **kwargs) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, repo_id: str, folder_path, **kwargs) -> SimpleNamespace:
        self.calls.append(("upload_folder", {"repo_id": repo_id, **kwargs}))
        self.uploaded = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123")


@pytest.fixture
def hub(monkeypatch) -> list[FakeHfApi]:
    """Every HfApi the push creates (none when it stops early); a token in HF_TOKEN."""
    created: list[FakeHfApi] = []

    def make(token=None):
        created.append(FakeHfApi(token))
        return created[-1]

    monkeypatch.setattr(push, "HfApi", make)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return created


@pytest.fixture
def logged_out(monkeypatch, tmp_path) -> None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))


def dry_run(checkpoint: Path, out: Path, *extra: str, repo: str = "someone/tiny-part") -> Path:
    assert push.main(["--checkpoint", str(checkpoint), "--repo", repo, "--dry-run", str(out),
                      "--base-model", BASE_MODEL, *extra]) == 0
    return out


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- dry run and the card


def test_dry_run_writes_the_upload_folder_with_a_parseable_card(compressor_run, tmp_path):
    out = dry_run(compressor_run.run_dir, tmp_path / "out")  # a run's log dir: its export folder is pushed
    assert {p.name for p in out.iterdir()} == UPLOAD_FILES

    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "llm-trm" and data["license"] == "apache-2.0"
    assert data["base_model"] == BASE_MODEL
    assert {"llm-trm", "dimension-compressor"} <= set(data["tags"])
    assert "datasets" not in data  # trained on a local text file: no Hub dataset to name

    for tag in ("val/cosine", "baseline/pca_cosine", "val/explained_variance", "baseline/pca_explained_variance"):
        assert f"{compressor_run.metrics[tag]:.4f}" in card.text, tag  # the run's held-out metrics and baseline
    assert "PCA, same rank" in card.text
    assert "llm-trm fit --config config.yaml" in card.text
    assert (compressor_run.run_dir / "config.yaml").read_text().strip() in card.text
    assert 'DimensionCompressor.from_pretrained("someone/tiny-part")' in card.text

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dimension_compressor" and config["metadata"]["d_compressed"] == 8


def test_trm_card_has_baselines_and_names_its_compressor_on_the_hub(trm_run, tmp_path):
    with pytest.raises(ModelCardError, match="compressor recorded .* is not a Hub id.*--compressor-repo") as err:
        dry_run(trm_run.export, tmp_path / "no")  # trained with a local compressor checkpoint
    one_line(err)
    out = dry_run(trm_run.export, tmp_path / "trm", "--compressor-repo", "someone/compressor")  # export folder
    assert json.loads((out / "config.json").read_text())["metadata"]["compressor"] == "someone/compressor"
    card = ModelCard.load(out / "README.md")
    assert {"sequence-trm", "tiny-recursive-model"} <= set(card.data.tags)
    assert card.data.base_model == BASE_MODEL
    assert "ridge on pooled prompt" in card.text and "Full space (D)" in card.text
    assert json.loads((out / "config.json").read_text())["model_type"] == "sequence_trm"


def test_trm_card_reports_the_uploaded_weights_from_metrics_json(trm_run, tmp_path):
    out = dry_run(trm_run.export, tmp_path / "trm", "--compressor-repo", "someone/compressor")
    card = ModelCard.load(out / "README.md").text
    metrics = json.loads((trm_run.export / "metrics.json").read_text())
    sections = card.split("### ")
    for split, label in (("val", "Validation split (selection)"), ("test", "Test split (report)")):
        reported = metrics["splits"][split]
        compressed = next(s for s in sections if s.startswith(f"{label}, {reported['num_samples']} samples: Compressed"))
        rows = {line.split(" | ")[0].lstrip("| "): line for line in compressed.splitlines() if line.startswith("| ")}
        model, baselines = reported["model"], reported["baselines"]
        assert rows["cosine"] == (f"| cosine | {model['cosine']:.4f} | {baselines['mean_cosine']:.4f} | "
                                  f"{baselines['ridge_cosine']:.4f} | {baselines['last_token_cosine']:.4f} |")
        assert f"| explained variance (R²) | {model['explained_variance']:.4f} |" in compressed
        assert f"supervision steps used: {model['steps_used']:.4f}" in card
    assert metrics["splits"]["test"]["model"]["cosine"] != metrics["splits"]["val"]["model"]["cosine"]
    # it names the weights it uploads, and how they were chosen
    selection = metrics["selection"]
    assert f"`trm.safetensors` sha256 `{metrics['weights_sha256']['trm.safetensors'][:16]}" in card
    assert (f"epoch {selection['epoch']} (step {selection['global_step']}), selected as the best val/loss "
            f"(min = {selection['score']:.4f}) on the val split") in card
    assert "exponential moving average" in card


def test_push_refuses_nonfinite_weights(trm_run, hub, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(trm_run.export, broken)
    weights = load_file(str(broken / "trm.safetensors"))
    weights["target_scale"][0] = float("nan")
    save_file(weights, str(broken / "trm.safetensors"), metadata={"format": "pt"})
    args = ["push", "--checkpoint", str(broken), "--repo", "u/t", "--run-dir", str(trm_run.run_dir),
            "--compressor-repo", "someone/compressor", "--base-model", BASE_MODEL]
    for extra in (["--dry-run", str(tmp_path / "out")], []):
        with pytest.raises(NonFiniteWeightsError, match="holds NaN/inf values in target_scale") as err:
            main(args + extra)
        one_line(err)
        assert capsys.readouterr().err.count("\n") == 1  # `llm-trm: error: ...`, no traceback
    assert not (tmp_path / "out").exists() and hub == []  # nothing written, the Hub never asked


def test_push_refuses_metrics_of_other_weights(trm_run, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(trm_run.export, changed)
    weights = load_file(str(changed / "trm.safetensors"))
    weights["reasoning_token"] += 1.0
    save_file(weights, str(changed / "trm.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelCardError, match="metrics.json was computed from other weights") as err:
        dry_run(changed, tmp_path / "out", "--run-dir", str(trm_run.run_dir), "--compressor-repo", "someone/c")
    one_line(err)
    assert not (tmp_path / "out").exists()


def test_card_reads_the_last_value_of_each_tensorboard_tag(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run_dir = tmp_path / "runs" / "phase1" / "version_0"
    with SummaryWriter(str(run_dir)) as writer:
        for step, (cosine, pca) in enumerate([(0.5, 0.9), (0.75, 0.95)]):
            writer.add_scalar("val/cosine", cosine, step)
            writer.add_scalar("baseline/pca_cosine", pca, step)
    (run_dir / "config.yaml").write_text("model:\n  init_args: {backbone: embedded}\ndata:\n"
                                         "  init_args: {source: HuggingFaceFW/fineweb-edu}\n")
    DimensionCompressor(16, 4).save_pretrained(run_dir / "compressor", metadata={"backbone": "embedded", "layer": -1})

    assert read_scalars(run_dir) == {"val/cosine": 0.75, "baseline/pca_cosine": pytest.approx(0.95)}
    out = tmp_path / "o"
    assert push.main(["--checkpoint", str(run_dir / "compressor"), "--repo", "u/c", "--dry-run", str(out)]) == 0
    card = ModelCard.load(tmp_path / "o" / "README.md")
    assert card.data.base_model == EMBEDDED_BACKBONE_HUB_ID  # `embedded` is SmolLM2-135M-Instruct
    assert card.data.datasets == ["HuggingFaceFW/fineweb-edu"]
    assert "| cosine | 0.7500 | 0.9500 |" in card.text


def test_card_fields_that_cannot_be_filled_are_clear_errors(compressor_run, tmp_path):
    with pytest.raises(ModelCardError, match="is not a Hub model id.*--base-model") as err:  # a local backbone
        push.main(["--checkpoint", str(compressor_run.export), "--repo", "u/c", "--dry-run", str(tmp_path / "a")])
    one_line(err)
    assert not (tmp_path / "a").exists()  # nothing written

    bare = tmp_path / "bare"  # an export folder outside any run: no metrics, no config
    DimensionCompressor(16, 4).save_pretrained(bare / "compressor", metadata={"backbone": "embedded", "layer": -1})
    with pytest.raises(ModelCardError, match="--run-dir"):
        dry_run(bare / "compressor", tmp_path / "b")

    no_events = tmp_path / "no_events"
    no_events.mkdir()
    (no_events / "config.yaml").write_text("model: {}\n")
    with pytest.raises(ModelCardError, match="val/cosine, baseline/pca_cosine"):
        dry_run(bare / "compressor", tmp_path / "c", "--run-dir", str(no_events))

    assert base_model_id("/cache/models--HuggingFaceTB--SmolLM3-3B/snapshots/abc") == BASE_MODEL
    with pytest.raises(push.PushError, match="--compressor-repo does not apply to a compressor"):
        dry_run(compressor_run.export, tmp_path / "d", "--compressor-repo", "u/c")


def test_card_datasets_are_hub_ids_of_the_training_data(tmp_path):
    (tmp_path / "datagen_config.json").write_text(json.dumps({"datasets": ["gsm8k", "jsonl:/x.jsonl", "mbpp"]}))
    assert dataset_ids({"data": {"init_args": {"data_path": str(tmp_path)}}}) == [
        "openai/gsm8k", "google-research-datasets/mbpp"]
    assert dataset_ids({"data": {"init_args": {"source": "openai/gsm8k"}}}) == ["openai/gsm8k"]
    assert dataset_ids({"data": {"init_args": {"source": "embedded"}}}) == []
    assert dataset_ids({"data": {"init_args": {"source": str(tmp_path)}}}) == []  # a local folder


# --------------------------------------------------------------------------- pushing, with the Hub client replaced


def test_push_uploads_exactly_the_dry_run_folder(compressor_run, hub, tmp_path):
    expected = dry_run(compressor_run.last, tmp_path / "dry", repo="someone/compressor")  # from a .ckpt
    assert main(["push", "--checkpoint", str(compressor_run.last), "--repo", "someone/compressor", "--private",
                 "--revision", "v1", "--commit-message", "first", "--base-model", BASE_MODEL]) == 0

    (api,) = hub
    assert api.token == "hf_test_token"
    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": "someone/compressor", "private": True, "exist_ok": True}
    assert api.calls[1][1] == {"repo_id": "someone/compressor", "branch": "v1", "exist_ok": True}
    assert api.calls[2][1] == {"repo_id": "someone/compressor", "revision": "v1", "commit_message": "first"}
    assert api.uploaded == {p.name: p.read_bytes() for p in expected.iterdir()}


@pytest.mark.parametrize("repo", ["not a repo", "a/b/c", "user/-bad-", "just-a-name"])
def test_invalid_repo_id_stops_before_anything(compressor_run, hub, repo):
    with pytest.raises(push.PushError, match="--repo") as err:
        push.main(["--checkpoint", str(compressor_run.export), "--repo", repo])
    one_line(err)
    assert hub == []


def test_missing_token_is_a_clear_error(compressor_run, hub, logged_out):
    with pytest.raises(push.PushError, match="no Hugging Face token.*HF_TOKEN") as err:
        push.main(["--checkpoint", str(compressor_run.export), "--repo", "u/c", "--base-model", BASE_MODEL])
    one_line(err)
    assert hub == []


def test_network_failure_is_one_line(compressor_run, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(push, "HfApi", lambda token=None: FakeHfApi(token, ConnectionError("Name or service\nunknown")))
    with pytest.raises(push.PushError, match="could not push to u/c \\(ConnectionError: Name or service\\)") as err:
        push.main(["--checkpoint", str(compressor_run.export), "--repo", "u/c", "--base-model", BASE_MODEL])
    one_line(err)


def test_unknown_kind_is_a_clear_error(hub, tmp_path):
    folder = tmp_path / "mystery"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mystery_model"}))
    with pytest.raises(UnknownArtifactError, match="'mystery_model'.*known: trm \\(sequence_trm\\), compressor"):
        push.main(["--checkpoint", str(folder), "--repo", "u/m"])
    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2, 2)}}, ckpt)
    with pytest.raises(UnknownArtifactError, match="holds no trained part llm-trm knows"):
        push.main(["--checkpoint", str(ckpt), "--repo", "u/m"])
    with pytest.raises(push.PushError, match="not an export folder"):
        push.main(["--checkpoint", str(tmp_path), "--repo", "u/m"])
    assert hub == []


# --------------------------------------------------------------------------- loading from anywhere


def test_from_pretrained_round_trip_from_the_pushed_folder(compressor_run, trm_run, tmp_path):
    folder = dry_run(compressor_run.export, tmp_path / "c")
    loaded = DimensionCompressor.from_pretrained(folder)  # model.safetensors, as on the Hub
    exported = DimensionCompressor.from_pretrained(compressor_run.export)
    assert torch.equal(loaded.weight, exported.weight) and loaded.metadata == exported.metadata

    folder = dry_run(trm_run.export, tmp_path / "t", "--compressor-repo", "someone/compressor")
    trm = SequenceTRM.from_pretrained(folder)
    assert trm.config() == SequenceTRM.from_pretrained(trm_run.export).config()
    exported = load_file(str(trm_run.export / "trm.safetensors"))
    assert all(torch.equal(value, exported[key]) for key, value in trm.state_dict().items())


def test_load_from_lightning_checkpoints(compressor_run, trm_run):
    compressor = load_compressor(compressor_run.last)
    assert torch.equal(compressor.weight, load_torch_checkpoint(compressor_run.last)["state_dict"]["compressor.weight"])
    assert compressor.metadata["d_compressed"] == 8 and compressor.metadata["layer"] == -1

    trm = load_trm(trm_run.best)  # the EMA weights, as the export of that checkpoint holds them
    exported = SequenceTRM.from_pretrained(trm_run.export)
    assert trm.config() == exported.config()
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in trm.state_dict().items())
    assert trm.metadata["weights"] == "ema" and "architecture" not in trm.metadata
    # the TRM checkpoint also carries its frozen compressor, and the compressor checkpoint it came from
    assert torch.equal(load_compressor(trm_run.best).weight, compressor.weight)
    assert detect_kind(trm_run.best).name == "trm" and detect_kind(compressor_run.last).name == "compressor"

    with pytest.raises(ConfigMismatchError, match="holds no trm"):
        load_trm(compressor_run.last)


def test_hub_ids_fail_clearly_offline():
    with pytest.raises(OSError, match="could not fetch 'anonx3247/llm-trm-compressor'"):
        load_compressor("anonx3247/llm-trm-compressor")
