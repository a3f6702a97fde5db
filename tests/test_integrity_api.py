"""Issue 20, library and export half: no silently wrong image from a damaged file or cache, no file written
outside the folder asked for, and specific messages for misuse of the library API. SSDD-S f8c4 test weights,
32x32 images (4x4 latents), CPU."""
from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def model(s_model):  # conftest: SSDD-S f8c4 with the deterministic test weights (shared: never mutated here)
    return s_model


def z4(b=1, seed=0):
    return torch.randn(b, 4, 4, 4, generator=torch.Generator().manual_seed(seed))


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ssdd_runtime", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# Found 1: strict loading of a saved SSDDVAE (diffusers) folder


@pytest.fixture(scope="module")
def vae_folder(model, tmp_path_factory):
    pytest.importorskip("diffusers", reason="diffusers not installed (pip install 'ssdd-runtime[diffusers]')")
    from ssdd_runtime.integrations.diffusers import SSDDVAE

    folder = tmp_path_factory.mktemp("vae") / "saved"
    SSDDVAE.from_model(copy.deepcopy(model), sample_size=32).save_pretrained(folder)
    return folder


def _damaged_copy(vae_folder, tmp_path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "vae"
    shutil.copytree(vae_folder, folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    edit(sd)
    save_file(sd, weights, metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("key", ["ssdd.decoder.down_blocks.1.resnets.0.norm1.ctx_proj.bias",
                                 "ssdd.decoder.conv_in.weight"])
def test_diffusers_folder_missing_weight_is_refused(vae_folder, tmp_path, key):
    from ssdd_runtime.integrations.diffusers import SSDDVAE

    folder = _damaged_copy(vae_folder, tmp_path, lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match=rf"1 missing keys: {key.replace('.', '[.]')}"):
        SSDDVAE.from_pretrained(folder)


def test_diffusers_folder_extra_weight_is_refused(vae_folder, tmp_path):
    from ssdd_runtime.integrations.diffusers import SSDDVAE

    folder = _damaged_copy(vae_folder, tmp_path, lambda sd: sd.update({"ssdd.decoder.extra": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"1 unexpected keys: ssdd\.decoder\.extra"):
        SSDDVAE.from_pretrained(folder)


def test_diffusers_folder_intact_loads_exactly(vae_folder, model):
    from ssdd_runtime.integrations.diffusers import SSDDVAE

    vae = SSDDVAE.from_pretrained(vae_folder)
    z = z4()
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(vae.decode(z, noise=noise).sample, model.decode(z, noise=noise), rtol=0, atol=0)


def test_diffusers_folder_without_weights_names_the_file(vae_folder, tmp_path):
    from ssdd_runtime.integrations.diffusers import SSDDVAE

    folder = tmp_path / "vae"
    shutil.copytree(vae_folder, folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors not found") as e:
        SSDDVAE.from_pretrained(folder)
    assert ".bin" not in str(e.value) and "unsafe" not in str(e.value)
