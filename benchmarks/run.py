"""The benchmark sweep: models x backends x batch sizes x resolutions, interleaved, with the environment.

images/s = batch / median latency of one full decode (all Euler steps for SSDD). The SSDD/KL-VAE ratio is
taken from the same run, between workloads timed in the same interleaved rounds.

Quality (`Config.quality`, `ssdd bench --quality`, on by default with --checkpoint): every SSDD decode row carries
`quality_psnr_db`, `quality_max_abs_error` and `quality_mean_abs_error` of its decode of the first input set
against the fp32 eager (reference-path) decode of the same latents and the same noise (QUALITY_METHOD). With
`eval_images` the latents are the fp32 encodings of real images (the checkpoint's encoder) instead of random ones.

CPU rows also carry `gflop` (per call, `workloads.gflop`), `gflops_achieved` = gflop / median latency and
`peak_fraction` = gflops_achieved / the CPU's peak at the row's precision (`cpu_peak`, formula in env).
"""
from __future__ import annotations

import copy
import logging
import math
import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ssdd_runtime import optimize
from ssdd_runtime.api import as_dtype
from ssdd_runtime.io import atomic_output
from ssdd_runtime.benchmarks import backends as bk
from ssdd_runtime.benchmarks.schema import SCHEMA, write_json  # noqa: F401 (write_json: the CLI's writer)
from ssdd_runtime.benchmarks.timing import (Measurement, PeakMemory, env_cpu_load, environment, measure_interleaved,
                                             package_version)
from ssdd_runtime.benchmarks.workloads import (KL_VAE, SSDD_PREFIX, WEIGHTS_NOTE, Workload, build_workload,
                                               check_model_name, gflop, is_encoder)

log = logging.getLogger(__name__)

METHOD = ("latency of one full decode (all Euler steps for SSDD; post_quant_conv + decoder for the KL-VAE), "
          "inputs pre-made on the device and rotated over {rotate} distinct sets; {warmup} warm-up call(s) per "
          "workload excluded (compile/export time reported separately as warmup_s/prepare_s); {repeats} timed "
          "calls, workloads interleaved round by round (order rotated each round); CUDA: events + synchronize; "
          "CPU: perf_counter; images/s = batch / median latency; encoder-* workloads: one encoder forward")


QUALITY_METHOD = ("quality_*: the row's decode of input set 0 against the fp32 eager reference-path decode of the same "
                  "latents and noise; PSNR (dB, data_range 1) of the two 8-bit quantised images "
                  "(round(clamp(255 (x + 1) / 2, 0, 255)) / 255), null when identical; max and mean absolute error of "
                  "the raw [-1, 1] outputs; with --eval-images, recon_psnr_db: the same PSNR against the input images "
                  "(the reconstruction's, for SSDD and the KL-VAE)")


@dataclass
class Config:
    models: list[str]
    backends: list[str]
    batches: list[int]
    resolutions: list[tuple[int, int]]
    steps: list[int] = field(default_factory=lambda: [1])
    dtype: str = "fp32"
    device: str = "cpu"
    warmup: int = 1
    repeats: int = 5
    rotate: int = 3
    channels_last: bool = False
    checkpoint: str | None = None
    kl_vae_checkpoint: str | None = None
    kl_vae_config: dict | str | None = None
    quality: bool = False
    eval_images: str | None = None

    def validate(self) -> None:
        for m in self.models:
            check_model_name(m)
        for b in self.backends:
            bk.check_backend_name(b)
        as_dtype(self.dtype)
        for name, vals in (("batch", self.batches), ("steps", self.steps)):
            if not vals or any(v < 1 for v in vals):
                raise ValueError(f"{name} values must be integers >= 1; got {vals}")
        if not self.resolutions or any(h < 8 or w < 8 for h, w in self.resolutions):
            raise ValueError(f"resolutions must be HxW with H, W >= 8; got {self.resolutions}")
        if self.repeats < 1 or self.warmup < 0 or self.rotate < 1:
            raise ValueError("need repeats >= 1, warmup >= 0, rotate >= 1")
        if self.eval_images is not None:
            if self.checkpoint is None:
                raise ValueError("--eval-images encodes the images with the checkpoint's encoder: give --checkpoint")
            if not os.path.isdir(self.eval_images):
                raise FileNotFoundError(f"--eval-images folder not found: {self.eval_images}")


def run_benchmark(cfg: Config, *, echo: Callable[[str], None] = print) -> dict:
    """Run the sweep; returns a report in the `schema.SCHEMA` form. A model whose optional dependency is missing
    (the KL-VAE without diffusers) is skipped with the reason, as unavailable backends are."""
    cfg.validate()
    device = torch.device(cfg.device)
    dtype = as_dtype(cfg.dtype)
    env = environment(device)
    env["openvino"] = package_version("openvino")
    if device.type == "cpu":
        env["lscpu"] = lscpu()
        env["cpu_peak"] = cpu_peak(torch.get_num_threads(), env["lscpu"])
    results: list[dict] = []
    skipped: list[dict] = []
    notes = [WEIGHTS_NOTE]
    if device.type == "cpu":
        notes.append("CPU peak memory is the whole process's resident-set peak (all loaded models), not one "
                     "model's share")

    # (model, steps) pairs: steps only apply to SSDD
    jobs = [(m, s) for m in cfg.models for s in (cfg.steps if m.startswith(SSDD_PREFIX) else [1])]
    workloads: dict[tuple[str, int], Workload] = {}
    for m, s in jobs:
        ck = cfg.kl_vae_checkpoint if m == KL_VAE else cfg.checkpoint
        try:
            w = build_workload(m, steps=s, checkpoint=ck, kl_vae_config=cfg.kl_vae_config)
        except ImportError as e:  # diffusers absent: the rest of the sweep still runs
            echo(f"skip model {m}: {e}")
            skipped.append({"model": m, "reason": f"skipped: {e}"})
            continue
        if cfg.quality and m.startswith(SSDD_PREFIX):  # the fp32 eager reference, before the dtype cast
            w.reference = copy.deepcopy(w.net).to(device, torch.float32)
            optimize.use_kernels(w.reference, False)
        w.net = w.net.to(device, dtype)
        if cfg.channels_last:
            w.net = optimize.channels_last(w.net)
        workloads[(m, s)] = w
        echo(f"built {m} (steps={s}): {w.params / 1e6:.1f}M parameters, weights: {w.weights}")
    echo(f"note: {WEIGHTS_NOTE}")
    if cfg.quality:
        notes.append(QUALITY_METHOD + ("; latents: fp32 encodings of the images in " + cfg.eval_images
                                       if cfg.eval_images else "; latents: random (pass --eval-images for real ones)"))
    encoder = _EvalImages(cfg, device) if cfg.quality and cfg.eval_images else None

    for backend in cfg.backends:
        reason = bk.unavailable_reason(backend, device, dtype)
        if reason is not None:
            echo(f"skip backend {backend}: {reason}")
            skipped.append({"backend": backend, "reason": reason})
            continue
        for (H, W) in cfg.resolutions:
            for batch in cfg.batches:
                results += _run_group(cfg, backend, batch, H, W, workloads, device, dtype, echo, skipped, encoder)
    if device.type == "cpu":
        for r in results:
            add_flop_rate(r, workloads[(r["model"], r["steps"])], env["cpu_peak"])
    env["loadavg_end"] = env_cpu_load()
    method = METHOD.format(rotate=cfg.rotate, warmup=cfg.warmup, repeats=cfg.repeats)
    return {"schema": SCHEMA, "env": env, "method": method, "notes": notes, "skipped": skipped,
            "results": results, "ratios": ratios(results),
            "ratios_vs_kl_vae_eager_fp32": cross_ratios(results), "speedup_vs_eager_fp32": speedups(results)}


def _run_group(cfg, backend, batch, H, W, workloads, device, dtype, echo, skipped, encoder=None) -> list[dict]:
    """Prepare every workload for (backend, batch, H, W), then time them interleaved."""
    calls, infos, inputs, references, inputs_of = {}, {}, {}, {}, {}
    for key, w in workloads.items():
        label = _label(*key)
        sets = [w.example_inputs(batch, H, W, dtype, device, seed=i) for i in range(cfg.rotate)]
        if getattr(w, "reference", None) is not None:  # quality: set 0's latents and noise in fp32
            (_, t, _), noise = sets[0]
            z32 = w.example_inputs(batch, H, W, torch.float32, device, seed=0)[0][2]
            if encoder is not None:
                z32 = encoder.ssdd(batch, H, W).to(device)
                sets[0] = ((noise.to(dtype), t, z32.to(dtype)), noise)
                inputs_of[label] = encoder.crops(batch, H, W)
            references[label] = (w, z32, noise)
        elif encoder is not None and encoder.kl_vae is not None and w.model == KL_VAE:
            sets[0] = ((encoder.kl_vae(batch, H, W).to(device, dtype),), None)
            inputs_of[label] = encoder.crops(batch, H, W)
        if cfg.channels_last:
            sets = [(tuple(_cl(a) for a in ins), noise) for ins, noise in sets]
        try:
            run, info = bk.prepare(backend, w.net, sets[0][0], is_ssdd=w.model != KL_VAE)
        except NotImplementedError as e:  # e.g. a Triton kernel that is not built yet
            echo(f"skip {label} on {backend}: {e}")
            skipped.append({"backend": backend, "model": label, "reason": str(e)})
            continue
        calls[label] = _decode_call(w, run, sets)
        infos[label], inputs[label] = info, sets
        if "export_s" in info:
            echo(f"  {label} {backend} {batch}x{H}x{W}: exported in {info['export_s']:.1f} s")
    if not calls:
        return []
    memory = {n: PeakMemory(device, torch_allocations=backend not in ("onnxruntime", "tensorrt")) for n in calls}
    echo(f"timing {', '.join(calls)} on {backend} {cfg.dtype} batch {batch} {H}x{W}: "
         f"{cfg.warmup} warm-up + {cfg.repeats} timed calls each, interleaved")

    def progress(name, phase, i, dt):
        echo(f"  {name:>12} {phase} {i}: {dt * 1000:9.1f} ms")

    with torch.inference_mode():
        meas = measure_interleaved(calls, device=device, warmup=cfg.warmup, repeats=cfg.repeats, memory=memory,
                                   on_call=progress)
    out = []
    for (m, s), w in workloads.items():
        label = _label(m, s)
        if label not in meas:
            continue
        info = infos[label]
        extra = {"backend_options": info["backend_options"]} if "backend_options" in info else {}
        if label in references or label in inputs_of:
            with torch.inference_mode():
                out0 = calls[label](0).float().cpu()  # the timed path on input set 0
            if label in references:
                extra.update(decode_quality(out0, *references[label], latents="images" if encoder else "random"))
            if label in inputs_of:  # against the input images: the reconstruction's own PSNR
                extra["recon_psnr_db"] = psnr_8bit(out0, inputs_of[label])
        out.append(result_row(m, label, backend, info.get("dtype") or cfg.dtype, device, batch, H, W, s,
                              meas[label], memory_format="channels_last" if cfg.channels_last else "contiguous",
                              prepare_s=info["prepare_s"], memory_kind=memory[label].kind,
                              weights=w.weights, params=w.params, notes=info["notes"],
                              task="encode" if is_encoder(m) else "decode", **extra))
    return out


def psnr_8bit(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """PSNR (dB, data_range 1) of two [-1, 1] image batches after 8-bit quantisation, pooled; None if identical."""
    from ssdd_runtime.io import tensor_to_uint8

    q = (torch.from_numpy(tensor_to_uint8(a)).double() - torch.from_numpy(tensor_to_uint8(b)).double()) / 255
    mse = float((q * q).mean())
    return None if mse == 0 else 10 * math.log10(1 / mse)


def decode_quality(out: torch.Tensor, w: Workload, z32: torch.Tensor, noise: torch.Tensor, *, latents: str) -> dict:
    """QUALITY_METHOD: `out` (the timed path's decode of input set 0) against the fp32 eager reference decode."""
    with torch.inference_mode():
        ref = w.decode(w.reference, (noise, None, z32), noise).float().cpu()
    err = (out - ref).abs()
    return {"quality_psnr_db": psnr_8bit(out, ref), "quality_max_abs_error": float(err.max()),
            "quality_mean_abs_error": float(err.mean()), "quality_latents": latents}


class _EvalImages:
    """cfg.eval_images for --quality: `crops(batch, H, W)`: the first `batch` images (cycled), resized to cover
    H x W (PIL bicubic) and centre-cropped, in [-1, 1]; `ssdd(...)`: their fp32 latent means by the checkpoint's
    encoder; `kl_vae(...)`: by the --kl-vae-checkpoint's encoder (None without one). Each encoded once per size."""

    def __init__(self, cfg: Config, device):
        from ssdd_runtime.api import SSDD
        from ssdd_runtime.io import list_images

        self.model = SSDD.from_pretrained(cfg.checkpoint, device=device, local_files_only=True)
        self.paths = list_images([cfg.eval_images])
        self.cache: dict = {}
        self.kl_vae = None
        if cfg.kl_vae_checkpoint is not None:
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(cfg.kl_vae_checkpoint, local_files_only=True).eval().to(device)
            self.kl_vae = self._kl_vae

    def crops(self, batch: int, H: int, W: int) -> torch.Tensor:
        from ssdd_runtime.io import uint8_to_tensor

        key = ("x", batch, H, W)
        if key not in self.cache:
            self.cache[key] = torch.cat([uint8_to_tensor(np.asarray(_cover_crop(self.paths[i % len(self.paths)], H, W)))
                                         for i in range(batch)])
        return self.cache[key]

    def ssdd(self, batch: int, H: int, W: int) -> torch.Tensor:
        key = ("ssdd", batch, H, W)
        if key not in self.cache:
            self.cache[key] = self.model.encode(self.crops(batch, H, W)).mode().float()
        return self.cache[key]

    def _kl_vae(self, batch: int, H: int, W: int) -> torch.Tensor:
        key = ("kl", batch, H, W)
        if key not in self.cache:
            with torch.inference_mode():
                x = self.crops(batch, H, W).to(self.vae.device)
                self.cache[key] = self.vae.encode(x).latent_dist.mode().float()
        return self.cache[key]


def _cover_crop(path, H: int, W: int):
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
    scale = max(H / im.height, W / im.width)
    im = im.resize((max(W, round(im.width * scale)), max(H, round(im.height * scale))), Image.BICUBIC)
    left, top = (im.width - W) // 2, (im.height - H) // 2
    return im.crop((left, top, left + W, top + H))


def result_row(model: str, label: str, backend: str, dtype: str, device, batch: int, height: int, width: int,
               steps: int, m: Measurement, *, memory_format: str = "contiguous", prepare_s: float | None = None,
               memory_kind: str = "unavailable", weights: str = "random", params: int | None = None,
               notes: list[str] | None = None, **extra) -> dict:
    """One `results` row of the schema from a Measurement (every benchmark builds its rows here)."""
    lat = m.latency_ms()
    return {"model": model, "label": label, "backend": backend, "dtype": dtype, "device": str(device),
            "batch": batch, "height": height, "width": width, "steps": steps, "memory_format": memory_format,
            "images_per_s": batch / (lat["p50"] / 1000), "latency_ms": lat, "repeats": len(m.times_s),
            "warmup": len(m.warmup_s), "warmup_s": m.warmup_s, "prepare_s": prepare_s,
            "peak_memory_mb": m.peak_memory_mb, "memory_kind": memory_kind, "weights": weights, "params": params,
            "notes": list(notes or []), "times_ms": [t * 1000 for t in m.times_s], **extra}


def _decode_call(w: Workload, run, sets) -> Callable[[int], object]:
    def call(i: int):
        ins, noise = sets[i % len(sets)]
        return w.decode(run, ins, noise)

    return call


def _cl(a: torch.Tensor) -> torch.Tensor:
    return a.contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a


def _label(model: str, steps: int) -> str:
    return f"{model}@{steps}" if model.startswith(SSDD_PREFIX) else model


def ratios(results: list[dict]) -> list[dict]:
    """SSDD images/s over KL-VAE images/s for every group timed together (same backend/dtype/batch/size)."""
    out = []
    key = lambda r: (r["backend"], r["dtype"], r["batch"], r["height"], r["width"], r["memory_format"])  # noqa: E731
    base = {key(r): r for r in results if r["model"] == KL_VAE}
    for r in results:
        if not r["model"].startswith(SSDD_PREFIX) or key(r) not in base:
            continue
        b = base[key(r)]
        out.append({"ssdd": r["label"], "baseline": KL_VAE, "backend": r["backend"], "dtype": r["dtype"],
                    "batch": r["batch"], "height": r["height"], "width": r["width"],
                    "memory_format": r["memory_format"],
                    "ratio_images_per_s": r["images_per_s"] / b["images_per_s"]})
    return out


# -- achieved FLOP rate against the CPU's peak ----------------------------------------------------------------

PEAK_FORMULA = ("peak GFLOP/s = cores x 2 FMA pipes x fp32 lanes (16 with AVX-512, 8 with AVX2+FMA) x 2 flop per FMA "
                "x clock GHz; "
                "bf16 peak = 2 x that where the CPU has avx512_bf16 (VDPBF16PS: 2 bf16 products per fp32 lane); "
                "cores = min(threads used, physical cores); clock = lscpu 'CPU max MHz' if reported, else the "
                "/proc/cpuinfo 'cpu MHz' (nominal: boost clocks above it make the fraction an upper bound)")


def lscpu() -> dict:
    """Model name, flags, cores and clock from `lscpu` (falling back to /proc/cpuinfo)."""
    fields: dict[str, str] = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}
    except (OSError, subprocess.SubprocessError):
        pass
    cpuinfo_mhz = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
        m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)
        cpuinfo_mhz = float(m.group(1)) if m else None
        if "Flags" not in fields:
            m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
            fields["Flags"] = m.group(1) if m else ""
    except OSError:
        pass
    cores = None
    if fields.get("Core(s) per socket", "").isdigit() and fields.get("Socket(s)", "").isdigit():
        cores = int(fields["Core(s) per socket"]) * int(fields["Socket(s)"])
    max_mhz = fields.get("CPU max MHz")
    return {"model_name": fields.get("Model name"), "flags": fields.get("Flags", "").split(),
            "physical_cores": cores, "threads_per_core": fields.get("Thread(s) per core"),
            "cpu_max_mhz": float(max_mhz) if max_mhz else None, "cpuinfo_mhz": cpuinfo_mhz}


def cpu_peak(threads: int, info: dict) -> dict:
    """The CPU's fp32 and bf16 peak GFLOP/s for `threads` threads (PEAK_FORMULA)."""
    mhz = info.get("cpu_max_mhz") or info.get("cpuinfo_mhz")
    cores = min(threads, info.get("physical_cores") or threads)
    flags = set(info.get("flags") or [])
    lanes = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else None
    if mhz is None or lanes is None:
        return {"formula": PEAK_FORMULA, "fp32_gflops": None, "bf16_gflops": None,
                "note": "no clock reading or neither AVX-512 nor AVX2+FMA: peak not computed"}
    fp32 = cores * 2 * lanes * 2 * mhz / 1000
    return {"formula": PEAK_FORMULA, "cores": cores, "clock_ghz": mhz / 1000, "fp32_lanes": lanes,
            "clock_source": "lscpu CPU max MHz" if info.get("cpu_max_mhz") else "/proc/cpuinfo cpu MHz",
            "fp32_gflops": fp32, "bf16_gflops": 2 * fp32 if "avx512_bf16" in flags else fp32}


def add_flop_rate(row: dict, w: Workload, peak: dict) -> None:
    """gflop, gflops_achieved and peak_fraction on a CPU result row."""
    row["gflop"] = gflop(w, row["batch"], row["height"], row["width"])
    row["gflops_achieved"] = row["gflop"] / (row["latency_ms"]["p50"] / 1000)
    ref = peak.get("bf16_gflops" if row["dtype"] == "bf16" else "fp32_gflops")
    row["peak_fraction"] = row["gflops_achieved"] / ref if ref else None


# -- --quick -----------------------------------------------------------------------------------------------------


def quick_backends(device: torch.device = torch.device("cpu")) -> list[str]:
    """The fastest available CPU backend (`backends.CPU_BACKENDS` order) and eager, the cross-backend baseline."""
    best = next(b for b in bk.CPU_BACKENDS if bk.unavailable_reason(b, device) is None)  # eager always is
    return [best] if best == "eager" else [best, "eager"]


def quick_summary(report: dict) -> list[str]:
    """The two --quick ratios per SSDD result on the fastest backend: vs the KL-VAE on the same backend and
    precision, and vs the KL-VAE in eager PyTorch fp32 (the diffusers baseline as users run it)."""
    rows = [r for r in report["results"] if r.get("task", "decode") == "decode"]
    kl = {(r["backend"], r["dtype"], r["batch"], r["height"], r["width"]): r for r in rows if r["model"] == KL_VAE}
    only_eager = {r["backend"] for r in rows} == {"eager"}
    lines = []
    for r in rows:
        if not r["model"].startswith(SSDD_PREFIX) or (r["backend"] == "eager" and not only_eager):
            continue
        shape = (r["batch"], r["height"], r["width"])
        same = kl.get((r["backend"], r["dtype"], *shape))
        eager = kl.get(("eager", "fp32", *shape))
        where = f"{r['label']} on {r['backend']} {r['dtype']}, batch {r['batch']} {r['height']}x{r['width']}"
        for name, base in ((f"the KL-VAE on {r['backend']} {r['dtype']} (same backend)", same),
                           ("the KL-VAE in eager PyTorch fp32", eager)):
            if base is not None:
                lines.append(f"{where}: {r['images_per_s'] / base['images_per_s']:.2f}x the images/s of {name}")
    return lines


def load_warning(cpu_count: int | None = None) -> str | None:
    """A warning line when the 1-minute load average is above the core count (timings then unreliable)."""
    n = cpu_count or os.cpu_count() or 1
    load = os.getloadavg()[0]
    if load <= n:
        return None
    return (f"warning: load average {load:.1f} is above the {n} cores: other processes share the CPU, so these "
            "timings are unreliable (the interleaved ratios less so)")


def _shape(r: dict) -> tuple:
    return r["batch"], r["height"], r["width"], r["memory_format"]


def cross_ratios(results: list[dict]) -> list[dict]:
    """SSDD images/s on every backend over the KL-VAE's in eager PyTorch fp32 at the same batch and size: the
    cross-backend ratio (the diffusers baseline as users run it)."""
    base = {_shape(r): r for r in results if r["model"] == KL_VAE and r["backend"] == "eager" and r["dtype"] == "fp32"}
    return [{"ssdd": r["label"], "backend": r["backend"], "dtype": r["dtype"], "batch": r["batch"],
             "height": r["height"], "width": r["width"], "baseline": f"{KL_VAE} eager fp32",
             "ratio_images_per_s": r["images_per_s"] / base[_shape(r)]["images_per_s"]}
            for r in results if r["model"].startswith(SSDD_PREFIX) and _shape(r) in base]


def speedups(results: list[dict]) -> list[dict]:
    """Every row's images/s over the same workload's in eager fp32 at the same batch and size."""
    base = {(r["label"], *_shape(r)): r for r in results if r["backend"] == "eager" and r["dtype"] == "fp32"}
    return [{"label": r["label"], "backend": r["backend"], "dtype": r["dtype"], "batch": r["batch"],
             "height": r["height"], "width": r["width"],
             "speedup": r["images_per_s"] / base[(r["label"], *_shape(r))]["images_per_s"]}
            for r in results if r["backend"] != "eager" and (r["label"], *_shape(r)) in base]


CSV_FIELDS = ["model", "label", "backend", "dtype", "device", "batch", "height", "width", "steps", "memory_format",
              "images_per_s", "p50_ms", "p90_ms", "p99_ms", "peak_memory_mb", "memory_kind", "prepare_s",
              "first_warmup_s", "weights", "quality_psnr_db", "quality_max_abs_error", "quality_mean_abs_error",
              "recon_psnr_db"]


def write_csv(report: dict, path: str) -> None:
    import csv

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        wr = csv.DictWriter(f, fieldnames=CSV_FIELDS + ["device_name", "date_utc"])
        wr.writeheader()
        for r in report["results"]:
            row = {k: r.get(k) for k in CSV_FIELDS}
            row.update(p50_ms=r["latency_ms"]["p50"], p90_ms=r["latency_ms"]["p90"], p99_ms=r["latency_ms"]["p99"],
                       first_warmup_s=r["warmup_s"][0] if r["warmup_s"] else None,
                       device_name=report["env"]["device_name"], date_utc=report["env"]["date_utc"])
            wr.writerow(row)
