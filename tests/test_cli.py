"""The `ssdd` command line and the io helpers."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ssdd_runtime import io
from ssdd_runtime.cli import main


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name in ("cat", "dog"):
        p = tmp_path / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(p)  # cropped to 40x32
        paths.append(str(p))
    return paths


def test_encode_decode_reconstruct(images, tmp_path, make_checkpoint, s_model, capsys):
    ckpt = str(make_checkpoint("f8c4", "S", 0))
    lat = tmp_path / "lat.safetensors"
    assert main(["encode", *images, "-o", str(lat), "--checkpoint", ckpt, "--batch-size", "1"]) == 0
    z, meta = io.load_latents(lat)
    assert z.shape == (2, 4, 5, 4) and meta["names"] == ["cat", "dog"] and meta["decoder"] == "S"
    x = torch.cat([io.load_image(p, multiple_of=8) for p in images])
    torch.testing.assert_close(z, s_model.encode(x).mode(), atol=1e-5, rtol=0)

    out = tmp_path / "dec"
    assert main(["decode", str(lat), "-o", str(out), "--checkpoint", ckpt, "--steps", "2", "--seed", "5"]) == 0
    expected = s_model.decode(z, steps=2, generator=torch.Generator().manual_seed(5))
    for i, name in enumerate(["cat", "dog"]):
        png = np.asarray(Image.open(out / f"{name}.png"))
        assert np.array_equal(png, io.tensor_to_uint8(expected[i])[0])

    assert main(["reconstruct", *images, "-o", str(tmp_path / "rec"), "--checkpoint", ckpt]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if "PSNR" in l]
    assert len(lines) == 2 and all(" dB -> " in l for l in lines)
    assert (tmp_path / "rec" / "cat.png").exists() and (tmp_path / "rec" / "dog.png").exists()


def test_bad_input_gives_one_line_error_and_nonzero_exit(tmp_path, make_checkpoint, capsys):
    ckpt = str(make_checkpoint("f8c4", "S", 0))
    bad = tmp_path / "lat.npy"
    np.save(bad, np.zeros((1, 3, 4, 4), np.float32))
    assert main(["decode", str(bad), "-o", str(tmp_path / "o"), "--checkpoint", ckpt]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("ssdd decode: error: latent must have 4 channels")
    assert main(["encode", str(tmp_path / "missing.png"), "-o", str(tmp_path / "z.npy"), "--checkpoint", ckpt]) == 2
    assert "image not found" in capsys.readouterr().err
    assert main(["decode", str(bad), "-o", "o", "--repo", "facebook/SSDD"]) == 2
    assert "--repo needs --filename" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [[], ["encode"], ["decode"], ["reconstruct"], ["demo"]])
def test_help(cmd):
    res = subprocess.run([sys.executable, "-m", "ssdd_runtime", *cmd, "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "usage: ssdd" in res.stdout


COMMANDS = [["encode"], ["decode"], ["reconstruct"], ["demo"], ["export"], ["export", "onnx"],
            ["export", "tensorrt"], ["export", "trtexec-cmd"], ["export", "triton-repo"], ["bench"], ["stats"],
            ["tokenize"], ["detokenize"], ["eval"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: ssdd {' '.join(cmd)}")


def test_shared_flags_come_from_one_place():
    from ssdd_runtime.cli import build_parser

    parser = build_parser()
    source = ["--checkpoint", "c.safetensors"]
    for cmd, extra in ((["encode", "a.png"], ["--device", "cpu", "--dtype", "bf16", "--batch-size", "2"]),
                       (["decode", "z.npy"], ["--device", "cpu", "--dtype", "bf16", "--steps", "2", "--seed", "3",
                                              "--t-pow-shift", "1.5", "--batch-size", "2"]),
                       (["reconstruct", "a.png"], ["--steps", "2", "--seed", "3", "--t-pow-shift", "1.5"]),
                       (["stats", "imgs"], ["--dtype", "bf16", "--batch-size", "2"]),
                       (["tokenize", "imgs"], ["--dtype", "bf16", "--batch-size", "2"]),
                       (["detokenize", "lat"], ["--dtype", "bf16", "--steps", "2", "--seed", "3", "--t-pow-shift",
                                                "1.5", "--batch-size", "2"]),
                       (["export", "onnx"], ["--steps", "2", "--t-pow-shift", "1.5"])):
        args = parser.parse_args([*cmd, "-o", "out", *source, *extra])
        assert args.checkpoint == "c.safetensors" and args.repo is None, cmd
        for flag, value in zip(extra[::2], extra[1::2]):
            assert str(getattr(args, flag[2:].replace("-", "_"))) == value, (cmd, flag)
    assert parser.parse_args(["decode", "z", "-o", "o", *source]).t_pow_shift == 2.0
    with pytest.raises(SystemExit):  # --checkpoint and --repo exclude each other
        parser.parse_args(["encode", "a.png", "-o", "z.npy", *source, "--repo", "facebook/SSDD"])


def test_list_flags_take_spaces_or_commas():
    from ssdd_runtime.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["bench", "--batch", "1,4", "16", "--res", "256,256x384", "--models", "ssdd-S",
                              "kl-vae", "--steps", "1,8"])
    assert args.batch == [1, 4, 16] and args.res == [(256, 256), (256, 384)] and args.steps == [1, 8]
    assert args.models == ["ssdd-S", "kl-vae"] and args.backends is None
    args = parser.parse_args(["export", "triton-repo", "--onnx", "m.onnx", "--repo", "r",
                              "--preferred-batch-sizes", "4,8"])
    assert args.preferred_batch_sizes == [4, 8]
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--batch", "1,x"])


def test_repo_needs_filename_everywhere(tmp_path, capsys):
    for cmd in (["encode", "a.png"], ["stats", str(tmp_path)], ["export", "onnx"]):
        assert main([*cmd, "-o", str(tmp_path / "o"), "--repo", "facebook/SSDD"]) == 2
        assert "--repo needs --filename" in capsys.readouterr().err, cmd


def test_demo_runs_offline(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "test* weights" in out and "PSNR" in out and (tmp_path / "sample.png").exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".npy", ".pt"])
def test_latent_files_round_trip(tmp_path, suffix):
    z = torch.randn(2, 4, 3, 5)
    io.save_latents(tmp_path / f"z{suffix}", z, {"names": ["a", "b"]})
    back, meta = io.load_latents(tmp_path / f"z{suffix}")
    assert torch.equal(back, z)
    assert meta == ({} if suffix == ".npy" else {"names": ["a", "b"]})


def test_latent_file_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown latent file type '.txt'"):
        io.save_latents(tmp_path / "z.txt", torch.zeros(1, 4, 2, 2))
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could not read latents from .*bad.npy"):
        io.load_latents(tmp_path / "bad.npy")
    torch.save({"latents": torch.zeros(1, 4, 2, 2), "evil": object()}, tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match="could not read latents"):  # weights_only=True refuses arbitrary objects
        io.load_latents(tmp_path / "pickle.pt")


def test_image_conversions_round_trip():
    a = np.random.default_rng(1).integers(0, 256, (2, 8, 6, 3), dtype=np.uint8)
    x = io.uint8_to_tensor(a)
    assert x.shape == (2, 3, 8, 6) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(io.tensor_to_uint8(x), a)
    assert torch.isinf(io.psnr(x, x)).logical_not().all() and (io.psnr(x, x) > 90).all()
    with pytest.raises(TypeError, match="uint8"):
        io.uint8_to_tensor(a.astype(np.float32))
