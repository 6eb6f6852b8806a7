"""The deploy rows (`run.py --deploy`): the FastBiLSTM exported to ONNX and run by the runtimes
users ship on, beside FastBiLSTM eager and nn.LSTM, inference only.

  onnxruntime-fp32   the exported file in ONNX Runtime (CPU provider)
  onnxruntime-int8   the same file after onnxruntime.quantization.quantize_dynamic (its int8 LSTM,
                     DynamicQuantizeLSTM, 7-bit weights: see _Exported.path)
  openvino-fp32      the same file in OpenVINO, f32 inference precision (where openvino is installed)
  openvino-bf16      the same, bf16 inference precision (where OpenVINO reports the CPU's BF16 units)
  torch-qint8        bilstm_fast.quantize_dynamic: torch's dynamic int8 LSTM

Each is an Impl (implementations.py) whose module is called like nn.LSTM, so the case runner
checks and times it with the others, round-robin and paired. They run inference only, and the
int8 rows are checked at an int8 tolerance (see INT8_TOLERANCE).
"""
import importlib.util
import tempfile
from pathlib import Path

import torch
from torch import nn

import bilstm_fast
from bilstm_fast import FastBiLSTM

from .correctness import TOLERANCE
from .implementations import Impl
from .shapes import SHAPES, quick_shape

# The deployment shapes: an NER tagger and a batch-1 stream
DEPLOY_SHAPES = [SHAPES["ner"], SHAPES["stream-b1"]]


def deploy_shapes(quick):
    return [quick_shape(s) for s in DEPLOY_SHAPES] if quick else DEPLOY_SHAPES


# int8 weights against the float64 reference, as max|err| / max|ref|: ~1e-2 measured for ONNX
# Runtime's and torch's int8 LSTMs (issue 27's table); a wrong graph errs by O(1)
INT8_TOLERANCE = 5e-2


class _States(nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x):
        out, (h_n, c_n) = self.lstm(x)
        return out, h_n, c_n


class _Exported:
    """The ONNX file of one nn.LSTM's weights in a FastBiLSTM, exported once per base LSTM (the
    implementations of a case share it) with the default exporter, batch and time dynamic."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="bilstm_fast_deploy_"))
        self.paths = {}

    def path(self, lstm, suffix=""):
        key = id(lstm)
        if key not in self.paths:
            model = _States(FastBiLSTM.from_lstm(lstm, copy=True)).eval()
            path = self.dir / f"lstm{len(self.paths)}.onnx"
            x = torch.randn(3, 2, lstm.input_size)  # [T, B, I]: other sizes than the benchmark's
            T, B = torch.export.Dim("T"), torch.export.Dim("B")
            torch.onnx.export(model, (x,), path, dynamo=True, verbose=False, input_names=["x"],
                              output_names=["out", "h_n", "c_n"], dynamic_shapes=({0: T, 1: B},))
            self.paths[key] = path
        path = self.paths[key]
        if suffix == "int8":
            quantized = path.with_name(path.stem + "_int8.onnx")
            if not quantized.exists():
                from onnxruntime.quantization import QuantType, quantize_dynamic

                # reduce_range: x86 CPUs without VNNI multiply u8 by s8 with VPMADDUBSW, whose int16
                # pair sums saturate for full-range int8 weights (ONNX Runtime's quantization docs);
                # on such a CPU the full-range LSTM errs by 0.27 on outputs of at most 0.46
                # (tests/test_export.py's model); 7-bit weights: 2e-2 of max|out| on the deploy shapes
                quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8, reduce_range=True)
            return quantized
        return path


_EXPORTED = None


def _exported():
    global _EXPORTED
    if _EXPORTED is None:
        _EXPORTED = _Exported()
    return _EXPORTED


class _Runtime(nn.Module):
    """A runtime's compiled model called like nn.LSTM: x [T, B, I] -> out, (h_n, c_n). It holds no
    parameters; training and other dtypes are refused."""

    def __init__(self, run):
        super().__init__()
        self._run = run

    def forward(self, x):
        out, h_n, c_n = (torch.from_numpy(a) for a in self._run(x.numpy()))
        return out, (h_n, c_n)

    def train(self, mode=True):
        if mode:
            raise RuntimeError("a deployed model runs inference only")
        return super().train(False)

    def to(self, dtype):
        if dtype != torch.float32:
            raise RuntimeError(f"the deploy rows run fp32 input only, not {dtype}")
        return self


def onnxruntime_lstm(lstm, int8=False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the threads the others get
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(_exported().path(lstm, "int8" if int8 else "")), options,
                                   providers=["CPUExecutionProvider"])
    return _Runtime(lambda x: session.run(None, {"x": x})).eval()


def openvino_lstm(lstm, precision="f32"):
    import openvino as ov

    compiled = ov.Core().compile_model(str(_exported().path(lstm)), "CPU", {
        "INFERENCE_PRECISION_HINT": precision,  # f32: else bf16 where the CPU has it, another row
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
    })
    request = compiled.create_infer_request()

    def run(x):
        result = request.infer([x])
        return [result[port] for port in compiled.outputs]

    return _Runtime(run).eval()


def torch_qint8_lstm(lstm):
    holder = nn.Sequential(FastBiLSTM.from_lstm(lstm, copy=True)).eval()
    return bilstm_fast.quantize_dynamic(holder, {FastBiLSTM}, dtype=torch.qint8)[0]


def deploy_impls():
    """The runtime rows whose packages are installed (the [onnx] and [openvino] extras)."""
    impls = []
    if all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")):
        impls.append(Impl("onnxruntime-fp32", onnxruntime_lstm, inference_only=True))
        impls.append(Impl("onnxruntime-int8", lambda lstm: onnxruntime_lstm(lstm, int8=True),
                          inference_only=True, tolerance=INT8_TOLERANCE))
        if importlib.util.find_spec("openvino"):
            impls.append(Impl("openvino-fp32", openvino_lstm, inference_only=True))
            import openvino as ov

            if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
                impls.append(Impl("openvino-bf16", lambda lstm: openvino_lstm(lstm, "bf16"), inference_only=True,
                                  tolerance=TOLERANCE["bf16-autocast"]))
    impls.append(Impl("torch-qint8", torch_qint8_lstm, inference_only=True, tolerance=INT8_TOLERANCE))
    return impls
