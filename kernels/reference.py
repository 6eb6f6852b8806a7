"""Plain loop reference for one (bi)directional LSTM layer: the oracle the fast paths are tested against.

Readable before fast: one direction, one sequence, one step at a time, exactly the equations of
`nn.LSTM` (gates ordered i, f, g, o). Differentiable through autograd, and exact in float64.
"""
import torch


def lstm_cell_reference(x_t, h, c, w_ih, w_hh, bias, w_hr=None):
    """One step. x_t [I], h [H] (or [P]), c [H], w_ih [4H, I], w_hh [4H, H] (or [4H, P]), bias
    [4H] or None, w_hr [P, H] or None (projection, proj_size = P) -> (h, c)."""
    gates = w_ih @ x_t + w_hh @ h  # [4H]
    if bias is not None:
        gates = gates + bias
    i, f, g, o = gates.chunk(4)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if w_hr is not None:
        h = w_hr @ h
    return h, c


def lstm_layer_reference(x, w_ih, w_hh, bias, h0, c0, lengths=None, w_hr=None):
    """One layer, D directions (D = w_ih.shape[0]; direction 1 runs time backwards).

    x [T, B, I]; w_ih [D, 4H, I]; w_hh [D, 4H, H]; bias [D, 4H] (b_ih + b_hh) or None;
    h0, c0 [D, B, H]; lengths: None or B ints, each in 1..T.
    Returns out [T, B, D*H] (zero past each sequence's length), h_n and c_n [D, B, H]
    (taken at each sequence's last valid step, as nn.LSTM does for packed input).
    w_hr: None, or [D, P, H] for a projection (proj_size = P): then h0, h_n, w_hh's last axis
    and out's features are P wide.
    """
    T, B, _ = x.shape
    D, _, H = w_hh.shape
    lengths = [T] * B if lengths is None else [int(n) for n in lengths]
    out = x.new_zeros(T, B, D, H)
    h_n, c_n = [], []
    for d in range(D):
        b_d = None if bias is None else bias[d]
        h_last, c_last = [], []
        for b in range(B):
            h, c = h0[d, b], c0[d, b]
            steps = range(lengths[b]) if d == 0 else reversed(range(lengths[b]))
            for t in steps:
                h, c = lstm_cell_reference(x[t, b], h, c, w_ih[d], w_hh[d], b_d, None if w_hr is None else w_hr[d])
                out[t, b, d] = h
            h_last.append(h)
            c_last.append(c)
        h_n.append(torch.stack(h_last))
        c_n.append(torch.stack(c_last))
    return out.reshape(T, B, D * H), torch.stack(h_n), torch.stack(c_n)
