"""Re-Attention (algorithms.md section 4): attention logits corrected for the DP noise left in the keys.

Why: DP-SGD leaves every weight with noise whose size relative to its gradient signal depends on how
many examples touch it.  The embedding row of a rare token is touched by few, so its key is the most
uncertain, and because ``E[exp(<q, K>)]`` grows with the variance of ``K``, softmax attention drifts
towards exactly the tokens the model knows least ("attention distraction").  Re-Attention estimates
each key's variance and subtracts the bias it causes, ``0.5 * sum_d q_d^2 v_k,d / d_h``, from the
logit before the softmax (the diagonal form of section 4.4).

How: every activation carries a per-coordinate variance next to it.  Its mean is the activation the
forward computes anyway (moment matching by the delta method: ``m_y = f(m_x)``), so only variances
are propagated, under ``torch.no_grad``.  The correction is therefore a constant to autograd and the
backward, with every per-example norm rule, is the ordinary one.  Weights are independent Gaussians
around their current values with the variances of :class:`WeightNoise` (section 4.2).

Privacy: the correction is a function of the current weights (already DP outputs), public
hyperparameters, the example's own tokens (covered by its clipping) and token frequencies, which must
be public or a DP release (``dpdist.privacy.frequencies``; ``dpdist.train.reattention`` resolves them
for a run and builds the :class:`Reattention` the model is constructed with).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..parallel.layers import RowParallelLinear
from ..parallel.mappings import reduce_from_tensor_parallel_region

# Cap on the logit correction.  exp(-1e4) is 0 in every dtype, so the cap changes no attention weight
# that matters, but it keeps an overflowing variance (inf, or inf * 0 = nan deep in a model with a
# very rare token) from turning a whole softmax row into nan.
MAX_CORRECTION = 1e4


@dataclass(frozen=True)
class WeightNoise:
    """Variance of the DP noise in each current weight: ``lambda * sigma_eff^2`` (algorithms.md 4.2).

    ``shared`` is for the weights every example touches (blocks, norms, position embeddings):
    ``sigma_eff = sigma C / B``.  ``tokens[i]`` is for embedding row i, which only about ``B p_i``
    examples of a batch touch while it gets the full noise: ``sigma_eff = sigma C / (B p_i)``.
    """

    shared: float
    tokens: torch.Tensor  # [vocab_size]


@dataclass(frozen=True)
class Reattention:
    """What a model built with Re-Attention corrects its attention for (``noise``) and where
    (``layers``: the indices of the blocks whose logits are corrected)."""

    noise: WeightNoise
    layers: frozenset[int]


def weight_noise(noise_std: float, expected_batch: float, frequencies: torch.Tensor, variance_scale: float,
                 padding_idx: int | None = None) -> WeightNoise | None:
    """The noise model of a run: ``noise_std`` = sigma C (the std of the noise on the summed clipped
    gradient), ``expected_batch`` = qN, ``frequencies`` = p_i in (0, 1], ``variance_scale`` = lambda.

    None when there is no uncertainty (lambda or sigma C is 0): the model then runs plain attention,
    so its output is bit for bit the plain model's, not merely close to it."""
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std (sigma * C) must be a finite number >= 0; got {noise_std}")
    if not (math.isfinite(expected_batch) and expected_batch > 0):
        raise ValueError(f"expected_batch (qN) must be a finite number > 0; got {expected_batch}")
    if not (math.isfinite(variance_scale) and variance_scale >= 0):
        raise ValueError(f"the variance multiplier lambda must be a finite number >= 0; got {variance_scale}")
    frequencies = torch.as_tensor(frequencies).to(torch.float64)
    if frequencies.dim() != 1 or not bool(((frequencies > 0) & (frequencies <= 1)).all()):
        raise ValueError("frequencies must be a 1-D tensor of token frequencies in (0, 1] (clamp them to >= 1/N)")
    if noise_std == 0 or variance_scale == 0:
        return None
    shared_std = noise_std / expected_batch
    tokens = variance_scale * (shared_std / frequencies) ** 2
    if padding_idx is not None:
        tokens[padding_idx] = 0.0  # the lookup zeroes the padding row, whatever noise the row holds
    return WeightNoise(variance_scale * shared_std ** 2, tokens)


@torch.no_grad()
def embedding_variance(noise: WeightNoise, ids: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
    """Variance of token + position embedding, the same in every coordinate (rule 4.3.1)."""
    return (noise.tokens[ids].to(embedded.dtype) + noise.shared).unsqueeze(-1).expand_as(embedded)


@torch.no_grad()
def norm_variance(norm, x: torch.Tensor, var: torch.Tensor, noise: WeightNoise) -> torch.Tensor:
    """LayerNorm / RMSNorm by the delta method with the normaliser of the mean path (rule 4.3.4):
    ``gamma^2 v / (Var_d(m) + eps) + v_gamma xhat^2 + v_beta``."""
    centred = x if norm.rms else x - x.mean(-1, keepdim=True)
    second_moment = centred.pow(2).mean(-1, keepdim=True) + norm.eps
    xhat_sq = centred.pow(2) / second_moment
    out = norm.weight.pow(2) * var / second_moment + noise.shared * xhat_sq
    return out if norm.bias is None else out + noise.shared


@torch.no_grad()
def linear_variance(layer, x: torch.Tensor, var: torch.Tensor, noise: WeightNoise) -> torch.Tensor:
    """``v_y = (W o W) v_x + v_W (||m_x||^2 + sum_j v_x,j) + v_b`` (rule 4.3.2) for this rank's shard.

    A row-parallel layer holds a slice of the input dimension, so its partial sums are all-reduced
    over the tensor group exactly as its mean path is, and its replicated bias is added once after."""
    partial = F.linear(var, layer.weight.pow(2)) + noise.shared * (x.pow(2) + var).sum(-1, keepdim=True)
    if isinstance(layer, RowParallelLinear):
        partial = reduce_from_tensor_parallel_region(partial, layer.tp_group)
    return partial if layer.bias is None else partial + noise.shared


@torch.no_grad()
def gelu_variance(pre: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Exact GELU by the delta method: ``gelu'(m)^2 v`` with ``gelu'(x) = Phi(x) + x phi(x)``."""
    cdf = 0.5 * (1.0 + torch.erf(pre / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * pre.pow(2)) / math.sqrt(2.0 * math.pi)
    return (cdf + pre * pdf).pow(2) * var


@torch.no_grad()
def key_correction(q: torch.Tensor, key_var: torch.Tensor) -> torch.Tensor:
    """``0.5 * q_t^T diag(v_k_s) q_t / d_h`` for every query t and key s, ``[..., T, T]``: the log of
    the factor by which noise in key s inflates ``E[exp(logit)]`` (Gaussian MGF), per head."""
    correction = 0.5 * (q.pow(2) @ key_var.transpose(-1, -2)) / q.shape[-1]
    return correction.nan_to_num(nan=MAX_CORRECTION).clamp(max=MAX_CORRECTION)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           correction: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention with the (constant) ``correction`` subtracted from the scaled logits, and its
    weights, which the variance of the output needs: ``(y, a)`` with ``y = a @ v``."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if correction is not None:
        scores = scores - correction
    T = q.shape[-2]
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return weights @ v, weights


@torch.no_grad()
def attention_output_variance(weights: torch.Tensor, value_var: torch.Tensor) -> torch.Tensor:
    """``v_o,t = sum_s a_ts^2 v_v,s`` with the attention weights treated as constants (rule 4.3.6)."""
    return weights.pow(2) @ value_var
