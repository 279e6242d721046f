"""A GPT-style decoder built from the layers in ``dpdist.parallel`` (read it like nanoGPT's model.py).

Pre-norm blocks (LayerNorm or RMSNorm), causal self-attention with heads split over the tensor group,
a GELU MLP (exact, or GPT-2's tanh approximation), learned position embeddings, and by default an output layer tied to the token embedding.
The model says what it computes; how it is sharded (``tp_group``) and how its gradients are clipped
(a tap attached to its layers from outside) live elsewhere.

Built with a :class:`~dpdist.model.reattention.Reattention`, the blocks also carry the variance of
their activations and the selected blocks subtract the DP-noise key uncertainty from their attention
logits (``dpdist.model.reattention``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..parallel.layers import ColumnParallelLinear, Norm, RowParallelLinear, VocabParallelEmbedding
from ..parallel.mappings import group_size
from . import reattention
from .config import ModelConfig
from .init import Initialiser
from .reattention import Reattention, WeightNoise

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

    def _split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = qkv.shape
        qkv = qkv.view(B, T, self.local_heads, 3, self.head_dim)  # (B, T, nh_local, 3, hs)
        return qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, nh_local, T, hs)

    def _merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = y.shape
        return y.transpose(1, 2).reshape(B, T, self.local_heads * self.head_dim)  # (B, T, d_local)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split_heads(self.qkv(x))
        return self.proj(self._merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True)))

    def forward_with_variance(self, x: torch.Tensor, var: torch.Tensor, noise: WeightNoise,
                              correct: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The output and its variance; with ``correct`` the logits lose the key-noise bias first."""
        q, k, v = self._split_heads(self.qkv(x))
        _, key_var, value_var = self._split_heads(reattention.linear_variance(self.qkv, x, var, noise))
        correction = reattention.key_correction(q, key_var) if correct else None
        y, weights = reattention.attend(q, k, v, correction)
        y_var = self._merge_heads(reattention.attention_output_variance(weights, value_var))
        y = self._merge_heads(y)
        return self.proj(y), reattention.linear_variance(self.proj, y, y_var, noise)


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int, vocab_start: int) -> torch.Tensor:
    """Logits of this rank's vocabulary slice with the rows that only pad the vocabulary at -inf."""
    real = vocab_size - vocab_start
    if real < logits.shape[-1]:
        logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= real, float("-inf"))
    return logits


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group, init, out_init):
        super().__init__()
        hidden = cfg.hidden
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"
        self.fc = ColumnParallelLinear(cfg.d_model, hidden, bias=cfg.bias, tp_group=tp_group, init=init)
        self.proj = RowParallelLinear(hidden, cfg.d_model, bias=cfg.bias, tp_group=tp_group, init=out_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))

    def forward_with_variance(self, x: torch.Tensor, var: torch.Tensor,
                              noise: WeightNoise) -> tuple[torch.Tensor, torch.Tensor]:
        pre = self.fc(x)
        act_var = reattention.gelu_variance(pre, reattention.linear_variance(self.fc, x, var, noise))
        act = F.gelu(pre)
        return self.proj(act), reattention.linear_variance(self.proj, act, act_var, noise)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group, init, out_init):
        super().__init__()
        rms = cfg.norm == "rmsnorm"
        self.ln_1 = Norm(cfg.d_model, rms=rms, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg, tp_group, init, out_init)
        self.ln_2 = Norm(cfg.d_model, rms=rms, eps=cfg.norm_eps)
        self.mlp = MLP(cfg, tp_group, init, out_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def forward_with_variance(self, x: torch.Tensor, var: torch.Tensor, noise: WeightNoise,
                              correct: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Residuals add variances (independence assumed, rule 4.3.5)."""
        h_var = reattention.norm_variance(self.ln_1, x, var, noise)
        out, out_var = self.attn.forward_with_variance(self.ln_1(x), h_var, noise, correct)
        x, var = x + out, var + out_var
        h_var = reattention.norm_variance(self.ln_2, x, var, noise)
        out, out_var = self.mlp.forward_with_variance(self.ln_2(x), h_var, noise)
        return x + out, var + out_var


class GPT(nn.Module):
    checkpoint_blocks = False  # recompute each block in the backward while training (train.activation_checkpointing)

    def __init__(self, cfg: ModelConfig, tp_group=None, reattention: Reattention | None = None):
        super().__init__()
        if reattention is not None:
            if cfg.activation != "gelu":
                raise ValueError("Re-Attention propagates variances through the exact GELU; use model.activation=gelu")
            if tuple(reattention.noise.tokens.shape) != (cfg.vocab_size,):
                raise ValueError(f"the Re-Attention token variances must have one entry per token id, shape "
                                 f"({cfg.vocab_size},); got {tuple(reattention.noise.tokens.shape)}")
            if not reattention.layers or not reattention.layers <= set(range(cfg.n_layers)):
                raise ValueError(f"Re-Attention must correct at least one block, all in [0, {cfg.n_layers}); got "
                                 f"{sorted(reattention.layers)}")
        self.cfg, self.tp_group = cfg, tp_group
        init = Initialiser(cfg)
        vocab = padded_vocab_size(cfg.vocab_size, group_size(tp_group))
        self.tok_emb = VocabParallelEmbedding(vocab, cfg.d_model, tp_group=tp_group, padding_idx=cfg.padding_idx,
                                              tied_output=cfg.tie_embeddings, init=init.tokens)
        self.pos_emb = VocabParallelEmbedding(cfg.max_seq_len, cfg.d_model, init=init)  # replicated
        self.blocks = nn.ModuleList(Block(cfg, tp_group, init, init.out) for _ in range(cfg.n_layers))
        self.ln_f = Norm(cfg.d_model, rms=cfg.norm == "rmsnorm", eps=cfg.norm_eps)
        # Tied by default: the same table embeds tokens and scores them, which under DP beats untying
        # (fewer noised coordinates); Phantom Clipping makes its per-example norm exact.
        self.lm_head = None if cfg.tie_embeddings else ColumnParallelLinear(
            cfg.d_model, vocab, bias=False, tp_group=tp_group, init=init.tokens)
        for table in (self.tok_emb, self.lm_head):
            if table is not None:  # rows from vocab_size on only pad the vocabulary for the tensor split
                table.weight.unpadded_rows = cfg.vocab_size
        # None: plain attention, bit for bit (no Re-Attention, or no noise to correct for)
        self.weight_noise: WeightNoise | None = reattention.noise if reattention is not None else None
        self.reattention_layers = reattention.layers if reattention is not None else frozenset()

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
        noise = self.weight_noise
        # Variances travel only as far as the last corrected block needs them.
        carried = max(self.reattention_layers) + 1 if noise is not None else 0
        var = reattention.embedding_variance(noise, input_ids, x) if carried else None
        for index, block in enumerate(self.blocks):
            if index < carried:
                x, var = block.forward_with_variance(x, var, noise, correct=index in self.reattention_layers)
            elif self.checkpoint_blocks and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        h = self.ln_f(x)
        logits = self.tok_emb.project(h) if self.lm_head is None else self.lm_head(h)  # (B, T, V_local)
        return mask_vocab_padding(logits, self.cfg.vocab_size, self.vocab_start)

