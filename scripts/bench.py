"""Run the benchmarks and rewrite their sections of BENCHMARKS.md.

    python scripts/bench.py                 # every section
    python scripts/bench.py phase1 datagen  # only these
    python scripts/bench.py gpu             # the GPU benchmark (`make bench-gpu`): only when named, needs CUDA
    python scripts/bench.py study           # the study (`make study`, ~1 hour on 2 CPU cores): only when named

Each section is a script `scripts/bench_<name>.py` that prints a markdown body to stdout.
Its section in BENCHMARKS.md (between `<!-- bench:<name> -->` markers) is replaced with
that body, headed by the machine and the command, so sections can be refreshed one by one.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
SECTIONS = ["phase1", "datagen", "thinking", "shards", "trm", "evaluate", "grpo", "sandbox"]
ON_REQUEST = ["gpu", "study"]  # run only when named: gpu needs a CUDA device, the study takes about an hour


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads), {device}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def run_section(name: str) -> str:
    script = ROOT / "scripts" / f"bench_{name}.py"
    started = time.time()
    # stderr passes through (progress, warnings); a failing benchmark's own message and exit code are kept
    run = subprocess.run([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if run.returncode != 0:
        print(f"bench: {name} failed (exit {run.returncode}); BENCHMARKS.md keeps its old {name} section",
              file=sys.stderr)
        sys.exit(run.returncode)
    body = run.stdout
    took = time.time() - started
    header = (f"Machine: {machine()}. Command: `python scripts/bench.py {name}` "
              f"({time.strftime('%Y-%m-%d')}, {took:.0f} s).\n\n")
    return header + body.strip() + "\n"


def replace_section(text: str, name: str, body: str) -> str:
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body}{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return text.rstrip() + f"\n\n## {name}\n\n{block}\n"


def main(names: list[str]) -> None:
    wanted = names or [n for n in SECTIONS if (ROOT / "scripts" / f"bench_{n}.py").exists()]
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    for name in wanted:
        print(f"running {name} ...", flush=True)
        text = replace_section(text, name, run_section(name))
        BENCHMARKS.write_text(text)  # after each section, so a later failure keeps the earlier ones
    print(f"wrote {BENCHMARKS}")


if __name__ == "__main__":
    main(sys.argv[1:])
