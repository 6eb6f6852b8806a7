"""FastBiLSTM: a drop-in for nn.LSTM (bidirectional by default) running on bilstm_fast's kernels.

Built on nn.RNNBase in 'LSTM' mode, which owns the constructor, parameters, init, state_dict
and repr that nn.LSTM has. Not on nn.LSTM itself: torch.compile refuses to trace any nn.LSTM
instance, and composing with torch.compile is a goal here.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from bilstm_fast.function import lstm_layer_params
from bilstm_fast.kernels import BACKENDS


class FastBiLSTM(nn.RNNBase):
    """Same constructor, parameters and call as nn.LSTM; `bidirectional` defaults to True.

    backend: 'auto' (Triton on CUDA when available, vectorized otherwise), 'vectorized' or
    'triton'. It is a plain attribute, so `module.backend = ...` switches it later.
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
        if proj_size != 0:
            raise NotImplementedError("FastBiLSTM does not support proj_size > 0 yet; use nn.LSTM")
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

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "FastBiLSTM cannot be compiled by torch.jit.script (its ops are Python autograd "
            "Functions and custom ops); use torch.compile, or torch.jit.trace for export"
        )

    # nn.LSTM's argument checks and hidden-state permutation, so errors read the same.
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    @classmethod
    def from_lstm(cls, lstm, backend="auto"):
        """A FastBiLSTM with the configuration and (copied) weights of an nn.LSTM."""
        if lstm.proj_size != 0:
            raise NotImplementedError("FastBiLSTM does not support proj_size > 0 yet; use nn.LSTM")
        param = lstm.weight_ih_l0
        fast = cls(
            lstm.input_size,
            lstm.hidden_size,
            num_layers=lstm.num_layers,
            bias=lstm.bias,
            batch_first=lstm.batch_first,
            dropout=lstm.dropout,
            bidirectional=lstm.bidirectional,
            device=param.device,
            dtype=param.dtype,
            backend=backend,
        )
        fast.load_state_dict(lstm.state_dict())
        fast.train(lstm.training)
        return fast

    def _layer_params(self, layer):
        """One layer's parameters in nn.LSTM's flat order: per direction w_ih, w_hh[, b_ih, b_hh]."""
        suffixes = ["", "_reverse"][: 2 if self.bidirectional else 1]
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])
        return [getattr(self, f"{name}_l{layer}{suffix}") for suffix in suffixes for name in names]

    def _expected_parameter_shapes(self):
        """(name, shape) of every weight and bias, as nn.RNNBase creates them."""
        D = 2 if self.bidirectional else 1
        H, G = self.hidden_size, 4 * self.hidden_size
        for layer in range(self.num_layers):
            layer_input = self.input_size if layer == 0 else D * H
            for suffix in ("", "_reverse")[:D]:
                yield f"weight_ih_l{layer}{suffix}", (G, layer_input)
                yield f"weight_hh_l{layer}{suffix}", (G, H)
                if self.bias:
                    yield f"bias_ih_l{layer}{suffix}", (G,)
                    yield f"bias_hh_l{layer}{suffix}", (G,)

    def _check_parameters(self):
        """A weight replaced after construction must still fit. nn.LSTM does not check: a wrong
        weight_hh shape runs silently there, and a stray dtype fails deep inside oneDNN."""
        first = self.weight_ih_l0
        for name, shape in self._expected_parameter_shapes():
            w = getattr(self, name)
            if not isinstance(w, torch.Tensor):
                raise TypeError(f"FastBiLSTM parameter {name} is {type(w).__name__}, expected a Tensor")
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

    @staticmethod
    def _check_hx_pair(hx):
        """hx must be (h_0, c_0): nn.LSTM fails on other shapes of hx with AttributeError or
        IndexError, and iterating a stacked [2, ...] tensor would silently pass as a pair."""
        if not isinstance(hx, (tuple, list)):
            raise TypeError(f"LSTM expects hx to be a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}")
        if len(hx) != 2:
            raise RuntimeError(f"lstm expects two hidden states (h_0, c_0), got {len(hx)}")
        for name, t in zip(("h_0", "c_0"), hx):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"LSTM expects {name} to be a Tensor, got {type(t).__name__}")
            if t.layout != torch.strided:
                raise TypeError(f"LSTM expects a dense (strided) {name}, got layout {t.layout}")

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

    def _run_layers(self, x, h0, c0, lengths):
        """x [T, B, I] time-major; h0/c0 [L*D, B, H] -> out [T, B, D*H], h_n, c_n."""
        D = 2 if self.bidirectional else 1
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            params = [w.to(x.dtype) for w in self._layer_params(layer)]
            states = slice(layer * D, (layer + 1) * D)
            x, h, c = lstm_layer_params(x, params, h0[states], c0[states], lengths, self.backend)
            h_n.append(h)
            c_n.append(c)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        return x, torch.cat(h_n), torch.cat(c_n)

    def forward(self, input, hx=None):
        D = 2 if self.bidirectional else 1
        packed = isinstance(input, PackedSequence)
        lengths = None
        # every check runs before any compute, so a bad call fails with a message, not mid-kernel
        if not packed and not isinstance(input, torch.Tensor):
            raise TypeError(f"LSTM expects input to be a Tensor or PackedSequence, got {type(input).__name__}")
        if not packed and input.layout != torch.strided:
            raise TypeError(f"LSTM expects a dense (strided) input tensor, got layout {input.layout}")
        if hx is not None:
            self._check_hx_pair(hx)
        self._check_parameters()
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
        if hx is None:
            zeros = x.new_zeros(self.num_layers * D, x.shape[1], self.hidden_size)
            hx = (zeros, zeros)
        self._check_devices(x, hx)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            # as nn.LSTM under autocast: run in the autocast dtype (fp32 accumulation and cell
            # state inside the op), with autocast off so nothing inside is cast again
            dtype = torch.get_autocast_dtype(device_type)
            x, hx = x.to(dtype), (hx[0].to(dtype), hx[1].to(dtype))
        with torch.autocast(device_type, enabled=False):
            out, h_n, c_n = self._run_layers(x.contiguous(), hx[0], hx[1], lengths)

        if packed:
            sorted_lengths = lengths_cpu[sorted_indices.cpu()] if sorted_indices is not None else lengths_cpu
            out_sorted = out if sorted_indices is None else out.index_select(1, sorted_indices)
            data = pack_padded_sequence(out_sorted, sorted_lengths).data
            return PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices), (h_n, c_n)
        if out.requires_grad:
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


def swap_lstm(model, backend="auto"):
    """Replace every nn.LSTM inside `model` (in place) by a FastBiLSTM with the same weights.

    Returns the model, or a new FastBiLSTM when `model` itself is an nn.LSTM.
    """
    if isinstance(model, nn.LSTM):
        return FastBiLSTM.from_lstm(model, backend=backend)
    for name, child in model.named_children():
        setattr(model, name, swap_lstm(child, backend=backend))
    return model
