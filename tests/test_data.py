"""The data pipeline: the default corpus and its canaries, examples cut from the token stream, the cache,
the user's own files, and bad input refused with one line that says what to change."""
import argparse
import dataclasses
import json
import multiprocessing
import pickle
import random
import re
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dpdist.commands import tokenize
from dpdist.config import ConfigError, DataConfig
from dpdist.data import corpus as corpus_module
from dpdist.data.dataset import PreparedData, prepare_data, token_dtype
from dpdist.data.tokenizer import EOS_ID

SMALL = {"max_corpus_mb": 0.5, "vocab_size": 512}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def default_data(cache_dir):
    return prepare_data(DataConfig(cache_dir=cache_dir, **SMALL))


def token_stream(data: PreparedData) -> np.ndarray:
    return np.fromfile(data.tokens_path, dtype=token_dtype(data.vocab_size))


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    vocab = ["privacy", "gradient", "noise", "clip", "token", "model", "the", "a", "of", "learns", "épsilon", "naïve"]
    return "\n".join(" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 12))) for _ in range(n)) + "\n"


def test_default_corpus_is_the_stdlib_with_every_canary_planted(default_data):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [Path(f[0]) for f in json.loads(Path(default_data.cache_path, "meta.json").read_text())
             ["fingerprint"]["corpus"]["files"]]
    assert len(files) == default_data.num_files > 1
    for path in files:
        parts = set(path.relative_to(stdlib.resolve()).parts)
        assert path.suffix == ".py" and not parts & {"site-packages", "test", "tests", "idle_test"}
    text = default_data.tokenizer().decode(token_stream(default_data).tolist())
    assert files[0].read_text(encoding="utf-8", errors="replace") in text

    record = json.loads(Path(default_data.canaries_path).read_text())
    assert [c["count"] for c in record["canaries"]] == [1, 1, 2, 2, 4, 4, 8, 8]
    assert len({c["secret"] for c in record["canaries"]}) == 8
    stream = token_stream(default_data)
    in_training = default_data.num_train * (default_data.seq_len + 1)
    for canary in record["canaries"]:
        assert re.fullmatch(record["pattern"], canary["line"]) and canary["value"] in canary["line"]
        assert text.count(canary["value"]) == canary["count"] == len(canary["token_offsets"])
        for offset in canary["token_offsets"]:
            ids = stream[offset:offset + canary["num_tokens"]].tolist()
            assert default_data.tokenizer().decode(ids) == canary["line"] and offset < in_training


def test_canaries_can_be_turned_off(cache_dir):
    data = prepare_data(DataConfig(cache_dir=cache_dir, canaries=False, **SMALL))
    assert data.canaries_path is None
    assert "dpd-live-" not in data.tokenizer().decode(token_stream(data).tolist())


def test_examples_are_shifted_disjoint_chunks_that_cover_the_stream(default_data):
    data, width = default_data, default_data.seq_len + 1
    chunks = data.num_tokens // width
    assert data.num_train + data.num_val == chunks and data.num_val == int(chunks * 0.02) > 0
    x, y = data.train_batch(torch.arange(data.num_train))
    xv, yv = data.val_batch(torch.arange(data.num_val))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (data.num_train, data.seq_len)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(xv[:, 1:], yv[:, :-1])
    rebuilt = torch.cat([torch.cat([x, y[:, -1:]], 1), torch.cat([xv, yv[:, -1:]], 1)]).flatten()
    assert torch.equal(rebuilt, torch.from_numpy(token_stream(data)[:chunks * width].astype(np.int64)))
    picked, _ = data.train_batch(torch.tensor([3, 0]))
    assert torch.equal(picked, x[[3, 0]])
    with pytest.raises(IndexError):
        data.train_batch(torch.tensor([data.num_train]))
    with pytest.raises(IndexError):
        data.val_batch(torch.tensor([-1]))


def _first_val_example(data: PreparedData) -> torch.Tensor:
    return data.val_batch(torch.tensor([0]))[0]


def test_prepared_data_pickles_and_works_in_a_forked_worker(default_data):
    default_data.train_batch(torch.tensor([0]))  # the parent's memmap is open before the fork
    clone = pickle.loads(pickle.dumps(default_data))
    assert clone == default_data and torch.equal(clone.train_batch([5])[0], default_data.train_batch([5])[0])
    with multiprocessing.get_context("fork").Pool(1) as pool:
        from_worker = pool.apply(_first_val_example, (default_data,))
    assert torch.equal(from_worker, _first_val_example(default_data))


def test_second_call_and_other_seq_len_hit_the_cache(cache_dir, default_data):
    started = time.perf_counter()
    again = prepare_data(DataConfig(cache_dir=cache_dir, **SMALL))
    assert time.perf_counter() - started < 1.0
    assert again.from_cache and not default_data.from_cache
    assert dataclasses.replace(again, from_cache=False) == default_data
    shorter = prepare_data(DataConfig(cache_dir=cache_dir, seq_len=32, **SMALL))
    assert shorter.from_cache and shorter.tokens_path == default_data.tokens_path
    assert shorter.num_train + shorter.num_val == shorter.num_tokens // 33
    assert sorted(p.name for p in Path(cache_dir).iterdir() if p.name.startswith(".")) == []  # no staging left


def _prepare(cfg: DataConfig) -> str:
    return prepare_data(cfg).cache_path


def test_processes_racing_to_build_end_up_sharing_one_complete_cache(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), max_corpus_mb=0.1, vocab_size=512)
    with multiprocessing.get_context("fork").Pool(3) as pool:
        paths = pool.map(_prepare, [cfg] * 3)
    assert len(set(paths)) == 1 and [p.name for p in tmp_path.iterdir()] == [Path(paths[0]).name]
    assert prepare_data(cfg).from_cache


def test_round_trip_is_exact(default_data):
    sp = default_data.tokenizer()
    for text in ["def f(x):\n\treturn x  # trailing  \n\n", "  leading spaces", "naïve café ∑ 日本語 🙂",
                 "line\r\nwindows\r\n", ""]:
        assert sp.decode(sp.encode(text)) == text


def test_user_txt_jsonl_and_folder(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "b.txt").write_text(words(300, 1))
    records = [words(20, seed) for seed in range(10)]
    (tmp_path / "corpus" / "a.jsonl").write_text("".join(json.dumps({"text": r, "id": i}) + "\n\n"
                                                         for i, r in enumerate(records)))
    (tmp_path / "corpus" / "sub").mkdir()
    (tmp_path / "corpus" / "sub" / "c.txt").write_text(words(50, 2))
    (tmp_path / "corpus" / "ignored.csv").write_text("x,y\n")
    cases = {"corpus/b.txt": [words(300, 1)], "corpus/a.jsonl": records,
             "corpus": records + [words(300, 1), words(50, 2)]}
    for relative, documents in cases.items():
        data = prepare_data(DataConfig(path=str(tmp_path / relative), cache_dir=str(tmp_path / "cache"), seq_len=16,
                                       **SMALL))
        stream = token_stream(data)
        assert data.canaries_path is None and data.num_train > 0 and data.vocab_size <= 512
        assert data.num_files == (3 if relative == "corpus" else 1)
        assert int((stream == EOS_ID).sum()) == len(documents) and stream[-1] == EOS_ID
        assert data.tokenizer().decode(stream.tolist()) == "".join(documents)


def test_a_tiny_corpus_gets_a_smaller_vocabulary_not_an_error(tmp_path):
    (tmp_path / "tiny.txt").write_text("hello world, a tiny corpus\n" * 20)
    data = prepare_data(DataConfig(path=str(tmp_path / "tiny.txt"), cache_dir=str(tmp_path / "cache"), seq_len=8,
                                   **SMALL))
    assert data.vocab_size < 512 and data.num_train > 0
    assert data.tokenizer().decode(token_stream(data).tolist()) == "hello world, a tiny corpus\n" * 20


def test_a_large_txt_file_streamed_in_blocks_tokenizes_as_a_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "BLOCK_CHARS", 500)
    text = words(400, 3)
    (tmp_path / "big.txt").write_text(text)
    data = prepare_data(DataConfig(path=str(tmp_path / "big.txt"), cache_dir=str(tmp_path / "cache"), **SMALL))
    assert token_stream(data).tolist() == data.tokenizer().encode(text) + [EOS_ID]


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", "", "is empty"),
    ("blank.txt", "\n  \n\n", "holds no text"),
    ("empty_dir", {}, "holds no .txt or .jsonl files"),
    ("data.csv", "a,b\n", "must be a .txt or .jsonl file"),
    ("bad.jsonl", '{"text": "fine"}\n{"body": "no text field"}\n', "line 2 is not a JSON object"),
])
def test_bad_corpus_is_refused_with_what_to_change(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, dict):
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        prepare_data(DataConfig(path=str(path), cache_dir=str(tmp_path / "cache")))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not any((tmp_path / "cache").glob("*/meta.json"))


def test_tokenize_command_prints_a_summary(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    tokenize.add_parser(parser.add_subparsers())
    args = parser.parse_args(["tokenize", f"data.cache_dir={tmp_path}", "data.max_corpus_mb=0.2",
                              "data.vocab_size=512"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "standard library" in out and "training +" in out and "canaries.json" in out and str(tmp_path) in out
    assert "(data.packing=stream)" in out
    args = parser.parse_args(["tokenize", f"data.path={tmp_path / 'nope.txt'}"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.path") and err.count("\n") == 1


def test_a_given_public_tokenizer_is_used_instead_of_one_trained_on_the_data(tmp_path):
    """data.tokenizer_path: the vocabulary then reveals nothing about the private corpus."""
    public = tmp_path / "public.txt"
    public.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(300)))
    private = tmp_path / "private.txt"
    private.write_text("\n".join(f"zebra xylophone quartz {i}" for i in range(300)))
    first = prepare_data(DataConfig(path=str(public), vocab_size=300, cache_dir=str(tmp_path / "c1"), seq_len=8))
    given = DataConfig(path=str(private), tokenizer_path=first.tokenizer_path, cache_dir=str(tmp_path / "c2"), seq_len=8)
    given.validate()
    data = prepare_data(given)
    assert Path(data.tokenizer_path).read_bytes() == Path(first.tokenizer_path).read_bytes()
    assert data.tokenizer().decode(data.tokenizer().encode("zebra quartz")) == "zebra quartz"
