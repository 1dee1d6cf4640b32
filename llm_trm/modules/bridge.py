"""BridgeModule: Phase 2b, the way in: train the adapter that turns end-of-thinking states into soft inputs.

A final-layer state is what `lm_head` reads, not an input embedding: fed back norm-matched it
moves the answer no more than its negation does. The bridge (`models.adapter.BridgeAdapter`,
starting as the training-free concept token `softmax(lm_head(h)) @ E`) learns the way in, so
that the frozen LLM, given

    [prompt][bridge(state)]</think> answer

answers as it did after its own thinking. For each batch of datagen samples (the
HiddenPairDataModule with `record_fields: [token_ids, answer_ids]`):

- teacher: the frozen LLM over the sample's own extraction ids (prompt + thinking + closing
  tag, the record's `token_ids`) and its recorded answer (`answer_ids`, the tokens it wrote
  after the canonical closing tag): the next-token distributions at the closing tag's last
  token and at each answer token (no gradient);
- student: one prompt pass (`latent.prompt_pass`) gives the prompt's KV cache; `soft_inputs`
  appends the k soft vectors and the closing tag; the same answer is teacher-forced after them;
  the gradient runs through the frozen LLM into the adapter only;
- loss = nll_weight x NLL of the recorded answer tokens + kl_weight x KL(teacher || student),
  averaged over the batch's answer tokens and positions (the position after the last answer
  token included, so an empty answer still trains the first token).

States: the true end-of-thinking state (`post`, or the last m of `post_states` for a bridge
with `n_states` m > 1) and, for a `trm_fraction` of the training samples (drawn per step,
seeded), the frozen TRM's prediction from the stored prompt states, decompressed, so the
bridge learns to read what it will be given at inference.

Held-out splits (validation selects, test is only reported), per mode on the same samples:
first-answer-token KL(cot || mode) and its share recovered against no soft vector
(`1 - KL_mode / KL_none`: the cot reference has KL 0), top-1 agreement of the first answer
token with cot, answer NLL and mean KL over the answer. Modes: `bridge` (the true state),
`concept` (the training-free map, the bridge's starting point), `none` (`[prompt]</think>`),
`shuffled` (the bridge on another sample's state: each sample takes the previous one's in its
batch, a derangement; what survives it is a content-free prefix, not thinking), and `trm`
(the bridge on the TRM's prediction) when a TRM is given. `val/loss` is the bridge's objective.

The LLM is frozen (`FrozenBackboneMixin`: never registered, never in a checkpoint); its
lm_head and embeddings are attached to the adapter by reference and never saved either. The
TRM and compressor, when given, are frozen inputs reloaded from their source (not saved).
`export_pretrained` writes the adapter folder (`adapter.safetensors` + `config.json`) that
`llm-trm evaluate --adapter DIR`, `LatentReasoner(adapter=DIR)` and `GRPOModule(adapter=DIR)` load.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, SumMetric

from llm_trm.backbone import DEFAULT_BACKBONE, HIDDEN_STATE_CONVENTION, backbone_id, hidden_size_of
from llm_trm.batching import pad_token_ids, position_ids
from llm_trm.data.shards import read_datagen_config
from llm_trm.errors import ConfigMismatchError, DataError
from llm_trm.hub import METADATA_KEY, check_compatible, strip_prefix
from llm_trm.latent import (Prompt, PromptBatch, backbone_head, build_adapter, check_adapter, check_parts, embed,
                            load_compressor_and_trm, predict, prompt_pass, rewind_cache, soft_inputs)
from llm_trm.models.adapter import BridgeAdapter, ConceptAdapter, LatentAdapter
from llm_trm.modules.common import FrozenBackboneMixin, NonFiniteGuard, schedule_length, warmup_cosine
from llm_trm.modules.export import sample_ids_fingerprint
from llm_trm.modules.grpo import step_seed
from llm_trm.thinking import CLOSE_SUFFIX, close_suffix_ids

RECORD_FIELDS = ("token_ids", "answer_ids")  # what the batches must carry (data.record_fields)
MODE_METRICS = ("first_token_kl", "top1_agreement", "answer_nll", "answer_kl")
HELD_OUT_SPLITS = {"val": "selection", "test": "report"}
BRIDGE_CHECKPOINT_KEY = "bridge_state"


# ---------------------------------------------------------------------------- batches


@dataclass
class Sample:
    """One record's token layout: the chat prompt, prompt + thinking + closing tag, and the answer."""

    prompt: list[int]
    sequence: list[int]
    answer: list[int]


def sample_layout(record: dict[str, Any], num_thinking_tokens: int, close_ids: list[int], sample_id: str,
                  max_answer_tokens: int | None) -> Sample:
    """Split a record's extraction ids (prompt + thinking + the canonical closing tag) into its parts."""
    ids = list(record["token_ids"])
    prompt_length = len(ids) - num_thinking_tokens - len(close_ids)
    if prompt_length < 1 or ids[len(ids) - len(close_ids):] != close_ids:
        raise DataError(
            f"the record of {sample_id} does not end with this tokenizer's closing tag {CLOSE_SUFFIX!r} "
            f"({close_ids}): the shards were made with another backbone; use that backbone, or generate them again"
        )
    answer = list(record["answer_ids"])
    if max_answer_tokens is not None:
        answer = answer[:max_answer_tokens]
    return Sample(ids[:prompt_length], ids, answer)


@dataclass
class Terms:
    """Per-position terms of one mode against the teacher, for a batch."""

    kl: Tensor  # [B, W+1] KL(teacher || mode) at the closing tag's last token and after each answer token
    kl_mask: Tensor  # [B, W+1]
    nll: Tensor  # [B, W] NLL of each recorded answer token
    nll_mask: Tensor  # [B, W]
    top1_agreement: Tensor  # [B] the first answer token's argmax matches the teacher's

    def means(self) -> tuple[Tensor, Tensor]:
        """(token-mean NLL, position-mean KL) over the batch."""
        nll = (self.nll * self.nll_mask).sum() / self.nll_mask.sum().clamp_min(1)
        kl = (self.kl * self.kl_mask).sum() / self.kl_mask.sum().clamp_min(1)
        return nll, kl


def answer_terms(teacher: Tensor, student: Tensor, answer_ids: Tensor, answer_mask: Tensor) -> Terms:
    """Terms of a student's log-probabilities [B, W+1, V] against the teacher's (both over the same answers)."""
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    nll = -student[:, :-1].gather(-1, answer_ids[..., None])[..., 0]
    mask = answer_mask.to(kl.dtype)
    kl_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
    agreement = (student[:, 0].argmax(-1) == teacher[:, 0].argmax(-1)).float()
    return Terms(kl, kl_mask, nll, mask, agreement)


class FidelityMeans(nn.Module):
    """Split-level means of each mode's terms (token- or position-weighted), synced across ranks."""

    def __init__(self, modes: tuple[str, ...], nll_weight: float, kl_weight: float,
                 sync_on_compute: bool = True) -> None:
        super().__init__()
        self.modes, self.nll_weight, self.kl_weight = modes, nll_weight, kl_weight
        self.means = nn.ModuleDict({f"{mode}__{name}": MeanMetric(sync_on_compute=sync_on_compute)
                                    for mode in modes for name in MODE_METRICS})
        self.samples = SumMetric(sync_on_compute=sync_on_compute)

    def update(self, mode: str, terms: Terms) -> None:
        self.means[f"{mode}__first_token_kl"].update(terms.kl[:, 0].detach())
        self.means[f"{mode}__top1_agreement"].update(terms.top1_agreement)
        self.means[f"{mode}__answer_nll"].update(terms.nll.detach(), terms.nll_mask)
        self.means[f"{mode}__answer_kl"].update(terms.kl.detach(), terms.kl_mask)
        if mode == self.modes[0]:
            self.samples.update(float(len(terms.top1_agreement)))

    def compute(self) -> dict[str, float]:
        """`mode/metric` values, `mode/loss`, `mode/first_token_kl_recovered` and `num_samples`; a mode that never
        ran (e.g. `shuffled` on batches of one) is left out. Every rank computes every metric (they sync)."""
        values: dict[str, float] = {}
        with warnings.catch_warnings():  # a metric never updated computes to nan, with a warning
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            raw = {key: float(metric.compute()) for key, metric in self.means.items()}
        for mode in self.modes:
            if math.isnan(raw[f"{mode}__first_token_kl"]):
                continue
            for name in MODE_METRICS:
                values[f"{mode}/{name}"] = raw[f"{mode}__{name}"]
            nll = values[f"{mode}/answer_nll"]  # nan when no sample had answer tokens
            values[f"{mode}/loss"] = self.kl_weight * values[f"{mode}/answer_kl"] + (
                0.0 if math.isnan(nll) else self.nll_weight * nll)
        none_kl = values.get("none/first_token_kl")
        for mode in self.modes:
            if mode != "none" and none_kl and f"{mode}/first_token_kl" in values:
                values[f"{mode}/first_token_kl_recovered"] = 1.0 - values[f"{mode}/first_token_kl"] / none_kl
        values["num_samples"] = float(self.samples.compute())
        return values

    def reset(self) -> None:
        for metric in self.means.values():
            metric.reset()
        self.samples.reset()


# ---------------------------------------------------------------------------- module


class BridgeModule(FrozenBackboneMixin, L.LightningModule):
    """Phase 2b: train the input adapter so that [prompt][adapter(state)]</think> answers as CoT did.

    Args:
        backbone: the frozen LLM the shards were made with (Hub id, local dir, .gguf or `embedded`).
        layer: the hidden-state layer of the shards' states (the concept kinds need -1).
        adapter: what to train: `bridge` (a fresh BridgeAdapter: the concept map plus a zero-initialised
            residual MLP), `linear`, or an adapter export folder to continue from.
        n_soft_vectors: k, soft vectors in the think block (a folder: unset takes its own).
        n_states: m, end-of-thinking states the adapter reads (the last m of the shards' `post_states`).
        d_hidden: the fresh bridge's residual MLP width (0: a linear residual).
        temperature: the fresh bridge's initial concept temperature (learned from there).
        nll_weight: weight of the answer tokens' teacher-forced NLL.
        kl_weight: weight of KL(teacher || student) per answer position.
        max_answer_tokens: recorded answer tokens used per sample (null: all).
        learning_rate, weight_decay, warmup_steps: AdamW and its linear-warmup + cosine schedule (in steps).
        trm_checkpoint, compressor_checkpoint: a Phase 2 TRM and its compressor (export folders, Hub ids or
            .ckpt); with `trm_fraction` > 0 that share of training samples uses the TRM's prediction instead of
            the true state, and held-out splits report a `trm` mode.
        trm_fraction: share of training samples given the TRM's prediction (0: true states only).
        max_nonfinite_steps: stop after this many non-finite losses in a row (skipped and counted).
        seed: seeds which samples get the TRM's prediction (with the step and the rank).
        backbone_dtype, trust_remote_code, attn_implementation: how the LLM is loaded.
        allow_unchecked_artifacts: accept a compressor / TRM that does not record its backbone, layer, D, D'.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layer: int = -1,
        adapter: str = "bridge",
        n_soft_vectors: int | None = None,
        n_states: int = 1,
        d_hidden: int = 256,
        temperature: float = 1.0,
        nll_weight: float = 1.0,
        kl_weight: float = 1.0,
        max_answer_tokens: int | None = 64,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        trm_checkpoint: str | None = None,
        compressor_checkpoint: str | None = None,
        trm_fraction: float = 0.0,
        max_nonfinite_steps: int = 10,
        seed: int = 0,
        backbone_dtype: str = "auto",
        trust_remote_code: bool = False,
        attn_implementation: str = "sdpa",
        allow_unchecked_artifacts: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._check_settings()
        self.backbone, self.backbone_dtype, self.trust_remote_code = backbone, backbone_dtype, trust_remote_code
        self.attn_implementation = attn_implementation
        self.layer = layer
        # the TRM path first: a wrong path fails before the LLM loads
        self._trm_parts = self._load_trm() if trm_checkpoint or compressor_checkpoint else None
        self.adapter = self._make_adapter()
        lm_head, embeddings = backbone_head(self.llm.model)
        self.concept_map = ConceptAdapter.for_backbone(
            lm_head, embeddings, n_vectors=self.adapter.n_vectors, n_states=self.adapter.n_states,
            temperature=getattr(self.adapter, "temperature", 1.0))
        self.modes = ("bridge", "concept", "none", "shuffled") + (("trm",) if self._trm_parts else ())
        self.val_metrics = FidelityMeans(self.modes, nll_weight, kl_weight)
        self.test_metrics = FidelityMeans(self.modes, nll_weight, kl_weight)
        self.guard = NonFiniteGuard(max_nonfinite_steps)

    # ---- construction ------------------------------------------------------------------

    def _check_settings(self) -> None:
        hp = self.hparams
        if hp.adapter in ("concept", "norm_match"):
            raise ConfigMismatchError(f"adapter {hp.adapter!r} has no parameters to train: use bridge, linear, "
                                      "or an adapter folder (the concept map is reported as a baseline anyway).")
        if not 0.0 <= hp.trm_fraction <= 1.0:
            raise ConfigMismatchError(f"trm_fraction must be in [0, 1], got {hp.trm_fraction}.")
        if hp.trm_fraction > 0 and not (hp.trm_checkpoint and hp.compressor_checkpoint):
            raise ConfigMismatchError("trm_fraction > 0 needs both trm_checkpoint and compressor_checkpoint.")
        if min(hp.nll_weight, hp.kl_weight) < 0 or hp.nll_weight + hp.kl_weight == 0:
            raise ConfigMismatchError("nll_weight and kl_weight must be >= 0, and not both 0.")
        if hp.max_answer_tokens is not None and hp.max_answer_tokens < 0:
            raise ConfigMismatchError(f"max_answer_tokens must be >= 0 or null, got {hp.max_answer_tokens}.")
        if hp.n_states < 1 or (hp.n_soft_vectors is not None and hp.n_soft_vectors < 1):
            raise ConfigMismatchError("n_states and n_soft_vectors must be at least 1.")

    def _load_trm(self) -> list[nn.Module]:
        """The frozen compressor and TRM, checked against the backbone (kept out of the checkpoint: a list)."""
        hp = self.hparams
        if not (hp.trm_checkpoint and hp.compressor_checkpoint):
            raise ConfigMismatchError("the TRM path needs both trm_checkpoint and compressor_checkpoint.")
        compressor, trm = load_compressor_and_trm(hp.compressor_checkpoint, hp.trm_checkpoint,
                                                  hp.allow_unchecked_artifacts)
        check_parts(compressor, trm, hidden_size_of(self.backbone, self.trust_remote_code), backbone_id(self.backbone),
                    self.layer, f"compressor {hp.compressor_checkpoint}", f"TRM {hp.trm_checkpoint}")
        m = int(getattr(trm, "n_reasoning_tokens", 1))
        if m != hp.n_states:
            raise ConfigMismatchError(f"TRM {hp.trm_checkpoint} predicts m={m} state(s) per sample but the bridge "
                                      f"reads n_states={hp.n_states}: set model.n_states to {m}.")
        return [part.float().eval().requires_grad_(False) for part in (compressor, trm)]

    def _make_adapter(self) -> LatentAdapter:
        hp = self.hparams
        model = self.llm.model
        self.llm.check_layer(self.layer)
        lm_head, embeddings = backbone_head(model)
        hidden = int(model.config.hidden_size)
        if hp.adapter == "bridge":
            adapter = BridgeAdapter.for_backbone(lm_head, embeddings, n_vectors=hp.n_soft_vectors or 1,
                                                 n_states=hp.n_states, temperature=hp.temperature,
                                                 d_hidden=hp.d_hidden)
        else:
            adapter = build_adapter(hp.adapter, embeddings, hidden, hp.n_soft_vectors, lm_head_weight=lm_head,
                                    n_states=hp.n_states)
        check_adapter(adapter, hidden, embeddings.shape[1], f"adapter {hp.adapter}",
                      backbone_id=backbone_id(self.backbone), layer=self.layer, n_vectors=hp.n_soft_vectors,
                      n_states=hp.n_states)
        if not any(True for _ in adapter.parameters()):
            raise ConfigMismatchError(f"adapter {hp.adapter} has no parameters to train.")
        return adapter.float().requires_grad_(True)

    # ---- metadata, checkpoints, export -------------------------------------------------

    @property
    def identity(self) -> dict[str, Any]:
        """What the adapter fits: a checkpoint or export used with other values is a one-line error."""
        adapter = self.adapter
        return {"backbone": backbone_id(self.backbone), "layer": self.layer, "d_model": adapter.d_model,
                "d_embed": adapter.d_embed, "n_vectors": adapter.n_vectors, "n_states": adapter.n_states}

    def trained_on(self) -> dict[str, Any]:
        hp = self.hparams
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        states = "true end-of-thinking states" + (f" and TRM predictions ({hp.trm_fraction:.0%} of samples)"
                                                   if hp.trm_fraction > 0 else "")
        return {
            "data_path": str(getattr(datamodule, "data_path", "")) or None,
            "train_samples": len(getattr(datamodule, "train_sample_ids", []) or []) or None,
            "states": states,
            "trm_checkpoint": hp.trm_checkpoint,
            "compressor_checkpoint": hp.compressor_checkpoint,
            "trm_fraction": hp.trm_fraction,
            "objective": f"{hp.nll_weight} x answer NLL + {hp.kl_weight} x KL(cot || bridge) per answer position",
            "max_answer_tokens": hp.max_answer_tokens,
            "adapter_init": hp.adapter,
        }

    @property
    def metadata(self) -> dict[str, Any]:
        return {**self.identity, "vocab_size": getattr(self.adapter, "vocab_size", None),
                "hidden_states": HIDDEN_STATE_CONVENTION, "phase": "bridge", "trained_on": self.trained_on()}

    def selection_context(self) -> dict[str, Any]:
        """What val/loss depends on besides the validation samples (ExportBestModel compares exports on it)."""
        hp = self.hparams
        return {**self.identity, "nll_weight": hp.nll_weight, "kl_weight": hp.kl_weight,
                "max_answer_tokens": hp.max_answer_tokens}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[METADATA_KEY] = {**self.identity, "architecture": self.adapter.config()}
        checkpoint[BRIDGE_CHECKPOINT_KEY] = {"guard": self.guard.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        found = checkpoint.get(METADATA_KEY, {})
        check_compatible("the checkpoint", found, self.identity)
        check_compatible("the checkpoint", found.get("architecture", {}), self.adapter.config())
        self.guard.load_state_dict(checkpoint.get(BRIDGE_CHECKPOINT_KEY, {}).get("guard", {}))

    def export_pretrained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """The adapter folder (`adapter.safetensors` + config.json with the metadata); no LLM weight in it."""
        adapter = copy.deepcopy(self.adapter).cpu()
        if state_dict is not None:
            adapter.load_state_dict(strip_prefix(state_dict, "adapter."))
        return adapter.save_pretrained(directory, metadata=self.metadata)

    def score_export(self, folder: str | Path) -> dict[str, Any]:
        """Held-out metrics of exactly the exported weights (validation selected them; test is only reported)."""
        model = self.llm.model
        lm_head, embeddings = backbone_head(model)
        adapter = build_adapter(str(folder), embeddings, int(model.config.hidden_size), lm_head_weight=lm_head,
                                n_states=self.adapter.n_states).to(self.device).eval()
        datamodule = self.trainer.datamodule
        splits: dict[str, Any] = {}
        for split, role in HELD_OUT_SPLITS.items():
            loader = held_out_loader(datamodule, split)
            if loader is None:
                continue
            metrics = FidelityMeans(self.modes, self.hparams.nll_weight, self.hparams.kl_weight,
                                    sync_on_compute=False).to(self.device)
            with torch.no_grad(), self.trainer.precision_plugin.forward_context():
                for batch in loader:
                    self.score_batch(adapter, self.trainer.strategy.batch_to_device(batch), metrics)
            splits[split] = {"role": role, "sample_ids_sha256": sample_ids_fingerprint(
                getattr(datamodule, f"{split}_sample_ids", None)), "metrics": metrics.compute()}
        return {"splits": splits}

    # ---- optimization ------------------------------------------------------------------

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.adapter.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        total = schedule_length(self.trainer)
        scheduler = warmup_cosine(optimizer, min(hp.warmup_steps, total // 2), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        if stage == "fit":  # after the datamodule's setup, before anything (logs, checkpoints) is written
            self.check_data(self.trainer.datamodule)

    def check_data(self, datamodule: Any) -> None:
        """The shards were made with this backbone and layer, and hold at least m states per sample."""
        path = getattr(datamodule, "data_path", None)
        if path is None:
            return
        stored = read_datagen_config(path) or {}
        wanted = {"backbone": backbone_id(self.backbone), "layer": self.layer, "hidden_size": self.adapter.d_model}
        for key, want in wanted.items():
            have = stored.get(key)
            if have is not None and have != want:
                raise ConfigMismatchError(
                    f"the shards in {path} were made with {key}={have!r} but the bridge has {key}={want!r}: "
                    f"train it with the backbone and layer the shards were made with, or generate shards for this one."
                )
        held = getattr(datamodule, "num_post_states", 1)
        if held < self.adapter.n_states:
            raise DataError(f"the bridge reads m={self.adapter.n_states} states per sample but the shards in {path} "
                            f"hold m={held}: generate them with model.num_post_states {self.adapter.n_states}, "
                            f"or set model.n_states {held}.")
        missing = [field for field in RECORD_FIELDS if field not in getattr(datamodule, "record_fields", ())]
        if missing:
            raise DataError(f"the bridge needs the records' {', '.join(missing)} in each batch: set "
                            f"data.record_fields: [{', '.join(RECORD_FIELDS)}] (configs/phase2/bridge.yaml does).")

    # ---- the two passes ----------------------------------------------------------------

    @property
    def close_ids(self) -> list[int]:
        return close_suffix_ids(self.llm.tokenizer)

    def samples(self, batch: dict[str, Any]) -> list[Sample]:
        records = batch.get("records")
        if records is None:
            raise DataError(f"the batches carry no records: set data.record_fields: [{', '.join(RECORD_FIELDS)}].")
        close = self.close_ids
        return [sample_layout(record, int(thinking), close, sid, self.hparams.max_answer_tokens)
                for record, thinking, sid in zip(records, batch["num_thinking_tokens"].tolist(), batch["sample_ids"])]

    def answers(self, samples: list[Sample]) -> tuple[Tensor, Tensor]:
        """The recorded answers, right-padded: ids [B, W] and mask [B, W] (W >= 1)."""
        return pad_token_ids([s.answer for s in samples], self.llm.tokenizer.pad_token_id, self.device, side="right")

    def prompt(self, samples: list[Sample]) -> tuple[PromptBatch, Any]:
        """One prompt pass: the left-padded prompts and their KV cache (shared by the teacher and every student)."""
        # records carry token ids, not Problems (and the pre-state length is not needed here)
        batch = PromptBatch.of([Prompt(None, s.prompt, len(s.prompt)) for s in samples],  # type: ignore[arg-type]
                               self.llm.tokenizer.pad_token_id, self.device)
        _, cache = prompt_pass(self.llm.model, batch.input_ids, batch.mask, self.layer, use_cache=True)
        return batch, cache

    @torch.no_grad()
    def teacher(self, prompted: tuple[PromptBatch, Any], samples: list[Sample], answer_ids: Tensor,
                answer_mask: Tensor) -> Tensor:
        """The LLM after its own thinking: log-probabilities [B, W+1, V] at the closing tag's last token and
        after each answer token. After the prompt's cache, each row runs [padding][thinking][closing tag]
        [answer][padding]: thinking left-padded, answers right-padded, so the kept columns line up (padding
        is masked out and skipped by the position ids, so every real token sees what an unpadded pass sees)."""
        batch, cache = prompted
        width = batch.input_ids.shape[1]
        thoughts = [s.sequence[len(s.prompt):] for s in samples]  # thinking + closing tag
        ids, mask = pad_token_ids(thoughts, self.llm.tokenizer.pad_token_id, self.device, side="left")
        ids, mask = torch.cat([ids, answer_ids], 1), torch.cat([batch.mask, mask, answer_mask], 1)
        out = self.llm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)[:, width:],
                             cache=cache, use_cache=True, logits_to_keep=answer_ids.shape[1] + 1)
        rewind_cache(cache, width)
        return out.logits.float().log_softmax(-1)

    def student(self, prompted: tuple[PromptBatch, Any], soft: Tensor, answer_ids: Tensor,
                answer_mask: Tensor) -> Tensor:
        """The LLM given [prompt][soft]</think>: log-probabilities [B, W+1, V] over the same answers (gradient
        into `soft`); only the soft vectors, the closing tag and the answer run, after the prompt's cache."""
        batch, cache = prompted
        model = self.llm.model
        embeds, mask = soft_inputs(model, batch, soft, self.close_ids)
        with torch.no_grad():
            answer_embeds = embed(model, answer_ids)
        full = torch.cat([embeds, answer_embeds.to(embeds.dtype)], 1)
        full_mask = torch.cat([mask, answer_mask], 1)
        width = batch.input_ids.shape[1]
        out = model(inputs_embeds=full[:, width:], attention_mask=full_mask,
                    position_ids=position_ids(full_mask)[:, width:], cache=cache, use_cache=True,
                    logits_to_keep=answer_ids.shape[1] + 1)
        rewind_cache(cache, width)  # back to the prompt for the next pass
        return out.logits.float().log_softmax(-1)

    # ---- states ------------------------------------------------------------------------

    def true_states(self, batch: dict[str, Any]) -> Tensor:
        """The last m stored end-of-thinking states [B, m, D] (fp32)."""
        m = self.adapter.n_states
        stored = batch["post_states"]
        if stored.shape[1] < m:
            raise DataError(f"the bridge reads m={m} states per sample but the shards hold m={stored.shape[1]}: "
                            f"generate them with model.num_post_states {m}, or set model.n_states {stored.shape[1]}.")
        return stored[:, stored.shape[1] - m:].float()

    @torch.no_grad()
    def trm_states(self, batch: dict[str, Any]) -> Tensor:
        """The frozen TRM's prediction from the stored prompt states, decompressed: [B, m, D]."""
        compressor, trm = (part.to(self.device) for part in self._trm_parts)
        output = predict(compressor, trm, batch["pre"].float(), batch["pre_mask"])
        state = compressor.decompress(output.prediction.float())
        return state if state.dim() == 3 else state[:, None]

    def training_states(self, batch: dict[str, Any]) -> Tensor:
        states = self.true_states(batch)
        fraction = self.hparams.trm_fraction
        if fraction <= 0:
            return states
        generator = torch.Generator().manual_seed(step_seed(self.hparams.seed, self.global_step, self.global_rank))
        chosen = (torch.rand(states.shape[0], generator=generator) < fraction).to(states.device)
        if chosen.any():
            rows = {key: value[chosen] for key, value in batch.items() if key in ("pre", "pre_mask")}
            states = states.clone()
            states[chosen] = self.trm_states(rows)
        return states

    # ---- steps -------------------------------------------------------------------------

    def loss_of(self, terms: Terms) -> Tensor:
        nll, kl = terms.means()
        return self.hparams.nll_weight * nll + self.hparams.kl_weight * kl

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        samples = self.samples(batch)
        answer_ids, answer_mask = self.answers(samples)
        prompted = self.prompt(samples)
        teacher = self.teacher(prompted, samples, answer_ids, answer_mask)
        soft = self.adapter(self.training_states(batch))
        terms = answer_terms(teacher, self.student(prompted, soft, answer_ids, answer_mask), answer_ids, answer_mask)
        loss = self.loss_of(terms)
        size = len(samples)
        if self.guard.should_skip(self, loss):
            self.log("train/nonfinite_steps", float(self.guard.skipped_total), on_step=True, batch_size=size)
            return None
        nll, kl = terms.means()
        logged = {"loss": loss.detach(), "answer_nll": nll.detach(), "answer_kl": kl.detach(),
                  "first_token_kl": terms.kl[:, 0].detach().mean(), "top1_agreement": terms.top1_agreement.mean()}
        if isinstance(self.adapter, BridgeAdapter):
            logged["temperature"] = self.adapter.log_temperature.detach().exp()
        for name, value in logged.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=size, prog_bar=name == "loss")
        return loss

    @torch.no_grad()
    def score_batch(self, adapter: LatentAdapter, batch: dict[str, Any], metrics: FidelityMeans) -> None:
        """Every mode on one held-out batch, against the same teacher, into `metrics`."""
        samples = self.samples(batch)
        answer_ids, answer_mask = self.answers(samples)
        prompted = self.prompt(samples)
        teacher = self.teacher(prompted, samples, answer_ids, answer_mask)
        states = self.true_states(batch)
        for mode in metrics.modes:
            if mode == "bridge":
                soft = adapter(states)
            elif mode == "concept":
                soft = self.concept_map(states)
            elif mode == "none":
                soft = states.new_zeros(states.shape[0], 0, adapter.d_embed)
            elif mode == "shuffled":
                if len(samples) < 2:
                    continue  # no other sample in this batch to take a state from
                soft = adapter(states.roll(1, dims=0))  # each sample takes the previous one's state
            else:  # trm
                soft = adapter(self.trm_states(batch))
            student = self.student(prompted, soft, answer_ids, answer_mask)
            metrics.update(mode, answer_terms(teacher, student, answer_ids, answer_mask))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.score_batch(self.adapter, batch, self.val_metrics)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.score_batch(self.adapter, batch, self.test_metrics)

    def _log_held_out(self, split: str, metrics: FidelityMeans) -> None:
        values = metrics.compute()
        metrics.reset()
        if "bridge/loss" in values:
            self.log(f"{split}/loss", values["bridge/loss"], prog_bar=True)
        for name, value in values.items():
            if name != "num_samples":
                self.log(f"{split}/{name}", value, prog_bar=name == "bridge/first_token_kl")

    def on_validation_epoch_end(self) -> None:
        self._log_held_out("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_held_out("test", self.test_metrics)


def held_out_loader(datamodule: Any, split: str) -> Any:
    """The datamodule's loader of a held-out split, or None when it has none."""
    try:
        return getattr(datamodule, f"{split}_dataloader")()
    except (DataError, AttributeError, NotImplementedError):
        return None
