"""The recurrence as torch.library custom ops, so torch.compile sees one opaque, well-typed op
per direction sweep (no graph break) instead of tracing into a Python time loop or a Triton
launcher. The GEMMs around the recurrence stay ordinary torch ops that the compiler can fuse.
The fake implementations give the compiler output shapes and dtypes without running anything.
"""
from typing import Optional

import torch
from torch import Tensor

from bilstm_fast.kernels import recurrence_module, resolve_backend
from bilstm_fast.kernels.vectorized import state_dtype


@torch.library.custom_op("bilstm_fast::recurrence_forward", mutates_args=())
def recurrence_forward(
    gx: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor, lengths: Optional[Tensor], backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    rec = recurrence_module(resolve_backend(backend, gx.device, gx.dtype))
    return rec.recurrence_forward(gx, w_hh, h0, c0, lengths)


@recurrence_forward.register_fake
def _(gx, w_hh, h0, c0, lengths, backend):
    T, B, D, G = gx.shape
    H = G // 4
    out = gx.new_empty(T, B, D, H)
    gates = gx.new_empty(T, B, D, G)
    cs = gx.new_empty(T, B, D, H, dtype=state_dtype(gx.dtype))
    return out, gx.new_empty(D, B, H), gx.new_empty(D, B, H), gates, cs


@torch.library.custom_op("bilstm_fast::recurrence_inference", mutates_args=())
def recurrence_inference(
    gx: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor, lengths: Optional[Tensor], backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """The forward when nothing needs a gradient: no gates or cell states kept for a backward."""
    rec = recurrence_module(resolve_backend(backend, gx.device, gx.dtype))
    out, h_n, c_n, _, _ = rec.recurrence_forward(gx, w_hh, h0, c0, lengths, save=False)
    return out, h_n, c_n


@recurrence_inference.register_fake
def _(gx, w_hh, h0, c0, lengths, backend):
    T, B, D, G = gx.shape
    H = G // 4
    return gx.new_empty(T, B, D, H), gx.new_empty(D, B, H), gx.new_empty(D, B, H)


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
) -> tuple[Tensor, Tensor, Tensor]:
    rec = recurrence_module(resolve_backend(backend, gates.device, gates.dtype))
    return rec.recurrence_backward(dout, dh_n, dc_n, w_hh, gates, cs, c0, lengths)


@recurrence_backward.register_fake
def _(dout, dh_n, dc_n, w_hh, gates, cs, c0, lengths, backend):
    acc = state_dtype(gates.dtype)
    return gates.new_empty(gates.shape), dh_n.new_empty(dh_n.shape, dtype=acc), dc_n.new_empty(dc_n.shape, dtype=acc)
