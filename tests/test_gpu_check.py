"""benchmarks/gpu_check.sh and gpu_check.py without a GPU: the whole script under --cpu-smoke writes one JSON in the
result schema; a failing section or a test run past its timeout still leaves the JSON; the official-style dense
mask equals the reference bias; and every torch API the GPU check runs exists in torch 2.11 (the lent machine's
torch), checked statically against a documented list."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssdd_runtime.benchmarks import gpu_check, schema
from ssdd_runtime.kernels import attention

ROOT = Path(__file__).resolve().parent.parent

# torch attribute paths known to exist in torch 2.11 (the lent machine: torch 2.11, triton 3.6, Python 3.12). All
# are older than 2.5 except torch.compiler.is_exporting (2.6: pytorch/pytorch#142425, in the 2.7 API docs); the
# others' newest are torch.library.custom_op (2.4; its `.register_fake` method too) and torch.compile (2.0). `torch.utils.collect_env.get_env_info()` fields read: cpu_info, python_platform, os,
# nvidia_driver_version (all present since torch 2.1). Add a path here only after checking it in torch 2.11.
TORCH_2_11_API = frozenset("""
torch torch.Generator torch.Size torch.Tensor torch.__version__ torch.addcmul torch.arange
torch.backends.cuda.matmul.allow_tf32 torch.backends.cudnn.allow_tf32 torch.backends.cudnn.version torch.bfloat16
torch.cat torch.channels_last torch.compile torch.compiler.is_exporting torch.cos torch.from_numpy torch.cuda.CUDAGraph torch.cuda.Event torch.cuda.Stream
torch.cuda.current_stream torch.cuda.empty_cache torch.cuda.get_device_name torch.cuda.graph torch.cuda.is_available
torch.cuda.max_memory_allocated torch.cuda.memory_allocated torch.cuda.reset_peak_memory_stats torch.cuda.stream
torch.cuda.synchronize torch.device torch.dtype torch.contiguous_format torch.empty torch.empty_like torch.empty_strided torch.exp torch.float16 torch.float32
torch.full torch.full_like torch.get_num_threads torch.set_num_threads torch.inference_mode torch.isfinite
torch.library.custom_op torch.linspace torch.manual_seed torch.meshgrid torch.nn torch.nn.Conv2d torch.nn.GroupNorm
torch.nn.LayerNorm torch.nn.Linear torch.nn.Module torch.nn.ModuleList torch.nn.Parameter torch.nn.Sequential
torch.nn.SiLU torch.nn.functional torch.nn.functional.gelu torch.nn.functional.group_norm
torch.nn.functional.interpolate torch.nn.functional.layer_norm torch.nn.functional.pad
torch.nn.functional.scaled_dot_product_attention torch.nn.functional.silu torch.no_grad torch.ones torch.rand torch.randn
torch.sin torch.tensor torch.utils.collect_env torch.utils.collect_env.get_env_info torch.version.cuda torch.utils.flop_counter.FlopCounterMode torch.where
torch.zeros torch.zeros_like
""".split())

# What the GPU check runs on the lent machine: the script, the benchmark code it drives, the model and kernels.
GPU_CHECK_SOURCES = [*(ROOT / "benchmarks" / f"{n}.py" for n in ("gpu_check", "timing", "schema", "run", "backends",
                                                                  "workloads")),
                     *sorted((ROOT / "kernels").glob("*.py")),
                     *(ROOT / "ssdd_runtime" / f"{n}.py" for n in ("api", "model", "optimize", "sampler", "testing",
                                                                    "weights"))]


def torch_paths(source: str) -> set[str]:
    """Every dotted torch path a module names: imports (`import torch.nn.functional as F`, `from torch import
    nn`) and the longest attribute chain on each alias (`F.scaled_dot_product_attention`). Methods of tensors
    and of returned objects are not seen (a static limit)."""
    tree = ast.parse(source)
    alias: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch" or a.name.startswith("torch."):
                    alias[a.asname or "torch"] = a.name if a.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"
    found = set(alias.values())
    inner: set[int] = set()
    for node in ast.walk(tree):  # outer attributes come first in ast.walk's breadth-first order
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue
        parts, n = [], node
        while isinstance(n, ast.Attribute):
            parts.append(n.attr)
            inner.add(id(n))
            n = n.value
        if isinstance(n, ast.Name) and n.id in alias:
            found.add(".".join([alias[n.id], *reversed(parts)]))
    return found


def test_gpu_check_uses_only_torch_2_11_apis():
    used = set()
    for path in GPU_CHECK_SOURCES:
        used |= torch_paths(path.read_text(encoding="utf-8"))
    assert "torch.nn.functional.scaled_dot_product_attention" in used and "torch.library.custom_op" in used
    unknown = sorted(used - TORCH_2_11_API)
    assert not unknown, f"torch APIs not on the torch 2.11 list (check them in 2.11, then add): {unknown}"


def test_torch_api_list_names_real_apis():
    """Guards the list against typos: every entry resolves in the installed torch."""
    import importlib

    for path in sorted(TORCH_2_11_API):
        parts = path.split(".")
        obj = importlib.import_module(parts[0])
        for i, name in enumerate(parts[1:], 1):
            try:
                obj = getattr(obj, name)
            except AttributeError:
                obj = importlib.import_module(".".join(parts[:i + 1]))
    from torch.utils import collect_env

    assert {"cpu_info", "python_platform", "os", "nvidia_driver_version"} <= set(collect_env.SystemEnv._fields)


def test_gpu_check_sh_cpu_smoke_writes_one_schema_json(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("gpu_check_smoke_*.json")
    rep = json.loads(path.read_text())
    assert schema.problems(rep) == [] and rep["errors"] == {} and rep["smoke"] is True
    assert rep["tests"]["returncode"] == 0 and "passed" in rep["tests"]["summary"]
    (att8, att9) = rep["kernels"]["attention"]
    assert att8["grid"] == [8, 8] and att8["max_abs_diff_triton_vs_official"] < 0.05  # bf16
    assert att9["ms_official_dense_mask_built_per_call"] > 0 and len(rep["kernels"]["norms"]) == 5
    models = {r["model"] for r in rep["results"]}
    assert "ssdd-XS" in models and all(r["dtype"] == "bf16" for r in rep["results"])
    try:
        import diffusers  # noqa: F401
    except ImportError:
        assert any(s["reason"].startswith("skipped: diffusers not installed") for s in rep["skipped"])
    else:
        assert "kl-vae" in models and len(rep["ratios"]) == 1


def test_a_failing_section_still_writes_the_json(tmp_path, monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("--cpu-smoke needs TRITON_INTERPRET=1 (conftest sets it where there is no GPU)")

    def broken(*args):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(gpu_check, "attention_bench", broken)
    monkeypatch.setattr(gpu_check, "norm_bench", lambda *a: [])
    monkeypatch.setattr(gpu_check, "decode_bench", lambda *a: None)
    assert gpu_check.main(["--cpu-smoke", "--skip-tests", "--out", str(tmp_path)]) == 1
    (path,) = tmp_path.glob("*.json")
    rep = json.loads(path.read_text())
    assert rep["errors"]["attention"].startswith("RuntimeError: planted failure")
    assert schema.problems(rep) == [] and rep["kernels"] == {"norms": []}


def test_run_tests_timeout_is_reported_not_raised():
    out = gpu_check.run_tests("cpu", smoke=True, timeout_s=0.01)
    assert out["returncode"] is None and out["error"].startswith("timed out after")


@pytest.mark.parametrize("G", [8, 9, 16])
def test_official_dense_mask_is_the_reference_bias(G):
    table = torch.randn(15, 15, 3, generator=torch.Generator().manual_seed(G))
    mask = gpu_check.official_dense_mask(table, G, batch=2)
    assert mask.shape == (2, 3, G * G, G * G)
    torch.testing.assert_close(mask[1], attention.relative_position_bias(table, (G, G)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="G >= 8"):
        gpu_check.official_dense_mask(table, 7, batch=1)
