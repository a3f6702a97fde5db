"""`ssdd eval` and ssdd_runtime.evaluation against independent computations (marked `eval`: run by `make test` in
the .venv-eval environment, which has torchvision, torch-fidelity, lpips and scikit-image).

The metric networks use weights files of seeded random values in the standard layouts (torch-fidelity's
FeatureExtractorInceptionV3 state dict; torchvision's AlexNet state dict in $TORCH_HOME/hub/checkpoints): the
checks are of the code paths and the protocol, not of the real networks' numbers. The independent side calls
torch-fidelity, lpips, scikit-image, numpy and scipy directly, following the protocol as the issue states it.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.eval

for _mod, _why in (("torchvision", "torchvision"), ("torch_fidelity", "torch-fidelity"), ("lpips", "lpips"),
                   ("skimage", "scikit-image"), ("scipy", "scipy")):
    pytest.importorskip(_mod, reason=f"{_why} is not installed: these tests run in .venv-eval (make test)")

import lpips  # noqa: E402
import scipy.linalg  # noqa: E402
import skimage.metrics  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402
from torch_fidelity import metric_fid  # noqa: E402
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: E402

from ssdd_runtime import evaluation as ev  # noqa: E402

RTOL = 1e-4


# -- weights files of random values -----------------------------------------------------------------------------


def _random_state_dict(module: torch.nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif k.endswith("running_var"):
            out[k] = 1 + 0.1 * torch.rand(v.shape, generator=g)
        elif v.dim() >= 2:
            out[k] = torch.randn(v.shape, generator=g) * math.sqrt(2 / v[0].numel())  # He: no vanishing signal
        elif k.endswith("weight"):
            out[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            out[k] = 0.1 * torch.randn(v.shape, generator=g)
    return out


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """$TORCH_HOME with torchvision's AlexNet file (random values) where lpips' backbone looks for it."""
    import torchvision

    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    sd = _random_state_dict(torchvision.models.alexnet(weights=None), seed=1)
    torch.save(sd, home / "hub" / "checkpoints" / ev.ALEXNET_FILE)
    with mock.patch.dict(os.environ, {"TORCH_HOME": str(home), "HF_HUB_OFFLINE": "1"}):
        yield home


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """torch-fidelity's FeatureExtractorInceptionV3 state dict (its key layout) filled with random values."""
    with mock.patch.object(torch, "load", return_value={}), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")
    path = tmp_path_factory.mktemp("inception") / ev.INCEPTION_FILE
    torch.save(_random_state_dict(net, seed=2), path)
    return path


def _rand_images(seed: int, n: int, H: int, W: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


def _similar(a: np.ndarray, seed: int, amount: int = 20) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(-amount, amount + 1, a.shape)
    return np.clip(a.astype(int) + noise, 0, 255).astype(np.uint8)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# -- the metrics one by one -------------------------------------------------------------------------------------


def test_psnr_ssim_mse_mae_match_scikit_image():
    ref = _rand_images(0, 3, 33, 40)  # odd, non-square
    rec = _similar(ref, 1)
    acc = ev.Accumulator(["psnr", "ssim", "mse", "mae"])
    acc.update(ref[:2], rec[:2])  # streamed in two batches
    acc.update(ref[2:], rec[2:])
    got = acc.result(None)
    r, x = ref / 255.0, rec / 255.0
    per = [skimage.metrics.peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(r, x)]
    pooled = skimage.metrics.peak_signal_noise_ratio(r, x, data_range=1.0)  # one MSE over the whole set
    ssim = np.mean([skimage.metrics.structural_similarity(a, b, channel_axis=-1, data_range=1.0)
                    for a, b in zip(r, x)])
    assert got["n"] == 3
    assert _rel(got["psnr"], pooled) < 1e-9 and _rel(got["psnr_mean"], np.mean(per)) < 1e-9
    assert got["psnr"] != pytest.approx(got["psnr_mean"], rel=1e-6)  # the two are different statistics
    assert _rel(got["ssim"], ssim) < 1e-9
    assert _rel(got["mse_x1000"], 1000 * np.mean((r - x) ** 2)) < 1e-9
    assert _rel(got["mae"], np.mean(np.abs(r - x))) < 1e-9


def test_fid_formula_and_running_sums_match_scipy_sqrtm():
    rng = np.random.default_rng(0)
    D = 12
    f1 = rng.normal(size=(400, D)) @ rng.normal(size=(D, D))
    f2 = 0.5 + rng.normal(size=(300, D)) @ rng.normal(size=(D, D))
    s1, s2 = ev.GaussianStats(D), ev.GaussianStats(D)
    for chunk in np.array_split(f1, 7):
        s1.add(chunk)
    for chunk in np.array_split(f2, 3):
        s2.add(chunk)
    (mu1, c1), (mu2, c2) = s1.mean_cov(), s2.mean_cov()
    np.testing.assert_allclose(mu1, f1.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(c1, np.cov(f1, rowvar=False), rtol=1e-9, atol=1e-9)
    got = ev.fid_from_stats(mu1, c1, mu2, c2)
    m1, m2, a, b = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(a @ b).real
    ref = float((m1 - m2) @ (m1 - m2) + np.trace(a) + np.trace(b) - 2 * np.trace(covmean))
    assert ref > 1 and _rel(got, ref) < 1e-9
    with pytest.raises(ValueError, match="at least 2 images"):
        ev.GaussianStats(D).mean_cov()


def test_inception_features_match_torch_fidelity(inception_file):
    imgs = _rand_images(3, 2, 40, 56)
    net = ev.inception(inception_file)
    got = ev.inception_features(net, imgs)
    ref_net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                          feature_extractor_weights_path=str(inception_file))
    (ref,) = ref_net(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous())
    assert got.shape == (2, 2048) and got.dtype == np.float64
    np.testing.assert_allclose(got, ref.double().numpy(), rtol=1e-6, atol=1e-7)
    assert np.abs(got).max() > 0 and not np.allclose(got[0], got[1])  # random weights still separate images
    with pytest.raises(FileNotFoundError, match="missing.pth.*--inception-weights"):
        ev.inception(inception_file.parent / "missing.pth")


def test_lpips_with_random_alexnet_matches_the_package(torch_home):
    a, b = _rand_images(4, 2, 24, 40), _rand_images(5, 2, 24, 40)
    got = ev.lpips_distances(ev.lpips_net(), a, b)
    ref_net = lpips.LPIPS(net="alex", verbose=False)
    sd = torch.load(torch_home / "hub" / "checkpoints" / ev.ALEXNET_FILE)
    assert torch.equal(ref_net.net.slice1[0].weight, sd["features.0.weight"])  # our random file was used

    def prep(u8):  # [-1, 1], zero-padded right/bottom to 32 x 64
        x = torch.from_numpy(u8).permute(0, 3, 1, 2).double() / 255 * 2 - 1
        out = torch.zeros(len(u8), 3, 32, 64, dtype=torch.float64)
        out[:, :, :24, :40] = x
        return out.float()

    with torch.no_grad():
        ref = ref_net(prep(a), prep(b)).flatten().double().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert ev.pad_pow2(torch.zeros(1, 3, 33, 64)).shape == (1, 3, 64, 64)


def test_identity_gives_mse_0_ssim_1_fid_0(torch_home, inception_file):
    imgs = _rand_images(6, 4, 32, 32)
    inc = ev.inception(inception_file)
    acc = ev.Accumulator(ev.METRICS, lpips=ev.lpips_net(), inception=inc)
    ref = ev.GaussianStats()
    ref.add(ev.inception_features(inc, imgs))
    acc.update(imgs, imgs.copy())
    got = acc.result(ref)
    assert got["mse_x1000"] == 0 and got["mae"] == 0 and got["psnr"] == math.inf
    assert got["ssim"] == pytest.approx(1.0, abs=1e-12) and got["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert abs(got["fid"]) < 1e-3
    assert ev._finite(got)["psnr"] is None and "infinite" in ev._finite(got)["note"]


def test_resize_and_crop_on_odd_and_non_square_inputs(tmp_path):
    from PIL import ImageOps

    for (w, h), res in (((37, 23), 16), ((23, 37), 16), ((41, 41), 32), ((20, 65), 19)):
        p = tmp_path / f"{w}x{h}.png"
        Image.fromarray(_rand_images(w * h, 1, h, w)[0]).save(p)
        got = ev.load_crop(p, res)
        # independent: PIL's bilinear (antialiased) to short side res, long side int(res * long / short) as
        # torchvision computes it, then the centre crop with torchvision's rounding
        img = Image.open(p).convert("RGB")
        short, long = min(w, h), max(w, h)
        size = (res, int(res * long / short)) if w <= h else (int(res * long / short), res)
        img = img.resize(size, Image.BILINEAR)
        left, top = int(round((size[0] - res) / 2)), int(round((size[1] - res) / 2))
        ref = np.asarray(img.crop((left, top, left + res, top + res)))
        assert got.shape == (res, res, 3) and np.array_equal(got, ref), (w, h, res)
        assert np.array_equal(got, np.asarray(TF.center_crop(TF.resize(Image.open(p).convert("RGB"), res), res)))
    del ImageOps


# -- ssdd eval end to end ---------------------------------------------------------------------------------------


def _folder(root: Path) -> Path:
    """An ImageFolder tree: 5 images of mixed sizes (odd, non-square, one grayscale JPEG) and one corrupt file."""
    rng = np.random.default_rng(7)
    sizes = {"a/0.png": (40, 52), "a/1.png": (33, 45), "b/2.jpg": (48, 36), "b/3.png": (64, 64), "c/4.png": (37, 50)}
    for rel, (h, w) in sizes.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BICUBIC)  # smooth: SSIM/LPIPS away from their floors
        (img.convert("L") if rel.endswith(".jpg") else img).save(root / rel)
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    return root


def _independent(folder: Path, ckpt: Path, inception_file: Path, res: int, limit=None, seed=0, steps=1) -> dict:
    """The protocol, computed here with the libraries called directly, one image at a time."""
    from ssdd_runtime import SSDD

    model = SSDD.from_pretrained(ckpt)
    gen = torch.Generator().manual_seed(seed)
    paths = sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file())
    refs, recs = [], []
    for rel, p in paths:
        try:
            img = Image.open(p).convert("RGB")
        except OSError:
            continue
        u8 = np.asarray(TF.center_crop(TF.resize(img, res, TF.InterpolationMode.BILINEAR, antialias=True), res))
        x = torch.from_numpy(u8.copy()).permute(2, 0, 1)[None].float() / 255 * 2 - 1
        noise = torch.randn((1, 3, res, res), generator=gen, dtype=torch.float32)
        y = model.decode(model.encode(x).mode(), steps=steps, noise=noise)
        q = torch.round(torch.clamp(255 * (y + 1) / 2, 0, 255)).to(torch.uint8)[0].permute(1, 2, 0).numpy()
        refs.append(u8)
        recs.append(q)
    refs, recs = np.stack(refs)[:limit], np.stack(recs)[:limit]
    r, x = refs / 255.0, recs / 255.0
    inc = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                      feature_extractor_weights_path=str(inception_file))
    feats = [inc(torch.from_numpy(a).permute(0, 3, 1, 2).contiguous())[0].double().numpy() for a in (refs, recs)]
    # torch-fidelity's own statistics and distance (its eigenvalue form of tr sqrtm, stable for the rank-deficient
    # covariances of a few images; the formula itself is checked against scipy sqrtm above)
    stats = [metric_fid.fid_features_to_statistics(torch.from_numpy(f)) for f in feats]
    fid = metric_fid.fid_statistics_to_metric(*stats, False)[metric_fid.KEY_METRIC_FID]
    lp = lpips.LPIPS(net="alex", verbose=False)
    p2 = 1 << (res - 1).bit_length()
    pad = lambda a: torch.nn.functional.pad(torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1,  # noqa
                                            (0, p2 - res, 0, p2 - res))
    return {"n": len(refs), "psnr": skimage.metrics.peak_signal_noise_ratio(r, x, data_range=1.0),
            "psnr_mean": float(np.mean([skimage.metrics.peak_signal_noise_ratio(a, b, data_range=1.0)
                                        for a, b in zip(r, x)])),
            "ssim": float(np.mean([skimage.metrics.structural_similarity(a, b, channel_axis=-1, data_range=1.0)
                                   for a, b in zip(r, x)])),
            "lpips": float(lp(pad(refs), pad(recs)).detach().mean()), "fid": fid,
            "mse_x1000": 1000 * float(np.mean((r - x) ** 2)), "mae": float(np.mean(np.abs(r - x))),
            "_refs": refs, "_recs": recs}


def _ssdd(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ssdd_runtime", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_ssdd_eval_end_to_end_matches_an_independent_computation(tmp_path, torch_home, inception_file,
                                                                  make_checkpoint):
    folder, ckpt = _folder(tmp_path / "val"), make_checkpoint("f8c4", "S", 0)
    out, save = tmp_path / "eval.json", tmp_path / "saved"
    res = _ssdd("eval", folder, "--checkpoint", ckpt, "--res", 24, "--batch-size", 2, "--seed", 0,
                "--inception-weights", inception_file, "--json", out, "--save", save, "--device", "cpu")
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    from ssdd_runtime.benchmarks import schema

    schema.check(report)
    data = report["data"]
    assert report["kind"] == "eval" and data["n"] == 5 and data["n_bad"] == 1
    assert data["bad_images"][0]["path"] == "b/broken.png"
    (row,) = data["models"]
    assert row["checkpoint_sha256"] == ev.sha256(ckpt) and row["steps"] == 1 and row["t_pow_shift"] == 2.0
    ref = _independent(folder, ckpt, inception_file, 24)  # 24: LPIPS pads to 32
    for k in ("n", "psnr", "psnr_mean", "ssim", "lpips", "fid", "mse_x1000", "mae"):
        assert _rel(row["metrics"][k], ref[k]) < RTOL, (k, row["metrics"][k], ref[k])
    assert ref["fid"] > 0.1 and 0 < ref["ssim"] < 0.99  # the numbers are not at a floor where anything matches
    # one printed row, and --save holds the exact 8-bit images the metrics saw
    assert [l.split()[0] for l in res.stdout.splitlines()].count("ssdd-S") == 1 and "broken.png" in res.stdout
    saved = sorted(p.relative_to(save).as_posix() for p in save.rglob("*.png"))
    assert saved == sorted(f"{d}/{r}" for d in ("inputs", "ssdd-S")
                           for r in ("a/0.png", "a/1.png", "b/2.png", "b/3.png", "c/4.png"))
    ins = np.stack([np.asarray(Image.open(save / r)) for r in sorted(saved)[:5]]) / 255.0  # inputs/...
    outs = np.stack([np.asarray(Image.open(save / r)) for r in sorted(saved)[5:]]) / 255.0  # ssdd-S/...
    assert np.array_equal(ins * 255, ref["_refs"])  # the crops, exactly
    assert _rel(row["metrics"]["mae"], float(np.abs(ins - outs).mean())) < 1e-12  # the PNGs the metrics saw
    assert _rel(row["metrics"]["mse_x1000"], 1000 * float(((ins - outs) ** 2).mean())) < 1e-12
    # the independent decode ran one image at a time (the CLI: batches of 2): a few pixels may round apart
    assert np.abs(outs * 255 - ref["_recs"]).max() <= 1 and (outs * 255 != ref["_recs"]).mean() < 1e-3
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob(".ssdd-*"))


def test_limit_metrics_and_python_api(tmp_path, torch_home, make_checkpoint):
    import ssdd_runtime

    folder = _folder(tmp_path / "val")
    report = ssdd_runtime.evaluate(folder, checkpoint=make_checkpoint("f8c4", "S", 0), res=16, limit=2,
                                   metrics=["psnr", "mse"], progress=False)
    m = report["data"]["models"][0]["metrics"]
    assert m["n"] == 2 and set(m) == {"n", "psnr", "psnr_mean", "mse_x1000"}


def test_kl_vae_baseline_row(tmp_path, torch_home, make_checkpoint):
    diffusers = pytest.importorskip("diffusers", reason="the KL-VAE baseline needs diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                                  norm_num_groups=4, sample_size=32)
    vae.save_pretrained(tmp_path / "vae")
    folder = _folder(tmp_path / "val")
    report = ev.evaluate(folder, checkpoint=make_checkpoint("f8c4", "S", 0), res=16, metrics=["psnr", "mae"],
                         baseline=f"kl-vae:{tmp_path / 'vae'}", progress=False, batch_size=3)
    rows = {m["model"]: m["metrics"] for m in report["data"]["models"]}
    assert set(rows) == {"ssdd-S", "kl-vae"} and rows["kl-vae"]["n"] == 5
    # independent: the same crops through diffusers directly
    loaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "broken.png")
    crops = np.stack([ev.load_crop(p, 16) for p in paths])
    with torch.no_grad():
        x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = loaded.decode(loaded.encode(x).latent_dist.mode()).sample
    rec = torch.round(torch.clamp(255 * (y + 1) / 2, 0, 255)).permute(0, 2, 3, 1).numpy()
    d = (crops / 255.0 - rec / 255.0)
    assert _rel(rows["kl-vae"]["mae"], float(np.abs(d).mean())) < RTOL
    assert _rel(rows["kl-vae"]["psnr"], 10 * math.log10(1 / float((d * d).mean()))) < RTOL
    assert rows["kl-vae"]["psnr"] != rows["ssdd-S"]["psnr"]
    with pytest.raises(ValueError, match="kl-vae:"):
        ev.evaluate(folder, checkpoint="x", baseline="sd-vae")


def test_compare_two_folders(tmp_path, torch_home, inception_file):
    ref_dir, rec_dir = tmp_path / "ref", tmp_path / "rec"
    refs = _rand_images(8, 3, 20, 28)
    recs = _similar(refs, 9)
    for i in range(3):
        for d, a in ((ref_dir, refs[i]), (rec_dir, recs[i])):
            (d / "sub").mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(d / "sub" / f"{i}.png")
    out = tmp_path / "cmp.json"
    # FID is covered above; leaving it out saves a 2048 x 2048 eigen-decomposition (~10 s on 2 loaded cores)
    res = _ssdd("eval", "--compare", ref_dir, rec_dir, "--metrics", "psnr,ssim,lpips,mse,mae", "--json", out)
    assert res.returncode == 0, res.stderr
    m = json.loads(out.read_text())["data"]["models"][0]["metrics"]
    r, x = refs / 255.0, recs / 255.0
    assert m["n"] == 3 and _rel(m["psnr"], skimage.metrics.peak_signal_noise_ratio(r, x, data_range=1.0)) < RTOL
    assert _rel(m["ssim"], np.mean([skimage.metrics.structural_similarity(a, b, channel_axis=-1, data_range=1.0)
                                    for a, b in zip(r, x)])) < RTOL
    # a pair of two sizes: one line, exit 2, nothing written
    Image.fromarray(recs[0][:16]).save(rec_dir / "sub" / "0.png")
    out.unlink()
    res = _ssdd("eval", "--compare", ref_dir, rec_dir, "--metrics", "psnr", "--json", out)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "sub/0.png: 28x20" in res.stderr, res.stderr
    assert not out.exists()
    (rec_dir / "sub" / "2.png").unlink()
    res = _ssdd("eval", "--compare", ref_dir, rec_dir, "--metrics", "psnr")
    assert res.returncode == 2 and "missing in" in res.stderr and "sub/2.png" in res.stderr


def test_missing_weights_is_one_line_before_any_decoding(tmp_path, make_checkpoint, capsys):
    folder, ckpt = _folder(tmp_path / "val"), make_checkpoint("f8c4", "S", 0)
    empty = tmp_path / "empty_torch_home"
    env = {"TORCH_HOME": str(empty), "HF_HUB_OFFLINE": "1"}
    res = _ssdd("eval", folder, "--checkpoint", ckpt, "--res", 16, "--save", tmp_path / "s", env=env)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert ev.INCEPTION_FILE in res.stderr and "--inception-weights" in res.stderr and "https://" in res.stderr
    from ssdd_runtime.cli import main  # the other cases in this process (each subprocess costs a torch import)

    with mock.patch.dict(os.environ, env):
        assert main(["eval", str(folder), "--checkpoint", str(ckpt), "--res", "16", "--metrics", "lpips",
                     "--save", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ev.ALEXNET_FILE in err and "https://" in err, err
        assert main(["eval", str(folder), "--checkpoint", str(ckpt), "--inception-weights",
                     str(tmp_path / "nope.pth")]) == 2
        assert "nope.pth" in capsys.readouterr().err
    assert not list((tmp_path / "s").rglob("*.png"))  # failed before any image was decoded or written
    assert main(["eval", str(folder), "--checkpoint", str(ckpt), "--metrics", "psnr,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["eval", "--compare", str(folder), str(folder), "--save", str(tmp_path / "s2")]) == 2
    assert "takes no DATA folder, checkpoint, --save" in capsys.readouterr().err and not (tmp_path / "s2").exists()
    assert main(["eval", str(folder), "--metrics", "psnr"]) == 2
    assert "--checkpoint or --repo is required" in capsys.readouterr().err
    # a folder of unreadable files only: one line, exit 2, no JSON (not a row of n=0 with exit 0)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_text("not an image")
    (junk / "b.jpg").write_bytes(b"\xff\xd8\xff")
    out = tmp_path / "junk.json"
    assert main(["eval", str(junk), "--checkpoint", str(ckpt), "--res", "16", "--metrics", "psnr,mse",
                 "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "none of the 2 image(s) could be read" in err and "a.png" in err and not out.exists()


def test_ctrl_c_leaves_no_partial_json_and_only_whole_pngs(tmp_path, make_checkpoint, monkeypatch, capsys):
    from ssdd_runtime.cli import main

    real = ev.ssdd_reconstructor
    calls = []

    def interrupted_after_one_batch(*args, **kwargs):
        fn = real(*args, **kwargs)

        def run(x):
            calls.append(len(x))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return fn(x)
        return run

    monkeypatch.setattr(ev, "ssdd_reconstructor", interrupted_after_one_batch)
    folder, out, save = _folder(tmp_path / "val"), tmp_path / "eval.json", tmp_path / "saved"
    code = main(["eval", str(folder), "--checkpoint", str(make_checkpoint("f8c4", "S", 0)), "--res", "16",
                 "--batch-size", "2", "--metrics", "psnr,mse", "--json", str(out), "--save", str(save)])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert not out.exists() and calls == [2, 2]
    pngs = sorted(p.relative_to(save).as_posix() for p in save.rglob("*") if p.is_file())
    assert pngs == ["inputs/a/0.png", "inputs/a/1.png", "ssdd-S/a/0.png", "ssdd-S/a/1.png"]  # the first batch
    for p in save.rglob("*.png"):
        Image.open(p).load()  # whole files
