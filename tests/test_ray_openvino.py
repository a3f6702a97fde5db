"""`ssdd tokenize` / `ssdd detokenize` with `--backend openvino`: the Ray actors encode and decode on OpenVINO
(fp32) and match the PyTorch model; the checks that refuse a bad backend run before Ray starts.

The driver (this process) never imports OpenVINO for a Ray job; only the actors do. The module is marked
`openvino` anyway (its OpenVINO IR cache and the actors' compile time belong with the other OpenVINO tests).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="ray not installed (pip install 'ssdd-runtime[ray]')")
pytest.importorskip("pyarrow", reason="pyarrow not installed (pip install 'ssdd-runtime[ray]')")
pytest.importorskip("openvino", reason="openvino not installed (pip install 'ssdd-runtime[openvino]')")
from PIL import Image  # noqa: E402

from ssdd_runtime import data as sdata  # noqa: E402
from ssdd_runtime.cli import main  # noqa: E402
from ssdd_runtime.integrations import ray as sray  # noqa: E402
from ssdd_runtime.io import load_image, tensor_to_uint8  # noqa: E402
from ssdd_runtime.sampler import randn  # noqa: E402

pytestmark = pytest.mark.openvino


@pytest.fixture(scope="module")
def ray_ov(tmp_path_factory):
    # the actors' OpenVINO IR/compiled-model cache goes to a temp folder, not ~/.cache (actors inherit this
    # environment from the Ray processes that ray.init starts)
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = old


def test_bad_backend_arguments_fail_before_ray_starts(make_checkpoint, tmp_path):
    ckpt = make_checkpoint("f8c4", "S", 0)
    (tmp_path / "a.png").write_bytes(b"")
    assert not ray.is_initialized()
    with pytest.raises(ValueError, match="unknown backend 'onnx'"):
        sray.tokenize(tmp_path, tmp_path / "o", checkpoint=ckpt, backend="onnx")
    with pytest.raises(ValueError, match="fp16 is not offered"):
        sray.tokenize(tmp_path, tmp_path / "o", checkpoint=ckpt, backend="openvino", dtype="fp16")
    with pytest.raises(ValueError, match="runs on the CPU"):
        sray.detokenize(tmp_path, tmp_path / "o", checkpoint=ckpt, backend="openvino", num_gpus_per_actor=1)
    with pytest.raises(ValueError, match="steps must be"):
        sray.detokenize(tmp_path, tmp_path / "o", checkpoint=ckpt, steps=0)
    assert not ray.is_initialized() and not (tmp_path / "o").exists()


def test_tokenize_and_detokenize_on_openvino_match_pytorch(ray_ov, make_checkpoint, s_model, tmp_path):
    ckpt = make_checkpoint("f8c4", "S", 0)
    rng = np.random.default_rng(3)
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    lat, png = tmp_path / "lat", tmp_path / "png"
    rc = main(["tokenize", str(tmp_path / "imgs"), "-o", str(lat), "--checkpoint", str(ckpt), "--backend",
               "openvino", "--batch-size", "2", "--concurrency", "1", "--flip"])
    assert rc == 0
    (shard,) = sdata.list_shards(lat)
    cols, _ = sdata.read_shard(shard)
    assert cols["key"] == ["0.png", "1.png", "2.png"]
    for i, key in enumerate(cols["key"]):
        x = load_image(tmp_path / "imgs" / key, multiple_of=s_model.stride)
        torch.testing.assert_close(cols["latent"][i], s_model.encode(x).mode()[0], rtol=0, atol=5e-4)
        torch.testing.assert_close(cols["latent_flip"][i], s_model.encode(x.flip(-1)).mode()[0], rtol=0, atol=5e-4)

    rc = main(["detokenize", str(lat), "-o", str(png), "--checkpoint", str(ckpt), "--backend", "openvino",
               "--seed", "2", "--steps", "2", "--batch-size", "2", "--concurrency", "1"])
    assert rc == 0
    noise = randn((1, 3, 32, 40), generator=torch.Generator().manual_seed(2))
    for i, key in enumerate(cols["key"]):
        got = np.asarray(Image.open(png / key)).astype(int)
        ref = tensor_to_uint8(s_model.decode(cols["latent"][i][None], noise=noise, steps=2))[0].astype(int)
        diff = np.abs(got - ref)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # fp32 OpenVINO vs PyTorch: 8-bit rounding flips
