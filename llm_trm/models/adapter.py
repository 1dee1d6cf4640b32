"""Input adapters (the bridge into the LLM): end-of-thinking states -> k soft input vectors [B, k, E].

The TRM predicts a final-layer hidden state, and the LLM reads input embeddings. The two
live in different spaces: a final-layer state is what `lm_head` reads (SmolLM2-135M's have
norm ~51, its embeddings ~3.2), and feeding one in rescaled carries no more content than its
negation (measured: DESIGN.md, "the way in"). An adapter puts the state where inputs live.

States: every adapter takes `[B, D]` (one state per sample) or `[B, m, D]` with m equal to its
`n_states` (the last m thinking states; `[B, D]` is m = 1); another m is a one-line
ConfigMismatchError. Slots: the k output vectors take the states by adaptive average pooling
over the state axis (`pool_slots`): k = m gives one vector per state, k = 1 the mean of the m,
k > m repeats each state over k / m consecutive slots (so with m = 1 the k vectors start as
k copies; trained parts make them differ).

- `NormMatchAdapter`: no parameters; each state's direction rescaled to the embeddings' mean norm.
- `LinearAdapter`: a learnable map from the m (unit) states to k vectors, initialised as noisy
  norm matching.
- `ConceptAdapter`: no parameters; the training-free "concept token" of Soft Thinking: the
  state's own next-token distribution as a mix of input embeddings, `softmax(lm_head(h) / T) @ E`.
- `BridgeAdapter`: the trainable bridge (Phase 2b): the concept token, times a learned per-slot
  gain and with a learned temperature, plus a residual MLP of the RMS-normalised states whose
  last layer starts at zero, so a fresh bridge is exactly the concept map.

The concept kinds need the frozen LLM's `lm_head` weight [V, D] and input-embedding matrix
[V, E]. They are never part of the adapter's weights: `attach(lm_head_weight, embedding_weight)`
hands them over by reference when the adapter is used with a backbone (`latent.build_adapter`
does it), they stay out of `state_dict()` (so out of `adapter.safetensors` and checkpoints),
`.to()` / `.float()` / `copy.deepcopy` leave them alone, and the saved config records V, D, E
so a mismatching backbone is one line.

All save as `adapter.safetensors` + `config.json` (model_type "latent_adapter", `kind` naming
the class); `LatentAdapter.from_pretrained` returns whichever kind the folder holds.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_trm.errors import ConfigMismatchError
from llm_trm.models.pretrained import PretrainedMixin

__all__ = [
    "ADAPTER_KINDS",
    "BridgeAdapter",
    "ConceptAdapter",
    "LatentAdapter",
    "LinearAdapter",
    "NormMatchAdapter",
    "mean_embedding_norm",
    "pool_slots",
]

# relative size of the noise that makes the k initial copies of a LinearAdapter differ
LINEAR_INIT_NOISE = 0.01


def mean_embedding_norm(embedding_weight: Tensor) -> float:
    """Mean L2 norm of the rows of an input-embedding matrix [V, E] (computed in fp32)."""
    return float(embedding_weight.detach().float().norm(dim=-1).mean())


def _unit(hidden: Tensor) -> Tensor:
    """Directions of [..., D] states (fp32 norm, so bf16 states do not lose the scale)."""
    return F.normalize(hidden.float(), dim=-1).to(hidden.dtype)


def pool_slots(vectors: Tensor, n_slots: int) -> Tensor:
    """[B, m, E] -> [B, k, E]: slot j averages the states it covers (adaptive average pooling)."""
    if vectors.shape[1] == n_slots:
        return vectors
    return F.adaptive_avg_pool1d(vectors.transpose(1, 2), n_slots).transpose(1, 2)


def slot_weights(n_slots: int, n_states: int) -> Tensor:
    """The [k, m] matrix `pool_slots` applies: row j holds slot j's weights over the m states."""
    return pool_slots(torch.eye(n_states)[None], n_slots)[0]


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}.")
    return int(value)


class _Attached:
    """The frozen LLM's lm_head and input-embedding weights, held by reference.

    Not a buffer: never saved, never copied (`deepcopy` shares it, as GRPO's export copies its
    parts), never moved or cast by `Module.to` (they are the LLM's own tensors and move with it).
    """

    def __init__(self, lm_head_weight: Tensor, embedding_weight: Tensor) -> None:
        self.lm_head_weight = lm_head_weight
        self.embedding_weight = embedding_weight

    def __deepcopy__(self, memo: dict) -> _Attached:
        return self

    def on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        return self.lm_head_weight.detach().to(device), self.embedding_weight.detach().to(device)


class LatentAdapter(PretrainedMixin, nn.Module):
    """Base class: states [B, D] or [B, m, D] -> soft input vectors [B, n_vectors, d_embed]."""

    model_type = "latent_adapter"
    weights_name = "adapter.safetensors"
    kind: str = ""
    uses_backbone_head: bool = False  # True: needs `attach(lm_head_weight, embedding_weight)` before use

    d_model: int
    d_embed: int
    n_vectors: int
    n_states: int = 1

    @classmethod
    def _class_for(cls, source: str, config: dict[str, Any]) -> type[LatentAdapter]:
        """Called on the base class, the kind the folder records; on a kind, that kind only."""
        super()._class_for(source, config)  # model_type
        kind = config.get("kind")
        if kind not in ADAPTER_KINDS:
            raise ConfigMismatchError(f"{source} records adapter kind {kind!r}; known: {', '.join(ADAPTER_KINDS)}.")
        target = ADAPTER_KINDS[kind]
        if cls is not LatentAdapter and target is not cls:
            raise ConfigMismatchError(f"{source} holds a {target.__name__}, not a {cls.__name__}.")
        return target

    def states_of(self, hidden: Tensor) -> Tensor:
        """The input as [B, m, D], checked against this adapter's D and m (one line otherwise)."""
        states = hidden[:, None] if hidden.dim() == 2 else hidden
        if states.dim() != 3:
            raise ConfigMismatchError(f"an adapter takes states [B, D] or [B, m, D], got shape {list(hidden.shape)}.")
        if states.shape[-1] != self.d_model:
            raise ConfigMismatchError(f"this {self.kind} adapter maps states of D={self.d_model}, got "
                                      f"D={states.shape[-1]}: use an adapter made for this backbone.")
        if states.shape[1] != self.n_states:
            raise ConfigMismatchError(
                f"this {self.kind} adapter reads m={self.n_states} end-of-thinking state(s) per sample, got "
                f"m={states.shape[1]}: use an adapter built with n_states={states.shape[1]}, or give it "
                f"{self.n_states} state(s)."
            )
        return states

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_embed={self.d_embed}, n_vectors={self.n_vectors}, n_states={self.n_states}"


class NormMatchAdapter(LatentAdapter):
    """Rescale each state to the embeddings' mean norm, pooled onto the k slots. Needs D == E."""

    kind = "norm_match"

    def __init__(self, d_model: int, n_vectors: int = 1, target_norm: float = 1.0, n_states: int = 1) -> None:
        super().__init__()
        self.d_model = self.d_embed = d_model
        self.n_vectors = _positive("n_vectors", n_vectors)
        self.n_states = _positive("n_states", n_states)
        self.target_norm = float(target_norm)
        self.metadata: dict[str, Any] = {}

    @classmethod
    def for_embeddings(cls, embedding_weight: Tensor, n_vectors: int = 1, n_states: int = 1) -> NormMatchAdapter:
        """The adapter for an LLM whose input-embedding matrix is `embedding_weight` [V, E]."""
        return cls(embedding_weight.shape[1], n_vectors, mean_embedding_norm(embedding_weight), n_states)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "d_model": self.d_model, "n_vectors": self.n_vectors,
                "target_norm": self.target_norm, "n_states": self.n_states}

    def forward(self, hidden: Tensor) -> Tensor:
        pooled = pool_slots(_unit(self.states_of(hidden)), self.n_vectors)
        return _unit(pooled) * self.target_norm


class LinearAdapter(LatentAdapter):
    """out_j = sum_i W_ji (h_i / |h_i|) + b_j for the k slots j and m states i: learnable, starts as norm matching.

    Normalising the input first keeps the map independent of the hidden states' scale (which
    differs by layer and backbone), so one init suits every backbone.
    """

    kind = "linear"

    def __init__(self, d_model: int, d_embed: int, n_vectors: int = 1, init_norm: float = 1.0,
                 n_states: int = 1) -> None:
        super().__init__()
        self.d_model, self.d_embed = d_model, d_embed
        self.n_vectors = _positive("n_vectors", n_vectors)
        self.n_states = _positive("n_states", n_states)
        self.init_norm = float(init_norm)
        self.proj = nn.Linear(self.n_states * d_model, self.n_vectors * d_embed)
        self.metadata: dict[str, Any] = {}
        self.reset_parameters()

    @classmethod
    def for_embeddings(cls, embedding_weight: Tensor, d_model: int, n_vectors: int = 1,
                       n_states: int = 1) -> LinearAdapter:
        """A fresh adapter whose initial outputs have the embeddings' mean norm (for m = 1)."""
        return cls(d_model, embedding_weight.shape[1], n_vectors, mean_embedding_norm(embedding_weight), n_states)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Block (slot j, state i) starts as init_norm x pool weight x (identity, or a random isometry
        # when D != E), plus a little noise per slot so the k vectors are not identical.
        block = torch.empty(self.d_embed, self.d_model)
        if self.d_embed == self.d_model:
            nn.init.eye_(block)
        else:
            nn.init.orthogonal_(block)
        weights = slot_weights(self.n_vectors, self.n_states)
        rows = []
        for j in range(self.n_vectors):
            noisy = block + LINEAR_INIT_NOISE * torch.randn_like(block) / self.d_model**0.5
            rows.append(torch.cat([weights[j, i] * noisy for i in range(self.n_states)], dim=1))
        self.proj.weight.copy_(torch.cat(rows) * self.init_norm)
        self.proj.bias.zero_()

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "d_model": self.d_model, "d_embed": self.d_embed, "n_vectors": self.n_vectors,
                "init_norm": self.init_norm, "n_states": self.n_states}

    def forward(self, hidden: Tensor) -> Tensor:
        states = _unit(self.states_of(hidden)).flatten(1)
        out = self.proj(states.to(self.proj.weight.dtype))
        return out.view(states.shape[0], self.n_vectors, self.d_embed)


class ConceptAdapter(LatentAdapter):
    """The concept token: `softmax(lm_head(h) / temperature) @ E`, per state, pooled onto the k slots.

    Needs final-layer states (what `lm_head` reads). The LLM's weights are attached, not saved.
    """

    kind = "concept"
    uses_backbone_head = True

    def __init__(self, d_model: int, d_embed: int, vocab_size: int, n_vectors: int = 1, n_states: int = 1,
                 temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.d_model, self.d_embed, self.vocab_size = d_model, d_embed, _positive("vocab_size", vocab_size)
        self.n_vectors = _positive("n_vectors", n_vectors)
        self.n_states = _positive("n_states", n_states)
        self.temperature = float(temperature)
        self.metadata: dict[str, Any] = {}
        self._attached: _Attached | None = None

    @classmethod
    def for_backbone(cls, lm_head_weight: Tensor, embedding_weight: Tensor, **kwargs: Any) -> ConceptAdapter:
        """An adapter sized for (and attached to) an LLM with these lm_head [V, D] and embedding [V, E] weights."""
        vocab, d_model = lm_head_weight.shape
        adapter = cls(d_model, embedding_weight.shape[1], vocab, **kwargs)
        return adapter.attach(lm_head_weight, embedding_weight)

    def attach(self, lm_head_weight: Tensor, embedding_weight: Tensor) -> ConceptAdapter:
        """Use this LLM's lm_head [V, D] and input embeddings [V, E] (by reference; never saved)."""
        expected = {"lm_head": (self.vocab_size, self.d_model), "input embedding": (self.vocab_size, self.d_embed)}
        for name, weight in (("lm_head", lm_head_weight), ("input embedding", embedding_weight)):
            if tuple(weight.shape) != expected[name]:
                want = expected[name]
                raise ConfigMismatchError(
                    f"this {self.kind} adapter was made for a {name} of V={want[0]} x {want[1]}, but the backbone's "
                    f"is V={weight.shape[0]} x {weight.shape[1]}: use an adapter made for this backbone."
                )
        self._attached = _Attached(lm_head_weight, embedding_weight)
        return self

    @property
    def attached(self) -> bool:
        return self._attached is not None

    def concept(self, states: Tensor, temperature: Tensor | float) -> Tensor:
        """[B, m, D] -> [B, m, E]: each state's next-token distribution as a mix of input embeddings (fp32)."""
        if self._attached is None:
            raise ConfigMismatchError(f"this {self.kind} adapter has no LLM weights attached: load it with "
                                      "llm_trm.latent.build_adapter (or call attach(lm_head_weight, "
                                      "embedding_weight)).")
        lm_head, embeddings = self._attached.on(states.device)
        logits = F.linear(states.to(lm_head.dtype), lm_head).float()
        probs = torch.softmax(logits / temperature, dim=-1)
        return (probs.to(embeddings.dtype) @ embeddings).float()

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "d_model": self.d_model, "d_embed": self.d_embed, "vocab_size": self.vocab_size,
                "n_vectors": self.n_vectors, "n_states": self.n_states, "temperature": self.temperature}

    def forward(self, hidden: Tensor) -> Tensor:
        return pool_slots(self.concept(self.states_of(hidden), self.temperature), self.n_vectors)


class BridgeAdapter(ConceptAdapter):
    """The trainable bridge: gain_j x concept_j (learned temperature) + residual MLP(RMSNorm(states)).

    The residual reads the m RMS-normalised states together ([B, m x D]) and writes all k slots
    ([B, k x E]); `d_hidden = 0` makes it one linear layer. Its last layer starts at zero, the gains
    at 1 and the temperature at `temperature`, so a fresh bridge equals `ConceptAdapter` exactly.
    """

    kind = "bridge"

    def __init__(self, d_model: int, d_embed: int, vocab_size: int, n_vectors: int = 1, n_states: int = 1,
                 temperature: float = 1.0, d_hidden: int = 256) -> None:
        super().__init__(d_model, d_embed, vocab_size, n_vectors, n_states, temperature)
        if d_hidden < 0:
            raise ValueError(f"d_hidden must be >= 0 (0: a linear residual), got {d_hidden}.")
        self.d_hidden = int(d_hidden)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(self.temperature)))
        self.gain = nn.Parameter(torch.ones(self.n_vectors))
        d_in, d_out = self.n_states * d_model, self.n_vectors * d_embed
        if self.d_hidden:
            self.residual = nn.Sequential(nn.Linear(d_in, self.d_hidden), nn.GELU(), nn.Linear(self.d_hidden, d_out))
        else:
            self.residual = nn.Sequential(nn.Linear(d_in, d_out))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.log_temperature.fill_(math.log(self.temperature))
        self.gain.fill_(1.0)
        for layer in self.residual:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        last = self.residual[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "d_hidden": self.d_hidden}

    def forward(self, hidden: Tensor) -> Tensor:
        states = self.states_of(hidden)
        concept = pool_slots(self.concept(states, self.log_temperature.exp()), self.n_vectors)
        base = concept * self.gain[None, :, None]
        normed = F.rms_norm(states.float(), (self.d_model,)).flatten(1)
        last = self.residual[-1]
        residual = self.residual(normed.to(last.weight.dtype)).view(states.shape[0], self.n_vectors, self.d_embed)
        return base + residual.float()


ADAPTER_KINDS: dict[str, type[LatentAdapter]] = {
    NormMatchAdapter.kind: NormMatchAdapter,
    LinearAdapter.kind: LinearAdapter,
    ConceptAdapter.kind: ConceptAdapter,
    BridgeAdapter.kind: BridgeAdapter,
}
