"""Per-dataset counts of datagen records: closed thinking, accuracy, thinking tokens.

Shared by the datagen run (progress bar, summary, TensorBoard) and `llm-trm datagen --verify`
(computed from the stored records), so both report the same quantities the same way.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields
from typing import Any, Iterable

from .format import dataset_of


@dataclass
class DatasetCounts:
    """Counts over the records of one dataset (or of all of them)."""

    samples: int = 0
    closed: int = 0  # the LLM closed its thinking itself
    closed_known: int = 0  # records that say whether it did (imported seed data does not)
    checked: int = 0  # answers checked against a gold answer
    correct: int = 0
    thinking_tokens: int = 0
    thinking_known: int = 0  # records that carry num_thinking_tokens
    skipped_too_long: int = 0  # datagen only: problems whose prompt did not fit the context window

    def add_record(self, record: dict[str, Any]) -> None:
        self.samples += 1
        closed = record.get("closed_thinking")
        if isinstance(closed, bool):
            self.closed_known += 1
            self.closed += closed
        correct = record.get("correct")
        if isinstance(correct, bool):
            self.checked += 1
            self.correct += correct
        tokens = record.get("num_thinking_tokens")
        if isinstance(tokens, int) and not isinstance(tokens, bool):
            self.thinking_known += 1
            self.thinking_tokens += tokens

    def __iadd__(self, other: DatasetCounts) -> DatasetCounts:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_list(self) -> list[int]:
        return list(astuple(self))

    @property
    def forced_closes(self) -> int:
        return self.closed_known - self.closed

    @property
    def closed_share(self) -> float | None:
        return self.closed / self.closed_known if self.closed_known else None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.checked if self.checked else None

    @property
    def thinking_tokens_per_sample(self) -> float | None:
        return self.thinking_tokens / self.thinking_known if self.thinking_known else None

    def describe(self) -> str:
        """One line: samples, closed share, accuracy and thinking tokens per sample."""
        closed = "closed its thinking: unknown"
        if self.closed_share is not None:
            closed = f"closed its thinking {self.closed}/{self.closed_known} ({100 * self.closed_share:.1f}%)"
        accuracy = "accuracy n/a (no answers checked)"
        if self.accuracy is not None:
            accuracy = f"accuracy {self.correct}/{self.checked} ({100 * self.accuracy:.1f}%)"
        tokens = ""
        if self.thinking_tokens_per_sample is not None:
            tokens = f", {self.thinking_tokens_per_sample:.1f} thinking tokens per sample"
        return f"{self.samples} samples, {closed}, {accuracy}{tokens}"


def sum_counts(counts: dict[str, DatasetCounts]) -> DatasetCounts:
    result = DatasetCounts()
    for value in counts.values():
        result += value
    return result


def count_records(records: Iterable[dict[str, Any]]) -> dict[str, DatasetCounts]:
    """Counts per dataset (sorted by name)."""
    counts: dict[str, DatasetCounts] = {}
    for record in records:
        counts.setdefault(dataset_of(record), DatasetCounts()).add_record(record)
    return dict(sorted(counts.items()))
