"""A unidirectional stack of layers handed to the backend in one call (issue 29).

nn.LSTM's layers depend on each other only step by step: layer l + 1 can run step t while layer
l runs step t + 1. A backend with the optional `stack_forward` extra (the native CPU one) runs
the layers as concurrent stages of such a wavefront; the module then hands it the whole stack
here instead of looping over layers (bilstm_fast/module.py). The backward's recurrences run as a
wavefront too, top layer first (`stack_backward`); each layer's weight gradients are then the
GEMMs a single layer's backward runs after its recurrence (function.gradients_from_dgates).

Which schedule runs is `schedule`'s choice, from the benchmark's measurements (benchmarks/NOTES.md,
"Unidirectional stacks"): the wavefront, the batch split of every layer without the join between
layers (groups = 1), or the module's layer-by-layer loop (None).
"""
import os

import torch

from bilstm_fast import ops
from bilstm_fast.function import (
    _legacy_batched,
    differentiable_backward,
    gradients_from_dgates,
    layer_autograd,
    layer_backward,
    split_directions,
)
from bilstm_fast.kernels import recurrence_module, resolve_backend

SCHEDULES = ("layers", "batch", "wavefront")
# the batch size from which the native backend splits one layer's rows between two threads
# (kernels/csrc/tasks.h: min_rows_per_slice, 8 rows a slice)
ROW_SPLIT_ROWS = 16


def stack_backend(backend, x, num_layers, bidirectional, proj_size):
    """The backend module when the stack can go to it in one call, else None: a unidirectional
    stack of two or more layers without projection, plain eager, a backend with `stack_forward`."""
    if bidirectional or num_layers < 2 or proj_size > 0 or not ops.eager() or x.device.type == "meta":
        return None
    rec = recurrence_module(resolve_backend(backend, x.device, x.dtype))
    return rec if hasattr(rec, "stack_forward") else None


def schedule(B, num_layers, threads):
    """The stack's number of stages (1: the batch split), or None for the layer-by-layer loop.
    BILSTM_FAST_STACK=layers|batch|wavefront forces one (benchmarks and tests)."""
    forced = os.environ.get("BILSTM_FAST_STACK", "")
    if forced:
        if forced not in SCHEDULES:
            raise ValueError(f"BILSTM_FAST_STACK must be one of {', '.join(SCHEDULES)}, got {forced!r}")
        return None if forced == "layers" else 1 if forced == "batch" else min(num_layers, threads)
    # Measured (NOTES 38, AMD EPYC AVX2, 2 threads): the wavefront pays where a layer alone cannot
    # use the threads, below the native backend's row split (B < 16: one task per layer, the other
    # thread idle): at B4 H128-256 0.73-0.88 of layer by layer's time, one-word generation 0.78.
    # From B16 up, layer by layer (its rows split) was as fast or faster at every H (the wavefront
    # 1.0-1.4x), and the batch split without joins within the noise of it.
    if threads < 2 or B >= ROW_SPLIT_ROWS:
        return None
    return min(num_layers, threads)


def _weights(layers):
    """Per-layer lists of w_ih [4H, I], w_hh [4H, H] and the summed bias [4H] (None: no bias)."""
    w_ih, w_hh, bias = [], [], []
    for params in layers:
        wi, wh, b, _ = split_directions(params, 1)
        w_ih.append(wi[0])
        w_hh.append(wh[0])
        bias.append(None if b is None else b[0])
    return w_ih, w_hh, None if bias[0] is None else bias


def run(rec, backend, x, h0, c0, lengths, layers, masks, groups):
    """x [T, B, I], h0/c0 [L, B, H], layers: each layer's flat parameter list as nn.LSTM orders
    it, masks: None or L - 1 dropout masks [T, B, H] -> out [T, B, H], h_n, c_n [L, B, H]."""
    T, B, _ = x.shape
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, h0, c0, *(p for ps in layers for p in ps))):
        per_layer = len(layers[0])
        params = [p for ps in layers for p in ps]
        return StackFunction.apply(x, h0, c0, lengths, (rec, backend, masks, groups, per_layer), *params)
    w_ih, w_hh, bias = _weights(layers)
    outs, h_n, c_n, _, _, _ = rec.stack_forward(x, w_ih, bias, w_hh, h0, c0, lengths, False, masks, groups)
    return outs[-1].view(T, B, outs[-1].shape[-1]), h_n, c_n


class StackFunction(torch.autograd.Function):
    """(x, h0, c0 [L, B, H], lengths, (backend module, backend name, masks, groups, parameters per
    layer), *params) -> out [T, B, H], h_n, c_n [L, B, H]. Plain eager only (stack_backend): transforms,
    compilers and tracers get the layer-by-layer loop and its custom ops."""

    @staticmethod
    def forward(ctx, x, h0, c0, lengths, config, *params):
        rec, backend, masks, groups, per_layer = config
        layers = [params[k:k + per_layer] for k in range(0, len(params), per_layer)]
        w_ih, w_hh, bias = _weights(layers)
        outs, h_n, c_n, gates, cs, dropped = rec.stack_forward(x, w_ih, bias, w_hh, h0, c0, lengths, True, masks,
                                                               groups)
        T, B, _ = x.shape
        inputs = [x] + (dropped if masks else [o.view(T, B, o.shape[-1]) for o in outs[:-1]])
        out = outs[-1].view(T, B, outs[-1].shape[-1])
        # the last out detached: saving the output itself would keep this node alive from its own
        # saved tensors (see LSTMLayerFunction.setup_context)
        ctx.save_for_backward(h0, c0, lengths, *inputs, *outs[:-1], out.detach(), *gates, *cs, *params)
        ctx.config = (rec, backend, masks, groups, len(layers), per_layer)
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, dout, dh_n, dc_n):
        rec, backend, masks, groups, L, per_layer = ctx.config
        h0, c0, lengths, *saved = ctx.saved_tensors
        inputs, outs, gates, cs, params = (saved[:L], saved[L:2 * L], saved[2 * L:3 * L], saved[3 * L:4 * L],
                                           saved[4 * L:])
        if torch.is_grad_enabled():  # create_graph=True: the whole stack recomputed and differentiated

            def stack_autograd(x, h0, c0, lengths, params):
                return _stack_autograd(x, h0, c0, lengths, params, per_layer, masks)

            return differentiable_backward(ctx.needs_input_grad, inputs[0], h0, c0, lengths, params, dout, dh_n,
                                           dc_n, forward=stack_autograd)
        need_x, need_h0, need_c0 = ctx.needs_input_grad[:3]
        need_params = ctx.needs_input_grad[5:]

        def layer_saved(layer):  # what the layer's own Function would have saved
            return (inputs[layer], h0[layer:layer + 1], c0[layer:layer + 1], lengths, outs[layer], gates[layer],
                    cs[layer], *params[layer * per_layer:(layer + 1) * per_layer])

        if not any(map(_legacy_batched, (dout, dh_n, dc_n))):
            dgates, dh0, dc0 = rec.stack_backward(
                torch.zeros_like(outs[-1]) if dout is None else dout,
                torch.zeros_like(h0) if dh_n is None else dh_n, torch.zeros_like(c0) if dc_n is None else dc_n,
                params[0::per_layer], params[1::per_layer], gates, cs, c0, lengths, masks, groups,
            )
            param_grads, dx = [], None
            for layer in range(L):
                own = slice(layer * per_layer, (layer + 1) * per_layer)
                state = slice(layer, layer + 1)
                need = (need_x and layer == 0, need_h0, need_c0, False, False, *need_params[own])
                d_input, _, _, _, _, *grads = gradients_from_dgates(backend, need, layer_saved(layer), dgates[layer],
                                                                    dh0[state], dc0[state], None)
                if layer == 0:
                    dx = d_input
                param_grads += grads
            return (dx, dh0.to(h0.dtype) if need_h0 else None, dc0.to(c0.dtype) if need_c0 else None, None, None,
                    *param_grads)
        # cotangents batched by the legacy vmap: layer by layer (function.layer_backward batches them)
        param_grads = [None] * len(params)
        dh0, dc0 = [None] * L, [None] * L
        for layer in reversed(range(L)):
            # a layer's input gradient is needed where anything below it needs one
            need_input = need_x or (layer > 0 and (need_h0 or need_c0 or any(need_params[:layer * per_layer])))
            own = slice(layer * per_layer, (layer + 1) * per_layer)
            need = (need_input, need_h0, need_c0, False, False, *need_params[own])
            state = slice(layer, layer + 1)
            dx, dh0[layer], dc0[layer], _, _, *param_grads[own] = layer_backward(
                backend, need, layer_saved(layer), dout, None if dh_n is None else dh_n[state],
                None if dc_n is None else dc_n[state],
            )
            if not need_input:
                break
            # through the dropout between the layers: the gradient of out * mask
            dout = dx if not masks or layer == 0 else dx * masks[layer - 1]
        dh0 = torch.cat(dh0) if need_h0 else None
        dc0 = torch.cat(dc0) if need_c0 else None
        return (dout if need_x else None), dh0, dc0, None, None, *param_grads


def _stack_autograd(x, h0, c0, lengths, params, per_layer, masks):
    """The stack in plain differentiable torch ops, layer by layer (function.layer_autograd)."""
    L = len(params) // per_layer
    h_n, c_n = [], []
    for layer in range(L):
        state = slice(layer, layer + 1)
        x, h, c = layer_autograd(x, h0[state], c0[state], lengths, params[layer * per_layer:(layer + 1) * per_layer])
        h_n.append(h)
        c_n.append(c)
        if masks and layer < L - 1:
            x = x * masks[layer]
    return x, torch.cat(h_n), torch.cat(c_n)
