"""The layouts worth listing for a run, and the smallest change that makes a run fit.

Layouts keep the run's device count W = D x T and vary the tensor degree over the divisors of W that
split the heads (and, on GPUs, stay inside one node, where the tensor group's all-reduces are fast),
and the backend: native, fsdp, and DeepSpeed ZeRO-1/2 where the data degree is at least 2; settings a
backend refuses (``RunConfig.validate``) are left out.

A change is a set of overrides from these knobs, each with its options in order of preference:
activation checkpointing; a memory budget of 0 for the per-example norms (their leanest strategies);
a smaller micro-batch (halved down to 1); another backend (fsdp, then ZeRO-2); a larger tensor degree.
The smallest change is the one with the fewest knobs changed that fits, each knob at its first option
that fits; among sets of as many knobs, the fastest predicted step.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from ..config import ConfigError, RunConfig
from .cost import Cost, cost
from .hardware import Hardware
from .memory import Memory, memory, zero_stage
from .shapes import Shard, build_shard, planned_vocab_size

TIE = 1e-3  # predicted steps closer than this fraction are equally fast


@dataclass
class Row:
    cfg: RunConfig
    memory: Memory
    cost: Cost
    capacity: float  # bytes this rank may use
    fits: bool

    @property
    def label(self) -> str:
        stage = zero_stage(self.cfg)
        backend = f"deepspeed ZeRO-{stage}" if stage else self.cfg.train.backend
        return f"{backend} {self.cfg.parallel.data}x{self.cfg.parallel.tensor}"


class Planner:
    """Evaluates variants of one run config, building each tensor degree's meta shard once."""

    def __init__(self, cfg: RunConfig, hw: Hardware, efficiency: float):
        self.cfg, self.hw, self.efficiency = cfg, hw, efficiency
        self.vocab = planned_vocab_size(cfg)
        self._shards: dict[int, Shard] = {}

    def shard(self, tensor: int) -> Shard:
        if tensor not in self._shards:
            self._shards[tensor] = build_shard(self.cfg, tensor)
        return self._shards[tensor]

    def capacity(self, cfg: RunConfig) -> float:
        """Bytes one rank may use: a device's usable memory; on the CPU, the machine's RAM shared by every
        rank of a node."""
        if self.hw.name != "cpu":
            return self.hw.usable_bytes
        return self.hw.usable_bytes / (cfg.parallel.world_size // cfg.launch.nnodes)

    def evaluate(self, cfg: RunConfig) -> Row:
        shard = self.shard(cfg.parallel.tensor)
        mem = memory(cfg, shard, self.vocab, self.hw.runtime_bytes)
        capacity = self.capacity(cfg)
        return Row(cfg, mem, cost(cfg, shard, self.vocab, self.hw, self.efficiency), capacity, mem.peak <= capacity)

    def tensor_degrees(self) -> list[int]:
        m, world = self.cfg.model, self.cfg.parallel.world_size
        limit = world if self.hw.name == "cpu" else min(world, self.hw.devices_per_node)
        return [t for t in range(1, limit + 1) if not world % t and not m.n_heads % t and not m.kv_heads % t]

    def layouts(self) -> list[Row]:
        rows = []
        world = self.cfg.parallel.world_size
        for tensor in self.tensor_degrees():
            for backend, stage in (("native", None), ("fsdp", None), ("deepspeed", 1), ("deepspeed", 2)):
                if backend == "deepspeed" and world // tensor < 2:
                    continue
                variant = valid(self.cfg, {"train.backend": backend, "deepspeed.zero_stage": stage,
                                           "parallel.data": world // tensor, "parallel.tensor": tensor})
                if variant is not None:
                    rows.append(self.evaluate(variant))
        return rows

    def fastest_fitting(self) -> Row | None:
        """The fastest predicted step that fits on the run's device count, over the layouts (tensor degree
        and backend), the micro-batch (powers of two up to a data rank's share of ``train.batch_size``),
        activation checkpointing and a memory budget of 0 for the norms; the batch, sequence length and
        everything else as the config says, so every candidate trains on the same tokens per step.
        None if nothing fits."""
        t, p = self.cfg.train, self.cfg.privacy
        best = None
        for layout in self.layouts():
            share = -(-t.batch_size // layout.cfg.parallel.data) if t.batch_size is not None else t.micro_batch_size
            sizes = [1 << k for k in reversed(range(share.bit_length())) if 1 << k <= share]
            budgets = [p.memory_budget_mb] + ([0.0] if p.enabled and p.memory_budget_mb != 0 else [])
            for size, checkpointing, budget in itertools.product(sizes, ("none", "blocks"), budgets):
                variant = valid(layout.cfg, {"train.micro_batch_size": size, "train.activation_checkpointing": checkpointing,
                                             "privacy.memory_budget_mb": budget})
                if variant is None:
                    continue
                row = self.evaluate(variant)
                # The time model charges nothing per micro-batch beyond its collectives, so micro-batch
                # sizes often tie; a real device runs small matmuls worse, so the larger (tried first) wins.
                if row.fits and (best is None or row.cost.step_s < best.cost.step_s * (1 - TIE)):
                    best = row
        return best

    def knobs(self) -> list[list[dict]]:
        """Each knob's options (overrides), in order of preference."""
        t, p, world = self.cfg.train, self.cfg.privacy, self.cfg.parallel.world_size
        knobs = []
        if t.activation_checkpointing == "none":
            knobs.append([{"train.activation_checkpointing": "blocks"}])
        if p.enabled and p.memory_budget_mb != 0:
            knobs.append([{"privacy.memory_budget_mb": 0.0}])
        sizes, size = [], t.micro_batch_size // 2
        while size >= 1:
            sizes.append({"train.micro_batch_size": size})
            size //= 2
        if sizes:
            knobs.append(sizes)
        backends = [{"train.backend": "fsdp"}] if t.backend != "fsdp" else []
        if world // self.cfg.parallel.tensor >= 2 and not (t.backend == "deepspeed" and zero_stage(self.cfg) == 2):
            backends.append({"train.backend": "deepspeed", "deepspeed.zero_stage": 2})
        if backends:
            knobs.append(backends)
        degrees = [{"parallel.tensor": d, "parallel.data": world // d} for d in self.tensor_degrees()
                   if d > self.cfg.parallel.tensor]
        if degrees:
            knobs.append(degrees)
        return knobs

    def smallest_fitting_change(self) -> tuple[dict, Row] | None:
        """The overrides and the row of the smallest change that fits (None: none of them does): the
        fewest knobs; for a set of knobs, their first options that fit (the mildest micro-batch cut, the
        nearest tensor degree); among sets of as many knobs, the fastest."""
        knobs = self.knobs()
        for count in range(1, len(knobs) + 1):
            fitting = [found for chosen in itertools.combinations(knobs, count)
                       if (found := self._first_fitting(chosen)) is not None]
            if fitting:
                return min(fitting, key=lambda pair: pair[1].cost.step_s)
        return None

    def _first_fitting(self, knobs) -> tuple[dict, Row] | None:
        for options in itertools.product(*knobs):
            overrides = {k: v for option in options for k, v in option.items()}
            variant = valid(self.cfg, overrides)
            if variant is not None and (row := self.evaluate(variant)).fits:
                return overrides, row
        return None


def valid(cfg: RunConfig, overrides: dict) -> RunConfig | None:
    """``cfg`` with dotted ``overrides`` (a new config; ``cfg`` is left as it is), or None if it is refused."""
    sections: dict[str, dict] = {}
    for key, value in overrides.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    changed = {section: dataclasses.replace(getattr(cfg, section), **values) for section, values in sections.items()}
    try:
        return dataclasses.replace(cfg, **changed).validate()
    except ConfigError:
        return None


def overrides_text(overrides: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in overrides.items() if not (k == "deepspeed.zero_stage" and v is None))
