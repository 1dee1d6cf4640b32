"""The study: does a predicted end-of-thinking state stand in for thinking? (issue 12, `make study`)

    python scripts/bench.py study                    # BENCHMARKS.md `study` section (+ benchmarks/study.json, .png)
    python scripts/bench_study.py --work runs/study  # the same, printed; finished steps are reused

On the embedded model, offline, on CPU, with the demo's problem family, prompt and budgets
(configs/demo/*.yaml, scaled up), every step a real `llm-trm` command:

1. datagen of 128 problems (of the family's 200), storing the last 4 thinking states of each;
2. the compressor (stage 1a on general text, 1b on the datagen records), the TRM (m = 1), and
   two bridges: m = 1 (trained on true states and on the TRM's predictions) and m = 4 (true states);
3. the ladder on held-out problems of the same family, all against the same `cot` run:
   no_think, trm through norm matching, through the concept token, through the bridge, the
   oracle (the true state through the bridge, m = 1 and m = 4), oracle_full (without the
   compressor), the shuffled control (another problem's true state), cot — accuracy, agreement
   with cot, first-answer-token KL(cot || mode), the answer KL (cot's own answer teacher-forced
   under each mode: KL(cot || mode) per answer token, and its NLL) and the share of CoT's effect
   recovered on each, with 95% intervals; and the TRM's held-out R^2 against the mean / ridge /
   last-token baselines. The issue's targets are checked on both the first-token KL share and the
   answer KL share: a templated answer ("The answer is ...") starts with the same token in every
   mode, so only the answer-level share sees whether the answer's content moved.

Model selection never sees the reported split: the TRM and the bridges select on their val split
and report on their test split; the ladder runs on problems no datagen sample was drawn from.
Prints the markdown section; writes benchmarks/study.json, benchmarks/study_ladder.png and
TensorBoard logs under <work>/tensorboard.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo"
OUT = ROOT / "benchmarks"


# --------------------------------------------------------------------------- steps as llm-trm commands


def llm_trm(*args: str, log: Path) -> float:
    """Run `llm-trm ARGS` in a fresh process (offline), its output appended to `log`; returns seconds."""
    started = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "a") as handle:
        handle.write(f"\n$ llm-trm {' '.join(args)}\n")
        handle.flush()
        run = subprocess.run([sys.executable, "-m", "llm_trm.cli", *args], cwd=ROOT, env=env, stdout=handle,
                             stderr=subprocess.STDOUT)
    if run.returncode != 0:
        sys.exit(f"study: `llm-trm {' '.join(args)}` failed (exit {run.returncode}); see {log}")
    return time.perf_counter() - started


def derived_config(name: str, work: Path, edit: dict[str, Any]) -> Path:
    """configs/demo/<name>.yaml with `edit` applied (dotted keys), written to <work>/configs/<name>.yaml."""
    config = yaml.safe_load((DEMO / f"{name}.yaml").read_text())
    for dotted, value in edit.items():
        node = config
        *path, last = dotted.split(".")
        for key in path:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[last] = value
    target = work / "configs" / f"{name}.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def export_path_key(config_name: str) -> str:
    """The dotted key of the ExportBestModel callback's `path` in a demo fit config."""
    config = yaml.safe_load((DEMO / f"{config_name}.yaml").read_text())
    for index, callback in enumerate(config["trainer"]["callbacks"]):
        if callback["class_path"].endswith("ExportBestModel"):
            return f"trainer.callbacks.{index}.init_args.path"
    raise SystemExit(f"study: configs/demo/{config_name}.yaml has no ExportBestModel callback")


def fit(name: str, work: Path, export: Path, edit: dict[str, Any], log: Path) -> float:
    """`llm-trm fit` on a derived demo config, exporting to `export`; skipped when the export exists."""
    if (export / "config.json").is_file():
        return 0.0
    logger = {"trainer.logger.init_args.save_dir": str(work / "runs")}
    config = derived_config(name, work, {**logger, export_path_key(name): str(export), **edit})
    return llm_trm("fit", "--config", str(config), log=log)


def run_pipeline(args: argparse.Namespace, work: Path, log: Path) -> dict[str, float]:
    pairs = work / "hidden_pairs"
    seconds: dict[str, float] = {}
    if not (pairs / "index.json").is_file() or args.fresh_datagen:
        config = derived_config("datagen", work, {"data.num_samples": args.problems, "model.num_post_states": 4,
                                                  "writer.output_dir": str(pairs),
                                                  "writer.checkpoint_every": 32})
        seconds["datagen"] = llm_trm("datagen", "--config", str(config), "--trainer.enable_progress_bar", "false",
                                     log=log)
    seconds["stage1a"] = fit("stage1a", work, work / "compressor_1a", {}, log)
    seconds["stage1b"] = fit("stage1b", work, work / "compressor_1b", {
        "model.init_args.init_from": str(work / "compressor_1a"), "data.init_args.source": str(pairs),
        "data.init_args.num_samples": args.problems}, log)
    seconds["trm"] = fit("trm", work, work / "trm_model", {
        "model.init_args.compressor_checkpoint": str(work / "compressor_1b"), "data.init_args.data_path": str(pairs),
        "trainer.max_epochs": args.trm_epochs}, log)
    bridge_data = {"data.init_args.data_path": str(pairs), "trainer.max_epochs": args.bridge_epochs}
    seconds["bridge_m1"] = fit("bridge", work, work / "bridge_m1", {
        **bridge_data, "model.init_args.trm_checkpoint": str(work / "trm_model"),
        "model.init_args.compressor_checkpoint": str(work / "compressor_1b"), "model.init_args.trm_fraction": 0.5},
        log)
    seconds["bridge_m4"] = fit("bridge", work, work / "bridge_m4", {
        **bridge_data, "model.init_args.n_states": 4, "model.init_args.n_soft_vectors": 4}, log)
    return with_recorded_times(seconds, work / "step_seconds.json")


def shown(path: Path) -> str:
    """`path` relative to the repository when inside it (what the reader's checkout has)."""
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


STEPS = ["datagen", "stage1a", "stage1b", "trm", "bridge_m1", "bridge_m4"]


def with_recorded_times(seconds: dict[str, float], record: Path) -> dict[str, float]:
    """The steps' times, a step reused from an earlier run (0 s now) timed as it ran then; a reused step
    whose time was never recorded is left out."""
    recorded = json.loads(record.read_text()) if record.is_file() else {}
    recorded.update({name: took for name, took in seconds.items() if took > 0})
    record.write_text(json.dumps(recorded, indent=1))
    return {name: recorded[name] for name in STEPS if name in recorded}


def check_room_for_held_out(problems: int, eval_problems: int) -> None:
    """Fail before hours of work when datagen would draw (nearly) every problem of the family,
    leaving too few held-out ones for the ladder: a small family repeats its problems across splits."""
    from llm_trm.data.problems import load_problems

    dataset = yaml.safe_load((DEMO / "datagen.yaml").read_text())["data"]["dataset"]
    drawn = {p.prompt for p in load_problems(dataset, "train", problems, 0)}
    unseen = [p for p in load_problems(dataset, "test", problems + eval_problems, 0) if p.prompt not in drawn]
    if len(unseen) < eval_problems:
        sys.exit(f"bench_study: {dataset} leaves only {len(unseen)} problems unseen by {problems} datagen problems "
                 f"(the ladder needs {eval_problems}): lower --problems or --eval-problems.")


# --------------------------------------------------------------------------- the ladder


LADDER = [  # (label, adapter, mode); cot and no_think come first from the same reasoner
    ("trm (norm-match)", "norm_match", "trm"),
    ("trm (concept)", "concept", "trm"),
    ("trm (bridge)", "bridge_m1", "trm"),
    ("oracle (bridge)", "bridge_m1", "oracle"),
    ("oracle_full (bridge)", "bridge_m1", "oracle_full"),
    ("shuffled (bridge)", "bridge_m1", "shuffled"),
]


def run_ladder(args: argparse.Namespace, work: Path) -> tuple[list[Any], dict[str, Any]]:
    import torch

    from llm_trm.backbone import load_backbone
    from llm_trm.evaluate import add_fidelity, compare_with_cot, held_out_problems, summarize
    from llm_trm.inference import LatentReasoner

    datagen = yaml.safe_load((DEMO / "datagen.yaml").read_text())
    evaluation = yaml.safe_load((DEMO / "evaluate.yaml").read_text())
    problems = held_out_problems(evaluation["datasets"], "test", args.eval_problems, evaluation.get("seed", 0),
                                 work / "hidden_pairs")
    budget = dict(max_new_tokens=evaluation["max_new_tokens"], max_thinking_tokens=datagen["model"]["max_new_tokens"],
                  batch_size=evaluation.get("batch_size", 8), on_error="record", capture_logits=True)
    torch.manual_seed(0)
    backbone = load_backbone("embedded", "float32")
    reasoner = LatentReasoner(backbone, compressor=str(work / "compressor_1b"), trm=str(work / "trm_model"),
                              adapter="norm_match", device="cpu")
    results: dict[str, list[Any]] = {}
    started = time.perf_counter()
    results["cot"] = reasoner.answer(problems, mode="cot", reference="own", **budget)
    cot = results["cot"]
    compare_with_cot(cot, cot, problems)  # cot against itself: KL 0, the share's upper end

    def run(label: str, mode: str, who: LatentReasoner) -> None:
        rows = who.answer(problems, mode=mode, reference=cot, **budget)  # scores cot's answers under the mode
        for row in rows:
            row.mode = label
        compare_with_cot(rows, cot, problems)
        for row in rows:  # only the reference's distributions are kept
            row.first_token_logits = None
        results[label] = rows

    run("no_think", "no_think", reasoner)
    for label, adapter, mode in LADDER:
        reasoner.use_adapter(str(work / adapter) if adapter.startswith("bridge") else adapter)
        run(label, mode, reasoner)
    # m = 4: the oracle through the 4-state bridge, with the same remembered thinking
    oracle_m4 = LatentReasoner(backbone, compressor=str(work / "compressor_1b"), adapter=str(work / "bridge_m4"),
                               device="cpu")
    oracle_m4.remembered_thinking = reasoner.remembered_thinking
    run("oracle (bridge, m=4)", "oracle", oracle_m4)
    for row in cot:
        row.first_token_logits = None
    summaries = [summarize(label, rows) for label, rows in results.items()]
    add_fidelity(summaries, results, args.bootstrap, 0)
    facts = {"problems": [p.sample_id for p in problems], "ladder_seconds": time.perf_counter() - started}
    return summaries, facts


# --------------------------------------------------------------------------- report


def _f(value: float | None, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def _ci(value: float | None, low: float | None, high: float | None, pattern: str = "{:.2f}") -> str:
    if value is None:
        return "-"
    if low is None or high is None:
        return _f(value, pattern)
    return f"{pattern.format(value)} [{pattern.format(low)}, {pattern.format(high)}]"


def ladder_table(summaries: list[Any]) -> list[str]:
    lines = ["| mode | accuracy | answer = cot's | first token = cot's | KL(cot ‖ mode), first token | "
             "share of first-token KL recovered | answer KL(cot ‖ mode) per token | answer NLL | "
             "share of answer KL recovered | share of accuracy recovered | share of answer agreement recovered |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(
            f"| {s.mode} | {_ci(s.accuracy, s.ci_low, s.ci_high)} | "
            f"{_ci(s.answer_agreement, s.answer_agreement_ci_low, s.answer_agreement_ci_high)} | "
            f"{_ci(s.first_token_agreement, s.first_token_agreement_ci_low, s.first_token_agreement_ci_high)} | "
            f"{_ci(s.kl_to_cot, s.kl_ci_low, s.kl_ci_high)} | {_ci(s.share_kl, s.share_kl_ci_low, s.share_kl_ci_high)} | "
            f"{_ci(s.answer_kl, s.answer_kl_ci_low, s.answer_kl_ci_high)} | {_f(s.answer_nll)} | "
            f"{_ci(s.share_answer_kl, s.share_answer_kl_ci_low, s.share_answer_kl_ci_high)} | "
            f"{_ci(s.share_accuracy, s.share_accuracy_ci_low, s.share_accuracy_ci_high)} | "
            f"{_ci(s.share_answer_agreement, s.share_answer_agreement_ci_low, s.share_answer_agreement_ci_high)} |")
    return lines


def trm_table(work: Path) -> tuple[list[str], dict[str, float | None]]:
    """The TRM's test-split R^2 and centred cosine against the baselines (its export's metrics.json: the
    exported weights re-scored; val selected them, test only reports)."""
    test = json.loads((work / "trm_model" / "metrics.json").read_text())["splits"]["test"]
    rows = [("TRM (EMA)", test["model"], "")] + [(f"{name.replace('_', ' ')} baseline", test["baselines"], f"{name}_")
                                                 for name in ("mean", "ridge", "last_token")]
    lines = ["| predictor (test split) | R^2 (D') | centred cosine | cosine | R^2 (full D) |", "|---|---|---|---|---|"]
    values: dict[str, float | None] = {}
    for label, metrics, prefix in rows:
        r2 = metrics.get(f"{prefix}explained_variance")
        values[label] = r2
        lines.append(f"| {label} | {_f(r2, '{:.3f}')} | {_f(metrics.get(f'{prefix}centred_cosine'), '{:.3f}')} | "
                     f"{_f(metrics.get(f'{prefix}cosine'), '{:.3f}')} | "
                     f"{_f(metrics.get(f'{prefix}full_explained_variance'), '{:.3f}')} |")
    lines += ["", f"{test['num_samples']} test samples (the datagen run's test split by sample id)."]
    return lines, values


# the shares the targets are checked on: (summary field, label); the answer-level one sees the content
TARGET_SHARES = (("share_kl", "first-token KL"), ("share_answer_kl", "answer KL, content-bearing"))


def _share(summary: Any, field: str) -> tuple[float | None, float | None, float | None]:
    return getattr(summary, field), getattr(summary, f"{field}_ci_low"), getattr(summary, f"{field}_ci_high")


def share_targets(summaries: list[Any], field: str, label: str) -> list[tuple[str, bool, str]]:
    """The issue's targets on one share of CoT's KL reduction (all with the trained bridge): the oracle's 95%
    interval excludes 0 and lies above the shuffled control's value, and trm reaches 30% of the oracle's share."""
    by_mode = {s.mode: s for s in summaries}
    oracle, shuffled, trm = (by_mode.get(m) for m in ("oracle (bridge)", "shuffled (bridge)", "trm (bridge)"))
    if oracle is None or _share(oracle, field)[0] is None:
        return [(f"[{label}] the oracle recovers a share of CoT's KL reduction", False,
                 "undefined: not measured, or cot and no_think do not differ on it")]
    value, low, high = _share(oracle, field)
    checks = [(f"[{label}] the oracle with the trained bridge recovers a share of CoT's KL reduction whose 95% "
               "interval excludes 0", low is not None and low > 0, _ci(value, low, high))]
    control = _share(shuffled, field)[0] if shuffled else None
    above_control = control is not None and low is not None and low > control
    if control is not None:
        checks.append((f"[{label}] ... and clearly more than the shuffled control (its interval above the control's "
                       "value)", above_control, f"{_f(value)} vs {_f(control)}"))
    mine = _share(trm, field)[0] if trm else None
    if mine is not None and value > 0:
        # without an oracle above the control, the oracle's gain is a content-free prefix: say so beside the ratio
        hollow = "" if above_control or control is None else "; hollow: the oracle does no better than shuffled"
        checks.append((f"[{label}] trm with the bridge recovers at least 30% of the oracle's gain", mine / value >= 0.3,
                       f"{mine / value:.2f} of the oracle's share{hollow}"))
    return checks


def targets(summaries: list[Any], trm_r2: dict[str, float]) -> list[str]:
    """The issue's numbers to reach, each checked here from the measured values, on both shares."""
    checks = [check for field, what in TARGET_SHARES for check in share_targets(summaries, field, what)]
    model, mean, ridge = (trm_r2.get(k) for k in ("TRM (EMA)", "mean baseline", "ridge baseline"))
    if None not in (model, mean, ridge):
        checks.append(("the TRM's held-out R^2 beats the mean and ridge baselines", model > max(mean, ridge),
                       f"{model:.3f} vs mean {mean:.3f}, ridge {ridge:.3f}"))
    return [f"- {'met' if ok else '**missed**'}: {what} ({value})" for what, ok, value in checks]


def write_figure(summaries: list[Any], work: Path) -> Path:
    import matplotlib.pyplot as plt

    from llm_trm.evaluate import log_to_tensorboard, markdown_table, plot_fidelity_ladder

    OUT.mkdir(exist_ok=True)
    path = OUT / "study_ladder.png"
    figure = plot_fidelity_ladder(summaries, path)
    log_to_tensorboard(work / "tensorboard", summaries, {"study_ladder": figure}, markdown_table(summaries))
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "runs" / "study"), help="where the study's runs go")
    # 128: the demo's family (two one-digit terms) has only 200 distinct problems, and the ladder needs
    # 64 of them that datagen never drew
    parser.add_argument("--problems", type=int, default=128, help="datagen problems (train/val/test of the parts)")
    parser.add_argument("--eval-problems", type=int, default=64, help="held-out problems in the ladder")
    parser.add_argument("--trm-epochs", type=int, default=40)
    parser.add_argument("--bridge-epochs", type=int, default=4)
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the intervals")
    parser.add_argument("--fresh-datagen", action="store_true", help="regenerate the datagen output")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "study.log"
    check_room_for_held_out(args.problems, args.eval_problems)
    seconds = run_pipeline(args, work, log)
    summaries, facts = run_ladder(args, work)
    figure = write_figure(summaries, work)
    trm_lines, trm_r2 = trm_table(work)
    wall = sum(seconds.values()) + facts["ladder_seconds"]  # reused steps as they ran, not this call's elapsed
    untimed = [step for step in STEPS if step not in seconds]
    datagen = yaml.safe_load((DEMO / "datagen.yaml").read_text())
    OUT.mkdir(exist_ok=True)
    (OUT / "study.json").write_text(json.dumps({
        "args": vars(args), "step_seconds": seconds, "wall_seconds": wall, **facts,
        "ladder": [vars(s) for s in summaries], "trm_r2": trm_r2}, indent=2, default=str))
    print(f"Embedded SmolLM2-135M on CPU; {args.problems} datagen problems ({', '.join(datagen['data']['dataset'].split(','))}, "
          f"{datagen['model']['max_new_tokens']} thinking tokens, the last 4 states stored), "
          f"{len(facts['problems'])} held-out problems in the ladder. Time {wall / 60:.1f} min "
          f"(steps: {', '.join(f'{k} {v / 60:.1f} min' for k, v in seconds.items())}"
          f"{''.join(f', {step} reused untimed' for step in untimed)}; "
          f"ladder {facts['ladder_seconds'] / 60:.1f} min). Figure: `{figure.relative_to(ROOT)}`; "
          f"numbers: `benchmarks/study.json`; TensorBoard: `{shown(work)}/tensorboard`.\n")
    print("### The ladder (reference cot, baseline no_think; 95% intervals)\n")
    print("\n".join(ladder_table(summaries)))
    print("\nShare recovered = (mode - no_think) / (cot - no_think); '-' where cot and no_think do not differ. "
          "Agreement intervals are Wilson, KL and share intervals a paired bootstrap over problems. The answer KL "
          "teacher-forces cot's own answer after cot's context and after the mode's and averages KL(cot ‖ mode) over "
          "its tokens (cot's is 0); the first answer token of a templated answer is the same in every mode, so the "
          "answer-level share is the one that sees the answer's content.\n")
    print("### The TRM against its baselines\n")
    print("\n".join(trm_lines))
    print("\n### The issue's targets, checked\n")
    print("\n".join(targets(summaries, trm_r2)))


if __name__ == "__main__":
    main()
