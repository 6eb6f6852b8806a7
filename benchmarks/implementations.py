"""What gets benchmarked: the implementations, how one call of each runs, and which engine
nn.LSTM uses here.

A new FastBiLSTM backend joins the table by itself: `default_impls` lists one `fast-<name>`
column per backend that `bilstm_fast.kernels.available_backends(device)` reports (the order is
auto's preference). Anything else (another library, a variant) is one more `Impl(name, build)`,
where `build` takes the nn.LSTM whose weights to copy and returns a module with nn.LSTM's call
signature; `run.main(impls=...)` takes such a list too.
"""
import contextlib
import copy
import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from bilstm_fast import FastBiLSTM
from bilstm_fast.kernels import available_backends

from .vanilla import VanillaLSTM


@dataclass(frozen=True)
class Impl:
    name: str
    build: object  # nn.LSTM (weights to copy) -> module with nn.LSTM's call signature
    inference_only: bool = False  # checked on its forward alone and timed in inference only (deploy.py)
    tolerance: float = None  # its own correctness tolerance (int8 rows), else the dtype's


def fast_impl(backend):
    """FastBiLSTM on one backend, as the column `fast-<backend>`."""
    return Impl(f"fast-{backend}", lambda lstm: FastBiLSTM.from_lstm(lstm, backend=backend, copy=True))


def default_impls(device):
    """One column per FastBiLSTM backend available on `device`, then nn.LSTM and the vanilla loop."""
    impls = [fast_impl(backend) for backend in available_backends(device)]
    impls.append(Impl("nn.LSTM", copy.deepcopy))
    impls.append(Impl("vanilla", VanillaLSTM))
    return impls


def lstm_engine(device):
    """Which engine nn.LSTM runs on here, read from the ops a forward actually calls."""
    lstm = nn.LSTM(4, 4, bidirectional=True, device=device)
    x = torch.randn(3, 2, 4, device=device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.no_grad():
            lstm(x)
    names = " ".join(e.name for e in prof.events())
    if "cudnn_rnn" in names:
        return "cuDNN"
    if "mkldnn_rnn" in names:
        return "oneDNN"
    return "native ATen"


@functools.cache
def nn_lstm_refusal(prec, device):
    """The error nn.LSTM itself raises in precision `prec` on `device` whatever its input (repr),
    or None where it runs. The known one: under CPU bf16 autocast torch sends an fp32 nn.LSTM to
    oneDNN, which has no bf16 LSTM without AVX-512 (an AVX2-only CPU) and raises "could not
    create a primitive descriptor"; a `.bfloat16()` nn.LSTM checks the CPU and runs ATen's path."""
    with torch.random.fork_rng():
        lstm = nn.LSTM(4, 3, bidirectional=True, device=device).to(prec.dtype)
        try:
            with torch.no_grad(), prec.forward_context(device)():
                lstm(torch.zeros(2, 1, 4, device=device, dtype=prec.dtype))
        except RuntimeError as error:
            return repr(error)
    return None


def output_tensor(out):
    return out.data if isinstance(out, PackedSequence) else out


def call(model, mode, x, dout, context=contextlib.nullcontext):
    """One call in `mode`, its forward inside `context()` (torch.autocast for the autocast
    precisions; the backward runs outside, as autocast's documentation asks)."""
    if mode == "inference":
        with torch.no_grad(), context():
            return model(x)
    model.zero_grad(set_to_none=True)
    with context():
        out, state = model(x)
    output_tensor(out).backward(dout)
    return out, state


def valid_tokens(x):
    return output_tensor(x).shape[0] if isinstance(x, PackedSequence) else None
