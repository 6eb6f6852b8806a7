"""Triton recurrence kernels against the float64 loop reference, on CPU under TRITON_INTERPRET=1.

triton.jit decides between compiling and interpreting when a kernel is defined, so the variable
is set here before triton_recurrence is imported. Should another test module have imported it
first without the variable, the module is reloaded so its kernels are interpreted (it calls no
@jit helper of triton.language, which would stay compiled). A subprocess per test would isolate
this too, at several seconds of start-up each. With CUDA the variable is left alone and the
same tests run compiled on the GPU (TF32 off).

The interpreter runs program instances one after another, so a multi-program grid barrier
would deadlock: the persistent schedule runs here with one program per group; its step body and
the cross-program h exchange are covered by the stepwise schedule (one launch per step).
"""
import importlib
import math
import os

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is set to something else", allow_module_level=True)
pytest.importorskip("triton")

from bilstm_fast import FastBiLSTM  # noqa: E402
from bilstm_fast.kernels import triton_recurrence as tr  # noqa: E402
from bilstm_fast.kernels import vectorized  # noqa: E402
from bilstm_fast.kernels.reference import lstm_layer_reference  # noqa: E402
from helpers import forward_backward, tol  # noqa: E402

if not torch.cuda.is_available() and not tr.INTERPRET:
    tr = importlib.reload(tr)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Tolerances against the float64 reference fed the same rounded inputs: helpers.BACKEND_TOL["triton"]
# (fp32 1e-5, fp16 5e-3, fp64 rtol 1e-10/atol 1e-12; why, beside the table).
TOL = {dtype: tol(dtype, "triton") for dtype in (torch.float32, torch.float16, torch.float64)}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.float64: "fp64"}

# Every schedule that runs off-GPU, as (name, forced plan arguments). block_n=16 with H=20
# (padded to 32) gives two chunk programs (stepwise) or two chunks walked by one program (tile).
SCHEDULES = {
    "tile": dict(schedule="tile"),
    "tile-stream": dict(schedule="tile", block_n=16, resident=False),
    "stepwise": dict(schedule="stepwise", block_n=16, resident=True),
    "stepwise-stream": dict(schedule="stepwise", block_n=16, resident=False),
    "persistent": dict(schedule="persistent"),
}

# Shapes from an L8 orthogonal array over (T, B, H, lengths, D, dtype): every pair of levels
# of any two factors appears in two rows, in 8 rows instead of 64.
SHAPES = [  # (T, B, H, with_lengths, D, dtype)
    (1, 1, 8, False, 1, torch.float32),
    (1, 1, 8, True, 2, torch.float16),
    (1, 3, 20, False, 1, torch.float16),
    (1, 3, 20, True, 2, torch.float32),
    (5, 1, 20, False, 2, torch.float32),
    (5, 1, 20, True, 1, torch.float16),
    (5, 3, 8, False, 2, torch.float16),
    (5, 3, 8, True, 1, torch.float32),
]
# an even T (the ping-pong buffers end on the other half), and fp64, which checks the
# kernels' formulas to 1e-10 apart from any fp32/fp16 rounding
EXTRA_SHAPES = [
    (6, 3, 20, True, 2, torch.float32),
    (6, 3, 20, True, 2, torch.float64),
    (5, 1, 8, False, 1, torch.float64),
]


def fixed_lengths(T, B):
    """The same lengths every time: unsorted, with a full-length and (where T allows) a one-step sequence."""
    if T == 1:
        return torch.tensor([1] * B)
    return torch.tensor({1: [T - 2], 3: [2, T, 1]}[B])


def shape_id(shape):
    T, B, H, with_lengths, D, dtype = shape
    return f"T{T}-B{B}-H{H}-D{D}-{DTYPE_NAMES[dtype]}" + ("-len" if with_lengths else "")


# The larger shapes take 2-6 s a case in the interpreter on a 2-core CPU: marked slow, so the
# inner loop (-m "not slow") keeps the small ones and the full suite runs all.
SLOW_SHAPES = EXTRA_SHAPES + SHAPES[4:7]

CASES = [
    pytest.param(shape, name, id=f"{shape_id(shape)}-{name}", marks=[pytest.mark.slow] * (shape in SLOW_SHAPES))
    for shape in SHAPES + EXTRA_SHAPES
    for name in SCHEDULES
]


@pytest.fixture(autouse=True)
def ieee_fp32():
    """On a GPU the tolerances below are for IEEE fp32 dots: keep cuDNN's TF32 switch off."""
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yield


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Output buffers start as NaN, so an element a kernel fails to write fails the test."""

    def nan_empty(like, *shape, dtype=None):
        return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)

    monkeypatch.setattr(tr, "_empty", nan_empty)


def reference(gx, w_hh, h0, c0, lengths, dout, dh_n, dc_n):
    """Float64 loop reference fed exactly gx: x is gx itself and w_ih[d] picks direction d's
    columns, so its input projection is exact and x.grad is dgates."""
    T, B, D, G = gx.shape
    x = gx.double().reshape(T, B, D * G).clone().requires_grad_()
    select = torch.eye(D * G, dtype=torch.float64, device=gx.device).view(D, G, D * G)
    h0_, c0_ = h0.double().clone().requires_grad_(), c0.double().clone().requires_grad_()
    lens = None if lengths is None else lengths.tolist()
    out, h_n, c_n = lstm_layer_reference(x, select, w_hh.double(), None, h0_, c0_, lens)
    loss = (out * dout.double().reshape(T, B, -1)).sum() + (h_n * dh_n.double()).sum() + (c_n * dc_n.double()).sum()
    dx, dh0, dc0 = torch.autograd.grad(loss, (x, h0_, c0_))
    # the saved buffers (gates, cs) come from the vectorized path in float64
    _, _, _, gates, cs = vectorized.recurrence_forward(gx.double(), w_hh.double(), h0.double(), c0.double(), lengths)
    return dict(out=out.view(T, B, D, -1), h_n=h_n, c_n=c_n, gates=gates, cs=cs, dgates=dx.view(T, B, D, G),
                dh0=dh0, dc0=dc0)


def random_problem(T, B, H, with_lengths, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)

    problem = dict(
        gx=rand(T, B, D, 4 * H),
        w_hh=rand(D, 4 * H, H, scale=0.5),
        h0=rand(D, B, H),
        c0=rand(D, B, H),
        lengths=fixed_lengths(T, B).to(DEVICE) if with_lengths else None,
    )
    cotangents = dict(dout=rand(T, B, D, H), dh_n=rand(D, B, H), dc_n=rand(D, B, H))
    return problem, cotangents


def valid_steps(lengths, T, B):
    """[T, B, 1, 1] bool on DEVICE: t < lengths[b] (all True without lengths), to mask [T, B, D, F] results."""
    if lengths is None:
        return torch.ones(T, B, 1, 1, dtype=torch.bool, device=DEVICE)
    return (torch.arange(T, device=DEVICE)[:, None] < lengths[None, :])[..., None, None]


def assert_close(name, actual, expected, dtype):
    assert actual.device == DEVICE and not actual.isnan().any(), f"{name}: unwritten (NaN) elements"
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), **TOL[dtype],
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.interpreter
@pytest.mark.parametrize("shape, schedule", CASES)
def test_forward_backward_match_reference(shape, schedule):
    T, B, H, with_lengths, D, dtype = shape
    problem, cot = random_problem(*shape)
    ref = reference(**problem, **cot)
    plan = SCHEDULES[schedule]

    out, h_n, c_n, gates, cs = tr.recurrence_forward(**problem, **plan)
    assert out.dtype == h_n.dtype == c_n.dtype == gates.dtype == dtype
    assert cs.dtype == tr.state_dtype(dtype)
    valid = valid_steps(problem["lengths"], T, B)
    assert_close("out", out, ref["out"], dtype)
    assert torch.all(out.masked_select(~valid) == 0), "out must be zero past each sequence's end"
    assert_close("h_n", h_n, ref["h_n"], dtype)
    assert_close("c_n", c_n, ref["c_n"], dtype)
    # activated gates past a sequence's end are never read back: compare where they mean something
    assert not gates.isnan().any(), "gates: unwritten (NaN) elements"
    assert_close("gates", gates * valid, ref["gates"] * valid, dtype)
    assert_close("cs", cs, ref["cs"], dtype)  # incl. the carried state past each end

    dgates, dh0, dc0 = tr.recurrence_backward(
        cot["dout"], cot["dh_n"], cot["dc_n"], problem["w_hh"], gates, cs, problem["c0"], problem["lengths"], **plan
    )
    assert dgates.dtype == dtype and dh0.dtype == dc0.dtype == tr.state_dtype(dtype)
    assert_close("dgates", dgates, ref["dgates"], dtype)
    assert torch.all(dgates.masked_select(~valid) == 0), "dgates must be zero past each sequence's end"
    assert_close("dh0", dh0, ref["dh0"], dtype)
    assert_close("dc0", dc0, ref["dc0"], dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", [pytest.param(EXTRA_SHAPES[0], marks=pytest.mark.slow), SHAPES[6]], ids=shape_id)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_forward_without_saving_gives_the_same_outputs(shape, schedule):
    """save=False (inference) only drops the gates/cs stores: bit-for-bit the same outputs."""
    problem, _ = random_problem(*shape)
    saved = tr.recurrence_forward(**problem, **SCHEDULES[schedule])
    out, h_n, c_n, gates, cs = tr.recurrence_forward(**problem, save=False, **SCHEDULES[schedule])
    assert gates is None and cs is None
    for name, a, b in zip(("out", "h_n", "c_n"), saved, (out, h_n, c_n)):
        assert torch.equal(a, b), name  # NaN-poisoned buffers: an unwritten element fails too


# --- end to end: FastBiLSTM on the Triton backend against nn.LSTM ------------------------------

E2E = [  # (dtype, packed, tolerances)
    pytest.param(torch.float64, False, TOL[torch.float64], id="T7-B3-I5-H12-L2-fp64"),
    pytest.param(torch.float64, True, TOL[torch.float64], id="T7-B3-I5-H12-L2-fp64-packed"),
    # nn.LSTM's own fp32 error counts here too: both sides are a few ulps from exact
    pytest.param(torch.float32, True, dict(rtol=1e-5, atol=1e-5), id="T7-B3-I5-H12-L2-fp32-packed"),
]


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype, packed, tolerance", E2E)
def test_module_matches_nn_lstm(dtype, packed, tolerance):
    T, B, I, H = 7, 3, 5, 12
    torch.manual_seed(0)
    lstm = nn.LSTM(I, H, num_layers=2, bidirectional=True, dtype=dtype, device=DEVICE)
    fast = FastBiLSTM.from_lstm(lstm, backend="triton")
    x = torch.randn(T, B, I, dtype=dtype, device=DEVICE)
    h0 = torch.randn(4, B, H, dtype=dtype, device=DEVICE)
    c0 = torch.randn(4, B, H, dtype=dtype, device=DEVICE)
    lengths = torch.tensor([4, 7, 1])

    def run(model):
        xs, hs = x.clone().requires_grad_(), (h0.clone().requires_grad_(), c0.clone().requires_grad_())
        inp = pack_padded_sequence(xs, lengths, enforce_sorted=False) if packed else xs
        return forward_backward(model, inp, hs, leaves=[xs, *hs])

    names = ["out", "h_n", "c_n", "dx", "dh0", "dc0"] + [f"d{n}" for n, _ in lstm.named_parameters()]
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for name, got, want in zip(names, run(fast), run(lstm)):
            torch.testing.assert_close(got, want, **tolerance, msg=lambda m: f"{name}: {m}")


# --- schedule choice and precision switch ----------------------------------------------------

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "H, schedule, block_n, resident",
    # fp32 off a GPU dots in IEEE (FMA): W resident only up to HP = 32 (64 spilled on sm_90)
    [(8, "tile", 16, True), (20, "tile", 32, True), (64, "tile", 32, False), (100, "tile", 32, False)],
    ids=["H8", "H20", "H64", "H100"],
)
def test_plan_tile_by_hidden_size(H, schedule, block_n, resident):
    plan = tr.plan_schedule(3, 2, H, torch.float32, CPU)
    assert (plan.schedule, plan.block_b, plan.block_n, plan.resident) == (schedule, 16, block_n, resident)
    assert plan.grid(3, 2) == (1, 1, 2) and plan.chunks_per_program == plan.hp // block_n


def test_plan_large_hidden_off_gpu_is_one_program_per_group():
    plan = tr.plan_schedule(70, 2, 300, torch.float16, CPU)
    assert (plan.schedule, plan.hp, plan.block_n, plan.block_b) == ("persistent", 512, 512, 32)
    assert plan.grid(70, 2) == (3, 1, 2)


GPU_PLANS = [  # (B, H, dtype, tf32) -> (schedule, block_b, block_n, resident) on a 132-SM GPU
    ((16, 256, torch.float16, False), ("persistent", 16, 16, True)),  # 2 x 16 programs, 32 KiB slices
    ((64, 512, torch.float16, False), ("persistent", 32, 16, True)),  # 2 batch tiles x 2 x 32 programs
    ((70, 300, torch.bfloat16, False), ("stepwise", 32, 32, False)),  # 3 tiles need 32-wide chunks: 128 KiB
    ((16, 1024, torch.float16, False), ("stepwise", 16, 32, False)),  # 128 KiB slice: off chip
    ((4096, 1024, torch.float16, False), ("tile", 16, 32, False)),  # 2 x 256 tiles fill the GPU alone
    ((16, 256, torch.float32, True), ("persistent", 16, 16, True)),  # TF32: tensor cores, 64 KiB
    ((16, 256, torch.float32, False), ("stepwise", 16, 16, False)),  # IEEE fp32 runs on FMA units: 16-wide chunks
    ((16, 100, torch.float32, False), ("tile", 16, 32, False)),
]


def gpu_plan_id(args):
    B, H, dtype, tf32 = args
    return f"B{B}-H{H}-{DTYPE_NAMES.get(dtype, 'bf16')}" + ("-tf32" if tf32 else "")


@pytest.mark.parametrize("args, expected", [pytest.param(a, e, id=gpu_plan_id(a)) for a, e in GPU_PLANS])
def test_plan_on_a_132_sm_gpu(args, expected):
    """The planner's GPU branch is plain Python: check its choices for a 132-SM GPU."""
    B, H, dtype, tf32 = args
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32):
        plan = tr.plan_schedule(B, 2, H, dtype, torch.device("cuda"), sm_count=132)
    assert (plan.schedule, plan.block_b, plan.block_n, plan.resident) == expected
    if plan.schedule == "persistent":
        assert math.prod(plan.grid(B, 2)) <= 132


def test_plan_rejects_what_cannot_run():
    with pytest.raises(ValueError, match="one program per group"):
        tr.plan_schedule(3, 2, 20, torch.float32, CPU, schedule="persistent", block_n=16)
    with pytest.raises(ValueError, match="block_n must equal"):
        tr.plan_schedule(3, 2, 100, torch.float32, CPU, schedule="tile", resident=True)
    with pytest.raises(ValueError, match="power of two"):
        tr.plan_schedule(3, 2, 20, torch.float32, CPU, block_n=24)
    with pytest.raises(ValueError, match="persistent schedule always"):
        tr.plan_schedule(3, 2, 20, torch.float32, CPU, schedule="persistent", resident=False)


def test_on_chip_budget_depends_on_the_dot():
    # 4 * 256 * 16 = 16K elements: 32 KiB of fp16 fits tensor-core dots, but IEEE fp32 (FMA) does not
    assert tr._slice_fits(256, 16, torch.float16, "ieee")
    assert tr._slice_fits(256, 16, torch.float32, "tf32")
    assert not tr._slice_fits(256, 16, torch.float32, "ieee")
    assert not tr._slice_fits(1024, 16, torch.float16, "ieee")  # 128 KiB


@pytest.mark.interpreter
def test_forced_plan_applies_inside_the_block_only(monkeypatch):
    seen = []
    real = tr.plan_schedule
    monkeypatch.setattr(tr, "plan_schedule", lambda *a, **k: seen.append(k) or real(*a, **k))
    problem, _ = random_problem(2, 1, 8, False, 2, torch.float32)
    with tr.forced_plan("stepwise", block_n=16):
        tr.recurrence_forward(**problem)
    tr.recurrence_forward(**problem)
    assert seen == [dict(schedule="stepwise", block_n=16, resident=None),
                    dict(schedule=None, block_n=None, resident=None)]


def test_fp32_dot_precision_follows_cudnn_rnn_tf32_switch():
    cuda = torch.device("cuda")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        assert tr.rnn_allows_tf32() and tr.dot_precision(torch.float32, cuda) == "tf32"
        assert tr.dot_precision(torch.float16, cuda) == "ieee" and tr.dot_precision(torch.float32, CPU) == "ieee"
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        assert not tr.rnn_allows_tf32() and tr.dot_precision(torch.float32, cuda) == "ieee"
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is not None and hasattr(rnn, "fp32_precision"):  # torch's newer per-op setting wins
        saved = rnn.fp32_precision
        try:
            rnn.fp32_precision = "ieee"
            assert not tr.rnn_allows_tf32()
            rnn.fp32_precision = "tf32"
            assert tr.rnn_allows_tf32()
        finally:
            rnn.fp32_precision = saved


# The kernels compile for sm_80 and sm_90 (no GPU needed): tests/test_compile_matrix.py.
