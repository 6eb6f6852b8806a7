"""What the tests share: tolerances, the nn.LSTM/FastBiLSTM pair, the forward-and-all-gradients
helper. Fixtures (`backend`) and markers (cuda, slow, interpreter) are in conftest.py.

Imported as `from helpers import ...`: tests/ is not a package, so pytest (default "prepend"
import mode) puts tests/ itself on sys.path.
"""
import functools
import importlib.util
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from bilstm_fast import FastBiLSTM

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------ tolerances
# FastBiLSTM against nn.LSTM in the same dtype, on any backend unless BACKEND_TOL says otherwise.
# fp32: both implementations round differently (GEMM blocking, summation order of the weight
#   gradients over T*B terms), so they agree to a few ulps of the largest values: rtol=1e-5 with
#   atol=1e-6 (outputs are O(1), gradients O(1)-O(10) in these tests).
# fp64: the same math must agree to 1e-10: any formula difference would show up at 1e-3 or worse.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
}

# Per backend, where its rounding differs by design. Triton (tests/test_triton.py, kernels
# against the float64 loop reference fed the same rounded inputs; values are O(1)):
# fp32: 32-term dots and a few steps of gate math, each rounding 6e-8: a few ulps (3.7e-7 seen),
#   within the project's 1e-5.
# fp16: h, out and gates are stored in fp16 at every step (ulp 9.8e-4 at 1.0) and h feeds the
#   next step: about one ulp seen (8.8e-4); 5e-3 is five ulps.
# fp64: the same formulas in fp64, only reassociation (1e-15 seen).
BACKEND_TOL = {
    "triton": {
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.float16: dict(rtol=5e-3, atol=5e-3),
        torch.float64: dict(rtol=1e-10, atol=1e-12),
    },
}


def tol(dtype, backend=None):
    """rtol/atol for comparing `backend`'s results in `dtype` (see the tables above)."""
    return BACKEND_TOL.get(backend, {}).get(dtype) or TOL[dtype]


def assert_all_close(fast_results, ref_results, dtype, backend=None):
    """Element-wise comparison of two equally long lists of results at tol(dtype, backend)."""
    assert len(fast_results) == len(ref_results)
    for k, (f, r) in enumerate(zip(fast_results, ref_results)):
        torch.testing.assert_close(f, r, **tol(dtype, backend), msg=lambda m: f"result {k}: {m}")


# ------------------------------------------------------------------ nn.LSTM under bf16 autocast
# Under CPU bf16 autocast torch hands an fp32 nn.LSTM to oneDNN's LSTM (the input is fp32 when it
# checks) and autocast casts it to bf16 there. oneDNN has no bf16 LSTM on a CPU without AVX-512
# (an AVX2-only one such as AMD Zen3), so nn.LSTM raises "could not create a primitive descriptor
# for the LSTM forward propagation primitive". A `.bfloat16()` nn.LSTM checks the CPU first and
# takes ATen's path instead, as nn.LSTM does under autocast everywhere for packed input and
# proj_size: bf16 GEMMs (autocast's linear), cell state, h and outputs in fp32.
NN_LSTM_BF16_AUTOCAST_MISSING = ("nn.LSTM raises under CPU bf16 autocast on this CPU: oneDNN has no bf16 LSTM "
                                 "without AVX-512")
ONEDNN_REFUSED = "could not create a primitive descriptor"


def nn_lstm_under_bf16_autocast():
    """What a small fp32 nn.LSTM gives under CPU bf16 autocast now: its output dtype (bf16 from
    oneDNN; fp32 with torch.backends.mkldnn off) or ONEDNN_REFUSED. Draws no random numbers."""
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return nn.LSTM(4, 3)(torch.zeros(2, 1, 4))[0].dtype
        except RuntimeError as error:
            if ONEDNN_REFUSED not in str(error):
                raise
            return ONEDNN_REFUSED


@functools.cache
def nn_lstm_bf16_autocast_available():
    """Whether nn.LSTM runs under CPU bf16 autocast on this CPU (see above)."""
    return nn_lstm_under_bf16_autocast() != ONEDNN_REFUSED


def nn_lstm_bf16_autocast():
    """The context to run nn.LSTM under CPU bf16 autocast in, for a reference: none where its
    oneDNN bf16 LSTM runs; elsewhere oneDNN off, for nn.LSTM's own ATen path (the one it takes on
    packed input on every CPU). Through flags(): torch's test utilities, once imported, forbid
    setting torch.backends.mkldnn.enabled directly."""
    return nullcontext() if nn_lstm_bf16_autocast_available() else torch.backends.mkldnn.flags(enabled=False)


# ---------------------------------------------------------------------------------------- backends

def every_backend():
    """Every backend that runs here, for tests of the drop-in promise (which holds whichever
    backend a user picks): the CPU ones, and Triton under TRITON_INTERPRET=1 (marked
    `interpreter`). The module that uses it sets TRITON_INTERPRET before Triton is imported."""
    import pytest

    from bilstm_fast.kernels import available_backends, triton_available

    names = available_backends("cpu")
    if triton_available() and "triton" not in names:
        names.append("triton")
    return [pytest.param(name, marks=pytest.mark.interpreter) if name == "triton" else name for name in names]


def interpreted_triton(what):
    """kernels.triton_recurrence running under TRITON_INTERPRET=1, for a test module that needs
    the interpreter itself (`what` names it in the skip reason): the module is skipped on a GPU
    machine, where the kernels run for real, and where triton is missing. triton.jit decides
    between compiling and interpreting when a kernel is defined, so a module imported compiled
    by an earlier test is reloaded (see test_triton.py)."""
    import importlib
    import os

    import pytest

    if torch.cuda.is_available():
        pytest.skip(f"{what}: CPU only (a GPU runs the kernels for real)", allow_module_level=True)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] != "1":
        pytest.skip("TRITON_INTERPRET is set to something other than 1", allow_module_level=True)
    pytest.importorskip("triton")
    from bilstm_fast.kernels import triton_recurrence

    return triton_recurrence if triton_recurrence.INTERPRET else importlib.reload(triton_recurrence)


# ---------------------------------------------------------------------------------------- models

def make_pair(I, H, layers=1, dtype=torch.float32, *, bias=True, batch_first=False, bidirectional=True,
              backend="auto", seed=0):
    """nn.LSTM drawn from torch.manual_seed(seed), and FastBiLSTM on `backend` with its weights."""
    torch.manual_seed(seed)
    ref = nn.LSTM(I, H, num_layers=layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                  dtype=dtype)
    return ref, FastBiLSTM.from_lstm(ref, backend=backend, copy=True)


def leaf(t):
    """A fresh leaf copy of t that requires grad."""
    return t.detach().clone().requires_grad_()


# ------------------------------------------------------------------------ forward and gradients

def forward_backward(model, x, hx=None, leaves=()):
    """[output, h_n, c_n, *gradients]: the gradients, w.r.t. `leaves` and every parameter that
    requires grad, of a loss that weights each output element differently (a transposed or
    misplaced gradient cannot cancel out) and touches both final states. A PackedSequence
    output comes back padded (batch-first as the model is)."""
    out, (h_n, c_n) = model(x, hx)
    if isinstance(out, PackedSequence):
        out = pad_packed_sequence(out, batch_first=getattr(model, "batch_first", False))[0]
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    loss = (out * weights).sum() + (h_n * 0.5).sum() + (c_n * c_n).sum()
    trained = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [*leaves, *trained])
    return [out, h_n, c_n, *grads]


# ------------------------------------------------------------------------------------ scripts

def load_script(relative_path, name):
    """A script of the checkout (e.g. benchmarks/run.py) imported from its path as module `name`:
    the tests import the installed package, and benchmarks/ is not part of it."""
    spec = importlib.util.spec_from_file_location(name, REPO / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def torch_threads(n):
    """torch's intra-op thread count set to n inside the block (None: left as it is), restored after."""
    saved = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
