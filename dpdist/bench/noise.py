"""How long a rank spends adding the DP noise in a step, measured around the backend's own seams.

The native and FSDP backends draw their noise inside the ``add_noise`` seam, so wrapping the seam
object ``dp_seams`` returns times it.  DeepSpeed's seam only arms the noise: it is drawn in a step
pre-hook of the client optimizer, once ZeRO has stepped to each partition, so the clock also runs from
a global optimizer pre-hook (torch calls those before an optimizer's own) to a pre-hook of that
optimizer registered after the backend's.
"""
from __future__ import annotations

import time

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook


class NoiseClock:
    """Seconds spent adding noise since the last ``take``."""

    def __init__(self):
        self.seconds = 0.0
        self._start: float | None = None
        self._handles = []

    def seam(self, add_noise) -> "TimedNoise":
        return TimedNoise(add_noise, self)

    def around_pre_hooks(self, optimizer: torch.optim.Optimizer) -> None:
        """Time ``optimizer``'s step pre-hooks registered so far (the backend's noise)."""
        self._handles.append(register_optimizer_step_pre_hook(self._begin))
        self._handles.append(optimizer.register_step_pre_hook(self._end))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def _begin(self, optimizer, args, kwargs) -> None:
        self._start = time.perf_counter()

    def _end(self, optimizer, args, kwargs) -> None:
        self.seconds += time.perf_counter() - self._start
        self._start = None


class TimedNoise:
    """An ``add_noise`` seam that adds the time of each call of the seam it wraps to a clock."""

    def __init__(self, add_noise, clock: NoiseClock):
        self.add_noise, self.clock = add_noise, clock

    def __call__(self, release: int, released, grads, stds):
        start = time.perf_counter()
        noisy = self.add_noise(release, released, grads, stds)
        self.clock.seconds += time.perf_counter() - start
        return noisy
