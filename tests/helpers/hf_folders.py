"""Tiny Hugging Face model folders as a user would bring them: config.json, model.safetensors, a
lossless byte-level BPE tokenizer.json and its tokenizer_config.json, written by transformers and
tokenizers themselves (nothing downloaded)."""
import json
from pathlib import Path

import torch
from torch import nn

SENTENCES = [
    "the patient was given two tablets of aspirin after the meal",
    "please reset my password, the link in the email has expired",
    "def add(a, b):\n    return a + b\n",
    "a quiet river runs under the old stone bridge near the mill",
    "order 1234 arrived damaged; I would like a replacement or a refund",
]
VOCAB = 304  # the tokenizer's 300 ids, padded as configs often are (rows no token uses)
SPECIALS = ("<unk>", "<s>", "</s>")


def byte_bpe(path: Path) -> Path:
    """A byte-level BPE trained on SENTENCES: decode(encode(t)) == t for any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIALS),
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return path


def hf_config(kind: str = "llama", tie: bool = False):
    """A transformers config of ``kind`` (llama with grouped-query attention, or gpt2) over VOCAB."""
    from transformers import GPT2Config, LlamaConfig

    bos, eos = SPECIALS.index("<s>"), SPECIALS.index("</s>")
    if kind == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=bos,
                          eos_token_id=eos)
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, bos_token_id=bos,
                       eos_token_id=eos, tie_word_embeddings=tie)


def pretrained_folder(folder: Path, kind: str = "llama", tie: bool = False, seed: int = 0) -> Path:
    """A random ``kind`` model in float64 (weights perturbed off their init so no test passes by symmetry)
    saved with its tokenizer, as a downloaded checkpoint folder looks."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind, tie)).to(torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    byte_bpe(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                               "add_bos_token": True}))
    return folder


def pairs_file(path: Path, count: int = 48) -> Path:
    """A .jsonl of prompt/completion pairs built from SENTENCES."""
    lines = [json.dumps({"prompt": f"question {k}: {SENTENCES[k % 5][:20]}", "completion": SENTENCES[(k + 1) % 5]})
             for k in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


class RMSNorm64(nn.Module):
    """transformers' RMSNorm formula without its float32 upcast (which would cap agreement at ~1e-7)."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def float64_reference(model: nn.Module) -> nn.Module:
    """A transformers model (float64) whose RMSNorms compute in float64 too, in eval mode."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RMSNorm"):
            model.set_submodule(name, RMSNorm64(module.weight, module.variance_epsilon))
    return model.eval()
