"""FastBiLSTM against nn.LSTM and a plain PyTorch loop, side by side in one process.

    python benchmarks/run.py                       # every shape, mode and dtype for this device
    python benchmarks/run.py --quick --out DIR     # tiny shapes: a smoke run (CI)
    python benchmarks/run.py --shapes mnist,tagging --dtypes fp32 --modes training
    python benchmarks/run.py --mnist               # MNIST seconds per epoch, end to end

Implementations (each checked against a float64 nn.LSTM before it is timed; a wrong one is
reported as WRONG, never timed, and makes the run exit with status 1):
  fast-triton      FastBiLSTM(backend="triton"), CUDA only
  fast-vectorized  FastBiLSTM(backend="vectorized")
  nn.LSTM          torch's own: cuDNN on a GPU, oneDNN on the CPU (the machine line says which)
  vanilla          the "vanilla PyTorch" baseline written below: nn.LSTMCell math, one batched
                   step at a time per layer and direction, autograd for the backward

Modes: inference (forward under no_grad) and training (forward + backward of a random output
gradient; the input does not require grad, like data). Timing: torch.utils.benchmark on the CPU,
with the implementations of a row sampled round-robin (a burst of load from other processes hits
them alike), triton.testing.do_bench on a GPU; warm-up excluded; median with 20%/80% quantiles;
inputs drawn once per case from a seeded normal distribution and cycled through three draws.

Outputs (under benchmarks/results/ or --out): <device>_<date>.json and .csv with every row and
the machine line, and a .png bar chart of speedups against nn.LSTM (needs matplotlib). See
benchmarks/NOTES.md for how to read the table and the floor arithmetic.
"""
import argparse
import copy
import csv
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

# The profiler (engine detection, CPU peak memory) otherwise prints Kineto's trace chatter, and on
# a machine without a GPU an "ERROR ... gpuGetDeviceCount" line, into the table. 6 is above every
# Kineto log level; set KINETO_LOG_LEVEL yourself to see them.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch  # noqa: E402 (after the environment it reads)
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from bilstm_fast import FastBiLSTM
from bilstm_fast.kernels import triton_available

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("inference", "training")


# ----------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    T: int
    I: int
    H: int
    layers: int = 1
    bidirectional: bool = True
    varlen: bool = False  # lengths uniform in [T/4, T]; timed packed and padded
    note: str = ""  # why this run's shape differs from the issue's, if it does

    @property
    def D(self):
        return 2 if self.bidirectional else 1

    def label(self):
        dirs = "" if self.bidirectional else " uni"
        layers = f" L{self.layers}" if self.layers > 1 else ""
        return f"{self.name} (B{self.B} T{self.T} I{self.I} H{self.H}{layers}{dirs})"


SHAPES = {
    "mnist": Shape("mnist", B=64, T=28, I=28, H=256, layers=2),
    "tagging": Shape("tagging", B=32, T=128, I=300, H=512),
    "tagging-uni": Shape("tagging-uni", B=32, T=128, I=300, H=512, bidirectional=False),
    "latency-b1": Shape("latency-b1", B=1, T=1024, I=768, H=768),
    "latency-b16": Shape("latency-b16", B=16, T=1024, I=768, H=768),
    "large-batch": Shape("large-batch", B=256, T=100, I=512, H=512),
    "varlen": Shape("varlen", B=32, T=128, I=300, H=512, varlen=True),
}
DEFAULT_SHAPES = {"cpu": list(SHAPES), "cuda": list(SHAPES)}
# A 2-core CPU cannot time every implementation on the long shapes within the run's budget
# (about 10 minutes): the CPU run shortens T there. Per-step time and tokens/s stay comparable.
CPU_TRIMS = {"latency-b1": 256, "latency-b16": 256, "large-batch": 50}


def quick_shape(shape):
    """A tiny version with the same structure (layers, directions, varlen) for smoke runs."""
    return replace(shape, B=min(shape.B, 3), T=min(shape.T, 6), I=min(shape.I, 5), H=min(shape.H, 8),
                   note="--quick")


def select_shapes(names, device, quick):
    shapes = []
    for name in names:
        shape = SHAPES[name]
        if quick:
            shape = quick_shape(shape)
        elif device.type == "cpu" and name in CPU_TRIMS:
            shape = replace(shape, T=CPU_TRIMS[name], note=f"T trimmed from {shape.T} on CPU")
        shapes.append(shape)
    return shapes


# ----------------------------------------------------------------------------------------------
# Implementations


class VanillaLSTM(nn.Module):
    """The plain PyTorch baseline: nn.LSTMCell math, one batched step at a time, per layer and
    direction; autograd does the backward. Same parameters (names and values) as the nn.LSTM
    it is built from. Variable lengths run padded with a mask (no packing benefit). The cell
    state is kept in at least fp32, as cuDNN and our kernels keep it, so fp16/bf16 rows compare
    like with like."""

    def __init__(self, lstm):
        super().__init__()
        self.num_layers, self.hidden_size = lstm.num_layers, lstm.hidden_size
        self.bidirectional, self.batch_first = lstm.bidirectional, lstm.batch_first
        for name, param in lstm.named_parameters():
            self.register_parameter(name, nn.Parameter(param.detach().clone()))

    def cell(self, x_t, h, c, suffix):
        gates = nn.functional.linear(x_t, getattr(self, f"weight_ih{suffix}"), getattr(self, f"bias_ih{suffix}", None))
        gates = gates + nn.functional.linear(h, getattr(self, f"weight_hh{suffix}"), getattr(self, f"bias_hh{suffix}", None))
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # c's precision (>= fp32)
        return (torch.sigmoid(o) * torch.tanh(c)).to(x_t.dtype), c

    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        if packed:
            x, lengths = pad_packed_sequence(input)
            valid = (torch.arange(x.shape[0]).unsqueeze(1) < lengths.unsqueeze(0)).to(x.device)  # [T, B]
        else:
            x = input.transpose(0, 1) if self.batch_first else input
            valid = None
        T, B = x.shape[:2]
        cell_dtype = torch.promote_types(x.dtype, torch.float32)
        zeros = x.new_zeros(B, self.hidden_size)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for suffix, times in ((f"_l{layer}", range(T)), (f"_l{layer}_reverse", reversed(range(T))))[: 1 + self.bidirectional]:
                h, c = (zeros, zeros) if hx is None else (hx[0][len(h_n)], hx[1][len(h_n)])
                c = c.to(cell_dtype)
                out = [None] * T
                for t in times:
                    h_new, c_new = self.cell(x[t], h, c, suffix)
                    if valid is None:
                        h, c = h_new, c_new
                        out[t] = h
                    else:
                        m = valid[t].unsqueeze(1)
                        h, c = torch.where(m, h_new, h), torch.where(m, c_new, c)
                        out[t] = h_new * m
                outputs.append(torch.stack(out))
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outputs, dim=2)
        state = (torch.stack(h_n), torch.stack(c_n).to(x.dtype))
        if packed:
            order = input.sorted_indices
            data = pack_padded_sequence(x if order is None else x.index_select(1, order),
                                        lengths if order is None else lengths[order.cpu()]).data
            return PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices), state
        return (x.transpose(0, 1) if self.batch_first else x), state


@dataclass(frozen=True)
class Impl:
    name: str
    build: object  # nn.LSTM (weights to copy) -> module with nn.LSTM's call signature


def default_impls(device):
    impls = []
    if device.type == "cuda" and triton_available():
        impls.append(Impl("fast-triton", lambda lstm: FastBiLSTM.from_lstm(lstm, backend="triton")))
    impls.append(Impl("fast-vectorized", lambda lstm: FastBiLSTM.from_lstm(lstm, backend="vectorized")))
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


# ----------------------------------------------------------------------------------------------
# FLOPs and the floor


def lstm_flops(shape, mode, tokens=None):
    """Matmul FLOPs of one call (2 per multiply-add). Per layer and direction and token, the
    forward does x W_ih^T and h W_hh^T: 2*4H*(I_l + H); the backward does dh = dgates W_hh,
    dW_hh, dW_ih, and dx for every layer but the first (the input needs no gradient).
    The gate arithmetic (O(H) per token) is left out. `tokens` counts valid tokens (varlen)."""
    tokens = shape.B * shape.T if tokens is None else tokens
    G, D = 4 * shape.H, shape.D
    total = 0
    for layer in range(shape.layers):
        I = shape.I if layer == 0 else D * shape.H
        total += 2 * G * (I + shape.H)
        if mode == "training":
            total += 2 * G * (2 * shape.H + I + (I if layer > 0 else 0))
    return total * D * tokens


def matmul_rate(device, dtype, quick, min_time):
    """Measured FLOP/s of one large square GEMM in this dtype under the current math settings:
    the best sample (20% quantile on a GPU), since the floor is what the machine can reach."""
    n = 256 if quick else (2048 if device.type == "cpu" else 8192)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    stats = measure(lambda: torch.mm(a, b), device, min_time)
    return 2 * n**3 / stats.get("min_s", stats["q20_s"])


# ----------------------------------------------------------------------------------------------
# Numerics settings


class Fp32Math:
    """Context: whether fp32 may use TF32, for cuDNN's RNN (and our Triton dots, which follow
    it) and for cuBLAS matmuls. 'default' is torch's: cuDNN TF32 on, matmul TF32 off;
    'ieee' turns both off. Uses the fp32_precision settings where torch has them."""

    def __init__(self, math_mode):
        self.math_mode = math_mode

    def __enter__(self):
        backends = torch.backends
        self.new_api = hasattr(backends, "fp32_precision") and hasattr(getattr(backends.cudnn, "rnn", None), "fp32_precision")
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


# Largest accepted max|impl - ref| / max|ref| against the float64 reference, over outputs,
# final states and weight gradients. fp32: honest implementations measure ~1e-6 on every shape
# here (see NOTES.md), a wrong one (swapped gates, a direction not reversed, one batch tile off)
# 1e-2 to 1; 1e-4 leaves room for long sequences. TF32/fp16 (unit roundoff 2^-11) and bf16
# (2^-8) round every GEMM input: a few hundred roundoffs, first estimates until measured on a GPU.
TOLERANCE = {"fp32": 1e-4, "fp32-ieee": 1e-4, "fp32-tf32": 2e-2, "fp16": 2e-2, "bf16": 1e-1}


# ----------------------------------------------------------------------------------------------
# Inputs


def draw_lengths(shape, generator):
    low = max(1, shape.T // 4)
    lengths = torch.randint(low, shape.T + 1, (shape.B,), generator=generator)
    lengths[0] = shape.T  # the padded batch is T long, as a real batch padded to its longest
    return lengths


def make_inputs(shape, dtype, device, seed, packed):
    """(input, output gradient) for one call: normal draws, never zeros; packed or padded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.T, shape.B, shape.I, generator=g)
    if packed:
        lengths = draw_lengths(shape, torch.Generator().manual_seed(1234))  # the same for every draw
        x = pack_padded_sequence(x, lengths, enforce_sorted=False)
        x = PackedSequence(x.data.to(device=device, dtype=dtype), x.batch_sizes,
                           x.sorted_indices.to(device), x.unsorted_indices.to(device))
        dout = torch.randn(x.data.shape[0], shape.D * shape.H, generator=g)
    else:
        x = x.to(device=device, dtype=dtype)
        dout = torch.randn(shape.T, shape.B, shape.D * shape.H, generator=g)
    return x, dout.to(device=device, dtype=dtype)


def output_tensor(out):
    return out.data if isinstance(out, PackedSequence) else out


def call(model, mode, x, dout):
    if mode == "inference":
        with torch.no_grad():
            return model(x)
    model.zero_grad(set_to_none=True)
    out, state = model(x)
    output_tensor(out).backward(dout)
    return out, state


def valid_tokens(x):
    return output_tensor(x).shape[0] if isinstance(x, PackedSequence) else None


# ----------------------------------------------------------------------------------------------
# Correctness


def results_of(model, x, dout):
    """Output, final states and every weight gradient of one training call, as float64."""
    out, (h_n, c_n) = call(model, "training", x, dout)
    tensors = {"output": output_tensor(out), "h_n": h_n, "c_n": c_n}
    tensors.update({f"grad {name}": p.grad for name, p in model.named_parameters()})
    return {k: v.detach().double() for k, v in tensors.items()}


def relative_error(result, reference):
    """(worst max|a - r| / max|r| over all tensors, the tensor it came from)."""
    worst, where = 0.0, ""
    for name, r in reference.items():
        a = result.get(name)
        if a is None or a.shape != r.shape:
            return math.inf, f"{name} missing or of the wrong shape"
        err = ((a - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
        if not err <= worst:  # NaN counts as worst
            worst, where = (math.inf if math.isnan(err) else err), name
    return worst, where


def reference_results(base, x, dout):
    """nn.LSTM in float64 (on the same device) on exactly the values the implementations see."""
    ref = copy.deepcopy(base).double()
    if isinstance(x, PackedSequence):
        x = PackedSequence(x.data.double(), x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    else:
        x = x.double()
    return results_of(ref, x, dout.double())


# ----------------------------------------------------------------------------------------------
# Timing and memory


def quantiles(samples):
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return {"median_s": statistics.median(samples), "q20_s": q[1], "q80_s": q[7], "min_s": min(samples),
            "samples": len(samples)}


class Sampler:
    """Times one callable on the CPU: a warm-up call, then samples of one or more calls lasting
    >= 20 ms each (torch.utils.benchmark, at the current thread count)."""

    def __init__(self, fn):
        from torch.utils import benchmark

        fn()  # warm-up: allocator, caches, first-call imports
        self.timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        first = self.timer.timeit(1).times[0]
        self.number = max(1, int(0.02 / max(first, 1e-9)))
        self.samples = [first] if self.number == 1 else []
        self.needed = 3 if first > 1.0 else 5  # a call of seconds: three samples, not a minute per row

    def sample(self):
        self.samples.append(self.timer.timeit(self.number).times[0])


def measure_together(fns, device, min_time):
    """Per-call stats of each callable (an exception it raised instead). On the CPU samples are
    taken round-robin, so a burst of load from other processes lands on every implementation of
    a row alike and their ratios stay meaningful; each gets >= min_time on average."""
    if device.type == "cuda":
        results = []
        for fn in fns:
            try:
                results.append(measure(fn, device, min_time))
            except Exception as error:  # noqa: BLE001 - reported in its row
                results.append(error)
        return results
    samplers = {}
    results = [None] * len(fns)
    for k, fn in enumerate(fns):
        try:
            samplers[k] = Sampler(fn)
        except Exception as error:  # noqa: BLE001
            results[k] = error
    start = time.perf_counter()
    while True:
        time_left = time.perf_counter() - start < min_time * len(samplers)
        todo = [k for k, sampler in samplers.items() if len(sampler.samples) < sampler.needed or time_left]
        if not todo:
            break
        for k in todo:
            try:
                samplers[k].sample()
            except Exception as error:  # noqa: BLE001
                results[k] = error
                del samplers[k]
    for k, sampler in samplers.items():
        results[k] = quantiles(sampler.samples)
    return results


def measure(fn, device, min_time):
    """Seconds per call of fn: median, 20%/80% quantiles (and min on the CPU); warm-up excluded."""
    if device.type == "cuda":
        fn()
        return measure_cuda(fn, min_time, min_samples=5)
    (result,) = measure_together([fn], device, min_time)
    if isinstance(result, Exception):
        raise result
    return result


def measure_cuda(fn, min_time, min_samples):
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = begin.elapsed_time(end)
    rep_ms = max(1000 * min_time, min_samples * estimate_ms)
    if triton_available():
        import triton.testing

        median, q20, q80 = triton.testing.do_bench(fn, warmup=max(25, estimate_ms), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"median_s": median / 1e3, "q20_s": q20 / 1e3, "q80_s": q80 / 1e3,
                "samples": max(1, int(rep_ms / max(estimate_ms, 1e-3)))}
    samples = []
    start = time.perf_counter()
    while len(samples) < min_samples or time.perf_counter() - start < min_time:
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(begin.elapsed_time(end) / 1e3)
    return quantiles(samples)


def peak_memory(fn, device):
    """Bytes allocated at the peak of one call, above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    # CPU: replay the profiler's allocation and free events in time order. An op's own
    # (self) memory change nets the frees made inside it outside any child op: count its
    # allocations at its start and its frees at its end, so the peak is never underestimated.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = []
    for event in prof.events():
        delta = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if delta:
            deltas.append((event.time_range.start if delta > 0 else event.time_range.end, delta))
    current = peak = 0
    for _, delta in sorted(deltas):
        current += delta
        peak = max(peak, current)
    return peak


# ----------------------------------------------------------------------------------------------
# Running the cases


def run_case(shape, precision, impls, device, args, rates, log):
    """Rows for one (shape, precision): each implementation checked, then the correct ones
    timed together per mode. One that fails the check, or raises, gets untimed rows saying so."""
    dtype = precision.dtype
    torch.manual_seed(0)
    base = nn.LSTM(shape.I, shape.H, num_layers=shape.layers, bidirectional=shape.bidirectional, device=device)
    base = base.to(dtype)  # the reference sees the same rounded weights as the implementations
    variants = [("packed", True), ("padded", False)] if shape.varlen else [("", False)]
    rows = []
    with Fp32Math(precision.math):
        models, build_errors = {}, {}
        for impl in impls:
            try:
                models[impl.name] = impl.build(base).to(dtype)
            except Exception as error:  # noqa: BLE001 - reported in the row, the run goes on
                build_errors[impl.name] = error
        for variant, packed in variants:
            check_x, check_dout = make_inputs(shape, dtype, device, seed=99, packed=packed)
            case_check = (check_x, check_dout, reference_results(base, check_x, check_dout))
            verdicts = {}
            for impl in impls:
                verdict = check(models.get(impl.name), build_errors.get(impl.name), case_check,
                                TOLERANCE[precision.label()])
                verdicts[impl.name] = verdict
                log(f"  check {impl.name:16s} {shape.name}{'/' + variant if variant else ''} {precision.label()}: "
                    + (f"ERROR {verdict['error']}" if "error" in verdict else
                       f"rel err {verdict['check_rel_err']:.1e} (tol {verdict['check_tolerance']:.0e}) "
                       + ("ok" if verdict["correct"] else "WRONG at " + verdict["check_worst"])))
            timed = [impl.name for impl in impls if verdicts[impl.name]["correct"]]
            for mode in args.modes:
                fields = dict(zip(timed, time_rows([models[name] for name in timed], mode, shape, precision,
                                                   packed, device, args, rates)))
                for impl in impls:
                    row = dict(impl=impl.name, mode=mode, shape=shape.name, shape_label=shape.label(),
                               variant=variant, dtype=precision.label(), B=shape.B, T=shape.T, I=shape.I,
                               H=shape.H, layers=shape.layers, directions=shape.D, note=shape.note,
                               **verdicts[impl.name], **fields.get(impl.name, {}))
                    rows.append(row)
                    if impl.name in fields:
                        log(f"    {impl.name:16s} {mode:9s} " + (f"ERROR {row['error']}" if "error" in row else
                            f"{row['median_ms']:10.2f} ms  [{row['q20_ms']:.2f}, {row['q80_ms']:.2f}]  {row['samples']} samples"))
        del models
    order = {impl.name: k for k, impl in enumerate(impls)}
    rows.sort(key=lambda r: (order[r["impl"]], r["variant"] == "padded", args.modes.index(r["mode"])))
    fill_ratios(rows)
    return rows


def check(model, build_error, case_check, tolerance):
    """The correctness gate for one implementation on one case: fields for its rows."""
    check_x, check_dout, reference = case_check
    verdict = dict(check_tolerance=tolerance, correct=False)
    if build_error is not None:
        return dict(verdict, error=f"building it: {build_error!r}"[:300])
    try:
        err, where = relative_error(results_of(model, check_x, check_dout), reference)
    except Exception as error:  # noqa: BLE001
        return dict(verdict, error=f"checking it: {error!r}"[:300])
    return dict(verdict, check_rel_err=err, check_worst=where, correct=err <= tolerance)


def time_rows(models, mode, shape, precision, packed, device, args, rates):
    """Timing, throughput, floor and peak-memory fields of one row per model, all fed the
    same inputs and timed together."""
    pool = [make_inputs(shape, precision.dtype, device, seed=s, packed=packed) for s in range(3)]

    def stepper(model):
        state = {"k": 0}

        def step():
            x, dout = pool[state["k"] % len(pool)]
            state["k"] += 1
            return call(model, mode, x, dout)

        return step

    steps = [stepper(model) for model in models]
    for model in models:
        model.train(mode == "training")
    tokens = valid_tokens(pool[0][0]) or shape.B * shape.T
    flops = lstm_flops(shape, mode, tokens)
    fields = []
    for step, stats in zip(steps, measure_together(steps, device, args.min_time)):
        try:
            if isinstance(stats, Exception):
                raise stats
            peak = peak_memory(step, device)
        except Exception as error:  # noqa: BLE001 - an OOM in one row must not end the run
            fields.append({"error": f"timing it: {error!r}"[:300]})
            continue
        median = stats["median_s"]
        row = dict(
            median_ms=1e3 * median, q20_ms=1e3 * stats["q20_s"], q80_ms=1e3 * stats["q80_s"],
            samples=stats["samples"], per_step_us=1e6 * median / shape.T,
            tokens_per_s=tokens / median, tokens=tokens, gflop=flops / 1e9,
            floor_ms=1e3 * flops / rates[precision.label()], peak_mb=peak / 2**20,
        )
        row["floor_share"] = row["floor_ms"] / row["median_ms"]
        fields.append(row)
    return fields


def fill_ratios(rows):
    """Speedup against nn.LSTM in the same case and variant; packed/padded per implementation."""
    timed = {(r["impl"], r["mode"], r["variant"]): r.get("median_ms") for r in rows}
    for r in rows:
        if r.get("median_ms") is None:
            continue
        torch_ms = timed.get(("nn.LSTM", r["mode"], r["variant"]))
        r["speedup_vs_nn_lstm"] = torch_ms / r["median_ms"] if torch_ms else None
        if r["variant"] == "packed":
            padded_ms = timed.get((r["impl"], r["mode"], "padded"))
            r["packed_over_padded"] = r["median_ms"] / padded_ms if padded_ms else None


# ----------------------------------------------------------------------------------------------
# Machine line


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device):
    info = {
        "device": device.type,
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": None,
        "nn_lstm_engine": lstm_engine(device),
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if triton_available():
        import triton

        info["triton"] = triton.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def machine_line(info):
    where = f"GPU {info['gpu']} (CUDA {info['cuda']}, cuDNN {info['cudnn']})" if info["device"] == "cuda" else "CPU"
    load = info.get("load_average_start")
    load_text = f", load avg {load[0]:.2f} at start" if load else ""
    return (f"{where}; CPU {info['cpu']} ({info['cpu_cores']} cores, torch threads {info['torch_threads']}); "
            f"torch {info['torch']}, triton {info['triton']}; nn.LSTM engine: {info['nn_lstm_engine']}{load_text}")


def device_slug(info):
    name = info.get("gpu") if info["device"] == "cuda" else info["cpu"]
    name = re.sub(r"\(r\)|\(tm\)|processor|cpu @.*", "", name.lower())
    return f"{info['device']}-" + re.sub(r"[^a-z0-9]+", "-", name).strip("-")


# ----------------------------------------------------------------------------------------------
# Report


COLUMNS = [
    ("impl", "impl", "{}"),
    ("mode", "mode", "{}"),
    ("shape", "shape", "{}"),
    ("dtype", "dtype", "{}"),
    ("median_ms", "median ms", "{:.2f}"),
    ("q20_q80", "[20%, 80%]", "{}"),
    ("per_step_us", "µs/step", "{:.0f}"),
    ("tokens_per_s", "tokens/s", "{:.3g}"),
    ("speedup_vs_nn_lstm", "vs nn.LSTM", "{:.2f}x"),
    ("peak_mb", "peak MB", "{:.1f}"),
    ("floor_share", "of floor", "{:.0%}"),
    ("packed_over_padded", "packed/padded", "{:.2f}"),
]


def table_cells(row):
    cells = []
    for key, _, fmt in COLUMNS:
        if key == "shape":
            value = row["shape"] + (f"/{row['variant']}" if row["variant"] else "")
        elif key == "q20_q80":
            value = f"[{row['q20_ms']:.2f}, {row['q80_ms']:.2f}]" if "q20_ms" in row else None
        else:
            value = row.get(key)
        if key == "median_ms" and "error" in row:
            cells.append("ERROR")
        elif key == "median_ms" and not row["correct"]:
            cells.append(f"WRONG ({row['check_rel_err']:.1e})")
        elif value is None:
            cells.append("-")
        else:
            cells.append(fmt.format(value))
    return cells


def format_table(rows):
    header = [title for _, title, _ in COLUMNS]
    body = [table_cells(r) for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i >= 4 else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(cells) for cells in body])


def write_outputs(result, out_dir, stem, log):
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "csv": out_dir / f"{stem}.csv", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    rows = result["rows"]
    keys = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["device_name"] + keys)
        writer.writeheader()
        name = result["machine"].get("gpu") or result["machine"]["cpu"]
        for row in rows:
            writer.writerow({"device_name": name, **row})
    if not plot_speedups(rows, result["machine"], paths["png"], log):
        del paths["png"]
    return paths


def plot_speedups(rows, info, path, log):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: skipping the speedup chart (pip install matplotlib)")
        return False
    # nn.LSTM is the 1.0 line itself
    timed = [r for r in rows if r.get("speedup_vs_nn_lstm") is not None and r["impl"] != "nn.LSTM"]
    if not timed:
        log("no timed rows: no speedup chart")
        return False
    groups = []
    for r in timed:
        key = (f"{r['shape']}{'/' + r['variant'] if r['variant'] else ''}\n{r['mode']} {r['dtype']}")
        if key not in groups:
            groups.append(key)
    impls = [name for name in dict.fromkeys(r["impl"] for r in timed)]
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4.5))
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for g, key in enumerate(groups):
            for r in timed:
                if r["impl"] == impl and key.startswith(f"{r['shape']}{'/' + r['variant'] if r['variant'] else ''}\n{r['mode']} {r['dtype']}"):
                    xs.append(g + (k - (len(impls) - 1) / 2) * width)
                    ys.append(r["speedup_vs_nn_lstm"])
        ax.bar(xs, ys, width, label=impl)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=7)
    ax.set_ylabel("speedup vs nn.LSTM (higher is faster)")
    where = info.get("gpu") or info["cpu"]
    ax.set_title(f"{where}, torch {info['torch']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# MNIST end to end


def write_idx(path, array):
    """An IDX file (the format torchvision's MNIST reads) from a uint8 or int64 array."""
    import numpy as np

    array = np.ascontiguousarray(array)
    code = 0x08  # unsigned byte
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def torchvision_mnist(images, labels, root):
    """torchvision.datasets.MNIST over the same training images, written as IDX files under
    root: the classic per-sample pipeline (PIL image, ToTensor) with a DataLoader."""
    from torchvision import datasets, transforms

    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    write_idx(raw / "train-images-idx3-ubyte", images)
    write_idx(raw / "train-labels-idx1-ubyte", labels)
    write_idx(raw / "t10k-images-idx3-ubyte", images[:1])
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[:1])
    return datasets.MNIST(root, train=True, download=False, transform=transforms.ToTensor())


def run_mnist(args, device, impls, log):
    """Seconds per training epoch of the MNIST classifier (batch 64, Adam) per implementation.
    With --mnist-steps N, N steps are timed after warm-up and scaled to a full epoch."""
    from bilstm_fast.data import DeviceBatches, find_mnist
    from bilstm_fast.train_mnist import build_model, train_step

    (train_x, train_y, _, _), source = find_mnist(args.mnist_data)
    batch_size, warmup = 64, 3
    steps_per_epoch = -(-len(train_y) // batch_size)
    steps = min(args.mnist_steps or steps_per_epoch, steps_per_epoch)
    log(f"MNIST from {source}: {len(train_y)} training images, {steps_per_epoch} steps/epoch, "
        f"timing {steps} steps after {warmup} warm-up steps")
    batches = DeviceBatches(torch.from_numpy(train_x), torch.from_numpy(train_y), batch_size, device, seed=0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed_epoch(model, batch_iter):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(warmup):
            images, labels = next(batch_iter)
            train_step(model, optimizer, images, labels)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            images, labels = next(batch_iter)
            train_step(model, optimizer, images, labels)
        sync()
        return (time.perf_counter() - start) * steps_per_epoch / steps

    def endless(make_epoch):
        epoch = 0
        while True:
            yield from make_epoch(epoch)
            epoch += 1

    rows = []
    for impl in impls:
        model = build_model("torch", 0, device)
        if impl.name != "nn.LSTM":
            model.lstm = impl.build(model.lstm)
        seconds = timed_epoch(model, endless(batches.epoch))
        rows.append({"impl": impl.name, "loader": "device-resident", "seconds_per_epoch": seconds, "steps_timed": steps})
        log(f"  {impl.name:16s} device-resident loader: {seconds:8.1f} s/epoch")
    with tempfile.TemporaryDirectory() as root:
        dataset = torchvision_mnist(train_x, train_y, root)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                             num_workers=args.mnist_workers, pin_memory=device.type == "cuda")

        def loader_epoch(epoch):
            for images, labels in loader:
                yield images.squeeze(1).to(device, non_blocking=True), labels.to(device, non_blocking=True)

        model = build_model("torch", 0, device)
        seconds = timed_epoch(model, endless(loader_epoch))
        rows.append({"impl": "nn.LSTM", "loader": f"torchvision DataLoader ({args.mnist_workers} workers)",
                     "seconds_per_epoch": seconds, "steps_timed": steps})
        log(f"  {'nn.LSTM':16s} torchvision DataLoader: {seconds:8.1f} s/epoch")
    for row in rows:
        row["extrapolated"] = steps < steps_per_epoch
    return rows


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and short timings: a smoke run")
    p.add_argument("--shapes", help=f"comma-separated, from {','.join(SHAPES)}")
    p.add_argument("--dtypes", help="comma-separated, from fp32,fp16,bf16 (default: fp32 on CPU, all on GPU)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, from inference,training")
    p.add_argument("--impls", help="comma-separated implementation names (default: every available one)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads before timing")
    p.add_argument("--min-time", type=float, help="seconds of samples per row, at least 5 samples (default 0.5, 0.01 with --quick)")
    p.add_argument("--out", help="directory for the JSON/CSV/PNG files (default benchmarks/results)")
    p.add_argument("--no-files", action="store_true", help="print the table only")
    p.add_argument("--mnist", action="store_true", help="also time MNIST training epochs end to end")
    p.add_argument("--mnist-only", action="store_true", help="only the MNIST end-to-end timing")
    p.add_argument("--mnist-steps", type=int, help="time this many steps and scale to an epoch (default: a whole epoch)")
    p.add_argument("--mnist-workers", type=int, default=2, help="DataLoader workers for the torchvision row")
    p.add_argument("--mnist-data", help="MNIST directory (default: what bilstm_fast.data finds)")
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}")
    if args.shapes:
        args.shapes = [s for s in args.shapes.split(",") if s]
        for s in args.shapes:
            if s not in SHAPES:
                p.error(f"unknown shape {s!r}; known: {', '.join(SHAPES)}")
    if args.dtypes:
        args.dtypes = [d for d in args.dtypes.split(",") if d]
        for d in args.dtypes:
            if d not in DTYPES:
                p.error(f"unknown dtype {d!r}")
    if args.min_time is None:
        args.min_time = 0.01 if args.quick else 0.5
    return args


def main(argv=None, impls=None):
    """Run the benchmark; returns the exit status (1 when an implementation failed its check).
    `impls` replaces the default implementations (tests use it to plant a wrong one)."""
    threads = torch.get_num_threads()
    try:
        return run(parse_args(argv), impls)
    finally:
        torch.set_num_threads(threads)  # called in-process (tests): leave the caller's setting


def run(args, impls):
    log = lambda text: print(text, flush=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick and not args.threads:
        # tiny ops gain nothing from threads, and on a shared machine an OpenMP team whose other
        # thread is descheduled turns 0.3 ms calls into 100s of ms (see NOTES.md)
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    impls = impls if impls is not None else default_impls(device)
    if args.impls:
        wanted = args.impls.split(",")
        impls = [i for i in impls if i.name in wanted]
    started = time.perf_counter()
    info = machine_info(device)
    log(machine_line(info))
    result = {"machine": info, "command": "benchmarks/run.py " + " ".join(a for a in sys.argv[1:] if not a.startswith("--out") and not os.path.isabs(a)),
              "rows": [], "mnist": None}
    status = 0
    if not args.mnist_only:
        shapes = select_shapes(args.shapes or DEFAULT_SHAPES[device.type], device, args.quick)
        precs = precisions(args.dtypes or (["fp32"] if device.type == "cpu" else ["fp32", "fp16", "bf16"]), device)
        rates = {}
        for prec in precs:
            with Fp32Math(prec.math):
                rates[prec.label()] = matmul_rate(device, prec.dtype, args.quick, args.min_time)
            log(f"matmul rate {prec.label()}: {rates[prec.label()] / 1e9:.1f} GFLOP/s")
        info["matmul_gflops"] = {k: v / 1e9 for k, v in rates.items()}
        for shape in shapes:
            for prec in precs:
                log(f"{shape.label()} {prec.label()}{' [' + shape.note + ']' if shape.note else ''}")
                case_start = time.perf_counter()
                result["rows"] += run_case(shape, prec, impls, device, args, rates, log)
                log(f"  [{time.perf_counter() - case_start:.0f} s]")
        if not all(r["correct"] and "error" not in r for r in result["rows"]):
            status = 1
    if args.mnist or args.mnist_only:
        result["mnist"] = run_mnist(args, device, impls, log)
    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    info["seconds"] = time.perf_counter() - started
    log("")
    log(machine_line(info) + (f", {info['load_average_end'][0]:.2f} at end" if info["load_average_end"] else ""))
    if result["rows"]:
        log(format_table(result["rows"]))
    if result["mnist"]:
        log("\nMNIST training, seconds per epoch" + (" (extrapolated from timed steps)" if result["mnist"][0]["extrapolated"] else ""))
        for row in result["mnist"]:
            log(f"  {row['impl']:16s} {row['loader']:40s} {row['seconds_per_epoch']:8.1f}")
    notes = sorted({r["note"] for r in result["rows"] if r["note"]})
    if notes:
        log("shape notes: " + "; ".join(notes))
    for row in result["rows"]:
        if "error" in row:
            log(f"ERROR {row['impl']} {row['mode']} {row['shape']} {row['dtype']}: {row['error']}")
    if any(not r["correct"] and "error" not in r for r in result["rows"]):
        log("FAILED: an implementation disagrees with the float64 reference (rows marked WRONG); it was not timed")
    if not args.no_files:
        stem = f"{device_slug(info)}_{datetime.date.today().isoformat()}" + ("_quick" if args.quick else "")
        stem += "_mnist" if args.mnist_only else ""
        paths = write_outputs(result, Path(args.out) if args.out else RESULTS_DIR, stem, log)
        log("wrote " + ", ".join(p.name for p in paths.values()))
    log(f"total {info['seconds']:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
