"""The one-layer, all-directions LSTM op as an autograd Function.

Work with no time dependency is done here as single large GEMMs, for every backend alike:
the input projection of all steps and directions before the recurrence, and the input,
weight and bias gradients after it. Only the recurrence itself comes from the backend.
When nothing needs a gradient, `lstm_layer` skips the Function and runs the inference
recurrence, which keeps nothing for a backward.
"""
import torch

from bilstm_fast import ops


def previous_hidden(out, h0, lengths):
    """[T, B, D, H] hidden state each direction read at each step (h0 where it started)."""
    D = out.shape[2]
    prev = [torch.cat((h0[0].unsqueeze(0), out[:-1, :, 0]))]
    if D == 2:
        backward_prev = torch.cat((out[1:, :, 1], h0[1].unsqueeze(0)))
        if lengths is not None:
            # a shorter sequence starts its reverse pass at t = len-1, from h0, not from out[len]
            T = out.shape[0]
            t = torch.arange(T, device=out.device).unsqueeze(1)
            starts = (t == lengths.unsqueeze(0) - 1).unsqueeze(-1)  # [T, B, 1]
            backward_prev = torch.where(starts, h0[1].unsqueeze(0), backward_prev)
        prev.append(backward_prev)
    return torch.stack(prev, dim=2)


def input_projection(x, w_ih, bias):
    """x [T, B, I] @ W_ih^T + bias for every step and direction, one GEMM -> gx [T, B, D, 4H]."""
    T, B, I = x.shape
    D, G, _ = w_ih.shape
    x2d, w_ih2d = x.reshape(T * B, I), w_ih.reshape(D * G, I)
    if bias is None:
        gx = torch.mm(x2d, w_ih2d.t())
    else:
        gx = torch.addmm(bias.reshape(D * G), x2d, w_ih2d.t())
    return gx.view(T, B, D, G)


# Rows per partial GEMM in a weight gradient (see sum_over_rows).
ROW_BLOCK = 512


def sum_over_rows(a, b):
    """a.t() @ b, a reduction over the n = T*B rows, as one GEMM per block of ROW_BLOCK rows and
    an fp32 sum of the blocks. One GEMM over all n rows leaves the reduction order to the BLAS
    library, and MKL on some CPUs (seen on AMD EPYC) runs it as one running sum: 3e-4 of the
    gradient's scale at n = 40000 (tests/test_robustness.py's long sequence), where blocks of 512
    give 1.2e-5 (256: 2e-5, the sum of the blocks then dominates). Speed as one GEMM, within
    timing noise (benchmarks/NOTES.md attempt 13)."""
    out = torch.mm(a[:ROW_BLOCK].t(), b[:ROW_BLOCK])
    for start in range(ROW_BLOCK, a.shape[0], ROW_BLOCK):
        # not out.addmm_(): MKL would accumulate into out as one running sum again
        out += torch.mm(a[start:start + ROW_BLOCK].t(), b[start:start + ROW_BLOCK])
    return out


def split_directions(params, D):
    """nn.LSTM's flat parameter list of one layer, direction by direction ([w_ih, w_hh, *bias
    terms] each), as stacked [D, ...] weights and the summed bias [D, 4H] (None without bias).
    The stacks and the sum are made here, inside the Function, so autograd never routes one
    gradient buffer to several parameters (tests/test_grad_tensors.py)."""
    per_direction = len(params) // D
    groups = [params[d * per_direction:(d + 1) * per_direction] for d in range(D)]
    w_ih = torch.stack([group[0] for group in groups])
    w_hh = torch.stack([group[1] for group in groups])
    bias = None
    if per_direction > 2:
        bias = torch.stack([sum(group[2:]) for group in groups])
    return w_ih, w_hh, bias


class LSTMLayerFunction(torch.autograd.Function):
    """(x [T,B,I], h0, c0 [D,B,H], lengths [B] or None, backend, *params) -> out [T,B,D*H],
    h_n [D,B,H], c_n [D,B,H].

    params is the layer's flat parameter list as nn.LSTM orders it: for each direction
    w_ih [4H,I], w_hh [4H,H], then any number of bias terms [4H] (nn.LSTM has two, b_ih and
    b_hh, which are summed). Every parameter gets a gradient tensor of its own: one shared
    buffer would be hit twice by in-place gradient edits (clipping, accumulation)."""

    @staticmethod
    def forward(ctx, x, h0, c0, lengths, backend, *params):
        T, B, _ = x.shape
        D, _, H = h0.shape
        w_ih, w_hh, bias = split_directions(params, D)
        gx = input_projection(x, w_ih, bias)
        out, h_n, c_n, gates, cs = ops.recurrence_forward(gx, w_hh, h0, c0, lengths, backend)
        ctx.save_for_backward(x, w_ih, w_hh, h0, c0, lengths, out, gates, cs)
        ctx.backend = backend
        ctx.per_direction = len(params) // D
        return out.view(T, B, D * H), h_n, c_n

    @staticmethod
    def backward(ctx, dout, dh_n, dc_n):
        x, w_ih, w_hh, h0, c0, lengths, out, gates, cs = ctx.saved_tensors
        T, B, I = x.shape
        D, G, H = w_hh.shape
        # outputs the caller did not use arrive as None
        dout = torch.zeros_like(out) if dout is None else dout.reshape(T, B, D, H)
        dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
        dc_n = torch.zeros_like(c0) if dc_n is None else dc_n
        dgates, dh0, dc0 = ops.recurrence_backward(dout, dh_n, dc_n, w_hh, gates, cs, c0, lengths, ctx.backend)
        need = ctx.needs_input_grad
        dx = None
        if need[0]:
            dx = torch.mm(dgates.view(T * B, D * G), w_ih.reshape(D * G, I)).view(T, B, I)
        dh0 = dh0.to(h0.dtype) if need[1] else None
        dc0 = dc0.to(c0.dtype) if need[2] else None
        h_prev = None
        param_grads = []
        for d in range(D):
            # one GEMM per direction and parameter on strided views of dgates: no copy, and every
            # parameter's gradient is a fresh tensor (einsum first copied dgates into a
            # [D, 4H, T*B] layout, 2.4x slower; benchmarks/NOTES.md attempt 5)
            first = 5 + d * ctx.per_direction
            need_d = need[first:first + ctx.per_direction]
            dgates_d = dgates[:, :, d].reshape(T * B, G)
            dw_ih = dw_hh = None
            if need_d[0]:
                dw_ih = sum_over_rows(dgates_d, x.reshape(T * B, I))
            if need_d[1]:
                if h_prev is None:
                    h_prev = previous_hidden(out, h0, lengths)  # [T, B, D, H]
                dw_hh = sum_over_rows(dgates_d, h_prev[:, :, d].reshape(T * B, H))
            param_grads += [dw_ih, dw_hh]
            db = dgates_d.sum(0) if any(need_d[2:]) else None
            for k, needed in enumerate(need_d[2:]):
                # every bias term gets its own copy of the one gradient (a 4H vector: negligible)
                param_grads.append(None if not needed else db if k == need_d[2:].index(True) else db.clone())
        return (dx, dh0, dc0, None, None, *param_grads)


def check_lengths(lengths, T, B, device):
    """lengths as the backends' contract has them: int64 [B] on x's device, 1 <= lengths <= T."""
    if lengths is None:
        return
    if lengths.dtype != torch.int64 or tuple(lengths.shape) != (B,) or lengths.device != device:
        raise ValueError(
            f"lengths must be an int64 tensor of shape ({B},) on {device}, got {lengths.dtype} "
            f"of shape {tuple(lengths.shape)} on {lengths.device}"
        )
    if B and lengths.device.type == "cpu":
        low, high = int(lengths.min()), int(lengths.max())
        if low < 1 or high > T:
            raise ValueError(f"lengths must lie in [1, T={T}], got values from {low} to {high}")
    elif B:  # no host sync on a GPU: the check fails at the next synchronization instead
        torch._assert_async(((lengths >= 1) & (lengths <= T)).all(), "lengths must lie in [1, T]")


def lstm_layer_params(x, params, h0, c0, lengths=None, backend="auto"):
    """One layer from nn.LSTM's flat per-layer parameter list (see LSTMLayerFunction)."""
    check_lengths(lengths, x.shape[0], x.shape[1], x.device)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, h0, c0, *params)):
        return LSTMLayerFunction.apply(x, h0, c0, lengths, backend, *params)
    T, B, _ = x.shape
    w_ih, w_hh, bias = split_directions(params, h0.shape[0])
    out, h_n, c_n = ops.recurrence_inference(input_projection(x, w_ih, bias), w_hh, h0, c0, lengths, backend)
    return out.view(T, B, -1), h_n, c_n


def lstm_layer(x, w_ih, w_hh, bias, h0, c0, lengths=None, backend="auto"):
    """Functional entry point on stacked weights: x [T,B,I], w_ih [D,4H,I], w_hh [D,4H,H],
    bias [D,4H] (b_ih + b_hh) or None, h0/c0 [D,B,H], lengths [B] or None."""
    params = []
    for d in range(w_ih.shape[0]):
        params += [w_ih[d], w_hh[d]] + ([] if bias is None else [bias[d]])
    return lstm_layer_params(x, params, h0, c0, lengths, backend)
