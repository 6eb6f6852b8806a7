"""FastBiLSTM against nn.LSTM and a plain PyTorch loop, side by side in one process.

    python benchmarks/run.py                       # every shape and mode, the default precisions (below)
    python benchmarks/run.py --quick --out DIR     # tiny shapes: a smoke run (CI)
    python benchmarks/run.py --shapes mnist,tagging --dtypes fp32 --modes training
    python benchmarks/run.py --dtypes fp32,bf16,bf16-autocast   # bf16 both ways on every shape
    python benchmarks/run.py --mnist               # MNIST seconds per epoch, end to end
    python benchmarks/run.py --mnist-only --dtypes fp32,bf16,bf16-autocast   # the same, fp32 and bf16
    python benchmarks/run.py --deploy              # ONNX Runtime (fp32, int8), OpenVINO, torch int8 (deploy.py)

Implementations (each checked against a float64 nn.LSTM before it is timed; a wrong one is
reported as WRONG, never timed, and makes the run exit with status 1, as does one that raises,
ERROR; but nn.LSTM in a precision it refuses on this CPU whatever the input, such as bf16
autocast without AVX-512, is reported unsupported and fails nothing):
  fast-triton      FastBiLSTM(backend="triton"), CUDA only
  fast-native      FastBiLSTM(backend="native"): the C++ CPU recurrence, where it is built
  fast-vectorized  FastBiLSTM(backend="vectorized")
  fast-<name>      one column for each backend bilstm_fast.kernels.available_backends(device) lists
  nn.LSTM          torch's own: cuDNN on a GPU, oneDNN on the CPU (the machine line says which)
  vanilla          the "vanilla PyTorch" baseline (vanilla.py): nn.LSTMCell math, one batched
                   step at a time per layer and direction, autograd for the backward

Precisions (--dtypes): fp32, fp16, bf16 cast the modules and inputs (`module.bfloat16()`);
fp16-autocast, bf16-autocast keep them fp32 and run the forward under torch.autocast. Every
implementation of a row runs in the row's precision, so nn.LSTM in that precision is its baseline;
reduced-precision rows are also set against nn.LSTM in fp32. By default a GPU runs fp32, fp16 and
bf16 on every shape; the CPU fp32 on every shape and bf16, both ways, on mnist, tagging and
latency-b1 only (each precision costs about what fp32 does: fp32 alone takes ~10 minutes, these
bf16 rows add ~5).
The precisions of a shape are timed together, round-robin on the CPU.

Modes: inference (forward under no_grad) and training (forward + backward of a random output
gradient; the input does not require grad, like data). Timing: torch.utils.benchmark on the CPU,
with the implementations of a row sampled round-robin (a burst of load from other processes hits
them alike), triton.testing.do_bench on a GPU; warm-up excluded; median with 20%/80% quantiles;
inputs drawn once per case from a seeded normal distribution and cycled through three draws.

--deploy times the FastBiLSTM exported to ONNX in ONNX Runtime (fp32 and int8), OpenVINO (fp32, and
bf16 where the CPU has it) and torch's dynamic int8 LSTM beside FastBiLSTM (auto's backend) and
nn.LSTM, inference only, on the deployment shapes of deploy.py (or --shapes); rows for runtimes not
installed are left out.

--loaded runs the selected shapes with a second, busy process pinned to one core throughout (load.py):
the machine line and every row say so, and the files get a _loaded suffix.

Outputs (under benchmarks/results/ or --out): <device>_<date>.json and .csv with every row and
the machine line, and a .png bar chart of speedups against nn.LSTM (needs matplotlib). See
benchmarks/NOTES.md for how to read the table and the floor arithmetic.

This file is the command line; each module beside it has one job:
  shapes.py           the shapes, their inputs, matmul FLOPs        precision.py  dtypes, autocast, TF32
  implementations.py  what is timed (Impl, default_impls), a call   vanilla.py    the loop baseline
  correctness.py      the float64 gate and its tolerances           cases.py      check, time a case
  timing.py           samples, quantiles, the matmul rate           memory.py     peak memory
  machine.py          the machine line                              report.py     table, JSON/CSV/PNG
  mnist_epoch.py      MNIST seconds per epoch (--mnist)             schedules.py  Triton schedules (GPU)
  load.py             the busy process of --loaded                  deploy.py     the --deploy rows
"""
import argparse
import contextlib
import datetime
import os
import sys
import time
from pathlib import Path

# The profiler (engine detection, CPU peak memory) otherwise prints Kineto's trace chatter, and on
# a machine without a GPU an "ERROR ... gpuGetDeviceCount" line, into the table. 6 is above every
# Kineto log level; set KINETO_LOG_LEVEL yourself to see them.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

if __package__ in (None, ""):
    # Run as a script (or loaded from its path by the tests): make the package `benchmarks`
    # importable. Appended, so an installed bilstm_fast still wins over the checkout's.
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402 (after the environment it reads)

from benchmarks.cases import run_case  # noqa: E402
from benchmarks.deploy import deploy_impls, deploy_shapes  # noqa: E402
from benchmarks.implementations import Impl, default_impls  # noqa: E402, F401 (Impl: for callers of main)
from benchmarks.load import BusyProcess  # noqa: E402
from benchmarks.machine import device_slug, machine_info, machine_line  # noqa: E402
from benchmarks.mnist_epoch import run_mnist  # noqa: E402
from benchmarks.precision import PRECISIONS, Fp32Math, default_precision_names, precisions, timing_groups  # noqa: E402
from benchmarks.report import format_table, write_outputs  # noqa: E402
from benchmarks.shapes import DEFAULT_SHAPES, MODES, SHAPES, Shape, lstm_flops, select_shapes  # noqa: E402, F401
from benchmarks.timing import matmul_rate, paired_speedup, quantiles  # noqa: E402, F401

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and short timings: a smoke run")
    p.add_argument("--shapes", help=f"comma-separated, from {','.join(SHAPES)}")
    p.add_argument("--dtypes", help=f"comma-separated, from {','.join(PRECISIONS)} (default: see above)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, from inference,training")
    p.add_argument("--impls", help="comma-separated implementation names (default: every available one)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads before timing")
    p.add_argument("--min-time", type=float,
                   help="seconds of samples per row, at least 5 samples (default 0.5, 0.01 with --quick)")
    p.add_argument("--out", help="directory for the JSON/CSV/PNG files (default benchmarks/results)")
    p.add_argument("--no-files", action="store_true", help="print the table only")
    p.add_argument("--loaded", action="store_true",
                   help="run with a second, busy process pinned to one core (a shared machine)")
    p.add_argument("--deploy", action="store_true",
                   help="inference in the deployment runtimes (ONNX Runtime, OpenVINO, int8) beside eager")
    p.add_argument("--mnist", action="store_true",
                   help="also time MNIST training epochs end to end (in --dtypes if given, else fp32)")
    p.add_argument("--mnist-only", action="store_true", help="only the MNIST end-to-end timing")
    p.add_argument("--mnist-steps", type=int,
                   help="time this many steps and scale to an epoch (default: a whole epoch)")
    p.add_argument("--mnist-workers", type=int, default=2, help="DataLoader workers for the torchvision row")
    p.add_argument("--mnist-data", help="MNIST directory (default: what bilstm_fast.apps.data finds)")
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
            if d not in PRECISIONS:
                p.error(f"unknown dtype {d!r}; known: {', '.join(PRECISIONS)}")
    if args.deploy:
        args.modes = ["inference"]
        args.dtypes = args.dtypes or ["fp32"]
    if args.min_time is None:
        args.min_time = 0.01 if args.quick else 0.5
    return args


def failed(row):
    """A row that fails the run: its implementation raised, or computed a wrong result (WRONG).
    nn.LSTM raising what it raises on any input in that precision here is unsupported, not failed."""
    return "unsupported" not in row and (not row["correct"] or "error" in row)


def main(argv=None, impls=None):
    """Run the benchmark; returns the exit status (1 when an implementation failed its check).
    `impls` replaces the default implementations (tests use it to plant a wrong one)."""
    threads = torch.get_num_threads()
    try:
        return run(parse_args(argv), impls)
    finally:
        torch.set_num_threads(threads)  # called in-process (tests): leave the caller's setting


def run(args, impls):
    with BusyProcess() if args.loaded else contextlib.nullcontext() as busy:
        return run_timed(args, impls, busy)


def run_timed(args, impls, busy):
    def log(text):
        print(text, flush=True)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick and not args.threads:
        # tiny ops gain nothing from threads, and on a shared machine an OpenMP team whose other
        # thread is descheduled turns 0.3 ms calls into 100s of ms (see NOTES.md)
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if impls is None and args.deploy:  # FastBiLSTM on auto's first choice, nn.LSTM, the runtimes
        fast, *others = default_impls(device)
        impls = [fast, *[i for i in others if i.name == "nn.LSTM"], *deploy_impls()]
    impls = impls if impls is not None else default_impls(device)
    if args.impls:
        wanted = args.impls.split(",")
        impls = [i for i in impls if i.name in wanted]
    started = time.perf_counter()
    info = machine_info(device)
    if busy is not None:
        info["busy_process"] = busy.description
    log(machine_line(info))
    command = " ".join(a for a in sys.argv[1:] if not a.startswith("--out") and not os.path.isabs(a))
    result = {"machine": info, "command": "benchmarks/run.py " + command, "rows": [], "mnist": None}
    status = 0
    if not args.mnist_only:
        if args.deploy and not args.shapes:
            shapes = deploy_shapes(args.quick)
        else:
            shapes = select_shapes(args.shapes or DEFAULT_SHAPES[device.type], device, args.quick)
        precs = {shape: precisions(args.dtypes or default_precision_names(shape.name, device), device)
                 for shape in shapes}
        rates, measured = {}, {}  # by label; by (GEMM dtype, math): bf16 and bf16-autocast share one
        for prec in dict.fromkeys(p for shape in shapes for p in precs[shape]):
            key = (prec.compute_dtype, prec.math)
            if key not in measured:
                with Fp32Math(prec.math):
                    measured[key] = matmul_rate(device, prec.compute_dtype, args.quick, args.min_time)
            rates[prec.label()] = measured[key]
            log(f"matmul rate {prec.label()}: {rates[prec.label()] / 1e9:.1f} GFLOP/s")
        info["matmul_gflops"] = {k: v / 1e9 for k, v in rates.items()}
        for shape in shapes:
            for group in timing_groups(precs[shape]):
                log(f"{shape.label()} {', '.join(p.label() for p in group)}"
                    f"{' [' + shape.note + ']' if shape.note else ''}")
                case_start = time.perf_counter()
                rows = run_case(shape, group, impls, device, args, rates, log)
                for row in rows:
                    row["loaded"] = busy is not None
                result["rows"] += rows
                log(f"  [{time.perf_counter() - case_start:.0f} s]")
        if any(failed(r) for r in result["rows"]):
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
        extrapolated = " (extrapolated from timed steps)" if result["mnist"][0]["extrapolated"] else ""
        log("\nMNIST training, seconds per epoch" + extrapolated)
        for row in result["mnist"]:
            log(f"  {row['impl']:16s} {row['dtype']:13s} {row['loader']:40s} {row['seconds_per_epoch']:8.1f}")
    notes = sorted({r["note"] for r in result["rows"] if r["note"]})
    if notes:
        log("shape notes: " + "; ".join(notes))
    for row in result["rows"]:
        if "error" in row:
            log(f"ERROR {row['impl']} {row['mode']} {row['shape']} {row['dtype']}: {row['error']}")
        elif "unsupported" in row:
            log(f"UNSUPPORTED {row['impl']} {row['mode']} {row['shape']} {row['dtype']}: {row['unsupported']}")
    if any(failed(r) and "error" not in r for r in result["rows"]):
        log("FAILED: an implementation disagrees with the float64 reference (rows marked WRONG); it was not timed")
    if not args.no_files:
        stem = f"{device_slug(info)}_{datetime.date.today().isoformat()}" + ("_quick" if args.quick else "")
        stem += "_mnist" if args.mnist_only else ""
        stem += "_loaded" if args.loaded else ""
        stem += "_deploy" if args.deploy else ""
        paths = write_outputs(result, Path(args.out) if args.out else RESULTS_DIR, stem, log)
        log("wrote " + ", ".join(p.name for p in paths.values()))
    log(f"total {info['seconds']:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
