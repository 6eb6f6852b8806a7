"""The recurrence as torch.library custom ops, so torch.compile sees one opaque, well-typed op
per direction sweep (no graph break) instead of tracing into a Python time loop or a Triton
launcher. The GEMMs around the recurrence stay ordinary torch ops that the compiler can fuse.
The fake implementations give the compiler (and the meta device) output shapes and dtypes
without running anything; the vmap rules let torch.func transforms (jacrev, vmap) batch them.

Projection (proj_size > 0, `w_hr`) is an optional extra of the backend contract: a backend
module that sets `SUPPORTS_PROJECTION = True` receives `w_hr=` (in its PROJECTION_DTYPES, if it
lists them); layers with a projection on any other backend or dtype run on the vectorized one.
"""
from typing import Optional

import torch
from torch import Tensor

from bilstm_fast.kernels import recurrence_module, resolve_backend
from bilstm_fast.kernels.vectorized import state_dtype


def _backend(backend, device, dtype, w_hr):
    rec = recurrence_module(resolve_backend(backend, device, dtype))
    if w_hr is not None and not (
        getattr(rec, "SUPPORTS_PROJECTION", False) and dtype in getattr(rec, "PROJECTION_DTYPES", (dtype,))
    ):
        rec = recurrence_module("vectorized")
    return rec


def _gates_dtype(backend, device, dtype, w_hr):
    """The dtype a backend saves the gates in (contract.py `gates_dtype`; the input dtype by default)."""
    rec = _backend(backend, device, dtype, w_hr)
    return rec.gates_dtype(dtype) if hasattr(rec, "gates_dtype") else dtype


def _forward(gx, w_hh, h0, c0, lengths, backend, w_hr, save):
    rec = _backend(backend, gx.device, gx.dtype, w_hr)
    if w_hr is None:  # the base contract, unchanged for backends without projection
        return rec.recurrence_forward(gx, w_hh, h0, c0, lengths, save=save)
    return rec.recurrence_forward(gx, w_hh, h0, c0, lengths, save=save, w_hr=w_hr)


@torch.library.custom_op("bilstm_fast::recurrence_forward", mutates_args=())
def recurrence_forward(
    gx: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor, lengths: Optional[Tensor], backend: str,
    w_hr: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward(gx, w_hh, h0, c0, lengths, backend, w_hr, save=True)


@recurrence_forward.register_fake
def _(gx, w_hh, h0, c0, lengths, backend, w_hr=None):
    T, B, D, G = gx.shape
    H = G // 4
    P = h0.shape[-1]  # = H without projection
    out = gx.new_empty(T, B, D, P)
    gates = gx.new_empty(T, B, D, G, dtype=_gates_dtype(backend, gx.device, gx.dtype, w_hr))
    cs = gx.new_empty(T, B, D, H, dtype=state_dtype(gx.dtype))
    return out, gx.new_empty(D, B, P), gx.new_empty(D, B, H), gates, cs


@torch.library.custom_op("bilstm_fast::recurrence_inference", mutates_args=())
def recurrence_inference(
    gx: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor, lengths: Optional[Tensor], backend: str,
    w_hr: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The forward when nothing needs a gradient: no gates or cell states kept for a backward."""
    out, h_n, c_n, _, _ = _forward(gx, w_hh, h0, c0, lengths, backend, w_hr, save=False)
    return out, h_n, c_n


@recurrence_inference.register_fake
def _(gx, w_hh, h0, c0, lengths, backend, w_hr=None):
    T, B, D, G = gx.shape
    H, P = G // 4, h0.shape[-1]
    return gx.new_empty(T, B, D, P), gx.new_empty(D, B, P), gx.new_empty(D, B, H)


@torch.library.custom_op("bilstm_fast::recurrence_backward", mutates_args=())
def recurrence_backward(
    dout: Tensor,
    dh_n: Tensor,
    dc_n: Tensor,
    w_hh: Tensor,
    gates: Tensor,
    cs: Tensor,
    c0: Tensor,
    lengths: Optional[Tensor],
    backend: str,
    w_hr: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> dgates, dh0, dc0, dh: with a projection, dh [T, B, D, P] is the gradient of each
    step's projected hidden state (for W_hr's gradient); without one an empty tensor."""
    return _backward(dout, dh_n, dc_n, w_hh, gates, cs, c0, lengths, backend, w_hr)


def _backward(dout, dh_n, dc_n, w_hh, gates, cs, c0, lengths, backend, w_hr):
    rec = _backend(backend, gates.device, gates.dtype, w_hr)
    if w_hr is None:
        dgates, dh0, dc0 = rec.recurrence_backward(dout, dh_n, dc_n, w_hh, gates, cs, c0, lengths)
        return dgates, dh0, dc0, gates.new_empty(0)
    return rec.recurrence_backward(dout, dh_n, dc_n, w_hh, gates, cs, c0, lengths, w_hr=w_hr)


@recurrence_backward.register_fake
def _(dout, dh_n, dc_n, w_hh, gates, cs, c0, lengths, backend, w_hr=None):
    acc = state_dtype(gates.dtype)
    dh = gates.new_empty(0) if w_hr is None else dout.new_empty(dout.shape, dtype=gates.dtype)
    dh0, dc0 = dh_n.new_empty(dh_n.shape, dtype=acc), dc_n.new_empty(dc_n.shape, dtype=acc)
    return gates.new_empty(gates.shape), dh0, dc0, dh


def _vmap_by_loop(op):
    """vmap rule: run the op once per batch entry and stack."""

    def rule(info, in_dims, *args):
        per_call = []
        for k in range(info.batch_size):
            call = [a if d is None else a.select(d, k) for a, d in zip(args, in_dims)]
            per_call.append(op(*call))
        outputs = tuple(torch.stack(parts) for parts in zip(*per_call))
        return outputs, (0,) * len(outputs)

    return rule


def _vmap_by_folding(op, arg_axes):
    """vmap rule: fold the vmap batch into the recurrence's own batch axis B, one call for all.
    Batch entry k of N takes rows k*B .. k*B+B-1 of the N*B rows (B the axis `arg_axes` names
    in each argument, None where an argument has none; every result has it at 1); unbatched
    arguments are repeated N times.
    The backward is linear in its cotangents given the saved forward state, and the forward's
    rows are independent, so this is exact. Cost: the saved state (gates, cs) is copied N times
    when only the cotangents are batched, as jacobian/jacrev/is_grads_batched batch them; and
    each result is copied once into the vmap layout. A batched weight (an ensemble vmapped over
    its parameters) cannot fold: one call per batch entry."""
    loop = _vmap_by_loop(op)

    def rule(info, in_dims, *args):
        if any(d is not None and axis is None for d, axis in zip(in_dims, arg_axes)):
            return loop(info, in_dims, *args)
        n = info.batch_size
        d0 = in_dims[0]  # gx's or dout's [T, B, ...] gives B
        B = args[0].shape[1 + (d0 is not None and d0 <= 1)]
        folded = [a if axis is None or a is None else _fold(a, d, axis, n)
                  for a, d, axis in zip(args, in_dims, arg_axes)]
        outputs = tuple(
            o if o.numel() == 0 else o.unflatten(1, (n, B)).movedim(1, 0).contiguous() for o in op(*folded)
        )
        return outputs, tuple(None if o.numel() == 0 else 0 for o in outputs)  # empty: the unused dh

    return rule


def _fold(a, d, axis, n):
    """a (vmap batch dimension d, or None) -> its unbatched layout with the batch folded into
    `axis`, batch entry outermost: [.., n*B, ..]."""
    if d is None:
        a = a.unsqueeze(axis).expand(*a.shape[:axis], n, *a.shape[axis:])
    else:
        a = a.movedim(d, axis)
    return a.flatten(axis, axis + 1)


# the B axis of each argument: [T, B, ...] tensors 1, [D, B, ...] states 1, lengths 0
_FORWARD_AXES = (1, None, 1, 1, 0, None, None)  # gx, w_hh, h0, c0, lengths, backend, w_hr
torch.library.register_vmap(recurrence_forward, _vmap_by_folding(recurrence_forward, _FORWARD_AXES))
torch.library.register_vmap(recurrence_inference, _vmap_by_folding(recurrence_inference, _FORWARD_AXES))
torch.library.register_vmap(
    recurrence_backward,
    # dout, dh_n, dc_n, w_hh, gates, cs, c0, lengths, backend, w_hr
    _vmap_by_folding(recurrence_backward, (1, 1, 1, None, 1, 1, 1, 0, None, None)),
)


def eager():
    """Whether the custom ops can be skipped for a direct call of the backend: plain eager
    execution, where their dispatch (a few tens of microseconds per call) is pure overhead.
    torch.compile/export, jit.trace and torch.func transforms need the ops themselves."""
    return not (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._functorch.maybe_current_level() is not None
    )


def fused_backend(backend, x, w_hr):
    """The backend module, when it projects the input itself (`layer_forward`, an optional extra
    of the contract) and the call is plain eager without a projection; else None."""
    if w_hr is not None or not eager() or x.device.type == "meta":
        return None
    rec = recurrence_module(resolve_backend(backend, x.device, x.dtype))
    return rec if hasattr(rec, "layer_forward") else None


def forward(gx, w_hh, h0, c0, lengths, backend, w_hr=None):
    if eager() and gx.device.type != "meta":
        return _forward(gx, w_hh, h0, c0, lengths, backend, w_hr, save=True)
    return recurrence_forward(gx, w_hh, h0, c0, lengths, backend, w_hr)


def inference(gx, w_hh, h0, c0, lengths, backend, w_hr=None):
    if eager() and gx.device.type != "meta":
        return _forward(gx, w_hh, h0, c0, lengths, backend, w_hr, save=False)[:3]
    return recurrence_inference(gx, w_hh, h0, c0, lengths, backend, w_hr)


def backward(dout, dh_n, dc_n, w_hh, gates, cs, c0, lengths, backend, w_hr=None):
    if eager() and gates.device.type != "meta":
        return _backward(dout, dh_n, dc_n, w_hh, gates, cs, c0, lengths, backend, w_hr)
    return recurrence_backward(dout, dh_n, dc_n, w_hh, gates, cs, c0, lengths, backend, w_hr)
