"""Shard reading benchmark: bounded memory and read speed of `HiddenPairDataset`, and the cost of the
checks `llm-trm fit` runs on the shards before training.

Writes two shard directories of random bf16 states with the real `ShardWriter` (D = 576,
prompts of 200 tokens, ~230 KB a sample): ~50 MB and ~2 GB. Each is then, in a fresh process
each time, (1) read end to end through a DataLoader (batch 32, `collate_hidden_pairs`), which
reports its peak RSS and the rate at which it read the stored tensors; (2) checksummed: the
sizes and sha256 of every shard and records file against the index, which is what
`data.verify: true` adds; (3) set up by `HiddenPairDataModule` with `verify` on and off (the
whole check before training: records, sha256, finiteness of every state and the summaries).
The page cache is dropped before each step where the kernel allows it (root), so the figures
are disk reads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llm_trm.data.shards import ShardWriter  # noqa: E402

D, LENGTH = 576, 200
BYTES_PER_SAMPLE = (LENGTH + 1) * D * 2

READER = """
import json, resource, sys, time
from torch.utils.data import DataLoader
from llm_trm.data.shards import HiddenPairDataset, collate_hidden_pairs
dataset = HiddenPairDataset(sys.argv[1])
started, read = time.perf_counter(), 0
for batch in DataLoader(dataset, batch_size=32, collate_fn=collate_hidden_pairs):
    read += batch["pre_mask"].sum().item() * batch["pre"].shape[-1] * 2 + batch["post"].numel() * 2
seconds = time.perf_counter() - started
print(json.dumps({"samples": len(dataset), "bytes": read, "seconds": seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


CHECKSUM = """
import json, sys, time
from pathlib import Path
from llm_trm.data.shards import read_index
from llm_trm.data.shards.verify import checksum_problems
directory = Path(sys.argv[1])
started = time.perf_counter()
shards = read_index(directory)
problems = [p for info in shards for p in checksum_problems(directory, info)]
seconds = time.perf_counter() - started
assert not problems, problems
print(json.dumps({"bytes": sum(s.num_bytes + s.records_num_bytes for s in shards), "seconds": seconds}))
"""

SETUP = """
import json, resource, sys, time
from llm_trm.data.shards import HiddenPairDataModule
started = time.perf_counter()
dm = HiddenPairDataModule(sys.argv[1], verify=sys.argv[2] == "on")
dm.setup("fit")
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_shards(directory: Path, megabytes: int) -> int:
    samples = megabytes * 2**20 // BYTES_PER_SAMPLE
    writer = ShardWriter(directory, {"bench": megabytes}, shard_size=200, dtype="bfloat16")
    generator = torch.Generator().manual_seed(0)
    block = torch.randn(LENGTH, D, generator=generator)
    for index in range(samples):
        record = {"sample_id": f"bench:{index}", "problem": "", "thinking": "", "answer": "", "gold_answer": "",
                  "correct": None, "closed_thinking": True, "token_ids": [], "pre_length": LENGTH,
                  "post_position": LENGTH}
        writer.add(block.roll(index, 0), block[index % LENGTH], 0, record)
    writer.close()
    return samples


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def fresh_process(script: str, *args: str) -> dict:
    """Run `script` in a new interpreter after dropping the page cache; its last stdout line is JSON."""
    dropped = drop_page_cache()
    out = subprocess.run([sys.executable, "-c", script, *args], check=True, capture_output=True,
                         text=True, cwd=ROOT).stdout
    return {**json.loads(out.strip().splitlines()[-1]), "cache_dropped": dropped}


def read_back(directory: Path) -> dict:
    return fresh_process(READER, str(directory))


def check_costs(directory: Path) -> dict:
    return {
        "checksum": fresh_process(CHECKSUM, str(directory)),
        "setup_on": fresh_process(SETUP, str(directory), "on"),
        "setup_off": fresh_process(SETUP, str(directory), "off"),
    }


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for megabytes in (50, 2048):
            directory = Path(tmp) / f"shards_{megabytes}"
            started = time.perf_counter()
            write_shards(directory, megabytes)
            written = time.perf_counter() - started
            size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
            result = read_back(directory)
            rows.append((megabytes, size, written, {**result, **check_costs(directory)}))
    print(f"Random bf16 states, D = {D}, prompts of {LENGTH} tokens; read through a DataLoader (batch 32) in a "
          "fresh process each.\n")
    print("| directory | samples | shard bytes | write s | read MB/s | peak RSS (MB) | page cache dropped |")
    print("|---|---|---|---|---|---|---|")
    for megabytes, size, written, r in rows:
        print(f"| ~{megabytes} MB | {r['samples']} | {size / 2**20:.0f} MiB | {written:.1f} | "
              f"{r['bytes'] / 2**20 / r['seconds']:.0f} | {r['peak_rss_mb']:.0f} | {r['cache_dropped']} |")
    small, large = rows[0][3], rows[1][3]
    print(f"\nPeak RSS ratio (2 GB / 50 MB): {large['peak_rss_mb'] / small['peak_rss_mb']:.2f} (target < 1.5); "
          f"read rate of the 2 GB directory: {large['bytes'] / 2**20 / large['seconds']:.0f} MB/s (target >= 200).")
    print("\nChecks before training (`llm-trm fit` on the TRM runs them in `HiddenPairDataModule.setup`). "
          "sha256 = sizes + sha256 of every shard and records file, what `data.verify: true` adds; "
          "\"/ one read\" = its time over the DataLoader read above; setup = the whole check (records, "
          "sha256 if on, finite states, summaries of the three splits).\n")
    print("| directory | sha256 s | sha256 MB/s | sha256 / one read | setup s, verify on | setup s, verify off "
          "| setup peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    for megabytes, _, _, r in rows:
        checksum = r["checksum"]
        print(f"| ~{megabytes} MB | {checksum['seconds']:.1f} | {checksum['bytes'] / 2**20 / checksum['seconds']:.0f} "
              f"| {checksum['seconds'] / r['seconds']:.2f} | {r['setup_on']['seconds']:.1f} "
              f"| {r['setup_off']['seconds']:.1f} | {r['setup_on']['peak_rss_mb']:.0f} |")
    checksum = large["checksum"]
    print(f"\nChecksum cost on the 2 GB directory: {checksum['seconds']:.1f} s "
          f"({checksum['bytes'] / 2**20 / checksum['seconds']:.0f} MB/s), "
          f"{checksum['seconds'] / large['seconds']:.2f}x the time of reading the data once; "
          f"opt out with `data.verify: false`.")


if __name__ == "__main__":
    main()
