"""Dynamic int8 quantization of a model holding a FastBiLSTM (bilstm_fast/quantize.py): the
FastBiLSTM becomes torch's dynamic quantized LSTM, equal to quantizing the same model on nn.LSTM."""
import copy
import warnings

import pytest
import torch
from torch import nn

import bilstm_fast
from bilstm_fast import FastBiLSTM, unswap_lstm


class Tagger(nn.Module):
    def __init__(self, **config):
        super().__init__()
        self.lstm = FastBiLSTM(16, 32, **config)
        self.fc = nn.Linear(64 if self.lstm.bidirectional else 32, 5)

    def forward(self, x):
        out, (h_n, c_n) = self.lstm(x)
        return self.fc(out), h_n, c_n


def quantize(quantizer, model, *args, **kwargs):
    with warnings.catch_warnings():  # torch.ao.quantization warns that it is deprecated in favour of torchao
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantizer(model, *args, **kwargs)


@pytest.mark.parametrize("spec", [None, {nn.LSTM, nn.Linear}, {FastBiLSTM}])
def test_quantized_like_nn_lstm(spec):
    """Every way of naming the LSTMs quantizes the FastBiLSTM; the result is bit for bit what
    quantize_dynamic makes of the same model on nn.LSTM, so its error is nn.LSTM's quantized error."""
    torch.manual_seed(0)
    model = Tagger(num_layers=2, batch_first=True).eval()
    x = torch.randn(3, 11, 16)
    quantized = quantize(bilstm_fast.quantize_dynamic, model, spec, dtype=torch.qint8)
    assert isinstance(quantized.lstm, torch.ao.nn.quantized.dynamic.LSTM)
    assert isinstance(model.lstm, FastBiLSTM)  # not in place: the float model is untouched
    torch_spec = None if spec is None else {nn.LSTM if t is FastBiLSTM else t for t in spec}
    reference = quantize(torch.ao.quantization.quantize_dynamic, unswap_lstm(copy.deepcopy(model)), torch_spec,
                         dtype=torch.qint8)
    with torch.no_grad():
        got, expected, exact = quantized(x), reference(x), model(x)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    # and it is quantized: int8 weights move the outputs, by about what int8 costs
    error = (got[0] - exact[0]).abs().max().item()
    assert 1e-5 < error < 5e-2


def test_float16_and_inplace():
    torch.manual_seed(0)
    model = Tagger(bidirectional=False).eval()
    quantized = quantize(bilstm_fast.quantize_dynamic, model, dtype=torch.float16, inplace=True)
    assert quantized is model and isinstance(model.lstm, torch.ao.nn.quantized.dynamic.LSTM)


def test_projection_refused_with_the_way_out():
    model = Tagger(proj_size=8).eval()
    model.fc = nn.Linear(16, 5)
    with pytest.raises(RuntimeError, match=r"proj_size=8.*Leave it out of qconfig_spec"):
        quantize(bilstm_fast.quantize_dynamic, model)
