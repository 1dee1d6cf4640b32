"""Pieces shared by the LightningModules: the frozen backbone holder, the learning-rate
schedule, and an optimizer step that skips NaN/inf losses consistently on every DDP rank."""

from __future__ import annotations

import math
import warnings

import lightning as L
import torch
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from llm_trm.backbone import DEFAULT_ATTN_IMPLEMENTATION, Backbone, load_backbone
from llm_trm.errors import ConfigMismatchError, NonFiniteLossError


def schedule_length(trainer: L.Trainer, updates_per_batch: int = 1) -> int:
    """Optimizer steps a learning-rate schedule spans: batches x updates per batch, capped by
    `trainer.max_steps` (which Lightning counts in optimizer steps under manual optimization)."""
    total = trainer.estimated_stepping_batches * updates_per_batch
    if trainer.max_steps > 0:
        total = min(total, trainer.max_steps)
    if not math.isfinite(total):
        raise ConfigMismatchError("the learning-rate schedule needs a finite length: set trainer.max_epochs "
                                  "or trainer.max_steps.")
    return max(1, int(total))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.1) -> LambdaLR:
    """Linear warmup then cosine decay to `min_lr_ratio`, counted in optimizer steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def advance_schedule(scheduler: LRScheduler, position: int) -> None:
    """Move a step-wise scheduler forward to `position` (its step count) and apply the LR it gives there.

    For a module whose schedule follows batch progress while its optimizer steps a varying
    number of times per batch (the TRM's halted samples take fewer steps): it steps the
    scheduler with each update as usual, then jumps to the batch's end. Never moves back.
    """
    if position > scheduler.last_epoch:
        scheduler.last_epoch = position - 1
        with warnings.catch_warnings():  # a batch skipped whole (non-finite) moves on before any optimizer step
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            scheduler.step()


def manual_update(module: L.LightningModule, loss: Tensor, gradient_clip_val: float = 0.0) -> None:
    """One optimizer update under manual optimization: backward, clip, step, then the step-wise scheduler.

    `manual_backward` (not `loss.backward`) keeps DDP ranks in sync, and Lightning's own
    `gradient_clip_val` is not available with manual optimization, hence `clip_gradients`.
    """
    optimizer = module.optimizers()
    optimizer.zero_grad(set_to_none=True)
    module.manual_backward(loss)
    if gradient_clip_val:
        module.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm="norm")
    optimizer.step()
    module.lr_schedulers().step()


class FrozenBackboneMixin:
    """Keeps the frozen LLM out of the module's registered children (so it is never in a
    checkpoint nor in the DDP-wrapped parameters) and loads it on first use, on the module's device."""

    backbone: str
    backbone_dtype: str
    trust_remote_code: bool
    attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION
    _llm: Backbone | None = None

    @property
    def llm(self) -> Backbone:
        if self._llm is None:
            self._llm = load_backbone(self.backbone, self.backbone_dtype, self.trust_remote_code,
                                      self.attn_implementation)
        device = self.device  # type: ignore[attr-defined]
        if self._llm.device != device:
            self._llm.to(device)
        return self._llm


class NonFiniteGuard:
    """Counts skipped steps; raises after `max_in_a_row` consecutive non-finite losses."""

    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row
        self.skipped_total = 0
        self.in_a_row = 0

    def should_skip(self, module: L.LightningModule, loss: Tensor) -> bool:
        finite = bool(torch.isfinite(loss.detach()).all())
        # every rank must agree, or DDP's gradient all-reduce would hang
        all_finite = module.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if all_finite:
            self.in_a_row = 0
            return False
        self.skipped_total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteLossError(
                f"{self.in_a_row} non-finite losses in a row (step {module.global_step}): lower the learning "
                "rate, check the data for NaN/inf, or raise max_nonfinite_steps."
            )
        return True

    def state_dict(self) -> dict[str, int]:
        return {"skipped_total": self.skipped_total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped_total = int(state.get("skipped_total", 0))
        self.in_a_row = int(state.get("in_a_row", 0))
