"""The one result-JSON schema of every benchmark (`ssdd bench`, gpu_check, export/bench_ort) and its writer.

    {"schema": "ssdd-bench/1",
     "env": {...},          timing.environment(): device, versions, threads, load, date, git commit
     "method": str,         how the numbers were taken (timer, warm-up, repeats, statistic)
     "notes": [str], "skipped": [{"reason": str, "backend"?, "model"?}],
     "results": [row],      one row per (model, backend, dtype, batch, H, W, steps), fields in RESULT below
     "ratios": [...],       SSDD / KL-VAE images/s within one group timed together
     ...}                   extra top-level sections are allowed (gpu_check: "tests", "kernels", "errors")

Rows may carry more fields (times_ms: every timed call; backend_options; max_abs_error_vs_eager). Every
committed file under benchmarks/results/ is checked against this by tests/test_bench.py and by
`python -m ssdd_runtime.benchmarks.report --check`.
"""
from __future__ import annotations

import json
import os

from ssdd_runtime.io import write_text_atomic

SCHEMA = "ssdd-bench/1"
NUMBER = (int, float)
OPTIONAL_NUMBER = (int, float, type(None))
OPTIONAL_STR = (str, type(None))
TOP = {"schema": str, "env": dict, "method": str, "notes": list, "skipped": list, "results": list, "ratios": list}
ENV = {"date_utc": str, "device": str, "device_name": str, "cpu_count": (int, type(None)), "torch_threads": int,
       "loadavg_start": (list, type(None)), "loadavg_end": (list, type(None)), "python": OPTIONAL_STR,
       "platform": OPTIONAL_STR, "torch": str, "cuda": OPTIONAL_STR, "cuda_driver": OPTIONAL_STR,
       "triton": OPTIONAL_STR, "onnxruntime": OPTIONAL_STR, "tensorrt": OPTIONAL_STR, "git_commit": OPTIONAL_STR}
RESULT = {"model": str, "label": str, "backend": str, "dtype": str, "device": str, "batch": int, "height": int,
          "width": int, "steps": int, "memory_format": str, "images_per_s": NUMBER, "latency_ms": dict,
          "repeats": int, "warmup": int, "warmup_s": list, "prepare_s": OPTIONAL_NUMBER,
          "peak_memory_mb": OPTIONAL_NUMBER, "memory_kind": str, "weights": str, "params": (int, type(None)),
          "notes": list}
LATENCY = ("p50", "p90", "p99", "mean", "min", "max")
RATIO = {"ssdd": str, "baseline": str, "backend": str, "dtype": str, "batch": int, "height": int, "width": int,
         "memory_format": str, "ratio_images_per_s": NUMBER}


def problems(report) -> list[str]:
    """Every way `report` departs from the schema (empty list: valid)."""
    if not isinstance(report, dict):
        return [f"a report is a JSON object, got {type(report).__name__}"]
    out = _fields("report", report, TOP)
    if out:
        return out
    if report["schema"] != SCHEMA:
        out.append(f"schema is {report['schema']!r}, expected {SCHEMA!r}")
    out += _fields("env", report["env"], ENV)
    for i, row in enumerate(report["results"]):
        where = f"results[{i}]"
        if not isinstance(row, dict):
            out.append(f"{where} is not an object")
            continue
        out += _fields(where, row, RESULT)
        lat = row.get("latency_ms")
        if not isinstance(lat, dict):
            continue
        bad = [f"{where}.latency_ms.{k} missing or not a number" for k in LATENCY
               if not isinstance(lat.get(k), NUMBER) or isinstance(lat.get(k), bool)]
        out += bad
        if bad:
            continue
        if not lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]:
            out.append(f"{where}.latency_ms is not ordered min <= p50 <= p90 <= p99 <= max")
        if isinstance(row.get("batch"), int) and isinstance(row.get("images_per_s"), NUMBER) and lat["p50"] > 0 \
                and abs(row["images_per_s"] - row["batch"] / (lat["p50"] / 1000)) > 1e-6 * row["images_per_s"]:
            out.append(f"{where}.images_per_s != batch / p50")
    for i, q in enumerate(report["ratios"]):
        out += _fields(f"ratios[{i}]", q, RATIO) if isinstance(q, dict) else [f"ratios[{i}] is not an object"]
    for i, s in enumerate(report["skipped"]):
        if not isinstance(s, dict) or not isinstance(s.get("reason"), str):
            out.append(f"skipped[{i}] needs a string 'reason'")
    return out


def check(report, name: str = "report") -> dict:
    """ValueError listing the problems unless `report` is valid; returns it."""
    bad = problems(report)
    if bad:
        raise ValueError(f"{name} does not follow {SCHEMA}: " + "; ".join(bad[:10]))
    return report


def _fields(where: str, obj: dict, spec: dict) -> list[str]:
    out = []
    for key, typ in spec.items():
        if key not in obj:
            out.append(f"{where}.{key} missing")
        elif not isinstance(obj[key], typ) or (isinstance(obj[key], bool) and bool not in _tuple(typ)):
            out.append(f"{where}.{key} has type {type(obj[key]).__name__}")
    return out


def _tuple(typ) -> tuple:
    return typ if isinstance(typ, tuple) else (typ,)


def other_kind(kind: str, env: dict, method: str, data: dict, notes=(), skipped=()) -> dict:
    """A valid report for a benchmark that has no decode rows (tokenize throughput, tiled-decode memory, AOT
    compile report): `results`/`ratios` stay empty and the benchmark's own rows go under `data`, named by `kind`."""
    return {"schema": SCHEMA, "kind": kind, "env": env, "method": method, "notes": list(notes),
            "skipped": list(skipped), "results": [], "ratios": [], "data": data}


def write_json(report: dict, path, *, validate: bool = True) -> None:
    """Write the report (checked first) to a temporary name in the target folder, then rename it into place."""
    if validate:
        check(report, str(path))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, json.dumps(report, indent=1, default=str) + "\n")
