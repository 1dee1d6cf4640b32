import copy
import json

import pytest
import torch

from llm_trm.backbone import backbone_id, load_tokenizer
from llm_trm.data.cot import CoTDataModule, format_thinking_sequence
from llm_trm.data.problems import PROMPT_STYLE, PROMPT_STYLES, build_chat_prompt
from llm_trm.data.shards import ShardWriter
from llm_trm.data.text import StreamingChunkDataset, TextDataModule, is_heldout, iter_chunks, pad_collate
from llm_trm.errors import ConfigMismatchError, DataError
from tests.test_problems import SMOLLM2_STYLE_TEMPLATE

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


def write_corpus(path, docs=60, words=40):
    lines = [" ".join(WORDS[(d + i) % len(WORDS)] for i in range(words)) + f" doc{d}" for d in range(docs)]
    path.write_text("\n".join(lines))
    return lines


def test_chunks_are_fixed_length_and_split_by_document(tmp_path, tiny_backbone_dir):
    write_corpus(tmp_path / "corpus.txt")
    dm = TextDataModule(backbone=str(tiny_backbone_dir), source=str(tmp_path / "corpus.txt"), seq_len=16,
                        num_samples=20, val_samples=4, val_fraction=0.2, batch_size=4)
    dm.setup()
    assert len(dm.train_set) == 20 and len(dm.val_set) == 4
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 16) and batch["attention_mask"].all()
    # disjoint: no chunk appears in both splits
    train = {tuple(dm.train_set[i]["input_ids"].tolist()) for i in range(20)}
    val = {tuple(dm.val_set[i]["input_ids"].tolist()) for i in range(4)}
    assert not train & val


def test_split_is_deterministic_and_respects_fraction():
    flags = [is_heldout(i, 0.1) for i in range(5000)]
    assert flags == [is_heldout(i, 0.1) for i in range(5000)]
    assert 0.08 < sum(flags) / 5000 < 0.12


def test_num_samples_larger_than_data_is_a_clear_error(tmp_path, tiny_backbone_dir):
    write_corpus(tmp_path / "c.txt", docs=5)
    dm = TextDataModule(backbone=str(tiny_backbone_dir), source=str(tmp_path / "c.txt"), seq_len=16,
                        num_samples=10_000, val_samples=1, val_fraction=0.2)
    with pytest.raises(DataError, match="num_samples=10000 is larger than the data"):
        dm.setup()


def test_jsonl_source_with_text_field(tmp_path, tiny_backbone_dir):
    rows = [{"content": " ".join(WORDS * 3) + f" {i}"} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dm = TextDataModule(backbone=str(tiny_backbone_dir), source=str(tmp_path / "d.jsonl"), text_field="content",
                        seq_len=8, num_samples=8, val_samples=2, val_fraction=0.2)
    dm.setup()
    assert len(dm.train_set) == 8


def test_missing_local_source(tiny_backbone_dir):
    dm = TextDataModule(backbone=str(tiny_backbone_dir), source="./missing/dir", num_samples=2, val_samples=1)
    with pytest.raises(DataError, match="does not exist"):
        dm.setup()


def test_iter_chunks_concatenates_with_eos(tiny_backbone_dir):
    tok = load_tokenizer(str(tiny_backbone_dir))
    chunks = list(iter_chunks(["alpha beta", "gamma"], tok, 3))
    flat = torch.cat(chunks).tolist()
    expected = tok("alpha beta", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    expected += tok("gamma", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert flat == expected[: len(flat)] and all(len(c) == 3 for c in chunks)


def test_streaming_shards_documents_across_ranks_and_workers(tiny_backbone_dir, monkeypatch):
    docs = [f"{WORDS[i % 11]} document number {i} " * 3 for i in range(80)]
    tok = load_tokenizer(str(tiny_backbone_dir))
    seen = []
    for shard in range(4):  # 2 ranks x 2 workers
        ds = StreamingChunkDataset(lambda: docs, tok, 8, num_samples=10, heldout=False, val_fraction=0.1, seed=0)
        monkeypatch.setattr(ds, "_shard", lambda s=shard: (s, 4))
        got = [tuple(item["input_ids"].tolist()) for item in ds]
        assert len(got) in (2, 3)  # quota: 10 chunks spread over 4 shards
        seen.append(got)
    assert sum(map(len, seen)) == 10
    assert not set(seen[0]) & set(seen[1])


def test_pad_collate_masks_padding():
    collate = pad_collate(pad_id=0)
    batch = collate([{"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.ones(3, dtype=torch.long)},
                     {"input_ids": torch.tensor([8]), "attention_mask": torch.ones(1, dtype=torch.long)}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_cot_sequences_from_offline_gsm(tiny_backbone_dir):
    dm = CoTDataModule(backbone=str(tiny_backbone_dir), source="gsm_symbolic", num_samples=6, val_samples=2,
                       max_length=512, batch_size=3)
    dm.setup()
    assert len(dm.train_set) == 6 and len(dm.val_set) == 2
    tok = dm.tokenizer
    text = tok.decode(dm.train_set[0]["input_ids"])
    assert "<think>" in text and text.rstrip().endswith("</think>")
    batch = next(iter(dm.train_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert batch["attention_mask"].shape[1] == lengths.max() and (lengths > 0).all()


def test_cot_local_jsonl_and_missing_field(tmp_path, tiny_backbone_dir):
    rows = [{"q": f"What is {i}+1?", "cot": f"{i}+1={i + 1}"} for i in range(30)]
    (tmp_path / "cot.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dm = CoTDataModule(backbone=str(tiny_backbone_dir), source=str(tmp_path / "cot.jsonl"), prompt_field="q",
                       thinking_field="cot", num_samples=10, val_samples=2, val_fraction=0.2)
    dm.setup()
    assert len(dm.train_set) == 10
    bad = CoTDataModule(backbone=str(tiny_backbone_dir), source=str(tmp_path / "cot.jsonl"), num_samples=2,
                        val_samples=1)
    with pytest.raises(DataError, match="no column"):
        bad.setup()


def test_format_prefills_think_tag_for_models_without_native_thinking(tiny_backbone_dir):
    tok = copy.deepcopy(load_tokenizer(str(tiny_backbone_dir)))  # a copy: the loaded one is shared
    text = format_thinking_sequence(tok, "2+2?", "two plus two is four")
    assert text.count("<think>") == 1 and text.endswith("two plus two is four\n</think>")
    # the very prompt datagen and evaluation give the LLM, then the thinking
    assert text == build_chat_prompt(tok, "2+2?", thinking=True) + "two plus two is four\n</think>"
    tok.chat_template = SMOLLM2_STYLE_TEMPLATE  # no think tags: the system prompt asks for them
    text = format_thinking_sequence(tok, "2+2?", " four ")
    assert text.startswith("<|im_start|>system\n" + PROMPT_STYLES[PROMPT_STYLE].system) and text.endswith("<think>\nfour\n</think>")


def test_hub_text_source_streams_with_the_real_arguments(tiny_backbone_dir, monkeypatch):
    """The fineweb-edu path stays in the code; here `datasets.load_dataset` answers from local rows."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming))
        return [{"text": f"{' '.join(WORDS)} row {i}", "id": i} for i in range(200)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = TextDataModule(backbone=str(tiny_backbone_dir), seq_len=8, num_samples=6, val_samples=2)
    dm.setup()
    assert calls[0] == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)
    assert len(list(dm.train_set)) == 6 and len(list(dm.val_set)) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (6, 8)


def test_hub_failure_is_one_actionable_line(tiny_backbone_dir, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    dm = TextDataModule(backbone=str(tiny_backbone_dir), num_samples=2, val_samples=1)
    with pytest.raises(DataError, match="use data.source=embedded") as err:
        dm.setup()
    assert "\n" not in str(err.value)


def test_cot_hub_source_uses_gsm8k_fields(tiny_backbone_dir, monkeypatch):
    import datasets

    rows = [{"question": f"What is {i}*2?", "answer": f"{i}*2={2 * i}\n#### {2 * i}"} for i in range(40)]
    seen = {}

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        seen.update(path=path, name=name, split=split)
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = CoTDataModule(backbone=str(tiny_backbone_dir), source="openai/gsm8k", num_samples=8, val_samples=2,
                       val_fraction=0.2)
    dm.setup()
    assert seen == {"path": "openai/gsm8k", "name": "main", "split": "train"}
    text = dm.tokenizer.decode(dm.train_set[0]["input_ids"])
    assert "#### " in text and text.endswith("</think>")


def test_pad_token_ids_left_and_right_with_positions():
    from llm_trm.batching import pad_token_ids, position_ids

    ids, mask = pad_token_ids([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    ids, mask = pad_token_ids([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# ------------------------------------------------------------------ stage 1b on the datagen records


def write_datagen_records(directory, backbone_dir, count=12, with_token_ids=True, backbone=None):
    """A datagen output written by the real ShardWriter: per-sample records with the token ids of prompt +
    thinking + closing tag, as `llm-trm datagen` stores them. As with a real LLM, the generated thinking ids
    are not the tokenizer's own split of the thinking text (here: one character at a time). Returns the ids."""
    tok = load_tokenizer(str(backbone_dir))
    directory.parent.mkdir(parents=True, exist_ok=True)
    config = {"backbone": backbone or backbone_id(str(backbone_dir)), "layer": -1, "split": "train"}
    stored = []
    with ShardWriter(directory, config, shard_size=5, dtype="float32") as writer:
        for i in range(count):
            prompt, thinking = f"What is {i} + 3?", f"The answer is {i + 3}."
            prompt_ids = tok.encode(build_chat_prompt(tok, prompt), add_special_tokens=False)
            generated = [t for char in thinking for t in tok.encode(char, add_special_tokens=False)]
            ids = prompt_ids + generated + tok.encode("\n</think>", add_special_tokens=False)
            record = {"sample_id": f"gsm_symbolic:{i}", "problem": prompt, "thinking": thinking, "answer": str(i + 3),
                      "gold_answer": str(i + 3), "correct": True, "closed_thinking": True,
                      "token_ids": ids if with_token_ids else [], "pre_length": len(prompt_ids),
                      "post_position": len(ids) - 1}
            writer.add(torch.randn(len(prompt_ids), 64), torch.randn(64), len(ids) - len(prompt_ids), record)
            stored.append(ids)
    return stored


def split_sequences(dm):
    return ([dm.train_set[i]["input_ids"].tolist() for i in range(len(dm.train_set))],
            [dm.val_set[i]["input_ids"].tolist() for i in range(len(dm.val_set))])


def test_cot_default_source_is_the_llms_own_thinking_from_datagen(tmp_path, tiny_backbone_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stored = write_datagen_records(tmp_path / "data" / "hidden_pairs", tiny_backbone_dir)  # datagen's default dir
    dm = CoTDataModule(backbone=str(tiny_backbone_dir), val_fraction=0.25, max_length=512)
    assert dm.hparams.source == "./data/hidden_pairs" and dm.hparams.num_samples == 50000
    with pytest.warns(UserWarning, match="fewer sequences than num_samples=50000"):
        dm.setup()
    train, val = split_sequences(dm)
    # every record, exactly the token ids the LLM read and wrote, split by record position
    expected_val = [ids for i, ids in enumerate(stored) if is_heldout(i, 0.25)]
    assert val == expected_val and 0 < len(val) < len(stored)
    assert train == [ids for i, ids in enumerate(stored) if not is_heldout(i, 0.25)]
    assert dm.tokenizer.decode(train[0]).endswith("</think>")


def test_cot_datagen_records_truncate_and_fall_back_to_the_rendered_text(tmp_path, tiny_backbone_dir):
    stored = write_datagen_records(tmp_path / "pairs", tiny_backbone_dir)
    dm = CoTDataModule(backbone=str(tiny_backbone_dir), source=str(tmp_path / "pairs"), max_length=9,
                       num_samples=3, val_samples=1, val_fraction=0.25)
    dm.setup()
    train, _ = split_sequences(dm)
    first_train = next(ids for i, ids in enumerate(stored) if not is_heldout(i, 0.25))
    assert len(train) == 3 and train[0] == first_train[:9]
    # records without token ids (imported from the seed's .pt) are rendered with the datagen prompt
    write_datagen_records(tmp_path / "seed", tiny_backbone_dir, with_token_ids=False)
    dm = CoTDataModule(backbone=str(tiny_backbone_dir), source=str(tmp_path / "seed"), max_length=512,
                       num_samples=3, val_samples=1, val_fraction=0.25)
    dm.setup()
    first = next(i for i in range(len(stored)) if not is_heldout(i, 0.25))
    rendered = format_thinking_sequence(dm.tokenizer, f"What is {first} + 3?", f"The answer is {first + 3}.")
    assert split_sequences(dm)[0][0] == dm.tokenizer.encode(rendered, add_special_tokens=False) != first_train
    assert dm.tokenizer.decode(first_train) == rendered  # the same text, as the LLM's ids or re-tokenised


def test_cot_datagen_source_errors(tmp_path, tiny_backbone_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dm = CoTDataModule(backbone=str(tiny_backbone_dir))
    with pytest.raises(DataError, match=r"./data/hidden_pairs does not exist: run `llm-trm datagen` first"):
        dm.setup()
    with pytest.raises(DataError, match=r"runs/demo/hidden_pairs does not exist: run `llm-trm datagen` first"):
        CoTDataModule(backbone=str(tiny_backbone_dir), source="runs/demo/hidden_pairs").setup()
    (tmp_path / "data" / "hidden_pairs").mkdir(parents=True)  # made, but no shard completed yet
    with pytest.raises(DataError, match="holds no datagen records .* run `llm-trm datagen"):
        CoTDataModule(backbone=str(tiny_backbone_dir)).setup()
    write_datagen_records(tmp_path / "other", tiny_backbone_dir, backbone="HuggingFaceTB/SmolLM3-3B")
    with pytest.raises(ConfigMismatchError, match="backbone='HuggingFaceTB/SmolLM3-3B' but this run has backbone="):
        CoTDataModule(backbone=str(tiny_backbone_dir), source=str(tmp_path / "other")).setup()
    write_datagen_records(tmp_path / "two", tiny_backbone_dir, count=2)
    with pytest.raises(DataError, match="0 held-out sequences"):  # too few records to hold any out
        CoTDataModule(backbone=str(tiny_backbone_dir), source=str(tmp_path / "two"), val_fraction=0.01).setup()
