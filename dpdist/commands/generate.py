"""``dpdist generate (RUN_DIR | HF_DIR) --prompt TEXT``: continue a prompt with a model, to see what it learned.

RUN_DIR (holds ``config.yaml``): the run's final model, or ``--checkpoint`` as ``dpdist eval`` takes it,
with the run's own tokenizer.  HF_DIR (holds ``config.json``, e.g. a downloaded model or an exported
one): the model in float32 with the folder's tokenizer.  A run of the generated item task has no text
and is refused.  The prompt and its continuation are printed to stdout; the sampling
(``dpdist.eval.generate``) is greedy at ``--temperature 0`` and nucleus sampling otherwise, the same
text for the same ``--seed``.

Text sampled from a DP-trained model is covered by its guarantee (post-processing), as the model is.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..config import ConfigError, load_config


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="continue a prompt with a run's model or a Hugging Face model")
    parser.add_argument("model_dir", type=Path, metavar="RUN_DIR|HF_DIR",
                        help="a run directory (holds config.yaml) or a Hugging Face model folder (holds config.json)")
    parser.add_argument("--prompt", required=True, help="the text to continue (may be empty)")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                        help="tokens to generate at most; an end-of-sequence token stops earlier (default 64)")
    parser.add_argument("--temperature", type=float, default=1.0, metavar="T",
                        help="softmax temperature; 0 always takes the most likely token (default 1.0)")
    parser.add_argument("--top-p", type=float, default=0.9, metavar="P",
                        help="sample among the most likely tokens whose probability reaches P; 1 samples from all "
                             "(default 0.9)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling: the same seed, the same text (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device to run the model on (default cpu)")
    parser.add_argument("--checkpoint", type=Path, metavar="PATH",
                        help="a run's weights other than RUN_DIR/final/model.pt: a state-dict file or a checkpoint "
                             "folder RUN_DIR/checkpoints/step-*")
    parser.set_defaults(func=run)


def checked_settings(args) -> None:
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0 is greedy); got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1] (1 keeps every token); got {args.top_p}")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1; got {args.max_new_tokens}")


def run_model(run_dir: Path, checkpoint: Path | None, device):
    """A run's model (final or ``checkpoint``) and its tokenizer."""
    from ..data.text_tokenizer import load_text_tokenizer
    from ..eval.weights import load_model
    from .export import finished_run

    if load_config(run_dir / "config.yaml").data.source == "zipf_items":
        raise ConfigError(f"{run_dir} trained on the generated item task (data.source=zipf_items), whose tokens are "
                          "item ids, not text; score it with dpdist eval instead")
    cfg, weights, vocabulary = finished_run(run_dir, checkpoint, "sample from a checkpoint with --checkpoint")
    return load_model(cfg, weights, device), load_text_tokenizer(vocabulary)


def pretrained_model(folder: Path, device):
    """A Hugging Face folder's model in float32 and its tokenizer."""
    import torch

    from ..data.text_tokenizer import HF_TOKENIZER, SP_TOKENIZER, load_text_tokenizer
    from ..model.hf import load_pretrained

    if not any((folder / name).is_file() for name in (HF_TOKENIZER, SP_TOKENIZER)):
        raise ConfigError(f"{folder} holds no {HF_TOKENIZER} or {SP_TOKENIZER}; generate needs the model's tokenizer "
                          "beside its config.json")
    tokenizer = load_text_tokenizer(folder)
    try:
        model = load_pretrained(folder, dtype=torch.float32, device=device)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{folder} does not load as a model: {str(exc).splitlines()[0]}") from None
    return model.eval(), tokenizer


def generate(args) -> tuple[str, list[int]]:
    """The decoded continuation of ``args.prompt`` and its ids (the last one eos if it came)."""
    from tqdm import tqdm

    from ..eval.generate import frame_prompt, sample
    from .eval import checked_device

    checked_settings(args)
    folder = args.model_dir
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a directory; give a run directory or a Hugging Face model folder")
    if (folder / "config.yaml").is_file():
        model, tokenizer = run_model(folder, args.checkpoint, checked_device(args.device))
    elif (folder / "config.json").is_file():
        if args.checkpoint is not None:
            raise ConfigError("--checkpoint picks a run's weights; a Hugging Face folder has only its own")
        model, tokenizer = pretrained_model(folder, checked_device(args.device))
    else:
        raise ConfigError(f"{folder} holds neither config.yaml (a dpdist run) nor config.json (a Hugging Face "
                          "model); give one of them")
    vocabulary = tokenizer.num_ids
    if vocabulary > model.cfg.vocab_size:
        raise ConfigError(f"the tokenizer in {folder} has {vocabulary} ids but the model scores only "
                          f"{model.cfg.vocab_size}; they do not belong together")
    context = frame_prompt(tokenizer, args.prompt)
    steps = sample(model, context, args.max_new_tokens, vocabulary=vocabulary, eos_id=tokenizer.eos_id,
                   temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    ids = list(tqdm(steps, total=args.max_new_tokens, desc="generating", unit="tok", file=sys.stderr, leave=False,
                    disable=not sys.stderr.isatty()))
    text = ids[:-1] if ids[-1] == tokenizer.eos_id else ids
    # Decoded with the prompt in front, so a token's leading space or a character split over tokens comes out
    # as it reads after the prompt; the prompt's own decoding is cut off again.
    head = tokenizer.decode(context)
    whole = tokenizer.decode(context + text)
    return (whole[len(head):] if whole.startswith(head) else tokenizer.decode(text)), ids


def run(args) -> int:
    try:
        continuation, _ = generate(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(args.prompt + continuation)
    return 0
