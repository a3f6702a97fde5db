"""SSDDVAE inside real diffusers code: DiTPipeline end to end, the img2img encode path (VaeImageProcessor +
retrieve_latents), model CPU offload hooks, save_pretrained/from_pretrained of the VAE and of the pipeline,
torch.compile(fullgraph=True). Tiny random DiT, SSDD-S f8c4 with the deterministic test weights, CPU; 64x64
images for the DiT pipeline (8x8 latents), 32x32 elsewhere."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers not installed (pip install 'ssdd-runtime[test]')")

from ssdd_runtime.integrations.diffusers import _has_tiled_decode  # noqa: E402
from ssdd_runtime.sampler import randn  # noqa: E402

SCALING = 0.7  # not 1.0, so a pipeline that forgot to unscale would fail
NOISE_SEED = 3


@pytest.fixture(scope="module")
def model(s_model):  # conftest: SSDD-S f8c4 with the deterministic test weights (shared: never mutated here)
    return s_model


def make_vae(model, **kw):
    from ssdd_runtime.integrations.diffusers import SSDDVAE

    kw = {"scaling_factor": SCALING, "noise_seed": NOISE_SEED, **kw}
    return SSDDVAE.from_model(copy.deepcopy(model), **kw)


def tiny_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                               num_layers=2, sample_size=8, patch_size=2, norm_num_groups=32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # DiT zero-initialises its adaLN/output layers: randomise so every layer matters
        for p in tr.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return tr.eval()


def dit_pipeline(vae):
    from diffusers import DDIMScheduler, DiTPipeline

    pipe = DiTPipeline(transformer=tiny_dit(), vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def spy_final_latents(pipe) -> list[torch.Tensor]:
    """Record every scheduler output: the last one is the pipeline's final latents (before VAE scaling)."""
    seen, step = [], pipe.scheduler.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        seen.append(out.prev_sample.clone())
        return out

    pipe.scheduler.step = recording_step
    return seen


def seeded_noise(n: int, size: int) -> torch.Tensor:
    return randn((1, 3, size, size), generator=torch.Generator().manual_seed(NOISE_SEED)).expand(n, -1, -1, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dit_pipeline_images_are_our_decode_of_its_latents(model, dtype):
    vae = make_vae(model)
    pipe = dit_pipeline(vae).to(dtype)
    assert vae.dtype == dtype and vae.ssdd.dtype == dtype and pipe.transformer.dtype == dtype
    seen = spy_final_latents(pipe)
    # bf16 convolutions are slow on CPUs without bf16 instructions: one image in bf16, two in fp32
    labels = [3, 7] if dtype == torch.float32 else [3]
    n = len(labels)

    def run(seed):
        return pipe(class_labels=labels, guidance_scale=4.0, num_inference_steps=2, output_type="pt",
                    generator=torch.Generator().manual_seed(seed)).images

    images = run(0)
    assert images.shape == (n, 3, 64, 64) and images.dtype == dtype
    assert float(images.min()) >= 0 and float(images.max()) <= 1

    # What diffusers does after the loop: drop the CFG half, latents / scaling_factor, decode, x/2 + 0.5, clamp.
    latents = seen[-1].chunk(2)[0]
    assert latents.shape == (n, 4, 8, 8) and latents.dtype == dtype
    ours = vae.ssdd.decode(1 / SCALING * latents, noise=seeded_noise(n, 64), steps=1)  # core API, fp32 out
    expected = (ours.to(dtype) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    assert float(expected.float().std()) > 0.05  # a real image, not a constant

    if dtype == torch.bfloat16:  # bf16 weights decode close to the fp32 model on the same latents
        ref = model.decode(1 / SCALING * latents.float(), noise=seeded_noise(n, 64), steps=1)
        err = float(((ref / 2 + 0.5).clamp(0, 1) - images.float()).abs().mean())
        assert err < 0.03, err
        return  # the repeatability checks below are dtype-independent: run in fp32 only

    # generator makes runs repeatable (here through the default PIL output, whatever the global RNG); another
    # seed changes the latents and so the images
    torch.manual_seed(123)
    pils = pipe(class_labels=[3, 7], guidance_scale=4.0, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0)).images
    assert [p.size for p in pils] == [(64, 64)] * 2
    np.testing.assert_array_equal(np.stack([np.asarray(p) for p in pils]),
                                  (images.float().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
    assert not torch.equal(run(1), images)


def test_config_contract():
    from ssdd_runtime.integrations.diffusers import SSDDVAE

    with torch.device("meta"):
        f8, f16 = SSDDVAE(encoder="f8c4", decoder="S"), SSDDVAE(encoder="f16c4", decoder="S")
    for vae, stride in ((f8, 8), (f16, 16)):
        c = vae.config
        assert 2 ** (len(c.block_out_channels) - 1) == stride  # how pipelines compute vae_scale_factor
        assert c.latent_channels == 4 and c.force_upcast is False
        assert (c.scaling_factor, c.shift_factor, c.decode_steps, c.noise_seed) == (1.0, 0.0, 1, 0)
    with pytest.raises(ValueError, match="block_out_channels"):
        SSDDVAE(encoder="f8c4", block_out_channels=(128, 256))
    with pytest.raises(ValueError, match="force_upcast"):
        SSDDVAE(force_upcast=True)
    with pytest.raises(TypeError, match="ssdd_runtime.SSDD"):
        SSDDVAE.from_model(torch.nn.Linear(2, 2))


def test_img2img_encode_path(model):
    """The encode half of an img2img pipeline: VaeImageProcessor.preprocess -> vae.encode -> retrieve_latents
    (diffusers' own helper) -> * scaling_factor; then decode back through the pipeline's vae."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.ltx.pipeline_ltx_latent_upsample import retrieve_latents
    from PIL import Image

    pipe = dit_pipeline(make_vae(model))
    vae = pipe.vae
    proc = VaeImageProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))
    rng = np.random.default_rng(0)
    pils = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    x = proc.preprocess(pils)  # (2, 3, 32, 32) in [-1, 1]
    assert x.shape == (2, 3, 32, 32)

    out = vae.encode(x)
    direct = vae.ssdd.encode(x)  # our own encode, same module
    torch.testing.assert_close(retrieve_latents(out, sample_mode="argmax"), direct.mode(), rtol=0, atol=0)
    s1 = retrieve_latents(out, generator=torch.Generator().manual_seed(1))
    s1b = retrieve_latents(vae.encode(x), generator=torch.Generator().manual_seed(1))
    eps = torch.randn(direct.mean.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(s1, direct.mean + direct.std * eps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s1b, s1, rtol=0, atol=0)
    assert (vae.encode(x, return_dict=False)[0].mean == direct.mean).all()

    init_latents = vae.config.scaling_factor * direct.mode()  # what img2img feeds the denoiser
    z_in = init_latents / vae.config.scaling_factor  # ... and what it hands back to the vae after denoising
    img = vae.decode(z_in).sample
    torch.testing.assert_close(img, vae.ssdd.decode(z_in, noise=seeded_noise(2, 32)), rtol=0, atol=0)
    # AutoencoderKL.forward semantics: encode, mode, decode (z_in is the mode up to rounding of * / SCALING)
    torch.testing.assert_close(vae(x).sample, img, rtol=1e-4, atol=1e-4)
    assert proc.postprocess(img, output_type="pt").shape == (2, 3, 32, 32)

    # bf16 vae: distribution in bf16, close to fp32
    vae16 = make_vae(model).to(torch.bfloat16)
    mode16 = vae16.encode(x.to(torch.bfloat16)).latent_dist.mode()
    assert mode16.dtype == torch.bfloat16
    rel = float((mode16.float() - direct.mode()).norm() / direct.mode().norm())
    assert rel < 0.05, rel


def test_generator_and_slicing_semantics(model):
    vae = make_vae(model)
    z = model.encode(torch.rand(2, 3, 32, 32) * 2 - 1).mode()
    full = vae.decode(z).sample
    # default noise is the same for every image, so decoding is batch-independent: image 1 alone decodes the same
    torch.testing.assert_close(vae.decode(z[1:2]).sample, full[1:2], rtol=1e-5, atol=1e-5)
    # a generator: the whole batch's noise is drawn first, so slicing does not change the result
    gen_full = vae.decode(z, generator=torch.Generator().manual_seed(9)).sample
    expected = vae.ssdd.decode(z, noise=randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(9)))
    torch.testing.assert_close(gen_full, expected, rtol=0, atol=0)
    assert not torch.allclose(gen_full, full)
    vae.enable_slicing()
    gen_sliced = vae.decode(z, generator=torch.Generator().manual_seed(9)).sample
    vae.disable_slicing()
    torch.testing.assert_close(gen_sliced, gen_full, rtol=1e-5, atol=1e-5)
    # a list of generators: one per image, as pipelines pass them
    lst = vae.decode(z, generator=[torch.Generator().manual_seed(s) for s in (4, 6)]).sample
    torch.testing.assert_close(lst[1:2], vae.decode(z[1:2], generator=[torch.Generator().manual_seed(6)]).sample,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one torch.Generator per image"):
        vae.decode(z, generator=[torch.Generator()])
    # steps are configurable per call and change the result
    two = vae.decode(z[:1], steps=2).sample
    torch.testing.assert_close(two, vae.ssdd.decode(z[:1], steps=2, noise=seeded_noise(1, 32)), rtol=0, atol=0)
    assert not torch.allclose(two, full[:1])
    # without SSDD.decode(tile=) tiling is refused with the reason, not silently ignored
    if not _has_tiled_decode():
        with pytest.raises(NotImplementedError, match=r"SSDD.decode\(tile=\)"):
            vae.enable_tiling()
    vae.disable_tiling()
    # noise_seed=None: the global RNG, like the official code
    glob = make_vae(model, noise_seed=None)
    torch.manual_seed(0)
    a = glob.decode(z[:1]).sample
    torch.manual_seed(0)
    torch.testing.assert_close(glob.decode(z[:1]).sample, a, rtol=0, atol=0)
    assert not torch.allclose(glob.decode(z[:1]).sample, a)


def test_import_does_not_import_diffusers():
    # ssdd_runtime.integrations.diffusers imports diffusers at its top (SSDDVAE is a plain class); the package and
    # the other integrations do not, and the package reaches SSDDVAE only on attribute access
    code = ("import sys, ssdd_runtime, ssdd_runtime.integrations, ssdd_runtime.integrations.latent_stats, "
            "ssdd_runtime.integrations.ray; "
            "assert 'diffusers' not in sys.modules and 'ray' not in sys.modules, sorted(sys.modules); "
            "from ssdd_runtime.integrations import SSDDVAE; "
            "from ssdd_runtime.integrations.diffusers import SSDDVAE as direct; "
            "assert SSDDVAE is direct and SSDDVAE.__qualname__ == 'SSDDVAE' and 'diffusers' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def _dit_images(pipe, seed=0):
    return pipe(class_labels=[3, 7], guidance_scale=4.0, num_inference_steps=2, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images


def test_offload_hook_runs_before_encode_and_decode(model):
    """diffusers' apply_forward_hook: a module's accelerate `_hf_hook.pre_forward` runs before encode/decode. The
    hook here casts the VAE to fp32 (a move observable on a CPU-only machine), so the bf16 VAE computes in fp32."""
    pytest.importorskip("accelerate", reason="offload hooks need accelerate")
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class ToFloat32(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            ToFloat32.calls += 1
            module.to(torch.float32)
            return args, kwargs

    vae = make_vae(model).to(torch.bfloat16)
    add_hook_to_module(vae, ToFloat32())
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    dist = vae.encode(x).latent_dist
    assert ToFloat32.calls == 1 and vae.dtype == torch.float32 and dist.mean.dtype == torch.float32
    vae.to(torch.bfloat16)
    img = vae.decode(dist.mode()).sample
    assert ToFloat32.calls == 2 and img.dtype == torch.float32
    remove_hook_from_module(vae)


def test_pipeline_model_cpu_offload_hooks_the_vae(model):
    """pipe.enable_model_cpu_offload: the pipeline's real accelerate hooks (device='cpu' on a CPU-only machine:
    diffusers refuses to pick a device without an accelerator) fire once for the VAE's decode, and the images
    equal the pipeline's without offload."""
    pytest.importorskip("accelerate", reason="enable_model_cpu_offload needs accelerate")
    pipe = dit_pipeline(make_vae(model))
    plain = _dit_images(pipe)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.enable_model_cpu_offload(device=device)
    hook = pipe.vae._hf_hook
    seen = []
    pre_forward = hook.pre_forward

    def counting(module, *args, **kwargs):
        seen.append(next(module.parameters()).device.type)  # where the weights are before the hook moves them
        out = pre_forward(module, *args, **kwargs)
        seen.append(next(module.parameters()).device.type)  # ... and after
        return out

    hook.pre_forward = counting
    images = _dit_images(pipe)
    assert seen == ["cpu", device]  # one decode: the VAE was moved to the execution device for it
    assert next(pipe.vae.parameters()).device.type == "cpu"  # offloaded again after the call
    torch.testing.assert_close(images.cpu(), plain, rtol=0, atol=0 if device == "cpu" else 1e-3)


def test_save_pretrained_round_trip(model, tmp_path):
    vae = make_vae(model, decode_steps=2, latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.0, 2.0, 0.5, 1.5])
    vae.save_pretrained(tmp_path / "vae")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == ["config.json",
                                                                    "diffusion_pytorch_model.safetensors"]
    back = type(vae).from_pretrained(tmp_path / "vae")
    assert type(back) is type(vae)
    mine = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == mine
    assert back.config.latents_std == [1.0, 2.0, 0.5, 1.5] and back.config.decode_steps == 2
    sd, sd_back = vae.state_dict(), back.state_dict()
    assert list(sd_back) == list(sd) and all(k.startswith("ssdd.") for k in sd)
    assert all(torch.equal(sd[k], sd_back[k]) for k in sd)
    z = model.encode(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1).mode()
    torch.testing.assert_close(back.decode(z).sample, vae.decode(z).sample, rtol=0, atol=1e-5)  # BLAS rounding

    # diffusers' own loading options: subfolder= and torch_dtype= (dtype= is the same), config overrides
    low = type(vae).from_pretrained(tmp_path, subfolder="vae", torch_dtype=torch.bfloat16, scaling_factor=0.5)
    assert low.dtype == low.ssdd.dtype == torch.bfloat16 and low.config.scaling_factor == 0.5
    assert torch.equal(low.state_dict()["ssdd.decoder.conv_in.weight"],
                       sd["ssdd.decoder.conv_in.weight"].bfloat16())
    with pytest.raises(FileNotFoundError, match="no config.json"):
        type(vae).from_pretrained(tmp_path)


def test_ssdd_checkpoint_sources(make_checkpoint):
    from ssdd_runtime.integrations.diffusers import SSDDVAE

    path = make_checkpoint("f8c4", "S", 0)
    vae = SSDDVAE.from_pretrained(path.parent.parent, path.name, subfolder=path.parent.name,
                                  torch_dtype=torch.bfloat16)
    assert vae.ssdd.dtype == torch.bfloat16 and vae.config.checkpoint == path.name
    assert vae.config.decode_steps == 1 and vae.config.scaling_factor == 1.0  # not a KNOWN_FILES name
    with pytest.raises(ValueError, match="disagree"):
        SSDDVAE.from_pretrained(path, dtype=torch.float16, torch_dtype=torch.bfloat16)


def test_latents_mean_std_from_stats(model, tmp_path):
    stats = {"scaling_factor": 2.0, "shift_factor": 0.25, "channel_mean": [0.0, 0.1, 0.2, 0.3],
             "channel_std": [1.0, 1.1, 1.2, 1.3]}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    vae = make_vae(model, scaling_factor=None, latent_stats=tmp_path / "stats.json")
    c = vae.config
    assert (c.scaling_factor, c.shift_factor) == (2.0, 0.25)
    assert c.latents_mean == stats["channel_mean"] and c.latents_std == stats["channel_std"]
    with pytest.raises(ValueError, match="one value per latent channel"):
        make_vae(model, latents_mean=[0.0] * 3, latents_std=[1.0] * 3)
    with pytest.raises(ValueError, match="go together"):
        make_vae(model, latents_mean=[0.0] * 4)


def test_pipeline_save_and_reload(model, tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    from ssdd_runtime.integrations.diffusers import SSDDVAE

    pipe = dit_pipeline(make_vae(model))
    images = _dit_images(pipe)
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["vae"] == ["ssdd_runtime.integrations.diffusers", "SSDDVAE"]
    back = DiTPipeline.from_pretrained(tmp_path / "pipe")
    back.set_progress_bar_config(disable=True)
    assert type(back.vae) is SSDDVAE
    # bit-exact weights; images to float rounding (CPU BLAS rounding depends on the weights' memory alignment,
    # see test_dit_sdvae.py)
    sd, sd_back = pipe.vae.state_dict(), back.vae.state_dict()
    assert list(sd_back) == list(sd) and all(torch.equal(sd[k], sd_back[k]) for k in sd)
    torch.testing.assert_close(_dit_images(back), images, rtol=0, atol=1e-4)

    # vae= override: into our own saved pipeline, and into a pipeline saved with an AutoencoderKL
    other = make_vae(model, noise_seed=NOISE_SEED + 1)
    swapped = DiTPipeline.from_pretrained(tmp_path / "pipe", vae=other)
    swapped.set_progress_bar_config(disable=True)
    assert swapped.vae is other and not torch.equal(_dit_images(swapped), images)
    kl = DiTPipeline(transformer=pipe.transformer, scheduler=DDIMScheduler(),
                     vae=AutoencoderKL(block_out_channels=(32, 32, 32, 32), latent_channels=4,
                                       down_block_types=("DownEncoderBlock2D",) * 4,
                                       up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32))
    kl.save_pretrained(tmp_path / "kl")
    ours = DiTPipeline.from_pretrained(tmp_path / "kl", vae=make_vae(model))
    ours.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_dit_images(ours), images, rtol=0, atol=1e-4)


def test_decode_compiles_fullgraph(model):
    """No torch.Generator is created and no tensor value is branched on while tracing decode (the backend is
    'eager': this checks the graph capture; inductor code generation is the GPU check's)."""
    import torch._dynamo

    vae = make_vae(model)  # sample_size 256: that noise is drawn at construction
    z = model.encode(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1).mode()
    eager = vae.decode(z).sample  # draws (and keeps) the 32x32 noise
    torch._dynamo.reset()
    compiled = torch.compile(vae.decode, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(z).sample, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled(z, noise=vae.decode_noise(z)).sample, eager, rtol=1e-5, atol=1e-5)
    fresh = make_vae(model, sample_size=32)  # the construction-time noise alone: no eager decode first
    torch.testing.assert_close(torch.compile(fresh.decode, fullgraph=True, backend="eager")(z).sample, eager,
                               rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_layerwise_casting_is_refused(model):
    with pytest.raises(NotImplementedError, match="layerwise casting.*torch_dtype"):
        make_vae(model).enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)


@pytest.mark.skipif(not _has_tiled_decode(), reason="needs SSDD.decode(tile=) from the tiled-decode branch")
def test_enable_tiling_decodes_through_ssdd_tiles(model):
    vae = make_vae(model, sample_size=32)  # default tile: sample_size // stride = 4 latents
    z = model.encode(torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1).mode()
    full = vae.decode(z).sample
    vae.enable_tiling()
    assert vae.use_tiling and vae.tile_latent_size == 4
    tiled = vae.decode(z).sample
    torch.testing.assert_close(tiled, vae.ssdd.decode(z, noise=vae.decode_noise(z), tile=4),
                               rtol=0, atol=0)
    vae.disable_tiling()
    torch.testing.assert_close(vae.decode(z).sample, full, rtol=0, atol=0)
    with pytest.raises(ValueError, match="tile_latent_size"):
        vae.enable_tiling(0)
