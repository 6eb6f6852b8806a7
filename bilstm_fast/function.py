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


class LSTMLayerFunction(torch.autograd.Function):
    """(x [T,B,I], w_ih [D,4H,I], w_hh [D,4H,H], bias [D,4H] or None, h0, c0 [D,B,H],
    lengths [B] or None, backend) -> out [T,B,D*H], h_n [D,B,H], c_n [D,B,H]."""

    @staticmethod
    def forward(ctx, x, w_ih, w_hh, bias, h0, c0, lengths, backend):
        T, B, _ = x.shape
        D, _, H = w_hh.shape
        gx = input_projection(x, w_ih, bias)
        out, h_n, c_n, gates, cs = ops.recurrence_forward(gx, w_hh, h0, c0, lengths, backend)
        ctx.save_for_backward(x, w_ih, w_hh, h0, c0, lengths, out, gates, cs)
        ctx.has_bias = bias is not None
        ctx.backend = backend
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
        dgates2d = dgates.view(T * B, D * G)
        need = ctx.needs_input_grad
        dx = dw_ih = dw_hh = dbias = None
        if need[0]:
            dx = torch.mm(dgates2d, w_ih.reshape(D * G, I)).view(T, B, I)
        if need[1]:
            dw_ih = sum_over_rows(dgates2d, x.reshape(T * B, I)).view(D, G, I)
        if need[2]:
            h_prev = previous_hidden(out, h0, lengths)  # [T, B, D, H]
            # one GEMM per direction on strided views: no copy (einsum first copied dgates into
            # a [D, 4H, T*B] layout, 2.4x slower; benchmarks/NOTES.md attempt 5)
            dw_hh = torch.stack(
                [sum_over_rows(dgates[:, :, d].reshape(T * B, G), h_prev[:, :, d].reshape(T * B, H)) for d in range(D)]
            )
        if ctx.has_bias and need[3]:
            dbias = dgates2d.sum(0).view(D, G)
        dh0 = dh0.to(h0.dtype) if need[4] else None
        dc0 = dc0.to(c0.dtype) if need[5] else None
        return dx, dw_ih, dw_hh, dbias, dh0, dc0, None, None


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


def lstm_layer(x, w_ih, w_hh, bias, h0, c0, lengths=None, backend="auto"):
    """Functional entry point: see LSTMLayerFunction."""
    check_lengths(lengths, x.shape[0], x.shape[1], x.device)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_ih, w_hh, bias, h0, c0)):
        return LSTMLayerFunction.apply(x, w_ih, w_hh, bias, h0, c0, lengths, backend)
    T, B, _ = x.shape
    out, h_n, c_n = ops.recurrence_inference(input_projection(x, w_ih, bias), w_hh, h0, c0, lengths, backend)
    return out.view(T, B, -1), h_n, c_n
