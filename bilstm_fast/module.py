"""FastBiLSTM: a drop-in for nn.LSTM (bidirectional by default) running on bilstm_fast's kernels.

Built on nn.RNNBase in 'LSTM' mode, which owns the constructor, parameters, init, state_dict
and repr that nn.LSTM has. Not on nn.LSTM itself: torch.compile refuses to trace any nn.LSTM
instance, and composing with torch.compile is a goal here.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from bilstm_fast import export, stack
from bilstm_fast.function import lstm_layer_params
from bilstm_fast.kernels import BACKENDS


class FastBiLSTM(nn.RNNBase):
    """A drop-in for nn.LSTM: same constructor, parameters, state_dict, inputs and outputs.

    Args:
        input_size: features of each input step.
        hidden_size: features of the cell state c (and of h when proj_size is 0).
        num_layers: stacked layers; layer k > 0 reads layer k-1's output. Default 1.
        bias: whether each direction of each layer has b_ih and b_hh. Default True.
        batch_first: input and output as [B, T, F] instead of [T, B, F] (h and c stay
            [L*D, B, H]). Default False.
        dropout: dropout probability on each layer's output except the last, in training mode,
            drawing the same masks as nn.LSTM on the CPU (on packed input: on the packed data).
            Default 0.
        bidirectional: run a second, time-reversed direction and concatenate the two.
            Default **True** (nn.LSTM's is False): that is this class's purpose.
        proj_size: if > 0, an LSTM with projections: h = (o * tanh(c)) @ W_hr^T is proj_size
            wide, with weights weight_hr_l{k}[_reverse] [proj_size, hidden_size]. Inside every
            backend's kernels (native, Triton, vectorized). Default 0.
        device, dtype: where and in which dtype the parameters are created.
        backend: 'auto' (Triton for CUDA tensors when triton imports; native for fp32/fp64 CPU
            tensors where it is built; vectorized otherwise), 'native', 'vectorized' or 'triton'.
            A plain attribute: `module.backend = ...` switches it.

    Call: `output, (h_n, c_n) = module(input, (h_0, c_0))` exactly as nn.LSTM: input a tensor
    ([T, B, I], [B, T, I] with batch_first, or unbatched [T, I]) or a PackedSequence; (h_0, c_0)
    optional, zeros by default.

    `FastBiLSTM.from_lstm(lstm)` takes over an nn.LSTM's Parameters, `to_lstm()` gives them
    back to an nn.LSTM; `swap_lstm(model)` / `unswap_lstm(model)` do it throughout a model.
    It is deliberately not an nn.LSTM subclass (torch.compile refuses to trace nn.LSTM
    instances), so `isinstance(m, nn.LSTM)` is False for it.
    """

    def __init__(
        self,
        input_size,
        hidden_size,
        num_layers=1,
        bias=True,
        batch_first=False,
        dropout=0.0,
        bidirectional=True,
        proj_size=0,
        device=None,
        dtype=None,
        backend="auto",
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        super().__init__(
            "LSTM",
            input_size,
            hidden_size,
            num_layers=num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            proj_size=proj_size,
            device=device,
            dtype=dtype,
        )
        self.backend = backend

    def extra_repr(self):
        # nn.RNNBase prints bidirectional only when True, which is this class's default: say
        # False explicitly, or FastBiLSTM(5, 4) would read as bidirectional
        text = super().extra_repr()
        if not self.bidirectional:
            text += ", bidirectional=False"
        if self.backend != "auto":
            text += f", backend={self.backend!r}"
        return text

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "FastBiLSTM cannot be compiled by torch.jit.script (its ops are Python autograd "
            "Functions and custom ops). What works: torch.compile; torch.jit.trace (jit.save and "
            "jit.load included; loading needs `import bilstm_fast`); torch.export; or "
            "module.to_lstm() for an nn.LSTM that jit.script accepts"
        )

    # nn.LSTM's argument checks and hidden-state permutation, so errors read the same.
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    @classmethod
    def from_lstm(cls, lstm, backend="auto", copy=False):
        """A FastBiLSTM that takes over an nn.LSTM's configuration and its Parameter objects.

        Nothing is copied and no random number is drawn: the new module holds the very
        Parameters (and parametrizations, e.g. weight_norm) of `lstm`, so `requires_grad`
        flags, an optimizer built on `lstm.parameters()` and its state keep working, and a
        seeded script stays the same script. The two modules then share their weights: use
        the FastBiLSTM in place of the nn.LSTM. `copy=True` gives independent copies instead
        (still without drawing random numbers), as `copy.deepcopy` would.
        """
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"from_lstm expects an nn.LSTM, got {type(lstm).__name__}")
        if _overrides_forward(lstm, nn.LSTM):
            raise TypeError(
                f"{type(lstm).__name__} overrides nn.LSTM.forward; a FastBiLSTM would silently drop "
                "that forward. Build the FastBiLSTM inside your subclass instead"
            )
        if copy:
            import copy as _copy

            lstm = _copy.deepcopy(lstm)
        with torch.device("meta"):  # placeholders only: no memory, no random numbers
            fast = cls(**_config(lstm), backend=backend)
        _move_parameters(lstm, fast)
        return fast

    def to_lstm(self):
        """The inverse of from_lstm: an nn.LSTM holding this module's Parameter objects (no copy).

        For what only nn.LSTM has: `torch.ao.quantization.quantize_dynamic(..., {nn.LSTM})`,
        `torch.jit.script`, code that checks `isinstance(m, nn.LSTM)`."""
        with torch.device("meta"):
            lstm = nn.LSTM(**_config(self))
        _move_parameters(self, lstm)
        return lstm

    def _layer_params(self, layer):
        """One layer's parameters in nn.LSTM's flat order: per direction w_ih, w_hh[, b_ih, b_hh][, w_hr]."""
        return [self._get(name) for name, _ in self._layout()[layer]]

    def _expected_parameter_shapes(self):
        """(name, shape) of every weight and bias, as nn.RNNBase creates them."""
        for layer in self._layout():
            yield from layer

    def _layout(self):
        """Per layer, [(name, expected shape)] in nn.LSTM's flat order; computed once per
        configuration (this runs on every call, and a tiny call is dominated by such work)."""
        key = (self.input_size, self.hidden_size, self.num_layers, self.bias, self.bidirectional, self.proj_size)
        cached = self.__dict__.get("_layout_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        D = 2 if self.bidirectional else 1
        H, G = self.hidden_size, 4 * self.hidden_size
        P = self.proj_size or H  # the width of h
        layout = []
        for layer in range(self.num_layers):
            layer_input = self.input_size if layer == 0 else D * P
            names = []
            for suffix in ("", "_reverse")[:D]:
                names += [(f"weight_ih_l{layer}{suffix}", (G, layer_input)), (f"weight_hh_l{layer}{suffix}", (G, P))]
                if self.bias:
                    names += [(f"bias_ih_l{layer}{suffix}", (G,)), (f"bias_hh_l{layer}{suffix}", (G,))]
                if self.proj_size > 0:
                    names.append((f"weight_hr_l{layer}{suffix}", (self.proj_size, H)))
            layout.append(names)
        self.__dict__["_layout_cache"] = (key, layout)
        return layout

    def _get(self, name):
        params = self._parameters
        # the dict first: nn.Module.__getattr__ is slow; parametrized or functional_call-swapped
        # weights are found by getattr
        w = params.get(name)
        return w if w is not None else getattr(self, name)

    def _check_parameters(self):
        """Every layer's parameters, checked: a weight replaced after construction must still
        fit. nn.LSTM does not check: a wrong weight_hh shape runs silently there, and a stray
        dtype fails deep inside oneDNN. One pass over a cached layout, since it runs per call."""
        layers = []
        first = None
        for layout in self._layout():
            params = []
            for name, shape in layout:
                w = self._get(name)
                if not isinstance(w, torch.Tensor):
                    raise TypeError(f"FastBiLSTM parameter {name} is {type(w).__name__}, expected a Tensor")
                if first is None:
                    first = w
                if w.shape != shape:
                    raise RuntimeError(
                        f"FastBiLSTM parameter {name} has shape {tuple(w.shape)}, expected {shape} for "
                        f"input_size={self.input_size}, hidden_size={self.hidden_size}"
                    )
                if w.dtype != first.dtype:
                    raise ValueError(
                        f"FastBiLSTM parameters must share one dtype: {name} is {w.dtype}, weight_ih_l0 "
                        f"is {first.dtype}; convert with module.to(dtype)"
                    )
                if w.device != first.device:
                    raise RuntimeError(
                        f"FastBiLSTM parameters must be on one device: {name} is on {w.device}, "
                        f"weight_ih_l0 on {first.device}; move them with module.to(device)"
                    )
                params.append(w)
            layers.append(params)
        return layers

    @staticmethod
    def _hx_pair(hx, rebuilt):
        """hx as the pair (h_0, c_0), or the error nn.LSTM raises. nn.LSTM hands hx to its kernel
        as it is, which takes a tuple or list of two tensors, except where it rebuilds the pair
        itself (`rebuilt`: unbatched input, packed input with sorted_indices): there a tensor whose
        first axis holds the two, a stacked [2, L*D, (B,) H], works too. Elsewhere nn.LSTM checks
        such a tensor's hx[0] and hx[1] and then refuses it (forward)."""
        if isinstance(hx, torch.Tensor):
            if hx.dim() == 0 or hx.shape[0] < 2:  # nn.LSTM fails indexing hx[1]
                raise IndexError(
                    f"LSTM expects hx to hold (h_0, c_0) along its first axis, got shape {tuple(hx.shape)}"
                )
            hx = tuple(hx) if rebuilt else (hx[0], hx[1])
        if not isinstance(hx, (tuple, list)):
            raise TypeError(f"LSTM expects hx to be a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}")
        if len(hx) != 2:
            raise RuntimeError(f"lstm expects two hidden states (h_0, c_0), got {len(hx)}")
        for name, t in zip(("h_0", "c_0"), hx):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"LSTM expects {name} to be a Tensor, got {type(t).__name__}")
            if t.layout != torch.strided:
                raise TypeError(f"LSTM expects a dense (strided) {name}, got layout {t.layout}")
        return hx

    @staticmethod
    def _check_packed(packed):
        """A hand-built PackedSequence must describe real sequences: nn.LSTM runs silently on
        extra data rows or short index tensors, and fails with internal errors on the rest."""
        data, batch_sizes = packed.data, packed.batch_sizes
        if not isinstance(data, torch.Tensor) or data.layout != torch.strided or data.dim() != 2:
            raise ValueError("PackedSequence data must be a dense 2-D tensor [sum(batch_sizes), input_size]")
        if (
            batch_sizes.dim() != 1
            or batch_sizes.dtype != torch.int64
            or batch_sizes.device.type != "cpu"
            or batch_sizes.numel() == 0
        ):
            raise ValueError(
                "PackedSequence batch_sizes must be a non-empty 1-D int64 CPU tensor, got "
                f"{batch_sizes.dim()}-D {batch_sizes.dtype} on {batch_sizes.device} with {batch_sizes.numel()} entries"
            )
        sizes = batch_sizes.tolist()
        # batch_sizes[t] counts the sequences longer than t: every sequence has length >= 1
        if sizes[0] < 1 or sizes[-1] < 0 or any(later > earlier for earlier, later in zip(sizes, sizes[1:])):
            raise ValueError(
                f"PackedSequence batch_sizes must start positive and never increase (every sequence "
                f"has length >= 1), got {sizes}"
            )
        if sum(sizes) != data.shape[0]:
            raise ValueError(
                f"PackedSequence data has {data.shape[0]} rows but its batch_sizes sum to {sum(sizes)}"
            )
        for name in ("sorted_indices", "unsorted_indices"):
            index = getattr(packed, name)
            if index is not None and tuple(index.shape) != (sizes[0],):
                raise ValueError(
                    f"PackedSequence {name} must hold one entry per sequence ({sizes[0]}), "
                    f"got shape {tuple(index.shape)}"
                )

    def _check_devices(self, input, hx):
        param = self.weight_ih_l0
        for name, t in (("input", input), ("h0", hx[0]), ("c0", hx[1])):
            if t.device != param.device:
                raise RuntimeError(
                    f"Input and parameter tensors are not at the same device, found {name} "
                    f"on {t.device} and parameters on {param.device}"
                )
        for name, t in (("h0", hx[0]), ("c0", hx[1])):
            if t.dtype != input.dtype:
                raise RuntimeError(f"Expected {name} to have dtype {input.dtype}, got {t.dtype}")

    def _run_layers(self, x, h0, c0, lengths, packed=None, layers=None, onnx=False):
        """x [T, B, I] time-major; h0/c0 [L*D, B, H] -> out [T, B, D*H], h_n, c_n.
        packed: the input PackedSequence, if any (dropout then acts on packed data).
        onnx: under torch.onnx.export, each layer as ONNX's LSTM operator (bilstm_fast/export.py)."""
        D = 2 if self.bidirectional else 1
        h_n, c_n = [], []
        if layers is None:
            layers = self._check_parameters()
        if not onnx:
            result = self._run_stack(x, h0, c0, lengths, packed, layers)
            if result is not None:
                return result
        for layer in range(self.num_layers):
            params = layers[layer]
            if params[0].dtype != x.dtype:  # autocast: the weights in the autocast dtype
                params = [w.to(x.dtype) for w in params]
            states = slice(layer * D, (layer + 1) * D)
            if onnx:
                x, h, c = export.layer(self, x, params, h0[states], c0[states])
            else:
                x, h, c = lstm_layer_params(x, params, h0[states], c0[states], lengths, self.backend)
            h_n.append(h)
            c_n.append(c)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = self._dropout(x, packed)
        if len(h_n) == 1:  # one layer: its fresh states as they are, no copy
            return x, h_n[0], c_n[0]
        return x, torch.cat(h_n), torch.cat(c_n)

    def _run_stack(self, x, h0, c0, lengths, packed, layers):
        """The whole stack in one backend call (bilstm_fast/stack.py), or None where that does not
        apply or is not chosen: then the layers run one by one."""
        rec = stack.stack_backend(self.backend, x, self.num_layers, self.bidirectional, self.proj_size)
        if rec is None:
            return None
        groups = stack.schedule(x.shape[1], self.num_layers, torch.get_num_threads())
        if groups is None:
            return None
        layers = [params if params[0].dtype == x.dtype else [w.to(x.dtype) for w in params] for params in layers]
        masks = None
        if self.dropout > 0 and self.training:
            # drawn up front, in layer order: the numbers nn.LSTM draws between its layers
            ones = x.new_ones(x.shape[0], x.shape[1], self.hidden_size)
            masks = [self._dropout(ones, packed) for _ in range(self.num_layers - 1)]
        return stack.run(rec, self.backend, x, h0, c0, lengths, layers, masks, groups)

    def _dropout(self, x, packed):
        """Dropout between layers, drawing the random numbers nn.LSTM draws: on packed input it
        drops elements of the packed data [sum(lengths), D*H] (same shape, so the same mask
        under the same seed on the CPU), on padded input elements of [T, B, D*H]."""
        if packed is None:
            return F.dropout(x, self.dropout, training=True)
        in_packed_order = x if packed.sorted_indices is None else x.index_select(1, packed.sorted_indices)
        data = pack_padded_sequence(in_packed_order, _sorted_lengths(packed)).data
        data = F.dropout(data, self.dropout, training=True)
        seq = PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        return pad_packed_sequence(seq, total_length=x.shape[0])[0]

    def forward(self, input, hx=None):
        D = 2 if self.bidirectional else 1
        packed = isinstance(input, PackedSequence)
        lengths = None
        # torch.onnx.export captures the forward by tracing (torch.export or torch.jit.trace):
        # the cheap checks first, since is_in_onnx_export costs microseconds
        onnx = (torch.compiler.is_exporting() or torch.jit.is_tracing()) and export.exporting()
        if onnx:
            export.check_exportable(self, packed)
        # every check runs before any compute, so a bad call fails with a message, not mid-kernel
        if not packed and not isinstance(input, torch.Tensor):
            raise TypeError(f"LSTM expects input to be a Tensor or PackedSequence, got {type(input).__name__}")
        if not packed and input.layout != torch.strided:
            raise TypeError(f"LSTM expects a dense (strided) input tensor, got layout {input.layout}")
        stacked_hx = False
        if hx is not None:
            rebuilt = input.sorted_indices is not None if packed else input.dim() == 2
            stacked_hx = isinstance(hx, torch.Tensor) and not rebuilt
            hx = self._hx_pair(hx, rebuilt)
        layers = self._check_parameters()
        if packed:
            self._check_packed(input)
            batch_sizes = input.batch_sizes
            sorted_indices, unsorted_indices = input.sorted_indices, input.unsorted_indices
            # nn.LSTM checks packed data (dtype, features) even without hx; skipping it let fp64
            # data run through a fp32 module and come out fp64
            if hx is None:
                self.check_input(input.data, batch_sizes)
            else:
                self.check_forward_args(input.data, hx, batch_sizes)
            # padded, time-major, in the caller's batch order: hx needs no permutation
            x, lengths_cpu = pad_packed_sequence(input)
            lengths = lengths_cpu.to(x.device)
            is_batched, batch_dim = True, 1
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
                if hx is not None:
                    if hx[0].dim() != 2 or hx[1].dim() != 2:
                        raise RuntimeError(
                            "For unbatched 2-D input, hx and cx should also be 2-D but got "
                            f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                        )
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            elif hx is not None and (hx[0].dim() != 3 or hx[1].dim() != 3):
                raise RuntimeError(
                    "For batched 3-D input, hx and cx should also be 3-D but got "
                    f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                )
            if hx is None:
                self.check_input(input, None)
            else:
                self.check_forward_args(input, hx, None)
            x = input.transpose(0, 1) if self.batch_first else input
            if x.shape[0] == 0:
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if stacked_hx:
            raise TypeError(
                "LSTM expects hx to be a tuple (h_0, c_0) of two tensors, got Tensor (as nn.LSTM, a stacked "
                "tensor only for unbatched input or packed input with sorted_indices)"
            )
        if hx is None:
            c_zeros = x.new_zeros(self.num_layers * D, x.shape[1], self.hidden_size)
            h_zeros = x.new_zeros(self.num_layers * D, x.shape[1], self.proj_size) if self.proj_size > 0 else c_zeros
            hx = (h_zeros, c_zeros)
        self._check_devices(x, hx)
        device_type = x.device.type
        packed_input = input if packed else None
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            if x.dtype in (torch.float32, torch.float16, torch.bfloat16):
                # as nn.LSTM under autocast: run in the autocast dtype (fp32 accumulation and cell
                # state inside the op), with autocast off so nothing inside is cast again
                dtype = torch.get_autocast_dtype(device_type)
                x, hx = x.to(dtype), (hx[0].to(dtype), hx[1].to(dtype))
            with torch.autocast(device_type, enabled=False):
                out, h_n, c_n = self._run_layers(x.contiguous(), hx[0], hx[1], lengths, packed_input, layers, onnx)
        else:  # no autocast context to leave (entering one costs ~20 us, a tiny call notices)
            out, h_n, c_n = self._run_layers(x.contiguous(), hx[0], hx[1], lengths, packed_input, layers, onnx)

        if packed:
            sorted_lengths = lengths_cpu[sorted_indices.cpu()] if sorted_indices is not None else lengths_cpu
            out_sorted = out if sorted_indices is None else out.index_select(1, sorted_indices)
            data = pack_padded_sequence(out_sorted, sorted_lengths).data
            return PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices), (h_n, c_n)
        if out.requires_grad or torch.jit.is_tracing():  # a trace must not depend on grad mode
            # out is a view of a tensor the op saves for backward, so it cannot be modified in
            # place; nn.LSTM's output can (masking padded steps, ReLU(inplace=True)) and still
            # backpropagate. A copy of the last layer's output is what that costs.
            out = out.clone()
        if self.batch_first:
            out = out.transpose(0, 1)
        if not is_batched:
            out = out.squeeze(batch_dim)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return out, (h_n, c_n)


def _sorted_lengths(packed):
    """Each sequence's length, longest first (the packed order), from batch_sizes."""
    sizes = packed.batch_sizes
    return (torch.arange(sizes[0]).unsqueeze(1) < sizes.unsqueeze(0)).sum(1)


def _config(lstm):
    return dict(
        input_size=lstm.input_size,
        hidden_size=lstm.hidden_size,
        num_layers=lstm.num_layers,
        bias=lstm.bias,
        batch_first=lstm.batch_first,
        dropout=lstm.dropout,
        bidirectional=lstm.bidirectional,
        proj_size=lstm.proj_size,
    )


def _overrides_forward(module, base):
    """Whether module's class (under any parametrization wrapper class) has its own forward."""
    return type(module).forward is not base.forward


def _move_parameters(source, target):
    """Register source's Parameter objects (and parametrizations) on target, under the same
    names; target's own placeholders are dropped. Hooks, training mode and extra attributes
    the user set on the module come along too."""
    from torch.nn.utils import parametrize

    names = source._flat_weights_names
    plists = getattr(source, "parametrizations", {}) if parametrize.is_parametrized(source) else {}
    for name in names:
        if name in plists:
            del target._parameters[name]
            if not parametrize.is_parametrized(target):
                parametrize._inject_new_class(target)
                target.parametrizations = nn.ModuleDict()
            parametrize._inject_property(target, name)
            target.parametrizations[name] = plists[name]
        else:
            setattr(target, name, source._parameters[name])
    target._init_flat_weights()
    target.train(source.training)
    for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                 "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
        if hasattr(source, attr):
            getattr(target, attr).update(getattr(source, attr))


def _swap(model, convert, is_source, memo, prefix=""):
    for name, child in list(model._modules.items()):  # not named_children: it skips a module registered twice
        if child is None:
            continue
        if id(child) in memo:  # a tied module: the same replacement in every place
            setattr(model, name, memo[id(child)])
            continue
        path = f"{prefix}{name}"
        if is_source(child):
            memo[id(child)] = new = convert(child, path)
            setattr(model, name, new)
        else:
            memo[id(child)] = child
            _swap(child, convert, is_source, memo, f"{path}.")
    return model


def swap_lstm(model, backend="auto"):
    """Replace every nn.LSTM inside `model` (in place) by a FastBiLSTM holding its Parameters.

    Returns the model, or a new FastBiLSTM when `model` itself is an nn.LSTM. The LSTMs'
    Parameter objects move over (from_lstm): no copy, no random numbers drawn, so an optimizer
    built before the swap trains the swapped model, frozen parameters stay frozen and
    parametrizations (weight_norm) stay. A module registered in several places becomes one
    FastBiLSTM in all of them. An nn.LSTM subclass that overrides `forward` is left as it is,
    with a warning: replacing it would drop its forward.
    """
    import warnings

    def convert(lstm, path):
        if _overrides_forward(lstm, nn.LSTM):
            warnings.warn(
                f"swap_lstm leaves {path} ({type(lstm).__name__}) as it is: it overrides nn.LSTM.forward",
                stacklevel=3,
            )
            return lstm
        return FastBiLSTM.from_lstm(lstm, backend=backend)

    if isinstance(model, nn.LSTM):
        return convert(model, type(model).__name__)
    return _swap(model, convert, lambda m: isinstance(m, nn.LSTM), {})


def unswap_lstm(model):
    """The inverse of swap_lstm: every FastBiLSTM inside `model` becomes an nn.LSTM holding its
    Parameters (to_lstm). The path to dynamic quantization, which knows only nn.LSTM:
    `torch.ao.quantization.quantize_dynamic(unswap_lstm(model), {nn.LSTM}, dtype=torch.qint8)`."""
    if isinstance(model, FastBiLSTM):
        return model.to_lstm()
    return _swap(model, lambda m, path: m.to_lstm(), lambda m: isinstance(m, FastBiLSTM), {})
