"""Imported Hugging Face models on any tensor degree: the logits of a fixed batch and one noisy DP step,
what tests/dist/hf_parallel.py runs at tensor 2 and tests/test_hf_parallel.py in one process."""
from pathlib import Path

import torch
import torch.distributed as dist

from dpdist import load_pretrained
from dpdist.model import strip_vocab_padding
from dpdist.parallel.mappings import group_size
from dpdist.parallel.state import full_state_dict
from dpdist.privacy.step import native_step

SECRET, VOCAB, SEQ, BATCH = 4321, 61, 10, 4  # 61 rows pad to 62 at tensor 2


def save_models(root: Path) -> dict[str, Path]:
    """Tiny random GPT-2 and Llama (grouped-query, untied) folders, written by transformers."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    configs = {
        "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0,
                           eos_token_id=0),
        "llama": LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16, bos_token_id=0,
                             eos_token_id=1),
    }
    folders = {}
    for seed, (name, config) in enumerate(configs.items()):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(torch.float64)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        folders[name] = root / name
        model.save_pretrained(folders[name])
    return folders


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(9)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    labels[1, :4] = -100  # a prompt
    return ids, labels


def full_logits(model, ids: torch.Tensor, tp_group) -> torch.Tensor:
    """The logits of every vocabulary id, gathered over the tensor group, padding removed."""
    with torch.no_grad():
        local = model(ids)
    if group_size(tp_group) > 1:
        parts = [torch.empty_like(local) for _ in range(group_size(tp_group))]
        dist.all_gather(parts, local.contiguous(), group=tp_group)
        local = torch.cat(parts, dim=-1)
    return local[..., :VOCAB]


def logits_and_noisy_step(folder: Path, tp_group=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The imported model's logits, and its full parameters after one clipped, noised SGD step."""
    model = load_pretrained(folder, tp_group=tp_group)
    ids, labels = fixed_batch()
    logits = full_logits(model, ids, tp_group)
    engine = native_step(model, clip_norm=0.5, noise_multiplier=1.0, expected_batch_size=BATCH, secret=SECRET,
                         micro_batch_size=BATCH, seq_len=SEQ, tp_group=tp_group)
    engine.microbatch(ids, labels)
    engine.release(0)
    engine.detach()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    return logits, strip_vocab_padding(full_state_dict(model, tp_group), model)
