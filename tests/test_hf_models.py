"""Hugging Face models imported and exported: checked against transformers itself, in float64.

Tiny random models of every supported family are built with transformers' own config classes, saved
with its ``save_pretrained`` and read by ``dpdist.load_pretrained``.  Our logits must equal
transformers' (relative 1e-10), our per-example gradient norms and clipped sums must equal brute force
(``torch.func`` per-example gradients of the transformers model, with prompt tokens masked as
transformers masks them) and our per-example loss transformers' ``loss(labels=...)``.  Our export must
load in transformers with the same logits.

transformers' RMSNorm (and its loss) computes in float32 whatever the model's dtype (it upcasts half-precision
inputs); in the reference models it is replaced by the same formula kept in the input's dtype, so
that float64 comparisons test the architecture, not float32 rounding.  Its rotary angles are float32
too, and ours are formed the same way, so those are compared as they are.
"""
import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from torch.func import functional_call, grad, vmap
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from dpdist import ModelConfig, audit, build_model, load_pretrained
from dpdist.cli import main
from dpdist.config import ConfigError, load_config
from dpdist.data.text_tokenizer import load_text_tokenizer
from dpdist.model import strip_vocab_padding
from dpdist.model import hf as hf_module
from dpdist.model.hf import hf_name, peft_adapter, read_config, save_adapter, save_pretrained
from dpdist.model.lora import LoraLinear, add_adapters
from dpdist.parallel.cross_entropy import per_example_loss
from dpdist.parallel.state import full_state_dict
from dpdist.privacy.clipping import EPS
from helpers.hf_folders import float64_reference, pairs_file, pretrained_folder

VOCAB, SEQ, BATCH = 61, 12, 4
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1)
CONFIGS = {
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0,
                               eos_token_id=0),
    "llama_gqa_untied": lambda: LlamaConfig(**LLAMA),
    "llama_tied": lambda: LlamaConfig(**{**LLAMA, "num_key_value_heads": 4}, tie_word_embeddings=True),
    "llama3_rope": lambda: LlamaConfig(**LLAMA, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                              "high_freq_factor": 4.0,
                                                              "original_max_position_embeddings": 4}),
    "mistral_window": lambda: MistralConfig(**LLAMA, sliding_window=5),  # window < SEQ: the mask is exercised
    "qwen2": lambda: Qwen2Config(**LLAMA),
}


def reference(hf_config, seed: int = 0) -> nn.Module:
    """A transformers model in float64 with weights away from their init (norms and biases not 1 and 0)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config).to(torch.float64).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return float64_reference(model)


@pytest.fixture(scope="module", params=list(CONFIGS))
def imported(request, tmp_path_factory):
    """(family, transformers model, our import of its saved folder, the folder)."""
    hf = reference(CONFIGS[request.param]())
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, load_pretrained(folder), folder


def batch():
    """Token ids and transformers-style labels (the ids, -100 on a prompt of varying length)."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    hf_labels = ids.clone()
    for i, prompt in enumerate((0, 3, 7, SEQ)):  # the last example has no target token at all
        hf_labels[i, :prompt] = -100
    return ids, hf_labels


def shifted(hf_labels: torch.Tensor) -> torch.Tensor:
    """Our labels: the target of position t is token t + 1 (transformers shifts inside its loss)."""
    return torch.cat([hf_labels[:, 1:], torch.full_like(hf_labels[:, :1], -100)], dim=1)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_logits_equal_transformers(imported):
    _, hf, ours, _ = imported
    ids, _ = batch()
    with torch.no_grad():
        assert relative_error(ours(ids), hf(ids).logits) < 1e-10


def hf_per_example_grads(hf: nn.Module, ids: torch.Tensor, hf_labels: torch.Tensor) -> dict:
    """Per-example gradients {HF name: [B, ...]} of the transformers model by torch.func, of the loss
    transformers' ``loss(labels=...)`` computes (shift inside, mean over the unmasked targets), here in
    float64: transformers upcasts the logits of its own loss to float32."""
    params = {name: p.detach() for name, p in hf.named_parameters()}

    def loss(params, one_ids, one_labels):
        logits = functional_call(hf, params, (one_ids[None],)).logits[0]
        return F.cross_entropy(logits[:-1], one_labels[1:], ignore_index=-100)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        return vmap(grad(loss), in_dims=(None, 0, 0))(params, ids, hf_labels)


def test_per_example_losses_norms_and_clipped_sums_equal_brute_force_on_transformers(imported, tmp_path):
    family, hf, ours, _ = imported
    ids, hf_labels = batch()
    labels = shifted(hf_labels)
    with torch.no_grad():
        losses = per_example_loss(ours(ids), labels)
        hf_losses = torch.stack([hf(ids[i:i + 1], labels=hf_labels[i:i + 1]).loss for i in range(3)])
    assert torch.allclose(losses[:3], hf_losses.double(), rtol=1e-6, atol=0)  # HF's loss is float32
    assert losses[3] == 0  # no target token (transformers' loss is nan there)
    hf_grads = hf_per_example_grads(hf, ids[:3], hf_labels[:3])

    norms = audit.per_example_norms(ours, ids, labels)
    want = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in hf_grads.values()))
    assert torch.allclose(norms[:3], want, rtol=1e-9, atol=0) and norms[3] == 0

    clip = float(want.median())
    clipped = audit.clipped_sum(ours, ids, labels, clip)
    factors = (clip / (want + EPS)).clamp(max=1.0)  # the engine's own clip factor, C / (norm + EPS)
    # our clipped sum in transformers' names and layouts, through the export mapping itself
    exported = load_file(save_pretrained(clipped, ours.cfg, tmp_path / "sum") / "model.safetensors")
    assert exported.keys() == hf_grads.keys(), family
    for name, g in hf_grads.items():
        expected = torch.einsum("b,b...->...", factors, g)
        assert relative_error(exported[name], expected) < 1e-9, name


def test_export_loads_in_transformers_with_equal_logits(imported, tmp_path):
    family, _, ours, folder = imported
    with torch.no_grad():  # move the weights, so the export cannot pass by copying the imported files
        for p in ours.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=p.dtype) * 0.01)
    save_pretrained(strip_vocab_padding(full_state_dict(ours, None), ours), ours.cfg, tmp_path / "out")
    source, written = (json.loads((f / "config.json").read_text()) for f in (folder, tmp_path / "out"))
    assert written["model_type"] == source["model_type"] and written["eos_token_id"] == source["eos_token_id"]
    back = float64_reference(AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64))
    ids, _ = batch()
    with torch.no_grad():
        assert relative_error(ours(ids), back(ids).logits) < 1e-10, family


@pytest.mark.parametrize("shape", [
    dict(arch="gpt", activation="gelu", tie_embeddings=False),
    dict(arch="llama", n_kv_heads=1, tie_embeddings=False, rope_scaling={"rope_type": "linear", "factor": 2.0}),
], ids=["gpt_gelu_untied", "llama_mqa_linear_rope"])
def test_a_model_trained_here_exports_to_transformers(tmp_path, shape):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, dtype="float64",
                      init_seed=7, mlp_hidden=48, **shape)
    ours = build_model(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(6), dtype=p.dtype) * 0.05)
    save_pretrained({n: p.detach() for n, p in ours.named_parameters()}, cfg, tmp_path)
    back = float64_reference(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64))
    ids, _ = batch()
    with torch.no_grad():
        assert relative_error(ours(ids), back(ids).logits) < 1e-10
    assert read_config(tmp_path).arch == cfg.arch


def test_hf_names():
    llama = ModelConfig(arch="llama")
    assert hf_name(llama, "layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert hf_name(llama, "lm_head.weight") == "lm_head.weight"
    gpt = ModelConfig()
    assert hf_name(gpt, "blocks.1.attn.qkv.bias") == "transformer.h.1.attn.c_attn.bias"
    assert hf_name(gpt, "blocks.1.mlp.proj.weight") == "transformer.h.1.mlp.c_proj.weight"
    assert hf_name(gpt, "tok_emb.weight") == "transformer.wte.weight"


def test_model_pretrained_fills_the_shape_and_keeps_dtype_and_seed_and_reads_its_tokenizer(tmp_path):
    reference(CONFIGS["llama_gqa_untied"]()).save_pretrained(tmp_path)
    overrides = [f"model.pretrained={tmp_path}", "model.dtype=float64", "model.init_seed=3",
                 "privacy.noise_multiplier=1.0", "data.seq_len=16"]
    with pytest.raises(ConfigError, match="holds no tokenizer.json or tokenizer.model; set data.tokenizer_path"):
        load_config(overrides=overrides)
    Tokenizer(WordLevel({"<unk>": 0, "a": 1, "</s>": 2}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    cfg = load_config(overrides=overrides)
    m = cfg.model
    assert (m.arch, m.n_kv_heads, m.d_model, m.hidden, m.tie_embeddings, m.hf_model_type) == \
        ("llama", 2, 32, 40, False, "llama")
    assert (m.dtype, m.init_seed, m.pretrained) == ("float64", 3, str(tmp_path))
    assert cfg.data.tokenizer_path == str(tmp_path)  # a corpus-trained tokenizer would not match the embeddings


def save_with(tmp_path, edit=None):
    reference(CONFIGS["llama_gqa_untied"]()).save_pretrained(tmp_path)
    if edit is not None:
        config = json.loads((tmp_path / "config.json").read_text())
        edit(config)
        (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_refusals(tmp_path):
    folder = save_with(tmp_path / "bert", lambda c: c.update(model_type="bert"))
    with pytest.raises(ValueError, match="model_type 'bert'; supported: gpt2, llama, mistral, qwen2"):
        load_pretrained(folder)
    folder = save_with(tmp_path / "yarn", lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 2.0,
                                                                             "rope_theta": 1e4}))
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        load_pretrained(folder)
    folder = save_with(tmp_path / "shape", lambda c: c.update(intermediate_size=44))
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight has shape \[40, 32\].*implies \[44, 32\]"):
        load_pretrained(folder)
    folder = save_with(tmp_path / "shard")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lacks the shard file.*model-00002-of-00002.safetensors"):
        load_pretrained(folder)
    folder = save_with(tmp_path / "missing")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    from safetensors.torch import save_file
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="tensor model.layers.1.mlp.up_proj.weight .* is missing"):
        load_pretrained(folder)
    with pytest.raises(ConfigError, match=r"model.n_kv_heads \(2\) must be divisible by parallel.tensor \(4\)"):
        load_config(overrides=["model.arch=llama", "model.n_kv_heads=2", "model.n_heads=4", "parallel.tensor=4",
                               "privacy.noise_multiplier=1.0", "data.seq_len=16", "model.max_seq_len=16"])
    with pytest.raises(ConfigError, match="model.pretrained .* is not a folder"):
        load_config(overrides=[f"model.pretrained={tmp_path / 'nowhere'}", "privacy.noise_multiplier=1.0"])
    with pytest.raises(ConfigError, match="reattention.enabled is implemented for model.arch=gpt"):
        load_config(overrides=["model.arch=llama", "reattention.enabled=true", "reattention.frequencies=uniform",
                               "privacy.noise_multiplier=1.0", "data.seq_len=16", "model.max_seq_len=16"])
    with pytest.raises(ValueError, match="model.rope_scaling must be null or a mapping with rope_type one of"):
        ModelConfig(arch="llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0}).validate()
    with pytest.raises(ValueError, match="model.n_kv_heads is for model.arch=llama"):
        ModelConfig(n_kv_heads=2).validate()


def test_a_pretrained_run_describes_itself_and_refuses_a_tokenizer_larger_than_the_embedding(tmp_path, capsys):
    folder = pretrained_folder(tmp_path / "llama")
    args = ["train", "--dry-run", f"model.pretrained={folder}", f"data.path={pairs_file(tmp_path / 'pairs.jsonl')}",
            "data.packing=document", "data.seq_len=16", "privacy.noise_multiplier=1", "parallel.data=1",
            "train.batch_size=8", "train.micro_batch_size=4",
            f"data.cache_dir={tmp_path / 'cache'}", f"train.run_dir={tmp_path / 'run'}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"model: {folder} (llama), 2 layers, d_model 32" in out
    assert "pairs: 48 prompt/completion examples, loss on completion tokens only" in out
    assert load_text_tokenizer(tmp_path / "run" / "tokenizer").encode("a river") == \
        load_text_tokenizer(folder).encode("a river")  # the run keeps its own copy of the tokenizer
    big = tmp_path / "big"
    big.mkdir()
    Tokenizer(WordLevel({f"w{k}": k for k in range(400)} | {"</s>": 400}, unk_token="w0")).save(str(big / "tokenizer.json"))
    (big / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert main([*args, f"data.tokenizer_path={big}", f"train.run_dir={tmp_path / 'run2'}"]) == 2
    err = capsys.readouterr().err
    assert f"has 401 ids but the model in {folder} embeds only 304; use the tokenizer that came with the model" in err
    assert "\n" not in err.strip()


@pytest.mark.parametrize("strategy", ["ghost", "materialise"])
def test_lora_norms_and_clipped_sums_equal_brute_force_on_peft(imported, tmp_path, strategy):
    """DP-LoRA on an imported model: per-example norms of the adapters alone, against torch.func on
    peft's own LoRA model over the same transformers model, with prompt masking."""
    from peft import PeftModel

    family, hf, _, folder = imported
    ours = load_pretrained(folder)
    add_adapters(ours, rank=3, alpha=6.0)
    with torch.no_grad():  # B starts at 0: move both factors so every adapter term counts
        for name, p in ours.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)), dtype=p.dtype) * 0.1)
    state = {name: p.detach() for name, p in ours.named_parameters()}
    save_adapter(state, ours.cfg, tmp_path / "adapter", rank=3, alpha=6.0, dropout=0.0, base=str(folder))
    peft = float64_reference(PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter"))
    ids, hf_labels = batch()
    labels = shifted(hf_labels)
    with torch.no_grad():
        assert relative_error(ours(ids), peft(ids).logits) < 1e-10, family
    grads = {name: g for name, g in hf_per_example_grads(peft, ids[:3], hf_labels[:3]).items() if "lora_" in name}
    assert len(grads) == 2 * sum(isinstance(m, LoraLinear) for m in ours.modules())  # an A and a B each
    want = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    norms = audit.per_example_norms(ours, ids, labels, strategy=strategy)
    assert torch.allclose(norms[:3], want, rtol=1e-9, atol=0) and norms[3] == 0
    clip = float(want.median())
    clipped = audit.clipped_sum(ours, ids, labels, clip)
    assert all("lora_" in name for name in clipped)  # the frozen base has no gradient to release
    _, exported = peft_adapter(clipped, ours.cfg, rank=3, alpha=6.0, dropout=0.0, base=None)
    factors = (clip / (want + EPS)).clamp(max=1.0)
    for name, g in grads.items():
        key = name.replace(".default", "")
        assert relative_error(exported[key], torch.einsum("b,b...->...", factors, g)) < 1e-9, key


def test_reading_in_pieces_of_a_few_rows_gives_the_same_model(imported, monkeypatch):
    folder = imported[3]
    whole = load_pretrained(folder)  # each tensor in one read (the fixture's model is moved by another test)
    monkeypatch.setattr(hf_module, "READ_BYTES", 3 * 8 * 32)  # 3 rows of a d_model-wide float64 table per read
    pieces = load_pretrained(folder)
    for (name, a), (_, b) in zip(whole.named_parameters(), pieces.named_parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("adapters", [False, True], ids=["full", "lora"])
def test_one_example_moves_the_clipped_sum_by_at_most_the_clip_norm(imported, adapters, clipping):
    """Sensitivity on every imported family, fully trained or through LoRA adapters: removing one
    example (all its labels ignored) moves the pre-noise sum by at most C, and by its clipped norm,
    C norm / (norm + EPS), where its gradient is far larger than C (flat clipping)."""
    model = load_pretrained(imported[3])
    if adapters:
        add_adapters(model, rank=3, alpha=6.0)
        with torch.no_grad():  # B starts at 0, which would leave A without gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)), dtype=p.dtype))
    ids, hf_labels = batch()
    labels, removed = shifted(hf_labels), shifted(hf_labels).clone()
    removed[0] = -100
    norms = audit.per_example_norms(model, ids, labels)
    clip = float(norms[0]) / 1000  # example 0's gradient is 1000 C
    together, without = (audit.clipped_sum(model, ids, lab, clip, clipping=clipping) for lab in (labels, removed))
    moved = float(torch.sqrt(sum((together[k] - without[k]).pow(2).sum() for k in together)))
    assert moved <= clip * (1 + 1e-9)
    if clipping == "flat":  # the engine's factor C / (norm + EPS)
        assert moved == pytest.approx(clip * float(norms[0]) / (float(norms[0]) + EPS), rel=1e-9)
