"""Tokenized corpus on disk, cut into examples: one sequence of at most ``seq_len + 1`` tokens is one privacy unit.

The corpus is encoded once into a flat token file (``tokens.bin``, uint16 or uint32) in a cache folder
named by a hash of everything that changes its content (source files with sizes and mtimes, canaries,
tokenizer settings, the packing) but not of ``seq_len`` or ``val_fraction``: the cutting is arithmetic
on the flat stream, so one cache serves every sequence length.  The last ``val_fraction`` of the
examples are the validation split.

``data.packing=stream`` cuts the stream into non-overlapping chunks of ``seq_len + 1`` tokens, so every
token belongs to exactly one example, but a chunk may hold the end of one document and the start of
the next, and removing a document shifts every later chunk: the unit is a chunk, not a document.
``data.packing=document`` also writes where each document ends (``documents.bin``) and cuts every
document on its own: no example holds tokens of two documents, so removing a document removes its
examples and changes no other.  A document longer than ``seq_len`` targets becomes several examples.

A corpus of prompt/completion pairs (``.jsonl`` lines ``{"prompt": ..., "completion": ...}``) needs
document packing: every pair is one example, never split and never packed with another.  Its tokens,
``[bos] + prompt + completion + eos``, are stored whole with where each part starts (``pairs.bin``),
and cut at read time: a pair longer than ``seq_len + 1`` tokens loses prompt tokens from the left (a
completion that alone does not fit is cut on its right), and only completion tokens are targets.

A cache folder is built under a temporary name and renamed into place, so a process that sees it sees
it complete, and two processes racing to build it both end up reading the same one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from ..config import ConfigError, DataConfig
from .corpus import (CANARY_ALPHABET, CANARY_FORMAT, CANARY_SECRET_LENGTH, CANARY_SEED, Corpus, Segment,
                     load_corpus)
from ..parallel.cross_entropy import IGNORE_INDEX
from .text_tokenizer import TextTokenizer, is_hugging_face, load_text_tokenizer, tokenizer_digest
from .tokenizer import MAX_SENTENCES, PAD_ID, TRAINER_OPTIONS, read_model, sample_sentences, train_tokenizer

FORMAT_VERSION = 1  # bump when the cache's content changes for the same inputs
TOKENIZER_FILE, TOKENS_FILE, CANARIES_FILE, META_FILE = "tokenizer.model", "tokens.bin", "canaries.json", "meta.json"
DOCUMENTS_FILE = "documents.bin"  # document packing: the int64 offset of each document's closing EOS
PAIRS_FILE = "pairs.bin"  # prompt/completion pairs: int64 [prompt start, completion start, end] per pair
ENCODE_BATCH_CHARS = 4 * 2**20


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def sequence_counts(ends: np.ndarray, seq_len: int) -> np.ndarray:
    """How many examples each document makes under document packing: ceil(targets / seq_len).

    Document j is the tokens ``ends[j-1] .. ends[j]`` (``ends[-1]`` read as 0): the EOS before it (the
    stream starts with one, so every document has one), its text and its closing EOS.  Its targets,
    every token after the first, are cut into runs of ``seq_len``; consecutive examples share one
    token (the last of one is the first input of the next), so each target is in exactly one example."""
    opening = np.concatenate(([0], ends))[:-1]
    return -(-(ends - opening) // seq_len)


def sequence_starts(ends: np.ndarray, seq_len: int) -> np.ndarray:
    """The stream offset where each example of document packing starts, in document order."""
    opening = np.concatenate(([0], ends))[:-1]
    counts = sequence_counts(ends, seq_len)
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(opening, counts) + within * seq_len


def pair_rows(pairs: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How each pair (rows of ``pairs.bin``) fits ``seq_len + 1`` tokens: ``(bos, prompt, completion)``,
    the tokens kept of each part.  The completion (with its eos) is kept whole when it fits next to
    the bos and cut on its right when not; the prompt fills what is left from its right end."""
    opening = np.concatenate(([0], pairs[:, 2]))[:-1]
    bos = pairs[:, 0] - opening
    room = seq_len + 1 - bos
    completion = np.minimum(pairs[:, 2] - pairs[:, 1], room)
    prompt = np.minimum(pairs[:, 1] - pairs[:, 0], room - completion)
    return bos, prompt, completion


def commit_cache(staging: Path, cache: Path, meta: dict) -> None:
    """Write a finished cache's meta file, then move the folder into place in one rename (so a cache
    is complete or absent); losing the race to another process building the same cache is fine."""
    (staging / META_FILE).write_text(json.dumps(meta, indent=1))
    try:
        os.rename(staging, cache)
    except OSError:
        if not (cache / META_FILE).exists():  # not a lost race with another process: a real failure
            raise


@dataclass
class PreparedData:
    """Paths and sizes of a prepared corpus; picklable, and opens the token file lazily in each process."""

    tokenizer_path: str
    tokens_path: str
    vocab_size: int
    seq_len: int
    num_train: int
    num_val: int
    canaries_path: str | None
    num_tokens: int
    num_files: int
    source: str
    cache_path: str
    from_cache: bool
    packing: str = "stream"
    documents_path: str | None = None  # document packing only: DOCUMENTS_FILE
    pad_id: int = PAD_ID  # written where an example has no token; never a target
    pairs_path: str | None = None  # prompt/completion pairs only: PAIRS_FILE
    pairs: int = 0
    prompts_truncated: int = 0  # pairs that lost prompt tokens on the left, the completion kept whole
    completions_truncated: int = 0  # pairs whose completion alone did not fit (cut on its right, no prompt left)
    _tokens: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _ends: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _starts: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _pairs: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict:
        # a memmap is reopened, never pickled; the document index is rebuilt rather than copied to every worker
        return {**self.__dict__, "_tokens": None, "_ends": None, "_starts": None, "_pairs": None}

    def pair_summary(self) -> str | None:
        """One line on how the prompt/completion pairs fit ``seq_len`` (None for text), for the
        commands that describe the data."""
        if self.pairs_path is None:
            return None
        return (f"pairs: {self.pairs:,} prompt/completion examples, loss on completion tokens only; "
                f"{self.prompts_truncated:,} prompts cut on the left and {self.completions_truncated:,} completions "
                f"cut on the right to fit {self.seq_len + 1} tokens")

    def train_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch(indices, 0, self.num_train, "training")

    def val_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch(indices, self.num_train, self.num_val, "validation")

    def tokenizer(self) -> TextTokenizer:
        return load_text_tokenizer(self.tokenizer_path)

    def _batch(self, indices, first: int, count: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)``, int64 ``[b, seq_len]``: labels are the inputs shifted by one token."""
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).numpy()
        if indices.size and (indices.min() < 0 or indices.max() >= count):
            raise IndexError(f"{split} example index out of range [0, {count})")
        if self._tokens is None:
            self._tokens = np.memmap(self.tokens_path, dtype=token_dtype(self.vocab_size), mode="r")
        if self.pairs_path is not None:
            return self._pair_batch(first + indices)
        if self.packing == "document":
            return self._document_batch(first + indices)
        width = self.seq_len + 1
        chunks = self._tokens[(first + indices)[:, None] * width + np.arange(width)].astype(np.int64)  # [b, T+1]
        return torch.from_numpy(chunks[:, :-1].copy()), torch.from_numpy(chunks[:, 1:].copy())

    def _document_batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Example r: ``seq_len + 1`` tokens from its start, or up to its document's closing EOS when that
        comes first; the rest is ``pad_id`` in the inputs and IGNORE_INDEX in the labels, so padding is never a
        target, and under causal attention no real position sees it."""
        if self._starts is None:
            self._ends = np.fromfile(self.documents_path, dtype=np.int64)
            self._starts = sequence_starts(self._ends, self.seq_len)
        starts = self._starts[rows]
        last = self._ends[np.searchsorted(self._ends, starts, side="right")][:, None]  # first closing EOS after start
        positions = starts[:, None] + np.arange(self.seq_len + 1)
        inside = positions <= last
        chunks = np.where(inside, self._tokens[np.minimum(positions, last)], self.pad_id).astype(np.int64)  # [b, T+1]
        labels = np.where(inside[:, 1:], chunks[:, 1:], IGNORE_INDEX)
        return torch.from_numpy(chunks[:, :-1].copy()), torch.from_numpy(labels)

    def _pair_batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair r as one example cut by ``pair_rows``: [bos] + the prompt's kept right end + the kept
        completion, then ``pad_id``.  A label is the next token only where that token is the
        completion's (its eos included): the loss, a mean over the labels, is over the completion."""
        if self._pairs is None:
            self._pairs = np.fromfile(self.pairs_path, dtype=np.int64).reshape(-1, 3)
        bos, prompt, completion = (part[rows, None] for part in pair_rows(self._pairs, self.seq_len))
        completion_start = self._pairs[rows, 1, None]
        column = np.arange(self.seq_len + 1)
        # the bos sits just before the prompt's first token; from column `bos` on, the kept tokens are contiguous
        positions = np.where(column < bos, self._pairs[rows, 0, None] - 1, completion_start - prompt - bos + column)
        inside = column < bos + prompt + completion
        chunks = np.where(inside, self._tokens[np.where(inside, positions, 0)], self.pad_id).astype(np.int64)
        targets = inside & (positions >= completion_start)
        labels = np.where(targets[:, 1:], chunks[:, 1:], IGNORE_INDEX)
        return torch.from_numpy(chunks[:, :-1].copy()), torch.from_numpy(labels)


def prepare_data(cfg: DataConfig, progress: bool | None = None) -> PreparedData:
    """Build the tokenizer and token file for ``cfg`` or find them in ``cfg.cache_dir``.

    ``progress``: a progress bar while tokenizing; None shows it when stderr is a terminal.
    ``data.source=zipf_items`` generates item sequences instead (``dpdist.data.items``).
    """
    if cfg.source == "zipf_items":
        from .items import prepare_items  # imports this module

        return prepare_items(cfg, progress)
    corpus = load_corpus(cfg)
    hugging_face = cfg.tokenizer_path is not None and is_hugging_face(cfg.tokenizer_path)
    public_model = read_model(cfg.tokenizer_path) if cfg.tokenizer_path is not None and not hugging_face else None
    if hugging_face:  # nothing is trained: data.vocab_size and the trainer's settings do not matter
        fingerprint = {"format": FORMAT_VERSION, "corpus": corpus.fingerprint(),
                       "tokenizer": tokenizer_digest(cfg.tokenizer_path)}
    else:
        fingerprint = {"format": FORMAT_VERSION, "corpus": corpus.fingerprint(), "vocab_size": cfg.vocab_size,
                       "tokenizer_model": cfg.tokenizer_model, "trainer": TRAINER_OPTIONS,
                       "max_sentences": MAX_SENTENCES[cfg.tokenizer_model]}
    if public_model is not None:
        fingerprint["tokenizer"] = hashlib.sha256(public_model).hexdigest()
    if cfg.packing != "stream":  # stream's key predates the option: its caches stay valid
        fingerprint["packing"] = cfg.packing
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cfg.cache_dir) / key
    from_cache = (cache / META_FILE).exists()
    if not from_cache:
        _build(corpus, cfg, fingerprint, cache, sys.stderr.isatty() if progress is None else progress, public_model)
    meta = json.loads((cache / META_FILE).read_text())
    tokenizer_path = cfg.tokenizer_path if hugging_face else str(cache / TOKENIZER_FILE)
    documents = cache / DOCUMENTS_FILE if cfg.packing == "document" and "pairs" not in meta else None
    pairs = cache / PAIRS_FILE if "pairs" in meta else None
    counts = {}
    if pairs is not None:
        index = np.fromfile(pairs, dtype=np.int64).reshape(-1, 3)
        _, prompt, completion = pair_rows(index, cfg.seq_len)
        cut = completion < index[:, 2] - index[:, 1]
        counts = {"pairs": len(index), "completions_truncated": int(cut.sum()),
                  "prompts_truncated": int(((prompt < index[:, 1] - index[:, 0]) & ~cut).sum())}
        examples = len(index)
    elif documents is None:
        examples = meta["tokens"] // (cfg.seq_len + 1)
    else:
        examples = int(sequence_counts(np.fromfile(documents, dtype=np.int64), cfg.seq_len).sum())
    num_val = int(examples * cfg.val_fraction)
    return PreparedData(tokenizer_path=tokenizer_path, tokens_path=str(cache / TOKENS_FILE),
                        vocab_size=meta["vocab_size"], seq_len=cfg.seq_len, num_train=examples - num_val,
                        num_val=num_val, canaries_path=str(cache / CANARIES_FILE) if meta["canaries"] else None,
                        num_tokens=meta["tokens"], num_files=meta["files"], source=meta["source"],
                        cache_path=str(cache), from_cache=from_cache, packing=cfg.packing,
                        documents_path=None if documents is None else str(documents),
                        # caches built before the meta held it: read once more from the tokenizer
                        pad_id=meta["pad_id"] if "pad_id" in meta else load_text_tokenizer(tokenizer_path).pad_id,
                        pairs_path=None if pairs is None else str(pairs), **counts)


def _build(corpus: Corpus, cfg: DataConfig, fingerprint: dict, cache: Path, progress: bool,
           model: bytes | None) -> None:
    """``model``: the public sentencepiece model to use; None trains one on the corpus, unless
    ``data.tokenizer_path`` is a Hugging Face tokenizer (read where it is, never copied into the cache)."""
    pairs = corpus.holds_pairs()
    if pairs and cfg.packing != "document":
        raise ConfigError(f"{corpus.description} holds prompt/completion pairs, one example each, which "
                          f"data.packing={cfg.packing} would cut across examples; set data.packing=document")
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        if cfg.tokenizer_path is not None and model is None:
            tokenizer = load_text_tokenizer(cfg.tokenizer_path)
        else:
            (staging / TOKENIZER_FILE).write_bytes(model if model is not None else _train_on(corpus, cfg))
            tokenizer = load_text_tokenizer(staging / TOKENIZER_FILE)
        vocab_size = tokenizer.vocab_size
        bar = tqdm(total=corpus.num_bytes, desc="tokenize", unit="B", unit_scale=True, file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        extra: dict = {}
        if pairs:
            with open(staging / TOKENS_FILE, "wb") as out, open(staging / PAIRS_FILE, "wb") as index:
                num_tokens, extra = _encode_pairs(corpus, tokenizer, token_dtype(vocab_size), out, bar, index)
            canary_offsets = {}
        else:
            with (open(staging / TOKENS_FILE, "wb") as out,
                  open(staging / DOCUMENTS_FILE, "wb") if cfg.packing == "document" else nullcontext() as documents):
                num_tokens, canary_offsets = _encode(corpus, tokenizer, token_dtype(vocab_size), out, bar, documents)
        bar.close()
        if corpus.canaries:
            _write_canaries(staging / CANARIES_FILE, corpus, tokenizer, canary_offsets)
        meta = {"source": corpus.description, "files": len(corpus.files), "bytes": corpus.num_bytes,
                "tokens": num_tokens, "vocab_size": vocab_size, "dtype": token_dtype(vocab_size).name,
                "pad_id": tokenizer.pad_id, "canaries": bool(corpus.canaries), **extra, "fingerprint": fingerprint}
        commit_cache(staging, cache, meta)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _train_on(corpus: Corpus, cfg: DataConfig) -> bytes:
    """A sentencepiece model trained on a sample of the corpus's text (prompts and completions of pairs alike)."""
    texts = (t for s in corpus.segments() if s.canary is None for t in (s.prompt, s.text) if t is not None)
    sentences = sample_sentences(texts, MAX_SENTENCES[cfg.tokenizer_model])
    if not sentences:
        raise ConfigError(f"{corpus.description} holds no text (only blank lines or empty records); give it some")
    return train_tokenizer(sentences, cfg.vocab_size, cfg.tokenizer_model)


def _encode(corpus: Corpus, tokenizer: TextTokenizer, dtype: np.dtype, out, bar,
            documents=None) -> tuple[int, dict[str, list[int]]]:
    """Write the token stream (each document's ids, then EOS; a bos first when the tokenizer puts one
    in front of a text); return its length and where each canary's own ids start.

    ``documents`` (document packing): a file to receive each document's closing-EOS offset (int64); the
    stream then opens with an EOS too, so that the first document, like every other, follows one."""
    written, canary_offsets, opening = 0, {}, True
    eos, bos = [tokenizer.eos_id], [tokenizer.bos_id] if tokenizer.add_bos else []
    if documents is not None:
        np.asarray(eos, dtype=dtype).tofile(out)
        written = 1
    for batch in _batches(corpus.segments()):
        pieces, closing = [], []
        for segment, ids in zip(batch, tokenizer.encode([s.text for s in batch])):
            ids = bos + ids if opening else ids  # a large file's later blocks continue its document
            if segment.canary is not None:
                canary_offsets.setdefault(segment.canary.secret, []).append(written + len(bos))
            pieces.append(np.asarray(ids + eos if segment.last else ids, dtype=dtype))
            written += len(pieces[-1])
            if segment.last:
                closing.append(written - 1)
            opening = segment.last
        np.concatenate(pieces).tofile(out)
        if documents is not None:
            np.asarray(closing, dtype=np.int64).tofile(documents)
        bar.update(sum(len(s.text.encode()) for s in batch))
        bar.set_postfix(tokens=written)
    return written, canary_offsets


def _encode_pairs(corpus: Corpus, tokenizer: TextTokenizer, dtype: np.dtype, out, bar, index) -> tuple[int, dict]:
    """Write each pair whole, ``[bos] + prompt + completion + eos``, and its row of ``pairs.bin``
    (prompt start, completion start, end); return the stream's length and the meta's pair counts."""
    written, counts = 0, {"pairs": 0, "prompt_tokens": 0, "completion_tokens": 0}
    eos, bos = [tokenizer.eos_id], [tokenizer.bos_id] if tokenizer.add_bos else []
    for batch in _batches(corpus.segments()):
        prompts, completions = tokenizer.encode([s.prompt for s in batch]), tokenizer.encode([s.text for s in batch])
        pieces, rows = [], []
        for prompt, completion in zip(prompts, completions):
            pieces.append(np.asarray(bos + prompt + completion + eos, dtype=dtype))
            start = written + len(bos)
            written += len(pieces[-1])
            rows.append((start, start + len(prompt), written))
            counts["prompt_tokens"] += len(prompt)
            counts["completion_tokens"] += len(completion) + 1
        np.concatenate(pieces).tofile(out)
        np.asarray(rows, dtype=np.int64).tofile(index)
        counts["pairs"] += len(batch)
        bar.update(sum(len(s.prompt.encode()) + len(s.text.encode()) for s in batch))
        bar.set_postfix(tokens=written)
    return written, counts


def _batches(segments: Iterable[Segment]) -> Iterator[list[Segment]]:
    """Groups of segments big enough for the tokenizer's threads, small enough to bound memory."""
    batch, chars = [], 0
    for segment in segments:
        batch.append(segment)
        chars += len(segment.text)
        if chars >= ENCODE_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _write_canaries(path: Path, corpus: Corpus, tokenizer, offsets: dict[str, list[int]]) -> None:
    """What an exposure measurement needs: the format and secret space (to draw reference candidates), each
    secret with its insertion count, and where each copy sits in the token stream (under stream packing a
    copy counts as seen in one example when it does not straddle a chunk boundary; under document packing
    each copy is a document of its own)."""
    record = {
        "seed": CANARY_SEED, "format": CANARY_FORMAT, "secret_alphabet": CANARY_ALPHABET,
        "secret_length": CANARY_SECRET_LENGTH,
        "pattern": CANARY_FORMAT.format(secret=f"[{CANARY_ALPHABET}]{{{CANARY_SECRET_LENGTH}}}"),  # no metacharacters
        "canaries": [{"value": c.value, "line": c.line, "secret": c.secret, "count": c.count,
                      "num_tokens": len(tokenizer.encode(c.line)), "token_offsets": offsets.get(c.secret, [])}
                     for c in corpus.canaries],
    }
    path.write_text(json.dumps(record, indent=1))
