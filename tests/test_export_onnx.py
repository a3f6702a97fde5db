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

import numpy as np
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
    return eo.convert_to_graph_noise(decoder_onnx, tmp_path_factory.mktemp("onnx") / "decoder_graph_noise.onnx")


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


def seeds(*values):
    return np.asarray(values, dtype=np.int64).reshape(-1, 1)


def test_graph_noise_io_and_ops(graph_noise_onnx):
    io = eo.graph_io(graph_noise_onnx)
    assert [(r[0], r[1]) for r in io["inputs"]] == [("latent_sample", 1), ("seed", 7)]  # FLOAT, INT64
    assert io["inputs"][1][2] == (io["inputs"][0][2][0], 1)  # seed: (B, 1), the latent's batch
    assert [r[0] for r in io["outputs"]] == ["sample", "noise"]
    assert io["outputs"][0][2] == io["outputs"][1][2]  # noise has the image's (dynamic) shape
    meta = eo.read_metadata(graph_noise_onnx)
    assert meta["ssdd.noise"] == "graph" and meta["ssdd.noise_rng"] == eo.NOISE_RNG
    ops = eo.onnx_ops(graph_noise_onnx)
    assert "RandomNormalLike" not in ops and eo.unsupported_trt_ops(graph_noise_onnx) == []


def test_graph_noise_same_seed_same_image(graph_noise_onnx):
    """The same seeds give the same noise and image in two fresh sessions, in later calls of one session and
    for two items of one batch (non-square, batch 2); the noise is the numpy reference's bit for bit and
    standard normal; another seed gives other noise to its item only."""
    z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(3)).numpy()
    a, b = (eo.ort_session(graph_noise_onnx) for _ in range(2))
    feeds = {"latent_sample": z, "seed": seeds(7, 7)}
    (sa, na), (sb, nb) = a.run(None, feeds), b.run(None, feeds)
    assert na.shape == (2, 3, 40, 56) and sa.shape == na.shape
    assert (na == nb).all() and (sa == sb).all() and (na[0] == na[1]).all()
    assert all((x == y).all() for x, y in zip(a.run(None, feeds), (sa, na)))  # no session state
    assert abs(float(na.mean())) < 0.05 and abs(float(na.std()) - 1) < 0.05
    assert np.array_equal(na, eo.graph_noise_ref([7, 7], (3, 40, 56)))  # IEEE-exact ops: bit for bit
    other = a.run(None, {"latent_sample": z, "seed": seeds(8, 7)})[1]
    assert (other[0] == na[0]).mean() < 0.01 and (other[1] == na[1]).all()


def test_graph_noise_batch_invariant_in_any_grouping_and_order(graph_noise_onnx):
    """Item i's image and noise depend on (latent i, seed i) only: one batch of 5, its items reversed, split
    into groups of 2 + 3 and 1 + 4, and one at a time, all give the same tensors bit for bit. Seeds include
    negatives and values beyond 2**31 (the generator folds the whole int64)."""
    z = torch.randn(5, 4, 3, 4, generator=torch.Generator().manual_seed(11)).numpy()
    s = seeds(0, 1, -1, 2**31 + 5, -(2**63))
    session = eo.ort_session(graph_noise_onnx)
    sample, noise = session.run(None, {"latent_sample": z, "seed": s})
    assert len({noise[i].tobytes() for i in range(5)}) == 5  # every seed draws its own noise
    groupings = [[[4, 3, 2, 1, 0]], [[0, 1], [2, 3, 4]], [[3], [0, 4, 1, 2]], [[i] for i in range(5)]]
    for groups in groupings:
        for idx in groups:
            got_sample, got_noise = session.run(None, {"latent_sample": z[idx], "seed": s[idx]})
            assert (got_noise == noise[idx]).all(), f"noise of items {idx} changed with grouping {groups}"
            assert (got_sample == sample[idx]).all(), f"images of items {idx} changed with grouping {groups}"
    assert np.array_equal(noise, eo.graph_noise_ref(s[:, 0], (3, 24, 32)))


def test_graph_noise_fed_to_noise_input_graph_gives_the_same_image(graph_noise_onnx, decoder_session, model):
    z = torch.randn(1, 4, 6, 4, generator=torch.Generator().manual_seed(5)).numpy()
    sample, noise = eo.ort_session(graph_noise_onnx).run(None, {"latent_sample": z, "seed": seeds(3)})
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


def test_graph_noise_tensorrt_profile_and_triton_config(graph_noise_onnx, tmp_path):
    from ssdd_runtime.export.tensorrt import profile_for_onnx
    from ssdd_runtime.export.triton_repo import write_triton_repo

    profile = profile_for_onnx(graph_noise_onnx, "1x64x64", "2x256x256", "4x512x512")
    assert profile.shapes == {"latent_sample": ((1, 4, 8, 8), (2, 4, 32, 32), (4, 4, 64, 64)),
                              "seed": ((1, 1), (2, 1), (4, 1))}
    model_dir = write_triton_repo(tmp_path / "repo", onnx_path=graph_noise_onnx, name="ssdd_decoder")
    text = (model_dir / "config.pbtxt").read_text()
    assert "noise drawn in the graph from the per-item seed input" in text
    cfg, _ = _parse_config(text)
    assert [i.name for i in cfg.input] == ["latent_sample", "seed"]
    assert [o.name for o in cfg.output] == ["sample", "noise"]
    assert list(cfg.input[1].dims) == [1]


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


# --- the exported repository in a real Triton server ----------------------------------------------------------

# Test-only stand-in for Triton's onnxruntime backend (absent from the nvidia-pytriton wheel, which has the Python
# backend only): a Python-backend model that runs the same <version>/model.onnx with ONNX Runtime, feeding the
# inputs and returning the outputs under the names config.pbtxt declares. It does NOT cover the native backend's
# own options (execution accelerators, TensorRT/OpenVINO EPs, its thread and memory settings) nor its automatic
# config completion (the config here is complete as written, so Triton's checks of it still run).
ORT_STAND_IN = '''
import json
from pathlib import Path

import onnxruntime as ort
import torch
import torch.utils.dlpack
import triton_python_backend_utils as pb


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {n: torch.utils.dlpack.from_dlpack(pb.get_input_tensor_by_name(request, n).to_dlpack()).numpy()
                     for n in self.inputs}
            outs = self.session.run(self.outputs, feeds)
            responses.append(pb.InferenceResponse(output_tensors=[
                pb.Tensor.from_dlpack(n, torch.utils.dlpack.to_dlpack(torch.from_numpy(o)))
                for n, o in zip(self.outputs, outs)]))
        return responses
'''


def test_exported_triton_repo_answers_in_real_tritonserver(decoder_onnx, graph_noise_onnx, encoder_onnx, tmp_path):
    """`ssdd export triton-repo` writes three models (noise-input decoder, seeded graph-noise decoder, encoder)
    into one repository; the bundled tritonserver 2.51 loads it with each config unchanged except its backend
    line (onnxruntime -> the Python stand-in above), and answers over HTTP and gRPC with ONNX Runtime's outputs
    (same graph, one thread each side: equal bit for bit). 12 concurrent single-item requests to the seeded
    decoder are merged by the dynamic batcher (server-side batches > 1) and each equals its own run."""
    pytest.importorskip("pytriton", reason="needs the serve extra: pip install 'ssdd-runtime[serve]'")
    httpclient = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http]")
    grpcclient = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc]")
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    from ssdd_runtime.serve import TritonServer

    repo = tmp_path / "repo"
    models = {"ssdd_decoder": decoder_onnx, "ssdd_decoder_seeded": graph_noise_onnx, "ssdd_encoder": encoder_onnx}
    for name, path in models.items():
        subprocess.run([sys.executable, "-m", "ssdd_runtime", "export", "triton-repo", "--onnx", str(path),
                        "--repo", str(repo), "--name", name, "--kind", "KIND_CPU", "--max-batch-size", "4",
                        "--max-queue-delay-us", "200000"], check=True, capture_output=True, timeout=120)
        config = repo / name / "config.pbtxt"
        text = config.read_text()
        assert text.count('backend: "onnxruntime"') == 1
        config.write_text(text.replace('backend: "onnxruntime"', 'backend: "python"'))  # the only edit
        (repo / name / "1" / "model.py").write_text(ORT_STAND_IN)
        assert (repo / name / "1" / "model.onnx").read_bytes() == Path(path).read_bytes()

    def ort_run(path, feeds):
        return eo.ort_session(path, threads=1).run(None, feeds)

    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 3, 5, generator=g).numpy()
    cases = {"ssdd_decoder": {"latent_sample": z, "noise": torch.randn(2, 3, 24, 40, generator=g).numpy()},
             "ssdd_decoder_seeded": {"latent_sample": z, "seed": seeds(4, -9)},
             "ssdd_encoder": {"image": (torch.rand(2, 3, 24, 40, generator=g) * 2 - 1).numpy()}}
    server = TritonServer(repo, log_path=tmp_path / "tritonserver.log")
    with server:
        http = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        try:
            for name, feeds in cases.items():
                want = ort_run(models[name], feeds)
                out_names = [o.name for o in eo.ort_session(models[name]).get_outputs()]
                for client, mod in ((http, httpclient), (grpc, grpcclient)):
                    inputs = []
                    for k, v in feeds.items():
                        t = mod.InferInput(k, list(v.shape), "INT64" if v.dtype == np.int64 else "FP32")
                        t.set_data_from_numpy(v)
                        inputs.append(t)
                    result = client.infer(name, inputs)
                    for out, ref in zip(out_names, want):
                        got = result.as_numpy(out)
                        assert got.shape == ref.shape and (got == ref).all(), f"{name}.{out}: max abs " \
                            f"{float(abs(got - ref).max()):.2e}"

            def one(i):
                feeds = {"latent_sample": z[i % 2:i % 2 + 1], "seed": seeds(100 + i)}
                t = [httpclient.InferInput("latent_sample", [1, 4, 3, 5], "FP32"),
                     httpclient.InferInput("seed", [1, 1], "INT64")]
                t[0].set_data_from_numpy(feeds["latent_sample"])
                t[1].set_data_from_numpy(feeds["seed"])
                with httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}") as c:
                    got = c.infer("ssdd_decoder_seeded", t).as_numpy("sample")
                return got, ort_run(graph_noise_onnx, feeds)[0]

            with ThreadPoolExecutor(12) as pool:
                for got, ref in pool.map(one, range(12)):
                    assert (got == ref).all()
            stats = http.get_inference_statistics("ssdd_decoder_seeded")["model_stats"][0]["batch_stats"]
            assert max(s["batch_size"] for s in stats) > 1, stats
        finally:
            http.close()
            grpc.close()
    assert server.proc.returncode == 0 and server.shm_files() == []
