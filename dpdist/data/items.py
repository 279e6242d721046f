"""A generated, long-tailed next-item task: the sequential-recommendation setting of the Re-Attention
paper (algorithms.md section 4.7) without a dataset download.

MovieLens and Amazon cannot ship with the package, and what the paper's claim is about, DP noise
hurting rare tokens most, needs only a catalogue whose popularity is long-tailed and user sequences
with structure that a model can learn beyond popularity.  This module generates both:

* items ``0 .. num_items-1`` in popularity order, weight ``(rank + 1) ** -zipf_exponent`` (Zipf);
* every item belongs to one of ``num_items // ITEMS_PER_CLUSTER`` taste clusters (genres), and has
  ``SUCCESSORS`` successors in its own cluster, drawn by popularity: a sparse item-to-item Markov chain
  ("who watched X watches Y next");
* a user has one cluster, drawn by the cluster's popularity mass, so the item marginal stays close to
  the Zipf law; the first item comes from that cluster by popularity, and each next one is a successor
  of the current item (probability FOLLOW), another item of the user's cluster (CLUSTER), or any item
  by global popularity (the rest).

The last item predicts the next one through the Markov chain and the history reveals the cluster,
which takes attention over the sequence, so a Transformer can beat the popularity ranking; the
successor lists of tail items are seen in few sequences, which is where DP noise hurts.

Everything about the catalogue comes from the PUBLIC ``data.items_seed``; only the generated user
sequences play the private data: one sequence of ``seq_len + 1`` items is one privacy unit.  Item ids
are the token ids (vocabulary = ``num_items``, no special token: every sequence is full length), so
the GPT trains on them unchanged and ranking over the vocabulary is ranking over all items.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import ConfigError, DataConfig
from .dataset import META_FILE, TOKENS_FILE, PreparedData, commit_cache, token_dtype

GENERATOR_VERSION = 1  # bump when the same config would generate different sequences
CATALOGUE_FILE = "items.json"
ITEMS_PER_CLUSTER = 50
SUCCESSORS = 4
SUCCESSOR_WEIGHTS = (0.4, 0.3, 0.2, 0.1)  # the chain's preference among an item's successors
FOLLOW, CLUSTER = 0.5, 0.3  # next item: a successor / the user's cluster / else global popularity
BLOCK_SEQUENCES = 65536  # users generated at once: bounds memory for any num_sequences
# Independent random streams under one items_seed: the catalogue, the users trained on, and a disjoint
# public population of the same catalogue (data.items_users=public) to pretrain on.
CATALOGUE_STREAM, USERS_STREAM, PUBLIC_USERS_STREAM = 0, 1, 2


@dataclass(frozen=True)
class Catalogue:
    """The public item model: popularity, clusters and the successor chain."""

    popularity: np.ndarray  # [n] probabilities, non-increasing in the item id
    cluster: np.ndarray  # [n] cluster of each item
    cluster_mass: np.ndarray  # [K] probability that a user belongs to each cluster
    successors: np.ndarray  # [n, SUCCESSORS] the items that may follow each item
    by_cluster: np.ndarray  # item ids grouped by cluster (popularity order within a cluster)
    cluster_cdf: np.ndarray  # over by_cluster: cluster index + cumulative popularity within the cluster
    cluster_last: np.ndarray  # [K] position in by_cluster of each cluster's last item

    def draw_in_cluster(self, clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item per entry of ``clusters``, by popularity within that cluster (vectorised: cluster c's
        cumulative distribution occupies (c, c + 1] of ``cluster_cdf``; the clip catches c + u rounding up
        to c + 1)."""
        position = np.searchsorted(self.cluster_cdf, clusters + rng.random(len(clusters)), side="right")
        return self.by_cluster[np.minimum(position, self.cluster_last[clusters])]

    def to_json(self) -> dict:
        return {"popularity": self.popularity.tolist(), "cluster": self.cluster.tolist(),
                "successors": self.successors.tolist()}


def make_catalogue(num_items: int, zipf_exponent: float, seed: int) -> Catalogue:
    rng = np.random.default_rng([seed, CATALOGUE_STREAM])
    weights = np.arange(1, num_items + 1, dtype=np.float64) ** -zipf_exponent
    popularity = weights / weights.sum()
    num_clusters = max(1, num_items // ITEMS_PER_CLUSTER)
    cluster = rng.integers(num_clusters, size=num_items)
    cluster_mass = np.bincount(cluster, weights=popularity, minlength=num_clusters)
    by_cluster = np.argsort(cluster, kind="stable")
    within = np.zeros(num_items)
    successors = np.empty((num_items, SUCCESSORS), dtype=np.int64)
    for c in range(num_clusters):
        in_c = cluster[by_cluster] == c
        members = by_cluster[in_c]
        if not len(members):
            continue
        cumulative = np.cumsum(popularity[members]) / cluster_mass[c]
        cumulative[-1] = 1.0  # exact, so a draw c + u with u < 1 never leaves the cluster
        within[in_c] = cumulative
        successors[members] = _successors(members, popularity[members], rng)
    return Catalogue(popularity=popularity, cluster=cluster, cluster_mass=cluster_mass, successors=successors,
                     by_cluster=by_cluster, cluster_cdf=cluster[by_cluster] + within,
                     cluster_last=np.cumsum(np.bincount(cluster, minlength=num_clusters)) - 1)


def _successors(members: np.ndarray, popularity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each member, SUCCESSORS other members drawn by popularity without replacement (Gumbel top-k);
    a cluster with fewer other members repeats them, and a lone item follows itself."""
    keys = np.log(popularity)[None, :] + rng.gumbel(size=(len(members), len(members)))
    if len(members) > 1:
        np.fill_diagonal(keys, -np.inf)
    order = np.argsort(-keys, axis=1)[:, :max(len(members) - 1, 1)]
    return members[order[:, np.arange(SUCCESSORS) % order.shape[1]]]


def generate_sequences(catalogue: Catalogue, count: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` user sequences of ``length`` items, int64 ``[count, length]``."""
    num_items = len(catalogue.popularity)
    clusters = rng.choice(len(catalogue.cluster_mass), size=count, p=catalogue.cluster_mass)
    sequences = np.empty((count, length), dtype=np.int64)
    sequences[:, 0] = catalogue.draw_in_cluster(clusters, rng)
    for t in range(1, length):
        choice = rng.random(count)
        follow = catalogue.successors[sequences[:, t - 1], rng.choice(SUCCESSORS, size=count, p=SUCCESSOR_WEIGHTS)]
        in_cluster = catalogue.draw_in_cluster(clusters, rng)
        anywhere = rng.choice(num_items, size=count, p=catalogue.popularity)
        sequences[:, t] = np.where(choice < FOLLOW, follow, np.where(choice < FOLLOW + CLUSTER, in_cluster, anywhere))
    return sequences


@dataclass
class ItemsData(PreparedData):
    """Prepared item sequences; ``tokenizer_path`` is the catalogue (``items.json``), since item ids
    are the tokens and there is nothing to tokenize."""

    def tokenizer(self):
        raise ConfigError(f"data.source=zipf_items has no tokenizer: token t is item t; the public catalogue "
                          f"(popularity, clusters, successors) is {self.tokenizer_path}")


def prepare_items(cfg: DataConfig, progress: bool | None = None) -> ItemsData:
    """Generate the sequences for ``cfg`` or find them in ``cfg.cache_dir`` (same layout as a text
    cache: ``tokens.bin`` holds ``num_sequences`` chunks of ``seq_len + 1`` tokens, the last
    ``val_fraction`` of them are the validation split).  Unlike text, the cache depends on ``seq_len``:
    a user sequence is generated at its length."""
    fingerprint = {"format": GENERATOR_VERSION, "source": "zipf_items", "num_items": cfg.num_items,
                   "zipf_exponent": cfg.zipf_exponent, "num_sequences": cfg.num_sequences,
                   "items_seed": cfg.items_seed, "seq_len": cfg.seq_len}
    if cfg.items_users != "private":  # the private users' caches keep their key
        fingerprint["items_users"] = cfg.items_users
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cfg.cache_dir) / f"items-{key}"
    from_cache = (cache / META_FILE).exists()
    if not from_cache:
        _build(cfg, fingerprint, cache, sys.stderr.isatty() if progress is None else progress)
    meta = json.loads((cache / META_FILE).read_text())
    num_val = int(cfg.num_sequences * cfg.val_fraction)
    return ItemsData(tokenizer_path=str(cache / CATALOGUE_FILE), tokens_path=str(cache / TOKENS_FILE),
                     vocab_size=cfg.num_items, seq_len=cfg.seq_len, num_train=cfg.num_sequences - num_val,
                     num_val=num_val, canaries_path=None, num_tokens=meta["tokens"], num_files=0,
                     source=meta["source"], cache_path=str(cache), from_cache=from_cache)


def _build(cfg: DataConfig, fingerprint: dict, cache: Path, progress: bool) -> None:
    """Write the cache under a temporary name and rename it into place (as ``dataset._build`` does), so
    a process that sees the folder sees it complete."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    staging.chmod(0o755)
    try:
        catalogue = make_catalogue(cfg.num_items, cfg.zipf_exponent, cfg.items_seed)
        (staging / CATALOGUE_FILE).write_text(json.dumps(catalogue.to_json()))
        dtype = token_dtype(cfg.num_items)
        bar = tqdm(total=cfg.num_sequences, desc="generate items", unit="seq", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        with open(staging / TOKENS_FILE, "wb") as out:
            for block, first in enumerate(range(0, cfg.num_sequences, BLOCK_SEQUENCES)):
                count = min(BLOCK_SEQUENCES, cfg.num_sequences - first)
                stream = PUBLIC_USERS_STREAM if cfg.items_users == "public" else USERS_STREAM
                rng = np.random.default_rng([cfg.items_seed, stream, block])
                generate_sequences(catalogue, count, cfg.seq_len + 1, rng).astype(dtype).tofile(out)
                bar.update(count)
        bar.close()
        description = (f"zipf_items ({cfg.num_items} items, exponent {cfg.zipf_exponent}, {cfg.num_sequences} "
                       f"{cfg.items_users} sequences, seed {cfg.items_seed})")
        meta = {"source": description, "files": 0, "tokens": cfg.num_sequences * (cfg.seq_len + 1),
                "vocab_size": cfg.num_items, "dtype": dtype.name, "canaries": False, "fingerprint": fingerprint}
        commit_cache(staging, cache, meta)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
