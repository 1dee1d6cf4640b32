"""Phase 2 datagen as a Lightning predict loop: the frozen LLM thinks, we keep its hidden states.

Per batch of problems, `DatagenModule.predict_step`:

1. builds each chat prompt (thinking on; the opening tag ends the prompt) and skips
   problems whose prompt plus thinking and answer budgets exceed the context window;
2. generates the thinking, batched and left-padded, each sequence stopping at the
   closing tag (or EOS, or max_new_tokens);
3. cuts each generation at the closing tag, or closes the thinking itself when the
   model did not (the record says which), always ending with the canonical tag tokens;
4. runs ONE right-padded extraction forward pass over prompt + thinking + the closing suffix
   `</think>\n` (thinking.CLOSE_SUFFIX, what every mode puts between thinking and answer):
   hidden_pre = states of the prompt up to and including the opening tag [L_i, D],
   hidden_post = state at the closing suffix's last token [D] (the state from which the
   first answer token is predicted). Right padding gives every real token the same
   positions as an unpadded pass, so a stored state can be recomputed from the
   record's token ids alone;
5. generates the answer after the closing suffix and checks it against the gold answer.

`HiddenPairWriter` writes the results into resumable shards (one writer per DDP rank)
and `DatagenProgressBar` shows samples/s and thinking tokens/s.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from torch import Tensor

from llm_trm.backbone import (
    DEFAULT_BACKBONE,
    HIDDEN_STATE_CONVENTION,
    backbone_id,
    default_dtype,
    hidden_size_of,
    load_config,
    load_tokenizer,
)
from llm_trm.batching import pad_token_ids
from llm_trm.data import problems as problem_registry
from llm_trm.data.problems import Problem
from llm_trm.data.shards import DatasetCounts, ShardWriter, dataset_of, read_index, sum_counts
from llm_trm.eval.answers import check_answer
from llm_trm.generation import CACHE_IMPLEMENTATIONS, GREEDY, Decoding, generate
from llm_trm.latent import Prompt, encode_prompt, extraction_pass
from llm_trm.modules.common import FrozenBackboneMixin
from llm_trm.thinking import THINK_CLOSE, close_suffix_ids, split_at_close

log = logging.getLogger(__name__)

POSITIONS_CONVENTION = (
    "pre = token_ids[:pre_length] (prompt up to and including the opening think tag); "
    "post = token_ids[post_position] (last token of the closing suffix '</think>\\n', from which the answer's "
    "first token is predicted); right-padded extraction pass"
)


# --------------------------------------------------------------------------- results


@dataclass
class HiddenPair:
    """One finished sample: its states and its JSON record."""

    pre: Tensor  # [pre_length, D]
    post: Tensor  # [D]
    record: dict[str, Any]
    post_states: Tensor | None = None  # [m, D], the last m states ending at the closing suffix (m > 1 only)

    @property
    def num_thinking_tokens(self) -> int:
        return int(self.record["num_thinking_tokens"])


@dataclass
class DatagenBatch:
    """What predict_step returns: finished pairs and the ids skipped as too long."""

    pairs: list[HiddenPair] = field(default_factory=list)
    skipped_too_long: list[str] = field(default_factory=list)


@dataclass
class DatagenStats:
    """Running counts of one rank, per dataset (summed over ranks at the end)."""

    per_dataset: dict[str, DatasetCounts] = field(default_factory=dict)

    def _counts(self, dataset: str) -> DatasetCounts:
        return self.per_dataset.setdefault(dataset, DatasetCounts())

    def add(self, batch: DatagenBatch) -> None:
        for sample_id in batch.skipped_too_long:
            self._counts(sample_id.rsplit(":", 1)[0]).skipped_too_long += 1
        for pair in batch.pairs:
            self._counts(dataset_of(pair.record)).add_record(pair.record)

    @property
    def total(self) -> DatasetCounts:
        return sum_counts(self.per_dataset)

    @property
    def generated(self) -> int:
        return self.total.samples

    @property
    def skipped_too_long(self) -> int:
        return self.total.skipped_too_long

    @property
    def forced_closes(self) -> int:
        return self.total.forced_closes

    @property
    def closed(self) -> int:
        return self.total.closed

    @property
    def checked(self) -> int:
        return self.total.checked

    @property
    def correct(self) -> int:
        return self.total.correct

    @property
    def thinking_tokens(self) -> int:
        return self.total.thinking_tokens

    @property
    def accuracy(self) -> float | None:
        return self.total.accuracy

    @property
    def closed_share(self) -> float | None:
        return self.total.closed_share

    def summed_over_ranks(self, strategy: Any) -> DatagenStats:
        """Every rank's counts added per dataset (a collective: every rank must call it)."""
        names = _names_over_ranks(strategy, sorted(self.per_dataset))
        width = len(fields(DatasetCounts))
        flat = [value for name in names for value in self.per_dataset.get(name, DatasetCounts()).as_list()]
        summed = sum_over_ranks(strategy, flat)
        return DatagenStats({name: DatasetCounts(*summed[i * width : (i + 1) * width]) for i, name in enumerate(names)})


def _names_over_ranks(strategy: Any, names: list[str]) -> list[str]:
    """The union of every rank's dataset names, in the same order on every rank."""
    if int(getattr(strategy, "world_size", 1)) <= 1 or not torch.distributed.is_initialized():
        return names
    gathered: list[list[str] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, names)
    return sorted(set().union(*(set(g or []) for g in gathered)))


def sum_over_ranks(strategy: Any, counts: list[int]) -> list[int]:
    """Integer counts summed over DDP ranks (a collective: every rank must call it)."""
    if not counts:
        return []
    values = torch.tensor(counts, dtype=torch.float64, device=strategy.root_device)
    return [int(round(value)) for value in strategy.reduce(values, reduce_op="sum").tolist()]


@dataclass
class _Thought:
    prompt: Prompt
    thinking_ids: list[int]
    closed: bool

    def extraction_ids(self, close_ids: list[int]) -> list[int]:
        """prompt + thinking + the canonical closing suffix: what the extraction pass reads."""
        return self.prompt.ids + self.thinking_ids + close_ids


# --------------------------------------------------------------------------- module


class DatagenModule(FrozenBackboneMixin, L.LightningModule):
    """Predict-time module: problems in, hidden pairs with records out (see the module docstring).

    Args:
        backbone: frozen LLM spec: Hub id, local dir, .gguf file or `embedded`.
        layer: hidden-state layer (-1: final, after the norm).
        max_new_tokens: thinking budget per problem (seed flag `--max_new_tokens`).
        max_answer_tokens: answer budget after the closing tag (0: no answer, correct is null).
        num_post_states: m, the end-of-thinking states stored per sample: the last m positions up to and
            including the closing suffix's last token (1: only that state, the seed's target).
        do_sample: sample instead of greedy decoding (greedy by default).
        temperature: sampling temperature (only with do_sample).
        top_p: nucleus sampling mass (only with do_sample).
        top_k: top-k sampling cut-off (only with do_sample; null disables it).
        max_context_tokens: context window; null reads the backbone's max_position_embeddings.
            A problem whose prompt plus both budgets does not fit is skipped and counted.
        backbone_dtype: `auto` (bf16 on GPU, fp32 on CPU), bfloat16, float16 or float32.
        cache_implementation: `dynamic`, or `static`: a preallocated KV cache with which transformers
            compiles the decoding step on CUDA (faster decoding after one compilation per batch shape).
        attn_implementation: the backbone's attention: sdpa, flash_attention_2 (needs flash-attn) or eager.
        trust_remote_code: allow custom modelling code from the Hub (off by default).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layer: int = -1,
        max_new_tokens: PositiveInt = 512,
        max_answer_tokens: NonNegativeInt = 256,
        do_sample: bool = False,
        temperature: float = 0.6,
        top_p: float = 0.95,
        top_k: int | None = None,
        max_context_tokens: int | None = None,
        num_post_states: int = 1,
        backbone_dtype: str = "auto",
        trust_remote_code: bool = False,
        attn_implementation: str = "sdpa",
        cache_implementation: str = "dynamic",
    ) -> None:
        super().__init__()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_answer_tokens < 0:
            raise ValueError(f"max_answer_tokens must be >= 0, got {max_answer_tokens}")
        if num_post_states < 1:
            raise ValueError(f"num_post_states must be >= 1, got {num_post_states}")
        if cache_implementation not in CACHE_IMPLEMENTATIONS:
            raise ValueError(f"cache_implementation must be one of {CACHE_IMPLEMENTATIONS}, got {cache_implementation!r}")
        self.save_hyperparameters()
        self.backbone, self.layer = backbone, layer
        self.backbone_dtype, self.trust_remote_code = backbone_dtype, trust_remote_code
        self.attn_implementation = attn_implementation
        self.stats = DatagenStats()

    # ---- facts about the run ---------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return load_tokenizer(self.backbone, self.trust_remote_code)

    @property
    def context_window(self) -> int:
        if self.hparams.max_context_tokens:
            return int(self.hparams.max_context_tokens)
        config = load_config(self.backbone, self.trust_remote_code)
        return int(getattr(config, "max_position_embeddings", None) or 10**9)

    def prompt_fingerprint(self) -> str:
        """Hash of the rendered prompt text (template, system prompt, instructions, pinned date)."""
        return problem_registry.prompt_fingerprint(self.tokenizer)

    def prompt_format(self) -> str:
        return problem_registry.prompt_format(self.tokenizer)

    def sampling_settings(self) -> dict[str, Any]:
        return self.decoding.as_dict()

    def datagen_settings(self) -> dict[str, Any]:
        """The module's part of datagen_config.json: what determines the stored states and records."""
        hp = self.hparams
        return {
            "backbone": backbone_id(self.backbone),
            "hidden_size": hidden_size_of(self.backbone, self.trust_remote_code),
            "layer": self.layer,
            "hidden_states": HIDDEN_STATE_CONVENTION,
            "positions": POSITIONS_CONVENTION,
            "backbone_dtype": str(default_dtype(self.backbone_dtype)).removeprefix("torch."),
            "attn_implementation": self.attn_implementation,
            "prompt": {"format": self.prompt_format(), "sha256": self.prompt_fingerprint()},
            "max_new_tokens": hp.max_new_tokens,
            "max_answer_tokens": hp.max_answer_tokens,
            "max_context_tokens": self.context_window,
            "sampling": self.sampling_settings(),
        }

    # ---- predict ---------------------------------------------------------------------

    def on_predict_start(self) -> None:
        self.llm.check_layer(self.layer)  # load the backbone (on this rank's device) and fail early

    def predict_step(self, batch: list[Problem], batch_idx: int = 0, dataloader_idx: int = 0) -> DatagenBatch:
        prompts, skipped = self._prepare(batch)
        result = DatagenBatch(skipped_too_long=skipped)
        if prompts:
            thoughts = self._think(prompts)
            pre, post = self._extract(thoughts)
            answers = self._answer(thoughts)
            result.pairs = [HiddenPair(p, q[-1], self._record(thought, answer), q if len(q) > 1 else None)
                            for thought, p, q, answer in zip(thoughts, pre, post, answers)]
        self.stats.add(result)
        return result

    def _prepare(self, problems: list[Problem]) -> tuple[list[Prompt], list[str]]:
        """Tokenized prompts of the problems that fit the context window, and the ids that do not."""
        hp = self.hparams
        budget = self.context_window - hp.max_new_tokens - len(self._close_ids) - hp.max_answer_tokens
        prepared, skipped = [], []
        for problem in problems:
            prompt = encode_prompt(self.tokenizer, problem, thinking=True)
            if len(prompt.ids) > budget:
                log.warning(
                    "skipping %s: its prompt of %d tokens + max_new_tokens %d + max_answer_tokens %d "
                    "exceeds the context window of %d tokens",
                    problem.sample_id, len(prompt.ids), hp.max_new_tokens, hp.max_answer_tokens, self.context_window,
                )
                skipped.append(problem.sample_id)
                continue
            prepared.append(prompt)
        return prepared, skipped

    @property
    def _close_ids(self) -> list[int]:
        return close_suffix_ids(self.tokenizer)

    @property
    def decoding(self) -> Decoding:
        hp = self.hparams
        if not hp.do_sample:
            return GREEDY
        return Decoding(do_sample=True, temperature=hp.temperature, top_p=hp.top_p, top_k=hp.top_k or 0)

    def _generate(self, sequences: list[list[int]], max_new_tokens: int, stop_text: str | None) -> list[list[int]]:
        """New token ids per sequence (left-padded batched generation), cut at end-of-turn/padding."""
        input_ids, attention_mask = pad_token_ids(sequences, self.tokenizer.pad_token_id, self.device, side="left")
        return generate(self.llm.model, self.tokenizer, input_ids=input_ids, attention_mask=attention_mask,
                        max_new_tokens=max_new_tokens, decoding=self.decoding, stop_text=stop_text,
                        logits_processors=self._extra_logits_processors(),
                        cache_implementation=self.hparams.cache_implementation).new_ids

    def _extra_logits_processors(self) -> list[Any]:
        """Hook for subclasses and tests (e.g. a processor that forces a token); none by default."""
        return []

    def _think(self, prompts: list[Prompt]) -> list[_Thought]:
        generated = self._generate([prompt.ids for prompt in prompts], self.hparams.max_new_tokens, THINK_CLOSE)
        return [_Thought(prompt, *split_at_close(new_ids, self._decode)) for prompt, new_ids in zip(prompts, generated)]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _extract(self, thoughts: list[_Thought]) -> tuple[list[Tensor], list[Tensor]]:
        """The one extraction pass (`latent.extraction_pass`): pre states [L_i, D] and the last m states
        [m, D] ending at the closing suffix's last token (the post state is the last of them)."""
        pre, post = extraction_pass(self.llm.model, [thought.extraction_ids(self._close_ids) for thought in thoughts],
                                    [thought.prompt.pre_length for thought in thoughts], self.layer,
                                    self.hparams.num_post_states, self.tokenizer.pad_token_id, self.device)
        return [states.cpu() for states in pre], [states.cpu() for states in post]

    def _answer(self, thoughts: list[_Thought]) -> list[list[int]]:
        """The answer's token ids after the canonical closing tag (cut before the end-of-turn token)."""
        if self.hparams.max_answer_tokens == 0:
            return [[] for _ in thoughts]
        sequences = [thought.extraction_ids(self._close_ids) for thought in thoughts]
        return self._generate(sequences, self.hparams.max_answer_tokens, None)

    def _record(self, thought: _Thought, answer_ids: list[int]) -> dict[str, Any]:
        problem = thought.prompt.problem
        extraction_ids = thought.extraction_ids(self._close_ids)
        checked = self.hparams.max_answer_tokens > 0
        answer = self.tokenizer.decode(answer_ids, skip_special_tokens=True)
        return {
            "sample_id": problem.sample_id,
            "dataset": problem.dataset,
            "problem": problem.prompt,
            "thinking": self._decode(thought.thinking_ids),
            "answer": answer,
            "answer_ids": answer_ids,  # what the LLM wrote after token_ids (the bridge's teacher-forced targets)
            "gold_answer": problem.gold_answer,
            "correct": check_answer(problem, answer) if checked else None,
            "closed_thinking": thought.closed,
            "token_ids": extraction_ids,
            "pre_length": thought.prompt.pre_length,
            "post_position": len(extraction_ids) - 1,
            "num_thinking_tokens": len(thought.thinking_ids),
        }


# --------------------------------------------------------------------------- callbacks


def build_datagen_config(module: DatagenModule, datamodule: Any, store_dtype: str) -> dict[str, Any]:
    """Everything that determines the output: the module's, the problems' and the storage's settings."""
    config = {"format": "llm-trm datagen v1", **module.datagen_settings(), "store_dtype": store_dtype}
    num_post_states = getattr(module, "hparams", {}).get("num_post_states")
    if num_post_states is not None:  # m end-of-thinking states per sample (shards and index record it too)
        config.setdefault("num_post_states", int(num_post_states))
    if datamodule is not None and hasattr(datamodule, "datagen_settings"):
        config.update(datamodule.datagen_settings())
    return config


@dataclass
class DatagenSummary:
    stats: DatagenStats
    written: int
    total_in_output: int
    output_dir: str
    moved_aside_to: str | None = None  # the whole previous output (auto_resume false)
    set_aside: int = 0  # files of the output this run could not account for, moved aside (all ranks)
    aside_dirs: list[str] = field(default_factory=list)  # where rank 0 moved them
    rebuilt_index: bool = False  # some rank rebuilt its missing index from the shards that verify
    tensorboard_dir: str | None = None


class HiddenPairWriter(BasePredictionWriter):
    """Writes each batch's pairs into resumable shards: one ShardWriter per rank.

    At the end, rank 0 writes the run's per-dataset closed-thinking share, accuracy and
    thinking tokens as TensorBoard scalars under ``<output_dir>/tensorboard``.

    Args:
        output_dir: shard directory (seed flag `--output_dir`).
        checkpoint_every: samples per shard; a kill loses at most one shard in progress
            (seed flag `--checkpoint_every`).
        auto_resume: skip samples already stored; false moves old output aside and starts
            fresh (seed flag `--no_auto_resume`).
        dtype: storage dtype of the states (bfloat16, float16 or float32).
    """

    def __init__(
        self,
        output_dir: str = "./data/hidden_pairs",
        checkpoint_every: int = 100,
        auto_resume: bool = True,
        dtype: str = "bfloat16",
    ) -> None:
        super().__init__(write_interval="batch")
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.output_dir = output_dir
        self.checkpoint_every = checkpoint_every
        self.auto_resume = auto_resume
        self.dtype = dtype
        self.writer: ShardWriter | None = None
        self.summary: DatagenSummary | None = None
        self._written = 0
        self._moved_aside_to: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = build_datagen_config(pl_module, trainer.datamodule, self.dtype)
        # Rank 0 moves old output aside (fresh start) and writes the config before others open.
        if trainer.global_rank == 0:
            self.writer = self._open(config, 0)
        trainer.strategy.barrier("datagen_writer_setup")
        if trainer.global_rank != 0:
            self.writer = self._open(config, trainer.global_rank)
        if self.writer.moved_aside_to is not None:
            self._moved_aside_to = str(self.writer.moved_aside_to)
        if trainer.datamodule is not None and hasattr(trainer.datamodule, "skip_ids"):
            trainer.datamodule.skip_ids(self.writer.done_ids)

    def _open(self, config: dict[str, Any], rank: int) -> ShardWriter:
        return ShardWriter(
            self.output_dir,
            config,
            rank=rank,
            shard_size=self.checkpoint_every,
            auto_resume=self.auto_resume,
            expected_hidden_size=config.get("hidden_size"),
            dtype=self.dtype,
        )

    def write_on_batch_end(self, trainer, pl_module, prediction: DatagenBatch, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        assert self.writer is not None, "HiddenPairWriter.setup was not called"
        for pair in prediction.pairs:
            self.writer.add(pair.pre, pair.post, pair.num_thinking_tokens, pair.record,
                            post_states=getattr(pair, "post_states", None))
            self._written += 1

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()  # flushes the partial last shard: every finished sample is kept

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close()
        if self.writer is None:
            return
        stats = pl_module.stats if isinstance(getattr(pl_module, "stats", None), DatagenStats) else DatagenStats()
        # The collectives also wait for every rank's writer to close, so the index is final below.
        stats = stats.summed_over_ranks(trainer.strategy)
        written, set_aside, rebuilt = sum_over_ranks(
            trainer.strategy, [self._written, len(self.writer.set_aside), int(self.writer.rebuilt_index)])
        self.summary = DatagenSummary(
            stats=stats,
            written=written,
            total_in_output=_count_stored(self.output_dir),
            output_dir=str(self.output_dir),
            moved_aside_to=self._moved_aside_to,
            set_aside=set_aside,
            aside_dirs=[str(self.writer.aside_dir)] if self.writer.aside_dir else [],
            rebuilt_index=bool(rebuilt),
        )
        if trainer.global_rank == 0:
            self.summary.tensorboard_dir = str(write_tensorboard(self.summary))


def _count_stored(output_dir: str) -> int:
    return sum(info.num_samples for info in read_index(output_dir))


ALL_DATASETS = "_all"  # the TensorBoard series over every dataset of the run


def write_tensorboard(summary: DatagenSummary) -> Path:
    """Per-dataset (and `_all`) closed share, accuracy and thinking tokens per sample of this run, as
    scalars at step = samples in the output, in ``<output_dir>/tensorboard`` (one event file per run)."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(summary.output_dir) / "tensorboard"
    step = summary.total_in_output
    series = {**summary.stats.per_dataset, ALL_DATASETS: summary.stats.total}
    with SummaryWriter(log_dir=str(log_dir)) as writer:
        for name, counts in series.items():
            values = {
                "closed_share": counts.closed_share,
                "accuracy": counts.accuracy,
                "thinking_tokens_per_sample": counts.thinking_tokens_per_sample,
                "samples": counts.samples,
            }
            for metric, value in values.items():
                if value is not None:
                    writer.add_scalar(f"datagen/{metric}/{name}", value, step)
    return log_dir


class DatagenProgressBar(TQDMProgressBar):
    """TQDM bar over batches: samples/s, thinking tokens/s and the share of closed thinking (per dataset)."""

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._started = time.perf_counter()

    @property
    def predict_description(self) -> str:
        return "Datagen"

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        self._started = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        stats = getattr(pl_module, "stats", None)
        if not isinstance(stats, DatagenStats) or self.predict_progress_bar is None:
            return
        self.predict_progress_bar.set_postfix(progress_postfix(stats, time.perf_counter() - self._started))


def progress_postfix(stats: DatagenStats, elapsed: float) -> dict[str, str]:
    """The bar's figures: rates, closed thinking (overall, and per dataset when there are several)."""
    elapsed = max(elapsed, 1e-9)
    total = stats.total
    postfix = {
        "samples/s": f"{total.samples / elapsed:.2f}",
        "think tok/s": f"{total.thinking_tokens / elapsed:.1f}",
        "closed": f"{total.closed}/{total.closed_known}",
        "skipped": str(total.skipped_too_long),
    }
    if len(stats.per_dataset) > 1:
        postfix["closed by dataset"] = " ".join(
            f"{name} {100 * counts.closed_share:.0f}%" for name, counts in sorted(stats.per_dataset.items())
            if counts.closed_share is not None
        )
    return postfix


__all__ = [
    "DatagenBatch",
    "DatagenModule",
    "DatagenProgressBar",
    "DatagenStats",
    "DatagenSummary",
    "HiddenPair",
    "HiddenPairWriter",
    "build_datagen_config",
    "progress_postfix",
    "sum_over_ranks",
    "write_tensorboard",
]
