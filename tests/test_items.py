"""The generated next-item task (``data.source=zipf_items``) and its ranking metrics (issue 6).

- The sequences are a deterministic function of the public seed, split like text chunks.
- Popularity is long-tailed, and the successor chain is really in the data (there is something
  beyond popularity to learn).
- NDCG@10 / HIT@10 on hand-made scores (rank 1, 3, 11; ties count against the target) and the
  popularity baseline on a toy case whose HIT@10 is known.
- ``model_ranking`` on a model whose ranks are known (1, 3, 11, 20), padding columns included.
- A tiny ``data.source=zipf_items`` run trains end to end and ``dpdist eval`` reports its ranking.
"""
import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dpdist.cli import main
from dpdist.commands.export import ITEMS_KEY, TOKENIZER_KEY
from dpdist.commands.export import export as export_run
from dpdist.commands.train import prepare_run
from dpdist.config import ConfigError, DataConfig, load_config
from dpdist.data import items
from dpdist.data.dataset import prepare_data, token_dtype
from dpdist.eval.ranking import model_ranking, ndcg_and_hit, popularity_ranking, target_ranks
from dpdist.model import build_model
from dpdist.privacy import accounting

from helpers import ROOT
from helpers.runs import STEPS, overrides, train_in_process

SMALL = {"source": "zipf_items", "num_items": 500, "num_sequences": 3000, "seq_len": 16, "val_fraction": 0.1}


def stream(data) -> np.ndarray:
    return np.fromfile(data.tokens_path, dtype=token_dtype(data.vocab_size)).reshape(-1, data.seq_len + 1)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return prepare_data(DataConfig(cache_dir=str(tmp_path_factory.mktemp("items")), **SMALL))


def test_sequences_are_a_function_of_the_seed_and_split_like_text(tmp_path, small):
    again = prepare_data(DataConfig(cache_dir=str(tmp_path / "again"), **SMALL))
    other = prepare_data(DataConfig(cache_dir=str(tmp_path / "other"), **{**SMALL, "items_seed": 1}))
    assert np.array_equal(stream(small), stream(again)) and not np.array_equal(stream(small), stream(other))
    assert prepare_data(DataConfig(cache_dir=str(tmp_path / "again"), **SMALL)).from_cache
    assert (small.vocab_size, small.num_train, small.num_val) == (500, 2700, 300)
    assert stream(small).shape == (3000, 17) and stream(small).max() < 500
    inputs, labels = small.val_batch([0])
    assert torch.equal(torch.cat([inputs[0, :1], labels[0]]), torch.from_numpy(stream(small)[2700].astype(np.int64)))
    with pytest.raises(ConfigError, match="no tokenizer"):
        small.tokenizer()


def test_public_users_are_another_population_of_the_same_catalogue(tmp_path, small):
    public = prepare_data(DataConfig(cache_dir=str(tmp_path), **SMALL, items_users="public"))
    assert public.vocab_size == small.vocab_size and stream(public).shape == stream(small).shape
    assert not (stream(public)[:, None, :] == stream(small)[None, :100, :]).all(-1).any()  # no private user reappears
    catalogue = items.make_catalogue(SMALL["num_items"], 1.1, seed=0)  # one catalogue: its chain shows in both
    tokens = stream(public)
    assert (catalogue.successors[tokens[:, :-1]] == tokens[:, 1:, None]).any(-1).mean() >= 0.5
    assert "public sequences" in public.source


def test_popularity_is_long_tailed_and_the_successor_chain_is_learnable(small):
    tokens = stream(small)
    counts = np.sort(np.bincount(tokens.ravel(), minlength=small.vocab_size))[::-1]
    assert counts[: small.vocab_size // 10].sum() > 0.5 * counts.sum()  # uniform would be 0.1
    catalogue = items.make_catalogue(SMALL["num_items"], 1.1, seed=0)
    followed = (catalogue.successors[tokens[:, :-1]] == tokens[:, 1:, None]).any(-1).mean()
    assert followed >= 0.5  # items.FOLLOW = 0.5 picks a successor, and the other draws sometimes do too
    by_chance = (catalogue.successors[tokens[:, :-1]] == np.roll(tokens[:, 1:], 1, axis=0)[..., None]).any(-1).mean()
    assert by_chance < 0.25  # the same check against another user's next item (measured 0.06)


def test_ndcg_and_hit_on_hand_made_scores():
    num_items = 20
    scores = torch.arange(num_items, 0, -1, dtype=torch.float32).repeat(3, 1)  # item i has rank i + 1
    ranks = target_ranks(scores, torch.tensor([0, 2, 10]))
    assert ranks.tolist() == [1, 3, 11]
    metrics = ndcg_and_hit(ranks)
    assert metrics["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(4) + 0.0) / 3)  # 1, 0.5, 0
    assert metrics["hit@10"] == pytest.approx(2 / 3)
    assert target_ranks(torch.zeros(1, num_items), torch.tensor([0])).item() == num_items  # ties count against


class ToyData:
    """Item i occurs 20 - i times in training; the validation targets are items 0, 15, 2 and 19."""

    vocab_size, seq_len = 20, 3

    def __init__(self):
        self.train = torch.tensor([[i] * 4 for i in range(20) for _ in range(20 - i)])
        self.val = torch.tensor([[5, 5, 5, target] for target in (0, 15, 2, 19)])
        self.num_train, self.num_val = len(self.train), len(self.val)

    def train_batch(self, indices):
        return self.train[indices, :-1], self.train[indices, 1:]

    def val_batch(self, indices):
        return self.val[indices, :-1], self.val[indices, 1:]


def test_popularity_baseline_on_a_toy_case():
    metrics = popularity_ranking(ToyData())  # ranks 1, 16, 3, 20
    assert metrics["hit@10"] == pytest.approx(0.5)
    assert metrics["ndcg@10"] == pytest.approx((1.0 + 0.5) / 4)


class SuccessorModel(torch.nn.Module):
    """Ranks the item after the last one seen first, the one after that second, and so on around the
    catalogue; two padding columns after the items score above them all (tensor parallelism pads the
    vocabulary so)."""

    vocab_start = 0

    def __init__(self, num_items: int):
        super().__init__()
        self.num_items = num_items
        self.unused = torch.nn.Parameter(torch.zeros(()))  # model_ranking reads its device off a parameter

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        steps_ahead = (torch.arange(self.num_items) - ids.unsqueeze(-1) - 1) % self.num_items  # 0: the successor
        return torch.cat([-steps_ahead.float(), torch.full((*ids.shape, 2), 1e9)], dim=-1)


class SuccessorData:
    """Four validation sequences of 20 items whose targets are 1, 3, 11 and 20 steps after their last
    history item; an earlier history item would rank them elsewhere."""

    vocab_size, seq_len = 20, 3

    def __init__(self):
        self.val = torch.tensor([[6, 9, 5, 6], [1, 4, 18, 1], [2, 11, 0, 11], [8, 3, 7, 7]])
        self.num_val = len(self.val)

    def val_batch(self, indices):
        return self.val[indices, :-1], self.val[indices, 1:]


def test_model_ranking_on_a_model_whose_ranks_are_known():
    model, data = SuccessorModel(20), SuccessorData()
    metrics = model_ranking(model, data, progress=False)  # ranks 1, 3, 11, 20
    assert metrics["num_sequences"] == 4
    assert metrics["hit@10"] == 0.5
    assert metrics["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(4)) / 4, rel=1e-15)
    first_three = model_ranking(model, data, max_examples=3, progress=False)  # ranks 1, 3, 11
    assert first_three["num_sequences"] == 3 and first_three["hit@10"] == pytest.approx(2 / 3, rel=1e-15)
    assert first_three["ndcg@10"] == pytest.approx((1.0 + 0.5) / 3, rel=1e-15)


def test_zipf_items_refuses_text_settings():
    with pytest.raises(ConfigError, match="data.source=text"):
        DataConfig(source="zipf_items", tokenizer_path=__file__).validate()


def test_a_tiny_zipf_items_run_trains_and_ranks(tmp_path, capsys):
    cfg = load_config(ROOT / "configs/default.yaml", overrides(
        tmp_path / "cache", tmp_path / "run", 1, 1, "float32", "data.source=zipf_items", "data.num_items=60",
        "data.num_sequences=600", "data.val_fraction=0.1", "data.seq_len=16", "train.checkpoint_every=0"))
    prepared = prepare_run(cfg)
    run_dir, plan = prepared.run_dir, prepared.plan
    assert plan.vocab_size == 60 and plan.num_examples == 540 and plan.num_val == 60
    summary = train_in_process(run_dir)
    assert math.isfinite(summary["val_loss"])
    assert summary["epsilon"] == pytest.approx(accounting.epsilon(plan.sample_rate, plan.noise_multiplier, STEPS,
                                                                  plan.delta), rel=1e-12)
    model = build_model(load_config(run_dir / "config.yaml").model)
    model.load_state_dict(torch.load(run_dir / "final" / "model.pt"))
    data = prepare_data(load_config(run_dir / "config.yaml").data)
    metrics = model_ranking(model, data, progress=False)
    assert metrics["num_sequences"] == 60
    assert main(["eval", str(run_dir), "--json"]) == 0  # dpdist eval scores an item run by its ranking
    assert json.loads(capsys.readouterr().out)["ranking"] == metrics
    exported = tmp_path / "model.safetensors"
    export_run(run_dir, exported)
    with safe_open(str(exported), "pt") as handle:
        metadata = handle.metadata()
    assert not (run_dir / "tokenizer.model").exists()
    assert json.loads(metadata[ITEMS_KEY]) == json.loads((run_dir / "items.json").read_text())
    assert TOKENIZER_KEY not in metadata  # an item catalogue is not a sentencepiece model
