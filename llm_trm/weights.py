"""Checks on trained weights before they are exported or shared: every tensor must be finite.

A NaN or inf in a weight or a normalisation buffer makes every prediction of the model
non-finite; such weights are never written as an export nor pushed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from llm_trm.errors import LLMTRMError

SHOWN_NAMES = 3  # how many broken tensors an error message names


class NonFiniteWeightsError(LLMTRMError, ValueError):
    """Weights hold NaN or inf values."""


def nonfinite_tensors(tensors: Mapping[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an inf, in the mapping's order."""
    return [name for name, value in tensors.items()
            if value.is_floating_point() and not bool(torch.isfinite(value).all())]


def _describe(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN_NAMES])
    return shown + (f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else "")


def check_finite(tensors: Mapping[str, Tensor], source: str, advice: str) -> None:
    """Raise one line naming the non-finite tensors of `source`, and `advice` (what to do)."""
    broken = nonfinite_tensors(tensors)
    if broken:
        raise NonFiniteWeightsError(f"{source} holds NaN/inf values in {_describe(broken)}: {advice}")


def check_finite_folder(folder: str | os.PathLike, advice: str) -> None:
    """Every tensor of every `*.safetensors` file under `folder` (subfolders included) is finite."""
    for path in sorted(Path(folder).rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        check_finite(tensors, str(path), advice)
