"""What ``dpdist plan`` prints: a table for people, or one JSON object (``--json``) for scripts."""
from __future__ import annotations

from dataclasses import asdict

from .hardware import GIB, RESERVE, Hardware
from .memory import zero_stage
from .search import Row, overrides_text

SCHEMA_VERSION = 1


def row_dict(row: Row) -> dict:
    cfg, mem, c = row.cfg, row.memory, row.cost
    return {"layout": row.label, "backend": cfg.train.backend, "zero_stage": zero_stage(cfg) or None,
            "data": cfg.parallel.data, "tensor": cfg.parallel.tensor, "micro_batch_size": cfg.train.micro_batch_size,
            "activation_checkpointing": cfg.train.activation_checkpointing,
            "memory_budget_mb": cfg.privacy.memory_budget_mb,
            "memory_bytes": {**mem.terms(), "backward_peak": mem.backward_peak, "release_peak": mem.release_peak,
                             "peak": mem.peak, "nonprivate_peak": mem.nonprivate_peak},
            "largest_term": mem.largest_term(), "capacity_bytes": row.capacity, "fits": row.fits,
            "flops": {"nonprivate": c.nonprivate_flops, "dp": c.dp_flops, "flop_floor_ratio": c.flop_floor_ratio,
                      "micro_batches": c.micro_batches},
            "collective_bytes": {"tensor": c.tensor_bytes, "data": c.data_bytes, "data_collectives": c.data_collectives},
            "time_s": {"step": c.step_s, "compute": c.compute_s, "memory": c.memory_s,
                       "noise": c.noise_s, "communication": c.communication_s, "nonprivate_step": c.nonprivate_step_s}}


def to_json(run: Row, layouts: list[Row], change, hw: Hardware, efficiency: float, vocab: int, params: int,
            fastest: tuple[Row | None] = ()) -> dict:
    """The plan as one JSON object; ``fastest``, when searched, is ``(row,)`` (row None: nothing fits)."""
    return {"schema": SCHEMA_VERSION, "hardware": {**asdict(hw), "usable_bytes": hw.usable_bytes, "reserve": RESERVE},
            "efficiency": efficiency, "vocab_size": vocab, "params": params, "fits": run.fits,
            "largest_term": run.memory.largest_term(), "run": row_dict(run),
            "suggestion": None if change is None else {"overrides": change[0], "command": overrides_text(change[0]),
                                                       "row": row_dict(change[1])},
            "layouts": [row_dict(r) for r in layouts],
            **{"fastest": None if row is None else row_dict(row) for row in fastest}}


def _gib(value: float) -> str:
    return f"{value / GIB:.2f}" if value >= 0.01 * GIB or value == 0 else f"{value / GIB:.2g}"


def _params(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 10**6 else f"{count:,}"


def _mb(value: float) -> str:
    return f"{value / 2**20:.0f}"


def format_report(out: dict) -> str:
    run, hw = out["run"], out["hardware"]
    mem, t, fl, comm = run["memory_bytes"], run["time_s"], run["flops"], run["collective_bytes"]
    lines = [f"dpdist plan on {hw['name']}: {hw['memory_bytes'] / GIB:.1f} GiB per device, {RESERVE:.0%} reserved "
             f"({hw['usable_bytes'] / GIB:.1f} GiB usable{', shared by the ranks' if hw['name'] == 'cpu' else ''}); times at efficiency {out['efficiency']:g} of peak",
             f"model: {_params(out['params'])} parameters, vocabulary {out['vocab_size']}; {run['layout']} "
             f"(data x tensor), micro-batch {run['micro_batch_size']}, {fl['micro_batches']} micro-batch(es) per "
             f"step per rank, activation checkpointing {run['activation_checkpointing']}",
             "memory per rank (GiB): " + ", ".join(f"{k.replace('_', ' ')} {_gib(mem[k])}" for k in
                                                   ("weights", "copies", "gradients", "optimizer", "activations",
                                                    "norm_buffers", "noise", "runtime")),
             f"  peak {_gib(mem['peak'])} (backward {_gib(mem['backward_peak'])}, release {_gib(mem['release_peak'])}); "
             f"non-private peak {_gib(mem['nonprivate_peak'])}",
             f"FLOPs per rank and step: non-private {fl['nonprivate']:.3g}, DP {fl['dp']:.3g} "
             f"(DP / non-private {fl['flop_floor_ratio']:.3f}, the FLOP floor)",
             f"collectives per rank and step: tensor group {_mb(comm['tensor'])} MB, data group {_mb(comm['data'])} MB "
             f"({comm['data_collectives']})",
             f"predicted step: {t['step']:.3g} s (compute {t['compute']:.3g}, memory {t['memory']:.3g}, noise "
             f"{t['noise']:.3g}, communication {t['communication']:.3g}); non-private {t['nonprivate_step']:.3g} s"]
    if out["fits"]:
        lines.append(f"fits: peak {_gib(mem['peak'])} of {_gib(run['capacity_bytes'])} GiB usable per rank")
    else:
        lines.append(f"DOES NOT FIT: peak {_gib(mem['peak'])} GiB > {_gib(run['capacity_bytes'])} GiB usable per rank; largest "
                     f"term: {out['largest_term'].replace('_', ' ')} ({_gib(mem[out['largest_term']])} GiB)")
        change = out["suggestion"]
        if change is None:
            lines.append("  no change of checkpointing, memory budget, micro-batch, backend or tensor degree fits on "
                         f"{run['data'] * run['tensor']} devices; use more devices")
        else:
            row = change["row"]
            lines.append(f"  smallest change that fits: {change['command']} (peak {_gib(row['memory_bytes']['peak'])} "
                         f"GiB, step {row['time_s']['step']:.3g} s)")
    header = ("layout", "peak GiB", "fits", "largest term", "step s", "DP/non-private", "tensor MB", "data MB")
    table = [header]
    for r in out["layouts"]:
        table.append((r["layout"], _gib(r["memory_bytes"]["peak"]), "yes" if r["fits"] else "no",
                      r["largest_term"].replace("_", " "), f"{r['time_s']['step']:.3g}",
                      f"{r['time_s']['step'] / r['time_s']['nonprivate_step']:.2f}",
                      _mb(r["collective_bytes"]["tensor"]), _mb(r["collective_bytes"]["data"])))
    widths = [max(len(row[k]) for row in table) for k in range(len(header))]
    lines.append(f"layouts of {run['data'] * run['tensor']} devices (same micro-batch and knobs):")
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table]
    if out.get("fastest") is not None:
        best = out["fastest"]
        budget = "none" if best["memory_budget_mb"] is None else f"{best['memory_budget_mb']:g} MB"
        lines.append(f"fastest that fits: {best['layout']}, micro-batch {best['micro_batch_size']}, activation "
                     f"checkpointing {best['activation_checkpointing']}, norm budget {budget}: "
                     f"peak {_gib(best['memory_bytes']['peak'])} GiB, step {best['time_s']['step']:.3g} s "
                     f"(non-private {best['time_s']['nonprivate_step']:.3g} s)")
    elif "fastest" in out:
        lines.append("fastest that fits: none on this device count")
    return "\n".join(lines)
