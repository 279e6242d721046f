"""Column-, row- and vocab-parallel layers and norm layers, with a seam for deferred weight gradients.

Every layer here can run in two ways.  With ``grad_tap = None`` it is ordinary PyTorch.  With a tap
attached, the backward computes only the gradient with respect to the layer's *input* and hands the
tensors a weight gradient is made from (input activations and output gradients) to
``grad_tap.record(layer, site, **tensors)`` instead of forming the weight gradient itself, when
``grad_tap.defer_weight_grad`` is true.  Someone else (the privacy engine, a zero-bubble pipeline
schedule) then forms the weight gradient later, once, in whatever weighted form it needs.  This module
knows nothing of why.

Parameters carry their sharding facts so later consumers read them instead of guessing:
``tensor_model_parallel`` (sharded over the tensor group or replicated), ``partition_dim``,
``full_shape`` and ``partition_offset`` (where the local shard sits in the full tensor).
Initialisation builds the full weight from a generator and slices it, so every tensor degree starts
from the same model.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .mappings import (copy_to_tensor_parallel_region, group_rank, group_size,
                       reduce_from_tensor_parallel_region)

Init = Callable[[tuple[int, ...]], torch.Tensor]


def normal(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    """A full weight of N(0, std^2) draws; none for a model built on the meta device, whose weights are
    read from a checkpoint afterwards (drawing them would cost time and a full tensor of memory)."""
    if torch.get_default_device().type == "meta":
        return torch.empty(shape)
    return torch.randn(shape, generator=generator) * std


def _shard(full: torch.Tensor, dim: int, group) -> tuple[torch.Tensor, int]:
    size, rank = group_size(group), group_rank(group)
    if full.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} does not split over {size} ranks")
    local = full.shape[dim] // size
    return full.narrow(dim, rank * local, local).clone(), rank * local


def _make_param(full: torch.Tensor, group, partition_dim: int | None) -> nn.Parameter:
    """A parameter holding this rank's shard of ``full`` (or all of it), marked with its sharding."""
    if partition_dim is None or group_size(group) == 1:
        data, offset = full.clone(), 0
    else:
        data, offset = _shard(full, partition_dim, group)
    param = nn.Parameter(data)
    param.tensor_model_parallel = partition_dim is not None and group_size(group) > 1
    param.partition_dim = partition_dim if param.tensor_model_parallel else None
    param.partition_offset = offset
    param.full_shape = tuple(full.shape)
    return param


def _defers(layer) -> bool:
    tap = layer.grad_tap
    return tap is not None and tap.defer_weight_grad


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _autocast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The operands of a matmul as autocast hands them to it (in its dtype while it is on, as they are
    otherwise).  A Function saves these, not the fp32 originals: its backward's matmuls then run in
    the forward's dtype, and the tap records the values the forward multiplied."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.dtype != torch.float64 else t for t in tensors)  # autocast's rule


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        x, weight, bias = _autocast(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.has_bias = layer, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        if _defers(ctx.layer):
            ctx.layer.grad_tap.record(ctx.layer, "linear", inputs=x, grad_outputs=grad_out)
            return grad_x, None, None, None
        grad_w = _flat(grad_out).t() @ _flat(x)
        grad_b = _flat(grad_out).sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


class _AddBiasFn(torch.autograd.Function):
    """``y + b`` whose bias gradient is left to the tap (the row-parallel bias is added after the reduce)."""

    @staticmethod
    def forward(ctx, y, bias, layer):
        ctx.layer = layer
        return y + bias

    @staticmethod
    def backward(ctx, grad_out):
        if _defers(ctx.layer):
            return grad_out, None, None
        return grad_out, _flat(grad_out).sum(0), None


class _LinearBase(nn.Module):
    grad_tap = None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class ColumnParallelLinear(_LinearBase):
    """``Y = X W^T + b`` with W split along its output rows; input replicated, output sharded."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, tp_group=None,
                 init: Init = None):
        super().__init__()
        self.in_features, self.out_features, self.tp_group = in_features, out_features, tp_group
        init = init or (lambda shape: torch.zeros(shape))
        self.weight = _make_param(init((out_features, in_features)), tp_group, 0)
        self.bias = _make_param(torch.zeros(out_features), tp_group, 0) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tensor_parallel_region(x, self.tp_group)
        if self.grad_tap is None:
            return F.linear(x, self.weight, self.bias)
        return _LinearFn.apply(x, self.weight, self.bias, self)


class RowParallelLinear(_LinearBase):
    """``Y = sum_r X_r W_r^T + b`` with W split along its input columns; the bias is replicated and
    added after the reduce, so its gradient is the full output gradient on every rank."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, tp_group=None,
                 init: Init = None):
        super().__init__()
        self.in_features, self.out_features, self.tp_group = in_features, out_features, tp_group
        init = init or (lambda shape: torch.zeros(shape))
        self.weight = _make_param(init((out_features, in_features)), tp_group, 1)
        self.bias = _make_param(torch.zeros(out_features), tp_group, None) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_tap is None:
            y = reduce_from_tensor_parallel_region(F.linear(x, self.weight), self.tp_group)
            return y if self.bias is None else y + self.bias
        y = reduce_from_tensor_parallel_region(_LinearFn.apply(x, self.weight, None, self), self.tp_group)
        return y if self.bias is None else _AddBiasFn.apply(y, self.bias, self)


class _EmbedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_ids, weight, layer):
        ctx.save_for_backward(local_ids)
        ctx.layer, ctx.num_rows = layer, weight.shape[0]
        valid = local_ids >= 0
        return F.embedding(local_ids.clamp(min=0), weight) * valid.unsqueeze(-1).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (local_ids,) = ctx.saved_tensors
        if _defers(ctx.layer):
            ctx.layer.grad_tap.record(ctx.layer, "embed", ids=local_ids, grad_outputs=grad_out)
            return None, None, None
        valid = local_ids.reshape(-1) >= 0
        grad_w = grad_out.new_zeros(ctx.num_rows, grad_out.shape[-1])
        grad_w.index_add_(0, local_ids.reshape(-1)[valid], _flat(grad_out)[valid])
        return None, grad_w, None


class _ProjectFn(torch.autograd.Function):
    """Logits from a (tied) embedding table: ``Z = H E^T`` on this rank's vocabulary rows."""

    @staticmethod
    def forward(ctx, h, weight, layer):
        h, weight = _autocast(h, weight)
        ctx.save_for_backward(h, weight)
        ctx.layer = layer
        return h @ weight.t()

    @staticmethod
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors
        grad_h = grad_out @ weight
        if _defers(ctx.layer):
            ctx.layer.grad_tap.record(ctx.layer, "project", inputs=h, grad_outputs=grad_out)
            return grad_h, None, None
        return grad_h, _flat(grad_out).t() @ _flat(h), None


class VocabParallelEmbedding(nn.Module):
    """An embedding table whose rows (the vocabulary) are split over the tensor group.

    ``forward(ids)`` looks tokens up; ``project(h)`` uses the same table as the output layer (weight
    tying, declared with ``tied_output=True``) and returns this rank's slice of the logits.  Ids outside the local rows, and the
    ``padding_idx`` token, produce zeros and receive no gradient.  With ``tp_group=None`` the table is
    replicated (used for position embeddings).
    """

    grad_tap = None

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group=None, padding_idx: int | None = None,
                 tied_output: bool = False, init: Init = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_group, self.padding_idx, self.tied_output = tp_group, padding_idx, tied_output
        init = init or (lambda shape: torch.zeros(shape))
        full = init((num_embeddings, embedding_dim))
        if padding_idx is not None:
            full[padding_idx] = 0
        self.weight = _make_param(full, tp_group, 0)
        self.vocab_start = self.weight.partition_offset
        self.vocab_end = self.vocab_start + self.weight.shape[0]

    def local_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids relative to this rank's rows, -1 where the row lives elsewhere or is the padding row."""
        inside = (ids >= self.vocab_start) & (ids < self.vocab_end)
        if self.padding_idx is not None:
            inside &= ids != self.padding_idx
        return torch.where(inside, ids - self.vocab_start, torch.full_like(ids, -1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = self.local_ids(ids)
        if self.grad_tap is None:
            out = F.embedding(local.clamp(min=0), self.weight) * (local >= 0).unsqueeze(-1).to(self.weight.dtype)
        else:
            out = _EmbedFn.apply(local, self.weight, self)
        return reduce_from_tensor_parallel_region(out, self.tp_group)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        if not self.tied_output:
            raise RuntimeError("project() needs a table built with tied_output=True")
        h = copy_to_tensor_parallel_region(h, self.tp_group)
        if self.grad_tap is None:
            return h @ self.weight.t()
        return _ProjectFn.apply(h, self.weight, self)


class _NormFn(torch.autograd.Function):
    """LayerNorm / RMSNorm with an explicit backward so the affine gradients can be deferred.

    LayerNorm runs ATen's fused kernels (``native_layer_norm`` and its backward), the op ``F.layer_norm``
    runs, because the elementwise formula is about ten times slower on CPU (the norm ops in
    ``benchmarks/profile_step.py``'s profile).  The normalised input the tap records is recomputed from the
    kernel's mean and rstd.  RMSNorm keeps the formula, as fast on CPU as torch's own ``rms_norm``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms, layer):
        ctx.rms, ctx.has_bias, ctx.layer = rms, bias is not None, layer
        if rms:
            rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            xhat = x * rstd
            ctx.save_for_backward(xhat, rstd, weight)
            return xhat * weight
        out, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        defers = _defers(ctx.layer)
        if ctx.rms:
            xhat, rstd, weight = ctx.saved_tensors
            g = grad_out * weight
            grad_x = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
            grad_w = None if defers else _flat(grad_out * xhat).sum(0)
            grad_b = None
        else:
            x, mean, rstd, weight, bias = ctx.saved_tensors
            mask = [ctx.needs_input_grad[0], not defers, not defers and ctx.has_bias]
            grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
                grad_out, x, (x.shape[-1],), mean, rstd, weight, bias, mask)
            xhat = (x - mean).mul_(rstd) if defers else None
        if defers:
            ctx.layer.grad_tap.record(ctx.layer, "norm", normalized=xhat, grad_outputs=grad_out)
        return grad_x, grad_w, grad_b, None, None, None


class Norm(nn.Module):
    """LayerNorm (``rms=False``) or RMSNorm (``rms=True``); replicated over the tensor group."""

    grad_tap = None

    def __init__(self, dim: int, *, rms: bool = False, eps: float = 1e-5):
        super().__init__()
        self.dim, self.rms, self.eps = dim, rms, eps
        self.weight = _make_param(torch.ones(dim), None, None)
        self.bias = None if rms else _make_param(torch.zeros(dim), None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_tap is not None:
            return _NormFn.apply(x, self.weight, self.bias, self.eps, self.rms, self)
        if self.rms:
            return F.rms_norm(x, (self.dim,), self.weight, self.eps)
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, rms={self.rms}"
