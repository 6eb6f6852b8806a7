"""Bad input raises the same exception type as nn.LSTM, with a message that says what is wrong."""
import pytest
import torch
from torch import nn

from bilstm_fast import FastBiLSTM

I, H, L = 3, 4, 2


def zeros(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


BAD_CALLS = {  # id: (input, hx, exception, message pattern)
    "1d-input": (zeros(5), None, ValueError, "Expected input to be 2D or 3D, got 1D"),
    "4d-input": (zeros(1, 2, 3, 3), None, ValueError, "Expected input to be 2D or 3D, got 4D"),
    "wrong-features": (zeros(5, 2, 7), None, RuntimeError, "input.size\\(-1\\) must be equal to input_size"),
    "wrong-dtype": (zeros(5, 2, I, dtype=torch.float64), None, ValueError, "dtype"),
    "h0-wrong-batch": (zeros(5, 2, I), (zeros(2 * L, 3, H), zeros(2 * L, 2, H)), RuntimeError,
                       "Expected hidden\\[0\\] size"),
    "c0-wrong-hidden": (zeros(5, 2, I), (zeros(2 * L, 2, H), zeros(2 * L, 2, H + 1)), RuntimeError,
                        "Expected hidden\\[1\\] size"),
    "h0-2d-for-batched": (zeros(5, 2, I), (zeros(2 * L, H), zeros(2 * L, H)), RuntimeError,
                          "hx and cx should also be 3-D"),
    "h0-3d-for-unbatched": (zeros(5, I), (zeros(2 * L, 1, H), zeros(2 * L, 1, H)), RuntimeError,
                            "hx and cx should also be 2-D"),
    "empty-sequence": (zeros(0, 2, I), None, RuntimeError, "sequence length to be larger than 0"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_like_nn_lstm(name):
    x, hx, exc, pattern = BAD_CALLS[name]
    with pytest.raises(exc, match=pattern):
        FastBiLSTM(I, H, num_layers=L)(x, hx)
    with pytest.raises(exc):  # nn.LSTM raises the same type
        nn.LSTM(I, H, num_layers=L, bidirectional=True)(x, hx)


def test_state_dtype_mismatch_is_a_clear_error():
    """nn.LSTM fails here with an internal 'get_mkldnn_dtype' error; we say what is wrong."""
    x = zeros(5, 2, I)
    hx = (zeros(2 * L, 2, H, dtype=torch.float64), zeros(2 * L, 2, H))
    with pytest.raises(RuntimeError, match="Expected h0 to have dtype torch.float32"):
        FastBiLSTM(I, H, num_layers=L)(x, hx)

