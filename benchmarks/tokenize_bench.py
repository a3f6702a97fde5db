"""CPU throughput of `ssdd tokenize` (Ray Data actor pool) against a plain in-process loop over the same images.

    python -m ssdd_runtime.benchmarks.tokenize_bench --images 200 --rounds 3 [--cores N] [-o results/X.json]

Both arms do the same work per image: read the file, ADM center crop + resize to --resolution (io.adm_center_crop),
encode with the SSDD f8c4 encoder (deterministic test weights: throughput does not depend on weight values),
`--batch-size` images per forward pass, on the same `--cores` (the plain loop: torch.set_num_threads(cores); Ray:
a local ray.init(num_cpus=cores), one actor with cores CPUs and as many torch threads, `tokenize` defaults).
Rounds alternate Ray / plain so that a change of machine load hits both arms alike.

Formulas, per round: plain images/s = N / loop time (model loaded and one warm-up batch before the timer);
Ray end-to-end images/s = N / wall time of `tokenize` (Ray already started: actor start-up, model load in the
actor, its warm-up batch, planning and shard writes included, so it is the conservative figure); Ray's fixed
cost per run = Ray wall - N / (plain images/s of the same round). `ray.init` is timed once and reported
separately (`ray_init_s`). The JSON records min and median over rounds and the load average around each arm.
(`first_batch_s`, when the driver saw the first encoded batch, is kept per row but gives no steady-state rate:
Ray Data keeps two batches in flight per actor and hands results over in blocks, so the first one arrives late.)
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
SCHEMA = "ssdd-bench/1"


def make_images(folder: Path, n: int, resolution: int, seed: int = 0) -> list[Path]:
    """n smooth random RGB PNGs a bit larger than resolution^2 (so the ADM crop resizes and crops)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (resolution // 16, resolution // 16 + 2, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((resolution * 5 // 4, resolution * 9 // 8), Image.BICUBIC)
        paths.append(folder / f"{i:05d}.png")
        img.save(paths[-1])
    return paths


def plain_loop(checkpoint: Path, paths: list[Path], *, resolution: int, batch_size: int) -> dict:
    from PIL import Image

    from ssdd_runtime.api import SSDD
    from ssdd_runtime.io import adm_center_crop, pil_to_tensor

    t0 = time.perf_counter()
    model = SSDD.from_pretrained(checkpoint, device="cpu")
    load_s = time.perf_counter() - t0

    def batch(ps):
        xs = []
        for p in ps:
            with Image.open(p) as im:
                xs.append(pil_to_tensor(adm_center_crop(im, resolution)))
        return model.encode(torch.cat(xs)).mode()

    batch(paths[:batch_size])  # warm-up, excluded
    t0 = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        batch(paths[i:i + batch_size])
    loop_s = time.perf_counter() - t0
    return {"arm": "plain", "load_s": round(load_s, 3), "loop_s": round(loop_s, 3),
            "images_per_s": len(paths) / loop_s}


def ray_tokenize(checkpoint: Path, folder: Path, n: int, *, resolution: int, batch_size: int) -> dict:
    from ssdd_runtime.integrations.ray import tokenize

    with tempfile.TemporaryDirectory(prefix="tok_bench_") as out:
        t0 = time.perf_counter()
        rep = tokenize(folder, out, checkpoint=checkpoint, resolution=resolution, batch_size=batch_size,
                       shard_size=n)
        wall = time.perf_counter() - t0
    if rep.done != n:
        raise RuntimeError(f"tokenize encoded {rep.done} of {n} images: {rep.errors}")
    return {"arm": "ray", "wall_s": round(wall, 3), "first_batch_s": round(rep.startup_s, 3),
            "images_per_s": n / wall}


def _summary(rows: list[dict], key: str) -> dict:
    vals = [r[key] for r in rows]
    return {"min": round(min(vals), 4), "median": round(statistics.median(vals), 4), "all": [round(v, 4) for v in vals]}


def run(*, images: int, rounds: int, cores: int, resolution: int, batch_size: int, note: str | None) -> dict:
    import ray
    from safetensors.torch import save_file

    from ssdd_runtime.benchmarks.run import environment
    from ssdd_runtime.benchmarks.timing import env_cpu_load
    from ssdd_runtime.testing import test_state_dict

    torch.set_num_threads(cores)
    env = environment(torch.device("cpu"))
    for pkg in ("ray", "pyarrow", "pillow"):
        env[pkg] = importlib.metadata.version(pkg)
    env["cores_used"] = cores
    with tempfile.TemporaryDirectory(prefix="tok_bench_") as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "f8c4_S_test.safetensors"
        save_file(test_state_dict("f8c4", "S", 0), str(ckpt), metadata={"format": "pt"})
        paths = make_images(tmp / "images", images, resolution)
        t0 = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        ray_init_s = time.perf_counter() - t0
        results = []
        try:
            for r in range(rounds):
                for arm in ("ray", "plain") if r % 2 == 0 else ("plain", "ray"):
                    load = env_cpu_load()
                    row = (ray_tokenize(ckpt, tmp / "images", images, resolution=resolution, batch_size=batch_size)
                           if arm == "ray" else plain_loop(ckpt, paths, resolution=resolution, batch_size=batch_size))
                    row.update(round=r, loadavg_before=load, loadavg_after=env_cpu_load())
                    print(json.dumps(row), flush=True)
                    results.append(row)
        finally:
            ray.shutdown()
    return {"schema": SCHEMA, "kind": "tokenize", "env": env,
            "config": {"images": images, "rounds": rounds, "resolution": resolution, "batch_size": batch_size,
                       "cores": cores, "encoder": "f8c4 (SSDD-S test weights)", "dtype": "fp32", "device": "cpu",
                       "note": note},
            "results": results, "summary": summarize(results, images, ray_init_s)}


def summarize(results: list[dict], images: int, ray_init_s: float) -> dict:
    ray_rows = sorted((r for r in results if r["arm"] == "ray"), key=lambda r: r["round"])
    plain_rows = sorted((r for r in results if r["arm"] == "plain"), key=lambda r: r["round"])
    summary = {"plain_images_per_s": _summary(plain_rows, "images_per_s"),
               "ray_end_to_end_images_per_s": _summary(ray_rows, "images_per_s"),
               "ray_init_s": round(ray_init_s, 3),
               "ray_fixed_cost_s_median": round(statistics.median(
                   r["wall_s"] - images / p["images_per_s"] for r, p in zip(ray_rows, plain_rows)), 3)}
    p50 = summary["plain_images_per_s"]["median"]
    summary["ratio_ray_end_to_end_to_plain_median"] = round(summary["ray_end_to_end_images_per_s"]["median"] / p50, 4)
    summary["target"] = "Ray within 15% of the plain loop at equal cores (ratio >= 0.85), ray.init separate"
    return summary


def as_report(raw: dict) -> dict:
    """The run inside the one result schema (kind "tokenize"; its rows under data.rows)."""
    from ssdd_runtime.benchmarks import schema

    env = {**dict.fromkeys(schema.ENV), **raw["env"]}  # fields the run did not record are null
    return schema.other_kind("tokenize", env, "ssdd tokenize (Ray Data, end to end incl. actor start-up and "
                             "model load) vs a plain in-process encode loop over the same images, alternating "
                             "rounds; images/s = images / wall time; min and median over rounds",
                             {"config": raw["config"], "rows": raw["results"], "summary": raw["summary"]},
                             notes=[raw["config"].get("note")] if raw["config"].get("note") else [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3, help="alternating Ray/plain rounds (>= 3 for min/median)")
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--note", default=None, help="free text stored in config.note (e.g. why fewer images)")
    p.add_argument("-o", "--output", default=None,
                   help="JSON path (default benchmarks/results/tokenize_cpu_<date>.json)")
    args = p.parse_args(argv)
    if args.images <= args.batch_size or args.rounds < 1 or args.cores < 1:
        p.error("need --images > --batch-size, --rounds >= 1, --cores >= 1")
    report = run(images=args.images, rounds=args.rounds, cores=args.cores, resolution=args.resolution,
                 batch_size=args.batch_size, note=args.note)
    from ssdd_runtime.benchmarks import schema

    out = Path(args.output or RESULTS / f"tokenize_cpu_{datetime.date.today().isoformat()}.json")
    schema.write_json(as_report(report), out)
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
