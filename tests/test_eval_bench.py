"""`ssdd bench --quality` columns and the lazy `ssdd_runtime.evaluate` (main venv: no torchvision needed)."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ssdd_runtime.benchmarks import run, schema
from ssdd_runtime.benchmarks.workloads import build_workload
from ssdd_runtime.cli import main


def test_import_ssdd_runtime_loads_no_metric_library():
    code = ("import sys, ssdd_runtime; assert callable(ssdd_runtime.evaluate) or True; "
            "bad = [m for m in ('torchvision', 'lpips', 'torch_fidelity', 'skimage', 'scipy') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_decode_quality_columns_against_a_known_perturbation():
    w = build_workload("ssdd-S", steps=1)
    w.reference = w.net
    (x, t, z), noise = w.example_inputs(1, 16, 16, torch.float32, "cpu")
    ref = w.decode(w.net, (x, t, z), noise)
    delta = torch.zeros_like(ref)
    i = int((ref.abs() < 0.5).flatten().nonzero()[0])  # a value away from the clamp
    delta.view(-1)[i] = 0.25  # one value off by 0.25 in [-1, 1]: ~32 of 255 levels
    q = run.decode_quality(ref + delta, w, z, noise, latents="random")
    assert q["quality_max_abs_error"] == pytest.approx(0.25, abs=1e-6)
    assert q["quality_mean_abs_error"] == pytest.approx(0.25 / ref.numel(), rel=1e-5)
    u = lambda a: np.round(np.clip(255 * (a.numpy().astype(np.float64) + 1) / 2, 0, 255))  # noqa: E731
    mse = np.mean(((u(ref + delta) - u(ref)) / 255) ** 2)
    assert q["quality_psnr_db"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-9)
    assert run.decode_quality(ref.clone(), w, z, noise, latents="random")["quality_psnr_db"] is None


def test_bench_quality_columns_for_two_backends(tmp_path, make_checkpoint, capsys):
    pytest.importorskip("onnxruntime", reason="the second backend is ONNX Runtime: pip install 'ssdd-runtime[onnx]'")
    pytest.importorskip("matplotlib", reason="the quality plot needs matplotlib")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    out, png = tmp_path / "bench.json", tmp_path / "quality.png"
    args = ["bench", "--models", "ssdd-S", "--backends", "eager,onnxruntime", "--res", "32", "--batch", "2",
            "--repeats", "1", "--warmup", "0", "--rotate", "1", "--threads", "1", "--quiet",
            "--checkpoint", str(make_checkpoint("f8c4", "S", 0)), "--eval-images", str(imgs),
            "--json", str(out), "--quality-plot", str(png)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "PSNR vs fp32 dB" in text and "identical" in text
    report = schema.check(json.loads(out.read_text()))
    rows = {r["backend"]: r for r in report["results"]}
    assert set(rows) == {"eager", "onnxruntime"} and png.stat().st_size > 0
    eager, ort = rows["eager"], rows["onnxruntime"]
    assert eager["quality_psnr_db"] is None and eager["quality_max_abs_error"] == 0  # the reference itself
    assert 0 < ort["quality_max_abs_error"] < 1e-2 and ort["quality_mean_abs_error"] < ort["quality_max_abs_error"]
    assert ort["quality_psnr_db"] is None or ort["quality_psnr_db"] > 40
    assert eager["quality_latents"] == ort["quality_latents"] == "images"
    assert any("fp32 eager" in n and str(imgs) in n for n in report["notes"])


def test_bench_quality_is_off_without_checkpoint_and_eval_images_needs_one(tmp_path, capsys):
    cfg = run.Config(models=["ssdd-S"], backends=["eager"], batches=[1], resolutions=[(16, 16)], repeats=1,
                     warmup=0, rotate=1)
    assert "quality_max_abs_error" not in run.run_benchmark(cfg, echo=lambda s: None)["results"][0]
    assert main(["bench", "--models", "ssdd-S", "--eval-images", str(tmp_path)]) == 2
    assert "give --checkpoint" in capsys.readouterr().err


def test_bench_eval_images_give_the_kl_vae_row_its_psnr_against_the_inputs(tmp_path, make_checkpoint, capsys):
    diffusers = pytest.importorskip("diffusers", reason="the KL-VAE baseline needs diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                                  norm_num_groups=4, sample_size=32)
    vae.save_pretrained(tmp_path / "vae")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 44, 3), dtype=np.uint8)).save(imgs / "0.png")
    out = tmp_path / "bench.json"
    assert main(["bench", "--models", "ssdd-S,kl-vae", "--backends", "eager", "--res", "32", "--repeats", "1",
                 "--warmup", "0", "--rotate", "1", "--threads", "1", "--quiet", "--json", str(out),
                 "--checkpoint", str(make_checkpoint("f8c4", "S", 0)), "--kl-vae-checkpoint", str(tmp_path / "vae"),
                 "--eval-images", str(imgs)]) == 0
    assert "PSNR vs input dB" in capsys.readouterr().out
    rows = {r["model"]: r for r in json.loads(out.read_text())["results"]}
    # independent: the same cover-crop (PIL bicubic, centre) through diffusers, quantised, PSNR
    im = Image.open(imgs / "0.png").convert("RGB")
    s = max(32 / 30, 32 / 44)
    im = im.resize((max(32, round(44 * s)), max(32, round(30 * s))), Image.BICUBIC)
    left, top = (im.width - 32) // 2, (im.height - 32) // 2
    u8 = np.asarray(im.crop((left, top, left + 32, top + 32)))
    x = torch.from_numpy(u8.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    loaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    with torch.no_grad():
        y = loaded.decode(loaded.encode(x).latent_dist.mode()).sample
    q = torch.round(torch.clamp(255 * (y + 1) / 2, 0, 255)).permute(0, 2, 3, 1).numpy()
    mse = np.mean(((q - u8) / 255.0) ** 2)
    assert rows["kl-vae"]["recon_psnr_db"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-3)
    assert rows["ssdd-S"]["recon_psnr_db"] is not None and rows["ssdd-S"]["quality_psnr_db"] is None
