"""Vectorized recurrence: pure PyTorch ops, any device. The CPU path and the fallback everywhere.

Both directions advance in lockstep: step s runs direction 0 at time s and direction 1 at time
T-1-s, as one batched matmul over a leading lane axis. Time is indexed, never flipped.

Implements the recurrence contract in contract.py (recurrence_forward, recurrence_backward).

Why it is written this way (measured on CPU, see benchmarks/NOTES.md): with both directions in
one contiguous [T, B, D, F] buffer, the two slices that step s touches (direction 0 at time s,
direction 1 at time T-1-s) are always one strided view with a positive lane stride, once the
lanes are put in the order of their addresses (`lane_view`). So every step reads and writes the
saved buffers in place, one op per gate formula for both directions, with no stack/scatter
copies; lanes run in reverse direction order in the second half of the sweep, and the state and
weights follow them. tanh is the exception: it runs on small contiguous scratch tensors, because
torch's float tanh on a strided view is ~5x slower with 2+ threads. Padded steps (lengths) are
masked by selection (torch.where), never by multiplying: 0 * inf would be NaN.
"""
import torch

from .contract import state_dtype  # bilstm_fast/ops.py imports it from here too


def valid_mask(lengths, T):
    """[T, B] bool: t < lengths[b]."""
    return torch.arange(T, device=lengths.device).unsqueeze(1) < lengths.unsqueeze(0)


def lane_view(buf, s):
    """The slices of a contiguous [T, B, D, ...] buffer that lockstep step s touches, as one view.

    Returns (view [D, B, ...], reversed): lanes are in address order, which is direction order
    (0 at time s, 1 at time T-1-s) while s <= (T-1)/2 and reversed after that, since a view
    cannot have a negative stride.
    """
    T, B, D = buf.shape[:3]
    rest_size, rest_stride = buf.shape[3:], buf.stride()[3:]
    if D == 1:
        return buf[s].transpose(0, 1), False
    time_stride, dir_stride = buf.stride(0), buf.stride(2)
    reverse = 2 * s > T - 1
    (t_first, d_first), (t_second, d_second) = ((T - 1 - s, 1), (s, 0)) if reverse else ((s, 0), (T - 1 - s, 1))
    lane_stride = (t_second - t_first) * time_stride + (d_second - d_first) * dir_stride
    offset = buf.storage_offset() + t_first * time_stride + d_first * dir_stride
    return buf.as_strided((2, B, *rest_size), (lane_stride, buf.stride(1), *rest_stride), offset), reverse


def both_orders(t):
    """(t, t with its lanes reversed): per-direction tensors in either lane order."""
    return t, t.flip(0)


def in_order(t, reverse, was_reverse):
    """Re-order a lane-ordered state when the lane order changes (once, mid-sweep)."""
    return t.flip(0) if reverse != was_reverse else t


def recurrence_forward(gx, w_hh, h0, c0, lengths=None, save=True):
    T, B, D, G = gx.shape
    H = G // 4
    # contiguous W_hh^T: the GEMM runs ~20% faster than on the transposed view
    w_t = both_orders(w_hh.transpose(1, 2).contiguous())  # [D, H, 4H]
    sdtype = state_dtype(gx.dtype)
    out = gx.new_empty(T, B, D, H)
    if save:
        gates = gx.clone(memory_format=torch.contiguous_format)  # gx + h W^T, then activated, in place
        cs = gx.new_empty(T, B, D, H, dtype=sdtype)
    else:  # inference: one step of gates at a time, no cell-state history
        gates = cs = None
        gx = gx.contiguous()  # lane_view needs standard strides
        step_gates = gx.new_empty(D, B, G)
    # tanh runs on contiguous scratch only: on a strided view torch's float tanh makes one MKL
    # VML call per row, and with 2+ threads each call costs 3x (see benchmarks/NOTES.md)
    g_act = gx.new_empty(D, B, H)
    # ping-pong: step s writes cells[s % 2]
    cells = (gx.new_empty(D, B, H, dtype=sdtype), gx.new_empty(D, B, H, dtype=sdtype))
    tanh_c = gx.new_empty(D, B, H, dtype=sdtype)
    valid = None
    if lengths is not None:
        valid = valid_mask(lengths, T).unsqueeze(-1).expand(T, B, D).contiguous()  # [T, B, D]
        zero = torch.zeros((), dtype=gx.dtype, device=gx.device)
    h, c = h0.to(gx.dtype), c0.to(sdtype)
    was_reverse = False
    for s in range(T):
        source, reverse = lane_view(gates if save else gx, s)  # [D, B, 4H]
        h, c = in_order(h, reverse, was_reverse), in_order(c, reverse, was_reverse)
        was_reverse = reverse
        if save:  # the saved gates are formed in place
            b_gates = source.baddbmm_(h, w_t[reverse])
        else:
            b_gates = torch.baddbmm(source, h, w_t[reverse], out=step_gates)
        b_gates[..., : 2 * H].sigmoid_()
        b_gates[..., 3 * H :].sigmoid_()
        i, f, g, o = b_gates.chunk(4, dim=-1)
        g_act.copy_(g).tanh_()
        if save:
            g.copy_(g_act)
        c_new = cells[s % 2]
        torch.mul(f, c, out=c_new)
        c_new.addcmul_(i, g_act)  # in c's (>= fp32) precision
        if valid is not None:
            m = lane_view(valid, s)[0].unsqueeze(-1)  # [D, B, 1]
            torch.where(m, c_new, c, out=c_new)  # past its end a sequence carries its state
        if save:
            lane_view(cs, s)[0].copy_(c_new)
        torch.tanh(c_new, out=tanh_c)
        b_out = lane_view(out, s)[0]
        if valid is None:
            torch.mul(o, tanh_c, out=b_out)
            h = b_out
        else:
            h_new = (o * tanh_c).to(gx.dtype)
            torch.where(m, h_new, zero, out=b_out)  # select, not multiply: 0 * inf would be NaN
            h = torch.where(m, h_new, h)
        c = c_new
    # fresh tensors in direction order: outputs must not alias each other
    h_n = (h.flip(0) if was_reverse else h).clone(memory_format=torch.contiguous_format)
    c_n = (c.flip(0) if was_reverse else c).to(gx.dtype, memory_format=torch.contiguous_format, copy=True)
    return out, h_n, c_n, gates, cs


def recurrence_backward(dout, dh_n, dc_n, w_hh, gates, cs, c0, lengths=None):
    T, B, D, G = gates.shape
    H = G // 4
    acc = state_dtype(gates.dtype)
    # lane_view needs standard strides; free for this backend's own forward outputs
    gates, cs, dout = gates.contiguous(), cs.contiguous(), dout.contiguous()
    w = both_orders(w_hh.to(acc).contiguous())  # [D, 4H, H]
    dgates = gates.new_empty(T, B, D, G)
    # the gate gradients are formed in acc precision: in dgates itself when it has that dtype
    scratch = None if dgates.dtype == acc else dgates.new_empty(D, B, G, dtype=acc)
    # d(activation)/d(pre-activation) from the activation a: a(1-a) for sigmoid, 1-a^2 for tanh,
    # both as a*(sig - a) + (1 - sig) with sig = 1 on the sigmoid columns (i, f, o), 0 on g
    sig = torch.ones(G, dtype=acc, device=gates.device)
    sig[2 * H : 3 * H] = 0
    not_sig = 1 - sig
    one = torch.ones((), dtype=acc, device=gates.device)
    zero = torch.zeros((), dtype=acc, device=gates.device)
    deriv = gates.new_empty(D, B, G, dtype=acc)
    tanh_c = cs.new_empty(D, B, H)  # contiguous: see the forward's note on tanh
    valid = None
    if lengths is not None:
        valid = valid_mask(lengths, T).unsqueeze(-1).expand(T, B, D).contiguous()  # [T, B, D]
    dh, dc = dh_n.to(acc), dc_n.to(acc)
    c0 = c0.to(acc)
    was_reverse = False
    for s in reversed(range(T)):
        b_gates, reverse = lane_view(gates, s)
        dh, dc = in_order(dh, reverse, was_reverse), in_order(dc, reverse, was_reverse)
        was_reverse = reverse
        a = b_gates.to(acc)  # [D, B, 4H]
        i, f, g, o = a.chunk(4, dim=-1)
        c = lane_view(cs, s)[0]
        if s > 0:
            c_prev, prev_reverse = lane_view(cs, s - 1)
            c_prev = in_order(c_prev, reverse, prev_reverse)
        else:
            c_prev = c0  # step 0 is never reversed
        d_out = lane_view(dout, s)[0]
        m = None if valid is None else lane_view(valid, s)[0].unsqueeze(-1)  # [D, B, 1]
        dh_t = dh + (d_out if m is None else torch.where(m, d_out, zero))
        tanh_c.copy_(c).tanh_()
        dc_t = torch.addcmul(dc, dh_t * o, torch.addcmul(one, tanh_c, tanh_c, value=-1))
        b_dgates = lane_view(dgates, s)[0] if scratch is None else scratch
        d_i, d_f, d_g, d_o = b_dgates.chunk(4, dim=-1)
        torch.mul(dc_t, g, out=d_i)
        torch.mul(dc_t, c_prev, out=d_f)
        torch.mul(dc_t, i, out=d_g)
        torch.mul(dh_t, tanh_c, out=d_o)
        torch.sub(sig, a, out=deriv)
        torch.addcmul(not_sig, a, deriv, out=deriv)
        b_dgates.mul_(deriv)
        dc_prev = dc_t * f
        if m is not None:
            # past its end a sequence is untouched: no gate gradient, the state gradient passes
            torch.where(m, b_dgates, zero, out=b_dgates)
            dc_prev = torch.where(m, dc_prev, dc)
        dh_prev = torch.bmm(b_dgates, w[reverse])  # [D, B, H]
        if m is not None:
            dh_prev = torch.where(m, dh_prev, dh)
        if scratch is not None:
            lane_view(dgates, s)[0].copy_(scratch)
        dh, dc = dh_prev, dc_prev
    if was_reverse:
        dh, dc = dh.flip(0), dc.flip(0)
    return dgates, dh.contiguous(), dc.contiguous()
