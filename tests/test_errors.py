"""Every bad input gets a specific ValueError/TypeError/FileNotFoundError naming what was expected and what came."""
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ssdd_runtime import SSDD


@pytest.mark.parametrize("z,match", [
    (torch.zeros(4, 4, 4), "4-D tensor"),
    (torch.zeros(1, 8, 4, 4), "must have 4 channels .* got shape \\(1, 8, 4, 4\\)"),
    (torch.full((1, 4, 4, 4), float("nan")), "non-finite"),
    (torch.zeros(1, 4, 4, 4, dtype=torch.int64), "floating-point"),
])
def test_bad_latents(s_model, z, match):
    with pytest.raises((ValueError, TypeError), match=match):
        s_model.decode(z)


def test_latents_of_wrong_type(s_model):
    with pytest.raises(TypeError, match="latent must be a torch.Tensor, got ndarray"):
        s_model.decode(torch.zeros(1, 4, 4, 4).numpy())


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps must be an integer in 1..10000, got 0"),
    (dict(steps=1.5), "steps must be an integer"),
    (dict(steps=True), "steps must be an integer"),
    (dict(steps=2 ** 62), "steps must be an integer in 1..10000, got 4611686018427387904"),
    (dict(t_pow_shift=True), "t_pow_shift must be a positive finite number, got True"),
    (dict(t_pow_shift=float("nan")), "t_pow_shift must be a positive"),
    (dict(noise=torch.zeros(1, 3, 16, 16)), r"noise must have shape \(1, 3, 32, 32\) .* got \(1, 3, 16, 16\)"),
    (dict(noise=torch.full((1, 3, 32, 32), float("inf"))), "noise contains 3072 non-finite"),
    (dict(t_pow_shift=-1.0), "t_pow_shift must be a positive"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
])
def test_bad_decode_arguments(s_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        s_model.decode(torch.zeros(1, 4, 4, 4), **kwargs)


def test_numpy_numbers_are_accepted(s_model):
    import numpy as np

    gen = torch.Generator().manual_seed(0)
    out = s_model.decode(torch.zeros(1, 4, 4, 4), steps=np.int64(2), t_pow_shift=np.float32(1.5), generator=gen)
    ref = s_model.decode(torch.zeros(1, 4, 4, 4), steps=2, t_pow_shift=1.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, ref)


def test_meta_tensors_are_refused(s_model):
    with pytest.raises(ValueError, match="latent is a meta-device tensor"):
        s_model.decode(torch.zeros(1, 4, 4, 4, device="meta"))
    with pytest.raises(ValueError, match="image is a meta-device tensor"):
        s_model.encode(torch.zeros(1, 3, 32, 32, device="meta"))


def test_huge_finite_latents_say_the_result_overflows(s_model):
    with pytest.raises(FloatingPointError, match=r"decode overflows float32: the latents reach \|x\| = 3e\+38") as e:
        s_model.decode(torch.full((1, 4, 4, 4), 3e38), generator=torch.Generator().manual_seed(0))
    assert "weights" not in str(e.value)


@pytest.mark.parametrize("device,match", [
    ("bogus", "unknown device 'bogus'"),
    ("meta", "device 'meta' holds no data"),
    *([] if torch.cuda.is_available() else [("cuda", "device 'cuda' is not available here")]),
    (3, "device must be a string or torch.device"),
])
def test_bad_devices(make_checkpoint, device, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SSDD.from_pretrained(make_checkpoint("f8c4", "S", 0), device=device)
    with pytest.raises((ValueError, TypeError), match=match):
        SSDD.from_state_dict({}, device=device)  # the device is checked before the weights


def test_bad_generator(s_model):
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        s_model.decode(torch.zeros(1, 4, 4, 4), generator=0)


@pytest.mark.parametrize("x,match", [
    (torch.zeros(1, 1, 32, 32), "3 channels .* got shape \\(1, 1, 32, 32\\)"),
    (torch.zeros(1, 3, 30, 32), "multiples of the encoder stride 8, got 30x32"),
    (torch.zeros(3, 32, 32), "4-D tensor"),
    (torch.full((1, 3, 32, 32), float("nan")), "image contains 3072 non-finite"),
])
def test_bad_images(s_model, x, match):
    with pytest.raises(ValueError, match=match):
        s_model.encode(x)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        SSDD.from_pretrained(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        SSDD.from_pretrained(tmp_path, "nope.safetensors")


def test_folder_and_unreadable_checkpoint(tmp_path, make_checkpoint, monkeypatch):
    from ssdd_runtime import weights

    with pytest.raises(ValueError, match="is a folder, expected a .safetensors checkpoint file"):
        weights.read_state_dict(tmp_path)
    path = make_checkpoint("f8c4", "S", 0)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == path else real(p, mode, **kw))
    with pytest.raises(PermissionError, match=f"cannot read checkpoint {path}: permission denied"):
        SSDD.from_pretrained(path)


def test_not_safetensors_and_truncated(tmp_path, make_checkpoint):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors is not a valid safetensors file"):
        SSDD.from_pretrained(junk)
    data = make_checkpoint("f8c4", "S", 0).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors is not a valid safetensors file"):
        SSDD.from_pretrained(cut)
    pickle = tmp_path / "model.pt"
    pickle.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        SSDD.from_pretrained(pickle)


def _edited(tmp_path, make_checkpoint, edit):
    sd = load_file(make_checkpoint("f8c4", "S", 0))
    edit(sd)
    path = tmp_path / "edited.safetensors"
    save_file(sd, path)
    return path


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, make_checkpoint):
    key = "decoder.up_blocks.1.resnets.2.conv2.weight"
    path = _edited(tmp_path, make_checkpoint, lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match=f"1 missing keys: {key}"):
        SSDD.from_pretrained(path)
    path = _edited(tmp_path, make_checkpoint, lambda sd: sd.update({"decoder.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="1 unexpected keys: decoder.extra.weight"):
        SSDD.from_pretrained(path)
    path = _edited(tmp_path, make_checkpoint, lambda sd: sd.update({"decoder.conv_out.bias": torch.zeros(4)}))
    with pytest.raises(ValueError, match=r"wrong shapes: decoder.conv_out.bias: expected \(3,\), found \(4,\)"):
        SSDD.from_pretrained(path)
    prefixed = lambda sd: [sd.__setitem__("module." + k, sd.pop(k)) for k in list(sd)]  # noqa: E731
    with pytest.raises(ValueError, match="not an SSDD checkpoint"):
        SSDD.from_pretrained(_edited(tmp_path, make_checkpoint, prefixed))
    no_decoder = lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("decoder.")]  # noqa: E731
    with pytest.raises(ValueError, match="missing \\['decoder.conv_in.weight'"):
        SSDD.from_pretrained(_edited(tmp_path, make_checkpoint, no_decoder))
    no_encoder = lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("encoder.")]  # noqa: E731
    assert SSDD.from_pretrained(_edited(tmp_path, make_checkpoint, no_encoder)).encoder is None  # decode-only


def test_explicit_architecture_is_checked_against_the_file(make_checkpoint):
    path = make_checkpoint("f8c4", "S", 0)
    assert SSDD.from_pretrained(path, encoder="f8c4", decoder="S").decoder_config.size == "S"
    with pytest.raises(ValueError, match="decoder='M' was asked for but .* holds decoder size 'S'"):
        SSDD.from_pretrained(path, decoder="M")
    with pytest.raises(ValueError, match="encoder='f16c4' was asked for but .* holds an f8c4 encoder"):
        SSDD.from_pretrained(path, encoder="f16c4")
    with pytest.raises(ValueError, match="unknown decoder size 'Q'"):
        SSDD.from_pretrained(path, decoder="Q")
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        SSDD.from_pretrained(path, dtype="int8")


def test_architecture_is_inferred_from_the_file(make_checkpoint):
    model = SSDD.from_pretrained(make_checkpoint("f16c4", "S", 2))
    assert (model.encoder_config.name, model.decoder_config.size, model.stride) == ("f16c4", "S", 16)
    z = model.encode(torch.zeros(1, 3, 32, 32)).mode()
    assert z.shape == (1, 4, 2, 2)
    assert model.decode(z, generator=torch.Generator().manual_seed(0)).shape == (1, 3, 32, 32)


def test_f32c4_encoder_round_trip(make_checkpoint):
    """f32c4: latent 1/32 of the image, so the decoder's AdaLN repeats the context 4x on the 1/8 token grid."""
    model = SSDD.from_pretrained(make_checkpoint("f32c4", "XS", 3))
    assert (model.encoder_config.name, model.stride) == ("f32c4", 32)
    z = model.encode(torch.zeros(1, 3, 64, 96)).mode()
    assert z.shape == (1, 4, 2, 3)
    out = model.decode(z, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 64, 96) and torch.isfinite(out).all()
