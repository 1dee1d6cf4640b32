"""Sandbox overhead: median seconds per run at each isolation level, 20 runs each, interleaved.

`run_python` runs a two-line script; `run_checked` judges a one-function answer against one assert
through the harness (what every MBPP/HumanEval check costs). "limits" is what machines without user
namespaces get; "namespaces+readonly" is what this machine picks when namespaces work.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llm_trm.eval import sandbox  # noqa: E402

RUNS = 20
SCRIPT = "import os\nprint(os.getpid())"
JOB = {"mode": "tests", "solution": "def add(a, b):\n    return a + b", "tests": "assert add(1, 2) == 3"}
LEVELS = {
    sandbox.LIMITS_ONLY: "rlimits, own session, minimal environment",
    sandbox.NAMESPACES: "+ no network, own PID namespace, no capabilities",
    sandbox.NAMESPACES_READONLY: "+ read-only file system outside the working directory",
}


def main() -> None:
    chosen = sandbox.isolation()
    kinds = ("script", "checked")
    seconds: dict[tuple[str, str], list[float]] = {(level, kind): [] for level in LEVELS for kind in kinds}
    for _ in range(RUNS):
        for level in LEVELS:
            sandbox.isolation = lambda level=level: sandbox.Isolation(level)
            for kind in kinds:
                started = time.perf_counter()
                result = sandbox.run_python(SCRIPT) if kind == "script" else sandbox.run_checked(JOB)
                seconds[level, kind].append(time.perf_counter() - started)
                if not result.passed:
                    raise SystemExit(f"{level} {kind} run failed: {result.stderr}")
    print(f"Level chosen on this machine: `{chosen.level}`. Median seconds per run over {RUNS} runs:\n")
    print("| isolation | what it adds | `run_python` | `run_checked` |")
    print("|---|---|---:|---:|")
    for level, adds in LEVELS.items():
        script, checked = (statistics.median(seconds[level, kind]) for kind in kinds)
        print(f"| `{level}` | {adds} | {script:.3f} | {checked:.3f} |")


if __name__ == "__main__":
    main()
