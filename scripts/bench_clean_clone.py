"""The README's two commands as a new user runs them: a fresh clone, `make demo`, then `make test`.

    python scripts/bench.py clean_clone   # BENCHMARKS.md `clean_clone` section (about 20 minutes on 2 CPU cores)

Clones this repository's committed HEAD into a temporary folder (nothing of this checkout is reused: no
.venv, no runs/), runs `make demo` (which sets up .venv on first use) and then `make test` there, and
prints each one's wall time, exit status and what it reported: the demo's own summary line and
pytest's final line. The clone is removed afterwards; the full logs stay beside it in the printed folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_logged(command: list[str], cwd: Path, log: Path) -> tuple[int, float]:
    """Run `command` in `cwd` with its output in `log`; (exit status, wall seconds)."""
    # the user's shell: no virtual environment of this checkout leaks into the clone's
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(ROOT)))
    started = time.perf_counter()
    with open(log, "w") as handle:
        status = subprocess.run(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
    return status, time.perf_counter() - started


def last_line(log: Path, containing: str) -> str:
    """The last line of `log` that contains `containing` (stripped of terminal colours), or '-'."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if containing in line]
    return lines[-1].replace("\x1b[1m", "").replace("\x1b[0m", "").strip("= ").strip() if lines else "-"


def main() -> None:
    logs = Path(tempfile.mkdtemp(prefix="llm-trm-clean-clone-"))
    clone = logs / "llm-trm"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True,
                            check=True).stdout.strip()
    demo_status, demo_s = run_logged(["make", "demo"], clone, logs / "demo.log")
    summary = clone / "runs" / "demo" / "summary.md"
    demo_line = last_line(summary, "Wall time") if summary.is_file() else "-"
    test_status, test_s = run_logged(["make", "test"], clone, logs / "test.log")
    test_line = last_line(logs / "test.log", " in ")
    print(f"A fresh clone of commit `{commit}`, then the README's two commands in it, in this order (`make demo` "
          "sets up `.venv` on first use, so its time includes installing every dependency).\n")
    print("| command | exit status | wall time | what it reported |")
    print("|---|---|---|---|")
    print(f"| `make demo` | {demo_status} | {demo_s / 60:.1f} min | the demo's summary: {demo_line} |")
    print(f"| `make test` | {test_status} | {test_s / 60:.1f} min | pytest: {test_line} |")
    print(f"\nLogs: `{logs}` (on the machine that ran it).")
    shutil.rmtree(clone, ignore_errors=True)  # our own throwaway clone; the logs stay
    if demo_status or test_status:
        sys.exit(f"bench clean_clone: make demo exited {demo_status}, make test {test_status}; logs in {logs}")


if __name__ == "__main__":
    main()
