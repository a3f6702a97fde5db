"""TensorRT paths that run without TensorRT: profiles, the trtexec command line, and the errors raised when the
package, the GPU or a matching profile is missing. Engine building itself is unverified (no TensorRT here)."""
from __future__ import annotations

import json
import shlex
import sys

import pytest

from ssdd_runtime.export import tensorrt as et


def test_image_size_profile_for_both_decoder_inputs():
    p = et.make_profile("1x64x64", "2x256x256", "8x512x768", part="decoder", stride=8, z_dim=4)
    assert p.shapes["latent_sample"] == ((1, 4, 8, 8), (2, 4, 32, 32), (8, 4, 64, 96))
    assert p.shapes["noise"] == ((1, 3, 64, 64), (2, 3, 256, 256), (8, 3, 512, 768))
    f16 = et.make_profile("1x64x64", "1x128x128", "2x256x512", part="decoder", stride=16, z_dim=4)
    assert f16.shapes["latent_sample"][2] == (2, 4, 16, 32)
    enc = et.make_profile("1x64x64", "1x256x256", "4x512x512", part="encoder")
    assert enc.shapes == {"image": ((1, 3, 64, 64), (1, 3, 256, 256), (4, 3, 512, 512))}


def test_trtexec_style_profile_and_consistency_check():
    p = et.make_profile("latent_sample:1x4x8x8,noise:1x3x64x64", "latent_sample:1x4x32x32,noise:1x3x256x256",
                        "latent_sample:4x4x64x64,noise:4x3x512x512")
    assert p.shapes["noise"][1] == (1, 3, 256, 256)
    with pytest.raises(ValueError, match="do not match"):
        et.make_profile("latent_sample:1x4x8x8,noise:1x3x64x64", "latent_sample:1x4x8x8,noise:1x3x64x72",
                        "latent_sample:1x4x8x8,noise:1x3x64x72")
    with pytest.raises(ValueError, match="graph's inputs"):
        et.make_profile("image:1x3x64x64", "image:1x3x64x64", "image:1x3x64x64", part="decoder")


@pytest.mark.parametrize("lo, opt, hi, match", [
    ("1x256x256", "1x128x128", "1x512x512", "min <= opt <= max"),
    ("1x60x64", "1x64x64", "1x64x64", "multiple of the encoder stride 8"),
    ("1x64", "1x64x64", "1x64x64", "BxHxW"),
    ("1xAx64", "1x64x64", "1x64x64", "like 1x256x256"),
    ("0x64x64", "1x64x64", "1x64x64", "positive"),
])
def test_bad_profiles(lo, opt, hi, match):
    with pytest.raises(ValueError, match=match):
        et.make_profile(lo, opt, hi)


def test_shape_outside_profile_is_rejected():
    p = et.make_profile("1x64x64", "1x256x256", "4x512x512")
    p.check("noise", (4, 3, 512, 512))
    p.check("latent_sample", (1, 4, 8, 8))
    with pytest.raises(ValueError, match="outside the engine's optimisation profile"):
        p.check("noise", (5, 3, 256, 256))
    with pytest.raises(ValueError, match="outside"):
        p.check("latent_sample", (1, 4, 4, 8))
    with pytest.raises(ValueError, match="no input named"):
        p.check("image", (1, 3, 64, 64))


def test_trtexec_command_line():
    p = et.make_profile("1x64x64", "2x256x256", "8x512x768")
    cmd = et.trtexec_command("decoder.onnx", "decoder.plan", precision="bf16", profile=p,
                             timing_cache="t.cache", optimization_level=5, workspace_mib=4096)
    assert cmd == ["trtexec", "--onnx=decoder.onnx", "--saveEngine=decoder.plan",
                   "--minShapes=latent_sample:1x4x8x8,noise:1x3x64x64",
                   "--optShapes=latent_sample:2x4x32x32,noise:2x3x256x256",
                   "--maxShapes=latent_sample:8x4x64x96,noise:8x3x512x768",
                   "--bf16", "--timingCacheFile=t.cache", "--builderOptimizationLevel=5",
                   "--memPoolSize=workspace:4096M"]
    fp32 = et.trtexec_command("d.onnx", "d.plan", precision="fp32", profile=p, optimization_level=None)
    assert not any(f in fp32 for f in ("--fp16", "--bf16")) and not any("Level" in a for a in fp32)
    assert shlex.join(et.trtexec_command("my model.onnx", "e.plan", precision="fp16", profile=p)) \
        .startswith("trtexec '--onnx=my model.onnx'")


@pytest.mark.parametrize("bad", ["int8", "FP16", "tf32"])
def test_unknown_precision(bad):
    p = et.make_profile("1x64x64", "1x64x64", "1x64x64")
    with pytest.raises(ValueError, match="unknown precision"):
        et.trtexec_command("d.onnx", "d.plan", precision=bad, profile=p)
    with pytest.raises(ValueError, match="unknown precision"):
        et.build_engine("d.onnx", "d.plan", precision=bad, profile=p)


def test_bad_optimization_level():
    p = et.make_profile("1x64x64", "1x64x64", "1x64x64")
    with pytest.raises(ValueError, match="0..5"):
        et.trtexec_command("d.onnx", "d.plan", profile=p, optimization_level=7)


def test_build_without_tensorrt_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as if not installed, even where it is
    onnx_file = tmp_path / "d.onnx"
    onnx_file.write_bytes(b"placeholder: the import fails before parsing")
    p = et.make_profile("1x64x64", "1x64x64", "1x64x64")
    with pytest.raises(ImportError, match=r"pip install 'ssdd-runtime\[tensorrt\]'"):
        et.build_engine(onnx_file, tmp_path / "d.plan", precision="fp16", profile=p)
    with pytest.raises(FileNotFoundError, match="ONNX file not found"):
        et.build_engine(tmp_path / "missing.onnx", tmp_path / "d.plan", precision="fp16", profile=p)


def test_tensorrt_decoder_errors_without_gpu(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(FileNotFoundError, match="engine not found"):
        et.TensorRTDecoder(tmp_path / "missing.plan")
    engine = tmp_path / "d.plan"
    engine.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="d.plan.json"):
        et.TensorRTDecoder(engine)
    info = {"onnx": "d.onnx", "precision": "fp16", "profile": {"latent_sample": [[1, 4, 8, 8]] * 3,
                                                               "noise": [[1, 3, 64, 64]] * 3},
            "metadata": {"ssdd.part": "encoder"}}
    (tmp_path / "d.plan.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="not a decoder"):
        et.TensorRTDecoder(engine)
    info["metadata"] = {"ssdd.part": "decoder", "ssdd.stride": "8", "ssdd.z_dim": "4", "ssdd.steps": "1",
                        "ssdd.t_pow_shift": "2.0"}
    (tmp_path / "d.plan.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="CUDA"):
        et.TensorRTDecoder(engine, device="cpu")


def test_profile_for_onnx_reads_metadata(tmp_path):
    onnx = pytest.importorskip("onnx", reason="needs the onnx extra")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match="no ssdd.\\* metadata"):
        et.profile_for_onnx(path, "1x64x64", "1x64x64", "1x64x64")
    for key, value in {"ssdd.part": "decoder", "ssdd.stride": "16", "ssdd.z_dim": "4"}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    p = et.profile_for_onnx(path, "1x64x64", "1x128x128", "2x256x256")
    assert p.shapes["latent_sample"] == ((1, 4, 4, 4), (1, 4, 8, 8), (2, 4, 16, 16))
