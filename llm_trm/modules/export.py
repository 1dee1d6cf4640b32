"""Export the best model of a fit as a Hugging Face style folder beside the run's logs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from llm_trm.hub import load_torch_checkpoint


class ExportBestModel(Callback):
    """On train end, write the best checkpoint's model (or the final weights) as an export folder.

    Args:
        dirname: folder name inside the run's log dir (`runs/<name>/version_<n>/<dirname>`).
        path: a fixed folder instead (e.g. for a pipeline whose next step reads it).

    The LightningModule provides `export_pretrained(directory, state_dict=None) -> Path`.
    """

    def __init__(self, dirname: str = "export", path: str | None = None) -> None:
        self.dirname = dirname
        self.path = path
        self.exported_to: Path | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if checkpoint else ""
        # log_dir is a collective call under DDP: every rank asks, only rank 0 writes
        target = Path(self.path) if self.path else Path(trainer.log_dir or trainer.default_root_dir) / self.dirname
        if not trainer.is_global_zero:
            return
        state_dict = load_torch_checkpoint(best)["state_dict"] if best else None
        self.exported_to = pl_module.export_pretrained(target, state_dict=state_dict)
        source = f"best checkpoint {best}" if best else "final weights"
        rank_zero_info(f"Exported {type(pl_module).__name__} ({source}) to {self.exported_to}")
