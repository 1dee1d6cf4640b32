"""Save / load small models as `<weights>.safetensors` + `config.json` (Hugging Face style).

Pure torch + safetensors + huggingface_hub: no Lightning, no data. A model class
mixes in `PretrainedMixin`, names its `model_type` and `weights_name`, and returns
its constructor arguments from `config()`. Metadata that is not a constructor
argument (backbone id, layer, ...) travels in `config.json` under `"metadata"`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llm_trm.errors import ArtifactNotFoundError, ConfigMismatchError
from llm_trm.files import atomic_write_text

CONFIG_NAME = "config.json"
FALLBACK_WEIGHTS_NAME = "model.safetensors"


class PretrainedMixin:
    model_type: str = ""
    weights_name: str = FALLBACK_WEIGHTS_NAME

    # set by from_pretrained / by the training module before export
    metadata: dict[str, Any]

    def config(self) -> dict[str, Any]:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def save_pretrained(self, directory: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
        """Write weights and config into `directory` (created if needed); return it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {**getattr(self, "metadata", {}), **(metadata or {})}
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}  # type: ignore[attr-defined]
        save_file(state, str(directory / self.weights_name), metadata={"format": "pt"})
        payload = {"model_type": self.model_type, **self.config(), "metadata": meta}
        atomic_write_text(directory / CONFIG_NAME, json.dumps(payload, indent=2, sort_keys=True))
        return directory

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, revision: str | None = None, **overrides: Any):
        """Load from a local export folder, a Hugging Face Hub repo id, or a Lightning `.ckpt`."""
        if Path(path_or_hub_id).suffix == ".ckpt":
            # imported here: hub knows where each LightningModule keeps its weights (read with
            # weights_only=True, no Lightning import), and it imports the model classes itself
            from llm_trm import hub

            kind = next(k for k in hub.ARTIFACT_KINDS.values() if k.model_class is cls)
            return hub.load_from_lightning_checkpoint(kind, path_or_hub_id)
        folder = resolve_pretrained_folder(path_or_hub_id, cls.weights_name, revision)
        payload = json.loads((folder / CONFIG_NAME).read_text())
        if payload.get("model_type") != cls.model_type:
            raise ConfigMismatchError(
                f"{path_or_hub_id} holds a '{payload.get('model_type')}', not a '{cls.model_type}': "
                f"point {cls.__name__}.from_pretrained at a {cls.model_type} export."
            )
        meta = payload.pop("metadata", {})
        payload.pop("model_type")
        model = cls(**{**payload, **overrides})  # type: ignore[call-arg]
        weights = folder / cls.weights_name
        if not weights.exists():
            weights = folder / FALLBACK_WEIGHTS_NAME
        model.load_state_dict(load_file(str(weights)))  # type: ignore[attr-defined]
        model.metadata = meta
        return model


def resolve_pretrained_folder(path_or_hub_id: str | os.PathLike, weights_name: str, revision: str | None = None) -> Path:
    """A local folder as is; otherwise download config + weights from the Hub into the HF cache."""
    local = Path(path_or_hub_id).expanduser()
    if local.is_dir():
        if not (local / CONFIG_NAME).exists():
            raise ArtifactNotFoundError(f"{local} has no {CONFIG_NAME}: it is not an llm-trm export folder.")
        return local
    spec = str(path_or_hub_id)
    if local.suffix or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ArtifactNotFoundError(
            f"{spec} is neither an existing export folder nor a Hub repo id (user/name): check the path."
        )
    from huggingface_hub import hf_hub_download

    try:
        config_path = hf_hub_download(spec, CONFIG_NAME, revision=revision)
        try:
            hf_hub_download(spec, weights_name, revision=revision)
        except Exception:  # older exports use the generic weights name
            hf_hub_download(spec, FALLBACK_WEIGHTS_NAME, revision=revision)
    except Exception as err:  # network, auth, missing repo: one clear line
        raise ArtifactNotFoundError(
            f"could not fetch '{spec}' from the Hugging Face Hub ({type(err).__name__}); "
            "check the repo id and your network, or pass a local export folder."
        ) from err
    return Path(config_path).parent


def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a Lightning/.pt checkpoint safely (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)
