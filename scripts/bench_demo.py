"""The demo as a benchmark section: run `scripts/demo.sh` (what `make demo` runs) and print its own summary.

    python scripts/bench.py demo     # BENCHMARKS.md `demo` section + benchmarks/demo.json (about 12 minutes on 2 CPU cores)

Runs from nothing: an existing runs/demo is moved aside first. Every number in the section is read by
`scripts/demo_summary.py` from what the demo wrote under runs/demo.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    previous = ROOT / "runs" / "demo"
    if previous.exists():  # timed as a newcomer runs it: from nothing (the old outputs are kept beside it)
        from llm_trm.files import move_aside

        print(f"bench demo: moved the previous demo outputs to {move_aside(previous, 'before-bench')}", file=sys.stderr)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, stdout=sys.stderr, stderr=sys.stderr)
    if run.returncode != 0:
        sys.exit(f"bench demo: scripts/demo.sh failed (exit {run.returncode})")
    (ROOT / "benchmarks").mkdir(exist_ok=True)
    shutil.copyfile(ROOT / "runs" / "demo" / "summary.json", ROOT / "benchmarks" / "demo.json")
    print("`make demo` (= `bash scripts/demo.sh`) from this checkout; every number below is read from its outputs "
          "by `scripts/demo_summary.py` (also in runs/demo/summary.md; the numbers in `benchmarks/demo.json`).\n")
    print((ROOT / "runs" / "demo" / "summary.md").read_text())


if __name__ == "__main__":
    main()
