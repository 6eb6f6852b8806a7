"""Dtypes and fp32 math settings (TF32 or IEEE) of a benchmark row."""
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    dtype_name: str
    math: str  # 'default' or 'ieee' for fp32 on a GPU, '' otherwise

    @property
    def dtype(self):
        return DTYPES[self.dtype_name]

    def label(self):
        return f"{self.dtype_name}-{'tf32' if self.math == 'default' else 'ieee'}" if self.math else self.dtype_name


def precisions(dtype_names, device):
    out = []
    for name in dtype_names:
        if name == "fp32" and device.type == "cuda":
            out += [Precision(name, "default"), Precision(name, "ieee")]
        else:
            out.append(Precision(name, ""))
    return out
