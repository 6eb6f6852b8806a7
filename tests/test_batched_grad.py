"""Batched gradients (issue 26): one backward over a batch of cotangents, as
torch.autograd.functional.jacobian(vectorize=True), autograd.grad(is_grads_batched=True) and
gradcheck's batched check run it (the legacy vmap), and torch.func.vmap of a backward. On every
backend, against nn.LSTM in float64 (rtol 1e-10: both are exact up to rounding, ~1e-15 seen).
tests/test_conformance.py runs PyTorch's own gradcheck material with batched gradients on.
"""
import os

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian
from torch.func import functional_call, vjp, vmap
from torch.nn.utils.rnn import pack_padded_sequence

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend runs interpreted on CPU

from bilstm_fast import FastBiLSTM  # noqa: E402
from bilstm_fast.kernels import available_backends, recurrence_module  # noqa: E402
from helpers import TOL, every_backend, torch_threads  # noqa: E402

BACKENDS = every_backend()
# what differs between the backends in a batched backward is the recurrence: the weight gradients
# after it are the same torch ops wherever the backend has no fused ones (Triton has none), so the
# interpreted Triton backend (seconds a test) runs the tests of the recurrence only
CPU_BACKENDS = available_backends("cpu")
F64 = TOL[torch.float64]
T, B, I, H = 3, 2, 3, 4


def pair(backend, **config):
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, num_layers=2, bidirectional=True, dtype=torch.float64, **config)
    return ref, FastBiLSTM.from_lstm(ref, backend=backend, copy=True)


@pytest.fixture
def backward_calls(monkeypatch):
    """Counts the calls of the recurrence backward of each backend module."""
    calls = []
    for name in ("vectorized", "native", "triton"):
        try:
            rec = recurrence_module(name)
        except ImportError:  # triton not installed
            continue
        original = rec.recurrence_backward

        def counted(*args, _original=original, **kwargs):
            calls.append(args[0].shape)
            return _original(*args, **kwargs)

        monkeypatch.setattr(rec, "recurrence_backward", counted)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_jacobian_wrt_input_is_one_backward_per_layer(backend, backward_calls):
    """jacobian(vectorize=True) of a 2-layer bidirectional model's output w.r.t. its input equals
    nn.LSTM's, and its T*B*2H cotangents run as one recurrence backward per layer on T*B*2H*B
    rows: the batch is folded into the recurrence's own batch axis, not looped over."""
    ref, fast = pair(backend)
    x = torch.randn(T, B, I, dtype=torch.float64)
    with torch_threads(1):  # tiny sizes: see test_conformance.py
        got = jacobian(lambda x: fast(x)[0], x, vectorize=True)
    want = jacobian(lambda x: ref(x)[0], x)
    torch.testing.assert_close(got, want, **F64)
    n = T * B * 2 * H
    assert backward_calls == [(T, n * B, 2, H)] * 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_jacobian_wrt_weights_through_functional_call(backend):
    ref, fast = pair(backend)
    x = torch.randn(T, B, I, dtype=torch.float64)
    names = [name for name, _ in fast.named_parameters()]
    assert names == [name for name, _ in ref.named_parameters()]

    def output(model):
        return lambda *weights: functional_call(model, dict(zip(names, weights)), (x,))[0]

    with torch_threads(1):
        got = jacobian(output(fast), tuple(fast.parameters()), vectorize=True)
    want = jacobian(output(ref), tuple(ref.parameters()))
    assert len(got) == len(want) == len(names)
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, **F64, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_is_grads_batched_packed_with_hx(backend):
    """Cotangents for the output and both final states at once, on packed input (lengths: the
    folded batch repeats them) with an initial state, for the input, the state and the weights."""
    ref, fast = pair(backend)
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0, c0 = torch.randn(2, 4, B, H, dtype=torch.float64)
    lengths = torch.tensor([2, 3])
    g = torch.Generator().manual_seed(1)
    results = []
    for model in (ref, fast):
        leaves = [t.clone().requires_grad_() for t in (x, h0, c0)]
        packed = pack_padded_sequence(leaves[0], lengths, enforce_sorted=False)
        out, (h_n, c_n) = model(packed, tuple(leaves[1:]))
        outputs = (out.data, h_n, c_n)
        cotangents = [torch.randn(5, *o.shape, generator=g.manual_seed(k), dtype=torch.float64)
                      for k, o in enumerate(outputs)]
        with torch_threads(1):
            results.append(torch.autograd.grad(outputs, leaves + list(model.parameters()), cotangents,
                                               is_grads_batched=True))
    for k, (got, want) in enumerate(zip(results[1], results[0])):
        torch.testing.assert_close(got, want, **F64, msg=lambda m: f"gradient {k}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_vjp_and_vmap_of_it(backend):
    """torch.func.vjp's vjp_fn, alone (it runs after its transform has ended: FastBiLSTM gave
    zero input gradients there) and vmapped over cotangents batched along a middle axis."""
    ref, fast = pair(backend)
    x = torch.randn(T, B, I, dtype=torch.float64)
    cotangents = torch.randn(T, B, 5, 2 * H, dtype=torch.float64)  # 5 cotangents along axis 2
    leaf = x.clone().requires_grad_()
    out = ref(leaf)[0]
    want = torch.stack([torch.autograd.grad(out, leaf, c, retain_graph=True)[0] for c in cotangents.unbind(2)])
    with torch_threads(1):
        _, vjp_fn = vjp(lambda x: fast(x)[0], x)
        alone = vjp_fn(cotangents[:, :, 0])[0]
        batched = vmap(vjp_fn, in_dims=2)(cotangents)[0]
    torch.testing.assert_close(alone, want[0], **F64)
    torch.testing.assert_close(batched, want, **F64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_vmap_over_stacked_weights(backend):
    """An ensemble vmapped over its weights: the recurrence's batch axis cannot absorb a batch of
    weights, so the ops run once per member (the vmap rules' fallback)."""
    ref, fast = pair(backend)
    x = torch.randn(T, B, I, dtype=torch.float64)
    members = [{name: p + 0.1 * k for name, p in fast.named_parameters()} for k in range(2)]
    stacked = {name: torch.stack([m[name] for m in members]) for name in members[0]}
    with torch_threads(1):
        got = vmap(lambda p: functional_call(fast, p, (x,))[0])(stacked)
    want = torch.stack([functional_call(ref, m, (x,))[0] for m in members])
    torch.testing.assert_close(got, want, **F64)

