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
              predicted state (the state at the closing tag predicts it), as the seed's
              inference did; the LLM continues after it.

The latent path itself (prompts, prompt pass, pre states, soft inputs, loading the parts) is
`llm_trm.latent`, shared with datagen and GRPO; generation is `llm_trm.generation`. This class
keeps the modes, batching, timing and results. Times are per problem, from the start of the
batch it ran in to its first answer token and to the batch's end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from llm_trm.backbone import Backbone, load_backbone
from llm_trm.data.problems import Problem
from llm_trm.errors import ConfigMismatchError, LLMTRMError
from llm_trm.eval.answers import check_answer, extract_code, extract_math_answer
from llm_trm.generation import Generated, ThinkingBudget, generate
from llm_trm.latent import (LatentParts, Prompt, PromptBatch, encode_prompt, load_compressor_and_trm, pre_states,
                            predict, prompt_pass, soft_inputs, soft_vectors)
from llm_trm.models.adapter import LatentAdapter
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.trm import SequenceTRM, TRMOutput
from llm_trm.thinking import THINK_CLOSE, cut_at_end, end_of_turn_ids

__all__ = ["MODES", "LATENT_MODES", "AnswerResult", "LatentInputs", "LatentReasoner", "wilson_interval"]

MODES = ("cot", "no_think", "trm", "trm_first_token")
LATENT_MODES = ("trm", "trm_first_token")
Mode = Literal["cot", "no_think", "trm", "trm_first_token"]


# --------------------------------------------------------------------------- results


@dataclass
class AnswerResult:
    """One problem answered in one mode.

    thinking_tokens: tokens the LLM generated inside the think block (0 in the TRM modes,
    whose thinking is `soft_vectors` input vectors); answer_tokens: tokens after it.
    Times are in seconds from the start of the problem's batch. `error` is set (and
    the answer empty) when the problem could not be answered, e.g. it does not fit
    the context window.
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
    trm_overhead_s: float | None = None  # compression + recursion + decompression + adapter
    soft_vectors: int = 0
    closed_thinking: bool | None = None  # cot: whether the LLM closed its thinking itself
    thinking_text: str = ""
    error: str | None = None

    @property
    def generated_tokens(self) -> int:
        return self.thinking_tokens + self.answer_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wilson_interval(successes: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval for a proportion (95% by default); (0, 0) when total is 0."""
    if total <= 0:
        return 0.0, 0.0
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * ((p * (1 - p) / total + z * z / (4 * total * total)) ** 0.5) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class _Item:
    """A problem that fits the context: its place in the caller's list and its prompt."""

    position: int
    prompt: Prompt

    @property
    def problem(self) -> Problem:
        return self.prompt.problem


@dataclass
class LatentInputs:
    """What the TRM modes hand the LLM: the full input embeddings, the prompt's KV cache, and stats."""

    inputs_embeds: Tensor  # [B, W + suffix, E]: prompt embeddings, soft vectors, closing tag (, first token)
    attention_mask: Tensor
    cache: Any  # the prompt's KV cache (consumed by the next forward/generate)
    trm_output: TRMOutput
    predicted_state: Tensor  # [B, D] the decompressed prediction
    first_token: Tensor | None  # [B] trm_first_token only
    overhead_s: float
    ready_time: float  # when the inputs (and, in trm_first_token, the first answer token) exist
    pre: Tensor | None = None  # [B, L, D] the prompt states the TRM read (as datagen stores them)
    pre_mask: Tensor | None = None


# --------------------------------------------------------------------------- the reasoner


class LatentReasoner:
    """The frozen LLM with, optionally, a trained compressor + TRM + input adapter.

    Args:
        backbone: a backbone spec (`embedded`, Hub id, local dir, .gguf) or a loaded `Backbone`.
        compressor: export folder, Hub id, `.ckpt`, or a DimensionCompressor (needed for the TRM modes).
        trm: export folder, Hub id, `.ckpt`, or a SequenceTRM (needed for the TRM modes).
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
        if (compressor is None) != (trm is None):
            raise ConfigMismatchError("the TRM modes need both a compressor and a TRM: pass both or neither.")
        # the small parts load first, so a wrong path fails before the LLM is loaded
        loaded = load_compressor_and_trm(compressor, trm, allow_unchecked_artifacts) if compressor is not None and trm is not None else None
        self.backbone = backbone if isinstance(backbone, Backbone) else load_backbone(
            backbone, dtype, trust_remote_code, attn_implementation)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.backbone.to(self.device)
        self.tokenizer = self.backbone.tokenizer
        self.parts: LatentParts | None = None
        self.layer = self.backbone.check_layer(-1 if layer is None else layer)
        if loaded is not None:
            parts = LatentParts.load(self.backbone, compressor, trm, adapter, n_soft_vectors, layer, loaded=loaded)
            self.parts = parts.to(self.device).frozen()
            self.layer = parts.layer
        self.end_ids = end_of_turn_ids(self.tokenizer, self.model)

    # ---- small utilities -----------------------------------------------------------------

    @property
    def has_trm(self) -> bool:
        return self.parts is not None

    @property
    def compressor(self) -> DimensionCompressor | None:
        return self.parts.compressor if self.parts else None

    @property
    def trm(self) -> SequenceTRM | None:
        return self.parts.trm if self.parts else None

    @property
    def adapter(self) -> LatentAdapter | None:
        return self.parts.adapter if self.parts else None

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
        return self.tokenizer.encode(THINK_CLOSE, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

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

    def _answer_no_think(self, batch: list[_Item], max_new_tokens: int) -> list[AnswerResult]:
        start = self._now()
        prompts = self._batch(batch)
        generated = self._generate(input_ids=prompts.input_ids, attention_mask=prompts.mask,
                                   max_new_tokens=max_new_tokens)
        end = self._now()
        return [self._result(item, "no_think", generated, row, start, end) for row, item in enumerate(batch)]

    def _answer_cot(self, batch: list[_Item], max_new_tokens: int, max_thinking_tokens: int) -> list[AnswerResult]:
        start = self._now()
        prompts = self._batch(batch)
        budget = ThinkingBudget(max_thinking_tokens, self.close_ids, max_new_tokens)
        generated = self._generate(input_ids=prompts.input_ids, attention_mask=prompts.mask, think=budget)
        end = self._now()
        results = []
        for row, item in enumerate(batch):
            result = self._result(item, "cot", generated, row, start, end)
            thinking = generated.thinking_ids(row, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False))
            result.thinking_tokens, result.thinking_text = len(thinking), self.decode(thinking)
            result.closed_thinking = generated.closed[row]
            results.append(result)
        return results

    def _answer_latent(self, batch: list[_Item], mode: str, max_new_tokens: int,
                       n_supervision_steps: int | None) -> list[AnswerResult]:
        start = self._now()
        latent = self.latent_inputs(batch, first_token=mode == "trm_first_token", n_supervision_steps=n_supervision_steps)
        remaining = max_new_tokens - (latent.first_token is not None)
        generated = self._generate(inputs_embeds=latent.inputs_embeds, attention_mask=latent.attention_mask,
                                   cache=latent.cache, max_new_tokens=remaining)
        end = self._now()
        if latent.first_token is not None:  # the first answer token came from lm_head, before generation
            first = latent.first_token.tolist()
            generated.new_ids = [cut_at_end([token] + ids, self.end_ids) for token, ids in zip(first, generated.new_ids)]
            generated.answer_times = [latent.ready_time] * len(batch)
        steps = latent.trm_output.steps_used.tolist()
        results = []
        for row, item in enumerate(batch):
            result = self._result(item, mode, generated, row, start, end)
            result.trm_steps, result.trm_overhead_s = int(steps[row]), latent.overhead_s
            result.soft_vectors = self.adapter.n_vectors
            results.append(result)
        return results

    # ---- the TRM path --------------------------------------------------------------------

    def _check_first_token_layer(self) -> None:
        if self.layer != -1:
            raise ConfigMismatchError(
                f"trm_first_token applies lm_head to the predicted state, which needs layer -1 "
                f"(after the final norm), but the compressor works on layer {self.layer}: use mode `trm`."
            )

    def _first_token(self, predicted: Tensor) -> Tensor:
        self._check_first_token_layer()
        head = self.model.get_output_embeddings()
        return head(predicted.to(head.weight.dtype)).argmax(dim=-1)

    @torch.no_grad()
    def latent_inputs(self, batch: list[_Item] | Sequence[Problem], first_token: bool = False,
                      n_supervision_steps: int | None = None) -> LatentInputs:
        """The TRM modes' inputs for the LLM: `prompt [k soft vectors] </think>` (+ the first token)."""
        if self.parts is None:
            raise LLMTRMError("the TRM modes need a compressor and a TRM: pass `compressor=` and `trm=`.")
        if batch and isinstance(batch[0], Problem):
            batch, errors = self._prepare(batch, thinking=True, reserve=0)
            if errors:
                raise LLMTRMError(next(iter(errors.values())))
        prompts = self._batch(batch)
        states, cache = prompt_pass(self.model, prompts.input_ids, prompts.mask, self.layer)
        pre, pre_mask = pre_states(states, prompts.mask, prompts.pre_lengths)
        started = self._now()
        output = predict(self.parts.compressor, self.parts.trm, pre, pre_mask, n_supervision_steps)
        predicted, soft = soft_vectors(self.parts.compressor, self.parts.adapter, output.prediction)
        overhead = self._now() - started
        token = self._first_token(predicted) if first_token else None
        tail = self.model.get_input_embeddings()(token)[:, None, :] if token is not None else None
        embeds, mask = soft_inputs(self.model, prompts, soft, self.close_ids, tail=tail)
        return LatentInputs(embeds, mask, cache, output, predicted, token, overhead, self._now(), pre, pre_mask)

    @torch.no_grad()
    def first_answer_logits(self, problems: Sequence[Problem], mode: Mode = "trm") -> Tensor:
        """Logits [B, V] of the first answer token (the one after the think block) in `mode`.

        `trm` runs the very inputs `answer` generates from (prompt cache, soft vectors,
        closing tag); `trm_first_token` is lm_head on the predicted state; `cot` closes
        the thinking at once; `no_think` uses the empty think block.
        """
        from llm_trm.batching import pad_token_ids, position_ids

        if mode == "trm_first_token":
            latent = self.latent_inputs(problems)
            return self.model.get_output_embeddings()(latent.predicted_state.to(self.model.dtype))
        if mode == "trm":
            latent = self.latent_inputs(problems)
            cached = latent.cache.get_seq_length()
            out = self.model(
                inputs_embeds=latent.inputs_embeds[:, cached:],
                attention_mask=latent.attention_mask,
                position_ids=position_ids(latent.attention_mask)[:, cached:],
                cache=latent.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            return out.logits[:, -1]
        thinking = mode == "cot"
        items, _ = self._prepare(problems, thinking=thinking, reserve=0)
        sequences = [item.prompt.ids + (self.close_ids if thinking else []) for item in items]
        input_ids, mask = pad_token_ids(sequences, self.tokenizer.pad_token_id, self.device)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=1)
        return out.logits[:, -1]

    # ---- results -------------------------------------------------------------------------

    def _result(self, item: _Item, mode: str, generated: Generated, row: int, start: float,
                end: float) -> AnswerResult:
        answer_ids = generated.answer_ids(row)
        text = self.decode(answer_ids)
        problem = item.problem
        answered_at = generated.answer_times[row] if answer_ids else None
        return AnswerResult(
            sample_id=problem.sample_id,
            mode=mode,
            answer_text=text,
            extracted_answer=_extract(problem, text),
            correct=_check(problem, text),
            answer_tokens=len(answer_ids),
            time_to_first_answer_token_s=(answered_at if answered_at is not None else end) - start,
            total_time_s=end - start,
        )

    # ---- public API ----------------------------------------------------------------------

    def _reserve(self, mode: str, max_new_tokens: int, max_thinking_tokens: int) -> int:
        """Tokens a mode adds after the prompt (the context check)."""
        close = len(self.close_ids)
        if mode == "cot":
            return max_thinking_tokens + close + max_new_tokens
        if mode in LATENT_MODES:
            return self.adapter.n_vectors + close + max_new_tokens  # type: ignore[union-attr]
        return max_new_tokens

    def _answer_batch(self, batch: list[_Item], mode: str, max_new_tokens: int, max_thinking_tokens: int,
                      n_supervision_steps: int | None) -> list[AnswerResult]:
        if mode == "cot":
            return self._answer_cot(batch, max_new_tokens, max_thinking_tokens)
        if mode == "no_think":
            return self._answer_no_think(batch, max_new_tokens)
        return self._answer_latent(batch, mode, max_new_tokens, n_supervision_steps)

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
    ) -> list[AnswerResult]:
        """Answer `problems` in `mode`; one AnswerResult per problem, in order.

        max_new_tokens bounds the answer, max_thinking_tokens the thinking (`cot`);
        n_supervision_steps overrides the TRM's N_sup. A problem that does not fit the
        context gets a result with `error` set. With on_error="record" a failing batch is
        retried one problem at a time and a problem that still fails is recorded as an
        error instead of raising. `progress(n)` is called after each n problems.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}.")
        if mode in LATENT_MODES and not self.has_trm:
            raise LLMTRMError(f"mode {mode!r} needs a compressor and a TRM: pass `compressor=` and `trm=`.")
        if mode == "trm_first_token":
            self._check_first_token_layer()
        if batch_size < 1 or max_new_tokens < 1 or max_thinking_tokens < 0:
            raise ValueError("batch_size and max_new_tokens must be >= 1 and max_thinking_tokens >= 0.")
        reserve = self._reserve(mode, max_new_tokens, max_thinking_tokens)
        items, errors = self._prepare(problems, thinking=mode != "no_think", reserve=reserve)
        results: list[AnswerResult | None] = [None] * len(problems)
        for position, message in errors.items():
            results[position] = AnswerResult(sample_id=problems[position].sample_id, mode=mode, error=message)
        if progress and errors:
            progress(len(errors))
        for begin in range(0, len(items), batch_size):
            batch = items[begin : begin + batch_size]
            for item, result in zip(batch, self._run_guarded(batch, mode, max_new_tokens, max_thinking_tokens,
                                                             n_supervision_steps, on_error)):
                results[item.position] = result
            if progress:
                progress(len(batch))
        return [r for r in results if r is not None]

    def _run_guarded(self, batch: list[_Item], mode: str, max_new_tokens: int, max_thinking_tokens: int,
                     n_supervision_steps: int | None, on_error: str) -> list[AnswerResult]:
        run = lambda items: self._answer_batch(items, mode, max_new_tokens, max_thinking_tokens, n_supervision_steps)  # noqa: E731
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
                results.append(AnswerResult(sample_id=item.problem.sample_id, mode=mode, error=message))
        return results


# --------------------------------------------------------------------------- answer checking


def _extract(problem: Problem, text: str) -> str | None:
    if not text.strip():
        return None
    return extract_code(text) if problem.kind == "code" else extract_math_answer(text)


def _check(problem: Problem, text: str) -> bool | None:
    """True/False against the gold answer or tests; None when the problem has none to check against."""
    if not problem.has_gold:
        return None
    try:
        return bool(check_answer(problem, text))
    except Exception:  # noqa: BLE001 - a checker failure is a wrong answer, never a crash
        return False
