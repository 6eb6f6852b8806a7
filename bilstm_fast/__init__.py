"""bilstm-fast: a drop-in nn.LSTM replacement with fused Triton kernels and a vectorized CPU path."""
from bilstm_fast.function import LSTMLayerFunction, lstm_layer
from bilstm_fast.module import FastBiLSTM, swap_lstm

__all__ = ["FastBiLSTM", "LSTMLayerFunction", "lstm_layer", "swap_lstm"]
__version__ = "0.1.0"
