"""Peak memory of one call: the CUDA allocator's peak, or the CPU profiler's events replayed."""
import torch


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
