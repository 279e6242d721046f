"""The text to train on: the user's files, or the embedded default corpus with planted canaries.

No network exists at run time, so the default corpus is the running interpreter's own standard-library
source, which is always on disk, is real text, and is public.  Into it go a few canary secrets (fake API
keys, Carlini et al., "The Secret Sharer") at fixed positions, so that memorisation can be measured
later against a known insertion count.

Invariant: ``Corpus.segments()`` yields the same text in the same order for the same ``fingerprint()``;
the fingerprint (paths, sizes, mtimes, canaries) is what the token cache is keyed on, and costs only
a directory walk and ``stat`` calls, never a read.
"""
from __future__ import annotations

import json
import os
import random
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..config import ConfigError, DataConfig

MIB = 2**20
BLOCK_CHARS = MIB  # a large .txt file is streamed in blocks of about this many characters, cut after a newline
USER_SUFFIXES = (".txt", ".jsonl")
SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}

# Canaries: public format and seed; only the random secret inside each one is "unknown" to the model.
CANARY_SEED = "dpdist-canaries-v1"
CANARY_COUNTS = (1, 1, 2, 2, 4, 4, 8, 8)
CANARY_FORMAT = 'API_KEY = "dpd-live-{secret}"'
CANARY_ALPHABET = "0123456789abcdef"
CANARY_SECRET_LENGTH = 24
CANARY_REGION = 0.4  # insert only in the first 40% of the corpus: val_fraction < 0.5 keeps them in training


@dataclass(frozen=True)
class SourceFile:
    path: Path
    size: int
    mtime_ns: int
    limit: int | None = None  # bytes to read (the last default-corpus file is cut to fit max_corpus_mb)


@dataclass(frozen=True)
class Canary:
    secret: str
    count: int

    @property
    def line(self) -> str:
        return CANARY_FORMAT.format(secret=self.secret)

    @property
    def value(self) -> str:
        return "dpd-live-" + self.secret


@dataclass(frozen=True)
class Segment:
    """A piece of text; ``last`` marks the end of a document (an end-of-sequence token follows it).

    A prompt/completion pair is one segment: ``text`` is the completion, ``prompt`` what precedes it."""

    text: str
    last: bool = True
    canary: Canary | None = None
    prompt: str | None = None


@dataclass
class Corpus:
    description: str
    files: list[SourceFile]
    canaries: list[Canary] = field(default_factory=list)
    insertions: dict[int, list[int]] = field(default_factory=dict)  # file index -> canaries planted before it
    max_corpus_mb: float | None = None  # only for the default corpus, where it changes the text
    # The user's files must be UTF-8 (anything else would train on replacement characters); the default
    # corpus is whatever this Python ships, never refused for a stray byte.
    errors: str = "strict"

    @property
    def num_bytes(self) -> int:
        return sum(f.size if f.limit is None else f.limit for f in self.files)

    def fingerprint(self) -> dict:
        return {"source": self.description, "max_corpus_mb": self.max_corpus_mb,
                "files": [[str(f.path), f.size, f.mtime_ns, f.limit] for f in self.files],
                "canaries": [[c.secret, c.count] for c in self.canaries],
                "insertions": sorted(self.insertions.items())}

    def segments(self) -> Iterator[Segment]:
        """Every segment in order; a corpus is all text or all prompt/completion pairs (the two are
        cut into examples differently), so a file of the other kind is refused."""
        pairs, first = None, None
        for index, source in enumerate(self.files):
            for canary in self.insertions.get(index, ()):
                yield Segment(self.canaries[canary].line, canary=self.canaries[canary])
            for segment in _read(source, self.errors):
                if pairs is None:
                    pairs, first = segment.prompt is not None, source.path
                elif (segment.prompt is not None) != pairs:
                    raise ConfigError(f"{source.path} holds {'text' if pairs else 'prompt/completion pairs'} but "
                                      f"{first} holds {'pairs' if pairs else 'text'}; give data.path one kind only")
                yield segment

    def holds_pairs(self) -> bool:
        """Whether the corpus is prompt/completion pairs, from its first record only (mixing is refused
        when the whole corpus is read)."""
        return next((s.prompt is not None for s in self.segments()), False)


def load_corpus(cfg: DataConfig) -> Corpus:
    """List (not read) the corpus that ``cfg`` names; refuse a missing or empty one with what to change."""
    if cfg.path is None:
        return default_corpus(cfg.max_corpus_mb, cfg.canaries)
    root = Path(cfg.path)
    if not root.exists():
        raise ConfigError(f"data.path {cfg.path!r} does not exist; point it at a .txt/.jsonl file or folder")
    if root.is_dir():
        paths = sorted((p for p in root.rglob("*") if p.suffix in USER_SUFFIXES and p.is_file()),
                       key=lambda p: p.relative_to(root).as_posix())
        if not paths:
            raise ConfigError(f"data.path {cfg.path!r} holds no .txt or .jsonl files; add some or point it elsewhere")
    elif root.suffix in USER_SUFFIXES:
        paths = [root]
    else:
        raise ConfigError(f"data.path {cfg.path!r} must be a .txt or .jsonl file (or a folder of them)")
    files = [_source(p) for p in paths]
    if not any(f.size for f in files):
        raise ConfigError(f"data.path {cfg.path!r} is empty; give it some text")
    return Corpus(f"data.path {cfg.path}", files)


def default_corpus(max_corpus_mb: float, canaries: bool) -> Corpus:
    """This interpreter's standard-library ``*.py`` files in sorted order, cut at ``max_corpus_mb``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    budget, files = int(max_corpus_mb * MIB), []
    for path in stdlib_sources(stdlib):
        if budget <= 0:
            break
        source = _source(path)
        if source.size > budget:
            files.append(SourceFile(source.path, source.size, source.mtime_ns, limit=budget))
            break
        if source.size:
            files.append(source)
            budget -= source.size
    if not files:
        raise ConfigError(f"the default corpus needs this Python's standard-library source, but {stdlib} has no "
                          ".py files; set data.path to your own text")
    version = ".".join(map(str, sys.version_info[:3]))
    corpus = Corpus(f"Python {version} standard library at {stdlib}", files, max_corpus_mb=float(max_corpus_mb),
                    errors="replace")
    if canaries:
        plant_canaries(corpus)
    return corpus


def stdlib_sources(stdlib: Path) -> list[Path]:
    """Sorted by relative path so that every machine with the same Python reads the same text."""
    found = []
    for folder, dirs, names in os.walk(stdlib):
        relative = Path(folder).relative_to(stdlib)
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
        found += [(relative / n).as_posix() for n in names if n.endswith(".py")]
    return [stdlib / name for name in sorted(found)]


def plant_canaries(corpus: Corpus) -> None:
    """Draw the secrets and their positions (between files) from the public seed; deterministic per file list."""
    rng = random.Random(CANARY_SEED)
    corpus.canaries = [Canary("".join(rng.choice(CANARY_ALPHABET) for _ in range(CANARY_SECRET_LENGTH)), count)
                       for count in CANARY_COUNTS]
    limit, offset, boundaries = CANARY_REGION * corpus.num_bytes, 0, []
    for index, source in enumerate(corpus.files):
        if index and offset <= limit:
            boundaries.append(index)
        offset += source.size if source.limit is None else source.limit
    boundaries = boundaries or [min(1, len(corpus.files) - 1)]
    corpus.insertions = {}
    for number, canary in enumerate(corpus.canaries):
        for _ in range(canary.count):
            corpus.insertions.setdefault(rng.choice(boundaries), []).append(number)


def _source(path: Path) -> SourceFile:
    stat = path.stat()
    return SourceFile(path.resolve(), stat.st_size, stat.st_mtime_ns)


def _read(source: SourceFile, errors: str) -> Iterator[Segment]:
    try:
        if source.path.suffix == ".jsonl":
            yield from _read_jsonl(source.path, errors)
        elif source.limit is not None:
            with open(source.path, "rb") as f:
                head = f.read(source.limit)
            yield Segment(head[: head.rfind(b"\n") + 1].decode("utf-8", errors=errors))
        else:
            yield from _read_text(source.path, errors)
    except UnicodeDecodeError:
        raise ConfigError(f"{source.path} is not UTF-8 text; convert it (e.g. iconv -f latin1 -t utf-8) or leave "
                          "it out of data.path") from None


def _read_text(path: Path, errors: str) -> Iterator[Segment]:
    """Blocks that end after a newline: the tokenizer encodes them separately with the same result."""
    with open(path, encoding="utf-8", errors=errors) as f:
        block = f.read(BLOCK_CHARS)
        while True:
            block += f.readline()
            following = f.read(BLOCK_CHARS)
            if not following:
                yield Segment(block)
                return
            yield Segment(block, last=False)
            block = following


def _read_jsonl(path: Path, errors: str) -> Iterator[Segment]:
    """One document per line, ``{"text": ...}``, or one pair, ``{"prompt": ..., "completion": ...}``;
    a file holds one kind only."""
    pairs = None
    with open(path, encoding="utf-8", errors=errors) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            record = record if isinstance(record, dict) else {}
            is_text = isinstance(record.get("text"), str)
            is_pair = isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str)
            if is_text == is_pair:
                raise ConfigError(f"{path} line {number} is not a JSON object with either a \"text\" string or "
                                  "\"prompt\" and \"completion\" strings; fix the line or use a .txt file")
            if pairs is not None and pairs != is_pair:
                raise ConfigError(f"{path} line {number} is {'text' if is_text else 'a prompt/completion pair'} but "
                                  f"earlier lines are {'pairs' if pairs else 'text'}; give one kind per file")
            pairs = is_pair
            yield Segment(record["completion"], prompt=record["prompt"]) if is_pair else Segment(record["text"])
