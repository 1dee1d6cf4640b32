"""Input adapters: map a hidden state [B, D] to k soft input vectors [B, k, E] for the LLM.

The TRM predicts a hidden state (final-layer states of SmolLM2-135M have norm ~51),
but the LLM reads input embeddings (norm ~3.2): fed as is, such a vector swamps the
attention of every later token. An adapter puts the prediction where inputs live.

- `NormMatchAdapter`: no learned parameters; the direction of the state, rescaled to
  the mean norm of the embedding matrix's rows, repeated k times.
- `LinearAdapter`: a learnable map to k vectors, initialised as k noisy copies of
  the norm-matching map, so an untrained adapter behaves like `NormMatchAdapter`.

Both save as `adapter.safetensors` + `config.json` (model_type "latent_adapter");
`LatentAdapter.from_pretrained` returns whichever kind the folder holds.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_trm.errors import ConfigMismatchError
from llm_trm.models.pretrained import PretrainedMixin

__all__ = ["LatentAdapter", "NormMatchAdapter", "LinearAdapter", "ADAPTER_KINDS", "mean_embedding_norm"]

# relative size of the noise that makes the k initial copies of a LinearAdapter differ
LINEAR_INIT_NOISE = 0.01


def mean_embedding_norm(embedding_weight: Tensor) -> float:
    """Mean L2 norm of the rows of an input-embedding matrix [V, E] (computed in fp32)."""
    return float(embedding_weight.detach().float().norm(dim=-1).mean())


def _unit(hidden: Tensor) -> Tensor:
    """Directions of [..., D] states (fp32 norm, so bf16 states do not lose the scale)."""
    return F.normalize(hidden.float(), dim=-1).to(hidden.dtype)


class LatentAdapter(PretrainedMixin, nn.Module):
    """Base class: hidden [B, D] -> soft input vectors [B, n_vectors, d_embed]."""

    model_type = "latent_adapter"
    weights_name = "adapter.safetensors"
    kind: str = ""

    d_model: int
    d_embed: int
    n_vectors: int

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

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_embed={self.d_embed}, n_vectors={self.n_vectors}"


class NormMatchAdapter(LatentAdapter):
    """Rescale each state to the embeddings' mean norm; k copies. Needs D == E."""

    kind = "norm_match"

    def __init__(self, d_model: int, n_vectors: int = 1, target_norm: float = 1.0) -> None:
        super().__init__()
        if n_vectors < 1:
            raise ValueError(f"n_vectors must be at least 1, got {n_vectors}.")
        self.d_model = self.d_embed = d_model
        self.n_vectors = n_vectors
        self.target_norm = float(target_norm)
        self.metadata: dict[str, Any] = {}

    @classmethod
    def for_embeddings(cls, embedding_weight: Tensor, n_vectors: int = 1) -> NormMatchAdapter:
        """The adapter for an LLM whose input-embedding matrix is `embedding_weight` [V, E]."""
        return cls(embedding_weight.shape[1], n_vectors, mean_embedding_norm(embedding_weight))

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "d_model": self.d_model, "n_vectors": self.n_vectors, "target_norm": self.target_norm}

    def forward(self, hidden: Tensor) -> Tensor:
        scaled = _unit(hidden) * self.target_norm
        return scaled[:, None, :].expand(-1, self.n_vectors, -1)


class LinearAdapter(LatentAdapter):
    """out_j = W_j (h / |h|) + b_j for j < k: learnable, and starts as norm matching.

    Normalising the input first keeps the map independent of the hidden states'
    scale (which differs by layer and backbone), so one init suits every backbone.
    """

    kind = "linear"

    def __init__(self, d_model: int, d_embed: int, n_vectors: int = 1, init_norm: float = 1.0) -> None:
        super().__init__()
        if n_vectors < 1:
            raise ValueError(f"n_vectors must be at least 1, got {n_vectors}.")
        self.d_model, self.d_embed, self.n_vectors = d_model, d_embed, n_vectors
        self.init_norm = float(init_norm)
        self.proj = nn.Linear(d_model, n_vectors * d_embed)
        self.metadata: dict[str, Any] = {}
        self.reset_parameters()

    @classmethod
    def for_embeddings(cls, embedding_weight: Tensor, d_model: int, n_vectors: int = 1) -> LinearAdapter:
        """A fresh adapter whose initial outputs have the embeddings' mean norm."""
        return cls(d_model, embedding_weight.shape[1], n_vectors, mean_embedding_norm(embedding_weight))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Each of the k blocks starts as init_norm x (identity, or a random isometry when D != E),
        # plus a little noise so the k vectors are not identical.
        block = torch.empty(self.d_embed, self.d_model)
        if self.d_embed == self.d_model:
            nn.init.eye_(block)
        else:
            nn.init.orthogonal_(block)
        blocks = [block + LINEAR_INIT_NOISE * torch.randn_like(block) / self.d_model**0.5 for _ in range(self.n_vectors)]
        self.proj.weight.copy_(torch.cat(blocks) * self.init_norm)
        self.proj.bias.zero_()

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "d_model": self.d_model,
            "d_embed": self.d_embed,
            "n_vectors": self.n_vectors,
            "init_norm": self.init_norm,
        }

    def forward(self, hidden: Tensor) -> Tensor:
        out = self.proj(_unit(hidden).to(self.proj.weight.dtype))
        return out.view(hidden.shape[0], self.n_vectors, self.d_embed)


ADAPTER_KINDS: dict[str, type[LatentAdapter]] = {
    NormMatchAdapter.kind: NormMatchAdapter,
    LinearAdapter.kind: LinearAdapter,
}
