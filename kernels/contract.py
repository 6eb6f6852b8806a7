"""The recurrence contract: what every backend (vectorized.py, triton_recurrence.py, and any
backend added to kernels/__init__.py) implements, and all that the layer op relies on.

The layer op (bilstm_fast/function.py) does the large GEMMs itself: the input projection of
every step and both directions before the recurrence, and the input, weight and bias gradients
after it. Through the custom ops in bilstm_fast/ops.py it calls only the sequential part, the
two functions below, of the module that `kernels.recurrence_module(name)` returns:

    recurrence_forward(gx, w_hh, h0, c0, lengths, save=True) -> out, h_n, c_n, gates, cs
        gx      [T, B, D, 4H]  x @ W_ih^T + b_ih + b_hh, gates ordered i, f, g, o
        w_hh    [D, 4H, H]
        h0, c0  [D, B, H]
        lengths None, or int64 [B] on gx's device with 1 <= lengths <= T
        out     [T, B, D, H]   zero where t >= lengths[b]
        h_n/c_n [D, B, H]      state after each sequence's last valid step
        gates   [T, B, D, 4H]  activated gates (sigmoid i, f, o; tanh g), saved for backward
        cs      [T, B, D, H]   cell state after each step, in state_dtype(gx.dtype); where
                               t >= lengths[b] it holds the carried state (the final one going
                               forward, c0 going back), so the previous cell state is always the
                               neighbouring entry
        save=False             inference: gates and cs are neither kept nor returned (None),
                               and out, h_n, c_n are bit for bit those of save=True

    recurrence_backward(dout, dh_n, dc_n, w_hh, gates, cs, c0, lengths) -> dgates, dh0, dc0
        dgates  [T, B, D, 4H]  gradient w.r.t. the pre-activation gates (= d gx), zero where
                               t >= lengths[b]
        dh0, dc0 [D, B, H]     in state_dtype of the input dtype

Direction d = 0 runs t = 0 .. T-1, d = 1 (when D = 2) runs t = len_b-1 .. 0: time is indexed
backwards, never flipped. All outputs are new, contiguous tensors (dgates must be: the caller
views it as [T*B, D*4H]). Padded steps are masked by selection (torch.where or its kernel
equivalent), never by multiplying with the mask: 0 * inf would be NaN where nn.LSTM has none.

tests/test_contract.py checks these shapes, dtypes and the masking for every backend that
`kernels.available_backends("cpu")` lists; kernels/reference.py is the plain loop they are all
compared with.
"""
import torch


def state_dtype(dtype):
    """Cell state and gradient accumulation precision: fp32 at least, whatever the input dtype."""
    return torch.promote_types(dtype, torch.float32)
