"""Dataset-scale tokenization on Ray Data: images -> training-ready latent shards (`tokenize`), shards -> PNGs
(`detokenize`). The shard format and the torch datasets that read it are in `ssdd_runtime.data`.

Flow of `tokenize` (the same for one machine and a multi-node cluster):
1. The driver lists the inputs (image folders, image files, parquet files with an image column: bytes, or the
   Hugging Face `{"bytes", "path"}` struct) into items with a unique key and a label, in key order.
2. Preprocessing is fixed per job: `resolution=N` is the ADM center crop + resize to N x N (fast-DiT and
   LightningDiT `extract_features.py`); without it each image keeps its size, center-cropped to multiples of the
   encoder stride, and the driver reads every image header first so that items are grouped by latent shape:
   each shard holds one shape. Shards are cut from the shape groups, `shard_size` items each.
3. Shards whose file exists and passes `_verify_shard` are skipped: re-running resumes a job. A truncated or
   corrupt shard is written again; one of another job (options, items, shape) is refused, never overwritten.
4. The items of the missing shards go through `Dataset.map_batches` with an actor pool: each actor loads the
   model once, uses the CPUs it is given (`torch.set_num_threads(num_cpus_per_actor)`), reads and decodes its
   images and encodes them (and their horizontal flips with `flip=True`) with `model.encode`: the mean, and
   the log-variance with `store="moments"`.
5. The driver collects rows and writes each shard (`ssdd_runtime.data.write_shard`) once all its items are back.
   Only the driver writes, so OUTDIR needs no shared filesystem; the inputs and a local `--checkpoint` must be
   readable by every node (or use `--repo` so each node downloads the checkpoint into its own HF cache).

Bad items (unreadable file, not an image, decompression bomb, missing HF path, image smaller than the stride,
a latent or image the model refuses: `per_item`) never stop the job: each is recorded with its message
(shard metadata "errors", or the manifest "errors" for items whose header could not be read while planning),
counted in the report and logged; data shards hold only good rows, so a training loop never meets a null
latent.

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
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ssdd_runtime.checks import check_sampler_args
from ssdd_runtime.data import (FORMAT_VERSION, FORMATS, MANIFEST, SIDECAR, job_file, list_shards, read_manifest,
                               read_shard, shard_keys, shard_path, write_shard)
from ssdd_runtime.io import (IMAGE_SUFFIXES, adm_center_crop, center_crop, confined_path,
                             pil_to_tensor, same_shape_batches, scan_folder, tensor_to_pil, unique_names,
                             write_bytes_atomic, write_text_atomic)
from ssdd_runtime.sampler import T_POW_SHIFT, seeded_noise

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ssdd-runtime[ray]' (ray[data] and pyarrow)"
STORES = ("mode", "moments")
ACTOR_START_TIMEOUT_S = 900  # the actor pool's start-up (model load; a Hub download per node) must finish in this


def _import_ray():
    try:
        import ray  # the top-level package: absolute import, not this module
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError(f"Ray Data is needed for this command: {INSTALL_HINT}") from e
    return ray


def _bad_image_errors() -> tuple[type[BaseException], ...]:
    """What reading one image may raise: PIL's OSError/UnidentifiedImageError, SyntaxError (broken headers),
    EOFError (truncated), DecompressionBombError (a header claiming > 2 * MAX_IMAGE_PIXELS), and ValueError."""
    from PIL import Image

    return OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError


# ---------------------------------------------------------------------------------------------------------
# Inputs, labels and the shard plan


@dataclass(frozen=True)
class Item:
    key: str  # unique name: relative path for folders, the path as given for files, "<parquet stem>/<row>" rows
    path: str  # image file, or the parquet file holding the row
    row: int = -1  # >= 0: row index inside the parquet file
    label: int = -1  # class index, -1 without labels


def list_inputs(inputs: str | os.PathLike | list, *, image_column: str = "image", key_column: str | None = None,
                labels: str = "none", output_dir: str | os.PathLike | None = None
                ) -> tuple[list[Item], list[str] | None]:
    """Expand folders (recursively: image files and *.parquet), image files and parquet files into items sorted
    by key, and the class names (None when labels are not class names). Parquet rows take their key from
    `key_column` when given, else "<file stem>/<row:08d>".

    output_dir: the job's output folder; its shards and `.ssdd` state are never taken as inputs, so an output
    folder inside an input folder resumes like any other.

    labels: "none" (label -1); "folder": ImageFolder-style, the first sub-folder under the input folder names
    the class and classes are numbered in sorted order (torchvision's convention); any other value is a parquet
    column: integers are kept, strings numbered in sorted order."""
    sources = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not sources:
        raise ValueError("no inputs given: expected a folder, image files or parquet files")
    column = None if labels in ("none", "folder") else labels
    found: list[tuple[Item, object]] = []  # (item without label, raw label)
    for src in sources:
        p = Path(src)
        if p.is_dir():
            for f in scan_folder(p, IMAGE_SUFFIXES + (".parquet",)):
                if output_dir is not None and job_file(f, output_dir):
                    continue
                rel = f.relative_to(p).as_posix()
                folder = rel.split("/")[0] if "/" in rel else None
                if f.suffix.lower() == ".parquet":
                    found += [(it, folder if labels == "folder" else raw) for it, raw in
                              _parquet_items(f, rel[: -len(".parquet")], image_column, key_column, column)]
                else:
                    found.append((Item(rel, str(f)), folder))
        elif p.is_file():
            if p.suffix.lower() == ".parquet":
                found += _parquet_items(p, p.stem, image_column, key_column, column)
            else:  # any other file is taken as an image; unreadable ones are reported per item, not here
                found.append((Item(str(src), str(p)), None))
        else:
            raise FileNotFoundError(f"input not found: {src} (expected a folder, an image file or a parquet file)")
    if not found:
        raise ValueError(f"no images or parquet files found in {[str(src) for src in sources]}")
    found.sort(key=lambda pair: pair[0].key)
    dup = [a.key for (a, _), (b, _) in zip(found, found[1:]) if a.key == b.key]
    if dup:
        raise ValueError(f"duplicate item keys {dup[:5]}: give each input folder/file once, or a unique "
                         f"--key-column for parquet")
    if labels == "none":
        return [it for it, _ in found], None
    missing = [it.key for it, raw in found if raw is None]
    if missing:
        where = ("images inside class sub-folders of an input folder (ImageFolder layout)" if labels == "folder"
                 else f"parquet rows with a non-null {labels!r} column")
        raise ValueError(f"--labels {labels}: {len(missing)} items have no label, e.g. {missing[:3]}; expected {where}")
    raws = [raw for _, raw in found]
    if all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) for r in raws):
        return [Item(it.key, it.path, it.row, int(r)) for it, r in found], None
    if all(isinstance(r, str) for r in raws):
        classes = sorted(set(raws))
        index = {c: i for i, c in enumerate(classes)}
        return [Item(it.key, it.path, it.row, index[r]) for it, r in found], classes
    kinds = sorted({type(r).__name__ for r in raws})
    raise ValueError(f"--labels {labels}: labels must be all integers or all strings, got {kinds}")


def _parquet_items(path: Path, prefix: str, image_column: str, key_column: str | None,
                   label_column: str | None) -> list[tuple[Item, object]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise ValueError(f"input {path} is not a readable parquet file ({' '.join(str(e).split())})") from e
    names = pf.schema_arrow.names
    for what, col in (("image", image_column), ("key", key_column), ("label", label_column)):
        if col is not None and col not in names:
            raise ValueError(f"{path} has no {what} column {col!r}; columns are {names}")
    n = pf.metadata.num_rows
    keys = ([f"{prefix}/{r:08d}" for r in range(n)] if key_column is None
            else [str(k) for k in pf.read(columns=[key_column]).column(0).to_pylist()])
    raws = [None] * n if label_column is None else pf.read(columns=[label_column]).column(0).to_pylist()
    return [(Item(k, str(path), r), raw) for r, (k, raw) in enumerate(zip(keys, raws))]


def plan_shards(items: list[Item], shard_size: int, shapes: dict[str, tuple] | None = None
                ) -> list[tuple[tuple, list[Item]]]:
    """[(latent shape, items)] per shard: items grouped by shape (sorted), in key order inside a group, cut into
    `shard_size`. `shapes` maps key -> shape (items without one are left out); None: one group of shape ()."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    groups: dict[tuple, list[Item]] = defaultdict(list)
    for it in items:
        if shapes is None:
            groups[()].append(it)
        elif it.key in shapes:
            groups[shapes[it.key]].append(it)
    return [(shape, group[i:i + shard_size]) for shape, group in sorted(groups.items())
            for i in range(0, len(group), shard_size)]


# ---------------------------------------------------------------------------------------------------------
# Reading images (driver: headers while planning; actors: pixels)


class _ImageSource:
    """An item's encoded bytes: an image file, or a parquet cell (bytes, or a Hugging Face Image struct holding
    bytes or a path, relative to the parquet file's folder). Caches the last row group read."""

    def __init__(self, column: str):
        self.column = column
        self.files: dict = {}
        self.cached: tuple | None = None  # (path, row group, pylist, first row)

    def read(self, path: str, row: int) -> bytes:
        if row < 0:
            with open(path, "rb") as f:
                return f.read()
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
        where = f"row {row} of {path}, column {self.column!r}"
        if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
            if value.get("bytes") is not None:
                value = value["bytes"]
            elif value.get("path"):
                image = Path(path).parent / value["path"]  # absolute paths stay as they are
                if not image.is_file():
                    raise FileNotFoundError(f"{where}: image path {value['path']!r} not found (looked for {image}, "
                                            "relative to the parquet file)")
                with open(image, "rb") as f:
                    return f.read()
            else:
                raise ValueError(f"{where}: image struct has neither bytes nor a path")
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError(f"{where} holds {type(value).__name__}, expected image bytes")
        return bytes(value)


def _latent_shape(source: _ImageSource, item: Item, stride: int, channels: int) -> tuple[int, int, int]:
    """Latent shape of an image kept at its own size, from its header only (no pixel decoding; an image file is
    opened in place, so only its first bytes are read)."""
    from PIL import Image

    with Image.open(item.path if item.row < 0 else io.BytesIO(source.read(item.path, item.row))) as im:
        W, H = im.size
    if H < stride or W < stride:
        raise ValueError(f"image is {W}x{H}: smaller than the encoder stride {stride}")
    return channels, H // stride, W // stride


def _decode_image(data: bytes, stride: int, resolution: int | None) -> torch.Tensor:
    """Encoded image bytes -> (1, 3, H, W) in [-1, 1]: ADM crop to resolution^2, else cropped to the stride."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if resolution:
            return pil_to_tensor(adm_center_crop(im, resolution))
        return center_crop(pil_to_tensor(im), stride)


# ---------------------------------------------------------------------------------------------------------
# Workers (plain classes: Ray Data runs one instance per actor)


def _load_model(source, filename, revision, dtype, num_gpus: float, num_threads: int, backend: str = "torch"):
    from ssdd_runtime.api import SSDD

    torch.set_num_threads(num_threads)  # the actor's CPU share; torch would otherwise pick 1 under Ray
    if backend != "torch":  # OpenVINO on the CPU, with as many threads as the actor has CPUs
        model = SSDD.from_pretrained(source, filename, revision=revision, device="cpu")
        return model.to_backend(backend, precision=dtype, threads=num_threads)
    device = "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
    return SSDD.from_pretrained(source, filename, revision=revision, dtype=dtype, device=device)


def _check_backend(backend: str, dtype: str, num_gpus_per_actor: float | None) -> float | None:
    """Before Ray starts (api.check_backend, and openvino installed without importing it here: only the actors
    load it). Returns the GPUs per actor to use: 0 for OpenVINO."""
    import importlib.util

    from ssdd_runtime.api import check_backend

    gpu = f"num_gpus_per_actor={num_gpus_per_actor}" if num_gpus_per_actor else None
    if check_backend(backend, dtype, gpu=gpu) is None:
        return num_gpus_per_actor
    if importlib.util.find_spec("openvino") is None:
        from ssdd_runtime.export.openvino import OPENVINO_HINT

        raise ImportError(f"backend 'openvino' needs the `openvino` package: {OPENVINO_HINT}")
    return 0.0


class _EncodeActor:
    def __init__(self, source, filename, revision, dtype, num_gpus, num_threads, image_column, resolution, flip,
                 store, backend="torch"):
        self.model = _load_model(source, filename, revision, dtype, num_gpus, num_threads, backend)
        self.source = _ImageSource(image_column)
        self.resolution, self.flip, self.store = resolution, flip, store
        self.fields = fields_for(flip, store)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        out = {f: [b""] * n for f in self.fields}
        shapes, errors = [""] * n, [""] * n
        images = []  # (index, (1, 3, H, W))
        for i in range(n):
            try:
                data = self.source.read(str(batch["path"][i]), int(batch["row"][i]))
                images.append((i, _decode_image(data, self.model.stride, self.resolution)))
            except _bad_image_errors() as e:
                errors[i] = f"{type(e).__name__}: {e}"

        def encode(index: list[int], x: torch.Tensor) -> None:
            B = len(index)
            post = self.model.encode(torch.cat([x, x.flip(-1)]) if self.flip else x)
            moments = {"latent": post.mean, "logvar": post.logvar}
            for name in self.fields:
                z = moments[name.removesuffix("_flip")].float().cpu()
                z = z[B:] if name.endswith("_flip") else z[:B]
                for i, zi in zip(index, z):
                    out[name][i] = zi.numpy().astype("<f4").tobytes()
            for i in index:
                shapes[i] = ",".join(map(str, post.mean.shape[1:]))

        per_item(images, encode, errors)
        res = {"key": batch["key"], "shape": np.array(shapes, dtype=object), "error": np.array(errors, dtype=object)}
        res.update({f: np.array(v, dtype=object) for f, v in out.items()})
        return res


# What one item can make the model raise (non-finite values, a size it refuses): recorded for that item. Anything
# else (out of memory, a lost device) fails the job; a re-run resumes it.
ITEM_ERRORS = (ValueError, TypeError, FloatingPointError)


def per_item(items: list[tuple[int, torch.Tensor]], run, errors: list[str]) -> None:
    """The one per-item error path of the Ray actors (encode and decode): `run(index, x)` on each batch of
    same-shape (index, (1, ...)) items; when a batch raises one of ITEM_ERRORS its items are run one at a time,
    so only the items that fail get `errors[i] = "Type: message"` and the others still give their output."""
    items = sorted(items, key=lambda item: tuple(item[1].shape))  # stable: one forward pass per size
    for index, x in same_shape_batches(items):
        try:
            run(index, x)
            continue
        except ITEM_ERRORS as e:
            if len(index) == 1:
                errors[index[0]] = f"{type(e).__name__}: {e}"
                continue
        for i, xi in zip(index, x.split(1)):
            try:
                run([i], xi)
            except ITEM_ERRORS as e:
                errors[i] = f"{type(e).__name__}: {e}"


def fields_for(flip: bool, store: str) -> list[str]:
    """Latent fields a job stores: latent [, latent_flip] [, logvar [, logvar_flip]]."""
    if store not in STORES:
        raise ValueError(f"store must be one of {STORES}, got {store!r}")
    return ["latent"] + (["latent_flip"] if flip else []) + (
        (["logvar"] + (["logvar_flip"] if flip else [])) if store == "moments" else [])


class _DecodeActor:
    def __init__(self, source, filename, revision, dtype, num_gpus, num_threads, steps, t_pow_shift, seed,
                 backend="torch"):
        self.model = _load_model(source, filename, revision, dtype, num_gpus, num_threads, backend)
        self.steps, self.t_pow_shift, self.seed = steps, t_pow_shift, seed
        self.cached: tuple | None = None  # (shard path, keys, latents (N, C, h, w))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        pngs, errors = [b""] * n, [""] * n
        latents = []  # (index, (1, C, h, w))
        for i in range(n):
            shard, key, row = str(batch["shard_file"][i]), str(batch["key"][i]), int(batch["row"][i])
            try:
                if self.cached is None or self.cached[0] != shard:
                    cols = read_shard(shard, ("latent",))[0]
                    self.cached = (shard, cols["key"], cols["latent"])
                if row >= len(self.cached[1]) or self.cached[1][row] != key:
                    raise ValueError(f"{shard} changed during the job: row {row} is no longer {key!r}")
                latents.append((i, self.cached[2][row][None]))
            except (OSError, ValueError, KeyError) as e:
                errors[i] = f"{type(e).__name__}: {e}"
        F_ = self.model.stride

        def decode(index: list[int], z: torch.Tensor) -> None:
            B, _, h, w = z.shape
            # every image gets the same seeded start noise: the output depends only on its latent and the seed
            noise = seeded_noise((3, h * F_, w * F_), self.seed, B, device=self.model.device)
            img = self.model.decode(z, steps=self.steps, t_pow_shift=self.t_pow_shift, noise=noise)
            for i, pil in zip(index, tensor_to_pil(img)):
                buf = io.BytesIO()
                pil.save(buf, format="PNG")
                pngs[i] = buf.getvalue()

        per_item(latents, decode, errors)
        return {"id": batch["id"], "key": batch["key"], "png": np.array(pngs, dtype=object),
                "error": np.array(errors, dtype=object)}


# ---------------------------------------------------------------------------------------------------------
# Jobs


@dataclass
class Report:
    output_dir: str
    total: int = 0  # items in the whole job (this run and earlier runs)
    done: int = 0  # items processed by this run (encoded/decoded successfully)
    failed: int = 0  # items of this run that failed (see errors), including those failing while planning
    skipped: int = 0  # items skipped because their shard / PNG already existed
    shards_written: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)
    shards_redone: list[int] = field(default_factory=list)  # existing shards found broken on resume, written again
    errors: dict[str, str] = field(default_factory=dict)  # key -> message, this run
    checkpoint: str | None = None
    startup_s: float = 0.0  # Ray start and actor pool start-up until the first batch came back

    def summary(self) -> str:
        s = (f"{self.done} ok, {self.failed} failed, {self.skipped} skipped (already done) of {self.total} items")
        if self.shards_written or self.shards_skipped:
            s += f"; shards: {len(self.shards_written)} written, {len(self.shards_skipped)} skipped"
            if self.shards_redone:
                s += f" ({len(self.shards_redone)} broken ones written again)"
        return s + f" -> {self.output_dir}"

    def fail(self, key: str, message: str, what: str) -> None:
        self.failed += 1
        self.errors[key] = message
        log.warning("%s: %s failed: %s", what, key, message)


def _start_ray(address: str | None, num_cpus: int | None):
    ray = _import_ray()
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return ray


def _pool(ray, num_gpus_per_actor: float | None, num_cpus_per_actor: float | None, concurrency: int | None
          ) -> tuple[float, float, int]:
    """(GPUs per actor, CPUs per actor, actors). GPU default: one actor per GPU with 1 CPU. CPU default: the
    cluster's cores shared by the pool: one actor per node-sized share (a local machine: one actor, all cores),
    or `concurrency` actors splitting the cores."""
    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 1))
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1.0 if gpus > 0 else 0.0
    if num_gpus_per_actor < 0:
        raise ValueError(f"num_gpus_per_actor must be >= 0, got {num_gpus_per_actor}")
    if num_cpus_per_actor is not None and not num_cpus_per_actor > 0:
        raise ValueError(f"num_cpus_per_actor must be > 0, got {num_cpus_per_actor}")
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                    or concurrency < 1):
        raise ValueError(f"concurrency must be a positive integer, got {concurrency!r}")
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((n.get("CPU", 0) for n in nodes), default=cpus)
    node_gpus = max((n.get("GPU", 0) for n in nodes), default=gpus)
    if num_gpus_per_actor > 0:
        concurrency = concurrency or max(1, int(gpus // num_gpus_per_actor))
        pool = num_gpus_per_actor, num_cpus_per_actor or 1.0, concurrency
    else:
        if num_cpus_per_actor is None:
            num_cpus_per_actor = float(max(1, int(cpus // concurrency))) if concurrency else float(max(1, node_cpus))
        pool = 0.0, num_cpus_per_actor, concurrency or max(1, int(cpus // num_cpus_per_actor))
    # Ray would wait forever for an actor that fits no node: refuse before starting the pool
    g, c, n = pool
    have = f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs (largest node: {node_cpus:g} CPUs, {node_gpus:g} GPUs)"
    if g > node_gpus:
        raise ValueError(f"num_gpus_per_actor={g:g} cannot be met: {have}"
                         + ("; use --num-gpus-per-actor 0 to run on the CPU" if gpus == 0 else ""))
    if c > node_cpus:
        raise ValueError(f"num_cpus_per_actor={c:g} cannot be met: {have}")
    if n * g > gpus or n * c > cpus:
        raise ValueError(f"{n} actors of {c:g} CPUs and {g:g} GPUs each cannot all start: {have}; lower "
                         "--concurrency or the per-actor resources")
    return pool


def _map(ds, ray, actor, ctor: dict, batch_size: int, pool: tuple[float, float, int]):
    """`ds.map_batches(actor)` on an actor pool of `pool` = (GPUs, CPUs, actors) each."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    num_gpus, num_cpus, concurrency = pool
    ctor = {**ctor, "num_gpus": num_gpus, "num_threads": max(1, math.ceil(num_cpus))}
    # max_restarts=0: with Ray Data's default (-1) Ray core logs an E-level line on every run (actor constructor
    # arguments in the object store with restarts on). Bad items never crash an actor (they are caught per item);
    # a lost node fails the job, and re-running resumes it from the shards already written. Ray 2.60 takes
    # max_restarts only through the deprecated **ray_remote_args, hence the filter.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        mapped = ds.map_batches(actor, fn_constructor_kwargs=ctor, batch_size=batch_size, batch_format="numpy",
                                num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=0,
                                compute=ray.data.ActorPoolStrategy(size=concurrency))
    # A bounded wait for the pool (Ray's default waits forever when resources go away after the check in _pool):
    # past it, Ray raises GetTimeoutError "Timed out while starting actors", a one-line error of the CLI.
    mapped.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    return mapped


def _resolve(source, filename, revision) -> tuple[Path, str, str, int, int]:
    """(local checkpoint path, checkpoint id, encoder name, stride, latent channels): shapes only, no weights."""
    from safetensors import safe_open

    from ssdd_runtime.integrations.latent_stats import checkpoint_id
    from ssdd_runtime.weights import infer_config, resolve_checkpoint

    path = resolve_checkpoint(source, filename, revision=revision)
    with safe_open(str(path), "pt") as f:
        shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    enc, _ = infer_config(shapes)
    return path, checkpoint_id(path), enc.name, 2 ** (len(enc.ch_mult) - 1), enc.z_dim


def _items_dataset(ray, rows: list[dict], batch_size: int):
    return ray.data.from_items(rows, override_num_blocks=max(1, min(1000, math.ceil(len(rows) / batch_size))))


def tokenize(inputs, output_dir: str | os.PathLike, *, checkpoint: str | os.PathLike, filename: str | None = None,
             revision: str | None = None, format: str = "parquet", shard_size: int = 256, batch_size: int = 8,
             resolution: int | None = None, flip: bool = False, store: str = "mode", labels: str = "none",
             concurrency: int | None = None, num_gpus_per_actor: float | None = None,
             num_cpus_per_actor: float | None = None, dtype: str = "fp32", image_column: str = "image",
             key_column: str | None = None, address: str | None = None, num_cpus: int | None = None,
             backend: str = "torch") -> Report:
    """Encode every input image and write training-ready shards to output_dir (module docstring and
    `ssdd_runtime.data` for the format).

    resolution: ADM center crop + resize to N x N (a multiple of the encoder stride); None keeps each image's
    size. flip: also store the horizontally flipped image's latent. store: "mode" (the mean) or "moments" (mean
    and logvar). labels: "none", "folder" or a parquet column (`list_inputs`). checkpoint: a local .safetensors
    or a Hub repo id (then `filename`). Ray: an initialised Ray is used as is, else `ray.init(address=address,
    num_cpus=num_cpus)`. Actors: see `_pool` (concurrency, num_gpus_per_actor, num_cpus_per_actor).
    """
    import time

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    fields = fields_for(flip, store)
    num_gpus_per_actor = _check_backend(backend, dtype, num_gpus_per_actor)
    out = Path(output_dir)
    ckpt_path, ckpt_id, encoder, stride, channels = _resolve(checkpoint, filename, revision)
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int)
                                   or resolution < stride or resolution % stride):
        raise ValueError(f"resolution must be a positive multiple of the encoder stride {stride}, got {resolution!r}")
    items, classes = list_inputs(inputs, image_column=image_column, key_column=key_column, labels=labels,
                                 output_dir=out)
    report = Report(str(out), total=len(items), checkpoint=ckpt_id)
    plan_errors: dict[str, str] = {}
    if resolution is not None:
        fixed = (channels, resolution // stride, resolution // stride)
        shapes = {it.key: fixed for it in items}
    else:  # keep sizes: read every header so that each shard holds one latent shape
        source, shapes = _ImageSource(image_column), {}
        for it in items:
            try:
                shapes[it.key] = _latent_shape(source, it, stride, channels)
            except _bad_image_errors() as e:
                plan_errors[it.key] = f"{type(e).__name__}: {e}"
    shards = plan_shards(items, shard_size, shapes)
    job = {"format_version": FORMAT_VERSION, "checkpoint": ckpt_id, "encoder": encoder, "format": format,
           "shard_size": shard_size, "resolution": resolution, "flip": flip, "store": store, "labels": labels,
           "classes": classes, "num_items": len(items),
           "keys_sha256": hashlib.sha256("\n".join(i.key for i in items).encode()).hexdigest(),
           "plan_sha256": hashlib.sha256(json.dumps([[list(s), [i.key for i in g]] for s, g in shards])
                                         .encode()).hexdigest()}
    info = {"format_version": FORMAT_VERSION, "checkpoint": ckpt_id, "encoder": encoder, "store": store,
            "flip": flip, "resolution": resolution, "labels": labels, "classes": classes}
    out.mkdir(parents=True, exist_ok=True)
    manifest = {**job, "shards": [{"shape": list(s), "num_items": len(g)} for s, g in shards], "errors": plan_errors}
    _check_manifest(out, manifest)
    pending = []
    for s, (shape, group) in enumerate(shards):
        path = shard_path(out, s, format)
        broken = _verify_shard(path, shape, group, fields, info) if path.exists() else "missing"
        if broken is None:
            report.shards_skipped.append(s)
            report.skipped += len(group)
        else:
            if broken != "missing":
                log.warning("tokenize: %s; writing it again", broken)
                report.shards_redone.append(s)
            pending.append(s)
    _write_manifest(out, manifest)  # only once every existing shard is known to belong to this job
    if pending or not shards:  # planning errors are this run's when it has work (or nothing else) to do
        for key, msg in plan_errors.items():
            report.fail(key, msg, "tokenize")
    log.info("tokenize: %d items in %d shards, %d shards to write", len(items), len(shards), len(pending))
    if not pending:
        return report

    t0 = time.perf_counter()
    ray = _start_ray(address, num_cpus)
    pool = _pool(ray, num_gpus_per_actor, num_cpus_per_actor, concurrency)
    rows = [{"key": it.key, "path": it.path, "row": it.row, "shard": s} for s in pending for it in shards[s][1]]
    local = Path(str(checkpoint)).exists()
    ctor = dict(source=str(ckpt_path) if local else str(checkpoint), filename=None if local else filename,
                revision=revision, dtype=dtype, image_column=image_column, resolution=resolution, flip=flip,
                store=store, backend=backend)
    ds = _map(_items_dataset(ray, rows, batch_size), ray, _EncodeActor, ctor, batch_size, pool)

    item_of = {it.key: (s, j, it) for s in pending for j, it in enumerate(shards[s][1])}
    buffers: dict[int, dict[str, dict]] = defaultdict(dict)  # shard -> key -> row
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if not report.startup_s:
            report.startup_s = time.perf_counter() - t0
        for r in range(len(batch["key"])):
            key = str(batch["key"][r])
            s, _, it = item_of[key]
            err = str(batch["error"][r])
            shape = tuple(shards[s][0])
            if not err and str(batch["shape"][r]) != ",".join(map(str, shape)):
                err = f"ValueError: latent shape {batch['shape'][r]} differs from the planned {shape}"
            if err:
                report.fail(key, err, "tokenize")
                buffers[s][key] = {"error": err}
            else:
                report.done += 1
                buffers[s][key] = {f: np.frombuffer(batch[f][r], dtype="<f4").reshape(shape) for f in fields}
            if len(buffers[s]) == len(shards[s][1]):
                _write(shard_path(out, s, format), shards[s], buffers.pop(s), fields, {**info, "shard": s})
                report.shards_written.append(s)
    if buffers:  # every row must come back exactly once; a partial shard is never written
        raise RuntimeError(f"Ray Data returned incomplete shards {sorted(buffers)}: nothing written for them; "
                           "re-run the command to retry")
    return report


def _write(path: Path, shard: tuple[tuple, list[Item]], rows: dict[str, dict], fields: list[str], info: dict):
    shape, items = shard
    good = [it for it in items if "error" not in rows[it.key]]
    latents = {f: np.stack([rows[it.key][f] for it in good]) if good else np.zeros((0, *shape), np.float32)
               for f in fields}
    errors = {it.key: rows[it.key]["error"] for it in items if "error" in rows[it.key]}
    write_shard(path, [it.key for it in good], [it.label for it in good], latents,
                {**info, "shape": list(shape), "errors": errors})


def _check_manifest(out: Path, manifest: dict) -> None:
    """Refuse a folder whose OUT/.ssdd/manifest.json describes a different job, or that holds shard files this
    job does not plan (another job's, whose manifest was deleted: they would be read with this job's)."""
    old = read_manifest(out)
    if old is not None:
        diff = {k: (old.get(k), v) for k, v in manifest.items() if k not in ("shards", "errors") and old.get(k) != v}
        if diff:
            raise ValueError(f"{out} holds shards of a different job ({', '.join(diff)} differ: {diff}); use a new "
                             "output folder or delete it")
    planned = {shard_path(out, s, manifest["format"]).name for s in range(len(manifest["shards"]))}
    stray = sorted(p.name for p in out.iterdir()
                   if p.name.startswith("shard-") and p.suffix[1:] in FORMATS and p.name not in planned)
    if stray:
        raise ValueError(f"{out} holds shards this job does not plan ({', '.join(stray[:3])}"
                         f"{', ...' if len(stray) > 3 else ''}): written by another job (other inputs, --shard-size "
                         "or --format); use a new output folder or delete them")


def _write_manifest(out: Path, manifest: dict) -> None:
    path = out / SIDECAR / MANIFEST
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        write_text_atomic(path, json.dumps(manifest, indent=1))


def _verify_shard(path: Path, shape: tuple, items: list[Item], fields: list[str], info: dict) -> str | None:
    """The resume check of one existing shard: None when it is this job's complete shard; the reason when it is
    broken (truncated, unreadable, rows missing): it is written again; ValueError when it is another job's
    (other options or items): refused, never mixed in and never overwritten."""
    try:
        keys, present, got = shard_keys(path, check_data=True)
    except ValueError as e:
        return str(e)
    differ = {k: (got.get(k), v) for k, v in info.items() if got.get(k) != v}
    if present != set(fields):
        differ["columns"] = (sorted(present), sorted(fields))
    errors = got.get("errors") or {}
    planned = {it.key for it in items}
    if not set(keys) | set(errors) <= planned:
        differ["keys"] = sorted(set(keys) | set(errors) - planned)[:3]
    if tuple(got["shape"]) != tuple(shape):
        differ["shape"] = (got["shape"], list(shape))
    if differ:
        raise ValueError(f"{path} was written by a different job ({', '.join(differ)} differ: {differ}); use a new "
                         "output folder or delete it")
    if len(keys) + len(errors) != len(items) or len(set(keys)) != len(keys):
        return (f"shard {path} is incomplete: {len(keys)} rows and {len(errors)} failed items, the plan has "
                f"{len(items)} items")
    return None


def png_name(key: str) -> str:
    """Output PNG name (relative POSIX path) for an item key: image suffix replaced by .png, sub-folders kept,
    root, drive and '..' parts dropped (io.confined_path checks the result)."""
    p = PurePosixPath(key.replace("\\", "/"))
    parts = [part for part in p.parts if part not in ("/", "..", ".") and not part.endswith(":")]
    p = PurePosixPath(*parts) if parts else PurePosixPath("_")
    name = p.stem if p.suffix.lower() in IMAGE_SUFFIXES else p.name
    return str(p.with_name(name + ".png"))


def detokenize(latents_dir: str | os.PathLike, output_dir: str | os.PathLike, *, checkpoint: str | os.PathLike,
               filename: str | None = None, revision: str | None = None, steps: int = 1,
               t_pow_shift: float = T_POW_SHIFT, seed: int = 0, batch_size: int = 8, concurrency: int | None = None,
               num_gpus_per_actor: float | None = None, num_cpus_per_actor: float | None = None,
               dtype: str = "fp32", address: str | None = None, num_cpus: int | None = None,
               backend: str = "torch") -> Report:
    """Decode every `latent` of the shards in latents_dir to `<output_dir>/<key>.png` (image suffix replaced;
    names confined to output_dir, colliding names made unique with -1, -2, ... in key order). PNGs that already
    exist are skipped (resumable). Every image's start noise comes from `torch.Generator().manual_seed(seed)`,
    so an image depends only on its latent, the seed and the steps."""
    check_sampler_args(steps, t_pow_shift, None)
    num_gpus_per_actor = _check_backend(backend, dtype, num_gpus_per_actor)
    out = Path(output_dir)
    _, ckpt_id, *_ = _resolve(checkpoint, filename, revision)
    report = Report(str(out), checkpoint=ckpt_id)
    entries = []  # (key, shard, row): the row, not the key, finds a latent (keys may repeat across shards)
    for shard in list_shards(latents_dir):
        cols, info = read_shard(shard, ())
        if info.get("checkpoint") not in (None, ckpt_id):
            log.warning("detokenize: %s was encoded with %s, decoding with %s", shard.name, info["checkpoint"],
                        ckpt_id)
        entries += [(key, str(shard), row) for row, key in enumerate(cols["key"])]
    if not entries:
        raise ValueError(f"the shards in {latents_dir} hold no latents (0 rows: every item failed in tokenize; the "
                         "messages are in each shard's metadata 'errors')")
    entries.sort()
    items = []
    for (key, shard, row), name in zip(entries, unique_names([png_name(k) for k, *_ in entries])):
        report.total += 1
        try:
            dest = confined_path(out, name)
        except ValueError as e:
            report.fail(key, f"ValueError: {e}", "detokenize")
            continue
        if dest.exists() and _png_ok(dest):
            report.skipped += 1
        else:
            if dest.exists():
                log.warning("detokenize: %s is not a readable PNG; writing it again", dest)
            items.append({"id": len(items), "key": key, "shard_file": shard, "row": row, "png_name": str(dest)})
    if not items:
        return report
    ray = _start_ray(address, num_cpus)
    pool = _pool(ray, num_gpus_per_actor, num_cpus_per_actor, concurrency)
    ctor = dict(source=str(checkpoint), filename=filename, revision=revision, dtype=dtype, steps=steps,
                t_pow_shift=t_pow_shift, seed=seed, backend=backend)
    ds = _map(_items_dataset(ray, items, batch_size), ray, _DecodeActor, ctor, batch_size, pool)
    dest_of = {it["id"]: Path(it["png_name"]) for it in items}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, key, png, err in zip(batch["id"], batch["key"], batch["png"], batch["error"]):
            key, dest = str(key), dest_of[int(i)]
            if err:
                report.fail(key, str(err), "detokenize")
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(dest, png)
            report.done += 1
    return report


def _png_ok(path: Path) -> bool:
    """An existing output counts as done only when PIL reads it through (a truncated copy is decoded again)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return True
    except _bad_image_errors():
        return False
