"""Native CPU recurrence: the C++ extension `_native` (kernels/csrc/, one file per seam, listed in
native.h), built ahead of time by setup.py. The recurrence contract of kernels/contract.py, for fp32,
fp64, bf16 and fp16 CPU tensors.

Each direction of a layer (and, with more threads than directions, each slice of batch rows) is
one task; all tasks run at once in one fork/join per call and sweep their steps without waiting
for each other. A step is one GEMM (ATen's cpublas brgemm on the recurrent weight packed once per
call where that measured faster, else ATen's mm: MKL where torch has it) and one fused SIMD loop
for the gate math, the cell and hidden update and every store. See the C++ file for the details.

It implements the contract's optional projection extra (SUPPORTS_PROJECTION, `w_hr=`): with a
projection a step is one more GEMM each way, h = (o * tanh(c)) @ W_hr^T forward and its
transpose backward, around the same fused loops.

A unidirectional stack can come in one call (stack_forward, stack_backward; kernels/csrc/stack.cpp):
its layers then run as the stages of a wavefront, or every layer split by batch rows without a
join between layers, as bilstm_fast/stack.py chooses.

Results are bitwise identical run to run at a given thread count. Across thread counts they can
differ in the last bits when the batch split changes (a different number of rows per GEMM).
"""
import os

import torch

from .contract import state_dtype


def _load():
    """(the compiled module or None, why it is not available)."""
    if os.environ.get("BILSTM_FAST_NO_NATIVE", "") not in ("", "0"):
        return None, "BILSTM_FAST_NO_NATIVE is set"
    try:
        from bilstm_fast.kernels import _native
    except ImportError as exc:  # not built (no compiler at install time) or not loadable here
        return None, f"the compiled extension bilstm_fast.kernels._native did not import ({exc})"
    return _native, None


_native, UNAVAILABLE_REASON = _load()

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# bf16 and fp16 (see kernels/csrc/activations.h): GEMM operands in the input dtype with fp32
# accumulation, gates, cell state and nonlinearities in fp32, h rounded to the input dtype where
# the next step's GEMM reads it. The saved gates and the gate gradients stay in fp32
# (gates_dtype), so the weight and bias gradients are formed from unrounded values.

SUPPORTS_PROJECTION = True  # the optional projection extra of the contract (contract.py),
PROJECTION_DTYPES = (torch.float32, torch.float64)  # in these dtypes; bf16/fp16 layers with one run vectorized


def gates_dtype(dtype):
    """The dtype of the saved gates and of the gate gradients (contract.py)."""
    return state_dtype(dtype)


def available():
    """Whether the compiled extension loaded."""
    return _native is not None


def supports(device, dtype):
    """Whether this backend runs tensors of this device and dtype."""
    return available() and device.type == "cpu" and dtype in DTYPES


def simd_level():
    return _native.simd_level() if _native is not None else None


def bf16_gemm():
    """How bf16 step GEMMs run on this CPU (for the benchmark's machine line), or None unbuilt."""
    if _native is None:
        return None
    if _native.vnni_brgemm():
        return "oneDNN brgemm on VNNI-packed weights"
    return "fp32 GEMM on widened operands (no bf16 brgemm here)"


def recurrence_forward(gx, w_hh, h0, c0, lengths=None, save=True, w_hr=None):
    out, h_n, c_n, gates, cs = _native.recurrence_forward(gx, w_hh, h0, c0, lengths, save, w_hr)
    if not save:
        gates = cs = None
    return out, h_n, c_n, gates, cs


def layer_forward(x, w_ih, bias, w_hh, h0, c0, lengths=None, save=True):
    """recurrence_forward from x itself: each task projects its own rows a block of steps at a
    time (the optional extra `layer_forward` of kernels/contract.py)."""
    out, h_n, c_n, gates, cs = _native.layer_forward(x, w_ih, bias, w_hh, h0, c0, lengths, save)
    if not save:
        gates = cs = None
    return out, h_n, c_n, gates, cs


def layer_gradients(dgates, x, h_prev, w_ih, need_dx, need_w_ih, need_w_hh, need_bias):
    """dx and per direction dW_ih, dW_hh, db (the optional extra `layer_gradients` of
    kernels/contract.py): [dx, dW_ih[0], dW_hh[0], db[0], dW_ih[1], ...], None where not needed."""
    return _native.layer_gradients(dgates, x, h_prev, w_ih, need_dx, need_w_ih, need_w_hh, need_bias)


def recurrence_backward(dout, dh_n, dc_n, w_hh, gates, cs, c0, lengths=None, w_hr=None):
    """-> dgates, dh0, dc0, and with a projection (w_hr) the gradient dh [T, B, D, P] too."""
    return tuple(_native.recurrence_backward(dout, dh_n, dc_n, w_hh, gates, cs, c0, lengths, w_hr))


def stack_forward(x, w_ih, bias, w_hh, h0, c0, lengths, save, masks, groups):
    """A unidirectional stack of L layers in one call, the layers as concurrent stages of a
    wavefront (the optional extra `stack_forward` of kernels/contract.py; kernels/csrc/stack.cpp).
    Per layer w_ih [4H, I_l], w_hh [4H, H] and bias [4H] (the summed bias; None: no bias);
    h0, c0 [L, B, H]; masks: None or L - 1 dropout masks [T, B, H]; groups: the stages the
    layers are cut into (1: every layer split by batch rows, with no barrier between layers).
    -> per-layer lists outs [T, B, 1, H], gates and cs (None without save), dropped inputs of
    layers 1..L-1 (empty without masks); and h_n, c_n [L, B, H]."""
    L = len(w_ih)
    h_n, c_n, *rest = _native.stack_forward(x, w_ih, [] if bias is None else bias, w_hh, h0, c0, lengths, save,
                                            masks or [], groups)
    outs, rest = rest[:L], rest[L:]
    gates = cs = None
    if save:
        gates, cs, rest = rest[:L], rest[L:2 * L], rest[2 * L:]
    return outs, h_n, c_n, gates, cs, rest


def stack_backward(dout, dh_n, dc_n, w_ih, w_hh, gates, cs, c0, lengths, masks, groups):
    """The recurrences of stack_forward's backward, the layers as a wavefront again, top first
    (the optional extra `stack_backward`): dout [T, B, H] the top layer's, dh_n, dc_n, c0
    [L, B, H], per-layer lists w_ih, w_hh and the saved gates and cs; masks as stack_forward's.
    -> per-layer dgates [T, B, 1, 4H], and dh0, dc0 [L, B, H]. The weight gradients are
    layer_gradients' GEMMs after it, per layer."""
    dh0, dc0, *dgates = _native.stack_backward(dout, dh_n, dc_n, w_ih, w_hh, gates, cs, c0, lengths, masks or [],
                                               groups)
    return dgates, dh0, dc0
