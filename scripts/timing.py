"""A Lightning callback that times every training batch, shared by the bench scripts."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from lightning.pytorch.callbacks import Callback


class BatchClock(Callback):
    """Wall seconds of every training batch (the device synchronised before each reading) and, on CUDA,
    the batch's peak memory in GiB. `reset_peak(device)` starts each batch's peak-memory window
    (default: torch's reset; a caller can remember the previous window's peak first)."""

    def __init__(self, reset_peak: Callable[[torch.device], None] | None = None) -> None:
        self.seconds: list[float] = []
        self.peaks: list[float | None] = []
        self._start = 0.0
        self.reset_peak = reset_peak or torch.cuda.reset_peak_memory_stats

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
            self.reset_peak(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        cuda = pl_module.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(pl_module.device)
        self.seconds.append(time.perf_counter() - self._start)
        self.peaks.append(torch.cuda.max_memory_allocated(pl_module.device) / 2**30 if cuda else None)
