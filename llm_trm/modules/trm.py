"""TRMModule: Phase 2 training of the SequenceTRM on hidden-pair shards.

For each batch the frozen compressor maps the prompt states [B, L, D] and the state at
the closing think tag [B, D] to D'. The TRM then runs up to N_sup supervision steps;
each is one deep recursion, a loss (MSE to the target + halt_loss_weight x halt loss)
and, by default, its own optimizer step, scheduler step and EMA update, after which
the carried state y, z is detached. Samples whose halt probability passes 0.5 leave
the batch; the loop ends when none is left.

Choices worth knowing:

- The compressor is a registered but frozen submodule (no gradient, not in the
  optimizer): a checkpoint carries the exact compressor its TRM was trained against
  (D x D', small), so resuming and validating from a checkpoint use that one. Its
  source (path or Hub id) is recorded in the checkpoint and export metadata.
- The EMA (`AveragedModel` of the TRM only) is part of the state dict, so checkpoints
  restore it; validation and export use it.
- Under DDP all ranks run the same number of supervision steps (the loop stops when
  no rank has an active sample); a rank whose samples have all halted runs a
  zero-weight step so the gradient all-reduce still pairs up. Each step's loss is
  normalised by the number of active samples over all ranks.
- The adaptive halt threshold (BCE target and halting-accuracy reference) becomes
  0.95 x the epoch's mean final-step training cosine, summed over ranks. The running
  sums are checkpointed with the epoch they belong to, so a resume that skips the
  epoch-end hook applies the update at its first batch: resuming gives the same losses.
- Baselines (training mean, ridge on the mean-pooled prompt, last prompt token) are
  fitted on the training split and scored on the held-out split once, at fit start,
  by every rank over the full splits (identical on all ranks, no communication); they
  predict in D' and go through the same decompression as the TRM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from torchmetrics import CatMetric, MeanMetric

from llm_trm.data.shards import collate_hidden_pairs
from llm_trm.errors import ConfigMismatchError
from llm_trm.eval.figures import cosine_per_step, halting_histograms, log_figure
from llm_trm.eval.metrics import VectorQuality
from llm_trm.hub import METADATA_KEY, check_compatible, load_compressor
from llm_trm.models.baselines import MeanBaseline, RidgeBaseline
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.trm import SequenceTRM, TRMState
from llm_trm.modules.common import (FrozenBackboneMixin, NonFiniteGuard, manual_update, schedule_length,
                                    warmup_cosine)

HALT_DECISION = 0.5  # a sample halts once sigmoid(halt_logit) exceeds this
ADAPTIVE_THRESHOLD_FACTOR = 0.95  # the seed's curriculum: threshold = 0.95 x epoch mean cosine
BASELINES = ("mean", "ridge", "last_token")
HALTING_CHECKPOINT_KEY = "trm_halting"
TRAIN_EPOCH_MEANS = ("loss", "halt_prob", "steps_used", "halt_accuracy")


# ---------------------------------------------------------------------------- helpers


@dataclass
class StepTerms:
    """Per-sample terms of one supervision step (K active samples)."""

    mse: Tensor  # [K] mean squared error to the target, in D'
    halt: Tensor  # [K] halt loss
    cosine: Tensor  # [K] cosine to the target (detached)
    halt_prob: Tensor  # [K] sigmoid(halt_logit) (detached)

    @property
    def halted(self) -> Tensor:
        return self.halt_prob > HALT_DECISION


class BatchRecord:
    """What the supervision loop produced for each sample of one batch, for the metrics."""

    def __init__(self, batch_size: int, d_compressed: int, device: torch.device) -> None:
        self.prediction = torch.zeros(batch_size, d_compressed, device=device)
        self.halt_prob = torch.zeros(batch_size, device=device)
        self.steps_used = torch.zeros(batch_size, dtype=torch.long, device=device)
        sums = dict(dtype=torch.float64, device=device)
        self.loss_sum = torch.zeros((), **sums)
        self.mse_sum = torch.zeros((), **sums)
        self.halt_sum = torch.zeros((), **sums)
        self.halt_correct = torch.zeros((), **sums)
        self.sample_steps = 0

    def add(self, rows: Tensor, prediction: Tensor, terms: StepTerms, halt_weight: float, threshold: float) -> None:
        self.prediction[rows] = prediction.detach().float()
        self.halt_prob[rows] = terms.halt_prob
        self.steps_used[rows] += 1
        self.loss_sum += (terms.mse + halt_weight * terms.halt).detach().double().sum()
        self.mse_sum += terms.mse.detach().double().sum()
        self.halt_sum += terms.halt.detach().double().sum()
        self.halt_correct += (terms.halted == (terms.cosine > threshold)).double().sum()
        self.sample_steps += len(rows)

    def mean(self, total: Tensor) -> Tensor:
        return (total / max(1, self.sample_steps)).float()


def prompt_summaries(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean-pooled and last-token compressed prompt states, each [B, D'] (padding ignored)."""
    weights = mask.to(x.dtype)[..., None]
    pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1)
    last_index = mask.sum(1).clamp_min(1) - 1
    last = x[torch.arange(x.shape[0], device=x.device), last_index]
    return pooled, last


def _strip_prefix(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


# ---------------------------------------------------------------------------- module


class TRMModule(FrozenBackboneMixin, L.LightningModule):
    """Train a SequenceTRM to predict compress(post) from compress(pre) (Phase 2).

    Args:
        compressor_checkpoint: the Phase 1 compressor: export folder, `.ckpt` or Hub id
            (seed `--compressor_checkpoint`). Frozen.
        learning_rate: peak AdamW learning rate (seed `--learning_rate`).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warmup before cosine decay, in optimizer steps.
        n_layers, n_heads, mlp_ratio, dropout, use_positions, max_positions: the TRM's network.
        n_latent_steps: n, latent updates per recursion (seed `--n_latent_steps`).
        n_deep_recursions: T, recursions per supervision step (seed `--n_deep_recursions`).
        n_supervision_steps: N_sup (seed `--n_supervision_steps`).
        use_halting: train the halt head and let samples stop early (seed `--use_halting`).
        halt_threshold: initial cosine threshold of the BCE halt target (seed `--halt_threshold`).
        adaptive_halt_threshold: set the threshold to 0.95 x each epoch's mean training cosine.
        bce_halt_loss: BCE against cos > threshold instead of MSE to the cosine (seed `--bce_halt_loss`).
        halt_loss_weight: weight of the halt loss (seed `--halt_loss_weight`).
        per_step_updates: one optimizer step per supervision step (paper style); false sums
            the steps' losses into one update per batch (seed `--per_step_updates`).
        use_ema, ema_decay: exponential moving average of the TRM, used for validation and export.
        gradient_clip_val: max gradient norm (0 disables).
        max_nonfinite_steps: stop after this many NaN/inf batches or losses in a row.
        ridge_alpha: L2 penalty of the ridge baseline.
        first_token_backbone: load this backbone and report how often lm_head on the decompressed
            prediction gives the same first answer token as on the real state (needs layer -1 states).
        backbone_dtype, trust_remote_code: how that backbone is loaded.
        allow_unchecked_artifacts: accept a compressor that does not record its backbone, layer, D, D'.
    """

    def __init__(
        self,
        compressor_checkpoint: str = "anonx3247/llm-trm-compressor",
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        n_layers: int = 2,
        n_heads: int = 4,
        n_latent_steps: int = 6,
        n_deep_recursions: int = 3,
        n_supervision_steps: int = 8,
        use_positions: bool = False,
        max_positions: int = 4096,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        use_halting: bool = True,
        halt_threshold: float = 0.7,
        adaptive_halt_threshold: bool = True,
        bce_halt_loss: bool = False,
        halt_loss_weight: float = 0.5,
        per_step_updates: bool = True,
        use_ema: bool = True,
        ema_decay: float = 0.999,
        gradient_clip_val: float = 1.0,
        max_nonfinite_steps: int = 10,
        ridge_alpha: float = 1.0,
        first_token_backbone: str | None = None,
        backbone_dtype: str = "auto",
        trust_remote_code: bool = False,
        allow_unchecked_artifacts: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False  # several optimizer steps per batch
        self.compressor = self._frozen_compressor(compressor_checkpoint, allow_unchecked_artifacts)
        self.trm = SequenceTRM(
            self.compressor.d_compressed, n_layers=n_layers, n_heads=n_heads, n_latent_steps=n_latent_steps,
            n_deep_recursions=n_deep_recursions, n_supervision_steps=n_supervision_steps,
            use_positions=use_positions, mlp_ratio=mlp_ratio, dropout=dropout, max_positions=max_positions,
        )
        self.ema = self._make_ema(ema_decay) if use_ema else None
        self.guard = NonFiniteGuard(max_nonfinite_steps)
        self.halt_threshold = float(halt_threshold)
        # running sums of this epoch's final-step training cosines, and the epoch they belong to
        self.epoch_cosine_sum, self.epoch_cosine_count, self.epoch_of_sums = 0.0, 0, 0
        # the frozen LLM for the first-token metric (FrozenBackboneMixin); loaded on first use
        self.backbone = first_token_backbone or ""
        self.backbone_dtype, self.trust_remote_code = backbone_dtype, trust_remote_code
        self.baseline_results: dict[str, float] = {}
        self._make_metrics()

    # ---- construction ------------------------------------------------------------------
    @staticmethod
    def _frozen_compressor(spec: str, allow_unchecked: bool = False) -> DimensionCompressor:
        compressor = load_compressor(spec, allow_unchecked=allow_unchecked)
        return compressor.requires_grad_(False)  # no dropout or norm: train/eval mode changes nothing

    def _make_ema(self, decay: float) -> AveragedModel:
        ema = AveragedModel(self.trm, multi_avg_fn=get_ema_multi_avg_fn(decay))
        ema.requires_grad_(False)  # updated by hand; DDP must not wait for its gradients
        return ema

    def _make_metrics(self) -> None:
        d_compressed, d_model = self.compressor.d_compressed, self.compressor.d_model
        # reference means are filled at fit start (training mean) and saved with the weights
        for split in ("train", "val"):
            setattr(self, f"{split}_quality", VectorQuality(d_compressed, torch.zeros(d_compressed)))
            setattr(self, f"{split}_quality_full", VectorQuality(d_model, torch.zeros(d_model)))
        self.train_epoch_means = nn.ModuleDict({name: MeanMetric() for name in TRAIN_EPOCH_MEANS})
        self.val_step_cosine = nn.ModuleList(MeanMetric() for _ in range(self.hparams.n_supervision_steps))
        self.val_halt_prob, self.val_steps_used = MeanMetric(), MeanMetric()
        self.val_halt_accuracy, self.val_first_token_agreement = MeanMetric(), MeanMetric()
        # per-sample values for the halting histograms (a few floats per held-out sample)
        self.val_steps_used_values, self.val_halt_prob_values = CatMetric(), CatMetric()

    @property
    def eval_model(self) -> SequenceTRM:
        """The weights that are validated and exported: the EMA when enabled."""
        return self.ema.module if self.ema is not None else self.trm

    # ---- artifact metadata and compatibility -------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        source = self.compressor.metadata
        return {
            "d_model": self.compressor.d_model,
            "d_compressed": self.compressor.d_compressed,
            "compressor": self.hparams.compressor_checkpoint,
            "backbone": source.get("backbone"),
            "layer": source.get("layer"),
            "hidden_states": source.get("hidden_states"),
            "weights": "ema" if self.ema is not None else "final",
        }

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        hidden_size = getattr(datamodule, "hidden_size", None)
        if hidden_size is not None and hidden_size != self.compressor.d_model:
            raise ConfigMismatchError(
                f"the shards at {getattr(datamodule, 'data_path', '?')} hold D={hidden_size} hidden states but "
                f"compressor {self.hparams.compressor_checkpoint} expects D={self.compressor.d_model}: use the "
                "compressor trained on the datagen run's backbone and layer."
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[METADATA_KEY] = {**self.metadata, "architecture": self.trm.config()}
        checkpoint["nonfinite_guard"] = self.guard.state_dict()
        checkpoint[HALTING_CHECKPOINT_KEY] = {
            "threshold": self.halt_threshold,
            "epoch_cosine_sum": self.epoch_cosine_sum,
            "epoch_cosine_count": self.epoch_cosine_count,
            "epoch_of_sums": self.epoch_of_sums,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        found = checkpoint.get(METADATA_KEY, {})
        expected = {"d_model": self.compressor.d_model, "d_compressed": self.compressor.d_compressed}
        check_compatible("the checkpoint", found, expected)
        check_compatible("the checkpoint", found.get("architecture", {}), self.trm.config())
        self.guard.load_state_dict(checkpoint.get("nonfinite_guard", {}))
        halting = checkpoint.get(HALTING_CHECKPOINT_KEY, {})
        self.halt_threshold = float(halting.get("threshold", self.halt_threshold))
        self.epoch_cosine_sum = float(halting.get("epoch_cosine_sum", 0.0))
        self.epoch_cosine_count = int(halting.get("epoch_cosine_count", 0))
        self.epoch_of_sums = int(halting.get("epoch_of_sums", 0))

    def export_pretrained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write the EMA (or final) TRM as trm.safetensors + config.json, from `state_dict` if given."""
        prefix = "ema.module." if self.ema is not None else "trm."
        weights = _strip_prefix(self.state_dict() if state_dict is None else state_dict, prefix)
        trm = SequenceTRM(**self.trm.config())
        trm.load_state_dict(weights)
        return trm.save_pretrained(directory, metadata=self.metadata)

    # ---- optimization ------------------------------------------------------------------
    def total_optimizer_steps(self) -> int:
        """Optimizer steps the schedule spans: batches x N_sup with per-step updates (an upper
        bound when samples halt early), capped by trainer.max_steps (already in optimizer steps)."""
        per_batch = self.hparams.n_supervision_steps if self.hparams.per_step_updates else 1
        return schedule_length(self.trainer, per_batch)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.trm.parameters(), lr=self.hparams.learning_rate,
                                      weight_decay=self.hparams.weight_decay)
        total = self.total_optimizer_steps()
        scheduler = warmup_cosine(optimizer, min(self.hparams.warmup_steps, total // 2), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimize(self, loss: Tensor) -> None:
        """One update: backward, clip, optimizer and scheduler step, EMA update."""
        manual_update(self, loss, self.hparams.gradient_clip_val)
        if self.ema is not None:
            self.ema.update_parameters(self.trm)

    # ---- losses ------------------------------------------------------------------------
    @torch.no_grad()
    def compress_batch(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """(x [B, L, D'], mask [B, L], target [B, D']) in fp32: the frozen projection runs outside autocast."""
        with torch.autocast(self.device.type, enabled=False):
            x = self.compressor.compress(batch["pre"].float())
            target = self.compressor.compress(batch["post"].float())
        return x, batch["pre_mask"].bool(), target

    @torch.no_grad()
    def decompress(self, compressed: Tensor) -> Tensor:
        """[..., D'] -> [..., D] in fp32, for the full-space metrics."""
        with torch.autocast(self.device.type, enabled=False):
            return self.compressor.decompress(compressed.float())

    def halt_loss(self, halt_logit: Tensor, cosine: Tensor) -> Tensor:
        """Per-sample halt loss: MSE of the halt probability to the clamped cosine, or BCE vs cos > threshold."""
        if self.hparams.bce_halt_loss:
            target = (cosine > self.halt_threshold).float()
            return F.binary_cross_entropy_with_logits(halt_logit, target, reduction="none")
        return (torch.sigmoid(halt_logit) - cosine.clamp(0, 1)).pow(2)

    def halting_cosine(self, prediction: Tensor, target: Tensor) -> Tensor:
        """The quality the halt head learns to predict: cosine around the training mean of the targets.

        The seed used the raw cosine, but every target shares one dominant direction (raw cosine
        ~0.95 for the mean vector alone), so the halt head learned to stop at once whatever the
        prediction. Centred, a prediction is only "good" when it beats the mean.
        """
        centre = self.trm.target_mean.to(prediction.dtype)
        return F.cosine_similarity(prediction.detach() - centre, target - centre, dim=-1)

    def step_terms(self, prediction: Tensor, halt_logit: Tensor, target: Tensor) -> StepTerms:
        prediction, halt_logit = prediction.float(), halt_logit.float()
        cosine = self.halting_cosine(prediction, target)
        return StepTerms(
            mse=(prediction - target).pow(2).mean(-1),
            halt=self.halt_loss(halt_logit, cosine),
            cosine=cosine,
            halt_prob=torch.sigmoid(halt_logit.detach()),
        )

    @property
    def effective_halt_weight(self) -> float:
        # without halting the halt term stays in the graph with weight 0, so DDP sees every parameter used
        return self.hparams.halt_loss_weight if self.hparams.use_halting else 0.0

    # ---- training ----------------------------------------------------------------------
    def global_count(self, count: int) -> int:
        """Sum of `count` over DDP ranks (every rank must call it)."""
        if self.trainer.world_size == 1:
            return count
        total = self.trainer.strategy.reduce(torch.tensor(float(count), device=self.device), reduce_op="sum")
        return int(total.item())

    def supervise(self, x: Tensor, mask: Tensor, target: Tensor) -> BatchRecord | None:
        """The N_sup loop with per-sample halting; None when a non-finite loss was skipped."""
        hp = self.hparams
        state = self.trm.initial_state(x, mask)
        spare = state.select(torch.zeros(1, dtype=torch.long, device=x.device))  # for a rank with no one left
        rows = torch.arange(x.shape[0], device=x.device)  # batch rows still running
        record = BatchRecord(x.shape[0], self.trm.d_compressed, x.device)
        fused_losses: list[Tensor] = []
        for _ in range(hp.n_supervision_steps):
            active_everywhere = self.global_count(len(rows))
            if active_everywhere == 0:
                break
            new_state, prediction, halt_logit = self.trm.deep_recursion(state if len(rows) else spare)
            if len(rows):
                terms = self.step_terms(prediction, halt_logit, target[rows])
                # the all-reduced mean over ranks is then the mean over every active sample
                scale = self.trainer.world_size / active_everywhere
                loss = (terms.mse + self.effective_halt_weight * terms.halt).sum() * scale
            else:  # zero-weight step: keeps this rank's gradient all-reduce paired with the others
                loss = 0.0 * (prediction.float().sum() + halt_logit.float().sum())
            if hp.per_step_updates:
                if self.guard.should_skip(self, loss):
                    return None  # the state is non-finite too: drop the rest of the batch
                self.optimize(loss)
            else:
                fused_losses.append(loss)
            if len(rows):
                record.add(rows, prediction, terms, self.effective_halt_weight, self.halt_threshold)
                state, rows = self._continue_with(new_state, rows, terms)
        if fused_losses:
            loss = torch.stack(fused_losses).mean()
            if self.guard.should_skip(self, loss):
                return None
            self.optimize(loss)
        return record

    def _continue_with(self, state: TRMState, rows: Tensor, terms: StepTerms) -> tuple[TRMState, Tensor]:
        """Detach the carried state and keep only the samples that did not halt."""
        state = state.detach()
        if not self.hparams.use_halting:
            return state, rows
        keep = (~terms.halted).nonzero().squeeze(1)
        if len(keep) == len(rows):
            return state, rows
        return state.select(keep), rows[keep]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor] | None:
        self.settle_halt_threshold()
        x, mask, target = self.compress_batch(batch)
        # NaN/inf anywhere in the batch makes its largest magnitude non-finite
        if self.guard.should_skip(self, torch.stack([x.abs().amax(), target.abs().amax()])):
            record = None
        else:
            record = self.supervise(x, mask, target)
        self.log("train/nonfinite_steps", float(self.guard.skipped_total), on_step=True, on_epoch=False)
        if record is None:
            return None
        return self._log_training(record, target, batch["post"])

    def _log_training(self, record: BatchRecord, target: Tensor, post: Tensor) -> dict[str, Tensor]:
        prediction = record.prediction
        cosine = F.cosine_similarity(prediction, target, dim=-1)
        halting_cosine = self.halting_cosine(prediction, target)
        self.epoch_cosine_sum += float(halting_cosine.double().sum())  # drives the adaptive threshold
        self.epoch_cosine_count += len(cosine)
        self.train_quality.update(prediction, target)
        self.train_quality_full.update(self.decompress(prediction), post.float())
        loss = record.mean(record.loss_sum)
        values = {
            "loss": loss,
            "mse_loss": record.mean(record.mse_sum),
            "halt_loss": record.mean(record.halt_sum),
            "halt_accuracy": record.mean(record.halt_correct),
            "halt_prob": record.halt_prob.mean(),
            "steps_used": record.steps_used.float().mean(),
            "batch_cosine": cosine.mean(),
            "batch_centred_cosine": halting_cosine.mean(),
        }
        for name, metric in self.train_epoch_means.items():
            metric.update(values[name], weight=len(prediction))
        # per-rank step values, no collective: under DDP, Lightning computes epoch aggregates of
        # synced logs on rank 0 alone in the progress bar's epoch-end hook, which would deadlock
        self.log_dict({f"train/{name}": value for name, value in values.items()}, on_step=True, on_epoch=False)
        self.log("train/halt_threshold", self.halt_threshold, on_step=True, on_epoch=False)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], on_step=True, on_epoch=False)
        # final_cosine: the (centred) cosine whose epoch mean sets the adaptive halt threshold
        return {"loss": loss, "final_cosine": halting_cosine, "steps_used": record.steps_used}

    def on_train_epoch_end(self) -> None:
        self._log_quality("train/", self.train_quality.compute())
        self._log_quality("train/full_", self.train_quality_full.compute())
        self.train_quality.reset()
        self.train_quality_full.reset()
        for name, metric in self.train_epoch_means.items():  # synced by torchmetrics, on every rank
            self._log_synced(f"train/{name}_epoch", metric.compute())
            metric.reset()
        self.settle_halt_threshold(epoch_finished=True)

    # ---- adaptive halt threshold -------------------------------------------------------
    def settle_halt_threshold(self, epoch_finished: bool = False) -> None:
        """Apply a finished epoch's mean cosine to the threshold, exactly once.

        Normally at train epoch end; when a resume skipped that hook (checkpoint saved at
        the end-of-epoch validation), at the first batch of the next epoch instead.
        """
        finished = epoch_finished or self.epoch_of_sums < self.current_epoch
        if not finished:
            return
        if self.hparams.adaptive_halt_threshold:
            sums = torch.tensor([self.epoch_cosine_sum, float(self.epoch_cosine_count)], dtype=torch.float64,
                                device=self.device)
            cosine_sum, count = self.trainer.strategy.reduce(sums, reduce_op="sum").tolist()
            if count > 0:
                self.halt_threshold = ADAPTIVE_THRESHOLD_FACTOR * cosine_sum / count
        self.epoch_cosine_sum, self.epoch_cosine_count = 0.0, 0
        self.epoch_of_sums = self.current_epoch + 1 if epoch_finished else self.current_epoch

    # ---- validation --------------------------------------------------------------------
    @torch.no_grad()
    def unroll(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Every supervision step for every sample with the eval weights:
        predictions [S, B, D'] and halt probabilities [S, B]."""
        model = self.eval_model
        state = model.initial_state(x, mask)
        predictions, halt_probs = [], []
        for _ in range(model.n_supervision_steps):
            state, prediction, halt_logit = model.deep_recursion(state)
            predictions.append(prediction.float())
            halt_probs.append(torch.sigmoid(halt_logit.float()))
        return torch.stack(predictions), torch.stack(halt_probs)

    def stopping_step(self, halt_probs: Tensor) -> Tensor:
        """[B] index of the step each sample stops at: its first halt, else the last step (as in training)."""
        last = halt_probs.shape[0] - 1
        if not self.hparams.use_halting:
            return torch.full_like(halt_probs[0], last, dtype=torch.long)
        halts = halt_probs > HALT_DECISION
        return torch.where(halts.any(0), halts.int().argmax(0), last)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x, mask, target = self.compress_batch(batch)
        step_predictions, halt_probs = self.unroll(x, mask)
        stop = self.stopping_step(halt_probs)
        samples = torch.arange(len(target), device=target.device)
        prediction, halt_prob = step_predictions[stop, samples], halt_probs[stop, samples]
        step_cosines = F.cosine_similarity(step_predictions, target[None], dim=-1)  # [S, B]
        for metric, cosine in zip(self.val_step_cosine, step_cosines):
            metric.update(cosine)
        ran = torch.arange(len(step_cosines), device=stop.device)[:, None] <= stop[None]  # steps each sample ran
        halting_cosines = torch.stack([self.halting_cosine(p, target) for p in step_predictions])
        correct = (halt_probs > HALT_DECISION) == (halting_cosines > self.halt_threshold)
        self.val_halt_accuracy.update(correct[ran].float())
        self.val_halt_prob.update(halt_prob)
        self.val_steps_used.update((stop + 1).float())
        self.val_steps_used_values.update((stop + 1).float())
        self.val_halt_prob_values.update(halt_probs[ran])
        decompressed = self.decompress(prediction)
        self.val_quality.update(prediction, target)
        self.val_quality_full.update(decompressed, batch["post"].float())
        if self.hparams.first_token_backbone:
            self.val_first_token_agreement.update(self.first_token_agreement(decompressed, batch["post"]))
        self.log("val/loss", F.mse_loss(prediction, target), prog_bar=True, batch_size=len(target), sync_dist=True)

    def first_token_agreement(self, predicted: Tensor, real: Tensor) -> Tensor:
        """[B] 1 where lm_head gives the same greedy first answer token on both states."""
        head = self.llm.model.get_output_embeddings()
        if head.in_features != predicted.shape[-1]:
            raise ConfigMismatchError(
                f"first_token_backbone {self.backbone} has hidden size {head.in_features} but the shards hold "
                f"D={predicted.shape[-1]}: use the datagen run's backbone."
            )
        dtype = head.weight.dtype
        return (head(predicted.to(dtype)).argmax(-1) == head(real.to(dtype)).argmax(-1)).float()

    def on_validation_epoch_end(self) -> None:
        quality = self.val_quality.compute()
        self._log_quality("val/", quality, prog_bar=("cosine", "centred_cosine"))
        self._log_quality("val/full_", self.val_quality_full.compute())
        self.val_quality.reset()
        self.val_quality_full.reset()
        scalars = {f"val/cosine_step{step}": metric for step, metric in enumerate(self.val_step_cosine, start=1)}
        names = ("halt_prob", "steps_used", "halt_accuracy")
        names += ("first_token_agreement",) if self.hparams.first_token_backbone else ()
        scalars.update({f"val/{name}": getattr(self, f"val_{name}") for name in names})
        computed = {}
        for tag, metric in scalars.items():
            computed[tag] = metric.compute()
            self._log_synced(tag, computed[tag])
            metric.reset()
        self._log_synced("val/halt_threshold", self.halt_threshold)
        for name, value in self.baseline_results.items():
            self._log_synced(f"baseline/{name}", value)
        # shown beside the hyperparameters in TensorBoard's HPARAMS tab: the headline R^2
        self._log_synced("hp_metric", quality["explained_variance"])
        self._log_figures([computed[f"val/cosine_step{step}"] for step in range(1, len(self.val_step_cosine) + 1)])

    def _log_figures(self, step_cosines: list[Tensor]) -> None:
        """Cosine per supervision step against the baselines, and the halting histograms."""
        steps_used, halt_probs = self.val_steps_used_values.compute(), self.val_halt_prob_values.compute()
        self.val_steps_used_values.reset()
        self.val_halt_prob_values.reset()
        baselines = {name: self.baseline_results[f"{name}_cosine"] for name in BASELINES
                     if f"{name}_cosine" in self.baseline_results}
        log_figure(self.trainer, "val/cosine_per_step", lambda: cosine_per_step(step_cosines, baselines))
        log_figure(self.trainer, "val/halting", lambda: halting_histograms(
            steps_used, halt_probs, self.hparams.n_supervision_steps, halt_decision=HALT_DECISION))

    def _log_quality(self, prefix: str, values: dict[str, Tensor], prog_bar: tuple[str, ...] = ()) -> None:
        for name, value in values.items():
            self._log_synced(f"{prefix}{name}", value, prog_bar=name in prog_bar)

    def _log_synced(self, tag: str, value: Tensor | float, prog_bar: bool = False) -> None:
        # the value is already the same on every rank (synced metric or rank-identical); sync_dist
        # keeps Lightning's epoch-level bookkeeping identical across ranks too
        self.log(tag, value, prog_bar=prog_bar, sync_dist=True)

    # ---- baselines ---------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.fit_baselines()

    def _plain_loader(self, dataset: Any) -> DataLoader:
        datamodule = self.trainer.datamodule
        return DataLoader(dataset, batch_size=getattr(datamodule, "batch_size", 32), shuffle=False,
                          collate_fn=collate_hidden_pairs, num_workers=getattr(datamodule, "num_workers", 0))

    @torch.no_grad()
    def fit_baselines(self) -> None:
        """Fit the baselines and the training means on the train split; score the baselines on val."""
        datamodule = getattr(self.trainer, "datamodule", None)
        train_set, val_set = getattr(datamodule, "train_dataset", None), getattr(datamodule, "val_dataset", None)
        if train_set is None or val_set is None:
            rank_zero_warn("the datamodule exposes no train_dataset/val_dataset: no baselines, and R^2 and "
                           "centred cosine are taken around zero instead of the training mean.")
            return
        pooled, target, post_mean, token_mean, token_scale = self._training_statistics(self._plain_loader(train_set))
        target_mean = target.double().mean(0)
        self._set_reference_means(target_mean, post_mean)
        if not bool(self.trm.normalization_fitted):  # a resumed run keeps the statistics it trained with
            for trm in (self.trm, self.ema.module if self.ema is not None else None):
                if trm is not None:
                    trm.set_normalization(token_mean, token_scale, target_mean.float(), target.float().std(0))
        mean = MeanBaseline().fit(target)
        ridge = RidgeBaseline(self.hparams.ridge_alpha).fit(pooled, target)
        predictors: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
            "mean": lambda pooled, last: mean.predict(len(pooled)),
            "ridge": lambda pooled, last: ridge.predict(pooled),
            "last_token": lambda pooled, last: last,
        }
        self.baseline_results = self._score_baselines(predictors, self._plain_loader(val_set), target_mean, post_mean)
        rank_zero_info("Baselines on the held-out split: " + ", ".join(
            f"{name} {value:.4f}" for name, value in self.baseline_results.items() if name.endswith("cosine")))

    def _training_statistics(self, loader: DataLoader) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Mean-pooled prompts [N, D'] and targets [N, D'] (CPU fp32), the mean post state [D] (fp64),
        and the prompt tokens' mean [D'] and RMS spread around it (a scalar), for the TRM's normalisation."""
        pooled_rows, target_rows = [], []
        post_sum = torch.zeros(self.compressor.d_model, dtype=torch.float64)
        token_sum = torch.zeros(self.compressor.d_compressed, dtype=torch.float64)
        token_sq_sum, token_count = torch.zeros((), dtype=torch.float64), 0
        for batch in loader:
            batch = self._to_device(batch)
            x, mask, target = self.compress_batch(batch)
            pooled_rows.append(prompt_summaries(x, mask)[0].cpu())
            target_rows.append(target.cpu())
            post_sum += batch["post"].double().sum(0).cpu()
            tokens = x[mask].double().cpu()
            token_sum += tokens.sum(0)
            token_sq_sum += tokens.pow(2).sum()
            token_count += tokens.shape[0]
        target = torch.cat(target_rows)
        token_mean = token_sum / max(token_count, 1)
        spread = (token_sq_sum / max(token_count, 1) - token_mean.pow(2).sum()) / token_mean.numel()
        return (torch.cat(pooled_rows), target, post_sum / len(target), token_mean.float(),
                spread.clamp_min(0).sqrt().float())

    def _score_baselines(self, predictors: dict[str, Callable[[Tensor, Tensor], Tensor]], loader: DataLoader,
                         target_mean: Tensor, post_mean: Tensor) -> dict[str, float]:
        d_compressed, d_model = self.compressor.d_compressed, self.compressor.d_model
        # every rank scores the whole split itself, so there is nothing to synchronise
        quality = {name: (VectorQuality(d_compressed, target_mean, sync_on_compute=False),
                          VectorQuality(d_model, post_mean, sync_on_compute=False)) for name in predictors}
        for batch in loader:
            batch = self._to_device(batch)
            x, mask, target = self.compress_batch(batch)
            pooled, last = prompt_summaries(x, mask)
            for name, predict in predictors.items():
                prediction = predict(pooled.cpu(), last.cpu())
                quality[name][0].update(prediction, target.cpu())
                decompressed = self.decompress(prediction.to(self.device)).cpu()
                quality[name][1].update(decompressed, batch["post"].cpu())
        results: dict[str, float] = {}
        for name, (compressed, full) in quality.items():
            results.update({f"{name}_{key}": float(value) for key, value in compressed.compute().items()})
            results.update({f"{name}_full_{key}": float(value) for key, value in full.compute().items()})
        return results

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.trainer.strategy.batch_to_device(batch)

    def _set_reference_means(self, target_mean: Tensor, post_mean: Tensor) -> None:
        for split in ("train", "val"):
            getattr(self, f"{split}_quality").reference_mean.copy_(target_mean)
            getattr(self, f"{split}_quality_full").reference_mean.copy_(post_mean)
