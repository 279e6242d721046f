"""A sentencepiece tokenizer trained in-process on a sample of the corpus.

The settings make tokenization lossless and composable: ``decode(encode(text)) == text`` for any text
(identity normalisation, whitespace kept as it is, byte fallback for anything unseen), and with no
dummy prefix, text split right after a newline encodes to the same ids piece by piece as in one go,
which is what lets a large file be tokenized in blocks.

Note for private data: the vocabulary is a (non-private) function of the corpus it is trained on;
canaries are kept out of the training sample for that reason.
"""
from __future__ import annotations

import io
import random
import re
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from ..config import ConfigError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TRAINER_OPTIONS = {
    "byte_fallback": True, "pad_id": PAD_ID, "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID,
    "normalization_rule_name": "identity", "remove_extra_whitespaces": False, "add_dummy_prefix": False,
    "allow_whitespace_only_pieces": True, "num_threads": 2,
}
# Training lines per model type: enough for a representative vocabulary while training stays a small part of
# preparing the data; unigram's training cost grows faster than linearly in the lines, hence its lower cap.
MAX_SENTENCES = {"bpe": 100_000, "unigram": 20_000}
MAX_SENTENCE_CHARS = 1000  # sentencepiece skips sentences over 4192 bytes; longer lines are cut to fit
SAMPLE_SEED = 0


def sample_sentences(texts: Iterable[str], limit: int) -> list[str]:
    """A uniform sample of the non-blank lines (reservoir sampling with a fixed seed): seconds to train on
    a corpus of any size, and the same corpus always gives the same sample."""
    rng, sample, seen = random.Random(SAMPLE_SEED), [], 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            for start in range(0, len(line), MAX_SENTENCE_CHARS):
                seen += 1
                if len(sample) < limit:
                    sample.append(line[start:start + MAX_SENTENCE_CHARS])
                elif (slot := rng.randrange(seen)) < limit:
                    sample[slot] = line[start:start + MAX_SENTENCE_CHARS]
    return sample


def train_tokenizer(sentences: list[str], vocab_size: int, model_type: str) -> bytes:
    """The serialized model.  A corpus too small for ``vocab_size`` gets a smaller vocabulary, not an error."""

    def fit(**extra) -> bytes:
        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buffer, vocab_size=vocab_size,
                                       model_type=model_type, input_sentence_size=MAX_SENTENCES[model_type],
                                       minloglevel=2, **TRAINER_OPTIONS, **extra)
        return buffer.getvalue()

    try:
        return fit()
    except RuntimeError as exc:
        if "Vocabulary size too high" in str(exc):
            return fit(hard_vocab_limit=False)
        needed = re.search(r"(\d+) vs (\d+)", str(exc))
        if "smaller than required_chars" in str(exc) and needed:
            raise ConfigError(f"data.vocab_size ({vocab_size}) is too small for this corpus: byte fallback, special "
                              f"tokens and its characters need {needed.group(2)}; raise data.vocab_size") from None
        raise


def read_model(path: str | Path) -> bytes:
    """The bytes of the sentencepiece model at ``path`` (``data.tokenizer_path``), refused in one line
    when they are not one: sentencepiece's own error is a C++ assertion about protobuf."""
    try:
        model = Path(path).read_bytes()
        spm.SentencePieceProcessor().LoadFromSerializedProto(model)
    except OSError as exc:
        raise ConfigError(f"data.tokenizer_path {str(path)!r} cannot be read: {exc.strerror}") from None
    except RuntimeError:
        raise ConfigError(f"data.tokenizer_path {str(path)!r} is not a sentencepiece model; give a .model file written "
                          "by sentencepiece's trainer") from None
    return model


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    """The raw sentencepiece processor (piece-level access for canary scoring); the pipeline itself
    reads every kind of tokenizer through ``text_tokenizer.load_text_tokenizer``."""
    return spm.SentencePieceProcessor(model_file=str(path))
