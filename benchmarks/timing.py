"""The one timer and the one environment record of every benchmark (run.py, gpu_check.py, export/bench_ort.py).

Method (STYLE rule 10): every timed call is bracketed by a device synchronisation (CUDA: events recorded on the
current stream and waited on); warm-up calls are timed separately and never enter the statistics; workloads
are interleaved round by round (A B A B ..., the order rotated each round) so that load on a shared machine
hits every model alike; inputs rotate over several distinct tensors so no cache sees the same data twice
in a row. Percentiles are numpy's (linear interpolation). Kernel micro-benchmarks on CUDA use
`triton.testing.do_bench` (median, L2 flushed between calls) through `kernel_ms`; everything else goes through
`measure_interleaved`.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import resource
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch


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


def latency_ms(times_s: list[float]) -> dict[str, float]:
    """p50/p90/p99 (numpy's linear interpolation), mean, min and max of the timed calls, in milliseconds."""
    if not times_s:
        raise ValueError("no timed calls")
    ms = np.asarray(times_s, dtype=np.float64) * 1000
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(ms.mean()),
            "min": float(ms.min()), "max": float(ms.max())}


@dataclass
class Measurement:
    warmup_s: list[float] = field(default_factory=list)  # excluded from the statistics
    times_s: list[float] = field(default_factory=list)
    peak_memory_mb: float | None = None

    def latency_ms(self) -> dict[str, float]:
        return latency_ms(self.times_s)


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


def kernel_ms(fn: Callable[[], object], device: torch.device, *, repeats: int = 3) -> float:
    """Median milliseconds of one kernel call. CUDA: `triton.testing.do_bench` (events, L2 flushed, its own
    warm-up); elsewhere the median of `repeats` synchronised calls after one warm-up (`measure_interleaved`)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    m = measure_interleaved({"fn": lambda i: fn()}, device=device, warmup=1, repeats=repeats)["fn"]
    return m.latency_ms()["p50"]


# -- the environment record ---------------------------------------------------------------------------------------


def env_cpu_load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def package_version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str) -> dict:
    """Device, library versions and machine state recorded with every benchmark number (STYLE rule 10).
    Machine facts come from `torch.utils.collect_env` (the record PyTorch's bug template asks for)."""
    from torch.utils import collect_env

    device = torch.device(device)
    info = collect_env.get_env_info()
    cpu_name = next((line.split(":", 1)[1].strip() for line in (info.cpu_info or "").splitlines()
                     if line.strip().lower().startswith("model name")), None) or platform.processor() or "unknown CPU"
    cuda = device.type == "cuda"
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name,
        "cpu_name": cpu_name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": env_cpu_load(),
        "loadavg_end": None,  # set by the benchmark when it ends
        "python": platform.python_version(),
        "platform": info.python_platform,
        "os": info.os,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_driver": info.nvidia_driver_version if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "triton": package_version("triton"),
        "onnxruntime": package_version("onnxruntime") or package_version("onnxruntime-gpu"),
        "onnx": package_version("onnx"),
        "tensorrt": package_version("tensorrt"),
        "diffusers": package_version("diffusers"),
        "ssdd_runtime": package_version("ssdd-runtime"),
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
