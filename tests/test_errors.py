"""Bad calls: every one raises before any compute, with a message that says what is wrong, and
with the same exception type as nn.LSTM where nn.LSTM refuses it too. One table for calls
(input, hx), one for parameters replaced by ones that do not fit.
"""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import bilstm_fast.module
from bilstm_fast import FastBiLSTM

I, H, L = 3, 4, 2


def zeros(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


@pytest.fixture
def no_compute(monkeypatch):
    """Fails the test if FastBiLSTM reaches its layer op: bad calls must be refused before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the layer op ran before the bad call was refused")

    monkeypatch.setattr(bilstm_fast.module, "lstm_layer_params", refuse)


X = zeros(5, 2, I)
STATE = zeros(2 * L, 2, H)
DATA = torch.randn(6, I)

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
    # a tensor hx: nn.LSTM checks hx[0] and hx[1], then refuses it for batched padded input (it
    # takes one for unbatched input and packed input with sorted_indices: test_dropin.py)
    "hx-single-tensor": (X, STATE, RuntimeError, "hx and cx should also be 3-D"),
    "hx-stacked-tensor": (X, torch.stack([STATE, STATE]), TypeError,
                          "hx to be a tuple \\(h_0, c_0\\) of two tensors, got Tensor \\(as nn.LSTM"),
    "hx-stacked-wrong-batch": (X, zeros(2, 2 * L, 3, H), RuntimeError, "Expected hidden\\[0\\] size"),
    "hx-stacked-one-state": (X, STATE[None], IndexError, "hold \\(h_0, c_0\\) along its first axis, got shape"),
    "hx-three-states": (X, (STATE, STATE, STATE), RuntimeError, "two hidden states \\(h_0, c_0\\), got 3"),
    "hx-one-state": (X, (STATE,), RuntimeError, "two hidden states \\(h_0, c_0\\), got 1"),
    "c0-None": (X, (STATE, None), TypeError, "c_0 to be a Tensor, got NoneType"),
    "h0-sparse": (X, (STATE.to_sparse(), STATE), TypeError, "dense \\(strided\\) h_0"),
    "h0-wrong-layers": (X, (torch.zeros(2, 2, H), STATE), RuntimeError, "Expected hidden\\[0\\] size \\(4, 2, 4\\)"),
    "h0-on-meta": (X, (STATE.to("meta"), STATE), RuntimeError, "not at the same device, found h0 on meta"),
    "c0-on-meta": (X, (STATE, STATE.to("meta")), RuntimeError, "not at the same device, found c0 on meta"),
    "input-on-meta": (X.to("meta"), None, RuntimeError, "not at the same device, found input on meta"),
    "c0-int64": (X, (STATE, STATE.long()), RuntimeError, "Expected c0 to have dtype torch.float32"),
    "input-list": (X.tolist(), None, TypeError, "Tensor or PackedSequence, got list"),
    "input-sparse": (X.to_sparse(), None, TypeError, "dense \\(strided\\) input"),
    "input-complex": (X.to(torch.complex64), None, ValueError, "does not match weight dtype"),
    # a PackedSequence cannot describe a sequence of length <= 0 or one longer than its T
    # (batch_sizes[t] counts the sequences longer than t): hand-built ones that try are refused
    "packed-batch-sizes-increasing": (PackedSequence(DATA, torch.tensor([1, 2, 3])), None, ValueError,
                                      "start positive and never increase.*got \\[1, 2, 3\\]"),
    "packed-batch-sizes-negative": (PackedSequence(DATA, torch.tensor([3, 4, -1])), None, ValueError,
                                    "start positive and never increase"),
    "packed-batch-sizes-zero-first": (PackedSequence(DATA[:0], torch.tensor([0, 0])), None, ValueError,
                                      "start positive"),
    "packed-batch-sizes-empty": (PackedSequence(DATA[:0], torch.tensor([], dtype=torch.int64)), None,
                                 ValueError, "non-empty 1-D int64 CPU tensor"),
    "packed-batch-sizes-int32": (PackedSequence(DATA, torch.tensor([3, 3], dtype=torch.int32)), None,
                                 ValueError, "1-D int64 CPU tensor, got 1-D torch.int32"),
    "packed-batch-sizes-2d": (PackedSequence(DATA, torch.tensor([[3, 3]])), None, ValueError,
                              "1-D int64 CPU tensor, got 2-D"),
    "packed-more-data-than-batch-sizes": (PackedSequence(DATA, torch.tensor([3, 2])), None, ValueError,
                                          "data has 6 rows but its batch_sizes sum to 5"),
    "packed-less-data-than-batch-sizes": (PackedSequence(DATA[:5], torch.tensor([3, 3])), None, ValueError,
                                          "data has 5 rows but its batch_sizes sum to 6"),
    "packed-3d-data": (PackedSequence(DATA.view(6, 1, I), torch.tensor([3, 3])), None, ValueError,
                       "dense 2-D tensor"),
    "packed-short-sorted-indices": (PackedSequence(DATA, torch.tensor([3, 3]), torch.tensor([1, 0]),
                                                   torch.tensor([1, 0])), None, ValueError,
                                    "sorted_indices must hold one entry per sequence \\(3\\), got shape \\(2,\\)"),
    "packed-wrong-features": (PackedSequence(torch.randn(6, 7), torch.tensor([3, 3])), None, RuntimeError,
                              "input.size\\(-1\\) must be equal to input_size. Expected 3, got 7"),
    "packed-fp64-data": (PackedSequence(DATA.double(), torch.tensor([3, 3])), None, ValueError, "dtype"),
    "packed-h0-wrong-batch": (PackedSequence(DATA, torch.tensor([3, 3])), (STATE, STATE), RuntimeError,
                              "Expected hidden\\[0\\] size \\(4, 3, 4\\), got \\[4, 2, 4\\]"),
}
# the calls nn.LSTM refuses with the same exception type (the others it runs, or refuses otherwise)
LIKE_NN_LSTM = ["1d-input", "4d-input", "wrong-features", "wrong-dtype", "h0-wrong-batch", "c0-wrong-hidden",
                "h0-2d-for-batched", "h0-3d-for-unbatched", "empty-sequence", "hx-single-tensor", "hx-stacked-tensor",
                "hx-stacked-wrong-batch", "hx-stacked-one-state", "hx-three-states"]


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_call_is_refused_before_any_compute(name, no_compute):
    x, hx, exc, pattern = BAD_CALLS[name]
    with pytest.raises(exc, match=pattern):
        FastBiLSTM(I, H, num_layers=L)(x, hx)


@pytest.mark.parametrize("name", LIKE_NN_LSTM)
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


def test_packed_fp64_data_into_fp32_module_is_an_error_not_a_promotion():
    """Before issue 7 packed data skipped nn.LSTM's input check when hx was None, and fp64
    data came out fp64 from a fp32 module."""
    fast = FastBiLSTM(3, 4)
    packed = pack_padded_sequence(torch.randn(5, 2, 3, dtype=torch.float64), torch.tensor([5, 3]))
    with pytest.raises(ValueError, match="input dtype \\(torch.float64\\) does not match weight dtype"):
        fast(packed)


BAD_PARAMETERS = {  # id: (name, value, exception, message pattern)
    "weight_hh-wrong-shape": ("weight_hh_l0", nn.Parameter(torch.randn(16, 5)), RuntimeError,
                              r"weight_hh_l0 has shape \(16, 5\), expected \(16, 4\)"),
    "weight_ih_l1-wrong-shape": ("weight_ih_l1_reverse", nn.Parameter(torch.randn(16, 4)), RuntimeError,
                                 r"weight_ih_l1_reverse has shape \(16, 4\), expected \(16, 8\)"),
    "bias-wrong-shape": ("bias_hh_l1", nn.Parameter(torch.randn(15)), RuntimeError,
                         r"bias_hh_l1 has shape \(15,\), expected \(16,\)"),
    "weight-fp64-in-fp32-module": ("weight_hh_l0_reverse", nn.Parameter(torch.randn(16, 4, dtype=torch.float64)),
                                   ValueError, "must share one dtype: weight_hh_l0_reverse is torch.float64"),
    "weight-on-meta": ("weight_hh_l1", nn.Parameter(torch.randn(16, 4, device="meta")), RuntimeError,
                       "must be on one device: weight_hh_l1 is on meta"),
    "weight-None": ("weight_ih_l0", None, TypeError, "weight_ih_l0 is NoneType, expected a Tensor"),
}


@pytest.mark.parametrize("name", list(BAD_PARAMETERS))
def test_replaced_parameter_that_does_not_fit_is_a_clear_error(name, no_compute):
    """nn.LSTM runs a wrong weight_hh shape silently, and fails inside oneDNN on a stray dtype."""
    param, value, exc, pattern = BAD_PARAMETERS[name]
    fast = FastBiLSTM(3, 4, num_layers=2)
    setattr(fast, param, value)
    with pytest.raises(exc, match=pattern):
        fast(torch.randn(5, 2, 3))
