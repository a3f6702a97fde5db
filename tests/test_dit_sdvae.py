"""A real client of the SDVAE path, offline: DiTPipeline with a tiny random DiT of the trained DiT-XL/2-256 shape
config (4 latent channels, 32x32 latents, patch 2, learned sigma, 1000 classes) and an SSDDVAE wrapping an
SDVAE-layout decoder-only test checkpoint paired with a tiny random AutoencoderKL encoder. The pipeline's images
must be our own decode of its final latents divided by the scaling factor (0.18215, from KNOWN_FILES), and a
saved and reloaded pipeline must generate the same images and still encode with the SD-VAE."""
import pytest
import torch
from safetensors.torch import save_file

from ssdd_runtime import SSDD, sdvae
from ssdd_runtime.sampler import seeded_noise
from ssdd_runtime.testing import test_state_dict

diffusers = pytest.importorskip("diffusers")

from test_sdvae import TINY_VAE  # noqa: E402

DIT_XL_2_256 = dict(in_channels=4, out_channels=8, sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
                    norm_type="ada_norm_zero", norm_num_groups=32)  # the trained model's shape fields
TINY_WIDTH = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2)  # DiT-XL/2: 16, 72, 28


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**TINY_VAE)
    path = tmp_path_factory.mktemp("sd-vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def decoder_file(tmp_path_factory):  # the Hub layout, so KNOWN_FILES recognises it (scaling factor 0.18215)
    path = tmp_path_factory.mktemp("hub") / "SDVAE" / "SDVAE_S_256.safetensors"
    path.parent.mkdir()
    save_file(test_state_dict("sdvae", "S", 0), str(path), metadata={"format": "pt"})
    return path


def tiny_dit():
    torch.manual_seed(0)
    tr = diffusers.DiTTransformer2DModel(**DIT_XL_2_256, **TINY_WIDTH)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # DiT zero-initialises its adaLN/output layers: randomise so every layer matters
        for p in tr.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return tr.eval()


def generate(pipe, seen=None):
    if seen is not None:  # record the scheduler outputs: the last one is the final latents
        step = pipe.scheduler.step

        def recording_step(*args, **kwargs):
            out = step(*args, **kwargs)
            seen.append(out.prev_sample.clone())
            return out

        pipe.scheduler.step = recording_step
    pipe.set_progress_bar_config(disable=True)
    return pipe(class_labels=[207], guidance_scale=4.0, num_inference_steps=2, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def test_dit_pipeline_on_the_sdvae_path(vae_dir, decoder_file, tmp_path):
    from diffusers import DDIMScheduler, DiTPipeline

    from ssdd_runtime.integrations.diffusers import SSDDVAE

    model = SSDD.from_pretrained(decoder_file, encoder=sdvae.load_encoder(vae_dir))
    vae = SSDDVAE.from_model(model)
    c = vae.config
    assert (c.encoder, c.scaling_factor, c.sample_size, c.checkpoint) == \
        ("sdvae", 0.18215, 256, "SDVAE/SDVAE_S_256.safetensors")
    pipe = DiTPipeline(transformer=tiny_dit(), vae=vae, scheduler=DDIMScheduler())
    seen = []
    images = generate(pipe, seen)
    assert images.shape == (1, 3, 256, 256)

    latents = seen[-1].chunk(2)[0]  # drop the classifier-free-guidance half, as the pipeline does
    ours = model.decode(1 / 0.18215 * latents, noise=seeded_noise((3, 256, 256), c.noise_seed, 1), steps=1)
    torch.testing.assert_close(images, (ours / 2 + 0.5).clamp(0, 1), rtol=0, atol=0)
    assert float(images.std()) > 0.05

    pipe.save_pretrained(tmp_path / "pipe")
    back = DiTPipeline.from_pretrained(tmp_path / "pipe")
    assert type(back.vae) is SSDDVAE and back.vae.ssdd.encoder_name == "sdvae"
    sd, sd_back = pipe.vae.state_dict(), back.vae.state_dict()
    assert list(sd_back) == list(sd) and all(torch.equal(sd[k], sd_back[k]) for k in sd)  # bit-exact weights
    again = generate(back)
    # Same weights, same noise; CPU BLAS (MKL without CNR) may round a Linear 1 ulp differently depending on
    # where the weights sit in memory (safetensors-mapped files land at unaligned addresses), so the images of
    # another copy agree to float rounding; two loads of the same folder agree bit for bit.
    torch.testing.assert_close(again, images, rtol=0, atol=1e-4)
    twice = DiTPipeline.from_pretrained(tmp_path / "pipe")
    torch.testing.assert_close(generate(twice), again, rtol=0, atol=0)

    # the reloaded VAE carries the SD-VAE encoder (sdvae.*, no VAE decoder): raw moments as AutoencoderKL's
    keys = list(back.vae.state_dict())
    assert any(k.startswith("sdvae.encoder.") for k in keys) and not any(k.startswith("sdvae.decoder.") for k in keys)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = diffusers.AutoencoderKL.from_pretrained(vae_dir).encode(x).latent_dist
    torch.testing.assert_close(back.vae.encode(x).latent_dist.mean, ref.mean, rtol=0, atol=0)

    # bf16 SSDD weights, the SD-VAE kept fp32 (from_pretrained(torch_dtype=) and .to(dtype) alike)
    low = SSDDVAE.from_pretrained(tmp_path / "pipe", subfolder="vae", torch_dtype=torch.bfloat16)
    xb = x.bfloat16()
    ref_b = diffusers.AutoencoderKL.from_pretrained(vae_dir).encode(xb.float()).latent_dist.mean
    for v in (low, back.vae.to(torch.bfloat16)):
        assert v.ssdd.dtype == torch.bfloat16 and v.sdvae.dtype == torch.float32
        mean = v.encode(xb).latent_dist.mean
        assert mean.dtype == torch.bfloat16  # the fp32 moments, rounded once to the VAE's dtype
        torch.testing.assert_close(mean.float(), ref_b, rtol=2 ** -8, atol=1e-6)
