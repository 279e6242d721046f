"""One interface over every tokenizer the text pipeline reads with.

``data.tokenizer_path`` (or the model dpdist trains on the corpus) is one of:

* a sentencepiece ``.model`` file: dpdist's own trained model, or a public one;
* a Hugging Face ``tokenizer.json`` file, read with the ``tokenizers`` library;
* a Hugging Face model folder holding ``tokenizer.json`` (preferred) or ``tokenizer.model``
  (sentencepiece).

The special tokens of a Hugging Face tokenizer are named outside the tokenizer file: in the
``tokenizer_config.json`` / ``special_tokens_map.json`` / ``config.json`` beside it (looked up in that
order), else among the tokenizer's own special tokens.  A bare ``.model`` file keeps what the pipeline
always did with one: sentencepiece's own eos and pad pieces, and no bos in front of a document.

``encode`` never adds special tokens: the pipeline places bos (when ``add_bos``) and eos itself, so a
prompt and its completion can be encoded apart and joined without a bos in between.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import sentencepiece as spm

from ..config import ConfigError
from .tokenizer import read_model

HF_TOKENIZER, SP_TOKENIZER = "tokenizer.json", "tokenizer.model"
SPECIALS_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # travel with the tokenizer
MODEL_CONFIG = "config.json"  # read for ids and the model's vocabulary size, but belongs to the model
# A tokenizer.json with no config beside it: its special tokens are recognised by these usual names.
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
SP_THREADS = 2


class TextTokenizer:
    """Text to ids and back, with the ids the pipeline frames documents and pairs with.

    ``vocab_size``: rows the model's embedding needs (a Hugging Face folder's ``config.json`` may pad
    it beyond the tokenizer's last id); ``num_ids``: the ids the tokenizer itself has (what sampling
    may produce); ``pad_id``: an id that exists, written where an example has no token (its label is
    always ignored)."""

    vocab_size: int
    num_ids: int
    eos_id: int
    bos_id: int | None
    add_bos: bool
    pad_id: int

    def encode(self, text: str | list[str]) -> list[int] | list[list[int]]:
        """The ids of one text, or of each text in a list (no special tokens added)."""
        if isinstance(text, str):
            return self.encode_batch([text])[0]
        return self.encode_batch(list(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError


class SentencePieceTokenizer(TextTokenizer):
    def __init__(self, model: str | Path, specials: dict | None = None):
        """``specials``: a Hugging Face folder's special tokens (see ``_folder_specials``); None for a
        bare ``.model`` file."""
        self.processor = spm.SentencePieceProcessor(model_proto=read_model(model))  # a bad file: one line
        self.num_ids = self.processor.get_piece_size()
        own_bos = self.processor.bos_id() if self.processor.bos_id() >= 0 else None
        own_eos = self.processor.eos_id() if self.processor.eos_id() >= 0 else None
        if specials is None:
            self.eos_id, self.bos_id, self.add_bos = own_eos, own_bos, False
            self.vocab_size = self.processor.get_piece_size()
        else:
            self.eos_id = _resolve(specials, "eos", self._piece_id, own_eos)
            self.bos_id = _resolve(specials, "bos", self._piece_id, own_bos)
            # Hugging Face's sentencepiece tokenizers (Llama, Mistral) put bos in front unless told not to.
            self.add_bos = bool(specials.get("add_bos_token", True)) and self.bos_id is not None
            self.vocab_size = max(self.processor.get_piece_size(), specials.get("vocab_size") or 0)
        if self.eos_id is None:
            raise ConfigError(f"data.tokenizer_path {str(model)!r} has no end-of-sequence token; give a tokenizer "
                              "with one (or name eos_token in its tokenizer_config.json)")
        self.pad_id = self.processor.pad_id() if self.processor.pad_id() >= 0 else self.eos_id

    def hugging_face_config(self) -> dict:
        """A ``tokenizer_config.json`` with which transformers reads this model as the pipeline does:
        its special pieces, no bos or eos added unless the pipeline adds them, and sentencepiece's own
        dummy prefix only if the model has one (dpdist's trained models do not)."""
        p = self.processor
        specials = {f"{kind}_token": p.id_to_piece(i) for kind, i in
                    (("bos", self.bos_id), ("eos", self.eos_id), ("unk", p.unk_id()), ("pad", self.pad_id))
                    if i is not None and i >= 0}
        dummy_prefix = p.encode("a", out_type=str)[0].startswith("\u2581")
        return {"tokenizer_class": "LlamaTokenizer", **specials, "add_bos_token": self.add_bos, "add_eos_token": False,
                "legacy": False, "add_prefix_space": dummy_prefix}

    def _piece_id(self, piece: str) -> int | None:
        """The id of ``piece``; None when absent (sentencepiece answers the unknown piece's id then)."""
        found = self.processor.piece_to_id(piece)
        return found if self.processor.id_to_piece(found) == piece else None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(texts, num_threads=SP_THREADS)

    def decode(self, ids) -> str:
        return self.processor.decode(list(ids))


class HuggingFaceTokenizer(TextTokenizer):
    def __init__(self, file: str | Path, specials: dict):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # the library raises a bare Exception for a malformed file
            raise ConfigError(f"data.tokenizer_path: {file} is not a Hugging Face tokenizer.json ({exc})") from None
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        added = [t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special]
        self.eos_id = _resolve(specials, "eos", vocab.get, _first_known(added, EOS_NAMES, vocab))
        self.bos_id = _resolve(specials, "bos", vocab.get, _first_known(added, BOS_NAMES, vocab))
        if self.eos_id is None:
            raise ConfigError(f"data.tokenizer_path: {file} names no end-of-sequence token; add \"eos_token\" to a "
                              "tokenizer_config.json beside it")
        self.add_bos = self.bos_id is not None and bool(specials.get("add_bos_token", self._prepends_bos()))
        self.num_ids = max(vocab.values()) + 1
        self.vocab_size = max(self.num_ids, specials.get("vocab_size") or 0)
        self.pad_id = self.eos_id

    def _prepends_bos(self) -> bool:
        """Whether the tokenizer's own post-processor puts bos in front of a text (Llama 3 does, GPT-2 does not)."""
        with_specials = self.tokenizer.encode("a", add_special_tokens=True).ids
        plain = self.tokenizer.encode("a", add_special_tokens=False).ids
        return len(with_specials) > len(plain) and with_specials[0] == self.bos_id

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def is_hugging_face(path: str | Path) -> bool:
    """A folder or a ``.json`` file: anything else is read as a sentencepiece ``.model``."""
    path = Path(path)
    return path.is_dir() or path.suffix == ".json"


def load_text_tokenizer(path: str | Path) -> TextTokenizer:
    path = Path(path)
    if not is_hugging_face(path):
        return SentencePieceTokenizer(path)
    folder = path if path.is_dir() else path.parent
    specials = _folder_specials(folder)
    if path.is_file():
        return HuggingFaceTokenizer(path, specials)
    if (path / HF_TOKENIZER).is_file():
        return HuggingFaceTokenizer(path / HF_TOKENIZER, specials)
    if (path / SP_TOKENIZER).is_file():
        return SentencePieceTokenizer(path / SP_TOKENIZER, specials)
    raise ConfigError(f"data.tokenizer_path {str(path)!r} holds neither {HF_TOKENIZER} nor {SP_TOKENIZER}; point it at "
                      "a Hugging Face model folder, a tokenizer.json or a sentencepiece .model")


def tokenizer_files(path: str | Path) -> list[Path]:
    """The files a run directory copies to read (and ship) the same tokenizer: the ``.model`` itself,
    or the tokenizer file(s) and special-token configs that exist beside it.  ``config.json`` is not
    among them: it describes the model, and an export writes its own."""
    path = Path(path)
    if not is_hugging_face(path):
        return [path]
    folder = path if path.is_dir() else path.parent
    if path.is_file():
        tokenizers = [path]
    else:
        tokenizers = [folder / n for n in (HF_TOKENIZER, SP_TOKENIZER) if (folder / n).is_file()]
    return tokenizers + [folder / n for n in SPECIALS_FILES if (folder / n).is_file()]


def tokenizer_digest(path: str | Path) -> str:
    """A hash of everything that decides the ids: the tokenizer files, their special-token configs and
    ``config.json`` (ids and vocabulary size may come from it)."""
    digest = hashlib.sha256()
    for file in _deciding_files(path):  # by role, not name: a run's copy hashes as its source does
        digest.update(_role(file).encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def copy_tokenizer(path: str | Path, folder: str | Path) -> Path:
    """Copy what decides the ids of the Hugging Face tokenizer at ``path`` into ``folder`` (a run's
    own copy): the tokenizer files, their special-token configs and the ``config.json`` they may take
    ids and the vocabulary size from, each under the name ``load_text_tokenizer(folder)`` looks for."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for file in _deciding_files(path):
        shutil.copyfile(file, folder / _role(file))
    return folder


def _deciding_files(path: str | Path) -> list[Path]:
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    beside = [folder / MODEL_CONFIG] if is_hugging_face(path) and (folder / MODEL_CONFIG).is_file() else []
    return tokenizer_files(path) + beside


def _role(file: Path) -> str:
    """The name a file has in a Hugging Face folder (a tokenizer.json may be given under another name)."""
    if file.name in (*SPECIALS_FILES, MODEL_CONFIG):
        return file.name
    return HF_TOKENIZER if file.suffix == ".json" else SP_TOKENIZER


def _folder_specials(folder: Path) -> dict:
    """``eos``/``bos`` as a token string or an id, ``add_bos_token`` and ``vocab_size``, from the
    configs in ``folder``: the first file that names a key wins."""
    specials: dict = {}
    for name in (*SPECIALS_FILES, MODEL_CONFIG):
        file = folder / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(f"{file} is not valid JSON; fix it or remove it from data.tokenizer_path") from None
        for kind in ("eos", "bos"):
            token, number = config.get(f"{kind}_token"), config.get(f"{kind}_token_id")
            if isinstance(token, dict):  # {"content": "</s>", ...} as transformers writes it
                token = token.get("content")
            if isinstance(number, list):  # a model with several stop tokens: the first ends a document
                number = number[0] if number else None
            if isinstance(token, str):
                specials.setdefault(kind, token)
            elif isinstance(number, int):
                specials.setdefault(kind, number)
        if isinstance(config.get("add_bos_token"), bool):
            specials.setdefault("add_bos_token", config["add_bos_token"])
        if name == MODEL_CONFIG and isinstance(config.get("vocab_size"), int):
            specials["vocab_size"] = config["vocab_size"]
    return specials


def _resolve(specials: dict, kind: str, lookup, own: int | None) -> int | None:
    """The id of ``specials[kind]`` (a token string looked up, or an id), else the tokenizer's ``own``."""
    named = specials.get(kind)
    if isinstance(named, int):
        return named
    if isinstance(named, str):
        found = lookup(named)
        if found is None:
            raise ConfigError(f"the {kind}_token {named!r} named beside data.tokenizer_path is not in the "
                              "tokenizer's vocabulary; fix the config or the tokenizer")
        return found
    return own


def _first_known(specials: list[str], names: tuple[str, ...], vocab: dict) -> int | None:
    for name in names:
        if name in specials:
            return vocab[name]
    return None
