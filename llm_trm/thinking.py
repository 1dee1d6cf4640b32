"""The think tags, in one place: where the opening tag ends in a prompt, where generated ids
close the thinking, and which tokens end a turn.

Datagen, evaluation and GRPO all cut prompts and generations with these functions, so the
prompt states the TRM is trained on (datagen's `hidden_pre`) are the ones it is given at
inference and in GRPO.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# What stands between the thinking and the answer in every mode: the closing tag and the newline chat
# templates write after it (SmolLM3's own blocks, the worked examples of our prompt). The state at its last
# token is the end-of-thinking state datagen stores (it predicts the answer's first token), and the answer's
# first token - the one the CoT-fidelity metrics compare - comes right after it in every mode.
CLOSE_SUFFIX = THINK_CLOSE + "\n"


def close_suffix_ids(tokenizer: Any) -> list[int]:
    """`CLOSE_SUFFIX` as token ids (what datagen appends to the thinking, and the latent modes after the soft vectors)."""
    return tokenizer.encode(CLOSE_SUFFIX, add_special_tokens=False)


def after_tag_ids(tokenizer: Any) -> list[int]:
    """What completes the suffix after a closing tag the model wrote itself (the newline)."""
    return tokenizer.encode(CLOSE_SUFFIX[len(THINK_CLOSE):], add_special_tokens=False)


def opening_tag_end(tokenizer: Any, prompt_text: str, prompt_ids: Sequence[int]) -> int:
    """Number of prompt tokens up to and including the last opening think tag.

    The whole prompt when it has no tag, or when tokenization merges the tag with what
    follows (then no token boundary sits right after the tag).
    """
    tag_at = prompt_text.rfind(THINK_OPEN)
    if tag_at < 0:
        return len(prompt_ids)
    head_ids = tokenizer.encode(prompt_text[: tag_at + len(THINK_OPEN)], add_special_tokens=False)
    if list(prompt_ids[: len(head_ids)]) == head_ids:
        return len(head_ids)
    return len(prompt_ids)


def split_at_close(ids: Sequence[int], decode: Callable[[list[int]], str]) -> tuple[list[int], bool]:
    """(the generated thinking ids before the closing tag, whether the model closed it itself).

    The tag may span several tokens or share a token with its neighbours, so it is found in
    decoded text: the shortest prefix whose text contains the tag, then the longest prefix
    whose text ends before the tag starts. The ids kept are the generated ones (never
    re-encoded), so a record's token ids are exactly what the model produced; callers append
    the canonical closing-tag tokens, so every sample ends at the same kind of position.
    """
    ids = list(ids)
    if THINK_CLOSE not in decode(ids):
        return ids, False
    low, high = 1, len(ids)  # the shortest prefix containing the tag (monotone in length)
    while low < high:
        middle = (low + high) // 2
        if THINK_CLOSE in decode(ids[:middle]):
            high = middle
        else:
            low = middle + 1
    tag_start = decode(ids[:low]).index(THINK_CLOSE)
    keep = low - 1
    while keep > 0 and len(decode(ids[:keep])) > tag_start:
        keep -= 1
    return ids[:keep], True


def end_of_turn_ids(tokenizer: Any, model: Any = None) -> set[int]:
    """The tokenizer's EOS and the model's generation-config EOS ids (a list in chat models)."""
    ids: list[Any] = [tokenizer.eos_token_id]
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += model_eos if isinstance(model_eos, (list, tuple)) else [model_eos]
    return {int(token) for token in ids if token is not None}


def cut_at_end(ids: Iterable[int], end_ids: set[int], keep_end: bool = False) -> list[int]:
    """Ids up to the first end token: without it (answer text), or with it (`keep_end`: stopping is an action)."""
    ids = list(ids)
    for position, token in enumerate(ids):
        if token in end_ids:
            return ids[: position + 1] if keep_end else ids[:position]
    return ids
