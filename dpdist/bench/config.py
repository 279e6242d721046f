"""What a benchmark run is: the model and batch, the memory budgets, and the FLOP count of the
non-private step that the DP/non-private ratio's floor is measured against."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

@dataclass
class BenchConfig:
    layers: int = 4
    d_model: int = 256
    heads: int = 4
    vocab: int = 8000
    seq_len: int = 128
    batch: int = 32
    steps: int = 6
    mlp_ratio: int = 4
    seed: int = 0

    def validate(self) -> None:
        for key in ("layers", "d_model", "heads", "vocab", "seq_len", "batch"):
            if getattr(self, key) <= 0:
                raise ValueError(f"--{key.replace('_', '-')} must be > 0; got {getattr(self, key)}")
        if self.steps < 2:
            raise ValueError(f"--steps must be >= 2 (the first step is excluded as warm-up); got {self.steps}")
        if self.d_model % self.heads:
            raise ValueError(f"--d-model ({self.d_model}) must be a multiple of --heads ({self.heads})")


# ---------------------------------------------------------------------------------------------------
# Memory budgets: a number of MB, "none" (no budget: the engine's default choice per layer, the FLOP
# rule 2T^2 <= pd for flat clipping) or "unlimited" (a budget so large that the time-cost model alone
# chooses).

NONE, UNLIMITED = "none", "unlimited"


def parse_budget(text: str | float | None):
    """``"256"`` -> 256.0 (MB); ``"none"``/None -> ``"none"``; ``"unlimited"``/``"inf"`` -> ``"unlimited"``."""
    if text is None:
        return NONE
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        word = text.strip().lower()
        if word in ("none", "null", ""):
            return NONE
        if word in ("unlimited", "inf", "infinite", "lifted"):
            return UNLIMITED
        try:
            value = float(word)
        except ValueError:
            raise ValueError(f"a memory budget is a number of MB, 'none' or 'unlimited'; got {text!r}") from None
    if math.isinf(value):
        return UNLIMITED
    if value < 0 or math.isnan(value):
        raise ValueError(f"a memory budget must be >= 0 MB; got {text!r}")
    return value


def budget_bytes(budget) -> float | None:
    if budget == NONE:
        return None
    if budget == UNLIMITED:
        return math.inf
    return float(budget) * 2**20


def budget_label(budget, clipping: str = "flat") -> str:
    if budget == NONE:
        return "none (fastest lean)" if clipping == "per_layer" else "none (FLOP rule)"
    if budget == UNLIMITED:
        return "unlimited"
    return f"{budget:g} MB"


# ---------------------------------------------------------------------------------------------------
# FLOPs

def nonprivate_step_flops(cfg: BenchConfig) -> float:
    """Analytic matmul FLOPs of one non-private training step of the benchmark GPT (tied or not).

    Forward, per example of T tokens (2 FLOPs per multiply-add):
      - per layer, the linear layers: 2 T (3d^2 [qkv] + d^2 [attention out] + 2 r d^2 [MLP, r = mlp_ratio]);
      - per layer, attention: 2 T^2 d for Q K^T and 2 T^2 d for (softmax) V, counted over the full
        T x T square (the causal mask is not subtracted);
      - the vocabulary projection: 2 T d V.
    The step is taken as 3x the forward (the backward computes a gradient for the inputs and one for
    the weights of every matmul).  Embedding lookups, norms, softmax, the loss and element-wise work
    are not counted; they are small next to the matmuls here and are memory-bound anyway.
    """
    d, T, L, V, r = cfg.d_model, cfg.seq_len, cfg.layers, cfg.vocab, cfg.mlp_ratio
    linear = 2.0 * T * (3 * d * d + d * d + 2 * r * d * d)
    attention = 4.0 * T * T * d
    forward_per_example = L * (linear + attention) + 2.0 * T * d * V
    return 3.0 * cfg.batch * forward_per_example


# ---------------------------------------------------------------------------------------------------
# The model and the batch

def model_config(cfg: BenchConfig, tie: bool = True):
    from ..model.config import ModelConfig
    return ModelConfig(vocab_size=cfg.vocab, d_model=cfg.d_model, n_layers=cfg.layers, n_heads=cfg.heads,
                       max_seq_len=cfg.seq_len, mlp_ratio=cfg.mlp_ratio, tie_embeddings=tie, dtype="float32",
                       init_seed=cfg.seed)


def make_batch(cfg: BenchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens from a fixed seed: inputs and next-token labels, both (B, T) and contiguous."""
    generator = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq_len + 1), generator=generator)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
