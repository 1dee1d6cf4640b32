"""Stage 1a data: general text, tokenised into fixed-length chunks.

Sources (`source=`):
- a Hugging Face Hub dataset id, streamed (`HuggingFaceFW/fineweb-edu`, the real default);
  documents are sharded across DDP ranks and dataloader workers;
- a local file or directory of `.txt`, `.jsonl`/`.json` or `.parquet` files;
- `embedded`: CPython's reference text (`pydoc_data.topics`), offline, for the demo.

The held-out split is by document (a stable hash of its position in the source), so
train and validation never share text, whatever the number of ranks or workers.
Finite sources are tokenised once in `setup()` (and `num_samples` larger than the
data is an error right away); the streamed source is read lazily.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import lightning as L
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from llm_trm.backbone import DEFAULT_BACKBONE, load_tokenizer
from llm_trm.errors import DataError

EMBEDDED_CORPUS = "embedded"
FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"
LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def is_heldout(key: str | int, val_fraction: float, seed: int = 0) -> bool:
    """Deterministic split membership from a stable hash (not Python's salted hash)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def embedded_documents() -> list[str]:
    """CPython's reference text, one document per paragraph (a finer held-out split than per topic)."""
    from pydoc_data.topics import topics

    return [para for name in sorted(topics) for para in topics[name].split("\n\n") if para.strip()]


def _local_data_files(path: Path) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise DataError(f"no .txt/.jsonl/.json/.parquet files under {path}: point data.source at your text.")
    kinds = {LOCAL_SUFFIXES.get(p.suffix) for p in files}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"{path}: use one file type among {sorted(LOCAL_SUFFIXES)} (found {sorted(map(str, kinds))}).")
    return kinds.pop(), [str(p) for p in files]


def open_documents(source: str, subset: str | None, split: str, text_field: str, streaming: bool) -> Iterable[str]:
    """An iterable of document texts from any supported source."""
    if source == EMBEDDED_CORPUS:
        return embedded_documents()
    import datasets

    local = Path(source).expanduser()
    field = text_field
    if local.exists():
        builder, files = _local_data_files(local)
        dataset = datasets.load_dataset(builder, data_files=files, split="train")
        field = "text" if builder == "text" else text_field
    elif source.startswith((".", "/", "~")):
        raise DataError(f"text source {source} does not exist: check data.source.")
    else:
        try:
            dataset = datasets.load_dataset(source, name=subset, split=split, streaming=streaming)
        except Exception as err:  # offline, unknown id, bad subset: one actionable line
            raise DataError(
                f"could not open dataset {source!r} (subset {subset!r}, split {split!r}): {type(err).__name__}. "
                "Check the id and network, or use data.source=embedded or a local path."
            ) from err
    return (row[field] for row in dataset)


def iter_chunks(documents: Iterable[str], tokenizer, seq_len: int) -> Iterator[torch.Tensor]:
    """Concatenate tokenised documents (EOS between them) and cut fixed-length chunks."""
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    for text in documents:
        if not text:
            continue
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        buffer.append(eos)
        while len(buffer) >= seq_len:
            yield torch.tensor(buffer[:seq_len], dtype=torch.long)
            buffer = buffer[seq_len:]


def _split_documents(documents: Iterable[str], heldout: bool, val_fraction: float, seed: int) -> Iterator[tuple[int, str]]:
    for index, text in enumerate(documents):
        if is_heldout(index, val_fraction, seed) == heldout:
            yield index, text


class ChunkDataset(Dataset):
    """Pre-tokenised chunks [N, seq_len] of a finite source (every token real)."""

    def __init__(self, chunks: torch.Tensor) -> None:
        self.chunks = chunks

    def __len__(self) -> int:
        return self.chunks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.chunks[index]
        # the index lets a module cache this example's hidden states across epochs
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "index": torch.tensor(index)}


class StreamingChunkDataset(IterableDataset):
    """Chunks from a streamed source; documents sharded over (rank, worker), `num_samples` in total."""

    def __init__(self, open_docs: Callable[[], Iterable[str]], tokenizer, seq_len: int, num_samples: int,
                 heldout: bool, val_fraction: float, seed: int) -> None:
        self.open_docs = open_docs
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.num_samples = num_samples
        self.heldout = heldout
        self.val_fraction = val_fraction
        self.seed = seed

    def _shard(self) -> tuple[int, int]:
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        return rank * workers + worker_id, world * workers

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        shard, num_shards = self._shard()
        quota = self.num_samples // num_shards + (1 if shard < self.num_samples % num_shards else 0)
        docs = (text for i, text in _split_documents(self.open_docs(), self.heldout, self.val_fraction, self.seed)
                if i % num_shards == shard)
        for produced, ids in enumerate(iter_chunks(docs, self.tokenizer, self.seq_len)):
            if produced >= quota:
                return
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def __len__(self) -> int:  # lets Lightning size epochs and progress bars
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return math.ceil(self.num_samples / world)


def pad_collate(pad_id: int) -> Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    """Right-pad variable-length `input_ids` and build the attention mask."""

    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(item["input_ids"].shape[0] for item in items)
        ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            n = item["input_ids"].shape[0]
            ids[row, :n] = item["input_ids"]
            mask[row, :n] = item["attention_mask"]
        batch = {"input_ids": ids, "attention_mask": mask}
        if "index" in items[0]:
            batch["index"] = torch.stack([item["index"] for item in items])
        return batch

    return collate


class TokenBatchDataModule(L.LightningDataModule):
    """Shared loaders for datamodules that yield `input_ids` / `attention_mask` batches."""

    def __init__(self, backbone: str, batch_size: int, num_workers: int, trust_remote_code: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.trust_remote_code = trust_remote_code
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def tokenizer(self):
        return load_tokenizer(self.backbone, self.trust_remote_code)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() first")
        shuffle = shuffle and not isinstance(dataset, IterableDataset)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=pad_collate(self.tokenizer.pad_token_id),
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


class TextDataModule(TokenBatchDataModule):
    """Fixed-length token chunks of general text for stage 1a.

    Args:
        backbone: backbone spec whose tokenizer is used (linked to the model's by the CLI).
        source: Hub dataset id (streamed), local file/dir, or `embedded`.
        subset: Hub dataset config name (fineweb-edu: `sample-10BT`).
        split: Hub split to read; the held-out split is carved out of it by document.
        text_field: column holding the text (json/parquet/Hub sources).
        seq_len: tokens per chunk.
        num_samples: training chunks (seed flag `--num_samples`).
        val_samples: held-out chunks.
        val_fraction: share of documents held out.
        batch_size: chunks per batch per device (seed flag `--batch_size`).
        num_workers: dataloader workers.
        seed: seed of the document split.
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, source: str = FINEWEB_EDU, subset: str | None = "sample-10BT",
                 split: str = "train", text_field: str = "text", seq_len: PositiveInt = 512,
                 num_samples: PositiveInt = 50000, val_samples: PositiveInt = 512, val_fraction: float = 0.05,
                 batch_size: PositiveInt = 8, num_workers: NonNegativeInt = 0,
                 seed: int = 0, trust_remote_code: bool = False) -> None:
        super().__init__(backbone, batch_size, num_workers, trust_remote_code)
        if num_samples < 1 or val_samples < 1 or seq_len < 2:
            raise DataError("num_samples, val_samples must be >= 1 and seq_len >= 2.")
        if not 0 < val_fraction < 1:
            raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}.")
        self.save_hyperparameters()
        self.source, self.subset, self.split = source, subset, split
        self.text_field, self.seq_len = text_field, seq_len
        self.num_samples, self.val_samples = num_samples, val_samples
        self.val_fraction, self.seed = val_fraction, seed

    @property
    def is_streamed(self) -> bool:
        looks_local = self.source.startswith((".", "/", "~")) or Path(self.source).expanduser().exists()
        return self.source != EMBEDDED_CORPUS and not looks_local

    def _documents(self) -> Iterable[str]:
        return open_documents(self.source, self.subset, self.split, self.text_field, streaming=self.is_streamed)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.is_streamed:
            self._documents()  # opens the stream now, so a bad id or no network fails before training
            make = lambda count, heldout: StreamingChunkDataset(  # noqa: E731
                self._documents, self.tokenizer, self.seq_len, count, heldout, self.val_fraction, self.seed)
            self.train_set, self.val_set = make(self.num_samples, False), make(self.val_samples, True)
            return
        self.train_set = ChunkDataset(self._materialise(heldout=False, count=self.num_samples, name="num_samples"))
        self.val_set = ChunkDataset(self._materialise(heldout=True, count=self.val_samples, name="val_samples"))

    def _materialise(self, heldout: bool, count: int, name: str) -> torch.Tensor:
        docs = (text for _, text in _split_documents(self._documents(), heldout, self.val_fraction, self.seed))
        chunks = []
        for chunk in iter_chunks(docs, self.tokenizer, self.seq_len):
            chunks.append(chunk)
            if len(chunks) == count:
                return torch.stack(chunks)
        split = "held-out" if heldout else "training"
        raise DataError(
            f"{name}={count} is larger than the data: {self.source} gives {len(chunks)} {split} chunks of "
            f"{self.seq_len} tokens; lower data.{name} or data.seq_len, or use a larger source."
        )
