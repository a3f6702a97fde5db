"""Every released layout (KNOWN_FILES) loads by shape inference; decoder-only files load strictly."""
import pytest
import torch
from safetensors.torch import save_file

from ssdd_runtime import KNOWN_FILES, SSDD
from ssdd_runtime.model import SSDDModule
from ssdd_runtime.testing import test_state_dict
from ssdd_runtime.weights import check_state_dict, infer_config

SMALL = ("S",)  # sizes built as real files and decoded; the rest are checked on the meta device (no RAM)


def test_known_files_are_the_weights_commit():
    names = set(KNOWN_FILES)
    assert len(names) == 25 and "demo_f8c4_M_128.safetensors" in names
    assert not any("_H_" in n for n in names)  # no H decoder was released
    assert {n.split("/")[0] for n in names if "/" in n} == {"F8C4", "F16C4", "F16C16", "F32C64", "SDVAE"}
    assert sorted(n for n in names if n.startswith("SDVAE/")) == [f"SDVAE/SDVAE_{s}_256.safetensors"
                                                                   for s in ("B", "L", "M", "S")]


@pytest.mark.parametrize("name", list(KNOWN_FILES))
def test_known_file_layout_loads_by_shape_inference(name, tmp_path):
    entry = KNOWN_FILES[name]
    own_encoder = None if entry.decoder_only else entry.encoder
    if entry.decoder not in SMALL:  # meta tensors: shapes only
        sd = test_state_dict(entry.encoder, entry.decoder, meta=True)
        enc, dec = infer_config(sd)
        assert (enc.name if enc else None, dec.size, dec.z_dim) == (own_encoder, entry.decoder, entry.z_dim)
        with torch.device("meta"):
            model = SSDDModule(enc, dec)
        check_state_dict({k: v.shape for k, v in model.state_dict().items()}, sd, source=name)  # strict
        return

    path = tmp_path / name.replace("/", "_")
    save_file(test_state_dict(entry.encoder, entry.decoder, seed=3), str(path), metadata={"format": "pt"})
    model = SSDD.from_pretrained(path)
    assert (model.encoder_name, model.decoder_config.size, model.decoder_config.z_dim) == \
        (own_encoder, entry.decoder, entry.z_dim)
    F = model.stride
    assert F == (8 if entry.decoder_only else int(entry.encoder[1:].split("c")[0]))
    assert all(k.startswith("decoder.") for k in model.state_dict()) == entry.decoder_only
    z = torch.randn(1, entry.z_dim, 64 // F, 64 // F, generator=torch.Generator().manual_seed(0))
    img = model.decode(z, steps=1, generator=torch.Generator().manual_seed(1))
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()
    if not entry.decoder_only:
        post = model.encode(torch.zeros(1, 3, 64, 64))
        assert post.mean.shape == (1, entry.z_dim, 64 // F, 64 // F)


def test_decoder_only_file_is_strict(tmp_path):
    sd = test_state_dict(None, "S")
    sd["decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "extra.safetensors"
    save_file(sd, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="1 unexpected keys: decoder.extra.weight"):
        SSDD.from_pretrained(path)
    sd = test_state_dict(None, "S")
    del sd["decoder.conv_out.bias"]
    with pytest.raises(ValueError, match="1 missing keys: decoder.conv_out.bias"):
        SSDD.from_state_dict(sd, source="trimmed")


def test_decode_only_model_refuses_to_encode_and_wrong_encoder_names():
    sd = test_state_dict(None, "S")
    model = SSDD.from_state_dict(sd)
    assert model.encoder is None and model.encoder_name is None and model.stride == 8
    with pytest.raises(ValueError, match="decoder-only checkpoint.*encoder='sdvae'"):
        model.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="holds decoder weights only"):
        SSDD.from_state_dict(sd, encoder="f8c4")
    with pytest.raises(ValueError, match="holds its own f8c4 encoder"):
        SSDD.from_state_dict(test_state_dict("f8c4", "S"), encoder="sdvae")


def test_decode_only_fp32_fallback_copy():
    model = SSDD.from_state_dict(test_state_dict(None, "S"), dtype="bf16")
    twin = model._fp32_copy()
    assert twin.encoder is None and twin.stride == 8 and twin.dtype == torch.float32
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    rounded = {k: v.bfloat16().float() for k, v in test_state_dict(None, "S").items()}  # what the copy holds
    ref = SSDD.from_state_dict(rounded).decode(z, generator=torch.Generator().manual_seed(1))
    out = SSDDModule.sample(twin, z, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert (out - ref).abs().max() < 1e-4


def test_latent_metadata_round_trip_and_mismatch(make_checkpoint, caplog, tmp_path):
    from ssdd_runtime import check_latent_metadata, latent_metadata

    f8 = SSDD.from_pretrained(make_checkpoint("f8c4", "S", 0))
    f16 = SSDD.from_pretrained(make_checkpoint("f16c4", "S", 0))
    meta = latent_metadata(f8)
    assert meta == {"ssdd.encoder": "f8c4", "ssdd.z_dim": "4", "ssdd.stride": "8",
                    "ssdd.checkpoint": "f8c4_S_0.safetensors"}
    check_latent_metadata(meta, f8)  # same model: silent
    with pytest.raises(ValueError, match=r"encoder 'f8c4' \(this model: 'f16c4'\), stride '8' \(this model: '16'\)"):
        check_latent_metadata(meta, f16)
    check_latent_metadata(meta, f16, force=True)
    assert "forced" in caplog.text
    unknown = SSDD.from_state_dict(test_state_dict(None, "S"))  # decode-only, no file: shapes checked only
    check_latent_metadata(meta, unknown)
    with pytest.raises(ValueError, match="decode-only model encodes nothing"):
        latent_metadata(unknown)
    path = tmp_path / "SDVAE" / "SDVAE_S_256.safetensors"  # a known Hub name: its encoder is the SD-VAE
    path.parent.mkdir()
    save_file(test_state_dict(None, "S"), str(path), metadata={"format": "pt"})
    sdvae_s = SSDD.from_pretrained(path)
    with pytest.raises(ValueError, match="encoder 'f8c4' \\(this model: 'sdvae'\\)"):  # SSDD f8c4 latents
        check_latent_metadata(meta, sdvae_s)
    check_latent_metadata({**meta, "ssdd.encoder": "sdvae"}, sdvae_s)
