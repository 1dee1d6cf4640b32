"""GRPOModule: Phase 3, the TRM + compressor (+ input adapter) trained on answer correctness.

The frozen LLM answers from the latent path (`llm_trm.latent`, shared with evaluation's `trm`
mode and datagen):

    prompt <think>  [k soft vectors]  </think>  answer

For each batch of problems:

1. one no-grad prompt pass over the thinking prompts gives the states up to and including
   the opening think tag and the prompt's KV cache; the states are compressed (with
   gradient), the TRM reasons (`SequenceTRM.forward`: the supervision steps follow the halt
   head as at inference, each sample's last step carries the gradient), the prediction is
   decompressed and the adapter maps it to k soft input vectors;
2. the frozen LLM samples `group_size` answers per problem from those inputs, reusing the
   prompt's KV cache (expanded to the group) instead of re-reading the prompt G times;
3. each answer is scored by the reward functions (`llm_trm.rl.rewards`); rewards are
   normalised within each group (`group_advantages`);
4. a teacher-forced forward over [soft vectors, closing tag, answer], again after the
   prompt's KV cache, gives the answer tokens' log-probabilities with gradient through the
   frozen LLM into the adapter, TRM and compressor; the clipped policy loss is minimised.

Options: a KL penalty toward the frozen Phase 2 TRM's prediction (Gaussian KL with the
exploration noise's std, 1 without noise; the reference runs only when `kl_coef > 0`);
Gaussian exploration noise on the compressed latent, each group member its own sample.
With noise the latent is an action of the policy: the TRM and the compressor's compression
learn through its Gaussian log-probability, and the token log-probabilities (given the
sampled latent) train the adapter and the compressor's decompression. A warm start of
`warm_start_steps` steps first maximises the likelihood of the LLM's own correct answers
(datagen records, which the DataModule attaches to the batches) given the soft vectors, so
that RL does not start from noise.

The LLM's weights never change and never enter a checkpoint (FrozenBackboneMixin).
Sampling is seeded per (seed, global step, rank), so a resumed run samples what an
uninterrupted one would.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from llm_trm.backbone import DEFAULT_BACKBONE, activation_checkpointing, backbone_id, hidden_size_of
from llm_trm.batching import pad_token_ids, position_ids
from llm_trm.data.grpo_data import ProblemBatch
from llm_trm.data.problems import Problem
from llm_trm.errors import ConfigMismatchError
from llm_trm.generation import GREEDY, Decoding, generate
from llm_trm.hub import METADATA_KEY, check_compatible, strip_prefix
from llm_trm.latent import (ADAPTER_SUBFOLDER, COMPRESSOR_SUBFOLDER, PromptBatch, backbone_head, build_adapter,
                            check_adapter, check_parts, check_state_count, encode_prompt, load_compressor_and_trm,
                            pre_states, predict, prompt_pass, rewind_cache, soft_inputs, soft_vectors)
from llm_trm.modules.common import FrozenBackboneMixin, NonFiniteGuard, manual_update, schedule_length, warmup_cosine
from llm_trm.rl.objective import (clipped_policy_loss, equal_reward_share, gaussian_kl, gaussian_log_prob,
                                  group_advantages)
from llm_trm.rl.rewards import CheckerError, Completion, resolve_rewards
from llm_trm.thinking import close_suffix_ids, end_of_turn_ids

GRPO_CHECKPOINT_KEY = "grpo_state"
PARTS = ("trm", "compressor", "adapter")


# ---------------------------------------------------------------------------- helpers


@dataclass
class Prompted:
    """A batch of problems after its one prompt pass: prompts, pre states, and the prompt's KV cache."""

    batch: PromptBatch
    pre: Tensor  # [B, L, D] float32, right-padded
    pre_mask: Tensor  # [B, L]
    cache: Any  # the prompt's KV cache (None when not reused); expanded in place for a group

    @property
    def width(self) -> int:
        return self.batch.input_ids.shape[1]


@dataclass
class Latent:
    """The TRM path's output for a batch: prediction [B, D'] (or [B, m, D'] for m states), soft vectors
    [N, k, E] (N = B x repeats)."""

    prediction: Tensor
    soft: Tensor
    steps_used: Tensor  # [B]
    latent_logp: Tensor | None = None  # [N] log N(sample | prediction, std^2), with exploration noise
    extra: Tensor | None = None  # 0 x unused outputs (the halt head), so DDP sees every parameter used


def step_seed(seed: int, *parts: int) -> int:
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:7], "big")


# ---------------------------------------------------------------------------- module


class GRPOModule(FrozenBackboneMixin, L.LightningModule):
    """Phase 3: train TRM, compressor and input adapter with GRPO on the frozen LLM's answers.

    Args:
        backbone: the frozen LLM (Hub id, local dir, .gguf or `embedded`).
        compressor_checkpoint: the compressor (seed Phase 3 flag): export folder, `.ckpt` or Hub id.
        trm_checkpoint: the Phase 2 TRM (seed Phase 3 flag): export folder, `.ckpt` or Hub id.
        adapter: `linear` (a fresh LinearAdapter, starts as norm matching), `norm_match` (no parameters),
            `concept` (no parameters), `bridge` (a fresh trainable bridge) or an adapter export folder
            (e.g. the Phase 2b bridge: GRPO then starts from it).
        n_soft_vectors: k, soft input vectors in the think block (a fresh adapter: 1 when unset; a folder:
            unset takes its k, another number is an error).
        group_size: G, answers sampled per problem.
        temperature: sampling temperature; the log-probabilities are those of the same tempered softmax.
        max_answer_tokens: answer tokens sampled per answer.
        lr_trm, lr_compressor, lr_adapter: AdamW learning rates; 0 freezes that part.
        weight_decay: AdamW weight decay.
        clip_eps: the clipped objective's epsilon.
        updates_per_batch: optimizer steps on each batch's samples (the first at ratio 1).
        kl_coef: weight of the KL penalty toward the frozen Phase 2 TRM's prediction (in D').
        latent_noise_std: std of the Gaussian exploration noise on the compressed latent (0: none).
        format_reward: weight of the format bonus (\\boxed{} / a code block).
        reward: `answer` (the answer checks out against the gold answer or tests) or
            `first_token:<id>` (the first answer token is <id>: the sanity task).
        warm_start_steps: steps of teacher forcing on the LLM's own correct datagen answers first
            (the CLI links it to the DataModule, which draws those problems).
        halting: follow the TRM's halt head (as inference does); false runs every supervision step.
        reuse_prompt_cache: one prompt pass per problem whose KV cache serves all G samples and
            the log-probability pass (false recomputes the prompt each time: more compute, less memory).
        activation_checkpointing: in the log-probability pass (the one with gradients through the frozen
            LLM) keep only each layer's input and recompute the rest in the backward: far less memory,
            one more forward; that pass then re-reads the prompt instead of its KV cache.
        equal_reward_warn_steps: warn when every group had equal rewards this many steps in a row.
        max_nonfinite_steps: stop after this many non-finite losses in a row (skipped and counted).
        gradient_clip_val: max gradient norm (0 disables).
        warmup_steps: linear learning-rate warmup, in optimizer steps, before cosine decay.
        seed: seeds the per-step sampling (with the step and the rank).
        backbone_dtype, trust_remote_code, attn_implementation: how the LLM is loaded (attention: sdpa,
            flash_attention_2 with flash-attn installed, or eager).
        allow_unchecked_artifacts: accept a compressor / TRM that does not record its backbone, layer, D, D'.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        compressor_checkpoint: str = "anonx3247/llm-trm-compressor",
        trm_checkpoint: str = "anonx3247/llm-trm-trm",
        adapter: str = "linear",
        n_soft_vectors: int | None = None,
        group_size: int = 8,
        temperature: float = 1.0,
        max_answer_tokens: int = 256,
        lr_trm: float = 1e-5,
        lr_compressor: float = 1e-6,
        lr_adapter: float = 1e-4,
        weight_decay: float = 0.0,
        clip_eps: float = 0.2,
        updates_per_batch: int = 1,
        kl_coef: float = 0.0,
        latent_noise_std: float = 0.0,
        format_reward: float = 0.0,
        reward: str = "answer",
        warm_start_steps: int = 0,
        halting: bool = True,
        reuse_prompt_cache: bool = True,
        activation_checkpointing: bool = False,
        equal_reward_warn_steps: int = 20,
        max_nonfinite_steps: int = 10,
        gradient_clip_val: float = 1.0,
        warmup_steps: int = 10,
        seed: int = 0,
        backbone_dtype: str = "auto",
        trust_remote_code: bool = False,
        attn_implementation: str = "sdpa",
        allow_unchecked_artifacts: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self._check_settings()
        self.backbone, self.backbone_dtype, self.trust_remote_code = backbone, backbone_dtype, trust_remote_code
        self.attn_implementation = attn_implementation
        self.rewards = resolve_rewards(reward, format_reward)
        # the small parts load and are checked first, so a wrong path fails before the LLM loads
        self.compressor, self.trm, self.layer = self._load_parts(compressor_checkpoint, trm_checkpoint)
        self.adapter = self._make_adapter(adapter, n_soft_vectors)
        # the Phase 2 parts, frozen: the KL reference (small, so checkpoints carry them)
        self.reference_trm = copy.deepcopy(self.trm).requires_grad_(False)
        self.reference_compressor = copy.deepcopy(self.compressor).requires_grad_(False)
        for part, lr in zip(PARTS, (lr_trm, lr_compressor, lr_adapter)):
            getattr(self, part).requires_grad_(lr > 0)
        self.guard = NonFiniteGuard(max_nonfinite_steps)
        self.equal_reward_streak = 0
        self.sampling = Decoding(do_sample=True, temperature=temperature)

    # ---- construction ------------------------------------------------------------------

    def _check_settings(self) -> None:
        hp = self.hparams
        if hp.group_size < 2:
            raise ConfigMismatchError(f"group_size must be at least 2 (rewards are compared within a group), "
                                      f"got {hp.group_size}.")
        if hp.temperature <= 0 or hp.max_answer_tokens < 1 or hp.updates_per_batch < 1:
            raise ConfigMismatchError("temperature must be > 0, max_answer_tokens and updates_per_batch >= 1.")
        if min(hp.lr_trm, hp.lr_compressor, hp.lr_adapter) < 0 or max(hp.lr_trm, hp.lr_compressor, hp.lr_adapter) == 0:
            raise ConfigMismatchError("learning rates must be >= 0 and at least one of lr_trm, lr_compressor, "
                                      "lr_adapter positive (0 freezes that part).")
        if hp.latent_noise_std < 0 or hp.kl_coef < 0 or hp.warm_start_steps < 0:
            raise ConfigMismatchError("latent_noise_std, kl_coef and warm_start_steps must be >= 0.")

    def _load_parts(self, compressor_spec: str, trm_spec: str):
        """Load compressor and TRM and check that they fit each other and the backbone (one-line errors)."""
        compressor, trm = load_compressor_and_trm(compressor_spec, trm_spec, self.hparams.allow_unchecked_artifacts)
        hidden, bid = hidden_size_of(self.backbone, self.trust_remote_code), backbone_id(self.backbone)
        layer = int(compressor.metadata.get("layer", -1))
        check_parts(compressor, trm, hidden, bid, layer, f"compressor {compressor_spec}", f"TRM {trm_spec}")
        return compressor.float(), trm.float(), layer

    def _make_adapter(self, spec: str, n_soft_vectors: int | None):
        """A fresh adapter or a loaded one (e.g. a Phase 2b bridge), attached to and checked against the LLM."""
        lm_head, embeddings = backbone_head(self.llm.model)
        n_states = int(getattr(self.trm, "n_reasoning_tokens", 1))
        adapter = build_adapter(spec, embeddings, self.compressor.d_model, n_soft_vectors, lm_head_weight=lm_head,
                                n_states=n_states)
        check_adapter(adapter, self.compressor.d_model, embeddings.shape[1], f"adapter {spec}",
                      backbone_id=backbone_id(self.backbone), layer=self.layer, n_vectors=n_soft_vectors)
        check_state_count(self.trm, adapter, f"TRM {self.hparams.trm_checkpoint}", f"adapter {spec}")
        return adapter.float()

    def train(self, mode: bool = True) -> GRPOModule:
        super().train(mode)
        self.reference_trm.eval()  # the KL reference is a fixed function
        return self

    # ---- metadata, checkpoints, export -------------------------------------------------

    @property
    def metadata(self) -> dict[str, Any]:
        hp = self.hparams
        return {
            "d_model": self.compressor.d_model,
            "d_compressed": self.compressor.d_compressed,
            "backbone": backbone_id(self.backbone),
            "layer": self.layer,
            "hidden_states": self.compressor.metadata.get("hidden_states"),
            "phase": "grpo",
            "trm_init": hp.trm_checkpoint,
            "compressor_init": hp.compressor_checkpoint,
            "reward": hp.reward,
            "group_size": hp.group_size,
            "n_soft_vectors": self.adapter.n_vectors,
            "n_states": self.trm.n_reasoning_tokens,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[METADATA_KEY] = {**self.metadata, "architecture": self.trm.config()}
        checkpoint[GRPO_CHECKPOINT_KEY] = {"guard": self.guard.state_dict(),
                                           "equal_reward_streak": self.equal_reward_streak}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        found = checkpoint.get(METADATA_KEY, {})
        expected = {"d_model": self.compressor.d_model, "d_compressed": self.compressor.d_compressed,
                    "backbone": backbone_id(self.backbone), "layer": self.layer}
        check_compatible("the checkpoint", found, expected)
        check_compatible("the checkpoint", found.get("architecture", {}), self.trm.config())
        state = checkpoint.get(GRPO_CHECKPOINT_KEY, {})
        self.guard.load_state_dict(state.get("guard", {}))
        self.equal_reward_streak = int(state.get("equal_reward_streak", 0))

    def export_pretrained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """The TRM folder (`trm.safetensors` + config), with `adapter/` and `compressor/` inside.

        `LatentReasoner(backbone, compressor=<dir>/compressor, trm=<dir>)` picks the adapter up itself.
        """
        directory = Path(directory)
        state = self.state_dict() if state_dict is None else state_dict
        parts = {}
        for name in PARTS:
            part = copy.deepcopy(getattr(self, name)).cpu()
            part.load_state_dict(strip_prefix(state, f"{name}."))
            parts[name] = part
        meta = self.metadata
        parts["trm"].save_pretrained(directory, metadata=meta)
        parts["adapter"].save_pretrained(directory / ADAPTER_SUBFOLDER, metadata=meta)
        compressor_meta = {**self.compressor.metadata, "phase": "grpo", "compressor_init": meta["compressor_init"]}
        parts["compressor"].save_pretrained(directory / COMPRESSOR_SUBFOLDER, metadata=compressor_meta)
        return directory

    # ---- optimization ------------------------------------------------------------------

    def total_optimizer_steps(self) -> int:
        return schedule_length(self.trainer, self.hparams.updates_per_batch)

    def configure_optimizers(self):
        hp = self.hparams
        groups = []
        for name, lr in zip(PARTS, (hp.lr_trm, hp.lr_compressor, hp.lr_adapter)):
            params = [p for p in getattr(self, name).parameters() if p.requires_grad]
            if lr > 0 and params:
                groups.append({"params": params, "lr": lr, "name": name})
        optimizer = torch.optim.AdamW(groups, weight_decay=hp.weight_decay)
        total = self.total_optimizer_steps()
        scheduler = warmup_cosine(optimizer, min(hp.warmup_steps, total // 2), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimize(self, loss: Tensor) -> bool:
        """One update (backward, clip, step, schedule); False when a non-finite loss was skipped."""
        if self.guard.should_skip(self, loss):
            return False
        manual_update(self, loss, self.hparams.gradient_clip_val)
        return True

    # ---- the latent path ---------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.llm.tokenizer

    @property
    def end_ids(self) -> set[int]:
        return end_of_turn_ids(self.tokenizer, self.llm.model)

    @property
    def close_ids(self) -> list[int]:
        return close_suffix_ids(self.tokenizer)

    def prompt(self, problems: Sequence[Problem]) -> Prompted:
        """One prompt pass: the thinking prompts, their pre states and (when reused) their KV cache."""
        batch = PromptBatch.of([encode_prompt(self.tokenizer, p) for p in problems], self.tokenizer.pad_token_id,
                               self.device)
        states, cache = prompt_pass(self.llm.model, batch.input_ids, batch.mask, self.layer,
                                    use_cache=self.hparams.reuse_prompt_cache)
        pre, pre_mask = pre_states(states, batch.mask, batch.pre_lengths)
        return Prompted(batch, pre.float(), pre_mask, cache)

    def expand_cache(self, prompted: Prompted, repeats: int) -> None:
        """Repeat the prompt's KV cache for the `repeats` rows of each problem (once per batch)."""
        if prompted.cache is not None and repeats > 1:
            prompted.cache.batch_repeat_interleave(repeats)

    def latent(self, prompted: Prompted, repeats: int, noise: Tensor | None = None) -> Latent:
        """The soft vectors [B x repeats, k, E]; with `noise` [B, repeats, D'] (or [B, repeats, m, D'] for m
        predicted states) each copy gets its own latent."""
        output = predict(self.compressor, self.trm, prompted.pre, prompted.pre_mask, halt=self.hparams.halting)
        prediction = output.prediction
        extra = 0.0 * output.halt_logit.float().sum()
        if noise is None:
            _, soft = soft_vectors(self.compressor, self.adapter, prediction)
            return Latent(prediction, soft.repeat_interleave(repeats, dim=0), output.steps_used, extra=extra)
        # the sampled latent is an action: the TRM learns through its log-probability, not through the LLM
        sample = prediction.detach()[:, None] + noise
        # one Gaussian over all m states of a copy: [B, repeats, m * D']
        logp = gaussian_log_prob(sample.float().flatten(2), prediction.float().flatten(1)[:, None],
                                 self.hparams.latent_noise_std)
        _, soft = soft_vectors(self.compressor, self.adapter, sample.flatten(0, 1))
        return Latent(prediction, soft, output.steps_used, latent_logp=logp.flatten(), extra=extra)

    @torch.no_grad()
    def reference_latent(self, prompted: Prompted) -> Tensor:
        return predict(self.reference_compressor, self.reference_trm, prompted.pre, prompted.pre_mask,
                       halt=self.hparams.halting).prediction

    def llm_inputs(self, prompted: Prompted, soft: Tensor) -> tuple[Tensor, Tensor]:
        """[prompt embeddings, soft vectors, closing tag] for each of the N = B x repeats rows, and the mask."""
        return soft_inputs(self.llm.model, prompted.batch, soft, self.close_ids)

    # ---- sampling and scoring ----------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompted: Prompted, embeds: Tensor, mask: Tensor, decoding: Decoding) -> list[list[int]]:
        """Answer token ids per row, ending with the end-of-turn token when the LLM stopped."""
        out = generate(self.llm.model, self.tokenizer, inputs_embeds=embeds.detach(), attention_mask=mask,
                       cache=prompted.cache, max_new_tokens=self.hparams.max_answer_tokens, decoding=decoding,
                       end_ids=self.end_ids, keep_end=True)
        if prompted.cache is not None:
            rewind_cache(prompted.cache, prompted.width)  # back to the prompt, for the log-probability pass
        return out.new_ids

    def score_all(self, problems: Sequence[Problem], answers: list[list[int]],
                  group: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Rewards [B, G], correctness [B, G] (the first reward function's score) and stats: each reward
        function's mean and how many answers the checker failed on (scored 0, counted apart)."""
        completions = [Completion(problems[row // group], ids, self.tokenizer.decode(ids, skip_special_tokens=True))
                       for row, ids in enumerate(answers)]
        checker_errors = 0
        scores: dict[str, Tensor] = {}
        for name, (function, _) in self.rewards.items():
            values = []
            for completion in completions:
                try:
                    values.append(function(completion))
                except CheckerError:
                    values.append(0.0)
                    checker_errors += 1
            scores[name] = torch.tensor(values, dtype=torch.float32, device=self.device)
        total = sum(weight * scores[name] for name, (_, weight) in self.rewards.items())
        correct = scores[next(iter(self.rewards))]
        stats = {f"reward_{name}": values.mean() for name, values in scores.items()}
        stats["checker_errors"] = torch.tensor(float(checker_errors), device=self.device)
        return total.view(-1, group), correct.view(-1, group), stats

    def answer_log_probs(self, prompted: Prompted, embeds: Tensor, mask: Tensor, answers: list[list[int]],
                         temperature: float) -> tuple[Tensor, Tensor]:
        """Teacher-forced log-probabilities [N, T] of the answer tokens after `embeds`, and their mask.

        With the prompt's KV cache only the soft vectors, the closing tag and the answer are run.
        """
        ids, answer_mask = pad_token_ids(answers, self.tokenizer.pad_token_id, self.device, side="right")
        with torch.no_grad():
            answer_embeds = self.llm.model.get_input_embeddings()(ids)
        full = torch.cat([embeds, answer_embeds.to(embeds.dtype)], dim=1)
        full_mask = torch.cat([mask, answer_mask], dim=1)
        width = ids.shape[1]
        checkpointing = self.hparams.activation_checkpointing
        cache = None if checkpointing else prompted.cache  # a checkpointed layer cannot add to a KV cache
        cached = prompted.width if cache is not None else 0
        # the logits at the last closing-tag token and at each answer token but the last
        with activation_checkpointing(self.llm.model, checkpointing):
            out = self.llm.model(inputs_embeds=full[:, cached:], attention_mask=full_mask,
                                 position_ids=position_ids(full_mask)[:, cached:], cache=cache,
                                 use_cache=cache is not None, logits_to_keep=width + 1)
        if cache is not None:
            rewind_cache(cache, prompted.width)  # drop this pass's keys (and their graph) again
        logits = out.logits[:, :-1].float() / temperature
        logp = -F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
        return logp, answer_mask

    # ---- training ----------------------------------------------------------------------

    def _exploration_noise(self, batch: int, group: int) -> Tensor | None:
        std = self.hparams.latent_noise_std
        if std <= 0:
            return None
        generator = torch.Generator().manual_seed(step_seed(self.hparams.seed, self.global_step, self.global_rank, 1))
        noise = torch.randn(batch, group, *self.trm.prediction_shape, generator=generator) * std
        return noise.to(self.device)

    def _sample(self, prompted: Prompted, noise: Tensor | None) -> list[list[int]] | None:
        """G answers per problem from the current latent, sampled with a per-step seed; None when the
        soft vectors are not finite (the step is skipped and counted: sampling from NaN would crash)."""
        group = self.hparams.group_size
        with torch.no_grad():
            latent = self.latent(prompted, group, noise)
            embeds, mask = self.llm_inputs(prompted, latent.soft)
        if self._trainer is not None and self.guard.should_skip(self, latent.soft.float().abs().amax()):
            return None
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(step_seed(self.hparams.seed, self.global_step, self.global_rank, 0))
            return self.generate(prompted, embeds, mask, self.sampling)

    def grpo_loss(self, prompted: Prompted, answers: list[list[int]], advantages: Tensor, noise: Tensor | None,
                  old: dict[str, Tensor] | None) -> tuple[Tensor, dict]:
        """The clipped policy loss (+ latent term, + KL) with gradient; `old` holds the sampling policy's log-probs."""
        hp = self.hparams
        latent = self.latent(prompted, hp.group_size, noise)
        embeds, mask = self.llm_inputs(prompted, latent.soft)
        logp, answer_mask = self.answer_log_probs(prompted, embeds, mask, answers, hp.temperature)
        old_logp = logp.detach() if old is None else old["tokens"]
        flat_adv = advantages.flatten()
        loss, clip_fraction = clipped_policy_loss(logp, old_logp, flat_adv, answer_mask, hp.clip_eps)
        stats: dict[str, Tensor] = {"clip_fraction": clip_fraction, "policy_loss": loss.detach()}
        current = {"tokens": logp.detach()}
        if latent.latent_logp is not None:
            old_latent = latent.latent_logp.detach() if old is None else old["latent"]
            latent_loss, _ = clipped_policy_loss(latent.latent_logp[:, None], old_latent[:, None], flat_adv,
                                                 torch.ones_like(old_latent[:, None]), hp.clip_eps)
            loss = loss + latent_loss
            current["latent"] = latent.latent_logp.detach()
        if hp.kl_coef > 0:  # the frozen reference runs only when it is used
            kl = gaussian_kl(latent.prediction.float().flatten(1), self.reference_latent(prompted).float().flatten(1),
                             hp.latent_noise_std or 1.0).mean()
            loss = loss + hp.kl_coef * kl
            stats["kl"] = kl.detach()
        stats["trm_steps"] = latent.steps_used.float().mean()
        return loss + latent.extra, {"stats": stats, "old": current}

    def grpo_step(self, problems: list[Problem]) -> dict[str, Tensor]:
        hp = self.hparams
        prompted = self.prompt(problems)
        self.expand_cache(prompted, hp.group_size)
        noise = self._exploration_noise(len(problems), hp.group_size)
        answers = self._sample(prompted, noise)
        if answers is None:
            return {}
        rewards, correct, reward_parts = self.score_all(problems, answers, hp.group_size)
        advantages = group_advantages(rewards)
        old, stats, loss = None, {}, None
        for _ in range(hp.updates_per_batch):
            loss, out = self.grpo_loss(prompted, answers, advantages, noise, old)
            old = old or out["old"]
            stats = out["stats"]
            self.optimize(loss)
        lengths = torch.tensor([len(a) for a in answers], dtype=torch.float32, device=self.device)
        stats.update(reward_parts)
        stats.update(loss=loss.detach(), reward_mean=rewards.mean(), reward_std=rewards.std(unbiased=False),
                     reward_group_std=rewards.std(dim=1, unbiased=False).mean(), accuracy=correct.mean(),
                     equal_reward_share=equal_reward_share(rewards), answer_length=lengths.mean())
        return stats

    def warm_start_step(self, batch: ProblemBatch) -> dict[str, Tensor]:
        """Teacher forcing: maximise the likelihood of the LLM's own correct answers given the soft vectors."""
        known = [(p, answer) for p, answer in zip(batch.problems, batch.reference_answers) if answer]
        # no known answer on this rank: a zero-weight step keeps DDP in step
        chosen = known or [(batch.problems[0], "")]
        prompted = self.prompt([p for p, _ in chosen])
        latent = self.latent(prompted, 1)
        embeds, mask = self.llm_inputs(prompted, latent.soft)
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        targets = [(self.tokenizer.encode(answer, add_special_tokens=False) + eos)[: self.hparams.max_answer_tokens]
                   for _, answer in chosen]
        logp, answer_mask = self.answer_log_probs(prompted, embeds, mask, targets, 1.0)
        nll = -(logp * answer_mask).sum(1) / answer_mask.sum(1).clamp_min(1)
        loss = nll.mean() * (1.0 if known else 0.0) + latent.extra
        self.optimize(loss)
        return {"loss": loss.detach(), "warm_start_nll": nll.mean().detach(),
                "answer_length": answer_mask.sum(1).float().mean()}

    def training_step(self, batch: ProblemBatch, batch_idx: int) -> dict[str, Tensor] | None:
        step = self.global_step  # the step the batch was drawn at (optimizing advances it)
        in_warm_start = step < self.hparams.warm_start_steps
        stats = self.warm_start_step(batch) if in_warm_start else self.grpo_step(batch.problems)
        if not stats:  # skipped: non-finite soft vectors
            self.log("train/nonfinite_steps", float(self.guard.skipped_total), on_step=True, on_epoch=False)
            return None
        self._log_training(stats, batch, in_warm_start)
        return {"loss": stats["loss"]}

    def _log_training(self, stats: dict[str, Tensor], batch: ProblemBatch, in_warm_start: bool) -> None:
        names = sorted(stats)
        values = torch.stack([stats[name].detach().float().reshape(()) for name in names])
        if self.trainer.world_size > 1:  # one all-reduce for every scalar
            values = self.trainer.strategy.reduce(values, reduce_op="mean")
        logged = dict(zip(names, values.tolist()))
        logged.update({f"curriculum_{name}": value for name, value in batch.curriculum.items()})
        logged.update(nonfinite_steps=float(self.guard.skipped_total), warm_start=float(in_warm_start))
        for name, value in logged.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=len(batch.problems),
                     prog_bar=name in ("reward_mean", "accuracy"))
        if not in_warm_start:
            self._watch_equal_rewards(logged["equal_reward_share"])

    def _watch_equal_rewards(self, share: float) -> None:
        self.equal_reward_streak = self.equal_reward_streak + 1 if share >= 1.0 else 0
        limit = self.hparams.equal_reward_warn_steps
        if limit > 0 and self.equal_reward_streak > 0 and self.equal_reward_streak % limit == 0:
            rank_zero_warn(f"every group had equal rewards for {self.equal_reward_streak} steps in a row "
                           f"(step {self.global_step}): GRPO gets no signal. Raise temperature or group_size, "
                           "start the curriculum on easier problems, add format_reward, or warm-start first.")

    # ---- validation --------------------------------------------------------------------

    @torch.no_grad()
    def answer_greedily(self, problems: list[Problem]) -> list[list[int]]:
        """`trm` mode: the latent path with greedy decoding (no noise)."""
        prompted = self.prompt(problems)
        embeds, mask = self.llm_inputs(prompted, self.latent(prompted, 1).soft)
        return self.generate(prompted, embeds, mask, GREEDY)

    def validation_step(self, batch: ProblemBatch, batch_idx: int) -> None:
        answers = self.answer_greedily(batch.problems)
        rewards, correct, _ = self.score_all(batch.problems, answers, 1)
        lengths = torch.tensor([len(a) for a in answers], dtype=torch.float32, device=self.device)
        for name, value in (("accuracy", correct.mean()), ("reward", rewards.mean()), ("answer_length", lengths.mean())):
            self.log(f"val/{name}", value, on_epoch=True, batch_size=len(batch.problems), sync_dist=True,
                     prog_bar=name == "accuracy")
