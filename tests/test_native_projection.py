"""The native backend's projection (nn.LSTM's proj_size, the contract's `w_hr` extra):
h = (o * tanh(c)) @ W_hr^T inside the C++ recurrence.

The recurrence against the float64 loop reference (out, h_n, c_n) and the float64 vectorized
recurrence (everything, the saved buffers and the backward's dh included), the batch split,
bitwise repeatability, and FastBiLSTM(proj_size=..., backend="native") against nn.LSTM (the
float64 gradcheck with a projection runs on every CPU backend in test_dropin.py). Tolerances as
in test_native.py: fp32 rtol 1e-5 / atol 1e-6 (the fp32
activations are polynomial approximations, tanh within 0.26 ulp on average and 1.3 at most, and
the GEMMs round as MKL does, over a few steps: a few ulps of O(1) values), fp64 1e-10 (libm
activations; only reassociation differs, any formula difference would show at 1e-3 or worse).
"""
import pytest
import torch
from torch import nn

from bilstm_fast import FastBiLSTM
from bilstm_fast.kernels import native, vectorized
from bilstm_fast.kernels.reference import lstm_layer_reference
from helpers import TOL, forward_backward, torch_threads

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native backend not built: {native.UNAVAILABLE_REASON}")
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])

# (T, B, D, H, P, lengths): T=1 and T=2 (W^T used as a view, not copied), P=1, one and two
# directions, unsorted lengths with ties and length-1 rows, a batch that threads can split
CASES = [
    (7, 5, 2, 13, 5, None),
    (1, 1, 2, 4, 3, None),
    (2, 3, 2, 6, 1, [2, 1, 2]),
    (9, 4, 1, 8, 3, [9, 2, 1, 9]),
    (6, 19, 2, 33, 7, [1, 2, 3, 4, 5, 6] * 3 + [6]),
    (12, 40, 2, 16, 6, [12 - (b * 7) % 12 for b in range(40)]),
]


def case_id(case):
    T, B, D, H, P, lengths = case
    return f"T{T}-B{B}-D{D}-H{H}-P{P}" + ("" if lengths is None else "-len")


def problem(T, B, D, H, P, lengths, dtype, seed=0):
    """Recurrence inputs (gx, w_hh, h0, c0, lengths, w_hr) and output gradients (dout, dh_n, dc_n)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    inputs = dict(gx=rand(T, B, D, 4 * H), w_hh=rand(D, 4 * H, P, scale=0.4), h0=rand(D, B, P), c0=rand(D, B, H),
                  lengths=None if lengths is None else torch.tensor(lengths), w_hr=rand(D, P, H, scale=0.4))
    grads = dict(dout=rand(T, B, D, P), dh_n=rand(D, B, P), dc_n=rand(D, B, H))
    return inputs, grads


def double(p):
    return {k: v if v is None or k == "lengths" else v.double() for k, v in p.items()}


def valid_mask(lengths, T, B):
    """[T, B, 1, 1] bool: t < lengths[b]."""
    if lengths is None:
        return torch.ones(T, B, 1, 1, dtype=torch.bool)
    return (torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)).view(T, B, 1, 1)


def run(p, g, threads=None):
    """native forward and backward (with the saved buffers) -> (out, h_n, c_n, gates, cs), (dgates, dh0, dc0, dh)."""
    with torch_threads(threads):
        fwd = native.recurrence_forward(**p)
        bwd = native.recurrence_backward(g["dout"], g["dh_n"], g["dc_n"], p["w_hh"], fwd[3], fwd[4], p["c0"],
                                         p["lengths"], w_hr=p["w_hr"])
    return fwd, bwd


def check_against_float64(p, g, fwd, bwd, dtype):
    T, B, D, _ = p["gx"].shape
    P = p["w_hr"].shape[1]
    tol = TOL[dtype]
    valid = valid_mask(p["lengths"], T, B)
    ref_fwd = vectorized.recurrence_forward(**double(p))
    for name, n, r in zip(("out", "h_n", "c_n", "gates", "cs"), fwd, ref_fwd):
        assert n.dtype == dtype and n.is_contiguous()
        if name == "gates":  # the contract leaves the gates past a sequence's end unspecified
            n, r = n * valid, r * valid
        torch.testing.assert_close(n.double(), r, **tol, msg=lambda m: f"{name}: {m}")
    out, h_n = fwd[:2]
    assert out.shape == (T, B, D, P) and h_n.shape == (D, B, P)
    assert torch.equal(out * ~valid, torch.zeros_like(out)), "output past a sequence's end must be exactly 0"
    # the backward from the same saved buffers, in float64 for the reference
    dgates, dh0, dc0, dh = bwd
    ref_bwd = vectorized.recurrence_backward(**double(g), w_hh=p["w_hh"].double(), gates=fwd[3].double(),
                                             cs=fwd[4].double(), c0=p["c0"].double(), lengths=p["lengths"],
                                             w_hr=p["w_hr"].double())
    assert dh.shape == (T, B, D, P) and dh0.shape == (D, B, P)
    for name, n, r in zip(("dgates", "dh0", "dc0", "dh"), bwd, ref_bwd):
        assert n.dtype == dtype and n.is_contiguous()
        torch.testing.assert_close(n.double(), r, **tol, msg=lambda m: f"{name}: {m}")
    assert torch.equal(dgates * ~valid, torch.zeros_like(dgates)), "no gate gradient past a sequence's end"
    assert torch.equal(dh * ~valid, torch.zeros_like(dh)), "no dh past a sequence's end"


@DTYPES
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_recurrence_matches_float64(case, dtype):
    T, B, D, H, P, lengths = case
    p, g = problem(*case, dtype)
    fwd, bwd = run(p, g)
    check_against_float64(p, g, fwd, bwd, dtype)
    # the loop reference, independent of the vectorized code: x is gx with both directions side
    # by side, and W_ih the identity block that picks direction d's slice (no bias)
    x = p["gx"].double().reshape(T, B, D * 4 * H)
    w_ih = torch.eye(D * 4 * H, dtype=torch.float64).view(D, 4 * H, D * 4 * H)
    ref = lstm_layer_reference(x, w_ih, p["w_hh"].double(), None, p["h0"].double(), p["c0"].double(), lengths,
                               w_hr=p["w_hr"].double())
    for name, n, r in zip(("out", "h_n", "c_n"), (fwd[0].reshape(T, B, D * P), fwd[1], fwd[2]), ref):
        torch.testing.assert_close(n.double(), r, **TOL[dtype], msg=lambda m: f"{name} vs the loop reference: {m}")
    # the inference forward: the same arithmetic, so the same bits, and nothing saved
    inf = native.recurrence_forward(**p, save=False)
    assert inf[3] is None and inf[4] is None
    for name, a, b in zip(("out", "h_n", "c_n"), inf[:3], fwd[:3]):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_batch_split_matches_and_repeats(threads, D):
    """40 rows with 1, 2 and 4 threads: one task per direction, or the rows dealt into slices
    (>= 8 rows each) that sweep at once (D=1 splits at 2 threads, D=2 at 4). Each thread count
    agrees with float64 and gives the same bits run to run."""
    case = (11, 40, D, 12, 5, [11 - (b * 5) % 11 for b in range(40)])
    p, g = problem(*case, torch.float32)
    first = run(p, g, threads)
    check_against_float64(p, g, *first, torch.float32)
    again = run(p, g, threads)
    for a, b in zip(first[0] + first[1], again[0] + again[1]):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------- the module


@pytest.fixture
def native_projection_calls(monkeypatch):
    """Counts the native recurrence calls that get a projection: proves the layer ran here (ops.py
    sends projection layers to the vectorized backend when a backend lacks the extra)."""
    calls = {"forward": 0, "backward": 0}

    def counted(name):
        original = getattr(native, f"recurrence_{name}")

        def call(*args, **kwargs):
            calls[name] += kwargs.get("w_hr") is not None
            return original(*args, **kwargs)

        monkeypatch.setattr(native, f"recurrence_{name}", call)

    counted("forward")
    counted("backward")
    return calls


MODULE_CASES = {  # id: (num_layers, bidirectional, batch_first, lengths or None)
    "bi-2layer": (2, True, False, None),
    "bi-packed": (1, True, False, [3, 7, 1, 5]),
    "uni-2layer-packed": (2, False, True, [7, 2, 7, 4]),
}


@DTYPES
@pytest.mark.parametrize("case", MODULE_CASES)
def test_module_matches_nn_lstm(case, dtype, native_projection_calls):
    """FastBiLSTM(proj_size=3, backend="native") against nn.LSTM from the same weights: output,
    states and the gradients of input, states and every parameter (weight_hr_l* included)."""
    num_layers, bidirectional, batch_first, lengths = MODULE_CASES[case]
    torch.manual_seed(0)
    ref = nn.LSTM(5, 6, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, proj_size=3,
                  dtype=dtype)
    fast = FastBiLSTM.from_lstm(ref, backend="native", copy=True)
    D = 2 if bidirectional else 1
    x = torch.randn(4, 7, 5, dtype=dtype) if batch_first else torch.randn(7, 4, 5, dtype=dtype)
    hx = (torch.randn(num_layers * D, 4, 3, dtype=dtype), torch.randn(num_layers * D, 4, 6, dtype=dtype))
    results = []
    for model in (ref, fast):
        leaves = [t.clone().requires_grad_() for t in (x, *hx)]
        inp = leaves[0]
        if lengths is not None:
            inp = nn.utils.rnn.pack_padded_sequence(inp, torch.tensor(lengths), batch_first=batch_first,
                                                    enforce_sorted=False)
        results.append(forward_backward(model, inp, (leaves[1], leaves[2]), leaves))
    assert native_projection_calls == {"forward": num_layers, "backward": num_layers}
    for k, (got, want) in enumerate(zip(results[1], results[0])):
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"result {k}: {m}")
