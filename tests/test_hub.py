"""Saving / loading the small models through huggingface_hub's mixin, the folder layouts old and new,
reading checkpoints from local paths and URLs, and the direction of imports. No network: URLs are a
loopback HTTP server or fsspec's in-memory filesystem."""

from __future__ import annotations

import ast
import functools
import http.server
import json
import threading
import warnings
from pathlib import Path

import fsspec
import pytest
import torch
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import save_file

from llm_trm.errors import ArtifactNotFoundError, ConfigMismatchError, UncheckedArtifactError, UnreadableCheckpointError
from llm_trm.hub import (IDENTITY_KEYS, detect_kind, load_artifact, load_compressor, load_torch_checkpoint,
                         load_trm)
from llm_trm.models.adapter import LatentAdapter, LinearAdapter, NormMatchAdapter
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.pretrained import PretrainedMixin
from llm_trm.models.trm import SequenceTRM

PACKAGE = Path(__file__).resolve().parents[1] / "llm_trm"
IDENTITY = {"backbone": "org/llm", "layer": -1}
TINY_TRM = dict(n_layers=1, n_heads=2, n_latent_steps=1, n_deep_recursions=1, n_supervision_steps=2)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


class PickledPayload:
    """Unpickling this creates `marker`: what a malicious checkpoint would do with code instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def write_malicious_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"compressor.weight": torch.zeros(4, 16)}, "payload": PickledPayload(marker)}, path)
    return path


def write_compressor_checkpoint(path: Path, weight: torch.Tensor, metadata: dict | None = None) -> Path:
    """What CompressorModule writes: the weights under `compressor.` and the metadata under `llm_trm`."""
    d_compressed, d_model = weight.shape
    meta = {"d_model": d_model, "d_compressed": d_compressed, **IDENTITY} if metadata is None else metadata
    torch.save({"state_dict": {"compressor.weight": weight}, "llm_trm": meta, "global_step": 3}, path)
    return path


@pytest.fixture
def served(tmp_path):
    """A loopback HTTP server over tmp_path/www; yields (folder, base URL)."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None  # type: ignore[assignment]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


# ---------------------------------------------------------------------------- the mixin and the layout


def test_models_save_and_load_through_huggingface_hubs_mixin(tmp_path):
    assert issubclass(PretrainedMixin, PyTorchModelHubMixin)
    torch.manual_seed(0)
    compressor = DimensionCompressor(16, 4)
    compressor.metadata = dict(IDENTITY)
    folder = compressor.save_pretrained(tmp_path / "c", {"stage": "1a"})
    assert folder == tmp_path / "c"
    assert {p.name for p in folder.iterdir()} == {"config.json", "compressor.safetensors", "README.md"}
    config = json.loads((folder / "config.json").read_text())
    assert config == {"model_type": "dimension_compressor", "d_model": 16, "d_compressed": 4,
                      "metadata": {**IDENTITY, "stage": "1a"}}
    loaded = DimensionCompressor.from_pretrained(folder)
    assert torch.equal(loaded.weight, compressor.weight) and loaded.metadata == {**IDENTITY, "stage": "1a"}
    assert "llm-trm" in (folder / "README.md").read_text()


def test_normalisation_statistics_travel_in_the_weights(tmp_path):
    trm = SequenceTRM(8, **TINY_TRM)
    trm.set_normalization(torch.full((8,), 5.0), 2.0, torch.arange(8.0), torch.full((8,), 0.5))
    trm.save_pretrained(tmp_path / "t", {"d_model": 16, **IDENTITY})
    loaded = SequenceTRM.from_pretrained(tmp_path / "t", n_supervision_steps=5)  # an override wins
    assert loaded.n_supervision_steps == 5 and loaded.n_layers == 1
    assert torch.equal(loaded.input_mean, torch.full((8,), 5.0)) and float(loaded.input_scale) == 2.0
    assert torch.equal(loaded.target_mean, torch.arange(8.0)) and bool(loaded.normalization_fitted)


def test_push_to_hub_uploads_the_same_folder(tmp_path, monkeypatch):
    uploads = []

    class FakeApi:  # stands in for huggingface_hub.HfApi inside the mixin: no network
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploads.append((repo_id, {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}))
            return "https://huggingface.co/" + repo_id

    monkeypatch.setattr("huggingface_hub.hub_mixin.HfApi", FakeApi)
    compressor = DimensionCompressor(16, 4)
    compressor.push_to_hub("someone/compressor", model_card_kwargs={})
    ((repo, files),) = uploads
    assert repo == "someone/compressor" and set(files) == {"config.json", "compressor.safetensors", "README.md"}
    assert json.loads(files["config.json"])["model_type"] == "dimension_compressor"


def test_a_folder_in_the_old_layout_still_loads(tmp_path):
    # written by hand exactly as llm-trm's own writer did before the mixin: no README, sorted keys
    folder = tmp_path / "old"
    folder.mkdir()
    weight = torch.randn(4, 16)
    save_file({"weight": weight}, str(folder / "compressor.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(
        {"d_compressed": 4, "d_model": 16, "metadata": IDENTITY, "model_type": "dimension_compressor"}, indent=2))
    loaded = load_compressor(folder)
    assert torch.equal(loaded.weight, weight) and loaded.metadata == IDENTITY
    assert detect_kind(folder).name == "compressor"


def test_a_pushed_folder_with_model_safetensors_loads(tmp_path):
    trm = SequenceTRM(8, **TINY_TRM)
    folder = trm.save_pretrained(tmp_path / "t", {"d_model": 16, **IDENTITY})
    (folder / "trm.safetensors").rename(folder / "model.safetensors")  # what `llm-trm push` uploads
    loaded = load_trm(folder)
    assert torch.equal(loaded.halt_head.bias, trm.halt_head.bias)


def test_adapters_come_back_as_the_kind_their_folder_records(tmp_path):
    NormMatchAdapter(8, n_vectors=3, target_norm=2.5).save_pretrained(tmp_path / "n")
    linear = LinearAdapter(8, 6, n_vectors=2)
    linear.save_pretrained(tmp_path / "l")
    assert type(LatentAdapter.from_pretrained(tmp_path / "n")) is NormMatchAdapter
    loaded = LatentAdapter.from_pretrained(tmp_path / "l")
    assert type(loaded) is LinearAdapter and torch.equal(loaded.proj.weight, linear.proj.weight)
    with pytest.raises(ConfigMismatchError, match="holds a NormMatchAdapter, not a LinearAdapter") as err:
        LinearAdapter.from_pretrained(tmp_path / "n")
    one_line(err)


def test_config_that_does_not_match_its_weights_is_one_line(tmp_path):
    folder = DimensionCompressor(16, 4).save_pretrained(tmp_path / "c", IDENTITY)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "d_compressed": 8}))
    with pytest.raises(ConfigMismatchError) as err:
        load_compressor(folder)
    message = one_line(err)
    assert "config.json does not match compressor.safetensors" in message and "[4, 16]" in message
    assert "[8, 16]" in message

    (folder / "compressor.safetensors").write_bytes(b"\x00" * 64)  # not a safetensors file at all
    with pytest.raises(ConfigMismatchError, match="not a readable safetensors file") as err:
        DimensionCompressor.from_pretrained(folder)
    one_line(err)


def test_other_kinds_missing_files_and_unreachable_hub_ids_are_one_line(tmp_path):
    SequenceTRM(8, **TINY_TRM).save_pretrained(tmp_path / "t")
    with pytest.raises(ConfigMismatchError, match="holds a 'sequence_trm', not a 'dimension_compressor'") as err:
        DimensionCompressor.from_pretrained(tmp_path / "t")
    one_line(err)
    (tmp_path / "t" / "trm.safetensors").unlink()
    with pytest.raises(ArtifactNotFoundError, match="no trm.safetensors") as err:
        SequenceTRM.from_pretrained(tmp_path / "t")
    one_line(err)
    for spec in (tmp_path / "nope", "s3://bucket/export", "a.ckpt"):
        with pytest.raises(ArtifactNotFoundError) as err:
            DimensionCompressor.from_pretrained(spec)
        one_line(err)
    with pytest.raises(ArtifactNotFoundError, match="could not fetch 'someone/compressor'") as err:  # offline
        DimensionCompressor.from_pretrained("someone/compressor")
    one_line(err)


# ---------------------------------------------------------------------------- identity (issue 13.7)


def test_an_artifact_without_identity_is_refused_unless_accepted_unchecked(tmp_path):
    bare = DimensionCompressor(16, 4).save_pretrained(tmp_path / "bare")
    with pytest.raises(UncheckedArtifactError) as err:
        load_compressor(bare)
    message = one_line(err)
    assert str(bare) in message and "backbone, layer" in message and "allow_unchecked_artifacts" in message
    with pytest.warns(UserWarning, match="backbone, layer"):
        assert load_compressor(bare, allow_unchecked=True).d_compressed == 4

    trm = SequenceTRM(4, **TINY_TRM).save_pretrained(tmp_path / "trm", IDENTITY)  # no D
    with pytest.raises(UncheckedArtifactError, match="does not record d_model"):
        load_trm(trm)
    full = SequenceTRM(4, **TINY_TRM).save_pretrained(tmp_path / "full", {**IDENTITY, "d_model": 16})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete artifact loads without a word
        assert load_trm(full).metadata["d_model"] == 16


def test_a_checkpoint_without_identity_is_refused_too(tmp_path):
    ckpt = write_compressor_checkpoint(tmp_path / "c.ckpt", torch.randn(4, 16), metadata={})
    with pytest.raises(UncheckedArtifactError, match="backbone, layer"):
        load_artifact(ckpt)
    kind, model = load_artifact(write_compressor_checkpoint(tmp_path / "ok.ckpt", torch.randn(4, 16)))
    assert kind.name == "compressor" and {k: model.metadata[k] for k in IDENTITY_KEYS}["d_model"] == 16


# ---------------------------------------------------------------------------- checkpoints from anywhere


def test_checkpoints_load_from_a_url_and_an_fsspec_path(tmp_path, served):
    folder, url = served
    weight = torch.randn(4, 16)
    write_compressor_checkpoint(folder / "c.ckpt", weight)
    assert torch.equal(load_compressor(f"{url}/c.ckpt").weight, weight)

    with fsspec.open("memory://llm-trm-test/c.ckpt", "wb") as handle:
        handle.write((folder / "c.ckpt").read_bytes())
    assert torch.equal(load_torch_checkpoint("memory://llm-trm-test/c.ckpt")["state_dict"]["compressor.weight"], weight)


def test_a_pickled_payload_never_runs_whatever_the_path(tmp_path, served):
    folder, url = served
    marker = tmp_path / "payload-ran"
    evil = write_malicious_checkpoint(folder / "evil.ckpt", marker)
    torch.load(evil, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()
    marker.unlink()

    with fsspec.open("memory://llm-trm-test/evil.ckpt", "wb") as handle:
        handle.write(evil.read_bytes())
    for spec in (evil, f"{url}/evil.ckpt", "memory://llm-trm-test/evil.ckpt"):
        with pytest.raises(UnreadableCheckpointError) as err:
            load_compressor(spec)
        message = one_line(err)
        assert str(spec) in message and "pickled objects" in message and "weights_only=False" not in message
    assert not marker.exists()


def test_unreachable_and_corrupt_checkpoints_are_one_line(tmp_path, served):
    folder, url = served
    with pytest.raises(ArtifactNotFoundError, match="could not download") as err:
        load_torch_checkpoint(f"{url}/missing.ckpt")
    one_line(err)
    (folder / "random.ckpt").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    (folder / "empty.ckpt").write_bytes(b"")
    good = write_compressor_checkpoint(folder / "good.ckpt", torch.randn(4, 16))
    (folder / "truncated.ckpt").write_bytes(good.read_bytes()[:500])
    for name, reason in [("random", "not a torch checkpoint"), ("empty", "empty or truncated"),
                         ("truncated", "truncated or corrupt")]:
        with pytest.raises(UnreadableCheckpointError, match=reason) as err:
            load_torch_checkpoint(folder / f"{name}.ckpt")
        assert "weights_only" not in one_line(err)


# ---------------------------------------------------------------------------- imports only go downward


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_imports_only_go_downward():
    for path in sorted((PACKAGE / "models").glob("*.py")):
        ours = {name for name in _imported_modules(path) if name.startswith("llm_trm")}
        assert ours <= {"llm_trm.models.pretrained", "llm_trm.errors", "llm_trm.files"}, (path.name, ours)
    hub_imports = _imported_modules(PACKAGE / "hub.py")
    assert not {"llm_trm.cards", "llm_trm.push", "llm_trm.cli"} & hub_imports
    assert not any(name.startswith(("llm_trm.modules", "llm_trm.inference")) for name in hub_imports)
