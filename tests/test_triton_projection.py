"""LSTM projection (nn.LSTM's proj_size = P > 0) in the Triton kernels, on CPU under
TRITON_INTERPRET=1: the contract's projection extra (kernels/contract.py) for every schedule.

Against float64 oracles fed the same rounded inputs: the loop reference (kernels/reference.py,
differentiated by autograd) for out, h_n, c_n, dgates, dh0, dc0 and W_hr's gradient; the
vectorized backend in float64 for the saved gates and cs and for dh, the contract's fourth
backward result. dh is also checked through what the caller builds from it, W_hr's gradient
sum_t dh^T (o * tanh(c)) (bilstm_fast/function.py), against the autograd one. Tolerances are
test_triton.py's (helpers.BACKEND_TOL["triton"]): the projection adds one H-term dot per
step forward and one P-term dot back, a few more fp32 roundings of 6e-8 on O(1) values.

The persistent schedule with several programs per group (two barriers per step with a
projection) runs with its programs in threads, as in tests/test_triton_concurrent.py.
"""
import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from helpers import forward_backward, interpreted_triton, tol

tr = interpreted_triton("projection kernel tests")

from bilstm_fast import FastBiLSTM  # noqa: E402
from bilstm_fast.function import projected_input  # noqa: E402
from bilstm_fast.kernels import vectorized  # noqa: E402
from bilstm_fast.kernels.reference import lstm_layer_reference  # noqa: E402
from interpreter_threads import concurrent_programs  # noqa: E402

pytestmark = pytest.mark.interpreter

TOL = {dtype: tol(dtype, "triton") for dtype in (torch.float32, torch.float64)}
DTYPE_NAMES = {torch.float32: "fp32", torch.float64: "fp64"}

# as test_triton.py: block_n=16 with H=20 (padded to 32) gives two chunk programs (stepwise)
# or two chunks walked by one program (tile); P=12 leaves the second program without a
# projection chunk, P=17 (padded to 32) gives each its own
SCHEDULES = {
    "tile": dict(schedule="tile"),
    "tile-stream": dict(schedule="tile", block_n=16, resident=False),
    "stepwise": dict(schedule="stepwise", block_n=16, resident=True),
    "stepwise-stream": dict(schedule="stepwise", block_n=16, resident=False),
    "persistent": dict(schedule="persistent"),
}

# (T, B, H, P, with_lengths, D, dtype)
FP64_SHAPE = (5, 3, 20, 12, True, 2, torch.float64)  # every schedule: the formulas to 1e-10
CASES = [(FP64_SHAPE, name) for name in SCHEDULES] + [
    ((4, 3, 20, 17, False, 1, torch.float32), "tile-stream"),
    ((4, 3, 20, 17, False, 1, torch.float32), "stepwise"),
    ((6, 3, 20, 17, True, 2, torch.float32), "stepwise-stream"),  # even T: the other ping-pong half
    ((1, 1, 8, 3, True, 2, torch.float32), "tile"),  # T = 1, B = 1
    ((5, 1, 20, 12, False, 2, torch.float64), "tile"),
]


def shape_id(shape):
    T, B, H, P, with_lengths, D, dtype = shape
    return f"T{T}-B{B}-H{H}-P{P}-D{D}-{DTYPE_NAMES[dtype]}" + ("-len" if with_lengths else "")


def fixed_lengths(T, B):
    """Unsorted, with a full-length and (where T allows) a one-step sequence."""
    return torch.tensor([T] * B if T == 1 else [2, T, 1][:B] if B > 1 else [T - 1])


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Output buffers start as NaN, so an element a kernel fails to write fails the test."""

    def nan_empty(like, *shape, dtype=None):
        return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)

    monkeypatch.setattr(tr, "_empty", nan_empty)


def random_problem(T, B, H, P, with_lengths, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    problem = dict(
        gx=rand(T, B, D, 4 * H), w_hh=rand(D, 4 * H, P, scale=0.5), h0=rand(D, B, P), c0=rand(D, B, H),
        lengths=fixed_lengths(T, B) if with_lengths else None, w_hr=rand(D, P, H, scale=0.5),
    )
    cotangents = dict(dout=rand(T, B, D, P), dh_n=rand(D, B, P), dc_n=rand(D, B, H))
    return problem, cotangents


def reference(gx, w_hh, h0, c0, lengths, w_hr, dout, dh_n, dc_n):
    """Float64 loop reference fed exactly gx (x is gx, w_ih picks direction d's columns, so
    x.grad is dgates), differentiated by autograd; gates, cs and dh from the float64
    vectorized backend."""
    T, B, D, G = gx.shape
    x = gx.double().reshape(T, B, D * G).clone().requires_grad_()
    select = torch.eye(D * G, dtype=torch.float64).view(D, G, D * G)
    h0_, c0_, w_hr_ = (t.double().clone().requires_grad_() for t in (h0, c0, w_hr))
    lens = None if lengths is None else lengths.tolist()
    out, h_n, c_n = lstm_layer_reference(x, select, w_hh.double(), None, h0_, c0_, lens, w_hr=w_hr_)
    loss = (out * dout.double().reshape(T, B, -1)).sum() + (h_n * dh_n.double()).sum() + (c_n * dc_n.double()).sum()
    dx, dh0, dc0, dw_hr = torch.autograd.grad(loss, (x, h0_, c0_, w_hr_))
    d = lambda t: t.double()  # noqa: E731
    _, _, _, gates, cs = vectorized.recurrence_forward(d(gx), d(w_hh), d(h0), d(c0), lengths, w_hr=d(w_hr))
    dh = vectorized.recurrence_backward(d(dout), d(dh_n), d(dc_n), d(w_hh), gates, cs, d(c0), lengths, w_hr=d(w_hr))[3]
    return dict(out=out.view(T, B, D, -1), h_n=h_n, c_n=c_n, gates=gates, cs=cs, dgates=dx.view(T, B, D, G),
                dh0=dh0, dc0=dc0, dh=dh, dw_hr=dw_hr)


def valid_steps(lengths, T, B):
    """[T, B, 1, 1] bool: t < lengths[b] (all True without lengths)."""
    if lengths is None:
        return torch.ones(T, B, 1, 1, dtype=torch.bool)
    return (torch.arange(T)[:, None] < lengths[None, :])[..., None, None]


def assert_close(name, actual, expected, dtype):
    assert not actual.isnan().any(), f"{name}: unwritten (NaN) elements"
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype], msg=lambda m: f"{name}: {m}")


def run(problem, cot, plan):
    out, h_n, c_n, gates, cs = tr.recurrence_forward(**problem, **plan)
    p = problem
    dgates, dh0, dc0, dh = tr.recurrence_backward(
        cot["dout"], cot["dh_n"], cot["dc_n"], p["w_hh"], gates, cs, p["c0"], p["lengths"], w_hr=p["w_hr"], **plan
    )
    return dict(out=out, h_n=h_n, c_n=c_n, gates=gates, cs=cs, dgates=dgates, dh0=dh0, dc0=dc0, dh=dh)


@pytest.mark.parametrize("shape, schedule", [pytest.param(s, n, id=f"{shape_id(s)}-{n}") for s, n in CASES])
def test_projection_matches_reference(shape, schedule):
    T, B, H, P, with_lengths, D, dtype = shape
    problem, cot = random_problem(*shape)
    ref = reference(**problem, **cot)
    got = run(problem, cot, SCHEDULES[schedule])
    sdtype = tr.state_dtype(dtype)
    assert got["out"].shape == (T, B, D, P) and got["h_n"].shape == got["dh0"].shape == (D, B, P)
    assert got["dh"].shape == (T, B, D, P) and got["cs"].shape == (T, B, D, H)
    assert got["dh"].dtype == dtype and got["cs"].dtype == got["dh0"].dtype == got["dc0"].dtype == sdtype
    valid = valid_steps(problem["lengths"], T, B)
    for name in ("out", "h_n", "c_n", "cs", "dgates", "dh0", "dc0", "dh"):
        assert_close(name, got[name], ref[name], dtype)
    # activated gates past a sequence's end are never read back: compare where they mean something
    assert_close("gates", got["gates"] * valid, ref["gates"] * valid, dtype)
    for name in ("out", "dgates", "dh"):
        assert torch.all(got[name].masked_select(~valid) == 0), f"{name} must be zero past each sequence's end"
    # what the caller makes of dh: W_hr's gradient, against autograd's
    r = projected_input(got["gates"], got["cs"], dtype)  # [T, B, D, H]
    dw_hr = torch.einsum("tbdp,tbdh->dph", got["dh"].double(), r.double())
    assert_close("dW_hr", dw_hr, ref["dw_hr"], dtype)


@pytest.mark.parametrize("schedule", ["tile", "stepwise"])
def test_projection_without_saving_gives_the_same_outputs(schedule):
    """save=False (inference) only drops the gates/cs stores: bit-for-bit the same outputs."""
    problem, _ = random_problem(4, 3, 20, 17, True, 2, torch.float32)
    saved = tr.recurrence_forward(**problem, **SCHEDULES[schedule])
    out, h_n, c_n, gates, cs = tr.recurrence_forward(**problem, save=False, **SCHEDULES[schedule])
    assert gates is None and cs is None
    for name, a, b in zip(("out", "h_n", "c_n"), saved, (out, h_n, c_n)):
        assert torch.equal(a, b), name  # NaN-poisoned buffers: an unwritten element fails too


def test_projection_wider_than_hidden_is_refused():
    problem, _ = random_problem(2, 1, 8, 8, False, 1, torch.float32)
    problem["w_hr"] = torch.randn(1, 20, 8)
    problem["w_hh"], problem["h0"] = torch.randn(1, 32, 20), torch.randn(1, 1, 20)
    with pytest.raises(ValueError, match="proj_size <= hidden_size"):
        tr.recurrence_forward(**problem)


@pytest.mark.slow
def test_persistent_projection_with_concurrent_programs(monkeypatch):
    """Two programs per group, each in its own thread with delayed stores and skew: the r and
    dh exchanges between a step's two stages must be published by the barrier between them.
    Bit for bit the stepwise schedule's results (same stage bodies, one launch per stage)."""
    shape = (5, 3, 20, 17, True, 2, torch.float64)
    problem, cot = random_problem(*shape)
    hp = tr._pow2_at_least(20)
    persistent, stepwise = (tr.Plan(s, 16, 16, hp, True, 16, num_warps=8) for s in ("persistent", "stepwise"))
    monkeypatch.setattr(tr, "_plan", lambda *a, **k: stepwise)
    want = run(problem, cot, {})
    monkeypatch.setattr(tr, "_plan", lambda *a, **k: persistent)
    with concurrent_programs(timeout=120, delay_stores=True, skew=0.002) as launch:
        got = run(problem, cot, {})
    assert launch.launches == 2 and launch.max_programs == math.prod(persistent.grid(3, 2)) == 4
    for name, value in want.items():
        assert torch.equal(got[name], value), f"{name}: differs from the stepwise schedule"


# --- end to end: FastBiLSTM(proj_size=...) on the Triton backend against nn.LSTM ----------------

@pytest.mark.slow
@pytest.mark.parametrize("dtype, packed", [(torch.float64, True), (torch.float32, False)], ids=["fp64-packed", "fp32"])
def test_module_with_projection_matches_nn_lstm(dtype, packed, monkeypatch):
    T, B, I, H, P = 6, 3, 5, 12, 5
    calls = []
    real = tr.recurrence_forward
    monkeypatch.setattr(tr, "recurrence_forward", lambda *a, **k: calls.append(k.get("w_hr")) or real(*a, **k))
    torch.manual_seed(0)
    lstm = nn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=P, dtype=dtype)
    fast = FastBiLSTM.from_lstm(lstm, backend="triton", copy=True)
    x = torch.randn(T, B, I, dtype=dtype)
    h0, c0 = torch.randn(4, B, P, dtype=dtype), torch.randn(4, B, H, dtype=dtype)
    lengths = torch.tensor([4, 6, 1])

    def run_model(model):
        xs, hs = x.clone().requires_grad_(), (h0.clone().requires_grad_(), c0.clone().requires_grad_())
        inp = pack_padded_sequence(xs, lengths, enforce_sorted=False) if packed else xs
        return forward_backward(model, inp, hs, leaves=[xs, *hs])

    names = ["out", "h_n", "c_n", "dx", "dh0", "dc0"] + [f"d{n}" for n, _ in lstm.named_parameters()]
    got = run_model(fast)
    # both layers went through the Triton kernels with their projection, not the vectorized fallback
    assert len(calls) == 2 and all(w_hr is not None and w_hr.shape == (2, P, H) for w_hr in calls)
    # nn.LSTM's own fp32 error counts here too: both sides are a few ulps from exact
    tolerance = TOL[dtype]
    for name, a, b in zip(names, got, run_model(lstm)):
        torch.testing.assert_close(a, b, **tolerance, msg=lambda m: f"{name}: {m}")
