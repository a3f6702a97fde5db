"""`tokenize` / `detokenize` on a local Ray cluster (ray.init(num_cpus=2)) with SSDD-S test weights saved to a
temporary .safetensors, tiny images (32x32, 48x40, 35x33 -> cropped to 32x32) and one corrupt file."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="ray not installed (pip install 'ssdd-runtime[ray]')")
pytest.importorskip("ray.data", reason="ray[data] not installed (pip install 'ssdd-runtime[ray]')")
pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (pip install 'ssdd-runtime[ray]')")

from PIL import Image  # noqa: E402

from ssdd_runtime.integrations import ray as sray  # noqa: E402
from ssdd_runtime.io import load_image, tensor_to_uint8  # noqa: E402
from ssdd_runtime.sampler import randn  # noqa: E402

SIZES = {"a.png": (32, 32), "b.jpg": (32, 32), "sub/c.png": (48, 40), "sub/d.png": (35, 33), "e.png": (32, 32)}


@pytest.fixture(scope="module")
def ray_local():
    assert ray.__name__ == "ray" and hasattr(ray, "init")  # the real package, not ssdd_runtime.integrations.ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):  # conftest: the deterministic SSDD-S f8c4 test weights as an official-format file
    return make_checkpoint("f8c4", "S", 0)


@pytest.fixture(scope="module")
def model(s_model):  # the same weights loaded by SSDD.from_pretrained
    return s_model


def make_folder(root):
    rng = np.random.default_rng(0)
    for name, (w, h) in SIZES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def direct(model, path):
    return model.encode(load_image(path, multiple_of=model.stride)).mode()[0]


def test_tokenize_equals_direct_encoding_resumes_and_reports_bad_images(ray_local, ckpt, model, tmp_path):
    src, out = make_folder(tmp_path / "imgs"), tmp_path / "lat"
    rep = sray.tokenize(src, out, checkpoint=ckpt, shard_size=2, batch_size=2, concurrency=1)
    keys = sorted([*SIZES, "bad.png"])  # 6 items -> shards [a, b] [bad, e] [sub/c, sub/d]
    assert (rep.total, rep.done, rep.failed, rep.skipped) == (6, 5, 1, 0)
    assert sorted(rep.shards_written) == [0, 1, 2] and rep.shards_skipped == []
    assert list(rep.errors) == ["bad.png"] and "UnidentifiedImageError" in rep.errors["bad.png"]

    got, errors = {}, {}
    for s in range(3):
        lat, info = sray.read_shard(out / f"shard-{s:05d}.parquet")
        assert info["checkpoint"] == rep.checkpoint and rep.checkpoint.startswith("f8c4_S_0.safetensors@sha256:")
        got.update(lat)
        errors.update(info["errors"])
    assert sorted(got) == [k for k in keys if k != "bad.png"] and list(errors) == ["bad.png"]
    for key, z in got.items():
        ref = direct(model, src / key)
        assert z.dtype == torch.float32 and z.shape == ref.shape
        torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)  # batched vs single: reassociation only
    assert got["sub/c.png"].shape == (4, 5, 6) and got["sub/d.png"].shape == (4, 4, 4)  # 35x33 cropped to 32x32

    table = pa.parquet.read_table(out / "shard-00001.parquet")  # the bad item is a row with its error, no latent
    assert table.column("key").to_pylist() == ["bad.png", "e.png"]
    assert table.column("latent").to_pylist()[0] is None and table.column("error").to_pylist()[1] is None
    assert table.column("shape").to_pylist()[1] == [4, 4, 4]

    # resume after a partial run: only the missing shard is written again, the others are not touched
    before = {s: (out / f"shard-{s:05d}.parquet").stat().st_mtime_ns for s in (0, 1)}
    (out / "shard-00002.parquet").unlink()
    (out / ".shard-00002.parquet.tmp").write_bytes(b"half-written by a killed run")  # ignored, replaced
    rep2 = sray.tokenize(src, out, checkpoint=ckpt, shard_size=2, batch_size=2, concurrency=1)
    assert rep2.shards_written == [2] and rep2.shards_skipped == [0, 1]
    assert (rep2.done, rep2.failed, rep2.skipped) == (2, 0, 4)
    assert {s: (out / f"shard-{s:05d}.parquet").stat().st_mtime_ns for s in (0, 1)} == before
    assert not (out / ".shard-00002.parquet.tmp").exists()
    lat2, _ = sray.read_shard(out / "shard-00002.parquet")
    for key in ("sub/c.png", "sub/d.png"):
        torch.testing.assert_close(lat2[key], got[key], rtol=0, atol=0)
    # nothing missing: no Ray work at all
    rep3 = sray.tokenize(src, out, checkpoint=ckpt, shard_size=2)
    assert rep3.shards_written == [] and rep3.skipped == 6
    # a different job in the same folder is refused instead of mixing shards
    with pytest.raises(ValueError, match="shard_size"):
        sray.tokenize(src, out, checkpoint=ckpt, shard_size=3)


def test_parquet_input_safetensors_shards_and_detokenize_roundtrip(ray_local, ckpt, model, tmp_path):
    from ssdd_runtime.cli import main

    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    blobs = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    blobs.insert(2, b"garbage")  # row 2 is corrupt
    keys = ["cat", "dog", "broken", "eel"]
    image = pa.array([{"bytes": b, "path": None} for b in blobs],  # the Hugging Face datasets Image layout
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pa.parquet.write_table(pa.table({"image": image, "name": keys}), tmp_path / "data.parquet", row_group_size=3)

    lat_dir, png_dir = tmp_path / "lat", tmp_path / "png"
    rc = main(["tokenize", str(tmp_path / "data.parquet"), "-o", str(lat_dir), "--checkpoint", str(ckpt),
               "--format", "safetensors", "--key-column", "name", "--shard-size", "3", "--batch-size", "2",
               "--concurrency", "1"])
    assert rc == 1  # finished, with one failed item
    lat, info = {}, {}
    for shard in sray.list_shards(lat_dir):
        z, meta = sray.read_shard(shard)
        lat.update(z)
        info.update(meta["errors"])
    assert sorted(lat) == ["cat", "dog", "eel"] and list(info) == ["broken"]
    for key, a in zip(["cat", "dog", "eel"], arrays):
        x = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 127.5 - 1
        torch.testing.assert_close(lat[key], model.encode(x).mode()[0], rtol=1e-5, atol=1e-5)

    rc = main(["detokenize", str(lat_dir), "-o", str(png_dir), "--checkpoint", str(ckpt), "--seed", "5",
               "--batch-size", "2", "--concurrency", "1"])
    assert rc == 0
    noise = randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(5))
    for key in ("cat", "dog", "eel"):
        png = np.asarray(Image.open(png_dir / f"{key}.png"))
        ref = tensor_to_uint8(model.decode(lat[key][None], noise=noise))[0]
        diff = np.abs(png.astype(int) - ref.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # batched decode: at most an 8-bit rounding flip
    assert not (png_dir / "broken.png").exists()
    # detokenize resumes per image: existing PNGs are skipped
    (png_dir / "dog.png").unlink()
    rep = sray.detokenize(lat_dir, png_dir, checkpoint=ckpt, seed=5, concurrency=1)
    assert (rep.total, rep.done, rep.skipped, rep.failed) == (3, 1, 2, 0)
    assert (png_dir / "dog.png").exists()


def test_inputs_and_names(tmp_path):
    src = make_folder(tmp_path / "imgs")
    items = sray.list_inputs(src)
    assert [i.key for i in items] == sorted([*SIZES, "bad.png"])
    assert [i.key for i in sray.list_inputs([src / "a.png"])] == [str(src / "a.png")]
    with pytest.raises(FileNotFoundError, match="input not found"):
        sray.list_inputs(tmp_path / "missing")
    with pytest.raises(ValueError, match="duplicate"):
        sray.list_inputs([src, src])
    assert [len(s) for s in sray.plan_shards(items, 4)] == [4, 2]
    assert str(sray.png_name("sub/c.jpg")) == "sub/c.png" and str(sray.png_name("../x/y")) == "x/y.png"
    # inside ssdd_runtime/integrations/ray.py, `import ray` is the real package (absolute imports)
    assert sray._import_ray() is ray and sray.__name__ == "ssdd_runtime.integrations.ray"
