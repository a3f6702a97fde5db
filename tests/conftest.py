import json
import os
from pathlib import Path

import pytest
import torch

# Triton runs as its interpreter on machines without a GPU (the kernel tests rely on it); this must be set
# before triton is first imported, which conftest precedes.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DATA = Path(__file__).parent / "data"
GOLDEN_CASES = ["S_f8c4_64_b1", "S_f8c4_128_b2", "S_f16c4_128_b1", "M_f8c4_128_b1"]


def load_golden(case: str):
    """(tensors, config) of a golden reference case computed by the official implementation."""
    from safetensors import safe_open

    with safe_open(str(DATA / "golden" / f"{case}.safetensors"), "pt") as f:
        cfg = json.loads(f.metadata()["config"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, cfg


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def make_checkpoint(checkpoint_dir):
    """Write the deterministic test weights of (encoder, decoder, seed) as an official-format .safetensors."""
    from safetensors.torch import save_file

    from ssdd_runtime.testing import test_state_dict

    def make(encoder="f8c4", decoder="S", seed=0) -> Path:
        path = checkpoint_dir / f"{encoder}_{decoder}_{seed}.safetensors"
        if not path.exists():
            save_file(test_state_dict(encoder, decoder, seed), str(path), metadata={"format": "pt"})
        return path

    return make


@pytest.fixture(scope="session")
def s_model(make_checkpoint):
    from ssdd_runtime import SSDD

    return SSDD.from_pretrained(make_checkpoint("f8c4", "S", 0))


def assert_close(out, ref, *, atol, rtol_l2=None, name="output"):
    """Max-abs (and optionally relative-L2) comparison that prints the first mismatches on failure."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = (out - ref).abs()
    rel = (err.norm() / ref.norm().clamp_min(1e-30)).item()
    bad = (err > atol).nonzero()[:5].tolist()
    msg = f"{name}: max abs {err.max().item():.3e} (atol {atol}), rel L2 {rel:.3e}; first mismatches at {bad}"
    assert err.max().item() <= atol, msg
    if rtol_l2 is not None:
        assert rel <= rtol_l2, msg


def pytest_configure(config):
    # OpenVINO's CPU plugin keeps native worker threads alive in the process; a later fork (DataLoader workers)
    # then crashes the whole pytest process (reproduced: test_bench's OpenVINO tests followed by test_data's
    # 2-worker DataLoader -> SIGSEGV). `make test` therefore runs the tests marked `openvino` in a second process.
    config.addinivalue_line("markers", "openvino: loads OpenVINO in-process (run apart: make test does)")
    # torchvision-based metric libraries (torch-fidelity, lpips) need torch 2.14.1 + torchvision 0.29.1, which
    # cannot share the main venv's torch 2.13.0: `make test` runs these in .venv-eval (Makefile), apart.
    config.addinivalue_line("markers", "eval: needs the eval extra (torchvision, torch-fidelity, lpips): .venv-eval")
