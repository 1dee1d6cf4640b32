"""Phase 2 benchmarks for TRMModule: does it learn, and how fast does it train?

    python scripts/bench_trm.py                      # both parts on CPU, markdown tables on stdout
    python scripts/bench_trm.py --part speed --accelerator gpu --precision bf16-mixed --speed-batch-size 32 \
        --speed-supervision-steps 8

(a) learning: a synthetic task whose target is a known nonlinear function of the whole
    prompt sequence, not of its mean: target = tanh(1.5 * sum_i softmax_i(3 <q, x_i>) x_i),
    an attention read-out where every token's weight depends on all the others. The TRM,
    trained by the real TRMModule through a Lightning Trainer, is compared on held-out
    samples with the module's own baselines (training mean, ridge on the mean-pooled
    prompt, last prompt token). The compressor is the identity, so D = D'.
(b) speed: training samples/s of the default architecture (n_layers 2, n_heads 4, n 6,
    T 3) at D' = 256, L = 256, with one optimizer step per supervision step and with one
    fused update per batch (use_halting off, so every batch runs every step). Each mode
    times one batch after a warm-up batch; samples/s is extrapolated to N_sup = 8 from the
    steps timed (every supervision step costs the same).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from timing import BatchClock  # scripts/timing.py

from llm_trm.data.shards import HiddenPairDataModule, ShardWriter
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.modules.trm import TRMModule

DEFAULT_SUPERVISION_STEPS = 8
DATAGEN_CONFIG = {"backbone": "synthetic", "layer": -1, "datasets": ["bench"], "seed": 0}


# ---------------------------------------------------------------------------- data


def attention_readout(x: torch.Tensor, query: torch.Tensor, sharpness: float = 3.0) -> torch.Tensor:
    """The synthetic target: tanh(1.5 * softmax-weighted sum of the tokens), [L, D] -> [D]."""
    weights = torch.softmax(sharpness * (x @ query), dim=0)
    return torch.tanh(1.5 * (weights[:, None] * x).sum(0))


def write_pairs(directory: Path, count: int, dim: int, lengths: tuple[int, int], target_fn, seed: int = 0) -> Path:
    generator = torch.Generator().manual_seed(seed)
    with ShardWriter(directory, {**DATAGEN_CONFIG, "dim": dim}, shard_size=500, dtype="float32") as writer:
        for i in range(count):
            length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=generator))
            pre = torch.randn(length, dim, generator=generator)
            record = {"sample_id": f"bench:{i}", "problem": "", "thinking": "", "answer": "", "gold_answer": "",
                      "correct": True, "closed_thinking": True, "token_ids": [], "pre_length": length,
                      "post_position": length}
            writer.add(pre, target_fn(pre), 0, record)
    return directory


def identity_compressor(directory: Path, dim: int) -> Path:
    compressor = DimensionCompressor(d_model=dim, d_compressed=dim)
    compressor.load_projection(torch.eye(dim))
    return compressor.save_pretrained(directory, metadata={"backbone": "synthetic", "layer": -1})


def quiet_trainer(args: argparse.Namespace, **overrides) -> L.Trainer:
    settings = dict(accelerator=args.accelerator, devices=1, precision=args.precision, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0)
    return L.Trainer(**{**settings, **overrides})


# ---------------------------------------------------------------------------- (a) learning


def learning_benchmark(args: argparse.Namespace, workdir: Path) -> str:
    dim = args.learn_dim
    query = torch.nn.functional.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(1)), dim=0)
    pairs = write_pairs(workdir / "synthetic_pairs", args.learn_samples, dim, (6, 16),
                        lambda pre: attention_readout(pre, query))
    torch.manual_seed(0)
    module = TRMModule(
        compressor_checkpoint=str(identity_compressor(workdir / "identity", dim)),
        learning_rate=1e-3, warmup_steps=50, n_layers=2, n_heads=4, n_latent_steps=2, n_deep_recursions=2,
        n_supervision_steps=3, ema_decay=0.99, ridge_alpha=1.0,
    )
    data = HiddenPairDataModule(str(pairs), batch_size=64, val_fraction=0.2, bucket_by_length=True)
    start = time.perf_counter()
    trainer = quiet_trainer(args, max_epochs=args.learn_epochs, limit_val_batches=0)
    trainer.fit(module, data)
    seconds = time.perf_counter() - start
    metrics = quiet_trainer(args).validate(module, data, verbose=False)[0]

    rows = [(label, metrics[f"baseline/{key}_cosine"], metrics[f"baseline/{key}_centred_cosine"],
             metrics[f"baseline/{key}_explained_variance"])
            for label, key in (("training mean", "mean"), ("ridge on mean-pooled prompt", "ridge"),
                               ("last prompt token", "last_token"))]
    rows.append(("TRM (EMA weights)", metrics["val/cosine"], metrics["val/centred_cosine"],
                 metrics["val/explained_variance"]))
    lines = [
        f"### (a) Synthetic task: attention read-out, D' = {dim}, L = 6-16, "
        f"{len(data.train_sample_ids)} train / {len(data.val_sample_ids)} held-out samples",
        "",
        f"TRM: 2 layers, n 2, T 2, N_sup 3, {args.learn_epochs} epochs, {trainer.global_step} optimizer steps, "
        f"{seconds:.0f} s; mean steps used {metrics['val/steps_used']:.2f}.",
        "",
        "| predictor | held-out cosine | centred cosine | R^2 vs training mean |",
        "|---|---|---|---|",
        *[f"| {name} | {float(cos):.4f} | {float(centred):.4f} | {float(r2):.4f} |" for name, cos, centred, r2 in rows],
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- (b) speed


def time_training_batch(args: argparse.Namespace, pairs: Path, compressor: Path, per_step_updates: bool) -> float:
    """Seconds of the second training batch (the first warms up), default architecture, no early halting."""
    torch.manual_seed(0)
    module = TRMModule(compressor_checkpoint=str(compressor), n_supervision_steps=args.speed_supervision_steps,
                       use_halting=False, per_step_updates=per_step_updates)
    data = HiddenPairDataModule(str(pairs), batch_size=args.speed_batch_size, val_fraction=0.25)
    timer = BatchClock()
    quiet_trainer(args, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[timer]).fit(module, data)
    return timer.seconds[-1]


def speed_benchmark(args: argparse.Namespace, workdir: Path) -> str:
    dim, length, batch = args.speed_dim, args.speed_length, args.speed_batch_size
    pairs = write_pairs(workdir / "speed_pairs", 4 * batch, dim, (length, length), lambda pre: pre.mean(0))
    compressor = identity_compressor(workdir / "identity_speed", dim)
    steps = args.speed_supervision_steps
    per_step = time_training_batch(args, pairs, compressor, per_step_updates=True)
    fused = time_training_batch(args, pairs, compressor, per_step_updates=False)
    to_default = DEFAULT_SUPERVISION_STEPS / steps  # every supervision step costs the same

    def rate(seconds: float) -> float:
        return batch / (seconds * to_default)

    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else f"CPU, {torch.get_num_threads()} threads"
    lines = [
        f"### (b) Training speed: default architecture (2 layers, 4 heads, n 6, T 3), D' = {dim}, L = {length}",
        "",
        f"{device}, precision {args.precision}, batch {batch}; one batch of {steps} supervision steps timed "
        f"after a warm-up batch" + (f", samples/s extrapolated to N_sup = {DEFAULT_SUPERVISION_STEPS}."
                                    if steps != DEFAULT_SUPERVISION_STEPS else "."),
        "",
        "| update scheme | s per batch timed | s per supervision step | training samples/s (N_sup = 8) |",
        "|---|---|---|---|",
        f"| per-step updates (default) | {per_step:.2f} | {per_step / steps:.2f} | {rate(per_step):.3f} |",
        f"| one fused update per batch | {fused:.2f} | {fused / steps:.2f} | {rate(fused):.3f} |",
        "",
        f"Per-step / fused throughput ratio: {fused / per_step:.2f}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("learning", "speed", "all"), default="all")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (on a shared machine 1 can be far faster than oversubscribing)")
    parser.add_argument("--learn-dim", type=int, default=16)
    parser.add_argument("--learn-samples", type=int, default=3000)
    parser.add_argument("--learn-epochs", type=int, default=20)
    parser.add_argument("--speed-dim", type=int, default=256)
    parser.add_argument("--speed-length", type=int, default=256)
    parser.add_argument("--speed-batch-size", type=int, default=8)
    parser.add_argument("--speed-supervision-steps", type=int, default=8)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_trm_") as tmp:
        workdir = Path(tmp)
        sections = []
        if args.part in ("learning", "all"):
            sections.append(learning_benchmark(args, workdir))
        if args.part in ("speed", "all"):
            sections.append(speed_benchmark(args, workdir))
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()
