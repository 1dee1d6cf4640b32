"""TRMModule: Phase 2 training of the SequenceTRM on hidden-pair shards.

For each batch the frozen compressor maps the prompt states [B, L, D] and the state at
the closing think tag [B, D] to D' (with `n_reasoning_tokens` m > 1: the last m of the
batch's `post_states` [B, m, D], the states of the last m thinking positions, each
predicted at its own reasoning token). The TRM then runs up to N_sup supervision steps;
each is one deep recursion, a loss (MSE to the target + halt_loss_weight x halt loss)
and, by default, its own optimizer step and EMA update, after which the carried state
y, z is detached. Samples whose halt probability passes 0.5 leave the batch; the loop
ends when none is left.

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
- The learning-rate schedule follows batch progress: each batch spans N_sup schedule
  steps (one per supervision step, as without halting); the scheduler steps with each
  update and then jumps to the batch's end, so early halting (fewer updates) does not
  stretch the schedule past the end of training.
- Baselines (training mean, ridge on the mean-pooled prompt, last prompt token) are
  fitted on the training split and scored on the validation and test splits once, at
  fit (or test) start, by every rank (identical on all ranks, no communication), from
  the datamodule's `summaries(split)`: per-sample pooled / last prompt states and
  targets, which the frozen linear compressor maps to D'. The TRM's normalisation
  statistics come from the same summaries. They predict in D' and go through the same
  decompression as the TRM.
- Model selection uses the validation split; the test split (`test_step`) is only
  reported. `score_export` re-validates exported weights on both (metrics.json).
- With m > 1 target states the loss is the MSE over all m; cosine, centred cosine, R^2 and
  the other quality metrics are computed per state and averaged (same names as with m = 1),
  and the last state's (the closing tag's, comparable with m = 1) are reported as `last_*`;
  every baseline predicts every state (the last-token baseline repeats the last prompt state).
  The halt head learns the centred cosine averaged over the m states.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from torchmetrics import CatMetric, MeanMetric, Metric

from llm_trm.errors import ConfigMismatchError, DataError
from llm_trm.eval.figures import cosine_per_step, halting_histograms, log_figure
from llm_trm.eval.metrics import VectorQuality
from llm_trm.hub import METADATA_KEY, check_compatible, load_compressor, strip_prefix
from llm_trm.models.baselines import MeanBaseline, RidgeBaseline
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.trm import HALT_DECISION, SequenceTRM, TRMState, closing_state
from llm_trm.modules.common import (FrozenBackboneMixin, NonFiniteGuard, advance_schedule, manual_update,
                                    schedule_length, warmup_cosine)
from llm_trm.modules.export import sample_ids_fingerprint

ADAPTIVE_THRESHOLD_FACTOR = 0.95  # the seed's curriculum: threshold = 0.95 x epoch mean cosine
BASELINES = ("mean", "ridge", "last_token")
HALTING_CHECKPOINT_KEY = "trm_halting"
TRAIN_EPOCH_MEANS = ("loss", "halt_prob", "steps_used", "halt_accuracy")
HELD_OUT_MEANS = ("halt_prob", "steps_used", "halt_accuracy")
HELD_OUT_PROG_BAR = ("loss", "cosine", "centred_cosine")
# split -> its role: the validation split selects the weights, the test split is only reported
HELD_OUT_SPLITS = {"val": "selection", "test": "report"}


# ---------------------------------------------------------------------------- helpers


@dataclass
class StepTerms:
    """Per-sample terms of one supervision step (K active samples)."""

    mse: Tensor  # [K] mean squared error to the target, in D'
    halt: Tensor  # [K] halt loss
    cosine: Tensor  # [K] cosine to the target (detached)
    halt_prob: Tensor  # [K] sigmoid(halt_logit) (detached)
    halted: Tensor  # [K] SequenceTRM.halts: the sample stops here


class BatchRecord:
    """What the supervision loop produced for each sample of one batch, for the metrics."""

    def __init__(self, batch_size: int, prediction_shape: tuple[int, ...], device: torch.device) -> None:
        self.prediction = torch.zeros(batch_size, *prediction_shape, device=device)
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


def per_sample(values: Tensor, batch_dims: int = 1) -> Tensor:
    """Per-sample values from per-state ones: [..., m] -> [...] (the mean over the m target states);
    values with only `batch_dims` dimensions (one target state) are returned as they are."""
    return values.mean(-1) if values.ndim > batch_dims else values


class StatesQuality(nn.Module):
    """VectorQuality for m target states: one metric per state; `compute()` gives every metric averaged
    over the states (the names VectorQuality uses) and the last state's under `last_<name>`."""

    def __init__(self, dim: int, n_states: int, **kwargs: Any) -> None:
        super().__init__()
        self.states = nn.ModuleList(VectorQuality(dim, torch.zeros(dim), **kwargs) for _ in range(n_states))

    def set_reference_mean(self, mean: Tensor) -> None:
        """[m, dim]: each state's reference (training) mean."""
        for metric, state_mean in zip(self.states, mean):
            metric.reference_mean.copy_(state_mean)

    @property
    def reference_mean(self) -> Tensor:
        return torch.stack([metric.reference_mean for metric in self.states])

    @property
    def rows(self) -> Tensor:
        return self.states[0].rows

    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred, target: [B, m, dim]."""
        for index, metric in enumerate(self.states):
            metric.update(pred[:, index], target[:, index])

    def compute(self) -> dict[str, Tensor]:
        per_state = [metric.compute() for metric in self.states]
        values = {name: torch.stack([state[name] for state in per_state]).mean() for name in per_state[0]}
        values.update({f"last_{name}": value for name, value in per_state[-1].items()})
        return values

    def reset(self) -> None:
        for metric in self.states:
            metric.reset()


def vector_quality(dim: int, n_states: int, reference_mean: Tensor | None = None,
                   **kwargs: Any) -> VectorQuality | StatesQuality:
    """The quality metric of predictions with `n_states` target states: VectorQuality for one (its names and
    state-dict keys unchanged), StatesQuality for m > 1."""
    if n_states == 1:
        return VectorQuality(dim, torch.zeros(dim) if reference_mean is None else reference_mean, **kwargs)
    metric = StatesQuality(dim, n_states, **kwargs)
    if reference_mean is not None:
        metric.set_reference_mean(reference_mean.expand(n_states, dim))
    return metric


def set_reference_mean(metric: VectorQuality | StatesQuality, mean: Tensor) -> None:
    if isinstance(metric, StatesQuality):
        metric.set_reference_mean(mean)
    else:
        metric.reference_mean.copy_(mean)


def _upgrade_metric_keys(state_dict: dict[str, Tensor]) -> None:
    """Checkpoints written before the test split kept the validation reference means under
    `val_quality*`: rename them, and give the test metrics the same (training) reference means."""
    for old, new in (("val_quality_full.", "val_metrics.quality_full."), ("val_quality.", "val_metrics.quality.")):
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[new + key[len(old):]] = state_dict.pop(key)
    for key in [k for k in state_dict if k.startswith("val_metrics.")]:
        state_dict.setdefault("test_metrics." + key[len("val_metrics."):], state_dict[key])


@dataclass
class ScoredBatch:
    """One held-out batch run through every supervision step with one set of TRM weights."""

    step_predictions: Tensor  # [S, B, D'] (or [S, B, m, D']) the prediction after each step
    halt_probs: Tensor  # [S, B]
    stop: Tensor  # [B] index of the step each sample stops at
    halt_correct: Tensor  # [S, B] whether the halt decision agreed with cosine > threshold
    target: Tensor  # [B, D'] (or [B, m, D'])
    decompressed: Tensor  # [B, D] (or [B, m, D]) the stopping prediction in full space
    post: Tensor  # [B, D] (or [B, m, D]) the real state(s)
    first_token_agreement: Tensor | None = None  # [B]

    @property
    def ran(self) -> Tensor:
        """[S, B] the steps each sample ran (up to and including its stopping step)."""
        steps = torch.arange(len(self.step_predictions), device=self.stop.device)[:, None]
        return steps <= self.stop[None]

    @property
    def prediction(self) -> Tensor:
        return self.step_predictions[self.stop, torch.arange(len(self.stop), device=self.stop.device)]

    @property
    def halt_prob(self) -> Tensor:
        return self.halt_probs[self.stop, torch.arange(len(self.stop), device=self.stop.device)]


class HeldOutMetrics(nn.Module):
    """The metrics of one held-out split (validation or test), accumulated over its batches.

    Names (`compute()` keys): the VectorQuality metrics in D' (`cosine`, ...) and in D
    (`full_cosine`, ...), `loss` (the MSE in D', which model selection monitors),
    `cosine_step{k}` for every supervision step, `halt_prob`, `steps_used`, `halt_accuracy`
    and, with a first-token backbone, `first_token_agreement`. With m > 1 target states the
    quality metrics are averaged over the states and the last state's come as `last_*`
    (`last_cosine`, `full_last_explained_variance`, ...); the first token is the last state's.
    """

    def __init__(self, d_compressed: int, d_model: int, n_supervision_steps: int, first_token: bool = False,
                 sync_on_compute: bool = True, n_states: int = 1) -> None:
        super().__init__()
        sync = {"sync_on_compute": sync_on_compute}
        # reference means are filled at fit start (the training means) and saved with the weights
        self.quality = vector_quality(d_compressed, n_states, **sync)
        self.quality_full = vector_quality(d_model, n_states, **sync)
        self.step_cosine = nn.ModuleList(MeanMetric(**sync) for _ in range(n_supervision_steps))
        names = HELD_OUT_MEANS + (("first_token_agreement",) if first_token else ())
        self.means = nn.ModuleDict({name: MeanMetric(**sync) for name in names})
        # per-sample values for the halting histograms (a few floats per held-out sample)
        self.steps_used_values, self.halt_prob_values = CatMetric(**sync), CatMetric(**sync)

    def set_reference_means(self, target_mean: Tensor, post_mean: Tensor) -> None:
        set_reference_mean(self.quality, target_mean)
        set_reference_mean(self.quality_full, post_mean)

    def update(self, scored: ScoredBatch) -> None:
        # [S, B]: with m target states, each sample's cosine averaged over them
        step_cosines = per_sample(F.cosine_similarity(scored.step_predictions, scored.target[None], dim=-1), 2)
        for metric, cosine in zip(self.step_cosine, step_cosines):
            metric.update(cosine)
        ran = scored.ran
        self.means["halt_accuracy"].update(scored.halt_correct[ran].float())
        self.means["halt_prob"].update(scored.halt_prob)
        self.means["steps_used"].update((scored.stop + 1).float())
        if scored.first_token_agreement is not None and "first_token_agreement" in self.means:
            self.means["first_token_agreement"].update(scored.first_token_agreement)
        self.steps_used_values.update((scored.stop + 1).float())
        self.halt_prob_values.update(scored.halt_probs[ran])
        self.quality.update(scored.prediction, scored.target)
        self.quality_full.update(scored.decompressed, scored.post.float())

    def compute(self) -> dict[str, Tensor]:
        values = dict(self.quality.compute())
        values["loss"] = values["mse"]
        values.update({f"full_{name}": value for name, value in self.quality_full.compute().items()})
        values.update({f"cosine_step{step}": metric.compute() for step, metric in enumerate(self.step_cosine, 1)})
        values.update({name: metric.compute() for name, metric in self.means.items()})
        return values

    def histogram_values(self) -> tuple[Tensor, Tensor]:
        """Steps used per sample and the halt probabilities of every step run."""
        return self.steps_used_values.compute(), self.halt_prob_values.compute()

    def reset(self) -> None:
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()


@dataclass
class CompressedSummaries:
    """A split's PairSummaries (see the DataModule) mapped into D' by the frozen linear compressor."""

    pooled: Tensor  # [N, D'] compress(mean of pre) == mean of compress(pre)
    last: Tensor  # [N, D'] the last prompt token
    target: Tensor  # [N, D'] compress(post), or [N, m, D'] compress(the last m post_states)
    post: Tensor  # [N, D] (or [N, m, D]) fp32: the target in full space
    token_mean: Tensor  # [D'] fp64, compress(mean over every prompt token)
    token_scale: Tensor  # scalar fp64, RMS spread of the sampled prompt tokens around token_mean

    def __len__(self) -> int:
        return len(self.target)


# ---------------------------------------------------------------------------- module


class TRMModule(FrozenBackboneMixin, L.LightningModule):
    """Train a SequenceTRM to predict compress(post) from compress(pre) (Phase 2).

    Args:
        compressor_checkpoint: the Phase 1 compressor: export folder, `.ckpt` or Hub id
            (seed `--compressor_checkpoint`). Frozen.
        learning_rate: peak AdamW learning rate (seed `--learning_rate`).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warmup before cosine decay, in schedule steps (optimizer steps without
            halting; each batch spans N_sup of them with per-step updates, whatever its samples' halting).
        n_layers, n_heads, mlp_ratio, dropout, use_positions, max_positions: the TRM's network.
        n_latent_steps: n, latent updates per recursion (seed `--n_latent_steps`).
        n_deep_recursions: T, recursions per supervision step (seed `--n_deep_recursions`).
        n_supervision_steps: N_sup (seed `--n_supervision_steps`).
        n_reasoning_tokens: m, reasoning tokens and predicted states: 1 predicts the state at the closing
            tag (the seed's target); m > 1 predicts the last m thinking states (the shards must store at
            least m: datagen `--model.num_post_states`).
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
        backbone_dtype, trust_remote_code, attn_implementation: how that backbone is loaded.
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
        n_reasoning_tokens: int = 1,
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
        attn_implementation: str = "sdpa",
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
            n_reasoning_tokens=n_reasoning_tokens,
        )
        self.ema = self._make_ema(ema_decay) if use_ema else None
        self.guard = NonFiniteGuard(max_nonfinite_steps)
        self.halt_threshold = float(halt_threshold)
        # running sums of this epoch's final-step training cosines, and the epoch they belong to
        self.epoch_cosine_sum, self.epoch_cosine_count, self.epoch_of_sums = 0.0, 0, 0
        # the frozen LLM for the first-token metric (FrozenBackboneMixin); loaded on first use
        self.backbone = first_token_backbone or ""
        self.backbone_dtype, self.trust_remote_code = backbone_dtype, trust_remote_code
        self.attn_implementation = attn_implementation
        self.baseline_results: dict[str, dict[str, float]] = {}  # split -> baseline metrics
        self._warned_no_summaries = False
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
        self.train_quality = vector_quality(d_compressed, self.n_states)
        self.train_quality_full = vector_quality(d_model, self.n_states)
        self.train_epoch_means = nn.ModuleDict({name: MeanMetric() for name in TRAIN_EPOCH_MEANS})
        self.val_metrics = self.held_out_metrics()
        self.test_metrics = self.held_out_metrics()

    def held_out_metrics(self, sync_on_compute: bool = True) -> HeldOutMetrics:
        """A fresh set of held-out metrics (synced across DDP ranks unless told otherwise)."""
        return HeldOutMetrics(self.compressor.d_compressed, self.compressor.d_model, self.hparams.n_supervision_steps,
                              first_token=bool(self.hparams.first_token_backbone), sync_on_compute=sync_on_compute,
                              n_states=self.n_states)

    @property
    def n_states(self) -> int:
        """m: the end-of-thinking states the TRM predicts (one per reasoning token)."""
        return self.trm.n_reasoning_tokens

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
            "n_states": self.n_states,  # m: predicted end-of-thinking states; an adapter must take as many
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
        stored = getattr(datamodule, "num_post_states", None)
        if stored is not None:
            self.check_stored_states(stored, f"the shards at {getattr(datamodule, 'data_path', '?')}")

    def check_stored_states(self, stored: int, source: str) -> None:
        """The TRM trains on the last m stored end-of-thinking states: the shards must hold at least m."""
        if stored < self.n_states:
            raise ConfigMismatchError(
                f"{source} hold {stored} end-of-thinking state(s) per sample but the TRM predicts "
                f"n_reasoning_tokens={self.n_states}: rerun `llm-trm datagen` with --model.num_post_states "
                f"{self.n_states} (or more), or lower n_reasoning_tokens."
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

    def selection_context(self) -> dict[str, Any]:
        """What the validation loss depends on besides the samples (ExportBestModel compares exports
        only when it matches): the compressor defines the space the loss is measured in."""
        weight = self.compressor.weight.detach().float().cpu().contiguous()
        return {"compressor_sha256": hashlib.sha256(weight.numpy().tobytes()).hexdigest()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _upgrade_metric_keys(checkpoint.get("state_dict", {}))
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
        weights = strip_prefix(self.state_dict() if state_dict is None else state_dict, prefix)
        trm = SequenceTRM(**self.trm.config())
        trm.load_state_dict(weights)
        return trm.save_pretrained(directory, metadata=self.metadata)

    # ---- optimization ------------------------------------------------------------------
    @property
    def schedule_steps_per_batch(self) -> int:
        """Schedule steps one batch spans: N_sup with per-step updates (one per supervision step), else 1."""
        return self.hparams.n_supervision_steps if self.hparams.per_step_updates else 1

    def total_schedule_steps(self) -> int:
        """Length of the LR schedule: batches x steps per batch, capped by trainer.max_steps.

        Without halting this is the number of optimizer steps. With halting a batch takes
        fewer updates, and the schedule still advances by a whole batch (`advance_schedule`),
        so it ends with the last batch. (max_steps counts optimizer steps, so with halting
        the schedule may end before max_steps is reached, never after.)
        """
        return schedule_length(self.trainer, self.schedule_steps_per_batch)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.trm.parameters(), lr=self.hparams.learning_rate,
                                      weight_decay=self.hparams.weight_decay)
        total = self.total_schedule_steps()
        scheduler = warmup_cosine(optimizer, min(self.hparams.warmup_steps, total // 2), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimize(self, loss: Tensor) -> None:
        """One update: backward, clip, optimizer step, one scheduler step, EMA update."""
        manual_update(self, loss, self.hparams.gradient_clip_val)
        if self.ema is not None:
            self.ema.update_parameters(self.trm)

    # ---- losses ------------------------------------------------------------------------
    def full_target(self, batch: dict[str, Any], source: str = "the batch's post_states") -> Tensor:
        """The real state(s) the TRM predicts, in D: `post` [B, D], or with m > 1 the last m of `post_states`."""
        if self.n_states == 1:
            return batch["post"]
        post_states = batch.get("post_states")
        stored = 1 if post_states is None else post_states.shape[1]
        self.check_stored_states(stored, source)
        return post_states[:, -self.n_states :]

    @torch.no_grad()
    def compress_batch(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """(x [B, L, D'], mask [B, L], target [B, D'] or [B, m, D']) in fp32: the frozen projection runs
        outside autocast."""
        with torch.autocast(self.device.type, enabled=False):
            x = self.compressor.compress(batch["pre"].float())
            target = self.compressor.compress(self.full_target(batch).float())
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

    def halting_cosine(self, prediction: Tensor, target: Tensor, model: SequenceTRM | None = None) -> Tensor:
        """The quality the halt head learns to predict: cosine around the training mean of the targets
        (the one `model`, by default the trained TRM, was normalised with); [B], averaged over the target
        states when there are m > 1.

        The seed used the raw cosine, but every target shares one dominant direction (raw cosine
        ~0.95 for the mean vector alone), so the halt head learned to stop at once whatever the
        prediction. Centred, a prediction is only "good" when it beats the mean.
        """
        centre = (self.trm if model is None else model).target_mean.to(prediction.dtype)
        return per_sample(F.cosine_similarity(prediction.detach() - centre, target - centre, dim=-1))

    def step_terms(self, prediction: Tensor, halt_logit: Tensor, target: Tensor) -> StepTerms:
        prediction, halt_logit = prediction.float(), halt_logit.float()
        cosine = self.halting_cosine(prediction, target)
        return StepTerms(
            mse=(prediction - target).pow(2).flatten(1).mean(1),  # over the m states too
            halt=self.halt_loss(halt_logit, cosine),
            cosine=cosine,
            halt_prob=torch.sigmoid(halt_logit.detach()),
            halted=self.trm.halts(halt_logit.detach()),
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
        record = BatchRecord(x.shape[0], self.trm.prediction_shape, x.device)
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
        scheduler = self.lr_schedulers()
        batch_start = scheduler.last_epoch
        x, mask, target = self.compress_batch(batch)
        # NaN/inf anywhere in the batch makes its largest magnitude non-finite
        if self.guard.should_skip(self, torch.stack([x.abs().amax(), target.abs().amax()])):
            record = None
        else:
            record = self.supervise(x, mask, target)
        # the schedule follows batch progress: halted samples (or a skipped batch) took fewer updates
        advance_schedule(scheduler, batch_start + self.schedule_steps_per_batch)
        self.log("train/nonfinite_steps", float(self.guard.skipped_total), on_step=True, on_epoch=False)
        if record is None:
            return None
        return self._log_training(record, target, self.full_target(batch))

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

    # ---- held-out splits: validation (selection) and test (report) ---------------------
    @torch.no_grad()
    def unroll(self, model: SequenceTRM, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Every supervision step for every sample with `model`: predictions [S, B, D'] (or [S, B, m, D'])
        and halt logits [S, B]."""
        state = model.initial_state(x, mask)
        predictions, halt_logits = [], []
        for _ in range(model.n_supervision_steps):
            state, prediction, halt_logit = model.deep_recursion(state)
            predictions.append(prediction.float())
            halt_logits.append(halt_logit.float())
        return torch.stack(predictions), torch.stack(halt_logits)

    def stopping_step(self, halts: Tensor) -> Tensor:
        """[B] index of the step each sample stops at: its first halt, else the last step (as in training)."""
        last = halts.shape[0] - 1
        if not self.hparams.use_halting:
            return torch.full_like(halts[0], last, dtype=torch.long)
        return torch.where(halts.any(0), halts.int().argmax(0), last)

    @torch.no_grad()
    def score_batch(self, model: SequenceTRM, batch: dict[str, Any]) -> ScoredBatch:
        """Run `model` over a held-out batch; what every held-out metric is computed from."""
        x, mask, target = self.compress_batch(batch)
        step_predictions, halt_logits = self.unroll(model, x, mask)
        halts, halt_probs = model.halts(halt_logits), torch.sigmoid(halt_logits)
        stop = self.stopping_step(halts)
        halting_cosines = torch.stack([self.halting_cosine(p, target, model) for p in step_predictions])
        decompressed = self.decompress(step_predictions[stop, torch.arange(len(stop), device=stop.device)])
        post = self.full_target(batch)
        # the first answer token is predicted from the closing tag's state: the last of m
        agreement = (self.first_token_agreement(closing_state(decompressed), closing_state(post))
                     if self.hparams.first_token_backbone else None)
        return ScoredBatch(
            step_predictions=step_predictions, halt_probs=halt_probs, stop=stop,
            halt_correct=halts == (halting_cosines > self.halt_threshold),
            target=target, decompressed=decompressed, post=post, first_token_agreement=agreement,
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.val_metrics.update(self.score_batch(self.eval_model, batch))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.test_metrics.update(self.score_batch(self.eval_model, batch))

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
        values = self._log_held_out("val/", self.val_metrics)
        self._log_synced("val/halt_threshold", self.halt_threshold)
        for name, value in self.baseline_results.get("val", {}).items():
            self._log_synced(f"baseline/{name}", value)
        # shown beside the hyperparameters in TensorBoard's HPARAMS tab: the headline R^2
        self._log_synced("hp_metric", values["explained_variance"])
        self._log_figures([values[f"cosine_step{step}"] for step in range(1, self.hparams.n_supervision_steps + 1)])
        self.val_metrics.reset()

    def on_test_epoch_end(self) -> None:
        self._log_held_out("test/", self.test_metrics)
        self._log_synced("test/halt_threshold", self.halt_threshold)
        for name, value in self.baseline_results.get("test", {}).items():
            self._log_synced(f"test/baseline/{name}", value)
        self.test_metrics.reset()

    def _log_held_out(self, prefix: str, metrics: HeldOutMetrics) -> dict[str, Tensor]:
        values = metrics.compute()
        for name, value in values.items():
            self._log_synced(f"{prefix}{name}", value, prog_bar=prefix == "val/" and name in HELD_OUT_PROG_BAR)
        return values

    def _log_figures(self, step_cosines: list[Tensor]) -> None:
        """Cosine per supervision step against the baselines, and the halting histograms."""
        steps_used, halt_probs = self.val_metrics.histogram_values()
        baselines = {name: self.baseline_results["val"][f"{name}_cosine"] for name in BASELINES
                     if f"{name}_cosine" in self.baseline_results.get("val", {})}
        log_figure(self.trainer, "val/cosine_per_step", lambda: cosine_per_step(step_cosines, baselines))
        log_figure(self.trainer, "val/halting", lambda: halting_histograms(
            steps_used, halt_probs, self.hparams.n_supervision_steps, halt_decision=HALT_DECISION))  # the line drawn: SequenceTRM.halts' threshold

    def _log_quality(self, prefix: str, values: dict[str, Tensor], prog_bar: tuple[str, ...] = ()) -> None:
        for name, value in values.items():
            self._log_synced(f"{prefix}{name}", value, prog_bar=name in prog_bar)

    def _log_synced(self, tag: str, value: Tensor | float, prog_bar: bool = False) -> None:
        # the value is already the same on every rank (synced metric or rank-identical); sync_dist
        # keeps Lightning's epoch-level bookkeeping identical across ranks too
        self.log(tag, value, prog_bar=prog_bar, sync_dist=True)

    # ---- re-validating exported weights ------------------------------------------------
    @torch.no_grad()
    def score_export(self, folder: str | Path) -> dict[str, Any]:
        """Held-out metrics of exactly the weights in an export folder, for its metrics.json.

        Runs those weights (loaded back from the folder) over the datamodule's validation and
        test loaders, on this process alone (ExportBestModel calls it on rank 0), with the
        baselines on the same splits. Validation selected the weights; test is only reported.
        """
        model = SequenceTRM.from_pretrained(folder).to(self.device).eval()
        datamodule = self.trainer.datamodule
        splits: dict[str, Any] = {}
        for split, role in HELD_OUT_SPLITS.items():
            loader = _held_out_loader(datamodule, split)
            if loader is None:
                continue
            metrics = self.held_out_metrics(sync_on_compute=False).to(self.device)
            metrics.set_reference_means(self.train_quality.reference_mean, self.train_quality_full.reference_mean)
            with self.trainer.precision_plugin.forward_context():  # the numerics validation ran with
                for batch in loader:
                    metrics.update(self.score_batch(model, self.trainer.strategy.batch_to_device(batch)))
            ids = getattr(datamodule, f"{split}_sample_ids", None)
            splits[split] = {
                "role": role,
                "num_samples": int(metrics.quality.rows),
                "sample_ids_sha256": sample_ids_fingerprint(ids),
                "model": {name: float(value) for name, value in metrics.compute().items()},
                "baselines": dict(self.baseline_results.get(split, {})),
            }
        return {"halt_threshold": self.halt_threshold, "splits": splits}

    # ---- baselines and normalisation statistics ----------------------------------------
    def on_fit_start(self) -> None:
        self.fit_baselines()

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == TrainerFn.VALIDATING and not self.baseline_results:
            self.fit_baselines()  # `llm-trm validate`: there was no fit start

    def on_test_start(self) -> None:
        if not self.baseline_results:
            self.fit_baselines()

    @torch.no_grad()
    def fit_baselines(self) -> None:
        """Fit the baselines, the reference means and the TRM's normalisation on the train split's
        summaries; score the baselines on the validation and test splits."""
        datamodule = getattr(self.trainer, "datamodule", None)
        summaries = getattr(datamodule, "summaries", None)
        if summaries is None:
            if not self._warned_no_summaries:
                rank_zero_warn("the datamodule has no summaries(split): no baselines, no normalisation statistics, "
                               "and R^2 and centred cosine are taken around zero instead of the training mean.")
                self._warned_no_summaries = True
            return
        train = self.compress_summaries(summaries("train"))
        if len(train) == 0:
            raise DataError("the datamodule's training split is empty: generate more samples or lower the "
                            "held-out fractions.")
        target_mean, post_mean = train.target.double().mean(0), train.post.double().mean(0)
        self._set_reference_means(target_mean, post_mean)
        if not bool(self.trm.normalization_fitted):  # a resumed run keeps the statistics it trained with
            for trm in (self.trm, self.ema.module if self.ema is not None else None):
                if trm is not None:
                    trm.set_normalization(train.token_mean.float(), train.token_scale.float(), target_mean.float(),
                                          train.target.std(0))
        # every baseline predicts every target state: mean and ridge on the m states side by side
        # ([N, m * D'], each output fitted on its own), the last prompt token repeated for each
        shape = train.target.shape[1:]
        mean = MeanBaseline().fit(train.target.flatten(1))
        ridge = RidgeBaseline(self.hparams.ridge_alpha).fit(train.pooled, train.target.flatten(1))
        predictors: dict[str, Callable[[CompressedSummaries], Tensor]] = {
            "mean": lambda split: mean.predict(len(split)).view(-1, *shape),
            "ridge": lambda split: ridge.predict(split.pooled).view(-1, *shape),
            "last_token": lambda split: split.last if len(shape) == 1 else split.last[:, None].expand(-1, *shape),
        }
        self.baseline_results = {}
        for split in HELD_OUT_SPLITS:
            held_out = self.compress_summaries(summaries(split))
            if len(held_out):
                self.baseline_results[split] = self._score_baselines(predictors, held_out, target_mean, post_mean)
        for split, results in self.baseline_results.items():
            rank_zero_info(f"Baselines on the {split} split: " + ", ".join(
                f"{name} {value:.4f}" for name, value in results.items() if name.endswith("cosine")))

    @torch.no_grad()
    def compress_summaries(self, summaries: Any) -> CompressedSummaries:
        """A split's PairSummaries in D'. The compressor is linear without bias, so compressing the
        pooled prompt gives the pooled compressed prompt, and the token statistics map exactly. With m > 1
        target states the targets are the last m of the summaries' `post_states`."""
        if len(summaries.post) == 0:
            empty = torch.zeros(0, self.compressor.d_compressed)
            states = self.trm.prediction_shape[:-1]  # () or (m,)
            return CompressedSummaries(empty, empty, empty.view(0, *states, empty.shape[1]),
                                       torch.zeros(0, *states, self.compressor.d_model),
                                       torch.zeros(self.compressor.d_compressed, dtype=torch.float64),
                                       torch.zeros((), dtype=torch.float64))
        post = self.full_target({"post": summaries.post, "post_states": getattr(summaries, "post_states", None)},
                                "the datamodule's summaries")
        weight = self.compressor.weight.detach().double().cpu()
        token_mean = summaries.token_mean.double().cpu() @ weight.t()
        tokens = self._compress_rows(summaries.token_sample).double()
        token_scale = (tokens - token_mean).pow(2).mean().sqrt()
        return CompressedSummaries(
            pooled=self._compress_rows(summaries.pooled), last=self._compress_rows(summaries.last),
            target=self._compress_rows(post), post=post.float().cpu(),
            token_mean=token_mean, token_scale=token_scale,
        )

    def _compress_rows(self, rows: Tensor) -> Tensor:
        """[N, (m,) D] (CPU) -> [N, (m,) D'] fp32 on the CPU, compressed on the module's device outside autocast."""
        with torch.autocast(self.device.type, enabled=False):
            return self.compressor.compress(rows.to(self.device, torch.float32)).cpu()

    def _score_baselines(self, predictors: dict[str, Callable[[CompressedSummaries], Tensor]],
                         split: CompressedSummaries, target_mean: Tensor, post_mean: Tensor) -> dict[str, float]:
        d_compressed, d_model = self.compressor.d_compressed, self.compressor.d_model
        results: dict[str, float] = {}
        for name, predict in predictors.items():
            # every rank scores the whole split itself, so there is nothing to synchronise
            compressed = vector_quality(d_compressed, self.n_states, target_mean, sync_on_compute=False)
            full = vector_quality(d_model, self.n_states, post_mean, sync_on_compute=False)
            prediction = predict(split)
            compressed.update(prediction, split.target)
            full.update(self.decompress(prediction.to(self.device)).cpu(), split.post)
            results.update({f"{name}_{key}": float(value) for key, value in compressed.compute().items()})
            results.update({f"{name}_full_{key}": float(value) for key, value in full.compute().items()})
        return results

    def _set_reference_means(self, target_mean: Tensor, post_mean: Tensor) -> None:
        set_reference_mean(self.train_quality, target_mean)
        set_reference_mean(self.train_quality_full, post_mean)
        for metrics in (self.val_metrics, self.test_metrics):
            metrics.set_reference_means(target_mean, post_mean)


def _held_out_loader(datamodule: Any, split: str) -> DataLoader | None:
    """The datamodule's loader of a held-out split, or None when it has none."""
    hook = f"{split}_dataloader"
    if datamodule is None or not is_overridden(hook, datamodule, L.LightningDataModule):
        return None
    return getattr(datamodule, hook)()
