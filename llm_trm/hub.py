"""Load trained parts from wherever a user points: an export folder, a Hub id, or a Lightning checkpoint.

Entry points: `load_compressor(spec)`, `load_trm(spec)` and `load_artifact(spec)` (any
kind, detected). They accept all three sources, and every config key that names a
trained part (`compressor_checkpoint`, `init_from`, ...) goes through them.
`DimensionCompressor.from_pretrained` / `SequenceTRM.from_pretrained` take an export
folder or a Hub id: models know nothing of Lightning checkpoints.

Every checkpoint llm-trm reads goes through `load_torch_checkpoint`: local path, http(s)
URL or any fsspec URL, always `torch.load(..., weights_only=True)`, so a checkpoint is
never unpickled into code; a file that is not tensors and plain values is one line.
A Lightning checkpoint is read without instantiating its LightningModule: the weights
are found by a documented key prefix in its `state_dict` (see `ARTIFACT_KINDS`), the
model's constructor arguments come from the weights' shapes or from
`checkpoint["llm_trm"]["architecture"]`, and `checkpoint["llm_trm"]` (`METADATA_KEY`)
becomes the model's metadata (D, D', backbone id, layer, ...).

Every artifact must record what it was trained against (`IDENTITY_KEYS`); one that does
not is refused unless the caller accepts unchecked artifacts (`allow_unchecked=True`,
the `allow_unchecked_artifacts` option of the modules and `llm-trm evaluate`).
`check_compatible` turns a mismatch into one line naming both values.
"""

from __future__ import annotations

import inspect
import json
import pickle
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llm_trm.errors import (ArtifactNotFoundError, ConfigMismatchError, LLMTRMError, UncheckedArtifactError,
                            UnreadableCheckpointError)
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.pretrained import CONFIG_NAME
from llm_trm.models.trm import SequenceTRM

METADATA_KEY = "llm_trm"  # where LightningModules put artifact metadata in their checkpoints
ARCHITECTURE_KEY = "architecture"  # constructor arguments, inside the metadata, where shapes do not tell them
# what an artifact must record (in its config or metadata) for a run to check that it fits
IDENTITY_KEYS = ("backbone", "layer", "d_model", "d_compressed")


class UnknownArtifactError(LLMTRMError, ValueError):
    """The path holds no trained part that llm-trm knows."""


StateDict = dict[str, Tensor]
ConstructorArgs = Callable[[StateDict, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class ArtifactKind:
    """One kind of trained part: where its LightningModule keeps it and how to rebuild it.

    Attributes:
        name: what users call it (`compressor`, `trm`).
        model_class: the pure-torch model (a `PretrainedMixin`).
        weight_prefixes: `state_dict` prefixes of its weights in a Lightning checkpoint, preferred
            first (e.g. the EMA copy before the raw weights).
        constructor_args: (weights without prefix, checkpoint metadata) -> model constructor arguments.
    """

    name: str
    model_class: type[nn.Module]
    weight_prefixes: tuple[str, ...]
    constructor_args: ConstructorArgs

    @property
    def model_type(self) -> str:
        return self.model_class.model_type  # type: ignore[attr-defined]

    def weight_prefix_in(self, state_dict: StateDict) -> str | None:
        return next((p for p in self.weight_prefixes if any(k.startswith(p) for k in state_dict)), None)


def _compressor_args(weights: StateDict, metadata: dict[str, Any]) -> dict[str, Any]:
    d_compressed, d_model = weights["weight"].shape
    return {"d_model": int(d_model), "d_compressed": int(d_compressed)}


def _trm_args(weights: StateDict, metadata: dict[str, Any]) -> dict[str, Any]:
    architecture = metadata.get(ARCHITECTURE_KEY)
    if not architecture:
        raise ConfigMismatchError(
            f"the checkpoint records no TRM architecture (checkpoint['{METADATA_KEY}']['{ARCHITECTURE_KEY}']): "
            "it was not written by llm-trm's TRMModule; load its export folder instead."
        )
    return dict(architecture)


# Checked in this order, so the most specific comes first: a TRM checkpoint also holds the
# frozen compressor it was trained against. A new kind (e.g. Phase 3) is one entry here.
ARTIFACT_KINDS: dict[str, ArtifactKind] = {
    kind.name: kind
    for kind in (
        # TRMModule keeps the EMA (used for validation and export) under `ema.module.`, the raw TRM under `trm.`
        ArtifactKind("trm", SequenceTRM, ("ema.module.", "trm."), _trm_args),
        # CompressorModule keeps only `compressor.weight`
        ArtifactKind("compressor", DimensionCompressor, ("compressor.",), _compressor_args),
    )
}


def known_kinds() -> str:
    return ", ".join(f"{k.name} ({k.model_type})" for k in ARTIFACT_KINDS.values())


def is_lightning_checkpoint(spec: str | Path) -> bool:
    return str(spec).endswith(".ckpt")


def is_remote(spec: str | Path) -> bool:
    """A URL (http://, s3://, gs://, ...) rather than a local path."""
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", str(spec)) is not None


def strip_prefix(state_dict: StateDict, prefix: str) -> StateDict:
    """The entries under `prefix`, with the prefix removed (a part's weights inside a module's state dict)."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------- reading checkpoints


def fetch_checkpoint(spec: str | Path, directory: str | Path) -> Path:
    """A local copy of a checkpoint: a local path as is; an http(s) or fsspec URL downloaded into `directory`.

    Nothing is unpickled here; read the copy with `load_torch_checkpoint`.
    """
    if not is_remote(spec):
        return _existing_file(spec)
    url = str(spec)
    target = Path(directory) / (Path(url.split("?")[0].rstrip("/")).name or "checkpoint.ckpt")
    try:
        if url.startswith(("http://", "https://")):
            torch.hub.download_url_to_file(url, str(target), progress=False)
        else:
            import fsspec

            fs, path = fsspec.core.url_to_fs(url)
            fs.get_file(path, str(target))
    except (OSError, ValueError, ImportError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ArtifactNotFoundError(
            f"could not download checkpoint {url} ({type(err).__name__}: {reason}): "
            "check the URL, or download the file yourself and pass its local path."
        ) from err
    return target


def load_torch_checkpoint(spec: str | Path, source: str | None = None) -> dict[str, Any]:
    """A Lightning / `.pt` checkpoint from a local path, an http(s) URL or an fsspec URL, read as weights only.

    `torch.load(..., weights_only=True)` always: tensors, numbers, strings and containers come
    back, and a file holding anything else (pickled objects, code) is refused in one line.
    `source` names the checkpoint in that line (e.g. the URL a local copy came from).
    """
    if not is_remote(spec):
        return _read_weights_only(_existing_file(spec), source or str(spec))
    with tempfile.TemporaryDirectory(prefix="llm-trm-ckpt-") as directory:
        return _read_weights_only(fetch_checkpoint(spec, directory), source or str(spec))


def _existing_file(spec: str | Path) -> Path:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ArtifactNotFoundError(f"checkpoint {spec} does not exist: check the path.")
    return path


def _read_weights_only(path: Path, source: str) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        raise UnreadableCheckpointError(
            f"{source} is not a checkpoint llm-trm can read: {_unreadable_reason(err)}. llm-trm reads checkpoints "
            "as tensors and plain values only and never runs code from one: pass a checkpoint written by an "
            "llm-trm training run (runs/<name>/version_N/checkpoints/*.ckpt)."
        ) from None
    if not isinstance(checkpoint, dict):
        raise UnreadableCheckpointError(
            f"{source} holds a {type(checkpoint).__name__}, not a checkpoint dictionary: "
            "pass a checkpoint written by an llm-trm training run."
        )
    return checkpoint


def _unreadable_reason(err: BaseException) -> str:
    """Why torch refused a file, in a few words (torch's own message suggests unpickling it: never)."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if found:
        return f"it holds pickled objects ({found.group(1)}), not only tensors"
    if isinstance(err, EOFError):
        return "the file is empty or truncated"
    if "zip archive" in str(err) or "central directory" in str(err):
        return "the file is truncated or corrupt"
    return "it is not a torch checkpoint (corrupt, or another format)"


# ---------------------------------------------------------------------------- detection


def detect_kind(spec: str | Path) -> ArtifactKind:
    """The kind of a local export folder (its config.json's model_type) or Lightning checkpoint (its keys)."""
    if is_lightning_checkpoint(spec):
        return _checkpoint_kind(spec, load_torch_checkpoint(spec).get("state_dict", {}))
    path = Path(spec).expanduser()
    config = path / CONFIG_NAME
    if not config.is_file():
        raise UnknownArtifactError(f"{spec} is neither an export folder (no {CONFIG_NAME}) nor a .ckpt file.")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (ValueError, AttributeError) as err:
        raise UnknownArtifactError(f"{config} is not a JSON object ({err}): re-export the folder.") from None
    for kind in ARTIFACT_KINDS.values():
        if kind.model_type == model_type:
            return kind
    raise UnknownArtifactError(
        f"{spec} holds a model of type {model_type!r}, which llm-trm cannot load or push; known: {known_kinds()}."
    )


def _checkpoint_kind(path: str | Path, state_dict: StateDict) -> ArtifactKind:
    for kind in ARTIFACT_KINDS.values():
        if kind.weight_prefix_in(state_dict):
            return kind
    raise UnknownArtifactError(
        f"{path} holds no trained part llm-trm knows (its weights start with none of "
        f"{[p for k in ARTIFACT_KINDS.values() for p in k.weight_prefixes]}); known kinds: {known_kinds()}."
    )


# ---------------------------------------------------------------------------- loading


def load_from_lightning_checkpoint(kind: ArtifactKind, path: str | Path) -> nn.Module:
    """Rebuild `kind`'s model from a Lightning checkpoint (local or URL), without its LightningModule."""
    checkpoint = load_torch_checkpoint(path)
    state_dict = checkpoint.get("state_dict", {})
    prefix = kind.weight_prefix_in(state_dict)
    if prefix is None:
        first = kind.weight_prefixes[-1]
        raise ConfigMismatchError(
            f"{path} holds no {kind.name} (no '{first}*' weights, e.g. '{first}weight'): "
            f"pass a checkpoint of a run that trains a {kind.name}."
        )
    weights = strip_prefix(state_dict, prefix)
    metadata = dict(checkpoint.get(METADATA_KEY, {}))
    model = kind.model_class(**_known_args(kind.model_class, kind.constructor_args(weights, metadata)))
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ConfigMismatchError(
            f"{path}: its {kind.name} weights do not fit the architecture it records "
            f"({_first_detail(err)}): pass a checkpoint written by llm-trm."
        ) from None
    metadata.pop(ARCHITECTURE_KEY, None)  # now the model's own config
    model.metadata = metadata
    return model


def _first_detail(err: BaseException) -> str:
    """The first specific line of torch's load_state_dict error (its first line only names the class)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else (lines or [type(err).__name__])[0]


def _known_args(model_class: type, args: dict[str, Any]) -> dict[str, Any]:
    """Drop recorded arguments the constructor does not take (a newer writer may record more)."""
    accepted = inspect.signature(model_class.__init__).parameters
    return {name: value for name, value in args.items() if name in accepted}


def load_artifact(spec: str | Path, kind: str | None = None, revision: str | None = None, *,
                  allow_unchecked: bool = False) -> tuple[ArtifactKind, nn.Module]:
    """A trained part from an export folder, a Hub id (kind required) or a Lightning `.ckpt`; and its kind.

    The part must record what it was trained against (`IDENTITY_KEYS`); with `allow_unchecked`
    one that does not is used anyway, with a warning.
    """
    if kind is None:
        artifact_kind = detect_kind(spec)
    elif kind in ARTIFACT_KINDS:
        artifact_kind = ARTIFACT_KINDS[kind]
    else:
        raise UnknownArtifactError(f"unknown kind {kind!r}; known: {known_kinds()}.")
    if is_lightning_checkpoint(spec):
        model = load_from_lightning_checkpoint(artifact_kind, spec)
    else:
        model_class: Any = artifact_kind.model_class  # a PretrainedMixin
        model = model_class.from_pretrained(spec, revision=revision)
    require_identity(f"{artifact_kind.name} {spec}", model, allow_unchecked)
    return artifact_kind, model


def load_compressor(spec: str | Path, revision: str | None = None, *,
                    allow_unchecked: bool = False) -> DimensionCompressor:
    """A DimensionCompressor from an export folder, a Hub id, or a Lightning `.ckpt` (Phase 1 or 2)."""
    return load_artifact(spec, "compressor", revision, allow_unchecked=allow_unchecked)[1]  # type: ignore[return-value]


def load_trm(spec: str | Path, revision: str | None = None, *, allow_unchecked: bool = False) -> SequenceTRM:
    """A SequenceTRM from an export folder, a Hub id, or a Phase 2 Lightning `.ckpt` (its EMA weights when kept)."""
    return load_artifact(spec, "trm", revision, allow_unchecked=allow_unchecked)[1]  # type: ignore[return-value]


# ---------------------------------------------------------------------------- what an artifact fits


def artifact_identity(model: nn.Module) -> dict[str, Any]:
    """What `model` was trained against: its metadata, with D / D' from its own shape where it has them."""
    identity = dict(getattr(model, "metadata", {}) or {})
    for key in ("d_model", "d_compressed"):
        if isinstance(getattr(model, key, None), int):
            identity[key] = getattr(model, key)
    return identity


def require_identity(source: str, model: nn.Module, allow_unchecked: bool = False) -> None:
    """Refuse (one line) an artifact that does not record all of `IDENTITY_KEYS`, unless `allow_unchecked`."""
    identity = artifact_identity(model)
    missing = [key for key in IDENTITY_KEYS if identity.get(key) is None]
    if not missing:
        return
    if not allow_unchecked:
        raise UncheckedArtifactError(
            f"{source} does not record {', '.join(missing)}, so llm-trm cannot check that it fits this run: "
            "use an artifact exported by llm-trm (which records them), or accept it unchecked "
            "(model option allow_unchecked_artifacts: true; llm-trm evaluate --allow_unchecked_artifacts true)."
        )
    warnings.warn(f"{source} does not record {', '.join(missing)}: used unchecked (allow_unchecked_artifacts).",
                  stacklevel=3)


def check_compatible(source: str, found: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise one line for the first key whose recorded value differs from the configured one.

    A key the artifact does not record is skipped: loading (`require_identity`) already refused
    artifacts without identity, unless the user accepted them unchecked.
    """
    for key, want in expected.items():
        have = found.get(key)
        if have is not None and want is not None and have != want:
            raise ConfigMismatchError(
                f"{source} was made with {key}={have!r} but this run has {key}={want!r}: "
                f"use a matching {key} or another checkpoint."
            )
