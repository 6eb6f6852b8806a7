"""ONNX export of FastBiLSTM: each layer becomes ONNX's own LSTM operator, so every runtime runs
its native LSTM kernel.

torch.onnx.export runs the model's forward once to capture it; FastBiLSTM.forward then hands each
layer to `layer` here instead of its kernels (the module's input handling around the layers,
batch_first, unbatched input, zero states, stacking h_n, stays as it is). Nothing here runs
outside an export.

- The dynamo exporter (dynamo=True, the default) traces through torch.export: `layer` emits the
  LSTM node itself with torch.onnx.ops.symbolic_multi_out, which that exporter writes out as it
  is. Batch and time stay symbolic: the node's outputs are declared with the traced sizes, and
  the only reshape merges the two direction axes (flatten), never naming T or B.
- The TorchScript exporter (dynamo=False) traces with torch.jit.trace, which records
  `bilstm_fast::lstm_layer` per layer; `_lstm_layer_symbolic`, registered for that op, writes
  the LSTM node.

ONNX's LSTM orders the gates i, o, f, c where torch has i, f, g, o, and keeps the input and
recurrent biases apart (B = [W_b, R_b]). The node's W, R and B must be plain initializers, already
rearranged: OpenVINO's CPU plugin refuses an LSTM whose weights are computed, and ONNX Runtime's
dynamic quantization leaves such an LSTM in fp32. The exporters fold the rearranging only in part:
the TorchScript exporter folds it at any size (do_constant_folding, its default), the dynamo
exporter's optimizer only for tensors of at most 8192 elements. So with the dynamo exporter the
rearranged weights are computed here, in eager, from the values that torch.export traces as fake
tensors, and handed to the node as constants (`_constant_weights`).

LSTM with projections (proj_size > 0) has no ONNX operator: with the dynamo exporter a layer
becomes one Scan over time (both directions in lockstep) whose body is the cell and the
projection; the TorchScript exporter refuses it and names the dynamo exporter.
"""
import warnings

import torch

# ONNX LSTM as used here (gates i, o, f, c; layout 0) is defined from opset 14 on
MIN_OPSET = 14
# torch's gate blocks (i, f, g, o) in the order ONNX's LSTM wants them (i, o, f, c = g)
ONNX_GATE_ORDER = (0, 3, 1, 2)
PACKED = (
    "FastBiLSTM: a PackedSequence input cannot be exported to ONNX (its batch sizes are data, which "
    "torch.export cannot trace). Either export the model on the padded batch (the padded tensor straight "
    "into the FastBiLSTM, no pack_padded_sequence: batch and length stay dynamic), or, for per-sequence "
    "lengths (ONNX LSTM's sequence_lens), export an nn.LSTM copy with the TorchScript exporter: "
    "torch.onnx.export(unswap_lstm(copy.deepcopy(model)), ..., dynamo=False)"
)
PROJ_TORCHSCRIPT = (
    "FastBiLSTM(proj_size > 0) exports with the dynamo exporter only (torch.onnx.export(..., dynamo=True), "
    "the default), where the projection becomes a Scan over time: ONNX has no LSTM operator with "
    "projections, and the TorchScript exporter (dynamo=False) has no way to write that Scan"
)


def exporting():
    """Whether torch.onnx.export is capturing the model (either exporter). The dynamo exporter
    falls back to torch.export's strict mode when the first capture fails, and dynamo folds
    is_in_onnx_export() to False there: the exporter's own flag (read as dynamo would not fold
    it) keeps that capture on this path too, and its errors ours."""
    if torch.onnx.is_in_onnx_export():
        return True
    from torch.onnx._internal.exporter import _flags

    return getattr(_flags, "_is_onnx_exporting", False)


def check_exportable(module, packed):
    """Refuse what has no faithful ONNX graph, naming the option and the way out."""
    if packed:
        raise RuntimeError(PACKED)
    if module.proj_size > 0 and torch.jit.is_tracing():
        raise RuntimeError(PROJ_TORCHSCRIPT)
    dtype = module.weight_ih_l0.dtype
    if dtype not in (torch.float16, torch.float32, torch.float64):
        raise RuntimeError(
            f"FastBiLSTM parameters in {dtype} cannot be exported: ONNX's LSTM takes float16, float32 "
            "or float64. Convert the model first, e.g. model.float()"
        )
    if module.training and module.dropout > 0 and module.num_layers > 1:
        raise RuntimeError(
            f"FastBiLSTM(dropout={module.dropout}) is in training mode: ONNX's LSTM has no dropout, "
            "so the exported graph would compute something else. Call model.eval() before "
            "torch.onnx.export (dropout is inactive in eval, as in nn.LSTM's export)"
        )


def _gates_onnx(w, H):
    """[4H, ...] rows in torch's gate order -> ONNX's (i, o, f, c): one Gather, which a graph
    computing the weights folds where it can (a Split would not fold: it has several outputs)."""
    return w.unflatten(0, (4, H))[list(ONNX_GATE_ORDER)].flatten(0, 1)


def onnx_weights(params, D, H, bias):
    """A layer's flat nn.LSTM parameter list (no projection) -> ONNX LSTM's W [D, 4H, I],
    R [D, 4H, H] and B [D, 8H] (None without bias), gates reordered."""
    per_direction = len(params) // D
    groups = [params[d * per_direction:(d + 1) * per_direction] for d in range(D)]
    W = torch.stack([_gates_onnx(g[0], H) for g in groups])
    R = torch.stack([_gates_onnx(g[1], H) for g in groups])
    B = torch.stack([torch.cat((_gates_onnx(g[2], H), _gates_onnx(g[3], H))) for g in groups]) if bias else None
    return W, R, B


def layer(module, x, params, h0, c0):
    """One layer at export time: x [T, B, I], h0 [D, B, P], c0 [D, B, H] -> out [T, B, D*P],
    h_n, c_n, as FastBiLSTM's kernels would compute them. No lengths: packed input is refused."""
    if torch.jit.is_tracing():  # TorchScript exporter: the op that _lstm_layer_symbolic translates
        _register_torchscript_symbolic()
        from bilstm_fast.function import lstm_layer_op

        out, h_n, c_n, _, _ = lstm_layer_op(x, h0, c0, None, module.backend, list(params))
        return out, h_n, c_n
    D = h0.shape[0]
    H = c0.shape[-1]
    if module.proj_size > 0:
        return _projected_layer(x, params, D, module.bias, h0, c0)
    weights = _constant_weights(params, D, H, module.bias)
    W, R, B = weights if weights is not None else onnx_weights(params, D, H, module.bias)
    T, batch = x.shape[0], x.shape[1]
    Y, Y_h, Y_c = torch.onnx.ops.symbolic_multi_out(
        "LSTM",
        [x, W, R, B, None, h0, c0],  # no sequence_lens: every sequence runs T steps
        {"hidden_size": H, "direction": "bidirectional" if D == 2 else "forward"},
        dtypes=(x.dtype,) * 3,
        shapes=([T, D, batch, H], [D, batch, H], [D, batch, H]),
        version=MIN_OPSET,
    )
    # Y [T, D, B, H] -> [T, B, D*H]: a transpose and a merge of the last two axes, no size named
    return Y.transpose(1, 2).flatten(2), Y_h, Y_c


def _constant_weights(params, D, H, bias):
    """W, R, B of onnx_weights as real tensors, computed now from the parameters' values, or None
    (with a warning) where that is not possible.

    torch.export traces the module with each parameter swapped for a fake tensor (no data) made
    from the real one; the real one is found through the fake-tensor converter's memo (torch
    internals: read only, a change there gives None, never other values). A real tensor used by
    the trace is lifted as a constant, which the exporter writes as an initializer; no tracing
    mode may see the computation itself. Weights that are not the fakified parameters themselves
    (a parametrization, an autocast cast) get None: the graph then computes them."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils._python_dispatch import _disable_current_modes

    reals = None
    if all(isinstance(p, FakeTensor) for p in params):
        try:
            converter = params[0].fake_mode.fake_tensor_converter
            memo = converter.tensor_memo
            real_of = {}
            for real, tid in converter.meta_converter.describer.lookup_tensor.items():
                fake = memo.get(tid)
                if fake is not None:
                    real_of[id(fake)] = real
            reals = [real_of.get(id(p)) for p in params]
        except AttributeError:  # torch's internals moved
            reals = None
    if reals is None or any(r is None for r in reals):
        warnings.warn(
            "FastBiLSTM export: the LSTM weights are not the module's own parameters (a parametrization, "
            "autocast?), so the graph computes them. The exporter folds that into constants only for "
            "weights of at most 8192 elements; above, OpenVINO's CPU plugin refuses the LSTM node and ONNX "
            "Runtime's quantize_dynamic leaves it in fp32 (ONNX Runtime runs it in fp32). Export plain "
            "parameters instead: e.g. parametrize.remove_parametrizations on a copy of the model",
            stacklevel=2,
        )
        return None
    with _disable_current_modes(), torch.no_grad():
        return onnx_weights([r.detach() for r in reals], D, H, bias)


def _projected_layer(x, params, D, bias, h0, c0):
    """A layer with projections as one Scan over time, both directions in lockstep (the reverse
    one reads time flipped): ONNX has no operator for it. nn.LSTM's cell in torch's gate order,
    then h = (o * tanh(c)) @ W_hr^T."""
    from torch._higher_order_ops.scan import scan

    per_direction = len(params) // D
    groups = [params[d * per_direction:(d + 1) * per_direction] for d in range(D)]
    w_ih = torch.stack([g[0] for g in groups])  # [D, 4H, I]
    w_hh_t = torch.stack([g[1].t() for g in groups])  # [D, P, 4H]
    w_hr_t = torch.stack([g[-1].t() for g in groups])  # [D, H, P]
    gx = torch.einsum("tbi,dgi->tdbg", x, w_ih)  # [T, D, B, 4H]: every step's input projection at once
    if bias:
        gx = gx + torch.stack([g[2] + g[3] for g in groups]).unsqueeze(1)
    if D == 2:  # the reverse direction's steps in the order it takes them
        gx = torch.stack((gx[:, 0], gx[:, 1].flip(0)), dim=1)

    def step(carry, gx_t):
        h, c = carry  # [D, B, P], [D, B, H]
        i, f, g, o = (gx_t + torch.bmm(h, w_hh_t)).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.bmm(torch.sigmoid(o) * torch.tanh(c), w_hr_t)
        return (h, c), h.clone()  # the carry and the step's output must not alias

    (h_n, c_n), out = scan(step, (h0, c0), gx)  # out [T, D, B, P]
    if D == 2:
        out = torch.stack((out[:, 0], out[:, 1].flip(0)), dim=1)
    return out.transpose(1, 2).flatten(2), h_n, c_n


_registered = False


def _register_torchscript_symbolic():
    """Register the TorchScript exporter's symbolic for our own op, once per process (only our
    namespace: nothing of torch's changes)."""
    global _registered
    if not _registered:
        torch.onnx.register_custom_op_symbolic("bilstm_fast::lstm_layer", _lstm_layer_symbolic, MIN_OPSET)
        _registered = True


def _lstm_layer_symbolic(g, x, h0, c0, lengths, backend, params):
    """bilstm_fast::lstm_layer -> one ONNX LSTM node (TorchScript exporter)."""
    from torch.onnx import symbolic_helper as sh

    if not sh._is_none(lengths):  # a module traced on packed input before the export
        raise RuntimeError(PACKED)
    weights = sh._unpack_list(params)
    # the layer's layout from its parameters, whose shapes the trace knows (the states' may be
    # symbolic): per direction w_ih, w_hh [4H, P], then b_ih, b_hh (1-D) with bias, then w_hr
    has_bias = any(sh._get_tensor_rank(w) == 1 for w in weights)
    layouts = {4: (1, False), 5: (1, True), 8: (2, False), 10: (2, True)} if has_bias else {
        2: (1, False), 3: (1, True), 4: (2, False), 6: (2, True)}
    D, proj = layouts[len(weights)]
    if proj:  # a module traced before the export (its forward did not run check_exportable)
        raise RuntimeError(PROJ_TORCHSCRIPT)
    H = sh._get_tensor_dim_size(weights[1], 0) // 4
    per_direction = len(weights) // D

    def gates(w):
        blocks = [sh._slice_helper(g, w, axes=[0], starts=[k * H], ends=[(k + 1) * H]) for k in ONNX_GATE_ORDER]
        return g.op("Concat", *blocks, axis_i=0)

    def stacked(parts):
        return g.op("Concat", *[sh._unsqueeze_helper(g, p, [0]) for p in parts], axis_i=0)

    groups = [weights[d * per_direction:(d + 1) * per_direction] for d in range(D)]
    W = stacked([gates(grp[0]) for grp in groups])
    R = stacked([gates(grp[1]) for grp in groups])
    B = stacked([g.op("Concat", gates(grp[2]), gates(grp[3]), axis_i=0) for grp in groups]) if has_bias else None
    inputs = [v if v is not None else _absent(g) for v in (x, W, R, B, None, h0, c0)]
    Y, Y_h, Y_c = g.op(
        "LSTM", *inputs, outputs=3, hidden_size_i=H,
        direction_s="bidirectional" if D == 2 else "forward",
    )
    # Y [T, D, B, H] -> [T, B, D*H]; Reshape with 0s copies T and B from the input, no size named
    out = g.op("Transpose", Y, perm_i=[0, 2, 1, 3])
    out = sh._reshape_helper(g, out, g.op("Constant", value_t=torch.tensor([0, 0, -1])))
    return out, Y_h, Y_c, out, out


def _absent(g):
    """An optional ONNX input left out (TorchScript exporter)."""
    value = g.op("prim::Constant")
    value.setType(torch._C.OptionalType.ofTensor())
    return value
