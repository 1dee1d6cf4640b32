"""CompressorModule: Phase 1 training of the DimensionCompressor on the frozen LLM's hidden states.

Stage 1a learns identity reconstruction on general text; stage 1b fine-tunes a 1a
compressor on chain-of-thought sequences. Hidden states are computed on the fly by
the frozen backbone; padding tokens never enter the loss or the metrics.

At the start of fit the PCA optimum of the same rank is fitted on training states
(fp64 streaming second moment, summed over DDP ranks) and evaluated beside the
compressor, so every validation reports how close training got to the optimum.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import PositiveInt
from torch import Tensor

from llm_trm.backbone import DEFAULT_BACKBONE, HIDDEN_STATE_CONVENTION, backbone_id, hidden_size_of
from llm_trm.errors import ArtifactNotFoundError, ConfigMismatchError
from llm_trm.eval.figures import compressor_vs_pca, log_figure, pca_spectrum
from llm_trm.eval.metrics import VectorQuality
from llm_trm.hub import METADATA_KEY, check_compatible, load_compressor
from llm_trm.models.baselines import UncentredPCA
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.modules.common import FrozenBackboneMixin, NonFiniteGuard, manual_update, warmup_cosine



class CompressorModule(FrozenBackboneMixin, L.LightningModule):
    """Train a weight-tied D -> D' -> D compressor (Phase 1).

    Args:
        backbone: frozen LLM spec: Hub id, local dir, .gguf file or `embedded`.
        layer: hidden-state layer (-1: final, after the norm).
        d_compressed: D' (seed flag `--d_compressed`).
        stage: `1a` (general text) or `1b` (CoT fine-tuning from a 1a compressor).
        init_from: the 1a compressor for stage 1b: export folder, `.ckpt`, or Hub id.
        learning_rate: peak AdamW learning rate (seed flag `--learning_rate`).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warmup, in optimizer steps, before cosine decay.
        cosine_loss_weight: add this x (1 - cosine) to the MSE loss.
        gradient_clip_val: max gradient norm (0 disables).
        pca_batches: training batches streamed to fit the PCA baseline (0 disables it).
        cache_hidden_states: keep each example's hidden states in memory after the first epoch
            (finite datasets only, whose batches carry an `index`): later epochs skip the LLM.
        max_nonfinite_steps: stop after this many NaN/inf losses in a row.
        backbone_dtype: `auto` (bf16 on GPU, fp32 on CPU), bfloat16, float16 or float32.
        attn_implementation: the backbone's attention: sdpa, flash_attention_2 (needs flash-attn) or eager.
        trust_remote_code: allow custom modelling code from the Hub (off by default).
        allow_unchecked_artifacts: accept an `init_from` that does not record its backbone, layer, D, D'.
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, layer: int = -1, d_compressed: PositiveInt = 256,
                 stage: Literal["1a", "1b"] = "1a", init_from: str | None = None, learning_rate: float = 1e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 50, cosine_loss_weight: float = 0.0,
                 gradient_clip_val: float = 1.0, pca_batches: int = 32, cache_hidden_states: bool = False,
                 max_nonfinite_steps: int = 10,
                 backbone_dtype: str = "auto", trust_remote_code: bool = False,
                 attn_implementation: str = "sdpa",
                 allow_unchecked_artifacts: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False  # lets every rank skip a NaN step together
        self.backbone, self.layer = backbone, layer
        self.backbone_dtype, self.trust_remote_code = backbone_dtype, trust_remote_code
        self.attn_implementation = attn_implementation
        self.d_model = hidden_size_of(backbone, trust_remote_code)
        self.compressor = DimensionCompressor(self.d_model, d_compressed)
        self.compressor.metadata = self.metadata
        if stage == "1b":
            self._init_from_stage_1a(init_from)
        self.guard = NonFiniteGuard(max_nonfinite_steps)
        self.pca = UncentredPCA(self.d_model)
        self.pca_fitted = False
        self.train_quality = VectorQuality(self.d_model)
        self.val_quality = VectorQuality(self.d_model)
        self.pca_quality = VectorQuality(self.d_model)
        self._state_cache: dict[tuple[bool, int], Tensor] = {}

    # ---- artifact metadata -------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        return {"d_model": self.d_model, "d_compressed": self.hparams.d_compressed,
                "backbone": backbone_id(self.backbone), "layer": self.layer, "stage": self.hparams.stage,
                "hidden_states": HIDDEN_STATE_CONVENTION}

    def _expected(self) -> dict[str, Any]:
        return {k: self.metadata[k] for k in ("d_model", "d_compressed", "backbone", "layer")}

    def _init_from_stage_1a(self, init_from: str | None) -> None:
        if not init_from:
            raise ConfigMismatchError(
                "stage 1b starts from a stage 1a compressor: set model.init_from to its export folder, "
                ".ckpt file or Hub id."
            )
        try:
            loaded = load_compressor(init_from, allow_unchecked=self.hparams.allow_unchecked_artifacts)
        except ArtifactNotFoundError as err:
            raise ArtifactNotFoundError(
                f"stage 1b starts from your stage 1a compressor, and model.init_from={init_from} cannot be loaded: "
                "run stage 1a first (`llm-trm fit --config configs/phase1/stage1a.yaml` exports "
                "runs/phase1/compressor_1a) or set model.init_from to a 1a export folder, .ckpt or Hub id "
                f"({err})"
            ) from err
        found = {"d_model": loaded.d_model, "d_compressed": loaded.d_compressed, **loaded.metadata}
        check_compatible(init_from, found, self._expected())
        self.compressor.load_state_dict(loaded.state_dict())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[METADATA_KEY] = self.metadata
        checkpoint["nonfinite_guard"] = self.guard.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_compatible("the checkpoint", checkpoint.get(METADATA_KEY, {}), self._expected())
        self.guard.load_state_dict(checkpoint.get("nonfinite_guard", {}))

    def export_pretrained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write compressor.safetensors + config.json (from `state_dict` if given, e.g. the best checkpoint)."""
        compressor = DimensionCompressor(self.d_model, self.hparams.d_compressed)
        weights = self.compressor.state_dict() if state_dict is None else {
            k[len("compressor."):]: v for k, v in state_dict.items() if k.startswith("compressor.")}
        compressor.load_state_dict(weights)
        return compressor.save_pretrained(directory, metadata=self.metadata)

    # ---- data -> rows of real-token hidden states --------------------------------------
    def token_states(self, batch: dict[str, Tensor]) -> Tensor:
        """[N_real_tokens, D] fp32 hidden states of the batch's non-padding tokens (row-major order)."""
        if self.hparams.cache_hidden_states and "index" in batch:
            return self._cached_token_states(batch)
        mask = batch["attention_mask"]
        hidden = self.llm.hidden_states(batch["input_ids"], mask, self.layer)
        return hidden[mask.bool()].float()

    def _cached_token_states(self, batch: dict[str, Tensor]) -> Tensor:
        trainer = self.trainer
        from_train_split = not (trainer.validating or trainer.sanity_checking or trainer.testing)
        keys = [(from_train_split, int(i)) for i in batch["index"]]
        if any(key not in self._state_cache for key in keys):
            mask = batch["attention_mask"].bool()
            hidden = self.llm.hidden_states(batch["input_ids"], batch["attention_mask"], self.layer)
            for row, key in enumerate(keys):
                self._state_cache[key] = hidden[row][mask[row]].to("cpu", torch.bfloat16 if hidden.is_cuda else hidden.dtype)
        return torch.cat([self._state_cache[key] for key in keys]).to(self.device, torch.float32)

    def reconstruction_loss(self, states: Tensor, recon: Tensor) -> Tensor:
        loss = F.mse_loss(recon, states)
        if self.hparams.cosine_loss_weight:
            loss = loss + self.hparams.cosine_loss_weight * (1 - F.cosine_similarity(recon, states, dim=-1)).mean()
        return loss

    # ---- training ----------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.compressor.parameters(), lr=self.hparams.learning_rate,
                                      weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = warmup_cosine(optimizer, min(self.hparams.warmup_steps, total // 2), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        states = self.token_states(batch)
        recon = self.compressor(states)
        loss = self.reconstruction_loss(states, recon)
        self.log("train/nonfinite_steps", float(self.guard.skipped_total), on_step=True, on_epoch=False)
        if self.guard.should_skip(self, loss):
            return loss.detach()
        manual_update(self, loss, self.hparams.gradient_clip_val)
        self.train_quality.update(recon, states)
        cosine = F.cosine_similarity(recon.detach(), states, dim=-1).mean()
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=len(states))
        self.log("train/cosine", cosine, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], on_step=True, on_epoch=False)
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        if self.train_quality.rows > 0 or self.trainer.world_size > 1:
            self._log_quality("train", self.train_quality)

    # ---- PCA baseline ------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.fit_pca()

    def on_validation_start(self) -> None:
        self.fit_pca()  # no-op during fit; `llm-trm validate` gets the baseline too

    on_test_start = on_validation_start

    @torch.no_grad()
    def fit_pca(self) -> None:
        """Fit the same-rank PCA optimum on up to `pca_batches` training batches (all ranks pooled)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.pca_fitted or not self.hparams.pca_batches or datamodule is None:
            return
        pca = UncentredPCA(self.d_model)
        for index, batch in enumerate(datamodule.train_dataloader()):
            if index >= self.hparams.pca_batches:
                break
            batch = self.trainer.strategy.batch_to_device(batch)
            pca.update(self.token_states(batch))
        moment = self.trainer.strategy.reduce(pca.second_moment.to(self.device), reduce_op="sum")
        count = self.trainer.strategy.reduce(torch.tensor(float(pca.count), device=self.device), reduce_op="sum")
        pca.merge_(moment, int(count.item()))
        pca.fit(self.hparams.d_compressed)
        self.pca, self.pca_fitted = pca, True

    # ---- validation --------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        states = self.token_states(batch)
        recon = self.compressor(states)
        self.log("val/loss", self.reconstruction_loss(states, recon), prog_bar=True, batch_size=len(states),
                 sync_dist=True)
        self.val_quality.update(recon, states)
        if self.pca_fitted:
            self.pca_quality.update(self.pca.reconstruct(states), states)

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        compressor = self._log_quality("val", self.val_quality)
        # shown beside the hyperparameters in TensorBoard's HPARAMS tab
        self.log("hp_metric", compressor["explained_variance"], rank_zero_only=True)
        if self.pca_fitted:
            pca = self._log_quality("baseline/pca", self.pca_quality, sep="_")
            self.log("baseline/pca_energy_captured", self.pca.energy_captured(), rank_zero_only=True)
            self.log("val/cosine_ratio_to_pca", compressor["cosine"] / pca["cosine"], prog_bar=True)
            self.log("val/explained_variance_ratio_to_pca",
                     compressor["explained_variance"] / pca["explained_variance"])
            log_figure(self.trainer, "baseline/pca_spectrum",
                       lambda: pca_spectrum(self.pca.eigenvalues, self.hparams.d_compressed))
            log_figure(self.trainer, "val/compressor_vs_pca", lambda: compressor_vs_pca(compressor, pca))

    on_test_epoch_end = on_validation_epoch_end

    def _log_quality(self, prefix: str, metric: VectorQuality, sep: str = "/") -> dict[str, Tensor]:
        values = metric.compute()
        metric.reset()
        for name, value in values.items():
            self.log(f"{prefix}{sep}{name}", value, prog_bar=(prefix == "val" and name == "cosine"),
                     rank_zero_only=True)
        return values
