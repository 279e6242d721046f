"""The DP step: micro-batches of one Poisson-sampled logical batch in, one noisy gradient out.

Per micro-batch (design.md steps 2-5): forward; one backward in which every DP-aware layer records
its tensors instead of forming its weight gradient; per-example norms from the norm rules; one
all-reduce of the B-vector of norm contributions over the tensor group; clip factors; the clipped sum
formed once per layer (book-keeping) and accumulated.  Per logical batch (step 6): sum over the
data-parallel group, add N(0, sigma^2 C^2) exactly once per coordinate with keyed noise that every
replica generates identically, divide by the *expected* batch size qN, and leave the result in
``p.grad`` for the optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..parallel.cross_entropy import per_example_loss
from ..parallel.mappings import group_size
from ..config import TWO_PASS_LOW_PRECISION, AnadpConfig, LsgConfig
from ..privacy.anadp import NoiseAllocation
from ..privacy.lsg import LowRankGradients
from ..privacy.clipping import clip_factors, per_layer_threshold
from ..privacy.noise import keyed_normal
from ..privacy.rules import has_rule
from ..privacy.strategy import Plan, plan_strategies
from ..privacy.tap import LOW_PRECISION, PerExampleTap


@dataclass
class MicroBatchStats:
    loss_sum: float  # sum of per-example losses over the real (unmasked) examples with a finite loss
    examples: int
    clipped: int  # examples whose norm exceeded the clip norm
    nonfinite: int = 0  # examples whose norm was not finite: dropped (clip factor 0)


def model_losses(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, tp_group) -> torch.Tensor:
    """The per-example losses (B,) of a batch, vocabulary-parallel when the model is."""
    logits = model(input_ids)
    return per_example_loss(logits, labels, vocab_start=getattr(model, "vocab_start", 0), tp_group=tp_group)


def dp_layers(model: nn.Module) -> list[nn.Module]:
    """The layers that own trainable parameters, each of which must have a norm rule."""
    layers, covered = [], set()
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not has_rule(module):
            params = ", ".join(f"{name}.{n}" for n, p in module.named_parameters(recurse=False) if p.requires_grad)
            raise TypeError(f"trainable parameter(s) {params} of a {type(module).__name__} have no per-example norm "
                            "rule; build the model from dpdist.parallel layers or freeze them")
        layers.append(module)
        covered.update(own)
    return layers


class PrivateGradient:
    """Computes the clipped (and, in ``release``, noised and normalised) gradient of a model.

    ``mode``: ``bookkeeping`` (one backward) or ``two_pass`` (a second, c-weighted backward: less
    memory, more time).  ``clipping``: ``flat``, ``automatic`` or ``per_layer``.  ``strategy`` forces
    every layer with a choice to ``ghost`` or ``materialise``; otherwise ``memory_budget_bytes`` (or,
    without one, the FLOP rule) chooses per layer.
    """

    def __init__(self, model: nn.Module, *, clip_norm: float, noise_multiplier: float = 0.0,
                 expected_batch_size: float = 1.0, secret: int = 0, clipping: str = "flat",
                 automatic_gamma: float = 0.01, mode: str = "bookkeeping", micro_batch_size: int = 1,
                 seq_len: int = 1, memory_budget_bytes: float | None = None, strategy: str | None = None,
                 dp_group=None, tp_group=None, anadp: AnadpConfig | None = None, lsg: LsgConfig | None = None):
        lsg = lsg if lsg is not None and lsg.enabled else None
        if lsg is not None and (clipping == "per_layer" or mode == "two_pass" or (anadp is not None and anadp.enabled)):
            raise ValueError("LSG clips the carriers jointly with the dense parameters in one book-keeping backward: "
                             "use privacy.clipping=flat or automatic, privacy.mode=bookkeeping, and no ANADP")
        if mode == "two_pass" and clipping == "per_layer":
            raise ValueError("per-layer clipping already clips during the backward; use mode='bookkeeping'")
        if mode == "two_pass" and any(p.dtype in LOW_PRECISION for p in model.parameters() if p.requires_grad):
            raise ValueError(TWO_PASS_LOW_PRECISION)
        if anadp is not None and anadp.enabled and clipping != "per_layer":
            raise ValueError("ANADP allocates noise per layer group and needs the groups clipped separately: set "
                             "privacy.clipping=per_layer")
        self.model, self.clip_norm, self.noise_multiplier = model, clip_norm, noise_multiplier
        self.expected_batch_size, self.secret = expected_batch_size, secret
        self.clipping, self.automatic_gamma, self.mode = clipping, automatic_gamma, mode
        self.dp_group, self.tp_group = dp_group, tp_group
        self.names = {p: name for name, p in model.named_parameters() if p.requires_grad}
        self.lsg = LowRankGradients(model, lsg) if lsg is not None else None  # before planning: its rule differs
        layers = dp_layers(model)
        elem_bytes = next(model.parameters()).element_size()
        self.plan: Plan = plan_strategies(layers, micro_batch_size, seq_len, elem_bytes, budget_bytes=memory_budget_bytes,
                                          per_layer=clipping == "per_layer", force=strategy,
                                          tensor_parallel=group_size(tp_group) > 1)
        tap_mode = {"per_layer": "per_layer"}.get(clipping, "norms" if mode == "two_pass" else "bookkeeping")
        layer_clip = per_layer_threshold(clip_norm, len(layers)) if clipping == "per_layer" else None
        self.tap = PerExampleTap(layers, self.plan.strategies, mode=tap_mode, tp_group=tp_group,
                                 layer_clip_norm=layer_clip,
                                 names={module: name for name, module in model.named_modules()}).attach()
        self.allocation = None
        if anadp is not None and anadp.enabled:
            groups = [[p for p in layer.parameters(recurse=False) if p.requires_grad] for layer in layers]
            self.allocation = NoiseAllocation(groups, clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                                              cfg=anadp, tp_group=tp_group)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return model_losses(self.model, input_ids, labels, self.tp_group)

    def microbatch(self, input_ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None, *,
                   last: bool = True) -> MicroBatchStats:
        """Add sum_i c_i grad L_i of this micro-batch to the clipped sums; ``mask`` marks real rows and
        ``last`` the step's final micro-batch (where a backend that reduces during the backward reduces)."""
        losses = self.loss(input_ids, labels)
        real = torch.ones_like(losses, dtype=torch.bool) if mask is None else mask.to(losses.device, torch.bool)
        losses = torch.where(real, losses, 0.0)  # padding rows: a zero loss, even a non-finite one
        self._recording_backward(losses.sum())
        norms = self.tap.take_sq_norms().sqrt()
        if self.clipping != "per_layer":
            clip = clip_factors(norms, self.clip_norm, self.clipping, self.automatic_gamma) * real
            if self.mode == "two_pass":
                if not bool(torch.isfinite(norms[real]).all()):
                    raise FloatingPointError("an example's gradient is not finite, and the second backward of "
                                             "privacy.mode=two_pass cannot leave it out (0 x NaN is NaN); use "
                                             "privacy.mode=bookkeeping, which drops such an example")
                self._weighted_backward(losses, clip, last)
            else:
                self.tap.accumulate_clipped(clip)
        finite = torch.isfinite(norms) & torch.isfinite(losses.detach())
        return MicroBatchStats(loss_sum=float(losses.detach()[real & finite].sum()), examples=int(real.sum()),
                               clipped=int((norms[real] > self.clip_norm).sum()),
                               nonfinite=int((real & ~finite).sum()))

    def _recording_backward(self, loss: torch.Tensor) -> None:
        """The backward in which the layers record for the tap.  ``autograd.grad`` with respect to the
        parameters runs every layer's backward but no gradient accumulation, so a wrapper that reduces
        gradients as they accumulate (DeepSpeed ZeRO) sees nothing of this unclipped pass."""
        params = list(self.names)
        grads = torch.autograd.grad(loss, params, retain_graph=self.mode == "two_pass", allow_unused=True)
        formed = [self.names[p] for p, g in zip(params, grads) if g is not None]
        if formed:
            raise RuntimeError(f"layers formed unclipped weight gradients outside the tap: {', '.join(formed[:3])}")

    def _weighted_backward(self, losses: torch.Tensor, clip: torch.Tensor, last: bool) -> None:
        params = list(self.names)
        for p in params:
            p.grad = None
        self.tap.defer_weight_grad = False
        try:
            torch.autograd.backward(losses, grad_tensors=clip.detach())
        finally:
            self.tap.defer_weight_grad = True
        self.tap.add_to_sums(params)

    def clipped_sums(self) -> dict[str, torch.Tensor]:
        """The accumulated pre-noise clipped sums by parameter name (and reset them)."""
        sums = self.tap.pop_grad_sums()
        return {self.names[p]: sums.get(p, torch.zeros_like(p)) for p in self.names}

    def release(self, release: int, step: int | None = None) -> None:
        """Sum over data-parallel ranks, add keyed noise once per coordinate, divide by qN, set ``p.grad``.
        Under LSG the carriers are what is summed and noised (on their support only), and the update of
        each carried weight is reconstructed from them.

        ``release`` keys the noise: the ledger position of this release, never used for another one.
        ``step`` is the training step, which only public schedules read (ANADP's warm-up, LSG's
        refreshes); it defaults to ``release`` for callers that never compute a step twice."""
        step = release if step is None else step
        sums = self.tap.pop_grad_sums()
        carried = set(self.lsg.layers) if self.lsg is not None else set()
        released = [p for p in self.names if p not in carried] + (self.lsg.carriers() if self.lsg is not None else [])
        grads = [sums.get(p, torch.zeros_like(p, dtype=torch.float32 if p.dtype == torch.bfloat16 else p.dtype))
                 for p in released]
        if group_size(self.dp_group) > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.dp_group)
            grads = [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]
        stds = self.allocation.stds() if self.allocation is not None else None
        noisy = {}
        for p, g in zip(released, grads):
            std = self.allocation.std_of(p, stds) if stds is not None else self.noise_multiplier * self.clip_norm
            if std > 0:
                name = self.names.get(p) or p.carrier_name
                noise = keyed_normal(self.secret, release, name, p.full_shape, shard_box(p), dtype=g.dtype, device=g.device)
                if p not in self.names:
                    noise = noise * self.lsg.mask(p)  # a carrier: noise on its support only
                g = torch.add(g, noise, alpha=std)
            noisy[p] = g
        for p in self.names:
            if p in carried:
                layer = self.lsg.layers[p]
                update = layer.reconstruct(noisy[layer.left], noisy[layer.right])
            else:
                update = noisy[p]
            p.grad = (update / self.expected_batch_size).to(p.dtype)
        if self.allocation is not None:
            self.allocation.observe(step, {p: p.grad for p in self.names})
        if self.lsg is not None:
            self.lsg.after_release(step, {c: noisy[c] for c in self.lsg.carriers()})

    def checkpoint_state(self) -> dict:
        """State beyond model and optimizer that an exact resume needs (ANADP's importance, LSG's
        carriers and supports)."""
        state = self.allocation.checkpoint_state(self.names) if self.allocation is not None else {}
        if self.lsg is not None:
            state.update(self.lsg.checkpoint_state())
        return state

    def detach(self) -> None:
        self.tap.detach()
        if self.lsg is not None:
            self.lsg.detach(self.model)


class NonPrivateGradient:
    """The non-private step in the same shape as ``PrivateGradient`` (the baseline of every ratio):
    the summed per-example losses over qN, backpropagated, then summed over the data group."""

    def __init__(self, model: nn.Module, *, expected_batch_size: float, dp_group=None, tp_group=None):
        self.model, self.expected_batch_size = model, expected_batch_size
        self.dp_group, self.tp_group = dp_group, tp_group

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return model_losses(self.model, input_ids, labels, self.tp_group)

    def microbatch(self, input_ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None, *,
                   last: bool = True) -> MicroBatchStats:
        losses = self.loss(input_ids, labels)
        mask = torch.ones_like(losses) if mask is None else mask.to(losses.dtype)
        losses = losses * mask
        self._backward(losses.sum() / self.expected_batch_size, last)
        return MicroBatchStats(loss_sum=float(losses.detach().sum()), examples=int((mask > 0).sum()), clipped=0)

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def release(self, release: int, step: int | None = None) -> None:
        if group_size(self.dp_group) > 1:
            for p in self.model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=self.dp_group)

    def checkpoint_state(self) -> dict:
        return {}  # nothing beyond model and optimizer


def shard_box(param: nn.Parameter):
    """Where this rank's shard sits inside the full parameter (None when it holds all of it)."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    box = [slice(None)] * len(param.full_shape)
    box[param.partition_dim] = slice(param.partition_offset, param.partition_offset + param.shape[param.partition_dim])
    return tuple(box)
