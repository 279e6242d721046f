"""Poisson sampling of one logical step as a pure function of (secret, release index).

Every rank draws the same global selection with no communication (the amplification-by-sampling
analysis needs one independent Bernoulli(q) per example, not one per rank slice), takes its
round-robin share over the *data-parallel* group (tensor-parallel peers see the same examples), and
pads it into fixed-shape micro-batches.  The number of micro-batches comes from the global draw, so
it is the same on every rank and no collective can hang; a step with no example still runs and
releases only noise.

Example i's uniform comes from word i of the ChaCha20 keystream keyed by ``derive_key(secret,
release, "sample")`` (the generator of the noise, see :mod:`dpdist.privacy.noise`): a standard PRF, so
the selection is computationally unpredictable to anyone without the secret.  ``release`` is the
release index (the ledger position of the step's release), so a step computed twice also samples
afresh, as the accountant's count of two releases assumes.

Padding rows hold a fixed public dummy sequence (:func:`public_padding`), never an example's data:
what a padding row computes then depends on nothing private.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..parallel.cross_entropy import IGNORE_INDEX
from .noise import derive_key, keystream_words


@dataclass
class MicroBatch:
    indices: torch.Tensor  # (mbs,) int64 example indices, 0 on padding rows
    mask: torch.Tensor  # (mbs,) bool, False on padding rows


@dataclass
class StepPlan:
    release: int
    global_batch_size: int  # realised |S_t| over all ranks; normalise by the expected size, never by this
    micro_batches: list[MicroBatch]


class PoissonSampler:
    def __init__(self, num_examples: int, sample_rate: float, secret: int, dp_rank: int = 0, dp_size: int = 1,
                 micro_batch_size: int = 16):
        if num_examples < 1 or not 0 < sample_rate <= 1 or not 0 <= dp_rank < dp_size or micro_batch_size < 1:
            raise ValueError(f"need num_examples >= 1, sample_rate in (0, 1], 0 <= dp_rank < dp_size and "
                             f"micro_batch_size >= 1; got {num_examples}, {sample_rate}, {dp_rank}, {dp_size}, "
                             f"{micro_batch_size}")
        self.num_examples, self.sample_rate, self.secret = num_examples, sample_rate, secret
        self.dp_rank, self.dp_size, self.micro_batch_size = dp_rank, dp_size, micro_batch_size

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_examples

    def selection(self, release: int) -> np.ndarray:
        """The sorted global indices of the examples in S_r: example i is in iff its uniform u_i < q."""
        words = keystream_words(derive_key(self.secret, release, "sample"), 0, self.num_examples)
        uniforms = (words >> np.uint64(11)) * 2.0**-53  # 53-bit uniforms in [0, 1)
        return np.flatnonzero(uniforms < self.sample_rate)

    def plan(self, release: int) -> StepPlan:
        selected = self.selection(release)
        per_rank = math.ceil(len(selected) / self.dp_size)  # the largest share: same on every rank
        num_micro = math.ceil(per_rank / self.micro_batch_size)
        local = torch.from_numpy(selected[self.dp_rank::self.dp_size].astype(np.int64))
        indices = torch.zeros(num_micro * self.micro_batch_size, dtype=torch.int64)
        mask = torch.zeros(num_micro * self.micro_batch_size, dtype=torch.bool)
        indices[:len(local)], mask[:len(local)] = local, True
        rows = [slice(k * self.micro_batch_size, (k + 1) * self.micro_batch_size) for k in range(num_micro)]
        micro_batches = [MicroBatch(indices[row], mask[row]) for row in rows]
        return StepPlan(release, len(selected), micro_batches)


PAD_TOKEN = 0  # the public dummy sequence of a padding row: this token everywhere, no target


def public_padding(input_ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch with every padding row (``mask`` False) replaced by the public dummy sequence, whose
    labels are all ignored (it has no target, so its loss and gradient are zero)."""
    pad = ~mask.view(-1, 1)
    return input_ids.masked_fill(pad, PAD_TOKEN), labels.masked_fill(pad, IGNORE_INDEX)
