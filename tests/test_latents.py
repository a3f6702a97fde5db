"""Latent metadata through the CLI: `ssdd encode` records encoder and checkpoint, `ssdd decode` refuses latents
of another encoder (f8 latents through an f16 checkpoint used to decode at the wrong size) unless --force."""
import numpy as np
import pytest
from PIL import Image

from ssdd_runtime import io
from ssdd_runtime.cli import main


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_encode_records_and_decode_checks(image, make_checkpoint, tmp_path, capsys):
    f8, f16 = str(make_checkpoint("f8c4", "S", 0)), str(make_checkpoint("f16c4", "S", 0))
    lat = tmp_path / "z.safetensors"
    assert main(["encode", image, "-o", str(lat), "--checkpoint", f8, "--device", "cpu"]) == 0
    _, meta = io.load_latents(lat)
    assert {k: meta[k] for k in ("ssdd.encoder", "ssdd.z_dim", "ssdd.stride", "ssdd.checkpoint")} == \
        {"ssdd.encoder": "f8c4", "ssdd.z_dim": "4", "ssdd.stride": "8", "ssdd.checkpoint": "f8c4_S_0.safetensors"}
    capsys.readouterr()

    out = tmp_path / "out"
    assert main(["decode", str(lat), "-o", str(out), "--checkpoint", f16, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ssdd decode: error: latents were encoded with encoder 'f8c4'") and "force" in err
    assert not out.exists() or not any(out.iterdir())  # nothing written
    assert main(["decode", str(lat), "-o", str(out), "--checkpoint", f16, "--device", "cpu", "--force"]) == 0
    assert (out / "cat.png").is_file()
    assert main(["decode", str(lat), "-o", str(tmp_path / "ok"), "--checkpoint", f8, "--device", "cpu"]) == 0
    assert Image.open(tmp_path / "ok" / "cat.png").size == (32, 32)
