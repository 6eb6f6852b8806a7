"""Seconds per call: round-robin torch.utils.benchmark samples on the CPU, do_bench on a GPU."""
import itertools
import statistics
import time

import torch

from bilstm_fast.kernels import triton_available


def quantiles(samples):
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return {"median_s": statistics.median(samples), "q20_s": q[1], "q80_s": q[7], "min_s": min(samples),
            "samples": len(samples)}


def paired_speedup(reference, other):
    """Median over rounds of reference time / other time, from two {round: seconds} maps of
    round-robin samples: each ratio sets two samples taken back to back against each other, so a
    slow phase of a shared machine lands on both sides of it instead of on whichever
    implementation it happened to hit. None without a round in common."""
    common = sorted(set(reference) & set(other))
    return statistics.median(reference[k] / other[k] for k in common) if common else None


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
        self.rounds = {}  # round-robin round -> its sample (the first, untagged, is in no round)
        self.needed = 3 if first > 1.0 else 5  # a call of seconds: three samples, not a minute per row

    def sample(self, round_):
        self.samples.append(self.timer.timeit(self.number).times[0])
        self.rounds[round_] = self.samples[-1]


def measure_together(fns, device, min_time):
    """Per-call stats of each callable (an exception it raised instead). On the CPU samples are
    taken round-robin, so a burst of load from other processes lands on every implementation of
    a row alike and their ratios stay meaningful; each gets >= min_time on average, and its stats
    keep each round's sample ("rounds_s", for paired_speedup)."""
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
    for round_ in itertools.count():
        time_left = time.perf_counter() - start < min_time * len(samplers)
        todo = [k for k, sampler in samplers.items() if len(sampler.samples) < sampler.needed or time_left]
        if not todo:
            break
        for k in todo:
            try:
                samplers[k].sample(round_)
            except Exception as error:  # noqa: BLE001
                results[k] = error
                del samplers[k]
    for k, sampler in samplers.items():
        results[k] = {**quantiles(sampler.samples), "rounds_s": sampler.rounds}
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

        median, q20, q80 = triton.testing.do_bench(fn, warmup=max(25, estimate_ms), rep=rep_ms,
                                                   quantiles=[0.5, 0.2, 0.8])
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


def matmul_rate(device, dtype, quick, min_time):
    """Measured FLOP/s of one large square GEMM in this dtype under the current math settings:
    the best sample (20% quantile on a GPU), since the floor is what the machine can reach."""
    n = 256 if quick else (2048 if device.type == "cpu" else 8192)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    stats = measure(lambda: torch.mm(a, b), device, min_time)
    return 2 * n**3 / stats.get("min_s", stats["q20_s"])
