"""The model of a run config on the ``meta`` device: one tensor-parallel rank's shard, without memory.

A shard's shapes come from the model's own constructor, so they are what a rank would hold (vocabulary
padding for the tensor split, replicated norms and biases, LoRA adapters).  The constructor asks its
tensor group for a size and a rank; for a degree T > 1 that group is torch's ``fake`` process group
(every collective a no-op, as in torchtitan's dry runs) of T ranks, entered only while the shard is
built.  The rank-0 shard stands for every rank: the splits are even.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError, RunConfig
from ..model import TRANSFORMER_BLOCKS, build_model
from ..privacy.step import dp_layers
from ..privacy.strategy import Plan, plan_strategies


def planned_vocab_size(cfg: RunConfig) -> int:
    """The embedding rows ``dpdist train`` would give the model, read without the corpus: a pretrained
    model's own; the item count of the generated task; a public tokenizer's size; else the size the
    tokenizer trained on the corpus is asked for (``data.vocab_size``, which it can only undershoot)."""
    if cfg.model.pretrained is not None:
        return cfg.model.vocab_size
    if cfg.data.source == "zipf_items":
        return cfg.data.num_items
    if cfg.data.tokenizer_path is not None:
        from ..data.text_tokenizer import load_text_tokenizer

        return load_text_tokenizer(cfg.data.tokenizer_path).vocab_size
    return cfg.data.vocab_size


@dataclass(eq=False)
class Shard:
    """One tensor-parallel rank's model on the meta device, and its sizes in elements."""

    tensor: int
    model: nn.Module
    params: int  # every parameter of the shard
    trainable: int
    block_params: int  # the largest transformer block's: what FSDP gathers as one unit
    largest_trainable: int  # the largest trainable parameter: the largest noise draw and sum transient
    _plans: dict = field(default_factory=dict, repr=False)

    def plan(self, batch: int, seq_len: int, *, budget_bytes: float | None, per_layer: bool) -> Plan:
        """The engine's strategy choice for this shard, as ``DPStep`` makes it (kept: the layouts and
        suggestions ask for the same few again)."""
        key = (batch, seq_len, budget_bytes, per_layer)
        if key not in self._plans:
            elem_bytes = next(self.model.parameters()).element_size()
            self._plans[key] = plan_strategies(dp_layers(self.model), batch, seq_len, elem_bytes,
                                               budget_bytes=budget_bytes, per_layer=per_layer,
                                               tensor_parallel=self.tensor > 1)
        return self._plans[key]


def build_shard(cfg: RunConfig, tensor: int) -> Shard:
    """Rank 0's shard of ``cfg``'s model (vocabulary as ``planned_vocab_size``) at tensor degree ``tensor``."""
    from ..train.methods import transform_model

    model_cfg = dataclasses.replace(cfg.model, vocab_size=planned_vocab_size(cfg))
    if tensor > 1 and dist.is_initialized():
        raise ConfigError("dpdist plan builds tensor-parallel shards in its own process; run it outside torchrun")
    if tensor > 1:
        from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tensor)
    try:
        group = dist.group.WORLD if tensor > 1 else None
        with torch.device("meta"):
            model = build_model(model_cfg, tp_group=group, device="meta")
            transform_model(cfg, model, group)
    finally:
        if tensor > 1:
            dist.destroy_process_group()
    trainable = [p for p in model.parameters() if p.requires_grad]
    blocks = [m for m in model.modules() if isinstance(m, TRANSFORMER_BLOCKS)]
    return Shard(tensor=tensor, model=model, params=sum(p.numel() for p in model.parameters()),
                 trainable=sum(p.numel() for p in trainable),
                 block_params=max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0),
                 largest_trainable=max((p.numel() for p in trainable), default=0))
