"""Unidirectional stacks in one native call (bilstm_fast/stack.py, kernels/csrc/stack.cpp): every
schedule (layer by layer, batch split, wavefront) against nn.LSTM, dropout masks under one seed,
gradcheck, repeatability, and a wavefront on one thread (its tasks then run in order)."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from bilstm_fast import stack
from bilstm_fast.kernels import native
from helpers import assert_all_close, forward_backward, leaf, make_pair, torch_threads

pytestmark = pytest.mark.skipif(not native.available(), reason="the native extension is not built")

SCHEDULES = stack.SCHEDULES


@pytest.fixture(params=SCHEDULES)
def schedule(request, monkeypatch):
    monkeypatch.setenv("BILSTM_FAST_STACK", request.param)
    return request.param


def inputs(T, B, I, L, H, dtype, hx, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=g, dtype=dtype)
    states = tuple(torch.randn(L, B, H, generator=g, dtype=dtype) for _ in range(2)) if hx else None
    return x, states


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("L,hx,bias,packed", [(2, False, True, False), (3, True, True, False),
                                              (3, False, False, True), (4, True, True, True)],
                         ids=["L2", "L3-hx", "L3-nobias-packed", "L4-hx-packed"])
def test_stack_matches_nn_lstm(schedule, dtype, L, hx, bias, packed):
    T, B, I, H = 9, 17, 5, 12  # B 17: two slices of 8 and 9 rows for the batch split
    ref, fast = make_pair(I, H, L, dtype, bias=bias, bidirectional=False)
    x, states = inputs(T, B, I, L, H, dtype, hx)
    lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(2))
    results = []
    for model in (ref, fast):
        xl, sl = leaf(x), tuple(map(leaf, states)) if hx else None
        arg = pack_padded_sequence(xl, lengths, enforce_sorted=False) if packed else xl
        results.append(forward_backward(model, arg, sl, leaves=[xl, *(sl or ())]))
    assert_all_close(results[1], results[0], dtype)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_dropout_draws_nn_lstms_masks(schedule, packed):
    """Training with dropout between layers: the masks are drawn up front, and are the ones
    nn.LSTM draws between its layers under the same seed (fp64: any other mask is off by O(1))."""
    T, B, I, H, L = 7, 10, 4, 6, 3
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, L, dropout=0.4, dtype=torch.float64)
    from bilstm_fast import FastBiLSTM

    fast = FastBiLSTM.from_lstm(ref, copy=True)
    x, _ = inputs(T, B, I, L, H, torch.float64, False)
    lengths = torch.tensor([7, 3, 5, 7, 1, 2, 6, 4, 7, 2])
    results = []
    for model in (ref, fast):
        torch.manual_seed(5)
        xl = leaf(x)
        arg = pack_padded_sequence(xl, lengths, enforce_sorted=False) if packed else xl
        results.append(forward_backward(model, arg, leaves=[xl]) + [torch.rand(3)])  # the generator after
    assert_all_close(results[1], results[0], torch.float64)


def test_gradcheck_through_the_stack(schedule):
    from bilstm_fast import FastBiLSTM

    torch.manual_seed(0)
    fast = FastBiLSTM(3, 4, num_layers=3, bidirectional=False, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    params = list(fast.parameters())

    def run(x, h0, c0, *weights):
        out, (h_n, c_n) = torch.func.functional_call(fast, dict(zip([n for n, _ in fast.named_parameters()], weights)),
                                                     (x, (h0, c0)))
        return out, h_n, c_n

    _, h_n, _ = run(x, h0, c0, *params)
    assert (type(h_n.grad_fn).__name__ == "StackFunctionBackward") == (schedule != "layers")
    # functional_call with plain eager tensors: the parameters are swapped, the stack path taken.
    # fast_mode: the Jacobians projected on random vectors (hundreds of forwards fewer).
    assert torch.autograd.gradcheck(run, (x, h0, c0, *params), fast_mode=True)
    assert torch.autograd.gradgradcheck(run, (x, h0, c0, *params), fast_mode=True)


def test_wavefront_is_repeatable_and_runs_on_one_thread(monkeypatch):
    """Bitwise the same run to run; on one thread (or any thread count the fork/join gets) the
    stages run in order, as every task waits only on lower-numbered ones."""
    T, B, I, H, L = 20, 6, 8, 16, 3
    x, _ = inputs(T, B, I, L, H, torch.float32, False)
    torch.manual_seed(0)
    w_ih = [torch.randn(4 * H, I if k == 0 else H) * 0.3 for k in range(L)]
    w_hh = [torch.randn(4 * H, H) * 0.25 for _ in range(L)]
    bias = [torch.randn(4 * H) for _ in range(L)]
    h0 = torch.zeros(L, B, H)

    def forward(groups):
        outs, h_n, c_n, _, _, _ = native.stack_forward(x, w_ih, bias, w_hh, h0, h0, None, False, None, groups)
        return outs[-1], h_n, c_n

    first, again = forward(L), forward(L)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    with torch_threads(1):
        serial = forward(L)
    for a, b in zip(first, serial):  # one slice either way: the same GEMMs, the same bits
        assert torch.equal(a, b)


def test_schedule_is_chosen_or_forced(monkeypatch):
    monkeypatch.setenv("BILSTM_FAST_STACK", "fastest")
    with pytest.raises(ValueError, match="BILSTM_FAST_STACK must be one of layers, batch, wavefront"):
        stack.schedule(4, 2, 2)
    monkeypatch.setenv("BILSTM_FAST_STACK", "batch")
    assert stack.schedule(4, 2, 2) == 1
    monkeypatch.setenv("BILSTM_FAST_STACK", "wavefront")
    assert stack.schedule(4, 3, 2) == 2
    monkeypatch.setenv("BILSTM_FAST_STACK", "layers")
    assert stack.schedule(4, 3, 2) is None
    monkeypatch.delenv("BILSTM_FAST_STACK")
    # the measured rule (NOTES 38): the wavefront below the native row split, else layer by layer
    assert stack.schedule(stack.ROW_SPLIT_ROWS - 1, 3, 2) == 2
    assert stack.schedule(stack.ROW_SPLIT_ROWS, 3, 2) is None
    assert stack.schedule(4, 3, 1) is None


def test_batched_gradients_through_the_stack(schedule):
    """autograd.grad(is_grads_batched=True) (the legacy vmap: jacobian(vectorize=True), gradcheck's
    batched check): the stack's backward takes the layer-by-layer way and equals one call per
    cotangent."""
    from bilstm_fast import FastBiLSTM

    torch.manual_seed(0)
    fast = FastBiLSTM(3, 4, num_layers=3, bidirectional=False, dropout=0.3, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    out, (h_n, _) = fast(x)
    cotangents = torch.randn(4, *out.shape, dtype=torch.float64)
    batched = torch.autograd.grad(out, [x, *fast.parameters()], cotangents, retain_graph=True, is_grads_batched=True)
    for k, v in enumerate(cotangents):
        one = torch.autograd.grad(out, [x, *fast.parameters()], v, retain_graph=True)
        for b, o in zip(batched, one):
            torch.testing.assert_close(b[k], o, rtol=1e-10, atol=1e-12)
