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
        gates   [T, B, D, 4H]  activated gates (sigmoid i, f, o; tanh g), saved for backward, in
                               gx.dtype, or in the module's gates_dtype(gx.dtype) where it has one
        cs      [T, B, D, H]   cell state after each step, in state_dtype(gx.dtype); where
                               t >= lengths[b] it holds the carried state (the final one going
                               forward, c0 going back), so the previous cell state is always the
                               neighbouring entry
        save=False             inference: gates and cs are neither kept nor returned (None),
                               and out, h_n, c_n are bit for bit those of save=True

    recurrence_backward(dout, dh_n, dc_n, w_hh, gates, cs, c0, lengths) -> dgates, dh0, dc0
        dgates  [T, B, D, 4H]  gradient w.r.t. the pre-activation gates (= d gx), zero where
                               t >= lengths[b]; in the saved gates' dtype (the native backend
                               keeps both in fp32 for bf16/fp16 input: kernels/native.py)
        dh0, dc0 [D, B, H]     in state_dtype of the input dtype

Direction d = 0 runs t = 0 .. T-1, d = 1 (when D = 2) runs t = len_b-1 .. 0: time is indexed
backwards, never flipped. All outputs are new, contiguous tensors (dgates must be: the caller
views it as [T*B, D*4H]). Padded steps are masked by selection (torch.where or its kernel
equivalent), never by multiplying with the mask: 0 * inf would be NaN where nn.LSTM has none.

Optional extra, projection (nn.LSTM's proj_size = P > 0): a backend module that sets
`SUPPORTS_PROJECTION = True` also accepts the keyword `w_hr` [D, P, H] in both functions. Then
h = (o * tanh(c)) @ W_hr^T, so w_hh is [D, 4H, P], h0, h_n and out carry P features, and
recurrence_backward returns a fourth tensor, dh [T, B, D, P]: the gradient of each step's
projected h (zero where t >= lengths[b]), from which the caller forms W_hr's gradient. Layers
with a projection on a backend without the extra run on the vectorized backend (ops.py); the
base signatures above never see `w_hr`.

Optional extra, input projection (kernels/native.py): a backend module with a function

    layer_forward(x, w_ih, bias, w_hh, h0, c0, lengths, save=True) -> as recurrence_forward
        x [T, B, I], w_ih [D, 4H, I], bias [D, 4H] (b_ih + b_hh) or None

returns what recurrence_forward(x @ W_ih^T + bias, ...) returns, to fp rounding (the projection
may be summed in another order), without the caller making gx. The layer op calls it in plain
eager calls without a projection (bilstm_fast/ops.py `fused_backend`); compiled, traced and
transformed calls go through the custom ops and the base contract. Likewise

    layer_gradients(dgates, x, h_prev, w_ih, need_dx, need_w_ih, need_w_hh, need_bias)
        -> [dx, then dW_ih, dW_hh, db for each direction], None where its need flag is False

runs the GEMMs after the backward recurrence (bilstm_fast/function.py
`input_and_weight_gradients` is the plain version), each result a fresh tensor.

Optional extra, unidirectional stacks (kernels/native.py): a backend module with

    stack_forward(x, w_ih, bias, w_hh, h0, c0, lengths, save, masks, groups)
        -> outs, h_n, c_n, gates, cs, dropped          (per-layer lists; h_n, c_n [L, B, H])
    stack_backward(dout, dh_n, dc_n, w_ih, w_hh, gates, cs, c0, lengths, masks, groups)
        -> dgates (per layer), dh0, dc0

runs a whole stack of L unidirectional layers in one call: each layer's results are those of
layer_forward / recurrence_backward on it (to fp rounding), with dropout masks [T, B, H] between
the layers, applied as out * mask. bilstm_fast/stack.py calls it in plain eager calls for
unidirectional stacks without a projection; everything else runs layer by layer.

tests/test_contract.py checks these shapes, dtypes and the masking for every backend that
`kernels.available_backends("cpu")` lists; kernels/reference.py is the plain loop they are all
compared with.
"""
import torch


def state_dtype(dtype):
    """Cell state and gradient accumulation precision: fp32 at least, whatever the input dtype."""
    return torch.promote_types(dtype, torch.float32)
