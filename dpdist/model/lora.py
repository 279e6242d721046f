"""LoRA adapters applied to a built model from outside (Hu et al. 2021; torchtitan-style parametrization).

``add_adapters`` replaces each targeted linear layer of the blocks, in its parent module, by a
:class:`LoraLinear` that holds the original layer as ``base`` (frozen) and computes

    y = base(x) + (alpha / rank) * lora_B(lora_A(dropout(x)))

and freezes every other parameter of the model, so the DP step clips, noises and releases the adapters
only.  The adapters are themselves ``dpdist.parallel`` layers, so the existing linear norm rule gives
their exact per-example norms, under tensor parallelism too:

- column-parallel base (output split over the tensor group): ``lora_A`` is replicated (in -> r) and
  ``lora_B`` column-parallel (r -> out); ``lora_B``'s input copy all-reduces the gradient of
  ``lora_A``'s output, so every rank holds ``lora_A``'s full per-example gradient (counted once, on
  tensor rank 0, as every replicated parameter is) and its own shard of ``lora_B``'s;
- row-parallel base (input split): ``lora_A`` is row-parallel (in -> r, its output reduced) and
  ``lora_B`` replicated (r -> out), added after the base's reduce.

``lora_A`` starts as peft's (Kaiming-uniform, a = sqrt(5)), drawn at full shape from a public seed and
then sliced, so every tensor degree starts from the same adapters; ``lora_B`` starts at 0, so the
adapted model computes exactly what the base model computes until the first update.

State-dict names gain ``.base.`` (``blocks.0.attn.qkv.base.weight``) next to ``.lora_A.weight`` and
``.lora_B.weight``; ``merged_state_dict`` folds the adapters into plain weights under the base model's
names, ``adapter_state_dict`` keeps the adapters alone.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..parallel.layers import ColumnParallelLinear, RowParallelLinear
from .config import ALL_LINEAR, LINEAR_NAMES, lora_targets



class LoraLinear(nn.Module):
    """A frozen column- or row-parallel ``base`` plus a trainable rank-``rank`` update; ``init_a(shape)``
    gives ``lora_A``'s full (rank, in_features) weight."""

    def __init__(self, base: ColumnParallelLinear | RowParallelLinear, *, rank: int, alpha: float, dropout: float,
                 init_a):
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, alpha
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if isinstance(base, ColumnParallelLinear):
            self.lora_A = ColumnParallelLinear(base.in_features, rank, bias=False, tp_group=None, init=init_a)
            self.lora_B = ColumnParallelLinear(rank, base.out_features, bias=False, tp_group=base.tp_group)
        else:
            self.lora_A = RowParallelLinear(base.in_features, rank, bias=False, tp_group=base.tp_group, init=init_a)
            self.lora_B = ColumnParallelLinear(rank, base.out_features, bias=False, tp_group=None)
        like = base.weight
        self.lora_A.to(device=like.device, dtype=like.dtype)
        self.lora_B.to(device=like.device, dtype=like.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(self.dropout(x)))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def add_adapters(model: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0, targets: str = ALL_LINEAR,
                 tp_group=None, seed: int = 0) -> list[str]:
    """Wrap every targeted block linear of ``model`` (in place) in a :class:`LoraLinear`, freeze every
    other parameter, and return the wrapped modules' names.  ``tp_group``: the group ``model`` was
    built for; ``seed``: the public seed of ``lora_A``'s initial values."""
    if rank <= 0:
        raise ValueError(f"lora.rank must be > 0; got {rank}")
    if not 0 <= dropout < 1:
        raise ValueError(f"lora.dropout must be in [0, 1); got {dropout}")
    leaves = lora_targets(model.cfg.arch, targets)
    found = [(name, module) for name, module in model.named_modules()
             if name.rsplit(".", 1)[-1] in leaves and isinstance(module, (ColumnParallelLinear, RowParallelLinear))]
    if not found:
        raise ValueError(f"lora.targets {targets!r} matches no linear layer of this model; its block linears are "
                         f"{', '.join(LINEAR_NAMES[model.cfg.arch])}")
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)

    def kaiming_uniform(shape):  # peft's lora_A: nn.Linear's default, U(-1/sqrt(in), 1/sqrt(in))
        return nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=generator)

    for name, base in found:  # named_modules order: the same draws on every tensor rank and degree
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, LoraLinear(base, rank=rank, alpha=alpha, dropout=dropout, init_a=kaiming_uniform))
    return [name for name, _ in found]


ADAPTER_PARTS = ("base", "lora_A", "lora_B")


def _split(key: str) -> tuple[str, str, str] | None:
    """(wrapped module, part, parameter) of a state-dict key inside a :class:`LoraLinear`, else None."""
    parts = key.rsplit(".", 2)
    return tuple(parts) if len(parts) == 3 and parts[1] in ADAPTER_PARTS else None


def merged_state_dict(state: dict[str, torch.Tensor], *, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """A full-shape state dict of an adapted model with W + (alpha / rank) B A written under the base
    model's names (``.base.`` dropped, the adapters gone): it loads into the model without adapters.
    The sum is formed in float64 and rounded once to the weight's dtype."""
    wrapped = {key[: -len(".lora_A.weight")] for key in state if key.endswith(".lora_A.weight")}
    merged = {}
    for key, value in state.items():
        split = _split(key)
        if split is None or split[0] not in wrapped:
            merged[key] = value
            continue
        module, part, param = split
        if part != "base":
            continue
        if param == "weight":
            a, b = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
            if a.shape[0] != rank:
                raise ValueError(f"{module}.lora_A.weight has rank {a.shape[0]}, not lora.rank {rank}; merge with "
                                 "the lora section the weights were trained with")
            update = (b.to(torch.float64) @ a.to(torch.float64)) * (alpha / rank)
            value = (value.to(torch.float64) + update).to(value.dtype)
        merged[f"{module}.{param}"] = value
    return merged


def adapter_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a state dict alone (``...lora_A.weight`` / ``...lora_B.weight``)."""
    return {key: value for key, value in state.items() if ".lora_A." in key or ".lora_B." in key}
