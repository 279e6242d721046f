"""``dpdist eval`` (issue 6): the exposure arithmetic, the scoring of a secret inside its line, and the
command on a tiny finished run.

- Exposure math on a toy scorer: a canary scored below every candidate has rank 1 and exposure
  log2(R+1); one in the middle has 1 bit; ties count against the canary; the candidates are a fixed
  function of the public seed and have the canary format.
- Scoring: the tokens scored are exactly the ones covering the secret (boundary merges included); a
  line longer than the context keeps its last tokens; a batch scores each secret as alone (padding
  never leaks into earlier positions); a fake model that memorised the canary's line ranks it first.
- End to end on a 6-step run: finite loss, perplexity = exp(loss) and equal to the training summary's
  loss on the same split, 8 canaries with their insertion counts and ranks in [1, R+1], the same loss
  from the step-6 checkpoint, and one-line refusals for what cannot be evaluated.
"""
import io
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from dpdist.cli import main
from dpdist.config import ConfigError, dump_config, load_config
from dpdist.data.corpus import CANARY_COUNTS
from dpdist.data.tokenizer import EOS_ID, TRAINER_OPTIONS, load_tokenizer
from dpdist.eval.exposure import (PlantedCanary, SecretFormat, draw_candidates, exposure, load_canaries,
                                  mean_by_insertions, measure_exposure, rank_among)
from dpdist.eval.scoring import SecretScorer, secret_window

from helpers.runs import prepared, train_in_process

FORMAT = SecretFormat('API_KEY = "dpd-live-{secret}"', "0123456789abcdef", 24)
R = 30


def toy_scorer(scores: dict):
    return lambda secrets: [scores[s] for s in secrets]


def test_a_canary_below_every_candidate_reaches_the_ceiling():
    canary, candidates = PlantedCanary(0, "c" * 24, 1), draw_candidates(FORMAT, 99)
    scores = {canary.secret: 0.5, **{c: 1.0 + k for k, c in enumerate(candidates)}}
    [result] = measure_exposure([canary], candidates, toy_scorer(scores))
    assert result.rank == 1 and result.exposure == pytest.approx(math.log2(100))


def test_a_canary_in_the_middle_has_one_bit():
    canary, candidates = PlantedCanary(0, "c" * 24, 1), draw_candidates(FORMAT, 99)
    scores = {canary.secret: 48.5, **{c: float(k) for k, c in enumerate(candidates)}}  # 49 candidates below
    [result] = measure_exposure([canary], candidates, toy_scorer(scores))
    assert result.rank == 50 and result.exposure == pytest.approx(1.0)


def test_ties_count_against_the_canary_and_ranks_stay_in_range():
    assert rank_among(1.0, [1.0, 1.0, 0.5]) == 2
    assert exposure(4, 3) == 0.0
    with pytest.raises(ValueError, match="outside"):
        exposure(5, 3)


def test_candidates_are_fixed_by_the_public_seed_and_have_the_format():
    first, again = draw_candidates(FORMAT, 200), draw_candidates(FORMAT, 200)
    assert first == again and len(set(first)) == 200
    assert all(len(c) == 24 and set(c) <= set(FORMAT.alphabet) for c in first)
    assert draw_candidates(FORMAT, 200, seed="another") != first


def test_mean_exposure_groups_by_insertions():
    canaries = [PlantedCanary(0, "a" * 24, 1), PlantedCanary(1, "b" * 24, 1), PlantedCanary(2, "c" * 24, 8)]
    candidates = draw_candidates(FORMAT, 3)
    scores = {"a" * 24: 0.0, "b" * 24: 10.0, "c" * 24: 0.0, **dict.fromkeys(candidates, 5.0)}
    means = mean_by_insertions(measure_exposure(canaries, candidates, toy_scorer(scores)))
    assert means == {1: pytest.approx((2.0 + 0.0) / 2), 8: pytest.approx(2.0)}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 6-step single-process run on the embedded corpus (canaries planted), checkpoints at 3 and 6."""
    base = tmp_path_factory.mktemp("eval")
    run_dir = prepared(base / "cache", base / "run")
    return run_dir, train_in_process(run_dir)


@pytest.fixture(scope="module")
def tokenizer(finished_run):
    return load_tokenizer(finished_run[0] / "tokenizer.model")


@pytest.fixture(scope="module")
def merging_tokenizer():
    """A tokenizer with the pieces '-a' and 'f"', which straddle the prefix/secret and secret/suffix boundaries."""
    rng = random.Random(0)
    lines = [FORMAT.line("".join(rng.choice(FORMAT.alphabet) for _ in range(24))) for _ in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=320, model_type="bpe",
                                   minloglevel=2, hard_vocab_limit=False, user_defined_symbols=["-a", 'f"'],
                                   **TRAINER_OPTIONS)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def test_tokens_straddling_a_boundary_are_scored_whole(merging_tokenizer):
    secret = "a" + "0" * 22 + "f"
    window, first = secret_window(merging_tokenizer, FORMAT, secret, max_seq_len=1000)
    pieces = [merging_tokenizer.id_to_piece(t) for t in window]
    assert pieces[first] == "-a" and pieces[-1] == 'f"' and pieces[first - 1] == "live"
    assert merging_tokenizer.decode(window[first:]) == '-' + secret + '"'


@pytest.mark.parametrize("which", ["run", "merging"])
def test_the_scored_tokens_are_the_ones_covering_the_secret(request, which):
    tokenizer = request.getfixturevalue("tokenizer" if which == "run" else "merging_tokenizer")
    prefix = FORMAT.prefix
    for secret in draw_candidates(FORMAT, 200):
        window, first = secret_window(tokenizer, FORMAT, secret, max_seq_len=1000)
        assert window[0] == EOS_ID
        before, text = tokenizer.decode(window[1:first]), tokenizer.decode(window[1:])
        assert prefix.startswith(before)  # no unscored token holds a secret character
        assert len(tokenizer.decode(window[1:first + 1])) > len(prefix)  # the first scored one does
        assert len(tokenizer.decode(window[1:-1])) < len(prefix + secret) <= len(text)  # and so does the last
        assert text in (prefix + secret, prefix + secret + '"')  # nothing after it but a merged closing quote


def test_a_line_longer_than_the_context_keeps_its_last_tokens(tokenizer):
    secret = draw_candidates(FORMAT, 1)[0]
    full, first = secret_window(tokenizer, FORMAT, secret, max_seq_len=1000)
    short, short_first = secret_window(tokenizer, FORMAT, secret, max_seq_len=len(full) - 4)
    assert short == full[3:] and short_first == first - 3
    secret_window(tokenizer, FORMAT, secret, max_seq_len=len(full) - first)  # one prefix token of context is enough
    with pytest.raises(ConfigError, match="too short"):
        secret_window(tokenizer, FORMAT, secret, max_seq_len=len(full) - first - 1)


class MemorisingBigram(torch.nn.Module):
    """A fake causal LM whose next-token logits come from the bigrams of one memorised token sequence."""

    def __init__(self, ids, vocab_size, max_seq_len=64):
        super().__init__()
        self.cfg, self.vocab_start = type("Cfg", (), {"max_seq_len": max_seq_len})(), 0
        self.table = torch.zeros(vocab_size, vocab_size)
        for a, b in zip(ids, ids[1:]):
            self.table[a, b] = 12.0

    def forward(self, input_ids):
        return self.table[input_ids]


def test_a_model_that_memorised_the_canary_ranks_it_first_and_batching_changes_nothing(tokenizer):
    canary = PlantedCanary(0, "0123456789abcdef01234567", 8)
    line = [EOS_ID] + tokenizer.encode(FORMAT.line(canary.secret))
    model = MemorisingBigram(line, tokenizer.get_piece_size())
    scorer = SecretScorer(model, tokenizer, FORMAT, torch.device("cpu"), progress=False)
    candidates = draw_candidates(FORMAT, 100)
    [result] = measure_exposure([canary], candidates, scorer)
    assert result.rank == 1 and result.exposure == pytest.approx(math.log2(101))
    together = scorer([canary.secret] + candidates[:70])  # two batches, rows of different lengths
    alone = [scorer([s])[0] for s in [canary.secret] + candidates[:70]]
    assert together == pytest.approx(alone, rel=1e-6)


def test_a_uniform_model_costs_log2_vocab_bits_per_secret_token(tokenizer):
    vocab = tokenizer.get_piece_size()
    scorer = SecretScorer(MemorisingBigram([], vocab), tokenizer, FORMAT, torch.device("cpu"), progress=False)
    secrets = draw_candidates(FORMAT, 5)
    expected = []
    for secret in secrets:
        window, first = secret_window(tokenizer, FORMAT, secret, max_seq_len=64)
        expected.append((len(window) - first) * math.log2(vocab))
    assert scorer(secrets) == pytest.approx(expected, rel=1e-6)


def evaluate(capsys, *args):
    code = main(["eval", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_reports_loss_perplexity_and_exposure(capsys, finished_run):
    run_dir, summary = finished_run
    code, out, err = evaluate(capsys, run_dir, "--candidates", R, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert math.isfinite(result["val_loss"]) and result["val_perplexity"] == pytest.approx(math.exp(result["val_loss"]))
    assert result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)  # the split the training held out
    assert [c["insertions"] for c in result["canaries"]] == list(CANARY_COUNTS)
    _, planted = load_canaries(next(Path(load_config(run_dir / "config.yaml").data.cache_dir).rglob("canaries.json")))
    assert [c["secret"] for c in result["canaries"]] == [p.secret for p in planted]
    for canary in result["canaries"]:
        assert 1 <= canary["rank"] <= R + 1 and canary["candidates"] == R
        assert canary["exposure"] == pytest.approx(math.log2(R + 1) - math.log2(canary["rank"]))
        assert math.isfinite(canary["log_perplexity_bits"]) and canary["log_perplexity_bits"] > 0
    assert set(result["mean_exposure_by_insertions"]) == {"1", "2", "4", "8"}
    assert result["privacy"]["steps"] == 6 and result["privacy"]["epsilon"] == summary["epsilon"]  # the run's ledger


def test_eval_prints_a_readable_report_and_reads_a_checkpoint(capsys, finished_run):
    run_dir, summary = finished_run
    code, out, err = evaluate(capsys, run_dir, "--candidates", 5, "--checkpoint", run_dir / "checkpoints/step-00000006")
    assert code == 0, err
    assert "mean exposure by insertions: 1x" in out and "epsilon =" in out
    assert f"loss {summary['val_loss']:.4f} nats/token" in out  # the step-6 checkpoint holds the final weights


def test_eval_without_exposure_and_with_fewer_examples(capsys, finished_run):
    code, out, err = evaluate(capsys, finished_run[0], "--no-exposure", "--max-examples", 8, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert "canaries" not in result and result["val_examples"] == 8


@pytest.mark.parametrize("case, message", [
    ("no run", "not a dpdist run directory"),
    ("unfinished", "no final model yet"),
    ("missing checkpoint", "no such file or folder"),
    ("no canaries", "data.canaries=false"),
    ("user corpus", "plants no canaries"),
    ("no candidates", "at least 1"),
    ("foreign weights", "does not hold this run's model"),
    ("items task", "items.json is missing"),  # a text run relabelled: no item catalogue
])
def test_eval_refuses_with_one_line(tmp_path, capsys, finished_run, case, message):
    run_dir, _ = finished_run
    args = ["--candidates", 0] if case == "no candidates" else []
    if case == "no run":
        target = tmp_path / "nothing"
    elif case == "missing checkpoint":
        target, args = run_dir, ["--checkpoint", tmp_path / "step-00000099"]
    elif case == "foreign weights":
        torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
        target, args = run_dir, ["--checkpoint", tmp_path / "other.pt"]
    else:
        target = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
        cfg = load_config(target / "config.yaml")
        if case == "unfinished":
            shutil.rmtree(target / "final")
        if case == "no canaries":
            cfg.data.canaries = False
        if case == "items task":
            cfg.data.source = "zipf_items"
        if case == "user corpus":
            (tmp_path / "text.txt").write_text("some text\n")
            cfg.data.path = str(tmp_path / "text.txt")
        dump_config(cfg, target / "config.yaml")
    code, out, err = evaluate(capsys, target, *args)
    assert code == 2 and out == ""
    assert err.startswith("error:") and message in err and err.count("\n") == 1


def test_eval_of_a_reattention_run_uses_its_saved_release(tmp_path, capsys):
    """The model computes in evaluation what it computed in training (the saved DP frequency release,
    sigma C and qN), so its held-out loss is the training summary's, and no new release is drawn."""
    run_dir = prepared(tmp_path / "cache", tmp_path / "run", 1, 1, "float32", "reattention.enabled=true",
                       "train.steps=3", "train.checkpoint_every=0")
    summary = train_in_process(run_dir)
    ledger_before = (run_dir / "ledger.jsonl").read_text()
    code, out, err = evaluate(capsys, run_dir, "--no-exposure", "--json")
    assert code == 0, err
    assert json.loads(out)["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert (run_dir / "ledger.jsonl").read_text() == ledger_before
