"""The decoders dpdist trains, chosen by ``model.arch``: one class per architecture, one line each in
``ARCHITECTURES``."""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .gpt import GPT, Block
from .llama import DecoderLayer, Llama
from .reattention import Reattention

ARCHITECTURES = {"gpt": GPT, "llama": Llama}
TRANSFORMER_BLOCKS = (Block, DecoderLayer)  # the repeated blocks: what FSDP shards as units and checkpointing recomputes
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def build_model(cfg: ModelConfig, tp_group=None, device: str | torch.device = "cpu",
                reattention: Reattention | None = None) -> nn.Module:
    """The model of ``cfg`` on this process (its tensor-parallel shard when ``tp_group`` has several ranks),
    with Re-Attention when ``reattention`` is given (its token variances already on ``device``; gpt only)."""
    cfg.validate()
    return ARCHITECTURES[cfg.arch](cfg, tp_group, reattention).to(device=device, dtype=DTYPES[cfg.dtype])


def strip_vocab_padding(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A full state dict of ``model`` without the rows that pad its vocabulary tables to a multiple of
    the tensor degree (the parameters marked ``unpadded_rows``), so that it is the same for every
    tensor degree."""
    rows = {name: p.unpadded_rows for name, p in model.named_parameters() if getattr(p, "unpadded_rows", None)}
    return {name: t[: rows[name]] if name in rows else t for name, t in state.items()}
