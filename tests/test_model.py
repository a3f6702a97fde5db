"""The model against the official implementation: key names/shapes per size, parameter counts, golden tensors."""
import ast

import pytest
import torch

from conftest import DATA, GOLDEN_CASES, assert_close, load_golden
from ssdd_runtime import SSDD
from ssdd_runtime.model import DECODER_SIZES, SSDDModule, decoder_config
from ssdd_runtime.sampler import time_grid


def read_keys(name):
    rows = []
    for line in (DATA / "keys" / f"{name}.txt").read_text().splitlines():
        if line.strip():
            key, shape, _ = line.split("\t")
            rows.append((key, tuple(ast.literal_eval(shape))))
    return rows


@pytest.mark.parametrize("size,encoder", [(s, "f8c4") for s in DECODER_SIZES] + [("M_f16c4", "f16c4")])
def test_state_dict_matches_official_keys(size, encoder):
    with torch.device("meta"):
        model = SSDDModule(encoder, size.split("_")[0])
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == read_keys(size)  # same names, shapes and order


# Decoder-only parameter counts from the spec's size table (3.1).
DECODER_PARAMS = {"XS": 4_996_611, "S": 14_057_059, "B": 21_140_459, "M": 50_280_147, "L": 90_759_939,
                  "XL": 161_272_835, "H": 362_688_003, "XH": 644_622_339, "G": 1_450_019_715}


@pytest.mark.parametrize("size", list(DECODER_PARAMS))
def test_decoder_parameter_counts(size):
    with torch.device("meta"):
        model = SSDDModule("f8c4", size)
    assert sum(p.numel() for p in model.decoder.parameters()) == DECODER_PARAMS[size]
    assert sum(p.numel() for p in model.encoder.parameters()) == 34_163_664


def test_size_table_rejects_unknown_names():
    with pytest.raises(ValueError, match="expected one of XS, S, B, M"):
        decoder_config("medium")


def test_time_grid_matches_spec_example():
    expected = torch.tensor([1, 0.765625, 0.5625, 0.390625, 0.25, 0.140625, 0.0625, 0.015625, 0])
    assert torch.equal(time_grid(8, 2.0), expected)
    assert torch.equal(time_grid(1, 4.0), torch.tensor([1.0, 0.0]))


@pytest.fixture(scope="module", params=GOLDEN_CASES)
def golden_case(request, make_checkpoint):
    tensors, cfg = load_golden(request.param)
    model = SSDD.from_pretrained(make_checkpoint(cfg["encoder"], cfg["decoder"], cfg["weight_seed"]))
    assert (model.encoder_config.name, model.decoder_config.size) == (cfg["encoder"], cfg["decoder"])
    return model, tensors, cfg


GOLDEN_TOL = dict(atol=2e-4, rtol_l2=2e-5)  # official run-to-run noise: ~1.3e-5 abs, 3e-6 rel


def test_golden_encoder_moments(golden_case):
    model, g, _ = golden_case
    post = model.encode(g["x"])
    assert_close(post.mean, g["z_mean"], name="z_mean", **GOLDEN_TOL)
    assert_close(post.logvar, g["z_logvar"], name="z_logvar", **GOLDEN_TOL)
    assert torch.equal(post.mode(), post.mean)


def test_golden_raw_decoder_at_t1000(golden_case):
    model, g, _ = golden_case
    B = g["x"].shape[0]
    with torch.no_grad():
        v = model.decoder(g["noise"], torch.full((B,), 1000.0), g["z_mean"])
    assert_close(v, g["v_t1000"], name="v_t1000", **GOLDEN_TOL)


def test_golden_decode_each_step_count(golden_case):
    model, g, cfg = golden_case
    for steps in cfg["steps"]:
        out = model.decode(g["z_mean"], steps=steps, noise=g["noise"], t_pow_shift=cfg["t_pow_shift"])
        assert out.dtype == torch.float32
        assert_close(out, g[f"decode_steps{steps}"], name=f"decode steps={steps}", **GOLDEN_TOL)
