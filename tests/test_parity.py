"""FastBiLSTM against nn.LSTM on CPU, on every backend (the `backend` fixture): outputs, final
states and every gradient.

Tolerances (helpers.TOL): fp32 rtol=1e-5/atol=1e-6, a few ulps of the largest values; fp64
rtol=1e-10/atol=1e-12, where any formula difference would show up at 1e-3 or worse. The tests
parametrized by dtype compare against nn.LSTM in float64 on the same (exactly widened) weights and
inputs, so the fp32 tolerance holds FastBiLSTM's own rounding alone: against fp32 nn.LSTM it also
had to absorb nn.LSTM's, which on an AVX2-only CPU (oneDNN's AVX2 kernels) reaches 0.98 of it on
its own (B3-T17-I5-H50: a bias gradient of 0.018 summed from 51 terms of O(1), 1.2e-6 off the
float64 value where FastBiLSTM is 2e-7 off).
"""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bilstm_fast import FastBiLSTM, swap_lstm
from bilstm_fast.kernels import resolve_backend
from helpers import TOL, assert_all_close, forward_backward, make_pair


class Case:
    def __init__(self, B, T, I, H, layers=1, bidir=True, batch_first=False, hx=False, bias=True):
        self.__dict__.update(B=B, T=T, I=I, H=H, layers=layers, bidir=bidir,
                             batch_first=batch_first, hx=hx, bias=bias)

    def __repr__(self):
        tags = [f"B{self.B}-T{self.T}-I{self.I}-H{self.H}-L{self.layers}"]
        tags += [] if self.bidir else ["uni"]
        tags += ["bf"] if self.batch_first else []
        tags += ["hx"] if self.hx else []
        tags += [] if self.bias else ["nobias"]
        return "-".join(tags)


CASES = [
    Case(3, 17, 5, 50),
    Case(1, 1, 4, 8),
    Case(2, 1, 3, 5, layers=2, hx=True),
    Case(1, 9, 6, 7, batch_first=True),
    Case(4, 6, 5, 16, layers=3, hx=True),
    Case(3, 5, 4, 6, bidir=False, hx=True),
    Case(2, 7, 3, 9, layers=2, bias=False),
    Case(5, 4, 8, 12, layers=2, batch_first=True, hx=True, bidir=False),
]


def pair_for(case, dtype, backend):
    return make_pair(case.I, case.H, case.layers, dtype, bias=case.bias, batch_first=case.batch_first,
                     bidirectional=case.bidir, backend=backend)


def run_and_grad(model, x, hx):
    """Output, final states and the gradients w.r.t. input, states and every parameter."""
    return forward_backward(model, x, hx, leaves=[x, *(hx or ())])


def in_float64(ref, x, hx):
    """(nn.LSTM in float64 on exactly ref's weights, x and hx widened to float64 leaves): the exact
    results that the fp32 ones round towards."""
    def widen(t):
        return t.detach().double().requires_grad_()

    return copy.deepcopy(ref).double(), widen(x), None if hx is None else tuple(widen(t) for t in hx)


def inputs_for(case, dtype):
    g = torch.Generator().manual_seed(1)
    shape = (case.B, case.T, case.I) if case.batch_first else (case.T, case.B, case.I)
    x = torch.randn(shape, generator=g, dtype=dtype).requires_grad_()
    hx = None
    if case.hx:
        D = 2 if case.bidir else 1
        state = (case.layers * D, case.B, case.H)
        hx = tuple(torch.randn(state, generator=g, dtype=dtype).requires_grad_() for _ in range(2))
    return x, hx


def assert_parity(ref_result, fast_result, dtype):
    """Output, h_n, c_n and every gradient, element by element at helpers.TOL[dtype] (`dtype`:
    FastBiLSTM's; the reference's results may be float64)."""
    assert_all_close([t.to(r.dtype) for t, r in zip(fast_result, ref_result)], ref_result, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_matches_nn_lstm(case, dtype, backend):
    ref, fast = pair_for(case, dtype, backend)
    x, hx = inputs_for(case, dtype)
    assert_parity(run_and_grad(*in_float64(ref, x, hx)), run_and_grad(fast, x, hx), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bf"])
def test_packed_unsorted_lengths(batch_first, dtype, backend):
    case = Case(4, 7, 3, 10, layers=2, batch_first=batch_first, hx=True)
    ref, fast = pair_for(case, dtype, backend)
    x, hx = inputs_for(case, dtype)
    lengths = torch.tensor([3, 7, 1, 5])  # unsorted, includes the full length and length 1

    def run(model, x, hx):
        packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
        out, (h_n, c_n) = model(packed, hx)
        assert out.batch_sizes.tolist() == packed.batch_sizes.tolist()
        assert torch.equal(out.sorted_indices, packed.sorted_indices)
        padded, out_lengths = pad_packed_sequence(out, batch_first=batch_first)
        assert out_lengths.tolist() == lengths.tolist()
        w = torch.linspace(-1, 1, padded.numel(), dtype=x.dtype).view_as(padded)
        loss = (padded * w).sum() + h_n.sum() + (c_n * c_n).sum()
        grads = torch.autograd.grad(loss, [x, *hx, *model.parameters()])
        return [padded, h_n, c_n, *grads]

    assert_parity(run(*in_float64(ref, x, hx)), run(fast, x, hx), dtype)


def test_unbatched_input(backend):
    case = Case(1, 6, 4, 5, layers=2)
    ref, fast = pair_for(case, torch.float32, backend)
    x = torch.randn(6, 4, requires_grad=True)
    hx = tuple(torch.randn(4, 5, requires_grad=True) for _ in range(2))
    for state in (None, hx):
        ref_result, fast_result = run_and_grad(ref, x, state), run_and_grad(fast, x, state)
        assert fast_result[0].shape == (6, 10) and fast_result[1].shape == (4, 5)
        assert_parity(ref_result, fast_result, torch.float32)


def test_dropout_is_training_only(backend):
    torch.manual_seed(0)
    fast = FastBiLSTM(4, 6, num_layers=3, dropout=0.5, backend=backend)
    ref = nn.LSTM(4, 6, num_layers=3, dropout=0.5, bidirectional=True)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(5, 2, 4)
    fast.eval(), ref.eval()
    torch.testing.assert_close(fast(x)[0], ref(x)[0], **TOL[torch.float32])
    fast.train()
    torch.manual_seed(3)
    train_a = fast(x)[0]
    torch.manual_seed(3)
    train_b = fast(x)[0]
    assert torch.equal(train_a, train_b)  # seeded dropout is reproducible
    assert (train_a - fast.eval()(x)[0]).abs().max() > 1e-2  # and it does drop something


def test_state_dict_round_trip_and_repr():
    ref = nn.LSTM(7, 9, num_layers=2, batch_first=True, bidirectional=True, dropout=0.1)
    fast = FastBiLSTM(7, 9, num_layers=2, batch_first=True, dropout=0.1)
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert [p.shape for p in fast.parameters()] == [p.shape for p in ref.parameters()]
    assert repr(fast) == repr(ref).replace("LSTM", "FastBiLSTM", 1)
    fast.load_state_dict(ref.state_dict())
    for k, v in fast.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k])
    torch.manual_seed(5)
    other = FastBiLSTM(7, 9, num_layers=2, batch_first=True, dropout=0.1)
    ref.load_state_dict(other.state_dict())
    x = torch.randn(3, 4, 7)
    ref.eval(), other.eval()
    torch.testing.assert_close(other(x)[0], ref(x)[0], **TOL[torch.float32])


def test_init_matches_nn_lstm():
    """Same RNG stream -> same initial weights: init is nn.RNNBase's, uniform(-1/sqrt(H), 1/sqrt(H))."""
    torch.manual_seed(11)
    ref = nn.LSTM(3, 8, num_layers=2, bidirectional=True)
    torch.manual_seed(11)
    fast = FastBiLSTM(3, 8, num_layers=2)
    for (name, a), (_, b) in zip(ref.named_parameters(), fast.named_parameters()):
        assert torch.equal(a, b), name


def test_swap_lstm_in_a_model(backend):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("rnn", nn.LSTM(4, 6, bidirectional=True, batch_first=True))
    x = torch.randn(2, 5, 4)
    expected = model.rnn(x)[0]
    swapped = swap_lstm(model, backend=backend)
    assert swapped is model and type(model.rnn) is FastBiLSTM
    assert model.rnn.batch_first
    torch.testing.assert_close(model.rnn(x)[0], expected, **TOL[torch.float32])
    assert type(swap_lstm(nn.LSTM(2, 3))) is FastBiLSTM


def test_default_is_bidirectional_and_unidirectional_works():
    assert FastBiLSTM(3, 4).bidirectional
    uni = FastBiLSTM(3, 4, bidirectional=False)
    out, (h, c) = uni(torch.randn(5, 2, 3))
    assert out.shape == (5, 2, 4) and h.shape == (1, 2, 4)


def test_backends_agree():
    torch.manual_seed(0)
    fast = FastBiLSTM(5, 7, num_layers=2, backend="vectorized")
    x = torch.randn(4, 3, 5)
    vec = fast(x)[0]
    # on CPU auto is the native backend when it is built, the vectorized one otherwise
    fast.backend = resolve_backend("auto", x.device, x.dtype)
    chosen = fast(x)[0]
    fast.backend = "auto"
    assert torch.equal(fast(x)[0], chosen)
    torch.testing.assert_close(chosen, vec, **TOL[torch.float32])
    with pytest.raises(ValueError, match="backend must be one of"):
        FastBiLSTM(5, 7, backend="cudnn")


def test_batch_of_zero_behaves_like_nn_lstm(backend):
    ref, fast = pair_for(Case(0, 4, 3, 5, layers=2), torch.float32, backend)
    x = torch.randn(4, 0, 3)
    (ro, (rh, rc)), (fo, (fh, fc)) = ref(x), fast(x)
    assert fo.shape == ro.shape and fh.shape == rh.shape and fc.shape == rc.shape


def test_does_not_modify_inputs(backend):
    ref, fast = pair_for(Case(2, 5, 3, 4, hx=True), torch.float32, backend)
    x, hx = inputs_for(Case(2, 5, 3, 4, hx=True), torch.float32)
    copies = [t.detach().clone() for t in (x, *hx)]
    run_and_grad(fast, x, hx)
    for before, after in zip(copies, (x, *hx)):
        assert torch.equal(before, after)
