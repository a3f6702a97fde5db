"""Benchmark CLI: output schema (and every committed result file), timing method (warm-up excluded,
interleaving, percentiles), the environment record, CLI errors, skipped backends and models, the decode driver
against SSDDModule.sample, the ONNX Runtime backend against eager (and its temp folder), and the README table
generator. No timed assertions on real models."""
from __future__ import annotations

import csv
import glob
import json
import os
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

from ssdd_runtime import optimize
from ssdd_runtime.benchmarks import backends as bk
from ssdd_runtime.benchmarks import report as rp
from ssdd_runtime.benchmarks import schema
from ssdd_runtime.benchmarks.timing import environment, latency_ms, measure_interleaved
from ssdd_runtime.benchmarks.workloads import SD_VAE_CONFIG, Workload, build_workload
from ssdd_runtime.cli import main

TINY_VAE = {"block_out_channels": [32, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "latent_channels": 4, "layers_per_block": 1,
            "norm_num_groups": 32}
CPU = torch.device("cpu")


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threading only adds noise on a shared machine
    yield
    torch.set_num_threads(n)


# -- timing method ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 10])
def test_latency_stats_are_numpy_percentiles_in_ms(n):
    xs = [float(v) for v in np.random.default_rng(n).permutation(np.arange(1, n + 1) ** 2)]
    lat = latency_ms(xs)
    ms = np.asarray(xs) * 1000
    assert lat["p50"] == pytest.approx(np.median(ms)) and lat["p99"] == pytest.approx(np.percentile(ms, 99))
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    with pytest.raises(ValueError, match="no timed calls"):
        latency_ms([])


def test_environment_record():
    env = environment("cpu")
    assert set(schema.ENV) <= set(env)
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["cpu_count"] >= 1
    assert schema.problems({"schema": schema.SCHEMA, "env": {**env, "loadavg_end": None}, "method": "m",
                            "notes": [], "skipped": [], "results": [], "ratios": []}) == []


def test_warmup_is_excluded_and_calls_interleave():
    """A fake workload whose first call costs 0.5 s and later calls 0.01 s: the statistics see only the later
    calls; the warm-up cost is reported separately; rounds alternate A B / B A."""
    log = []

    def fake(name, first_s):
        def call(i):
            log.append((name, i))
            time.sleep(first_s if sum(1 for n, _ in log if n == name) == 1 else 0.01)
        return call

    m = measure_interleaved({"A": fake("A", 0.5), "B": fake("B", 0.3)}, device=CPU, warmup=1, repeats=4)
    assert m["A"].warmup_s[0] >= 0.5 and m["B"].warmup_s[0] >= 0.3
    assert len(m["A"].times_s) == 4 and max(m["A"].times_s + m["B"].times_s) < 0.3
    assert m["A"].latency_ms()["p50"] < 300
    assert [n for n, _ in log] == ["A", "B", "A", "B", "B", "A", "A", "B", "B", "A"]
    assert [i for n, i in log if n == "A"] == [0, 1, 2, 3, 4]  # call index drives input rotation


def test_measure_rejects_zero_repeats():
    with pytest.raises(ValueError, match="repeats"):
        measure_interleaved({"A": lambda i: None}, device=CPU, warmup=0, repeats=0)


# -- workloads and backends --------------------------------------------------------------------------------------


def test_ssdd_decode_driver_equals_model_sample():
    """The benchmark's Euler driver computes exactly SSDDModule.sample (steps 2, fp32)."""
    from ssdd_runtime.model import SSDDModule

    torch.manual_seed(0)
    model = SSDDModule("f8c4", "XS").eval()
    w = Workload("ssdd-XS", optimize.use_kernels(model.decoder, False), 2, 8, 4, "random", 0)
    ins, noise = w.example_inputs(1, 64, 64, torch.float32, CPU, seed=3)
    with torch.inference_mode():
        ours = w.decode(w.net, ins, noise)
        ref = model.sample(ins[2], noise, steps=2)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_rotated_inputs_differ():
    w = build_workload("kl-vae", kl_vae_config=TINY_VAE)
    a, _ = w.example_inputs(1, 32, 32, torch.float32, CPU, seed=0)
    b, _ = w.example_inputs(1, 32, 32, torch.float32, CPU, seed=1)
    assert not torch.equal(a[0], b[0])


def test_sd_vae_config_builds_the_sd_decoder():
    """The baseline is the SD-VAE f8c4 decoder (diffusers AutoencoderKL); parameter count from its architecture:
    post_quant_conv + decoder = 49,490,199."""
    w = build_workload("kl-vae")
    assert SD_VAE_CONFIG["block_out_channels"] == (128, 256, 512, 512) and w.stride == 8 and w.z_dim == 4
    assert w.params == 49_490_199


def test_channels_last_transform_keeps_outputs(one_thread):
    w = build_workload("kl-vae", kl_vae_config=TINY_VAE)
    ins, _ = w.example_inputs(1, 32, 48, torch.float32, CPU)
    with torch.inference_mode():
        ref = w.net(*ins)
        out = optimize.channels_last(w.net)(ins[0].contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_unavailable_backends_give_reasons():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the CUDA-only backends are available here")
    for name in ("triton", "cudagraphs", "tensorrt"):
        assert "CUDA" in bk.unavailable_reason(name, CPU)
    assert bk.unavailable_reason("eager", CPU) is None
    with pytest.raises(ValueError, match="CUDA"):
        optimize.cuda_graph(lambda x: x, [torch.zeros(1)])


def test_onnxruntime_backend_matches_eager(tmp_path, one_thread):
    """The exported static-shape network under ONNX Runtime decodes what eager decodes (tiny KL-VAE, non-square)."""
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    pytest.importorskip("onnxscript", reason="onnxscript not installed")
    w = build_workload("kl-vae", kl_vae_config=TINY_VAE)
    ins, _ = w.example_inputs(2, 32, 48, torch.float32, CPU)
    run, info = bk.prepare("onnxruntime", w.net, ins, is_ssdd=False, workdir=str(tmp_path))
    assert info["prepare_s"] > 0 and (tmp_path / "net.onnx").is_file()
    with torch.inference_mode():
        torch.testing.assert_close(run(*ins), w.net(*ins), rtol=1e-4, atol=1e-4)


def test_onnxruntime_backend_ssdd_leaves_no_temp_dir(tmp_path, monkeypatch, one_thread):
    """Without a workdir the ONNX file lives in a temporary folder removed once the session is loaded; the SSDD
    network is exported in its deployed attention form and still decodes what the eager decoder decodes."""
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    pytest.importorskip("onnxscript", reason="onnxscript not installed")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    w = build_workload("ssdd-XS")
    ins, noise = w.example_inputs(1, 64, 96, torch.float32, CPU)
    run, _ = bk.prepare("onnxruntime", w.net, ins, is_ssdd=True)
    assert list(tmp_path.iterdir()) == []
    with torch.inference_mode():
        torch.testing.assert_close(w.decode(run, ins, noise), w.decode(w.net, ins, noise), rtol=1e-4, atol=1e-4)


def test_missing_diffusers_skips_the_kl_vae(monkeypatch, one_thread):
    from ssdd_runtime.benchmarks.run import Config, run_benchmark

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import fails as if not installed
    rep = run_benchmark(Config(models=["ssdd-XS", "kl-vae"], backends=["eager"], batches=[1],
                               resolutions=[(64, 64)], warmup=0, repeats=1, rotate=1), echo=lambda s: None)
    assert [r["model"] for r in rep["results"]] == ["ssdd-XS"] and rep["ratios"] == []
    assert rep["skipped"] == [{"model": "kl-vae", "reason": rep["skipped"][0]["reason"]}]
    assert rep["skipped"][0]["reason"].startswith("skipped: diffusers not installed")
    schema.check(rep)


# -- CLI ----------------------------------------------------------------------------------------------------------


def _one_line_error(capsys, argv, needle):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert needle in err and len(err.splitlines()) == 1, err


def test_cli_unknown_model(capsys):
    _one_line_error(capsys, ["bench", "--models", "ssdd-Q,kl-vae"], "unknown model 'ssdd-Q'")


def test_cli_unknown_backend(capsys):
    _one_line_error(capsys, ["bench", "--backends", "eager,tensorflow"], "unknown backend 'tensorflow'")


def test_cli_bad_resolution(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--res", "256xabc"])
    assert e.value.code != 0


REQUIRED_ENV = ["device_name", "device", "torch", "cuda", "cuda_driver", "triton", "onnxruntime", "tensorrt",
                "git_commit", "torch_threads", "cpu_count", "loadavg_start", "loadavg_end", "date_utc"]
REQUIRED_RESULT = {"model": str, "backend": str, "dtype": str, "batch": int, "height": int, "width": int,
                   "steps": int, "images_per_s": float, "latency_ms": dict}


def test_cli_json_csv_plot_schema(tmp_path, capsys, one_thread):
    vae_cfg = tmp_path / "vae.json"
    vae_cfg.write_text(json.dumps({"_class_name": "AutoencoderKL", **TINY_VAE}))
    out_json, out_csv, out_png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    backends = "eager" if torch.cuda.is_available() else "eager,cudagraphs"
    rc = main(["bench", "--models", "ssdd-XS,kl-vae", "--kl-vae-config", str(vae_cfg), "--res", "64x96",
               "--batch", "1", "--backends", backends, "--device", "cpu", "--warmup", "1", "--repeats", "3",
               "--rotate", "2", "--json", str(out_json), "--csv", str(out_csv), "--plot", str(out_png),
               "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0
    rep = json.loads(out_json.read_text())
    assert schema.problems(rep) == []
    assert set(rep) >= {"env", "results", "ratios", "method", "notes", "skipped"}
    for k in REQUIRED_ENV:
        assert k in rep["env"], k
    assert rep["env"]["device"] == "cpu" and rep["env"]["torch_threads"] == 1
    assert len(rep["results"]) == 2
    for r in rep["results"]:
        for k, typ in REQUIRED_RESULT.items():
            assert isinstance(r[k], typ), (k, r[k])
        assert (r["height"], r["width"], r["batch"], r["backend"], r["dtype"]) == (64, 96, 1, "eager", "fp32")
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert r["images_per_s"] == pytest.approx(r["batch"] / (lat["p50"] / 1000))
        assert r["peak_memory_mb"] is None or r["peak_memory_mb"] > 0
        assert len(r["warmup_s"]) == 1 and r["repeats"] == 3 and r["weights"] == "random"
    assert {r["model"] for r in rep["results"]} == {"ssdd-XS", "kl-vae"}
    (q,) = rep["ratios"]
    by = {r["model"]: r["images_per_s"] for r in rep["results"]}
    assert q["ratio_images_per_s"] == pytest.approx(by["ssdd-XS"] / by["kl-vae"])
    if not torch.cuda.is_available():
        assert rep["skipped"][0]["backend"] == "cudagraphs" and "CUDA" in rep["skipped"][0]["reason"]
        assert "skip backend cudagraphs: cudagraphs needs a CUDA device" in printed
    assert "throughput does not depend on weight values" in printed and "ratio ssdd-XS@1 / kl-vae" in printed
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 2 and {row["model"] for row in rows} == {"ssdd-XS", "kl-vae"}
    assert float(rows[0]["p50_ms"]) == pytest.approx(rep["results"][0]["latency_ms"]["p50"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the README table generator reads the same file
    readme = f"# x\n\n## Benchmarks\n\n{rp.BEGIN}\nold\n{rp.END}\n\n## Next\n"
    new = rp.update_readme(readme, [("r.json", rep)])
    assert "old" not in new and new.endswith("\n\n## Next\n") and new.count("| ssdd-XS |") == 1
    assert f"{q['ratio_images_per_s']:.2f}x" in new and rep["env"]["date_utc"][:10] in new


def test_report_check_detects_stale_readme(tmp_path):
    (tmp_path / "results").mkdir()
    readme = tmp_path / "README.md"
    readme.write_text(f"## Benchmarks\n{rp.BEGIN}\nstale\n{rp.END}\n")
    assert rp.main(["--readme", str(readme), "--results", str(tmp_path / "results"), "--check"]) == 1
    assert rp.main(["--readme", str(readme), "--results", str(tmp_path / "results")]) == 0
    assert rp.main(["--readme", str(readme), "--results", str(tmp_path / "results"), "--check"]) == 0


def test_profile_breakdown_groups_all_time():
    from ssdd_runtime.benchmarks.op_profile import breakdown

    b = breakdown("ssdd-XS", 32)
    assert set(b) == {"convolution", "matmul + attention", "other", "total"}
    assert b["convolution"] > 0 and b["matmul + attention"] > 0
    assert abs(sum(v for k, v in b.items() if k != "total") - b["total"]) < 1e-9


# -- committed results ------------------------------------------------------------------------------------------

RESULTS = sorted(glob.glob(os.path.join(rp.RESULTS_DIR, "*.json")))


def test_results_folder_is_not_empty():
    assert len(RESULTS) >= 5, RESULTS


@pytest.mark.parametrize("path", RESULTS, ids=os.path.basename)
def test_committed_result_follows_the_schema(path):
    with open(path, encoding="utf-8") as f:
        assert schema.problems(json.load(f)) == [], path


def test_schema_names_what_is_wrong():
    with open(RESULTS[0], encoding="utf-8") as f:
        rep = json.load(f)
    del rep["results"][0]["latency_ms"]["p90"]
    rep["results"][-1]["images_per_s"] *= 2
    rep["env"].pop("torch")
    bad = schema.problems(rep)
    assert "env.torch missing" in bad and "results[0].latency_ms.p90 missing or not a number" in bad
    assert f"results[{len(rep['results']) - 1}].images_per_s != batch / p50" in bad
    with pytest.raises(ValueError, match="does not follow ssdd-bench/1"):
        schema.check(rep)
    assert schema.problems({"schema": "old"})[0] == "report.env missing"


def test_results_table_is_generated_from_every_committed_result(capsys):
    """Every committed result follows the schema and is cited in the table that docs/evidence/benchmarks.md
    renders at build time (test_docs checks the built page)."""
    assert rp.main(["--check"]) == 0
    assert rp.main([]) == 0
    text = capsys.readouterr().out
    assert RESULTS
    for path in RESULTS:
        assert f"`{os.path.basename(path)}`" in text, path


def _plot_report(batches):
    rows, ratios = [], []
    for backend, ssdd, vae in (("eager", 0.3, 0.4), ("onnxruntime", 0.5, 0.25)):
        for b in batches:
            for label, model, ips in (("ssdd-M@1", "ssdd-M", ssdd * b), ("kl-vae", "kl-vae", vae * b)):
                rows.append({"label": label, "model": model, "backend": backend, "dtype": "fp32", "batch": b,
                             "height": 64, "width": 64, "images_per_s": ips, "memory_format": "contiguous"})
            ratios.append({"ssdd": "ssdd-M@1", "baseline": "kl-vae", "backend": backend, "dtype": "fp32", "batch": b,
                           "height": 64, "width": 64, "memory_format": "contiguous", "ratio_images_per_s": ssdd / vae})
    return {"env": {"device_name": "test CPU", "date_utc": "2026-12-08T00:00:00"}, "results": rows, "ratios": ratios}


@pytest.mark.parametrize("batches", [[1], [1, 4]])
def test_plot_bars_with_ratios_for_one_batch_size_lines_for_several(batches, tmp_path, monkeypatch):
    """One batch size: bars (SSDD and KL-VAE per backend) with the report's ratio written on each SSDD bar.
    Several: images/s vs batch lines, no bars."""
    import matplotlib.figure

    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figs.append(self))
    rp.plot(_plot_report(batches), str(tmp_path / "p.png"))
    (ax,) = figs[0].axes
    texts = sorted(t.get_text() for t in ax.texts)
    if len(batches) == 1:
        assert len(ax.patches) == 4 and not ax.lines
        assert texts == ["0.75x", "2.00x"]  # 0.3/0.4 on eager, 0.5/0.25 on onnxruntime
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert ticks == ["onnxruntime\nfp32", "eager\nfp32"]  # fastest backend first
    else:
        assert not ax.patches and len(ax.lines) == 4 and texts == []


def test_report_rejects_an_off_schema_file(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "old.json").write_text(json.dumps({"benchmark": "x", "seconds": {}}))
    readme = tmp_path / "README.md"
    readme.write_text(f"## Benchmarks\n{rp.BEGIN}\n{rp.END}\n")
    assert rp.main(["--readme", str(readme), "--results", str(tmp_path / "results"), "--check"]) == 1
    assert "old.json does not follow ssdd-bench/1" in capsys.readouterr().err


def test_write_json_is_atomic_and_checked(tmp_path):
    with pytest.raises(ValueError, match="does not follow"):
        schema.write_json({"env": {}}, tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


# -- OpenVINO backends, FLOP rate, --quick -----------------------------------------------------------------------


@pytest.mark.openvino
@pytest.mark.parametrize("model,height,width", [("kl-vae", 64, 64), ("ssdd-S", 64, 64), ("encoder-f8c4", 64, 96)])
def test_openvino_backends_match_eager(model, height, width, one_thread):
    """The converted network (dynamic B/H/W) decodes, or encodes, what eager PyTorch computes. Bounds: f32
    max abs <= 1e-4 x max|ref| (fp32 summation order only; measured ~1e-6 relative); bf16 relative L2 <= 3e-2
    (8-bit mantissa weights and activations, fp32 accumulation; measured ~0.5-1%)."""
    pytest.importorskip("openvino", reason="openvino not installed")
    from conftest import assert_close

    w = build_workload(model, kl_vae_config=TINY_VAE)
    ins, noise = w.example_inputs(2, height, width, torch.float32, CPU, seed=1)
    with torch.inference_mode():
        ref = w.decode(w.net, ins, noise)
        scale = float(ref.abs().max())
        for backend, atol, rtol_l2 in (("openvino", 1e-4 * scale, None), ("openvino-bf16", scale, 3e-2)):
            if bk.unavailable_reason(backend, CPU) is not None:
                continue
            run, info = bk.prepare(backend, w.net, ins, is_ssdd=model != "kl-vae")
            assert info["backend_options"]["precision"] == bk.OPENVINO[backend] and info["prepare_s"] > 0
            assert ("export_s" in info) == (backend == "openvino")  # bf16 compiles the f32 run's conversion
            assert_close(w.decode(run, ins, noise), ref, atol=atol, rtol_l2=rtol_l2, name=f"{model} {backend}")


@pytest.mark.openvino
def test_openvino_needs_fp32_network_and_the_cpu():
    pytest.importorskip("openvino", reason="openvino not installed")
    assert "--dtype fp32" in bk.unavailable_reason("openvino", CPU, torch.bfloat16)
    assert "CPU" in bk.unavailable_reason("openvino-bf16", torch.device("cuda"))


def test_gflop_counts_the_known_networks():
    """SSDD-M 1-step at 256x256: the issue's 539 GFLOP (dense-mask attention counted as computed); the SD-VAE
    decoder: 622 GFLOP (3x3 convolutions dominate: 2 x MACs). Counted on the meta device, no compute."""
    from ssdd_runtime.benchmarks.workloads import gflop

    assert gflop(build_workload("ssdd-M"), 1, 256, 256) == pytest.approx(539, rel=0.03)
    assert gflop(build_workload("kl-vae"), 1, 256, 256) == pytest.approx(622, rel=0.03)
    assert gflop(build_workload("kl-vae"), 4, 256, 256) == pytest.approx(4 * 622, rel=0.03)


def test_cpu_peak_formula():
    from ssdd_runtime.benchmarks.run import cpu_peak

    info = {"cpu_max_mhz": None, "cpuinfo_mhz": 2500.0, "physical_cores": 2, "flags": ["avx512f", "avx512_bf16"]}
    peak = cpu_peak(2, info)
    assert peak["fp32_gflops"] == pytest.approx(2 * 2 * 16 * 2 * 2.5) and peak["bf16_gflops"] == 2 * peak["fp32_gflops"]
    assert cpu_peak(1, {**info, "cpu_max_mhz": 3500.0})["fp32_gflops"] == pytest.approx(2 * 16 * 2 * 3.5)
    assert cpu_peak(2, {**info, "flags": ["avx512f"]})["bf16_gflops"] == peak["fp32_gflops"]
    avx2 = cpu_peak(2, {**info, "flags": ["avx2", "fma"]})  # 256-bit: 8 fp32 lanes, no bf16 dot products
    assert avx2["fp32_gflops"] == pytest.approx(2 * 2 * 8 * 2 * 2.5) and avx2["bf16_gflops"] == avx2["fp32_gflops"]
    assert cpu_peak(2, {**info, "flags": ["sse4_2"]})["fp32_gflops"] is None
    assert "cores x 2 FMA" in peak["formula"]


def _row(model, backend, dtype, ips):
    return {"model": model, "label": model + ("@1" if model.startswith("ssdd") else ""), "backend": backend,
            "dtype": dtype, "batch": 1, "height": 256, "width": 256, "images_per_s": ips, "task": "decode"}


def test_quick_summary_gives_both_ratios():
    from ssdd_runtime.benchmarks.run import quick_summary

    rows = [_row("ssdd-M", "openvino-bf16", "bf16", 1.2), _row("kl-vae", "openvino-bf16", "bf16", 1.0),
            _row("ssdd-M", "eager", "fp32", 0.4), _row("kl-vae", "eager", "fp32", 0.375)]
    lines = quick_summary({"results": rows})
    assert lines == ["ssdd-M@1 on openvino-bf16 bf16, batch 1 256x256: 1.20x the images/s of the KL-VAE on "
                     "openvino-bf16 bf16 (same backend)",
                     "ssdd-M@1 on openvino-bf16 bf16, batch 1 256x256: 3.20x the images/s of the KL-VAE in eager "
                     "PyTorch fp32"]
    only_eager = quick_summary({"results": rows[2:]})
    assert len(only_eager) == 2 and "1.07x" in only_eager[0] and "1.07x" in only_eager[1]


def test_load_warning(monkeypatch):
    from ssdd_runtime.benchmarks.run import load_warning

    monkeypatch.setattr(os, "getloadavg", lambda: (9.5, 9.0, 8.0))
    assert "load average 9.5 is above the 2 cores" in load_warning(2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    assert load_warning(2) is None


@pytest.mark.openvino
def test_cli_quick_prints_both_ratios_the_warning_and_the_plot(tmp_path, capsys, monkeypatch, one_thread):
    """`ssdd bench --quick` on tiny models: the fastest CPU backend plus eager, both ratios, the load warning
    (load average forced above the core count) and the plot path."""
    from ssdd_runtime.benchmarks.run import quick_backends
    from ssdd_runtime.cli import QUICK_PLOT

    vae_cfg = tmp_path / "vae.json"
    vae_cfg.write_text(json.dumps(TINY_VAE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    rc = main(["bench", "--quick", "--models", "ssdd-XS,kl-vae", "--kl-vae-config", str(vae_cfg), "--res", "64",
               "--warmup", "0", "--repeats", "1", "--rotate", "1", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    best = quick_backends()[0]
    assert f"x the images/s of the KL-VAE on {best}" in out
    assert "x the images/s of the KL-VAE in eager PyTorch fp32" in out
    assert "warning: load average 99.0 is above" in out
    assert f"wrote {QUICK_PLOT}" in out and (tmp_path / QUICK_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
