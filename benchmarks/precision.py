"""Precisions of a benchmark row: a dtype the modules and inputs are cast to, or torch.autocast
around fp32 modules; and the fp32 math settings (TF32 or IEEE)."""
import contextlib
import functools
from dataclasses import dataclass

import torch

# modules and inputs cast to the dtype (`module.bfloat16()` and bf16 data)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# fp32 modules and inputs, the forward under torch.autocast(device, dtype): the other way users ask
# for reduced precision; the ops autocast lists (the LSTM, matmuls) run in the dtype
AUTOCAST = {"fp16-autocast": torch.float16, "bf16-autocast": torch.bfloat16}
PRECISIONS = (*DTYPES, *AUTOCAST)
# The CPU run's default: fp32 on every shape, bf16 both ways on these shapes only (the issue's).
# Each precision costs a shape about what its fp32 rows cost (the same checks, samples and warm-ups;
# bf16 calls 0.4-1.5x as long), and the fp32 rows take about 10 minutes on 2 cores: bf16 on every
# shape would make it about 30. These three shapes take a quarter of the fp32 run's time, so the
# default bf16 rows add about 5 minutes (an estimate from the 2026-12-02 run's samples).
CPU_REDUCED = ("bf16", "bf16-autocast")
CPU_REDUCED_SHAPES = ("mnist", "tagging", "latency-b1")


class Fp32Math:
    """Context: whether fp32 may use TF32, for cuDNN's RNN (and our Triton dots, which follow
    it) and for cuBLAS matmuls. 'default' is torch's: cuDNN TF32 on, matmul TF32 off;
    'ieee' turns both off. Uses the fp32_precision settings where torch has them."""

    def __init__(self, math_mode):
        self.math_mode = math_mode

    def __enter__(self):
        backends = torch.backends
        self.new_api = (hasattr(backends, "fp32_precision")
                        and hasattr(getattr(backends.cudnn, "rnn", None), "fp32_precision"))
        if self.new_api:
            self.saved = (backends.cudnn.rnn.fp32_precision, backends.cuda.matmul.fp32_precision)
            if self.math_mode == "ieee":
                backends.cudnn.rnn.fp32_precision = "ieee"
                backends.cuda.matmul.fp32_precision = "ieee"
            elif self.math_mode == "default":
                backends.cudnn.rnn.fp32_precision = "tf32"
                backends.cuda.matmul.fp32_precision = "ieee"
        else:
            self.saved = (backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32)
            if self.math_mode in ("ieee", "default"):
                backends.cudnn.allow_tf32 = self.math_mode == "default"
                backends.cuda.matmul.allow_tf32 = False
        return self

    def __exit__(self, *exc):
        backends = torch.backends
        if self.new_api:
            backends.cudnn.rnn.fp32_precision, backends.cuda.matmul.fp32_precision = self.saved
        else:
            backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32 = self.saved


@dataclass(frozen=True)
class Precision:
    name: str  # a key of DTYPES or AUTOCAST
    math: str  # 'default' or 'ieee' for fp32 on a GPU, '' otherwise

    @property
    def dtype(self):
        """What the weights and inputs are stored in."""
        return torch.float32 if self.name in AUTOCAST else DTYPES[self.name]

    @property
    def autocast(self):
        """The dtype of the torch.autocast around each forward; None for a cast precision."""
        return AUTOCAST.get(self.name)

    @property
    def compute_dtype(self):
        """What the GEMMs run in (the matmul rate of the floor is measured in it)."""
        return self.autocast or self.dtype

    def forward_context(self, device):
        """A factory of the context each forward runs in: autocast, or nothing."""
        if self.autocast is not None:
            return functools.partial(torch.autocast, device.type, dtype=self.autocast)
        return contextlib.nullcontext

    def label(self):
        return f"{self.name}-{'tf32' if self.math == 'default' else 'ieee'}" if self.math else self.name


def default_precision_names(shape_name, device):
    """fp32, fp16 and bf16 on a GPU; fp32, and on CPU_REDUCED_SHAPES bf16 both ways, on the CPU."""
    if device.type == "cuda":
        return ["fp32", "fp16", "bf16"]
    return ["fp32", *(CPU_REDUCED if shape_name in CPU_REDUCED_SHAPES else ())]


def timing_groups(precs):
    """The precisions timed together, interleaved (on the CPU: round-robin, so their ratios are
    paired): all but the fp32-ieee rows, whose math setting differs from torch's default."""
    groups = {}
    for prec in precs:
        groups.setdefault(prec.math == "ieee", []).append(prec)
    return list(groups.values())


def precisions(dtype_names, device):
    out = []
    for name in dtype_names:
        if name == "fp32" and device.type == "cuda":
            out += [Precision(name, "default"), Precision(name, "ieee")]
        else:
            out.append(Precision(name, ""))
    return out
