"""Issue 20, data jobs: no shard, statistic or PNG is silently wrong, lost or overwritten, and no job hangs.

Resume verifies shards (truncated ones are written again, another job's are refused), impossible actor resources
are refused up front, one bad latent fails only its own item, stats never hold NaN, outputs never replace inputs,
and every corrupt file is named. Ray cases share one local cluster (ray.init(num_cpus=2)); CLI cases run `ssdd`
in a subprocess connected to that cluster with --address, so no second cluster is started."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ssdd_runtime import data as sdata
from ssdd_runtime import io as sio

pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (pip install 'ssdd-runtime[ray]')")


def ssdd(*args, timeout=180):
    """`ssdd ARGS` in a fresh interpreter; a hang fails the test at `timeout` instead of blocking the run."""
    return subprocess.run([sys.executable, "-m", "ssdd_runtime", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(res, command):
    err = res.stderr.strip()
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in err.splitlines() if line.startswith(f"ssdd {command}: error: ")]
    assert "Traceback" not in err and len(errors) == 1 and err.endswith(errors[0]), err[-2000:]
    return errors[0]


def make_images(folder, n=3, size=32, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def write_shard(folder, index, latents, fmt="parquet", keys=None, **info):
    keys = keys if keys is not None else [f"k{index}_{i}" for i in range(len(latents))]
    folder.mkdir(parents=True, exist_ok=True)
    sdata.write_shard(sdata.shard_path(folder, index, fmt), keys, [-1] * len(keys), {"latent": latents},
                      {"shape": list(latents.shape[1:]), "errors": {}, "checkpoint": "ck@sha256:0", **info})
    return keys


def latents(n, seed=0, shape=(4, 4, 4)):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# No Ray: shards, stats, LatentDataset, io


def test_stats_skips_non_finite_latents_and_never_writes_nan(tmp_path):
    z = latents(3)
    z[1, 2, 0, 0] = np.nan
    keys = write_shard(tmp_path, 0, z)
    res = ssdd("stats", tmp_path)
    assert res.returncode == 0, res.stderr
    text = (tmp_path / ".ssdd" / "latent_stats.json").read_text()
    stats = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the stats JSON"))
    good = torch.from_numpy(z[[0, 2]]).double().transpose(0, 1).reshape(4, -1)
    np.testing.assert_allclose(stats["latents_mean"], good.mean(1).numpy(), rtol=1e-9)
    assert stats["num_images"] == 2 and stats["num_non_finite"] == 1 and list(stats["errors"]) == [keys[1]]
    assert "non-finite" in res.stderr and keys[1] in res.stderr
    z_all_bad = np.full((2, 4, 4, 4), np.inf, np.float32)
    bad_dir = tmp_path / "bad"
    write_shard(bad_dir, 0, z_all_bad)
    err = one_line_error(ssdd("stats", bad_dir), "stats")
    assert "no finite latents" in err and not (bad_dir / ".ssdd" / "latent_stats.json").exists()


def test_stats_refuses_an_output_that_is_an_input_or_the_job_manifest(tmp_path):
    lat = tmp_path / "lat"
    write_shard(lat, 0, latents(2))
    (lat / ".ssdd").mkdir()
    (lat / ".ssdd" / "manifest.json").write_text('{"checkpoint": "ck@sha256:0"}')
    (tmp_path / "link.json").symlink_to(lat / "shard-00000.parquet")  # the same file under another name
    before = {p: p.read_bytes() for p in (lat / "shard-00000.parquet", lat / ".ssdd" / "manifest.json")}
    for target in (lat / "shard-00000.parquet", lat / ".ssdd" / "manifest.json", tmp_path / "link.json"):
        err = one_line_error(ssdd("stats", lat, "-o", target), "stats")
        assert "is one of the inputs" in err
    assert {p: p.read_bytes() for p in before} == before  # nothing overwritten
    # images mode goes through the same io.check_output
    imgs = make_images(tmp_path / "imgs", n=1)
    with pytest.raises(ValueError, match="is one of the inputs"):
        sio.check_output(imgs / "img0.png", inputs=[imgs / "img0.png"])
    with pytest.raises(ValueError, match="holds the input job's own files"):
        sio.check_output(lat / ".ssdd" / "x.json", reserved=[lat / ".ssdd"])


def test_stats_on_an_empty_folder_says_it_is_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    err = one_line_error(ssdd("stats", tmp_path / "empty"), "stats")
    assert "no shards" in err and "no images" in err and "--checkpoint" not in err


def zero_middle(path, n=512):
    data = bytearray(path.read_bytes())
    mid = len(data) // 3
    data[mid:mid + n] = bytes(n)
    path.write_bytes(bytes(data))


def test_a_shard_corrupted_in_place_is_found_not_read_as_zeros(tmp_path):
    z = latents(8, shape=(4, 16, 16))
    write_shard(tmp_path, 0, z)
    zero_middle(tmp_path / "shard-00000.parquet", 4096)  # size and footer unchanged
    with pytest.raises(ValueError, match=r"shard-00000.parquet is not readable \(.*CRC"):
        sdata.read_shard(tmp_path / "shard-00000.parquet")
    with pytest.raises(ValueError, match=r"shard-00000.parquet is not readable"):
        sdata.LatentDataset(tmp_path)[0]


def test_corrupt_shards_and_manifest_are_named_everywhere(tmp_path):
    lat = tmp_path / "lat"
    write_shard(lat, 0, latents(2))
    write_shard(lat, 1, latents(2, seed=1))
    shard = lat / "shard-00001.parquet"
    os.truncate(shard, 300)
    for fn in (lambda: sdata.read_shard(shard), lambda: sdata.LatentDataset(lat),
               lambda: sdata.LatentIterableDataset(lat)):
        with pytest.raises(ValueError, match="shard-00001.parquet is not readable"):
            fn()
    err = one_line_error(ssdd("stats", lat), "stats")
    assert "shard-00001.parquet is not readable" in err
    (lat / ".ssdd").mkdir()
    (lat / ".ssdd" / "manifest.json").write_text('{"checkpoint": ')
    with pytest.raises(ValueError, match=r"manifest .*manifest.json is not valid JSON"):
        sdata.read_manifest(lat)


def test_columns_of_different_lengths_wrong_dtype_and_empty_shards_are_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    uneven = tmp_path / "uneven"
    uneven.mkdir()
    info = {"shape": [4, 4, 4], "errors": {}, "keys": ["a", "b", "c"]}
    save_file({"latent": torch.zeros(2, 4, 4, 4), "label": torch.zeros(3, dtype=torch.int64)},
              str(uneven / "shard-00000.safetensors"), metadata={"ssdd": json.dumps(info)})
    for fn in (lambda: sdata.LatentDataset(uneven), lambda: sdata.read_shard(uneven / "shard-00000.safetensors")):
        with pytest.raises(ValueError, match=r"shard-00000.safetensors is inconsistent.*different lengths"):
            fn()
    f64 = tmp_path / "f64"
    f64.mkdir()
    save_file({"latent": torch.zeros(3, 4, 4, 4, dtype=torch.float64), "label": torch.zeros(3, dtype=torch.int64)},
              str(f64 / "shard-00000.safetensors"), metadata={"ssdd": json.dumps(info)})
    with pytest.raises(ValueError, match=r"shard-00000.safetensors: latent columns must be float32"):
        sdata.LatentDataset(f64)
    lying = tmp_path / "lying"
    write_shard(lying, 0, latents(2, shape=(4, 4, 4)))
    import pyarrow.parquet as pq

    table = pq.read_table(lying / "shard-00000.parquet")
    info = {**json.loads(table.schema.metadata[b"ssdd"]), "shape": [4, 2, 8]}
    pq.write_table(table.replace_schema_metadata({"ssdd": json.dumps(info)}), lying / "shard-00000.parquet")
    with pytest.raises(ValueError, match=r"metadata says latent shape \[4, 2, 8\], its columns hold"):
        sdata.LatentDataset(lying)  # else it would claim shape (4, 2, 8) for (4, 4, 4) latents
    empty = tmp_path / "empty"
    write_shard(empty, 0, np.zeros((0, 4, 8, 8), np.float32), keys=[])
    with pytest.raises(ValueError, match=r"shape \(4, 8, 8\) are empty \(0 rows"):
        sdata.LatentDataset(empty)


def test_non_finite_normalisation_numbers_are_refused():
    from ssdd_runtime.integrations.latent_stats import latent_normalization

    with pytest.raises(ValueError, match="latents_mean/latents_std must be finite"):
        sdata.channel_stats({"latents_mean": [0.0, float("nan")], "latents_std": [1.0, 1.0]})
    with pytest.raises(ValueError, match="shift_factor must be a finite number"):
        latent_normalization(stats={"scaling_factor": 1.0, "shift_factor": float("nan")})


def test_big_endian_npy_latents_are_read_in_native_order(tmp_path):
    z = latents(2)
    np.save(tmp_path / "be.npy", z.astype(">f4"))
    got, meta = sio.load_latents(tmp_path / "be.npy")
    assert got.dtype == torch.float32 and meta == {}
    torch.testing.assert_close(got, torch.from_numpy(z), rtol=0, atol=0)


def test_per_item_runs_a_failing_batch_one_item_at_a_time():
    from ssdd_runtime.integrations.ray import per_item

    seen, errors = [], [""] * 4
    items = [(i, torch.full((1, 2), float("nan") if i == 2 else float(i))) for i in range(4)]

    def run(index, x):
        if not bool(torch.isfinite(x).all()):
            raise ValueError("latent contains non-finite values")
        seen.extend(index)

    per_item(items, run, errors)
    assert sorted(seen) == [0, 1, 3] and errors[2].startswith("ValueError: latent contains") and errors.count("") == 3
    with pytest.raises(MemoryError):  # not an item's fault: the job fails (and resumes on a re-run)
        per_item(items, lambda index, x: (_ for _ in ()).throw(MemoryError()), [""] * 4)


def test_stats_refuses_mixed_channels_mixed_checkpoints_and_a_shard_named_output(tmp_path):
    from ssdd_runtime.integrations.latent_stats import shard_latent_stats

    mixed = tmp_path / "mixed"
    write_shard(mixed, 0, latents(2, shape=(4, 4, 4)))
    write_shard(mixed, 1, latents(2, shape=(16, 2, 2)))  # 64 values per item too: a reshape would not notice
    with pytest.raises(ValueError, match=r"shard .*shard-00001.parquet holds 16-channel latents"):
        shard_latent_stats(mixed)
    two = tmp_path / "two"
    write_shard(two, 0, latents(2))
    write_shard(two, 1, latents(2), checkpoint="other@sha256:1")
    for fn in (shard_latent_stats, sdata.LatentDataset):
        with pytest.raises(ValueError, match="come from different checkpoints"):
            fn(two)
    (two / "shard-00001.parquet").unlink()
    (two / ".ssdd").mkdir()
    (two / ".ssdd" / "manifest.json").write_text('{"checkpoint": "other@sha256:1", "errors": {}}')
    with pytest.raises(ValueError, match="the manifest belongs to another job"):  # else stats name the wrong one
        shard_latent_stats(two)
    lat = tmp_path / "lat"
    write_shard(lat, 0, latents(2))
    err = one_line_error(ssdd("stats", lat, "-o", lat / "shard-00009.parquet"), "stats")
    assert "a name the shards' job owns" in err and sorted(os.listdir(lat)) == ["shard-00000.parquet"]


def test_the_jobs_own_files_are_not_inputs_through_a_symlinked_output(tmp_path):
    from ssdd_runtime.integrations.ray import list_inputs

    src = make_images(tmp_path / "imgs", n=2)
    write_shard(src / "lat", 0, latents(1))
    (src / "lat" / ".ssdd").mkdir()
    (src / "lat" / ".ssdd" / "manifest.json").write_text("{}")
    (tmp_path / "link").symlink_to(src / "lat")
    items, _ = list_inputs(src, output_dir=tmp_path / "link")
    assert [it.key for it in items] == ["img0.png", "img1.png"]
    with pytest.raises(ValueError, match="no image column"):  # without output_dir the shard is read as an input
        list_inputs(src)


def test_an_interrupted_shard_write_leaves_nothing_and_a_bad_manifest_is_named(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    def cut(table, where, **kw):
        with open(where, "wb") as f:
            f.write(b"PAR1 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", cut)
    with pytest.raises(KeyboardInterrupt):
        write_shard(tmp_path, 0, latents(2))
    assert os.listdir(tmp_path) == []  # no shard-00000.parquet to be taken as done, no temp file
    monkeypatch.undo()
    (tmp_path / ".ssdd").mkdir()
    (tmp_path / ".ssdd" / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"manifest.json holds list, expected a JSON object"):
        sdata.read_manifest(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Ray jobs on one local cluster

ray = pytest.importorskip("ray", reason="ray not installed (pip install 'ssdd-runtime[ray]')")


@pytest.fixture(scope="module")
def ray_local():
    pytest.importorskip("ray.data", reason="ray[data] not installed (pip install 'ssdd-runtime[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint("f8c4", "S", 0)


def tokenize(src, out, ckpt, **kw):
    from ssdd_runtime.integrations.ray import tokenize as run

    return run(src, out, checkpoint=ckpt, **{"shard_size": 2, "batch_size": 2, "concurrency": 1, **kw})


def test_resume_redoes_a_truncated_shard_and_refuses_another_jobs_shards(ray_local, ckpt, tmp_path):
    src, out = make_images(tmp_path / "imgs"), tmp_path / "lat"
    assert tokenize(src, out, ckpt).shards_written == [0, 1]
    good = sdata.read_shard(out / "shard-00000.parquet")[0]
    os.truncate(out / "shard-00000.parquet", 300)  # a copy cut short: the footer is gone
    rep = tokenize(src, out, ckpt)
    assert rep.shards_redone == [0] and rep.shards_written == [0] and rep.shards_skipped == [1]
    again = sdata.read_shard(out / "shard-00000.parquet")[0]
    assert again["key"] == good["key"]
    torch.testing.assert_close(again["latent"], good["latent"], rtol=0, atol=0)
    zero_middle(out / "shard-00001.parquet")  # same size, footer intact, latent pages zeroed
    rep = tokenize(src, out, ckpt)
    assert rep.shards_redone == [1] and rep.shards_skipped == [0]
    assert len(sdata.read_shard(out / "shard-00001.parquet")[0]["key"]) == 1

    # the manifest deleted, then a re-run with other options: the shards are not claimed as done
    manifest = out / ".ssdd" / "manifest.json"
    manifest.unlink()
    before = {p.name: p.read_bytes() for p in out.glob("shard-*")}
    with pytest.raises(ValueError, match=r"shard-00000.parquet was written by a different job \(flip, columns"):
        tokenize(src, out, ckpt, flip=True)
    assert not manifest.exists()  # no manifest claiming flip=True for shards without latent_flip
    with pytest.raises(ValueError, match=r"holds shards this job does not plan \(shard-00001.parquet\)"):
        tokenize(src, out, ckpt, shard_size=3)  # a stale shard of another --shard-size would be read twice
    assert {p.name: p.read_bytes() for p in out.glob("shard-*")} == before
    rep = tokenize(src, out, ckpt)  # the same job again: verified, skipped, manifest rewritten
    assert rep.shards_skipped == [0, 1] and rep.shards_redone == [] and manifest.exists()


def test_output_inside_the_input_folder_resumes_and_inputs_are_named(ray_local, ckpt, tmp_path):
    src = make_images(tmp_path / "imgs")
    out = src / "lat"
    first = tokenize(src, out, ckpt)
    second = tokenize(src, out, ckpt)  # its own shards are not taken as parquet inputs
    assert (first.total, second.total, second.skipped, second.shards_written) == (3, 3, 3, [])
    (src / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"input .*broken.parquet is not a readable parquet file"):
        tokenize(src, tmp_path / "lat2", ckpt)


def test_cli_refuses_resources_that_never_come_and_empty_inputs(ray_local, ckpt, tmp_path):
    src = make_images(tmp_path / "imgs", n=1)
    common = ["--checkpoint", ckpt, "--address", ray_local]
    err = one_line_error(ssdd("tokenize", src, "-o", tmp_path / "a", *common, "--num-gpus-per-actor", "1",
                              timeout=120), "tokenize")
    assert "num_gpus_per_actor=1 cannot be met" in err and "0 GPUs" in err
    err = one_line_error(ssdd("tokenize", src, "-o", tmp_path / "b", *common, "--num-cpus-per-actor", "4",
                              timeout=120), "tokenize")
    assert "num_cpus_per_actor=4 cannot be met" in err and "2 CPUs" in err
    (tmp_path / "empty").mkdir()
    err = one_line_error(ssdd("tokenize", tmp_path / "empty", "-o", tmp_path / "c", *common), "tokenize")
    assert "no images or parquet files found" in err


def test_detokenize_writes_the_good_items_and_reports_a_non_finite_latent(ray_local, ckpt, tmp_path):
    lat, png = tmp_path / "lat", tmp_path / "png"
    z = latents(3)
    z[1] = np.nan
    write_shard(lat, 0, z, keys=["good0", "nan", "good2"])
    res = ssdd("detokenize", lat, "-o", png, "--checkpoint", ckpt, "--address", ray_local, "--batch-size", "3",
               "--concurrency", "1")
    assert res.returncode == 1, res.stderr[-3000:]  # finished, with a failed item
    assert "Traceback" not in res.stderr and "failed nan: ValueError: latent contains" in res.stderr
    assert "2 ok, 1 failed" in res.stdout
    assert sorted(os.listdir(png)) == ["good0.png", "good2.png"]
    for name in ("good0.png", "good2.png"):
        with Image.open(png / name) as im:
            assert im.size == (32, 32)
    empty = tmp_path / "empty"
    write_shard(empty, 0, np.zeros((0, 4, 4, 4), np.float32), keys=[])
    err = one_line_error(ssdd("detokenize", empty, "-o", tmp_path / "p2", "--checkpoint", ckpt, "--address",
                              ray_local), "detokenize")
    assert "hold no latents" in err


def test_detokenize_keeps_repeated_keys_apart_and_redoes_a_truncated_png(ray_local, ckpt, tmp_path):
    from ssdd_runtime.integrations.ray import detokenize

    lat, png = tmp_path / "lat", tmp_path / "png"
    write_shard(lat, 0, latents(1, seed=1), keys=["dup"])
    write_shard(lat, 1, latents(1, seed=2), keys=["dup"])  # e.g. two jobs' shards copied into one folder
    rep = detokenize(lat, png, checkpoint=ckpt, batch_size=2, concurrency=1)
    assert (rep.total, rep.done, rep.failed) == (2, 2, 0) and sorted(os.listdir(png)) == ["dup-1.png", "dup.png"]
    a, b = (np.asarray(Image.open(png / n)) for n in ("dup.png", "dup-1.png"))
    assert not np.array_equal(a, b)  # each latent got its own PNG; none decoded twice, none lost
    os.truncate(png / "dup.png", 100)  # a copy cut short is not counted as done
    rep = detokenize(lat, png, checkpoint=ckpt, batch_size=2, concurrency=1)
    assert (rep.done, rep.skipped) == (1, 1)
    np.testing.assert_array_equal(np.asarray(Image.open(png / "dup.png")), a)


def test_the_wait_for_actors_is_bounded(ray_local, ckpt, tmp_path, monkeypatch):
    """Resources that pass the up-front check but are taken (here by another actor holding both CPUs): the pool's
    start is bounded by ACTOR_START_TIMEOUT_S instead of waiting forever."""
    import time

    from ssdd_runtime.integrations import ray as sray

    @ray.remote(num_cpus=2)
    class Hog:
        def ping(self):
            return 1

    hog = Hog.remote()
    ray.get(hog.ping.remote())
    monkeypatch.setattr(sray, "ACTOR_START_TIMEOUT_S", 5)
    t0 = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match="Timed out while starting actors"):
            tokenize(make_images(tmp_path / "imgs", n=1), tmp_path / "lat", ckpt)
    finally:
        ray.kill(hog)
    assert time.monotonic() - t0 < 90 and not list((tmp_path / "lat").glob("shard-*"))
