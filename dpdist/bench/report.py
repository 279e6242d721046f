"""The human-readable table of a ``run_benchmark`` result."""
from __future__ import annotations

CONTENDED = 0.10  # share of the cores other processes may use during a mode's timed steps before it is flagged


def format_report(out: dict) -> str:
    """The human-readable table of a ``run_benchmark`` result."""
    c = out["config"]
    lines = [
        f"dpdist bench: {out['model']}, batch {c['batch']} x {c['seq_len']} tokens, float32, "
        f"{c['steps']} steps (first excluded), {out['threads']} threads, torch {out['torch']}"
        + (f", fastest of {out['rounds']} rounds per mode (peak MB: largest)" if out.get("rounds", 1) > 1 else ""),
        f"non-private step: {out['nonprivate_flops'] / 1e9:.1f} GFLOP (analytic matmul count); "
        f"memory = peak RSS minus RSS after setup (baseline {out['nonprivate_baseline_rss_mb']:.0f} MB)",
        "",
    ]
    header = ("mode", "budget", "step s mean/min", "x time", "x paired", "peak MB", "x mem", "FLOP floor", "time/floor",
              "plan")
    lora = " LoRA" if c["lora_rank"] else ""
    rows = [(f"non-private{lora}", "-", f"{out['nonprivate_step_s']:.3f} / {out['nonprivate_step_min_s']:.3f}", "1.00", "1.00",
             f"{out['nonprivate_peak_mb']:.0f}", "1.00", "1.00", "", "")]

    def plan_text(row: dict) -> str:
        return ", ".join(f"{n} {k}" for k, n in sorted(row["strategies"].items())) + f"; kept {row['plan_kept_mb']:.0f} MB"

    dp_rows = out.get("frontier") or []
    main = {"clipping": out["clipping"], "budget": out["budget"], "step_s": out["dp_step_s"],
            "step_min_s": out["dp_step_min_s"], "ratio": out["ratio"], "paired_ratio": out["paired_ratio"],
            "peak_mb": out["dp_peak_mb"],
            "memory_ratio": out["memory_ratio"], "flop_floor_ratio": out["flop_floor_ratio"],
            "ratio_over_floor": out["ratio_over_floor"],
            "strategies": out["strategies"], "plan_kept_mb": out["plan_kept_mb"]}
    if not any(r["budget"] == main["budget"] for r in dp_rows):
        dp_rows = [main] + dp_rows
    for r in dp_rows:
        paired = "" if r.get("paired_ratio") is None else f"{r['paired_ratio']:.2f}"
        rows.append((f"dpdist {r['clipping'].replace('_', '-')}{lora}", r["budget"], f"{r['step_s']:.3f} / {r['step_min_s']:.3f}",
                     f"{r['ratio']:.2f}", paired, f"{r['peak_mb']:.0f}", f"{r['memory_ratio']:.2f}", f"{r['flop_floor_ratio']:.3f}",
                     f"{r['ratio_over_floor']:.2f}", plan_text(r)))
    if "opacus_step_s" in out:
        rows.append(("opacus ghost (untied)", "-", f"{out['opacus_step_s']:.3f} / {out['opacus_step_min_s']:.3f}",
                     f"{out['opacus_ratio']:.2f}", "", f"{out['opacus_peak_mb']:.0f}", f"{out['opacus_memory_ratio']:.2f}", "", "",
                     f"{out['opacus_params'] / 1e6:.2f}M params; {out['opacus_ratio_vs_plain']:.2f}x its own "
                     f"non-private ({out['plain_nonprivate_step_s']:.3f} s, {out['plain_nonprivate_peak_mb']:.0f} MB)"))
    lines_after = ["x time: ratio of the fresh-process means; x paired: median of the DP step over the non-private "
                   "step just before it, alternating in one process (robust to a machine's slow patches)",
                   "plan: the strategy of each trainable layer with a choice (linear layers, a tied token table; under LoRA the "
                   "adapters alone); 'kept' is "
                   "what the cost model says the plan keeps beyond a non-private step"]
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    lines.extend(lines_after)
    if out.get("dp_microbatch_s") is not None:
        lines.append("")
        lines.append(f"dpdist DP step at budget {out['budget']}: micro-batch (forward, backward, norms, clipped sums) "
                     f"{out['dp_microbatch_s']:.3f} s, release (noise) + update {out['dp_release_and_update_s']:.3f} s")
    shares = dict(out["other_processes_cpu_share"],
                  **{f"dp {r['budget']}": r["other_processes_cpu_share"] for r in out.get("frontier", [])})
    busy = {mode: share for mode, share in shares.items() if share is not None and share > CONTENDED}
    if busy:
        lines.append("warning: other processes used part of the CPU while these were timed: "
                     + ", ".join(f"{mode} {share:.0%}" for mode, share in busy.items())
                     + " of the cores; their times are inflated: rerun on an idle machine (or use --rounds)")
    if out.get("opacus") == "not installed":
        lines.append("opacus is not installed: no Opacus comparison (pip install opacus)")
    elif out.get("opacus"):
        lines.append(f"opacus: {out['opacus']}")
    return "\n".join(lines)
