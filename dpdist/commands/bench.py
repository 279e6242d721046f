"""``dpdist bench``: non-private vs DP step time and peak memory on this machine, with the FLOP floor.

Each mode runs in a fresh process (peak RSS is per process); see ``dpdist.bench.runner``.  Prints a
table, or one JSON object with ``--json``.  ``--budgets 0,256,1024,none,unlimited`` adds a frontier
(time and memory at several memory budgets) in the same run.  ``--data D --tensor T`` (D x T > 1)
runs the step on a data x tensor mesh under torchrun instead, with the communication that DP adds; see
``dpdist.bench.parallel``.  ``--backend deepspeed --data D`` compares DeepSpeed ZeRO-1/2 with the
native backend, DP and non-private, time, noise time and memory per rank (``dpdist.bench.backend``);
``--backend fsdp`` compares FSDP with it (also at ``--data 1``), ``--backend all`` both;
``--activation-checkpointing blocks`` recomputes the blocks in those runs' backward, as ``dpdist train``
does for ``train.activation_checkpointing=blocks``.
``--arch llama`` benchmarks an untied grouped-query SwiGLU Llama of the same shape knobs; ``--lora``
puts rank-``--lora-rank`` adapters on every block linear of either model, in both the non-private and
the DP step, so the ratio is DP-LoRA over non-private LoRA (single process only).
"""
from __future__ import annotations

import argparse
import json
import sys

from ..train.activation_checkpointing import MODES as CHECKPOINTING

CLIPPING = ("flat", "per_layer", "automatic")  # privacy.clipping's values, spelled the same


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure DP vs non-private step time and peak memory (and Opacus ghost clipping)",
        description="Time the non-private step, the dpdist DP step and (if installed) Opacus ghost clipping on "
                    "the same model and batch, each in a fresh process; report ratios, peak memory and the "
                    "FLOP floor of the ratio.")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--arch", choices=("gpt", "llama"), default="gpt",
                        help="gpt: tied, learned positions, GELU MLP (default); llama: untied, RoPE, grouped-query "
                             "attention, SwiGLU MLP")
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="--arch llama: key/value heads (default: --heads / 2, or --heads when that is odd)")
    parser.add_argument("--mlp-hidden", type=int, default=None,
                        help="--arch llama: SwiGLU width (default: 8 d_model / 3 rounded up to a multiple of 8)")
    parser.add_argument("--lora", action="store_true",
                        help="LoRA adapters on every block linear, the rest frozen, in the non-private and the DP step")
    parser.add_argument("--lora-rank", type=int, default=None, help="with --lora (default 8)")
    parser.add_argument("--steps", type=int, default=6, help="steps per mode; the first is excluded (default 6)")
    parser.add_argument("--clipping", type=clipping, default="flat", metavar="{" + ",".join(CLIPPING) + "}",
                        help="as privacy.clipping (default flat)")
    parser.add_argument("--memory-budget", default="none", metavar="MB",
                        help="memory budget for the per-layer ghost/materialise/stream choice: MB, 'none' (the engine's "
                             "default choice; the default) or 'unlimited'")
    parser.add_argument("--budgets", default=None, metavar="LIST",
                        help="comma-separated budgets for a frontier table, e.g. 0,256,1024,none,unlimited")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every mode this many times (interleaved) and keep each mode's fastest round; "
                             "helps on a machine shared with other work (default 1)")
    parser.add_argument("--no-opacus", action="store_true",
                        help="skip the Opacus ghost-clipping comparison (always off with --arch llama or --lora)")
    parser.add_argument("--no-paired", action="store_true",
                        help="skip the paired timing (non-private and DP steps alternating in one process, per budget)")
    parser.add_argument("--data", type=int, default=1, help="data-parallel degree (with --tensor: a torchrun mesh)")
    parser.add_argument("--tensor", type=int, default=1,
                        help="tensor-parallel degree; D x T > 1 runs the parallel benchmark (time and communication)")
    parser.add_argument("--backend", choices=("native", "deepspeed", "fsdp", "all"), default="native",
                        help="deepspeed: ZeRO stages against the native backend at --data D (>= 2) x --tensor T; "
                             "fsdp: FSDP against it (--data 1 too); all: native, ZeRO stages and fsdp in one table")
    parser.add_argument("--zero-stages", default="1,2", metavar="LIST",
                        help="with --backend deepspeed or all (default 1,2)")
    parser.add_argument("--activation-checkpointing", choices=CHECKPOINTING, default="none",
                        help="with --backend: as train.activation_checkpointing, blocks recomputes each block in the "
                             "backward (default none)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.set_defaults(func=run)


def clipping(text: str) -> str:
    if text in CLIPPING:
        return text
    hint = f"; did you mean {text.replace('-', '_')}?" if text.replace("-", "_") in CLIPPING else ""
    raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(CLIPPING)}{hint}")


def run(args) -> int:
    from ..bench.config import BenchConfig, parse_budget
    from ..bench.report import format_report
    from ..bench.runner import run_benchmark

    if args.lora_rank is not None and (not args.lora or args.lora_rank <= 0):
        print(f"error: --lora-rank must be > 0 and comes with --lora; got {args.lora_rank}"
              + ("" if args.lora else " without --lora"), file=sys.stderr)
        return 2
    cfg = BenchConfig(layers=args.layers, d_model=args.d_model, heads=args.heads, vocab=args.vocab,
                      seq_len=args.seq_len, batch=args.batch, steps=args.steps, arch=args.arch,
                      kv_heads=args.kv_heads, mlp_hidden=args.mlp_hidden,
                      lora_rank=(args.lora_rank or 8) if args.lora else 0)
    try:
        cfg.validate()
        budget = parse_budget(args.memory_budget)
        budgets = [parse_budget(b) for b in args.budgets.split(",") if b.strip()] if args.budgets else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.activation_checkpointing != "none" and args.backend == "native":
        print("error: --activation-checkpointing belongs to the backend benchmark: give --backend fsdp, deepspeed or "
              "all", file=sys.stderr)
        return 2
    log = None if args.json else (lambda message: print(message, file=sys.stderr, flush=True))
    if args.backend != "native":
        return _run_backends(args, cfg, log)
    if args.data * args.tensor > 1 or args.data < 1 or args.tensor < 1:
        return _run_parallel(args, cfg, log)
    try:
        out = run_benchmark(cfg, clipping=args.clipping, budget=budget, budgets=budgets,
                            opacus=not args.no_opacus, rounds=args.rounds, paired=not args.no_paired, log=log)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2) if args.json else format_report(out))
    return 0


def _mesh_problems(args) -> list[str]:
    problems = []
    if args.data < 1 or args.tensor < 1:
        problems.append(f"--data and --tensor must be >= 1; got {args.data} and {args.tensor}")
    if args.lora:
        problems.append("--lora belongs to the single-process benchmark; drop it with --data/--tensor or --backend")
    if args.arch != "gpt" and args.backend == "native":
        problems.append("--arch llama belongs to the single-process and the --backend benchmarks; drop it with "
                        "--data/--tensor")
    if args.budgets or args.memory_budget != "none" or args.rounds != 1:
        problems.append("--budgets, --memory-budget and --rounds belong to the single-process benchmark; "
                        "drop them with --data/--tensor")
    if args.tensor > 1 and (args.d_model % args.tensor or args.heads % args.tensor or 4 * args.d_model % args.tensor):
        problems.append(f"--heads ({args.heads}) and --d-model ({args.d_model}) must be multiples of --tensor ({args.tensor})")
    if args.batch % args.data:
        problems.append(f"--batch ({args.batch}) must be a multiple of --data ({args.data})")
    return problems


def _run_backends(args, cfg, log) -> int:
    import dataclasses

    from ..bench import backend as bench_backend

    problems = _mesh_problems(args)
    backends = bench_backend.BACKENDS if args.backend == "all" else (args.backend,)
    if "deepspeed" in backends and args.data < 2:
        problems.append(f"--backend {args.backend} runs DeepSpeed ZeRO, which shards over the data group: give "
                        "--data 2 or more (--backend fsdp runs at --data 1)")
    try:
        stages = tuple(int(s) for s in args.zero_stages.split(",") if s.strip())
    except ValueError:
        stages = ()
    if not stages or any(s not in (1, 2) for s in stages):
        problems.append(f"--zero-stages must list stages 1 and/or 2; got {args.zero_stages!r}")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    try:
        out = bench_backend.run_benchmark(dataclasses.asdict(cfg), data=args.data, tensor=args.tensor,
                                          clipping=args.clipping, backends=backends, stages=stages,
                                          activation_checkpointing=args.activation_checkpointing, log=log)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2) if args.json else bench_backend.format_report(out))
    return 0


def _run_parallel(args, cfg, log) -> int:
    from ..bench import parallel as bench_parallel

    problems = _mesh_problems(args)
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    import dataclasses

    spec = {"config": dataclasses.asdict(cfg), "data": args.data, "tensor": args.tensor,
            "clipping": args.clipping}
    try:
        out = bench_parallel.launch(spec, log=log)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2) if args.json else bench_parallel.format_report(out))
    return 0
