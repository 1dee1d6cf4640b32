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

Batches are plain lists of `Problem`s; tokenization happens in the module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from llm_trm.data.problem_datamodule import ProblemList, check_sources, collate_problems
from llm_trm.data.problems import Problem, load_problems
from llm_trm.data.shards import index_files, iter_records, unit_hash
from llm_trm.errors import DataError
from llm_trm.rl.curriculum import DifficultyCurriculum

Difficulty = Literal["thinking_tokens", "base_correctness", "none"]
DIFFICULTIES = ("thinking_tokens", "base_correctness", "none")


def has_gold(problem: Problem) -> bool:
    """Whether a problem can be checked: a gold answer (math) or tests (code)."""
    return bool(problem.tests.strip()) if problem.kind == "code" else bool(str(problem.gold_answer).strip())


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
            int(unit_hash(f"{self.rank}:{self.epoch}:{batch_number}", self.seed) * 2**62))
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
        backbone: the LLM spec (copied from the model by the CLI; unused here, kept for the link).
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
        trust_remote_code: linked from the model by the CLI; unused here.
    """

    def __init__(
        self,
        backbone: str = "",
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
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if difficulty not in DIFFICULTIES:
            raise DataError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
        if batch_size < 1 or batches_per_epoch < 1 or num_samples < 1 or val_samples < 0:
            raise DataError("batch_size, batches_per_epoch and num_samples must be >= 1 and val_samples >= 0")
        check_sources(datasets)
        self.backbone, self.trust_remote_code = backbone, trust_remote_code
        self.datasets, self.split = datasets, split
        self.num_samples, self.val_samples = num_samples, val_samples
        self.records_dir, self.difficulty = records_dir, difficulty
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.start_fraction, self.full_at_step = curriculum_start_fraction, curriculum_full_at_step
        self.seed = seed
        self.train_problems: list[Problem] = []
        self.val_problems: list[Problem] = []
        self.records: dict[str, dict[str, Any]] = {}
        self.curriculum: DifficultyCurriculum | None = None

    # ---- problems ----------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self.curriculum is not None:
            return
        self.records = read_records(self.records_dir)
        self.train_problems, self.val_problems = self._split(self._load())
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
        return problems

    def _split(self, problems: list[Problem]) -> tuple[list[Problem], list[Problem]]:
        """Hold out val_samples problems: unrecorded ones first (Phase 2 never saw them), then by id hash."""
        def held_out_first(problem: Problem) -> tuple[bool, float]:
            return problem.sample_id in self.records, unit_hash(problem.sample_id, self.seed)

        val_ids = {p.sample_id for p in sorted(problems, key=held_out_first)[: self.val_samples]}
        train = [p for p in problems if p.sample_id not in val_ids]
        return train, [p for p in problems if p.sample_id in val_ids]

    @property
    def problems(self) -> list[Problem]:
        return self.train_problems + self.val_problems

    def correct_answers(self) -> dict[str, str]:
        """The base LLM's own correct answers by sample id (the warm start's targets)."""
        return {sid: r["answer"] for sid, r in self.records.items() if r.get("correct") and r.get("answer")}

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
        module = self.trainer.lightning_module if self.trainer is not None else None
        steps = int(getattr(module, "warm_start_steps", 0) or 0)
        answered = self.correct_answers()
        pool = [i for i, p in enumerate(self.train_problems) if p.sample_id in answered]
        if steps <= 0 or not pool:
            return None
        return lambda step: pool if step < steps else None

    def train_dataloader(self) -> DataLoader:
        assert self.curriculum is not None, "call setup() first"
        dataset = ProblemList(self.train_problems)
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        sampler = CurriculumSampler(dataset, self.curriculum, self.batch_size, self.batches_per_epoch,
                                    self._global_step, num_replicas=world, rank=rank, seed=self.seed,
                                    pool=self._warm_start_pool())
        # num_workers 0: the sampler reads the trainer's step as each batch is drawn
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=collate_problems)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(ProblemList(self.val_problems), batch_size=self.batch_size, collate_fn=collate_problems)

    def transfer_batch_to_device(self, batch: list[Problem], device: Any, dataloader_idx: int) -> list[Problem]:
        return batch  # text: tokens are made on the device by the module
