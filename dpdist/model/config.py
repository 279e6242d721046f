"""The shape of the GPT-style decoder (``dpdist.model.gpt``), and the checks that it can be built.

Only what the model computes lives here: how it is trained, sharded or made private is configured
elsewhere (``dpdist.config``), so this file depends on nothing else in the package.
"""
from __future__ import annotations

from dataclasses import dataclass

NORMS = ("layernorm", "rmsnorm")
DTYPES = ("float32", "float64", "bfloat16")


@dataclass
class ModelConfig:
    """Shape of the GPT-style decoder; the YAML section ``model``."""

    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    max_seq_len: int = 128
    mlp_ratio: int = 4
    tie_embeddings: bool = True
    norm: str = "layernorm"  # layernorm | rmsnorm
    bias: bool = True
    padding_idx: int | None = None  # token id whose embedding is zero and never trained
    dtype: str = "float32"  # float32 | float64 | bfloat16
    init_seed: int = 0  # public: the initial weights are not private

    def validate(self) -> None:
        """Raise ValueError, naming the ``model.*`` key to change, for a shape that cannot be built."""
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "mlp_ratio"):
            if not getattr(self, key) > 0:
                raise ValueError(f"model.{key} must be > 0; got {getattr(self, key)}")
        if not 0 <= self.init_seed < 2**63:  # torch's generator takes no more
            raise ValueError(f"model.init_seed must be a non-negative integer below 2**63; got {self.init_seed}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be a multiple of model.n_heads ({self.n_heads})")
        if self.padding_idx is not None and not 0 <= self.padding_idx < self.vocab_size:
            raise ValueError(f"model.padding_idx must be in [0, {self.vocab_size}); got {self.padding_idx}")
        for key, allowed in (("norm", NORMS), ("dtype", DTYPES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
