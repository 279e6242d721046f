"""The check ``dpdist train`` can run before it launches: refuse, with the plan's numbers, a run whose
predicted peak per rank does not fit the device it will run on."""
from __future__ import annotations

import dataclasses

from ..config import ConfigError, RunConfig
from .hardware import DEFAULT_EFFICIENCY, GIB, HARDWARE, Hardware, hardware
from .search import Planner, overrides_text


def run_hardware(cfg: RunConfig) -> Hardware | None:
    """The device ``cfg`` trains on: this machine for ``parallel.device=cpu``; for cuda, the visible GPU's
    capacity (with the H100's rates, which the fit does not read), or None where no GPU is visible (a
    login node preparing a job), where nothing can be checked."""
    if cfg.parallel.device == "cpu":
        return hardware("cpu")
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return dataclasses.replace(HARDWARE["h100-80gb"], name=props.name, memory_bytes=float(props.total_memory))


def check_fits(cfg: RunConfig, hw: Hardware | None) -> None:
    """Raise ``ConfigError`` (one line: the peak, its largest term and the smallest change that fits)
    when ``cfg``'s run does not fit ``hw``; nothing when it does or ``hw`` is None."""
    if hw is None:
        return
    planner = Planner(cfg, hw, DEFAULT_EFFICIENCY)
    row = planner.evaluate(cfg)
    if row.fits:
        return
    term = row.memory.largest_term()
    change = planner.smallest_fitting_change()
    advice = (f"set {overrides_text(change[0])} (peak {change[1].memory.peak / GIB:.2f} GiB)" if change is not None
              else "no change of checkpointing, memory budget, micro-batch, backend or tensor degree fits; use more "
                   "devices")
    raise ConfigError(f"the run does not fit {hw.name}: dpdist plan predicts a peak of {row.memory.peak / GIB:.2f} GiB "
                      f"per rank over the {row.capacity / GIB:.2f} GiB usable, the largest term {term.replace('_', ' ')} "
                      f"({getattr(row.memory, term) / GIB:.2f} GiB); {advice}")
