"""Dataset-scale tokenization on Ray Data: images -> latent shards (`tokenize`), shards -> PNGs (`detokenize`).

Flow of `tokenize` (the same for one machine and a multi-node cluster):
1. The driver lists the inputs (image folders, image files, parquet files with an image-bytes column) into
   items with a unique key, in a deterministic order, and cuts them into shards of `shard_size` items.
2. Shards whose output file already exists are skipped (files are written to a temporary name and renamed, so
   an existing shard is a complete one): re-running the same command resumes an interrupted job.
3. The items of the missing shards go through `Dataset.map_batches` with an actor pool: each actor loads the
   model once (`SSDD.from_pretrained`, on its GPU when `num_gpus_per_actor > 0`), reads and decodes its images,
   and encodes them with `model.encode(x).mode()` (the latent mean, fp32).
4. The driver collects the rows and writes each shard as soon as all its items are back: parquet (columns key,
   latent (fp32 little-endian bytes), shape, checkpoint, error) or safetensors (one tensor per key, metadata JSON
   with keys, shapes, errors, checkpoint). Only the driver writes, so OUTDIR needs no shared filesystem; the
   inputs and a local `--checkpoint` must be readable by every node (shared storage), or use `--repo` so each
   node downloads the checkpoint into its own Hugging Face cache.

Bad items (unreadable file, not an image, image smaller than the encoder stride) never stop the job: each is
recorded with its error message in its shard (parquet `error` column / safetensors metadata "errors"), counted
in the returned report, and logged. Images are encoded at their own size, center-cropped to multiples of the
encoder stride (as `ssdd encode` does); images of different sizes in one batch are encoded in same-size groups.

ray is imported inside the functions that need it (`pip install 'ssdd-runtime[ray]'`); this module's name does
not shadow the real package because every import here is absolute.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ssdd_runtime.io import (IMAGE_SUFFIXES, center_crop, pil_to_tensor, same_shape_batches, scan_folder,
                             tensor_to_pil)
from ssdd_runtime.sampler import T_POW_SHIFT, seeded_noise

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ssdd-runtime[ray]' (ray[data] and pyarrow)"
MANIFEST = "_ssdd_tokenize.json"
FORMATS = ("parquet", "safetensors")


def _import_ray():
    try:
        import ray  # the top-level package: absolute import, not this module
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError(f"Ray Data is needed for this command: {INSTALL_HINT}") from e
    return ray


# ---------------------------------------------------------------------------------------------------------
# Inputs and the shard plan


@dataclass(frozen=True)
class Item:
    key: str  # unique name: relative path for folders, the path as given for files, "<parquet stem>/<row>" rows
    path: str  # image file, or the parquet file holding the row
    row: int = -1  # >= 0: row index inside the parquet file


def list_inputs(inputs: str | os.PathLike | list, *, image_column: str = "image",
                key_column: str | None = None) -> list[Item]:
    """Expand folders (recursively: image files and *.parquet), image files and parquet files into items, sorted
    by key. Parquet rows take their key from `key_column` when given, else "<file stem>/<row:08d>"."""
    sources = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not sources:
        raise ValueError("no inputs given: expected a folder, image files or parquet files")
    items: list[Item] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            for f in scan_folder(p, IMAGE_SUFFIXES + (".parquet",)):
                rel = f.relative_to(p).as_posix()
                if f.suffix.lower() == ".parquet":
                    items += _parquet_items(f, rel[: -len(".parquet")], image_column, key_column)
                else:
                    items.append(Item(rel, str(f)))
        elif p.is_file():
            if p.suffix.lower() == ".parquet":
                items += _parquet_items(p, p.stem, image_column, key_column)
            else:  # any other file is taken as an image; unreadable ones are reported per item, not here
                items.append(Item(str(src), str(p)))
        else:
            raise FileNotFoundError(f"input not found: {src} (expected a folder, an image file or a parquet file)")
    items.sort(key=lambda it: it.key)
    dup = [a.key for a, b in zip(items, items[1:]) if a.key == b.key]
    if dup:
        raise ValueError(f"duplicate item keys {dup[:5]}: give each input folder/file once, or a unique "
                         f"--key-column for parquet")
    return items


def _parquet_items(path: Path, prefix: str, image_column: str, key_column: str | None) -> list[Item]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if image_column not in names:
        raise ValueError(f"{path} has no image column {image_column!r}; columns are {names}")
    if key_column is None:
        return [Item(f"{prefix}/{r:08d}", str(path), r) for r in range(pf.metadata.num_rows)]
    if key_column not in names:
        raise ValueError(f"{path} has no key column {key_column!r}; columns are {names}")
    keys = pf.read(columns=[key_column]).column(0).to_pylist()
    return [Item(str(k), str(path), r) for r, k in enumerate(keys)]


def plan_shards(items: list[Item], shard_size: int) -> list[list[Item]]:
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    return [items[i:i + shard_size] for i in range(0, len(items), shard_size)]


def shard_path(output_dir: Path, index: int, fmt: str) -> Path:
    return output_dir / f"shard-{index:05d}.{fmt}"


# ---------------------------------------------------------------------------------------------------------
# Workers (plain classes: Ray Data runs one instance per actor)


def _image_from_bytes(data: bytes, stride: int) -> torch.Tensor:
    """Encoded image bytes -> (1, 3, H, W) in [-1, 1], center-cropped to multiples of the stride."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return center_crop(pil_to_tensor(im), stride)


class _ParquetRows:
    """Reads single cells of an image column, caching the last row group (batches are mostly consecutive rows)."""

    def __init__(self, column: str):
        self.column = column
        self.files: dict = {}
        self.cached: tuple | None = None  # (path, row group, pylist, first row)

    def get(self, path: str, row: int) -> bytes:
        import pyarrow.parquet as pq

        if path not in self.files:
            pf = pq.ParquetFile(path)
            starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
            self.files[path] = (pf, starts)
        pf, starts = self.files[path]
        g = int(np.searchsorted(starts, row, side="right") - 1)
        if self.cached is None or self.cached[:2] != (path, g):
            values = pf.read_row_group(g, columns=[self.column]).column(0).to_pylist()
            self.cached = (path, g, values, int(starts[g]))
        value = self.cached[2][row - self.cached[3]]
        if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes")
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError(f"row {row} of {path}: column {self.column!r} holds {type(value).__name__}, "
                             "expected image bytes")
        return bytes(value)


def _load_model(source, filename, revision, dtype, num_gpus: float):
    from ssdd_runtime.api import SSDD

    device = "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
    return SSDD.from_pretrained(source, filename, revision=revision, dtype=dtype, device=device)


class _EncodeActor:
    def __init__(self, source, filename, revision, dtype, num_gpus, image_column):
        self.model = _load_model(source, filename, revision, dtype, num_gpus)
        self.rows = _ParquetRows(image_column)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        latents, shapes, errors = [b""] * n, [""] * n, [""] * n
        images = []  # (index, (1, 3, H, W))
        for i in range(n):
            path, row = str(batch["path"][i]), int(batch["row"][i])
            try:
                if row >= 0:
                    data = self.rows.get(path, row)
                else:
                    with open(path, "rb") as f:
                        data = f.read()
                images.append((i, _image_from_bytes(data, self.model.stride)))
            except (OSError, ValueError, SyntaxError) as e:  # PIL: OSError/UnidentifiedImageError, SyntaxError
                errors[i] = f"{type(e).__name__}: {e}"
        images.sort(key=lambda item: tuple(item[1].shape))  # stable: one forward pass per image size
        for index, x in same_shape_batches(images):
            z = self.model.encode(x).mode().cpu()  # fp32 (b, C, h, w)
            for i, zi in zip(index, z):
                latents[i] = zi.numpy().astype("<f4").tobytes()
                shapes[i] = ",".join(map(str, zi.shape))
        return {"key": batch["key"], "shard": batch["shard"], "latent": np.array(latents, dtype=object),
                "shape": np.array(shapes, dtype=object), "error": np.array(errors, dtype=object)}


class _DecodeActor:
    def __init__(self, source, filename, revision, dtype, num_gpus, steps, t_pow_shift, seed):
        self.model = _load_model(source, filename, revision, dtype, num_gpus)
        self.steps, self.t_pow_shift, self.seed = steps, t_pow_shift, seed
        self.cached: tuple | None = None  # (shard path, {key: latent})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        pngs, errors = [b""] * n, [""] * n
        latents = []  # (index, (1, C, h, w))
        for i in range(n):
            shard, key = str(batch["shard_file"][i]), str(batch["key"][i])
            try:
                if self.cached is None or self.cached[0] != shard:
                    self.cached = (shard, read_shard(shard)[0])
                latents.append((i, self.cached[1][key][None]))
            except (OSError, ValueError, KeyError) as e:
                errors[i] = f"{type(e).__name__}: {e}"
        latents.sort(key=lambda item: tuple(item[1].shape))  # stable: one forward pass per latent size
        F_ = self.model.stride
        for index, z in same_shape_batches(latents):
            B, _, h, w = z.shape
            # every image gets the same seeded start noise: the output depends only on its latent and the seed
            noise = seeded_noise((3, h * F_, w * F_), self.seed, B, device=self.model.device)
            img = self.model.decode(z, steps=self.steps, t_pow_shift=self.t_pow_shift, noise=noise)
            for i, pil in zip(index, tensor_to_pil(img)):
                buf = io.BytesIO()
                pil.save(buf, format="PNG")
                pngs[i] = buf.getvalue()
        return {"key": batch["key"], "png": np.array(pngs, dtype=object), "error": np.array(errors, dtype=object)}


# ---------------------------------------------------------------------------------------------------------
# Shard files


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_shard(path: Path, rows: list[dict], info: dict) -> None:
    """rows: dicts with key, latent (fp32 bytes or b""), shape ("C,h,w" or ""), error ("" if none), in order."""
    fmt = path.suffix[1:]
    meta = {**info, "keys": [r["key"] for r in rows],
            "errors": {r["key"]: r["error"] for r in rows if r["error"]}}
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        ok = [not r["error"] for r in rows]
        table = pa.table({
            "key": pa.array([r["key"] for r in rows], pa.string()),
            "latent": pa.array([r["latent"] if k else None for r, k in zip(rows, ok)], pa.binary()),
            "shape": pa.array([[int(s) for s in r["shape"].split(",")] if k else None for r, k in zip(rows, ok)],
                              pa.list_(pa.int32())),
            "checkpoint": pa.array([info["checkpoint"]] * len(rows), pa.string()),
            "error": pa.array([r["error"] or None for r in rows], pa.string()),
        })
        table = table.replace_schema_metadata({"ssdd": json.dumps({k: v for k, v in meta.items() if k != "keys"})})
        _write_atomic(path, lambda p: pq.write_table(table, p))
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        tensors = {r["key"]: _latent_tensor(r) for r in rows if not r["error"]}
        _write_atomic(path, lambda p: save_file(tensors, str(p), metadata={"ssdd": json.dumps(meta)}))
    else:
        raise ValueError(f"unknown shard format {fmt!r}; expected one of {FORMATS}")


def _latent_tensor(r: dict) -> torch.Tensor:
    shape = tuple(int(s) for s in r["shape"].split(","))
    return torch.from_numpy(np.frombuffer(r["latent"], dtype="<f4").reshape(shape).copy())


def read_shard(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """A shard written by `tokenize` -> ({key: fp32 latent (C, h, w)}, info with "errors" {key: message})."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        info = json.loads((table.schema.metadata or {}).get(b"ssdd", b"{}"))
        latents = {}
        for key, blob, shape in zip(*(table.column(c).to_pylist() for c in ("key", "latent", "shape"))):
            if blob is not None:
                latents[key] = torch.from_numpy(np.frombuffer(blob, dtype="<f4").reshape(shape).copy())
        return latents, info
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            info = json.loads((f.metadata() or {}).get("ssdd", "{}"))
            return {k: f.get_tensor(k) for k in f.keys()}, info
    raise ValueError(f"{path}: not a shard (.parquet or .safetensors)")


def list_shards(directory: str | os.PathLike) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"latent folder not found: {d}")
    shards = sorted(p for p in d.iterdir() if p.name.startswith("shard-") and p.suffix[1:] in FORMATS)
    if not shards:
        raise FileNotFoundError(f"no shard-*.parquet / shard-*.safetensors files in {d}")
    return shards


# ---------------------------------------------------------------------------------------------------------
# Jobs


@dataclass
class Report:
    output_dir: str
    total: int = 0  # items in the whole job (this run and earlier runs)
    done: int = 0  # items processed by this run (encoded/decoded successfully)
    failed: int = 0  # items of this run that failed (see errors)
    skipped: int = 0  # items skipped because their shard / PNG already existed
    shards_written: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # key -> message, this run
    checkpoint: str | None = None

    def summary(self) -> str:
        s = (f"{self.done} ok, {self.failed} failed, {self.skipped} skipped (already done) of {self.total} items")
        if self.shards_written or self.shards_skipped:
            s += f"; shards: {len(self.shards_written)} written, {len(self.shards_skipped)} skipped"
        return s + f" -> {self.output_dir}"


def _start_ray(address: str | None, num_cpus: int | None):
    ray = _import_ray()
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus)
    return ray


def _pool(ray, num_gpus_per_actor: float | None, concurrency: int | None) -> tuple[float, int]:
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1.0 if gpus > 0 else 0.0
    if num_gpus_per_actor < 0:
        raise ValueError(f"num_gpus_per_actor must be >= 0, got {num_gpus_per_actor}")
    if concurrency is None:
        concurrency = max(1, int(gpus // num_gpus_per_actor)) if num_gpus_per_actor > 0 else 1
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive integer, got {concurrency!r}")
    return num_gpus_per_actor, concurrency


def _map_kwargs(ray, ctor: dict, batch_size: int, num_gpus: float, concurrency: int) -> dict:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return dict(fn_constructor_kwargs=ctor, batch_size=batch_size, batch_format="numpy", num_gpus=num_gpus,
                compute=ray.data.ActorPoolStrategy(size=concurrency))


def _resolve(source, filename, revision) -> tuple[Path, str]:
    from ssdd_runtime.integrations.latent_stats import checkpoint_id
    from ssdd_runtime.weights import resolve_checkpoint

    path = resolve_checkpoint(source, filename, revision=revision)
    return path, checkpoint_id(path)


def tokenize(inputs, output_dir: str | os.PathLike, *, checkpoint: str | os.PathLike, filename: str | None = None,
             revision: str | None = None, format: str = "parquet", shard_size: int = 256, batch_size: int = 8,
             concurrency: int | None = None, num_gpus_per_actor: float | None = None, dtype: str = "fp32",
             image_column: str = "image", key_column: str | None = None, address: str | None = None,
             num_cpus: int | None = None) -> Report:
    """Encode every input image to its latent mean and write shards to output_dir (module docstring).

    checkpoint: a local .safetensors path or a Hub repo id (then `filename`). Ray: an already initialised Ray is
    used as is, else `ray.init(address=address, num_cpus=num_cpus)` (address None starts a local instance,
    "auto" or "ray://host:10001" joins a cluster). Actors: `concurrency` of them (default: one per GPU, or 1 on
    CPU), each with `num_gpus_per_actor` GPUs (default 1 when the cluster has GPUs, else 0 = CPU).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    out = Path(output_dir)
    items = list_inputs(inputs, image_column=image_column, key_column=key_column)
    shards = plan_shards(items, shard_size)
    ckpt_path, ckpt_id = _resolve(checkpoint, filename, revision)
    manifest = {"checkpoint": ckpt_id, "format": format, "shard_size": shard_size, "num_items": len(items),
                "num_shards": len(shards), "keys_sha256": hashlib.sha256("\n".join(i.key for i in items).encode())
                .hexdigest()}
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(out / MANIFEST, manifest)
    report = Report(str(out), total=len(items), checkpoint=ckpt_id)
    pending = []
    for s, shard in enumerate(shards):
        if shard_path(out, s, format).exists():
            report.shards_skipped.append(s)
            report.skipped += len(shard)
        else:
            pending.append(s)
    log.info("tokenize: %d items in %d shards, %d shards to write", len(items), len(shards), len(pending))
    if not pending:
        return report

    ray = _start_ray(address, num_cpus)
    num_gpus, concurrency = _pool(ray, num_gpus_per_actor, concurrency)
    rows = [{"key": it.key, "path": it.path, "row": it.row, "shard": s} for s in pending for it in shards[s]]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(1000, math.ceil(len(rows) / batch_size))))
    source = str(ckpt_path) if Path(str(checkpoint)).exists() else str(checkpoint)
    ctor = dict(source=source, filename=None if source == str(ckpt_path) else filename, revision=revision,
                dtype=dtype, num_gpus=num_gpus, image_column=image_column)
    ds = ds.map_batches(_EncodeActor, **_map_kwargs(ray, ctor, batch_size, num_gpus, concurrency))

    order = {(s, it.key): j for s in pending for j, it in enumerate(shards[s])}
    buffers: dict[int, list[dict]] = defaultdict(list)
    info = {"checkpoint": ckpt_id, "format_version": 1, "dtype": "float32", "layout": "C,h,w"}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key, s, latent, shape, err in zip(batch["key"], batch["shard"], batch["latent"], batch["shape"],
                                              batch["error"]):
            s = int(s)
            buffers[s].append({"key": str(key), "latent": latent, "shape": str(shape), "error": str(err)})
            if err:
                report.failed += 1
                report.errors[str(key)] = str(err)
                log.warning("tokenize: %s failed: %s", key, err)
            else:
                report.done += 1
            if len(buffers[s]) == len(shards[s]):
                rows_s = sorted(buffers.pop(s), key=lambda r: order[(s, r["key"])])
                write_shard(shard_path(out, s, format), rows_s, {**info, "shard": s})
                report.shards_written.append(s)
    if buffers:  # every row must come back exactly once; a partial shard is never written
        raise RuntimeError(f"Ray Data returned incomplete shards {sorted(buffers)}: nothing written for them; "
                           "re-run the command to retry")
    return report


def _check_manifest(path: Path, manifest: dict) -> None:
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = {k: (old.get(k), v) for k, v in manifest.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{path.parent} holds shards of a different job ({', '.join(diff)} differ: "
                             f"{diff}); use a new output folder or delete it")
    else:
        path.write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def png_name(key: str) -> PurePosixPath:
    """Output PNG path (relative) for an item key: image suffix replaced by .png, sub-folders kept."""
    p = PurePosixPath(key.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts:
        p = PurePosixPath(*[part for part in p.parts if part not in ("/", "..")])
    name = p.stem if p.suffix.lower() in IMAGE_SUFFIXES else p.name
    return p.with_name(name + ".png")


def detokenize(latents_dir: str | os.PathLike, output_dir: str | os.PathLike, *, checkpoint: str | os.PathLike,
               filename: str | None = None, revision: str | None = None, steps: int = 1,
               t_pow_shift: float = T_POW_SHIFT, seed: int = 0, batch_size: int = 8, concurrency: int | None = None,
               num_gpus_per_actor: float | None = None, dtype: str = "fp32", address: str | None = None,
               num_cpus: int | None = None) -> Report:
    """Decode every latent of the shards in latents_dir to `<output_dir>/<key>.png` (image suffix replaced).
    PNGs that already exist are skipped (resumable). Every image's start noise comes from
    `torch.Generator().manual_seed(seed)`, so an image depends only on its latent, the seed and the steps."""
    out = Path(output_dir)
    _, ckpt_id = _resolve(checkpoint, filename, revision)
    items, names = [], {}
    report = Report(str(out), checkpoint=ckpt_id)
    for shard in list_shards(latents_dir):
        latents, info = read_shard(shard)
        if info.get("checkpoint") not in (None, ckpt_id):
            log.warning("detokenize: %s was encoded with %s, decoding with %s", shard.name, info["checkpoint"],
                        ckpt_id)
        for key in info.get("keys", sorted(latents)):
            if key not in latents:
                continue  # an item that failed to encode: reported by tokenize, nothing to decode
            name = png_name(key)
            if name in names:
                raise ValueError(f"keys {names[name]!r} and {key!r} both map to {name}: rename one input")
            names[name] = key
            report.total += 1
            if (out / name).exists():
                report.skipped += 1
            else:
                items.append({"key": key, "shard_file": str(shard), "png_name": str(name)})
    if not items:
        return report
    ray = _start_ray(address, num_cpus)
    num_gpus, concurrency = _pool(ray, num_gpus_per_actor, concurrency)
    source = str(checkpoint)
    ctor = dict(source=source, filename=filename, revision=revision, dtype=dtype, num_gpus=num_gpus, steps=steps,
                t_pow_shift=t_pow_shift, seed=seed)
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(1000, math.ceil(len(items) / batch_size))))
    ds = ds.map_batches(_DecodeActor, **_map_kwargs(ray, ctor, batch_size, num_gpus, concurrency))
    by_key = {it["key"]: it["png_name"] for it in items}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key, png, err in zip(batch["key"], batch["png"], batch["error"]):
            key = str(key)
            if err:
                report.failed += 1
                report.errors[key] = str(err)
                log.warning("detokenize: %s failed: %s", key, err)
                continue
            dest = out / by_key[key]
            dest.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(dest, lambda p, data=png: p.write_bytes(data))
            report.done += 1
    return report
