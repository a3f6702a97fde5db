"""Low-precision decoding against our own fp32 output, and the non-finite safety net."""
import pytest
import torch

from ssdd_runtime import SSDD
from ssdd_runtime.testing import test_state_dict


def psnr_nominal(out, ref):  # peak-to-peak 2: the nominal [-1, 1] image range
    return (10 * torch.log10(4 / ((out - ref) ** 2).mean())).item()


@pytest.fixture(scope="module")
def weights():
    return test_state_dict("f8c4", "S", 0)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_decode_psnr(weights, dtype):
    # Tiny case: this CPU has no fast bf16/fp16 convolutions.
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    ref = SSDD.from_state_dict(weights).decode(z, generator=torch.Generator().manual_seed(1))
    model = SSDD.from_state_dict(weights, dtype=dtype)
    assert model.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    out = model.decode(z, generator=torch.Generator().manual_seed(1))
    assert out.dtype == torch.float32  # the Euler state stays fp32
    db = psnr_nominal(out, ref)
    print(f"{dtype} vs fp32 decode PSNR: {db:.1f} dB")
    assert db >= 30
    x = torch.zeros(1, 3, 32, 32)
    post, post32 = model.encode(x), SSDD.from_state_dict(weights).encode(x)
    assert post.mean.dtype == torch.float32
    assert psnr_nominal(post.mean, post32.mean) >= 30


def test_fp16_overflow_is_retried_in_fp32_with_a_warning(weights):
    sd = dict(weights)
    sd["decoder.conv_out.weight"] = sd["decoder.conv_out.weight"] * 1e5  # outputs beyond fp16's 65504
    z = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    ref = SSDD.from_state_dict(sd).decode(z, generator=torch.Generator().manual_seed(1))
    assert ref.abs().max() > 7e4  # the fp32 result itself is finite but out of fp16 range
    model = SSDD.from_state_dict(sd, dtype="fp16")
    with pytest.warns(RuntimeWarning, match="retrying this batch in float32"):
        out = model.decode(z, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out).all()
    assert model.dtype == torch.float16  # restored after the retry
    assert ((out - ref).abs().max() / ref.abs().max()) < 1e-2


def test_non_finite_fp32_output_raises(weights):
    model = SSDD.from_state_dict({k: v.clone() for k, v in weights.items()})  # fp32 on CPU shares the tensors
    with torch.no_grad():
        model.decoder.conv_out.bias[0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        model.decode(torch.zeros(1, 4, 2, 2), generator=torch.Generator().manual_seed(0))


def test_batch_size_chunking_gives_the_same_result(s_model):
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    whole = s_model.decode(z, generator=torch.Generator().manual_seed(7))
    chunked = s_model.decode(z, generator=torch.Generator().manual_seed(7), batch_size=2)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.testing.assert_close(s_model.encode(x, batch_size=1).mean, s_model.encode(x).mean, atol=1e-5, rtol=0)


def test_generator_makes_decoding_reproducible(s_model):
    z = torch.randn(1, 4, 4, 4)
    a = s_model.decode(z, generator=torch.Generator().manual_seed(3))
    b = s_model.decode(z, generator=torch.Generator().manual_seed(3))
    c = s_model.decode(z, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    post = s_model.encode(torch.zeros(1, 3, 32, 32))
    assert torch.equal(post.sample(torch.Generator().manual_seed(0)), post.sample(torch.Generator().manual_seed(0)))
    eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(post.sample(torch.Generator().manual_seed(0)), post.mean + post.std * eps)


def test_channels_last_inputs(s_model):
    """Images read from HWC buffers arrive channels_last; results must not depend on the memory format."""
    x = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = s_model.encode(x.contiguous(memory_format=torch.channels_last)).mode()
    assert z.is_contiguous()
    torch.testing.assert_close(z, s_model.encode(x).mode(), atol=1e-5, rtol=0)
    z_cl = z.contiguous(memory_format=torch.channels_last)
    out = s_model.decode(z_cl, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, s_model.decode(z, generator=torch.Generator().manual_seed(1)), atol=1e-5, rtol=0)


def test_fp32_retry_gets_the_fp32_latents(weights):
    """Latents beyond fp16's 65504 are inf once cast: the fp16 run fails, and the fp32 retry must be fed the
    caller's fp32 latents (which the fp32 model decodes to finite images), not the fp16 casts."""
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 1e5
    model = SSDD.from_state_dict(weights, dtype="fp16")
    with pytest.warns(RuntimeWarning, match="retrying this batch in float32"):
        out = model.decode(z, generator=torch.Generator().manual_seed(1))
    fp16_weights_in_fp32 = SSDD.from_state_dict({k: v.half().float() for k, v in weights.items()})
    ref = fp16_weights_in_fp32.decode(z, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert model.dtype == torch.float16 and "_fp32_twin" not in dict(model.named_modules())


def test_shared_fp16_model_with_a_fallback_batch_matches_serial(weights):
    """Four threads share one fp16 model; one batch (latents beyond fp16 range) falls back to fp32. No thread
    may fail (the shared model is never cast in place) and every result equals the serial one."""
    import threading
    import warnings

    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(1, 4, 2, 2, generator=gen) for _ in range(4)]
    batches[2] = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 1e5  # finite in fp32

    def run(model, i):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return model.decode(batches[i], generator=torch.Generator().manual_seed(i))

    serial_model = SSDD.from_state_dict(weights, dtype="fp16")
    serial = [run(serial_model, i) for i in range(len(batches))]
    shared = SSDD.from_state_dict(weights, dtype="fp16")  # fresh: the fp32 copy is built inside a thread
    results, errors = {}, []
    start = threading.Barrier(4)

    def worker(k):
        start.wait()
        try:
            results[k] = run(shared, k)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert shared.dtype == torch.float16 and all(p.dtype == torch.float16 for p in shared.parameters())
    for i, ref in enumerate(serial):
        assert torch.isfinite(results[i]).all()
        torch.testing.assert_close(results[i], ref, atol=0, rtol=0, msg=f"batch {i}")
