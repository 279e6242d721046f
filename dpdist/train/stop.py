"""Stop requests (SIGUSR2 from Slurm before the time limit, SIGTERM on preemption) agreed at a step boundary.

A handler only sets a flag: checkpointing inside a signal handler could interrupt a collective half
way.  At each step boundary every rank contributes its flag to one all-reduce (MAX), so all ranks
stop after the same step even when only some of them received the signal, and checkpoint together.
The worker installs the handlers first thing, so a signal that arrives while it is still starting
(Slurm may send it up to a minute early) is remembered rather than killing the process.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from ..runtime.mesh import Mesh

SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StopSignal:
    def __init__(self):
        self.flag = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def requested(self, mesh: Mesh) -> bool:
        """Whether any rank has been asked to stop (a collective over the whole job when it has several ranks)."""
        if mesh.world_size == 1:
            return self.flag
        flag = torch.tensor([1.0 if self.flag else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
