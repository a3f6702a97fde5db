"""Latent normalisation: the running statistics, the per-checkpoint lookup, and `ssdd stats` end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ssdd_runtime.integrations import latent_stats as ls
from ssdd_runtime.io import load_image


def test_running_stats_match_float64_reference():
    g = torch.Generator().manual_seed(0)
    chunks = [3.0 + 0.01 * torch.randn(b, 4, h, w, generator=g) for b, h, w in ((1, 4, 4), (3, 5, 7), (2, 8, 8))]
    chunks[1][:, 2] += 5.0  # channels with different means
    acc = ls.LatentStats(4)
    for c in chunks:
        acc.update(c)
    s = acc.summary()
    flat = torch.cat([c.double().transpose(0, 1).reshape(4, -1) for c in chunks], dim=1)  # (C, N)
    assert s["values_per_channel"] == flat.shape[1]
    assert s["mean"] == pytest.approx(float(flat.mean()), rel=1e-12)
    assert s["std"] == pytest.approx(float(flat.std()), rel=1e-10)
    np.testing.assert_allclose(s["channel_mean"], flat.mean(1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(s["channel_std"], flat.std(1).numpy(), rtol=1e-10)
    assert (s["scaling_factor"], s["shift_factor"]) == (1 / s["std"], s["mean"])


def test_normalization_priorities(tmp_path):
    ckpt = "/cache/models--facebook--SSDD/snapshots/abc/F8C4/F8C4_M_256.safetensors"
    assert ls.known_file(ckpt) == "F8C4/F8C4_M_256.safetensors" and ls.known_file("/x/other.safetensors") is None
    assert ls.latent_normalization() == (1.0, 0.0)  # nothing published: no normalisation by default
    stats = tmp_path / "s.json"
    stats.write_text(json.dumps({"scaling_factor": 2.0, "shift_factor": -1.0}))
    assert ls.latent_normalization(stats=stats) == (2.0, -1.0)
    assert ls.latent_normalization(stats=stats, scaling_factor=3.0) == (3.0, -1.0)
    with pytest.raises(ValueError, match="scaling_factor"):
        ls.latent_normalization(scaling_factor=0.0)
    with pytest.raises(ValueError, match="ssdd stats"):
        ls.latent_normalization(stats={"mean": 1.0})


def test_stats_cli(tmp_path, make_checkpoint, s_model):
    from ssdd_runtime.cli import main

    ckpt = make_checkpoint("f8c4", "S", 0)
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (w, h) in enumerate([(32, 32), (32, 32), (40, 24)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "stats.json"
    assert main(["stats", str(folder), "-o", str(out), "--checkpoint", str(ckpt), "--batch-size", "2"]) == 0
    s = json.loads(out.read_text())
    assert (s["num_images"], s["num_errors"]) == (3, 1) and list(s["errors"]) == [str(folder / "broken.png")]
    assert s["checkpoint"].startswith("f8c4_S_0.safetensors@sha256:") and s["encoder"] == "f8c4"
    assert s["latents_mean"] == s["channel_mean"] and s["latents_std"] == s["channel_std"]
    assert len(s["latents_std"]) == 4

    model = s_model
    z = torch.cat([model.encode(load_image(folder / f"{i}.png", multiple_of=8)).mode().double()
                   .transpose(0, 1).reshape(4, -1) for i in range(3)], dim=1)
    assert s["mean"] == pytest.approx(float(z.mean()), rel=1e-5, abs=1e-6)
    assert s["std"] == pytest.approx(float(z.std()), rel=1e-5)
    assert s["scaling_factor"] == pytest.approx(1 / float(z.std()), rel=1e-5)

    pytest.importorskip("diffusers", reason="diffusers not installed: SSDDVAE part skipped")
    from ssdd_runtime.integrations.diffusers import SSDDVAE

    vae = SSDDVAE.from_model(model, latent_stats=out)
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (s["scaling_factor"], s["shift_factor"])


def test_stats_cli_reads_tokenize_shards_without_a_checkpoint(tmp_path, capsys):
    pytest.importorskip("pyarrow", reason="pyarrow not installed (pip install 'ssdd-runtime[ray]')")
    from ssdd_runtime import data as sdata
    from ssdd_runtime.cli import main

    z = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0)).numpy()
    sdata.write_shard(tmp_path / "shard-00000.parquet", ["a", "b", "c"], [0, 1, 0], {"latent": z},
                      {"shape": [4, 2, 2], "errors": {}})
    assert main(["stats", str(tmp_path)]) == 0  # no --checkpoint, no re-encoding
    s = json.loads((tmp_path / ".ssdd" / "latent_stats.json").read_text())
    flat = z.transpose(1, 0, 2, 3).reshape(4, -1)
    np.testing.assert_allclose(s["latents_mean"], flat.mean(1), rtol=1e-6)
    np.testing.assert_allclose(s["latents_std"], flat.std(1, ddof=1), rtol=1e-6)
    assert ls.latent_normalization(stats=s) == (s["scaling_factor"], s["shift_factor"])  # SSDDVAE's reader
    # images need a checkpoint: a one-line usage error, not a traceback
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "x.png")
    assert main(["stats", str(tmp_path / "x.png"), "-o", str(tmp_path / "s.json")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
