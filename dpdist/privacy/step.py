"""The DP step: micro-batches of one Poisson-sampled logical batch in, one noisy gradient out.

Per micro-batch (design.md steps 2-5): forward; one backward in which every DP-aware layer records
its tensors instead of forming its weight gradient; per-example norms from the norm rules; one
all-reduce of the B-vector of norm contributions over the tensor group; clip factors; the clipped sum
formed once per layer (book-keeping) and accumulated.  Per logical batch (step 6): sum over the
data-parallel group with N(0, s^2) added exactly once per coordinate (keyed noise, each data-parallel
rank drawing its own share of the coordinates), divide by the
*expected* batch size qN, and leave the result in ``p.grad`` for the optimizer.

The step knows plain numbers and four seams, each an object chosen by whoever builds it:

- ``reduce``: where the clipped sums are held and how they are summed over the data group:
  ``sums()``, the store the tap accumulates them in (whole, or reduce-scattered into the shards an
  FSDP rank owns); ``recording_backward(loss, params, retain)``, the backward in which the layers
  record for the tap; ``backward(loss, params, last)``, the backward that forms weight gradients
  outside the tap (two-pass); and ``reduce(released, grads)``, the sum over the data group
  (``AllReduce`` here; DeepSpeed's and FSDP's in ``dpdist.train.backends``);
- ``add_noise(release, released, grads, stds)``: this rank's share of the keyed noise, added before
  the sum (``KeyedNoise``: 1/D of the coordinates per data-parallel rank), or on the ZeRO/FSDP
  partition this rank owns;
- ``parametrization``: what is clipped, noised and released for which parameters, and how a released
  value becomes a parameter's update (``Identity``; LSG's carriers in ``dpdist.privacy.lsg``);
- ``noise_scales``: the noise std of every released tensor (``UniformNoise``: sigma C; ANADP's
  allocation in ``dpdist.privacy.anadp``).

Which combinations are valid is decided once, in ``dpdist.config``; the step does not re-check.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..parallel.cross_entropy import per_example_loss
from ..parallel.mappings import group_rank, group_size
from .clipping import clip_factors, per_layer_threshold
from .noise import keyed_normal_slice
from .rules import has_rule
from .strategy import Plan, plan_strategies
from .precision import accumulation_dtype
from .tap import LocalSums, PerExampleTap


@dataclass
class MicroBatchStats:
    loss_sum: float  # sum of per-example losses over the real (unmasked) examples with a finite loss
    examples: int
    clipped: int  # examples whose norm exceeded the clip norm
    nonfinite: int = 0  # examples whose norm was not finite: dropped (clip factor 0)


@dataclass(frozen=True)
class Released:
    """One tensor the step releases: noise is keyed by ``name`` and the coordinates of ``tensor`` in
    its full shape, and drawn only where ``support`` (a bool mask, None: everywhere) is set."""

    name: str
    tensor: torch.Tensor
    support: torch.Tensor | None = None


def model_losses(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, tp_group) -> torch.Tensor:
    """The per-example losses (B,) of a batch, vocabulary-parallel when the model is."""
    logits = model(input_ids)
    return per_example_loss(logits, labels, vocab_start=getattr(model, "vocab_start", 0), tp_group=tp_group)


def dp_layers(model: nn.Module) -> list[nn.Module]:
    """The layers that own trainable parameters, each of which must have a norm rule."""
    layers = []
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if not has_rule(module):
            params = ", ".join(f"{name}.{n}" for n, p in module.named_parameters(recurse=False) if p.requires_grad)
            raise TypeError(f"trainable parameter(s) {params} of a {type(module).__name__} have no per-example norm "
                            "rule; build the model from dpdist.parallel layers or freeze them")
        layers.append(module)
    return layers


def shard_box(tensor: torch.Tensor):
    """Where this rank's shard sits inside the full tensor (None when it holds all of it)."""
    if not getattr(tensor, "tensor_model_parallel", False):
        return None
    box = [slice(None)] * len(tensor.full_shape)
    dim = tensor.partition_dim
    box[dim] = slice(tensor.partition_offset, tensor.partition_offset + tensor.shape[dim])
    return tuple(box)


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(tensor, "full_shape", tensor.shape))


def autograd_recording_backward(loss: torch.Tensor, params: list[nn.Parameter], retain: bool) -> list[bool]:
    """The backward in which the layers record for the tap, by ``autograd.grad`` with respect to the
    parameters: it runs every layer's backward but accumulates no gradient, so a wrapper that reduces
    gradients as they accumulate (DeepSpeed ZeRO) sees nothing of this unclipped pass.  Returns which
    parameters got a gradient anyway (a layer that does not record for the tap)."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return [g is not None for g in grads]


def share_ranges(numels: list[int], rank: int, size: int) -> list[tuple[int, int]]:
    """Rank ``rank`` of ``size``'s share of tensors of ``numels`` elements: the flat range ``(start,
    stop)`` in each tensor of the ``rank``-th of ``size`` near-equal contiguous pieces of all their
    elements laid end to end.  Over the ranks every element is in exactly one share."""
    total = sum(numels)
    low, high = total * rank // size, total * (rank + 1) // size
    ranges, offset = [], 0
    for n in numels:
        ranges.append((min(max(low - offset, 0), n), min(max(high - offset, 0), n)))
        offset += n
    return ranges


class AllReduce:
    """The native reduce seam: clipped sums held whole, gradients outside the tap by ``autograd.grad``,
    and the sum over the data-parallel group by one flat all-reduce."""

    def __init__(self, group=None):
        self.group = group

    def sums(self) -> LocalSums:
        return LocalSums()

    def recording_backward(self, loss: torch.Tensor, params: list[nn.Parameter], retain: bool) -> list[bool]:
        return autograd_recording_backward(loss, params, retain)

    def backward(self, loss: torch.Tensor, params: list[nn.Parameter], last: bool) -> list[torch.Tensor | None]:
        return list(torch.autograd.grad(loss, params, allow_unused=True))

    def __call__(self, released: list[Released], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if group_size(self.group) == 1 or not grads:
            return grads
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group)
        return [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]


class KeyedNoise:
    """The native add_noise seam, before the sum over the data group: data-parallel rank r of D adds the
    keyed noise of its share (``share_ranges``) of the released coordinates, so the sum carries every
    coordinate's noise once and each rank draws 1/D of it.  The noise of a coordinate is keyed by
    (secret, release index, name, index in the full tensor), so D and the tensor split change no value."""

    def __init__(self, secret: int, dp_rank: int = 0, dp_size: int = 1):
        self.secret, self.dp_rank, self.dp_size = secret, dp_rank, dp_size

    def __call__(self, release: int, released: list[Released], grads: list[torch.Tensor],
                 stds: list[float]) -> list[torch.Tensor]:
        noisy = []
        shares = share_ranges([g.numel() for g in grads], self.dp_rank, self.dp_size)
        for item, grad, std, (start, stop) in zip(released, grads, stds, shares):
            if std > 0 and stop > start:
                noise = keyed_normal_slice(self.secret, release, item.name, full_shape(item.tensor),
                                           shard_box(item.tensor), start, stop, dtype=grad.dtype, device=grad.device)
                if item.support is not None:
                    noise = noise * item.support.reshape(-1)[start:stop]
                grad = grad.contiguous()  # its flat view is written in place
                grad.view(-1)[start:stop].add_(noise, alpha=std)
            noisy.append(grad)
        return noisy


class Identity:
    """The parametrization seam's default: every trainable parameter is released as itself."""

    rules: dict = {}

    def released(self, names: dict[nn.Parameter, str]) -> list[Released]:
        return [Released(name, p) for p, name in names.items()]

    def updates(self, noisy: dict[torch.Tensor, torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        return noisy

    def observe(self, step: int, noisy: dict[torch.Tensor, torch.Tensor]) -> None:
        pass  # nothing chosen from what was released

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass  # no state


class UniformNoise:
    """The noise_scales seam's default: std sigma C on every coordinate (plain DP-SGD)."""

    def __init__(self, std: float):
        self.std = std

    def stds(self, released: list[Released]) -> list[float]:
        return [self.std] * len(released)

    def observe(self, step: int, updates: dict[nn.Parameter, torch.Tensor]) -> None:
        pass  # uniform: nothing learnt from releases

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass  # no state


class DPStep:
    """Clipped sums per micro-batch (``microbatch``), one noisy gradient per logical batch (``release``).

    ``mode``: ``bookkeeping`` (one backward) or ``two_pass`` (a second, c-weighted backward: less
    memory, more time).  ``clipping``: ``flat``, ``automatic`` or ``per_layer``.  ``strategy`` forces
    every layer with a choice to ``ghost`` or ``materialise``; otherwise ``memory_budget_bytes`` (or,
    without one, the FLOP rule) chooses per layer.
    """

    def __init__(self, model: nn.Module, *, clip_norm: float, expected_batch_size: float = 1.0,
                 clipping: str = "flat", automatic_gamma: float = 0.01, mode: str = "bookkeeping",
                 micro_batch_size: int = 1, seq_len: int = 1, memory_budget_bytes: float | None = None,
                 strategy: str | None = None, tp_group=None, reduce=None, add_noise=None, parametrization=None,
                 noise_scales=None):
        self.model, self.clip_norm, self.expected_batch_size = model, clip_norm, expected_batch_size
        self.clipping, self.automatic_gamma, self.mode, self.tp_group = clipping, automatic_gamma, mode, tp_group
        self.reduce = reduce if reduce is not None else AllReduce()
        self.add_noise = add_noise if add_noise is not None else KeyedNoise(0)
        self.parametrization = parametrization if parametrization is not None else Identity()
        self.noise_scales = noise_scales if noise_scales is not None else UniformNoise(0.0)
        self.names = {p: name for name, p in model.named_parameters() if p.requires_grad}
        layers = dp_layers(model)
        rules = self.parametrization.rules  # the layers whose registry rule it replaces
        elem_bytes = next(model.parameters()).element_size()
        self.plan: Plan = plan_strategies(layers, micro_batch_size, seq_len, elem_bytes, budget_bytes=memory_budget_bytes,
                                          per_layer=clipping == "per_layer", force=strategy,
                                          tensor_parallel=group_size(tp_group) > 1, rules=rules)
        tap_mode = {"per_layer": "per_layer"}.get(clipping, "norms" if mode == "two_pass" else "bookkeeping")
        layer_clip = per_layer_threshold(clip_norm, len(layers)) if clipping == "per_layer" else None
        self.tap = PerExampleTap(layers, self.plan.strategies, mode=tap_mode, tp_group=tp_group,
                                 layer_clip_norm=layer_clip, rules=rules, sums=self.reduce.sums(),
                                 names={module: name for name, module in model.named_modules()}).attach()

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
        """The backward in which the layers record for the tap (the reduce seam's: FSDP runs its own)."""
        params = list(self.names)
        formed = self.reduce.recording_backward(loss, params, self.mode == "two_pass")
        formed = [self.names[p] for p, got in zip(params, formed) if got]
        if formed:
            raise RuntimeError(f"layers formed unclipped weight gradients outside the tap: {', '.join(formed[:3])}")

    def _weighted_backward(self, losses: torch.Tensor, clip: torch.Tensor, last: bool) -> None:
        """Two-pass: the backward of sum_i c_i L_i with the layers forming their weight gradients; the
        reduce seam either returns them (added to the sums) or keeps them itself (None)."""
        params = list(self.names)
        with self.tap.forming_weight_grads():
            grads = self.reduce.backward((losses * clip.detach()).sum(), params, last)
        if grads is not None:
            self.tap.add_to_sums({p: g for p, g in zip(params, grads) if g is not None})

    def clipped_sums(self) -> dict[str, torch.Tensor]:
        """The accumulated pre-noise clipped sums by parameter name (and reset them)."""
        sums = self.tap.pop_grad_sums()
        return {self.names[p]: sums.get(p, torch.zeros_like(p)) for p in self.names}

    def release(self, release: int, step: int | None = None) -> None:
        """Add this rank's share of the keyed noise, sum over data-parallel ranks (so each coordinate's
        noise is in the sum once), divide by qN, set ``p.grad``.

        ``release`` keys the noise: the ledger position of this release, never used for another one.
        ``step`` is the training step, which only public schedules read (ANADP's warm-up, LSG's
        refreshes); it defaults to ``release`` for callers that never compute a step twice."""
        step = release if step is None else step
        sums = self.tap.pop_grad_sums()
        released = self.parametrization.released(self.names)
        grads = [sums.get(r.tensor, torch.zeros_like(r.tensor, dtype=accumulation_dtype(r.tensor.dtype)))
                 for r in released]
        noisy = self.add_noise(release, released, grads, self.noise_scales.stds(released))  # this rank's share
        if noisy is None:  # the backend noises, normalises and applies the sums where it keeps them (ZeRO)
            self.reduce(released, grads)
            return
        noisy = self.reduce(released, noisy)
        noisy = {r.tensor: g for r, g in zip(released, noisy)}
        updates = self.parametrization.updates(noisy)
        for p in self.names:
            p.grad = (updates[p] / self.expected_batch_size).to(p.dtype)
        self.noise_scales.observe(step, {p: p.grad for p in self.names})
        self.parametrization.observe(step, noisy)

    def detach(self) -> None:
        self.tap.detach()


class NonPrivateStep:
    """The non-private step in the same shape as ``DPStep`` (the baseline of every ratio): the
    summed per-example losses over qN, backpropagated, then summed over the data group.  ``backend``
    is an object with ``backward(loss, last)`` and ``reduce(params)``; None is plain autograd and one
    all-reduce per gradient over ``dp_group``."""

    def __init__(self, model: nn.Module, *, expected_batch_size: float, dp_group=None, tp_group=None, backend=None):
        self.model, self.expected_batch_size = model, expected_batch_size
        self.dp_group, self.tp_group, self.backend = dp_group, tp_group, backend

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return model_losses(self.model, input_ids, labels, self.tp_group)

    def microbatch(self, input_ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None, *,
                   last: bool = True) -> MicroBatchStats:
        losses = self.loss(input_ids, labels)
        mask = torch.ones_like(losses) if mask is None else mask.to(losses.dtype)
        losses = losses * mask
        loss = losses.sum() / self.expected_batch_size
        if self.backend is None:
            loss.backward()
        else:
            self.backend.backward(loss, last)
        return MicroBatchStats(loss_sum=float(losses.detach().sum()), examples=int((mask > 0).sum()), clipped=0)

    def release(self, release: int, step: int | None = None) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.backend is not None:
            self.backend.reduce(params)
        elif group_size(self.dp_group) > 1:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=self.dp_group)


def native_step(model: nn.Module, *, noise_multiplier: float = 0.0, secret: int = 0, dp_group=None,
                noise_scales=None, **options) -> DPStep:
    """A ``DPStep`` with the native seams: the data group's all-reduce and keyed noise, of std sigma C on
    every coordinate unless ``noise_scales`` says otherwise; ``options`` are ``DPStep``'s (clip_norm,
    clipping, parametrization, ...)."""
    if noise_scales is None:
        noise_scales = UniformNoise(noise_multiplier * options["clip_norm"])
    return DPStep(model, reduce=AllReduce(dp_group), add_noise=KeyedNoise(secret, group_rank(dp_group), group_size(dp_group)),
                  noise_scales=noise_scales,
                  **options)
