"""A nanoGPT-style GPT in plain torch for the Opacus comparison: Opacus ghost clipping runs on
``nn.Embedding`` / ``nn.Linear`` / ``nn.LayerNorm``, not on dpdist's parallel layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import BenchConfig


class PlainBlock(nn.Module):
    def __init__(self, d: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.mlp_proj = nn.Linear(d, mlp_ratio * d), nn.Linear(mlp_ratio * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.fc(self.ln_2(x))))


class PlainGPT(nn.Module):
    """nanoGPT-style model in plain torch (nn.Embedding / nn.Linear / nn.LayerNorm + SDPA), untied,
    the same shapes and FLOPs as the dpdist GPT: what Opacus ghost clipping can run."""

    def __init__(self, cfg: BenchConfig):
        super().__init__()
        d = cfg.d_model
        self.tok_emb, self.pos_emb = nn.Embedding(cfg.vocab, d), nn.Embedding(cfg.seq_len, d)
        self.blocks = nn.ModuleList(PlainBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, cfg.vocab, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # Opacus needs a batch dimension and a contiguous index tensor for the position lookup.
        positions = torch.arange(idx.shape[1], device=idx.device).expand_as(idx).contiguous()
        x = self.tok_emb(idx) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
