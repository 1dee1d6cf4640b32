"""The one wrapper around Hugging Face `generate`: datagen, evaluation and GRPO all decode through it.

    out = generate(model, tokenizer, attention_mask=mask, input_ids=ids, max_new_tokens=64)
    out = generate(model, tokenizer, attention_mask=mask, inputs_embeds=embeds, cache=prompt_cache, ...)
    out = generate(..., think=ThinkingBudget(max_thinking_tokens=512, close_ids=close, max_answer_tokens=256))

Every setting that shapes the next-token distribution is passed explicitly (`Decoding`):
transformers fills settings left unset from the backbone's `generation_config.json`, which
would silently change what a run does and what it records.

With `think`, one continuous generation runs the thinking and the answer, as a user of the
LLM would, with one KV cache: a row that reaches the thinking budget (or tries to end its
turn while thinking) gets the closing tag forced token by token, then answers. Each row's
answer start, the time its first answer token existed and (optionally) that token's logits
are recorded: the first-answer-token distribution is what the CoT-fidelity metrics compare.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from llm_trm.thinking import THINK_CLOSE, cut_at_end, end_of_turn_ids, split_at_close

# `static` preallocates the KV cache, and on CUDA transformers then compiles the decoding step
# (torch.compile, CUDA graphs): faster steady decoding, a compilation per batch shape first
CACHE_IMPLEMENTATIONS = ("dynamic", "static")


@dataclass(frozen=True)
class Decoding:
    """Decoding settings, recorded with every run that generates.

    do_sample: sample (False: greedy). temperature, top_p, top_k (0: off) shape sampling only;
    repetition penalties and n-gram bans are always off.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid decoding settings {self}: temperature > 0, 0 < top_p <= 1, top_k >= 0.")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) if self.do_sample else {"do_sample": False}

    def generation_config(self, max_new_tokens: int, pad_token_id: int, eos_token_id: Sequence[int]) -> Any:
        from transformers import GenerationConfig

        # greedy: the sampling knobs sit at transformers' own defaults (they do not act, and other values warn)
        sampling = (dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=0.0,
                         typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
                    if self.do_sample else dict(temperature=1.0, top_p=1.0, top_k=50))
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=self.do_sample, num_beams=1,
                                repetition_penalty=1.0, no_repeat_ngram_size=0, pad_token_id=pad_token_id,
                                eos_token_id=list(eos_token_id) or None, **sampling)


GREEDY = Decoding()


@dataclass(frozen=True)
class ThinkingBudget:
    """Think, then answer, in one generation: at most `max_thinking_tokens` of thinking (then the closing
    suffix `close_ids` is forced), then at most `max_answer_tokens` of answer. After a closing tag the model
    wrote itself, `after_tag_ids` (the suffix's newline) is forced unless the model wrote it too, so the
    answer starts after the same suffix in every row (`thinking.close_suffix_ids` / `after_tag_ids`)."""

    max_thinking_tokens: int
    close_ids: Sequence[int]
    max_answer_tokens: int
    after_tag_ids: Sequence[int] = ()

    @property
    def max_new_tokens(self) -> int:
        return self.max_thinking_tokens + len(self.close_ids) + self.max_answer_tokens


@dataclass
class Generated:
    """The new tokens of each row and when they existed.

    new_ids:      per row, the generated ids cut at the first end-of-turn or padding token
                  (the end token kept with `keep_end`)
    answer_start: per row, where the answer begins in new_ids (0 without `think`; with it,
                  after the closing tag)
    closed:       per row, whether the model closed its thinking itself (`think` only)
    first_token_time: when the batch's first new token existed (perf_counter, synced)
    answer_times: per row, when its first answer token existed (None: it wrote no answer)
    first_logits: [B, V] float32 logits of each row's first answer token (`capture_first_logits`)
    """

    new_ids: list[list[int]]
    first_token_time: float
    answer_start: list[int] = field(default_factory=list)
    closed: list[bool] = field(default_factory=list)
    answer_times: list[float | None] = field(default_factory=list)
    first_logits: Tensor | None = None

    def thinking_ids(self, row: int, decode: Callable[[list[int]], str]) -> list[int]:
        """The row's thinking before its closing tag (the tag's tokens left out)."""
        return split_at_close(self.new_ids[row][: self.answer_start[row]], decode)[0]

    def answer_ids(self, row: int) -> list[int]:
        return self.new_ids[row][self.answer_start[row]:]


# --------------------------------------------------------------------------- watchers


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


class _AnswerWatcher:
    """Logits processor and stopping criterion in one: follows each row from thinking to answer.

    As a processor it sees each step's logits before a token is chosen: it forces the closing
    tag where thinking must end, and records the logits and time of each row's first answer
    token. As a stopping criterion it ends a row once its answer budget is spent.
    """

    def __init__(self, tokenizer: Any, prompt_width: int, batch: int, end_ids: set[int], sync: Callable[[], None],
                 think: ThinkingBudget | None, capture: bool) -> None:
        self.tokenizer, self.prompt_width, self.think, self.capture = tokenizer, prompt_width, think, capture
        self.sync = sync
        self.end_ids = sorted(end_ids)
        self.answer_start: list[int | None] = [None if think else 0] * batch
        self.closed = [False] * batch
        self.pending: list[list[int] | None] = [None] * batch  # suffix tokens still to force (None: thinking)
        self.answer_times: list[float | None] = [None] * batch
        self.first_token_time: float | None = None
        self.first_logits: list[Tensor | None] = [None] * batch
        if think is not None:
            self.window = len(tokenizer.encode(THINK_CLOSE, add_special_tokens=False)) + 4

    # ---- processor: before each token is chosen

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        generated = input_ids.shape[1] - self.prompt_width
        if self.think is not None:
            scores = self._thinking_step(input_ids, scores, generated)
        now: float | None = None
        for row, start in enumerate(self.answer_start):
            if start == generated and self.answer_times[row] is None:
                if now is None:
                    self.sync()
                    now = time.perf_counter()
                self.answer_times[row] = now
                if self.capture:
                    self.first_logits[row] = scores[row].detach().float().cpu().clone()
        return scores

    def _thinking_step(self, input_ids: Tensor, scores: Tensor, generated: int) -> Tensor:
        for row in range(input_ids.shape[0]):
            if self.answer_start[row] is not None:
                continue
            if self.pending[row] is None:  # thinking: did it end, or must it end?
                tail = self._after_own_tag(input_ids[row])
                wants_to_end = bool(self.end_ids) and int(scores[row].argmax()) in self.end_ids
                if tail is not None:
                    self.closed[row] = True
                    self.pending[row] = [] if tail.startswith("\n") else list(self.think.after_tag_ids)
                elif generated >= self.think.max_thinking_tokens or wants_to_end:
                    self.pending[row] = list(self.think.close_ids)
            pending = self.pending[row]
            if pending is None:
                if self.end_ids:
                    scores[row, self.end_ids] = float("-inf")  # a turn does not end inside the thinking
            elif pending:
                forced = pending.pop(0)
                scores[row] = torch.full_like(scores[row], float("-inf"))
                scores[row, forced] = 0.0
            else:  # the suffix is complete: this token is the answer's first
                self.answer_start[row] = generated
        return scores

    def _after_own_tag(self, row_ids: Tensor) -> str | None:
        """The text after a closing tag among the row's newest tokens, None when there is none."""
        start = max(self.prompt_width, row_ids.shape[0] - self.window)
        tail = self.tokenizer.decode(row_ids[start:], skip_special_tokens=False)
        return tail.rsplit(THINK_CLOSE, 1)[1] if THINK_CLOSE in tail else None

    # ---- stopping criterion: after each token

    def stop(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        if self.first_token_time is None:
            self.sync()
            self.first_token_time = time.perf_counter()
        generated = input_ids.shape[1] - self.prompt_width
        budget = self.think.max_answer_tokens if self.think is not None else None
        done = [budget is not None and start is not None and generated - start >= budget
                for start in self.answer_start]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _Criterion:
    """Adapts a bound method to transformers' StoppingCriteria call signature."""

    def __init__(self, call: Callable[..., Tensor]) -> None:
        self.call = call

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        return self.call(input_ids, scores, **kwargs)


# --------------------------------------------------------------------------- generate


def _no_sync() -> None:
    return None


def _stack_first_logits(rows: list[Tensor | None]) -> Tensor | None:
    """[B, V]; a row that wrote no answer gets NaN logits (the metrics leave it out)."""
    present = [logits for logits in rows if logits is not None]
    if not present:
        return None
    filler = torch.full_like(present[0], float("nan"))
    return torch.stack([logits if logits is not None else filler for logits in rows])


def generate(
    model: Any,
    tokenizer: Any,
    *,
    attention_mask: Tensor,
    max_new_tokens: int | None = None,
    input_ids: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
    cache: Any = None,
    decoding: Decoding = GREEDY,
    end_ids: set[int] | None = None,
    stop_text: str | None = None,
    keep_end: bool = False,
    think: ThinkingBudget | None = None,
    capture_first_logits: bool = False,
    logits_processors: Sequence[Any] = (),
    sync: Callable[[], None] = _no_sync,
    cache_implementation: str = "dynamic",
) -> Generated:
    """Generate for a left-padded batch of prompt ids or input embeddings (optionally after a KV cache).

    end_ids: the tokens that end a turn (default: the tokenizer's and the model's EOS). A row's
    new ids are cut at the first of them or at padding. stop_text ends a row once its text
    contains it (e.g. the closing think tag). `think` runs thinking then answer in one
    generation (see the module docstring); `max_new_tokens` is then the thinking budget's.
    `logits_processors` run after the watcher (research hooks, tests). `sync` waits for the
    device before a time is taken (CUDA). `cache_implementation` (see CACHE_IMPLEMENTATIONS) applies
    when no `cache` is given (a prompt's cache is dynamic).
    """
    from transformers import LogitsProcessorList, StoppingCriteriaList

    rows = attention_mask.shape[0]
    if think is not None:
        max_new_tokens = think.max_new_tokens
    if max_new_tokens is None or max_new_tokens <= 0:
        sync()
        empty = [[] for _ in range(rows)]
        return Generated(empty, time.perf_counter(), [0] * rows, [False] * rows, [None] * rows)
    end_ids = end_of_turn_ids(tokenizer, model) if end_ids is None else set(end_ids)
    pad_id = int(tokenizer.pad_token_id)
    prompt_width = input_ids.shape[1] if input_ids is not None else 0
    watcher = _AnswerWatcher(tokenizer, prompt_width, rows, end_ids, sync, think, capture_first_logits)
    criteria = [_Criterion(watcher.stop)]
    if stop_text is not None:
        criteria.append(_StopAfterText(tokenizer, stop_text, prompt_width))
    extra = {"cache": cache} if cache is not None else {}
    config = decoding.generation_config(max_new_tokens, pad_id, sorted(end_ids - {pad_id}))
    if cache_implementation != "dynamic" and cache is None:
        config.cache_implementation = cache_implementation
    output = model.generate(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        generation_config=config,
        logits_processor=LogitsProcessorList([watcher, *logits_processors]),
        stopping_criteria=StoppingCriteriaList(criteria),
        **extra,
    )
    # with input ids the output repeats them; with embeddings only it holds the new tokens
    new = output[:, prompt_width:].tolist()
    cut = [cut_at_end(row, end_ids | {pad_id}, keep_end=False) for row in new]
    if keep_end:  # stopping is an action: keep the end-of-turn token that stopped a row
        cut = [ids + [full[len(ids)]] if len(ids) < len(full) and full[len(ids)] in end_ids else ids
               for ids, full in zip(cut, new)]
    starts = [min(start if start is not None else len(ids), len(ids)) for start, ids in zip(watcher.answer_start, cut)]
    first_logits = _stack_first_logits(watcher.first_logits) if capture_first_logits else None
    first_time = watcher.first_token_time if watcher.first_token_time is not None else time.perf_counter()
    return Generated(cut, first_time, starts, list(watcher.closed), list(watcher.answer_times), first_logits)
