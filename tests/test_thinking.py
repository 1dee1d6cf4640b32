"""The think tags: where the opening tag ends, where generated ids close the thinking, end tokens."""

from __future__ import annotations

from llm_trm.backbone import load_backbone
from llm_trm.thinking import THINK_CLOSE, cut_at_end, opening_tag_end, split_at_close


class PieceTokenizer:
    """Decodes ids as fixed text pieces: lets a test split the closing tag over several tokens."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


def test_split_at_close_finds_a_tag_spread_over_tokens():
    pieces = ["So", " 3+4=7.", " </", "think", ">\n", "The answer"]
    decode = PieceTokenizer(pieces).decode
    thinking, closed = split_at_close([0, 1, 2, 3, 4, 5], decode)
    assert closed and thinking == [0, 1]
    # a token that holds text and the start of the tag is dropped with the tag
    pieces = ["So", " done.\n</", "think>", "x"]
    thinking, closed = split_at_close([0, 1, 2, 3], PieceTokenizer(pieces).decode)
    assert closed and thinking == [0]


def test_split_at_close_single_token_tag_and_no_tag(tiny_backbone_dir):
    tokenizer = load_backbone(str(tiny_backbone_dir)).tokenizer
    close = tokenizer.convert_tokens_to_ids(THINK_CLOSE)
    words = tokenizer.encode("3 + 4 = 7", add_special_tokens=False)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    assert split_at_close(words + [close], decode) == (words, True)
    assert split_at_close(words + [close] + words, decode) == (words, True)
    assert split_at_close(words, decode) == (words, False)
    assert split_at_close([], decode) == ([], False)


def test_cut_at_end_stops_at_eos_or_padding():
    assert cut_at_end([5, 6, 2, 7, 0], {0, 2}) == [5, 6]
    assert cut_at_end([5, 6], {0, 2}) == [5, 6]
    assert cut_at_end([0, 5], {0}) == []


def test_cut_at_end_can_keep_the_end_token():
    assert cut_at_end([5, 6, 2, 7], {2}, keep_end=True) == [5, 6, 2]
    assert cut_at_end([5, 6], {2}, keep_end=True) == [5, 6]


def test_opening_tag_end_counts_tokens_through_the_last_tag(tiny_backbone_dir):
    tokenizer = load_backbone(str(tiny_backbone_dir)).tokenizer
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    end = opening_tag_end(tokenizer, text, ids)
    assert tokenizer.convert_ids_to_tokens(ids[end - 1]) == "<think>"
    assert end == len(ids) - 1  # the newline after the tag is not part of the pre states
    assert opening_tag_end(tokenizer, "no tag here", [1, 2, 3]) == 3
