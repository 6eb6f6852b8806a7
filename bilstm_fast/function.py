"""The one-layer, all-directions LSTM op as an autograd Function.

Work with no time dependency is done here as single large GEMMs: the input projection of all
steps and directions before the recurrence, and the input, weight and bias gradients after it.
The recurrence itself comes from the backend. A backend may take over those GEMMs too (the
optional extras `layer_forward` and `layer_gradients` of kernels/contract.py: the native CPU
backend runs them inside its per-direction tasks); plain eager calls then use it, compiled and
traced ones keep the GEMMs here. When nothing needs a gradient, `lstm_layer` skips the Function
and runs the inference recurrence, which keeps nothing for a backward.
"""
from typing import List, Optional, Tuple

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
        gx = torch.addmm(bias.reshape(D * G).to(x.dtype), x2d, w_ih2d.t())
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
    if a.shape[0] <= ROW_BLOCK:  # one block: the same GEMM without slicing (per-call overhead)
        return torch.mm(a.t(), b)
    out = torch.mm(a[:ROW_BLOCK].t(), b[:ROW_BLOCK])
    for start in range(ROW_BLOCK, a.shape[0], ROW_BLOCK):
        # not out.addmm_(): MKL would accumulate into out as one running sum again
        out += torch.mm(a[start:start + ROW_BLOCK].t(), b[start:start + ROW_BLOCK])
    return out


def split_directions(params, D):
    """nn.LSTM's flat parameter list of one layer, direction by direction ([w_ih, w_hh, *bias
    terms, w_hr] each; w_hr [P, H] only with a projection), as stacked [D, ...] weights, the
    summed bias [D, 4H] (None without bias) and the stacked w_hr [D, P, H] (or None). The stacks
    and the sum are made here, inside the Function, so autograd never routes one gradient
    buffer to several parameters (tests/test_grad_tensors.py)."""
    D = int(D)  # a traced shape is a tensor
    per_direction = len(params) // D
    groups = [params[d * per_direction:(d + 1) * per_direction] for d in range(D)]
    proj = per_direction > 2 and groups[0][-1].dim() == 2
    stack = (lambda ts: ts[0].unsqueeze(0)) if D == 1 else torch.stack
    w_ih = stack([group[0] for group in groups])
    w_hh = stack([group[1] for group in groups])
    w_hr = stack([group[-1] for group in groups]) if proj else None
    n_bias = per_direction - 2 - proj
    bias = None
    if n_bias == 1:
        bias = stack([group[2] for group in groups])
    elif n_bias:
        # bf16/fp16 weights: b_ih + b_hh in fp32 (a backend that adds the bias in fp32 keeps it
        # unrounded, as oneDNN does); fp32 and fp64 as they are
        acc = torch.promote_types(groups[0][2].dtype, torch.float32)
        bias = stack([sum(b.to(acc) for b in group[2:2 + n_bias]) for group in groups])
    return w_ih, w_hh, bias, w_hr


def layer_autograd(x, h0, c0, lengths, params):
    """The layer in plain differentiable torch ops, batched over B, one step at a time: what a
    backward that must itself be differentiable (create_graph=True) recomputes and
    differentiates. Same formulas, and the cell state in the same >= fp32 precision."""
    D = h0.shape[0]
    w_ih, w_hh, bias, w_hr = split_directions(params, D)
    T = x.shape[0]
    gx = input_projection(x, w_ih, bias)  # [T, B, D, 4H]
    sdtype = torch.promote_types(x.dtype, torch.float32)
    valid = None if lengths is None else torch.arange(T, device=x.device).unsqueeze(1) < lengths.unsqueeze(0)
    outs, h_n, c_n = [], [], []
    for d in range(D):
        h, c = h0[d], c0[d].to(sdtype)
        steps = [None] * T
        for t in (range(T) if d == 0 else reversed(range(T))):
            i, f, g, o = (gx[t, :, d] + h @ w_hh[d].t()).chunk(4, dim=-1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = (torch.sigmoid(o) * torch.tanh(c_new)).to(x.dtype)
            if w_hr is not None:
                h_new = h_new @ w_hr[d].t()
            if valid is None:
                h, c, steps[t] = h_new, c_new, h_new
            else:
                m = valid[t].unsqueeze(1)
                steps[t] = torch.where(m, h_new, torch.zeros_like(h_new))
                h, c = torch.where(m, h_new, h), torch.where(m, c_new, c)
        outs.append(torch.stack(steps))
        h_n.append(h)
        c_n.append(c.to(x.dtype))
    return torch.cat(outs, dim=-1), torch.stack(h_n), torch.stack(c_n)


def projected_input(gates, cs, dtype):
    """o * tanh(c) [T, B, D, H] from the saved activated gates and cell states: the input of
    the projection h = (o * tanh(c)) @ W_hr^T, for W_hr's gradient."""
    H = cs.shape[-1]
    return (gates[..., 3 * H:].to(cs.dtype) * torch.tanh(cs)).to(dtype)


def layer_forward(x, w_ih, w_hh, bias, h0, c0, lengths, backend, w_hr, save):
    """The layer's forward sweep from x -> out [T, B, D, P], h_n, c_n (and gates, cs when save):
    one call of a backend that projects the input itself (ops.fused_backend), else the input
    projection as one GEMM here and the backend's recurrence."""
    fused = ops.fused_backend(backend, x, w_hr)
    if fused is not None:
        out, h_n, c_n, gates, cs = fused.layer_forward(x, w_ih, bias, w_hh, h0, c0, lengths, save=save)
        return (out, h_n, c_n, gates, cs) if save else (out, h_n, c_n)
    gx = input_projection(x, w_ih, bias)
    if save:
        return ops.forward(gx, w_hh, h0, c0, lengths, backend, w_hr)
    return ops.inference(gx, w_hh, h0, c0, lengths, backend, w_hr)


class LSTMLayerFunction(torch.autograd.Function):
    """(x [T,B,I], h0, c0 [D,B,H], lengths [B] or None, backend, *params) -> out [T,B,D*H],
    h_n [D,B,H], c_n [D,B,H], gates, cs (the last two saved for backward and not
    differentiable: `lstm_layer_params` drops them).

    params is the layer's flat parameter list as nn.LSTM orders it: for each direction
    w_ih [4H,I], w_hh [4H,H], then any number of bias terms [4H] (nn.LSTM has two, b_ih and
    b_hh, which are summed), then w_hr [P,H] with a projection (h0, h_n, out then P wide).
    Every parameter gets a gradient tensor of its own: one shared buffer would be hit twice by
    in-place gradient edits (clipping, accumulation).

    forward/setup_context are separate, so torch.func transforms (grad, jacrev, vmap through
    the custom ops' vmap rules) work. A backward asked to be differentiable itself
    (create_graph=True: gradient penalties, gradgradcheck) recomputes the layer with plain
    torch ops and differentiates that."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, h0, c0, lengths, backend, *params):
        T, B, _ = x.shape
        D = h0.shape[0]
        w_ih, w_hh, bias, w_hr = split_directions(params, D)
        out, h_n, c_n, gates, cs = layer_forward(x, w_ih, w_hh, bias, h0, c0, lengths, backend, w_hr, save=True)
        return out.view(T, B, out.shape[2] * out.shape[3]), h_n, c_n, gates, cs

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, h0, c0, lengths, backend, *params = inputs
        out, _, _, gates, cs = output
        ctx.mark_non_differentiable(gates, cs)
        ctx.set_materialize_grads(False)
        # out detached: saving the output itself would keep its grad_fn, this node, alive from
        # the node's own saved tensors, a reference cycle (detach shares the version counter,
        # so an in-place edit of out is still caught)
        ctx.save_for_backward(x, h0, c0, lengths, out.detach(), gates, cs, *params)
        ctx.backend = backend

    @staticmethod
    def backward(ctx, dout, dh_n, dc_n, _dgates, _dcs):
        need = getattr(ctx, "need", None) or ctx.needs_input_grad
        return layer_backward(ctx.backend, need, ctx.saved_tensors, dout, dh_n, dc_n)


def layer_backward(backend, need, saved, dout, dh_n, dc_n):
    """The backward of one layer from what its Function saved (x, h0, c0, lengths, out, gates,
    cs, *params) -> its input gradients, as the incoming gradients ask: first order, differentiable
    (create_graph=True), or for cotangents batched by either vmap."""
    # a compiled backward meets neither dead wrappers nor the legacy vmap, and dynamo cannot
    # trace their checks
    compiled = torch.compiler.is_compiling()
    if not compiled and torch._C._functorch.is_dead_tensor_wrapper(saved[4]):
        # torch.func.vjp's vjp_fn runs after its transform has ended, grad mode on: what it
        # saved are dead wrappers then (out is one if any input was), which the backends cannot
        # read and a differentiable backward's autograd.grad no longer reaches (zero gradients)
        saved = [t if t is None else torch._C._functorch.unwrap_if_dead(t) for t in saved]
        with torch.no_grad():
            return first_order_backward(backend, need, saved, dout, dh_n, dc_n)
    if torch.is_grad_enabled() and not any(map(_vmapped, (dout, dh_n, dc_n))):
        x, h0, c0, lengths, _, _, _, *params = saved
        return differentiable_backward(need, x, h0, c0, lengths, params, dout, dh_n, dc_n)
    if not compiled and any(map(_legacy_batched, (dout, dh_n, dc_n))):
        return legacy_batched_backward(backend, need, saved, dout, dh_n, dc_n)
    return first_order_backward(backend, need, saved, dout, dh_n, dc_n)


def first_order_backward(backend, need, saved, dout, dh_n, dc_n):
    """The backward from the backend's recurrence backward and the GEMMs after it, for the
    Function's saved tensors and incoming gradients -> the Function's input gradients."""
    x, h0, c0, lengths, out, gates, cs, *params = saved
    T, B, _ = x.shape
    D = h0.shape[0]
    w_ih, w_hh, _, w_hr = split_directions(params, D)
    P = h0.shape[2]
    out = out.view(T, B, D, P)
    # outputs the caller did not use arrive as None
    dout = torch.zeros_like(out) if dout is None else dout.reshape(T, B, D, P)
    dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
    dc_n = torch.zeros_like(c0) if dc_n is None else dc_n
    dgates, dh0, dc0, dhs = ops.backward(
        dout, dh_n, dc_n, w_hh, gates, cs, c0, lengths, backend, w_hr
    )
    return gradients_from_dgates(backend, need, saved, dgates, dh0, dc0, dhs)


def gradients_from_dgates(backend, need, saved, dgates, dh0, dc0, dhs):
    """The Function's input gradients from the recurrence backward's results (dgates [T, B, D, 4H],
    dh0, dc0, and with a projection dhs): the input, weight and bias gradients after it."""
    x, h0, c0, lengths, out, gates, cs, *params = saved
    T, B, _ = x.shape
    D, P = h0.shape[0], h0.shape[2]
    w_ih, _, _, w_hr = split_directions(params, D)
    out = out.view(T, B, D, P)
    dh0 = dh0.to(h0.dtype) if need[1] else None
    dc0 = dc0.to(c0.dtype) if need[2] else None
    per_direction = len(params) // D
    proj = w_hr is not None
    need_d = [need[5 + d * per_direction:5 + (d + 1) * per_direction] for d in range(D)]
    need_bias = [n[2:per_direction - proj] for n in need_d]
    h_prev = previous_hidden(out, h0, lengths) if any(n[1] for n in need_d) else None  # [T, B, D, P]
    dx, dw_ih, dw_hh, db = input_and_weight_gradients(
        backend, dgates, x, h_prev, w_ih, need[0], [n[0] for n in need_d], [n[1] for n in need_d],
        [any(n) for n in need_bias],
    )
    r = None
    param_grads = []
    for d in range(D):
        param_grads += [dw_ih[d], dw_hh[d]]
        for k, needed in enumerate(need_bias[d]):
            # every bias term gets its own copy of the one gradient (a 4H vector: negligible)
            param_grads.append(None if not needed else db[d] if k == need_bias[d].index(True) else db[d].clone())
        if proj:
            dw_hr = None
            if need_d[d][-1]:
                if r is None:
                    r = projected_input(gates, cs, x.dtype)  # [T, B, D, H]
                dw_hr = sum_over_rows(dhs[:, :, d].reshape(T * B, P), r[:, :, d].reshape(T * B, -1))
            param_grads.append(dw_hr)
    return (dx, dh0, dc0, None, None, *param_grads)


def input_and_weight_gradients(backend, dgates, x, h_prev, w_ih, need_dx, need_w_ih, need_w_hh, need_bias):
    """dx [T, B, I] and, per direction, lists of dW_ih, dW_hh and db (None where not needed), each
    a fresh tensor, from dgates [T, B, D, 4H], x and h_prev [T, B, D, P]. One call of a backend
    that runs these GEMMs itself (`layer_gradients`, ops.fused_backend), else one GEMM per
    direction and parameter here, on strided views of dgates: no copy (einsum first copied dgates
    into a [D, 4H, T*B] layout, 2.4x slower; benchmarks/NOTES.md attempt 5)."""
    fused = ops.fused_backend(backend, x, None)
    if fused is not None and hasattr(fused, "layer_gradients"):
        dx, *flat = fused.layer_gradients(dgates, x, h_prev, w_ih, need_dx, need_w_ih, need_w_hh, need_bias)
        return dx, flat[0::3], flat[1::3], flat[2::3]
    T, B, D, G = dgates.shape
    I = x.shape[2]
    # a backend may keep the gate gradients in fp32 for bf16/fp16 weights (contract.py gates_dtype):
    # the GEMMs multiply them in the weights' dtype, the bias gradient sums them as they are
    dgates_acc, dgates = dgates, dgates.to(w_ih.dtype)
    dx = torch.mm(dgates.view(T * B, D * G), w_ih.reshape(D * G, I)).view(T, B, I) if need_dx else None
    dw_ih, dw_hh, db = [], [], []
    for d in range(D):
        dgates_d = dgates[:, :, d].reshape(T * B, G)
        dw_ih.append(sum_over_rows(dgates_d, x.reshape(T * B, I)) if need_w_ih[d] else None)
        dw_hh.append(sum_over_rows(dgates_d, h_prev[:, :, d].reshape(T * B, h_prev.shape[3])) if need_w_hh[d] else None)
        db.append(dgates_acc[:, :, d].reshape(T * B, G).sum(0).to(w_ih.dtype) if need_bias[d] else None)
    return dx, dw_ih, dw_hh, db


class _EagerLSTMLayerFunction(torch.autograd.Function):
    """LSTMLayerFunction with forward and setup_context in one: what plain eager calls use.
    Function.apply binds a setup_context-style forward's arguments through inspect.signature
    on every call, tens of microseconds that a tiny training call notices; transforms and
    compilers get LSTMLayerFunction itself."""

    @staticmethod
    def forward(ctx, x, h0, c0, lengths, backend, *params):
        output = LSTMLayerFunction.forward(x, h0, c0, lengths, backend, *params)
        LSTMLayerFunction.setup_context(ctx, (x, h0, c0, lengths, backend, *params), output)
        return output

    backward = LSTMLayerFunction.backward


def _vmapped(t):
    """Whether t is batched by torch.vmap (jacrev batches the cotangents). The custom ops
    batch by their vmap rules; a nested autograd.grad would not see the batch."""
    return t is not None and torch._C._functorch.is_batchedtensor(t)


def _legacy_batched(t):
    """Whether t is batched by the legacy vmap of torch._vmap_internals: what
    autograd.grad(is_grads_batched=True), jacobian(vectorize=True) and gradcheck's batched
    gradient check batch the cotangents with."""
    return t is not None and torch._C._functorch.is_legacy_batchedtensor(t)


def legacy_batched_backward(backend, need, saved, dout, dh_n, dc_n):
    """The backward for cotangents batched by the legacy vmap, which has no way to register a
    batching rule for the backends' kernels: the batch is taken out of the cotangents and the
    same backward runs under torch.func.vmap, whose rules for the custom ops (ops.py) fold it into
    the recurrence's batch axis. The legacy vmap offers no query for its current level, only
    increment and decrement; the innermost level, the cotangents', is one below what
    incrementing returns (undone at once)."""
    level = torch._C._vmapmode_increment_nesting() - 1
    torch._C._vmapmode_decrement_nesting()
    grads = (dout, dh_n, dc_n)
    in_dims = tuple(0 if _legacy_batched(g) else None for g in grads)
    # the batch size argument only expands a tensor not batched at `level`: these all are
    physical = [g if d is None else torch._remove_batch_dim(g, level, 0, 0) for g, d in zip(grads, in_dims)]
    if any(map(_legacy_batched, physical)):  # still batched: at an outer level too
        raise NotImplementedError("FastBiLSTM: a backward inside nested legacy vmaps (torch._vmap_internals) is not "
                                  "supported; torch.func.vmap nests")
    none_at = []  # where the backward's results are None: vmap returns tensors only

    def backward(*grads):
        result = first_order_backward(backend, need, saved, *grads)
        none_at[:] = [r is None for r in result]
        return tuple(r for r in result if r is not None)

    batched = iter(torch.func.vmap(backward, in_dims=in_dims)(*physical))
    return tuple(None if none else torch._add_batch_dim(next(batched), 0, level) for none in none_at)


def differentiable_backward(need, x, h0, c0, lengths, params, dout, dh_n, dc_n, forward=None):
    """The backward as a differentiable computation (create_graph=True): recompute the layer
    with plain torch ops from the saved inputs and differentiate it, keeping the graph.
    forward: what to recompute, (x, h0, c0, lengths, params) -> (out, h_n, c_n); the layer
    (layer_autograd) by default, a whole stack for bilstm_fast/stack.py."""
    inputs = [x, h0, c0, *params]
    wanted = [k for k, t in enumerate(inputs) if need[k if k < 3 else k + 2]]
    with torch.enable_grad():
        outputs = (forward or layer_autograd)(x, h0, c0, lengths, params)
        pairs = [(o, g) for o, g in zip(outputs, (dout, dh_n, dc_n)) if g is not None]
        grads = torch.autograd.grad(
            [o for o, _ in pairs], [inputs[k] for k in wanted], [g for _, g in pairs],
            create_graph=True, allow_unused=True,
        )
    result = [None] * len(inputs)
    for k, g in zip(wanted, grads):
        result[k] = torch.zeros_like(inputs[k]) if g is None else g
    return (*result[:3], None, None, *result[3:])


# The whole layer as one custom op with an autograd formula, for torch.jit.trace: a traced
# autograd.Function is a Python call that jit.save cannot export, and its trace check fails;
# this op is recorded as `bilstm_fast::lstm_layer`, runs (and differentiates) after jit.load
# in any process that has imported bilstm_fast.
@torch.library.custom_op("bilstm_fast::lstm_layer", mutates_args=())
def lstm_layer_op(
    x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, lengths: Optional[torch.Tensor], backend: str,
    params: List[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return LSTMLayerFunction.forward(x, h0, c0, lengths, backend, *params)


@lstm_layer_op.register_fake
def _(x, h0, c0, lengths, backend, params):
    return LSTMLayerFunction.forward(x, h0, c0, lengths, backend, *params)


def _op_setup_context(ctx, inputs, output):
    x, h0, c0, lengths, backend, params = inputs
    _, _, _, gates, cs = output
    ctx.save_for_backward(x, h0, c0, lengths, output[0].detach(), gates, cs, *params)
    ctx.backend = backend
    ctx.need = tuple(t is not None and t.requires_grad for t in (x, h0, c0, None, None, *params))


def _op_backward(ctx, dout, dh_n, dc_n, _dgates, _dcs):
    dx, dh0, dc0, _, _, *param_grads = LSTMLayerFunction.backward(ctx, dout, dh_n, dc_n, None, None)
    return dx, dh0, dc0, None, None, list(param_grads)


torch.library.register_autograd(lstm_layer_op, _op_backward, setup_context=_op_setup_context)


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
    if torch.jit.is_tracing():
        out, h_n, c_n, _, _ = lstm_layer_op(x, h0, c0, lengths, backend, list(params))
        return out, h_n, c_n
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, h0, c0, *params)):
        function = _EagerLSTMLayerFunction if ops.eager() else LSTMLayerFunction
        out, h_n, c_n, _, _ = function.apply(x, h0, c0, lengths, backend, *params)
        return out, h_n, c_n
    T, B, _ = x.shape
    w_ih, w_hh, bias, w_hr = split_directions(params, h0.shape[0])
    out, h_n, c_n = layer_forward(x, w_ih, w_hh, bias, h0, c0, lengths, backend, w_hr, save=False)
    return out.view(T, B, out.shape[2] * out.shape[3]), h_n, c_n


def lstm_layer(x, w_ih, w_hh, bias, h0, c0, lengths=None, backend="auto", w_hr=None):
    """Functional entry point on stacked weights: x [T,B,I], w_ih [D,4H,I], w_hh [D,4H,H],
    bias [D,4H] (b_ih + b_hh) or None, h0/c0 [D,B,H], lengths [B] or None; with a projection
    w_hr [D,P,H], w_hh [D,4H,P] and h0 [D,B,P]."""
    params = []
    for d in range(w_ih.shape[0]):
        params += [w_ih[d], w_hh[d]] + ([] if bias is None else [bias[d]]) + ([] if w_hr is None else [w_hr[d]])
    return lstm_layer_params(x, params, h0, c0, lengths, backend)
