"""Which schedule a unidirectional stack should run (bilstm_fast/stack.py): layer by layer, the
batch split of every layer without a join between layers, or the wavefront; nn.LSTM beside them.
All in one process, round-robin samples (benchmarks/timing.py), time / nn.LSTM's paired by round.

    python benchmarks/stack_schedule.py --threads 2                      # the issue's shapes
    python benchmarks/stack_schedule.py --grid --threads 2               # a B x H grid, L=2, T=50

What it prints decides stack.schedule's rule (benchmarks/NOTES.md, "Unidirectional stacks").
Each row ends with the GEMM floor: the shape's multiply-adds at this machine's best fp32 GEMM
rate (a 2048^3 torch.mm at the same threads), the least time any fp32 implementation could take,
and that time over nn.LSTM's: the lowest ratio reachable.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.shapes import Shape, lstm_flops  # noqa: E402
from benchmarks.timing import measure_together, paired_speedup  # noqa: E402
from bilstm_fast import FastBiLSTM  # noqa: E402
from bilstm_fast.stack import SCHEDULES  # noqa: E402

ISSUE_SHAPES = {  # (B, T, I, H, layers)
    "word-lm": (20, 35, 650, 650, 2),
    "small-text": (32, 50, 128, 128, 3),
    "large-batch-uni": (64, 100, 512, 512, 2),
    "generation": (1, 1, 128, 128, 3),  # one word per call, the text-generation example's sampling loop
}


def grid():
    return {f"B{B} H{H}": (B, 50, H, H, 2) for H in (128, 256, 512, 1024) for B in (1, 4, 16, 64)}


def gemm_rate():
    """FLOP/s of this machine's best fp32 GEMM: a 2048^3 torch.mm, best of 5 after a warm-up."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def call(model, x, mode, schedule=None):
    """One call of model in `mode`; a FastBiLSTM forced to `schedule` (None: nn.LSTM, nothing to force)."""

    def run():
        if schedule is not None:
            os.environ["BILSTM_FAST_STACK"] = schedule
        if mode == "inference":
            with torch.no_grad():
                model(x)
        else:
            out, _ = model(x)
            out.sum().backward()

    return run


def time_shape(name, shape, modes, min_time, rate):
    B, T, I, H, L = shape
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, L)
    fast = FastBiLSTM.from_lstm(ref, copy=True)
    x = torch.randn(T, B, I)
    for mode in modes:
        fns = [call(fast, x, mode, s) for s in SCHEDULES] + [call(ref, x, mode)]
        stats = measure_together(fns, torch.device("cpu"), min_time)
        base = stats[-1]
        cells = []
        for schedule, s in zip(SCHEDULES, stats):
            ratio = 1 / paired_speedup(base["rounds_s"], s["rounds_s"])
            cells.append(f"{schedule} {s['median_s'] * 1e3:8.2f} ms ({ratio:.2f})")
        floor = lstm_flops(Shape(name, B, T, I, H, L, bidirectional=False), mode) / rate
        print(f"{name:16s} {mode:9s} " + "  ".join(cells) + f"  nn.LSTM {base['median_s'] * 1e3:8.2f} ms"
              f"  GEMM floor {floor * 1e3:8.2f} ms ({floor / base['median_s']:.2f})", flush=True)
    os.environ.pop("BILSTM_FAST_STACK", None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", action="store_true",
                        help="a B x H grid (L=2, T=50, I=H) instead of the issue's shapes")
    parser.add_argument("--shapes", default=",".join(ISSUE_SHAPES),
                        help="comma-separated, from " + ",".join(ISSUE_SHAPES))
    parser.add_argument("--modes", default="inference,training")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of samples per variant")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rate = gemm_rate()
    print(f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}, fp32 GEMM {rate / 1e9:.0f} GFLOP/s; "
          "per schedule: median ms (time / nn.LSTM's, paired by round)")
    shapes = grid() if args.grid else {name: ISSUE_SHAPES[name] for name in args.shapes.split(",")}
    for name, shape in shapes.items():
        time_shape(name, shape, args.modes.split(","), args.min_time, rate)
    print(f"load at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
