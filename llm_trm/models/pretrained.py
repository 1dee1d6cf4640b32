"""Save / load small models as `<weights>.safetensors` + `config.json`, through huggingface_hub's mixin.

`PretrainedMixin` is `huggingface_hub.PyTorchModelHubMixin` plus what the mixin cannot
carry on its own (each kept here, and only here):

- a weights file named per kind (`compressor.safetensors`, `trm.safetensors`,
  `adapter.safetensors`), the layout llm-trm has always written; the mixin's
  `model.safetensors` (what `llm-trm push` uploads) is read as a fallback;
- `config.json` = `model_type` + the constructor arguments (`config()`) + `metadata`
  (backbone id, layer, D, D', ...: what the artifact was trained against), written
  through the mixin's `config=` argument and read back from the config it injects
  into `_from_pretrained`; normalisation statistics are buffers, so they travel
  in the weights;
- `save_pretrained(directory, metadata)` returns the folder, and `from_pretrained`
  checks `model_type`, compares config.json with the weights' shapes, and turns a
  missing folder, an unreachable Hub repo or an unreadable file into one line.

Pure torch + safetensors + huggingface_hub: no Lightning, no checkpoints (a `.ckpt`
is read by `llm_trm.hub`, the only entry for Lightning checkpoints).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, ClassVar

from huggingface_hub import PyTorchModelHubMixin, constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from llm_trm.errors import ArtifactNotFoundError, ConfigMismatchError

CONFIG_NAME = constants.CONFIG_NAME  # config.json
FALLBACK_WEIGHTS_NAME = constants.SAFETENSORS_SINGLE_FILE  # model.safetensors: the mixin's (and the Hub's) name
LIBRARY_NAME = "llm-trm"

# The README.md that `save_pretrained` writes beside the weights (`llm-trm push` replaces it with a full card).
EXPORT_CARD = """---
{{ card_data }}
---

An llm-trm part: `config.json` names its `model_type`, its
constructor arguments and what it was trained against (`metadata`: backbone, layer, D, D').

```python
from llm_trm.hub import load_artifact
kind, model = load_artifact("path/to/this/folder")
```
"""


class PretrainedMixin(PyTorchModelHubMixin, library_name=LIBRARY_NAME, tags=["llm-trm"],
                      model_card_template=EXPORT_CARD):
    """huggingface_hub's PyTorch mixin with llm-trm's folder layout and metadata (see the module docstring)."""

    model_type: ClassVar[str] = ""
    weights_name: ClassVar[str] = FALLBACK_WEIGHTS_NAME

    # what the artifact was trained against; set by from_pretrained / by the training module before export
    metadata: dict[str, Any]

    def config(self) -> dict[str, Any]:  # pragma: no cover - every subclass overrides
        """The constructor arguments that rebuild this model."""
        raise NotImplementedError

    # ---------------------------------------------------------------- save

    def save_pretrained(self, save_directory: str | os.PathLike, metadata: dict[str, Any] | None = None,
                        **kwargs: Any) -> Path:
        """Write weights, config.json and a short README.md into `save_directory` (created if needed); return it.

        `metadata` is merged over `self.metadata`. Other keyword arguments go to the mixin
        (`push_to_hub=True, repo_id=...`, `model_card_kwargs`).
        """
        meta = {**getattr(self, "metadata", {}), **(metadata or {})}
        kwargs.pop("config", None)  # push_to_hub passes its own (None); config.json is always this one
        config = {"model_type": self.model_type, **self.config(), "metadata": meta}
        super().save_pretrained(save_directory, config=config, **kwargs)
        return Path(save_directory)

    def _save_pretrained(self, save_directory: Path) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}  # type: ignore[attr-defined]
        save_file(state, str(save_directory / self.weights_name), metadata={"format": "pt"})

    # ---------------------------------------------------------------- load

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, revision: str | None = None,
                        **kwargs: Any):
        """Load from a local export folder or a Hugging Face Hub repo id (`user/name`).

        Keyword arguments are the mixin's (`revision`, `cache_dir`, `token`, `local_files_only`, ...)
        and constructor overrides. A Lightning `.ckpt` is refused here: `llm_trm.hub.load_artifact`
        reads those.
        """
        spec = str(pretrained_model_name_or_path)
        local = Path(spec).expanduser()
        if local.suffix == ".ckpt":
            raise ArtifactNotFoundError(
                f"{spec} is a Lightning checkpoint: load it with llm_trm.hub.load_artifact / load_compressor / "
                f"load_trm, which read it as weights only, or pass its export folder."
            )
        if local.is_dir():
            if not (local / CONFIG_NAME).is_file():
                raise ArtifactNotFoundError(f"{local} has no {CONFIG_NAME}: it is not an llm-trm export folder.")
            return super().from_pretrained(str(local), revision=revision, **kwargs)
        if local.suffix or spec.startswith((".", "/", "~")) or spec.count("/") != 1 or "://" in spec:
            raise ArtifactNotFoundError(
                f"{spec} is neither an existing export folder nor a Hub repo id (user/name): check the path."
            )
        try:
            return super().from_pretrained(spec, revision=revision, **kwargs)
        except (ArtifactNotFoundError, ConfigMismatchError):
            raise
        except Exception as err:  # network, auth, missing repo or file, offline mode: one clear line
            raise ArtifactNotFoundError(
                f"could not fetch '{spec}' from the Hugging Face Hub ({type(err).__name__}); "
                "check the repo id and your network, or pass a local export folder."
            ) from err

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         config: dict[str, Any] | None = None, **model_kwargs: Any):
        if config is None:
            raise ArtifactNotFoundError(f"{model_id} has no {CONFIG_NAME}: it is not an llm-trm export.")
        target = cls._class_for(model_id, config)
        accepted = inspect.signature(target.__init__).parameters
        # the mixin fills model_kwargs from config.json, plus the caller's overrides (which win)
        init = {k: v for k, v in {**config, **model_kwargs}.items() if k in accepted and k != "self"}
        model = target(**init)
        download = dict(revision=revision, cache_dir=cache_dir, force_download=force_download,
                        token=token, local_files_only=local_files_only)
        load_weights(model, _weights_file(model_id, target.weights_name, download), model_id)
        model.metadata = dict(config.get("metadata") or {})
        return model

    @classmethod
    def _class_for(cls, source: str, config: dict[str, Any]) -> type[PretrainedMixin]:
        """The class that config.json describes; a subclass may pick one of its own subclasses."""
        if config.get("model_type") != cls.model_type:
            raise ConfigMismatchError(
                f"{source} holds a '{config.get('model_type')}', not a '{cls.model_type}': "
                f"point {cls.__name__}.from_pretrained at a {cls.model_type} export."
            )
        return cls


def _weights_file(model_id: str, weights_name: str, download: dict[str, Any]) -> Path:
    """The weights of a local folder or a Hub repo: the kind's own name, else model.safetensors."""
    folder = Path(model_id)
    if folder.is_dir():
        for name in (weights_name, FALLBACK_WEIGHTS_NAME):
            if (folder / name).is_file():
                return folder / name
        raise ArtifactNotFoundError(
            f"{folder} has {CONFIG_NAME} but no {weights_name} (nor {FALLBACK_WEIGHTS_NAME}): re-export it."
        )
    try:
        return Path(hf_hub_download(model_id, weights_name, **download))
    except EntryNotFoundError:  # a pushed folder holds model.safetensors
        return Path(hf_hub_download(model_id, FALLBACK_WEIGHTS_NAME, **download))


def load_weights(model: Any, weights: Path, source: str) -> None:
    """Load a safetensors file into `model`, or say in one line how the file and the config disagree."""
    try:
        state: dict[str, Tensor] = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigMismatchError(
            f"{source}: {weights.name} is not a readable safetensors file ({reason}): re-export the folder."
        ) from err
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    resized = [f"{k} {list(state[k].shape)} (config.json implies {list(expected[k].shape)})"
               for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = ([f"missing {', '.join(missing[:3])}"] if missing else []) + (
        [f"unexpected {', '.join(unexpected[:3])}"] if unexpected else []) + resized[:3]
    if problems:
        raise ConfigMismatchError(
            f"{source}: {CONFIG_NAME} does not match {weights.name} ({'; '.join(problems)}): "
            "the folder is inconsistent; re-export it, or restore the config.json written with these weights."
        )
    model.load_state_dict(state)
