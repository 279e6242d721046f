"""Imported Hugging Face models are layout-invariant: a Llama (grouped-query, untied) and a GPT-2 read at
tensor 2, each rank from its own slices, give the logits and the noisy DP update (clipped, keyed noise
with a fixed secret) of one process, in float64 to 1e-10 of each tensor's scale."""
import pytest
import torch

from dpdist import load_pretrained
from helpers.compare import assert_close_at_scale
from helpers.hf_steps import logits_and_noisy_step, save_models
from helpers.launch import torchrun


@pytest.mark.slow
def test_tensor_two_gives_the_single_process_logits_and_update(tmp_path):
    folders = save_models(tmp_path)
    out = tmp_path / "tensor2.pt"
    torchrun("hf_parallel.py", 2, out, 2, *folders.values())
    sharded = torch.load(out)
    for name, folder in folders.items():
        logits, params = logits_and_noisy_step(folder)
        got_logits, got_params = sharded[str(folder)]
        assert_close_at_scale({"logits": got_logits}, {"logits": logits}, what=f"{name} ")
        assert got_params.keys() == params.keys()
        initial = load_pretrained(folder).state_dict()
        for key, value in params.items():
            assert not torch.equal(value, initial[key]), f"{name}: {key} did not move"
        assert_close_at_scale(got_params, params, what=f"{name} ")
