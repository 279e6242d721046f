"""Calls and payload bytes of torch.distributed collectives, by process group, as the dispatcher sees them.

Every ``torch.distributed`` collective reaches the dispatcher as a ``c10d`` op whose arguments hold the
tensors and the process group, so a ``TorchDispatchMode`` counts them without touching the code that
communicates.  The profiler records the same ops with their shapes but not their group.  The mode
routes every op of the step through Python, so a counted step is not a timed one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

_c10d = torch.ops.c10d
# collective op -> (index of the tensors this rank hands it, index of its process group) in the op's schema
COLLECTIVES = {_c10d.allreduce_: (0, 1), _c10d.broadcast_: (0, 1), _c10d.allgather_: (1, 2),
               _c10d._allgather_base_: (1, 2), _c10d._reduce_scatter_base_: (1, 2)}


class CollectiveCounter(TorchDispatchMode):
    """While entered, counts calls and bytes of the collectives above by group: each group in ``groups``
    under its name, any other (the world group) as ``other``."""

    def __init__(self, groups: dict[str, object]):
        super().__init__()
        self.groups = {name: group for name, group in groups.items() if group is not None}
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def _kind(self, group) -> str:
        return next((name for name, g in self.groups.items() if g is group), "other")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in COLLECTIVES:
            payload, group = COLLECTIVES[func.overloadpacket]
            tensors = args[payload] if isinstance(args[payload], (list, tuple)) else [args[payload]]
            kind = self._kind(dist.ProcessGroup.unbox(args[group]))
            self.calls[kind] = self.calls.get(kind, 0) + 1
            self.bytes[kind] = self.bytes.get(kind, 0) + sum(t.numel() * t.element_size() for t in tensors)
        return func(*args, **(kwargs or {}))
