"""The recurrence contract (bilstm_fast/kernels/contract.py), checked on every CPU backend (the
`backend` fixture): shapes, dtypes, fresh contiguous outputs, zeros past each sequence's end,
padded steps masked by selection, and save=False giving the same bits. What the numbers must
be is checked against the loop reference in test_function.py and test_parity.py.
"""
import pytest
import torch

from bilstm_fast.kernels import available_backends, recurrence_module
from bilstm_fast.kernels.contract import state_dtype
from helpers import torch_threads

# (T, B, H, D, lengths)
CASES = [
    (5, 3, 4, 2, [5, 1, 3]),
    (4, 2, 3, 1, None),
    (1, 1, 2, 2, [1]),
]


def case_id(case):
    T, B, H, D, lengths = case
    return f"T{T}-B{B}-H{H}-D{D}" + ("" if lengths is None else "-len")


def problem(T, B, H, D, lengths, dtype):
    g = torch.Generator().manual_seed(0)
    return dict(
        gx=torch.randn(T, B, D, 4 * H, generator=g, dtype=dtype),
        w_hh=torch.randn(D, 4 * H, H, generator=g, dtype=dtype) * 0.5,
        h0=torch.randn(D, B, H, generator=g, dtype=dtype),
        c0=torch.randn(D, B, H, generator=g, dtype=dtype),
        lengths=None if lengths is None else torch.tensor(lengths),
    )


def past_end(lengths, T, B):
    """[T, B] bool: t >= lengths[b]."""
    if lengths is None:
        return torch.zeros(T, B, dtype=torch.bool)
    return torch.arange(T).unsqueeze(1) >= lengths.unsqueeze(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_shapes_dtypes_and_masking(case, dtype, backend):
    T, B, H, D, lengths = case
    rec = recurrence_module(backend)
    p = problem(T, B, H, D, lengths, dtype)
    inputs = list(p.values())
    out, h_n, c_n, gates, cs = rec.recurrence_forward(**p)
    assert out.shape == (T, B, D, H) and gates.shape == (T, B, D, 4 * H) and cs.shape == (T, B, D, H)
    assert h_n.shape == c_n.shape == (D, B, H)
    assert out.dtype == h_n.dtype == c_n.dtype == gates.dtype == dtype and cs.dtype == state_dtype(dtype)
    pad = past_end(p["lengths"], T, B)
    assert torch.all(out[pad] == 0)

    dout = torch.randn_like(out)
    dgates, dh0, dc0 = rec.recurrence_backward(dout, torch.randn_like(h_n), torch.randn_like(c_n), p["w_hh"],
                                               gates, cs, p["c0"], p["lengths"])
    assert dgates.shape == (T, B, D, 4 * H) and dgates.dtype == dtype
    assert dh0.shape == dc0.shape == (D, B, H) and dh0.dtype == dc0.dtype == state_dtype(dtype)
    assert torch.all(dgates[pad] == 0)

    for name, t in zip(["out", "h_n", "c_n", "gates", "cs", "dgates", "dh0", "dc0"],
                       [out, h_n, c_n, gates, cs, dgates, dh0, dc0]):
        assert t.is_contiguous(), f"{name} is not contiguous"
        shared = [x for x in inputs + [dout] if x is not None and x.untyped_storage().data_ptr()
                  == t.untyped_storage().data_ptr()]
        assert not shared, f"{name} shares storage with an input"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_inference_forward_keeps_nothing_and_gives_the_same_bits(case, backend):
    rec = recurrence_module(backend)
    p = problem(*case, torch.float32)
    saved = rec.recurrence_forward(**p)
    out, h_n, c_n, gates, cs = rec.recurrence_forward(**p, save=False)
    assert gates is None and cs is None
    for name, a, b in zip(("out", "h_n", "c_n"), saved, (out, h_n, c_n)):
        assert torch.equal(a, b), name


def test_padded_steps_are_masked_by_selection(backend):
    """inf in the projections of padded steps must not turn into NaN (0 * inf) anywhere."""
    T, B, H, D, lengths = CASES[0]
    rec = recurrence_module(backend)
    p = problem(T, B, H, D, lengths, torch.float32)
    p["gx"][past_end(p["lengths"], T, B)] = float("inf")
    out, h_n, c_n, gates, cs = rec.recurrence_forward(**p)
    dgates, dh0, dc0 = rec.recurrence_backward(torch.ones_like(out), torch.ones_like(h_n), torch.ones_like(c_n),
                                               p["w_hh"], gates, cs, p["c0"], p["lengths"])
    for name, t in (("out", out), ("h_n", h_n), ("c_n", c_n), ("dgates", dgates), ("dh0", dh0), ("dc0", dc0)):
        assert not t.isnan().any(), name


# (T, B, I, H, D, lengths, threads): unsorted lengths; a direction split into batch slices (2
# threads, one direction, B >= 16); several blocks of steps (native: 4 MB of projections each,
# 26 steps here in fp32, 13 in fp64) with fewer rows running in later blocks; and projections
# large enough for the packed-panel GEMM (I * 4H >= 2**16)
FUSED_CASES = [
    (5, 3, 4, 4, 2, [5, 1, 3], 1),
    (9, 20, 5, 7, 1, None, 2),
    (40, 20, 8, 512, 2, list(range(40, 20, -1)), 2),
    (3, 17, 300, 160, 1, [1, 3, 2] * 5 + [3, 3], 2),
]


FUSED_BACKENDS = [name for name in available_backends("cpu") if hasattr(recurrence_module(name), "layer_forward")]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: f"T{c[0]}-B{c[1]}-I{c[2]}-H{c[3]}-D{c[4]}-t{c[6]}")
@pytest.mark.parametrize("fused", FUSED_BACKENDS)
def test_layer_forward_is_the_projection_then_the_recurrence(fused, case, dtype, bias):
    """The optional extra: layer_forward(x, ...) equals recurrence_forward(x @ W_ih^T + b, ...)
    to the rounding of the projection's sum (fp64: 1e-12; fp32: 1e-5 of the output scale, a few
    hundred ulps of one I-term dot product carried through the gates), saving or not. The
    recurrence must not amplify rounding for that to hold: W_hh at nn.LSTM's scale."""
    rec = recurrence_module(fused)
    from bilstm_fast.function import input_projection

    T, B, I, H, D, lengths, threads = case
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=g, dtype=dtype)
    w_ih = torch.randn(D, 4 * H, I, generator=g, dtype=dtype) / I**0.5
    b = torch.randn(D, 4 * H, generator=g, dtype=dtype) if bias else None
    p = problem(T, B, H, D, lengths, dtype)
    # W_hh at nn.LSTM's scale (1/sqrt(H)): problem()'s fixed 0.5 makes the H=512 recurrence chaotic,
    # where one ulp of gx moves the fp64 output by 2e-6, so no two summation orders could agree
    w_hh = p["w_hh"] / H**0.5
    with torch_threads(threads):
        for save in (True, False):
            args = (w_hh, p["h0"], p["c0"], p["lengths"])
            expected = rec.recurrence_forward(input_projection(x, w_ih, b), *args, save=save)
            got = rec.layer_forward(x, w_ih, b, *args, save=save)
            for e, o in zip(expected, got):
                assert (e is None) == (o is None)
                if e is not None:
                    scale = e.abs().max().item()
                    assert (o - e).abs().max().item() <= (1e-12 if dtype == torch.float64 else 1e-5) * scale


GRADIENT_BACKENDS = [name for name in available_backends("cpu") if hasattr(recurrence_module(name), "layer_gradients")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(3, 2, 5, 4, 2), (600, 2, 3, 4, 2), (7, 3, 6, 5, 1), (600, 2, 3, 4, 1)], ids=str)
@pytest.mark.parametrize("fused", GRADIENT_BACKENDS)
def test_layer_gradients_are_the_plain_gemms(fused, shape, dtype):
    """The optional extra: layer_gradients gives function.py's plain GEMMs (fp64 to 1e-12, fp32 to
    1e-5 of each result's scale: sums of up to T*B = 1200 products, in blocks of 512 rows either
    way), None exactly where a result is not needed, and a tensor of its own for every result. At
    two threads (native: one direction's 1200 rows are then split between two tasks)."""
    from bilstm_fast.function import input_and_weight_gradients

    T, B, I, P, D = shape
    g = torch.Generator().manual_seed(2)
    dgates = torch.randn(T, B, D, 4 * P, generator=g, dtype=dtype)
    x = torch.randn(T, B, I, generator=g, dtype=dtype)
    h_prev = torch.randn(T, B, D, P, generator=g, dtype=dtype)
    w_ih = torch.randn(D, 4 * P, I, generator=g, dtype=dtype)
    for need in ([True] * (1 + 3 * D), [False, True, False, True] * D):
        need_dx, flags = need[0], need[1:1 + 3 * D]
        args = (dgates, x, h_prev, w_ih, need_dx, flags[0::3], flags[1::3], flags[2::3])
        with torch_threads(2):
            got = recurrence_module(fused).layer_gradients(*args)
        dx, dw_ih, dw_hh, db = input_and_weight_gradients("vectorized", *args)
        expected = [dx] + [t for d in range(D) for t in (dw_ih[d], dw_hh[d], db[d])]
        assert len(got) == len(expected)
        for e, o in zip(expected, got):
            assert (e is None) == (o is None)
            if e is not None:
                assert o.shape == e.shape and o.dtype == e.dtype
                scale = e.abs().max().item()
                assert (o - e).abs().max().item() <= (1e-12 if dtype == torch.float64 else 1e-5) * scale
        storages = [t.untyped_storage().data_ptr() for t in got if t is not None]
        assert len(set(storages)) == len(storages)
