"""`tokenize` / `detokenize` on one local Ray cluster shared by the module (ray.init(num_cpus=2)) with SSDD-S
test weights saved to a temporary .safetensors: tiny images of mixed sizes, a corrupt file and a decompression
bomb; ImageFolder labels with --resolution/--flip/--store moments read back by pyarrow, pandas, `datasets` and
LatentDataset (two training steps of a tiny DiT); a Hugging Face parquet whose image structs hold paths."""
from __future__ import annotations

import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="ray not installed (pip install 'ssdd-runtime[ray]')")
pytest.importorskip("ray.data", reason="ray[data] not installed (pip install 'ssdd-runtime[ray]')")
pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (pip install 'ssdd-runtime[ray]')")
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from ssdd_runtime import data as sdata  # noqa: E402
from ssdd_runtime.integrations import ray as sray  # noqa: E402
from ssdd_runtime.io import adm_center_crop, load_image, pil_to_tensor, tensor_to_uint8  # noqa: E402
from ssdd_runtime.sampler import randn  # noqa: E402

SIZES = {"a.png": (32, 32), "b.jpg": (32, 32), "sub/c.png": (48, 40), "sub/d.png": (35, 33), "e.png": (32, 32)}


@pytest.fixture(scope="module")
def ray_local():
    assert ray.__name__ == "ray" and hasattr(ray, "init")  # the real package, not ssdd_runtime.integrations.ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):  # conftest: the deterministic SSDD-S f8c4 test weights as an official-format file
    return make_checkpoint("f8c4", "S", 0)


@pytest.fixture(scope="module")
def model(s_model):  # the same weights loaded by SSDD.from_pretrained
    return s_model


def bomb_png() -> bytes:
    """A valid PNG header claiming 30000x30000 RGB (PIL refuses > 2 * MAX_IMAGE_PIXELS at open)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def random_image(rng, w, h) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_folder(root):
    rng = np.random.default_rng(0)
    for name, (w, h) in SIZES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        random_image(rng, w, h).save(root / name)
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "bomb.png").write_bytes(bomb_png())
    return root


def direct(model, path):
    return model.encode(load_image(path, multiple_of=model.stride)).mode()[0]


def test_tokenize_groups_shapes_equals_direct_encoding_resumes_and_records_bad_items(ray_local, ckpt, model,
                                                                                      tmp_path):
    src, out = make_folder(tmp_path / "imgs"), tmp_path / "lat"
    rep = sray.tokenize(src, out, checkpoint=ckpt, shard_size=2, batch_size=2, concurrency=1)
    # 7 items; bad.png and bomb.png fail at their header: the job goes on, both recorded per item
    assert (rep.total, rep.done, rep.failed, rep.skipped) == (7, 5, 2, 0)
    assert "UnidentifiedImageError" in rep.errors["bad.png"] and "DecompressionBombError" in rep.errors["bomb.png"]
    manifest = sdata.read_manifest(out)
    assert sorted(manifest["errors"]) == ["bad.png", "bomb.png"]
    # one latent shape per shard: (4, 4, 4) a b | e sub/d, then (4, 5, 6) sub/c
    assert [s["shape"] for s in manifest["shards"]] == [[4, 4, 4], [4, 4, 4], [4, 5, 6]]
    assert sorted(rep.shards_written) == [0, 1, 2]

    got = {}
    for s, keys in enumerate([["a.png", "b.jpg"], ["e.png", "sub/d.png"], ["sub/c.png"]]):
        cols, info = sdata.read_shard(out / f"shard-{s:05d}.parquet")
        assert cols["key"] == keys and info["checkpoint"] == rep.checkpoint and info["encoder"] == "f8c4"
        assert rep.checkpoint.startswith("f8c4_S_0.safetensors@sha256:") and info["errors"] == {}
        assert cols["latent"].shape == (len(keys), *info["shape"]) and cols["label"].tolist() == [-1] * len(keys)
        got.update(zip(keys, cols["latent"]))
    for key, z in got.items():
        torch.testing.assert_close(z, direct(model, src / key), rtol=1e-5, atol=1e-5)  # batched vs single
    assert (out / "shard-00000.parquet").stat().st_mode & 0o777 == 0o666 & ~_umask()  # ordinary permissions

    # resume after a partial run: only the missing shard is written again, the others are not touched
    before = {s: (out / f"shard-{s:05d}.parquet").stat().st_mtime_ns for s in (0, 1)}
    (out / "shard-00002.parquet").unlink()
    (out / ".shard-00002.parquet.x.tmp").write_bytes(b"half-written by a killed run")  # hidden: never read
    rep2 = sray.tokenize(src, out, checkpoint=ckpt, shard_size=2, batch_size=2, concurrency=1)
    assert rep2.shards_written == [2] and rep2.shards_skipped == [0, 1] and (rep2.done, rep2.skipped) == (1, 4)
    assert {s: (out / f"shard-{s:05d}.parquet").stat().st_mtime_ns for s in (0, 1)} == before
    torch.testing.assert_close(sdata.read_shard(out / "shard-00002.parquet")[0]["latent"][0], got["sub/c.png"],
                               rtol=0, atol=0)
    rep3 = sray.tokenize(src, out, checkpoint=ckpt, shard_size=2)  # nothing missing: no Ray work at all
    assert rep3.shards_written == [] and rep3.skipped == 5
    with pytest.raises(ValueError, match="shard_size"):  # a different job in the same folder is refused
        sray.tokenize(src, out, checkpoint=ckpt, shard_size=3)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_imagefolder(root):
    rng = np.random.default_rng(2)
    for cls, sizes in (("cat", [(40, 36), (64, 48)]), ("dog", [(33, 50), (80, 80), (32, 32)])):
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            random_image(rng, w, h).save(root / cls / f"{i}.png")
    (root / "dog" / "bomb.png").write_bytes(bomb_png())
    return root


def test_training_ready_latents_load_everywhere_and_train_a_dit(ray_local, ckpt, model, tmp_path):
    from ssdd_runtime.cli import main

    src, out = make_imagefolder(tmp_path / "train"), tmp_path / "lat"
    rc = main(["tokenize", str(src), "-o", str(out), "--checkpoint", str(ckpt), "--resolution", "32", "--flip",
               "--store", "moments", "--labels", "folder", "--shard-size", "3", "--batch-size", "2"])
    assert rc == 1  # finished; the bomb (decoded in the actor with --resolution) is recorded, not fatal
    assert sorted(os.listdir(out)) == [".ssdd", "shard-00000.parquet", "shard-00001.parquet"]
    cols0, info0 = sdata.read_shard(out / "shard-00000.parquet")
    cols1, info1 = sdata.read_shard(out / "shard-00001.parquet")
    assert list(info1["errors"]) == ["dog/bomb.png"] and "DecompressionBombError" in info1["errors"]["dog/bomb.png"]
    assert info0["classes"] == ["cat", "dog"] and info0["resolution"] == 32 and info0["shape"] == [4, 4, 4]
    keys = cols0["key"] + cols1["key"]
    labels = torch.cat([cols0["label"], cols1["label"]]).tolist()
    assert keys == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png", "dog/2.png"] and labels == [0, 0, 1, 1, 1]
    for i, key in enumerate(cols0["key"]):  # the ADM crop, its flip, mean and logvar equal direct encoding
        with Image.open(src / key) as im:
            x = pil_to_tensor(adm_center_crop(im, 32))
        post, post_f = model.encode(x), model.encode(x.flip(-1))
        for name, ref in (("latent", post.mean), ("logvar", post.logvar), ("latent_flip", post_f.mean),
                          ("logvar_flip", post_f.logvar)):
            torch.testing.assert_close(cols0[name][i], ref[0], rtol=1e-5, atol=1e-5, msg=f"{key} {name}")

    # pyarrow, pandas and datasets read the folder as (C, h, w) arrays
    table = pq.read_table(out)  # pyarrow.dataset skips the .ssdd sidecar
    assert table.num_rows == 5 and sdata.latent_array(table.column("latent")).shape == (5, 4, 4, 4)
    assert json.loads(table.schema.metadata[b"ssdd"])["checkpoint"].startswith("f8c4_S_0")
    import pandas as pd

    df = pd.read_parquet(out)
    assert list(df.columns) == ["key", "label", "latent", "latent_flip", "logvar", "logvar_flip"]
    assert np.stack([np.stack([np.stack(c) for c in z]) for z in df.latent]).shape == (5, 4, 4, 4)
    datasets = pytest.importorskip("datasets", reason="datasets not installed: the datasets part is skipped")
    ds = datasets.load_dataset("parquet", data_dir=str(out), split="train").with_format("torch")
    batch = ds[:5]
    assert batch["latent"].shape == (5, 4, 4, 4) and batch["latent"].dtype == torch.float32
    torch.testing.assert_close(batch["latent"][:3], cols0["latent"], rtol=0, atol=0)
    assert batch["label"].tolist() == labels

    # ssdd stats OUT: from the shards, no checkpoint; LatentDataset normalises with it
    assert main(["stats", str(out)]) == 0
    stats = json.loads((out / ".ssdd" / "latent_stats.json").read_text())
    z = torch.cat([cols0["latent"], cols1["latent"]]).double().transpose(0, 1).reshape(4, -1)
    np.testing.assert_allclose(stats["latents_mean"], z.mean(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(stats["latents_std"], z.std(1).numpy(), rtol=1e-6)
    assert stats["num_images"] == 5 and list(stats["errors"]) == [] and stats["encoder"] == "f8c4"

    dset = sdata.LatentDataset(out, flip=True, sample=True, normalize=True)
    assert len(dset) == 5
    zs = torch.stack([dset[i][0] for i in range(5)])
    assert zs.shape == (5, 4, 4, 4) and torch.isfinite(zs).all()
    plain = sdata.LatentDataset(out, normalize=stats)
    mean, std = sdata.channel_stats(stats)
    torch.testing.assert_close(plain[4][0], (cols1["latent"][1] - mean[:, None, None]) / std[:, None, None])
    assert plain[4][1].item() == 1
    stream = list(sdata.LatentIterableDataset(out, flip=True, seed=3))
    assert len(stream) == 5 and sorted(label.item() for _, label in stream) == sorted(labels)
    _train_two_dit_steps(torch.utils.data.DataLoader(dset, batch_size=4, shuffle=True), num_classes=2)


def _train_two_dit_steps(loader, *, num_classes):
    """Two optimiser steps of a tiny class-conditional diffusers DiT on flow-matching targets."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed: the DiT part is skipped")
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                          out_channels=4, num_layers=1, sample_size=4, patch_size=2,
                                          num_embeds_ada_norm=num_classes)
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in dit.parameters()]
    losses = []
    for step, (z, y) in zip(range(2), loader):
        t = torch.rand(len(z))
        eps = torch.randn_like(z)
        xt = (1 - t[:, None, None, None]) * z + t[:, None, None, None] * eps
        pred = dit(xt, timestep=t * 999, class_labels=y).sample
        loss = ((pred - (eps - z)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert any(not torch.equal(a, b) for a, b in zip(before, dit.parameters()))


def test_hf_parquet_with_paths_safetensors_shards_and_detokenize_roundtrip(ray_local, ckpt, model, tmp_path):
    from ssdd_runtime.cli import main

    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    (tmp_path / "images").mkdir()
    cells = []
    for i, a in enumerate(arrays[:2]):  # HF `datasets` writes local images as {"bytes": None, "path": ...}
        Image.fromarray(a).save(tmp_path / "images" / f"{i}.png")
        cells.append({"bytes": None, "path": f"images/{i}.png"})
    buf = io.BytesIO()
    Image.fromarray(arrays[2]).save(buf, format="PNG")
    cells += [{"bytes": buf.getvalue(), "path": None}, {"bytes": None, "path": "images/missing.png"},
              {"bytes": b"garbage", "path": None}]
    keys = ["cat", "dog", "eel", "gone", "broken"]
    image = pa.array(cells, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": image, "name": keys, "label": [3, 1, 4, 1, 5]}), tmp_path / "data.parquet",
                   row_group_size=3)

    lat_dir, png_dir = tmp_path / "lat", tmp_path / "png"
    rc = main(["tokenize", str(tmp_path / "data.parquet"), "-o", str(lat_dir), "--checkpoint", str(ckpt),
               "--format", "safetensors", "--key-column", "name", "--labels", "label", "--shard-size", "8",
               "--batch-size", "2", "--concurrency", "1", "--num-cpus-per-actor", "1"])
    assert rc == 1  # finished, with two failed items
    manifest = sdata.read_manifest(lat_dir)
    assert sorted(manifest["errors"]) == ["broken", "gone"]
    assert "not found" in manifest["errors"]["gone"] and "relative to the parquet file" in manifest["errors"]["gone"]
    (shard,) = sdata.list_shards(lat_dir)
    cols, info = sdata.read_shard(shard)
    assert cols["key"] == ["cat", "dog", "eel"] and cols["label"].tolist() == [3, 1, 4]
    for i, a in enumerate(arrays[:3]):
        x = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 127.5 - 1
        torch.testing.assert_close(cols["latent"][i], model.encode(x).mode()[0], rtol=1e-5, atol=1e-5)
    assert sdata.LatentDataset(lat_dir)[2][1].item() == 4

    rc = main(["detokenize", str(lat_dir), "-o", str(png_dir), "--checkpoint", str(ckpt), "--seed", "5",
               "--batch-size", "2", "--concurrency", "1"])
    assert rc == 0
    noise = randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(5))
    for i, key in enumerate(cols["key"]):
        png = np.asarray(Image.open(png_dir / f"{key}.png"))
        ref = tensor_to_uint8(model.decode(cols["latent"][i][None], noise=noise))[0]
        diff = np.abs(png.astype(int) - ref.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # batched decode: at most an 8-bit rounding flip
    (png_dir / "dog.png").unlink()  # detokenize resumes per image: existing PNGs are skipped
    rep = sray.detokenize(lat_dir, png_dir, checkpoint=ckpt, seed=5, concurrency=1)
    assert (rep.total, rep.done, rep.skipped, rep.failed) == (3, 1, 2, 0) and (png_dir / "dog.png").exists()


def test_inputs_labels_pool_and_names(ray_local, tmp_path):
    src = make_folder(tmp_path / "imgs")
    items, classes = sray.list_inputs(src)
    assert [i.key for i in items] == sorted([*SIZES, "bad.png", "bomb.png"]) and classes is None
    assert [i.key for i in sray.list_inputs([src / "a.png"])[0]] == [str(src / "a.png")]
    with pytest.raises(ValueError, match="have no label"):  # top-level files have no class folder
        sray.list_inputs(src, labels="folder")
    with pytest.raises(FileNotFoundError, match="input not found"):
        sray.list_inputs(tmp_path / "missing")
    with pytest.raises(ValueError, match="duplicate"):
        sray.list_inputs([src, src])
    shapes = {"a": (4, 2, 2), "b": (4, 1, 1), "c": (4, 2, 2)}
    plan = sray.plan_shards([sray.Item(k, k) for k in "abcd"], 1, shapes)
    assert [(s, [i.key for i in g]) for s, g in plan] == [((4, 1, 1), ["b"]), ((4, 2, 2), ["a"]), ((4, 2, 2), ["c"])]
    assert sray.fields_for(True, "moments") == ["latent", "latent_flip", "logvar", "logvar_flip"]
    # the CPU pool uses every core: one actor with both CPUs (and 2 torch threads), or actors splitting them
    assert sray._pool(ray, None, None, None) == (0.0, 2.0, 1)
    assert sray._pool(ray, None, None, 2) == (0.0, 1.0, 2) and sray._pool(ray, None, 1, None) == (0.0, 1, 2)
    assert sray.png_name("sub/c.jpg") == "sub/c.png" and sray.png_name("../x/y") == "x/y.png"
    assert sray.png_name("/abs/p.png") == "abs/p.png"
    # inside ssdd_runtime/integrations/ray.py, `import ray` is the real package (absolute imports)
    assert sray._import_ray() is ray and sray.__name__ == "ssdd_runtime.integrations.ray"
