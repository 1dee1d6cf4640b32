"""The one latent path, shared by datagen, evaluation (`LatentReasoner`) and GRPO (`GRPOModule`).

    prompt = encode_prompt(tokenizer, problem)              # chat prompt ending in the opening tag
    batch = PromptBatch.of([prompt, ...], pad_id, device)   # left-padded
    states, cache = prompt_pass(model, batch.input_ids, batch.mask, layer, use_cache=True)
    pre, pre_mask = pre_states(states, batch.mask, batch.pre_lengths)   # as datagen stores hidden_pre
    output = predict(compressor, trm, pre, pre_mask)        # compress -> TRM (per-sample halting)
    state, soft = soft_vectors(compressor, adapter, output.prediction)  # decompress -> bridge
    # (a TRM with m reasoning tokens predicts m states: [B, m, D'] -> [B, m, D] -> the adapter)
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
from llm_trm.models.adapter import BridgeAdapter, ConceptAdapter, LatentAdapter, LinearAdapter, NormMatchAdapter
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.trm import SequenceTRM, TRMOutput
from llm_trm.thinking import opening_tag_end

# where the other trained parts live inside a TRM export folder (GRPO exports all three together)
ADAPTER_SUBFOLDER = "adapter"
COMPRESSOR_SUBFOLDER = "compressor"
ADAPTER_SPECS = ("auto", "norm_match", "linear", "concept", "bridge")


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
    check_compressor(compressor, hidden_size, backbone_id, layer, compressor_source)
    if trm.d_compressed != compressor.d_compressed:
        raise ConfigMismatchError(
            f"{trm_source} works in D'={trm.d_compressed} but {compressor_source} gives "
            f"D'={compressor.d_compressed}: use the compressor the TRM was trained with."
        )
    check_compatible(trm_source, trm.metadata, {"d_model": hidden_size, "backbone": backbone_id, "layer": layer})


def check_compressor(compressor: DimensionCompressor, hidden_size: int, backbone_id: str, layer: int,
                     source: str = "the compressor") -> None:
    """The compressor fits the backbone (D, id, layer): else one line naming both values."""
    if compressor.d_model != hidden_size:
        raise ConfigMismatchError(
            f"{source} maps D={compressor.d_model} but backbone {backbone_id} has D={hidden_size}: "
            "use the compressor trained on this backbone."
        )
    check_compatible(source, compressor.metadata, {"backbone": backbone_id, "layer": layer})


def build_adapter(spec: str | LatentAdapter, embedding_weight: Tensor, hidden_size: int,
                  n_soft_vectors: int | None = None, trm_spec: Any = None, *, lm_head_weight: Tensor | None = None,
                  n_states: int = 1) -> LatentAdapter:
    """The input adapter (the bridge into the LLM), attached to the backbone's weights when its kind needs them.

    `auto`: the one saved inside the TRM's export folder (`adapter/`) when there is one, else
    `norm_match`; `norm_match`: each state rescaled to the embeddings' mean norm; `linear`: a fresh
    LinearAdapter that starts as norm matching; `concept`: the training-free concept token
    `softmax(lm_head(h)) @ E`; `bridge`: a fresh trainable BridgeAdapter (equal to `concept` until
    trained); else an adapter export folder (any kind, e.g. a Phase 2b bridge). A fresh adapter makes
    `n_soft_vectors` vectors (1 when None) from `n_states` states; a loaded one keeps its own k and m
    (`check_adapter` compares them with what the run asks for). `lm_head_weight` [V, D] and
    `embedding_weight` [V, E] are the backbone's: the concept kinds read them by reference and never save them.
    """
    k = 1 if n_soft_vectors is None else n_soft_vectors
    if isinstance(spec, LatentAdapter):
        adapter = spec
    elif spec == "auto":
        bundled = Path(str(trm_spec)) / ADAPTER_SUBFOLDER if isinstance(trm_spec, (str, Path)) else None
        if bundled is not None and (bundled / "config.json").is_file():
            adapter = load_part("adapter", bundled, LatentAdapter.from_pretrained)
        else:
            adapter = NormMatchAdapter.for_embeddings(embedding_weight, k, n_states)
    elif spec == "norm_match":
        adapter = NormMatchAdapter.for_embeddings(embedding_weight, k, n_states)
    elif spec == "linear":
        adapter = LinearAdapter.for_embeddings(embedding_weight, hidden_size, k, n_states)
    elif spec in ("concept", "bridge"):
        kind = ConceptAdapter if spec == "concept" else BridgeAdapter
        adapter = kind.for_backbone(_lm_head_for(spec, lm_head_weight), embedding_weight, n_vectors=k,
                                    n_states=n_states)
    else:
        adapter = load_part("adapter", spec, LatentAdapter.from_pretrained)
    if isinstance(adapter, ConceptAdapter) and not adapter.attached:
        adapter.attach(_lm_head_for(describe(spec, "adapter"), lm_head_weight), embedding_weight)
    return adapter


def _lm_head_for(what: str, lm_head_weight: Tensor | None) -> Tensor:
    if lm_head_weight is None:
        raise ConfigMismatchError(f"{what} reads states through the backbone's lm_head: pass lm_head_weight "
                                  "(LatentParts.load and the training modules do).")
    return lm_head_weight


def backbone_head(model: Any) -> tuple[Tensor, Tensor]:
    """The frozen LLM's (lm_head weight [V, D], input-embedding weight [V, E]), what the concept kinds attach."""
    return model.get_output_embeddings().weight, model.get_input_embeddings().weight


def check_state_count(trm: SequenceTRM, adapter: LatentAdapter, trm_source: str = "the TRM",
                      adapter_source: str = "the adapter") -> None:
    """The TRM's m predicted states are what the adapter reads: its `n_states` (1 when it does not say) must be m."""
    predicted, taken = int(getattr(trm, "n_reasoning_tokens", 1)), int(getattr(adapter, "n_states", 1))
    if predicted != taken:
        raise ConfigMismatchError(
            f"{trm_source} predicts {predicted} end-of-thinking state(s) (n_reasoning_tokens={predicted}) but "
            f"{adapter_source} takes {taken} (n_states={taken}): use an adapter built for n_states={predicted}."
        )


def check_adapter(adapter: LatentAdapter, hidden_size: int, d_embed: int, source: str = "the adapter", *,
                  backbone_id: str | None = None, layer: int | None = None, n_vectors: int | None = None,
                  n_states: int | None = None) -> None:
    """The adapter fits the backbone (D, E, id, layer) and what the run asks for (k, m): else one line naming both."""
    if adapter.d_model != hidden_size or adapter.d_embed != d_embed:
        raise ConfigMismatchError(
            f"{source} maps D={adapter.d_model} -> E={adapter.d_embed} but the backbone has D={hidden_size}, "
            f"E={d_embed}: use an adapter made for this backbone."
        )
    if n_vectors is not None and adapter.n_vectors != n_vectors:
        raise ConfigMismatchError(
            f"{source} makes k={adapter.n_vectors} soft vectors but this run asks for k={n_vectors}: "
            f"set n_soft_vectors to {adapter.n_vectors} (or leave it unset), or use an adapter made with k={n_vectors}."
        )
    if n_states is not None and adapter.n_states != n_states:
        raise ConfigMismatchError(
            f"{source} reads m={adapter.n_states} end-of-thinking state(s) per sample but this run gives m={n_states}: "
            f"use an adapter made with n_states={n_states}, or parts that give {adapter.n_states}."
        )
    check_compatible(source, adapter.metadata, {"backbone": backbone_id, "layer": layer})
    if adapter.uses_backbone_head and layer is not None and layer != -1:
        raise ConfigMismatchError(
            f"{source} reads states through lm_head, which applies to the final layer (-1, after the norm), "
            f"but this run uses layer {layer}: use layer -1, or a norm_match / linear adapter."
        )


def load_adapter(backbone: Backbone, spec: str | LatentAdapter = "auto", n_soft_vectors: int | None = None,
                 trm_spec: Any = None, n_states: int = 1, layer: int = -1) -> LatentAdapter:
    """The input adapter for `backbone` (see `build_adapter`), attached to its lm_head / embeddings where its
    kind reads them and checked against it: what `LatentParts.load` uses, and what the oracle modes use
    without a TRM. `n_states`: the m states it will be given."""
    lm_head, embeddings = backbone_head(backbone.model)
    adapter = build_adapter(spec, embeddings, backbone.hidden_size, n_soft_vectors, trm_spec,
                            lm_head_weight=lm_head, n_states=n_states)
    check_adapter(adapter, backbone.hidden_size, embeddings.shape[1], describe(spec, "adapter"),
                  backbone_id=backbone.backbone_id, layer=layer, n_vectors=n_soft_vectors)
    return adapter


@dataclass
class LatentParts:
    """The trained parts of the latent path, checked against the backbone and each other."""

    compressor: DimensionCompressor
    trm: SequenceTRM
    adapter: LatentAdapter
    layer: int

    @classmethod
    def load(cls, backbone: Backbone, compressor: str | DimensionCompressor, trm: str | SequenceTRM,
             adapter: str | LatentAdapter = "auto", n_soft_vectors: int | None = None, layer: int | None = None,
             loaded: tuple[DimensionCompressor, SequenceTRM] | None = None) -> LatentParts:
        """Load (unless `loaded`) and check the parts; the layer defaults to the one the compressor records.

        `adapter` is a spec or folder (`build_adapter`); the concept kinds get this backbone's lm_head and
        embeddings attached. `n_soft_vectors` None: a loaded adapter's own k (1 for a fresh one); a number
        that differs from a loaded adapter's k is a one-line ConfigMismatchError, as are another backbone,
        layer, D, E or m (the TRM's `n_reasoning_tokens`).
        """
        compressor_model, trm_model = loaded or load_compressor_and_trm(compressor, trm)
        chosen = backbone.check_layer(int(compressor_model.metadata.get("layer", -1)) if layer is None else layer)
        check_parts(compressor_model, trm_model, backbone.hidden_size, backbone.backbone_id, chosen,
                    describe(compressor, "compressor"), describe(trm, "TRM"))
        n_states = int(getattr(trm_model, "n_reasoning_tokens", 1))  # m states predicted per sample
        adapter_model = load_adapter(backbone, adapter, n_soft_vectors, trm, n_states=n_states, layer=chosen)
        check_state_count(trm_model, adapter_model, describe(trm, "TRM"), describe(adapter, "adapter"))
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


def extraction_pass(model: Any, sequences: Sequence[Sequence[int]], pre_lengths: Sequence[int], layer: int,
                    num_states: int, pad_id: int, device: torch.device | str) -> tuple[list[Tensor], list[Tensor]]:
    """The true states of finished thinking: one right-padded pass over prompt + thinking + the canonical
    closing tag (right padding, so a stored state can be recomputed from the token ids alone).

    Returns, per sequence, its pre states [L_i, D] (as `pre_states` cuts them) and the last `num_states`
    states ending at the closing tag's last token [m, D] (the end-of-thinking state is the last of them).
    Datagen stores these; the oracle modes of evaluation feed them through the TRM's path.
    """
    input_ids, mask = pad_token_ids([list(seq) for seq in sequences], pad_id, device, side="right")
    states, _ = prompt_pass(model, input_ids, mask, layer, use_cache=False)
    pre, pre_mask = pre_states(states, mask, pre_lengths)
    pre_rows = [pre[row, : int(pre_mask[row].sum())] for row in range(len(sequences))]
    post = [states[row, max(0, len(seq) - num_states) : len(seq)] for row, seq in enumerate(sequences)]
    return pre_rows, post


# --------------------------------------------------------------------------- the TRM path


def predict(compressor: DimensionCompressor, trm: SequenceTRM, pre: Tensor, pre_mask: Tensor,
            n_supervision_steps: int | None = None, halt: bool = True) -> TRMOutput:
    """compress -> TRM with per-sample halting; the TRM's output as is: the prediction is [B, D'], or [B, m, D']
    for a TRM with m > 1 reasoning tokens (gradients as the caller's mode)."""
    compressed = compressor.compress(pre.to(compressor.weight.dtype))
    return trm(compressed, pre_mask, n_supervision_steps=n_supervision_steps, halt=halt)


def soft_vectors(compressor: DimensionCompressor, adapter: LatentAdapter, compressed: Tensor) -> tuple[Tensor, Tensor]:
    """decompress -> adapter: (the state(s) [B, D] or [B, m, D], their k soft input vectors [B, k, E]).

    `compressed` is a prediction, [B, D'] or [B, m, D'] (m states, which an adapter with n_states = m reads).
    """
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
