"""LatentReasoner: answer problems with the frozen LLM, thinking, not thinking, or with the TRM.

    reasoner = LatentReasoner("embedded", compressor="runs/demo/compressor_1b", trm="runs/demo/trm_model")
    results = reasoner.answer(problems, mode="trm", max_new_tokens=128)

Modes (all batched, left-padded, greedy):

- `cot`:      the LLM thinks (at most `max_thinking_tokens`, the tag is closed for it
              when it does not close it), then answers;
- `no_think`: the empty think block, the LLM answers at once;
- `trm`:      one forward pass over the thinking prompt gives the KV cache and the
              prompt's hidden states (up to and including the opening think tag); these
              are compressed, the TRM reasons (per-sample halting, at most N_sup steps),
              its prediction is decompressed and mapped by the input adapter to k soft
              input vectors, which stand in for the thinking:
              `prompt <think>\\n [k soft vectors] </think>`; the LLM answers from there,
              reusing the prompt's KV cache;
- `trm_first_token`: as `trm`, but the first answer token is `lm_head` applied to the
              predicted state (the state at the closing tag predicts it), as the seed's
              inference did; the LLM continues after it.

Latencies are wall times of the batch a problem ran in (with batch_size=1: per problem).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from llm_trm.backbone import THINK_CLOSE, THINK_OPEN, Backbone, load_backbone
from llm_trm.batching import pad_token_ids, position_ids
from llm_trm.data.problems import Problem, build_chat_prompt
from llm_trm.errors import ConfigMismatchError, LLMTRMError
from llm_trm.eval.answers import check_answer, extract_code, extract_math_answer
from llm_trm.hub import check_compatible, load_compressor, load_trm
from llm_trm.models.adapter import LatentAdapter, LinearAdapter, NormMatchAdapter
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.trm import SequenceTRM, TRMOutput

__all__ = ["MODES", "AnswerResult", "LatentReasoner", "wilson_interval"]

MODES = ("cot", "no_think", "trm", "trm_first_token")
LATENT_MODES = ("trm", "trm_first_token")
ADAPTER_SUBFOLDER = "adapter"  # a learnable adapter is saved inside the TRM's export folder
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


# --------------------------------------------------------------------------- loading


def _describe(spec: Any, kind: str) -> str:
    return f"{kind} {spec}" if isinstance(spec, (str, Path)) else f"the given {kind}"


def _load_part(kind: str, spec: Any, loader: Callable[[Any], Any]) -> Any:
    """`loader(spec)`, with a missing or unreadable artifact turned into one line naming it."""
    try:
        return loader(spec)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        if isinstance(err, LLMTRMError):
            raise
        raise LLMTRMError(f"cannot load the {kind} from {spec}: {err}".splitlines()[0]) from err


# --------------------------------------------------------------------------- helpers


class _FirstTokenClock:
    """A stopping criterion that never stops: it notes when the first new token exists."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.time: float | None = None

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        if self.time is None:
            self.sync()
            self.time = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _StopAfterText:
    """A stopping criterion: a row is done once its newest tokens contain `text`.

    transformers' `stop_strings` does the same but reads and sorts the whole vocabulary
    on every `generate` call; decoding each row's last few tokens is simpler and cheap.
    """

    def __init__(self, tokenizer: Any, text: str, prompt_width: int) -> None:
        self.tokenizer, self.text, self.prompt_width = tokenizer, text, prompt_width
        # the text's own tokens plus a few it may share a token with
        self.window = len(tokenizer.encode(text, add_special_tokens=False)) + 4

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        start = max(self.prompt_width, input_ids.shape[1] - self.window)
        tails = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=False)
        return torch.tensor([self.text in tail for tail in tails], dtype=torch.bool, device=input_ids.device)


def _cut_at(ids: list[int], end_ids: set[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in end_ids:
            return ids[:position]
    return ids


@dataclass
class _Prepared:
    """A problem that fits the context: its prompt ids and where the opening tag ends."""

    position: int  # index in the caller's list
    problem: Problem
    prompt_ids: list[int]
    pre_length: int = 0


@dataclass
class _Generated:
    new_ids: list[list[int]]
    first_token_time: float


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


# --------------------------------------------------------------------------- the reasoner


class LatentReasoner:
    """The frozen LLM with, optionally, a trained compressor + TRM + input adapter.

    Args:
        backbone: a backbone spec (`embedded`, Hub id, local dir, .gguf) or a loaded `Backbone`.
        compressor: export folder, Hub id, `.ckpt`, or a DimensionCompressor (needed for the TRM modes).
        trm: export folder, Hub id, `.ckpt`, or a SequenceTRM (needed for the TRM modes).
        adapter: `auto` (the TRM folder's `adapter/` when present, else `norm_match`),
            `norm_match`, `linear` (a fresh LinearAdapter), an adapter folder, or a LatentAdapter.
        n_soft_vectors: k, the number of soft vectors (for `norm_match` / a fresh `linear`).
        layer: hidden-state layer; by default the one the compressor records (else -1).
        dtype: backbone dtype (`auto`: bf16 on GPU, fp32 on CPU).
        device: where everything runs (default: cuda when available, else cpu).
        allow_unchecked_artifacts: use a compressor / TRM that does not record its backbone, layer, D, D'.
    """

    def __init__(
        self,
        backbone: str | Backbone,
        compressor: str | DimensionCompressor | None = None,
        trm: str | SequenceTRM | None = None,
        adapter: str | LatentAdapter = "auto",
        n_soft_vectors: int = 1,
        layer: int | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
        allow_unchecked_artifacts: bool = False,
    ) -> None:
        if (compressor is None) != (trm is None):
            raise ConfigMismatchError("the TRM modes need both a compressor and a TRM: pass both or neither.")
        # the small parts load first, so a wrong path fails before the LLM is loaded
        loaded = (self._load_latent_parts(compressor, trm, allow_unchecked_artifacts)
                  if compressor is not None and trm is not None else None)
        self.backbone = backbone if isinstance(backbone, Backbone) else load_backbone(backbone, dtype, trust_remote_code)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.backbone.to(self.device)
        self.tokenizer = self.backbone.tokenizer
        self.compressor: DimensionCompressor | None = None
        self.trm: SequenceTRM | None = None
        self.adapter: LatentAdapter | None = None
        self.layer = -1 if layer is None else layer
        if loaded is not None:
            self._attach_latent_parts(*loaded, compressor, trm, adapter, n_soft_vectors, layer)

    # ---- construction ------------------------------------------------------------------

    @staticmethod
    def _load_latent_parts(compressor_spec: str | DimensionCompressor, trm_spec: str | SequenceTRM,
                           allow_unchecked: bool = False) -> tuple[DimensionCompressor, SequenceTRM]:
        compressor = (compressor_spec if isinstance(compressor_spec, DimensionCompressor)
                      else _load_part("compressor", compressor_spec,
                                      lambda spec: load_compressor(str(spec), allow_unchecked=allow_unchecked)))
        trm = (trm_spec if isinstance(trm_spec, SequenceTRM)
               else _load_part("TRM", trm_spec, lambda spec: load_trm(str(spec), allow_unchecked=allow_unchecked)))
        return compressor, trm

    def _attach_latent_parts(
        self,
        compressor: DimensionCompressor,
        trm: SequenceTRM,
        compressor_spec: Any,
        trm_spec: Any,
        adapter_spec: str | LatentAdapter,
        n_soft_vectors: int,
        layer: int | None,
    ) -> None:
        """Check that compressor, TRM and adapter fit the backbone and each other; then keep them."""
        self.layer = self.backbone.check_layer(compressor.metadata.get("layer", -1) if layer is None else layer)
        self._check_compressor(compressor, _describe(compressor_spec, "compressor"))
        self._check_trm(trm, compressor, _describe(trm_spec, "TRM"))
        adapter = _load_part("adapter", adapter_spec, lambda spec: self._build_adapter(spec, trm_spec, n_soft_vectors))
        self._check_adapter(adapter)
        self.compressor = compressor.to(self.device).eval().requires_grad_(False)
        self.trm = trm.to(self.device).eval().requires_grad_(False)
        self.adapter = adapter.to(self.device).eval().requires_grad_(False)

    def _check_compressor(self, compressor: DimensionCompressor, source: str) -> None:
        hidden = self.backbone.hidden_size
        if compressor.d_model != hidden:
            raise ConfigMismatchError(
                f"{source} maps D={compressor.d_model} but backbone {self.backbone.backbone_id} has D={hidden}: "
                "use the compressor trained on this backbone."
            )
        check_compatible(source, compressor.metadata, {"backbone": self.backbone.backbone_id, "layer": self.layer})

    def _check_trm(self, trm: SequenceTRM, compressor: DimensionCompressor, source: str) -> None:
        if trm.d_compressed != compressor.d_compressed:
            raise ConfigMismatchError(
                f"{source} works in D'={trm.d_compressed} but the compressor gives D'={compressor.d_compressed}: "
                "use the compressor the TRM was trained with."
            )
        expected = {
            "d_model": compressor.d_model,
            "backbone": self.backbone.backbone_id,
            "layer": self.layer,
        }
        check_compatible(source, trm.metadata, expected)

    def _build_adapter(self, spec: str | LatentAdapter, trm_spec: Any, n_soft_vectors: int) -> LatentAdapter:
        if isinstance(spec, LatentAdapter):
            return spec
        embeddings = self.backbone.model.get_input_embeddings().weight
        if spec == "auto":
            bundled = Path(str(trm_spec)) / ADAPTER_SUBFOLDER if isinstance(trm_spec, (str, Path)) else None
            if bundled is not None and (bundled / "config.json").is_file():
                return LatentAdapter.from_pretrained(bundled)
            spec = "norm_match"
        if spec == "norm_match":
            return NormMatchAdapter.for_embeddings(embeddings, n_soft_vectors)
        if spec == "linear":
            return LinearAdapter.for_embeddings(embeddings, self.backbone.hidden_size, n_soft_vectors)
        return LatentAdapter.from_pretrained(spec)

    def _check_adapter(self, adapter: LatentAdapter) -> None:
        d_embed = self.backbone.model.get_input_embeddings().weight.shape[1]
        if adapter.d_model != self.backbone.hidden_size or adapter.d_embed != d_embed:
            raise ConfigMismatchError(
                f"the adapter maps D={adapter.d_model} -> E={adapter.d_embed} but the backbone has "
                f"D={self.backbone.hidden_size}, E={d_embed}: use an adapter made for this backbone."
            )

    @property
    def has_trm(self) -> bool:
        return self.trm is not None

    # ---- small utilities -----------------------------------------------------------------

    @property
    def model(self) -> Any:
        return self.backbone.model

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _now(self) -> float:
        self._sync()
        return time.perf_counter()

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    @property
    def _close_ids(self) -> list[int]:
        return self._encode(THINK_CLOSE)

    def _end_ids(self) -> set[int]:
        """End-of-turn ids of the tokenizer and the model, and padding (what finished rows hold)."""
        model_eos = self.model.generation_config.eos_token_id
        ids = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
               *(model_eos if isinstance(model_eos, list) else [model_eos])}
        return {int(token) for token in ids if token is not None}

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def context_window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)

    def _embed(self, ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(ids)

    # ---- generation ----------------------------------------------------------------------

    def _generate(
        self,
        max_new_tokens: int,
        attention_mask: Tensor,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cache: Any = None,
        stop_text: str | None = None,
    ) -> _Generated:
        """New token ids per row (cut at end-of-turn) and when the first one existed."""
        from transformers import GenerationConfig, StoppingCriteriaList

        if max_new_tokens <= 0:
            return _Generated([[] for _ in range(attention_mask.shape[0])], self._now())
        end_ids = self._end_ids()
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(end_ids - {int(self.tokenizer.pad_token_id)}) or None,
        )
        clock = _FirstTokenClock(self._sync)
        criteria = [clock]
        if stop_text is not None and input_ids is not None:
            criteria.append(_StopAfterText(self.tokenizer, stop_text, input_ids.shape[1]))
        extra = {"cache": cache} if cache is not None else {}
        output = self.model.generate(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            generation_config=config,
            stopping_criteria=StoppingCriteriaList(criteria),
            **extra,
        )
        # with input ids the output repeats them; with embeddings only it holds just the new tokens
        new = output[:, input_ids.shape[1]:] if input_ids is not None else output
        rows = [_cut_at(row, end_ids) for row in new.tolist()]
        return _Generated(rows, clock.time if clock.time is not None else self._now())

    def _prepare(self, problems: Sequence[Problem], thinking: bool, reserve: int) -> tuple[list[_Prepared], dict[int, str]]:
        """Tokenized prompts of the problems that fit `context_window - reserve`; errors for the others."""
        prepared, errors = [], {}
        window = self.context_window()
        for position, problem in enumerate(problems):
            text = build_chat_prompt(self.tokenizer, problem, thinking=thinking)
            ids = self._encode(text)
            if len(ids) + reserve > window:
                errors[position] = (
                    f"does not fit the context: {len(ids)} prompt tokens + {reserve} to generate > {window}"
                )
                continue
            prepared.append(_Prepared(position, problem, ids, self._opening_tag_end(text, ids)))
        return prepared, errors

    def _opening_tag_end(self, text: str, ids: list[int]) -> int:
        """Prompt tokens up to and including the last opening think tag (all of them when the
        tag's tokens merge with what follows), as datagen stores `hidden_pre`."""
        tag_at = text.rfind(THINK_OPEN)
        if tag_at < 0:
            return len(ids)
        head = self._encode(text[: tag_at + len(THINK_OPEN)])
        return len(head) if ids[: len(head)] == head else len(ids)

    def _split_thinking(self, new_ids: list[int]) -> tuple[list[int], str, bool]:
        """(ids to keep as thinking, thinking text, whether the LLM closed the tag itself)."""
        text = self.tokenizer.decode(new_ids, skip_special_tokens=False)
        if THINK_CLOSE not in text:
            return new_ids, text, False
        before = text.split(THINK_CLOSE, 1)[0]
        # the tag may share tokens with its neighbours: re-encode the text before it
        return self._encode(before), before, True

    # ---- the modes -----------------------------------------------------------------------

    def _answer_no_think(self, batch: list[_Prepared], max_new_tokens: int) -> list[AnswerResult]:
        start = self._now()
        input_ids, mask = pad_token_ids([p.prompt_ids for p in batch], self.tokenizer.pad_token_id, self.device)
        generated = self._generate(max_new_tokens, mask, input_ids=input_ids)
        end = self._now()
        return [
            self._result(item, "no_think", ids, start, generated.first_token_time, end)
            for item, ids in zip(batch, generated.new_ids)
        ]

    def _answer_cot(self, batch: list[_Prepared], max_new_tokens: int, max_thinking_tokens: int) -> list[AnswerResult]:
        start = self._now()
        pad = self.tokenizer.pad_token_id
        input_ids, mask = pad_token_ids([p.prompt_ids for p in batch], pad, self.device)
        thoughts = self._generate(max_thinking_tokens, mask, input_ids=input_ids, stop_text=THINK_CLOSE)
        splits = [self._split_thinking(ids) for ids in thoughts.new_ids]
        continued = [p.prompt_ids + kept + self._close_ids for p, (kept, _, _) in zip(batch, splits)]
        input_ids, mask = pad_token_ids(continued, pad, self.device)
        answers = self._generate(max_new_tokens, mask, input_ids=input_ids)
        end = self._now()
        results = []
        for item, thought_ids, (_, thinking_text, closed), ids in zip(batch, thoughts.new_ids, splits, answers.new_ids):
            result = self._result(item, "cot", ids, start, answers.first_token_time, end)
            result.thinking_tokens = len(_cut_at(thought_ids, self._end_ids()))
            result.thinking_text, result.closed_thinking = thinking_text, closed
            results.append(result)
        return results

    def _answer_latent(self, batch: list[_Prepared], mode: str, max_new_tokens: int,
                       n_supervision_steps: int | None) -> list[AnswerResult]:
        start = self._now()
        latent = self.latent_inputs(batch, first_token=mode == "trm_first_token", n_supervision_steps=n_supervision_steps)
        prefix: list[list[int]] = [[] for _ in batch]
        remaining = max_new_tokens
        if latent.first_token is not None:
            prefix = [[token] for token in latent.first_token.tolist()]
            remaining -= 1
        generated = self._generate(remaining, latent.attention_mask, inputs_embeds=latent.inputs_embeds, cache=latent.cache)
        end = self._now()
        first_time = latent.ready_time if latent.first_token is not None else generated.first_token_time
        steps = latent.trm_output.steps_used.tolist()
        results = []
        for row, (item, ids) in enumerate(zip(batch, generated.new_ids)):
            # a first token that ends the turn leaves an empty answer
            tokens = _cut_at(prefix[row] + ids, self._end_ids())
            result = self._result(item, mode, tokens, start, first_time, end)
            result.trm_steps, result.trm_overhead_s = int(steps[row]), latent.overhead_s
            result.soft_vectors = self.adapter.n_vectors
            results.append(result)
        return results

    # ---- the TRM path --------------------------------------------------------------------

    def _prompt_pass(self, batch: list[_Prepared]) -> tuple[Tensor, Tensor, Tensor, Any]:
        """One forward over the left-padded thinking prompts: (ids, mask, hidden states [B, W, D], KV cache)."""
        input_ids, mask = pad_token_ids([p.prompt_ids for p in batch], self.tokenizer.pad_token_id, self.device)
        wants_layer = self.layer != -1
        with torch.no_grad():
            out = self.model.base_model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids(mask),
                use_cache=True,
                output_hidden_states=wants_layer,
            )
        # layer -1 is the output after the final norm (what lm_head reads), as datagen stores it
        states = out.hidden_states[self.layer] if wants_layer else out.last_hidden_state
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = out.past_key_values
        return input_ids, mask, states, cache

    @staticmethod
    def _pre_states(batch: list[_Prepared], states: Tensor) -> tuple[Tensor, Tensor]:
        """Each prompt's states up to and including the opening tag, right-padded: [B, L, D], mask [B, L]."""
        width = states.shape[1]
        longest = max(p.pre_length for p in batch)
        pre = states.new_zeros(len(batch), longest, states.shape[-1])
        mask = torch.zeros(len(batch), longest, dtype=torch.bool, device=states.device)
        for row, item in enumerate(batch):
            begin = width - len(item.prompt_ids)  # left padding
            pre[row, : item.pre_length] = states[row, begin : begin + item.pre_length]
            mask[row, : item.pre_length] = True
        return pre, mask

    def _reason(self, pre: Tensor, pre_mask: Tensor, n_supervision_steps: int | None) -> tuple[TRMOutput, Tensor, Tensor]:
        """compress -> TRM (per-sample halting) -> decompress -> adapter: (output, state [B, D], soft [B, k, E])."""
        assert self.compressor is not None and self.trm is not None and self.adapter is not None
        dtype = self.compressor.weight.dtype
        with torch.no_grad():
            compressed = self.compressor.compress(pre.to(dtype))
            output = self.trm(compressed, pre_mask, n_supervision_steps=n_supervision_steps, halt=True)
            predicted = self.compressor.decompress(output.prediction.to(dtype))
            soft = self.adapter(predicted)
        return output, predicted, soft

    def _check_first_token_layer(self) -> None:
        if self.layer != -1:
            raise ConfigMismatchError(
                f"trm_first_token applies lm_head to the predicted state, which needs layer -1 "
                f"(after the final norm), but the compressor works on layer {self.layer}: use mode `trm`."
            )

    def _first_token(self, predicted: Tensor) -> Tensor:
        self._check_first_token_layer()
        head = self.model.get_output_embeddings()
        with torch.no_grad():
            return head(predicted.to(head.weight.dtype)).argmax(dim=-1)

    @torch.no_grad()
    def latent_inputs(self, batch: list[_Prepared] | Sequence[Problem], first_token: bool = False,
                      n_supervision_steps: int | None = None) -> LatentInputs:
        """The TRM modes' inputs for the LLM: `prompt [k soft vectors] </think>` (+ the first token)."""
        if not self.has_trm:
            raise LLMTRMError("the TRM modes need a compressor and a TRM: pass `compressor=` and `trm=`.")
        if batch and isinstance(batch[0], Problem):
            batch, errors = self._prepare(batch, thinking=True, reserve=0)
            if errors:
                raise LLMTRMError(next(iter(errors.values())))
        input_ids, mask, states, cache = self._prompt_pass(batch)
        pre, pre_mask = self._pre_states(batch, states)
        started = self._now()
        output, predicted, soft = self._reason(pre, pre_mask, n_supervision_steps)
        overhead = self._now() - started
        embeds = self._embed(input_ids)
        close = self._embed(torch.tensor(self._close_ids, device=self.device))
        parts = [embeds, soft.to(embeds.dtype), close.expand(len(batch), -1, -1)]
        token = self._first_token(predicted) if first_token else None
        if token is not None:
            parts.append(self._embed(token)[:, None, :])
        full = torch.cat(parts, dim=1)
        suffix = full.shape[1] - embeds.shape[1]
        full_mask = torch.cat([mask, mask.new_ones(len(batch), suffix)], dim=1)
        return LatentInputs(full, full_mask, cache, output, predicted, token, overhead, self._now())

    @torch.no_grad()
    def first_answer_logits(self, problems: Sequence[Problem], mode: Mode = "trm") -> Tensor:
        """Logits [B, V] of the first answer token (the one after the think block) in `mode`.

        `trm` runs the very inputs `answer` generates from (prompt cache, soft vectors,
        closing tag); `trm_first_token` is lm_head on the predicted state; `cot` closes
        the thinking at once; `no_think` uses the empty think block.
        """
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
        prepared, _ = self._prepare(problems, thinking=thinking, reserve=0)
        sequences = [p.prompt_ids + (self._close_ids if thinking else []) for p in prepared]
        input_ids, mask = pad_token_ids(sequences, self.tokenizer.pad_token_id, self.device)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=1)
        return out.logits[:, -1]

    # ---- results -------------------------------------------------------------------------

    def _result(self, item: _Prepared, mode: str, answer_ids: list[int], start: float,
                first_token_time: float, end: float) -> AnswerResult:
        text = self._decode(answer_ids)
        problem = item.problem
        return AnswerResult(
            sample_id=problem.sample_id,
            mode=mode,
            answer_text=text,
            extracted_answer=_extract(problem, text),
            correct=_check(problem, text),
            answer_tokens=len(answer_ids),
            time_to_first_answer_token_s=(first_token_time - start) if answer_ids else (end - start),
            total_time_s=end - start,
        )

    # ---- public API ----------------------------------------------------------------------

    def _reserve(self, mode: str, max_new_tokens: int, max_thinking_tokens: int) -> int:
        """Tokens a mode adds after the prompt (the context check)."""
        close = len(self._close_ids)
        if mode == "cot":
            return max_thinking_tokens + close + max_new_tokens
        if mode in LATENT_MODES:
            return self.adapter.n_vectors + close + max_new_tokens  # type: ignore[union-attr]
        return max_new_tokens

    def _answer_batch(self, batch: list[_Prepared], mode: str, max_new_tokens: int, max_thinking_tokens: int,
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
        prepared, errors = self._prepare(problems, thinking=mode != "no_think", reserve=reserve)
        results: list[AnswerResult | None] = [None] * len(problems)
        for position, message in errors.items():
            results[position] = AnswerResult(sample_id=problems[position].sample_id, mode=mode, error=message)
        if progress and errors:
            progress(len(errors))
        for begin in range(0, len(prepared), batch_size):
            batch = prepared[begin : begin + batch_size]
            for item, result in zip(batch, self._run_guarded(batch, mode, max_new_tokens, max_thinking_tokens,
                                                             n_supervision_steps, on_error)):
                results[item.position] = result
            if progress:
                progress(len(batch))
        return [r for r in results if r is not None]

    def _run_guarded(self, batch: list[_Prepared], mode: str, max_new_tokens: int, max_thinking_tokens: int,
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


def _has_gold(problem: Problem) -> bool:
    return bool(problem.tests.strip()) if problem.kind == "code" else bool(str(problem.gold_answer).strip())


def _extract(problem: Problem, text: str) -> str | None:
    if not text.strip():
        return None
    return extract_code(text) if problem.kind == "code" else extract_math_answer(text)


def _check(problem: Problem, text: str) -> bool | None:
    """True/False against the gold answer or tests; None when the problem has none to check against."""
    if not _has_gold(problem):
        return None
    try:
        return bool(check_answer(problem, text))
    except Exception:  # noqa: BLE001 - a checker failure is a wrong answer, never a crash
        return False
