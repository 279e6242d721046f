"""Token frequencies for Re-Attention, and the DP release that makes them usable.

Re-Attention's uncertainty of embedding row i grows like 1/p_i^2, where p_i is the fraction of
training sequences that contain token i (algorithms.md 4.2).  That is a statistic of the PRIVATE
data, so p comes from one of three sources (``reattention.frequencies``):

* ``uniform``: p_i = 1/V, public by construction;
* a path to a JSON list of counts per token id from PUBLIC data: p_i = c_i / sum(c), a relative
  frequency on the same scale as ``uniform`` (equal counts give exactly ``uniform``);
* ``dp``: a Gaussian release of the per-sequence presence counts c_v = #{training sequences
  containing v}, p_i = c~_i / N.  A sequence is its (at most) seq_len + 1 tokens (the first input and
  the targets), so it contains at most L_max = min(seq_len + 1, V) distinct tokens, a public bound:
  adding or removing one sequence moves at most L_max counts by one, an L2 sensitivity of
  sqrt(L_max).  The release c~ = max(0, c + N(0, (sigma_h sqrt(L_max))^2)) is the Gaussian mechanism
  with noise multiplier sigma_h at sensitivity one, which the accountant composes exactly as one
  Poisson-subsampled Gaussian step at rate q = 1: one ledger entry (1.0, sigma_h).

Every source is clamped to p_i in [1/N, 1], so a token never seen keeps a finite variance.

The release is drawn once per run.  Rank 0 appends its ledger entry first (durably), then draws the
counts with the run's keyed noise and saves them to ``<run_dir>/token_frequencies.json`` (a DP
output, fine to keep).  A resumed run finds the entry and does not charge again; had it crashed
between the two, its redraw is bit-identical (keyed noise), so no uncharged release ever exists.
This file is the mechanism alone; when a run draws it, and how it reaches every rank and the model,
is ``dpdist.train.reattention``'s.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .noise import keyed_normal

FILE = "token_frequencies.json"
KIND = "token_frequencies"  # the ledger entry's ``kind``: a one-off release, not a training step
LEDGER_STEP = -1  # written before step 0
NOISE_NAME = "reattention/frequencies"  # its own keyed stream: no parameter is called this
COUNT_BLOCK = 4096  # sequences read per pass over the token file


def sensitivity_bound(seq_len: int, vocab_size: int) -> int:
    """L_max: the most distinct tokens one sequence (its seq_len + 1 token chunk) can contain."""
    return min(seq_len + 1, vocab_size)


def release_entry(noise_multiplier: float) -> list[tuple[float, float, int]]:
    """The ledger history of one release at multiplier sigma_h: a Gaussian mechanism at sensitivity one,
    which is one Poisson-sampled step at rate 1.  ``dpdist account`` plans with it too."""
    return [(1.0, noise_multiplier, 1)]


def presence_counts(data, num_sequences: int, vocab_size: int) -> torch.Tensor:
    """c_v = #{training sequences 0 .. num_sequences-1 containing token v}: PRIVATE, never released as is.

    ``data`` is a prepared dataset (``train_batch(indices) -> (inputs, labels)``).  A sequence's tokens
    are its first input and its targets: negative labels (ignored targets) are not tokens, and neither
    is the padding that document packing puts in the inputs where those labels are ignored."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for start in range(0, num_sequences, COUNT_BLOCK):
        inputs, labels = data.train_batch(torch.arange(start, min(start + COUNT_BLOCK, num_sequences)))
        tokens = torch.cat([inputs[:, :1], labels], dim=1).sort(dim=1).values
        first = torch.ones_like(tokens, dtype=torch.bool)
        first[:, 1:] = tokens[:, 1:] != tokens[:, :-1]  # count each distinct token once per sequence
        present = tokens[first & (tokens >= 0)]
        if present.numel() and int(present.max()) >= vocab_size:
            raise ValueError(f"the data holds token id {int(present.max())} >= model.vocab_size {vocab_size}")
        counts += torch.bincount(present, minlength=vocab_size)
    return counts


def release_counts(counts: torch.Tensor, noise_multiplier: float, l_max: int, secret: int) -> torch.Tensor:
    """c + N(0, (sigma_h sqrt(L_max))^2), clamped at 0, with noise keyed by the run's secret."""
    noise = keyed_normal(secret, LEDGER_STEP, NOISE_NAME, tuple(counts.shape), dtype=torch.float64)
    return (counts.to(torch.float64) + noise_multiplier * math.sqrt(l_max) * noise).clamp(min=0.0)


def token_frequencies(source: str, vocab_size: int, num_sequences: int, seq_len: int, noise_multiplier: float,
                      run_dir, *, data=None, secret: int | None = None, ledger=None) -> torch.Tensor:
    """p_i in [1/N, 1] for every token id (float64, [vocab_size]) from ``source``: ``uniform``, ``dp``
    or the path of a JSON list of public counts; ``seq_len`` and ``noise_multiplier`` (sigma_h) are
    those of the ``dp`` release.

    ``dp`` reads the run's release; with ``data``, ``secret`` and ``ledger`` (rank 0 of a training
    run) it first charges the ledger unless the run already did, and draws the release if the run has
    none.  An evaluation of a finished run passes only ``run_dir``."""
    if source == "uniform":
        p = torch.full((vocab_size,), 1.0 / vocab_size, dtype=torch.float64)
    elif source == "dp":
        identity = {"mechanism": "gaussian", "statistic": "per-sequence presence counts",
                    "noise_multiplier": float(noise_multiplier), "l_max": sensitivity_bound(seq_len, vocab_size),
                    "num_sequences": int(num_sequences), "vocab_size": int(vocab_size)}
        p = _dp_counts(identity, Path(run_dir), data, secret, ledger) / num_sequences
    else:
        counts = _public_counts(Path(source), vocab_size)
        p = counts / counts.sum()
    return p.clamp(min=1.0 / num_sequences, max=1.0)


def _dp_counts(identity: dict, run_dir: Path, data, secret, ledger) -> torch.Tensor:
    drawing = ledger is not None
    if drawing and not any(entry.get("kind") == KIND for entry in ledger.entries()):
        ledger.append(LEDGER_STEP, 1.0, identity["noise_multiplier"], kind=KIND, l_max=identity["l_max"])
    path = run_dir / FILE
    if path.exists():
        record = json.loads(path.read_text())
        changed = sorted(key for key, value in identity.items() if record.get(key) != value)
        if changed:
            raise ValueError(f"{path} was released for another configuration ({', '.join(changed)} differ); "
                             "it cannot serve this run")
        return torch.tensor(record["noisy_counts"], dtype=torch.float64)
    if not drawing:
        raise FileNotFoundError(f"{path} does not exist: only the training run of {run_dir} draws the DP token-"
                                "frequency release (and charges it to its ledger)")
    if data is None or secret is None:
        raise ValueError("drawing the DP token-frequency release needs the training data and the run's secret")
    counts = presence_counts(data, identity["num_sequences"], identity["vocab_size"])
    noisy = release_counts(counts, identity["noise_multiplier"], identity["l_max"], secret)
    _write_atomically(path, json.dumps({**identity, "noisy_counts": noisy.tolist()}))
    return noisy


def _public_counts(path: Path, vocab_size: int) -> torch.Tensor:
    try:
        counts = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"reattention.frequencies {str(path)!r} is not a readable JSON file: {exc}") from None
    if not isinstance(counts, list) or len(counts) != vocab_size or not all(
            isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c >= 0 for c in counts):
        raise ValueError(f"{path} must hold a JSON list of {vocab_size} non-negative counts, one per token id")
    counts = torch.tensor(counts, dtype=torch.float64)
    if counts.sum() <= 0:
        raise ValueError(f"{path} holds only zero counts; it says nothing about token frequencies")
    return counts


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
