"""Export the best model of a fit as a Hugging Face style folder beside the run's logs.

The folder is written whole into a staging folder beside its target, checked (every tensor
finite), stamped with what selected it (`config.json` metadata `selection`), re-validated
when the module can (`score_export` -> `metrics.json`), and only then swapped in. A previous
export is moved aside, never deleted, and it stays in place when it was selected on the same
monitor, the same validation samples and the same frozen parts and scored better: the new
one is then written beside it, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from llm_trm.files import aside_path, atomic_write_text, fsync_dir, move_aside, sha256_file
from llm_trm.hub import load_torch_checkpoint
from llm_trm.models.pretrained import CONFIG_NAME
from llm_trm.weights import NonFiniteWeightsError, check_finite_folder

SELECTION_KEY = "selection"  # in config.json's metadata
METRICS_NAME = "metrics.json"
NONFINITE_ADVICE = ("nothing was exported and any existing export is untouched: lower the learning rate, or check "
                    "the training data for NaN/inf (llm-trm datagen --verify DIR).")
MONITOR_SPLITS = {"val": "val", "train": "train", "test": "test"}  # first part of a monitored tag -> its split


class ExportBestModel(Callback):
    """On train end, write the best checkpoint's model (or the final weights) as an export folder.

    Args:
        dirname: folder name inside the run's log dir (`runs/<name>/version_<n>/<dirname>`).
        path: a fixed folder instead (e.g. for a pipeline whose next step reads it).

    The LightningModule provides `export_pretrained(directory, state_dict=None) -> Path`, and
    optionally `score_export(directory) -> dict` (held-out metrics of the folder's weights,
    written as metrics.json) and `selection_context() -> dict` (what its monitored score
    depends on besides the validation samples, e.g. a frozen compressor's fingerprint).
    """

    def __init__(self, dirname: str = "export", path: str | None = None) -> None:
        self.dirname = dirname
        self.path = path
        self.exported_to: Path | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checkpoint_callback = trainer.checkpoint_callback
        best = getattr(checkpoint_callback, "best_model_path", "") if checkpoint_callback else ""
        # log_dir is a collective call under DDP: every rank asks, only rank 0 writes
        target = Path(self.path) if self.path else Path(trainer.log_dir or trainer.default_root_dir) / self.dirname
        if not trainer.is_global_zero:
            return
        checkpoint = load_torch_checkpoint(best) if best else None
        selection = selection_record(trainer, pl_module, best, checkpoint)
        state_dict = checkpoint["state_dict"] if checkpoint else None
        scorer = getattr(pl_module, "score_export", None)
        self.exported_to = write_export(target, lambda folder: pl_module.export_pretrained(folder, state_dict=state_dict),
                                        selection, scorer)
        source = f"best checkpoint {best}" if best else "final weights"
        rank_zero_info(f"Exported {type(pl_module).__name__} ({source}) to {self.exported_to}")


# ---------------------------------------------------------------------------- what selected the weights


def sample_ids_fingerprint(sample_ids: list[str] | None) -> str | None:
    """sha256 of the sorted sample ids of a split (None without ids): which samples a score was measured on."""
    if not sample_ids:
        return None
    return hashlib.sha256("\n".join(sorted(sample_ids)).encode()).hexdigest()


def selection_record(trainer: L.Trainer, pl_module: L.LightningModule, best: str,
                     checkpoint: dict[str, Any] | None) -> dict[str, Any]:
    """How the exported weights were chosen: the monitored score, its split and the samples it was measured on."""
    callback = trainer.checkpoint_callback if checkpoint is not None else None
    monitor = getattr(callback, "monitor", None)
    score = getattr(callback, "best_model_score", None)
    score = float(score) if score is not None else None
    val_ids = getattr(trainer.datamodule, "val_sample_ids", None) if trainer.datamodule is not None else None
    context = pl_module.selection_context() if hasattr(pl_module, "selection_context") else {}
    return {
        "source": "best checkpoint" if checkpoint is not None else "final weights",
        "checkpoint": str(best) if checkpoint is not None else None,
        "epoch": int(checkpoint["epoch"]) if checkpoint is not None else int(trainer.current_epoch),
        "global_step": int(checkpoint["global_step"]) if checkpoint is not None else int(trainer.global_step),
        "monitor": monitor,
        "mode": getattr(callback, "mode", None) if monitor else None,
        "score": score if score is not None and math.isfinite(score) else None,
        "split": MONITOR_SPLITS.get(monitor.split("/")[0]) if monitor else None,
        "val_samples": len(val_ids) if val_ids else None,
        "val_sample_ids_sha256": sample_ids_fingerprint(val_ids),
        "context": context,
    }


def read_selection(folder: Path) -> dict[str, Any] | None:
    """The selection record of an existing export, or None when it has none (or is not an export)."""
    try:
        metadata = json.loads((folder / CONFIG_NAME).read_text()).get("metadata") or {}
    except (OSError, ValueError, AttributeError):
        return None
    selection = metadata.get(SELECTION_KEY)
    return selection if isinstance(selection, dict) else None


def comparable(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Both scored on the same monitor and mode, the same validation samples and the same frozen parts."""
    keys = ("monitor", "mode", "split", "val_sample_ids_sha256")
    return (all(old.get(k) is not None and old.get(k) == new.get(k) for k in keys)
            and old.get("context", {}) == new.get("context", {})
            and isinstance(old.get("score"), (int, float)) and new.get("score") is not None)


def keeps_previous(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """True when the existing export was selected the same way and scored strictly better."""
    if old is None or not comparable(old, new):
        return False
    return old["score"] < new["score"] if new["mode"] == "min" else old["score"] > new["score"]


# ---------------------------------------------------------------------------- writing


def write_export(target: Path, write: Callable[[Path], Any], selection: dict[str, Any],
                 scorer: Callable[[Path], dict[str, Any]] | None = None) -> Path:
    """Write an export via a staging folder; return where it ended up (`target`, or beside it)."""
    staging = target.with_name(f".{target.name}.staging")
    if staging.exists():  # left by a run that died while exporting
        rank_zero_warn(f"moved an unfinished export aside: {move_aside(staging, 'unfinished')}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(staging)
        check_finite_folder(staging, NONFINITE_ADVICE)
        _stamp_selection(staging, selection)
        if scorer is not None:
            _write_metrics(staging, scorer(staging), selection)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # only this call's own staging folder: never an export
        raise
    previous = read_selection(target) if target.exists() else None
    if previous is not None and keeps_previous(previous, selection):
        beside = aside_path(target, "not-better")
        os.rename(staging, beside)
        fsync_dir(target.parent)
        rank_zero_warn(
            f"kept the export at {target}: it was selected on {selection['monitor']} over the same validation "
            f"samples and scored better ({previous['score']:.6g} vs {selection['score']:.6g}); "
            f"this run's export is at {beside}."
        )
        return beside
    if target.exists():
        rank_zero_info(f"moved the previous export aside: {move_aside(target, 'previous')}")
    os.rename(staging, target)
    fsync_dir(target.parent)
    return target


def _stamp_selection(folder: Path, selection: dict[str, Any]) -> None:
    config_path = folder / CONFIG_NAME
    payload = json.loads(config_path.read_text())
    payload.setdefault("metadata", {})[SELECTION_KEY] = selection
    atomic_write_text(config_path, json.dumps(payload, indent=2, sort_keys=True))


def _write_metrics(folder: Path, metrics: dict[str, Any], selection: dict[str, Any]) -> None:
    """metrics.json: the scores plus the sha256 of each weights file they were computed from."""
    weights = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*.safetensors"))}
    payload = {"weights_sha256": weights, SELECTION_KEY: selection, **metrics}
    try:
        text = json.dumps(payload, indent=2, sort_keys=True, allow_nan=False)
    except ValueError as err:
        raise NonFiniteWeightsError(f"re-validating the exported weights gave NaN/inf metrics: {NONFINITE_ADVICE}") \
            from err
    atomic_write_text(folder / METRICS_NAME, text)
