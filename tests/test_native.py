"""The native CPU backend (kernels/native.py, kernels/csrc/): what the
shared suites do not cover. Parity with nn.LSTM, float64 gradcheck, the robustness and property
tests and the contract test run it through the `backend` fixture (available_backends lists it
where it is built). Here: the recurrence against the float64 vectorized one, the carried cell
state, auto's choice, the build flags, torch.compile, repeatability and the batch-split schedule,
and the fallback when the extension is missing or fails to compile (these two run everywhere).
The projection (proj_size, `w_hr`) has its own file, test_native_projection.py.

Tolerances as in test_parity.py: fp32 rtol 1e-5 / atol 1e-6 (a few ulps: the native fp32
activations are polynomial approximations: tanh within 0.26 ulp on average and 1.3 at most over
[-8, 8], against torch's 0.56; the GEMMs round as MKL does), fp64 1e-10 (libm activations; any
formula difference would show at 1e-3 or worse). The recurrence
contract tests compare fp32 against the float64 vectorized recurrence on the same inputs.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from bilstm_fast import FastBiLSTM
from bilstm_fast.kernels import native, resolve_backend, vectorized
from helpers import TOL, torch_threads

needs_native = pytest.mark.skipif(not native.available(),
                                  reason=f"native backend not built: {native.UNAVAILABLE_REASON}")
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])

# (T, B, D, H, lengths): odd sizes, T=1, B=1, one and two directions, unsorted lengths with ties
# and length-1 rows, a batch large enough to be split into slices when threads allow
CONTRACT_CASES = [
    (7, 5, 2, 13, None),
    (1, 1, 2, 4, None),
    (1, 3, 1, 5, None),
    (9, 4, 1, 8, [9, 2, 1, 9]),
    (6, 19, 2, 33, [1, 2, 3, 4, 5, 6] * 3 + [6]),
    (12, 40, 2, 16, [12 - (b * 7) % 12 for b in range(40)]),
    (5, 17, 2, 3, [5] * 17),
]


def contract_id(case):
    T, B, D, H, lengths = case
    return f"T{T}-B{B}-D{D}-H{H}" + ("" if lengths is None else "-len")


def contract_inputs(T, B, D, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    # W_hh entries of 0.4 up to H = 16, then shrinking as 1/sqrt(H), as nn.LSTM's init does
    return rand(T, B, D, 4 * H), rand(D, 4 * H, H, scale=0.4 * min(1.0, (16 / H) ** 0.5)), rand(D, B, H), rand(D, B, H)


def valid_mask(lengths, T, B):
    if lengths is None:
        return torch.ones(T, B, dtype=torch.bool)
    return torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)


@needs_native
@DTYPES
@pytest.mark.parametrize("case", CONTRACT_CASES, ids=contract_id)
def test_recurrence_matches_vectorized_float64(case, dtype):
    T, B, D, H, lengths = case
    lens = None if lengths is None else torch.tensor(lengths)
    gx, w, h0, c0 = contract_inputs(T, B, D, H, dtype)
    g = torch.Generator().manual_seed(1)
    shapes = ((T, B, D, H), (D, B, H), (D, B, H))
    dout, dh_n, dc_n = (torch.randn(*s, generator=g, dtype=torch.float64).to(dtype) for s in shapes)
    got = native.recurrence_forward(gx, w, h0, c0, lens)
    ref = vectorized.recurrence_forward(*(t.double() for t in (gx, w, h0, c0)), lens)
    tol = TOL[dtype]
    valid = valid_mask(lens, T, B).view(T, B, 1, 1)
    for name, n, r in zip(("out", "h_n", "c_n", "gates", "cs"), got, ref):
        assert n.dtype == dtype and n.is_contiguous()
        if name == "gates":  # the contract leaves the gates past a sequence's end unspecified
            n, r = n * valid, r * valid
        torch.testing.assert_close(n.double(), r, **tol, msg=lambda m: f"{name}: {m}")
    out, _, _, gates, cs = got
    assert torch.equal(out * ~valid, torch.zeros_like(out)), "output past a sequence's end must be exactly 0"
    # backward from the same saved buffers, in float64 for the reference
    dgates, dh0, dc0 = native.recurrence_backward(dout, dh_n, dc_n, w, gates, cs, c0, lens)
    ref_b = vectorized.recurrence_backward(*(t.double() for t in (dout, dh_n, dc_n, w, gates, cs, c0)), lens)
    for name, n, r in zip(("dgates", "dh0", "dc0"), (dgates, dh0, dc0), ref_b):
        torch.testing.assert_close(n.double(), r, **tol, msg=lambda m: f"{name}: {m}")
    assert torch.equal(dgates * ~valid, torch.zeros_like(dgates)), "no gate gradient past a sequence's end"
    # the inference forward: the same arithmetic, so the same bits, and nothing saved
    inf = native.recurrence_forward(gx, w, h0, c0, lens, save=False)
    assert inf[3] is None and inf[4] is None
    for a, b in zip(inf[:3], got[:3]):
        assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("case", [(6, 11, 2, 514, [6, 1, 3, 6, 2, 5, 4, 6, 1, 2, 3]), (4, 3, 1, 512, None)],
                         ids=contract_id)
def test_packed_step_gemm_as_accurate_as_torch_fp32(case):
    """H >= 512: the fp32 step GEMMs run on W_hh^T (forward) and W_hh (backward) packed into
    panels (H = 514: a narrower last panel, and the backward's K = 4H = 2056 ends in a K block of
    8) while the running rows shrink. Their error against float64 must be that of fp32 torch (the
    vectorized recurrence, torch.mm) on the same inputs, within 2x: at these sizes a
    pre-activation sums ~500 products and fp32 torch itself misses TOL's atol of 1e-6 (gates by
    2-3e-6), so an absolute bound would test the inputs, not the kernel."""
    T, B, D, H, lengths = case
    lens = None if lengths is None else torch.tensor(lengths)
    inputs = contract_inputs(T, B, D, H, torch.float32)
    ref = vectorized.recurrence_forward(*(t.double() for t in inputs), lens)
    torch_fp32 = vectorized.recurrence_forward(*inputs, lens)
    got = native.recurrence_forward(*inputs, lens)
    valid = valid_mask(lens, T, B).view(T, B, 1, 1)

    def assert_within_twice_torchs_error(names, natives, torchs, refs):
        for name, n, t, r in zip(names, natives, torchs, refs):
            if name == "gates":  # unspecified past a sequence's end
                n, t, r = n * valid, t * valid, r * valid
            native_error = (n.double() - r).abs().max().item()
            torch_error = (t.double() - r).abs().max().item()
            assert native_error <= 2 * torch_error + 1e-7, (name, native_error, torch_error)

    assert_within_twice_torchs_error(("out", "h_n", "c_n", "gates", "cs"), got, torch_fp32, ref)
    # the backward from float64's saved gates and cell states, rounded to fp32 for both
    _, _, _, gates, cs = ref
    g = torch.Generator().manual_seed(5)
    dout, dh_n, dc_n = (torch.randn(shape, generator=g) for shape in ((T, B, D, H), (D, B, H), (D, B, H)))
    _, w, _, c0 = inputs
    fp32_args = (dout, dh_n, dc_n, w, gates.float(), cs.float(), c0)
    ref_b = vectorized.recurrence_backward(*(t.double() for t in fp32_args), lens)
    torch_b = vectorized.recurrence_backward(*fp32_args, lens)
    got_b = native.recurrence_backward(*fp32_args, lens)
    assert_within_twice_torchs_error(("dgates", "dh0", "dc0"), got_b, torch_b, ref_b)


@needs_native
def test_saved_cell_state_carries_past_the_end():
    """cs past a sequence's end holds the carried state: the final one going forward, c0 going back."""
    T, B, D, H = 6, 3, 2, 5
    lens = torch.tensor([6, 2, 4])
    gx, w, h0, c0 = contract_inputs(T, B, D, H, torch.float32)
    out, h_n, c_n, gates, cs = native.recurrence_forward(gx, w, h0, c0, lens)
    for b, n in enumerate(lens.tolist()):
        for t in range(n, T):
            assert torch.equal(cs[t, b, 0], c_n[0, b])
            assert torch.equal(cs[t, b, 1], c0[1, b])
        assert torch.equal(h_n[0, b], out[n - 1, b, 0]) and torch.equal(c_n[0, b], cs[n - 1, b, 0])
        assert torch.equal(h_n[1, b], out[0, b, 1])





@needs_native
def test_auto_picks_native_on_cpu_for_every_float_dtype():
    """fp32 and fp64, and bf16 and fp16 (fp32 math, kernels/native.py REDUCED) since they run natively too."""
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        assert resolve_backend("auto", cpu, dtype) == "native"
    assert resolve_backend("native", torch.device("meta"), torch.float32) == "vectorized"


@needs_native
def test_built_with_openmp_and_a_simd_level():
    """Without -fopenmp at::parallel_for runs the directions one after the other, silently."""
    assert native._native.openmp()
    assert native.simd_level()


@needs_native
def test_compile_fullgraph_through_the_custom_ops():
    torch.manual_seed(0)
    model = FastBiLSTM(5, 7, num_layers=2, batch_first=True, backend="native")
    x = torch.randn(3, 6, 5)

    def step(m):
        model.zero_grad()
        out, (h, c) = m(x)
        (out.square().sum() + h.sum() + c.sum()).backward()
        return [out.detach()] + [p.grad.clone() for p in model.parameters()]

    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=True))
    for e, c in zip(eager, compiled):  # inductor fuses the GEMM epilogues differently: a few ulps
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x)[0], model(x)[0], rtol=1e-5, atol=1e-6)


def training_step(threads, B=40, T=7, lengths=None):
    with torch_threads(threads):
        torch.manual_seed(0)
        model = FastBiLSTM(6, 9, num_layers=2, backend="native")
        x = torch.randn(T, B, 6)
        if lengths is not None:
            x = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, (h, c) = model(x)
        out = out.data if lengths is not None else out
        (out.square().sum() + h.sum() + c.sum()).backward()
        return [out.detach(), h.detach(), c.detach()] + [p.grad for p in model.parameters()]


@needs_native
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_bitwise_repeatable_and_across_one_or_two_threads(packed):
    """Run to run: identical bits. Across thread counts the bits are identical as long as the batch
    split is: with two directions and up to two threads every direction is one task."""
    lengths = torch.tensor([7 - b % 7 for b in range(40)]) if packed else None
    first = training_step(2, lengths=lengths)
    for a, b in zip(first, training_step(2, lengths=lengths)):
        assert torch.equal(a, b)
    for a, b in zip(first, training_step(1, lengths=lengths)):
        assert torch.equal(a, b)


@needs_native
def test_batch_split_across_more_threads_matches():
    """More threads than directions: each direction's rows are dealt into slices run at once. The
    numbers agree to fp32 rounding (a slice's GEMM has fewer rows); with 4 threads the 40 rows go
    into two slices per direction."""
    one, four = training_step(1), training_step(4)
    for a, b in zip(one, four):
        torch.testing.assert_close(b, a, **TOL[torch.float32])
    for a, b in zip(four, training_step(4)):
        assert torch.equal(a, b)


FALLBACK_SCRIPT = textwrap.dedent(
    """
    import warnings
    import torch
    from bilstm_fast import FastBiLSTM
    from bilstm_fast.kernels import resolve_backend
    torch.manual_seed(0)
    model = FastBiLSTM(4, 5, num_layers=2)
    x = torch.randn(6, 3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(x)[0]
        out.sum().backward()
        model(x)
        FastBiLSTM(4, 5, backend="native")(x)
        assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "vectorized"
    ours = [w for w in caught if "bilstm_fast" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "BILSTM_FAST_NO_NATIVE" in str(ours[0].message) and "vectorized" in str(ours[0].message)
    model.backend = "vectorized"
    assert torch.equal(model(x)[0], out)
    print("fallback ok")
    """
)


def test_fallback_without_the_extension_warns_once_and_runs_vectorized():
    """What a machine without a compiler gets: the vectorized backend and one warning saying why."""
    env = dict(os.environ, BILSTM_FAST_NO_NATIVE="1")
    import bilstm_fast  # the child imports the same copy (installed, or the checkout)

    where = os.path.dirname(os.path.dirname(os.path.abspath(bilstm_fast.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (where, env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "fallback ok" in done.stdout, done.stdout + done.stderr


CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not os.path.isfile(os.path.join(CHECKOUT, "setup.py")), reason="needs the source checkout")
def test_a_failed_compile_still_builds_the_package(tmp_path):
    """No working C++ compiler: `pip wheel .` (what `pip install .` builds) still succeeds, with the
    Python backends and without the extension."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(CHECKOUT, name), src / name)
    for name in ("kernels", "bilstm_fast"):
        shutil.copytree(os.path.join(CHECKOUT, name), src / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = dict(os.environ, CXX="false", CC="false")
    env.pop("BILSTM_FAST_NO_NATIVE", None)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(src)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "bilstm_fast/kernels/native.py" in names and "bilstm_fast/kernels/vectorized.py" in names
    assert "bilstm_fast/apps/train_mnist.py" in names  # the applications ship with the library
    assert not any("_native" in n for n in names)
