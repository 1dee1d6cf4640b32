"""LatentReasoner: answer problems with the frozen LLM, thinking, not thinking, or with the TRM.

    reasoner = LatentReasoner("embedded", compressor="runs/demo/compressor_1b", trm="runs/demo/trm_model")
    results = reasoner.answer(problems, mode="trm", max_new_tokens=128)

Modes (all batched, left-padded, greedy):

- `cot`:      the LLM thinks and answers in one generation with one KV cache, as a user of the
              LLM runs it; a row that reaches `max_thinking_tokens` without closing its thinking
              gets the closing tag forced, then answers;
- `no_think`: the empty think block, the LLM answers at once;
- `trm`:      one forward pass over the thinking prompt gives the KV cache and the prompt's
              states up to and including the opening tag; the TRM predicts the state at the
              end of thinking from them, which is decompressed and mapped by the input adapter
              to k soft input vectors that stand in for the thinking:
              `prompt <think>\\n [k soft vectors] </think>`; the LLM answers from there,
              reusing the prompt's KV cache;
- `trm_first_token`: as `trm`, but the first answer token is `lm_head` applied to the
              predicted state (the state at the closing tag predicts it; of a TRM's m
              predicted states, the last), as the seed's inference did; the LLM continues after it.

Oracle modes (the ceiling a perfect TRM could reach, and its control; they save no time):

- `oracle`:   the LLM thinks as in `cot` (the very thinking `cot` did, when `cot` ran first on
              this reasoner: thoughts are remembered per prompt and budget); one extraction pass
              over prompt + thinking + the canonical closing tag, right-padded as datagen runs it,
              gives the true end-of-thinking state (the last m states when the adapter takes m,
              `n_states`), which goes through exactly the TRM's path after the TRM: compress ->
              decompress -> adapter -> `[prompt][soft]</think>` -> answer;
- `oracle_full`: the same without the compressor (the true state straight into the adapter);
- `shuffled`: another problem's true state through the `oracle` path: the evaluated problems
              are paired by a fixed derangement (seeded, no problem gets its own state); what
              survives it is a content-free prefix, not thinking.

`oracle` and `shuffled` need a compressor, `oracle_full` only the adapter; none needs a TRM.
Their times count from when the true state exists (thinking and extraction are not timed).

The latent path itself (prompts, prompt pass, pre states, soft inputs, loading the parts) is
`llm_trm.latent`, shared with datagen and GRPO; generation is `llm_trm.generation`. This class
keeps the modes, batching, timing and results. Times are per problem, from the start of the
batch it ran in to its first answer token and to the batch's end. With `capture_logits=True`
each result also carries the first answer token's logits (`first_token_logits`, fp32, not
serialised): the CoT-fidelity metrics (`llm_trm.eval.fidelity`) compare them between modes.

With `reference=` (`cot`'s results on the same problems) each batch, once it is answered and
outside its timed span, also scores `cot`'s own answer a_1..a_T under the mode, teacher-forced:
per problem, the mean over t of KL(p_cot(. | cot context, a_<t) || p_mode(. | mode context, a_<t))
(`answer_kl_to_cot`) and the mean NLL of a_t under the mode (`cot_answer_nll`). The cot context is
`[prompt][cot's remembered thinking]</think>\n`; the mode's is what it handed the LLM before its
answer: `no_think` its prompt, the latent and oracle modes `[prompt][soft vectors]</think>\n` as
built for the answer (on the same prompt KV cache, rewound). Both distributions are computed in
the same batch and dropped after the KL. `trm_first_token` is not scored: its first answer token
does not come from the LLM's distribution. In `cot`, `reference="own"` scores the answers it has
just written (KL 0 by definition; their NLL under cot is the floor of the other modes').
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor

from llm_trm.backbone import Backbone, load_backbone
from llm_trm.batching import pad_token_ids, position_ids
from llm_trm.data.problems import Problem
from llm_trm.errors import ConfigMismatchError, LLMTRMError
from llm_trm.eval.answers import check_answer, extract_code, extract_math_answer
from llm_trm.eval.fidelity import answer_kl, answer_nll, wilson_interval
from llm_trm.generation import Generated, ThinkingBudget, generate
from llm_trm.hub import load_compressor
from llm_trm.latent import (LatentParts, Prompt, PromptBatch, check_compressor, check_state_count, describe, embed,
                            encode_prompt, extraction_pass, load_adapter, load_compressor_and_trm, load_part,
                            pre_states, predict, prompt_pass, rewind_cache, soft_inputs, soft_vectors)
from llm_trm.models.adapter import LatentAdapter
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.trm import SequenceTRM, TRMOutput, closing_state
from llm_trm.thinking import after_tag_ids, close_suffix_ids, cut_at_end, end_of_turn_ids

__all__ = ["MODES", "LATENT_MODES", "ORACLE_MODES", "THINKING_MODES", "UNSCORED_MODES", "AnswerResult",
           "LatentInputs", "LatentReasoner", "Thought", "derangement", "wilson_interval"]

MODES = ("cot", "no_think", "trm", "trm_first_token", "oracle", "oracle_full", "shuffled")
LATENT_MODES = ("trm", "trm_first_token")  # the modes that need a trained TRM
ORACLE_MODES = ("oracle", "oracle_full", "shuffled")  # the LLM's own end-of-thinking state, through the TRM's path
THINKING_MODES = ("cot", *ORACLE_MODES)  # the modes in which the LLM thinks (max_thinking_tokens >= 1)
COMPRESSOR_MODES = (*LATENT_MODES, "oracle", "shuffled")
Mode = Literal["cot", "no_think", "trm", "trm_first_token", "oracle", "oracle_full", "shuffled"]
UNSCORED_MODES = ("trm_first_token",)  # no teacher-forced answer KL: its first answer token is lm_head's


# --------------------------------------------------------------------------- results


@dataclass
class AnswerResult:
    """One problem answered in one mode.

    thinking_tokens: tokens the LLM generated inside the think block (0 in the TRM modes,
    whose thinking is `soft_vectors` input vectors; in the oracle modes, the thinking the
    state came from); answer_tokens: tokens after it. Times are in seconds from the start
    of the problem's batch. `error` is set (and the answer empty) when the problem could not
    be answered: it does not fit the context window, or its generation raised (`crashed`).
    `correct` is None when there is nothing to check against, or when the answer checker
    itself raised (`checker_error` says how): such a problem is neither right nor wrong.

    state_source: oracle modes, the problem whose true state was fed (another one in `shuffled`).
    first_answer_token / first_token_logits: with `answer(..., capture_logits=True)`, the first
    answer token's id (the logits' argmax) and logits [V] (fp32, CPU; None when the row wrote
    no answer); the logits are a side channel, left out of `to_dict`.
    answer_ids: the generated answer ids (after the closing suffix, cut at the end of the turn);
    a side channel too: `cot`'s are what the other modes are scored on.
    answer_kl_to_cot / cot_answer_nll: with `answer(..., reference=cot_results)`, the mean
    KL(cot || mode) per answer token, teacher-forced on cot's answer, and the mean NLL per token of
    cot's answer under this mode (nats; None where cot wrote no answer or the mode is not scored).
    kl_to_cot, answer_agrees_with_cot, first_token_agrees_with_cot: filled by `llm-trm evaluate`.
    """

    sample_id: str
    mode: str
    answer_text: str = ""
    extracted_answer: str | None = None
    correct: bool | None = None
    thinking_tokens: int = 0
    answer_tokens: int = 0
    trm_steps: int | None = None
    time_to_first_answer_token_s: float = 0.0
    total_time_s: float = 0.0
    trm_overhead_s: float | None = None  # (compression +) recursion + decompression + adapter
    soft_vectors: int = 0
    closed_thinking: bool | None = None  # cot / oracle modes: whether the LLM closed its thinking itself
    thinking_text: str = ""
    error: str | None = None
    crashed: bool = False  # the error is a raised exception, not a problem that does not fit
    checker_error: str | None = None
    state_source: str | None = None
    first_answer_token: int | None = None
    kl_to_cot: float | None = None
    answer_agrees_with_cot: bool | None = None
    first_token_agrees_with_cot: bool | None = None
    answer_kl_to_cot: float | None = None
    cot_answer_nll: float | None = None
    first_token_logits: Tensor | None = field(default=None, repr=False, compare=False)
    answer_ids: tuple[int, ...] = field(default=(), repr=False, compare=False)

    @property
    def generated_tokens(self) -> int:
        return self.thinking_tokens + self.answer_tokens

    def to_dict(self) -> dict[str, Any]:
        """Every field but the side channels (logits, answer ids): plain values for JSON and CSV."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _SIDE_CHANNELS}


_SIDE_CHANNELS = ("first_token_logits", "answer_ids")
# what `answer(reference=...)` scores a mode's answer distributions against: cot's results, or (cot) its own
Reference = Sequence[AnswerResult] | Literal["own"] | None


@dataclass(frozen=True)
class Thought:
    """The LLM's own thinking on a prompt: the generated ids before its closing tag (the tag left out),
    and whether it closed the thinking itself (else the budget forced the tag)."""

    ids: tuple[int, ...]
    closed: bool


def derangement(count: int, seed: int = 0) -> list[int]:
    """A fixed permutation of range(count) with no fixed point (count >= 2): Sattolo's algorithm,
    seeded, gives one cycle through every index, so `order[i] != i` for every i."""
    if count < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {count}")
    order = list(range(count))
    rng = random.Random(seed)
    for i in range(count - 1, 0, -1):
        j = rng.randrange(i)  # j < i (not <= i): what makes it a single cycle
        order[i], order[j] = order[j], order[i]
    return order


@dataclass
class _Item:
    """A problem that fits the context: its place in the caller's list, its prompt, and (shuffled)
    the problem whose state it is given."""

    position: int
    prompt: Prompt
    partner: _Item | None = None

    @property
    def problem(self) -> Problem:
        return self.prompt.problem


@dataclass
class LatentInputs:
    """What the latent modes hand the LLM: the full input embeddings, the prompt's KV cache, and stats."""

    inputs_embeds: Tensor  # [B, W + suffix, E]: prompt embeddings, soft vectors, closing tag (, first token)
    attention_mask: Tensor
    cache: Any  # the prompt's KV cache (consumed by the next forward/generate)
    trm_output: TRMOutput | None  # None in the oracle modes
    predicted_state: Tensor  # [B, D] (or [B, m, D]) the state handed to the adapter
    first_token: Tensor | None  # [B] trm_first_token only
    overhead_s: float
    ready_time: float  # when the inputs (and, in trm_first_token, the first answer token) exist
    pre: Tensor | None = None  # [B, L, D] the prompt states the TRM read (as datagen stores them)
    pre_mask: Tensor | None = None
    first_logits: Tensor | None = None  # [B, V] trm_first_token: lm_head on the predicted state
    prompts: PromptBatch | None = None  # the left-padded prompts the cache holds (W = their width)

    def after_prompt(self) -> _Context:
        """What follows the cached prompt, `[soft vectors]</think>\n`, on the prompt's cache rewound to it
        (the answer's generation extended it): the mode's context for teacher forcing."""
        width = self.prompts.input_ids.shape[1]
        rewind_cache(self.cache, width)
        return _Context(self.prompts.mask, self.cache, self.inputs_embeds[:, width:], self.attention_mask[:, width:])


@dataclass
class _Context:
    """What the LLM is given before an answer: a left-padded prefix held in a KV cache (none: width 0) and the
    input embeddings after it [B, S, E] (S >= 1; their last position predicts the answer's first token)."""

    prefix_mask: Tensor  # [B, W]
    cache: Any
    inputs_embeds: Tensor  # [B, S, E]
    mask: Tensor  # [B, S]


# --------------------------------------------------------------------------- the reasoner


def _load_compressor(spec: str | DimensionCompressor, allow_unchecked: bool) -> DimensionCompressor:
    if isinstance(spec, DimensionCompressor):
        return spec
    return load_part("compressor", spec, lambda path: load_compressor(str(path), allow_unchecked=allow_unchecked))


def _frozen(module: torch.nn.Module, device: torch.device) -> Any:
    return module.to(device).eval().requires_grad_(False)


class LatentReasoner:
    """The frozen LLM with, optionally, a trained compressor + TRM + input adapter.

    Args:
        backbone: a backbone spec (`embedded`, Hub id, local dir, .gguf) or a loaded `Backbone`.
        compressor: export folder, Hub id, `.ckpt`, or a DimensionCompressor (the TRM modes,
            `oracle` and `shuffled` need one).
        trm: export folder, Hub id, `.ckpt`, or a SequenceTRM (needed for the TRM modes; needs a compressor).
        adapter: `auto` (the TRM folder's `adapter/` when present, else `norm_match`),
            `norm_match`, `linear` (a fresh LinearAdapter), an adapter folder, or a LatentAdapter.
        n_soft_vectors: k, the number of soft vectors (a fresh adapter: 1 when None; an adapter folder: None
            takes its own k, another number is an error).
        layer: hidden-state layer; by default the one the compressor records (else -1).
        dtype: backbone dtype (`auto`: bf16 on GPU, fp32 on CPU).
        device: where everything runs (default: cuda when available, else cpu).
        attn_implementation: the backbone's attention: sdpa, flash_attention_2 (needs flash-attn) or eager.
        allow_unchecked_artifacts: use a compressor / TRM that does not record its backbone, layer, D, D'.
    """

    def __init__(
        self,
        backbone: str | Backbone,
        compressor: str | DimensionCompressor | None = None,
        trm: str | SequenceTRM | None = None,
        adapter: str | LatentAdapter = "auto",
        n_soft_vectors: int | None = None,
        layer: int | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str = "sdpa",
        allow_unchecked_artifacts: bool = False,
    ) -> None:
        if trm is not None and compressor is None:
            raise ConfigMismatchError("a TRM works in the space of the compressor it was trained with: "
                                      "pass `compressor=` as well as `trm=`.")
        # the small parts load first, so a wrong path fails before the LLM is loaded
        loaded = load_compressor_and_trm(compressor, trm, allow_unchecked_artifacts) if trm is not None else None
        lone_compressor = (_load_compressor(compressor, allow_unchecked_artifacts)
                           if compressor is not None and trm is None else None)
        self.backbone = backbone if isinstance(backbone, Backbone) else load_backbone(
            backbone, dtype, trust_remote_code, attn_implementation)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.backbone.to(self.device)
        self.tokenizer = self.backbone.tokenizer
        self.parts: LatentParts | None = None
        self._compressor: DimensionCompressor | None = None
        self.layer = self.backbone.check_layer(-1 if layer is None else layer)
        if loaded is not None:
            parts = LatentParts.load(self.backbone, compressor, trm, adapter, n_soft_vectors, layer, loaded=loaded)
            self.parts = parts.to(self.device).frozen()
            self.layer = parts.layer
            self._compressor, self._adapter = parts.compressor, parts.adapter
        else:
            if lone_compressor is not None:  # the oracle modes: the compressor without a TRM
                recorded = int(lone_compressor.metadata.get("layer", -1))
                self.layer = self.backbone.check_layer(recorded if layer is None else layer)
                check_compressor(lone_compressor, self.backbone.hidden_size, self.backbone.backbone_id, self.layer,
                                 describe(compressor, "compressor"))
                self._compressor = _frozen(lone_compressor, self.device)
            self._adapter = _frozen(load_adapter(self.backbone, adapter, n_soft_vectors, layer=self.layer), self.device)
        self.end_ids = end_of_turn_ids(self.tokenizer, self.model)
        # the LLM's thinking per (prompt ids, thinking budget): `cot` leaves it, the oracle modes read it;
        # public, so reasoners with other parts over the same backbone can share it (one thinking, many ways in)
        self.remembered_thinking: dict[tuple[tuple[int, ...], int], Thought] = {}

    def use_adapter(self, adapter: str | LatentAdapter, n_soft_vectors: int | None = None) -> LatentReasoner:
        """Swap the input adapter (the bridge) and keep everything else, the LLM's remembered thinking
        included: one reasoner compares several ways in (norm matching, concept token, a trained bridge)."""
        new = load_adapter(self.backbone, adapter, n_soft_vectors, n_states=self._predicted_states(), layer=self.layer)
        if self.parts is not None:
            check_state_count(self.parts.trm, new, "the TRM", describe(adapter, "adapter"))
            self.parts = replace(self.parts, adapter=_frozen(new, self.device))
        self._adapter = _frozen(new, self.device)
        return self

    def _predicted_states(self) -> int:
        return int(getattr(self.trm, "n_reasoning_tokens", 1)) if self.trm is not None else 1

    # ---- small utilities -----------------------------------------------------------------

    @property
    def has_trm(self) -> bool:
        return self.parts is not None

    @property
    def has_compressor(self) -> bool:
        return self._compressor is not None

    @property
    def compressor(self) -> DimensionCompressor | None:
        return self._compressor

    @property
    def trm(self) -> SequenceTRM | None:
        return self.parts.trm if self.parts else None

    @property
    def adapter(self) -> LatentAdapter:
        return self._adapter

    @property
    def n_states(self) -> int:
        """m, the end-of-thinking states the adapter takes (1 unless it was built for more)."""
        return int(getattr(self.adapter, "n_states", 1) or 1)

    @property
    def model(self) -> Any:
        return self.backbone.model

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _now(self) -> float:
        self._sync()
        return time.perf_counter()

    @property
    def close_ids(self) -> list[int]:
        return close_suffix_ids(self.tokenizer)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _decode_special(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def context_window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)

    def _generate(self, **kwargs: Any) -> Generated:
        return generate(self.model, self.tokenizer, end_ids=self.end_ids, sync=self._sync, **kwargs)

    def _batch(self, items: list[_Item]) -> PromptBatch:
        return PromptBatch.of([item.prompt for item in items], self.tokenizer.pad_token_id, self.device)

    def _prepare(self, problems: Sequence[Problem], thinking: bool, reserve: int) -> tuple[list[_Item], dict[int, str]]:
        """Tokenized prompts of the problems that fit `context_window - reserve`; errors for the others."""
        items, errors = [], {}
        window = self.context_window()
        for position, problem in enumerate(problems):
            prompt = encode_prompt(self.tokenizer, problem, thinking=thinking)
            if len(prompt.ids) + reserve > window:
                errors[position] = (
                    f"does not fit the context: {len(prompt.ids)} prompt tokens + {reserve} to generate > {window}"
                )
                continue
            items.append(_Item(position, prompt))
        return items, errors

    # ---- the modes -----------------------------------------------------------------------

    def _answer_no_think(self, batch: list[_Item], max_new_tokens: int, max_thinking_tokens: int, capture: bool,
                         reference: Reference) -> list[AnswerResult]:
        start = self._now()
        prompts = self._batch(batch)
        generated = self._generate(input_ids=prompts.input_ids, attention_mask=prompts.mask,
                                   max_new_tokens=max_new_tokens, capture_first_logits=capture)
        end = self._now()
        results = [self._result(item, "no_think", generated, row, start, end, generated.first_logits)
                   for row, item in enumerate(batch)]
        if reference is not None:
            cot = self._cot_context([self._thinking_item(item, "no_think") for item in batch], max_thinking_tokens)
            self._score_answers(results, self._reference_answers(batch, reference, results, max_new_tokens), cot,
                                self._prompt_context(prompts))
        return results

    def _answer_cot(self, batch: list[_Item], max_new_tokens: int, max_thinking_tokens: int,
                    capture: bool, reference: Reference) -> list[AnswerResult]:
        start = self._now()
        prompts = self._batch(batch)
        budget = ThinkingBudget(max_thinking_tokens, self.close_ids, max_new_tokens, after_tag_ids(self.tokenizer))
        generated = self._generate(input_ids=prompts.input_ids, attention_mask=prompts.mask, think=budget,
                                   capture_first_logits=capture)
        end = self._now()
        results = []
        for row, item in enumerate(batch):
            result = self._result(item, "cot", generated, row, start, end, generated.first_logits)
            thought = self._remember(item, max_thinking_tokens, generated, row)
            result.thinking_tokens, result.thinking_text = len(thought.ids), self.decode(thought.ids)
            result.closed_thinking = thought.closed
            results.append(result)
        if reference is not None:  # the mode's context is cot's own: one pass serves both sides
            context = self._cot_context(batch, max_thinking_tokens)
            self._score_answers(results, self._reference_answers(batch, reference, results, max_new_tokens), context,
                                context)
        return results

    def _answer_latent(self, batch: list[_Item], mode: str, max_new_tokens: int, max_thinking_tokens: int,
                       n_supervision_steps: int | None, capture: bool, reference: Reference) -> list[AnswerResult]:
        sources, thoughts = batch, None
        if mode in ORACLE_MODES:  # the true state exists first: thinking and extraction are not timed
            sources = [item.partner or item for item in batch] if mode == "shuffled" else batch
            thoughts = self.thoughts(sources, max_thinking_tokens)
            states = self.end_of_thinking_states(sources, thoughts)
            start = self._now()
            latent = self.state_inputs(batch, states, compress=mode != "oracle_full")
        else:
            start = self._now()
            latent = self.latent_inputs(batch, first_token=mode == "trm_first_token",
                                        n_supervision_steps=n_supervision_steps)
        remaining = max_new_tokens - (latent.first_token is not None)
        generated = self._generate(inputs_embeds=latent.inputs_embeds, attention_mask=latent.attention_mask,
                                   cache=latent.cache, max_new_tokens=remaining, capture_first_logits=capture)
        end = self._now()
        first_logits = generated.first_logits
        if latent.first_token is not None:  # the first answer token came from lm_head, before generation
            first = latent.first_token.tolist()
            generated.new_ids = [cut_at_end([token] + ids, self.end_ids) for token, ids in zip(first, generated.new_ids)]
            generated.answer_times = [latent.ready_time] * len(batch)
            first_logits = latent.first_logits
        steps = latent.trm_output.steps_used.tolist() if latent.trm_output is not None else None
        results = []
        for row, item in enumerate(batch):
            result = self._result(item, mode, generated, row, start, end, first_logits if capture else None)
            result.trm_overhead_s, result.soft_vectors = latent.overhead_s, self.adapter.n_vectors
            if steps is not None:
                result.trm_steps = int(steps[row])
            if thoughts is not None:
                result.thinking_tokens, result.closed_thinking = len(thoughts[row].ids), thoughts[row].closed
                result.state_source = sources[row].problem.sample_id
            results.append(result)
        if reference is not None and mode not in UNSCORED_MODES:  # both on the prompt's cache, rewound
            mine = latent.after_prompt()
            cot = self._cot_context(batch, max_thinking_tokens, latent.prompts, latent.cache)
            self._score_answers(results, self._reference_answers(batch, reference, results, max_new_tokens), cot, mine)
        return results

    # ---- cot's answer under a mode, teacher-forced -----------------------------------------

    def _thinking_item(self, item: _Item, mode: str) -> _Item:
        """The item with the thinking prompt cot answered from (no_think's items hold the one without thinking)."""
        if mode != "no_think":
            return item
        return _Item(item.position, encode_prompt(self.tokenizer, item.problem, thinking=True))

    def _cot_thought(self, item: _Item, max_thinking_tokens: int) -> Thought | None:
        return self.remembered_thinking.get((tuple(item.prompt.ids), max_thinking_tokens))

    def _cot_context(self, items: list[_Item], max_thinking_tokens: int, prompts: PromptBatch | None = None,
                     cache: Any = None) -> _Context:
        """cot's context before its answer, `[prompt][its remembered thinking]</think>\n`: the thinking and the
        suffix (left-padded, so every row's suffix ends in the last column) after the prompts' KV cache, given
        (`prompts`, `cache`) or from a new prompt pass."""
        if prompts is None:
            prompts = self._batch(items)
            _, cache = prompt_pass(self.model, prompts.input_ids, prompts.mask, self.layer)
        thoughts = [self._cot_thought(item, max_thinking_tokens) for item in items]
        # no thinking remembered: cot did not answer that problem, and its row has no answer to score
        tails = [list(thought.ids if thought is not None else ()) + self.close_ids for thought in thoughts]
        ids, mask = pad_token_ids(tails, self.tokenizer.pad_token_id, self.device, side="left")
        return _Context(prompts.mask, cache, embed(self.model, ids), mask)

    def _prompt_context(self, prompts: PromptBatch) -> _Context:
        """A prompt that ends where the answer starts (no_think's), whole: no cached prefix."""
        return _Context(prompts.mask[:, :0], None, embed(self.model, prompts.input_ids), prompts.mask)

    @staticmethod
    def _reference_answers(batch: list[_Item], reference: Reference, own: list[AnswerResult],
                           max_new_tokens: int) -> list[list[int]]:
        """cot's answer ids for each item (none where cot failed), at most `max_new_tokens`."""
        rows = own if reference == "own" else [reference[item.position] for item in batch]
        return [list(row.answer_ids)[:max_new_tokens] if row.error is None else [] for row in rows]

    def _answer_log_probs(self, context: _Context, answer_ids: Tensor, answer_mask: Tensor) -> Tensor:
        """log p(a_t | context, a_<t) for t = 1..T: [B, T, V] fp32, teacher-forced on right-padded answers [B, T].

        The context's last position predicts a_1, a_t predicts a_t+1; padding is masked out and skipped by the
        position ids, so each row sees what an unpadded pass sees. The cache is rewound to its prefix after."""
        width = context.prefix_mask.shape[1]
        answer_in = embed(self.model, answer_ids[:, :-1]).to(context.inputs_embeds.dtype)
        mask = torch.cat([context.prefix_mask, context.mask, answer_mask[:, :-1]], dim=1)
        out = self.model(inputs_embeds=torch.cat([context.inputs_embeds, answer_in], dim=1), attention_mask=mask,
                         position_ids=position_ids(mask)[:, width:], cache=context.cache,
                         use_cache=context.cache is not None, logits_to_keep=answer_ids.shape[1])
        if context.cache is not None:
            rewind_cache(context.cache, width)
        return out.logits.float().log_softmax(dim=-1)

    def _score_answers(self, results: list[AnswerResult], answers: list[list[int]], cot: _Context,
                       mode: _Context) -> None:
        """Each result's `answer_kl_to_cot` and `cot_answer_nll`: cot's answers teacher-forced after cot's context
        and after the mode's, in one batch; the [B, T, V] distributions are dropped once scored."""
        if not any(answers):
            return
        ids, mask = pad_token_ids(answers, self.tokenizer.pad_token_id, self.device, side="right")
        reference = self._answer_log_probs(cot, ids, mask)
        mine = reference if mode is cot else self._answer_log_probs(mode, ids, mask)  # cot: its own context
        kl, nll = answer_kl(reference, mine, mask).tolist(), answer_nll(mine, ids, mask).tolist()
        del reference, mine
        for result, row_kl, row_nll in zip(results, kl, nll, strict=True):
            result.answer_kl_to_cot = None if math.isnan(row_kl) else row_kl
            result.cot_answer_nll = None if math.isnan(row_nll) else row_nll

    def _check_reference(self, reference: Reference, problems: Sequence[Problem], mode: str, items: list[_Item],
                         max_thinking_tokens: int) -> None:
        """cot's results fit these problems, and cot's thinking on each problem it answered is remembered."""
        if isinstance(reference, str):
            if reference != "own" or mode != "cot":
                raise LLMTRMError(f"reference={reference!r} in mode {mode}: only mode cot takes 'own' (its own "
                                  "answers); the other modes take cot's results on the same problems.")
            return
        if [row.sample_id for row in reference] != [problem.sample_id for problem in problems]:
            raise LLMTRMError(f"reference= holds results for {len(reference)} problems that are not these "
                              f"{len(problems)} in this order: pass cot's results on the very problems being answered.")
        if mode == "cot" or mode in UNSCORED_MODES:  # cot remembers its own thinking as it answers
            return
        for item in items:
            row = reference[item.position]
            if row.error is None and row.answer_ids and self._cot_thought(self._thinking_item(item, mode),
                                                                          max_thinking_tokens) is None:
                raise LLMTRMError(
                    f"cot's thinking on {row.sample_id} (max_thinking_tokens={max_thinking_tokens}) is not remembered "
                    "here: score against cot results from this reasoner (or one sharing its remembered_thinking), "
                    "run with the same max_thinking_tokens.")

    # ---- the LLM's own thinking (oracle modes) ------------------------------------------

    def _remember(self, item: _Item, max_thinking_tokens: int, generated: Generated, row: int) -> Thought:
        thought = Thought(tuple(generated.thinking_ids(row, self._decode_special)), generated.closed[row])
        self.remembered_thinking[(tuple(item.prompt.ids), max_thinking_tokens)] = thought
        return thought

    @torch.no_grad()
    def thoughts(self, items: Sequence[_Item] | Sequence[Problem], max_thinking_tokens: int) -> list[Thought]:
        """The LLM's thinking on each problem's prompt, as `cot` does it (one generation, the closing tag
        forced at the budget): remembered ones as they are, the others generated in one batch."""
        items = self._as_items(items)
        keys = [(tuple(item.prompt.ids), max_thinking_tokens) for item in items]
        remembered = self.remembered_thinking
        missing = list({key: item for key, item in zip(keys, items) if key not in remembered}.values())
        if missing:
            prompts = self._batch(missing)
            # one answer token: the step after the closing tag is where a row's thinking is known to end
            budget = ThinkingBudget(max_thinking_tokens, self.close_ids, 1, after_tag_ids(self.tokenizer))
            generated = self._generate(input_ids=prompts.input_ids, attention_mask=prompts.mask, think=budget)
            for row, item in enumerate(missing):
                self._remember(item, max_thinking_tokens, generated, row)
        return [self.remembered_thinking[key] for key in keys]

    @torch.no_grad()
    def end_of_thinking_states(self, items: Sequence[_Item] | Sequence[Problem], thoughts: Sequence[Thought]) -> Tensor:
        """The true end-of-thinking states: one right-padded extraction pass over prompt + thinking + the
        canonical closing tag (as datagen stores them), the last m states ending at the tag's last token:
        [B, D] when the adapter takes one state, [B, m, D] when it takes m."""
        items = self._as_items(items)
        sequences = [item.prompt.ids + list(thought.ids) + self.close_ids for item, thought in zip(items, thoughts)]
        _, post = extraction_pass(self.model, sequences, [item.prompt.pre_length for item in items], self.layer,
                                  self.n_states, self.tokenizer.pad_token_id, self.device)
        last = torch.stack(post)
        return last[:, -1] if self.n_states == 1 else last

    # ---- the TRM path --------------------------------------------------------------------

    def _check_first_token_layer(self) -> None:
        if self.layer != -1:
            raise ConfigMismatchError(
                f"trm_first_token applies lm_head to the predicted state, which needs layer -1 "
                f"(after the final norm), but the compressor works on layer {self.layer}: use mode `trm`."
            )

    def _first_token_logits(self, predicted: Tensor) -> Tensor:
        """lm_head on the predicted state (the last one of m), fp32 [B, V]."""
        self._check_first_token_layer()
        head = self.model.get_output_embeddings()
        return head(closing_state(predicted).to(head.weight.dtype)).float()

    def _as_items(self, batch: Sequence[_Item] | Sequence[Problem]) -> list[_Item]:
        """Items as given, or problems prepared as thinking prompts (one that does not fit is an error)."""
        if batch and isinstance(batch[0], Problem):
            batch, errors = self._prepare(batch, thinking=True, reserve=0)
            if errors:
                raise LLMTRMError(next(iter(errors.values())))
        return list(batch)

    @torch.no_grad()
    def latent_inputs(self, batch: list[_Item] | Sequence[Problem], first_token: bool = False,
                      n_supervision_steps: int | None = None) -> LatentInputs:
        """The TRM modes' inputs for the LLM: `prompt [k soft vectors] </think>` (+ the first token)."""
        if self.parts is None:
            raise LLMTRMError("the TRM modes need a compressor and a TRM: pass `compressor=` and `trm=`.")
        prompts = self._batch(self._as_items(batch))
        states, cache = prompt_pass(self.model, prompts.input_ids, prompts.mask, self.layer)
        pre, pre_mask = pre_states(states, prompts.mask, prompts.pre_lengths)
        started = self._now()
        output = predict(self.parts.compressor, self.parts.trm, pre, pre_mask, n_supervision_steps)
        predicted, soft = soft_vectors(self.parts.compressor, self.parts.adapter, output.prediction)
        overhead = self._now() - started
        logits = self._first_token_logits(predicted) if first_token else None
        token = logits.argmax(dim=-1) if logits is not None else None
        tail = self.model.get_input_embeddings()(token)[:, None, :] if token is not None else None
        embeds, mask = soft_inputs(self.model, prompts, soft, self.close_ids, tail=tail)
        return LatentInputs(embeds, mask, cache, output, predicted, token, overhead, self._now(), pre, pre_mask,
                            logits, prompts)

    @torch.no_grad()
    def state_inputs(self, batch: list[_Item] | Sequence[Problem], states: Tensor, compress: bool = True) -> LatentInputs:
        """The oracle modes' inputs: given end-of-thinking states [B, (m,) D] take the TRM's path from its
        output on: (compress ->) decompress -> adapter -> `prompt [k soft vectors] </think>`, on the
        prompt's KV cache as in `trm`."""
        if compress and self._compressor is None:
            raise LLMTRMError("`oracle` and `shuffled` send the state through the compressor: pass `compressor=`.")
        prompts = self._batch(self._as_items(batch))
        _, cache = prompt_pass(self.model, prompts.input_ids, prompts.mask, self.layer)
        started = self._now()
        if compress:
            compressed = self._compressor.compress(states.to(self._compressor.weight.dtype))
            state, soft = soft_vectors(self._compressor, self.adapter, compressed)
        else:
            state = states.float()
            soft = self.adapter(state)
        overhead = self._now() - started
        embeds, mask = soft_inputs(self.model, prompts, soft, self.close_ids)
        return LatentInputs(embeds, mask, cache, None, state, None, overhead, self._now(), prompts=prompts)

    @torch.no_grad()
    def first_answer_logits(self, problems: Sequence[Problem], mode: Mode = "trm",
                            max_thinking_tokens: int = 512) -> Tensor:
        """Logits [B, V] (fp32) of the first answer token in `mode`: exactly what `answer` captures.

        `cot` and the oracle modes think first (up to `max_thinking_tokens`); `trm_first_token` is
        lm_head on the predicted state. A problem that got no answer has a row of NaN.
        """
        results = self.answer(problems, mode=mode, max_new_tokens=1, max_thinking_tokens=max_thinking_tokens,
                              batch_size=max(1, len(problems)), capture_logits=True)
        vocabulary = self.model.get_output_embeddings().weight.shape[0]
        missing = torch.full((vocabulary,), float("nan"))
        return torch.stack([r.first_token_logits if r.first_token_logits is not None else missing for r in results])

    # ---- results -------------------------------------------------------------------------

    def _result(self, item: _Item, mode: str, generated: Generated, row: int, start: float,
                end: float, first_logits: Tensor | None = None) -> AnswerResult:
        answer_ids = generated.answer_ids(row)
        text = self.decode(answer_ids)
        problem = item.problem
        answered_at = generated.answer_times[row] if answer_ids else None
        correct, checker_error = _check(problem, text)
        result = AnswerResult(
            sample_id=problem.sample_id,
            mode=mode,
            answer_text=text,
            extracted_answer=_extract(problem, text),
            correct=correct,
            checker_error=checker_error,
            answer_tokens=len(answer_ids),
            answer_ids=tuple(answer_ids),
            time_to_first_answer_token_s=(answered_at if answered_at is not None else end) - start,
            total_time_s=end - start,
        )
        logits = first_logits[row] if first_logits is not None else None
        if logits is not None and not bool(logits.isnan().any()):  # NaN: the row wrote no answer
            result.first_token_logits = logits.detach().float().cpu()
            result.first_answer_token = int(result.first_token_logits.argmax())
        return result

    # ---- public API ----------------------------------------------------------------------

    def _reserve(self, mode: str, max_new_tokens: int, max_thinking_tokens: int) -> int:
        """Tokens a mode adds after the prompt (the context check)."""
        close = len(self.close_ids)
        latent = self.adapter.n_vectors + close + max_new_tokens
        if mode == "cot":
            return max_thinking_tokens + close + max_new_tokens
        if mode in LATENT_MODES:
            return latent
        if mode in ORACLE_MODES:  # the thinking (and one more step), then the answer after the soft vectors
            return max(max_thinking_tokens + close + 1, latent)
        return max_new_tokens

    def check_mode(self, mode: str, max_thinking_tokens: int = 1) -> None:
        """One line when `mode` cannot run here: unknown, missing parts, or no thinking budget."""
        if mode not in MODES:
            raise LLMTRMError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}.")
        if mode in LATENT_MODES and not self.has_trm:
            raise LLMTRMError(f"mode {mode!r} needs a compressor and a TRM: pass `compressor=` and `trm=`.")
        if mode in COMPRESSOR_MODES and not self.has_compressor:
            raise LLMTRMError(f"mode {mode!r} sends the state through the compressor: pass `compressor=` "
                              "(`oracle_full` needs none).")
        if mode == "trm_first_token":
            self._check_first_token_layer()
        if mode in THINKING_MODES and max_thinking_tokens < 1:
            raise LLMTRMError(f"mode {mode!r} needs the LLM to think, but max_thinking_tokens is "
                              f"{max_thinking_tokens}: raise it or drop the mode.")

    def _answer_batch(self, batch: list[_Item], mode: str, max_new_tokens: int, max_thinking_tokens: int,
                      n_supervision_steps: int | None, capture: bool, reference: Reference) -> list[AnswerResult]:
        if mode == "cot":
            return self._answer_cot(batch, max_new_tokens, max_thinking_tokens, capture, reference)
        if mode == "no_think":
            return self._answer_no_think(batch, max_new_tokens, max_thinking_tokens, capture, reference)
        return self._answer_latent(batch, mode, max_new_tokens, max_thinking_tokens, n_supervision_steps, capture,
                                   reference)

    @torch.no_grad()
    def answer(
        self,
        problems: Sequence[Problem],
        mode: Mode = "trm",
        max_new_tokens: int = 256,
        max_thinking_tokens: int = 512,
        batch_size: int = 8,
        n_supervision_steps: int | None = None,
        on_error: Literal["raise", "record"] = "raise",
        progress: Callable[[int], None] | None = None,
        capture_logits: bool = False,
        shuffle_seed: int = 0,
        reference: Reference = None,
    ) -> list[AnswerResult]:
        """Answer `problems` in `mode`; one AnswerResult per problem, in order.

        max_new_tokens bounds the answer, max_thinking_tokens the thinking (`cot`, oracle modes);
        n_supervision_steps overrides the TRM's N_sup. A problem that does not fit the
        context gets a result with `error` set. With on_error="record" a failing batch is
        retried one problem at a time and a problem that still fails is recorded as an
        error (`crashed`) instead of raising. `progress(n)` is called after each n problems.
        capture_logits: keep each result's first-answer-token logits (`first_token_logits`).
        shuffle_seed: the derangement that pairs problems in `shuffled` (over the problems that fit).
        reference: `cot`'s results on these problems (same order, from this reasoner or one sharing its
        `remembered_thinking`, with the same max_thinking_tokens): score cot's answers under this mode
        (`answer_kl_to_cot`, `cot_answer_nll`; see the module docstring); in mode cot, "own" scores the
        answers it writes. Not timed; `trm_first_token` is not scored.
        """
        self.check_mode(mode, max_thinking_tokens)
        if batch_size < 1 or max_new_tokens < 1 or max_thinking_tokens < 0:
            raise ValueError("batch_size and max_new_tokens must be >= 1 and max_thinking_tokens >= 0.")
        reserve = self._reserve(mode, max_new_tokens, max_thinking_tokens)
        items, errors = self._prepare(problems, thinking=mode != "no_think", reserve=reserve)
        if reference is not None:
            self._check_reference(reference, problems, mode, items, max_thinking_tokens)
        if mode == "shuffled":
            if len(items) < 2:
                raise LLMTRMError(f"`shuffled` gives each problem another problem's state: it needs at least 2 "
                                  f"problems that fit the context, got {len(items)}.")
            for item, partner in zip(items, derangement(len(items), shuffle_seed)):
                item.partner = items[partner]
        results: list[AnswerResult | None] = [None] * len(problems)
        for position, message in errors.items():
            results[position] = AnswerResult(sample_id=problems[position].sample_id, mode=mode, error=message)
        if progress and errors:
            progress(len(errors))
        for begin in range(0, len(items), batch_size):
            batch = items[begin : begin + batch_size]
            run = lambda chunk: self._answer_batch(chunk, mode, max_new_tokens, max_thinking_tokens,  # noqa: E731
                                                   n_supervision_steps, capture_logits, reference)
            for item, result in zip(batch, self._run_guarded(batch, mode, run, on_error)):
                results[item.position] = result
            if progress:
                progress(len(batch))
        return [r for r in results if r is not None]

    def _run_guarded(self, batch: list[_Item], mode: str, run: Callable[[list[_Item]], list[AnswerResult]],
                     on_error: str) -> list[AnswerResult]:
        if on_error == "raise":
            return run(batch)
        try:
            return run(batch)
        except Exception:  # noqa: BLE001 - retried one by one so one bad problem costs only itself
            pass
        results = []
        for item in batch:
            try:
                results.extend(run([item]))
            except Exception as error:  # noqa: BLE001 - recorded, counted in the report
                message = f"{type(error).__name__}: {error}".splitlines()[0]
                results.append(AnswerResult(sample_id=item.problem.sample_id, mode=mode, error=message, crashed=True))
        return results


# --------------------------------------------------------------------------- answer checking


def _extract(problem: Problem, text: str) -> str | None:
    if not text.strip():
        return None
    return extract_code(text) if problem.kind == "code" else extract_math_answer(text)


def _check(problem: Problem, text: str) -> tuple[bool | None, str | None]:
    """(correct, checker error): True/False against the gold answer or tests; (None, None) when the
    problem has nothing to check against; (None, the error) when the checker itself raised, which
    is neither a right nor a wrong answer and is counted apart."""
    if not problem.has_gold:
        return None, None
    try:
        return bool(check_answer(problem, text)), None
    except Exception as error:  # noqa: BLE001 - counted apart in the report, never a crash
        return None, f"{type(error).__name__}: {error}".splitlines()[0]
