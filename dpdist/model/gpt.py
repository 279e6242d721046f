"""A GPT-style decoder built from the layers in ``dpdist.parallel`` (read it like nanoGPT's model.py).

Pre-norm blocks (LayerNorm or RMSNorm), causal self-attention with heads split over the tensor group,
a GELU MLP, learned position embeddings, and by default an output layer tied to the token embedding.
The model says what it computes; how it is sharded (``tp_group``) and how its gradients are clipped
(a tap attached to its layers from outside) live elsewhere.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..parallel.layers import ColumnParallelLinear, Norm, RowParallelLinear, VocabParallelEmbedding
from ..parallel.mappings import group_size

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """The vocabulary rounded up so it splits evenly over the tensor group; padded logits are masked."""
    return math.ceil(vocab_size / tp_size) * tp_size


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group, init, out_init):
        super().__init__()
        tp = group_size(tp_group)
        self.head_dim = cfg.d_model // cfg.n_heads
        self.local_heads = cfg.n_heads // tp
        # Rows of the fused weight are ordered (head, q|k|v, head_dim), so a split over ranks keeps
        # whole heads together.
        self.qkv = ColumnParallelLinear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias, tp_group=tp_group, init=init)
        self.proj = RowParallelLinear(cfg.d_model, cfg.d_model, bias=cfg.bias, tp_group=tp_group, init=out_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, self.local_heads, 3, self.head_dim)  # (B, T, nh_local, 3, hs)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, nh_local, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, self.local_heads * self.head_dim)  # (B, T, d_local)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group, init, out_init):
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.d_model
        self.fc = ColumnParallelLinear(cfg.d_model, hidden, bias=cfg.bias, tp_group=tp_group, init=init)
        self.proj = RowParallelLinear(hidden, cfg.d_model, bias=cfg.bias, tp_group=tp_group, init=out_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group, init, out_init):
        super().__init__()
        rms = cfg.norm == "rmsnorm"
        self.ln_1 = Norm(cfg.d_model, rms=rms)
        self.attn = CausalSelfAttention(cfg, tp_group, init, out_init)
        self.ln_2 = Norm(cfg.d_model, rms=rms)
        self.mlp = MLP(cfg, tp_group, init, out_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group=None):
        super().__init__()
        self.cfg, self.tp_group = cfg, tp_group
        generator = torch.Generator().manual_seed(cfg.init_seed)

        def init(shape, std=0.02):
            return torch.randn(shape, generator=generator) * std

        def out_init(shape):  # GPT-2: scale residual projections by depth
            return init(shape, 0.02 / math.sqrt(2 * cfg.n_layers))

        vocab = padded_vocab_size(cfg.vocab_size, group_size(tp_group))

        def token_init(shape):
            table = torch.zeros(shape)
            table[: cfg.vocab_size] = init((cfg.vocab_size, shape[1]))
            return table

        self.tok_emb = VocabParallelEmbedding(vocab, cfg.d_model, tp_group=tp_group, padding_idx=cfg.padding_idx,
                                              tied_output=cfg.tie_embeddings, init=token_init)
        self.pos_emb = VocabParallelEmbedding(cfg.max_seq_len, cfg.d_model, init=init)  # replicated
        self.blocks = nn.ModuleList(Block(cfg, tp_group, init, out_init) for _ in range(cfg.n_layers))
        self.ln_f = Norm(cfg.d_model, rms=cfg.norm == "rmsnorm")
        # Tied by default: the same table embeds tokens and scores them, which under DP beats untying
        # (fewer noised coordinates); Phantom Clipping makes its per-example norm exact.
        self.lm_head = None if cfg.tie_embeddings else ColumnParallelLinear(
            cfg.d_model, vocab, bias=False, tp_group=tp_group, init=token_init)

    @property
    def vocab_start(self) -> int:
        """First vocabulary id of this rank's logits slice."""
        return self.tok_emb.vocab_start

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V_local]`` (``V_local = V`` on one process) for token ids ``[B, T]``."""
        B, T = input_ids.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len {self.cfg.max_seq_len}")
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.tok_emb(input_ids) + self.pos_emb(positions)  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        h = self.ln_f(x)
        logits = self.tok_emb.project(h) if self.lm_head is None else self.lm_head(h)  # (B, T, V_local)
        real = self.cfg.vocab_size - self.vocab_start
        if real < logits.shape[-1]:  # mask the padding of the vocabulary
            logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= real, float("-inf"))
        return logits


def strip_vocab_padding(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A full state dict without the rows that pad the vocabulary to a multiple of the tensor degree, so
    that it is the same for every tensor degree."""
    tables = ("tok_emb.weight", "lm_head.weight")
    return {name: t[: cfg.vocab_size] if name in tables else t for name, t in state.items()}


def build_model(cfg: ModelConfig, tp_group=None, device: str | torch.device = "cpu") -> GPT:
    """The model of ``cfg`` on this process (its tensor-parallel shard when ``tp_group`` has several ranks)."""
    cfg.validate()
    return GPT(cfg, tp_group).to(device=device, dtype=DTYPES[cfg.dtype])
