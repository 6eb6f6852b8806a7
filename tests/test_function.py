"""The one-layer op (LSTMLayerFunction) against the plain loop reference, and float64 gradcheck,
on each CPU backend (the `backend` fixture)."""
import pytest
import torch

from bilstm_fast import lstm_layer
from bilstm_fast.kernels.reference import lstm_layer_reference
from helpers import TOL

F64 = TOL[torch.float64]


def layer_inputs(T, B, I, H, D, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    x = rand(T, B, I)
    w_ih, w_hh = rand(D, 4 * H, I, scale=0.5), rand(D, 4 * H, H, scale=0.5)
    b = rand(D, 4 * H, scale=0.5) if bias else None
    h0, c0 = rand(D, B, H), rand(D, B, H)
    return x, w_ih, w_hh, b, h0, c0


CASES = [  # (T, B, I, H, D, bias, lengths)
    (4, 2, 3, 4, 2, True, None),
    (1, 1, 2, 3, 2, True, None),
    (4, 2, 3, 5, 1, False, None),
    (6, 3, 2, 4, 2, True, [6, 1, 3]),
    (5, 4, 3, 3, 1, True, [2, 5, 5, 1]),
]


def case_id(case):
    T, B, I, H, D, bias, lengths = case
    tags = f"T{T}-B{B}-I{I}-H{H}-D{D}" + ("" if bias else "-nobias")
    return tags + ("" if lengths is None else "-len" + "_".join(map(str, lengths)))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_loop_reference(case, backend):
    T, B, I, H, D, bias, lengths = case
    inputs = layer_inputs(T, B, I, H, D, bias)
    lens = None if lengths is None else torch.tensor(lengths)
    fast = lstm_layer(*inputs, lens, backend=backend)
    ref = lstm_layer_reference(*inputs, lengths)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, **F64)
    if lengths is not None:  # nothing is written past a sequence's end
        out = fast[0].view(T, B, D, H)
        for b, n in enumerate(lengths):
            assert torch.all(out[n:, b] == 0)
    params = [t for t in inputs if t is not None]
    weights = torch.linspace(-1, 1, fast[0].numel(), dtype=torch.float64).view_as(fast[0])

    def loss(out, h_n, c_n):
        return (out * weights).sum() + (h_n * 0.3).sum() + (c_n * c_n).sum()

    g_fast = torch.autograd.grad(loss(*fast), params)
    g_ref = torch.autograd.grad(loss(*ref), params)
    for k, (f, r) in enumerate(zip(g_fast, g_ref)):
        torch.testing.assert_close(f, r, **F64, msg=lambda m: f"gradient {k}: {m}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradcheck(case, backend):
    T, B, I, H, D, bias, lengths = case
    inputs = layer_inputs(T, B, I, H, D, bias, seed=1)
    lens = None if lengths is None else torch.tensor(lengths)
    differentiable = [t for t in inputs if t is not None]

    def op(*tensors):
        it = iter(tensors)
        args = [next(it) if t is not None else None for t in inputs]
        return lstm_layer(*args, lens, backend=backend)

    assert torch.autograd.gradcheck(op, differentiable, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_unused_outputs_get_no_gradient_trouble():
    """Backward works when only some outputs are used (the others arrive as None)."""
    x, w_ih, w_hh, b, h0, c0 = layer_inputs(4, 2, 3, 5, 2)
    out, h_n, c_n = lstm_layer(x, w_ih, w_hh, b, h0, c0)
    (g_only_out,) = torch.autograd.grad(out.sum(), [x], retain_graph=True)
    (g_only_c,) = torch.autograd.grad(c_n.sum(), [x])
    ref = lstm_layer_reference(x, w_ih, w_hh, b, h0, c0)
    torch.testing.assert_close(g_only_out, torch.autograd.grad(ref[0].sum(), [x], retain_graph=True)[0], **F64)
    torch.testing.assert_close(g_only_c, torch.autograd.grad(ref[2].sum(), [x])[0], **F64)


@pytest.mark.parametrize(
    "lengths",
    [[5, 6], [0, 3], [-1, 3], [3.0, 2.0], [3, 2, 1]],
    ids=["longer-than-T", "zero", "negative", "float", "wrong-count"],
)
def test_bad_lengths_are_refused(lengths):
    x, w_ih, w_hh, b, h0, c0 = layer_inputs(5, 2, 3, 4, 2)
    with pytest.raises(ValueError, match="lengths must"):
        lstm_layer(x, w_ih, w_hh, b, h0, c0, torch.tensor(lengths))


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no-input-requires-grad"])
def test_inference_path_gives_the_training_forward_bit_for_bit(case, mode, backend):
    """Without a gradient to compute, lstm_layer runs the inference recurrence, which keeps no
    gates or cell states: the same arithmetic, so the same bits as the saving forward."""
    T, B, I, H, D, bias, lengths = case
    inputs = layer_inputs(T, B, I, H, D, bias)
    lens = None if lengths is None else torch.tensor(lengths)
    expected = lstm_layer(*inputs, lens, backend=backend)
    if mode == "no-input-requires-grad":
        got = lstm_layer(*[None if t is None else t.detach() for t in inputs], lens, backend=backend)
    else:
        with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
            got = lstm_layer(*inputs, lens, backend=backend)
    for name, e, g in zip(("out", "h_n", "c_n"), expected, got):
        assert not g.requires_grad and torch.equal(e.detach(), g), name


def test_inference_saves_nothing_and_training_saves(monkeypatch):
    """Which path runs: the saving forward only when some input needs a gradient."""
    from bilstm_fast import function

    calls = []
    original = function.layer_forward  # every backend's way in, fused projection or not

    def spy(*args, save):
        calls.append("forward" if save else "inference")
        return original(*args, save=save)

    monkeypatch.setattr(function, "layer_forward", spy)
    x, w_ih, w_hh, b, h0, c0 = layer_inputs(3, 2, 3, 4, 2)
    lstm_layer(x, w_ih, w_hh, b, h0, c0)
    with torch.no_grad():
        lstm_layer(x, w_ih, w_hh, b, h0, c0)
    lstm_layer(x.detach(), w_ih.detach(), w_hh.detach(), b.detach(), h0.detach(), c0.detach())
    lstm_layer(x.detach(), w_ih.detach(), w_hh, b.detach(), h0.detach(), c0.detach())  # only W_hh trains
    assert calls == ["forward", "inference", "inference", "forward"]


@pytest.mark.parametrize("n", [1, 511, 512, 513, 1537])
def test_sum_over_rows_is_the_full_reduction(n):
    """Blocks of ROW_BLOCK rows plus a remainder: every row counted once (float64, so exact up to
    rounding of ~1e-16), and strided views as the W_hh gradient passes them."""
    from bilstm_fast.function import ROW_BLOCK, sum_over_rows

    assert ROW_BLOCK == 512  # the sizes above straddle it
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, 2, 12, dtype=torch.float64, generator=g)[:, 1]  # strided, like dgates[:, :, d]
    b = torch.randn(n, 3, dtype=torch.float64, generator=g)
    torch.testing.assert_close(sum_over_rows(a, b), a.t() @ b, rtol=1e-13, atol=1e-13)
