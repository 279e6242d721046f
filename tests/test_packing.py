"""data.packing: with ``document`` no example holds tokens of two documents, so removing a document
removes its examples and changes no other; ``stream`` (the default) is the chunked stream it always was."""
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dpdist import ModelConfig, build_model
from dpdist.config import ConfigError, DataConfig
from dpdist.data.corpus import CANARY_COUNTS
from dpdist.data.dataset import DOCUMENTS_FILE, META_FILE, prepare_data, token_dtype
from dpdist.data.tokenizer import EOS_ID, PAD_ID
from dpdist.parallel.cross_entropy import IGNORE_INDEX, per_example_loss
from dpdist.privacy.frequencies import presence_counts

SEQ_LEN = 16
WORDS = ["privacy", "gradient", "noise", "clip", "token", "model", "the", "a", "of", "learns", "épsilon"]


def _records(count: int, seed: int = 0) -> list[str]:
    """Short documents (a few words, under SEQ_LEN tokens) and long ones (several examples each)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.choice([2, 3, 4, 40, 90]))) for _ in range(count)]


def _jsonl(path, records):
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Ten records and a tokenizer trained once on them, then fixed: a tokenizer trained on each corpus
    would itself change with the removed document."""
    base = tmp_path_factory.mktemp("packing")
    records = _records(10)
    tokenizer = prepare_data(DataConfig(path=_jsonl(base / "train_tok.jsonl", records), vocab_size=300,
                                        cache_dir=str(base / "tok"))).tokenizer_path
    return base, records, tokenizer


def _data(base, name, records, tokenizer, packing):
    return prepare_data(DataConfig(path=_jsonl(base / f"{name}.jsonl", records), tokenizer_path=tokenizer,
                                   seq_len=SEQ_LEN, val_fraction=0.0, packing=packing, cache_dir=str(base / "cache")))


def _examples(data) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    x, y = data.train_batch(torch.arange(data.num_train))
    return [(tuple(a), tuple(b)) for a, b in zip(x.tolist(), y.tolist())]


@pytest.mark.parametrize("removed", [1, 7, 9])
def test_removing_a_short_document_removes_exactly_its_example(corpus, removed):
    base, records, tokenizer = corpus
    assert len(records[removed].split()) <= 4  # short: one example
    data = _data(base, "full", records, tokenizer, "document")
    full = _examples(data)
    without = _examples(_data(base, f"without{removed}", records[:removed] + records[removed + 1:], tokenizer,
                              "document"))
    assert len(full) == len(without) + 1
    gone = [k for k in range(len(full)) if full[:k] + full[k + 1:] == without]
    assert len(gone) == 1  # the others are identical tensors, in the same order
    inputs, labels = full[gone[0]]
    targets = [t for t in labels if t != IGNORE_INDEX]
    assert inputs[0] == EOS_ID and targets[-1] == EOS_ID and data.tokenizer().decode(targets[:-1]) == records[removed]


def test_in_stream_packing_the_same_removal_shifts_later_examples(corpus):
    """Why document packing exists: a chunk of the stream is not a document."""
    base, records, tokenizer = corpus
    full = _examples(_data(base, "full", records, tokenizer, "stream"))
    without = set(_examples(_data(base, "without1", records[:1] + records[2:], tokenizer, "stream")))
    assert sum(example not in without for example in full) > 2


def test_every_target_of_every_document_is_in_exactly_one_example(corpus):
    """A long document becomes several examples; padding is never a target and is PAD in the inputs."""
    base, records, tokenizer = corpus
    data = _data(base, "full", records, tokenizer, "document")
    sp = data.tokenizer()
    x, y = data.train_batch(torch.arange(data.num_train))
    assert torch.equal(x[:, 1:][y[:, :-1] != IGNORE_INDEX], y[:, :-1][y[:, :-1] != IGNORE_INDEX])
    padded = y == IGNORE_INDEX
    assert torch.equal(x[:, 1:][padded[:, :-1]], torch.full_like(x[:, 1:][padded[:, :-1]], PAD_ID))
    assert (padded[:, :-1] <= padded[:, 1:]).all()  # padding is a suffix
    documents, targets = [], []
    for labels in y.tolist():
        for label in labels:
            if label == IGNORE_INDEX:
                break
            targets.append(label)
            if label == EOS_ID:
                documents.append(sp.decode(targets[:-1]))
                targets = []
    assert documents == records and targets == []
    counts = [-(-(len(sp.encode(r)) + 1) // SEQ_LEN) for r in records]
    assert data.num_train == sum(counts) and max(counts) > 1


def test_padding_changes_no_per_example_gradient():
    """Under causal attention no real position sees the padding, and it is never a target: what the
    padded positions hold does not change the example's loss or its gradient."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, max_seq_len=SEQ_LEN,
                                    dtype="float64"))
    inputs = torch.randint(4, 50, (1, SEQ_LEN))
    labels = torch.cat([inputs[:, 1:], torch.tensor([[EOS_ID]])], 1)
    labels[:, 6:] = IGNORE_INDEX
    other = inputs.clone()
    inputs[:, 7:], other[:, 7:] = PAD_ID, torch.randint(4, 50, (1, SEQ_LEN - 7))

    def gradient(ids):
        loss = per_example_loss(model(ids), labels)
        return [loss.detach(), *torch.autograd.grad(loss.sum(), list(model.parameters()))]

    for a, b in zip(gradient(inputs), gradient(other)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_stream_packing_is_unchanged(corpus):
    """The default keeps the old cache key (no new fingerprint field) and the old chunking; document
    packing gets its own cache: the same stream with an opening EOS, and the documents' ends."""
    base, records, tokenizer = corpus
    stream = _data(base, "full", records, tokenizer, "stream")
    default = prepare_data(DataConfig(path=str(base / "full.jsonl"), tokenizer_path=tokenizer, seq_len=SEQ_LEN,
                                      val_fraction=0.0, cache_dir=str(base / "cache")))
    assert default.from_cache and default.cache_path == stream.cache_path
    meta = json.loads((Path(stream.cache_path) / META_FILE).read_text())
    assert set(meta["fingerprint"]) == {"format", "corpus", "vocab_size", "tokenizer_model", "trainer",
                                        "max_sentences", "tokenizer"}
    tokens = np.fromfile(stream.tokens_path, dtype=token_dtype(stream.vocab_size)).astype(np.int64)
    x, y = stream.train_batch(torch.arange(stream.num_train))
    assert stream.num_train == len(tokens) // (SEQ_LEN + 1) and (y != IGNORE_INDEX).all()
    assert torch.equal(torch.cat([x, y[:, -1:]], 1).flatten(), torch.from_numpy(tokens[:x.numel() + len(x)]))

    document = _data(base, "full", records, tokenizer, "document")
    assert document.cache_path != stream.cache_path and stream.documents_path is None
    packed = np.fromfile(document.tokens_path, dtype=token_dtype(document.vocab_size)).astype(np.int64)
    assert packed[0] == EOS_ID and np.array_equal(packed[1:], tokens)
    ends = np.fromfile(document.documents_path, dtype=np.int64)
    assert len(ends) == len(records) and (packed[ends] == EOS_ID).all() and ends[-1] == len(packed) - 1


def test_document_data_pickles_and_rebuilds_its_index(corpus):
    base, records, tokenizer = corpus
    data = _data(base, "full", records, tokenizer, "document")
    first = data.train_batch([3, 0])
    clone = pickle.loads(pickle.dumps(data))
    assert clone == data and clone._starts is None
    assert all(torch.equal(a, b) for a, b in zip(clone.train_batch([3, 0]), first))


def test_default_corpus_documents_are_its_files_and_each_canary_copy(tmp_path):
    data = prepare_data(DataConfig(max_corpus_mb=0.1, vocab_size=512, packing="document", cache_dir=str(tmp_path)))
    ends = np.fromfile(Path(data.cache_path) / DOCUMENTS_FILE, dtype=np.int64)
    assert len(ends) == data.num_files + sum(CANARY_COUNTS)
    sp = data.tokenizer()
    canaries = json.loads(Path(data.canaries_path).read_text())["canaries"]
    starts = set(np.concatenate(([0], ends[:-1])).tolist())
    for canary in canaries:
        for offset in canary["token_offsets"]:  # each copy opens a document: its EOS comes just before it
            assert offset - 1 in starts
            assert ends[np.searchsorted(ends, offset)] == offset + canary["num_tokens"]
    tokens = np.fromfile(data.tokens_path, dtype=token_dtype(data.vocab_size))
    copy = canaries[0]["token_offsets"][0]
    assert sp.decode(tokens[copy:copy + canaries[0]["num_tokens"]].tolist()) == canaries[0]["line"]


def test_presence_counts_do_not_count_padding():
    """Re-Attention's token counts: a padded input is not a token the sequence contains."""

    class Padded:
        def train_batch(self, indices):
            return torch.tensor([[EOS_ID, 5, 6, PAD_ID, PAD_ID]]), torch.tensor([[5, 6, EOS_ID, -100, -100]])

    assert presence_counts(Padded(), 1, 8).tolist() == [0, 0, 0, 1, 0, 1, 1, 0]


def test_an_unknown_packing_is_refused():
    with pytest.raises(ConfigError, match="data.packing must be one of stream, document; got 'documents'"):
        DataConfig(packing="documents").validate()
