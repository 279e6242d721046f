"""The keyed Gaussian's truncated tail: the largest |z| the sampler can produce, and the delta term the
README states for it, recomputed from the code and the config it names."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dpdist import build_model
from dpdist.config import load_config
from dpdist.privacy import frequencies
from dpdist.privacy.noise import _box_muller

ROOT = Path(__file__).resolve().parents[1]
R_MAX = math.sqrt(106 * math.log(2))  # sqrt(-2 ln 2^-53): the radius at the smallest u1


def _normals(words: list[int]) -> torch.Tensor:
    out = torch.empty(len(words), dtype=torch.float64)
    _box_muller(np.array(words, dtype=np.uint64), out)
    return out


def test_the_largest_normal_is_sqrt_106_ln_2():
    """u1 = (k + 1) / 2^53 with k the word's top 53 bits: k = 0 is the smallest u1 and the largest radius;
    u2 = 0 puts all of it on the cosine half.  The low 11 bits are dropped; k = 2^53 - 1 gives r = 0."""
    top = 2**64 - 1
    z = _normals([0, 0, (1 << 11) - 1, (1 << 11) - 1, top, 0, 1 << 11, 0])
    assert z[0].item() == pytest.approx(R_MAX, rel=1e-15) and z[1] == 0
    assert z[2] == z[0] and z[3] == 0  # only the top 53 bits count
    assert z[4] == 0 and z[5] == 0  # u1 = 1
    assert 0 < z[6] < z[0]  # the next u1 already gives a smaller radius: r falls as u1 grows
    assert f"{R_MAX:.4f}" == "8.5717"
    rng = np.random.default_rng(0)
    assert _normals(rng.integers(0, 2**64, 1 << 16, dtype=np.uint64).tolist()).abs().max() <= R_MAX


def test_the_tail_beyond_it_is_2_to_the_minus_53_per_pair():
    """A pair's radius R of two exact N(0, 1) has P(R > r) = exp(-r^2 / 2): at R_MAX that is 2^-53; one
    coordinate alone exceeds R_MAX with probability erfc(R_MAX / sqrt 2) = 1.0e-17."""
    assert math.exp(-R_MAX**2 / 2) == pytest.approx(2.0**-53, rel=1e-13)
    assert math.erfc(R_MAX / math.sqrt(2)) == pytest.approx(1.02e-17, rel=1e-2)


def test_the_readme_states_the_tail_delta_of_the_gpt2_small_config():
    """eta = (Box-Muller pairs per release) x (releases) x 2^-53; delta' = (delta + e^eps eta) / (1 - eta)."""
    cfg = load_config(ROOT / "configs/gpt2-small.yaml")
    cfg.model.vocab_size = cfg.data.vocab_size  # as dpdist train sets it from the tokenizer
    sizes = [p.numel() for p in build_model(cfg.model, device="meta").parameters() if p.requires_grad]
    pairs = sum((n + 1) // 2 for n in sizes)  # a tensor of odd size draws a whole last pair
    releases = cfg.train.steps + len(frequencies.release_history(cfg))
    eta = pairs * releases * 2.0**-53
    delta = (cfg.privacy.delta + math.exp(cfg.privacy.target_epsilon) * eta) / (1 - eta)
    readme = (ROOT / "README.md").read_text()
    for figure in (f"{sum(sizes):,} parameters", f"{pairs:,} pairs x {releases} releases", f"= {eta:.2e}",
                   f"= {delta:.3f}"):
        assert figure in readme, figure
