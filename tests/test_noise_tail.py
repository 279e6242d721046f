"""The keyed Gaussian's truncated tail: the largest |z| the sampler can produce, and the delta term the
README states for it, recomputed from the code and the config it names."""
import math

import numpy as np
import pytest
import torch

from dpdist import build_model
from dpdist.config import load_config
from dpdist.privacy.noise import _box_muller, pair_indices
from dpdist.train.reattention import release_history

from helpers import ROOT

R_MAX = math.sqrt(212 * math.log(2))  # sqrt(-2 ln 2^-106): the radius at the smallest refined u1
R_COARSE = math.sqrt(106 * math.log(2))  # sqrt(-2 ln 2^-53): the largest radius without the refinement
TOP = 2**64 - 1


def _int64(words) -> torch.Tensor:
    """64-bit keystream words as the int64 (two's complement) tensor the transform takes."""
    return torch.from_numpy(np.array(words, dtype=np.uint64).view(np.int64))


def _normals(words, deep: int | None = None) -> torch.Tensor:
    """The normals of the pairs (words[2p], words[2p+1]): radius word, angle word."""
    out = torch.empty(len(words), dtype=torch.float64)
    deep_words = None if deep is None else (lambda positions: _int64([deep] * len(positions)))
    words = _int64(words)
    _box_muller(words[0::2].contiguous(), words[1::2].contiguous(), out, deep_words)
    return out


def test_the_largest_normal_is_sqrt_212_ln_2():
    """u1 = (k + 1) / 2^53 with k the word's top 53 bits; the lowest bucket k = 0 is refined by a deep
    word k': u1 = (k' + 1) / 2^106, so k' = 0 is the largest radius and k' = 2^53 - 1 meets the next
    bucket (u1 = 2^-53).  u2 = 2^-54, the smallest angle, puts all but 10^-15 of it on the cosine half;
    the low 11 bits are dropped."""
    z = _normals([0, 0, (1 << 11) - 1, 0], deep=0)
    assert z[0].item() == pytest.approx(R_MAX, rel=1e-15) and abs(z[1].item()) < 1e-14 * R_MAX and z[2] == z[0]
    assert _normals([0, 0], deep=TOP)[0].item() == pytest.approx(R_COARSE, rel=1e-15)
    assert _normals([1 << 11, 0])[0] < R_COARSE  # the next bucket: a smaller radius, no refinement needed
    assert _normals([TOP, 0]).abs().max() == 0  # u1 = 1
    assert f"{R_MAX:.2f}" == "12.12"
    with pytest.raises(ValueError, match="deep_words"):
        _normals([0, 0])
    rng = np.random.default_rng(0)
    assert _normals(rng.integers(0, 2**64, 1 << 16, dtype=np.uint64)).abs().max() <= R_COARSE


def test_a_refined_pair_is_keyed_by_its_index_in_the_full_tensor():
    """The deep word of a pair comes from its index in the full tensor, wherever a batch or shard holds it."""
    assert pair_indices([(3, 5), (10, 12)], np.array([0, 1, 2, 3])) == [3, 4, 10, 11]
    assert pair_indices([(7, 8)], np.array([0])) == [7]


def test_the_tail_beyond_it_is_2_to_the_minus_106_per_pair():
    """A pair's radius R of two exact N(0, 1) has P(R > r) = exp(-r^2 / 2): at R_MAX that is 2^-106."""
    assert math.exp(-R_MAX**2 / 2) == pytest.approx(2.0**-106, rel=1e-12)


def test_the_readme_states_the_tail_delta_of_the_gpt2_small_config():
    """eta = (Box-Muller pairs per release) x (releases) x 2^-106; delta' = (delta + e^eps eta) / (1 - eta)."""
    cfg = load_config(ROOT / "configs/gpt2-small.yaml")
    cfg.model.vocab_size = cfg.data.vocab_size  # as dpdist train sets it from the tokenizer
    sizes = [p.numel() for p in build_model(cfg.model, device="meta").parameters() if p.requires_grad]
    pairs = sum((n + 1) // 2 for n in sizes)  # a tensor of odd size draws a whole last pair
    releases = cfg.train.steps + len(release_history(cfg))
    eta = pairs * releases * 2.0**-106
    readme = (ROOT / "README.md").read_text()
    for figure in (f"{sum(sizes):,} parameters", f"{pairs:,} pairs x {releases} releases", f"= {eta:.2e}",
                   f"e^{cfg.privacy.target_epsilon:g} eta = {math.exp(cfg.privacy.target_epsilon) * eta:.1e}"):
        assert figure in readme, figure
