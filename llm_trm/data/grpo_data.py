"""GRPODataModule: the problems Phase 3 trains on, drawn by a difficulty curriculum.

Problems come from the registry (`load_problems`, the training split). `val_samples` of
them are held out by sample id for validation: problems that datagen did not record
(Phase 2 never saw them) first, then by a stable hash of the id, so the split does not
depend on the order or the number of problems.

Difficulty per problem comes from the datagen records (`records_dir`, a hidden-pair
shard directory): the thinking tokens the base model used, or whether it answered
correctly. Problems without a record count as the hardest known. Training batches are
drawn by `CurriculumSampler`, which asks the trainer for its global step at every batch
and draws only from the easiest `fraction(step)` of the problems.

Batches are `ProblemBatch`es: the problems (tokenization happens in the module), the LLM's own
correct datagen answer for each (the warm start's targets) and the curriculum's state when the
batch was drawn. Data flows one way: the module gets all of this through the batches and never
reads the DataModule; `warm_start_steps` comes from the model's config (the CLI links it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from llm_trm.data.problem_datamodule import ProblemList, check_sources
from llm_trm.data.problems import Problem, load_problems
from llm_trm.data.shards import index_files, iter_records
from llm_trm.errors import DataError
from llm_trm.rl.curriculum import DifficultyCurriculum

Difficulty = Literal["thinking_tokens", "base_correctness", "none"]
DIFFICULTIES = ("thinking_tokens", "base_correctness", "none")


def _unit_hash(text: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class ProblemBatch:
    """A training or validation batch for GRPO."""

    problems: list[Problem]
    reference_answers: list[str | None]  # the LLM's own correct datagen answer, when it has one
    curriculum: dict[str, float] = field(default_factory=dict)  # fraction, min/max difficulty at the draw

    def __len__(self) -> int:
        return len(self.problems)


def read_records(records_dir: str | None) -> dict[str, dict[str, Any]]:
    """The datagen records by sample id ({} without a directory)."""
    if records_dir is None:
        return {}
    if not index_files(records_dir):
        raise DataError(f"no datagen records at {records_dir}: run `llm-trm datagen` first or set records_dir: null")
    return {record["sample_id"]: record for record in iter_records(records_dir)}


def record_difficulty(record: dict[str, Any], kind: str) -> float:
    if kind == "thinking_tokens":
        return float(record.get("num_thinking_tokens", 0))
    correct = record.get("correct")
    return 0.0 if correct else 1.0  # an unchecked answer counts as a failure


def problem_difficulties(problems: list[Problem], records: dict[str, dict[str, Any]], kind: str) -> list[float]:
    """One score per problem (higher is harder); problems without a record get the hardest known score."""
    if kind == "none":
        return [0.0] * len(problems)
    known = {p.sample_id: record_difficulty(records[p.sample_id], kind) for p in problems if p.sample_id in records}
    if not known:
        raise DataError(
            f"difficulty={kind!r} needs datagen records of the training problems, but records_dir has none of "
            "them: point records_dir at the datagen output of the same datasets, or use difficulty: none."
        )
    hardest = max(known.values())
    return [known.get(p.sample_id, hardest) for p in problems]


class CurriculumSampler(DistributedSampler):
    """Problem indices for `num_batches` batches, each drawn from the curriculum's active range.

    The range is read at every batch from `current_step()` (the trainer's global step), so
    the sampler must run in the main process (num_workers 0). The draw itself depends only
    on (seed, rank, epoch, batch number): ranks draw differently, and a run resumed at an
    epoch boundary draws what an uninterrupted one would. A DistributedSampler subclass, so
    Lightning keeps it under DDP instead of inserting its own.
    """

    def __init__(self, dataset: ProblemList, curriculum: DifficultyCurriculum, batch_size: int, num_batches: int,
                 current_step: Callable[[], int], num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 pool: Callable[[int], list[int] | None] | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.curriculum = curriculum
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.current_step = current_step
        self.pool = pool  # an optional override of the active set (the warm start's problems)

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def active(self, step: int) -> list[int]:
        override = self.pool(step) if self.pool is not None else None
        return override if override else self.curriculum.active_indices(step)

    def draw(self, batch_number: int, step: int) -> list[int]:
        active = self.active(step)
        generator = torch.Generator().manual_seed(
            int(_unit_hash(f"{self.rank}:{self.epoch}:{batch_number}", self.seed) * 2**62))
        if len(active) >= self.batch_size:  # distinct problems in a batch when there are enough
            picks = torch.randperm(len(active), generator=generator)[: self.batch_size]
        else:
            picks = torch.randint(len(active), (self.batch_size,), generator=generator)
        return [active[i] for i in picks.tolist()]

    def __iter__(self) -> Iterator[int]:
        for batch_number in range(self.num_batches):
            yield from self.draw(batch_number, self.current_step())


class GRPODataModule(L.LightningDataModule):
    """Problems for GRPO: a curriculum over the training problems, and held-out problems for validation.

    Args:
        datasets: problem sources, e.g. `gsm8k` or `gsm8k,mbpp`; offline: `gsm_symbolic`, `jsonl:<path>`.
        split: the split problems come from (the training split: validation problems are held out of it).
        num_samples: training problems.
        val_samples: held-out problems for validation (0 disables validation).
        records_dir: a datagen output (hidden-pair shard directory) whose records give each
            problem's difficulty and the LLM's own correct answers for the warm start.
        batch_size: problems per batch, per device (each is answered group_size times).
        batches_per_epoch: training batches per epoch (the sampler draws with replacement).
        curriculum_start_fraction: share of the problems, easiest first, in play at step 0.
        curriculum_full_at_step: global step at which every problem is in play (0: no curriculum).
        difficulty: `thinking_tokens` (base model's thinking length), `base_correctness`
            (whether the base model answered correctly) or `none` (no curriculum).
        seed: drives generated sources, the held-out split's hash and the draws.
        warm_start_steps: the model's warm start (linked from `model.warm_start_steps` by the CLI):
            its batches are drawn from the problems the LLM answered correctly in datagen.
    """

    def __init__(
        self,
        datasets: str = "gsm8k",
        split: str = "train",
        num_samples: int = 1000,
        val_samples: int = 64,
        records_dir: str | None = None,
        batch_size: int = 4,
        batches_per_epoch: int = 100,
        curriculum_start_fraction: float = 0.3,
        curriculum_full_at_step: int = 1000,
        difficulty: Difficulty = "thinking_tokens",
        seed: int = 0,
        warm_start_steps: int = 0,
    ) -> None:
        super().__init__()
        if difficulty not in DIFFICULTIES:
            raise DataError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
        if batch_size < 1 or batches_per_epoch < 1 or num_samples < 1 or val_samples < 0 or warm_start_steps < 0:
            raise DataError("batch_size, batches_per_epoch and num_samples must be >= 1 and val_samples, "
                            "warm_start_steps >= 0")
        check_sources(datasets)
        self.warm_start_steps = warm_start_steps
        self.datasets, self.split = datasets, split
        self.num_samples, self.val_samples = num_samples, val_samples
        self.records_dir, self.difficulty = records_dir, difficulty
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.start_fraction, self.full_at_step = curriculum_start_fraction, curriculum_full_at_step
        self.seed = seed
        self.train_problems: list[Problem] = []
        self.val_problems: list[Problem] = []
        self.records: dict[str, dict[str, Any]] = {}
        self._correct_answers: dict[str, str] | None = None
        self.curriculum: DifficultyCurriculum | None = None

    # ---- problems ----------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self.curriculum is not None:
            return
        self.records = read_records(self.records_dir)
        self.train_problems, self.val_problems = self._split(self._load())
        if self.warm_start_steps > 0 and not self.correct_answers():
            raise DataError("warm_start_steps > 0 needs the LLM's own correct answers: set data.records_dir "
                            "to a datagen output with correct answers, or model.warm_start_steps: 0.")
        difficulties = problem_difficulties(self.train_problems, self.records, self.difficulty)
        full_at = 0 if self.difficulty == "none" else self.full_at_step
        self.curriculum = DifficultyCurriculum(difficulties, self.start_fraction, full_at)

    def _load(self) -> list[Problem]:
        try:
            problems = load_problems(self.datasets, self.split, self.num_samples + self.val_samples, self.seed)
        except ValueError as err:
            raise DataError(str(err)) from err
        if len(problems) <= self.val_samples:
            raise DataError(f"{self.datasets!r} gave {len(problems)} problems, not enough for {self.val_samples} "
                            "held-out ones and a training set: lower val_samples")
        missing = [p.sample_id for p in problems if not p.has_gold]
        if missing:
            raise DataError(f"{len(missing)} problem(s) of {self.datasets!r} have no gold answer or tests (e.g. "
                            f"{missing[0]}): GRPO's reward cannot score them; use a dataset with answers.")
        return problems

    def _split(self, problems: list[Problem]) -> tuple[list[Problem], list[Problem]]:
        """Hold out val_samples problems: unrecorded ones first (Phase 2 never saw them), then by id hash."""
        def held_out_first(problem: Problem) -> tuple[bool, float]:
            return problem.sample_id in self.records, _unit_hash(problem.sample_id, self.seed)

        val_ids = {p.sample_id for p in sorted(problems, key=held_out_first)[: self.val_samples]}
        train = [p for p in problems if p.sample_id not in val_ids]
        return train, [p for p in problems if p.sample_id in val_ids]

    @property
    def problems(self) -> list[Problem]:
        return self.train_problems + self.val_problems

    def correct_answers(self) -> dict[str, str]:
        """The base LLM's own correct answers by sample id (the warm start's targets)."""
        if self._correct_answers is None:
            self._correct_answers = {sid: r["answer"] for sid, r in self.records.items()
                                     if r.get("correct") and r.get("answer")}
        return self._correct_answers

    def curriculum_state(self, step: int) -> dict[str, float]:
        """fraction, min and max difficulty of the problems in play at `step`."""
        assert self.curriculum is not None, "call setup() first"
        low, high = self.curriculum.difficulty_range(step)
        return {"fraction": self.curriculum.fraction(step), "min_difficulty": low, "max_difficulty": high}

    # ---- loaders -----------------------------------------------------------------------

    def _global_step(self) -> int:
        trainer = self.trainer
        return int(trainer.global_step) if trainer is not None else 0

    def _warm_start_pool(self) -> Callable[[int], list[int] | None] | None:
        """During the model's warm start, draw only problems the LLM answered correctly in datagen."""
        answered = self.correct_answers()
        pool = [i for i, p in enumerate(self.train_problems) if p.sample_id in answered]
        steps = self.warm_start_steps
        if steps <= 0 or not pool:
            return None
        return lambda step: pool if step < steps else None

    def collate(self, problems: list[Problem]) -> ProblemBatch:
        """Problems with their reference answers and the curriculum's state at this draw."""
        answers = self.correct_answers()
        curriculum = self.curriculum_state(self._global_step()) if self.curriculum is not None else {}
        return ProblemBatch(list(problems), [answers.get(p.sample_id) for p in problems], curriculum)

    def collate_validation(self, problems: list[Problem]) -> ProblemBatch:
        return ProblemBatch(list(problems), [None] * len(problems))

    def train_dataloader(self) -> DataLoader:
        assert self.curriculum is not None, "call setup() first"
        dataset = ProblemList(self.train_problems)
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        sampler = CurriculumSampler(dataset, self.curriculum, self.batch_size, self.batches_per_epoch,
                                    self._global_step, num_replicas=world, rank=rank, seed=self.seed,
                                    pool=self._warm_start_pool())
        # num_workers 0: the sampler reads the trainer's step as each batch is drawn
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(ProblemList(self.val_problems), batch_size=self.batch_size,
                          collate_fn=self.collate_validation)

    def transfer_batch_to_device(self, batch: ProblemBatch, device: Any, dataloader_idx: int) -> ProblemBatch:
        return batch  # text: tokens are made on the device by the module
