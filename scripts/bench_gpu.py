"""GPU benchmark: the real-size pipeline on one CUDA device, in one call, under 8 minutes, offline.

    make bench-gpu                                  # = python scripts/bench.py gpu: BENCHMARKS.md + benchmarks/gpu.json
    python scripts/bench_gpu.py                     # markdown on stdout, JSON to benchmarks/gpu.json
    python scripts/bench_gpu.py --tiny --device cpu --json /tmp/gpu.json   # every code path in seconds (the tests)
    python scripts/bench_gpu.py --tiny --device cuda --json /tmp/gpu.json  # a quick check of the GPU path

Nothing is downloaded: SmolLM3-3B is built from its configuration (written below) with random
weights, in bf16 with SDPA, together with a byte-level BPE tokenizer trained in-process (chat
markers and think tags as special tokens, a chat template with `enable_thinking`). The model
keeps the real 128256-entry vocabulary, so the lm_head costs what it costs; the embedding rows
the tokenizer does not use, and those of the end-of-turn, padding and closing-tag tokens, are
zero, so greedy decoding never picks them and every sequence runs to its token budget.
The model and tokenizer are saved to a temporary directory and every part loads them the way
users do, through `load_backbone` (lru-cached, so once).

Each part runs the package's own code path, with its own time budget (a part that runs out of
time, out of memory or fails is reported in the table and the next one starts), after a warm-up:

- datagen      `DatagenModule.predict_step`: thinking tokens/s at batch 1, 32 and 64; the fixed cost
               per batch (a one-token budget: prompt prefill + the extraction pass) apart, the decode
               rate as the difference; at batch 1 the ratio to the memory-bandwidth bound
               (weight bytes read per token / the card's bandwidth);
- stage1a      `CompressorModule` training steps through a Lightning Trainer at batch 8 x 512 tokens,
               against the frozen LLM's forward alone;
- trm          `TRMModule` training through a Trainer: D' = 256, L = 512, batch 32, N_sup 8, per-step
               updates, bf16-mixed (halting off, so every step runs);
- evaluate     `LatentReasoner.answer`: time to the first answer token in no_think / trm / cot at
               batch 1 and 32;
- grpo         `GRPOModule` through a Trainer: one step at G = 8, without and with activation
               checkpointing through the frozen LLM, with the peak memory of each;
- generation   datagen again with a static KV cache (transformers compiles the decoding step
               on CUDA), when the package has the option.

Every part reports its peak GPU memory (`torch.cuda.max_memory_allocated`, reset between parts).
The JSON (default benchmarks/gpu.json) is rewritten after every part; a watchdog prints the
table and exits if the whole run ever passes its hard limit.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "gpu.json"
FORMAT = "llm-trm bench-gpu v1"

# --------------------------------------------------------------------------- the model

# SmolLM3-3B (HuggingFaceTB/SmolLM3-3B config.json): every 4th layer has no rotary embedding (NoPE).
SMOLLM3_3B_LAYERS = 36
SMOLLM3_3B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=11008,
    num_hidden_layers=SMOLLM3_3B_LAYERS,
    num_attention_heads=16,
    num_key_value_heads=4,
    hidden_act="silu",
    max_position_embeddings=65536,
    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0},
    no_rope_layer_interval=4,
    no_rope_layers=[int((layer + 1) % 4 != 0) for layer in range(SMOLLM3_3B_LAYERS)],
    rms_norm_eps=1e-6,
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=True,
)
# the --tiny stand-in: the same architecture, 4 layers (so one NoPE layer), hidden 64
TINY_MODEL = dict(
    SMOLLM3_3B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=2048, no_rope_layers=[1, 1, 1, 0],
)

# --------------------------------------------------------------------------- memory bandwidth

# Vendor figures (TB/s), matched as whole words in torch.cuda.get_device_name(), first match wins:
# torch reports no bandwidth. Unknown cards fall back to 2 x memory clock x bus width when torch
# exposes them, or to --bandwidth-tb-s.
KNOWN_BANDWIDTH_TB_S = (
    ("GH200 144G", 4.9), ("GH200", 4.0), ("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0),
    ("H100", 3.35),  # "NVIDIA H100 80GB HBM3": the SXM card
    ("H800", 3.35), ("B200", 8.0), ("A100-SXM4-80GB", 2.039), ("A100 80GB PCIe", 1.935),
    ("A100-SXM4-40GB", 1.555), ("A100-PCIE-40GB", 1.555), ("A100", 1.555), ("L40S", 0.864), ("L40", 0.864),
    ("L4", 0.3), ("A10G", 0.6), ("A10", 0.6), ("RTX 6000 Ada", 0.96), ("RTX A6000", 0.768),
    ("RTX 4090", 1.008), ("RTX 3090", 0.936), ("V100", 0.9), ("T4", 0.32), ("MI300X", 5.3),
)


def table_bandwidth(device_name: str) -> tuple[float, str] | None:
    """(bytes/s, source) from KNOWN_BANDWIDTH_TB_S, or None for a card not in it."""
    for key, tb_s in KNOWN_BANDWIDTH_TB_S:
        if re.search(rf"(?<![\w-]){re.escape(key)}(?![\w-])", device_name, re.IGNORECASE):
            return tb_s * 1e12, f"vendor figure for {key} ({tb_s} TB/s), from the table in scripts/bench_gpu.py"
    return None


def device_bandwidth(device: torch.device, override_tb_s: float | None = None) -> tuple[float | None, str]:
    """The card's memory bandwidth in bytes/s and where the figure comes from."""
    if override_tb_s:
        return override_tb_s * 1e12, f"--bandwidth-tb-s {override_tb_s}"
    if device.type != "cuda":
        return None, "none: not a CUDA device"
    known = table_bandwidth(torch.cuda.get_device_name(device))
    if known is not None:
        return known
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:  # double data rate: two transfers per clock
        return 2 * clock_khz * 1e3 * bus_bits / 8, "torch device properties: 2 x memory clock x bus width"
    return None, "unknown card: pass --bandwidth-tb-s"


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decoding step reads: every parameter once (a tied embedding is one tensor,
    read by the lm_head; the embedding lookup itself reads a single row)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bandwidth_bound_tokens_per_s(weight_bytes: int, bandwidth_bytes_per_s: float) -> float:
    """The most tokens/s one sequence can decode when every step must read every weight from memory."""
    return bandwidth_bytes_per_s / weight_bytes


# --------------------------------------------------------------------------- scales


@dataclass(frozen=True)
class Scale:
    """Sizes and time budgets of one run: the real one on a GPU, or --tiny for the tests."""

    name: str
    model: dict[str, Any]
    tokenizer_vocab: int
    datagen_batches: tuple[int, ...]
    datagen_tokens: int
    static_batches: tuple[int, ...]
    stage1a_batch: int
    stage1a_seq_len: int
    stage1a_steps: int  # timed, after one warm-up step
    d_compressed: int
    trm: dict[str, int]
    trm_length: int
    trm_batch: int
    trm_batches: int  # timed, after one warm-up batch
    eval_batches: tuple[int, ...]
    eval_thinking_tokens: int
    eval_answer_tokens: int
    grpo_problems: int
    grpo_group: int
    grpo_answer_tokens: int
    grpo_soft_vectors: int
    precision: str
    budgets: dict[str, float]
    total_budget: float  # the whole run; the watchdog's hard limit is WATCHDOG_GRACE_S more


REAL = Scale(
    name="SmolLM3-3B architecture, random weights",
    model=SMOLLM3_3B, tokenizer_vocab=8192,
    datagen_batches=(1, 32, 64), datagen_tokens=256, static_batches=(1, 32),
    stage1a_batch=8, stage1a_seq_len=512, stage1a_steps=5, d_compressed=256,
    trm=dict(n_layers=2, n_heads=4, n_latent_steps=6, n_deep_recursions=3, n_supervision_steps=8),
    trm_length=512, trm_batch=32, trm_batches=2,
    eval_batches=(1, 32), eval_thinking_tokens=256, eval_answer_tokens=8,
    grpo_problems=4, grpo_group=8, grpo_answer_tokens=128, grpo_soft_vectors=4,
    precision="bf16-mixed",
    budgets={"setup": 150, "datagen": 90, "stage1a": 35, "trm": 45, "evaluate": 65, "grpo": 70, "generation": 150},
    total_budget=430,
)
TINY = Scale(
    name="tiny SmolLM3 (hidden 64, 4 layers), random weights",
    model=TINY_MODEL, tokenizer_vocab=300,
    datagen_batches=(1, 2), datagen_tokens=4, static_batches=(1,),
    stage1a_batch=2, stage1a_seq_len=16, stage1a_steps=1, d_compressed=8,
    trm=dict(n_layers=1, n_heads=2, n_latent_steps=1, n_deep_recursions=1, n_supervision_steps=2),
    trm_length=8, trm_batch=4, trm_batches=1,
    eval_batches=(1, 2), eval_thinking_tokens=3, eval_answer_tokens=2,
    grpo_problems=2, grpo_group=2, grpo_answer_tokens=3, grpo_soft_vectors=2,
    precision="bf16-mixed",
    budgets={"setup": 120, "datagen": 60, "stage1a": 60, "trm": 60, "evaluate": 60, "grpo": 90, "generation": 60},
    total_budget=400,
)
WATCHDOG_GRACE_S = 40  # REAL: 430 + 40 s, under the 8 minutes promised
PARTS = ("datagen", "stage1a", "trm", "evaluate", "grpo", "generation")  # risky compilation last
EVAL_MODES = ("no_think", "trm", "cot")
# what each part's results hold when it finished (the tests check them)
RESULT_KEYS = {
    "datagen": ("max_new_tokens", "prompt_tokens_mean", "rows", "bandwidth_bound"),
    "stage1a": ("batch", "seq_len", "d_compressed", "forward_tokens_per_s", "step_tokens_per_s", "overhead_pct"),
    "trm": ("d_compressed", "length", "batch", "n_supervision_steps", "precision", "seconds_per_batch",
            "samples_per_s", "optimizer_steps_per_s"),
    "evaluate": ("max_thinking_tokens", "max_new_tokens", "rows"),
    "grpo": ("problems", "group_size", "max_answer_tokens", "precision", "rows"),
    "generation": ("option", "max_new_tokens", "rows"),
}
DATAGEN_ROW_KEYS = ("batch", "thinking_tokens", "seconds", "thinking_tokens_per_s", "prefill_s",
                    "decode_tokens_per_s", "decode_tokens_per_s_per_sequence")
EVAL_ROW_KEYS = ("mode", "batch", "time_to_first_answer_token_s", "total_s", "thinking_tokens", "answer_tokens",
                 "trm_steps", "trm_overhead_s")
GRPO_ROW_KEYS = ("activation_checkpointing", "step_s", "peak_memory_gib", "answer_tokens_mean")


# --------------------------------------------------------------------------- time boxes


class PartTimeout(Exception):
    """A part ran past its budget."""


@contextmanager
def time_box(seconds: float) -> Iterator[None]:
    """Raise PartTimeout in the main thread after `seconds` (checked between Python bytecodes, so a
    single long kernel finishes first). Each measurement is stored as soon as it exists, so a part
    that runs out keeps what it measured."""

    def expire(signum: int, frame: Any) -> None:
        raise PartTimeout(f"ran past its {seconds:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


# --------------------------------------------------------------------------- the bench


@dataclass
class Bench:
    """What every part needs: sizes, device, the saved backbone, random small parts, problems."""

    scale: Scale
    device: torch.device
    backbone_dtype: str
    attn_implementation: str
    workdir: Path
    backbone_dir: str = ""
    hidden_size: int = 0
    compressor_dir: str = ""
    trm_dir: str = ""
    problems: list = field(default_factory=list)
    weight_bytes: int = 0
    parameters: int = 0
    bandwidth_tb_s: float | None = None  # --bandwidth-tb-s, for a card the table does not know

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    @property
    def accelerator(self) -> str:
        return "gpu" if self.device.type == "cuda" else "cpu"

    def trainer(self, **settings: Any):
        import lightning as L

        devices = [self.device.index] if self.device.type == "cuda" else 1
        base = dict(accelerator=self.accelerator, devices=devices, precision=self.scale.precision, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0, limit_val_batches=0, max_epochs=1)
        return L.Trainer(**{**base, **settings})


def bench_problems(count: int) -> list:
    """GSM-style problems of varied length (so left padding is realistic), with gold answers."""
    from llm_trm.data.problems import Problem, math_prompt

    names = ("Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Ken", "Alexis")
    problems = []
    for i in range(count):
        boxes, per_box, given = 4 + i % 17, 5 + (7 * i) % 23, 1 + i % 3
        story = (f"{names[i % len(names)]} has {boxes} boxes with {per_box} pencils in each box. "
                 + "Every morning she counts them again to be sure none are missing. " * (i % 4)
                 + f"She gives {given} boxes to her friends. How many pencils does she have left?")
        problems.append(Problem(sample_id=f"bench:{i}", dataset="bench", index=i, prompt=math_prompt(story),
                                gold_answer=str((boxes - given) * per_box), kind="math"))
    return problems


def tokenizer_corpus(problems: list) -> list[str]:
    """Text to train the BPE on: CPython's reference text (offline) and the problems."""
    try:
        from pydoc_data.topics import topics

        reference = list(topics.values())
    except ImportError:  # some distributions strip pydoc_data
        reference = []
    return reference + [p.prompt for p in problems] * 4


def silence_unused_rows(model: torch.nn.Module, tokenizer: Any) -> None:
    """Zero the output rows greedy decoding must never pick: ids the tokenizer does not have, end of
    turn, padding and the closing think tag. Random logits have a positive maximum, so a zero logit
    never wins and every sequence runs to its budget (tokens/s measured on full-length runs)."""
    from llm_trm.thinking import THINK_CLOSE

    head = model.get_output_embeddings().weight
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids(THINK_CLOSE)}
    with torch.no_grad():
        head[len(tokenizer):] = 0
        for token in ids:
            if token is not None and token >= 0:
                head[token] = 0


def setup(bench: Bench, out: dict[str, Any]) -> None:
    """Build the model and tokenizer, save them, load them back through the package; random parts."""
    from transformers import AutoModelForCausalLM, SmolLM3Config

    from llm_trm.backbone import backbone_id, default_dtype, load_backbone
    from llm_trm.models.compressor import DimensionCompressor
    from llm_trm.models.trm import SequenceTRM
    from tests.tiny import build_tokenizer

    scale = bench.scale
    bench.problems = bench_problems(max(max(scale.datagen_batches), max(scale.eval_batches), 64))
    started = time.perf_counter()
    tokenizer = build_tokenizer(scale.tokenizer_vocab, tokenizer_corpus(bench.problems))
    config = SmolLM3Config(**scale.model, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    dtype = default_dtype(bench.backbone_dtype)
    with torch.device(bench.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=bench.attn_implementation)
    silence_unused_rows(model, tokenizer)
    directory = bench.workdir / "backbone"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    built = time.perf_counter() - started
    del model
    gc.collect()
    empty_cache(bench.device)
    started = time.perf_counter()
    bench.backbone_dir = str(directory)
    llm = load_backbone(bench.backbone_dir, bench.backbone_dtype, False, bench.attn_implementation).to(bench.device)
    loaded = time.perf_counter() - started
    bench.hidden_size = llm.hidden_size
    bench.parameters = sum(p.numel() for p in llm.model.parameters())
    bench.weight_bytes = weight_bytes_per_token(llm.model)
    meta = {"backbone": backbone_id(bench.backbone_dir), "layer": -1}
    torch.manual_seed(0)
    bench.compressor_dir = str(DimensionCompressor(llm.hidden_size, scale.d_compressed).save_pretrained(
        bench.workdir / "compressor", metadata=meta))
    bench.trm_dir = str(SequenceTRM(scale.d_compressed, **scale.trm).save_pretrained(
        bench.workdir / "trm", metadata={**meta, "d_model": llm.hidden_size}))
    out.update(build_and_save_s=built, load_s=loaded, parameters=bench.parameters,
               weight_bytes_per_token=bench.weight_bytes, tokenizer_size=len(tokenizer),
               dtype=str(llm.model.dtype).removeprefix("torch."),
               attn_implementation=llm.model.config._attn_implementation)


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


PART_PEAK = {"bytes": 0}  # the running part's peak, kept across the per-step resets of StepClock


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window, remembering the old window's peak for the part."""
    if device.type == "cuda":
        PART_PEAK["bytes"] = max(PART_PEAK["bytes"], torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)


def part_peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return max(PART_PEAK["bytes"], torch.cuda.max_memory_allocated(device)) / 2**30


# --------------------------------------------------------------------------- datagen


def datagen_module(bench: Bench, max_new_tokens: int, **options: Any):
    from llm_trm.modules.datagen import DatagenModule

    module = DatagenModule(backbone=bench.backbone_dir, max_new_tokens=max_new_tokens, max_answer_tokens=0,
                           backbone_dtype=bench.backbone_dtype, attn_implementation=bench.attn_implementation,
                           **options)
    return module.to(bench.device)


def timed_predict(bench: Bench, module: Any, problems: list) -> tuple[float, int]:
    """(seconds, thinking tokens) of one `predict_step` over `problems`."""
    started = bench.now()
    batch = module.predict_step(problems, 0)
    seconds = bench.now() - started
    return seconds, sum(pair.num_thinking_tokens for pair in batch.pairs)


def measure_datagen(bench: Bench, batch: int, options: dict[str, Any], warmup_tokens: int = 2) -> dict[str, Any]:
    """One batch size: warm-up, the one-token run (fixed cost), the full run; the decode rate between them.

    A static cache is sized by the token budget, so its compiled step is warmed up with the full budget."""
    problems, tokens = bench.problems[:batch], bench.scale.datagen_tokens
    warm = datagen_module(bench, warmup_tokens, **options)
    first_call_s, _ = timed_predict(bench, warm, problems)
    if warmup_tokens < tokens:
        timed_predict(bench, warm, problems)
    prefill_s, prefill_tokens = timed_predict(bench, datagen_module(bench, 1, **options), problems)
    seconds, thinking = timed_predict(bench, datagen_module(bench, tokens, **options), problems)
    # two separate runs: on a noisy machine the one-token run can take as long as the full one (no rate then)
    decode = (thinking - prefill_tokens) / (seconds - prefill_s) if seconds > prefill_s else None
    return {"batch": batch, "thinking_tokens": thinking, "seconds": seconds, "thinking_tokens_per_s": thinking / seconds,
            "prefill_s": prefill_s, "decode_tokens_per_s": decode,
            "decode_tokens_per_s_per_sequence": None if decode is None else decode / batch,
            "first_call_s": first_call_s}


def prompt_tokens_mean(bench: Bench, count: int) -> float:
    from llm_trm.backbone import load_tokenizer
    from llm_trm.data.problems import build_chat_prompt

    tokenizer = load_tokenizer(bench.backbone_dir)
    return statistics.mean(len(tokenizer.encode(build_chat_prompt(tokenizer, p), add_special_tokens=False))
                           for p in bench.problems[:count])


def run_datagen_rows(bench: Bench, out: dict[str, Any], batches: tuple[int, ...], options: dict[str, Any],
                     warmup_tokens: int = 2) -> None:
    out["rows"] = rows = []
    for batch in batches:
        try:
            rows.append(measure_datagen(bench, batch, options, warmup_tokens))
        except torch.cuda.OutOfMemoryError:
            rows.append({"batch": batch, "error": "out of memory"})
            gc.collect()
            empty_cache(bench.device)
            break  # larger batches need more


def part_datagen(bench: Bench, out: dict[str, Any]) -> None:
    out.update(max_new_tokens=bench.scale.datagen_tokens,
               prompt_tokens_mean=prompt_tokens_mean(bench, max(bench.scale.datagen_batches)))
    bandwidth, source = device_bandwidth(bench.device, bench.bandwidth_tb_s)
    bound = bandwidth_bound_tokens_per_s(bench.weight_bytes, bandwidth) if bandwidth else None
    out["bandwidth_bound"] = {"weight_bytes_per_token": bench.weight_bytes, "bandwidth_bytes_per_s": bandwidth,
                              "source": source, "bound_tokens_per_s": bound, "ratio_at_batch_1": None}
    run_datagen_rows(bench, out, bench.scale.datagen_batches, {})
    single = next((row for row in out["rows"] if row.get("batch") == 1 and "error" not in row), None)
    if bound and single and single["decode_tokens_per_s"] is not None:
        out["bandwidth_bound"]["ratio_at_batch_1"] = single["decode_tokens_per_s"] / bound


# --------------------------------------------------------------------------- generation options


def generation_option() -> tuple[str, dict[str, Any]] | None:
    """The DatagenModule option for a static KV cache, when this version of the package has one."""
    from llm_trm.modules.datagen import DatagenModule

    parameters = inspect.signature(DatagenModule.__init__).parameters
    if "cache_implementation" in parameters:
        return "cache_implementation=static", {"cache_implementation": "static"}
    return None


def part_generation(bench: Bench, out: dict[str, Any]) -> None:
    found = generation_option()
    out.update(option=found[0] if found else None, max_new_tokens=bench.scale.datagen_tokens, rows=[])
    if found is None:
        raise NotImplementedError("DatagenModule has no static KV cache option in this version")
    run_datagen_rows(bench, out, bench.scale.static_batches, found[1], warmup_tokens=bench.scale.datagen_tokens)


# --------------------------------------------------------------------------- stage 1a


def step_clock():
    """A Lightning callback timing every training batch (synchronised) with its peak GPU memory."""
    from timing import BatchClock  # scripts/timing.py

    return BatchClock(reset_peak)


def token_batches(bench: Bench, count: int) -> list[dict[str, torch.Tensor]]:
    from llm_trm.backbone import load_tokenizer

    vocab = len(load_tokenizer(bench.backbone_dir))
    generator = torch.Generator().manual_seed(0)
    shape = (bench.scale.stage1a_batch, bench.scale.stage1a_seq_len)
    return [{"input_ids": torch.randint(10, vocab, shape, generator=generator),
             "attention_mask": torch.ones(shape, dtype=torch.long)} for _ in range(count)]


def part_stage1a(bench: Bench, out: dict[str, Any]) -> None:
    from torch.utils.data import DataLoader

    from llm_trm.modules.compressor import CompressorModule

    scale = bench.scale
    out.update(batch=scale.stage1a_batch, seq_len=scale.stage1a_seq_len, d_compressed=scale.d_compressed,
               precision=scale.precision)
    steps = 1 + scale.stage1a_steps
    batches = token_batches(bench, steps)
    module = CompressorModule(backbone=bench.backbone_dir, d_compressed=scale.d_compressed, pca_batches=0,
                              warmup_steps=1, backbone_dtype=bench.backbone_dtype,
                              attn_implementation=bench.attn_implementation)
    clock = step_clock()
    bench.trainer(max_steps=steps, callbacks=[clock]).fit(module, DataLoader(batches, batch_size=None))
    tokens = scale.stage1a_batch * scale.stage1a_seq_len
    step_s = statistics.median(clock.seconds[1:])
    out.update(step_s=step_s, step_tokens_per_s=tokens / step_s)
    llm, batch = module.llm, {k: v.to(bench.device) for k, v in batches[0].items()}
    forward = []
    for _ in range(steps):
        started = bench.now()
        llm.hidden_states(batch["input_ids"], batch["attention_mask"])
        forward.append(bench.now() - started)
    forward_s = statistics.median(forward[1:])
    out.update(forward_s=forward_s, forward_tokens_per_s=tokens / forward_s, overhead_pct=100 * (step_s / forward_s - 1))


# --------------------------------------------------------------------------- TRM


def write_pairs(directory: Path, count: int, length: int, dim: int) -> Path:
    from llm_trm.data.shards import ShardWriter

    generator = torch.Generator().manual_seed(0)
    config = {"backbone": "bench", "layer": -1, "datasets": ["bench"], "seed": 0}
    with ShardWriter(directory, config, shard_size=max(count // 2, 1), dtype="bfloat16") as writer:
        for i in range(count):
            pre = torch.randn(length, dim, generator=generator)
            record = {"sample_id": f"bench:{i}", "problem": "", "thinking": "", "answer": "", "gold_answer": "",
                      "correct": True, "closed_thinking": True, "token_ids": [], "pre_length": length,
                      "post_position": length}
            writer.add(pre, pre.mean(0), 0, record)
    return directory


def part_trm(bench: Bench, out: dict[str, Any]) -> None:
    from llm_trm.data.shards import HiddenPairDataModule
    from llm_trm.modules.trm import TRMModule

    scale = bench.scale
    steps = scale.trm["n_supervision_steps"]
    out.update(d_compressed=scale.d_compressed, length=scale.trm_length, batch=scale.trm_batch,
               n_supervision_steps=steps, precision=scale.precision, per_step_updates=True, use_halting=False)
    batches = 1 + scale.trm_batches
    # enough samples for the timed batches after the held-out splits (drawn by hash) take their share
    count = max(2 * batches * scale.trm_batch, 64)
    pairs = write_pairs(bench.workdir / "pairs", count, scale.trm_length, bench.hidden_size)
    torch.manual_seed(0)
    module = TRMModule(compressor_checkpoint=bench.compressor_dir, use_halting=False, per_step_updates=True,
                       **scale.trm)
    data = HiddenPairDataModule(str(pairs), batch_size=scale.trm_batch, val_fraction=0.1)
    clock = step_clock()
    bench.trainer(limit_train_batches=batches, callbacks=[clock]).fit(module, data)
    seconds = statistics.median(clock.seconds[1:])
    out.update(seconds_per_batch=seconds, samples_per_s=scale.trm_batch / seconds, optimizer_steps_per_s=steps / seconds)


# --------------------------------------------------------------------------- evaluation


def part_evaluate(bench: Bench, out: dict[str, Any]) -> None:
    from llm_trm.inference import LatentReasoner

    scale = bench.scale
    out.update(max_thinking_tokens=scale.eval_thinking_tokens, max_new_tokens=scale.eval_answer_tokens, rows=[])
    reasoner = LatentReasoner(bench.backbone_dir, compressor=bench.compressor_dir, trm=bench.trm_dir,
                              dtype=bench.backbone_dtype, device=bench.device,
                              attn_implementation=bench.attn_implementation)
    for batch in scale.eval_batches:
        problems = bench.problems[:batch]
        for mode in EVAL_MODES:  # warm-up at this batch size
            reasoner.answer(problems, mode=mode, max_new_tokens=2, max_thinking_tokens=2, batch_size=batch)
        for mode in EVAL_MODES:
            results = reasoner.answer(problems, mode=mode, max_new_tokens=scale.eval_answer_tokens,
                                      max_thinking_tokens=scale.eval_thinking_tokens, batch_size=batch)
            errors = [r.error for r in results if r.error]
            if errors:
                raise RuntimeError(f"{mode} at batch {batch}: {errors[0]}")
            steps = [r.trm_steps for r in results if r.trm_steps is not None]
            overheads = [r.trm_overhead_s for r in results if r.trm_overhead_s is not None]
            out["rows"].append({
                "mode": mode, "batch": batch,
                "time_to_first_answer_token_s": statistics.median(r.time_to_first_answer_token_s for r in results),
                "total_s": statistics.median(r.total_time_s for r in results),
                "thinking_tokens": statistics.mean(r.thinking_tokens for r in results),
                "answer_tokens": statistics.mean(r.answer_tokens for r in results),
                "trm_steps": statistics.mean(steps) if steps else None,
                "trm_overhead_s": statistics.median(overheads) if overheads else None,
            })


# --------------------------------------------------------------------------- GRPO


def grpo_supports_checkpointing() -> bool:
    from llm_trm.modules.grpo import GRPOModule

    return "activation_checkpointing" in inspect.signature(GRPOModule.__init__).parameters


def write_problem_file(path: Path, problems: list) -> Path:
    with open(path, "w") as handle:
        for problem in problems:
            question = problem.prompt.split("\n\n")[0]  # the story, without the answer-format instruction
            handle.write(json.dumps({"question": question, "answer": problem.gold_answer}) + "\n")
    return path


def grpo_row(bench: Bench, problems_file: Path, checkpointing: bool) -> dict[str, Any]:
    from llm_trm.data.grpo_data import GRPODataModule
    from llm_trm.modules.grpo import GRPOModule

    scale = bench.scale
    options = {"activation_checkpointing": True} if checkpointing else {}
    torch.manual_seed(0)
    module = GRPOModule(backbone=bench.backbone_dir, compressor_checkpoint=bench.compressor_dir,
                        trm_checkpoint=bench.trm_dir, adapter="linear", n_soft_vectors=scale.grpo_soft_vectors,
                        group_size=scale.grpo_group, max_answer_tokens=scale.grpo_answer_tokens,
                        reward="first_token:0", equal_reward_warn_steps=0, backbone_dtype=bench.backbone_dtype,
                        attn_implementation=bench.attn_implementation, **options)
    data = GRPODataModule(datasets=f"jsonl:{problems_file}", num_samples=4 * scale.grpo_problems, val_samples=0,
                          batch_size=scale.grpo_problems, batches_per_epoch=2, difficulty="none")
    clock = step_clock()
    trainer = bench.trainer(limit_train_batches=2, callbacks=[clock])
    trainer.fit(module, data)
    answer_tokens = float(trainer.callback_metrics.get("train/answer_length", float("nan")))
    return {"activation_checkpointing": checkpointing, "step_s": clock.seconds[-1], "peak_memory_gib": clock.peaks[-1],
            "answer_tokens_mean": answer_tokens}


def part_grpo(bench: Bench, out: dict[str, Any]) -> None:
    scale = bench.scale
    out.update(problems=scale.grpo_problems, group_size=scale.grpo_group, max_answer_tokens=scale.grpo_answer_tokens,
               precision=scale.precision, n_soft_vectors=scale.grpo_soft_vectors, rows=[])
    problems_file = write_problem_file(bench.workdir / "grpo_problems.jsonl", bench.problems[: 4 * scale.grpo_problems])
    for checkpointing in (False, True):
        if checkpointing and not grpo_supports_checkpointing():
            out["rows"].append({"activation_checkpointing": True, "error": "GRPOModule has no activation_checkpointing "
                                                                          "option in this version"})
            continue
        try:
            out["rows"].append(grpo_row(bench, problems_file, checkpointing))
        except torch.cuda.OutOfMemoryError:
            out["rows"].append({"activation_checkpointing": checkpointing, "error": "out of memory"})
            gc.collect()
            empty_cache(bench.device)


PART_FUNCTIONS: dict[str, Callable[[Bench, dict[str, Any]], None]] = {
    "datagen": part_datagen, "stage1a": part_stage1a, "trm": part_trm, "evaluate": part_evaluate,
    "grpo": part_grpo, "generation": part_generation,
}


# --------------------------------------------------------------------------- running and reporting


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                    "cuda": torch.version.cuda}
    for name in ("transformers", "lightning"):
        try:
            found[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a version is information, never a reason to fail
            found[name] = None
    return found


def device_info(device: torch.device, bandwidth_tb_s: float | None) -> dict[str, Any]:
    bandwidth, source = device_bandwidth(device, bandwidth_tb_s)
    info: dict[str, Any] = {"type": device.type, "bandwidth_bytes_per_s": bandwidth, "bandwidth_source": source}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), total_memory_gib=props.total_memory / 2**30,
                    capability=f"{props.major}.{props.minor}")
    else:
        info.update(name=f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads)")
    return info


def run_part(bench: Bench, name: str, function: Callable[[Bench, dict[str, Any]], None], budget: float,
             report: dict[str, Any]) -> None:
    """Run one part inside its time box; its entry in `report` is filled whatever happens."""
    results: dict[str, Any] = {}
    entry = {"status": "running", "budget_s": round(budget, 1), "seconds": None, "peak_memory_gib": None,
             "error": None, "results": results}
    report["parts"][name] = entry
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
    PART_PEAK["bytes"] = 0
    print(f"[bench-gpu] {name}: budget {budget:.0f} s", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        if budget <= 0:
            raise PartTimeout("no time left in the run's total budget")
        with time_box(budget):
            function(bench, results)
        entry["status"] = "ok"
    except PartTimeout as error:
        entry["status"], entry["error"] = "timed out", str(error)
    except torch.cuda.OutOfMemoryError as error:
        entry["status"], entry["error"] = "out of memory", one_line(error)
    except NotImplementedError as error:
        entry["status"], entry["error"] = "not available", str(error)
    except Exception as error:  # noqa: BLE001 - a failing part is reported, the next one runs
        entry["status"], entry["error"] = "failed", one_line(error)
        traceback.print_exc(file=sys.stderr)
    entry["seconds"] = time.perf_counter() - started
    entry["peak_memory_gib"] = part_peak_gib(bench.device)
    gc.collect()
    empty_cache(bench.device)
    print(f"[bench-gpu] {name}: {entry['status']} in {entry['seconds']:.1f} s", file=sys.stderr, flush=True)


def write_json(path: Path, report: dict[str, Any]) -> None:
    from llm_trm.files import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------- markdown


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.2g}"
    return str(value)


def part_status(entry: dict[str, Any]) -> str:
    return entry["status"] + (f": {entry['error']}" if entry.get("error") else "")


def markdown(report: dict[str, Any]) -> str:
    device, backbone, parts = report["device"], report.get("backbone", {}), report["parts"]
    v = report["versions"]
    lines = [
        f"Device: **{device['name']}**. torch {v['torch']} (CUDA {v['cuda'] or '-'}), transformers "
        f"{v['transformers']}, lightning {v['lightning']}, Python {v['python']}. Command: `{report['command']}` "
        f"({report['started']}, {fmt(report.get('wall_s'), 0)} s; JSON: `{report['json']}`).",
        "",
        f"Backbone: {report['scale']}: {fmt(backbone.get('parameters'))} parameters, {backbone.get('dtype', '-')}, "
        f"attention {backbone.get('attn_implementation', '-')}; weights read per decoded token "
        f"{fmt((backbone.get('weight_bytes_per_token') or 0) / 1e9, 3)} GB. Memory bandwidth: "
        f"{tb_s(device.get('bandwidth_bytes_per_s'))} ({device['bandwidth_source']}).",
        "",
        "| part | status | seconds | budget s | peak GPU memory (GiB) |",
        "|---|---|---:|---:|---:|",
    ]
    for name, entry in parts.items():
        lines.append(f"| {name} | {part_status(entry)} | {fmt(entry['seconds'])} | {fmt(entry['budget_s'], 0)} | "
                     f"{fmt(entry['peak_memory_gib'], 2)} |")
    for name, render in (("datagen", md_datagen), ("generation", md_generation), ("stage1a", md_stage1a),
                         ("trm", md_trm), ("evaluate", md_evaluate), ("grpo", md_grpo)):
        results = parts.get(name, {}).get("results")
        rendered = render(results) if results else []
        if rendered:
            lines += ["", *rendered]
    return "\n".join(lines) + "\n"


def tb_s(bytes_per_s: float | None) -> str:
    return f"{bytes_per_s / 1e12:.3g} TB/s" if bytes_per_s else "unknown"


def md_datagen_rows(rows: list[dict[str, Any]], first_call: bool = False) -> list[str]:
    extra = (" first call s (compiles) |", "---:|") if first_call else ("", "")
    lines = ["| batch | thinking tokens | seconds | thinking tokens/s | fixed s (prefill + extraction) | "
             "decode tokens/s | per sequence |" + extra[0], "|---:|---:|---:|---:|---:|---:|---:|" + extra[1]]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['batch']} | {row['error']} | | | | | |" + (" |" if first_call else ""))
            continue
        line = (f"| {row['batch']} | {row['thinking_tokens']} | {fmt(row['seconds'], 2)} | "
                f"{fmt(row['thinking_tokens_per_s'])} | {fmt(row['prefill_s'], 3)} | "
                f"{fmt(row['decode_tokens_per_s'])} | {fmt(row['decode_tokens_per_s_per_sequence'])} |")
        lines.append(line + (f" {fmt(row['first_call_s'], 1)} |" if first_call else ""))
    return lines


def md_datagen(r: dict[str, Any]) -> list[str]:
    bound = r.get("bandwidth_bound") or {}
    lines = [f"### Datagen generation (`DatagenModule.predict_step`, greedy, {r.get('max_new_tokens')} thinking "
             f"tokens, prompts of {fmt(r.get('prompt_tokens_mean'), 0)} tokens on average, no answer)", ""]
    lines += md_datagen_rows(r.get("rows", []))
    if bound.get("bound_tokens_per_s"):
        lines += ["", f"Memory-bandwidth bound at batch 1: {fmt(bound['bound_tokens_per_s'])} tokens/s "
                      f"({fmt(bound['weight_bytes_per_token'] / 1e9, 3)} GB of weights per token at "
                      f"{tb_s(bound['bandwidth_bytes_per_s'])}); measured decode at batch 1 = "
                      f"**{fmt(bound.get('ratio_at_batch_1'), 3)}** of it."]
    return lines


def md_generation(r: dict[str, Any]) -> list[str]:
    if not r.get("rows"):
        return []
    return [f"### Datagen generation with `{r.get('option')}` (transformers compiles the decoding step on CUDA; "
            "the first call, which compiles, is not timed)", "", *md_datagen_rows(r.get("rows", []), first_call=True)]


def md_stage1a(r: dict[str, Any]) -> list[str]:
    return [f"### Stage 1a (`CompressorModule` training step, batch {r.get('batch')} x {r.get('seq_len')} tokens, "
            f"D' = {r.get('d_compressed')}, {r.get('precision')})", "",
            "| what | hidden-state tokens/s |", "|---|---:|",
            f"| frozen LLM forward only | {fmt(r.get('forward_tokens_per_s'), 0)} |",
            f"| training step (forward + compressor step) | {fmt(r.get('step_tokens_per_s'), 0)} |", "",
            f"The compressor step adds {fmt(r.get('overhead_pct'))}% to the forward (medians)."]


def md_trm(r: dict[str, Any]) -> list[str]:
    return [f"### TRM training (`TRMModule`, D' = {r.get('d_compressed')}, L = {r.get('length')}, batch "
            f"{r.get('batch')}, N_sup {r.get('n_supervision_steps')}, per-step updates, {r.get('precision')}, "
            "halting off so every step runs)", "",
            "| s per batch | training samples/s | optimizer steps/s |", "|---:|---:|---:|",
            f"| {fmt(r.get('seconds_per_batch'), 3)} | {fmt(r.get('samples_per_s'))} | "
            f"{fmt(r.get('optimizer_steps_per_s'))} |"]


def md_evaluate(r: dict[str, Any]) -> list[str]:
    lines = [f"### Evaluation (`LatentReasoner.answer`, greedy; cot thinks {r.get('max_thinking_tokens')} tokens, "
             f"answers up to {r.get('max_new_tokens')}; after a warm-up)", "",
             "| mode | batch | time to first answer token (s) | total (s) | thinking tokens | TRM steps | "
             "TRM overhead (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in r.get("rows", []):
        lines.append(f"| {row['mode']} | {row['batch']} | {fmt(row['time_to_first_answer_token_s'], 3)} | "
                     f"{fmt(row['total_s'], 3)} | {fmt(row['thinking_tokens'], 0)} | {fmt(row['trm_steps'])} | "
                     f"{fmt(row['trm_overhead_s'], 4)} |")
    return lines


def md_grpo(r: dict[str, Any]) -> list[str]:
    lines = [f"### GRPO (`GRPOModule`, one step: {r.get('problems')} problems x G = {r.get('group_size')}, up to "
             f"{r.get('max_answer_tokens')} answer tokens, {r.get('n_soft_vectors')} soft vectors, "
             f"{r.get('precision')}; the second step timed)", "",
             "| activation checkpointing | step (s) | peak GPU memory (GiB) | answer tokens (mean) |",
             "|---|---:|---:|---:|"]
    for row in r.get("rows", []):
        if "error" in row:
            lines.append(f"| {row['activation_checkpointing']} | {row['error']} | | |")
        else:
            lines.append(f"| {row['activation_checkpointing']} | {fmt(row['step_s'], 2)} | "
                         f"{fmt(row['peak_memory_gib'], 2)} | {fmt(row['answer_tokens_mean'])} |")
    return lines


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and tiny sizes: every code path in seconds")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cuda:N or cpu")
    parser.add_argument("--dtype", default="auto", help="backbone dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, ...")
    parser.add_argument("--attn-implementation", default="sdpa", help="sdpa, flash_attention_2 or eager")
    parser.add_argument("--json", default=None, help=f"where the JSON goes (default {DEFAULT_JSON.relative_to(ROOT)}; "
                                                     "required with --tiny)")
    parser.add_argument("--markdown", default=None, help="also write the markdown table to this file")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--total-budget", type=float, default=None, help="seconds for the whole run")
    parser.add_argument("--bandwidth-tb-s", type=float, default=None,
                        help="the card's memory bandwidth, for a card the built-in table does not know")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.parts.split(",")) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}: use any of {', '.join(PARTS)}")
    if args.tiny and args.json is None:
        parser.error("--tiny needs --json PATH: the tiny run never overwrites benchmarks/gpu.json")
    return args


def pick_device(requested: str, tiny: bool) -> torch.device | None:
    """The device to run on; None when the real run has no CUDA device."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        return None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # compares equal to the modules' cuda:N
    if device.type != "cuda" and not tiny:
        return None
    return device


def start_watchdog(limit: float, report: dict[str, Any], emit: Callable[[], None]) -> threading.Timer:
    """Past `limit` seconds, print what was measured and exit: a hung kernel never loses the table."""

    def fire() -> None:
        for entry in report["parts"].values():
            if entry["status"] == "running":
                entry["status"], entry["error"] = "killed", f"the run passed its hard limit of {limit:.0f} s"
        try:
            emit()
        finally:
            os._exit(0)

    timer = threading.Timer(limit, fire)
    timer.daemon = True
    timer.start()
    return timer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device, args.tiny)
    if device is None:
        print("bench_gpu: error: no CUDA device: the GPU benchmark needs one (install a CUDA build with "
              "`make setup TORCH_SPEC=...`), or run `python scripts/bench_gpu.py --tiny --json PATH` on CPU.",
              file=sys.stderr)
        return 2
    scale = TINY if args.tiny else REAL
    if args.total_budget:
        scale = replace(scale, total_budget=args.total_budget)
    json_path = Path(args.json) if args.json else DEFAULT_JSON
    started_at = time.perf_counter()
    deadline = started_at + scale.total_budget
    report: dict[str, Any] = {
        "format": FORMAT, "command": " ".join(["python scripts/bench_gpu.py", *(sys.argv[1:] if argv is None else argv)]),
        "tiny": args.tiny, "scale": scale.name, "started": time.strftime("%Y-%m-%d %H:%M"),
        "json": str(json_path.relative_to(ROOT)) if json_path.resolve().is_relative_to(ROOT) else str(json_path),
        "versions": versions(), "device": device_info(device, args.bandwidth_tb_s), "options": {
            "backbone_dtype": args.dtype, "attn_implementation": args.attn_implementation,
            "precision": scale.precision, "total_budget_s": scale.total_budget},
        "backbone": {"config": {k: v for k, v in scale.model.items() if k != "no_rope_layers"},
                     "nope_layers": [i for i, rope in enumerate(scale.model["no_rope_layers"]) if not rope]},
        "parts": {}, "wall_s": None,
    }

    def emit() -> None:
        report["wall_s"] = time.perf_counter() - started_at
        write_json(json_path, report)
        text = markdown(report)
        if args.markdown:
            Path(args.markdown).write_text(text)
        sys.stdout.write(text)
        sys.stdout.flush()

    watchdog = start_watchdog(scale.total_budget + WATCHDOG_GRACE_S, report, emit)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        bench = Bench(scale, device, args.dtype, args.attn_implementation, Path(tmp),
                      bandwidth_tb_s=args.bandwidth_tb_s)
        run_part(bench, "setup", setup, min(scale.budgets["setup"], deadline - time.perf_counter()), report)
        report["backbone"].update(report["parts"]["setup"]["results"])
        write_json(json_path, report)
        wanted = [name for name in PARTS if name in args.parts.split(",")]
        for name in wanted:
            if report["parts"]["setup"]["status"] != "ok":
                report["parts"][name] = {"status": "skipped", "error": "setup failed", "budget_s": None,
                                         "seconds": None, "peak_memory_gib": None, "results": {}}
                continue
            budget = min(scale.budgets[name], deadline - time.perf_counter())
            run_part(bench, name, PART_FUNCTIONS[name], budget, report)
            write_json(json_path, report)
    watchdog.cancel()
    emit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
