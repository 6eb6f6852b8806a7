"""Dynamic int8 quantization of models holding FastBiLSTMs, through torch's own quantized LSTM.

torch.ao.quantization.quantize_dynamic knows modules by their exact type, and FastBiLSTM is not an
nn.LSTM (see module.py): called directly, it leaves a FastBiLSTM in float. `quantize_dynamic`
here takes the same arguments and treats every FastBiLSTM as the nn.LSTM it replaces: wherever
the spec names nn.LSTM it names FastBiLSTM too, and a FastBiLSTM becomes what nn.LSTM becomes
(torch.ao.nn.quantized.dynamic.LSTM by default), from the same weights, so the result equals a
quantized nn.LSTM model's bit for bit.

torch's default mappings are left alone: registering FastBiLSTM there at import would still not
reach torch's default call (its spec is a fixed set of torch's own types), and would edit a
private table of torch's for every user of the process.
"""
import torch
from torch import nn

from bilstm_fast.module import FastBiLSTM

# torch.ao.quantization.quantize_dynamic's default spec for qint8 and float16 (its other dtypes
# quantize embeddings only, where no LSTM is involved)
_DEFAULT_SPEC = {nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.RNNCell, nn.GRUCell}


def quantize_dynamic(model, qconfig_spec=None, dtype=torch.qint8, mapping=None, inplace=False):
    """torch.ao.quantization.quantize_dynamic, with FastBiLSTM quantized as nn.LSTM would be.

    Same arguments. A FastBiLSTM becomes `mapping[nn.LSTM]` (torch's dynamic quantized LSTM by
    default) built from its weights; everything else is exactly torch's quantize_dynamic.
    """
    from torch.ao.quantization import quantize_dynamic as torch_quantize_dynamic
    from torch.ao.quantization.quantization_mappings import get_default_dynamic_quant_module_mappings

    if qconfig_spec is None and dtype in (torch.qint8, torch.float16):
        qconfig_spec = _DEFAULT_SPEC  # the set form gives each type the dtype's default qconfig
    if isinstance(qconfig_spec, (set, frozenset)) and nn.LSTM in qconfig_spec:
        qconfig_spec = set(qconfig_spec) | {FastBiLSTM}
    elif isinstance(qconfig_spec, dict) and nn.LSTM in qconfig_spec and FastBiLSTM not in qconfig_spec:
        qconfig_spec = {**qconfig_spec, FastBiLSTM: qconfig_spec[nn.LSTM]}
    mapping = dict(get_default_dynamic_quant_module_mappings() if mapping is None else mapping)
    if nn.LSTM in mapping and FastBiLSTM not in mapping:
        mapping[FastBiLSTM] = _from_fast(mapping[nn.LSTM])
    return torch_quantize_dynamic(model, qconfig_spec, dtype=dtype, mapping=mapping, inplace=inplace)


def _from_fast(quantized_lstm):
    """A mapping entry for FastBiLSTM: the nn.LSTM holding its Parameters (to_lstm: no copy, no
    random numbers), converted by what the mapping has for nn.LSTM."""

    class FromFastBiLSTM:
        @staticmethod
        def from_float(mod, use_precomputed_fake_quant=False):
            if mod.proj_size > 0:
                raise RuntimeError(
                    f"FastBiLSTM(proj_size={mod.proj_size}) cannot be dynamically quantized: torch's "
                    "quantized LSTM has no projections (an nn.LSTM with proj_size fails there too). "
                    "Leave it out of qconfig_spec (name the other module types instead)"
                )
            lstm = mod.to_lstm()
            lstm.qconfig = mod.qconfig
            return quantized_lstm.from_float(lstm, use_precomputed_fake_quant=use_precomputed_fake_quant)

    return FromFastBiLSTM
