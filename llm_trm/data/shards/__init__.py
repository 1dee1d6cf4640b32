"""Hidden-pair shards, the Phase 2 datagen output: format, writer, verifier, reader, DataModule, seed interop.

One module per job (see each module's docstring; the directory layout is in `format`):

- `format`: names, the index and the stored config, records, shard-vs-index checks;
- `writer`: `ShardWriter`, resumable, one per DDP rank, never deleting what it cannot account for;
- `verify`: `verify_shards` (what `llm-trm datagen --verify` prints) and the per-shard checks;
- `dataset`: the lazy reader `HiddenPairDataset` and `collate_hidden_pairs`;
- `splits`, `samplers`: the stable train / val / test split and length-bucketed batches;
- `summaries`: `PairSummaries` and the checking pass that builds them;
- `datamodule`: `HiddenPairDataModule` (`class_path: llm_trm.data.shards.HiddenPairDataModule`);
- `stats`: per-dataset counts of closed thinking, accuracy and thinking tokens;
- `seed`: the seed's `hidden_pairs.pt` in and out.
"""

from .datamodule import HiddenPairDataModule
from .dataset import HiddenPairDataset, collate_hidden_pairs, open_shard
from .format import (
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    REQUIRED_RECORD_KEYS,
    STORED_DTYPES,
    OutputDirError,
    ShardCorruptError,
    ShardIndexError,
    ShardInfo,
    config_differences,
    dataset_of,
    index_file_name,
    index_files,
    iter_records,
    read_datagen_config,
    read_index,
)
from .samplers import LengthBucketBatchSampler
from .seed import export_seed_pairs, import_seed_pairs
from .splits import split_sample_ids, split_three_ways, unit_hash
from .stats import DatasetCounts, count_records, sum_counts
from .summaries import PairSummaries
from .verify import VerifyReport, verify_shards
from .writer import SetAside, ShardWriter

__all__ = [
    "CONFIG_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "REQUIRED_RECORD_KEYS",
    "STORED_DTYPES",
    "DatasetCounts",
    "HiddenPairDataModule",
    "HiddenPairDataset",
    "LengthBucketBatchSampler",
    "OutputDirError",
    "PairSummaries",
    "SetAside",
    "ShardCorruptError",
    "ShardIndexError",
    "ShardInfo",
    "ShardWriter",
    "VerifyReport",
    "collate_hidden_pairs",
    "config_differences",
    "count_records",
    "dataset_of",
    "export_seed_pairs",
    "import_seed_pairs",
    "index_file_name",
    "index_files",
    "iter_records",
    "open_shard",
    "read_datagen_config",
    "read_index",
    "split_sample_ids",
    "split_three_ways",
    "sum_counts",
    "unit_hash",
    "verify_shards",
]
