"""The one latent path, shared by datagen, evaluation (`LatentReasoner`) and GRPO (`GRPOModule`).

    prompt = encode_prompt(tokenizer, problem)              # chat prompt ending in the opening tag
    batch = PromptBatch.of([prompt, ...], pad_id, device)   # left-padded
    states, cache = prompt_pass(model, batch.input_ids, batch.mask, layer, use_cache=True)
    pre, pre_mask = pre_states(states, batch.mask, batch.pre_lengths)   # as datagen stores hidden_pre
    output = predict(compressor, trm, pre, pre_mask)        # compress -> TRM (per-sample halting)
    state, soft = soft_vectors(compressor, adapter, output.prediction)  # decompress -> bridge
    embeds, mask = soft_inputs(model, batch, soft, close_ids)           # [prompt][k soft vectors]</think>

Datagen stores `hidden_pre` with `encode_prompt` + `prompt_pass` + `pre_states` (over its
right-padded extraction pass), evaluation and GRPO recompute it with the same functions over
left-padded prompts: the TRM is used on the input it was trained on (tests/test_latent_parity.py).

`LatentParts.load` loads the trained parts (compressor, TRM, input adapter) from wherever a user
points and checks that they fit the backbone and each other, with one-line errors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llm_trm.backbone import Backbone, run_decoder
from llm_trm.batching import pad_token_ids
from llm_trm.data.problems import PROMPT_STYLE, Problem, build_chat_prompt
from llm_trm.errors import ConfigMismatchError, LLMTRMError
from llm_trm.hub import check_compatible, load_compressor, load_trm
from llm_trm.models.adapter import LatentAdapter, LinearAdapter, NormMatchAdapter
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.trm import SequenceTRM, TRMOutput
from llm_trm.thinking import opening_tag_end

# where the other trained parts live inside a TRM export folder (GRPO exports all three together)
ADAPTER_SUBFOLDER = "adapter"
COMPRESSOR_SUBFOLDER = "compressor"
ADAPTER_SPECS = ("auto", "norm_match", "linear")


# --------------------------------------------------------------------------- loading and checking


def load_part(kind: str, spec: Any, loader: Callable[[Any], Any]) -> Any:
    """`loader(spec)`, with a missing or unreadable artifact turned into one line naming it."""
    try:
        return loader(spec)
    except LLMTRMError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise LLMTRMError(f"cannot load the {kind} from {spec}: {err}".splitlines()[0]) from err


def describe(spec: Any, kind: str) -> str:
    return f"{kind} {spec}" if isinstance(spec, (str, Path)) else f"the given {kind}"


def load_compressor_and_trm(compressor: str | DimensionCompressor, trm: str | SequenceTRM,
                            allow_unchecked: bool = False) -> tuple[DimensionCompressor, SequenceTRM]:
    """The compressor and TRM from export folders, Hub ids or `.ckpt` files (or as given); an artifact
    that does not record its backbone, layer, D and D' is refused unless `allow_unchecked`."""
    if not isinstance(compressor, DimensionCompressor):
        compressor = load_part("compressor", compressor,
                               lambda spec: load_compressor(str(spec), allow_unchecked=allow_unchecked))
    if not isinstance(trm, SequenceTRM):
        trm = load_part("TRM", trm, lambda spec: load_trm(str(spec), allow_unchecked=allow_unchecked))
    return compressor, trm


def check_parts(compressor: DimensionCompressor, trm: SequenceTRM, hidden_size: int, backbone_id: str, layer: int,
                compressor_source: str = "the compressor", trm_source: str = "the TRM") -> None:
    """Compressor and TRM fit the backbone (D, id, layer) and each other (D'): else one line naming both values."""
    if compressor.d_model != hidden_size:
        raise ConfigMismatchError(
            f"{compressor_source} maps D={compressor.d_model} but backbone {backbone_id} has D={hidden_size}: "
            "use the compressor trained on this backbone."
        )
    if trm.d_compressed != compressor.d_compressed:
        raise ConfigMismatchError(
            f"{trm_source} works in D'={trm.d_compressed} but {compressor_source} gives "
            f"D'={compressor.d_compressed}: use the compressor the TRM was trained with."
        )
    check_compatible(compressor_source, compressor.metadata, {"backbone": backbone_id, "layer": layer})
    check_compatible(trm_source, trm.metadata, {"d_model": hidden_size, "backbone": backbone_id, "layer": layer})


def build_adapter(spec: str | LatentAdapter, embedding_weight: Tensor, hidden_size: int, n_soft_vectors: int = 1,
                  trm_spec: Any = None) -> LatentAdapter:
    """The input adapter (the bridge into the LLM).

    `auto`: the one saved inside the TRM's export folder (`adapter/`) when there is one, else
    `norm_match`; `norm_match`: each state rescaled to the embeddings' mean norm, k copies;
    `linear`: a fresh LinearAdapter that starts as norm matching; else an adapter export folder.
    """
    if isinstance(spec, LatentAdapter):
        return spec
    if spec == "auto":
        bundled = Path(str(trm_spec)) / ADAPTER_SUBFOLDER if isinstance(trm_spec, (str, Path)) else None
        if bundled is not None and (bundled / "config.json").is_file():
            return load_part("adapter", bundled, LatentAdapter.from_pretrained)
        spec = "norm_match"
    if spec == "norm_match":
        return NormMatchAdapter.for_embeddings(embedding_weight, n_soft_vectors)
    if spec == "linear":
        return LinearAdapter.for_embeddings(embedding_weight, hidden_size, n_soft_vectors)
    return load_part("adapter", spec, LatentAdapter.from_pretrained)


def check_adapter(adapter: LatentAdapter, hidden_size: int, d_embed: int, source: str = "the adapter") -> None:
    if adapter.d_model != hidden_size or adapter.d_embed != d_embed:
        raise ConfigMismatchError(
            f"{source} maps D={adapter.d_model} -> E={adapter.d_embed} but the backbone has D={hidden_size}, "
            f"E={d_embed}: use an adapter made for this backbone."
        )


@dataclass
class LatentParts:
    """The trained parts of the latent path, checked against the backbone and each other."""

    compressor: DimensionCompressor
    trm: SequenceTRM
    adapter: LatentAdapter
    layer: int

    @classmethod
    def load(cls, backbone: Backbone, compressor: str | DimensionCompressor, trm: str | SequenceTRM,
             adapter: str | LatentAdapter = "auto", n_soft_vectors: int = 1, layer: int | None = None,
             loaded: tuple[DimensionCompressor, SequenceTRM] | None = None) -> LatentParts:
        """Load (unless `loaded`) and check the parts; the layer defaults to the one the compressor records."""
        compressor_model, trm_model = loaded or load_compressor_and_trm(compressor, trm)
        chosen = backbone.check_layer(int(compressor_model.metadata.get("layer", -1)) if layer is None else layer)
        check_parts(compressor_model, trm_model, backbone.hidden_size, backbone.backbone_id, chosen,
                    describe(compressor, "compressor"), describe(trm, "TRM"))
        embeddings = backbone.model.get_input_embeddings().weight
        adapter_model = build_adapter(adapter, embeddings, backbone.hidden_size, n_soft_vectors, trm)
        check_adapter(adapter_model, backbone.hidden_size, embeddings.shape[1], describe(adapter, "adapter"))
        return cls(compressor_model, trm_model, adapter_model, chosen)

    def to(self, device: torch.device | str) -> LatentParts:
        for part in (self.compressor, self.trm, self.adapter):
            part.to(device)
        return self

    def frozen(self) -> LatentParts:
        """Eval mode, no gradients (inference)."""
        for part in (self.compressor, self.trm, self.adapter):
            part.eval().requires_grad_(False)
        return self


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    """A problem's chat prompt as token ids, and how many of them are the pre states (up to and
    including the opening think tag)."""

    problem: Problem
    ids: list[int]
    pre_length: int


def encode_prompt(tokenizer: Any, problem: Problem, thinking: bool = True, *, style: str = PROMPT_STYLE) -> Prompt:
    """The chat prompt (ending inside the opening think tag, or with an empty think block) as ids.
    `style` matters only for templates without think tags; the pipeline always uses the default."""
    text = build_chat_prompt(tokenizer, problem, thinking=thinking, style=style)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return Prompt(problem, ids, opening_tag_end(tokenizer, text, ids))


@dataclass
class PromptBatch:
    """Left-padded prompts (for generation) with their pre-state lengths."""

    prompts: list[Prompt]
    input_ids: Tensor  # [B, W]
    mask: Tensor  # [B, W]

    @classmethod
    def of(cls, prompts: Sequence[Prompt], pad_id: int, device: torch.device | str = "cpu") -> PromptBatch:
        input_ids, mask = pad_token_ids([p.ids for p in prompts], pad_id, device, side="left")
        return cls(list(prompts), input_ids, mask)

    @property
    def pre_lengths(self) -> list[int]:
        return [p.pre_length for p in self.prompts]

    @property
    def problems(self) -> list[Problem]:
        return [p.problem for p in self.prompts]


# --------------------------------------------------------------------------- the prompt pass


def prompt_pass(model: Any, input_ids: Tensor, mask: Tensor, layer: int = -1,
                use_cache: bool = True) -> tuple[Tensor, Any]:
    """One forward of the frozen LLM over padded prompts: (states [B, W, D] of `layer`, KV cache)."""
    with torch.no_grad():
        return run_decoder(model, input_ids, mask, layer, use_cache=use_cache)


def rewind_cache(cache: Any, length: int) -> None:
    """Drop everything after the first `length` positions of a KV cache (e.g. back to the prompt)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def pre_states(states: Tensor, mask: Tensor, pre_lengths: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Each row's first `pre_length` real states, right-padded: ([B, L, D], mask [B, L]).

    Works on left- and right-padded passes alike (a row's real tokens start at its first
    unmasked position); this is how datagen stores `hidden_pre` and how evaluation and GRPO
    rebuild it.
    """
    rows = len(pre_lengths)
    longest = max(pre_lengths)
    starts = mask.long().argmax(dim=1).tolist()  # index of each row's first real token
    pre = states.new_zeros(rows, longest, states.shape[-1])
    pre_mask = torch.zeros(rows, longest, dtype=torch.bool, device=states.device)
    for row, (start, length) in enumerate(zip(starts, pre_lengths)):
        pre[row, :length] = states[row, start : start + length]
        pre_mask[row, :length] = True
    return pre, pre_mask


# --------------------------------------------------------------------------- the TRM path


def predict(compressor: DimensionCompressor, trm: SequenceTRM, pre: Tensor, pre_mask: Tensor,
            n_supervision_steps: int | None = None, halt: bool = True) -> TRMOutput:
    """compress -> TRM with per-sample halting; the prediction is in D' (gradients as the caller's mode)."""
    compressed = compressor.compress(pre.to(compressor.weight.dtype))
    return trm(compressed, pre_mask, n_supervision_steps=n_supervision_steps, halt=halt)


def soft_vectors(compressor: DimensionCompressor, adapter: LatentAdapter, compressed: Tensor) -> tuple[Tensor, Tensor]:
    """decompress -> adapter: (the state [B, D], its k soft input vectors [B, k, E])."""
    state = compressor.decompress(compressed.to(compressor.weight.dtype))
    return state, adapter(state)


def embed(model: Any, ids: Tensor) -> Tensor:
    return model.get_input_embeddings()(ids)


def soft_inputs(model: Any, batch: PromptBatch, soft: Tensor, close_ids: Sequence[int],
                tail: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`[prompt][k soft vectors]</think>` (+ `tail` embeddings) for N = B x repeats rows, and its mask.

    soft: [N, k, E] with N a multiple of the batch (each prompt repeated N / B times, e.g. the
    G samples of a GRPO group); tail: [N, T, E] embeddings to append (e.g. a first answer token).
    The prompt part never needs a gradient (the LLM is frozen); `soft` keeps the caller's.
    """
    repeats = soft.shape[0] // batch.input_ids.shape[0]
    with torch.no_grad():
        prompt = embed(model, batch.input_ids).repeat_interleave(repeats, dim=0)
        close = embed(model, torch.tensor(list(close_ids), device=batch.input_ids.device))
    parts = [prompt, soft.to(prompt.dtype), close.expand(prompt.shape[0], -1, -1)]
    if tail is not None:
        parts.append(tail.to(prompt.dtype))
    embeds = torch.cat(parts, dim=1)
    mask = batch.mask.repeat_interleave(repeats, dim=0)
    return embeds, torch.cat([mask, mask.new_ones(mask.shape[0], embeds.shape[1] - mask.shape[1])], dim=1)
