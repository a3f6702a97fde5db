"""SDVAE decoders paired with diffusers' AutoencoderKL encoder: a tiny random VAE saved to disk, no network."""
import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_close
from ssdd_runtime import SSDD, sdvae
from ssdd_runtime.testing import test_state_dict

diffusers = pytest.importorskip("diffusers")

TINY_VAE = dict(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                norm_num_groups=32)  # 4 levels: 3 downsamplings = stride 8, like sd-vae-ft-mse


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**TINY_VAE)
    with torch.no_grad():  # spread the moments so mean and logvar both carry signal
        vae.quant_conv.bias.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def decoder_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdvae") / "SDVAE_S_256.safetensors"
    save_file(test_state_dict("sdvae", "S", 0), str(path), metadata={"format": "pt"})
    return path


def test_encoder_returns_the_raw_latent_dist(vae_dir):
    enc = sdvae.load_encoder(vae_dir)
    assert (enc.config.stride, enc.config.z_dim, enc.config.name) == (8, 4, "sdvae")
    x = torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = diffusers.AutoencoderKL.from_pretrained(vae_dir).encode(x).latent_dist
    post = enc.encode(x)
    assert post.mean.dtype == torch.float32 and post.mean.shape == (2, 4, 6, 10)
    assert_close(post.mean, ref.mean, atol=1e-6, name="mean")  # no scaling factor
    assert_close(post.logvar, ref.logvar, atol=1e-6, name="logvar")


def test_sdvae_decoder_paired_with_the_encoder(vae_dir, decoder_file):
    model = SSDD.from_pretrained(decoder_file, encoder=sdvae.load_encoder(vae_dir))
    assert model.encoder_name == "sdvae" and model.stride == 8
    assert all(k.startswith("decoder.") for k in model.state_dict())  # the VAE is not a submodule
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    post = model.encode(x)
    ref = diffusers.AutoencoderKL.from_pretrained(vae_dir).encode(x).latent_dist.mean
    assert_close(post.mode(), ref, atol=1e-6, name="mode")
    img = model.decode(post.mode(), steps=1, generator=torch.Generator().manual_seed(1))
    assert img.shape == (1, 3, 64, 96) and torch.isfinite(img).all()

    low = SSDD.from_pretrained(decoder_file, encoder=sdvae.load_encoder(vae_dir), dtype="bf16")
    assert_close(low.encode(x).mean, post.mean, atol=1e-6, name="bf16 model, fp32 VAE")  # VAE stays fp32


def test_sdvae_name_uses_the_hub_cache_offline(decoder_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="stabilityai/sd-vae-ft-mse"):
        SSDD.from_pretrained(decoder_file, encoder="sdvae", cache_dir=tmp_path, local_files_only=True)
    with pytest.raises(ValueError, match="the SDVAE decoders read stride-8, 4-channel latents"):
        sdvae.SDVAEEncoder(diffusers.AutoencoderKL(**{**TINY_VAE, "latent_channels": 8}), "tiny")
