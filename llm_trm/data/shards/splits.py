"""Held-out splits decided per sample id by a stable hash: independent of order and of the other ids."""

from __future__ import annotations

import hashlib
from typing import Sequence

from llm_trm.errors import DataError


def unit_hash(text: str, seed: int) -> float:
    """A number in [0, 1) fixed by `text` and `seed` alone (sha256), for splits and seeded draws."""
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def check_fractions(val_fraction: float, test_fraction: float = 0.0) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value <= 1.0:
            raise DataError(f"{name} must be in [0, 1], got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise DataError(
            f"val_fraction + test_fraction must be below 1 to leave a training split, got "
            f"{val_fraction} + {test_fraction}"
        )


def split_three_ways(
    ids: Sequence[str], val_fraction: float, test_fraction: float, seed: int = 0
) -> tuple[list[str], list[str], list[str]]:
    """Train / val / test by `unit_hash(id)`: val below `val_fraction`, test in the next `test_fraction`.

    Val is the same set `split_sample_ids` gives for the same `val_fraction`, so adding a test split
    only takes samples from train.
    """
    check_fractions(val_fraction, test_fraction)
    train, val, test = [], [], []
    for sample_id in ids:
        h = unit_hash(sample_id, seed)
        (val if h < val_fraction else test if h < val_fraction + test_fraction else train).append(sample_id)
    return train, val, test


def split_sample_ids(ids: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Train / val only (see `split_three_ways`)."""
    if not 0.0 <= val_fraction <= 1.0:
        raise DataError(f"val_fraction must be in [0, 1], got {val_fraction}")
    train, val = [], []
    for sample_id in ids:
        (val if unit_hash(sample_id, seed) < val_fraction else train).append(sample_id)
    return train, val
