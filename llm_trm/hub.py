"""Load trained parts from wherever a user points: an export folder, a Hub id, or a Lightning checkpoint.

Entry points: `load_compressor(spec)`, `load_trm(spec)` and `load_artifact(spec)` (any
kind, detected). They accept all three sources, and every config key that names a
trained part (`compressor_checkpoint`, `init_from`, ...) goes through them.
`DimensionCompressor.from_pretrained` / `SequenceTRM.from_pretrained` take an export
folder or a Hub id: models know nothing of Lightning checkpoints.

A Lightning checkpoint is read with `weights_only=True` and without instantiating its
LightningModule: the weights are found by a documented key prefix in its `state_dict`
(see `ARTIFACT_KINDS`), the model's constructor arguments come from the weights'
shapes or from `checkpoint["llm_trm"]["architecture"]`, and `checkpoint["llm_trm"]`
(`METADATA_KEY`) becomes the model's metadata (D, D', backbone id, layer, ...).

Every artifact records what it was trained against; `check_compatible` turns a
mismatch into one line naming both values.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from llm_trm.cards import COMPRESSOR_CARD, TRM_CARD, CardTemplate
from llm_trm.errors import ArtifactNotFoundError, ConfigMismatchError, LLMTRMError
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.pretrained import CONFIG_NAME, load_torch_checkpoint
from llm_trm.models.trm import SequenceTRM

METADATA_KEY = "llm_trm"  # where LightningModules put artifact metadata in their checkpoints
ARCHITECTURE_KEY = "architecture"  # constructor arguments, inside the metadata, where shapes do not tell them


class UnknownArtifactError(LLMTRMError, ValueError):
    """The path holds no trained part that llm-trm knows."""


StateDict = dict[str, Tensor]
ConstructorArgs = Callable[[StateDict, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class ArtifactKind:
    """One kind of trained part: where its LightningModule keeps it, how to rebuild it, how to describe it.

    Attributes:
        name: what users call it (`compressor`, `trm`).
        model_class: the pure-torch model (a `PretrainedMixin`).
        weight_prefixes: `state_dict` prefixes of its weights in a Lightning checkpoint, preferred
            first (e.g. the EMA copy before the raw weights).
        constructor_args: (weights without prefix, checkpoint metadata) -> model constructor arguments.
        card: what its model card says and which metrics it tabulates.
    """

    name: str
    model_class: type[nn.Module]
    weight_prefixes: tuple[str, ...]
    constructor_args: ConstructorArgs
    card: CardTemplate

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
        ArtifactKind("trm", SequenceTRM, ("ema.module.", "trm."), _trm_args, TRM_CARD),
        # CompressorModule keeps only `compressor.weight`
        ArtifactKind("compressor", DimensionCompressor, ("compressor.",), _compressor_args, COMPRESSOR_CARD),
    )
}


def known_kinds() -> str:
    return ", ".join(f"{k.name} ({k.model_type})" for k in ARTIFACT_KINDS.values())


def is_lightning_checkpoint(spec: str | Path) -> bool:
    return Path(spec).suffix == ".ckpt"


def strip_prefix(state_dict: StateDict, prefix: str) -> StateDict:
    """The entries under `prefix`, with the prefix removed (a part's weights inside a module's state dict)."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------- detection


def detect_kind(spec: str | Path) -> ArtifactKind:
    """The kind of a local export folder (its config.json's model_type) or Lightning checkpoint (its keys)."""
    path = Path(spec).expanduser()
    if is_lightning_checkpoint(path):
        return _checkpoint_kind(path, _read_checkpoint(path).get("state_dict", {}))
    config = path / CONFIG_NAME
    if not config.is_file():
        raise UnknownArtifactError(f"{spec} is neither an export folder (no {CONFIG_NAME}) nor a .ckpt file.")
    model_type = json.loads(config.read_text()).get("model_type")
    for kind in ARTIFACT_KINDS.values():
        if kind.model_type == model_type:
            return kind
    raise UnknownArtifactError(
        f"{spec} holds a model of type {model_type!r}, which llm-trm cannot load or push; known: {known_kinds()}."
    )


def _checkpoint_kind(path: Path, state_dict: StateDict) -> ArtifactKind:
    for kind in ARTIFACT_KINDS.values():
        if kind.weight_prefix_in(state_dict):
            return kind
    raise UnknownArtifactError(
        f"{path} holds no trained part llm-trm knows (its weights start with none of "
        f"{[p for k in ARTIFACT_KINDS.values() for p in k.weight_prefixes]}); known kinds: {known_kinds()}."
    )


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactNotFoundError(f"checkpoint {path} does not exist: check the path.")
    return load_torch_checkpoint(path)


# ---------------------------------------------------------------------------- loading


def load_from_lightning_checkpoint(kind: ArtifactKind, path: str | Path) -> nn.Module:
    """Rebuild `kind`'s model from a Lightning checkpoint, without its LightningModule."""
    checkpoint = _read_checkpoint(Path(path))
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
    model.load_state_dict(weights)
    metadata.pop(ARCHITECTURE_KEY, None)  # now the model's own config
    model.metadata = metadata
    return model


def _known_args(model_class: type, args: dict[str, Any]) -> dict[str, Any]:
    """Drop recorded arguments the constructor does not take (a newer writer may record more)."""
    accepted = inspect.signature(model_class.__init__).parameters
    return {name: value for name, value in args.items() if name in accepted}


def load_artifact(spec: str | Path, kind: str | None = None,
                  revision: str | None = None) -> tuple[ArtifactKind, nn.Module]:
    """A trained part from an export folder, a Hub id (kind required) or a Lightning `.ckpt`; and its kind."""
    if kind is None:
        artifact_kind = detect_kind(spec)
    elif kind in ARTIFACT_KINDS:
        artifact_kind = ARTIFACT_KINDS[kind]
    else:
        raise UnknownArtifactError(f"unknown kind {kind!r}; known: {known_kinds()}.")
    if is_lightning_checkpoint(spec):
        return artifact_kind, load_from_lightning_checkpoint(artifact_kind, spec)
    model_class: Any = artifact_kind.model_class  # a PretrainedMixin
    return artifact_kind, model_class.from_pretrained(spec, revision=revision)


def load_compressor(spec: str | Path, revision: str | None = None) -> DimensionCompressor:
    """A DimensionCompressor from an export folder, a Hub id, or a Lightning `.ckpt` (Phase 1 or 2)."""
    return load_artifact(spec, "compressor", revision)[1]  # type: ignore[return-value]


def load_trm(spec: str | Path, revision: str | None = None) -> SequenceTRM:
    """A SequenceTRM from an export folder, a Hub id, or a Phase 2 Lightning `.ckpt` (its EMA weights when kept)."""
    return load_artifact(spec, "trm", revision)[1]  # type: ignore[return-value]


def check_compatible(source: str, found: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise one line for the first key whose recorded value differs from the configured one."""
    for key, want in expected.items():
        have = found.get(key)
        if have is not None and want is not None and have != want:
            raise ConfigMismatchError(
                f"{source} was made with {key}={have!r} but this run has {key}={want!r}: "
                f"use a matching {key} or another checkpoint."
            )
