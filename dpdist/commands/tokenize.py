"""``dpdist tokenize [--config FILE] [key=value ...]``: build the tokenizer and token cache only.

Useful before a long run (the cache is then found by every worker) and to see what a corpus yields:
how many files, tokens and examples, and where the canaries are recorded.
"""
from __future__ import annotations

import sys
import time

from ..config import ConfigError, load_config


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("tokenize", help="build the tokenizer and the token cache for a config's data")
    parser.add_argument("--config", help="YAML run config (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.path=corpus.txt data.vocab_size=8000")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..data.dataset import prepare_data

    started = time.perf_counter()
    try:
        # Only the data section matters here; privacy.enabled=false spares a data-only config from
        # needing a noise multiplier or target epsilon (a later override still wins).
        cfg = load_config(args.config, ["privacy.enabled=false", *args.overrides])
        data = prepare_data(cfg.data)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    d = cfg.data
    print(f"corpus: {data.num_files} files from {data.source}")
    vocabulary = d.tokenizer_path or f"{d.tokenizer_model} trained on the corpus"
    print(f"tokens: {data.num_tokens:,} (vocabulary of {data.vocab_size}: {vocabulary})")
    if data.pair_summary():
        print(data.pair_summary())
    print(f"examples: {data.num_train:,} training + {data.num_val:,} validation sequences of {data.seq_len} tokens "
          f"(data.packing={d.packing})")
    print(f"cache: {data.cache_path} ({'found' if data.from_cache else 'built'} in "
          f"{time.perf_counter() - started:.1f} s)")
    print(f"canaries: {data.canaries_path}" if data.canaries_path else "canaries: none")
    return 0
