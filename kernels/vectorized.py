"""Vectorized recurrence: pure PyTorch ops, any device. The CPU path and the fallback everywhere.

Both directions advance in lockstep: step s runs direction 0 at time s and direction 1 at time
T-1-s, as one batched matmul over a leading direction axis. Time is indexed, never flipped.

Recurrence contract (shared with the Triton backend; the input projection and the weight,
bias and input gradients are large GEMMs done by the caller, see bilstm_fast/function.py):

    recurrence_forward(gx, w_hh, h0, c0, lengths) -> out, h_n, c_n, gates, cs
        gx      [T, B, D, 4H]  x @ W_ih^T + b_ih + b_hh, gates ordered i, f, g, o
        w_hh    [D, 4H, H]
        h0, c0  [D, B, H]
        lengths None, or int64 [B] on gx's device with 1 <= lengths <= T
        out     [T, B, D, H]   zero where t >= lengths[b]
        h_n/c_n [D, B, H]      state after each sequence's last valid step
        gates   [T, B, D, 4H]  activated gates (sigmoid i, f, o; tanh g), saved for backward
        cs      [T, B, D, H]   cell state after each step, fp32 (fp64 for fp64 input); where t >= lengths[b] it holds
                               the carried state (the final one going forward, c0 going back),
                               so the previous cell state is always the neighbouring entry

    recurrence_backward(dout, dh_n, dc_n, w_hh, gates, cs, c0, lengths) -> dgates, dh0, dc0
        dgates  [T, B, D, 4H]  gradient w.r.t. the pre-activation gates (= d gx), zero where
                               t >= lengths[b]; dh0, dc0 [D, B, H]
"""
import torch


def step_times(s, T, D):
    """Time index of each direction at lockstep step s."""
    return (s, T - 1 - s)[:D]


def gather_step(seq, times):
    """[T, B, D, ...] -> [D, B, ...]: each direction's slice at its own time."""
    if len(times) == 1:
        return seq[times[0], :, 0].unsqueeze(0)
    return torch.stack([seq[t, :, d] for d, t in enumerate(times)])


def scatter_step(seq, times, value):
    """Inverse of gather_step: write value [D, B, ...] into seq [T, B, D, ...]."""
    for d, t in enumerate(times):
        seq[t, :, d] = value[d]


def state_dtype(dtype):
    """Cell state and gradient accumulation precision: fp32 at least, whatever the input dtype."""
    return torch.promote_types(dtype, torch.float32)


def valid_mask(lengths, T):
    """[T, B] bool: t < lengths[b]."""
    return torch.arange(T, device=lengths.device).unsqueeze(1) < lengths.unsqueeze(0)


def step_mask(valid, times):
    """[D, B, 1] bool: which sequences each direction advances at this step."""
    return torch.stack([valid[t] for t in times]).unsqueeze(-1)


def recurrence_forward(gx, w_hh, h0, c0, lengths=None):
    T, B, D, G = gx.shape
    H = G // 4
    w_hh_t = w_hh.transpose(1, 2)  # [D, H, 4H]; bmm reads the transpose without a copy
    out = gx.new_empty(T, B, D, H)
    gates = gx.new_empty(T, B, D, G)
    cs = gx.new_empty(T, B, D, H, dtype=state_dtype(gx.dtype))
    valid = None if lengths is None else valid_mask(lengths, T)
    h, c = h0.to(gx.dtype), c0.to(cs.dtype)
    for s in range(T):
        times = step_times(s, T, D)
        b_gates = torch.baddbmm(gather_step(gx, times), h, w_hh_t)  # [D, B, 4H]
        b_gates[..., : 2 * H].sigmoid_()
        b_gates[..., 2 * H : 3 * H].tanh_()
        b_gates[..., 3 * H :].sigmoid_()
        i, f, g, o = b_gates.chunk(4, dim=-1)
        c_new = torch.addcmul(f * c, i, g)  # in c's (>= fp32) precision
        h_new = (o * torch.tanh(c_new)).to(gx.dtype)
        if valid is None:
            c, h, h_out = c_new, h_new, h_new
        else:
            m = step_mask(valid, times)  # [D, B, 1]
            c, h = torch.where(m, c_new, c), torch.where(m, h_new, h)
            h_out = h_new * m
        scatter_step(gates, times, b_gates)
        scatter_step(cs, times, c)
        scatter_step(out, times, h_out)
    return out, h, c.to(gx.dtype), gates, cs


def previous_cell(cs, c0, times):
    """[D, B, H] cell state each direction held before its step at `times`."""
    T = cs.shape[0]
    prev = []
    for d, t in enumerate(times):
        t_prev = t - 1 if d == 0 else t + 1
        prev.append(cs[t_prev, :, d] if 0 <= t_prev < T else c0[d].to(cs.dtype))
    return torch.stack(prev)


def recurrence_backward(dout, dh_n, dc_n, w_hh, gates, cs, c0, lengths=None):
    T, B, D, G = gates.shape
    H = G // 4
    acc = state_dtype(gates.dtype)
    w = w_hh.to(acc)  # [D, 4H, H]
    dgates = gates.new_empty(T, B, D, G)
    valid = None if lengths is None else valid_mask(lengths, T)
    dh, dc = dh_n.to(acc), dc_n.to(acc)
    for s in reversed(range(T)):
        times = step_times(s, T, D)
        i, f, g, o = gather_step(gates, times).to(acc).chunk(4, dim=-1)
        c = gather_step(cs, times)
        c_prev = previous_cell(cs, c0, times)
        m = None if valid is None else step_mask(valid, times)
        d_out = gather_step(dout, times).to(acc)
        dh_t = dh + (d_out if m is None else d_out * m)
        tanh_c = torch.tanh(c)
        dc_t = dc + dh_t * o * (1 - tanh_c * tanh_c)
        b_dgates = torch.cat(
            (
                dc_t * g * i * (1 - i),
                dc_t * c_prev * f * (1 - f),
                dc_t * i * (1 - g * g),
                dh_t * tanh_c * o * (1 - o),
            ),
            dim=-1,
        )  # [D, B, 4H]
        dc_prev = dc_t * f
        if m is not None:
            b_dgates = b_dgates * m
            # outside a sequence the state passes through untouched, and so does its gradient
            dc_prev = torch.where(m, dc_prev, dc)
        dh_prev = torch.bmm(b_dgates, w)  # [D, B, H]
        if m is not None:
            dh_prev = torch.where(m, dh_prev, dh)
        dh, dc = dh_prev, dc_prev
        scatter_step(dgates, times, b_dgates)
    return dgates, dh, dc
