"""Pretrained (Hugging Face) tokenizers and prompt/completion pairs in the data pipeline: each pair is one
example whose loss is over its completion only; tokenizers are built here, never downloaded."""
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from dpdist.config import ConfigError, DataConfig
from dpdist.data.dataset import PAIRS_FILE, META_FILE, prepare_data
from dpdist.data.text_tokenizer import load_text_tokenizer, tokenizer_files
from dpdist.data.tokenizer import train_tokenizer
from dpdist.parallel.cross_entropy import IGNORE_INDEX, per_example_loss

# A word-level tokenizer with known ids: "<s>" 1, "</s>" 2, then one id per word.
WORDS = ["<unk>", "<s>", "</s>", "a", "b", "c", "d", "e", "f", "g", "h"]
ID = {w: i for i, w in enumerate(WORDS)}
BOS, EOS = ID["<s>"], ID["</s>"]
SENTENCES = ["differential privacy clips every gradient", "the noise hides one example", "épsilon and delta",
             "a model learns the completion only"] * 4


def _write_json(path: Path, record) -> Path:
    path.write_text(json.dumps(record))
    return path


def _word_folder(folder: Path, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json",
                config if config is not None else {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    return folder


def _bpe_json(path: Path, specials=("<unk>", "<s>", "</s>"), bos_template: bool = False) -> Path:
    """A byte-level BPE trained on SENTENCES (lossless: decode(encode(t)) == t): 256 bytes and a few merges."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials),
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos_template:
        bos = ("<s>", tok.token_to_id("<s>"))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    tok.save(str(path))
    return path


def _pairs(path: Path, pairs) -> str:
    text = "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs)
    if not path.exists() or path.read_text() != text:  # a rewritten file (new mtime) is a new cache key
        path.write_text(text)
    return str(path)


def _data(tmp_path, pairs, seq_len, tokenizer=None, **kw):
    tokenizer = tokenizer or tmp_path / "words"
    if not tokenizer.exists():
        _word_folder(tokenizer)
    return prepare_data(DataConfig(path=_pairs(tmp_path / "pairs.jsonl", pairs), tokenizer_path=str(tokenizer),
                                   seq_len=seq_len, val_fraction=0.0, packing="document",
                                   cache_dir=str(tmp_path / "cache"), **kw))


def _ids(text: str) -> list[int]:
    return [ID[w] for w in text.split()]


def test_a_pair_is_one_example_with_labels_on_the_completion_only(tmp_path):
    data = _data(tmp_path, [("a b", "c d"), ("e", "f g h")], seq_len=8)
    assert (data.num_train, data.pairs, data.prompts_truncated, data.completions_truncated) == (2, 2, 0, 0)
    x, y = data.train_batch([0, 1])
    P, I = EOS, IGNORE_INDEX  # padding: eos, an id that exists; never a target
    assert x.tolist() == [[BOS, ID["a"], ID["b"], ID["c"], ID["d"], EOS, P, P],
                          [BOS, ID["e"], ID["f"], ID["g"], ID["h"], EOS, P, P]]
    assert y.tolist() == [[I, I, ID["c"], ID["d"], EOS, I, I, I],
                          [I, ID["f"], ID["g"], ID["h"], EOS, I, I, I]]
    meta = json.loads((Path(data.cache_path) / META_FILE).read_text())
    assert (meta["pairs"], meta["prompt_tokens"], meta["completion_tokens"]) == (2, 3, 3 + 4)
    assert (Path(data.cache_path) / PAIRS_FILE).is_file()


def test_a_long_prompt_loses_tokens_on_its_left_and_a_long_completion_on_its_right(tmp_path):
    pairs = [("a b c d e", "f g"), ("a", "b c d e f g"), ("h", "a")]
    data = _data(tmp_path, pairs, seq_len=4)  # 5 tokens per example
    assert (data.pairs, data.prompts_truncated, data.completions_truncated) == (3, 1, 1)
    assert data.pair_summary().endswith("1 prompts cut on the left and 1 completions cut on the right to fit 5 tokens")
    x, y = data.train_batch([0, 1, 2])
    I = IGNORE_INDEX
    # bos + the prompt's last token + the whole completion and its eos
    assert x[0].tolist() == [BOS, ID["e"], ID["f"], ID["g"]] and y[0].tolist() == [I, ID["f"], ID["g"], EOS]
    # the completion alone does not fit: no prompt token, the completion cut on its right
    assert x[1].tolist() == [BOS] + _ids("b c d") and y[1].tolist() == _ids("b c d e")
    assert x[2].tolist() == [BOS, ID["h"], ID["a"], EOS] and y[2].tolist() == [I, ID["a"], EOS, I]
    # the same cache serves another seq_len, with its own counts
    wide = _data(tmp_path, pairs, seq_len=8)
    assert wide.cache_path == data.cache_path and (wide.prompts_truncated, wide.completions_truncated) == (0, 0)


def test_without_bos_the_first_completion_token_follows_the_prompt(tmp_path):
    words = _word_folder(tmp_path / "nobos", {"eos_token": "</s>", "bos_token": "<s>", "add_bos_token": False})
    data = _data(tmp_path, [("a b c", "d e")], seq_len=4, tokenizer=words)
    x, y = data.train_batch([0])
    assert x.tolist() == [_ids("b c d e")] and y.tolist() == [[IGNORE_INDEX] + _ids("d e") + [EOS]]
    assert data.prompts_truncated == 1


def test_the_loss_is_the_mean_over_completion_tokens_only(tmp_path):
    data = _data(tmp_path, [("a b c", "d e"), ("a b c", "d f"), ("g h c", "d e")], seq_len=8)
    x, y = data.train_batch([0, 1, 2])
    assert torch.equal(y[0], y[2])  # another prompt of the same length: the same targets
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, len(WORDS), dtype=torch.float64, generator=generator)
    loss = per_example_loss(logits, y)
    # independent reference: -log softmax at the completion's targets (d, e|f, eos), averaged
    log_p = torch.log_softmax(logits, -1)
    for row, completion in enumerate(["d e", "d f", "d e"]):
        positions, targets = [3, 4, 5], _ids(completion) + [EOS]
        expected = -sum(log_p[row, t, k] for t, k in zip(positions, targets)) / 3
        assert torch.allclose(loss[row], expected, rtol=0, atol=1e-12)
    # the logits at prompt positions (and padding) cannot move the loss ...
    perturbed = logits.clone()
    perturbed[:, [0, 1, 2, 6, 7]] += torch.randn(3, 5, len(WORDS), dtype=torch.float64, generator=generator)
    assert torch.equal(per_example_loss(perturbed, y), loss)
    # ... a changed completion token does
    assert not torch.allclose(loss[0], per_example_loss(logits, y[1:2].expand(3, -1))[0])


def test_hugging_face_tokenizer_json_folder(tmp_path):
    folder = tmp_path / "bpe"
    folder.mkdir()
    _bpe_json(folder / "tokenizer.json")
    _write_json(folder / "tokenizer_config.json", {"bos_token": {"content": "<s>"}, "eos_token": "</s>"})
    tok = load_text_tokenizer(folder)
    text = "the noise hides épsilon"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.encode([text, "a"]) == [ids, tok.encode("a")]
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (2, 1, 2)
    assert not tok.add_bos  # no post-processor puts one in front and the config does not ask for one
    assert tok.vocab_size == 300
    assert tokenizer_files(folder) == [folder / "tokenizer.json", folder / "tokenizer_config.json"]


def test_ids_from_config_json_and_the_tokenizer_own_specials(tmp_path):
    folder = tmp_path / "gpt2ish"
    folder.mkdir()
    _bpe_json(folder / "tokenizer.json", specials=("<|endoftext|>", "<s>"), bos_template=True)
    bare = load_text_tokenizer(folder / "tokenizer.json")  # no configs: known names, post-processor's bos
    assert (bare.eos_id, bare.bos_id, bare.add_bos) == (0, 1, True)
    _write_json(folder / "config.json", {"eos_token_id": [1, 0], "bos_token_id": 0, "vocab_size": 320})
    _write_json(folder / "special_tokens_map.json", {"bos_token": "<s>"})
    tok = load_text_tokenizer(folder)
    assert (tok.eos_id, tok.bos_id, tok.add_bos, tok.vocab_size) == (1, 1, True, 320)
    assert tokenizer_files(folder) == [folder / "tokenizer.json", folder / "special_tokens_map.json"]


def test_hugging_face_sentencepiece_folder(tmp_path):
    folder = tmp_path / "llamaish"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(train_tokenizer(SENTENCES, 300, "bpe"))
    _write_json(folder / "tokenizer_config.json", {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"})
    tok = load_text_tokenizer(folder)
    text = "a model learns épsilon\nand delta"
    assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.pad_id) == (2, 3, True, 0)
    _write_json(folder / "tokenizer_config.json", {"add_bos_token": False, "eos_token": "<unk>"})
    assert (load_text_tokenizer(folder).eos_id, load_text_tokenizer(folder).add_bos) == (1, False)
    assert tokenizer_files(folder) == [folder / "tokenizer.model", folder / "tokenizer_config.json"]


def test_text_with_a_pretrained_tokenizer_is_keyed_on_its_files_and_never_trains(tmp_path):
    folder = tmp_path / "bpe"
    folder.mkdir()
    _bpe_json(folder / "tokenizer.json", bos_template=True)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES[:3]))

    def data(**kw):
        return prepare_data(DataConfig(path=str(corpus), tokenizer_path=str(folder), seq_len=8, val_fraction=0.0,
                                       packing="document", cache_dir=str(tmp_path / "cache"), **kw))

    first = data()
    assert not (Path(first.cache_path) / "tokenizer.model").exists() and first.tokenizer_path == str(folder)
    assert data(vocab_size=50).cache_path == first.cache_path  # data.vocab_size is not used
    tok = first.tokenizer()
    x, y = first.train_batch(torch.arange(first.num_train))
    document = [tok.bos_id] + tok.encode(SENTENCES[0]) + [tok.eos_id]
    assert x[0, 0] == tok.eos_id and x[0, 1:].tolist() == document[:7]  # the stream's opening eos, then bos
    padded = y == IGNORE_INDEX
    assert (x[:, 1:][padded[:, :-1]] == tok.eos_id).all()  # padding is eos: an id that exists
    _write_json(folder / "tokenizer_config.json", {"eos_token": "<s>"})
    assert data().cache_path != first.cache_path  # the configs that name the ids are part of the key


def test_refusals(tmp_path):
    words = str(_word_folder(tmp_path / "words"))
    neither = tmp_path / "neither.jsonl"
    neither.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ConfigError, match=rf"{neither.name} line 2 is not a JSON object with either"):
        _data_at(tmp_path, neither, words)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "a", "completion": "b"}\n\n{"text": "a b"}\n')
    with pytest.raises(ConfigError, match=rf"{mixed.name} line 3 is text but earlier lines are pairs"):
        _data_at(tmp_path, mixed, words)
    both = tmp_path / "both.jsonl"
    both.write_text('{"text": "a", "prompt": "a", "completion": "b"}\n')
    with pytest.raises(ConfigError, match="line 1 is not a JSON object with either"):
        _data_at(tmp_path, both, words)
    folder = tmp_path / "folder"
    folder.mkdir()
    _pairs(folder / "a.jsonl", [("a", "b")])
    (folder / "b.txt").write_text("a b\n")
    with pytest.raises(ConfigError, match=r"b.txt holds text but .*a.jsonl holds pairs"):
        _data_at(tmp_path, folder, words)
    with pytest.raises(ConfigError, match="set data.packing=document"):
        _data_at(tmp_path, Path(_pairs(tmp_path / "ok.jsonl", [("a", "b")])), words, packing="stream")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds neither tokenizer.json nor tokenizer.model"):
        load_text_tokenizer(tmp_path / "empty")
    with pytest.raises(ConfigError, match="'<eos>' named beside data.tokenizer_path is not in the tokenizer"):
        load_text_tokenizer(_word_folder(tmp_path / "bad", {"eos_token": "<eos>"}))
    with pytest.raises(ConfigError, match="names no end-of-sequence token"):
        load_text_tokenizer(_bpe_json(tmp_path / "tokenizer.json", specials=("<unk>", "<pad>")))


def _data_at(tmp_path, path, tokenizer, packing="document"):
    return prepare_data(DataConfig(path=str(path), tokenizer_path=tokenizer, seq_len=8, packing=packing,
                                   cache_dir=str(tmp_path / "cache")))


def test_pairs_with_a_tokenizer_trained_on_them(tmp_path):
    """No data.tokenizer_path: sentencepiece is trained on prompts and completions, and (as for text) no bos."""
    pairs = [(s, t) for s, t in zip(SENTENCES, SENTENCES[1:])]
    data = prepare_data(DataConfig(path=_pairs(tmp_path / "p.jsonl", pairs), vocab_size=300, seq_len=64,
                                   val_fraction=0.25, packing="document", cache_dir=str(tmp_path / "cache")))
    assert (data.num_train, data.num_val, data.prompts_truncated) == (12, 3, 0)
    tok = data.tokenizer()
    x, y = data.val_batch([2])
    prompt, completion = pairs[-1]
    targets = y[0][y[0] != IGNORE_INDEX].tolist()
    assert targets[-1] == tok.eos_id and tok.decode(targets[:-1]) == completion
    assert tok.decode(x[0][: len(tok.encode(prompt))].tolist()) == prompt
