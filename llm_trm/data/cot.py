"""Stage 1b data: thinking sequences (chat prompt + `<think> reasoning </think>`).

Sources (`source=`):
- a Hugging Face Hub dataset with a prompt field and a reasoning field
  (default `openai/gsm8k`, subset `main`: `question` + the worked `answer`);
- a local `.jsonl` file with those fields;
- a datagen output directory (Phase 2 shards): the LLM's own thinking from the records;
- `gsm_symbolic`: GSM8K-style problems with worked solutions from `reasoning-gym`, offline.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils.data import Dataset

from llm_trm.backbone import DEFAULT_BACKBONE, THINK_CLOSE, THINK_OPEN
from llm_trm.data.text import TokenBatchDataModule, is_heldout
from llm_trm.errors import DataError

OFFLINE_GSM = "gsm_symbolic"


def format_thinking_sequence(tokenizer, prompt: str, thinking: str) -> str:
    """The chat prompt with the assistant turn opened, then the thinking inside think tags."""
    head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    if not head.rstrip().endswith(THINK_OPEN):  # models without native thinking: open the tag ourselves
        head += f"{THINK_OPEN}\n"
    return f"{head}{thinking.strip()}\n{THINK_CLOSE}"


def _gsm_symbolic_pairs(count: int, seed: int) -> Iterator[tuple[str, str]]:
    import reasoning_gym

    for entry in reasoning_gym.create_dataset("gsm_symbolic", size=count, seed=seed):
        yield entry["question"], entry["metadata"]["answer_cot"]


def _datagen_pairs(directory: Path) -> Iterator[tuple[str, str]]:
    records = sorted(directory.glob("*.jsonl"))
    if not records:
        raise DataError(f"{directory} has no datagen records (*.jsonl): run `llm-trm datagen` first.")
    for path in records:
        with open(path) as handle:
            for line in handle:
                record = json.loads(line)
                yield record["problem"], record["thinking"]


def _table_pairs(source: str, subset: str | None, split: str, prompt_field: str,
                 thinking_field: str) -> Iterator[tuple[str, str]]:
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
        yield row[prompt_field], row[thinking_field]


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
        source: Hub dataset id, local .jsonl, datagen output dir, or `gsm_symbolic` (offline).
        subset: Hub dataset config name.
        split: Hub split; the held-out split is carved out of it by example.
        prompt_field: column with the problem text.
        thinking_field: column with the reasoning text.
        max_length: truncate sequences to this many tokens.
        num_samples: training sequences.
        val_samples: held-out sequences.
        val_fraction: share of examples held out.
        batch_size: sequences per batch per device.
        num_workers: dataloader workers.
        seed: seed of the split (and of generated offline problems).
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, source: str = "openai/gsm8k", subset: str | None = "main",
                 split: str = "train", prompt_field: str = "question", thinking_field: str = "answer",
                 max_length: PositiveInt = 1024, num_samples: PositiveInt = 5000, val_samples: PositiveInt = 256,
                 val_fraction: float = 0.1, batch_size: PositiveInt = 8, num_workers: NonNegativeInt = 0,
                 seed: int = 0, trust_remote_code: bool = False) -> None:
        super().__init__(backbone, batch_size, num_workers, trust_remote_code)
        if num_samples < 1 or val_samples < 1:
            raise DataError("num_samples and val_samples must be >= 1.")
        self.save_hyperparameters()

    def _pairs(self) -> Iterator[tuple[str, str]]:
        hp = self.hparams
        if hp.source == OFFLINE_GSM:
            # generate enough problems to fill both splits (the split is by example, as for other sources)
            needed = max(hp.num_samples / (1 - hp.val_fraction), hp.val_samples / hp.val_fraction)
            return _gsm_symbolic_pairs(int(needed * 1.5) + 16, hp.seed)
        path = Path(hp.source).expanduser()
        if path.is_dir():
            return _datagen_pairs(path)
        if hp.source.startswith((".", "/", "~")) and not path.exists():
            raise DataError(f"CoT source {hp.source} does not exist: check data.source.")
        return _table_pairs(hp.source, hp.subset, hp.split, hp.prompt_field, hp.thinking_field)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        train: list[torch.Tensor] = []
        val: list[torch.Tensor] = []
        for index, (prompt, thinking) in enumerate(self._pairs()):
            bucket = val if is_heldout(index, hp.val_fraction, hp.seed) else train
            wanted = hp.val_samples if bucket is val else hp.num_samples
            if len(bucket) < wanted:
                text = format_thinking_sequence(self.tokenizer, prompt, thinking)
                ids = self.tokenizer(text, add_special_tokens=False, truncation=True,
                                     max_length=hp.max_length)["input_ids"]
                bucket.append(torch.tensor(ids, dtype=torch.long))
            if len(train) >= hp.num_samples and len(val) >= hp.val_samples:
                break
        if len(train) < hp.num_samples or len(val) < hp.val_samples:
            raise DataError(
                f"{hp.source} gives {len(train)} training / {len(val)} held-out sequences, fewer than "
                f"num_samples={hp.num_samples} / val_samples={hp.val_samples}: lower them or use more data."
            )
        self.train_set, self.val_set = SequenceDataset(train), SequenceDataset(val)
