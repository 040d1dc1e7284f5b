"""What the GPU probes share: a torch.profiler trace's CUDA kernels summed by name, and the
time of a call replayed from a CUDA graph."""

from __future__ import annotations

import collections
import statistics
from collections.abc import Callable

import torch
from torch.profiler import profile


def kernel_totals(prof: profile) -> dict[str, tuple[float, int]]:
    """``{kernel name: (total device time in us, launches)}`` over a trace's CUDA events."""
    tot: dict[str, float] = collections.defaultdict(float)
    cnt: dict[str, int] = collections.defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            tot[ev.name] += ev.device_time_total
            cnt[ev.name] += 1
    return {name: (tot[name], cnt[name]) for name in tot}


def graph_ms(fn: Callable[[], object], iters: int, repeats: int) -> float:
    """Median ms per call of ``fn`` replayed from a CUDA graph (warmed up three times on a
    side stream first; ``repeats`` timings of ``iters`` replays each)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)
