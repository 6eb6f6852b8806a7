"""The "vanilla PyTorch" baseline: nn.LSTMCell math, one batched step at a time."""
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence


class VanillaLSTM(nn.Module):
    """The plain PyTorch baseline: nn.LSTMCell math, one batched step at a time, per layer and
    direction; autograd does the backward. Same parameters (names and values) as the nn.LSTM
    it is built from. Variable lengths run padded with a mask (no packing benefit). The cell
    state is kept in at least fp32, as cuDNN and our kernels keep it, so fp16/bf16 rows compare
    like with like."""

    def __init__(self, lstm):
        super().__init__()
        self.num_layers, self.hidden_size = lstm.num_layers, lstm.hidden_size
        self.bidirectional, self.batch_first = lstm.bidirectional, lstm.batch_first
        for name, param in lstm.named_parameters():
            self.register_parameter(name, nn.Parameter(param.detach().clone()))

    def cell(self, x_t, h, c, suffix):
        weight_ih, bias_ih = getattr(self, f"weight_ih{suffix}"), getattr(self, f"bias_ih{suffix}", None)
        weight_hh, bias_hh = getattr(self, f"weight_hh{suffix}"), getattr(self, f"bias_hh{suffix}", None)
        gates = nn.functional.linear(x_t, weight_ih, bias_ih) + nn.functional.linear(h, weight_hh, bias_hh)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # c's precision (>= fp32)
        return (torch.sigmoid(o) * torch.tanh(c)).to(x_t.dtype), c

    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        if packed:
            x, lengths = pad_packed_sequence(input)
            valid = (torch.arange(x.shape[0]).unsqueeze(1) < lengths.unsqueeze(0)).to(x.device)  # [T, B]
        else:
            x = input.transpose(0, 1) if self.batch_first else input
            valid = None
        T, B = x.shape[:2]
        cell_dtype = torch.promote_types(x.dtype, torch.float32)
        zeros = x.new_zeros(B, self.hidden_size)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            directions = ((f"_l{layer}", range(T)), (f"_l{layer}_reverse", reversed(range(T))))
            for suffix, times in directions[: 1 + self.bidirectional]:
                h, c = (zeros, zeros) if hx is None else (hx[0][len(h_n)], hx[1][len(h_n)])
                c = c.to(cell_dtype)
                out = [None] * T
                for t in times:
                    h_new, c_new = self.cell(x[t], h, c, suffix)
                    if valid is None:
                        h, c = h_new, c_new
                        out[t] = h
                    else:
                        m = valid[t].unsqueeze(1)
                        h, c = torch.where(m, h_new, h), torch.where(m, c_new, c)
                        out[t] = h_new * m
                outputs.append(torch.stack(out))
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outputs, dim=2)
        state = (torch.stack(h_n), torch.stack(c_n).to(x.dtype))
        if packed:
            order = input.sorted_indices
            data = pack_padded_sequence(x if order is None else x.index_select(1, order),
                                        lengths if order is None else lengths[order.cpu()]).data
            return PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices), state
        return (x.transpose(0, 1) if self.batch_first else x), state
