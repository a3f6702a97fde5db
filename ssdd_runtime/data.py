"""Latent shards for diffusion training: the shard format `ssdd tokenize` writes, and torch datasets over it.

Layout of a tokenize output folder OUT:
    OUT/shard-00000.parquet ...     data files only, so `datasets.load_dataset("parquet", data_dir=OUT)`,
                                    `pandas.read_parquet(OUT)` and `pyarrow.dataset.dataset(OUT)` read them
    OUT/.ssdd/manifest.json         the job (checkpoint, options, shard plan, items that failed before encoding);
                                    a hidden folder: datasets, pyarrow and pandas skip names starting with "."
    OUT/.ssdd/latent_stats.json     written by `ssdd stats OUT`

Parquet shard columns (one latent shape per shard; every row is a successfully encoded image):
    key: string          the item key (relative path, or the parquet key column / "<stem>/<row>")
    label: int64         class index (-1 when tokenized with --labels none)
    latent: float32 (C, h, w)        the encoder mean (`model.encode(x).mode()`)
    latent_flip: float32 (C, h, w)   with --flip: the mean of the horizontally flipped image
    logvar, logvar_flip: float32 (C, h, w)  with --store moments: the encoder log-variance (clamped -30..20)
Latent columns are nested fixed-size lists, fixed_size_list<fixed_size_list<fixed_size_list<float, w>, h>, C>:
`datasets` maps them to `List(..., length=)` features, so `with_format("torch")` returns (C, h, w) tensors and
(B, C, h, w) batches. Arrow's canonical `arrow.fixed_shape_tensor` extension was tried first and rejected:
datasets 5.2 raises "Arrow type extension<arrow.fixed_shape_tensor...> does not have a datasets dtype
equivalent" on it. `latent_array(column)` turns a latent column (pyarrow) into one (N, C, h, w) numpy array
without a copy. The schema metadata key b"ssdd" holds JSON: checkpoint id, encoder, shape, store, flip,
resolution, classes, and "errors" {key: message} for the shard's items that failed. Pages carry CRCs
(`write_page_checksum`), verified on every read here: a shard corrupted in place raises, naming the file.
Safetensors shards (`--format safetensors`) hold the same fields stacked: latent (N, C, h, w), label (N,), ...,
with the keys and the same info in the metadata (LightningDiT's layout of `latents`/`latents_flip`/`labels`).
"""
from __future__ import annotations

import bisect
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from ssdd_runtime.io import atomic_output

SIDECAR = ".ssdd"
MANIFEST = "manifest.json"
STATS = "latent_stats.json"
FORMATS = ("parquet", "safetensors")
LATENT_FIELDS = ("latent", "latent_flip", "logvar", "logvar_flip")
FORMAT_VERSION = 2


def latent_type(shape: tuple[int, ...]):
    import pyarrow as pa

    t = pa.float32()
    for n in reversed(shape):
        t = pa.list_(t, n)
    return t


def latent_column(z: np.ndarray):
    """(N, C, h, w) float32 -> a nested fixed-size-list pyarrow array of N (C, h, w) cells (no copy)."""
    import pyarrow as pa

    z = np.ascontiguousarray(z, dtype="<f4")
    arr = pa.array(z.reshape(-1))
    for n in reversed(z.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, n)
    return arr


def latent_array(column) -> np.ndarray:
    """A latent column (pyarrow Array or ChunkedArray of nested fixed-size lists) -> (N, C, h, w) float32."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    shape, arr = [], column
    while pa.types.is_fixed_size_list(arr.type):
        shape.append(arr.type.list_size)
        arr = arr.flatten()  # honours the slice offset of `column`
    return arr.to_numpy(zero_copy_only=False).reshape(len(column), *shape)


def shard_path(output_dir: str | os.PathLike, index: int, fmt: str) -> Path:
    return Path(output_dir) / f"shard-{index:05d}.{fmt}"


def write_shard(path: str | os.PathLike, keys: list[str], labels: list[int], latents: dict[str, np.ndarray],
                info: dict) -> None:
    """One shard through io.atomic_output: `latents` maps field names (LATENT_FIELDS) to (N, C, h, w) arrays;
    `info` (JSON-able, with "shape" and "errors") goes into the schema / safetensors metadata."""
    path = Path(path)
    fmt = path.suffix[1:]
    shape = tuple(info["shape"])
    for name, z in latents.items():
        if name not in LATENT_FIELDS or z.shape != (len(keys), *shape):
            raise ValueError(f"shard field {name!r}: expected shape {(len(keys), *shape)} in {LATENT_FIELDS}, "
                             f"got {z.shape}")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = {"key": pa.array(keys, pa.string()), "label": pa.array(labels, pa.int64())}
        cols.update({name: latent_column(z) if len(keys) else pa.array([], latent_type(shape))
                     for name, z in latents.items()})
        table = pa.table(cols).replace_schema_metadata({"ssdd": json.dumps(info)})
        with atomic_output(path) as tmp:
            pq.write_table(table, tmp, write_page_checksum=True)  # a CRC per page: corruption is found on read
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        tensors = {name: torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)) for name, z in latents.items()}
        tensors["label"] = torch.tensor(labels, dtype=torch.int64)
        with atomic_output(path) as tmp:
            save_file(tensors, str(tmp), metadata={"ssdd": json.dumps({**info, "keys": keys})})
    else:
        raise ValueError(f"unknown shard format {fmt!r}; expected one of {FORMATS}")


def _unreadable(path: Path, e: Exception) -> ValueError:
    reason = " ".join(str(e).split()) or type(e).__name__
    return ValueError(f"shard {path} is not readable ({reason}); delete it and re-run `ssdd tokenize` to "
                      "write it again")


def read_shard(path: str | os.PathLike, fields: tuple[str, ...] | None = None) -> tuple[dict, dict]:
    """A shard -> ({"key": [str], "label": int64 (N,), <latent field>: float32 (N, C, h, w) torch tensors}, info).
    `fields` limits the latent fields read (default: all present). A corrupt or truncated file, or one whose
    columns disagree in length, raises ValueError naming the file."""
    path = Path(path)
    try:
        out, info = _read_shard(path, fields)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:  # pyarrow's ArrowInvalid is a ValueError
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise _unreadable(path, e) from e
    lengths = {name: len(col) for name, col in out.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"shard {path} is inconsistent: its columns have different lengths {lengths}; delete it "
                         "and re-run `ssdd tokenize`")
    return out, info


def _read_shard(path: Path, fields: tuple[str, ...] | None) -> tuple[dict, dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        names = [n for n in LATENT_FIELDS if n in schema.names and (fields is None or n in fields)]
        table = pq.read_table(path, columns=["key", "label", *names], page_checksum_verification=True)
        info = json.loads((table.schema.metadata or {}).get(b"ssdd", b"{}"))
        out = {"key": table.column("key").to_pylist(),
               "label": torch.from_numpy(table.column("label").to_numpy().astype(np.int64))}
        for n in names:
            z = latent_array(table.column(n)) if table.num_rows else np.zeros((0, *info["shape"]), np.float32)
            out[n] = torch.from_numpy(np.array(z))  # a writable copy: arrow buffers are read-only
        return out, info
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            info = json.loads((f.metadata() or {}).get("ssdd", "{}"))
            out = {"key": info.pop("keys", []), "label": f.get_tensor("label")}
            out.update({n: f.get_tensor(n) for n in f.keys() if n in LATENT_FIELDS and (fields is None or n in fields)})
        return out, info
    raise ValueError(f"{path}: not a shard (.parquet or .safetensors)")


def job_file(path: str | os.PathLike, output_dir: str | os.PathLike) -> bool:
    """Whether `path` is (or would be) a file of the tokenize job in `output_dir`: a `shard-*` data file or
    anything under its `.ssdd` folder. Such paths are never scanned as inputs nor written by other commands."""
    parts = Path(os.path.relpath(Path(path).resolve(), Path(output_dir).resolve())).parts
    return bool(parts) and parts[0] != ".." and (parts[0] == SIDECAR or (
        len(parts) == 1 and parts[0].startswith("shard-") and Path(parts[0]).suffix[1:] in FORMATS))


def list_shards(directory: str | os.PathLike) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"latent folder not found: {d}")
    shards = sorted(p for p in d.iterdir() if p.name.startswith("shard-") and p.suffix[1:] in FORMATS)
    if not shards:
        raise FileNotFoundError(f"no shard-*.parquet / shard-*.safetensors files in {d}")
    return shards


def shard_keys(path: str | os.PathLike, *, check_data: bool = False) -> tuple[list[str], set[str], dict]:
    """(keys, latent fields, info) of a shard from its footer/header and key column: what a resumed `tokenize`
    checks a shard against before counting it as done. ValueError naming the file when it is truncated, corrupt
    or inconsistent (row counts of the columns, keys vs rows, dtype, shape). check_data=True also reads every
    page of a parquet shard against its CRC (shards written since page checksums; safetensors have none)."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            f = pq.ParquetFile(path, page_checksum_verification=True)
            if check_data:
                f.read()
            names = set(f.schema_arrow.names)
            info = json.loads((f.schema_arrow.metadata or {}).get(b"ssdd", b"{}"))
            keys = f.read(columns=["key"]).column(0).to_pylist()
            rows = {"key": len(keys), "metadata": f.metadata.num_rows}
            dtypes = {n: _leaf_type(f.schema_arrow.field(n).type) for n in names & set(LATENT_FIELDS)}
            dims = {n: _list_sizes(f.schema_arrow.field(n).type) for n in names & set(LATENT_FIELDS)}
        else:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                names, info = set(f.keys()), json.loads((f.metadata() or {}).get("ssdd", "{}"))
                keys = info.pop("keys", [])
                rows = {"key": len(keys), **{n: f.get_slice(n).get_shape()[0] for n in names}}
                dtypes = {n: f.get_slice(n).get_dtype().lower().replace("f32", "float") for n in names
                          if n in LATENT_FIELDS}
                dims = {n: list(f.get_slice(n).get_shape()[1:]) for n in names if n in LATENT_FIELDS}
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise _unreadable(path, e) from e
    if len(set(rows.values())) > 1:
        raise ValueError(f"shard {path} is inconsistent: its columns have different lengths {rows}")
    if not isinstance(info, dict) or "shape" not in info:
        raise ValueError(f"shard {path} has no ssdd metadata (shape): not written by `ssdd tokenize`")
    wrong = {n: t for n, t in dtypes.items() if t != "float"}
    if wrong:  # read as they are, float64/float16 latents would reach training silently in another dtype
        raise ValueError(f"shard {path}: latent columns must be float32, got {wrong}")
    wrong = {n: d for n, d in dims.items() if d != list(info["shape"])}
    if wrong:
        raise ValueError(f"shard {path}: its metadata says latent shape {info['shape']}, its columns hold {wrong}")
    return keys, names & set(LATENT_FIELDS), info


def _list_sizes(t) -> list[int]:
    import pyarrow as pa

    sizes = []
    while pa.types.is_fixed_size_list(t):
        sizes.append(t.list_size)
        t = t.value_type
    return sizes


def _leaf_type(t) -> str:
    import pyarrow as pa

    while pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return str(t)


def read_manifest(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / SIDECAR / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"job manifest {path} is not valid JSON ({e}); delete it (the shards are checked again on "
                         "the next `ssdd tokenize`) or use a new output folder") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"job manifest {path} holds {type(manifest).__name__}, expected a JSON object")
    return manifest


def channel_stats(stats: str | os.PathLike | dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) float32 tensors (C,) from a stats JSON of `ssdd stats` (or its dict)."""
    d = stats if isinstance(stats, dict) else json.loads(Path(stats).read_text(encoding="utf-8"))
    if "latents_mean" not in d or "latents_std" not in d:
        raise ValueError(f"latent stats must hold per-channel 'latents_mean' and 'latents_std' (from `ssdd stats`), "
                         f"got keys {sorted(d)}")
    mean, std = (torch.tensor(d[k], dtype=torch.float32) for k in ("latents_mean", "latents_std"))
    if not bool(torch.isfinite(mean).all() & torch.isfinite(std).all()):  # would turn every latent into NaN
        raise ValueError(f"latents_mean/latents_std must be finite, got {d['latents_mean']} / {d['latents_std']}")
    if mean.shape != std.shape or mean.dim() != 1 or not bool((std > 0).all()):
        raise ValueError(f"latents_mean/latents_std must be equal-length lists with std > 0, got {d['latents_mean']}"
                         f" / {d['latents_std']}")
    return mean, std


# ---------------------------------------------------------------------------------------------------------
# torch datasets


class _Transform:
    """Shared per-item transform: flip choice, moment sampling, per-channel normalisation."""

    def __init__(self, root, *, flip: bool, sample: bool, normalize: bool | str | os.PathLike | dict, fields):
        self.flip, self.sample = flip, sample
        if normalize is True:
            normalize = Path(root) / SIDECAR / STATS
            if not normalize.is_file():
                raise FileNotFoundError(f"{normalize} not found: run `ssdd stats {root}` first, or pass "
                                        "normalize=<stats JSON>")
        self.mean_std = None
        if normalize is not False and normalize is not None:
            mean, std = channel_stats(normalize)
            self.mean_std = (mean[:, None, None], std[:, None, None])
        missing = [f for f in (["latent_flip"] if flip else []) + (["logvar"] if sample else []) if f not in fields]
        if missing:
            raise ValueError(f"{root} has no {missing} column: tokenize with "
                             f"{' and '.join('--flip' if m == 'latent_flip' else '--store moments' for m in missing)}")
        self.fields = ("latent",) + (("latent_flip",) if flip else ()) + (
            ("logvar",) + (("logvar_flip",) if flip else ()) if sample else ())

    def __call__(self, cols: dict, i: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        suffix = "_flip" if self.flip and rng.random() < 0.5 else ""
        z = cols["latent" + suffix][i]
        if self.sample:  # REPA-style: draw from the stored posterior N(mean, exp(logvar))
            g = torch.Generator().manual_seed(rng.getrandbits(63))
            z = z + torch.exp(0.5 * cols["logvar" + suffix][i]) * torch.randn(z.shape, generator=g)
        if self.mean_std is not None:
            z = (z - self.mean_std[0]) / self.mean_std[1]
        return z, cols["label"][i]


def _shard_fields(shards: list[Path]) -> tuple[set[str], list[tuple], list[int]]:
    """Latent fields, latent shape and row count of every shard (reads schemas/metadata, not the data)."""
    fields, shapes, sizes, sources = None, [], [], {}
    for p in shards:
        keys, present, info = shard_keys(p)
        sources.setdefault(info.get("checkpoint"), p.name)
        if len(sources) > 1:  # two tokenizers' latents in one dataset: a model would train on both spaces
            raise ValueError(f"the shards in {p.parent} come from different checkpoints: {sources}")
        fields = present if fields is None else fields & present
        shapes.append(tuple(info["shape"]))
        sizes.append(len(keys))
    return fields or set(), shapes, sizes


def _select(root, shape) -> tuple[list[Path], set[str], list[int], tuple]:
    shards = list_shards(root)
    fields, shapes, sizes = _shard_fields(shards)
    found = sorted(set(shapes))
    if shape is None:
        if len(found) > 1:
            raise ValueError(f"{root} holds latents of shapes {found} (tokenized without --resolution); pass "
                             "shape=(C, h, w) to pick one, or tokenize with --resolution N")
        shape = found[0]
    keep = [i for i, s in enumerate(shapes) if s == tuple(shape) and sizes[i] > 0]
    if not keep:
        if tuple(shape) in found:
            raise ValueError(f"{root}: the shards of latent shape {tuple(shape)} are empty (0 rows: every item "
                             "failed to encode; their messages are in each shard's metadata 'errors')")
        raise ValueError(f"{root} has no latents of shape {tuple(shape)}; shapes found: {found}")
    return [shards[i] for i in keep], fields, [sizes[i] for i in keep], tuple(shape)


class LatentDataset(torch.utils.data.Dataset):
    """Map-style dataset over the shards of `ssdd tokenize`: item i -> (latent float32 (C, h, w), label int64).

    flip: with probability 1/2 return the stored `latent_flip` (LightningDiT's augmentation; needs --flip).
    sample: draw z = mean + exp(logvar / 2) * eps (REPA-style; needs --store moments); else the mean.
    normalize: False; True for OUT/.ssdd/latent_stats.json (`ssdd stats OUT`); or a stats JSON path / dict:
        z -> (z - latents_mean[c]) / latents_std[c].
    shape: the (C, h, w) to use when the folder holds several. Shards are read on first use and kept
    (`max_cached_shards` bounds that; random access over more shards than that re-reads them).
    """

    def __init__(self, root: str | os.PathLike, *, flip: bool = False, sample: bool = False,
                 normalize: bool | str | os.PathLike | dict = False, shape: tuple | None = None,
                 max_cached_shards: int | None = None, seed: int = 0):
        self.root = Path(root)
        self.shards, fields, sizes, self.shape = _select(root, shape)
        self.transform = _Transform(root, flip=flip, sample=sample, normalize=normalize, fields=fields)
        self.starts = np.cumsum([0] + sizes).tolist()
        self.max_cached_shards = max_cached_shards
        self.cache: dict[int, dict] = {}
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return self.starts[-1]

    def _shard(self, s: int) -> dict:
        if s not in self.cache:
            if self.max_cached_shards is not None and len(self.cache) >= self.max_cached_shards:
                self.cache.pop(next(iter(self.cache)))
            self.cache[s] = read_shard(self.shards[s], self.transform.fields)[0]
        return self.cache[s]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} latents")
        index %= len(self)
        s = bisect.bisect_right(self.starts, index) - 1
        return self.transform(self._shard(s), index - self.starts[s], self.rng)


class LatentIterableDataset(torch.utils.data.IterableDataset):
    """Streaming variant for many shards: each epoch visits the shards in a seeded random order (split across
    DataLoader workers and, when torch.distributed is initialised, across ranks), one shard in memory per
    worker, rows shuffled within the shard. Same options as `LatentDataset`; call `set_epoch(e)` per epoch."""

    def __init__(self, root: str | os.PathLike, *, flip: bool = False, sample: bool = False,
                 normalize: bool | str | os.PathLike | dict = False, shape: tuple | None = None,
                 shuffle: bool = True, seed: int = 0):
        self.root = Path(root)
        self.shards, fields, self.sizes, self.shape = _select(root, shape)
        self.transform = _Transform(root, flip=flip, sample=sample, normalize=normalize, fields=fields)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        worker = torch.utils.data.get_worker_info()
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        nw, wid = (worker.num_workers, worker.id) if worker else (1, 0)
        mine = order[rank * nw + wid::world * nw]
        rng = random.Random((self.seed + self.epoch) * 1_000_003 + rank * nw + wid)
        for s in mine:
            cols = read_shard(self.shards[s], self.transform.fields)[0]
            rows = list(range(len(cols["key"])))
            if self.shuffle:
                rng.shuffle(rows)
            for i in rows:
                yield self.transform(cols, i, rng)
