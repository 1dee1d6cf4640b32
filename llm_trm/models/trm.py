"""SequenceTRM: a tiny recursive model that reasons over compressed hidden states.

The input is a right-padded batch of compressed prompt states [B, L, D'] with a
mask. m learnable reasoning tokens (`n_reasoning_tokens`, default 1) are written
right after each sample's last real token; the model then refines an answer state `y` and a latent state `z` with one
small transformer (`TinyRecursiveNetwork`), as in the TRM paper:

    latent recursion:   n times  z <- net(x + y + z);   then  y <- net(y + z)
    deep recursion:     T latent recursions, the first T-1 without gradient
    supervision steps:  up to N_sup deep recursions; the caller detaches y, z
                        between steps and a halt head decides when to stop

The prediction is `y` at the reasoning tokens: with m = 1, [B, D'], the compressed
state at the closing think tag; with m > 1, [B, m, D'], the states of the last m
thinking positions (ending at the closing tag, as datagen's `post_states`). Pure
torch; training logic lives in the LightningModules.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_trm.errors import DataError
from llm_trm.models.pretrained import PretrainedMixin

__all__ = ["HALT_DECISION", "TinyRecursiveNetwork", "SequenceTRM", "TRMState", "TRMOutput", "closing_state"]

INIT_STD = 0.02
# sigmoid(-2) ~ 0.12: a fresh model does not halt at its first step, and the halt
# probability is far enough from saturation for an MSE halt loss to move it.
HALT_BIAS_INIT = -2.0
# a sample stops reasoning once its halt probability exceeds this (SequenceTRM.halts)
HALT_DECISION = 0.5
NORM_EPS = 1e-6


def closing_state(states: Tensor) -> Tensor:
    """The closing think tag's state, from which the first answer token is predicted: a [B, D] prediction
    as is, the last of the m states of a [B, m, D] one."""
    return states[:, -1] if states.ndim == 3 else states


def _check_heads(d_model: int, n_heads: int) -> None:
    if n_heads < 1 or d_model % n_heads != 0:
        raise ValueError(
            f"n_heads ({n_heads}) must be a positive divisor of the model width ({d_model}): "
            f"pick e.g. n_heads={_largest_divisor_at_most(d_model, max(n_heads, 1))}."
        )


def _largest_divisor_at_most(value: int, limit: int) -> int:
    return max(k for k in range(1, min(value, limit) + 1) if value % k == 0)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}.")


def _attention_mask(mask: Tensor) -> Tensor:
    """[B, L] key padding mask -> [B, 1, L, L] boolean SDPA mask (True = may attend).

    Real queries see real keys only. Every query also sees itself, so a padded
    query row (or a sample with no real token) is never fully masked: a fully
    masked softmax row would be NaN. A real query's own key is real, so this adds
    nothing for real rows.
    """
    length = mask.shape[1]
    itself = torch.eye(length, dtype=torch.bool, device=mask.device)
    return (mask[:, None, None, :] | itself).contiguous()


class SelfAttention(nn.Module):
    """Multi-head self-attention over a padded sequence (fused QKV, no biases)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        _check_heads(d_model, n_heads)
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, h: Tensor, attn_mask: Tensor) -> Tensor:
        batch, length, width = h.shape
        head_dim = width // self.n_heads
        # [B, L, 3, H, hd] -> 3 x [B, H, L, hd]
        q, k, v = self.qkv(h).view(batch, length, 3, self.n_heads, head_dim).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(attended.transpose(1, 2).reshape(batch, length, width))


class SwiGLU(nn.Module):
    """Gated MLP: down(silu(gate(h)) * up(h))."""

    def __init__(self, d_model: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = max(1, round(d_model * mlp_ratio))
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model, eps=NORM_EPS)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.mlp_norm = nn.RMSNorm(d_model, eps=NORM_EPS)
        self.mlp = SwiGLU(d_model, mlp_ratio)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, attn_mask: Tensor) -> Tensor:
        h = h + self.drop(self.attn(self.attn_norm(h), attn_mask))
        return h + self.drop(self.mlp(self.mlp_norm(h)))


class TinyRecursiveNetwork(nn.Module):
    """A small pre-norm transformer encoder: [B, L, d] + mask [B, L] -> [B, L, d].

    Padded keys are never attended and padded output positions are set to zero, so
    a sample's real outputs do not depend on the padding around it. Without
    position embeddings the network is permutation-equivariant over real tokens.
    """

    def __init__(
        self,
        d_model: int,
        n_layers: int = 2,
        n_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        use_positions: bool = False,
        max_positions: int = 4096,
    ) -> None:
        super().__init__()
        _check_positive(d_model=d_model, n_layers=n_layers, max_positions=max_positions)
        _check_heads(d_model, n_heads)
        self.d_model = d_model
        self.max_positions = max_positions
        self.positions = nn.Embedding(max_positions, d_model) if use_positions else None
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, mlp_ratio, dropout) for _ in range(n_layers)
        )
        self.final_norm = nn.RMSNorm(d_model, eps=NORM_EPS)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=INIT_STD)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        length = h.shape[1]
        if self.positions is not None:
            if length > self.max_positions:
                raise ValueError(
                    f"sequence length {length} exceeds max_positions ({self.max_positions}): "
                    "raise max_positions or truncate the prompt."
                )
            h = h + self.positions.weight[:length].to(h.dtype)
        attn_mask = _attention_mask(mask.bool())
        for block in self.blocks:
            h = block(h, attn_mask)
        return self.final_norm(h) * mask[..., None].to(h.dtype)


@dataclass
class TRMState:
    """The carry of a SequenceTRM between deep recursions.

    x, mask:          the caller's input [B, L, D'] and right-padding mask [B, L]
    x_aug, mask_aug:  input with the m reasoning tokens written from `reasoning_index` on,
                      [B, L+m, D'] and [B, L+m]; rebuilt by every deep recursion
                      from `x` so the current reasoning-token values are used
    reasoning_index:  [B] position of the first reasoning token (= each sample's length)
    y, z:             answer and latent states [B, L+m, D']
    """

    x: Tensor
    mask: Tensor
    x_aug: Tensor
    mask_aug: Tensor
    reasoning_index: Tensor
    y: Tensor
    z: Tensor

    def detach(self) -> TRMState:
        """Cut the graph through y and z (between supervision steps).

        x and x_aug keep theirs: they are inputs, not carried reasoning state.
        """
        return replace(self, y=self.y.detach(), z=self.z.detach())

    def select(self, rows: Tensor) -> TRMState:
        """The state of a subset of the batch (rows: [K] indices)."""
        return TRMState(*(getattr(self, name)[rows] for name in _STATE_FIELDS))

    def batch_size(self) -> int:
        return self.x.shape[0]


_STATE_FIELDS = ("x", "mask", "x_aug", "mask_aug", "reasoning_index", "y", "z")


@dataclass
class TRMOutput:
    """What `SequenceTRM.forward` returns.

    prediction:       y at the reasoning tokens, frozen at the step a sample halted:
                      [B, D'] with one reasoning token, [B, m, D'] with m > 1
    halt_logit:       [B] the halt logit at that step; halt_prob = sigmoid(halt_logit)
    steps_used:       [B] int64, supervision steps each sample ran (1..N_sup)
    step_predictions: one prediction-shaped tensor per step run; a halted sample
                      repeats its frozen prediction
    """

    prediction: Tensor
    halt_logit: Tensor
    halt_prob: Tensor
    steps_used: Tensor
    step_predictions: list[Tensor] = field(default_factory=list)


class SequenceTRM(PretrainedMixin, nn.Module):
    """Tiny recursive reasoning over a variable-length compressed sequence.

    Reasoning tokens: m of them (`n_reasoning_tokens`), one learnable vector each, written
    after the prompt; y at those m positions is the prediction ([B, D'] for m = 1, exactly
    the single-token model, [B, m, D'] for m > 1). The halt head reads the mean of their
    normalised states, so halting stays one decision per sample.

    Initial state: y starts as the augmented input x_aug (so the answer state at a
    reasoning token starts as the reasoning token itself) and z starts at zero.
    Neither is learned: with T > 1 the first recursions run without gradient, so a
    learned init would never receive one.

    Normalisation: the network works on standardised states. LLM states share a large
    common offset (compressed final-layer states of the embedded model have norm ~50
    but vary by ~2 per dimension around their mean), while the recursion's RMSNorm
    output has RMS 1 per dimension. Buffers hold the training statistics, set once by
    the trainer (`set_normalization`) and saved with the weights: inputs are shifted and
    scaled on the way in, the prediction is mapped back to compressed-state units on the
    way out (per target state when m > 1: `target_mean` and `target_scale` are [m, D']).
    Untouched, the buffers are the identity.
    """

    model_type = "sequence_trm"
    weights_name = "trm.safetensors"

    def __init__(
        self,
        d_compressed: int,
        n_layers: int = 2,
        n_heads: int = 4,
        n_latent_steps: int = 6,
        n_deep_recursions: int = 3,
        n_supervision_steps: int = 8,
        use_positions: bool = False,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        max_positions: int = 4096,
        n_reasoning_tokens: int = 1,
    ) -> None:
        super().__init__()
        _check_positive(
            d_compressed=d_compressed,
            n_latent_steps=n_latent_steps,
            n_deep_recursions=n_deep_recursions,
            n_supervision_steps=n_supervision_steps,
            n_reasoning_tokens=n_reasoning_tokens,
        )
        self.d_compressed = d_compressed
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_latent_steps = n_latent_steps
        self.n_deep_recursions = n_deep_recursions
        self.n_supervision_steps = n_supervision_steps
        self.use_positions = use_positions
        self.mlp_ratio = mlp_ratio
        self.dropout = dropout
        self.max_positions = max_positions
        self.n_reasoning_tokens = n_reasoning_tokens
        self.metadata: dict[str, Any] = {}

        # [D'] for one token (the layout of exports made before m existed), [m, D'] for m
        self.reasoning_token = nn.Parameter(torch.empty(self.prediction_shape))
        # one network updates both z and y, as in the TRM paper
        self.net = TinyRecursiveNetwork(
            d_compressed,
            n_layers=n_layers,
            n_heads=n_heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            use_positions=use_positions,
            # the reasoning tokens add m positions
            max_positions=max_positions + n_reasoning_tokens,
        )
        self.halt_head = nn.Linear(d_compressed, 1)
        self.register_buffer("input_mean", torch.zeros(d_compressed))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("target_mean", torch.zeros(self.prediction_shape))
        self.register_buffer("target_scale", torch.ones(self.prediction_shape))
        self.register_buffer("normalization_fitted", torch.zeros((), dtype=torch.bool))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.reasoning_token, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
        self.net.reset_parameters()
        nn.init.trunc_normal_(self.halt_head.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
        nn.init.constant_(self.halt_head.bias, HALT_BIAS_INIT)

    @property
    def prediction_shape(self) -> tuple[int, ...]:
        """One sample's prediction: (D',) with one reasoning token, (m, D') with m > 1."""
        if self.n_reasoning_tokens == 1:
            return (self.d_compressed,)
        return (self.n_reasoning_tokens, self.d_compressed)

    @torch.no_grad()
    def set_normalization(self, input_mean: Tensor, input_scale: Tensor | float, target_mean: Tensor,
                          target_scale: Tensor) -> None:
        """Training statistics: token mean [D'] and scalar spread of the inputs; mean and std of the targets,
        [D'] or, with m > 1, [m, D'] (one per target state; a [D'] one serves every state).

        Non-finite statistics (NaN/inf in the training states) are refused: they would make every
        prediction non-finite, and they are saved with the weights.
        """
        statistics = {"input_mean": input_mean, "input_scale": input_scale, "target_mean": target_mean,
                      "target_scale": target_scale}
        for name, value in statistics.items():
            if not bool(torch.isfinite(torch.as_tensor(value)).all()):
                raise DataError(
                    f"the TRM's normalisation statistic {name} is not finite (NaN/inf in the training states): "
                    "check the shards with `llm-trm datagen --verify DIR` and regenerate the broken ones."
                )
        self.input_mean.copy_(input_mean)
        self.input_scale.copy_(torch.as_tensor(input_scale).clamp_min(1e-6))
        self.target_mean.copy_(target_mean)
        self.target_scale.copy_(target_scale.clamp_min(1e-6))
        self.normalization_fitted.fill_(True)

    def config(self) -> dict[str, Any]:
        return {
            "d_compressed": self.d_compressed,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_latent_steps": self.n_latent_steps,
            "n_deep_recursions": self.n_deep_recursions,
            "n_supervision_steps": self.n_supervision_steps,
            "use_positions": self.use_positions,
            "mlp_ratio": self.mlp_ratio,
            "dropout": self.dropout,
            "max_positions": self.max_positions,
            "n_reasoning_tokens": self.n_reasoning_tokens,
        }

    # ------------------------------------------------------------------ input

    def augment(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Write the m reasoning tokens after each sample's last real token.

        x [B, L, D'] right-padded, mask [B, L] -> x_aug [B, L+m, D'] (padding zeroed),
        mask_aug [B, L+m] (positions 0..L_i+m-1 real), reasoning_index [B] (= L_i, the first token's).
        """
        m = self.n_reasoning_tokens
        x = x.to(self.reasoning_token.dtype)  # stored states are bf16; compute in the model's dtype
        x = (x - self.input_mean.to(x.dtype)) / self.input_scale.to(x.dtype)
        mask = mask.bool()
        lengths = mask.sum(dim=1)
        positions = torch.arange(x.shape[1] + m, device=x.device)
        if not torch.equal(mask, positions[None, : x.shape[1]] < lengths[:, None]):
            raise ValueError(
                "SequenceTRM expects right-padded input: each mask row must read True...True False...False."
            )
        mask_aug = positions[None, :] < lengths[:, None] + m
        x_aug = F.pad(x * mask[..., None].to(x.dtype), (0, 0, 0, m))
        for slot, token in enumerate(self.reasoning_token.view(m, -1)):
            x_aug = torch.where((positions[None, :] == lengths[:, None] + slot)[..., None], token, x_aug)
        return x_aug, mask_aug, lengths

    def initial_state(self, x: Tensor, mask: Tensor) -> TRMState:
        """y = x_aug, z = 0; the initial state carries no graph."""
        x_aug, mask_aug, reasoning_index = self.augment(x, mask)
        y = x_aug.detach()
        return TRMState(x, mask.bool(), x_aug, mask_aug, reasoning_index, y, torch.zeros_like(y))

    # -------------------------------------------------------------- recursion

    def latent_recursion(self, x: Tensor, y: Tensor, z: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """n times z <- net(x + y + z); then y <- net(y + z). Returns (y, z)."""
        for _ in range(self.n_latent_steps):
            z = self.net(x + y + z, mask)
        y = self.net(y + z, mask)
        return y, z

    def deep_recursion(self, state: TRMState) -> tuple[TRMState, Tensor, Tensor]:
        """One supervision step: T latent recursions, only the last with gradient.

        Returns (new state, prediction [B, D'] or [B, m, D'], halt_logit [B]). The new
        state's y and z are NOT detached; call `state.detach()` before the next step.
        """
        x_aug, mask_aug, _ = self.augment(state.x, state.mask)
        y, z = state.y, state.z
        with torch.no_grad():
            for _ in range(self.n_deep_recursions - 1):
                y, z = self.latent_recursion(x_aug, y, z, mask_aug)
        y, z = self.latent_recursion(x_aug, y, z, mask_aug)
        normalized = self.read_prediction(y, state.reasoning_index)
        # one halt decision per sample: from the mean of its reasoning tokens' states when m > 1
        halt_logit = self.halt_head(normalized if normalized.ndim == 2 else normalized.mean(1)).squeeze(-1)
        prediction = normalized * self.target_scale.to(normalized.dtype) + self.target_mean.to(normalized.dtype)
        new_state = replace(state, x_aug=x_aug, mask_aug=mask_aug, y=y, z=z)
        return new_state, prediction, halt_logit

    def read_prediction(self, y: Tensor, reasoning_index: Tensor) -> Tensor:
        """y [B, L+m, D'] at each sample's reasoning tokens -> [B, D'] (m = 1) or [B, m, D']."""
        rows = torch.arange(y.shape[0], device=y.device)
        if self.n_reasoning_tokens == 1:
            return y[rows, reasoning_index]
        slots = torch.arange(self.n_reasoning_tokens, device=y.device)
        return y[rows[:, None], reasoning_index[:, None] + slots]

    # -------------------------------------------------------------- halting and inference

    def halts(self, halt_logit: Tensor) -> Tensor:
        """The one halting rule (training, validation, inference, GRPO): stop once sigmoid(logit) > 0.5."""
        return torch.sigmoid(halt_logit.float()) > HALT_DECISION

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        n_supervision_steps: int | None = None,
        halt: bool = True,
    ) -> TRMOutput:
        """Run up to N_sup deep recursions with per-sample halting.

        A sample halts once `halts(halt_logit)`; its prediction is frozen at that step and
        it is left out of later steps (halted samples cost nothing). With halt=False every
        sample runs all steps.

        The steps run without gradient (the state is detached between steps anyway). When
        gradients are enabled, each sample's last step is then run once more, with gradient,
        from the state it entered that step with: `prediction` and `halt_logit` carry the
        graph of exactly one supervision step per sample, at the memory cost of one step.
        """
        n_steps = self.n_supervision_steps if n_supervision_steps is None else n_supervision_steps
        _check_positive(n_supervision_steps=n_steps)
        with torch.no_grad():
            state = self.initial_state(x, mask)
            last_entered = state  # each sample's carry before the last step it ran
            batch = state.batch_size()
            prediction = state.x_aug.new_zeros(batch, *self.prediction_shape)
            halt_logit = state.x_aug.new_zeros(batch)
            steps_used = torch.zeros(batch, dtype=torch.long, device=x.device)
            active = torch.ones(batch, dtype=torch.bool, device=x.device)
            step_predictions: list[Tensor] = []
            for _ in range(n_steps):
                rows = active.nonzero().squeeze(1)
                everyone = len(rows) == batch
                step_input = state if everyone else state.select(rows)
                last_entered = state if everyone else _scatter_state(last_entered, rows, step_input)
                step_state, step_prediction, step_logit = self.deep_recursion(step_input)
                state = step_state.detach() if everyone else _scatter_state(state, rows, step_state.detach())
                prediction = prediction.index_copy(0, rows, step_prediction.to(prediction.dtype))
                halt_logit = halt_logit.index_copy(0, rows, step_logit.to(halt_logit.dtype))
                steps_used[rows] += 1
                step_predictions.append(prediction)
                if halt:
                    active[rows] = ~self.halts(step_logit)
                    if not active.any():
                        break
        if torch.is_grad_enabled():
            # x carries the caller's graph (e.g. a trainable compressor), y and z do not
            _, prediction, halt_logit = self.deep_recursion(replace(last_entered, x=x, mask=mask.bool()))
        return TRMOutput(prediction, halt_logit, torch.sigmoid(halt_logit), steps_used, step_predictions)


def _scatter_state(state: TRMState, rows: Tensor, update: TRMState) -> TRMState:
    """`state` with the carried y, z of `rows` replaced by `update`'s."""
    return replace(
        state,
        y=state.y.index_copy(0, rows, update.y.to(state.y.dtype)),
        z=state.z.index_copy(0, rows, update.z.to(state.z.dtype)),
    )
