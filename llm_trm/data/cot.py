"""Stage 1b data: thinking sequences (chat prompt + `<think> reasoning </think>`).

Sources (`source=`):
- a datagen output directory (the default, `./data/hidden_pairs`): the LLM's own thinking,
  as the token ids it generated in `llm-trm datagen` (prompt, thinking and closing tag), so
  stage 1b runs after datagen: stage 1a -> datagen -> stage 1b -> TRM;
- a Hugging Face Hub dataset with a prompt field and a reasoning field
  (e.g. `openai/gsm8k`, subset `main`: `question` + the human-written `answer`);
- a local `.jsonl` file with those fields;
- `gsm_symbolic`: GSM8K-style problems with worked solutions from `reasoning-gym`, offline.

Text sources are rendered with the prompt datagen and evaluation use (`build_chat_prompt`).
`num_samples` / `val_samples` are upper bounds: a smaller source gives all it has (with a
warning); an empty split is an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils.data import Dataset

from llm_trm.backbone import DEFAULT_BACKBONE, backbone_id
from llm_trm.data.problems import build_chat_prompt
from llm_trm.data.shards import iter_records, read_datagen_config
from llm_trm.data.text import TokenBatchDataModule, is_heldout
from llm_trm.errors import ConfigMismatchError, DataError
from llm_trm.thinking import THINK_CLOSE

OFFLINE_GSM = "gsm_symbolic"
DEFAULT_SOURCE = "./data/hidden_pairs"  # where `llm-trm datagen --config configs/phase2/datagen.yaml` writes
DATAGEN_HINT = ("run `llm-trm datagen` first (configs/phase2/datagen.yaml writes ./data/hidden_pairs), "
                "or set data.source to a datagen output")


def format_thinking_sequence(tokenizer, prompt: str, thinking: str) -> str:
    """The chat prompt the LLM gets in datagen (assistant turn opened at `<think>`), the thinking, the closing tag."""
    return f"{build_chat_prompt(tokenizer, prompt, thinking=True)}{thinking.strip()}\n{THINK_CLOSE}"


@dataclass(frozen=True)
class CoTExample:
    """One thinking sequence: the token ids as generated, or the texts to render."""

    prompt: str
    thinking: str
    token_ids: tuple[int, ...] = ()

    def ids(self, tokenizer, max_length: int) -> list[int]:
        if self.token_ids:
            return list(self.token_ids[:max_length])
        text = format_thinking_sequence(tokenizer, self.prompt, self.thinking)
        return tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]


def _gsm_symbolic_examples(count: int, seed: int) -> Iterator[CoTExample]:
    import reasoning_gym

    for entry in reasoning_gym.create_dataset("gsm_symbolic", size=count, seed=seed):
        yield CoTExample(entry["question"], entry["metadata"]["answer_cot"])


def _datagen_examples(directory: Path, backbone: str) -> Iterator[CoTExample]:
    """The LLM's own thinking from a datagen directory's records, in index order."""
    try:
        recorded = (read_datagen_config(directory) or {}).get("backbone")
        records = list(iter_records(directory))
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the datagen records in {directory} ({err}): "
                        f"check it with `llm-trm datagen --verify {directory}`.") from err
    if not records:
        raise DataError(f"{directory} holds no datagen records (no complete shards in its index): {DATAGEN_HINT}.")
    # the records' token ids are only meaningful to the tokenizer that made them
    wanted = backbone_id(backbone)
    if recorded is not None and recorded != wanted:
        raise ConfigMismatchError(
            f"the datagen records in {directory} were made with backbone={recorded!r} but this run has "
            f"backbone={wanted!r}: use the same backbone or another data.source."
        )
    for record in records:
        yield CoTExample(record["problem"], record["thinking"], tuple(record.get("token_ids") or ()))


def _table_examples(source: str, subset: str | None, split: str, prompt_field: str,
                    thinking_field: str) -> Iterator[CoTExample]:
    import datasets

    path = Path(source).expanduser()
    try:
        if path.is_file():
            table = datasets.load_dataset("json", data_files=str(path), split="train")
        else:
            table = datasets.load_dataset(source, name=subset, split=split)
    except Exception as err:
        raise DataError(
            f"could not open CoT dataset {source!r} ({type(err).__name__}): check the id/path and network, "
            f"or use data.source={OFFLINE_GSM} offline."
        ) from err
    missing = {prompt_field, thinking_field} - set(table.column_names)
    if missing:
        raise DataError(f"{source} has no column(s) {sorted(missing)}; its columns are {table.column_names}: "
                        "set data.prompt_field / data.thinking_field.")
    for row in table:
        yield CoTExample(row[prompt_field], row[thinking_field])


class SequenceDataset(Dataset):
    def __init__(self, sequences: list[torch.Tensor]) -> None:
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.sequences[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "index": torch.tensor(index)}


class CoTDataModule(TokenBatchDataModule):
    """Variable-length thinking sequences for stage 1b (right-padded batches with attention masks).

    Args:
        backbone: backbone spec whose tokenizer and chat template are used.
        source: datagen output dir (default), Hub dataset id, local .jsonl, or `gsm_symbolic` (offline).
        subset: Hub dataset config name.
        split: Hub split; the held-out split is carved out of it by example.
        prompt_field: column with the problem text (Hub / .jsonl sources).
        thinking_field: column with the reasoning text (Hub / .jsonl sources).
        max_length: truncate sequences to this many tokens.
        num_samples: at most this many training sequences (seed flag `--num_samples`).
        val_samples: at most this many held-out sequences.
        val_fraction: share of examples held out.
        batch_size: sequences per batch per device.
        num_workers: dataloader workers.
        seed: seed of the split (and of generated offline problems).
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, source: str = DEFAULT_SOURCE, subset: str | None = "main",
                 split: str = "train", prompt_field: str = "question", thinking_field: str = "answer",
                 max_length: PositiveInt = 1024, num_samples: PositiveInt = 50000, val_samples: PositiveInt = 256,
                 val_fraction: float = 0.1, batch_size: PositiveInt = 8, num_workers: NonNegativeInt = 0,
                 seed: int = 0, trust_remote_code: bool = False) -> None:
        super().__init__(backbone, batch_size, num_workers, trust_remote_code)
        if num_samples < 1 or val_samples < 1:
            raise DataError("num_samples and val_samples must be >= 1.")
        self.save_hyperparameters()

    def _examples(self) -> Iterator[CoTExample]:
        hp = self.hparams
        if hp.source == OFFLINE_GSM:
            # generate enough problems to fill both splits (the split is by example, as for other sources)
            needed = max(hp.num_samples / (1 - hp.val_fraction), hp.val_samples / hp.val_fraction)
            return _gsm_symbolic_examples(int(needed * 1.5) + 16, hp.seed)
        path = Path(hp.source).expanduser()
        if path.is_dir():
            return _datagen_examples(path, self.backbone)
        # a path, not a Hub id (those have at most one "/"), that is not there yet
        if not path.exists() and (hp.source.startswith((".", "/", "~")) or hp.source.count("/") > 1):
            raise DataError(f"CoT source {hp.source} does not exist: {DATAGEN_HINT}.")
        return _table_examples(hp.source, hp.subset, hp.split, hp.prompt_field, hp.thinking_field)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        tokenizer = self.tokenizer
        train: list[torch.Tensor] = []
        val: list[torch.Tensor] = []
        for index, example in enumerate(self._examples()):
            bucket = val if is_heldout(index, hp.val_fraction, hp.seed) else train
            wanted = hp.val_samples if bucket is val else hp.num_samples
            if len(bucket) < wanted:
                bucket.append(torch.tensor(example.ids(tokenizer, hp.max_length), dtype=torch.long))
            if len(train) >= hp.num_samples and len(val) >= hp.val_samples:
                break
        if not train or not val:
            raise DataError(
                f"{hp.source} gives {len(train)} training / {len(val)} held-out sequences (val_fraction="
                f"{hp.val_fraction}); both need at least one: use more data or change data.val_fraction."
            )
        if len(train) < hp.num_samples or len(val) < hp.val_samples:
            rank_zero_warn(f"{hp.source} has fewer sequences than num_samples={hp.num_samples} / val_samples="
                           f"{hp.val_samples}: training on all {len(train)}, validating on all {len(val)}.")
        rank_zero_info(f"stage 1b data: {len(train)} training / {len(val)} held-out sequences from {hp.source}")
        self.train_set, self.val_set = SequenceDataset(train), SequenceDataset(val)
