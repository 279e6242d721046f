"""A Llama-style decoder built from the layers in ``dpdist.parallel`` (read it like nanoGPT's model.py).

Pre-norm blocks with RMSNorm, rotary position embeddings (RoPE, optionally with linear or Llama 3
frequency scaling), grouped-query attention (``n_kv_heads`` key/value heads shared by groups of query
heads), a SwiGLU MLP and no biases.  Mistral is this model with a sliding attention window, Qwen2 with
biases on q, k and v.  Module names are Hugging Face's, so a Hugging Face key is ``"model." + ours``
(``lm_head`` stays ``lm_head``) and ``dpdist.model.hf`` maps checkpoints by name.

Heads are split over the tensor group: each rank holds ``n_heads / tp`` query heads and the
``n_kv_heads / tp`` key/value heads they read, so the tensor degree must divide ``n_kv_heads``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..parallel.layers import ColumnParallelLinear, Norm, RowParallelLinear, VocabParallelEmbedding
from ..parallel.mappings import group_size
from .config import ModelConfig
from .init import Initialiser
from .gpt import mask_vocab_padding, padded_vocab_size


def inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """RoPE's inverse frequencies, float32, computed as transformers computes them so that an imported
    model rotates by the very same angles (``rope_scaling``: none, linear or llama3)."""
    dim = cfg.d_model // cfg.n_heads
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float) / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind != "llama3":
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are stretched by factor, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < context / high) * ~(wavelen > context / low)
    return torch.where(medium, smoothed, scaled)


def rotary_tables(inv_freq: torch.Tensor, T: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles of positions 0..T-1, ``[T, head_dim]``; the angles are formed in
    float32 as in transformers (they are public constants, not activations)."""
    positions = torch.arange(T, device=like.device).float()
    freqs = positions[:, None] * inv_freq.to(device=like.device, dtype=torch.float)[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(like.dtype), angles.sin().to(like.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attention_mask(T: int, window: int | None, device) -> torch.Tensor | None:
    """Where query i may attend to key j: causal, and within the last ``window`` positions (itself
    included) when a sliding window is set; None when plain causal attention does."""
    if window is None or T <= window:
        return None
    i, j = torch.arange(T, device=device)[:, None], torch.arange(T, device=device)[None, :]
    return (j <= i) & (i - j < window)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group, init, out_init):
        super().__init__()
        tp = group_size(tp_group)
        self.head_dim = cfg.d_model // cfg.n_heads
        self.local_heads, self.local_kv_heads = cfg.n_heads // tp, cfg.kv_heads // tp
        self.window = cfg.sliding_window
        kv_dim = cfg.kv_heads * self.head_dim
        self.q_proj = ColumnParallelLinear(cfg.d_model, cfg.d_model, bias=cfg.qkv_bias, tp_group=tp_group, init=init)
        self.k_proj = ColumnParallelLinear(cfg.d_model, kv_dim, bias=cfg.qkv_bias, tp_group=tp_group, init=init)
        self.v_proj = ColumnParallelLinear(cfg.d_model, kv_dim, bias=cfg.qkv_bias, tp_group=tp_group, init=init)
        self.o_proj = RowParallelLinear(cfg.d_model, cfg.d_model, bias=False, tp_group=tp_group, init=out_init)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.local_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.local_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.local_kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        group = self.local_heads // self.local_kv_heads  # query head h reads key/value head h // group
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        mask = attention_mask(T, self.window, x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.local_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig, tp_group, init, out_init):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(cfg.d_model, cfg.hidden, bias=False, tp_group=tp_group, init=init)
        self.up_proj = ColumnParallelLinear(cfg.d_model, cfg.hidden, bias=False, tp_group=tp_group, init=init)
        self.down_proj = RowParallelLinear(cfg.hidden, cfg.d_model, bias=False, tp_group=tp_group, init=out_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group, init, out_init):
        super().__init__()
        self.input_layernorm = Norm(cfg.d_model, rms=True, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg, tp_group, init, out_init)
        self.post_attention_layernorm = Norm(cfg.d_model, rms=True, eps=cfg.norm_eps)
        self.mlp = MLP(cfg, tp_group, init, out_init)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    checkpoint_blocks = False  # recompute each layer in the backward while training (train.activation_checkpointing)

    def __init__(self, cfg: ModelConfig, tp_group=None, reattention=None):
        super().__init__()
        if reattention is not None:
            raise ValueError("Re-Attention is implemented for model.arch=gpt only")
        tp = group_size(tp_group)
        if cfg.kv_heads % tp:
            raise ValueError(f"model.n_kv_heads ({cfg.kv_heads}) must be divisible by the tensor degree ({tp})")
        self.cfg, self.tp_group = cfg, tp_group
        init = Initialiser(cfg)
        vocab = padded_vocab_size(cfg.vocab_size, tp)
        self.embed_tokens = VocabParallelEmbedding(vocab, cfg.d_model, tp_group=tp_group, padding_idx=cfg.padding_idx,
                                                   tied_output=cfg.tie_embeddings, init=init.tokens)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp_group, init, init.out) for _ in range(cfg.n_layers))
        self.norm = Norm(cfg.d_model, rms=True, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else ColumnParallelLinear(
            cfg.d_model, vocab, bias=False, tp_group=tp_group, init=init.tokens)
        for table in (self.embed_tokens, self.lm_head):
            if table is not None:  # rows from vocab_size on only pad the vocabulary for the tensor split
                table.weight.unpadded_rows = cfg.vocab_size
        self.inv_freq = inverse_frequencies(cfg)  # a constant of the config: no parameter, no buffer

    @property
    def vocab_start(self) -> int:
        """First vocabulary id of this rank's logits slice."""
        return self.embed_tokens.vocab_start

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V_local]`` (``V_local = V`` on one process) for token ids ``[B, T]``."""
        T = input_ids.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len {self.cfg.max_seq_len}")
        x = self.embed_tokens(input_ids)  # (B, T, d)
        cos, sin = rotary_tables(self.inv_freq, T, x)
        for layer in self.layers:
            if self.checkpoint_blocks and self.training:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        h = self.norm(x)
        logits = self.embed_tokens.project(h) if self.lm_head is None else self.lm_head(h)  # (B, T, V_local)
        return mask_vocab_padding(logits, self.cfg.vocab_size, self.vocab_start)
