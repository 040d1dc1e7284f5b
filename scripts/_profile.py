"""What the GPU probes share: a torch.profiler trace's CUDA kernels summed by name."""

from __future__ import annotations

import collections

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
