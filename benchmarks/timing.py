"""Timers, percentiles and peak memory for the benchmark.

Method (STYLE rule 10): every timed call is bracketed by a device synchronisation (CUDA: events recorded on the
current stream and waited on); warm-up calls are timed separately and never enter the statistics; workloads
are interleaved round by round (A B A B ..., the order rotated each round) so that load on a shared machine
hits every model alike; inputs rotate over several distinct tensors so no cache sees the same data twice
in a row.
"""
from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method); q in [0, 100]."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100]; got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of the calls between `reset()` and `read_mb()`.

    CUDA: torch.cuda.max_memory_allocated (tensors allocated through PyTorch; ONNX Runtime / TensorRT arenas
    are not seen, see `kind`). CPU: the process's resident-set high-water mark (VmHWM), reset per call through
    /proc/self/clear_refs where the kernel allows it; otherwise the process-lifetime maximum (ru_maxrss).
    The CPU number is the whole process (weights of every loaded model included), not one model's share."""

    def __init__(self, device: torch.device, *, torch_allocations: bool = True):
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_memory_allocated" if torch_allocations else "unavailable"
        else:
            self.kind = "process_peak_rss" if self._can_reset_rss() else "process_lifetime_max_rss"

    @staticmethod
    def _can_reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _vm_hwm_kb() is not None
        except OSError:
            return False

    def reset(self) -> None:
        if self.kind == "cuda_max_memory_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "process_peak_rss":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def read_mb(self) -> float | None:
        if self.kind == "cuda_max_memory_allocated":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.kind == "process_peak_rss":
            return _vm_hwm_kb() / 1024
        if self.kind == "process_lifetime_max_rss":
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        return None


def _vm_hwm_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds taken by one call of fn, synchronised on both sides."""
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclass
class Measurement:
    warmup_s: list[float] = field(default_factory=list)  # excluded from the statistics
    times_s: list[float] = field(default_factory=list)
    peak_memory_mb: float | None = None

    def latency_ms(self) -> dict[str, float]:
        ms = [t * 1000 for t in self.times_s]
        return {"p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99),
                "mean": sum(ms) / len(ms), "min": min(ms), "max": max(ms)}


def measure_interleaved(calls: dict[str, Callable[[int], object]], *, device: torch.device, warmup: int,
                        repeats: int, memory: dict[str, PeakMemory] | None = None,
                        on_call: Callable[[str, str, int, float], None] | None = None) -> dict[str, Measurement]:
    """Time each `calls[name](i)` (i = call index, for rotating inputs) `warmup` + `repeats` times.

    All warm-up calls run first (model by model), then `repeats` rounds, each calling every model once in
    an order rotated by one per round. Returns a Measurement per name; `on_call(name, phase, i, seconds)`
    reports progress."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0; got {warmup}")
    names = list(calls)
    out = {n: Measurement() for n in names}
    for n in names:
        for i in range(warmup):
            dt = time_call(lambda: calls[n](i), device)
            out[n].warmup_s.append(dt)
            if on_call:
                on_call(n, "warmup", i, dt)
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            i = warmup + r
            mem = memory.get(n) if memory else None
            if mem is not None:
                mem.reset()
            dt = time_call(lambda: calls[n](i), device)
            out[n].times_s.append(dt)
            if mem is not None:
                mb = mem.read_mb()
                if mb is not None:
                    out[n].peak_memory_mb = max(mb, out[n].peak_memory_mb or 0.0)
            if on_call:
                on_call(n, "timed", r, dt)
    return out


def env_cpu_load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
