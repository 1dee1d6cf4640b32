"""Phase 2 datagen as a Lightning predict loop: the frozen LLM thinks, we keep its hidden states.

Per batch of problems, `DatagenModule.predict_step`:

1. builds each chat prompt (thinking on; the opening tag ends the prompt) and skips
   problems whose prompt plus thinking and answer budgets exceed the context window;
2. generates the thinking, batched and left-padded, each sequence stopping at the
   closing tag (or EOS, or max_new_tokens);
3. cuts each generation at the closing tag, or closes the thinking itself when the
   model did not (the record says which), always ending with the canonical tag tokens;
4. runs ONE right-padded extraction forward pass over prompt + thinking + closing tag:
   hidden_pre = states of the prompt up to and including the opening tag [L_i, D],
   hidden_post = state at the closing tag's last token [D] (the state from which the
   first answer token is predicted). Right padding gives every real token the same
   positions as an unpadded pass, so a stored state can be recomputed from the
   record's token ids alone;
5. generates the answer after the closing tag and checks it against the gold answer.

`HiddenPairWriter` writes the results into resumable shards (one writer per DDP rank)
and `DatagenProgressBar` shows samples/s and thinking tokens/s.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, field
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
from llm_trm.data.problems import Problem, build_chat_prompt, supports_enable_thinking
from llm_trm.data.shards import ShardWriter, read_index
from llm_trm.eval.answers import check_answer
from llm_trm.modules.common import FrozenBackboneMixin
from llm_trm.thinking import THINK_CLOSE, cut_at_end, opening_tag_end, split_at_close

log = logging.getLogger(__name__)

POSITIONS_CONVENTION = (
    "pre = token_ids[:pre_length] (prompt up to and including the opening think tag); "
    "post = token_ids[post_position] (last token of the closing think tag); right-padded extraction pass"
)


# --------------------------------------------------------------------------- results


@dataclass
class HiddenPair:
    """One finished sample: its states and its JSON record."""

    pre: Tensor  # [pre_length, D]
    post: Tensor  # [D]
    record: dict[str, Any]

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
    """Running counts of one rank (summed over ranks at the end)."""

    generated: int = 0
    skipped_too_long: int = 0
    forced_closes: int = 0
    checked: int = 0
    correct: int = 0
    thinking_tokens: int = 0

    def add(self, batch: DatagenBatch) -> None:
        self.generated += len(batch.pairs)
        self.skipped_too_long += len(batch.skipped_too_long)
        for pair in batch.pairs:
            record = pair.record
            self.forced_closes += not record["closed_thinking"]
            self.thinking_tokens += pair.num_thinking_tokens
            if record["correct"] is not None:
                self.checked += 1
                self.correct += bool(record["correct"])

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.checked if self.checked else None

    def summed_over_ranks(self, strategy: Any) -> DatagenStats:
        return DatagenStats(*sum_over_ranks(strategy, list(astuple(self))))


def sum_over_ranks(strategy: Any, counts: list[int]) -> list[int]:
    """Integer counts summed over DDP ranks (a collective: every rank must call it)."""
    values = torch.tensor(counts, dtype=torch.float64, device=strategy.root_device)
    return [int(round(value)) for value in strategy.reduce(values, reduce_op="sum").tolist()]


# --------------------------------------------------------------------------- token helpers


@dataclass
class _Prepared:
    problem: Problem
    prompt_ids: list[int]
    pre_length: int


@dataclass
class _Thought:
    thinking_ids: list[int]
    closed: bool
    extraction_ids: list[int]


# --------------------------------------------------------------------------- module


class DatagenModule(FrozenBackboneMixin, L.LightningModule):
    """Predict-time module: problems in, hidden pairs with records out (see the module docstring).

    Args:
        backbone: frozen LLM spec: Hub id, local dir, .gguf file or `embedded`.
        layer: hidden-state layer (-1: final, after the norm).
        max_new_tokens: thinking budget per problem (seed flag `--max_new_tokens`).
        max_answer_tokens: answer budget after the closing tag (0: no answer, correct is null).
        do_sample: sample instead of greedy decoding (greedy by default).
        temperature: sampling temperature (only with do_sample).
        top_p: nucleus sampling mass (only with do_sample).
        top_k: top-k sampling cut-off (only with do_sample; null disables it).
        max_context_tokens: context window; null reads the backbone's max_position_embeddings.
            A problem whose prompt plus both budgets does not fit is skipped and counted.
        backbone_dtype: `auto` (bf16 on GPU, fp32 on CPU), bfloat16, float16 or float32.
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
        backbone_dtype: str = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_answer_tokens < 0:
            raise ValueError(f"max_answer_tokens must be >= 0, got {max_answer_tokens}")
        self.save_hyperparameters()
        self.backbone, self.layer = backbone, layer
        self.backbone_dtype, self.trust_remote_code = backbone_dtype, trust_remote_code
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
        """Hash of everything that shapes the prompt text: chat template and instructions."""
        template = getattr(self.tokenizer, "chat_template", None) or ""
        parts = [str(template), problem_registry.THINKING_SYSTEM_PROMPT, problem_registry.MATH_INSTRUCTION,
                 problem_registry.CODE_INSTRUCTION]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]

    def prompt_format(self) -> str:
        if supports_enable_thinking(self.tokenizer):
            return "chat template with enable_thinking"
        return "chat template, system prompt asking for think tags, <think> prefilled"

    def sampling_settings(self) -> dict[str, Any]:
        hp = self.hparams
        if not hp.do_sample:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": hp.temperature, "top_p": hp.top_p, "top_k": hp.top_k}

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
        prepared, skipped = self._prepare(batch)
        result = DatagenBatch(skipped_too_long=skipped)
        if prepared:
            thoughts = self._think(prepared)
            pre_states, post_states = self._extract(prepared, thoughts)
            answers = self._answer(thoughts)
            result.pairs = [
                HiddenPair(pre, post, self._record(item, thought, answer))
                for item, thought, pre, post, answer in zip(prepared, thoughts, pre_states, post_states, answers)
            ]
        self.stats.add(result)
        return result

    def _prepare(self, problems: list[Problem]) -> tuple[list[_Prepared], list[str]]:
        """Tokenized prompts of the problems that fit the context window, and the ids that do not."""
        tokenizer, hp = self.tokenizer, self.hparams
        budget = self.context_window - hp.max_new_tokens - len(self._close_ids) - hp.max_answer_tokens
        prepared, skipped = [], []
        for problem in problems:
            text = build_chat_prompt(tokenizer, problem, thinking=True)
            prompt_ids = tokenizer.encode(text, add_special_tokens=False)
            if len(prompt_ids) > budget:
                log.warning(
                    "skipping %s: its prompt of %d tokens + max_new_tokens %d + max_answer_tokens %d "
                    "exceeds the context window of %d tokens",
                    problem.sample_id, len(prompt_ids), hp.max_new_tokens, hp.max_answer_tokens, self.context_window,
                )
                skipped.append(problem.sample_id)
                continue
            prepared.append(_Prepared(problem, prompt_ids, opening_tag_end(tokenizer, text, prompt_ids)))
        return prepared, skipped

    @property
    def _close_ids(self) -> list[int]:
        return self.tokenizer.encode(THINK_CLOSE, add_special_tokens=False)

    def _eos_ids(self) -> set[int]:
        """The tokenizer's and the model's end-of-turn ids."""
        model_eos = self.llm.model.generation_config.eos_token_id
        ids = {self.tokenizer.eos_token_id, *(model_eos if isinstance(model_eos, list) else [model_eos])}
        return {int(token) for token in ids if token is not None}

    def _end_ids(self) -> set[int]:
        """Ids after which a generated row holds nothing: EOS, and the padding of finished rows."""
        return self._eos_ids() | {int(self.tokenizer.pad_token_id)}

    def _generation_config(self, max_new_tokens: int, stop_strings: list[str] | None = None) -> Any:
        # A fresh config, so the backbone's own generation defaults never change the output.
        from transformers import GenerationConfig

        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            stop_strings=stop_strings,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self._eos_ids()),
            **self.sampling_settings(),
        )

    def _generate(self, sequences: list[list[int]], max_new_tokens: int, stop_strings: list[str] | None) -> list[list[int]]:
        """New token ids per sequence (left-padded batched generation), cut at EOS/padding."""
        input_ids, attention_mask = pad_token_ids(sequences, self.tokenizer.pad_token_id, self.device, side="left")
        output = self.llm.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=self._generation_config(max_new_tokens, stop_strings),
            tokenizer=self.tokenizer,
            **self._extra_generate_kwargs(),
        )
        end_ids = self._end_ids()
        return [cut_at_end(row, end_ids) for row in output[:, input_ids.shape[1] :].tolist()]

    def _extra_generate_kwargs(self) -> dict[str, Any]:
        """Hook for subclasses and tests (e.g. a logits processor); none by default."""
        return {}

    def _think(self, prepared: list[_Prepared]) -> list[_Thought]:
        generated = self._generate([item.prompt_ids for item in prepared], self.hparams.max_new_tokens, [THINK_CLOSE])
        close_ids = self._close_ids
        thoughts = []
        for item, new_ids in zip(prepared, generated):
            thinking_ids, closed = split_at_close(new_ids, self._decode)
            thoughts.append(_Thought(thinking_ids, closed, item.prompt_ids + thinking_ids + close_ids))
        return thoughts

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _extract(self, prepared: list[_Prepared], thoughts: list[_Thought]) -> tuple[list[Tensor], list[Tensor]]:
        """The one extraction pass: pre states [L_i, D] and the post state [D] per sample."""
        sequences = [thought.extraction_ids for thought in thoughts]
        input_ids, attention_mask = pad_token_ids(sequences, self.tokenizer.pad_token_id, self.device, side="right")
        states = self.llm.hidden_states(input_ids, attention_mask, self.layer)
        pre = [states[row, : item.pre_length].cpu() for row, item in enumerate(prepared)]
        post = [states[row, len(seq) - 1].cpu() for row, seq in enumerate(sequences)]
        return pre, post

    def _answer(self, thoughts: list[_Thought]) -> list[str]:
        if self.hparams.max_answer_tokens == 0:
            return [""] * len(thoughts)
        generated = self._generate([t.extraction_ids for t in thoughts], self.hparams.max_answer_tokens, None)
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]

    def _record(self, item: _Prepared, thought: _Thought, answer: str) -> dict[str, Any]:
        problem = item.problem
        checked = self.hparams.max_answer_tokens > 0
        return {
            "sample_id": problem.sample_id,
            "dataset": problem.dataset,
            "problem": problem.prompt,
            "thinking": self._decode(thought.thinking_ids),
            "answer": answer,
            "gold_answer": problem.gold_answer,
            "correct": check_answer(problem, answer) if checked else None,
            "closed_thinking": thought.closed,
            "token_ids": thought.extraction_ids,
            "pre_length": item.pre_length,
            "post_position": len(thought.extraction_ids) - 1,
            "num_thinking_tokens": len(thought.thinking_ids),
        }


# --------------------------------------------------------------------------- callbacks


def build_datagen_config(module: DatagenModule, datamodule: Any, store_dtype: str) -> dict[str, Any]:
    """Everything that determines the output: the module's, the problems' and the storage's settings."""
    config = {"format": "llm-trm datagen v1", **module.datagen_settings(), "store_dtype": store_dtype}
    if datamodule is not None and hasattr(datamodule, "datagen_settings"):
        config.update(datamodule.datagen_settings())
    return config


@dataclass
class DatagenSummary:
    stats: DatagenStats
    written: int
    total_in_output: int
    output_dir: str
    moved_aside_to: str | None = None


class HiddenPairWriter(BasePredictionWriter):
    """Writes each batch's pairs into resumable shards: one ShardWriter per rank.

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
            self.writer.add(pair.pre, pair.post, pair.num_thinking_tokens, pair.record)
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
        stats = pl_module.stats if isinstance(pl_module, DatagenModule) else DatagenStats()
        # The collectives also wait for every rank's writer to close, so the index is final below.
        stats = stats.summed_over_ranks(trainer.strategy)
        (written,) = sum_over_ranks(trainer.strategy, [self._written])
        self.summary = DatagenSummary(
            stats=stats,
            written=written,
            total_in_output=_count_stored(self.output_dir),
            output_dir=str(self.output_dir),
            moved_aside_to=self._moved_aside_to,
        )


def _count_stored(output_dir: str) -> int:
    return sum(info.num_samples for info in read_index(output_dir))


class DatagenProgressBar(TQDMProgressBar):
    """TQDM bar over batches, with samples/s and thinking tokens/s of this rank."""

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
        if stats is None or self.predict_progress_bar is None:
            return
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        self.predict_progress_bar.set_postfix(
            {
                "samples/s": f"{stats.generated / elapsed:.2f}",
                "think tok/s": f"{stats.thinking_tokens / elapsed:.1f}",
                "forced": stats.forced_closes,
                "skipped": stats.skipped_too_long,
            }
        )


__all__ = [
    "DatagenBatch",
    "DatagenModule",
    "DatagenProgressBar",
    "DatagenStats",
    "DatagenSummary",
    "HiddenPair",
    "HiddenPairWriter",
    "build_datagen_config",
]
