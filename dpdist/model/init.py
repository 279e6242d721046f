"""How a model trained from scratch starts (GPT-2's scheme, for every architecture here)."""
from __future__ import annotations

import math

import torch

from ..parallel.layers import normal
from .config import ModelConfig


class Initialiser:
    """N(0, 0.02^2) weights drawn from one generator seeded by ``model.init_seed``, in the order the
    model's layers ask for them, so every tensor degree starts from the same full weights.  ``out``:
    residual projections, scaled by depth; ``tokens``: a vocabulary table, drawn for ``vocab_size``
    rows and zero in the rows that only pad it for the tensor split."""

    def __init__(self, cfg: ModelConfig):
        self.cfg, self.generator = cfg, torch.Generator().manual_seed(cfg.init_seed)

    def __call__(self, shape: tuple[int, ...], std: float = 0.02) -> torch.Tensor:
        return normal(shape, std, self.generator)

    def out(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self(shape, 0.02 / math.sqrt(2 * self.cfg.n_layers))

    def tokens(self, shape: tuple[int, ...]) -> torch.Tensor:
        table = torch.zeros(shape)
        table[: self.cfg.vocab_size] = self((self.cfg.vocab_size, shape[1]))
        return table
