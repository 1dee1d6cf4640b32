"""Run the benchmarks and rewrite their sections of BENCHMARKS.md.

    python scripts/bench.py                 # every section
    python scripts/bench.py phase1 datagen  # only these
    python scripts/bench.py gpu             # the GPU benchmark (`make bench-gpu`): only when named, needs CUDA
    python scripts/bench.py study           # the study (`make study`, ~1 hour on 2 CPU cores): only when named
    python scripts/bench.py demo            # run the demo and record its own summary: only when named
    python scripts/bench.py clean_clone     # `make demo` + `make test` in a fresh clone, as a new user: only when named

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
# run only when named: gpu needs a CUDA device, the study takes about an hour, demo reruns `make demo`,
# clean_clone sets up a fresh clone and runs `make demo` and `make test` there
ON_REQUEST = ["gpu", "study", "demo", "clean_clone"]


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


README = ROOT / "README.md"
README_START, README_END = "<!-- results: written by scripts/bench.py -->", "<!-- /results -->"


def _share(row: dict, name: str = "share_answer_kl") -> str:
    """A share recovered with its interval: of the answer KL (teacher-forced over cot's answer: the
    content-bearing one) by default, or of the first-token KL."""
    if row.get(name) is None:
        return "-"
    low, high = row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")
    interval = f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""
    return f"{row[name]:.2f}{interval}"


def readme_results() -> str:
    """The README's headline numbers, copied from what the demo and the study wrote (benchmarks/*.json)."""
    import json

    lines = []
    demo = ROOT / "benchmarks" / "demo.json"
    if demo.is_file():
        facts = json.loads(demo.read_text())
        datagen = facts.get("datagen", {})
        rows = {row["mode"]: row for row in facts.get("evaluation", {}).get("summary", [])}
        total = sum(facts.get("step_seconds", {}).values())
        lines.append(f"- **The demo** (`make demo`, {total / 60:.1f} min on this repository's 2-core CPU machine): the "
                     f"embedded model closed its own thinking on {100 * (datagen.get('closed_share') or 0):.0f}% of "
                     f"{datagen.get('samples')} problems; held out, cot answered "
                     f"{100 * rows.get('cot', {}).get('accuracy', 0):.0f}% and no_think "
                     f"{100 * rows.get('no_think', {}).get('accuracy', 0):.0f}% right; share of CoT's answer KL "
                     "reduction recovered (teacher-forced over cot's answer): " + ", ".join(
                         f"{mode} {_share(rows[mode])}" for mode in ("trm", "oracle", "oracle_full", "shuffled")
                         if mode in rows) + " (BENCHMARKS.md, section demo).")
    study = ROOT / "benchmarks" / "study.json"
    if study.is_file():
        facts = json.loads(study.read_text())
        ladder = facts.get("ladder", [])
        lines.append(f"- **The study** (`make study`, {facts.get('wall_seconds', 0) / 60:.0f} min, "
                     f"{len(facts.get('problems', []))} held-out problems): share of CoT's answer KL reduction "
                     "recovered (95% interval): " + "; ".join(f"{row['mode']} {_share(row)}" for row in ladder
                                                              if row["mode"] not in ("cot", "no_think"))
                     + " (BENCHMARKS.md, section study, with the accuracy, agreement and the TRM's R^2).")
    if not lines:
        lines.append("- (no demo or study results recorded yet: `python scripts/bench.py demo study`)")
    return "\n".join(lines) + "\n"


def update_readme() -> None:
    text = README.read_text()
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.S)
    if pattern.search(text):
        README.write_text(pattern.sub(lambda _: f"{README_START}\n{readme_results()}{README_END}", text))


def main(names: list[str]) -> None:
    wanted = names or [n for n in SECTIONS if (ROOT / "scripts" / f"bench_{n}.py").exists()]
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    for name in wanted:
        print(f"running {name} ...", flush=True)
        text = replace_section(text, name, run_section(name))
        BENCHMARKS.write_text(text)  # after each section, so a later failure keeps the earlier ones
    update_readme()
    print(f"wrote {BENCHMARKS} (and the results block of {README.name})")


if __name__ == "__main__":
    main(sys.argv[1:])
