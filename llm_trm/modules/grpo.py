"""GRPOModule: Phase 3, the TRM + compressor (+ input adapter) trained on answer correctness.

The frozen LLM answers from the latent path of `LatentReasoner`'s `trm` mode:

    prompt <think>  [k soft vectors]  </think>  answer

For each batch of problems:

1. one no-grad forward over the thinking prompts gives the states up to and including
   the opening think tag; they are compressed (with gradient), the TRM reasons (the
   supervision steps run without gradient, following the halt head as inference does,
   then each sample's last step runs again with gradient), the prediction is
   decompressed and the adapter maps it to k soft input vectors;
2. the frozen LLM samples `group_size` answers per problem from those inputs (no grad);
3. each answer is scored (`check_answer`, plus an optional format bonus; or, for the
   sanity task, whether its first token is a given token); rewards are normalised
   within each group (`group_advantages`);
4. a teacher-forced forward over [prompt, soft vectors, closing tag, answer] gives the
   answer tokens' log-probabilities, with gradient through the frozen LLM into the
   adapter, TRM and compressor; the clipped policy loss is minimised.

Options: a KL penalty toward the frozen Phase 2 TRM's prediction (Gaussian KL with the
exploration noise's std, 1 without noise); Gaussian exploration noise on the compressed
latent, each group member its own sample. With noise the latent is an action of the
policy: the TRM and the compressor's compression learn through its Gaussian
log-probability, and the token log-probabilities (given the sampled latent) train the
adapter and the compressor's decompression. A warm start of `warm_start_steps` steps
first maximises the likelihood of the LLM's own correct answers (datagen records)
given the soft vectors, so that RL does not start from noise.

The LLM's weights never change and never enter a checkpoint (FrozenBackboneMixin).
Sampling is seeded per (seed, global step, rank), so a resumed run samples what an
uninterrupted one would.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from llm_trm.backbone import DEFAULT_BACKBONE, THINK_CLOSE, THINK_OPEN, backbone_id, hidden_size_of
from llm_trm.batching import pad_token_ids, position_ids
from llm_trm.data.grpo_data import has_gold
from llm_trm.data.problems import Problem, build_chat_prompt
from llm_trm.errors import ConfigMismatchError, DataError, LLMTRMError
from llm_trm.eval.answers import check_answer
from llm_trm.hub import METADATA_KEY, check_compatible, load_compressor, load_trm
from llm_trm.models.adapter import LatentAdapter, LinearAdapter, NormMatchAdapter
from llm_trm.models.compressor import DimensionCompressor
from llm_trm.models.trm import SequenceTRM
from llm_trm.modules.common import (FrozenBackboneMixin, NonFiniteGuard, manual_update, schedule_length,
                                    warmup_cosine)
from llm_trm.rl.objective import (clipped_policy_loss, equal_reward_share, gaussian_kl, gaussian_log_prob,
                                  group_advantages)

ADAPTER_SUBFOLDER = "adapter"  # where LatentReasoner(adapter="auto") looks inside a TRM export folder
COMPRESSOR_SUBFOLDER = "compressor"
HALT_DECISION = 0.5
FIRST_TOKEN_REWARD = re.compile(r"^first_token:(\d+)$")
FORMAT_MARKERS = {"math": "\\boxed{", "code": "```"}
GRPO_CHECKPOINT_KEY = "grpo_state"
PARTS = ("trm", "compressor", "adapter")


# ---------------------------------------------------------------------------- helpers


@dataclass
class PromptBatch:
    """Left-padded thinking prompts and each prompt's length up to and including the opening tag."""

    problems: list[Problem]
    input_ids: Tensor  # [B, W]
    mask: Tensor  # [B, W]
    lengths: list[int]
    pre_lengths: list[int]


@dataclass
class Latent:
    """The TRM path's output for a batch: prediction [B, D'], soft vectors [N, k, E] (N = B x repeats)."""

    prediction: Tensor
    soft: Tensor
    steps_used: Tensor  # [B]
    latent_logp: Tensor | None = None  # [N] log N(sample | prediction, std^2), with exploration noise
    extra: Tensor | None = None  # 0 x unused outputs (the halt head), so DDP sees every parameter used


def cut_after_end(ids: list[int], end_ids: set[int]) -> list[int]:
    """Tokens up to and including the first end-of-turn token: stopping is an action too."""
    for position, token in enumerate(ids):
        if token in end_ids:
            return ids[: position + 1]
    return ids


def step_seed(seed: int, *parts: int) -> int:
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:7], "big")


def _strip_prefix(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def _load(kind: str, spec: str, loader: Any) -> Any:
    """loader(spec), with an unreadable artifact turned into one line naming it."""
    try:
        return loader(spec)
    except LLMTRMError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise LLMTRMError(f"cannot load the {kind} from {spec}: {err}".splitlines()[0]) from err


def reason(trm: SequenceTRM, x: Tensor, mask: Tensor, halting: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(prediction [B, D'], halt_logit [B], steps used [B]): each sample's last supervision step with gradient.

    The steps before a sample's last one run without gradient (as Phase 2 detaches between
    steps); with `halting` a sample's last step is the one after which its halt probability
    first exceeds 0.5, as at inference. Each sample's state entering its last step is kept,
    and that step runs once more with gradient for the whole batch.
    """
    carry = trm.initial_state(x, mask)
    running = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    steps_before = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    with torch.no_grad():
        for _ in range(trm.n_supervision_steps - 1):
            stepped, _, halt_logit = trm.deep_recursion(carry)
            halts_now = running & (torch.sigmoid(halt_logit.float()) > HALT_DECISION) if halting else ~running
            advance = running & ~halts_now  # a sample that halts now keeps the state it entered this step with
            keep = advance[:, None, None]
            carry = replace(carry, y=torch.where(keep, stepped.y, carry.y), z=torch.where(keep, stepped.z, carry.z))
            steps_before += advance.long()
            running = advance
            if not running.any():
                break
    _, prediction, halt_logit = trm.deep_recursion(carry.detach())
    return prediction, halt_logit, steps_before + 1


# ---------------------------------------------------------------------------- module


class GRPOModule(FrozenBackboneMixin, L.LightningModule):
    """Phase 3: train TRM, compressor and input adapter with GRPO on the frozen LLM's answers.

    Args:
        backbone: the frozen LLM (Hub id, local dir, .gguf or `embedded`).
        compressor_checkpoint: the compressor (seed Phase 3 flag): export folder, `.ckpt` or Hub id.
        trm_checkpoint: the Phase 2 TRM (seed Phase 3 flag): export folder, `.ckpt` or Hub id.
        adapter: `linear` (a fresh LinearAdapter, starts as norm matching), `norm_match`
            (no parameters) or an adapter export folder.
        n_soft_vectors: k, soft input vectors in the think block (for `linear` / `norm_match`).
        group_size: G, answers sampled per problem.
        temperature: sampling temperature; the log-probabilities are those of the same tempered softmax.
        max_answer_tokens: answer tokens sampled per answer.
        lr_trm, lr_compressor, lr_adapter: AdamW learning rates; 0 freezes that part.
        weight_decay: AdamW weight decay.
        clip_eps: the clipped objective's epsilon.
        updates_per_batch: optimizer steps on each batch's samples (the first at ratio 1).
        kl_coef: weight of the KL penalty toward the frozen Phase 2 TRM's prediction (in D').
        latent_noise_std: std of the Gaussian exploration noise on the compressed latent (0: none).
        format_reward: bonus for an answer in the expected format (\\boxed{} / a code block).
        reward: `answer` (check_answer against the gold answer or tests) or `first_token:<id>`
            (1 when the first answer token is <id>: the sanity task).
        warm_start_steps: steps of teacher forcing on the LLM's own correct datagen answers first.
        halting: follow the TRM's halt head (as inference does); false runs every supervision step.
        equal_reward_warn_steps: warn when every group had equal rewards this many steps in a row.
        max_nonfinite_steps: stop after this many non-finite losses in a row (skipped and counted).
        gradient_clip_val: max gradient norm (0 disables).
        warmup_steps: linear learning-rate warmup, in optimizer steps, before cosine decay.
        seed: seeds the per-step sampling (with the step and the rank).
        backbone_dtype, trust_remote_code: how the LLM is loaded.
        allow_unchecked_artifacts: accept a compressor / TRM that does not record its backbone, layer, D, D'.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        compressor_checkpoint: str = "anonx3247/llm-trm-compressor",
        trm_checkpoint: str = "anonx3247/llm-trm-trm",
        adapter: str = "linear",
        n_soft_vectors: int = 1,
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
        equal_reward_warn_steps: int = 20,
        max_nonfinite_steps: int = 10,
        gradient_clip_val: float = 1.0,
        warmup_steps: int = 10,
        seed: int = 0,
        backbone_dtype: str = "auto",
        trust_remote_code: bool = False,
        allow_unchecked_artifacts: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self._check_settings()
        self.backbone, self.backbone_dtype, self.trust_remote_code = backbone, backbone_dtype, trust_remote_code
        self.warm_start_steps = warm_start_steps  # read by GRPODataModule to draw warm-start problems
        self.target_token = self._parse_reward(reward)
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
        self.correct_answers: dict[str, str] = {}

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
        if hp.latent_noise_std < 0 or hp.kl_coef < 0:
            raise ConfigMismatchError("latent_noise_std and kl_coef must be >= 0.")

    @staticmethod
    def _parse_reward(reward: str) -> int | None:
        if reward == "answer":
            return None
        match = FIRST_TOKEN_REWARD.match(reward)
        if match is None:
            raise ConfigMismatchError(f"reward must be `answer` or `first_token:<token id>`, got {reward!r}.")
        return int(match.group(1))

    def _load_parts(self, compressor_spec: str, trm_spec: str) -> tuple[DimensionCompressor, SequenceTRM, int]:
        """Load compressor and TRM and check that they fit each other and the backbone (one-line errors)."""
        unchecked = self.hparams.allow_unchecked_artifacts
        compressor = _load("compressor", compressor_spec, lambda s: load_compressor(str(s), allow_unchecked=unchecked))
        trm = _load("TRM", trm_spec, lambda s: load_trm(str(s), allow_unchecked=unchecked))
        hidden, bid = hidden_size_of(self.backbone, self.trust_remote_code), backbone_id(self.backbone)
        if compressor.d_model != hidden:
            raise ConfigMismatchError(f"compressor {compressor_spec} maps D={compressor.d_model} but backbone "
                                      f"{bid} has D={hidden}: use the compressor trained on this backbone.")
        if trm.d_compressed != compressor.d_compressed:
            raise ConfigMismatchError(f"TRM {trm_spec} works in D'={trm.d_compressed} but compressor "
                                      f"{compressor_spec} gives D'={compressor.d_compressed}: use the compressor "
                                      "the TRM was trained with.")
        layer = int(compressor.metadata.get("layer", -1))
        check_compatible(f"compressor {compressor_spec}", compressor.metadata, {"backbone": bid})
        check_compatible(f"TRM {trm_spec}", trm.metadata, {"d_model": hidden, "backbone": bid, "layer": layer})
        return compressor.float(), trm.float(), layer

    def _make_adapter(self, spec: str, n_soft_vectors: int) -> LatentAdapter:
        embeddings = self.llm.model.get_input_embeddings().weight
        hidden = self.compressor.d_model
        if spec == "linear":
            adapter: LatentAdapter = LinearAdapter.for_embeddings(embeddings, hidden, n_soft_vectors)
        elif spec == "norm_match":
            adapter = NormMatchAdapter.for_embeddings(embeddings, n_soft_vectors)
        else:
            adapter = _load("adapter", spec, LatentAdapter.from_pretrained)
        if adapter.d_model != hidden or adapter.d_embed != embeddings.shape[1]:
            raise ConfigMismatchError(f"adapter {spec} maps D={adapter.d_model} -> E={adapter.d_embed} but the "
                                      f"backbone has D={hidden}, E={embeddings.shape[1]}: use one made for it.")
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
        }

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        if self.target_token is None:
            missing = [p.sample_id for p in getattr(datamodule, "problems", []) if not has_gold(p)]
            if missing:
                raise DataError(f"{len(missing)} problem(s) have no gold answer or tests (e.g. {missing[0]}): "
                                "the answer reward cannot score them; use a dataset with answers.")
        if self.warm_start_steps > 0 and stage == "fit":
            self.correct_answers = datamodule.correct_answers() if hasattr(datamodule, "correct_answers") else {}
            if not self.correct_answers:
                raise DataError("warm_start_steps > 0 needs the LLM's own correct answers: set data.records_dir "
                                "to a datagen output with correct answers, or warm_start_steps: 0.")

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
            part.load_state_dict(_strip_prefix(state, f"{name}."))
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

    # ---- tokens ------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.llm.tokenizer

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def end_ids(self) -> set[int]:
        model_eos = self.llm.model.generation_config.eos_token_id
        ids = {self.tokenizer.eos_token_id, *(model_eos if isinstance(model_eos, list) else [model_eos])}
        return {int(token) for token in ids if token is not None}

    def _pre_length(self, text: str, ids: list[int]) -> int:
        """Prompt tokens up to and including the opening think tag (as datagen stores `hidden_pre`)."""
        head = self._encode(text[: text.rfind(THINK_OPEN) + len(THINK_OPEN)]) if THINK_OPEN in text else ids
        return len(head) if ids[: len(head)] == head else len(ids)

    def tokenize(self, problems: Sequence[Problem]) -> PromptBatch:
        texts = [build_chat_prompt(self.tokenizer, problem, thinking=True) for problem in problems]
        ids = [self._encode(text) for text in texts]
        input_ids, mask = pad_token_ids(ids, self.tokenizer.pad_token_id, self.device)
        return PromptBatch(list(problems), input_ids, mask, [len(i) for i in ids],
                           [self._pre_length(t, i) for t, i in zip(texts, ids)])

    def embed(self, ids: Tensor) -> Tensor:
        return self.llm.model.get_input_embeddings()(ids)

    # ---- the latent path ---------------------------------------------------------------

    @torch.no_grad()
    def pre_states(self, prompts: PromptBatch) -> tuple[Tensor, Tensor]:
        """Each prompt's frozen-LLM states up to and including the opening tag, right-padded: [B, L, D], [B, L]."""
        wants_layer = self.layer != -1
        out = self.llm.model.base_model(input_ids=prompts.input_ids, attention_mask=prompts.mask,
                                        position_ids=position_ids(prompts.mask), use_cache=False,
                                        output_hidden_states=wants_layer)
        states = out.hidden_states[self.layer] if wants_layer else out.last_hidden_state
        width, longest = states.shape[1], max(prompts.pre_lengths)
        pre = states.new_zeros(len(prompts.lengths), longest, states.shape[-1])
        mask = torch.zeros(len(prompts.lengths), longest, dtype=torch.bool, device=states.device)
        for row, (length, pre_length) in enumerate(zip(prompts.lengths, prompts.pre_lengths)):
            begin = width - length
            pre[row, :pre_length] = states[row, begin : begin + pre_length]
            mask[row, :pre_length] = True
        return pre.float(), mask

    def predict_latent(self, pre: Tensor, pre_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """compress -> TRM: (prediction [B, D'], halt_logit [B], steps used [B])."""
        return reason(self.trm, self.compressor.compress(pre), pre_mask, self.hparams.halting)

    @torch.no_grad()
    def reference_latent(self, pre: Tensor, pre_mask: Tensor) -> Tensor:
        x = self.reference_compressor.compress(pre)
        return reason(self.reference_trm, x, pre_mask, self.hparams.halting)[0]

    def latent(self, pre: Tensor, pre_mask: Tensor, repeats: int, noise: Tensor | None = None) -> Latent:
        """The soft vectors [B x repeats, k, E]; with `noise` [B, repeats, D'] each copy gets its own latent."""
        prediction, halt_logit, steps = self.predict_latent(pre, pre_mask)
        extra = 0.0 * halt_logit.float().sum()
        if noise is None:
            soft = self.adapter(self.compressor.decompress(prediction))
            return Latent(prediction, soft.repeat_interleave(repeats, dim=0), steps, extra=extra)
        # the sampled latent is an action: the TRM learns through its log-probability, not through the LLM
        sample = prediction.detach()[:, None, :] + noise
        logp = gaussian_log_prob(sample.float(), prediction.float()[:, None, :], self.hparams.latent_noise_std)
        soft = self.adapter(self.compressor.decompress(sample.flatten(0, 1)))
        return Latent(prediction, soft, steps, latent_logp=logp.flatten(), extra=extra)

    def llm_inputs(self, prompts: PromptBatch, soft: Tensor) -> tuple[Tensor, Tensor]:
        """[prompt embeddings, soft vectors, closing tag] for each of the N = B x repeats rows, and the mask."""
        repeats = soft.shape[0] // prompts.input_ids.shape[0]
        with torch.no_grad():
            prompt = self.embed(prompts.input_ids).repeat_interleave(repeats, dim=0)
            close = self.embed(torch.tensor(self._encode(THINK_CLOSE), device=self.device))
        rows = prompt.shape[0]
        embeds = torch.cat([prompt, soft.to(prompt.dtype), close.expand(rows, -1, -1)], dim=1)
        mask = prompts.mask.repeat_interleave(repeats, dim=0)
        return embeds, torch.cat([mask, mask.new_ones(rows, embeds.shape[1] - mask.shape[1])], dim=1)

    # ---- sampling and scoring ----------------------------------------------------------

    @torch.no_grad()
    def generate(self, embeds: Tensor, mask: Tensor, sample: bool) -> list[list[int]]:
        """Answer token ids per row, ending with the end-of-turn token when the LLM stopped."""
        from transformers import GenerationConfig

        end_ids = self.end_ids()
        # every setting that would change the sampling distribution is pinned, so the
        # log-probabilities of the objective are those of the policy that sampled
        neutral = dict(top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, repetition_penalty=1.0)
        config = GenerationConfig(max_new_tokens=self.hparams.max_answer_tokens, do_sample=sample,
                                  temperature=self.hparams.temperature if sample else None,
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=sorted(end_ids),
                                  **(neutral if sample else {}))
        output = self.llm.model.generate(inputs_embeds=embeds.detach(), attention_mask=mask, generation_config=config)
        return [cut_after_end(row, end_ids) for row in output.tolist()]

    def score(self, problem: Problem, answer_ids: list[int]) -> tuple[float, bool]:
        """(reward, correct) of one answer."""
        if self.target_token is not None:
            correct = bool(answer_ids) and answer_ids[0] == self.target_token
            return float(correct), correct
        if not has_gold(problem):
            raise DataError(f"problem {problem.sample_id} has no gold answer or tests: the answer reward cannot "
                            "score it; use a dataset with answers.")
        text = self.tokenizer.decode(answer_ids, skip_special_tokens=True)
        try:
            correct = bool(check_answer(problem, text))
        except Exception:  # noqa: BLE001 - a checker failure is a wrong answer, never a crash
            correct = False
        formatted = FORMAT_MARKERS.get(problem.kind, "") in text
        return float(correct) + self.hparams.format_reward * float(formatted), correct

    def score_all(self, problems: Sequence[Problem], answers: list[list[int]], group: int) -> tuple[Tensor, Tensor]:
        """Rewards and correctness, [B, G] each."""
        scored = [self.score(problems[row // group], ids) for row, ids in enumerate(answers)]
        rewards = torch.tensor([r for r, _ in scored], dtype=torch.float32, device=self.device)
        correct = torch.tensor([c for _, c in scored], dtype=torch.float32, device=self.device)
        return rewards.view(-1, group), correct.view(-1, group)

    def answer_log_probs(self, embeds: Tensor, mask: Tensor, answers: list[list[int]],
                         temperature: float) -> tuple[Tensor, Tensor]:
        """Teacher-forced log-probabilities [N, T] of the answer tokens after `embeds`, and their mask."""
        ids, answer_mask = pad_token_ids(answers, self.tokenizer.pad_token_id, self.device, side="right")
        with torch.no_grad():
            answer_embeds = self.embed(ids)
        full = torch.cat([embeds, answer_embeds.to(embeds.dtype)], dim=1)
        full_mask = torch.cat([mask, answer_mask], dim=1)
        width = ids.shape[1]
        # the logits at the last closing-tag token and at each answer token but the last
        out = self.llm.model(inputs_embeds=full, attention_mask=full_mask, position_ids=position_ids(full_mask),
                             use_cache=False, logits_to_keep=width + 1)
        logits = out.logits[:, :-1].float() / temperature
        logp = -F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
        return logp, answer_mask

    # ---- training ----------------------------------------------------------------------

    def _exploration_noise(self, batch: int, group: int) -> Tensor | None:
        std = self.hparams.latent_noise_std
        if std <= 0:
            return None
        generator = torch.Generator().manual_seed(step_seed(self.hparams.seed, self.global_step, self.global_rank, 1))
        noise = torch.randn(batch, group, self.compressor.d_compressed, generator=generator) * std
        return noise.to(self.device)

    def _sample(self, prompts: PromptBatch, pre: Tensor, pre_mask: Tensor,
                noise: Tensor | None) -> list[list[int]] | None:
        """G answers per problem from the current latent, sampled with a per-step seed; None when the
        soft vectors are not finite (the step is skipped and counted: sampling from NaN would crash)."""
        group = self.hparams.group_size
        with torch.no_grad():
            latent = self.latent(pre, pre_mask, group, noise)
            embeds, mask = self.llm_inputs(prompts, latent.soft)
        if self._trainer is not None and self.guard.should_skip(self, latent.soft.float().abs().amax()):
            return None
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(step_seed(self.hparams.seed, self.global_step, self.global_rank, 0))
            return self.generate(embeds, mask, sample=True)

    def grpo_loss(self, prompts: PromptBatch, pre: Tensor, pre_mask: Tensor, answers: list[list[int]],
                  advantages: Tensor, noise: Tensor | None, old: dict[str, Tensor] | None) -> tuple[Tensor, dict]:
        """The clipped policy loss (+ latent term, + KL) with gradient; `old` holds the sampling policy's log-probs."""
        hp = self.hparams
        latent = self.latent(pre, pre_mask, hp.group_size, noise)
        embeds, mask = self.llm_inputs(prompts, latent.soft)
        logp, answer_mask = self.answer_log_probs(embeds, mask, answers, hp.temperature)
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
        kl = gaussian_kl(latent.prediction.float(), self.reference_latent(pre, pre_mask).float(),
                         hp.latent_noise_std or 1.0).mean()
        if hp.kl_coef > 0:
            loss = loss + hp.kl_coef * kl
        stats.update(kl=kl.detach(), trm_steps=latent.steps_used.float().mean())
        return loss + latent.extra, {"stats": stats, "old": current}

    def grpo_step(self, problems: list[Problem]) -> dict[str, Tensor]:
        hp = self.hparams
        prompts = self.tokenize(problems)
        pre, pre_mask = self.pre_states(prompts)
        noise = self._exploration_noise(len(problems), hp.group_size)
        answers = self._sample(prompts, pre, pre_mask, noise)
        if answers is None:
            return {}
        rewards, correct = self.score_all(problems, answers, hp.group_size)
        advantages = group_advantages(rewards)
        old, stats, loss = None, {}, None
        for _ in range(hp.updates_per_batch):
            loss, out = self.grpo_loss(prompts, pre, pre_mask, answers, advantages, noise, old)
            old = old or out["old"]
            stats = out["stats"]
            self.optimize(loss)
        lengths = torch.tensor([len(a) for a in answers], dtype=torch.float32, device=self.device)
        stats.update(loss=loss.detach(), reward_mean=rewards.mean(), reward_std=rewards.std(unbiased=False),
                     reward_group_std=rewards.std(dim=1, unbiased=False).mean(), accuracy=correct.mean(),
                     equal_reward_share=equal_reward_share(rewards), answer_length=lengths.mean())
        return stats

    def warm_start_step(self, problems: list[Problem]) -> dict[str, Tensor]:
        """Teacher forcing: maximise the likelihood of the LLM's own correct answers given the soft vectors."""
        known = [p for p in problems if p.sample_id in self.correct_answers]
        chosen = known or problems[:1]  # no known answer on this rank: a zero-weight step keeps DDP in step
        prompts = self.tokenize(chosen)
        pre, pre_mask = self.pre_states(prompts)
        latent = self.latent(pre, pre_mask, 1)
        embeds, mask = self.llm_inputs(prompts, latent.soft)
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        targets = [(self._encode(self.correct_answers.get(p.sample_id, "")) + eos)[: self.hparams.max_answer_tokens]
                   for p in chosen]
        logp, answer_mask = self.answer_log_probs(embeds, mask, targets, 1.0)
        nll = -(logp * answer_mask).sum(1) / answer_mask.sum(1).clamp_min(1)
        loss = nll.mean() * (1.0 if known else 0.0) + latent.extra
        self.optimize(loss)
        return {"loss": loss.detach(), "warm_start_nll": nll.mean().detach(),
                "answer_length": answer_mask.sum(1).float().mean()}

    def training_step(self, batch: list[Problem], batch_idx: int) -> dict[str, Tensor] | None:
        step = self.global_step  # the step the batch was drawn at (optimizing advances it)
        in_warm_start = step < self.warm_start_steps
        stats = self.warm_start_step(batch) if in_warm_start else self.grpo_step(batch)
        if not stats:  # skipped: non-finite soft vectors
            self.log("train/nonfinite_steps", float(self.guard.skipped_total), on_step=True, on_epoch=False)
            return None
        self._log_training(stats, len(batch), in_warm_start, step)
        return {"loss": stats["loss"]}

    def _log_training(self, stats: dict[str, Tensor], batch_size: int, in_warm_start: bool, step: int) -> None:
        names = sorted(stats)
        values = torch.stack([stats[name].detach().float().reshape(()) for name in names])
        if self.trainer.world_size > 1:  # one all-reduce for every scalar
            values = self.trainer.strategy.reduce(values, reduce_op="mean")
        logged = dict(zip(names, values.tolist()))
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "curriculum_state"):
            curriculum = datamodule.curriculum_state(step)
            logged.update({f"curriculum_{name}": value for name, value in curriculum.items()})
        logged.update(nonfinite_steps=float(self.guard.skipped_total), warm_start=float(in_warm_start))
        for name, value in logged.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=batch_size,
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
        prompts = self.tokenize(problems)
        pre, pre_mask = self.pre_states(prompts)
        embeds, mask = self.llm_inputs(prompts, self.latent(pre, pre_mask, 1).soft)
        return self.generate(embeds, mask, sample=False)

    def validation_step(self, batch: list[Problem], batch_idx: int) -> None:
        answers = self.answer_greedily(batch)
        rewards, correct = self.score_all(batch, answers, 1)
        lengths = torch.tensor([len(a) for a in answers], dtype=torch.float32, device=self.device)
        for name, value in (("accuracy", correct.mean()), ("reward", rewards.mean()), ("answer_length", lengths.mean())):
            self.log(f"val/{name}", value, on_epoch=True, batch_size=len(batch), sync_dist=True,
                     prog_bar=name == "accuracy")
