"""Next-item ranking metrics, NDCG@10 and HIT@10, as in the Re-Attention paper's recommendation task
(algorithms.md section 4.7).

For each validation sequence the history is its first ``seq_len`` items and the target is the last
one.  The model's scores at the last position are ranked over ALL items, with no sampled negatives:
sampled-negative metrics (1 true item among 100 random ones) inflate scores and can even reorder
methods, while the full ranking is what a recommender actually shows.  Every token of a
``data.source=zipf_items`` vocabulary is an item, so "all items" is the vocabulary without the
padding that tensor parallelism adds.

``rank = #{items scoring >= the target}`` counts ties against the target, so a model that scores
every item alike gets the worst rank, not the best.  Then ``HIT@k = [rank <= k]`` and
``NDCG@k = 1 / log2(rank + 1)`` if ``rank <= k`` else 0 (one relevant item, so the ideal DCG is 1);
both are averaged over the sequences.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
from tqdm import tqdm

K = 10
EVAL_BATCH = 64


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each row's target among its ``[b, num_items]`` scores (ties count against it)."""
    target_scores = scores.gather(1, targets[:, None])
    return (scores >= target_scores).sum(dim=1)


def ndcg_and_hit(ranks: torch.Tensor, k: int = K) -> dict[str, float]:
    """Mean NDCG@k and HIT@k over 1-based ``ranks``."""
    ranks = ranks.double()
    hit = ranks <= k
    gain = torch.where(hit, 1.0 / torch.log2(ranks + 1.0), torch.zeros_like(ranks))
    return {f"ndcg@{k}": float(gain.mean()), f"hit@{k}": float(hit.double().mean()), "num_sequences": len(ranks)}


@torch.no_grad()
def evaluate_ranking(score_items: Callable[[torch.Tensor], torch.Tensor], data, max_examples: int | None = None,
                     k: int = K, progress: bool | None = None) -> dict[str, float]:
    """NDCG@k and HIT@k of ``score_items(history [b, seq_len]) -> scores [b, num_items]`` on the first
    ``max_examples`` validation sequences of ``data`` (all of them when None)."""
    count = data.num_val if max_examples is None else min(data.num_val, max_examples)
    if count < 1:
        raise ValueError("ranking needs validation sequences; set data.val_fraction > 0")
    ranks = []
    for chunk in tqdm(torch.arange(count).split(EVAL_BATCH), desc="rank items", unit="batch", file=sys.stderr,
                      dynamic_ncols=True, disable=None if progress is None else not progress):
        history, labels = data.val_batch(chunk)
        scores = score_items(history)
        ranks.append(target_ranks(scores.cpu(), labels[:, -1]))
    return ndcg_and_hit(torch.cat(ranks), k)


def model_ranking(model, data, max_examples: int | None = None, k: int = K,
                  progress: bool | None = None) -> dict[str, float]:
    """Ranking metrics of a single-process model: its logits at the last position over the items."""
    if model.vocab_start != 0:
        raise ValueError("model_ranking needs the whole vocabulary on one process; load the run's final model "
                         "with dpdist.eval.weights.load_model")
    device = next(model.parameters()).device
    model.eval()

    def score_items(history: torch.Tensor) -> torch.Tensor:
        return model(history.to(device))[:, -1, : data.vocab_size].float()

    return evaluate_ranking(score_items, data, max_examples, k, progress)


def popularity_ranking(data, max_examples: int | None = None, k: int = K) -> dict[str, float]:
    """The classic "Pop" baseline: every user gets the items ranked by their count in the training
    split (a non-private statistic of the training data; a reference point, not a DP method)."""
    counts = torch.zeros(data.vocab_size, dtype=torch.float64)
    for chunk in torch.arange(data.num_train).split(4096):
        history, labels = data.train_batch(chunk)
        tokens = torch.cat([history[:, :1], labels], dim=1).reshape(-1)
        counts += torch.bincount(tokens, minlength=data.vocab_size).double()
    # a tiny public tie-break (lower id first) so equal counts do not all share the worst rank
    scores = counts - torch.arange(data.vocab_size, dtype=torch.float64) / (10.0 * data.vocab_size)
    return evaluate_ranking(lambda history: scores.expand(len(history), -1), data, max_examples, k, progress=False)

