"""`llm-trm datagen`: the LLM thinks on problems; hidden pairs are written into resumable shards.

    llm-trm datagen --config configs/phase2/datagen.yaml [--data.dataset gsm8k,mbpp]
    llm-trm datagen --config configs/phase2/datagen.yaml --trainer.devices 8 --trainer.strategy ddp
    llm-trm datagen --verify DIR                              # check every shard; per-dataset stats
    llm-trm datagen --import-seed hidden_pairs.pt --output_dir DIR
    llm-trm datagen --export-seed DIR --output hidden_pairs.pt

The config has four groups: `model` (DatagenModule: backbone, layer, generation budgets and
sampling), `data` (ProblemDataModule: datasets, split, num_samples, batch_size), `writer`
(HiddenPairWriter: output_dir, checkpoint_every, auto_resume, dtype) and `trainer` (passed to
`lightning.Trainer`), plus a top-level `seed`. The seed script's flags are accepted as
aliases (see SEED_FLAGS), e.g. `--num_samples 100 --no_auto_resume`.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from llm_trm.data.problem_datamodule import ProblemDataModule
from llm_trm.data.shards import export_seed_pairs, import_seed_pairs, verify_shards
from llm_trm.modules.datagen import DatagenModule, DatagenProgressBar, DatagenSummary, HiddenPairWriter

DESCRIPTION = "Phase 2 data: let the LLM think on problems and store hidden-state pairs (resumable shards)"

# The seed's `phase2_datagen` flags -> config keys (README: "seed flags").
SEED_FLAGS = {
    "--dataset": "--data.dataset",
    "--num_samples": "--data.num_samples",
    "--batch_size": "--data.batch_size",
    "--max_new_tokens": "--model.max_new_tokens",
    "--output_dir": "--writer.output_dir",
    "--checkpoint_every": "--writer.checkpoint_every",
}
SWITCHES = {"--no_auto_resume": ["--writer.auto_resume", "false"]}


@dataclass
class TrainerOptions:
    """The `lightning.Trainer` options that matter for a predict run.

    Args:
        accelerator: cpu, gpu, auto, ...
        devices: number of devices, a list of ids, or auto.
        strategy: auto, ddp, ...
        num_nodes: nodes for multi-node runs (SLURM / torchrun).
        precision: Lightning precision (the backbone's own dtype is `model.backbone_dtype`).
        enable_progress_bar: show samples/s and thinking tokens/s.
    """

    accelerator: str = "auto"
    devices: int | str | list[int] = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str | None = None
    enable_progress_bar: bool = True


EPILOG = (
    "other modes: --verify DIR | --import-seed PT --output_dir DIR | --export-seed DIR --output PT.  "
    "The seed script's flags are accepted too: " + ", ".join([*SEED_FLAGS, *SWITCHES]) + "."
)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="llm-trm datagen", description=DESCRIPTION, epilog=EPILOG, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (configs/phase2/datagen.yaml)")
    parser.add_argument("--seed", type=int, default=0, help="problem generation and sampling seed")
    parser.add_class_arguments(DatagenModule, "model")
    parser.add_class_arguments(ProblemDataModule, "data", skip={"seed"})
    parser.add_class_arguments(HiddenPairWriter, "writer")
    parser.add_class_arguments(TrainerOptions, "trainer")
    return parser


def expand_seed_flags(argv: list[str]) -> list[str]:
    """Rewrite the seed script's flags (`--num_samples 8`, `--no_auto_resume`) into config keys."""
    expanded = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if arg in SWITCHES:
            expanded += SWITCHES[arg]
        elif flag in SEED_FLAGS:
            expanded.append(SEED_FLAGS[flag] + eq + value)
        else:
            expanded.append(arg)
    return expanded


# --------------------------------------------------------------------------- maintenance modes


def _maintenance_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-trm datagen", description=DESCRIPTION)
    modes = parser.add_mutually_exclusive_group(required=True)
    modes.add_argument("--verify", metavar="DIR", help="check every shard's checksum, shapes, finite states and "
                       "records; report closed thinking, accuracy and thinking tokens per dataset")
    modes.add_argument("--import-seed", metavar="PT", help="convert a seed-format hidden_pairs.pt into shards")
    modes.add_argument("--export-seed", metavar="DIR", help="write shards back as a seed-format hidden_pairs.pt")
    parser.add_argument("--output_dir", "--writer.output_dir", dest="output_dir", help="shards to write (import)")
    parser.add_argument("--output", help="hidden_pairs.pt to write (export)")
    parser.add_argument("--backbone", default="unknown", help="backbone id to record (import)")
    parser.add_argument("--layer", type=int, default=-1, help="layer to record (import)")
    parser.add_argument("--checkpoint_every", type=int, default=100, help="samples per shard (import)")
    parser.add_argument("--no_auto_resume", action="store_true", help="move an existing output aside (import)")
    return parser


def is_maintenance(argv: list[str]) -> bool:
    return any(arg.split("=")[0] in ("--verify", "--import-seed", "--export-seed") for arg in argv)


def run_maintenance(argv: list[str]) -> int:
    parser = _maintenance_parser()
    args = parser.parse_args(argv)
    if args.verify:
        report = verify_shards(args.verify)
        print(f"{args.verify}: {report}")
        return 0 if report.ok else 1
    if args.import_seed:
        if not args.output_dir:
            parser.error("--import-seed needs --output_dir DIR")
        if not Path(args.import_seed).is_file():
            parser.error(f"--import-seed: no file at {args.import_seed}")
        written = import_seed_pairs(
            args.import_seed, args.output_dir, backbone=args.backbone, layer=args.layer,
            shard_size=args.checkpoint_every, auto_resume=not args.no_auto_resume,
        )
        print(f"imported {written} samples from {args.import_seed} into {args.output_dir}")
        return 0
    if not args.output:
        parser.error("--export-seed needs --output FILE.pt")
    count = export_seed_pairs(args.export_seed, args.output)
    print(f"exported {count} samples from {args.export_seed} to {args.output}")
    return 0


# --------------------------------------------------------------------------- generation run


def build_run(config: Namespace) -> tuple[L.Trainer, DatagenModule, ProblemDataModule, HiddenPairWriter]:
    module = DatagenModule(**config.model.as_dict())
    datamodule = ProblemDataModule(seed=config.seed, **config.data.as_dict())
    writer = HiddenPairWriter(**config.writer.as_dict())
    options = TrainerOptions(**config.trainer.as_dict())
    callbacks = [writer] + ([DatagenProgressBar()] if options.enable_progress_bar else [])
    trainer = L.Trainer(
        accelerator=options.accelerator,
        devices=options.devices,
        strategy=options.strategy,
        num_nodes=options.num_nodes,
        precision=options.precision,
        enable_progress_bar=options.enable_progress_bar,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    return trainer, module, datamodule, writer


def format_summary(summary: DatagenSummary, seconds: float) -> str:
    stats = summary.stats
    accuracy = "n/a (no answers checked)"
    if stats.accuracy is not None:
        accuracy = f"{100 * stats.accuracy:.1f}% ({stats.correct} / {stats.checked})"
    closed = "n/a (no samples)"
    if stats.closed_share is not None:
        closed = f"{100 * stats.closed_share:.1f}% ({stats.closed} / {stats.total.closed_known}) closed by the LLM itself"
    per_sample = stats.thinking_tokens / stats.generated if stats.generated else 0.0
    rows = [
        ("samples written", f"{summary.written}   (in output: {summary.total_in_output})"),
        ("skipped (too long)", str(stats.skipped_too_long)),
        ("closed thinking", closed),
        ("forced closes", f"{stats.forced_closes} / {stats.generated}"),
        ("accuracy", accuracy),
        ("thinking tokens", f"{stats.thinking_tokens} ({per_sample:.1f} per sample)"),
        ("wall time", f"{seconds:.1f} s ({stats.generated / seconds:.2f} samples/s, "
                      f"{stats.thinking_tokens / seconds:.1f} thinking tokens/s)"),
        ("output dir", summary.output_dir),
    ]
    if summary.tensorboard_dir:
        rows.append(("tensorboard", summary.tensorboard_dir))
    if summary.moved_aside_to:
        rows.append(("previous output", f"moved aside to {summary.moved_aside_to}"))
    if summary.rebuilt_index:
        rows.append(("index", "was missing: rebuilt from the shards that verify"))
    if summary.set_aside:
        where = ", ".join(summary.aside_dirs) or f"{summary.output_dir}/aside-*"
        rows.append(("set aside", f"{summary.set_aside} file(s) this run could not account for, moved (not deleted) "
                                  f"to {where}; the log says why"))
    width = max(len(name) for name, _ in rows)
    lines = ["datagen summary"] + [f"  {name:<{width}}  {value}" for name, value in rows]
    if stats.per_dataset:
        lines.append("  per dataset (this run):")
        lines += [f"    {name}: {counts.describe()}" for name, counts in sorted(stats.per_dataset.items())]
    return "\n".join(lines)


def run_datagen(config: Namespace) -> DatagenSummary | None:
    """Generate and write; returns the summary (every rank), None when the writer never opened."""
    L.seed_everything(config.seed, verbose=False)
    trainer, module, datamodule, writer = build_run(config)
    started = time.perf_counter()
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    if writer.summary is not None and trainer.is_global_zero:
        print(format_summary(writer.summary, max(time.perf_counter() - started, 1e-9)))
        print(f"check the shards with: llm-trm datagen --verify {Path(writer.output_dir)}")
    return writer.summary


def main(argv: list[str]) -> int:
    argv = list(argv)
    if is_maintenance(argv):
        return run_maintenance(argv)
    parser = build_parser()
    config = parser.parse_args(expand_seed_flags(argv))
    run_datagen(config)
    return 0
