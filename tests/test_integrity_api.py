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


# ---------------------------------------------------------------------------------------------------------
# Found 8, 9: export triton-repo confines the model folder and checks the graph (the check trtexec-cmd shares)


@pytest.fixture(scope="module")
def decoder_onnx(model, tmp_path_factory):
    pytest.importorskip("onnx", reason="onnx not installed (pip install 'ssdd-runtime[onnx]')")
    from ssdd_runtime.export.onnx import export_onnx

    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "decoder.onnx", part="decoder", steps=1)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("name", ["../escape", "a/b"])
def test_cli_triton_repo_refuses_bad_model_names(decoder_onnx, tmp_path, name):
    work = tmp_path / "work"
    work.mkdir()
    proc = run_cli("export", "triton-repo", "--onnx", decoder_onnx, "--repo", work / "repo", "--name", name,
                   cwd=work)
    assert "invalid Triton model name" in one_line_error(proc)
    assert _files(tmp_path) == ["work"], "nothing may be written, inside or outside --repo"


def test_cli_triton_repo_good_name_stays_inside_repo(decoder_onnx, tmp_path):
    proc = run_cli("export", "triton-repo", "--onnx", decoder_onnx, "--repo", tmp_path / "repo", "--name", "m_1")
    assert proc.returncode == 0, proc.stderr
    assert _files(tmp_path) == ["repo", "repo/m_1", "repo/m_1/1", "repo/m_1/1/model.onnx", "repo/m_1/config.pbtxt"]


@pytest.mark.parametrize("content, target", [(b"this is not a graph\n", "triton-repo"), (b"", "triton-repo"),
                                             (b"\x08\x07", "trtexec-cmd")])
def test_cli_export_refuses_a_file_that_is_not_an_exported_graph(tmp_path, content, target):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(content)
    if target == "triton-repo":
        args = ["--repo", tmp_path / "repo"]
    else:
        args = ["--engine", tmp_path / "e.plan", "--min-shape", "1x32x32", "--opt-shape", "1x32x32",
                "--max-shape", "1x32x32"]
    proc = run_cli("export", target, "--onnx", bad, *args)
    line = one_line_error(proc)
    assert str(bad) in line and ("not an ONNX model" in line or "not an exported SSDD graph" in line
                                 or "no ssdd.* metadata" in line), line
    assert _files(tmp_path) == ["model.onnx"]


def test_triton_repo_library_refuses_bad_name_and_bad_graph(decoder_onnx, tmp_path):
    from ssdd_runtime.export.triton_repo import write_triton_repo

    for name in ("../up", "..", ".", ".hidden", "a\\b", "x/y"):
        with pytest.raises(ValueError, match="invalid Triton model name"):
            write_triton_repo(tmp_path / "repo", onnx_path=decoder_onnx, name=name)
    with pytest.raises(ValueError, match="non-empty"):
        write_triton_repo(tmp_path / "repo", onnx_path=decoder_onnx, name="")
    text = tmp_path / "notes.onnx"
    text.write_text("hello")
    with pytest.raises(ValueError, match="is not an ONNX model"):
        write_triton_repo(tmp_path / "repo", onnx_path=text, name="m")
    assert not (tmp_path / "repo").exists() and not (tmp_path / "up").exists()


# ---------------------------------------------------------------------------------------------------------
# Found 10: the OpenVINO cache is verified against recorded sha256 digests before use


@pytest.fixture(scope="module")
def eov():
    pytest.importorskip("openvino", reason="needs the openvino extra: pip install 'ssdd-runtime[openvino]'")
    from ssdd_runtime.export import openvino as eov

    return eov


def _ov_decode(eov, model, cache_dir, **kw):
    ov = eov.to_openvino(model, threads=1, cache_dir=cache_dir, **kw)
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return ov.decode(z4(), noise=noise), model.decode(z4(), noise=noise)


def _zero_mib(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2 - (1 << 19))
        f.write(bytes(min(1 << 20, size)))
    assert path.stat().st_size == size


@pytest.fixture(scope="module")
def ov_cache(eov, model, tmp_path_factory):
    """A complete OpenVINO cache (both IRs, the decoder's compiled blob); tests damage copies of it."""
    cache = tmp_path_factory.mktemp("ov") / "cache"
    out, ref = _ov_decode(eov, model, cache)
    assert (out - ref).abs().max() < 1e-4
    return cache


def _cache_copy(ov_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(ov_cache, cache)
    ir = sorted((cache / "ir").glob("decoder-*.xml"))[0]
    blobs = [f for f in (cache / "compiled").rglob("*") if f.is_file() and f.parent.name.startswith(ir.stem)]
    assert blobs, "the first compile left a blob"
    return cache, ir, blobs


@pytest.mark.openvino
@pytest.mark.parametrize("damage", ["IR .bin", "compiled blob"])
def test_openvino_cache_with_zeroed_mib_is_rebuilt_with_a_warning(eov, model, ov_cache, tmp_path, damage):
    """The issue's repro: 1 MiB zeroed inside a cached file, size kept, decoded max diff 0.52 before."""
    cache, ir, blobs = _cache_copy(ov_cache, tmp_path)
    _zero_mib(ir.with_suffix(".bin") if damage == "IR .bin" else max(blobs, key=lambda f: f.stat().st_size))
    with pytest.warns(RuntimeWarning, match="OpenVINO cache: the .* is rebuilt because .* does not match its "
                                            "recorded sha256"):
        out, ref = _ov_decode(eov, model, cache)
    assert (out - ref).abs().max() < 1e-4, f"decoded from a damaged cache ({damage})"
    assert eov.verified_cache(ir.with_suffix(".sha256"), [ir, ir.with_suffix(".bin")]) is None


@pytest.mark.openvino
@pytest.mark.parametrize("damage, why", [("truncate .xml", "does not match"), ("truncate .bin", "does not match"),
                                         ("another OpenVINO", "written by OpenVINO 2000.0.0"),
                                         ("no record", "sha256 record.*missing"),
                                         ("garbled record", "unreadable")])
def test_openvino_cache_entry_that_fails_verification_is_removed(eov, ov_cache, tmp_path, damage, why):
    cache, ir, blobs = _cache_copy(ov_cache, tmp_path)
    record = ir.with_suffix(".sha256")
    if damage.startswith("truncate"):
        victim = ir.with_suffix(damage[-4:])
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 3)
    elif damage == "another OpenVINO":
        record.write_text(record.read_text().replace(f'"{eov._require_openvino().__version__}"', '"2000.0.0"'))
    elif damage == "no record":
        record.unlink()
    else:
        record.write_text("{not json")
    with pytest.warns(RuntimeWarning, match=why):
        assert eov._cached_ir(ir) is False
    assert not ir.exists() and not ir.with_suffix(".bin").exists() and not record.exists()
    assert not any(b.exists() for b in blobs), "blobs compiled from a damaged IR go with it"
    assert eov._cached_ir(sorted((cache / "ir").glob("encoder-*.xml"))[0]) is True  # the intact part stays


# ---------------------------------------------------------------------------------------------------------
# Weak messages: library API (SSDD, shared with the OpenVINO/TensorRT runners through checks.py)


def test_decode_accepts_numpy_integers_for_tile_as_for_steps(model):
    z = z4()
    ref = model.decode(z, steps=2, tile=4, generator=torch.Generator().manual_seed(0))
    out = model.decode(z, steps=np.int64(2), tile=np.int64(4), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for bad in (True, 4.0, np.float32(4), 0, -2):
        with pytest.raises(ValueError, match="tile must be a positive integer"):
            model.decode(z, tile=bad)


def test_decode_tile_larger_than_the_latent_is_the_untiled_decode(model):
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model.decode(z4(), noise=noise, tile=64), model.decode(z4(), noise=noise),
                               rtol=0, atol=1e-5)


def test_decode_refuses_noise_with_generator(model):
    noise = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="pass noise= or generator=, not both"):
        model.decode(z4(), noise=noise, generator=torch.Generator().manual_seed(0))


def test_encode_warns_on_images_outside_minus_one_one(model):
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255
    with pytest.warns(UserWarning, match=r"images must be in \[-1, 1\], got values in .*0\.\.255") as record:
        model.encode(img)
    assert record[0].filename == __file__, "the warning points at the caller's line"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.encode(img / 127.5 - 1)  # in range: silent


# ---------------------------------------------------------------------------------------------------------
# Weak messages: SSDDVAE


@pytest.fixture(scope="module")
def vae(model):
    pytest.importorskip("diffusers", reason="diffusers not installed (pip install 'ssdd-runtime[diffusers]')")
    from ssdd_runtime.integrations.diffusers import SSDDVAE

    return SSDDVAE.from_model(copy.deepcopy(model), sample_size=32)


def test_vae_decode_of_a_numpy_array_names_the_type(vae):
    with pytest.raises(TypeError, match="latents must be a torch.Tensor .*numpy.ndarray"):
        vae.decode(z4().numpy())


@pytest.mark.parametrize("kw, match", [
    (dict(shift_factor=float("nan")), "shift_factor must be a finite number"),
    (dict(shift_factor=float("inf")), "shift_factor must be a finite number"),
    (dict(t_pow_shift=float("nan")), "t_pow_shift must be a finite number"),
    (dict(t_pow_shift=-1.0), "must be positive"),
    (dict(latents_mean=[0, float("nan"), 0, 0], latents_std=[1, 1, 1, 1]), "latents_mean must hold finite"),
    (dict(latents_mean=[0, 0, 0, 0], latents_std=[1, float("inf"), 1, 1]), "latents_std must hold finite"),
    (dict(sample_size=0), "sample_size must be a positive integer"),
    (dict(sample_size=32.5), "sample_size must be a positive integer"),
])
def test_vae_from_model_refuses_non_finite_or_empty_config(model, kw, match):
    from ssdd_runtime.integrations.diffusers import SSDDVAE

    with pytest.raises(ValueError, match=match):
        SSDDVAE.from_model(model, **kw)


def test_vae_from_model_keeps_numpy_numbers_json_plain(model, tmp_path):
    from ssdd_runtime.integrations.diffusers import SSDDVAE

    vae = SSDDVAE.from_model(copy.deepcopy(model), sample_size=np.int64(32), t_pow_shift=np.float32(2.0))
    vae.save_pretrained(tmp_path / "v")
    assert SSDDVAE.from_pretrained(tmp_path / "v").config.sample_size == 32


def test_vae_corrupt_latent_stats_names_the_file(model, tmp_path):
    from ssdd_runtime.integrations.diffusers import SSDDVAE

    stats = tmp_path / "stats.json"
    stats.write_text('{"scaling_factor": 0.5, ')
    with pytest.raises(ValueError, match=f"latent_stats {stats} is not a JSON file"):
        SSDDVAE.from_model(model, latent_stats=stats)


def test_vae_save_pretrained_onto_a_file_is_an_error(vae, tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me")
    with pytest.raises(FileExistsError, match="is an existing file"):
        vae.save_pretrained(target)
    assert target.read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------------
# Weak messages: checkpoint files and the Hub


def test_empty_hub_filename_says_it_is_empty(tmp_path):
    from ssdd_runtime import SSDD

    for source in ("facebook/SSDD", tmp_path):
        with pytest.raises(ValueError, match="filename is empty"):
            SSDD.from_pretrained(source, "", local_files_only=True)


@pytest.mark.parametrize("kind, match", [("symlink loop", "is a symlink loop"), ("fifo", r"is a FIFO"),
                                         ("/dev/null", "is a character device"),
                                         ("broken symlink", "is a broken symlink")])
def test_checkpoint_that_is_no_regular_file_says_what_it_is(tmp_path, kind, match):
    import os

    from ssdd_runtime import SSDD
    from ssdd_runtime.weights import read_state_dict

    path = tmp_path / "ckpt.safetensors"
    if kind == "symlink loop":
        path.symlink_to(path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "broken symlink":
        path.symlink_to(tmp_path / "gone.safetensors")
    else:
        path = Path("/dev/null")
    for load in (lambda: SSDD.from_pretrained(path), lambda: SSDD.from_pretrained(path.parent, path.name),
                 lambda: read_state_dict(path)):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            load()


# ---------------------------------------------------------------------------------------------------------
# Weak messages: export


def test_cli_export_onnx_decoder_refuses_optimum_names(tmp_path):
    proc = run_cli("export", "onnx", "--checkpoint", tmp_path / "never-read.safetensors", "--part", "decoder",
                   "--names", "optimum", "-o", tmp_path / "d.onnx")
    assert "names='optimum' renames the encoder graph only" in one_line_error(proc)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.openvino
def test_openvino_decode_tile_is_a_clear_error_not_a_type_error(eov, model, ov_cache):
    ov = eov.to_openvino(model, threads=1, cache_dir=ov_cache)
    with pytest.raises(ValueError, match="tile=4: the OpenVINO backend decodes whole images"):
        ov.decode(z4(), tile=4)
    assert ov.decode(z4(), tile=None, generator=torch.Generator().manual_seed(0)).shape == (1, 3, 32, 32)


# ---------------------------------------------------------------------------------------------------------
# Adversarial pass (cases beyond the list)


def test_numpy_integers_accepted_for_batch_size_and_vae_options(model):
    from ssdd_runtime.integrations.diffusers import SSDDVAE

    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ref = model.decode(z4(2), noise=noise)
    torch.testing.assert_close(model.decode(z4(2), noise=noise, batch_size=np.int64(1)), ref, rtol=0, atol=1e-5)
    assert model.encode(torch.zeros(2, 3, 32, 32), batch_size=np.int32(1)).mean.shape == (2, 4, 4, 4)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        model.decode(z4(), batch_size=1.0)
    vae = SSDDVAE.from_model(copy.deepcopy(model), sample_size=32, decode_steps=np.int64(2), noise_seed=np.int64(5))
    assert type(vae.config.decode_steps) is int and type(vae.config.noise_seed) is int
    vae.enable_tiling(np.int64(2))
    assert vae.tile_latent_size == 2
    for bad in (True, 2.5, 0):
        with pytest.raises(ValueError, match="tile_latent_size must be a positive integer"):
            vae.enable_tiling(bad)


def test_cli_export_onnx_refuses_to_overwrite_its_checkpoint(make_checkpoint, tmp_path):
    ckpt = tmp_path / "weights.safetensors"
    shutil.copyfile(make_checkpoint("f8c4", "S", 0), ckpt)
    before = ckpt.read_bytes()
    proc = run_cli("export", "onnx", "--checkpoint", ckpt, "-o", ckpt, "--no-verify")
    assert "is one of the inputs; refusing to overwrite it" in one_line_error(proc)
    assert ckpt.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]


def test_diffusers_folder_whose_config_names_another_size_says_so(vae_folder, tmp_path):
    import json

    from ssdd_runtime.integrations.diffusers import SSDDVAE

    folder = tmp_path / "vae"
    shutil.copytree(vae_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["decoder"] = "M"  # S weights under an M config
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not match its config\.json .*expected shape"):
        SSDDVAE.from_pretrained(folder)
    config.update(decoder="S", latent_channels=8)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="latent_channels=8 does not match encoder 'f8c4'"):
        SSDDVAE.from_pretrained(folder)


@pytest.mark.openvino
def test_openvino_cache_dir_that_is_a_file_says_so(eov, model, tmp_path):
    taken = tmp_path / "cache"
    taken.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=f"OpenVINO cache_dir {taken} is a file"):
        eov.to_openvino(model, cache_dir=taken)
    assert taken.read_text() == "not a folder"


def test_tensorrt_decoder_refuses_tile_and_bad_batch_size_before_running():
    """TensorRTDecoder needs a GPU engine to build; the argument checks come first, so a bare instance shows them."""
    from ssdd_runtime.export.tensorrt import TensorRTDecoder

    dec = object.__new__(TensorRTDecoder)
    with pytest.raises(ValueError, match="tile=2: the TensorRT backend decodes whole images"):
        dec.decode(z4(), tile=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            dec.decode(z4(), batch_size=bad)
