"""ONNX export of the SSDD decoder (latent -> image, a fixed number of Euler steps) and encoder (image -> moments),
and the one ONNX export call, ONNX Runtime session and runner the rest of the project uses (the benchmark too).

Graphs (names are the contract with TensorRT profiles and Triton configs):
    decoder, noise="input": latent_sample (B, C, h, w), noise (B, 3, h*F, w*F) -> sample (B, 3, h*F, w*F)
    decoder, noise="graph": latent_sample, seed (B, 1) int64 -> sample, noise (item i's noise drawn in the graph
                            from seed[i] alone; feeding it to the noise="input" graph gives `sample`)
    encoder, names="ssdd":    image (B, 3, H, W) -> latent_mean, latent_logvar (B, C, H/F, W/F), logvar clamped
    encoder, names="optimum": sample (B, 3, H, W) -> latent_parameters (B, 2C, H/F, W/F), mean channels first,
                              unclamped (optimum's VaeEncoderOnnxConfig; diffusers' DiagonalGaussian clamps)
B, h, w (H, W) are dynamic, non-square included. The decoder graph is `SSDDModule.sample` on the PyTorch
reference path (`optimize.use_kernels(m, False)`), unrolled over `steps` by `sampler.euler_sample`, with one
explicit transform applied to a copy of the model (`prepare_for_export`): each windowed attention is replaced
by `ExportWindowAttention`, which computes the same softmax(q k^T / sqrt(d) + bias) v in the form TensorRT
fuses into one MHA kernel (scale on Q before the first MatMul, see the TensorRT guide "Fused Attention") and
builds the relative-position bias in the graph for whatever token grid arrives, with integer ops TensorRT's
parser takes (no integer Clip/Abs, no `%`). Everything else (convolutions, norms, FiLM, GEGLU) runs the
model's own modules.

Noise in the graph (servers that send only the 16 KiB latent instead of 768 KiB of noise per 256x256 image):
each item carries its own seed (input `seed`, (B, 1) int64) and its noise is a function of that seed and the
image shape only (`graph_noise_ref`: a counter-based integer hash and Box-Muller in plain ONNX ops), so a
server's dynamic batcher can merge, split and reorder requests without changing any image. (ONNX's
RandomNormalLike takes a seed attribute fixed at export and ONNX Runtime seeds it once per session: a request's
noise would depend on what ran before it.) The noise is not torch.Generator's; clients that need a given image
again send the same seed, or read the `noise` output and send it to a noise="input" graph.

Opset 18..20: torch's dynamo exporter needs >= 18, the TensorRT 10.0 ONNX parser reads <= 20. The operators
used are checked against `trt10_onnx_ops.txt` after every export. Verified here: ONNX Runtime (CPU) against
PyTorch fp32 on CPU (tests/test_export_onnx.py). Not verified here: TensorRT parsing (no TensorRT, no GPU).
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import torch
from torch import nn

from ssdd_runtime import kernels, optimize
from ssdd_runtime.io import atomic_output
from ssdd_runtime.model import Attention, SSDDModule
from ssdd_runtime.sampler import T_POW_SHIFT

log = logging.getLogger(__name__)

DECODER_INPUTS = ("latent_sample", "noise")
DECODER_OUTPUTS = ("sample",)
ENCODER_INPUTS = ("image",)
ENCODER_OUTPUTS = ("latent_mean", "latent_logvar")
OPTIMUM_ENCODER_INPUTS = ("sample",)
OPTIMUM_ENCODER_OUTPUTS = ("latent_parameters",)
NOISE_MODES = ("input", "graph")
NAMINGS = ("ssdd", "optimum")
OPSET_MIN, OPSET_MAX, OPSET_DEFAULT = 18, 20, 18
EXTERNAL_DATA_BYTES = 1_800_000_000  # above this the weights go to `<file>.data` (protobuf's hard limit is 2 GiB)
# Kept in fp32 by the fp16 variant: normalisation statistics and softmax (plus onnxruntime's default list).
FP16_KEEP_FP32_OPS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization", "ReduceMean",
                      "Softmax")
ONNX_HINT = "pip install 'ssdd-runtime[onnx]' (onnx, onnxruntime, onnxscript)"


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"ONNX export needs the `{module}` package: {ONNX_HINT}") from e


# ---------------------------------------------------------------------------------------------------------
# The export transform: same math, TensorRT-friendly form


class ExportWindowAttention(nn.Module):
    """Drop-in for `model.Attention` holding the same projections: softmax((q / sqrt(d)) k^T + bias) v.

    Written out as MatMul -> Add -> Softmax -> MatMul with the scale multiplied into Q first, the pattern
    TensorRT fuses into its MHA kernel (a fused SDPA node would be decomposed by the exporter with sqrt(scale)
    on both Q and K^T instead). The math is `kernels.window_attention_ref`; tests check they agree.
    """

    def __init__(self, attn: Attention):
        super().__init__()
        self.heads = attn.heads
        self.to_q, self.to_k, self.to_v, self.out_proj = attn.to_q, attn.to_k, attn.to_v, attn.out_proj

    def forward(self, u, table, grid):
        B, N, C = u.shape
        dh = C // self.heads
        q, k, v = (proj(u).reshape(B, N, self.heads, dh).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))  # (B, heads, N, dh)
        q = q * (1.0 / math.sqrt(dh))
        bias = kernels.relative_position_bias(table, grid).to(q.dtype)  # (heads, N, N), built in the graph
        logits = q @ k.transpose(-1, -2) + bias  # (B, heads, N, N)
        o = logits.softmax(dim=-1) @ v  # (B, heads, N, dh)
        return self.out_proj(o.transpose(1, 2).reshape(B, N, C))


def export_attention(module: nn.Module) -> nn.Module:
    """Replace every windowed `Attention` under `module` by an `ExportWindowAttention` holding the same weights,
    in place (the caller passes a copy); returns the module."""
    for name, child in list(module.named_children()):
        if isinstance(child, Attention):
            setattr(module, name, ExportWindowAttention(child))
        else:
            export_attention(child)
    return module


def prepare_for_export(model: SSDDModule) -> SSDDModule:
    """A plain fp32 `SSDDModule` copy of `model` (an `SSDD` loses its input validation, which does not trace)
    on the reference path, whose windowed attentions are `ExportWindowAttention`s holding the same weights."""
    if not isinstance(model, SSDDModule):
        raise TypeError(f"model must be an SSDDModule or SSDD, got {type(model).__name__}")
    m = SSDDModule(model.encoder_config, model.decoder_config)
    m.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()}, strict=True)
    m.eval()
    optimize.use_kernels(m, False)  # traced on any device, the graph is the PyTorch reference
    return export_attention(m)


class DecoderGraph(nn.Module):
    """(latent_sample, noise) -> sample: `steps` unrolled Euler steps of the reference path."""

    def __init__(self, model: SSDDModule, steps: int = 1, t_pow_shift: float = T_POW_SHIFT):
        super().__init__()
        self.model, self.steps, self.t_pow_shift = model, steps, t_pow_shift

    def forward(self, latent_sample, noise):
        return self.model.sample(latent_sample, noise, steps=self.steps, t_pow_shift=self.t_pow_shift)


class EncoderGraph(nn.Module):
    """image -> (latent_mean, latent_logvar), logvar clamped to [-30, 20] as in `encode`; or, with
    moments=True, the encoder's raw (B, 2C, h, w) moments (optimum's `latent_parameters`)."""

    def __init__(self, model: SSDDModule, moments: bool = False):
        super().__init__()
        self.model, self.moments = model, moments

    def forward(self, image):
        if self.moments:
            return self.model.encoder(image)
        post = self.model.encode(image)
        return post.mean, post.logvar


# ---------------------------------------------------------------------------------------------------------
# Export


def check_export_args(part: str, steps: int, opset: int | None, dtype: torch.dtype, noise: str = "input",
                      names: str = "ssdd") -> int:
    if part not in ("decoder", "encoder"):
        raise ValueError(f"part must be 'decoder' or 'encoder', got {part!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    opset = OPSET_DEFAULT if opset is None else opset
    if not isinstance(opset, int) or not OPSET_MIN <= opset <= OPSET_MAX:
        raise ValueError(f"unsupported opset {opset!r}: expected {OPSET_MIN}..{OPSET_MAX} (torch's dynamo exporter "
                         f"needs >= {OPSET_MIN}; the TensorRT 10.0 ONNX parser reads <= {OPSET_MAX})")
    if dtype == torch.bfloat16:
        raise ValueError("dtype torch.bfloat16 is not exported: ONNX Runtime's CPU provider has no bf16 kernels to "
                         "check it against; build a bf16 TensorRT engine from the fp32 graph "
                         "(`ssdd export tensorrt --precision bf16`) instead")
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype!r}")
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {', '.join(NOISE_MODES)}, got {noise!r}")
    if noise == "graph" and part != "decoder":
        raise ValueError("noise='graph' applies to the decoder graph only")
    if names not in NAMINGS:
        raise ValueError(f"names must be one of {', '.join(NAMINGS)}, got {names!r}")
    if names == "optimum" and part != "encoder":  # else silently the same graph as names="ssdd"
        raise ValueError("names='optimum' renames the encoder graph only (sample -> latent_parameters); the "
                         "decoder's names (latent_sample, noise -> sample) are the same in both: drop it")
    return opset


def export_module(module: nn.Module, args: tuple[torch.Tensor, ...], *, input_names, output_names,
                  dynamic_shapes=None, opset: int = OPSET_DEFAULT):
    """The one `torch.onnx.export` call of the project (dynamo exporter): returns the ModelProto, not saved.
    Used by `export_onnx` (dynamic shapes) and by the benchmark's ONNX backends (static shapes)."""
    _require("onnx")
    _require("onnxscript")
    with torch.no_grad():
        program = torch.onnx.export(module.eval(), tuple(args), dynamo=True, opset_version=opset,
                                    input_names=list(input_names), output_names=list(output_names),
                                    dynamic_shapes=dynamic_shapes, verbose=False)
    return program.model_proto


def export_onnx(model: SSDDModule, path, *, part: str = "decoder", steps: int = 1, opset: int | None = None,
                dtype: torch.dtype = torch.float32, t_pow_shift: float = T_POW_SHIFT,
                external_data: bool | None = None, noise: str = "input",
                names: str = "ssdd") -> Path:
    """Write `part` of `model` to `path` as ONNX and check it; returns the path.

    steps: Euler steps unrolled into the decoder graph (1 = single-step decoding). dtype=torch.float16 writes
    the fp16 variant (fp32 inputs/outputs; norm statistics and softmax stay fp32, see FP16_KEEP_FP32_OPS).
    noise: "input" (the caller sends the start noise) or "graph" (drawn in the graph from a per-item `seed`
    input, see graph_noise_ref; the drawn noise is a second output, `noise`). names: "ssdd" or "optimum" (encoder
    `sample` -> `latent_parameters`; refused for the decoder, whose names are the same in both).
    external_data: None = automatic (weights over ~1.8 GB go to `<path>.data` next to the file). After writing:
    `onnx.checker` and a check of every operator against the TensorRT 10.0 parser's list (a warning names any
    outside it).
    """
    opset = check_export_args(part, steps, opset, dtype, noise, names)
    path = Path(path)
    m = prepare_for_export(model)
    F, C = m.stride, m.decoder_config.z_dim
    B, h, w = torch.export.Dim("batch", min=1), torch.export.Dim("h", min=1), torch.export.Dim("w", min=1)
    # Example sizes != 1 (torch.export specialises dims of size 1) and non-square, so neither gets baked in.
    if part == "decoder":
        graph = DecoderGraph(m, steps, t_pow_shift)
        args = (torch.randn(2, C, 4, 6), torch.randn(2, 3, 4 * F, 6 * F))
        inputs, outputs = DECODER_INPUTS, DECODER_OUTPUTS
        dynamic = {"latent_sample": {0: B, 2: h, 3: w}, "noise": {0: B, 2: F * h, 3: F * w}}
    else:
        graph = EncoderGraph(m, moments=names == "optimum")
        args = (torch.randn(2, 3, 4 * F, 6 * F),)
        inputs, outputs = ((OPTIMUM_ENCODER_INPUTS, OPTIMUM_ENCODER_OUTPUTS) if names == "optimum"
                           else (ENCODER_INPUTS, ENCODER_OUTPUTS))
        dynamic = {"image": {0: B, 2: F * h, 3: F * w}}  # keyed by forward's argument; input_names renames
    proto = export_module(graph, args, input_names=inputs, output_names=outputs, dynamic_shapes=dynamic,
                          opset=opset)
    if noise == "graph":
        _draw_noise_in_graph(proto, stride=F)
    meta = {"ssdd.part": part, "ssdd.encoder": m.encoder_config.name, "ssdd.decoder": m.decoder_config.size,
            "ssdd.stride": str(F), "ssdd.z_dim": str(C), "ssdd.steps": str(steps) if part == "decoder" else "",
            "ssdd.t_pow_shift": str(t_pow_shift) if part == "decoder" else "",
            "ssdd.noise": noise if part == "decoder" else "",
            "ssdd.noise_rng": NOISE_RNG if noise == "graph" else "", "ssdd.names": names,
            "ssdd.dtype": "float16" if dtype == torch.float16 else "float32"}
    for key, value in meta.items():
        if value:
            proto.metadata_props.add(key=key, value=value)
    n_bytes = sum(p.numel() * 4 for p in (m.decoder if part == "decoder" else m.encoder).parameters())
    if dtype == torch.float16:
        proto = _to_fp16(proto, large=n_bytes > EXTERNAL_DATA_BYTES)
        n_bytes //= 2
    _save(proto, path, n_bytes > EXTERNAL_DATA_BYTES if external_data is None else external_data)
    log.info("exported %s (%s, opset %d, %s, noise %s) to %s", part, meta["ssdd.decoder"], opset,
             meta["ssdd.dtype"], noise, path)
    return path


# The in-graph noise generator: a counter-based hash (MiMC-style rounds x -> (x + k_r)^5 mod P over the prime
# P = 2^31 - 1; x -> x^5 is a bijection mod P because gcd(5, P - 1) = 1) keyed by the request's seed, then
# Box-Muller. Element n of an item's noise depends only on (seed, n, the image shape): batching, grouping and
# order never change it. Integer products stay below 2^62 (int64 everywhere, no bitwise ops: the TensorRT
# parser's list has none for integers). ln and cos are polynomials in IEEE-exact ops (Add, Mul, Div, Sqrt):
# ONNX Runtime's vectorised Log/Cos round differently by position in the buffer (seen: 1 ulp between two
# items with the same seed), which would make an item's noise depend on its batch. `graph_noise_ref` is the
# numerics spec; the graph computes the same operations in the same order.
NOISE_P = 2**31 - 1
NOISE_ROUNDS = 6
NOISE_RNG = "ssdd-mimc5-p31-r6-poly/1"  # metadata ssdd.noise_rng: names this generator (change it if it changes)
NOISE_KEYS = [((0x9E3779B9 * (3 * r + 1)) % NOISE_P, (0x85EBCA6B * (3 * r + 2)) % NOISE_P,
               (0xC2B2AE35 * (3 * r + 3)) % NOISE_P) for r in range(NOISE_ROUNDS)]  # (a_r, b_r, c_r)
LN_TERMS = [1.0 / (2 * k + 1) for k in range(8)]  # ln m = 2 s sum_k s^2k / (2k + 1), s = (m-1)/(m+1) < 1/3
COS_TERMS = [(-1) ** n / math.factorial(2 * n) for n in range(12)]  # cos y on [-pi, pi], error < 4e-9


def graph_noise_ref(seeds, shape):
    """numpy reference of the noise a noise="graph" decoder draws: (B, *shape) float32 for int64 seeds (B,).

    Keys: lo = seed mod P (>= 0), hi = trunc(seed / P) mod P, k_r = (lo a_r mod P + hi b_r mod P + c_r) mod P.
    Counters n = 0 .. 2N-1 (N = prod(shape)): x = n, then per round x = (x + k_r)^5 mod P; v = 2 (x // 256) + 1
    (odd, < 2^24, exact in float32). u1 = v / 2^24 from the first N counters: ln u1 = ln m + (e - 24) ln 2 with
    v = m 2^e, m in [1, 2), e by binary search; u2 from the last N: cos(2 pi u2) = -cos(2 pi (v / 2^24 - 1/2)).
    noise = sqrt(-2 ln u1) cos(2 pi u2)."""
    import numpy as np

    f32 = np.float32
    seeds = np.asarray(seeds, dtype=np.int64).reshape(-1, 1)
    P = np.int64(NOISE_P)
    lo = np.mod(seeds, P)
    hi = np.mod(np.floor_divide(seeds, P) + ((seeds < 0) & (lo != 0)), P)  # ONNX integer Div truncates
    N = int(np.prod(shape))
    x = np.arange(2 * N, dtype=np.int64).reshape(1, -1)
    for a, b, c in NOISE_KEYS:
        k = np.mod(np.mod(lo * a, P) + np.mod(hi * b, P) + c, P)
        x = np.mod(x + k, P)
        x2 = np.mod(x * x, P)
        x = np.mod(np.mod(x2 * x2, P) * x, P)
    v = (x // 256) * 2 + 1
    v1, v2 = v[:, :N], v[:, N:]
    pow2 = np.asarray([2**i for i in range(32)], dtype=np.int64)
    e = np.zeros_like(v1)
    for step in (16, 8, 4, 2, 1):
        e = e + step * (v1 >= pow2[e + step]).astype(np.int64)
    m = v1.astype(f32) / pow2.astype(f32)[e]
    s = (m - f32(1)) / (m + f32(1))
    w = s * s
    poly = np.full_like(w, f32(LN_TERMS[-1]))
    for c in LN_TERMS[-2::-1]:
        poly = poly * w + f32(c)
    ln_u = (s * poly) * f32(2) + (e.astype(f32) + f32(-24)) * f32(math.log(2))
    radius = np.sqrt(ln_u * f32(-2))
    y = (v2.astype(f32) * f32(2.0 ** -24) + f32(-0.5)) * f32(2 * math.pi)
    y2 = y * y
    cos = np.full_like(y2, f32(COS_TERMS[-1]))
    for c in COS_TERMS[-2::-1]:
        cos = cos * y2 + f32(c)
    return ((radius * cos) * f32(-1)).reshape(len(seeds), *shape)


def _draw_noise_in_graph(proto, *, stride: int) -> None:
    """Turn the graph input `noise` into noise drawn in the graph from a new input `seed` (B, 1) int64, in
    place (`graph_noise_ref` is the same computation), and expose it as the second output `noise`. Edited after
    export (onnx.helper): torch has no traceable op for a per-item seeded normal."""
    onnx = _require("onnx")
    from onnx import TensorProto, helper

    graph = proto.graph
    (noise_in,) = [v for v in graph.input if v.name == "noise"]
    latent = next(v for v in graph.input if v.name == "latent_sample")
    batch = latent.type.tensor_type.shape.dim[0]
    graph.input.remove(noise_in)
    graph.input.append(helper.make_tensor_value_info("seed", TensorProto.INT64,
                                                     [batch.dim_param or batch.dim_value, 1]))
    nodes = []

    def const(name, values, dtype=TensorProto.INT64, dims=()):
        values = values if isinstance(values, list) else [values]
        graph.initializer.append(helper.make_tensor(f"ssdd_noise_{name}", dtype, list(dims), values))
        return f"ssdd_noise_{name}"

    def fconst(name, value):
        return const(name, float(value), TensorProto.FLOAT)

    def op(kind, inputs, name, **attrs):
        out = f"ssdd_noise_{name}"
        nodes.append(helper.make_node(kind, inputs, [out], name=out, **attrs))
        return out

    P = const("P", NOISE_P)
    shape = op("Shape", [latent.name], "latent_shape")
    img = op("Add", [op("Mul", [shape, const("scale", [1, 0, stride, stride], dims=[4])], "shape_mul"),
                     const("offset", [0, 3, 0, 0], dims=[4])], "image_shape")  # (B, 3, H, W)
    per_item = op("Slice", [img, const("one_1d", [1], dims=[1]), const("four_1d", [4], dims=[1])], "item_shape")
    n = op("ReduceProd", [per_item], "n", keepdims=1)  # (1,) = 3 H W
    two_n = op("Squeeze", [op("Mul", [n, const("two", 2)], "two_n")], "two_n_scalar")
    counters = op("Range", [const("zero", 0), two_n, const("one", 1)], "range")
    x = op("Unsqueeze", [counters, const("axis0", [0], dims=[1])], "counters")  # (1, 2N)
    lo = op("Mod", ["seed", P], "seed_lo")  # (B, 1); integer Mod takes the divisor's sign: >= 0
    hi = op("Mod", [op("Div", ["seed", P], "seed_div"), P], "seed_hi")
    for r, (a, b, c) in enumerate(NOISE_KEYS):
        ka = op("Mod", [op("Mul", [lo, const(f"a{r}", a)], f"lo_a{r}"), P], f"ka{r}")
        kb = op("Mod", [op("Mul", [hi, const(f"b{r}", b)], f"hi_b{r}"), P], f"kb{r}")
        k = op("Mod", [op("Add", [op("Add", [ka, kb], f"kab{r}"), const(f"c{r}", c)], f"kabc{r}"), P], f"k{r}")
        x = op("Mod", [op("Add", [x, k], f"xk{r}"), P], f"x{r}")  # (B, 2N)
        x2 = op("Mod", [op("Mul", [x, x], f"sq{r}"), P], f"x2_{r}")
        x4 = op("Mod", [op("Mul", [x2, x2], f"sq2{r}"), P], f"x4_{r}")
        x = op("Mod", [op("Mul", [x4, x], f"p5{r}"), P], f"x5_{r}")
    v = op("Add", [op("Mul", [op("Div", [x, const("256", 256)], "q"), const("2", 2)], "q2"), const("1", 1)], "v")
    nodes.append(helper.make_node("Split", [v, op("Concat", [n, n], "split_sizes", axis=0)],
                                  ["ssdd_noise_v1", "ssdd_noise_v2"], name="ssdd_noise_split", axis=1))
    v1, v2 = "ssdd_noise_v1", "ssdd_noise_v2"
    # ln u1: e = floor(log2 v1) by binary search over a table of powers of two, m = v1 / 2^e in [1, 2)
    pow2 = const("pow2", [2**i for i in range(32)], dims=[32])
    e = op("Mul", [v1, const("zero_i", 0)], "e_init")
    for step in (16, 8, 4, 2, 1):
        bound = op("Gather", [pow2, op("Add", [e, const(f"s{step}", step)], f"e_plus{step}")], f"bound{step}")
        hit = op("Cast", [op("GreaterOrEqual", [v1, bound], f"ge{step}")], f"hit{step}", to=TensorProto.INT64)
        e = op("Add", [e, op("Mul", [hit, const(f"t{step}", step)], f"inc{step}")], f"e{step}")
    pow2f = const("pow2f", [float(2**i) for i in range(32)], TensorProto.FLOAT, dims=[32])
    m = op("Div", [op("Cast", [v1], "v1f", to=TensorProto.FLOAT), op("Gather", [pow2f, e], "two_e")], "m")
    s = op("Div", [op("Add", [m, fconst("m1", -1)], "m_minus"), op("Add", [m, fconst("p1", 1)], "m_plus")], "s")
    w = op("Mul", [s, s], "w")
    poly = op("Mul", [w, fconst("ln_zero", 0.0)], "ln_p_init")  # zeros of w's shape, then Horner
    for i, c in enumerate(reversed(LN_TERMS)):
        poly = op("Add", [poly if i == 0 else op("Mul", [poly, w], f"ln_pw{i}"), fconst(f"ln_c{i}", c)], f"ln_p{i}")
    ln_u = op("Add", [op("Mul", [op("Mul", [s, poly], "s_poly"), fconst("f2", 2)], "ln_m"),
                      op("Mul", [op("Add", [op("Cast", [e], "ef", to=TensorProto.FLOAT), fconst("m24", -24)],
                                    "e_m24"), fconst("ln2", math.log(2))], "e_ln2")], "ln_u")
    radius = op("Sqrt", [op("Mul", [ln_u, fconst("m2", -2)], "m2_ln_u")], "radius")
    # cos(2 pi u2) = -cos(y), y = 2 pi (u2 - 1/2) in (-pi, pi)
    y = op("Mul", [op("Add", [op("Mul", [op("Cast", [v2], "v2f", to=TensorProto.FLOAT), fconst("inv24", 2.0**-24)],
                                 "u2"), fconst("mhalf", -0.5)], "t"), fconst("twopi", 2 * math.pi)], "y")
    y2 = op("Mul", [y, y], "y2")
    cos = op("Mul", [y2, fconst("cos_zero", 0.0)], "cos_init")
    for i, c in enumerate(reversed(COS_TERMS)):
        cos = op("Add", [cos if i == 0 else op("Mul", [cos, y2], f"cos_pw{i}"), fconst(f"cos_c{i}", c)], f"cos{i}")
    flat = op("Mul", [op("Mul", [radius, cos], "r_cos"), fconst("neg", -1)], "flat")  # (B, N)
    nodes.append(helper.make_node("Reshape", [flat, img], ["noise"], name="ssdd_noise_reshape"))
    for i, node in enumerate(nodes):  # first in the graph: nodes stay topologically sorted
        graph.node.insert(i, node)
    graph.output.append(onnx.ValueInfoProto())
    graph.output[-1].CopyFrom(noise_in)


def convert_to_graph_noise(src, dst, *, external_data: bool | None = None) -> Path:
    """Write the noise="graph" variant of the noise-input decoder graph `src` to `dst` (what
    export_onnx(noise="graph") writes, without re-exporting)."""
    onnx = _require("onnx")
    src, dst = Path(src), Path(dst)
    check_onnx_file(src)  # a named error for a file that is not an exported graph
    proto = onnx.load(str(src))
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("ssdd.part") != "decoder" or meta.get("ssdd.noise", "input") != "input":
        raise ValueError(f"{src} is not a noise-input decoder graph written by export_onnx (metadata "
                         f"ssdd.part={meta.get('ssdd.part')!r}, ssdd.noise={meta.get('ssdd.noise')!r})")
    check_export_args("decoder", 1, None, torch.float32, "graph")  # decoder names are the same in both namings
    _draw_noise_in_graph(proto, stride=int(meta["ssdd.stride"]))
    for key, value in (("ssdd.noise", "graph"), ("ssdd.noise_rng", NOISE_RNG)):
        props = [p for p in proto.metadata_props if p.key == key]
        if props:
            props[0].value = value
        else:
            proto.metadata_props.add(key=key, value=value)
    n_bytes = sum(t.ByteSize() for t in proto.graph.initializer)
    _save(proto, dst, n_bytes > EXTERNAL_DATA_BYTES if external_data is None else external_data)
    return dst


def convert_to_fp16(src, dst, *, external_data: bool | None = None) -> Path:
    """Write the fp16 variant of the fp32 graph `src` to `dst` (what export_onnx(dtype=torch.float16) writes)."""
    onnx = _require("onnx")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"ONNX file not found: {src}")
    proto = onnx.load(str(src))
    if any(p.key == "ssdd.dtype" and p.value != "float32" for p in proto.metadata_props):
        raise ValueError(f"{src} is not an fp32 graph (metadata ssdd.dtype)")
    n_bytes = sum(t.ByteSize() for t in proto.graph.initializer)
    proto = _to_fp16(proto, large=n_bytes > EXTERNAL_DATA_BYTES)
    for p in proto.metadata_props:
        if p.key == "ssdd.dtype":
            p.value = "float16"
    _save(proto, dst, n_bytes // 2 > EXTERNAL_DATA_BYTES if external_data is None else external_data)
    return dst


def _save(proto, path: Path, external: bool) -> None:
    """Save (weights in `<name>.data` next to it when external), run onnx.checker, check the TensorRT op list."""
    onnx = _require("onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    # The graph goes through the atomic writer and is checked before its rename. External weights are written
    # under their final name first (the graph refers to it), so a graph file that exists is always complete.
    with atomic_output(path) as tmp:
        if external:
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(proto, str(tmp))
        onnx.checker.check_model(str(tmp))
    missing = unsupported_trt_ops(path)
    if missing:
        log.warning("%s uses operators outside the TensorRT 10.0 ONNX parser's list: %s", path, ", ".join(missing))


def _to_fp16(proto, *, large: bool):
    """fp16 weights and activations with fp32 inputs/outputs; FP16_KEEP_FP32_OPS run in fp32 behind Casts.
    Constants are clipped to the fp16 range (the -1e7 window mask becomes -65504: still exp() = 0).
    The converter appends its input Casts at the end of the node list: onnxruntime's `OnnxModel` re-sorts."""
    float16 = _require("onnxruntime.transformers.float16")
    from onnxruntime.transformers.onnx_model import OnnxModel

    if large:  # protobuf cannot serialise > 2 GiB for onnx's in-memory shape inference: infer through files
        import tempfile

        onnx = _require("onnx")
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "fp32_shapes.onnx"
            onnx.save_model(proto, str(src), save_as_external_data=True, location="fp32.data")
            onnx.shape_inference.infer_shapes_path(str(src), str(dst))
            proto = onnx.load(str(dst))
    proto = float16.convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=large,
                                             op_block_list=float16.DEFAULT_OP_BLOCK_LIST + list(FP16_KEEP_FP32_OPS))
    OnnxModel.graph_topological_sort(proto.graph, is_deterministic=True)
    del proto.graph.value_info[:]  # the converter leaves some stale (fp32 entries for tensors now fp16)
    return proto

# ---------------------------------------------------------------------------------------------------------
# Inspection and checks


def load_graph(path):
    """The ModelProto of the graph file at `path` (weights in external data left unread). A file that is not an
    ONNX model (text, truncated, another format) is a ValueError naming it, not protobuf's DecodeError."""
    onnx = _require("onnx")
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}" if not path.exists() else
                                f"{path} is not a regular file, expected an .onnx graph")
    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is not an ONNX model (truncated or another format?): {e}") from None


def check_onnx_file(path) -> dict[str, str]:
    """The one check of a graph handed to `export trtexec-cmd`/`tensorrt`/`triton-repo`: an ONNX model with
    inputs and outputs, written by `export_onnx` (its `ssdd.*` metadata, returned, name the part and shapes)."""
    proto = load_graph(path)
    if not proto.graph.input or not proto.graph.output:
        raise ValueError(f"{path} is not an exported SSDD graph: it has {len(proto.graph.input)} inputs and "
                         f"{len(proto.graph.output)} outputs (empty or another kind of ONNX file?)")
    meta = {p.key: p.value for p in proto.metadata_props if p.key.startswith("ssdd.")}
    if meta.get("ssdd.part") not in ("decoder", "encoder"):
        raise ValueError(f"{path} has no ssdd.* metadata: export it with `ssdd export onnx`")
    return meta


def read_metadata(path) -> dict[str, str]:
    """The `ssdd.*` metadata an export writes (part, encoder, decoder, stride, z_dim, steps, dtype)."""
    proto = load_graph(path)
    return {p.key: p.value for p in proto.metadata_props if p.key.startswith("ssdd.")}


def graph_io(path) -> dict[str, list[tuple[str, int, tuple]]]:
    """{"inputs": [(name, onnx elem_type, dims)], "outputs": [...]}, dims as ints or dim_param strings."""
    proto = load_graph(path)

    def rows(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)) for v in values]

    return {"inputs": rows(proto.graph.input), "outputs": rows(proto.graph.output)}


def onnx_ops(path) -> dict[str, int]:
    """Operator histogram of a graph, {op_type: count} (default domain only; other domains keep their prefix)."""
    onnx = _require("onnx")
    proto = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        name = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def trt10_supported_ops() -> frozenset[str]:
    """Operators the TensorRT 10.0 ONNX parser imports, from trt10_onnx_ops.txt (source in its header)."""
    text = (Path(__file__).parent / "trt10_onnx_ops.txt").read_text(encoding="utf-8")
    return frozenset(line.split()[0] for line in text.splitlines() if line.strip() and not line.startswith("#"))


def unsupported_trt_ops(path) -> list[str]:
    """Operators of the graph outside the TensorRT 10.0 list, plus a note if its opset is above 20."""
    onnx = _require("onnx")
    proto = onnx.load(str(path), load_external_data=False)
    bad = sorted(set(onnx_ops(path)) - trt10_supported_ops())
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > OPSET_MAX:
        bad.append(f"opset {opset} > {OPSET_MAX}")
    return bad


def ort_session(path, *, threads: int | None = None, optimization: str = "all", device="cpu"):
    """The project's one onnxruntime InferenceSession builder. optimization: 'disable', 'basic', 'extended' or
    'all'; device "cpu" (CPUExecutionProvider) or "cuda[:i]" (CUDAExecutionProvider on that device)."""
    ort = _require("onnxruntime")
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization not in levels:
        raise ValueError(f"optimization must be one of {', '.join(levels)}, got {optimization!r}")
    device = torch.device(device)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[optimization]
    if threads is not None:
        opts.intra_op_num_threads = threads
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError("onnxruntime has no CUDAExecutionProvider here (pip install onnxruntime-gpu)")
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0})]
    elif device.type == "cpu":
        providers = ["CPUExecutionProvider"]
    else:
        raise ValueError(f"device must be cpu or cuda, got {device}")
    return ort.InferenceSession(str(path), opts, providers=providers)


def ort_runner(session, device="cpu"):
    """`run(*tensors) -> first output` over a session, inputs in the graph's order. CPU: numpy feeds; CUDA:
    device buffers bound with io_binding (no host copies), the output allocated by torch in the last input's
    dtype at the graph's static output shape."""
    device = torch.device(device)
    in_names = [i.name for i in session.get_inputs()]
    out = session.get_outputs()[0]
    if device.type != "cuda":
        def run_cpu(*args: torch.Tensor) -> torch.Tensor:
            feeds = {n: a.detach().cpu().contiguous().numpy() for n, a in zip(in_names, args)}
            return torch.from_numpy(session.run([out.name], feeds)[0])

        return run_cpu

    import numpy as np

    np_types = {torch.float32: np.float32, torch.float16: np.float16}
    if not all(isinstance(d, int) for d in out.shape):
        raise ValueError(f"ort_runner on CUDA needs a static output shape, the graph has {out.shape}")
    out_shape = tuple(out.shape)

    def run_cuda(*args: torch.Tensor) -> torch.Tensor:
        binding = session.io_binding()
        args = [a.contiguous() for a in args]
        for n, a in zip(in_names, args):
            binding.bind_input(n, "cuda", device.index or 0, np_types[a.dtype], tuple(a.shape), a.data_ptr())
        result = torch.empty(out_shape, dtype=args[-1].dtype, device=device)
        binding.bind_output(out.name, "cuda", device.index or 0, np_types[result.dtype], out_shape,
                            result.data_ptr())
        session.run_with_iobinding(binding)
        return result

    return run_cuda


def verify_onnx(model: SSDDModule, path, *, latent_sizes=((4, 4), (4, 6)), batch: int = 1, seed: int = 0,
                threads: int | None = None) -> list[dict]:
    """Compare ONNX Runtime (CPU) with PyTorch fp32 (reference path) at each latent size (h, w).

    Returns [{"shape": ..., "max_abs": ..., "outputs": [...]}]; the shape is the decoder's latent or the
    encoder's image. Uses the graph's `ssdd.*` metadata for the part, steps, t_pow_shift, noise and names.
    A noise="graph" decoder is compared with PyTorch decoding the noise the graph drew (its `noise` output).
    """
    import numpy as np

    meta = read_metadata(path)
    part = meta.get("ssdd.part")
    if part not in ("decoder", "encoder"):
        raise ValueError(f"{path} has no ssdd.part metadata: was it written by ssdd_runtime.export.export_onnx?")
    session = ort_session(path, threads=threads)
    ref = model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()
    F, C = ref.stride, ref.decoder_config.z_dim
    graph_noise = meta.get("ssdd.noise") == "graph"
    optimum = meta.get("ssdd.names") == "optimum"
    g = torch.Generator().manual_seed(seed)
    rows = []
    for h, w in latent_sizes:
        with torch.no_grad():
            if part == "decoder":
                z = torch.randn(batch, C, h, w, generator=g)
                noise = torch.randn(batch, 3, h * F, w * F, generator=g)
                feeds = ({"latent_sample": z.numpy(), "seed": np.arange(batch, dtype=np.int64).reshape(-1, 1)}
                         if graph_noise else {"latent_sample": z.numpy(), "noise": noise.numpy()})
                got = session.run(None, feeds)
                if graph_noise:
                    noise = torch.from_numpy(got[1])
                want = [ref.sample(z, noise, steps=int(meta["ssdd.steps"]),
                                   t_pow_shift=float(meta["ssdd.t_pow_shift"]))]
                shape = tuple(z.shape)
            else:
                x = torch.rand(batch, 3, h * F, w * F, generator=g) * 2 - 1
                if optimum:
                    want = [ref.encoder(x)]
                else:
                    post = ref.encode(x)
                    want = [post.mean, post.logvar]
                got = session.run(None, {(OPTIMUM_ENCODER_INPUTS if optimum else ENCODER_INPUTS)[0]: x.numpy()})
                shape = tuple(x.shape)
        errs = [float((torch.from_numpy(o) - t).abs().max()) for o, t in zip(got, want)]
        rows.append({"shape": shape, "max_abs": max(errs), "outputs": errs})
    return rows
