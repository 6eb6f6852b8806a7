"""CUDA parity suite for the Triton backend: FastBiLSTM(backend="triton") against nn.LSTM (cuDNN).

Skipped without a GPU. Strict IEEE fp32 on both sides unless a test says otherwise: cuDNN's
TF32 switch and cuBLAS's are off, so the Triton dots are IEEE too. Both implementations are
measured against float64 nn.LSTM (CPU) on the same rounded weights and inputs, by the
norm-relative error of every output and gradient, err = ||got - exact|| / ||exact||.

Bound: err_triton <= max(2 * err_cudnn, FLOOR[dtype]): as accurate as cuDNN in the same dtype up
to a factor of two, and never worse than the floor: 1e-5 for fp32 (the project's fp32 bar),
2 ulps at 1.0 for fp16 (2 * 9.8e-4) and bf16 (2 * 7.8e-3), whose h, gates and gx are rounded
at every step on both sides.
"""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

pytestmark = pytest.mark.cuda
if not torch.cuda.is_available():
    pytest.skip("CUDA parity suite: needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from bilstm_fast import FastBiLSTM  # noqa: E402
from bilstm_fast.kernels import triton_recurrence as tr  # noqa: E402
from bilstm_fast.kernels import vectorized  # noqa: E402

if tr.INTERPRET:
    pytest.skip("TRITON_INTERPRET=1: the CUDA suite needs compiled kernels", allow_module_level=True)

CUDA = torch.device("cuda")
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture(autouse=True)
def strict_ieee():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# (T, B, I, H, layers, dtype, packed, forced plan or None for the planner's own choice)
CASES = [
    (17, 3, 5, 50, 1, torch.float32, False, None),  # tile, W resident, odd sizes
    (17, 3, 5, 50, 2, torch.float32, True, None),
    (33, 8, 16, 100, 1, torch.float32, True, None),  # tile, W streamed (HP = 128)
    (33, 8, 16, 100, 1, torch.float32, True, dict(schedule="persistent", block_n=16)),  # 8 programs/group
    (20, 5, 7, 100, 1, torch.float32, True, dict(schedule="stepwise", block_n=16, resident=True)),
    (20, 5, 7, 100, 1, torch.float32, False, dict(schedule="stepwise", block_n=32, resident=False)),
    (40, 16, 32, 256, 1, torch.float32, True, None),  # IEEE fp32 slice too big on chip: stepwise
    (40, 16, 32, 256, 2, torch.float16, True, None),  # persistent, 16 programs per group
    (40, 16, 32, 256, 1, torch.bfloat16, True, None),
    (25, 40, 10, 300, 1, torch.float16, True, None),  # 132 SMs: persistent, 2 batch tiles, H padded to 512
    (25, 70, 10, 300, 1, torch.float16, True, None),  # 3 batch tiles: W slice too big, stepwise fallback
    (25, 70, 10, 300, 1, torch.bfloat16, False, dict(schedule="stepwise", block_n=16, resident=False)),
    (10, 1100, 8, 300, 1, torch.float16, True, None),  # many batch tiles: tile with W streamed
    (9, 1, 3, 20, 1, torch.float16, False, None),  # tile, B = 1
    (9, 1, 3, 20, 1, torch.bfloat16, True, dict(schedule="tile", block_n=16, resident=False)),
]


def case_id(case):
    T, B, I, H, layers, dtype, packed, plan = case
    tag = f"T{T}-B{B}-I{I}-H{H}-L{layers}-{NAMES[dtype]}" + ("-packed" if packed else "")
    if plan is None:
        return tag + "-auto"
    return tag + "-" + "-".join(f"{v}" for v in plan.values())


def random_lengths(T, B):
    """Drawn per B (seeded), unsorted, including T and 1."""
    g = torch.Generator().manual_seed(B)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    lengths[-1] = 1 if B > 1 else T
    return lengths


def run(model, x, h0, c0, lengths, dtype):
    """out, h_n, c_n and the gradients of a fixed loss w.r.t. x, h0, c0 and every parameter."""
    xs = x.clone().requires_grad_()
    hs = (h0.clone().requires_grad_(), c0.clone().requires_grad_())
    inp = pack_padded_sequence(xs, lengths, enforce_sorted=False) if lengths is not None else xs
    out, (h_n, c_n) = model(inp, hs)
    if lengths is not None:
        out, _ = pad_packed_sequence(out)
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out).to(out.dtype)
    loss = (out * weights).float().sum() + (h_n * 0.5).float().sum() + (c_n * c_n).float().sum()
    grads = torch.autograd.grad(loss, [xs, *hs, *model.parameters()])
    return [t.detach() for t in (out, h_n, c_n, *grads)]


def rel_err(got, exact):
    got, exact = got.double().cpu(), exact.double().cpu()
    return ((got - exact).norm() / exact.norm().clamp_min(1e-30)).item()


def problem(T, B, I, H, layers, dtype, packed, seed=0, proj_size=0):
    torch.manual_seed(seed)
    lstm = nn.LSTM(I, H, num_layers=layers, bidirectional=True, proj_size=proj_size, device=CUDA, dtype=dtype)
    x = torch.randn(T, B, I, device=CUDA, dtype=dtype)
    h0 = torch.randn(2 * layers, B, proj_size or H, device=CUDA, dtype=dtype)
    c0 = torch.randn(2 * layers, B, H, device=CUDA, dtype=dtype)
    return lstm, (x, h0, c0, random_lengths(T, B) if packed else None)


def exact_run(lstm, args):
    """float64 nn.LSTM on the CPU with the very same (rounded) weights and inputs."""
    ref = nn.LSTM(lstm.input_size, lstm.hidden_size, lstm.num_layers, bidirectional=True, proj_size=lstm.proj_size,
                  dtype=torch.float64)
    ref.load_state_dict({k: v.double().cpu() for k, v in lstm.state_dict().items()})
    x, h0, c0, lengths = args
    return run(ref, x.double().cpu(), h0.double().cpu(), c0.double().cpu(), lengths, torch.float64)


def names_of(lstm):
    return ["out", "h_n", "c_n", "dx", "dh0", "dc0"] + [f"d{n}" for n, _ in lstm.named_parameters()]


def cudnn_run(lstm, args, dtype):
    try:
        return run(lstm, *args, dtype)
    except RuntimeError as e:  # cuDNN builds without a bf16 LSTM: the floor alone bounds the error
        if dtype != torch.bfloat16:
            raise
        print(f"cuDNN {NAMES[dtype]} LSTM unavailable ({e}); bounding by the floor only")
        return None


def check_parity(case, proj_size=0):
    T, B, I, H, layers, dtype, packed, plan = case
    lstm, args = problem(T, B, I, H, layers, dtype, packed, proj_size=proj_size)
    fast = FastBiLSTM.from_lstm(lstm, backend="triton", copy=True)
    calls = []
    real = tr.recurrence_forward
    with tr.forced_plan(**(plan or {})), pytest.MonkeyPatch.context() as mp:
        # the layers must run on the Triton kernels (ops.py sends a projection elsewhere when a
        # backend lacks it)
        mp.setattr(tr, "recurrence_forward", lambda *a, **k: calls.append(k.get("w_hr")) or real(*a, **k))
        got = run(fast, *args, dtype)
    assert len(calls) == layers and all((w is not None) == (proj_size > 0) for w in calls)
    cudnn = cudnn_run(lstm, args, dtype)
    exact = exact_run(lstm, args)
    report = []
    for k, name in enumerate(names_of(lstm)):
        assert got[k].dtype == dtype and torch.isfinite(got[k]).all(), name
        err = rel_err(got[k], exact[k])
        err_cudnn = None if cudnn is None else rel_err(cudnn[k], exact[k])
        bound = FLOOR[dtype] if err_cudnn is None else max(2 * err_cudnn, FLOOR[dtype])
        report.append(f"{name}: triton {err:.1e} cudnn {err_cudnn if err_cudnn is None else f'{err_cudnn:.1e}'}")
        assert err <= bound, f"{name}: error {err:.2e} > bound {bound:.2e}\n" + "\n".join(report)
    print("\n".join(report))
    if dtype == torch.float32 and cudnn is not None:  # and element by element, as on the CPU
        for k, name in enumerate(names_of(lstm)[:3]):
            torch.testing.assert_close(got[k], cudnn[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    if packed:  # nothing written past a sequence's end
        out = got[0].view(T, B, 2, proj_size or H)
        for b, n in enumerate(args[3].tolist()):
            assert torch.all(out[n:, b] == 0)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_parity_with_cudnn(case):
    check_parity(case)


# LSTM with projection (proj_size P): (case as CASES, P). The persistent schedule with several
# programs per group meets twice per step there (o * tanh(c), then h = r @ W_hr^T): the
# interpreter runs it only in threads (tests/test_triton_projection.py), this is the real barrier.
PROJ_CASES = [
    ((17, 3, 5, 50, 2, torch.float32, True, None), 20),  # tile, W resident
    ((33, 8, 16, 100, 1, torch.float32, True, dict(schedule="persistent", block_n=16)), 40),  # 8 programs/group
    ((20, 5, 7, 100, 1, torch.float32, False, dict(schedule="stepwise", block_n=16, resident=True)), 30),
    ((40, 16, 32, 256, 2, torch.float16, True, None), 64),  # persistent, 16 programs per group
    ((25, 70, 10, 300, 1, torch.bfloat16, True, None), 100),  # stepwise, W streamed
]


@pytest.mark.parametrize("case, proj_size", PROJ_CASES, ids=[f"proj{P}-{case_id(c)}" for c, P in PROJ_CASES])
def test_projection_parity_with_cudnn(case, proj_size):
    check_parity(case, proj_size)


DETERMINISM = [
    pytest.param(dict(schedule="tile"), 50, torch.float32, id="tile-H50-fp32"),
    pytest.param(dict(schedule="persistent", block_n=16), 100, torch.float32, id="persistent-H100-fp32"),
    pytest.param(dict(schedule="persistent", block_n=16), 256, torch.float16, id="persistent-H256-fp16"),
    pytest.param(dict(schedule="stepwise", block_n=16, resident=False), 256, torch.bfloat16, id="stepwise-H256-bf16"),
]


@pytest.mark.parametrize("plan, H, dtype", DETERMINISM)
def test_repeated_runs_are_bitwise_identical(plan, H, dtype):
    lstm, args = problem(31, 9, 8, H, 1, dtype, packed=True, seed=3)
    fast = FastBiLSTM.from_lstm(lstm, backend="triton", copy=True)
    with tr.forced_plan(**plan):
        first = run(fast, *args, dtype)
        for _ in range(3):
            again = run(fast, *args, dtype)
            for name, a, b in zip(names_of(lstm), first, again):
                assert torch.equal(a, b), f"{name} differs between identical runs"


def test_tf32_switch_is_followed():
    """With cuDNN's TF32 switch on, fp32 dots are TF32: results move off the IEEE ones, by
    about what cuDNN's own TF32 LSTM moves (TF32 keeps 10 mantissa bits: 2 ulps = 2e-3)."""
    lstm, args = problem(40, 16, 32, 256, 1, torch.float32, packed=True)
    fast = FastBiLSTM.from_lstm(lstm, backend="triton", copy=True)
    ieee = run(fast, *args, torch.float32)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        assert tr.dot_precision(torch.float32, CUDA) == "tf32"
        tf32 = run(fast, *args, torch.float32)
        cudnn = run(lstm, *args, torch.float32)
    exact = exact_run(lstm, args)
    assert not torch.equal(tf32[0], ieee[0]), "TF32 switch on, but the dots stayed IEEE"
    for k, name in enumerate(names_of(lstm)):
        bound = max(2 * rel_err(cudnn[k], exact[k]), 2e-3)
        assert rel_err(tf32[k], exact[k]) <= bound, name


# --- offsets past 2**31 elements: [T, B, D, 4H] with T*B*D*4H > 2**31 ------------------------
# These check addressing: a wrong offset reads another row's or step's data, an O(1) error. The
# comparison is with the vectorized path in fp32 on the same fp16-rounded inputs, norm-relative,
# bounded by 1e-2 (five fp16 ulps: fp16 rounding of h at each of up to 64-256 steps).

H_LARGE, D_LARGE = 16, 2


def large_problem(T, B):
    g = torch.Generator(device=CUDA).manual_seed(0)
    H, D, dtype = H_LARGE, D_LARGE, torch.float16
    assert T * B * D * 4 * H > 2**31
    p = dict(
        gx=torch.randn(T, B, D, 4 * H, device=CUDA, dtype=dtype, generator=g),
        w_hh=(torch.randn(D, 4 * H, H, device=CUDA, generator=g) * 0.3).to(dtype),
        h0=torch.randn(D, B, H, device=CUDA, dtype=dtype, generator=g),
        c0=torch.randn(D, B, H, device=CUDA, dtype=dtype, generator=g),
        lengths=torch.randint(1, T + 1, (B,), device=CUDA, generator=g),
    )
    p["lengths"][0] = p["lengths"][-1] = T  # the largest offsets belong to full-length rows
    return p


def assert_rel(name, got, want, bound=1e-2):
    err = rel_err(got, want)
    assert err <= bound, f"{name}: norm-relative error {err:.2e} > {bound:.0e}"


def test_offsets_beyond_int32_many_sequences():
    T, B = 64, 2**18 + 7  # tile schedule, 16,385 batch tiles
    p = large_problem(T, B)
    out, h_n, c_n, gates, cs = tr.recurrence_forward(**p)
    dout = torch.randn_like(out)
    dgates, dh0, dc0 = tr.recurrence_backward(dout, p["h0"], p["c0"], p["w_hh"], gates, cs, p["c0"], p["lengths"])
    rows = torch.tensor([0, 1, B - 2, B - 1], device=CUDA)  # rows are independent: check a few, last included

    def pick(t, dim=1):
        return t.index_select(dim, rows).float()

    ref = vectorized.recurrence_forward(pick(p["gx"]), p["w_hh"].float(), pick(p["h0"]), pick(p["c0"]),
                                        p["lengths"][rows])
    valid = (torch.arange(T, device=CUDA)[:, None] < p["lengths"][rows][None, :])[..., None, None]
    for name, got, want, dim in [("out", out, ref[0], 1), ("h_n", h_n, ref[1], 1), ("c_n", c_n, ref[2], 1),
                                 ("cs", cs, ref[4], 1)]:
        assert_rel(name, pick(got, dim), want)
    assert_rel("gates", pick(gates) * valid, ref[3] * valid)
    ref_b = vectorized.recurrence_backward(
        pick(dout), pick(p["h0"]), pick(p["c0"]), p["w_hh"].float(), ref[3], ref[4], pick(p["c0"]), p["lengths"][rows]
    )
    for name, got, want in [("dgates", dgates, ref_b[0]), ("dh0", dh0, ref_b[1]), ("dc0", dc0, ref_b[2])]:
        assert_rel(name, pick(got), want)


def test_offsets_beyond_int32_long_sequence():
    """One long batch on the persistent schedule. The Python loop of the vectorized path cannot
    walk 2**18 steps, so the last W steps (the largest offsets) are checked from the kernel's own
    state at t0 - 1: the forward direction restarts there; the reverse direction starts at T - 1
    from h0 anyway; and going back, the forward direction's gradient starts at T - 1."""
    T, B, W = 2**18 + 1, 64, 256
    p = large_problem(T, B)
    with tr.forced_plan("persistent"):
        out, h_n, c_n, gates, cs = tr.recurrence_forward(**p)
        dout = torch.randn_like(out)
        dgates, _, _ = tr.recurrence_backward(dout, p["h0"], p["c0"], p["w_hh"], gates, cs, p["c0"], p["lengths"])
    rows, t0 = torch.tensor([0, B - 1], device=CUDA), T - W  # both rows have length T

    def window(t):
        return t[t0:].index_select(1, rows).float()

    h_start = torch.stack([out[t0 - 1, rows, 0], p["h0"][1, rows]]).float()
    c_start = torch.stack([cs[t0 - 1, rows, 0], p["c0"][1, rows].float()])
    ref = vectorized.recurrence_forward(window(p["gx"]), p["w_hh"].float(), h_start, c_start, None)
    assert_rel("out", window(out), ref[0])
    assert_rel("gates", window(gates), ref[3])
    assert_rel("cs", window(cs), ref[4])
    assert_rel("h_n reverse", h_n[1, rows], out[0, rows, 1])  # the reverse direction's last step is t = 0
    ref_b = vectorized.recurrence_backward(
        window(dout)[:, :, :1], p["h0"][:1, rows].float(), p["c0"][:1, rows].float(), p["w_hh"][:1].float(),
        window(gates)[:, :, :1], window(cs)[:, :, :1], cs[t0 - 1, rows, 0][None].float(), None,
    )
    assert_rel("dgates forward direction", window(dgates)[:, :, :1], ref_b[0])
