"""The shard format and the torch datasets of `ssdd_runtime.data`, on shards written directly (no Ray, no model):
parquet and safetensors round trips, zero-copy latent arrays from sliced columns, shape selection, flip and
moment sampling, normalisation, worker splitting of the iterable dataset, stats from shards."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ssdd_runtime import data as sdata

pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (pip install 'ssdd-runtime[ray]')")


def _latents(n, shape, seed):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def write(folder, index, n, shape=(4, 2, 3), fmt="parquet", seed=0, flip=False, moments=False):
    lat = {"latent": _latents(n, shape, seed)}
    if flip:
        lat["latent_flip"] = _latents(n, shape, seed + 100)
    if moments:
        lat["logvar"] = np.full((n, *shape), -2.0, np.float32)
        if flip:
            lat["logvar_flip"] = np.full((n, *shape), -2.0, np.float32)
    keys = [f"s{index}/{i}" for i in range(n)]
    sdata.write_shard(sdata.shard_path(folder, index, fmt), keys, list(range(n)), lat,
                      {"shape": list(shape), "errors": {}, "checkpoint": "ck@sha256:0"})
    return keys, lat


@pytest.mark.parametrize("fmt", ["parquet", "safetensors"])
def test_shard_round_trip(tmp_path, fmt):
    keys, lat = write(tmp_path, 0, 3, fmt=fmt, flip=True, moments=True)
    cols, info = sdata.read_shard(sdata.shard_path(tmp_path, 0, fmt))
    assert cols["key"] == keys and cols["label"].tolist() == [0, 1, 2] and info["checkpoint"] == "ck@sha256:0"
    for name, z in lat.items():
        assert cols[name].dtype == torch.float32
        np.testing.assert_array_equal(cols[name].numpy(), z)
    assert set(sdata.read_shard(sdata.shard_path(tmp_path, 0, fmt), ("latent",))[0]) == {"key", "label", "latent"}
    with pytest.raises(ValueError, match="expected shape"):
        sdata.write_shard(tmp_path / "shard-00009.parquet", ["a"], [0], {"latent": np.zeros((1, 4, 2, 2))},
                          {"shape": [4, 2, 3], "errors": {}})


def test_latent_array_of_a_sliced_column_and_empty_shard(tmp_path):
    z = _latents(5, (2, 3, 4), 1)
    col = sdata.latent_column(z)
    assert col.type == sdata.latent_type((2, 3, 4))
    np.testing.assert_array_equal(sdata.latent_array(col.slice(2, 2)), z[2:4])  # offsets honoured
    np.testing.assert_array_equal(sdata.latent_array(pa.chunked_array([col.slice(0, 2), col.slice(2)])), z)
    sdata.write_shard(tmp_path / "shard-00000.parquet", [], [], {"latent": np.zeros((0, 2, 3, 4), np.float32)},
                      {"shape": [2, 3, 4], "errors": {"x": "bad"}})
    cols, info = sdata.read_shard(tmp_path / "shard-00000.parquet")
    assert cols["latent"].shape == (0, 2, 3, 4) and info["errors"] == {"x": "bad"}


def test_latent_dataset_options(tmp_path):
    _, lat0 = write(tmp_path, 0, 3, flip=True, moments=True, seed=0)
    _, lat1 = write(tmp_path, 1, 2, flip=True, moments=True, seed=1)
    ds = sdata.LatentDataset(tmp_path)
    assert len(ds) == 5 and ds.shape == (4, 2, 3)
    z, y = ds[3]
    np.testing.assert_array_equal(z.numpy(), lat1["latent"][0])
    assert y.item() == 0 and ds[-1][1].item() == 1
    with pytest.raises(IndexError):
        ds[5]
    flipped = sdata.LatentDataset(tmp_path, flip=True, seed=0)
    seen = {bool(np.array_equal(flipped[0][0].numpy(), lat0["latent_flip"][0])) for _ in range(20)}
    assert seen == {True, False}  # both the image and its flip are drawn
    sampled = sdata.LatentDataset(tmp_path, sample=True)
    d = sampled[0][0].numpy() - lat0["latent"][0]
    assert 0 < np.abs(d).mean() and abs(d.std() - np.exp(-1.0)) < 0.15  # std = exp(logvar / 2) = e^-1
    stats = {"latents_mean": [1.0, 0.0, 0.0, 0.0], "latents_std": [2.0, 1.0, 1.0, 1.0]}
    norm = sdata.LatentDataset(tmp_path, normalize=stats)
    np.testing.assert_allclose(norm[0][0][0].numpy(), (lat0["latent"][0][0] - 1) / 2, rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="ssdd stats"):
        sdata.LatentDataset(tmp_path, normalize=True)
    with pytest.raises(ValueError, match="latents_std"):
        sdata.LatentDataset(tmp_path, normalize={"mean": 0})


def test_mixed_shapes_need_a_choice_and_missing_fields_are_named(tmp_path):
    write(tmp_path, 0, 2, shape=(4, 2, 3))
    write(tmp_path, 1, 1, shape=(4, 3, 3))
    with pytest.raises(ValueError, match="--resolution"):
        sdata.LatentDataset(tmp_path)
    assert len(sdata.LatentDataset(tmp_path, shape=(4, 3, 3))) == 1
    with pytest.raises(ValueError, match="--flip"):
        sdata.LatentDataset(tmp_path, shape=(4, 2, 3), flip=True)
    with pytest.raises(ValueError, match="--store moments"):
        sdata.LatentDataset(tmp_path, shape=(4, 2, 3), sample=True)


def test_iterable_dataset_splits_shards_across_workers(tmp_path):
    keys = []
    for s in range(4):
        write(tmp_path, s, 2 + s, seed=s)
        keys += [s] * (2 + s)
    ds = sdata.LatentIterableDataset(tmp_path, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    labels = sorted(y.item() for _, y in loader)
    assert labels == sorted(y for s in range(4) for y in range(2 + s))  # every row once across the workers
    ds.set_epoch(1)
    assert len(list(ds)) == sum(2 + s for s in range(4))


def test_stats_from_shards(tmp_path):
    from ssdd_runtime.integrations.latent_stats import shard_latent_stats

    _, lat0 = write(tmp_path, 0, 3, seed=0)
    _, lat1 = write(tmp_path, 1, 2, seed=1, shape=(4, 3, 3))  # mixed shapes: per-channel statistics still hold
    s = shard_latent_stats(tmp_path)
    flat = np.concatenate([z.transpose(1, 0, 2, 3).reshape(4, -1) for z in (lat0["latent"], lat1["latent"])], 1)
    np.testing.assert_allclose(s["latents_mean"], flat.mean(1), rtol=1e-6)
    np.testing.assert_allclose(s["latents_std"], flat.std(1, ddof=1), rtol=1e-6)
    assert s["num_images"] == 5 and s["scaling_factor"] == pytest.approx(1 / flat.std(ddof=1), rel=1e-6)
    mean, std = sdata.channel_stats(json.loads(json.dumps(s)))
    assert mean.shape == std.shape == (4,)
