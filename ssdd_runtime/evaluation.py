"""`ssdd eval`: reconstruction quality (rFID, PSNR, SSIM, LPIPS, MSE, MAE) with the SSDD paper's protocol.

Protocol (facts of the official evaluation, re-implemented here; no official code is copied):
  images     an ImageFolder tree or a flat folder, files in sorted order of their relative paths, the first
             `limit`; each read with PIL and converted to RGB (torchvision's ImageFolder loader: no EXIF rotation),
             then `torchvision.transforms.functional.resize(img, res, InterpolationMode.BILINEAR, antialias=True)`
             (short side to `res`; on a PIL image this is PIL's antialiased bilinear) and `center_crop(img, res)`.
  decode     encoder mean (`.mode()`), then `steps` Euler steps (1 for distilled checkpoints, 8 for multi-step
             ones) on the grid with `t_pow_shift` (2.0); start noise drawn image by image, in order, from one
             `torch.Generator().manual_seed(seed)` (`sampler.per_image_noise`), so it does not depend on the batch.
  quantise   input and reconstruction: round(clamp(255 * (x + 1) / 2, 0, 255)) / 255 (`io.tensor_to_uint8`):
             every metric sees the 8-bit images (the same PNGs `save` writes).
  rFID       2048-d pool features of torch-fidelity's `FeatureExtractorInceptionV3` (file
             weights-inception-2015-12-05-6726825d.pth), fed uint8; float64 running sums of the features and of
             their outer products for the reference (the cropped inputs) and the reconstructions; mean and
             unbiased covariance from the sums; the distance by torch-fidelity's `fid_statistics_to_metric`
             (torch-fidelity 0.4 takes tr sqrtm(S1 S2) as the sum of the square roots of the eigenvalues of
             S1 S2: the scipy `sqrtm` formula, in a form stable for rank-deficient covariances; tests check both).
  PSNR       data_range 1: `psnr` pooled (one global MSE over every pixel of the set), `psnr_mean` the mean of
             per-image PSNRs.
  SSIM       scikit-image `structural_similarity(channel_axis=-1, data_range=1)`: its default 7x7 *uniform*
             window (not torchmetrics' 11x11 Gaussian), mean over images.
  LPIPS      `lpips.LPIPS(net="alex")` on [-1, 1] images zero-padded right/bottom to the next power of two in
             each spatial dim, mean over images.
  MSE x1000, MAE   of the quantised [0, 1] images, over every pixel.

Streaming: one batch of images in memory at a time, plus O(2048^2) float64 FID sums per model. Unreadable images
are counted and named in the result, not fatal. The result JSON is written once, atomically, at the end.

The metric networks come from torch-fidelity, lpips and torchvision (`pip install 'ssdd-runtime[eval]'`), imported
inside the functions that use them: `import ssdd_runtime` never imports them. Verified here against direct calls
of those libraries with random-valued weights files; numbers with the real weights are not verified here.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ssdd_runtime.io import (atomic_output, confined_path, scan_folder, tensor_to_uint8, uint8_to_tensor,
                             unique_names)
from ssdd_runtime.sampler import T_POW_SHIFT, per_image_noise

log = logging.getLogger(__name__)

METRICS = ("psnr", "ssim", "lpips", "fid", "mse", "mae")
INSTALL_HINT = "pip install 'ssdd-runtime[eval]'"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"
PROTOCOL = {
    "images": "sorted relative paths, first `limit`; PIL -> RGB -> torchvision.transforms.functional.resize(short "
              "side to res, InterpolationMode.BILINEAR, antialias=True) -> center_crop(res)",
    "quantisation": "round(clamp(255 * (x + 1) / 2, 0, 255)) / 255 of input and reconstruction before every metric",
    "noise": "image by image from one torch.Generator().manual_seed(seed)",
    "psnr": "data_range 1; psnr = pooled (10 log10(1 / global MSE)); psnr_mean = mean of per-image PSNRs",
    "ssim": "skimage.metrics.structural_similarity(channel_axis=-1, data_range=1), default 7x7 uniform window",
    "lpips": "lpips.LPIPS(net='alex'), inputs in [-1, 1] zero-padded right/bottom to the next power of two",
    "fid": "torch-fidelity FeatureExtractorInceptionV3 2048-d pool features of uint8 images, float64 running sums, "
           "reference = the cropped inputs, torch_fidelity fid_statistics_to_metric (tr sqrtm(S1 S2) from the "
           "eigenvalues of S1 S2)",
    "mse_x1000": "1000 x mean squared error of the quantised [0, 1] images",
    "mae": "mean absolute error of the quantised [0, 1] images",
}


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"ssdd eval needs {module.split('.')[0]} ({e}): {INSTALL_HINT}") from e


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"unknown metric(s) {bad or metrics}; expected some of {', '.join(METRICS)}")
    return tuple(m for m in METRICS if m in metrics)


# -- images -----------------------------------------------------------------------------------------------------


def list_images(folder: str | os.PathLike, limit: int | None = None) -> list[tuple[str, Path]]:
    """(relative POSIX path, path) of the images under `folder` (ImageFolder tree or flat), sorted by relative
    path, the first `limit`."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    items = sorted((p.relative_to(root).as_posix(), p) for p in scan_folder(root))
    if not items:
        raise ValueError(f"no images found in {folder}")
    return items if limit is None else items[:limit]


def _open_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def load_crop(path: str | os.PathLike, res: int) -> np.ndarray:
    """The protocol's input: uint8 (res, res, 3), short side resized to `res` (bilinear, antialiased), centre crop."""
    tf = _require("torchvision.transforms.functional")
    img = _open_rgb(Path(path))
    img = tf.resize(img, res, interpolation=tf.InterpolationMode.BILINEAR, antialias=True)
    return np.asarray(tf.center_crop(img, res))


def load_uint8(path: str | os.PathLike) -> np.ndarray:
    """An image as it is (compare mode: no resize): uint8 (H, W, 3)."""
    return np.asarray(_open_rgb(Path(path)))


# -- metrics ----------------------------------------------------------------------------------------------------


def psnr_db(mse: float) -> float:
    """PSNR with data_range 1; inf for identical images."""
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """scikit-image SSIM of two uint8 (H, W, 3) images seen in [0, 1] (default 7x7 uniform window)."""
    metrics = _require("skimage.metrics")
    return float(metrics.structural_similarity(a.astype(np.float64) / 255, b.astype(np.float64) / 255,
                                               channel_axis=-1, data_range=1.0))


def pad_pow2(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) zero-padded on the right and bottom to the next power of two in H and W."""
    H, W = x.shape[-2:]
    H2, W2 = 1 << (H - 1).bit_length(), 1 << (W - 1).bit_length()
    return torch.nn.functional.pad(x, (0, W2 - W, 0, H2 - H))


def fid_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance of two Gaussians, by torch-fidelity's own function (float64; tr sqrtm(S1 S2) from the
    eigenvalues of S1 S2). A 2048 x 2048 non-symmetric eigen-decomposition: ~30 s on 2 busy CPU cores, once per
    model per run."""
    metric_fid = _require("torch_fidelity.metric_fid")
    out = metric_fid.fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, False)
    return float(out[metric_fid.KEY_METRIC_FID])


class GaussianStats:
    """Running float64 sums of features and of their outer products: mean and unbiased covariance of any
    number of feature vectors in O(D^2) memory."""

    def __init__(self, dim: int = 2048):
        self.n = 0
        self.sum = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def add(self, feats) -> None:
        f = np.asarray(feats, dtype=np.float64)
        self.n += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 images, got {self.n}")
        mu = self.sum / self.n
        return mu, (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)


def _cached(filename: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def check_weights(metrics: Sequence[str], inception_weights: str | os.PathLike | None = None) -> None:
    """FileNotFoundError naming the file and where to get it when a metric network's weights are missing: a given
    --inception-weights path that is not a file, or (HF_HUB_OFFLINE=1) a file absent from the torch hub cache.
    Cheap: the CLI calls it before loading any model, the metric constructors again."""
    if "fid" in metrics:
        where = f"get {INCEPTION_FILE} from {INCEPTION_URL} and pass --inception-weights PATH"
        if inception_weights is not None:
            if not Path(inception_weights).is_file():
                raise FileNotFoundError(f"Inception weights not found: {inception_weights} ({where})")
        elif _offline() and not _cached(INCEPTION_FILE).is_file():
            raise FileNotFoundError(f"Inception weights {INCEPTION_FILE} are not in {_cached(INCEPTION_FILE).parent} "
                                    f"and HF_HUB_OFFLINE is set: {where}")
    cached = _cached(ALEXNET_FILE)
    if "lpips" in metrics and _offline() and not cached.is_file():
        raise FileNotFoundError(f"AlexNet weights {ALEXNET_FILE} (for LPIPS) are not in {cached.parent} and "
                                f"HF_HUB_OFFLINE is set: get {ALEXNET_URL} into {cached.parent}")


def inception(weights: str | os.PathLike | None = None, device="cpu"):
    """torch-fidelity's FID Inception-v3 (2048-d pool features of uint8 images). `weights`: its state-dict file;
    default: torch-fidelity's own download into the torch hub cache. FileNotFoundError naming the file and where
    to get it when it is missing (offline: HF_HUB_OFFLINE=1 with no cached copy, or a failed download)."""
    fx = _require("torch_fidelity.feature_extractor_inceptionv3")
    check_weights(["fid"], weights)
    where = f"get {INCEPTION_FILE} from {INCEPTION_URL} and pass --inception-weights PATH"
    weights = None if weights is None else str(weights)
    try:
        net = fx.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)
    except OSError as e:  # URLError is an OSError: the download failed
        raise FileNotFoundError(f"could not download the Inception weights {INCEPTION_FILE} ({e}): {where}") from e
    return net.eval().requires_grad_(False).to(device)


def inception_features(net, images_u8: np.ndarray, device="cpu") -> np.ndarray:
    """uint8 (B, H, W, 3) -> float64 (B, 2048)."""
    x = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).to(device)
    with torch.no_grad():
        (f,) = net(x)
    return f.double().cpu().numpy()


def lpips_net(device="cpu"):
    """lpips' AlexNet LPIPS. Its backbone is torchvision's AlexNet file in the torch hub cache
    ($TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth, downloaded when absent); the linear layers ship in
    the lpips wheel."""
    lpips = _require("lpips")
    check_weights(["lpips"])
    where = f"get {ALEXNET_URL} into {_cached(ALEXNET_FILE).parent}"
    try:
        with warnings.catch_warnings():  # lpips asks torchvision for `pretrained=True`, deprecated since 0.13
            warnings.simplefilter("ignore", UserWarning)
            net = lpips.LPIPS(net="alex", verbose=False)
    except OSError as e:
        raise FileNotFoundError(f"could not load the AlexNet weights {ALEXNET_FILE} for LPIPS ({e}): {where}") from e
    return net.eval().requires_grad_(False).to(device)


def lpips_distances(net, a_u8: np.ndarray, b_u8: np.ndarray, device="cpu") -> np.ndarray:
    """Per-image LPIPS of two uint8 (B, H, W, 3) batches: [-1, 1], zero-padded to powers of two."""
    a = pad_pow2(uint8_to_tensor(a_u8)).to(device)
    b = pad_pow2(uint8_to_tensor(b_u8)).to(device)
    with torch.no_grad():
        return net(a, b).flatten().double().cpu().numpy()


class Accumulator:
    """Streaming metrics of one model's reconstructions against the references (uint8 batches)."""

    def __init__(self, metrics: Sequence[str], *, lpips=None, inception=None, device="cpu"):
        self.metrics, self.lpips, self.inception, self.device = tuple(metrics), lpips, inception, device
        self.n = 0
        self.pixels = 0
        self.sq = self.abs = 0.0
        self.psnrs: list[float] = []  # one float per image: 400 kB for 50,000 images
        self.ssim_sum = self.lpips_sum = 0.0
        self.fid = GaussianStats() if "fid" in self.metrics else None

    def update(self, ref: np.ndarray, rec: np.ndarray) -> None:
        if ref.shape != rec.shape:
            raise ValueError(f"reference and reconstruction sizes differ: {ref.shape} vs {rec.shape}")
        d = (ref.astype(np.float64) - rec.astype(np.float64)) / 255
        self.n += len(ref)
        self.pixels += d.size
        self.sq += float((d * d).sum())
        self.abs += float(np.abs(d).sum())
        self.psnrs += [psnr_db(float((di * di).mean())) for di in d]
        if "ssim" in self.metrics:
            self.ssim_sum += sum(ssim(a, b) for a, b in zip(ref, rec))
        if "lpips" in self.metrics:
            self.lpips_sum += float(lpips_distances(self.lpips, ref, rec, self.device).sum())
        if self.fid is not None:
            self.fid.add(inception_features(self.inception, rec, self.device))

    @property
    def running_psnr(self) -> float:
        return psnr_db(self.sq / self.pixels) if self.pixels else math.nan

    def result(self, reference: GaussianStats | None) -> dict:
        n, mse = self.n, self.sq / max(self.pixels, 1)
        out: dict = {"n": n}
        if n == 0:
            return out
        if "psnr" in self.metrics:
            out["psnr"] = psnr_db(mse)
            out["psnr_mean"] = float(np.mean(self.psnrs))
        if "ssim" in self.metrics:
            out["ssim"] = self.ssim_sum / n
        if "lpips" in self.metrics:
            out["lpips"] = self.lpips_sum / n
        if self.fid is not None and reference is not None and n >= 2:
            out["fid"] = fid_from_stats(*reference.mean_cov(), *self.fid.mean_cov())
        if "mse" in self.metrics:
            out["mse_x1000"] = 1000 * mse
        if "mae" in self.metrics:
            out["mae"] = self.abs / max(self.pixels, 1)
        return out


# -- models -----------------------------------------------------------------------------------------------------


def ssdd_reconstructor(model, *, steps: int = 1, t_pow_shift: float = T_POW_SHIFT, seed: int = 0
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (B, 3, H, W) in [-1, 1] -> SSDD reconstruction; noise image by image from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)

    def run(x: torch.Tensor) -> torch.Tensor:
        z = model.encode(x).mode()
        noise = per_image_noise(x.shape[1:], [gen] * len(x))
        return model.decode(z, steps=steps, t_pow_shift=t_pow_shift, noise=noise)

    return run


def kl_vae_reconstructor(source: str, *, device="cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """A diffusers AutoencoderKL (local folder or Hub id): encode -> latent mean -> decode, fp32."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError(f"--baseline kl-vae needs diffusers: pip install 'ssdd-runtime[diffusers]' ({e})") from e
    vae = AutoencoderKL.from_pretrained(source).eval().requires_grad_(False).to(device)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = vae.encode(x.to(device)).latent_dist.mode()
            return vae.decode(z).sample.float().cpu()

    return run


def parse_baseline(spec: str) -> str:
    kind, _, source = spec.partition(":")
    if kind != "kl-vae" or not source:
        raise ValueError(f"--baseline expects kl-vae:<diffusers AutoencoderKL folder or Hub id>, got {spec!r}")
    return source


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- the run ----------------------------------------------------------------------------------------------------


def _batches(items, load, batch_size: int, bad: list) -> Iterator[tuple[list, list[np.ndarray]]]:
    """Read `items` (name, ...) with `load`, `batch_size` good ones at a time; failures go to `bad`."""
    names, arrays = [], []
    for item in items:
        try:
            a = load(item)
        except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's errors on corrupt/truncated files
            if isinstance(e, _SizeMismatch):
                raise
            bad.append({"path": item[0], "error": " ".join(str(e).split()) or type(e).__name__})
            log.warning("skipping %s: %s", item[0], e)
            continue
        if arrays and _shape(a) != _shape(arrays[0]):  # one size per batch (compare: sizes vary)
            yield names, arrays
            names, arrays = [], []
        names.append(item)
        arrays.append(a)
        if len(arrays) == batch_size:
            yield names, arrays
            names, arrays = [], []
    if arrays:
        yield names, arrays


def _shape(a) -> tuple:
    return a[0].shape if isinstance(a, tuple) else a.shape


def _save_png(a: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        Image.fromarray(a).save(tmp, format="PNG")


def run_metrics(items, load, models: dict[str, Callable | None], *, metrics=METRICS, batch_size: int = 8,
                device="cpu", inception_weights=None, save: str | os.PathLike | None = None,
                progress: bool = True) -> dict:
    """The shared loop of `evaluate` and `compare`. items: (name, ...) tuples read by `load(item)` -> uint8
    (H, W, 3) or (ref, rec) pairs when a model is None (compare). Metric networks are built first, so missing
    weights fail before any decoding. Returns {"rows": {model: metrics}, "bad_images": [...], "seconds": s}."""
    from tqdm import tqdm

    metrics = check_metrics(metrics)
    dev = torch.device(device or "cpu")
    inc = inception(inception_weights, dev) if "fid" in metrics else None
    lp = lpips_net(dev) if "lpips" in metrics else None
    accs = {name: Accumulator(metrics, lpips=lp, inception=inc, device=dev) for name in models}
    reference = GaussianStats() if inc is not None else None
    bad: list[dict] = []
    names = unique_names([str(Path(it[0]).with_suffix(".png")) for it in items]) if save is not None else None
    index = {it[0]: i for i, it in enumerate(items)} if save is not None else {}
    t0 = time.perf_counter()
    bar = tqdm(total=len(items), unit="img", desc="eval", disable=None if progress else True, dynamic_ncols=True)
    seen_bad = 0
    try:
        for group, arrays in _batches(items, load, batch_size, bad):
            if models and all(fn is None for fn in models.values()):  # compare: (ref, rec) pairs
                ref = np.stack([a[0] for a in arrays])
                recs = {name: np.stack([a[1] for a in arrays]) for name in models}
            else:
                ref = np.stack(arrays)
                x = uint8_to_tensor(ref)
                recs = {name: tensor_to_uint8(fn(x)) for name, fn in models.items()}
            if reference is not None:
                reference.add(inception_features(inc, ref, dev))
            for name, rec in recs.items():
                accs[name].update(ref, rec)
            if save is not None:
                for k, it in enumerate(group):
                    rel = names[index[it[0]]]
                    _save_png(ref[k], confined_path(Path(save) / "inputs", rel))
                    for name, rec in recs.items():
                        _save_png(rec[k], confined_path(Path(save) / name, rel))
            bar.update(len(group) + len(bad) - seen_bad)  # the bar's ETA counts skipped files too
            seen_bad = len(bad)
            first = next(iter(accs.values()))
            bar.set_postfix(psnr=f"{first.running_psnr:.2f}", bad=len(bad), refresh=False)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if items and all(acc.n == 0 for acc in accs.values()):
        first = "; ".join(f"{b['path']}: {b['error']}" for b in bad[:2])
        raise ValueError(f"none of the {len(items)} image(s) could be read ({first}{'; ...' if len(bad) > 2 else ''})")
    rows = {name: acc.result(reference) for name, acc in accs.items()}
    return {"rows": rows, "bad_images": bad, "seconds": seconds, "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def _report(kind: str, data: dict, device, notes: Sequence[str] = ()) -> dict:
    from ssdd_runtime.benchmarks import schema
    from ssdd_runtime.benchmarks.timing import environment, env_cpu_load, package_version

    env = environment(torch.device(device or "cpu"))
    env["loadavg_end"] = env_cpu_load()
    env.update({p: package_version(p) for p in ("torch-fidelity", "lpips", "scikit-image", "scipy", "torchvision")})
    method = ("ssdd eval: " + "; ".join(f"{k}: {v}" for k, v in PROTOCOL.items()))
    return schema.other_kind(kind, env, method, data, notes=[
        "metric networks: the weights files named under data.weights; numbers with the official Inception/AlexNet "
        "weights on ImageNet are not verified by this repository's tests", *notes])


def _weights_note(metrics, inception_weights) -> dict:
    out = {}
    if "fid" in metrics:
        out["inception"] = str(inception_weights or _cached(INCEPTION_FILE))
        p = Path(out["inception"])
        out["inception_sha256"] = sha256(p) if p.is_file() else None
    if "lpips" in metrics:
        out["alexnet"] = str(_cached(ALEXNET_FILE))
    return out


def evaluate(data: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None, model=None, res: int = 256,
             limit: int | None = None, steps: int = 1, t_pow_shift: float = T_POW_SHIFT, seed: int = 0,
             device=None, dtype: str = "fp32", backend: str = "torch", batch_size: int = 8,
             metrics: Sequence[str] = METRICS, inception_weights: str | os.PathLike | None = None,
             baseline: str | None = None,
             save: str | os.PathLike | None = None, progress: bool = True, label: str | None = None,
             notes: Sequence[str] = ()) -> dict:
    """Reconstruction metrics of an SSDD model (`model`, or loaded from the local `checkpoint`) on the images of
    `data` with the paper's protocol (module docstring); `baseline="kl-vae:<folder or Hub id>"` adds a KL-VAE
    row on the same images. Returns a report in the benchmark schema (`kind` "eval"); `data.models` holds one
    entry per model with `metrics` {n, psnr, psnr_mean, ssim, lpips, fid, mse_x1000, mae}."""
    metrics = check_metrics(metrics)
    if not isinstance(res, int) or res < 8:
        raise ValueError(f"res must be an integer >= 8, got {res!r}")
    baseline_source = parse_baseline(baseline) if baseline is not None else None
    items = list_images(data, limit)
    if model is None:
        if checkpoint is None:
            raise ValueError("evaluate needs model= or checkpoint=")
        from ssdd_runtime.api import SSDD

        model = SSDD.from_pretrained(checkpoint, device=device, dtype=dtype, backend=backend)
    dev = device or getattr(model, "device", None) or "cpu"
    size = getattr(getattr(model, "decoder_config", None), "size", "model")
    name = label or f"ssdd-{size}" + ("" if backend == "torch" else f"-{backend}")
    models = {name: ssdd_reconstructor(model, steps=steps, t_pow_shift=t_pow_shift, seed=seed)}
    if baseline_source is not None:
        models["kl-vae"] = kl_vae_reconstructor(baseline_source, device=dev)
    run = run_metrics([(rel, p) for rel, p in items], lambda it: load_crop(it[1], res), models, metrics=metrics,
                      batch_size=batch_size, device=dev, inception_weights=inception_weights, save=save,
                      progress=progress)
    ckpt = getattr(model, "checkpoint", None) or (str(checkpoint) if checkpoint is not None else None)
    entries = [{"model": name, "checkpoint": ckpt, "checkpoint_sha256": sha256(ckpt) if ckpt else None,
                "decoder": size, "encoder": getattr(model, "encoder_name", None), "steps": steps,
                "t_pow_shift": t_pow_shift, "seed": seed, "dtype": dtype, "backend": backend,
                "metrics": _finite(run["rows"][name])}]
    if baseline_source is not None:
        entries.append({"model": "kl-vae", "checkpoint": baseline_source, "checkpoint_sha256": None,
                        "metrics": _finite(run["rows"]["kl-vae"])})
    n = entries[0]["metrics"]["n"]
    out = {"mode": "reconstruct", "data": str(data), "res": res, "limit": limit, "n": n,
           "bad_images": run["bad_images"], "n_bad": len(run["bad_images"]), "metrics": list(metrics),
           "batch_size": batch_size, "seconds": run["seconds"], "peak_rss_mb": run["peak_rss_mb"],
           "images_per_s": n / run["seconds"] if run["seconds"] > 0 else None,
           "protocol": PROTOCOL, "weights": _weights_note(metrics, inception_weights), "models": entries}
    return _report("eval", out, dev, notes)


def compare(ref_dir: str | os.PathLike, rec_dir: str | os.PathLike, *, device=None, batch_size: int = 8,
            metrics: Sequence[str] = METRICS, inception_weights=None, progress: bool = True) -> dict:
    """The same metrics between two folders of images matched by relative path, each pair of one size, no
    resize (any tokenizer's reconstructions made elsewhere). A path missing on one side or a pair of two
    sizes is a ValueError naming it."""
    metrics = check_metrics(metrics)
    refs, recs = dict(list_images(ref_dir)), dict(list_images(rec_dir))

    def stem(rel: str) -> str:  # match a.jpg with a.png: reconstructions are usually PNGs
        return str(Path(rel).with_suffix(""))

    rec_by_stem = {stem(k): v for k, v in recs.items()}
    missing = [k for k in refs if stem(k) not in rec_by_stem]
    extra = sorted(set(rec_by_stem) - {stem(k) for k in refs})
    if missing or extra:
        raise ValueError(f"{ref_dir} and {rec_dir} do not hold the same images: "
                         + (f"missing in {rec_dir}: {missing[:3]}" if missing else "")
                         + ("; " if missing and extra else "") + (f"only in {rec_dir}: {extra[:3]}" if extra else ""))

    def load(item):
        a, b = load_uint8(item[1]), load_uint8(item[2])
        if a.shape != b.shape:
            raise _SizeMismatch(f"{item[0]}: {a.shape[1]}x{a.shape[0]} in {ref_dir} but {b.shape[1]}x{b.shape[0]} "
                                f"in {rec_dir} (compare does not resize)")
        return a, b

    items = [(k, refs[k], rec_by_stem[stem(k)]) for k in refs]
    run = run_metrics(items, load, {"compare": None}, metrics=metrics, batch_size=batch_size, device=device,
                      inception_weights=inception_weights, progress=progress)
    row = _finite(run["rows"]["compare"])
    out = {"mode": "compare", "reference": str(ref_dir), "reconstructions": str(rec_dir), "n": row["n"],
           "bad_images": run["bad_images"], "n_bad": len(run["bad_images"]), "metrics": list(metrics),
           "seconds": run["seconds"], "protocol": PROTOCOL, "weights": _weights_note(metrics, inception_weights),
           "models": [{"model": f"compare {rec_dir}", "metrics": row}]}
    return _report("eval", out, device)


class _SizeMismatch(ValueError):
    """Not a bad image: compare refuses the whole run (raised through `_batches`)."""


def _finite(row: dict) -> dict:
    """inf (identical images) -> None in JSON, with the reason."""
    out = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    if any(out[k] is None and row[k] is not None for k in row):
        out["note"] = "null: infinite (identical images)"
    return out


def table(report: dict) -> str:
    """One row per evaluated model."""
    cols = ["model", "n", "PSNR", "PSNR mean", "SSIM (7x7 uniform)", "LPIPS", "rFID", "MSE x1000", "MAE"]
    keys = ["psnr", "psnr_mean", "ssim", "lpips", "fid", "mse_x1000", "mae"]
    rows = []
    for m in report["data"]["models"]:
        r = m["metrics"]
        rows.append([m["model"], str(r["n"])] + ["-" if r.get(k) is None else f"{r[k]:.4f}" for k in keys])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    return "\n".join(lines + ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows])
