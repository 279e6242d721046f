"""Noisy LSG or ANADP steps of a tiny float64 GPT, on any tensor-parallel layout.

tests/dist/method_steps.py runs ``train_tiny`` at tensor degree 2 and the tests run it unsharded in
their own process and compare: LSG carriers are sharded consistently and their noise keyed by
full-carrier coordinates, ANADP's group importance is summed over the shards, so the layout changes
nothing.
"""
import json

import torch

from dpdist import ModelConfig, build_model
from dpdist.config import AnadpConfig, LsgConfig
from dpdist.model import strip_vocab_padding
from dpdist.parallel.state import full_state_dict
from dpdist.privacy.sampling import PoissonSampler
from dpdist.runtime.mesh import Mesh
from helpers.steps import private_step
from helpers.compare import assert_close_at_scale
from helpers.launch import torchrun
from helpers.poisson_step import noisy_sgd_run

CFG = ModelConfig(vocab_size=37, d_model=16, n_layers=2, n_heads=2, max_seq_len=8, dtype="float64")
N, Q, SECRET, STEPS = 30, 0.3, 8, 3
DATA = torch.randint(0, 37, (N, 9), generator=torch.Generator().manual_seed(4))


METHODS = {"lsg": {"lsg": LsgConfig(enabled=True, rank=2, density=0.5, refresh_every=2)},
           "anadp": {"anadp": AnadpConfig(enabled=True, warmup_steps=1), "clipping": "per_layer"}}


def train_tiny(mesh, method: str) -> dict:
    model = build_model(CFG, tp_group=mesh.tp_group)
    engine = private_step(model, clip_norm=0.5, noise_multiplier=1.0, expected_batch_size=Q * N, secret=SECRET,
                          micro_batch_size=4, seq_len=8, tp_group=mesh.tp_group, **METHODS[method])
    noisy_sgd_run(engine, model, PoissonSampler(N, Q, SECRET, micro_batch_size=4), DATA, STEPS, lr=0.5)
    return strip_vocab_padding(full_state_dict(model, mesh.tp_group), model)


def assert_tensor_degree_two_is_one_process(tmp_path, method: str) -> None:
    """tests/dist/method_steps.py at tensor degree 2 against ``train_tiny`` here, float64, 1e-10."""
    out = tmp_path / f"{method}.json"
    torchrun("method_steps.py", 2, out, method)
    got = {k: torch.tensor(v, dtype=torch.float64) for k, v in json.loads(out.read_text()).items()}
    assert_close_at_scale(got, train_tiny(Mesh(), method))
