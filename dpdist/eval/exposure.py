"""Canary exposure (Carlini et al. 2019, "The Secret Sharer"): how much more likely the model finds a
planted secret than random secrets of the same format.

Every secret s gets a log-perplexity under the model, the bits of its secret part given the format's
prefix (``dpdist.eval.scoring``).  The canary is ranked among R reference candidates drawn uniformly
from the same secret space with a fixed public seed (so every run, and every model of a run, is ranked
against the same candidates): ``rank = 1 + #{candidates with lower log-perplexity}`` (ties count for
the canary), and the rank-based estimate is

    exposure = log2(R + 1) - log2(rank)    bits, in [0, log2(R + 1)]

which is the paper's ``log2 |space| - log2 rank`` with the space estimated by the R + 1 secrets that
were actually ranked.  A model that learned nothing about the canary ranks it uniformly: a middle rank
is 1 bit, and the mean over such canaries is about log2(e) = 1.44 bits.  The ceiling ``log2(R + 1)`` is
reached when the canary beats every candidate.  The true space
holds 16^24 = 2^96 secrets, so at the ceiling the estimate is only a lower bound on the true exposure;
more candidates raise the ceiling.
"""
from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..config import ConfigError

CANDIDATE_SEED = "dpdist-exposure-candidates-v1"  # public: the candidates must not depend on the run
SECRET_FIELD = "{secret}"


@dataclass(frozen=True)
class SecretFormat:
    """The public shape of a canary: text around the secret, and the secret's alphabet and length."""

    template: str  # e.g. 'API_KEY = "dpd-live-{secret}"'
    alphabet: str
    length: int

    @property
    def prefix(self) -> str:
        return self.template.split(SECRET_FIELD)[0]

    def line(self, secret: str) -> str:
        return self.template.replace(SECRET_FIELD, secret)


@dataclass(frozen=True)
class PlantedCanary:
    number: int  # position in canaries.json: a stable id
    secret: str
    insertions: int


@dataclass(frozen=True)
class CanaryExposure:
    canary: PlantedCanary
    log_perplexity: float  # bits
    rank: int
    candidates: int

    @property
    def exposure(self) -> float:
        return exposure(self.rank, self.candidates)


def load_canaries(path: Path) -> tuple[SecretFormat, list[PlantedCanary]]:
    """The format and planted canaries recorded beside the token cache (``dpdist.data.dataset``)."""
    try:
        record = json.loads(Path(path).read_text())
        fmt = SecretFormat(record["format"], record["secret_alphabet"], int(record["secret_length"]))
        canaries = [PlantedCanary(number, c["secret"], int(c["count"])) for number, c in enumerate(record["canaries"])]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} cannot be read as a canary record ({type(exc).__name__}: {exc}); delete its cache "
                          "folder so that the next run rebuilds it") from None
    if fmt.template.count(SECRET_FIELD) != 1 or not canaries:
        raise ConfigError(f"{path} has no canaries or a format without exactly one {SECRET_FIELD}")
    return fmt, canaries


def draw_candidates(fmt: SecretFormat, count: int, seed: str = CANDIDATE_SEED) -> list[str]:
    """``count`` secrets drawn uniformly (with replacement) from the format's space."""
    rng = random.Random(seed)
    return ["".join(rng.choice(fmt.alphabet) for _ in range(fmt.length)) for _ in range(count)]


def rank_among(score: float, reference: Sequence[float]) -> int:
    """1 + the number of reference secrets the model finds strictly more likely (lower log-perplexity)."""
    return 1 + sum(1 for other in reference if other < score)


def exposure(rank: int, candidates: int) -> float:
    """The rank-based estimate in bits: log2(R + 1) - log2(rank)."""
    if not 1 <= rank <= candidates + 1:
        raise ValueError(f"rank {rank} is outside [1, {candidates + 1}]")
    return math.log2(candidates + 1) - math.log2(rank)


def measure_exposure(canaries: Sequence[PlantedCanary], candidates: Sequence[str],
                     log_perplexity: Callable[[Sequence[str]], Sequence[float]]) -> list[CanaryExposure]:
    """Rank every canary against the same candidates; ``log_perplexity`` scores a list of secrets at once
    (one call, so that a model scorer can batch and show one progress bar)."""
    scores = list(log_perplexity([c.secret for c in canaries] + list(candidates)))
    mine, reference = scores[:len(canaries)], scores[len(canaries):]
    return [CanaryExposure(c, score, rank_among(score, reference), len(reference)) for c, score in zip(canaries, mine)]


def mean_by_insertions(results: Sequence[CanaryExposure]) -> dict[int, float]:
    """Mean exposure per insertion count, ascending: memorisation should grow with repetitions."""
    groups: dict[int, list[float]] = defaultdict(list)
    for result in results:
        groups[result.canary.insertions].append(result.exposure)
    return {count: sum(values) / len(values) for count, values in sorted(groups.items())}
