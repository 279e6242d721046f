"""Choose, per layer, how its per-example norms are computed (ghost, materialise or stream).

Ghost norms need little memory but extra matmul work (about 5/8 T^2 (p + d) per example: the blocks
of the symmetric Grams on and right of the diagonal); materialised per-example gradients need no extra
matmul under book-keeping but keep B*p*d numbers until the clip factors are known; streamed ones are
formed a cache-sized chunk at a time (under per-layer clipping they replace the weight gradient and keep
nothing; under flat clipping they cost a second matmul).  Without a budget, flat clipping follows the
FLOP rule 2T^2 <= p*d (Bu et al. 2022) and per-layer clipping takes, per layer, the faster by
``time_cost`` of ghost and stream (neither keeps much; ghost wins at short sequences, stream as T^2
grows past p*d/(p+d): for ``dpdist bench``'s model at T = 128, stream on every linear layer and the
tied table; at T = 64, ghost on all of them).  With a budget, start from the least memory and greedily
switch the layers that save the most time per extra byte while the kept memory (summed over layers for
book-keeping; the largest single layer for per-layer clipping, where nothing outlives its layer) fits.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from torch import nn

from .rules import Cost, NormRule, rule_for

# The time of a byte of memory traffic in flops; they only order the choices.  A byte that spills out
# of cache costs the CPU's matmul rate over its memory bandwidth (about 20 here); a byte of a streamed
# chunk stays in cache and costs less: at 6 the planner streams every layer under per-layer clipping,
# the fastest plan in the step (benchmarks/layer_strategies.py, benchmarks/profile_step.py; BENCHMARKS.md).
FLOPS_PER_BYTE = 20.0
CACHED_FLOPS_PER_BYTE = 6.0
# One tensor-group all-reduce in the middle of the backward (gloo over loopback): a rank's time for ~1e8 flops.
REDUCTION_FLOPS = 1e8


def time_cost(cost: Cost, tensor_parallel: bool = False) -> float:
    reductions = REDUCTION_FLOPS * cost.reductions if tensor_parallel else 0.0
    return cost.flops + FLOPS_PER_BYTE * cost.touched_bytes + CACHED_FLOPS_PER_BYTE * cost.cached_bytes + reductions


@dataclass
class Plan:
    strategies: dict[nn.Module, str]
    costs: dict[nn.Module, Cost]

    @property
    def extra_flops(self) -> float:
        return sum(c.flops for c in self.costs.values())

    def kept_bytes(self, per_layer: bool) -> float:
        sizes = [c.kept_bytes for c in self.costs.values()] or [0.0]
        return max(sizes) if per_layer else sum(sizes)


def plan_strategies(layers: list[nn.Module], batch: int, seq_len: int, elem_bytes: int, *,
                    budget_bytes: float | None = None, per_layer: bool = False, force: str | None = None,
                    tensor_parallel: bool = False, rules: dict[nn.Module, NormRule] | None = None) -> Plan:
    """``tensor_parallel``: the layers are shards, and every clip of per-layer clipping is a tensor-group
    all-reduce (which a streamed layer makes once per chunk).  ``rules``: each layer's norm rule where
    it is not the registry's (a parametrization's)."""
    rules = {layer: (rules or {}).get(layer) or rule_for(layer) for layer in layers}
    options = {layer: rules[layer].choices(layer, batch, seq_len, elem_bytes, per_layer) for layer in layers}
    cost = functools.partial(time_cost, tensor_parallel=tensor_parallel)
    if force is not None:
        chosen = {layer: force if force in opts else next(iter(opts)) for layer, opts in options.items()}
    elif budget_bytes is None and per_layer:  # nothing outlives its layer: the fastest of what keeps little
        chosen = {layer: min([n for n in opts if n != "materialise"] or list(opts), key=lambda n, o=opts: cost(o[n]))
                  for layer, opts in options.items()}
    elif budget_bytes is None:
        chosen = {layer: rules[layer].default_choice(layer, seq_len) for layer in layers}
    else:
        chosen = _fit_budget(options, budget_bytes, per_layer, cost)
    return Plan(chosen, {layer: options[layer][name] for layer, name in chosen.items()})


def _fit_budget(options: dict, budget_bytes: float, per_layer: bool, time_cost) -> dict:
    chosen = {layer: min(opts, key=lambda n, o=opts: (o[n].kept_bytes, time_cost(o[n]))) for layer, opts in options.items()}

    def kept(choice: dict) -> float:
        sizes = [options[layer][name].kept_bytes for layer, name in choice.items()] or [0.0]
        return max(sizes) if per_layer else sum(sizes)

    while True:
        best, best_score = None, 0.0
        for layer, opts in options.items():
            current = opts[chosen[layer]]
            for name, alt in opts.items():
                saved = time_cost(current) - time_cost(alt)
                if saved <= 0 or kept({**chosen, layer: name}) > budget_bytes:
                    continue
                score = saved / max(alt.kept_bytes - current.kept_bytes, 1.0)
                if score > best_score:
                    best, best_score = (layer, name), score
        if best is None:
            return chosen
        chosen[best[0]] = best[1]
