"""Each per-layer norm rule alone, on one layer, against brute force (float64, relative 1e-9).

For every layer kind a rule covers (column- and row-parallel linear layers with and without a bias,
an embedding table with and without a ``padding_idx``, a tied table that is also the output layer
(Phantom Clipping), LayerNorm and RMSNorm) and every strategy its rule offers (``rule.choices``), the
tap's per-example squared norms and its clipped sum sum_i c_i g_i for random clip factors c equal
those formed from per-example gradients, each from ``torch.autograd.grad`` on one example through the
untapped layer.  Per-layer clipping (``clip_layer``, which a streamed rule runs chunk by chunk) is
checked the same way, with one example per chunk and a threshold that clips some examples only.

The ghost norm forms its Grams in row blocks: T = 7 is one block, T = 97 three uneven ones.  Token
ids repeat inside an example (the embedding's per-token sums) and hit the padding row where there is
one.  The tied table's output layer reads ``tanh(embedding + x)``, so its backward runs before the
lookup's, as in the model, and its per-example gradient has the cross term of algorithms.md §3.2.
"""
import pytest
import torch

from dpdist.parallel.layers import ColumnParallelLinear, Norm, RowParallelLinear, VocabParallelEmbedding
from dpdist.privacy.rules import linear, rule_for
from dpdist.privacy.tap import PerExampleTap

from helpers import oracle

TOL = 1e-9
B, D_IN, D_OUT, V, PAD = 4, 6, 5, 11, 3
DT = torch.float64


def randomised(layer):
    """The layer in float64 with random parameters (the defaults are zeros and ones)."""
    layer.to(DT)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT))
    return layer


def _random(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def dense_case(layer, seq_len: int):
    """A layer on real inputs, with the per-example loss <R_i, layer(x_i)>."""
    x = _random(B, seq_len, D_OUT if isinstance(layer, Norm) else D_IN, seed=2)
    r = _random(B, seq_len, D_OUT, seed=3)
    return lambda rows: (layer(x[rows]) * r[rows]).sum((1, 2))


def table_case(layer, seq_len: int):
    """A table on token ids with repeats (and pad tokens where the table has a padding row), with the
    per-example loss <R_i, E[s_i]> (+ <S_i, tanh(E[s_i] + x_i) E^T> when the table is also the output
    layer)."""
    ids = torch.randint(0, V, (B, seq_len), generator=torch.Generator().manual_seed(4))
    ids[0, 1::2] = 7
    ids[1, :3] = PAD
    r, x, s = _random(B, seq_len, D_OUT, seed=5), _random(B, seq_len, D_OUT, seed=6), _random(B, seq_len, V, seed=7)

    def loss(rows):
        embedded = layer(ids[rows])
        total = (embedded * r[rows]).sum((1, 2))
        if layer.tied_output:
            total = total + (layer.project(torch.tanh(embedded + x[rows])) * s[rows]).sum((1, 2))
        return total
    return loss


LAYERS = {
    "column": lambda: ColumnParallelLinear(D_IN, D_OUT),
    "column-nobias": lambda: ColumnParallelLinear(D_IN, D_OUT, bias=False),
    "row": lambda: RowParallelLinear(D_IN, D_OUT),
    "row-nobias": lambda: RowParallelLinear(D_IN, D_OUT, bias=False),
    "embedding": lambda: VocabParallelEmbedding(V, D_OUT),
    "embedding-padding": lambda: VocabParallelEmbedding(V, D_OUT, padding_idx=PAD),
    "tied": lambda: VocabParallelEmbedding(V, D_OUT, tied_output=True),
    "tied-padding": lambda: VocabParallelEmbedding(V, D_OUT, tied_output=True, padding_idx=PAD),
    "layernorm": lambda: Norm(D_OUT),
    "rmsnorm": lambda: Norm(D_OUT, rms=True),
}
SEQ_LENS = (7, 97)


def case(name: str, seq_len: int):
    layer = randomised(LAYERS[name]())
    loss = (table_case if isinstance(layer, VocabParallelEmbedding) else dense_case)(layer, seq_len)
    return layer, loss


def strategies(name: str, seq_len: int) -> list[str]:
    layer = LAYERS[name]()
    return list(rule_for(layer).choices(layer, B, seq_len, 8))


CASES = [(name, seq_len, strategy) for name in LAYERS for seq_len in SEQ_LENS for strategy in strategies(name, seq_len)]


def brute_force(layer, loss) -> dict:
    """{parameter: (B, *shape)}: each example's gradient from its own ``torch.autograd.grad``."""
    params = list(layer.parameters())
    rows = [torch.autograd.grad(loss(slice(i, i + 1)).sum(), params) for i in range(B)]
    return {p: torch.stack([row[k] for row in rows]) for k, p in enumerate(params)}


def sq_norms(grads: dict) -> torch.Tensor:
    return sum(g.flatten(1).pow(2).sum(1) for g in grads.values())


def weighted(grads: dict, factors: torch.Tensor) -> dict:
    return {p: torch.einsum("b,b...->...", factors, g) for p, g in grads.items()}


def tapped(layer, loss, strategy: str, **tap_options) -> PerExampleTap:
    """The tap after one backward of the whole batch, its records still to be clipped."""
    tap = PerExampleTap([layer], {layer: strategy}, **tap_options).attach()
    try:
        loss(slice(None)).sum().backward()
    finally:
        tap.detach()
    assert all(p.grad is None for p in layer.parameters()), "the tapped backward formed a weight gradient"
    return tap


def assert_norms_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape == (B,) and bool((want > 0).all())
    err = float(((got - want).abs() / want).max())
    assert err < TOL, f"squared norms {got.tolist()} vs brute force {want.tolist()} (rel err {err:.2e})"


def assert_sums_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for p, value in want.items():
        assert oracle.rel_err(got[p], value) < TOL, f"clipped sum of a {tuple(p.shape)} parameter"


@pytest.mark.parametrize("name, seq_len, strategy", CASES)
def test_norms_and_clipped_sums_match_brute_force(name, seq_len, strategy):
    layer, loss = case(name, seq_len)
    grads = brute_force(layer, loss)
    tap = tapped(layer, loss, strategy)
    assert_norms_equal(tap.take_sq_norms(), sq_norms(grads))
    factors = torch.rand(B, generator=torch.Generator().manual_seed(8), dtype=DT)
    factors[1] = 0.0
    tap.accumulate_clipped(factors)
    assert_sums_equal(tap.pop_grad_sums(), weighted(grads, factors))


@pytest.mark.parametrize("name, seq_len, strategy", CASES)
def test_per_layer_clipping_matches_brute_force(name, seq_len, strategy, monkeypatch):
    layer, loss = case(name, seq_len)
    example_bytes = layer.weight.numel() * layer.weight.element_size()
    monkeypatch.setattr(linear, "STREAM_CHUNK_BYTES", example_bytes)
    assert len(linear.example_chunks(B, example_bytes)) == B  # a streamed rule clips one example at a time
    grads = brute_force(layer, loss)
    norms = sq_norms(grads).sqrt()
    threshold = float(norms.median())
    assert bool((norms > threshold).any() and (norms < threshold).any())
    tap = tapped(layer, loss, strategy, mode="per_layer", layer_clip_norm=threshold)
    assert_norms_equal(tap.take_sq_norms(), norms.pow(2))
    assert_sums_equal(tap.pop_grad_sums(), weighted(grads, oracle.clip_factors(norms, threshold)))


def test_every_rule_and_strategy_is_covered():
    """The cases above reach each rule's every choice: a new strategy must be added here to pass."""
    assert {(name, strategy) for name, _, strategy in CASES} == {
        *((name, s) for name in ("column", "column-nobias", "row", "row-nobias", "tied", "tied-padding")
          for s in ("ghost", "materialise", "stream")),
        ("embedding", "ghost"), ("embedding-padding", "ghost"), ("layernorm", "materialise"),
        ("rmsnorm", "materialise")}
    assert linear.gram_bounds(97) == [0, 32, 64, 97] and linear.gram_bounds(7) == [0, 7]
