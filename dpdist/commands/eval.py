"""``dpdist eval RUN_DIR``: the privacy-utility picture of a finished run in one report.

Utility: the mean per-sequence loss on the held-out split the training itself held out (the same
``prepare_data`` cache and chunking) and its perplexity ``exp(loss)``.  Memorisation: the exposure of
each canary planted in the embedded corpus (``dpdist.eval.exposure``), which should stay near the
chance level of about 1 bit under a small epsilon and grow with the insertion count without privacy.
A run of the generated item task (``data.source=zipf_items``) has no canaries; it gets NDCG@10 and
HIT@10 of the next item over a full ranking instead (``dpdist.eval.ranking``).  The run's epsilon
(from its ledger, as ``dpdist export`` reports it) is shown beside them.  Everything runs in this one
process on the run's full-shape weights.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..config import ConfigError
from .export import finished_run


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="validation loss, perplexity and canary exposure of a finished run")
    parser.add_argument("run_dir", type=Path,
                        help="a run directory (holds config.yaml, tokenizer.model, final/model.pt)")
    parser.add_argument("--checkpoint", type=Path, metavar="PATH",
                        help="evaluate these weights instead of RUN_DIR/final/model.pt: a state-dict file or a "
                             "checkpoint folder RUN_DIR/checkpoints/step-*")
    parser.add_argument("--candidates", type=int, default=1000, metavar="R",
                        help="random reference secrets each canary is ranked against (exposure ceiling log2(R+1); "
                             "default 1000)")
    parser.add_argument("--max-examples", type=int, metavar="N",
                        help="held-out sequences to average the loss over (default: the whole split)")
    parser.add_argument("--no-exposure", action="store_true",
                        help="only the validation loss (for a corpus without canaries)")
    parser.add_argument("--device", default="cpu", help="torch device to evaluate on (default cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.set_defaults(func=run)


def checked_inputs(args) -> tuple[object, Path, Path]:
    """The run's config, the weights to evaluate and the run's tokenizer copy, or a ConfigError that
    says what is missing."""
    if args.candidates < 1 or (args.max_examples is not None and args.max_examples < 1):
        raise ConfigError("--candidates and --max-examples must be at least 1")
    cfg, weights, vocabulary = finished_run(args.run_dir, args.checkpoint, "evaluate a checkpoint with --checkpoint")
    if cfg.data.source == "zipf_items":
        return cfg, weights, vocabulary  # no canaries there: the item task is scored by its ranking metrics instead
    # Runs without canaries are refused here, before the (possibly slow) data step, with the reason.
    if not args.no_exposure and cfg.data.path is not None:
        raise ConfigError(f"this run trained on data.path {cfg.data.path}, where dpdist plants no canaries; pass "
                          "--no-exposure for the validation loss alone")
    if not args.no_exposure and not cfg.data.canaries:
        raise ConfigError("this run trained with data.canaries=false, so there are no canaries to measure; pass "
                          "--no-exposure for the validation loss alone")
    if not args.no_exposure and not sentencepiece_model(vocabulary).is_file():
        raise ConfigError("canary exposure is scored piece by piece with a sentencepiece tokenizer; this run reads a "
                          "tokenizer.json, so pass --no-exposure for the validation loss alone")
    return cfg, weights, vocabulary


def sentencepiece_model(vocabulary: Path) -> Path:
    """The sentencepiece model of a run's tokenizer copy: the file itself, or the one in its folder."""
    return vocabulary / "tokenizer.model" if vocabulary.is_dir() else vocabulary


def checked_device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} but no CUDA device is visible; use --device cpu")
    return device


def evaluate(args) -> dict:
    import torch

    from ..data.dataset import prepare_data
    from ..data.text_tokenizer import tokenizer_digest
    from ..data.tokenizer import load_tokenizer
    from ..eval.exposure import draw_candidates, load_canaries, mean_by_insertions, measure_exposure
    from ..eval.ranking import model_ranking
    from ..eval.scoring import SecretScorer
    from ..eval.weights import load_model
    from ..runtime.mesh import Mesh
    from ..train.loop import validation_loss
    from .export import privacy_report

    cfg, weights, vocabulary = checked_inputs(args)
    data = prepare_data(cfg.data)
    if tokenizer_digest(data.tokenizer_path) != tokenizer_digest(vocabulary):
        raise ConfigError(f"the data prepared in {cfg.data.cache_dir} for this config is not what the run trained "
                          f"on (it differs from {vocabulary}: the source files changed?), so its held-out split is "
                          "not the run's")
    device = checked_device(args.device)
    model = load_model(cfg, weights, device)
    examples = min(data.num_val, args.max_examples or data.num_val)
    val_loss = (validation_loss(model, data, Mesh(device=device), cfg.train.micro_batch_size, examples)
                if examples else None)
    result = {"run_dir": str(args.run_dir), "weights": str(weights), "val_examples": examples,
              "val_loss": val_loss, "val_perplexity": math.exp(val_loss) if val_loss is not None else None,
              "privacy": privacy_report(args.run_dir, cfg)}
    if cfg.data.source == "zipf_items":
        result["ranking"] = model_ranking(model, data, args.max_examples)
        return result
    if args.no_exposure:
        return result
    if data.canaries_path is None:
        raise ConfigError(f"the corpus of this run ({data.source}) holds no canaries; pass --no-exposure for the "
                          "validation loss alone")
    fmt, canaries = load_canaries(Path(data.canaries_path))
    scorer = SecretScorer(model, load_tokenizer(sentencepiece_model(vocabulary)), fmt, device)
    measured = measure_exposure(canaries, draw_candidates(fmt, args.candidates), scorer)
    result.update(candidates=args.candidates, exposure_ceiling=math.log2(args.candidates + 1),
                  canaries=[{"id": m.canary.number, "secret": m.canary.secret, "text": fmt.line(m.canary.secret),
                             "insertions": m.canary.insertions, "log_perplexity_bits": m.log_perplexity,
                             "rank": m.rank, "exposure": m.exposure, "candidates": m.candidates} for m in measured],
                  mean_exposure_by_insertions={str(k): v for k, v in mean_by_insertions(measured).items()})
    return result


def report(result: dict) -> str:
    privacy = result["privacy"]
    if not privacy["enabled"]:
        spent = "none (trained without differential privacy)"
    else:
        spent = f"epsilon = {privacy['epsilon']:.3f} at delta = {privacy['delta']:.2e} over {privacy['steps']} steps"
    if "warning" in privacy:
        spent += f" (WARNING: {privacy['warning']})"
    lines = [f"run: {result['run_dir']} (weights {result['weights']})", f"privacy: {spent}"]
    if result["val_loss"] is None:
        lines.append("validation: no held-out split (data.val_fraction = 0)")
    else:
        lines.append(f"validation: loss {result['val_loss']:.4f} nats/token, perplexity {result['val_perplexity']:.2f} "
                     f"over {result['val_examples']} held-out sequences")
    if "ranking" in result:
        r = result["ranking"]
        lines.append(f"next-item ranking over all items: NDCG@10 {r['ndcg@10']:.4f}, HIT@10 {r['hit@10']:.4f} "
                     f"({r['num_sequences']} held-out sequences)")
    if "canaries" in result:
        lines += [f"canary exposure (rank among {result['candidates']} random secrets; unmemorised: median 1 bit, "
                  f"mean 1.44; ceiling log2(R+1) = {result['exposure_ceiling']:.2f} bits):",
                  f"  {'id':>2}  {'secret':<24}  {'insertions':>10}  {'log-ppl (bits)':>14}  {'rank':>6}  exposure"]
        lines += [f"  {c['id']:>2}  {c['secret']:<24}  {c['insertions']:>10}  {c['log_perplexity_bits']:>14.2f}  "
                  f"{c['rank']:>6}  {c['exposure']:.2f}" for c in result["canaries"]]
        lines.append("mean exposure by insertions: " + ", ".join(
            f"{count}x {value:.2f}" for count, value in result["mean_exposure_by_insertions"].items()))
    return "\n".join(lines)


def run(args) -> int:
    try:
        result = evaluate(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else report(result))
    return 0
