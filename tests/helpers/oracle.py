"""Brute-force reference for per-example gradients, norms and clipped sums (independent of the engine).

Nothing here imports ``dpdist.privacy``, ``dpdist.train`` or ``dpdist.audit``, and nothing uses the
layers' tap: the model must have no tap attached, so it runs the plain PyTorch path
(``F.linear``, ``F.embedding``, ``F.layer_norm`` / ``F.rms_norm``, ``F.scaled_dot_product_attention``).
The per-example loss is re-derived here as well (log-softmax + gather, mean over the example's
non-ignored target tokens, 0 for an example with none), instead of calling
``dpdist.parallel.cross_entropy``.

Two independent ways to get per-example gradients:

* ``per_example_grads``: ``torch.func.functional_call`` + ``vmap(grad(loss_of_one_example))`` over the
  batch.  This is the default and it works for the whole model in torch 2.13, with one caveat:
  ``F.scaled_dot_product_attention`` on CPU dispatches to ``_scaled_dot_product_flash_attention_for_cpu``
  (and its backward), which has no vmap batching rule, so functorch runs those two ops through its
  generic per-example fallback (a loop inside vmap, warning "There is a performance drop ...";
  the warning is silenced here).  The results are exact, only slower.  ``per_example_grads_loop``
  (``torch.func.grad`` called once per example in a Python loop, no vmap) is what ``method="loop"``
  selects, should a future model contain an op vmap cannot batch at all.
* ``naive_per_example_grads``: an ordinary ``loss_i.backward()`` per example, reading ``p.grad``.

Clipping rules (the specification, algorithms.md §1 and §5.3):

* ``flat``:       c_i = min(1, C / (n_i + 1e-6))
* ``automatic``:  c_i = C / (n_i + gamma)
* ``per_layer``:  groups of parameter names (default: one group per module that owns parameters, see
  ``module_groups``), K groups, C_k = C / sqrt(K); each group is clipped with the flat rule on the
  norm of that group only: c_ik = min(1, C_k / (n_ik + 1e-6)).
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

IGNORE_INDEX = -100
EPS = 1e-6


# ----------------------------------------------------------------------------------------- loss

def example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example loss from logits ``[..., T, V]`` and labels ``[..., T]``: mean token cross-entropy
    over the non-ignored labels (0 when all are ignored).  Written with gather so ``vmap`` can batch it."""
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = torch.log_softmax(logits, dim=-1)
    tok = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * valid.to(logits.dtype)
    count = valid.sum(-1).clamp(min=1).to(logits.dtype)
    return tok.sum(-1) / count


# ------------------------------------------------------------------------------ model plumbing

def _check_untapped(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if getattr(module, "grad_tap", None) is not None:
            raise RuntimeError(f"oracle needs the plain path, but module {name!r} has a grad_tap attached")


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (a tied parameter appears once, as in ``named_parameters``)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def module_groups(model: nn.Module) -> list[list[str]]:
    """Per-layer clipping groups: the trainable parameters of each module that owns some, in module
    order.  A tied embedding is one module, so its one table is one group covering both its uses."""
    groups = []
    for mod_name, module in model.named_modules():
        names = [f"{mod_name}.{n}" if mod_name else n
                 for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if names:
            groups.append(names)
    return groups


# ----------------------------------------------------------------------- per-example gradients

def _one_example_loss_fn(model: nn.Module, frozen: dict[str, torch.Tensor]):
    def loss_one(params: dict[str, torch.Tensor], ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, {**frozen, **params}, (ids.unsqueeze(0),))
        return example_loss(logits, labels.unsqueeze(0))[0]
    return loss_one


def _split_params(model: nn.Module):
    params = {n: p.detach() for n, p in trainable(model).items()}
    frozen = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers()) if n not in params}
    return params, frozen


def per_example_grads(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *,
                      method: str = "vmap") -> dict[str, torch.Tensor]:
    """``{name: [B, *param.shape]}``: gradient of L_i w.r.t. every trainable parameter, per example.

    ``method="vmap"``: ``vmap(grad(L_one))``; ``method="loop"``: ``grad(L_one)`` per example."""
    if method == "loop":
        return per_example_grads_loop(model, input_ids, labels)
    _check_untapped(model)
    params, frozen = _split_params(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        g = vmap(grad(_one_example_loss_fn(model, frozen)), in_dims=(None, 0, 0))(params, input_ids, labels)
    return {n: g[n].detach() for n in params}


def per_example_grads_loop(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Same as ``per_example_grads`` with ``torch.func.grad`` in a Python loop (no vmap)."""
    _check_untapped(model)
    params, frozen = _split_params(model)
    f = grad(_one_example_loss_fn(model, frozen))
    rows = [f(params, input_ids[i], labels[i]) for i in range(input_ids.shape[0])]
    return {n: torch.stack([r[n] for r in rows]).detach() for n in params}


def naive_per_example_grads(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example gradients from an ordinary ``.backward()`` on one example at a time (no torch.func).

    Saves and restores any existing ``.grad``.  A parameter that gets no gradient reads as zeros."""
    _check_untapped(model)
    params = trainable(model)
    saved = {n: p.grad for n, p in params.items()}
    out = {n: [] for n in params}
    try:
        for i in range(input_ids.shape[0]):
            for p in params.values():
                p.grad = None
            logits = model(input_ids[i:i + 1])
            loss = example_loss(logits, labels[i:i + 1])[0]
            if loss.requires_grad:
                loss.backward()
            for n, p in params.items():
                out[n].append(torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
    finally:
        for n, p in params.items():
            p.grad = saved[n]
    return {n: torch.stack(v) for n, v in out.items()}


# ------------------------------------------------------------------------------ norms, clipping

def norms_from_grads(grads: dict[str, torch.Tensor], names: Iterable[str] | None = None) -> torch.Tensor:
    """Per-example L2 norm over the named (default: all) parameters of per-example gradients."""
    names = list(grads) if names is None else list(names)
    sq = sum(grads[n].flatten(1).pow(2).sum(1) for n in names)
    return sq.sqrt()


def per_example_norms(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *,
                      method: str = "vmap") -> torch.Tensor:
    """``[B]``: ||grad L_i|| over all trainable parameters.  ``method``: vmap | loop | naive."""
    return norms_from_grads(_grads(model, input_ids, labels, method))


def clip_factors(norms: torch.Tensor, clip_norm: float, clipping: str = "flat", gamma: float = 0.01) -> torch.Tensor:
    if clipping == "flat":
        return torch.clamp(clip_norm / (norms + EPS), max=1.0)
    if clipping == "automatic":
        return clip_norm / (norms + gamma)
    raise ValueError(f"unknown clipping {clipping!r}")


def clipped_sum_from_grads(grads: dict[str, torch.Tensor], clip_norm: float, clipping: str = "flat",
                           gamma: float = 0.01, per_layer_groups: list[list[str]] | None = None) -> dict[str, torch.Tensor]:
    """sum_i c_i g_i from per-example gradients (see the module docstring for the rules)."""
    if clipping == "per_layer":
        if per_layer_groups is None:
            raise ValueError("per_layer clipping needs per_layer_groups (e.g. module_groups(model))")
        flat_names = [n for g in per_layer_groups for n in g]
        if sorted(flat_names) != sorted(grads):
            raise ValueError("per_layer_groups must partition the trainable parameters exactly")
        threshold = clip_norm / math.sqrt(len(per_layer_groups))
        out = {}
        for group in per_layer_groups:
            c = clip_factors(norms_from_grads(grads, group), threshold, "flat")
            for n in group:
                out[n] = torch.einsum("b,b...->...", c, grads[n])
        return out
    c = clip_factors(norms_from_grads(grads), clip_norm, clipping, gamma)
    return {n: torch.einsum("b,b...->...", c, g) for n, g in grads.items()}


def _grads(model, input_ids, labels, method):
    if method == "naive":
        return naive_per_example_grads(model, input_ids, labels)
    return per_example_grads(model, input_ids, labels, method=method)


def clipped_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, clip_norm: float, *,
                clipping: str = "flat", gamma: float = 0.01, per_layer_groups: list[list[str]] | None = None,
                method: str = "vmap") -> dict[str, torch.Tensor]:
    """Pre-noise clipped sum sum_i c_i grad L_i by parameter name, from ``vmap(grad)`` per-example
    gradients.  ``per_layer_groups=None`` with ``clipping="per_layer"`` uses ``module_groups(model)``."""
    if clipping == "per_layer" and per_layer_groups is None:
        per_layer_groups = module_groups(model)
    grads = _grads(model, input_ids, labels, method)
    return clipped_sum_from_grads(grads, clip_norm, clipping, gamma, per_layer_groups)


def naive_clipped_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, clip_norm: float, *,
                      clipping: str = "flat", gamma: float = 0.01,
                      per_layer_groups: list[list[str]] | None = None) -> dict[str, torch.Tensor]:
    """The same clipped sum from one ordinary ``.backward()`` per example (no torch.func): the third path."""
    return clipped_sum(model, input_ids, labels, clip_norm, clipping=clipping, gamma=gamma,
                       per_layer_groups=per_layer_groups, method="naive")


# ------------------------------------------------------------------------------------ helpers

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / max(||b||, tiny): one number for a whole tensor."""
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def dict_rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest per-parameter relative error between two ``{name: tensor}`` dicts, and its name.
    Parameters whose reference is all zeros are compared in absolute terms."""
    if set(a) != set(b):
        raise AssertionError(f"different parameter names: only in a {set(a) - set(b)}, only in b {set(b) - set(a)}")
    worst, worst_name = 0.0, ""
    for n in b:
        ref = b[n].detach().to(torch.float64)
        diff = float((a[n].detach().to(torch.float64) - ref).norm())
        scale = float(ref.norm())
        err = diff / scale if scale > 0 else diff
        if err > worst:
            worst, worst_name = err, n
    return worst, worst_name


def flat_norm(d: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2 norm of a ``{name: tensor}`` dict viewed as one flat vector."""
    return torch.sqrt(sum(t.detach().to(torch.float64).pow(2).sum() for t in d.values()))


def dict_sub(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: a[n] - b[n] for n in b}


# ------------------------------------------------------------------------- small test fixtures

def tiny_model(*, vocab_size: int = 37, d_model: int = 16, n_layers: int = 2, n_heads: int = 2,
               max_seq_len: int = 16, perturb: float = 0.1, seed: int = 0, reattention=None,
               **overrides) -> nn.Module:
    """A float64 model with small dims (so tokens repeat), with Re-Attention when ``reattention`` (a
    ``dpdist.model.reattention.Reattention``) is given.  ``perturb`` adds N(0, perturb^2) to every
    parameter (LN weights, biases and the padding row included), so that no term vanishes only
    because it starts at exactly 0 or 1."""
    from dpdist import ModelConfig, build_model

    cfg = ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                      max_seq_len=max_seq_len, dtype="float64", **overrides)
    model = build_model(cfg, reattention=reattention)
    if perturb:
        gen = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def tiny_batch(batch: int = 5, seq_len: int = 9, vocab_size: int = 37, seed: int = 0, *,
               repeats: bool = True, ignored: bool = True, empty_example: int | None = 2,
               pad_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels with, optionally: a token repeated in example 0 (positions 1, 3, 5) and
    in the labels; some ignored labels (-100); one example whose labels are all ignored (its
    gradient and norm are 0); pad tokens in the inputs (positions 0, 4 of example 1, the tail of
    example 3) with ignored labels at the padded tail."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=gen)
    labels = torch.randint(0, vocab_size, (batch, seq_len), generator=gen)
    if repeats:
        ids[0, 1] = ids[0, 3] = ids[0, 5] = 7
        ids[1, 2] = ids[1, 6] = 7
        labels[0, 0] = labels[0, 4] = 7  # the repeated token is also a target
    if ignored:
        labels[1, :2] = IGNORE_INDEX
        labels[batch - 1, -1] = IGNORE_INDEX
    if pad_id is not None:
        ids[1, 0] = ids[1, 4] = pad_id
        ids[3, -3:] = pad_id
        labels[3, -3:] = IGNORE_INDEX
    if empty_example is not None:
        labels[empty_example] = IGNORE_INDEX
    return ids, labels


def tiny_case(batch: int, seq_len: int, **overrides) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A ``tiny_model`` with ``overrides`` and a ``tiny_batch`` for it, whose inputs hold pad tokens
    when the model has a ``padding_idx``."""
    model = tiny_model(max_seq_len=seq_len, **overrides)
    ids, labels = tiny_batch(batch, seq_len, pad_id=overrides.get("padding_idx"))
    return model, ids, labels
