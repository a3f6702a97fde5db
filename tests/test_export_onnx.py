"""ONNX export: ONNX Runtime (CPU) against the golden tensors and PyTorch fp32, dynamic/non-square shapes, the
TensorRT 10.0 operator list, the attention pattern, the fp16 variant, noise drawn in the graph, optimum's encoder
names, errors, and the Triton repository.

One decoder and two encoder exports (SSDD-S, golden test weights) are shared by the module (~3 min here); the
noise-in-graph decoder is derived from the decoder export by the same graph edit export_onnx(noise="graph") runs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="needs the onnx extra: pip install 'ssdd-runtime[onnx]'")
pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'ssdd-runtime[onnx]'")
pytest.importorskip("onnxscript", reason="needs the onnx extra: pip install 'ssdd-runtime[onnx]'")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from ssdd_runtime.export import onnx as eo  # noqa: E402
from ssdd_runtime.model import SSDDModule  # noqa: E402
from ssdd_runtime.testing import test_state_dict  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "golden"
TOL = 5e-4  # ONNX Runtime vs golden / PyTorch fp32, max abs (outputs have std ~1)


def golden(case: str):
    path = GOLDEN / f"{case}.safetensors"
    with safe_open(str(path), "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    return cfg, load_file(str(path))


def max_err(got, want) -> float:
    return float((torch.as_tensor(got) - want).abs().max())


@pytest.fixture(scope="module")
def model():
    m = SSDDModule("f8c4", "S").eval()
    m.load_state_dict(test_state_dict("f8c4", "S", seed=0), strict=True)
    return m


@pytest.fixture(scope="module")
def decoder_onnx(model, tmp_path_factory):
    return eo.export_onnx(model, tmp_path_factory.mktemp("onnx") / "decoder.onnx", part="decoder", steps=1)


@pytest.fixture(scope="module")
def api_model():
    from ssdd_runtime import SSDD

    return SSDD.from_state_dict(test_state_dict("f8c4", "S", seed=0), device="cpu")


@pytest.fixture(scope="module")
def encoder_onnx(api_model, tmp_path_factory):
    """Exported from the public `SSDD` class (whose validating encode/decode cannot be traced)."""
    return eo.export_onnx(api_model, tmp_path_factory.mktemp("onnx") / "encoder.onnx", part="encoder")


@pytest.fixture(scope="module")
def decoder_session(decoder_onnx):
    return eo.ort_session(decoder_onnx)


@pytest.fixture(scope="module")
def graph_noise_onnx(decoder_onnx, tmp_path_factory):
    return eo.convert_to_graph_noise(decoder_onnx, tmp_path_factory.mktemp("onnx") / "decoder_graph_noise.onnx",
                                     seed=7)


@pytest.fixture(scope="module")
def optimum_encoder_onnx(api_model, tmp_path_factory):
    return eo.export_onnx(api_model, tmp_path_factory.mktemp("onnx") / "vae_encoder.onnx", part="encoder",
                          names="optimum")


# --- numerics -------------------------------------------------------------------------------------------------


def test_decoder_reproduces_golden(decoder_session):
    """Batch 2 with the window active (16x16 grid). (The other S golden cases use other weight seeds.)"""
    case = "S_f8c4_128_b2"
    cfg, g = golden(case)
    assert (cfg["encoder"], cfg["decoder"], cfg["weight_seed"]) == ("f8c4", "S", 0)
    out = decoder_session.run(None, {"latent_sample": g["z_mean"].numpy(), "noise": g["noise"].numpy()})[0]
    err = max_err(out, g["decode_steps1"])
    print(f"{case}: ORT decoder vs golden decode_steps1 max abs {err:.2e}")
    assert out.shape == tuple(g["decode_steps1"].shape)
    assert err <= TOL


def test_decoder_non_square_through_same_graph(model, decoder_onnx):
    # batch 1 (the export example had 2); 10 x 18 latent: window active along x (offsets up to 17 > 7), not
    # along y; and 3 x 5 (smaller than the window)
    rows = eo.verify_onnx(model, decoder_onnx, latent_sizes=((10, 18), (3, 5)), batch=1)
    for row in rows:
        print(f"decoder {row['shape']}: ORT vs PyTorch max abs {row['max_abs']:.2e}")
        assert row["max_abs"] <= TOL


def test_encoder_parity(api_model, encoder_onnx):
    cfg, g = golden("S_f8c4_128_b2")
    session = eo.ort_session(encoder_onnx)
    mean, logvar = session.run(None, {"image": g["x"].numpy()})
    errs = max_err(mean, g["z_mean"]), max_err(logvar, g["z_logvar"])
    print(f"encoder vs golden: mean {errs[0]:.2e}, logvar {errs[1]:.2e}")
    assert max(errs) <= TOL
    rows = eo.verify_onnx(api_model, encoder_onnx, latent_sizes=((6, 10),), batch=1)  # 48 x 80 image
    print(f"encoder {rows[0]['shape']}: ORT vs PyTorch max abs {rows[0]['max_abs']:.2e}")
    assert rows[0]["max_abs"] <= TOL


def test_export_attention_equals_model_attention(model):
    block = model.decoder.mid_block.transformer_blocks[0]
    table = block.relative_position_bias.relative_bias_table
    u = torch.randn(2, 9 * 20, block.attn1.to_q.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = block.attn1(u, table, (9, 20))
        got = eo.ExportWindowAttention(block.attn1)(u, table, (9, 20))
    assert max_err(got, want) <= 1e-5


# --- graph structure ------------------------------------------------------------------------------------------


def test_graph_io_names_and_dynamic_dims(decoder_onnx, encoder_onnx):
    dec, enc = eo.graph_io(decoder_onnx), eo.graph_io(encoder_onnx)
    assert [r[0] for r in dec["inputs"]] == ["latent_sample", "noise"]
    assert [r[0] for r in dec["outputs"]] == ["sample"]
    assert [r[0] for r in enc["inputs"]] == ["image"]
    assert [r[0] for r in enc["outputs"]] == ["latent_mean", "latent_logvar"]
    (_, _, z), (_, _, n) = dec["inputs"]
    assert z[1] == 4 and n[1] == 3 and all(isinstance(d, str) for d in (z[0], z[2], z[3], n[0], n[2], n[3]))
    meta = eo.read_metadata(decoder_onnx)
    assert meta["ssdd.part"] == "decoder" and meta["ssdd.steps"] == "1" and meta["ssdd.stride"] == "8"


def test_ops_within_tensorrt_10_list(decoder_onnx, encoder_onnx):
    supported = eo.trt10_supported_ops()
    assert {"Conv", "MatMul", "Softmax", "InstanceNormalization", "LayerNormalization"} <= supported
    assert "Attention" not in supported and "Gelu" not in supported  # post-10.0 / undated: left out on purpose
    for path in (decoder_onnx, encoder_onnx):
        proto = onnx.load(str(path), load_external_data=False)
        assert all(o.version <= eo.OPSET_MAX for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        ops = eo.onnx_ops(path)
        print(path.name, "ops:", ", ".join(ops))
        assert eo.unsupported_trt_ops(path) == []
        assert not any("::" in op for op in ops)  # default domain only: no Triton, no contrib ops


def test_attention_scales_q_before_first_matmul(decoder_onnx):
    """Every Softmax reads Add(MatMul(Mul(q, 1/sqrt(dh)), K^T), bias): TensorRT's MHA fusion pattern."""
    from onnx import numpy_helper

    proto = onnx.load(str(decoder_onnx), load_external_data=False)
    producer = {o: n for n in proto.graph.node for o in n.output}
    consts = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    softmaxes = [n for n in proto.graph.node if n.op_type == "Softmax"]
    cfg = SSDDModule("f8c4", "S").decoder_config
    assert len(softmaxes) == cfg.mid_layers
    for sm in softmaxes:
        add = producer[sm.input[0]]
        assert add.op_type == "Add"
        mm = next(producer[i] for i in add.input if i in producer and producer[i].op_type == "MatMul")
        mul = producer[mm.input[0]]
        assert mul.op_type == "Mul"
        scale = [consts[i] for i in mul.input if i in consts]
        assert len(scale) == 1 and scale[0].size == 1
        assert abs(float(scale[0]) - (cfg.mid_dim // cfg.num_heads) ** -0.5) < 1e-6


# --- noise drawn in the graph, optimum names ------------------------------------------------------------------


def test_graph_noise_io_and_ops(graph_noise_onnx):
    io = eo.graph_io(graph_noise_onnx)
    assert [r[0] for r in io["inputs"]] == ["latent_sample"]
    assert [r[0] for r in io["outputs"]] == ["sample", "noise"]
    assert io["outputs"][0][2] == io["outputs"][1][2]  # noise has the image's (dynamic) shape
    meta = eo.read_metadata(graph_noise_onnx)
    assert meta["ssdd.noise"] == "graph" and meta["ssdd.noise_seed"] == "7"
    assert "RandomNormalLike" in eo.onnx_ops(graph_noise_onnx) and eo.unsupported_trt_ops(graph_noise_onnx) == []


def test_graph_noise_same_seed_same_image(graph_noise_onnx, decoder_onnx, tmp_path):
    """Two fresh sessions of the same graph (seed 7) draw the same noise and decode the same image, non-square,
    batch 2; the noise is standard normal; a later call of a session draws new noise; another seed differs."""
    z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(3)).numpy()
    a, b = (eo.ort_session(graph_noise_onnx) for _ in range(2))
    (sa, na), (sb, nb) = a.run(None, {"latent_sample": z}), b.run(None, {"latent_sample": z})
    assert na.shape == (2, 3, 40, 56) and sa.shape == na.shape
    assert (na == nb).all() and (sa == sb).all()
    assert abs(float(na.mean())) < 0.05 and abs(float(na.std()) - 1) < 0.05
    assert not (a.run(None, {"latent_sample": z})[1] == na).all()  # the session's generator moves on
    other = eo.convert_to_graph_noise(decoder_onnx, tmp_path / "seed8.onnx", seed=8)
    assert not (eo.ort_session(other).run(None, {"latent_sample": z})[1] == na).all()


def test_graph_noise_fed_to_noise_input_graph_gives_the_same_image(graph_noise_onnx, decoder_session, model):
    z = torch.randn(1, 4, 6, 4, generator=torch.Generator().manual_seed(5)).numpy()
    sample, noise = eo.ort_session(graph_noise_onnx).run(None, {"latent_sample": z})
    again = decoder_session.run(None, {"latent_sample": z, "noise": noise})[0]
    print(f"graph noise -> noise input graph: max abs {float(abs(again - sample).max()):.2e}")
    assert float(abs(again - sample).max()) <= 1e-5
    rows = eo.verify_onnx(model, graph_noise_onnx, latent_sizes=((4, 6),), batch=2)  # PyTorch on that noise
    assert rows[0]["max_abs"] <= TOL


def test_graph_noise_conversion_errors(graph_noise_onnx, decoder_onnx, encoder_onnx, tmp_path):
    with pytest.raises(ValueError, match="not a noise-input decoder"):
        eo.convert_to_graph_noise(graph_noise_onnx, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="not a noise-input decoder"):
        eo.convert_to_graph_noise(encoder_onnx, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="seed must be"):
        eo.convert_to_graph_noise(decoder_onnx, tmp_path / "x.onnx", seed=-1)


def test_graph_noise_tensorrt_profile_and_triton_config(graph_noise_onnx, tmp_path):
    from ssdd_runtime.export.tensorrt import profile_for_onnx
    from ssdd_runtime.export.triton_repo import write_triton_repo

    profile = profile_for_onnx(graph_noise_onnx, "1x64x64", "2x256x256", "4x512x512")
    assert profile.shapes == {"latent_sample": ((1, 4, 8, 8), (2, 4, 32, 32), (4, 4, 64, 64))}
    model_dir = write_triton_repo(tmp_path / "repo", onnx_path=graph_noise_onnx, name="ssdd_decoder")
    text = (model_dir / "config.pbtxt").read_text()
    assert "noise drawn in the graph with seed 7" in text
    cfg, _ = _parse_config(text)
    assert [i.name for i in cfg.input] == ["latent_sample"] and [o.name for o in cfg.output] == ["sample", "noise"]


def test_optimum_encoder_names(optimum_encoder_onnx, encoder_onnx, api_model):
    """optimum's VaeEncoderOnnxConfig: sample -> latent_parameters (B, 2C, h, w), mean channels first."""
    io = eo.graph_io(optimum_encoder_onnx)
    assert [r[0] for r in io["inputs"]] == ["sample"] and [r[0] for r in io["outputs"]] == ["latent_parameters"]
    assert io["outputs"][0][2][1] == 8 and eo.read_metadata(optimum_encoder_onnx)["ssdd.names"] == "optimum"
    x = (torch.rand(1, 3, 48, 80, generator=torch.Generator().manual_seed(2)) * 2 - 1).numpy()
    (params,) = eo.ort_session(optimum_encoder_onnx).run(None, {"sample": x})
    mean, logvar = eo.ort_session(encoder_onnx).run(None, {"image": x})
    assert abs(params[:, :4] - mean).max() <= 1e-5 and abs(params[:, 4:].clip(-30, 20) - logvar).max() <= 1e-5
    assert eo.verify_onnx(api_model, optimum_encoder_onnx, latent_sizes=((6, 10),))[0]["max_abs"] <= TOL


# --- fp16 variant, external data ------------------------------------------------------------------------------


def test_fp16_variant_keeps_norms_and_softmax_fp32(decoder_onnx, tmp_path):
    dst = eo.convert_to_fp16(decoder_onnx, tmp_path / "decoder_fp16.onnx", external_data=True)
    assert (tmp_path / "decoder_fp16.onnx.data").is_file()  # external data format, loaded by ORT below
    assert eo.read_metadata(dst)["ssdd.dtype"] == "float16"
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(dst)))
    types = {v.name: v.type.tensor_type.elem_type for v in list(proto.graph.value_info) + list(proto.graph.input)}
    kept = [n for n in proto.graph.node if n.op_type in ("Softmax", "InstanceNormalization", "LayerNormalization")]
    assert kept and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in kept)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT16 for n in convs)
    assert eo.unsupported_trt_ops(dst) == []
    _, g = golden("S_f8c4_128_b2")
    out = eo.ort_session(dst).run(None, {"latent_sample": g["z_mean"].numpy(), "noise": g["noise"].numpy()})[0]
    ref = g["decode_steps1"]
    rel = float((torch.from_numpy(out) - ref).norm() / ref.norm())
    print(f"fp16 variant vs golden: max abs {max_err(out, ref):.2e}, rel {rel:.2e}")
    assert out.dtype.name == "float32" and rel <= 2e-2 and max_err(out, ref) <= 0.25


# --- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(opset=17), "unsupported opset 17"),
    (dict(opset=21), "unsupported opset 21"),
    (dict(dtype=torch.bfloat16), "bfloat16"),
    (dict(dtype=torch.float64), "dtype must be"),
    (dict(part="middle"), "part must be"),
    (dict(steps=0), "steps must be"),
    (dict(noise="random"), "noise must be one of"),
    (dict(noise="graph", part="encoder"), "decoder graph only"),
    (dict(noise="graph", seed=-1), "seed must be"),
    (dict(names="hf"), "names must be one of"),
])
def test_export_argument_errors(model, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        eo.export_onnx(model, tmp_path / "x.onnx", **kwargs)
    assert not (tmp_path / "x.onnx").exists()


def test_missing_onnxruntime_names_the_extra(monkeypatch, decoder_onnx):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'ssdd-runtime\[onnx\]'"):
        eo.ort_session(decoder_onnx)


def test_verify_rejects_foreign_graph(model, tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])),
              str(path))
    with pytest.raises(ValueError, match="no ssdd.part metadata"):
        eo.verify_onnx(model, path)


# --- Triton Inference Server repository -----------------------------------------------------------------------


def _parse_config(text: str):
    pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                              reason="needs tritonclient[grpc] for Triton's model-config protobuf schema")
    from google.protobuf import text_format

    return text_format.Parse(text, pb2.ModelConfig()), pb2


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_triton_repo_config_parses_and_matches_graph(decoder_onnx, tmp_path, backend):
    from ssdd_runtime.export.triton_repo import write_triton_repo

    engine = None
    if backend == "tensorrt":
        engine = tmp_path / "decoder.plan"
        engine.write_bytes(b"not a real engine: the repository only copies it")
    model_dir = write_triton_repo(tmp_path / "repo", onnx_path=decoder_onnx, engine_path=engine, backend=backend,
                                  name="ssdd_decoder", max_batch_size=8, instance_count=2,
                                  preferred_batch_sizes=(4, 8), max_queue_delay_us=500)
    cfg, pb2 = _parse_config((model_dir / "config.pbtxt").read_text())
    assert cfg.name == "ssdd_decoder" and cfg.backend == backend and cfg.max_batch_size == 8
    io = eo.graph_io(decoder_onnx)
    for declared, (name, _, dims) in zip(list(cfg.input) + list(cfg.output), io["inputs"] + io["outputs"]):
        assert declared.name == name
        assert declared.data_type == pb2.TYPE_FP32
        assert list(declared.dims) == [d if isinstance(d, int) else -1 for d in dims[1:]]  # batch excluded
    assert len(cfg.input) == 2 and len(cfg.output) == 1
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU
    model_file = model_dir / "1" / ("model.plan" if backend == "tensorrt" else "model.onnx")
    assert model_file.is_file()


def test_triton_repo_errors(decoder_onnx, tmp_path):
    from ssdd_runtime.export.triton_repo import triton_config, write_triton_repo

    with pytest.raises(ValueError, match="unknown backend"):
        triton_config(decoder_onnx, name="m", backend="pytorch")
    with pytest.raises(ValueError, match="needs engine_path"):
        write_triton_repo(tmp_path, onnx_path=decoder_onnx, backend="tensorrt")
    with pytest.raises(ValueError, match="GPUs only"):
        triton_config(decoder_onnx, name="m", backend="tensorrt", kind="KIND_CPU")
    with pytest.raises(ValueError, match="preferred batch sizes"):
        triton_config(decoder_onnx, name="m", max_batch_size=4, preferred_batch_sizes=(8,))


# --- CLI ------------------------------------------------------------------------------------------------------


def test_cli_trtexec_cmd_and_triton_repo(decoder_onnx, tmp_path, capsys):
    from ssdd_runtime.cli import main

    rc = main(["export", "trtexec-cmd", "--onnx", str(decoder_onnx), "--engine", "decoder.plan", "--precision",
               "fp16", "--min-shape", "1x64x64", "--opt-shape", "2x256x256", "--max-shape", "4x512x768",
               "--timing-cache", "timing.cache"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "--minShapes=latent_sample:1x4x8x8,noise:1x3x64x64" in out
    assert "--optShapes=latent_sample:2x4x32x32,noise:2x3x256x256" in out
    assert "--maxShapes=latent_sample:4x4x64x96,noise:4x3x512x768" in out
    assert "--fp16" in out and "--timingCacheFile=timing.cache" in out and "--saveEngine=decoder.plan" in out
    rc = main(["export", "triton-repo", "--onnx", str(decoder_onnx), "--repo", str(tmp_path / "r"),
               "--max-batch-size", "4"])
    assert rc == 0 and (tmp_path / "r" / "ssdd_decoder" / "config.pbtxt").is_file()


def test_cli_export_onnx_rejects_opset_before_loading(tmp_path, capsys):
    from ssdd_runtime.cli import main

    rc = main(["export", "onnx", "--checkpoint", str(tmp_path / "missing.safetensors"), "--opset", "21",
               "-o", str(tmp_path / "d.onnx")])
    assert rc == 2 and "unsupported opset 21" in capsys.readouterr().err
