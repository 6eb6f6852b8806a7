"""The tiny training call side by side (issue 17): B=1, T=11, I=4, H=4, bidirectional, fp32,
one thread, forward + backward of out.sum().

nn.LSTM, FastBiLSTM (on --backend, default auto) and that backend's two recurrence calls alone
run in alternating blocks of 20 calls, so all three see the same machine load; each ratio
is the median over the block triples of that block's time over nn.LSTM's. On a shared machine
this is what stays stable when the absolute times move by 2x.

    PYTHONPATH=. python benchmarks/tiny_overhead.py [--backend vectorized] [--pairs 150]
"""
import argparse
import os
import statistics
import time

import torch
from torch import nn

from bilstm_fast import FastBiLSTM
from bilstm_fast.kernels import recurrence_module, resolve_backend


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=150, help="alternating block triples to time")
    p.add_argument("--backend", default="auto", help="FastBiLSTM's backend (auto, vectorized, native)")
    args = p.parse_args()
    name = resolve_backend(args.backend, torch.device("cpu"), torch.float32)
    rec = recurrence_module(name)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ref = nn.LSTM(4, 4, bidirectional=True)
    fast = FastBiLSTM(4, 4, backend=args.backend)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(11, 1, 4)
    gx, w, h0 = torch.randn(11, 1, 2, 16), torch.randn(2, 16, 4), torch.zeros(2, 1, 4)
    out, h_n, c_n, gates, cs = rec.recurrence_forward(gx, w, h0, h0)
    dout = torch.randn_like(out)

    def step(model):
        o, _ = model(x)
        o.sum().backward()

    def loops():
        rec.recurrence_forward(gx, w, h0, h0)
        rec.recurrence_backward(dout, h_n, c_n, w, gates, cs, h0)

    def block(f, n=20):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t0) / n * 1e6

    calls = [lambda: step(ref), lambda: step(fast), loops]
    for f in calls:
        block(f, 50)
    rows = [[block(f) for f in calls] for _ in range(args.pairs)]
    med = [statistics.median(r[k] for r in rows) for k in range(3)]
    ratio = [statistics.median(r[k] / r[0] for r in rows) for k in range(3)]
    print(f"backend {name}, load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}, 1 thread")
    print(f"nn.LSTM step            {med[0]:7.0f} us  1.00x")
    print(f"FastBiLSTM step         {med[1]:7.0f} us  {ratio[1]:.2f}x")
    print(f"recurrence calls alone  {med[2]:7.0f} us  {ratio[2]:.2f}x")


if __name__ == "__main__":
    main()
