"""Images <-> [-1, 1] tensors, latents <-> files (.safetensors, .npy without pickle, .pt with weights_only)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def scan_folder(folder: str | os.PathLike, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Files under `folder` (recursively) whose suffix, in any case, is one of `suffixes`; sorted."""
    return sorted(f for f in Path(folder).rglob("*") if f.is_file() and f.suffix.lower() in suffixes)


def list_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files and folders (searched with `scan_folder`) -> image paths, in the order given. A file is taken
    as given whatever its suffix; unreadable images are the reader's to report."""
    inputs = list(inputs)
    paths: list[Path] = []
    for src in inputs:
        p = Path(src)
        if p.is_dir():
            paths += scan_folder(p)
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"input not found: {src}")
    if not paths:
        raise ValueError(f"no images found in {[str(src) for src in inputs]}")
    return paths


def same_shape_batches(items: Iterable[tuple[object, torch.Tensor]], batch_size: int | None = None
                       ) -> Iterator[tuple[list, torch.Tensor]]:
    """(tag, x) pairs, each x one item (1, ...) -> (tags, torch.cat(xs)) for runs of consecutive items of one
    shape, at most `batch_size` per batch (None: no limit). Streams: holds one batch at a time."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    tags: list = []
    xs: list[torch.Tensor] = []
    for tag, x in items:
        if xs and (x.shape != xs[0].shape or len(xs) == batch_size):
            yield tags, torch.cat(xs)
            tags, xs = [], []
        tags.append(tag)
        xs.append(x)
    if xs:
        yield tags, torch.cat(xs)


# ---------------------------------------------------------------------------------------------------------
# The one output writer (STYLE rule 15): temp file in the target folder, fsync, rename; names confined to -o.


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on success fsync it and rename it to `path`, so `path` is
    either absent, its previous content, or complete. On any error (or KeyboardInterrupt) the temp file is
    removed. `overwrite=False` refuses an existing `path` (FileExistsError). The folder must exist."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {folder}")
    if path.is_dir():
        raise IsADirectoryError(f"output path is a folder, expected a file: {path}")
    if not overwrite and path.exists():
        raise FileExistsError(f"output file exists: {path}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def confined_path(output_dir: str | os.PathLike, name: str) -> Path:
    """`output_dir / name` for a relative POSIX-style name with no '..', no absolute part and no drive, else
    ValueError: whatever a latents file or an input path says, nothing is written outside `output_dir`."""
    p = PurePosixPath(str(name).replace("\\", "/"))
    if not p.parts or p.is_absolute() or ".." in p.parts or ":" in p.parts[0] or str(p) in ("", "."):
        raise ValueError(f"output name {name!r} would leave the output folder {output_dir}")
    return Path(output_dir, *p.parts)


def unique_names(names: Sequence[str]) -> list[str]:
    """Deterministic collision-free names: the first use of a name keeps it; later uses (compared
    case-insensitively, as on case-insensitive file systems) get `-1`, `-2`, ... before the suffix, skipping any
    name that is taken or that another input asks for."""
    wanted = {n.lower() for n in names}
    used: set[str] = set()
    out = []
    for n in names:
        cand, k = n, 0
        head, dot, suffix = n.rpartition(".") if "." in PurePosixPath(n).name else (n, "", "")
        while cand.lower() in used or (k and cand.lower() in wanted):
            k += 1
            cand = f"{head}-{k}{dot}{suffix}"
        used.add(cand.lower())
        out.append(cand)
    return out


def uint8_to_tensor(images) -> torch.Tensor:
    """uint8 array(s) (H, W, 3) or (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1]."""
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise TypeError(f"expected a uint8 array, got {a.dtype}")
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3) or (B, H, W, 3) RGB uint8, got shape {a.shape}")
    return torch.from_numpy(a.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) or (3, H, W) in [-1, 1] -> uint8 (B, H, W, 3); clamps and rounds like the official eval."""
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) images, got shape {tuple(x.shape)}")
    y = ((x.detach().float().cpu() + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return y.permute(0, 2, 3, 1).numpy()


def pil_to_tensor(image) -> torch.Tensor:
    """A PIL image -> (1, 3, H, W) in [-1, 1] (converted to RGB)."""
    return uint8_to_tensor(np.asarray(image.convert("RGB")))


def tensor_to_pil(x: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray(a) for a in tensor_to_uint8(x)]


def load_image(path: str | os.PathLike, *, multiple_of: int = 1) -> torch.Tensor:
    """Read an image file -> (1, 3, H, W) in [-1, 1]. With multiple_of > 1, center-crop H and W down to
    multiples of it (the encoder needs multiples of its stride)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            x = pil_to_tensor(im)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image: {e}") from e
    return center_crop(x, multiple_of, name=str(path))


def center_crop(x: torch.Tensor, multiple_of: int, *, name: str = "image") -> torch.Tensor:
    """Center-crop (..., H, W) down to multiples of `multiple_of` (the encoder needs multiples of its stride)."""
    H, W = x.shape[-2:]
    h, w = H // multiple_of * multiple_of, W // multiple_of * multiple_of
    if h == 0 or w == 0:
        raise ValueError(f"{name} is {W}x{H}: smaller than the encoder stride {multiple_of}")
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top:top + h, left:left + w]


def adm_center_crop(image, size: int):
    """The ADM / guided-diffusion `center_crop_arr` (as in fast-DiT and LightningDiT `extract_features.py`): a PIL
    image -> RGB PIL image of size x size: halve with BOX while the short side is >= 2 * size, resize the short
    side to `size` with BICUBIC, then center-crop."""
    from PIL import Image

    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def save_image(x: torch.Tensor, path: str | os.PathLike) -> None:
    """Write one image atomically; the format comes from `path`'s suffix (PNG for .png)."""
    (img,) = tensor_to_pil(x if x.dim() == 4 else x[None])
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(Path(path).suffix.lower(), Path(path).suffix[1:].upper() or "PNG")
    with atomic_output(path) as tmp:
        img.save(tmp, format=fmt)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of two (B, 3, H, W) batches in [-1, 1], after 8-bit quantisation of both."""
    ua = torch.from_numpy(tensor_to_uint8(a)).float()
    ub = torch.from_numpy(tensor_to_uint8(b)).float()
    mse = ((ua - ub) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))


def save_latents(path: str | os.PathLike, z: torch.Tensor, metadata: dict | None = None) -> None:
    """Write latents (B, C, h, w) by suffix: .safetensors (tensor 'latents' + JSON metadata), .npy, .pt."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".npy", ".pt"):
        raise ValueError(f"unknown latent file type {path.suffix!r}; use .safetensors, .npy or .pt")
    z = z.detach().float().cpu().contiguous()
    with atomic_output(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({"latents": z}, tmp, metadata={"ssdd": json.dumps(metadata or {})})
        elif path.suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, z.numpy(), allow_pickle=False)
        else:
            torch.save({"latents": z, "metadata": metadata or {}}, tmp)


def load_latents(path: str | os.PathLike) -> tuple[torch.Tensor, dict]:
    """Read latents written by `save_latents` (or any file holding one (B, C, h, w) float tensor)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latent file not found: {path}")
    if path.suffix not in (".safetensors", ".npy", ".pt"):
        raise ValueError(f"unknown latent file type {path.suffix!r}; use .safetensors, .npy or .pt")
    try:
        z, meta = _read_latents(path)
    except Exception as e:  # format-level failures of the three readers: name the file
        raise ValueError(f"could not read latents from {path}: {e}") from e
    if not isinstance(z, torch.Tensor) or z.dim() != 4:
        raise ValueError(f"{path}: expected a (B, C, h, w) tensor, got {getattr(z, 'shape', type(z))}")
    return z.float(), meta


def _read_latents(path: Path):
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            names = list(f.keys())
            if "latents" not in names and len(names) != 1:
                raise ValueError(f"tensors {names[:5]}; expected one named 'latents'")
            return f.get_tensor("latents" if "latents" in names else names[0]), json.loads(
                (f.metadata() or {}).get("ssdd", "{}"))
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False)), {}
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return (obj["latents"], obj.get("metadata", {})) if isinstance(obj, dict) else (obj, {})
