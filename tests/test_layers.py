"""The tapped layers of ``dpdist.parallel.layers`` compute what the plain ones compute.

With a tap whose ``defer_weight_grad`` is False (and whose ``record`` raises if called) every layer
must give the same output and the same gradients for its input and all its parameters as the same
layer with no tap (the plain ``F.*`` path); the tapped autograd functions are also checked against
finite differences with ``torch.autograd.gradcheck``.  With ``defer_weight_grad = True`` the
parameters get no ``.grad``, the input gradient is unchanged, and ``record`` receives exactly the
tensors the code names, with the right shapes, from which the weight gradient is rebuilt here.
Single process (``tp_group=None``), float64.
"""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from dpdist.parallel.layers import ColumnParallelLinear, Norm, RowParallelLinear, VocabParallelEmbedding, normal

B, T, D_IN, D_OUT, V = 3, 5, 6, 4, 11
DT = torch.float64



class RaisingTap:
    defer_weight_grad = False

    def record(self, layer, site, **tensors):
        raise AssertionError(f"record called with defer_weight_grad=False ({site})")


class RecordingTap:
    defer_weight_grad = True

    def __init__(self):
        self.calls = []

    def record(self, layer, site, **tensors):
        self.calls.append((layer, site, {k: v.detach().clone() for k, v in tensors.items()}))


def _init(shape, seed=[0]):
    seed[0] += 1
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed[0]))


def _randomise(layer, seed=0):
    gen = torch.Generator().manual_seed(100 + seed)
    layer.to(DT)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT))
    return layer


def _x(*shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DT).requires_grad_()


def _grads(layer, fn, inp, seed=7):
    """Output, input gradient and parameter gradients of ``fn(inp)`` under a random upstream gradient."""
    layer.zero_grad(set_to_none=True)
    inp = inp.detach().requires_grad_(inp.is_floating_point())
    out = fn(inp)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=DT)
    out.backward(upstream)
    pgrads = {n: (None if p.grad is None else p.grad.clone()) for n, p in layer.named_parameters()}
    gin = inp.grad.clone() if inp.requires_grad and inp.grad is not None else None
    layer.zero_grad(set_to_none=True)
    return out.detach(), gin, pgrads, upstream


def _assert_close(a, b, what):
    assert a is not None and b is not None, what
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-13), f"{what}: max diff {(a - b).abs().max():.3e}"


# ------------------------------------------------------------------------------------------ layers

def _column(bias):
    return _randomise(ColumnParallelLinear(D_IN, D_OUT, bias=bias, init=_init))


def _row(bias):
    return _randomise(RowParallelLinear(D_IN, D_OUT, bias=bias, init=_init), seed=1)


def _embedding(padding_idx, tied=True):
    layer = _randomise(VocabParallelEmbedding(V, D_IN, padding_idx=padding_idx, tied_output=tied, init=_init), seed=2)
    return layer


def _ids(padding_idx):
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    ids[0, 1] = ids[0, 3] = 5  # repeated token
    if padding_idx is not None:
        ids[1, 0] = ids[2, 2] = ids[2, 4] = padding_idx
    return ids


def _norm(rms):
    return _randomise(Norm(D_IN, rms=rms), seed=3)


# (id, layer factory, forward fn given the layer, input factory)
LINEAR_CASES = [
    ("column-bias", lambda: _column(True)),
    ("column-nobias", lambda: _column(False)),
    ("row-bias", lambda: _row(True)),
    ("row-nobias", lambda: _row(False)),
]


def _all_cases():
    cases = [(name, make, lambda l: l, lambda: _x(B, T, D_IN)) for name, make in LINEAR_CASES]
    for pad in (None, 0, 4):
        cases.append((f"embed-forward-pad{pad}", lambda pad=pad: _embedding(pad), lambda l: l,
                      lambda pad=pad: _ids(pad)))
        cases.append((f"embed-project-pad{pad}", lambda pad=pad: _embedding(pad), lambda l: l.project,
                      lambda: _x(B, T, D_IN)))
    for rms in (False, True):
        cases.append((f"norm-rms{rms}", lambda rms=rms: _norm(rms), lambda l: l, lambda: _x(B, T, D_IN)))
    return cases


CASES = _all_cases()
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("name,make,fn,make_input", CASES, ids=IDS)
def test_tapped_equals_plain(name, make, fn, make_input):
    layer = make()
    inp = make_input()
    plain = _grads(layer, fn(layer), inp)
    layer.grad_tap = RaisingTap()
    try:
        tapped = _grads(layer, fn(layer), inp)
    finally:
        layer.grad_tap = None
    _assert_close(tapped[0], plain[0], f"{name} output")
    if plain[1] is not None:
        _assert_close(tapped[1], plain[1], f"{name} input grad")
    else:
        assert tapped[1] is None
    for pname in plain[2]:
        _assert_close(tapped[2][pname], plain[2][pname], f"{name} grad of {pname}")


@pytest.mark.parametrize("name,make,fn,make_input", CASES, ids=IDS)
def test_tapped_gradcheck(name, make, fn, make_input):
    """Finite differences on the tapped path, for the input (when it is floating) and every parameter."""
    layer = make()
    inp = make_input()
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
    layer.grad_tap = RaisingTap()
    try:
        if inp.is_floating_point():
            def f(x, *ps):
                return functional_call(layer, dict(zip(names, ps)), (x,)) if fn(layer) is layer else \
                    _call_method(layer, names, ps, x)
            assert gradcheck(f, (inp.detach().requires_grad_(), *params), eps=1e-6, atol=1e-5, rtol=1e-4)
        else:
            def f(*ps):
                return functional_call(layer, dict(zip(names, ps)), (inp,))
            assert gradcheck(f, tuple(params), eps=1e-6, atol=1e-5, rtol=1e-4)
    finally:
        layer.grad_tap = None


def _call_method(layer, names, ps, x):
    """``layer.project(x)`` with the parameters swapped (functional_call only calls ``forward``)."""
    originals = {n: getattr(layer, n) for n in names}
    try:
        for n, p in zip(names, ps):
            delattr(layer, n)
            setattr(layer, n, p)
        return layer.project(x)
    finally:
        for n, p in originals.items():
            delattr(layer, n)
            setattr(layer, n, p)


# ------------------------------------------------------------------------------ deferred weights

def _deferred(layer, fn, inp):
    plain = _grads(layer, fn(layer), inp)
    tap = RecordingTap()
    layer.grad_tap = tap
    try:
        layer.zero_grad(set_to_none=True)
        x = inp.detach().requires_grad_(inp.is_floating_point())
        out = fn(layer)(x)
        _assert_close(out.detach(), plain[0], "deferred output")
        out.backward(plain[3])
        for n, p in layer.named_parameters():
            assert p.grad is None, f"{n} got a .grad although the weight gradient was deferred"
        if x.requires_grad:
            _assert_close(x.grad, plain[1], "deferred input grad")
    finally:
        layer.grad_tap = None
    return plain, tap.calls


@pytest.mark.parametrize("make", [lambda: _column(True), lambda: _column(False), lambda: _row(True),
                                  lambda: _row(False)], ids=["column-bias", "column-nobias", "row-bias", "row-nobias"])
def test_deferred_linear(make):
    layer = make()
    plain, calls = _deferred(layer, lambda l: l, _x(B, T, D_IN))
    assert len(calls) == 1
    who, site, tensors = calls[0]
    assert who is layer and site == "linear" and set(tensors) == {"inputs", "grad_outputs"}
    a, g = tensors["inputs"], tensors["grad_outputs"]
    assert a.shape == (B, T, D_IN) and g.shape == (B, T, D_OUT)
    _assert_close(torch.einsum("bto,bti->oi", g, a), plain[2]["weight"], "weight grad from the record")
    if layer.bias is not None:  # column: the fused bias; row: the bias added after the reduce
        _assert_close(g.sum((0, 1)), plain[2]["bias"], "bias grad from the record")


@pytest.mark.parametrize("pad", [None, 0, 4])
def test_deferred_embedding_forward(pad):
    layer = _embedding(pad)
    ids = _ids(pad)
    plain, calls = _deferred(layer, lambda l: l, ids)
    assert len(calls) == 1
    who, site, tensors = calls[0]
    assert who is layer and site == "embed" and set(tensors) == {"ids", "grad_outputs"}
    local, g = tensors["ids"], tensors["grad_outputs"]
    assert local.shape == (B, T) and g.shape == (B, T, D_IN)
    expected_local = ids.clone()
    if pad is not None:
        expected_local[ids == pad] = -1
    assert torch.equal(local, expected_local)
    valid = local >= 0
    rebuilt = torch.zeros(V, D_IN, dtype=DT).index_add_(0, local[valid], g[valid])
    _assert_close(rebuilt, plain[2]["weight"], "embedding grad from the record")
    if pad is not None:
        assert plain[2]["weight"][pad].abs().max() == 0  # the pad row gets no input-side gradient


@pytest.mark.parametrize("pad", [None, 0, 4])
def test_deferred_embedding_project(pad):
    layer = _embedding(pad)
    plain, calls = _deferred(layer, lambda l: l.project, _x(B, T, D_IN))
    assert len(calls) == 1
    who, site, tensors = calls[0]
    assert who is layer and site == "project" and set(tensors) == {"inputs", "grad_outputs"}
    h, g = tensors["inputs"], tensors["grad_outputs"]
    assert h.shape == (B, T, D_IN) and g.shape == (B, T, V)
    _assert_close(torch.einsum("btv,btd->vd", g, h), plain[2]["weight"], "projection grad from the record")
    if pad is not None:  # the output side does train the pad row of a tied table
        assert plain[2]["weight"][pad].abs().max() > 0


@pytest.mark.parametrize("rms", [False, True])
def test_deferred_norm(rms):
    layer = _norm(rms)
    x = _x(B, T, D_IN)
    plain, calls = _deferred(layer, lambda l: l, x)
    assert len(calls) == 1
    who, site, tensors = calls[0]
    assert who is layer and site == "norm" and set(tensors) == {"normalized", "grad_outputs"}
    xhat, g = tensors["normalized"], tensors["grad_outputs"]
    assert xhat.shape == (B, T, D_IN) and g.shape == (B, T, D_IN)
    xd = x.detach()
    if rms:
        ref = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + layer.eps)
    else:
        ref = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + layer.eps)
    _assert_close(xhat, ref, "normalized input")
    _assert_close((g * xhat).sum((0, 1)), plain[2]["weight"], "norm weight grad from the record")
    if not rms:
        _assert_close(g.sum((0, 1)), plain[2]["bias"], "norm bias grad from the record")
    else:
        assert layer.bias is None


def test_deferred_tied_embedding_records_both_sites():
    """A table used as lookup and as output projection in one graph records ``embed`` and ``project``,
    and the two rebuilt contributions add up to the plain gradient of the shared table."""
    layer = _embedding(0)
    ids = _ids(0)

    def fn(l):
        return lambda i: l.project(torch.tanh(l(i)))

    plain, calls = _deferred(layer, fn, ids)
    sites = sorted(site for _, site, _ in calls)
    assert sites == ["embed", "project"]
    rec = {site: t for _, site, t in calls}
    local, ge = rec["embed"]["ids"], rec["embed"]["grad_outputs"]
    valid = local >= 0
    grad = torch.zeros(V, D_IN, dtype=DT).index_add_(0, local[valid], ge[valid])
    grad += torch.einsum("btv,btd->vd", rec["project"]["grad_outputs"], rec["project"]["inputs"])
    _assert_close(grad, plain[2]["weight"], "tied table grad from the two records")


def test_a_model_built_on_the_meta_device_draws_no_initial_weights():
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    with torch.device("meta"):
        assert normal((50000, 1024), 0.02, generator).is_meta  # a pretrained load fills it afterwards
    assert torch.equal(generator.get_state(), state)
    assert torch.equal(normal((3, 2), 0.5, generator), torch.randn((3, 2), generator=torch.Generator().manual_seed(0)) * 0.5)
