"""bilstm-fast: a drop-in nn.LSTM replacement with fused Triton kernels and a vectorized CPU path."""
import os as _os

# Installed, `kernels/` lives inside this package (setup.py's package_dir). In a source checkout
# run with PYTHONPATH=. (the GPU machines, which have no package index) it sits beside it instead:
# let `bilstm_fast.kernels` resolve there too.
_here = _os.path.dirname(_os.path.abspath(__file__))
_checkout = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(
    _os.path.join(_checkout, "kernels", "__init__.py")
):
    __path__.append(_checkout)
# torch.load's default weights-only unpickler admits only allowlisted classes: with this entry a
# pickled model holding a FastBiLSTM loads wherever bilstm_fast is imported (the user still
# allowlists their own classes, as they would for a model holding an nn.LSTM).
import torch as _torch  # noqa: E402

from bilstm_fast.function import LSTMLayerFunction, lstm_layer  # noqa: E402 (after the path set-up above)
from bilstm_fast.module import FastBiLSTM, swap_lstm, unswap_lstm  # noqa: E402
from bilstm_fast.quantize import quantize_dynamic  # noqa: E402

_torch.serialization.add_safe_globals([FastBiLSTM])

__all__ = ["FastBiLSTM", "LSTMLayerFunction", "lstm_layer", "quantize_dynamic", "swap_lstm", "unswap_lstm"]
__version__ = "0.1.0"  # the one version string: setup.py reads it from here
