"""Drop-in fidelity: what real training scripts do around an nn.LSTM must work unchanged with
FastBiLSTM swapped in (issue 17). Each test names the symptom it guards against.
"""
import io
import os
import warnings

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend runs interpreted on CPU

from bilstm_fast import FastBiLSTM, swap_lstm  # noqa: E402

try:
    import triton  # noqa: F401

    BACKENDS = ["vectorized", "triton"]
except ImportError:
    BACKENDS = ["vectorized"]

F32 = dict(rtol=1e-5, atol=1e-6)
F64 = dict(rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- global state


def global_state():
    """Every process-wide switch a library could flip by accident, and the RNG states."""
    b = torch.backends
    state = {
        "mkldnn.enabled": b.mkldnn.enabled,
        "cudnn.enabled": b.cudnn.enabled,
        "cudnn.benchmark": b.cudnn.benchmark,
        "cudnn.deterministic": b.cudnn.deterministic,
        "cudnn.allow_tf32": b.cudnn.allow_tf32,
        "cuda.matmul.allow_tf32": b.cuda.matmul.allow_tf32,
        "cuda.matmul.allow_fp16_reduced_precision_reduction": b.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "cuda.matmul.allow_bf16_reduced_precision_reduction": b.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "grad_enabled": torch.is_grad_enabled(),
        "default_dtype": torch.get_default_dtype(),
        "num_threads": torch.get_num_threads(),
        "autocast_cpu": torch.is_autocast_enabled("cpu"),
        "cpu_rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def assert_same_state(before, after):
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), f"{key} changed"
        elif isinstance(value, list):
            assert all(torch.equal(a, b) for a, b in zip(value, after[key])), f"{key} changed"
        else:
            assert value == after[key], f"{key} changed: {value} -> {after[key]}"


@pytest.mark.parametrize("mode", ["train", "eval", "autocast-bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bi", "uni"])
def test_no_global_state_changes(dtype, mode, bidirectional):
    """fp16/bf16 matmuls on strided views made oneDNN fail; PyTorch then printed "mkldnn_matmul
    failed, switching to baddbmm" and set torch.backends.mkldnn.enabled = False for the whole
    process (after which nn.LSTM itself returned fp32 under bf16 autocast)."""
    if mode == "autocast-bf16" and dtype != torch.float32:
        pytest.skip("autocast takes fp32 modules")
    torch.manual_seed(0)
    model = FastBiLSTM(16, 32, num_layers=2, bidirectional=bidirectional, backend="vectorized").to(dtype)
    x = torch.randn(20, 8, 16, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([20, 17, 15, 9, 9, 4, 2, 1])
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths)
    before = global_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "mkldnn_matmul failed" is a UserWarning
        for inp in (x, packed):
            model.train(mode != "eval")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast-bf16"):
                out, (h, c) = model(inp)
            out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
            if mode != "eval":
                (out.float().sum() + h.float().sum() + c.float().sum()).backward()
    assert_same_state(before, global_state())
    # and nn.LSTM still behaves as before: bf16 under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert nn.LSTM(4, 3)(torch.randn(2, 1, 4))[0].dtype == torch.bfloat16
