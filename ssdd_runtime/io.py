"""Images <-> [-1, 1] tensors, latents <-> files (.safetensors, .npy without pickle, .pt with weights_only)."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import struct
import tempfile
from io import BytesIO
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
    # The temp name keeps the suffix, so writers that pick the format from it (PIL, matplotlib) still can.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=folder)
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


@contextlib.contextmanager
def atomic_output_folder(folder: str | os.PathLike, *, last: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder inside `folder` for writers that produce several files by name (an ONNX graph
    and its `.data`); on success fsync every file in it and rename each into `folder`, `last` (the file that
    names the others) last. On any error the temporary folder is removed and `folder` is untouched."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {folder}")
    tmp = Path(tempfile.mkdtemp(prefix=".ssdd-", suffix=".tmp", dir=folder))
    try:
        yield tmp
        files = sorted((f for f in tmp.iterdir() if f.is_file()), key=lambda f: (f.name == last, f.name))
        for f in files:
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, 0o666 & ~_umask())
        for f in files:
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (),
                 reserved: Iterable[str | os.PathLike] = (), flag: str = "-o") -> Path:
    """The one "an output never replaces an input" check, for every command that writes a file: refuse `path`
    when it is one of `inputs` (the same file, through links or another spelling) or lies at or under one of
    `reserved` (what a job owns: its shards, its `.ssdd` state folder). Returns `path`."""
    p = Path(path)
    real = p.resolve()
    for i in inputs:
        if real == Path(i).resolve() or (p.exists() and _same_file(p, i)):
            raise ValueError(f"{flag} {path} is one of the inputs; refusing to overwrite it (it is {i})")
    for r in reserved:
        if real == Path(r).resolve() or real.is_relative_to(Path(r).resolve()):
            raise ValueError(f"{flag} {path} is inside {r}, which holds the input job's own files; refusing to "
                             "write there")
    return p


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def confined_path(output_dir: str | os.PathLike, name: str) -> Path:
    """`output_dir / name` for a relative POSIX-style name with no '..', no absolute part and no drive, else
    ValueError: whatever a latents file or an input path says, nothing is written outside `output_dir`."""
    p = PurePosixPath(str(name).replace("\\", "/"))
    if not p.parts or p.is_absolute() or ".." in p.parts or ":" in p.parts[0] or str(p) in ("", "."):
        raise ValueError(f"output name {name!r} would leave the output folder {output_dir}")
    return Path(output_dir, *p.parts)


def unique_names(names: Sequence[str], taken: Iterable[str] = ()) -> list[str]:
    """Deterministic collision-free names: the first use of a name keeps it; later uses (compared
    case-insensitively, as on case-insensitive file systems) get `-1`, `-2`, ... before the suffix, skipping any
    name that is taken or that another input asks for. Names in `taken` (inputs living in the output folder) are
    never given out."""
    wanted = {n.lower() for n in names}
    used: set[str] = {t.lower() for t in taken}
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
    """A PIL image -> (1, 3, H, W) in [-1, 1]: EXIF orientation applied, then RGB. High-bit-depth modes keep their
    range: 16-bit integer ("I;16*", "I") scales 0..65535, float ("F") is taken as 0..1 (clipped), gray copied to
    RGB; PIL's own convert("RGB") would saturate the former and blacken the latter."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        a = np.asarray(image).astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"{image.mode} image contains non-finite pixel values")
        a = np.clip(a / (1.0 if image.mode == "F" else 65535.0), 0.0, 1.0)
        x = torch.from_numpy(a).float()[None, None].expand(1, 3, *a.shape).contiguous()
        return x * 2.0 - 1.0
    return uint8_to_tensor(np.asarray(image.convert("RGB")))


def tensor_to_pil(x: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray(a) for a in tensor_to_uint8(x)]


def load_image(path: str | os.PathLike, *, multiple_of: int = 1) -> torch.Tensor:
    """Read an image file -> (1, 3, H, W) in [-1, 1]. With multiple_of > 1, center-crop H and W down to
    multiples of it (the encoder needs multiples of its stride). Every unreadable file (not an image, truncated,
    a decompression bomb beyond PIL's pixel limit, a folder) raises FileNotFoundError or ValueError naming it."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, expected an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            x = pil_to_tensor(im)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path} is refused as a possible decompression bomb: {e}") from e
    except PermissionError as e:
        raise PermissionError(f"cannot read {path}: permission denied") from e
    # What Pillow raises on corrupt or truncated files besides OSError (broken chunks, short headers).
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError, struct.error, ValueError) as e:
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
    # Serialised in memory, then written by Python: numpy's tofile() and other C writers can drop a failed write
    # (a full disk) silently and leave a truncated file; Python's write raises.
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        data = save({"latents": z}, metadata={"ssdd": json.dumps(metadata or {})})
    else:
        buf = BytesIO()
        if path.suffix == ".npy":
            np.save(buf, z.numpy(), allow_pickle=False)
        else:
            torch.save({"latents": z, "metadata": metadata or {}}, buf)
        data = buf.getvalue()
    write_bytes_atomic(path, data)


def load_latents(path: str | os.PathLike) -> tuple[torch.Tensor, dict]:
    """Read latents written by `save_latents` (or any file holding one (B, C, h, w) floating-point tensor, B >= 1)
    -> (fp32 tensor, metadata). Integer, bool and complex tensors are refused, not cast."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, expected a latents file (.safetensors, .npy or .pt)")
    if not path.is_file():
        raise FileNotFoundError(f"latent file not found: {path}")
    if path.suffix not in (".safetensors", ".npy", ".pt"):
        raise ValueError(f"unknown latent file type {path.suffix!r}; use .safetensors, .npy or .pt")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"cannot read {path}: permission denied")
    if path.stat().st_size == 0:
        raise ValueError(f"could not read latents from {path}: the file is empty (0 bytes)")
    try:
        z, meta = _read_latents(path)
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) met a pickled object
        raise ValueError(f"could not read latents from {path}: it holds pickled Python objects, which are not "
                         "loaded (no code runs from a latents file); save only tensors: torch.save({'latents': "
                         "z, 'metadata': {...}})") from e
    except Exception as e:  # format-level failures of the three readers: name the file, keep the first line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not read latents from {path}: {reason}") from e
    if not isinstance(z, torch.Tensor) or z.dim() != 4:
        raise ValueError(f"{path}: expected a (B, C, h, w) tensor, got {getattr(z, 'shape', type(z))}")
    if not z.is_floating_point():
        raise ValueError(f"{path}: latents must be floating point, got {z.dtype} (not cast: it would change values)")
    if z.numel() == 0:
        raise ValueError(f"{path}: no latents (shape {tuple(z.shape)})")
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: metadata must be a dict, got {type(meta).__name__}")
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
        a = np.load(path, allow_pickle=False)
        if not a.dtype.isnative:  # big-endian files (numpy writes '>f4' on such machines): same values, native order
            a = a.astype(a.dtype.newbyteorder("="))
        return torch.from_numpy(a), {}
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return (obj["latents"], obj.get("metadata", {})) if isinstance(obj, dict) else (obj, {})
