"""A/B of the inference forward: the saving autograd Function (what no_grad ran before the
inference op) against lstm_layer's no-save inference op, vectorized backend, one CPU thread.

Single-thread CPU time (time.thread_time: user + system of this thread, so page faults count),
the two variants interleaved round by round on rotating inputs; min and median per variant.

    python benchmarks/ab_inference.py                      # MNIST: T28 B64 I28 H256, 2 layers
    python benchmarks/ab_inference.py --shape 50 256 512 512 1 --rounds 6   # large batch, T=50
"""
import argparse
import statistics
import time

import torch

from bilstm_fast.function import LSTMLayerFunction, lstm_layer


def forward(x, layers, saving, backend="vectorized"):
    B, H = x.shape[1], layers[0][1].shape[2]
    state = x.new_zeros(2, B, H)
    with torch.no_grad():
        for w_ih, w_hh, bias in layers:
            run = LSTMLayerFunction.apply if saving else lstm_layer
            x, _, _ = run(x, w_ih, w_hh, bias, state, state, None, backend)
    return x


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=5, default=[28, 64, 28, 256, 2], metavar=("T", "B", "I", "H", "LAYERS"))
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    T, B, I, H, n_layers = args.shape
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    layers = [(torch.randn(2, 4 * H, I if k == 0 else 2 * H, generator=g) * 0.05,
               torch.randn(2, 4 * H, H, generator=g) * 0.05, torch.randn(2, 4 * H, generator=g) * 0.05)
              for k in range(n_layers)]
    inputs = [torch.randn(T, B, I, generator=g) for _ in range(3)]
    assert torch.equal(forward(inputs[0], layers, True), forward(inputs[0], layers, False))  # also the warm-up
    seconds = {True: [], False: []}
    for r in range(args.rounds):
        for saving in (True, False) if r % 2 == 0 else (False, True):
            start = time.thread_time()
            forward(inputs[r % 3], layers, saving)
            seconds[saving].append(time.thread_time() - start)
    for saving, name in ((True, "saving Function"), (False, "inference op")):
        best, median = min(seconds[saving]), statistics.median(seconds[saving])
        print(f"{name:16s} min {best * 1e3:8.1f} ms  median {median * 1e3:8.1f} ms")
    print(f"inference / saving: min {min(seconds[False]) / min(seconds[True]):.3f}, "
          f"median {statistics.median(seconds[False]) / statistics.median(seconds[True]):.3f}")


if __name__ == "__main__":
    main()
