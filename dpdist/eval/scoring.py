"""Log-perplexity of a canary's secret under the model: the bits of the tokens that cover the secret.

A secret is scored inside its line as training saw it: ``prefix + secret + suffix`` tokenised as a
whole, after the end-of-sequence token that precedes every planted canary in the token stream.
Tokenising the secret on its own would give a token sequence the model never saw, because the
tokenizer may merge characters across the prefix/secret boundary (``-a``) or the secret/suffix one
(``f"``).  The log-perplexity is the sum of -log2 p over every token whose characters overlap the
secret, each given all the tokens before it; a token that straddles a boundary counts whole (its
prefix or suffix characters are the same for every secret, so the comparison stays fair), and tokens
after the secret are not scored.  A line longer than the model's context keeps its last tokens.
"""
from __future__ import annotations

import math
import sys
from typing import Sequence

import torch
from tqdm import tqdm

from ..config import ConfigError
from ..parallel.cross_entropy import IGNORE_INDEX, token_losses
from .exposure import SecretFormat

SCORE_BATCH = 64  # secrets per forward pass: lines are ~40 tokens, so memory is never the limit
SPACE_PIECE = "\u2581"  # sentencepiece writes a space as this character inside pieces


def _byte_length(tokenizer, token: int) -> int:
    """Bytes of text that ``token`` stands for (byte-fallback pieces stand for one byte)."""
    if tokenizer.is_byte(token):
        return 1
    if tokenizer.is_control(token):
        return 0
    return len(tokenizer.id_to_piece(token).replace(SPACE_PIECE, " ").encode())


def secret_window(tokenizer, fmt: SecretFormat, secret: str, max_seq_len: int) -> tuple[list[int], int]:
    """The ids to feed, ``[EOS] + line tokens`` up to the secret's last token (at most ``max_seq_len + 1``
    of them, the last kept), and the index of the secret's first token in that list."""
    line = fmt.line(secret)
    ids = tokenizer.encode(line)
    start = len(fmt.prefix.encode())
    stop = start + len(secret.encode())
    covering, offset = [], 0
    for k, token in enumerate(ids):
        end = offset + _byte_length(tokenizer, token)
        if end > start and offset < stop:
            covering.append(k)
        offset = end
    if offset != len(line.encode()) or not covering:
        raise ConfigError(f"the tokenizer does not reproduce {line!r} piece by piece; it is not a dpdist tokenizer")
    window = [tokenizer.eos_id()] + ids[: covering[-1] + 1]  # a canary line follows a document's end
    cut = max(0, len(window) - (max_seq_len + 1))
    first = covering[0] + 1 - cut
    if first < 1:
        raise ConfigError(f"model.max_seq_len ({max_seq_len}) is too short to score a secret of {len(covering)} tokens "
                          "with any of its prefix")
    return window[cut:], first


class SecretScorer:
    """``scorer(secrets)``: each secret's log-perplexity in bits (see the module docstring), batched."""

    def __init__(self, model, tokenizer, fmt: SecretFormat, device: torch.device, progress: bool | None = None):
        self.model, self.tokenizer, self.fmt, self.device = model, tokenizer, fmt, device
        self.progress = progress  # None: a progress bar when stderr is a terminal

    @torch.no_grad()
    def __call__(self, secrets: Sequence[str]) -> list[float]:
        windows = [secret_window(self.tokenizer, self.fmt, s, self.model.cfg.max_seq_len) for s in secrets]
        bar = tqdm(total=len(windows), desc="score secrets", unit="secret", file=sys.stderr, dynamic_ncols=True,
                   disable=None if self.progress is None else not self.progress)
        scores: list[float] = []
        for begin in range(0, len(windows), SCORE_BATCH):
            batch = windows[begin:begin + SCORE_BATCH]
            scores += self._score(batch)
            bar.update(len(batch))
        bar.close()
        return scores

    def _score(self, windows: list[tuple[list[int], int]]) -> list[float]:
        """Right-padded rows (the model is causal, so padding never changes earlier positions); labels
        are ignored everywhere but on the secret's tokens."""
        width = max(len(ids) for ids, _ in windows) - 1
        inputs = torch.full((len(windows), width), self.tokenizer.eos_id(), dtype=torch.int64)  # any id: never a target
        labels = torch.full((len(windows), width), IGNORE_INDEX, dtype=torch.int64)
        for row, (ids, first) in enumerate(windows):
            inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
            labels[row, first - 1: len(ids) - 1] = torch.tensor(ids[first:])
        logits = self.model(inputs.to(self.device))
        nats = token_losses(logits.float(), labels.to(self.device), vocab_start=self.model.vocab_start).sum(-1)
        return (nats / math.log(2)).tolist()
