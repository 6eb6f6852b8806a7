"""FastBiLSTM probed the way a hostile user would (issue 7): odd and huge shapes, odd layouts,
non-finite values, malformed calls, memory. Every case works exactly like nn.LSTM or fails with
a clear Python exception before any compute runs.

Every test that computes runs on each CPU backend (the `backend` fixture). Tolerances as in
test_parity.py (helpers.TOL): fp32 rtol=1e-5/atol=1e-6 (both sides round differently: GEMM
blocking, summation order), fp64 rtol=1e-10/atol=1e-12 (any formula difference shows at 1e-3).
Bad calls and bad parameters, the errors they raise, are in test_errors.py.
"""
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bilstm_fast import FastBiLSTM
from helpers import TOL, assert_all_close, forward_backward, leaf, make_pair

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])


# ---------------------------------------------------------------------------------------- shapes

TINY = [  # (T, B, I, H, layers): every dimension that can be 1, alone and together
    (1, 1, 1, 1, 1),
    (1, 4, 3, 1, 2),
    (9, 1, 2, 1, 2),
    (1, 1, 5, 7, 3),
    (3, 2, 1, 17, 1),
]


@DTYPES
@pytest.mark.parametrize("shape", TINY, ids=lambda s: "T{}-B{}-I{}-H{}-L{}".format(*s))
def test_size_one_dimensions_match_nn_lstm(shape, dtype, backend):
    T, B, I, H, layers = shape
    ref, fast = make_pair(I, H, layers, dtype, backend=backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=g, dtype=dtype)
    hx = tuple(torch.randn(2 * layers, B, H, generator=g, dtype=dtype) for _ in range(2))

    def run(model):
        inputs = [leaf(x), leaf(hx[0]), leaf(hx[1])]
        return forward_backward(model, inputs[0], tuple(inputs[1:]), inputs)

    assert_all_close(run(fast), run(ref), dtype)


def autograd_nodes(grad_fn):
    """Number of autograd nodes reachable from grad_fn (iterative: the graph may be deep)."""
    seen, todo = set(), [grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return len(seen)


class SavedTensors:
    """Records every tensor autograd saves for backward inside the block (whatever saves it:
    a custom Function, a custom op's autograd, or plain torch ops), as weak references."""

    def __init__(self):
        self.records = []  # (weakref, storage pointer, bytes)
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t):
        self.records.append((weakref.ref(t), t.untyped_storage().data_ptr(), t.numel() * t.element_size()))
        return t

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    def bytes(self):
        return sum(size for _, _, size in self.records)

    def alive(self, user_tensors=()):
        """Bytes of recorded tensors still alive that do not share storage with user_tensors."""
        user = {t.untyped_storage().data_ptr() for t in user_tensors}
        return sum(size for ref, ptr, size in self.records if ref() is not None and ptr not in user)


@pytest.mark.slow
def test_T20000_forward_backward_in_linear_memory_against_float64(backend):
    """A long sequence must not recurse, overflow or build a per-step graph: the graph has a
    handful of nodes whatever T is, and what backward keeps is the O(T) activations it needs
    (x, out, gates, cell states: T*B*(I + 6*D*H) numbers per layer); 2x that is the bound.

    Oracle: the same module in float64 (pinned to nn.LSTM at 1e-10 by test_parity.py), not
    nn.LSTM in fp32: that costs 5-30 s at this T on CPU, and is the less accurate side. Its bias
    gradient, accumulated step by step, is off by 5.7e-4 of its scale against float64; ours,
    one reduction over T*B, by 1.4e-6."""
    T, B, I, H, D = 20000, 2, 2, 3, 2
    torch.manual_seed(0)
    fast = FastBiLSTM(I, H, backend=backend)
    fast64 = FastBiLSTM(I, H, dtype=torch.float64, backend=backend)
    fast64.load_state_dict(fast.state_dict())
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(1))
    loss_weights = torch.linspace(-1, 1, T * B * D * H).view(T, B, D * H)

    def run(model, x):
        x = leaf(x)
        with SavedTensors() as saved:
            out, (h_n, c_n) = model(x)
        assert autograd_nodes(out.grad_fn) < 50
        assert 0 < saved.bytes() <= 2 * T * B * (I + 6 * D * H) * x.element_size()
        loss = (out * loss_weights.to(x.dtype)).sum() + h_n.sum()
        return [out, h_n, c_n, *torch.autograd.grad(loss, [x, *model.parameters()])]

    names = ["out", "h_n", "c_n", "x"] + [name for name, _ in fast.named_parameters()]
    for name, f, r in zip(names, run(fast, x), run(fast64, x.double())):
        assert torch.isfinite(f).all(), name
        if name in ("out", "h_n", "c_n", "x"):  # O(1) per element, like any short sequence
            torch.testing.assert_close(f.double(), r, **TOL[torch.float32], msg=lambda m: f"{name}: {m}")
        else:
            # a sum over T*B = 40000 steps: its terms carry the ~4e-7 error of x's gradient, and
            # fp32 summation adds ~sqrt(n)*eps = 1.2e-5 of the largest term; 5e-5 of the
            # gradient's scale leaves 4x margin (measured: 9e-6 at most on an Intel CPU, 1.2e-5 on
            # an AMD one; there, before function.sum_over_rows blocked the reduction, 3.2e-4)
            scale = r.abs().max().item()
            torch.testing.assert_close(f.double(), r, rtol=0, atol=5e-5 * scale, msg=lambda m: f"{name}: {m}")


def check_far_batch_rows(T, B, I, H, device, dtype, backend, atol):
    """Rows at both ends of a batch of B, run in one big call, against nn.LSTM on those rows
    alone (float32, on the same rounded inputs and weights); forward and backward. With a loss
    on those rows only, every other row's input gradient must be exactly zero and the weight
    gradients equal the small run's."""
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, bidirectional=True).to(device)
    fast = FastBiLSTM.from_lstm(ref, backend=backend).to(dtype)
    ref.load_state_dict({k: v.float() for k, v in fast.state_dict().items()})
    x = torch.randn(T, B, I, device=device, dtype=dtype, requires_grad=True)
    rows = torch.tensor([0, 1, B // 2, B - 2, B - 1], device=device)
    weights = torch.linspace(-1, 1, T * len(rows) * 2 * H, device=device).view(T, len(rows), 2 * H)

    out, (h_n, c_n) = fast(x)
    assert out.dtype == dtype
    (out[:, rows].float() * weights).sum().backward()
    x_rows = x.detach()[:, rows].float().requires_grad_()
    ref_out, (ref_h, ref_c) = ref(x_rows)
    (ref_out * weights).sum().backward()

    close = dict(rtol=0, atol=atol)
    torch.testing.assert_close(out[:, rows].float(), ref_out, **close)
    torch.testing.assert_close(h_n[:, rows].float(), ref_h, **close)
    torch.testing.assert_close(c_n[:, rows].float(), ref_c, **close)
    torch.testing.assert_close(x.grad[:, rows].float(), x_rows.grad, **close)
    others = torch.ones(B, dtype=torch.bool, device=device)
    others[rows] = False
    assert torch.count_nonzero(x.grad[:, others]) == 0
    for (name, p), r in zip(fast.named_parameters(), ref.parameters()):
        # summed over T*5 rows: relative to each gradient's scale
        torch.testing.assert_close(p.grad.float(), r.grad, rtol=0, atol=atol * r.grad.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_far_batch_rows_match_small_run_cpu_B13_T5_I4_H3(dtype, backend):
    """The CPU-sized run of the check below, so the check itself is tested in CI."""
    check_far_batch_rows(5, 13, 4, 3, "cpu", dtype, backend, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["vectorized", "triton"])
def test_cuda_over_2_31_gate_elements_B262145_T64_I4_H32_fp16(backend):
    """B*T*4H = 2^31 + 8192: the gate rows of the last sequences sit past 2^31 elements, where a
    32-bit offset wraps around. fp16 keeps it on an 80 GB GPU: gx/gates/dgates 8.6 GB each,
    out 2.1 GB, fp32 cell states 4.3 GB: an estimated 45 GB at the peak of backward. Not on CPU: the
    same run needs that much host memory (CI machines have ~23 GB), and the CPU path is PyTorch
    ops, which index with 64-bit offsets by construction; the check itself runs on CPU above.
    fp16 outputs and gates round at 2^-11 relative (|values| <= 1): atol 4e-3 as test_compose."""
    T, I, H = 64, 4, 32
    B = 2**31 // (T * 4 * H) + 1
    assert B * T * 4 * H > 2**31
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # IEEE oracle
    try:
        check_far_batch_rows(T, B, I, H, "cuda", torch.float16, backend, atol=4e-3)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bf"])
def test_batch_of_zero_forward_and_backward_like_nn_lstm(batch_first, backend):
    ref, fast = make_pair(3, 5, layers=2, batch_first=batch_first, backend=backend)
    x = torch.randn((0, 4, 3) if batch_first else (4, 0, 3))
    hx = (torch.randn(4, 0, 5), torch.randn(4, 0, 5))
    for state in (None, hx):
        def run(model):
            leaves = [leaf(x)] + ([] if state is None else [leaf(t) for t in state])
            hx_in = None if state is None else tuple(leaves[1:])
            out, (h_n, c_n) = model(leaves[0], hx_in)
            (out.sum() + h_n.sum() + c_n.sum()).backward()
            return [out, h_n, c_n] + [t.grad for t in leaves] + [p.grad for p in model.parameters()]

        fast_results, ref_results = run(fast), run(ref)
        for f, r in zip(fast_results, ref_results):
            assert f.shape == r.shape and f.dtype == r.dtype
        # an empty batch contributes nothing: the weight gradients exist and are zero
        assert_all_close(fast_results, ref_results, torch.float32)
        fast.zero_grad()
        ref.zero_grad()


# --------------------------------------------------------------------------------------- layouts

def rand64(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# id: (bases, views): views(bases) -> (x, h0, c0) for make_pair(5, 4, layers=2), B=3, T=7;
# gradients are taken w.r.t. the bases, through the views, as a caller's would flow
LAYOUTS = {
    "x-sliced": ([rand64(7, 6, 10, seed=1)], lambda b: (b[0][:, ::2, 1::2], None)),
    "x-transposed": ([rand64(3, 7, 5, seed=1)], lambda b: (b[0].transpose(0, 1), None)),
    "x-permuted": ([rand64(5, 7, 3, seed=1)], lambda b: (b[0].permute(1, 2, 0), None)),
    "x-expanded": ([rand64(1, 1, 5, seed=1)], lambda b: (b[0].expand(7, 3, 5), None)),
    "states-sliced": ([rand64(7, 3, 5, seed=1), rand64(4, 6, 8, seed=2)],
                      lambda b: (b[0], (b[1][:, ::2, :4], b[1][:, ::2, 4:]))),
    "states-transposed": ([rand64(7, 3, 5, seed=1), rand64(3, 4, 4, seed=2), rand64(4, 4, 3, seed=3)],
                          lambda b: (b[0], (b[1].transpose(0, 1), b[2].transpose(1, 2)))),
    "states-expanded": ([rand64(7, 3, 5, seed=1), rand64(1, 1, 4, seed=2), rand64(4, 1, 4, seed=3)],
                        lambda b: (b[0], (b[1].expand(4, 3, 4), b[2].expand(4, 3, 4)))),
    "h0-is-c0": ([rand64(7, 3, 5, seed=1), rand64(4, 3, 4, seed=2)], lambda b: (b[0], (b[1], b[1]))),
    # x, h0 and c0 all views of one buffer, h0 overlapping both x and c0
    "x-h0-c0-overlap-in-one-buffer": ([rand64(7, 3, 16, seed=1)],
                                      lambda b: (b[0][..., :5], (b[0][:4, :, 3:7], b[0][:4, :, 5:9]))),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_strided_and_aliased_inputs_and_states_match_nn_lstm(name, backend):
    ref, fast = make_pair(5, 4, layers=2, dtype=torch.float64, backend=backend)
    bases, views = LAYOUTS[name]
    x, hx = views(bases)
    assert not all(t.is_contiguous() for t in (x, *(hx or ()))) or name == "h0-is-c0"

    def run(model):
        leaves = [leaf(b) for b in bases]
        x, hx = views(leaves)
        return forward_backward(model, x, hx, leaves)

    assert_all_close(run(fast), run(ref), torch.float64)


@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bf"])
def test_output_modified_in_place_backpropagates_like_nn_lstm(batch_first, backend):
    """nn.LSTM's output, h_n and c_n survive in-place edits (masking padded steps, in-place ReLU)
    and still backpropagate: the op's saved tensors must not alias what the caller gets."""
    ref, fast = make_pair(3, 4, layers=2, dtype=torch.float64, batch_first=batch_first, backend=backend)
    x = torch.randn(6, 3, 3, dtype=torch.float64)

    def run(model):
        xl = leaf(x)
        out, (h_n, c_n) = model(xl)
        out[:, -1] = 0  # a mask, written in place
        F.relu(out, inplace=True)
        h_n.mul_(2)
        c_n.add_(1)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
        loss = loss + h_n.sum() + (c_n * c_n).sum()
        return [out, h_n, c_n, *torch.autograd.grad(loss, [xl, *model.parameters()])]

    assert_all_close(run(fast), run(ref), torch.float64)


def test_outputs_fed_back_as_inputs_and_states_like_nn_lstm(backend):
    """Chained calls: the next input is a view of the previous output, the previous (h_n, c_n)
    are the next states, and one backward runs through both calls."""
    ref, fast = make_pair(4, 3, layers=2, dtype=torch.float64, backend=backend)
    x = torch.randn(5, 2, 4, dtype=torch.float64)

    def run(model):
        xl = leaf(x)
        out1, state = model(xl)
        out2, (h_n, c_n) = model(out1[..., 1:5], state)
        loss = (out1 * out1).sum() + (out2 * torch.linspace(-1, 1, out2.numel(), dtype=x.dtype).view_as(out2)).sum()
        return [out2, h_n, c_n, *torch.autograd.grad(loss + h_n.sum() + c_n.sum(), [xl, *model.parameters()])]

    assert_all_close(run(fast), run(ref), torch.float64)


def test_input_modified_before_backward_raises_like_nn_lstm(backend):
    """x is needed for the weight gradient: editing it in place after forward must be caught,
    as nn.LSTM (autograd's version counter) catches it, not give a wrong gradient."""
    ref, fast = make_pair(3, 4, backend=backend)
    for model in (ref, fast):
        x = torch.randn(5, 2, 3, requires_grad=True) * 1
        out, _ = model(x)
        x.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_parameters_replaced_after_construction(backend):
    torch.manual_seed(0)
    fast = FastBiLSTM(3, 4, num_layers=2, backend=backend)
    old = fast.weight_hh_l0
    fast.weight_hh_l0 = nn.Parameter(torch.randn(16, 4))
    fast.bias_ih_l1_reverse = nn.Parameter(torch.randn(16), requires_grad=False)
    fast.weight_ih_l1.data = torch.randn(16, 8)  # the other way people swap weights
    ref = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    ref.load_state_dict(fast.state_dict())
    ref.bias_ih_l1_reverse.requires_grad_(False)
    x = torch.randn(5, 2, 3)
    assert_all_close(forward_backward(fast, leaf(x)), forward_backward(ref, leaf(x)), torch.float32)
    fast(x)[0].sum().backward()
    assert fast.weight_hh_l0.grad is not None and old.grad is None  # the new Parameter trains
    assert fast.bias_ih_l1_reverse.grad is None  # the frozen one does not, as in nn.LSTM


@DTYPES
def test_to_double_half_and_flatten_parameters_as_nn_lstm_users_call_them(dtype, backend):
    ref, fast = make_pair(3, 4, layers=2, backend=backend)
    fast.flatten_parameters()  # nn.LSTM code calls this after .to()/DataParallel: a no-op here
    assert fast.to(torch.device("cpu"), torch.float16) is fast and fast.weight_hh_l1.dtype == torch.float16
    fast, ref = fast.to(dtype), ref.to(dtype)
    assert all(p.dtype == dtype for p in fast.parameters()) and fast.backend == backend
    assert list(fast.state_dict()) == list(ref.state_dict())
    with torch.no_grad():  # the fp16 round trip rounded fast's weights: give both the same
        for p, q in zip(ref.parameters(), fast.parameters()):
            p.copy_(q)
    fast.flatten_parameters()
    x = torch.randn(5, 2, 3, dtype=dtype)
    assert_all_close(forward_backward(fast, leaf(x)), forward_backward(ref, leaf(x)), dtype)
    fast.double()
    assert all(p.dtype == torch.float64 for p in fast.parameters())
    assert fast(x.double())[0].dtype == torch.float64


# ---------------------------------------------------------------------------------------- values

NON_FINITE_SITES = ["x", "h0", "c0", "weight_ih_l0", "weight_hh_l0_reverse", "weight_ih_l1", "bias_hh_l1"]
# Packed batches are padded with zeros: 0 * inf in a padded step's input projection is NaN there.
# The backends must mask padded steps by selecting (torch.where), never by multiplying with the
# mask (NaN * 0 = NaN), or the NaN reaches the weight gradients that nn.LSTM keeps finite.


def non_finite_cases():
    """Every site and value in float64, where nn.LSTM runs its plain ATen path (~10 ms a call);
    a few in float32, where it runs oneDNN (~1 s a training call on CPU), as fp32 users get."""
    for site in NON_FINITE_SITES:
        for value in ("nan", "inf", "-inf"):
            for packed in (False, True):
                yield pytest.param(site, float(value), packed, torch.float64,
                                   id=f"{site}-{value}" + ("-packed" if packed else "") + "-fp64")
    for site, value in (("x", "nan"), ("c0", "-inf"), ("weight_hh_l0_reverse", "inf"), ("weight_ih_l1", "nan")):
        yield pytest.param(site, float(value), False, torch.float32, id=f"{site}-{value}-fp32")


@pytest.mark.parametrize("site, value, packed, dtype", list(non_finite_cases()))
def test_nan_and_inf_propagate_like_nn_lstm(site, value, packed, dtype, backend):
    """Same NaN and Inf positions as nn.LSTM in outputs, states and every gradient; the finite
    entries agree to the usual tolerance."""
    ref, fast = make_pair(3, 4, layers=2, dtype=dtype, backend=backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 3, generator=g, dtype=dtype)
    hx = [torch.randn(4, 3, 4, generator=g, dtype=dtype) for _ in range(2)]
    target = {"x": x, "h0": hx[0], "c0": hx[1]}.get(site)
    if target is None:
        for model in (ref, fast):
            with torch.no_grad():
                getattr(model, site).view(-1)[5] = value
    else:
        target.view(-1)[7] = value  # x[0, 2, 1] (sequence 2, length 2) / layer 0, sequence 1
    lengths = torch.tensor([4, 6, 2])

    def run(model):
        leaves = [leaf(x), leaf(hx[0]), leaf(hx[1])]
        inp = pack_padded_sequence(leaves[0], lengths, enforce_sorted=False) if packed else leaves[0]
        return forward_backward(model, inp, tuple(leaves[1:]), leaves)

    for k, (f, r) in enumerate(zip(run(fast), run(ref))):
        assert torch.equal(f.isnan(), r.isnan()), f"result {k}: NaN positions differ"
        assert torch.equal(f.isinf(), r.isinf()), f"result {k}: Inf positions differ"
        both = torch.isfinite(r)
        torch.testing.assert_close(f[both], r[both], **TOL[dtype], msg=lambda m: f"result {k}: {m}")
        torch.testing.assert_close(f[torch.isinf(r)], r[torch.isinf(r)])  # and the same signs


@DTYPES
@pytest.mark.parametrize("scale", [1e4, 1e30], ids=["x1e4", "x1e30"])
def test_large_inputs_saturate_like_nn_lstm(scale, dtype, backend):
    """|x| ~ 1e4 drives every gate into saturation: sigmoid/tanh give exact 0/+-1 and the gate
    derivatives vanish; results must match nn.LSTM's, not overflow (1e30 * weights stays finite
    in fp32, and its squares are never formed)."""
    ref, fast = make_pair(3, 4, layers=2, dtype=dtype, backend=backend)
    x = torch.randn(6, 3, 3, dtype=dtype, generator=torch.Generator().manual_seed(4)) * scale
    fast_results = forward_backward(fast, leaf(x))
    assert all(torch.isfinite(t).all() for t in fast_results)
    assert_all_close(fast_results, forward_backward(ref, leaf(x)), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=["fp16", "bf16", "fp32", "fp64"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_no_silent_dtype_promotion(dtype, packed, backend):
    """Outputs and states keep the input dtype, gradients the dtype of what they belong to."""
    fast = FastBiLSTM(3, 4, num_layers=2, dtype=dtype, backend=backend)
    x = torch.randn(5, 2, 3, dtype=dtype, requires_grad=True)
    hx = tuple(torch.randn(4, 2, 4, dtype=dtype, requires_grad=True) for _ in range(2))
    inp = pack_padded_sequence(x, torch.tensor([5, 3])) if packed else x
    out, (h_n, c_n) = fast(inp, hx)
    out = out.data if packed else out
    assert (out.dtype, h_n.dtype, c_n.dtype) == (dtype,) * 3
    grads = torch.autograd.grad(out.sum() + h_n.sum() + c_n.sum(), [x, *hx, *fast.parameters()])
    assert all(g.dtype == dtype for g in grads)
    assert all(torch.isfinite(t).all() for t in (out, h_n, c_n, *grads))


def test_hand_built_packed_sequence_with_trailing_empty_step_works_like_nn_lstm(backend):
    """batch_sizes [3, 3, 0] is a legal (if odd) PackedSequence: an empty last step."""
    ref, fast = make_pair(3, 4, layers=2, backend=backend)
    data = torch.randn(6, 3)
    results = [forward_backward(m, PackedSequence(leaf(data), torch.tensor([3, 3, 0]))) for m in (fast, ref)]
    assert_all_close(*results, torch.float32)


# ---------------------------------------------------------------------------------------- memory

class TensorLedger(TorchDispatchMode):
    """Records every tensor an op returns inside the block, forward and backward, custom ops
    included, as weak references: an exact account of what a step allocates and what of it is
    still alive afterwards. (CPU tensors have no allocator statistics to read, and RSS moves by
    megabytes with the C allocator's own caching whatever the program does.)"""

    def __init__(self):
        super().__init__()
        self.records = []  # (weakref, storage pointer, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in tree_flatten(result)[0]:
            if isinstance(t, torch.Tensor):
                self.records.append((weakref.ref(t), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return result

    def alive_bytes(self, expected=()):
        """Bytes of recorded storages still alive, other than those of the `expected` tensors."""
        expected = {t.untyped_storage().data_ptr() for t in expected}
        alive = {ptr: size for ref, ptr, size in self.records if ref() is not None and ptr not in expected}
        return sum(alive.values())


def test_saved_activations_are_freed_after_backward_and_without_backward(backend):
    """Saved activations die at backward, not with the outputs the caller still holds; and
    a graph that is never run frees them as soon as its outputs go, without the cycle
    collector (no reference cycles through ctx)."""
    fast = FastBiLSTM(3, 8, num_layers=2, backend=backend)
    user_tensors = list(fast.parameters())
    x = torch.randn(40, 4, 3, requires_grad=True)
    activations = 40 * 4 * 2 * (4 * 8) * 4  # the gates alone, per layer

    with SavedTensors() as saved:
        out, (h_n, c_n) = fast(x)
    assert saved.alive([x, *user_tensors]) > activations
    (out.sum() + h_n.sum()).backward()
    assert saved.alive([x, *user_tensors]) == 0  # while out, h_n, c_n are still held

    gc.collect()
    gc.disable()
    try:
        with SavedTensors() as saved:
            out, (h_n, c_n) = fast(x)
        assert saved.alive([x, *user_tensors]) > activations
        del out, h_n, c_n
        assert saved.alive([x, *user_tensors]) == 0
    finally:
        gc.enable()


@pytest.mark.slow
def test_training_loop_memory_holds_steady(backend):
    """Training steps (forward, backward, optimizer step) leave nothing behind but the
    gradients: every tensor a step creates, ~7 MB of activations here, is freed by the end of
    it (an exact count, so the bound is 0 bytes), and every step does the same work."""
    torch.manual_seed(0)
    model = FastBiLSTM(16, 64, num_layers=2, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(4, 256, 16)  # T=4, B=256: few steps, a sizeable batch

    def step():
        opt.zero_grad(set_to_none=True)
        with SavedTensors() as saved:
            out, (h_n, c_n) = model(x)
        (out.square().mean() + h_n.sum()).backward()
        opt.step()
        return saved.bytes()

    step()  # first step allocates the .grad tensors
    ops_per_step = []
    for _ in range(4):
        with TensorLedger() as ledger:
            saved_bytes = step()
        ops_per_step.append(len(ledger.records))
        grads = [p.grad for p in model.parameters()]
        assert saved_bytes > 5e6  # the activations the check is about
        assert ledger.alive_bytes(expected=[*model.parameters(), *grads, x]) == 0
    assert len(set(ops_per_step)) == 1, ops_per_step
