"""Served decode (`ssdd serve`'s Triton server, loopback) against a direct in-process decode loop, on one machine.

    python -m ssdd_runtime.benchmarks.serve_bench --latent 8 --requests 48 --clients 4 --rounds 3 \
        [--threads 1] [-o benchmarks/results/serve_cpu_<date>.json]

Same work in both arms: --requests single-image decodes (SSDD-S, deterministic test weights: throughput does not
depend on weight values; --latent h = w, 1 Euler step, fp32, each image with its own seed), torch limited to
--threads in the decode (the server's model instance: --threads; the direct loop: torch.set_num_threads).
Direct: one loop in this process, model loaded and one warm-up decode before the timer. Served: a tritonserver
(bundled by nvidia-pytriton, Python backend, one instance, dynamic batching, max batch --clients) started once;
--clients threads in this process send binary KServe v2 HTTP requests (ssdd_runtime.serve.Client, one per
thread) until --requests are answered; one warm-up request first. The clients, the server's HTTP threads and
the model share the same cores as the direct loop had, so the served figure includes all serving overhead.
Rounds alternate direct / served so that a change of machine load hits both arms alike.

Formulas, per round: images/s = requests / wall time of the arm; latency per request (direct: per decode call;
served: request sent -> answer decoded by the client) as p50/p99 (numpy percentiles). The JSON records every
round, min and median over rounds, served/direct ratios per round, and the load average around each arm.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from ssdd_runtime.benchmarks import schema, timing

RESULTS = Path(__file__).parent / "results"


def direct_arm(model, latents, seeds) -> dict:
    times = []
    t0 = time.perf_counter()
    for z, s in zip(latents, seeds):
        t = time.perf_counter()
        model.decode(z, generator=torch.Generator().manual_seed(s))
        times.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return {"images_per_s": len(latents) / wall, "wall_s": wall, "latency_ms": timing.latency_ms(times)}


def served_arm(url: str, latents, seeds, clients: int) -> dict:
    from ssdd_runtime.serve import Client

    times, lock, nxt = [], threading.Lock(), iter(range(len(latents)))

    def worker():
        with Client(url) as c:
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                t = time.perf_counter()
                c.decode(latents[i], seeds=[seeds[i]])
                with lock:
                    times.append(time.perf_counter() - t)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"images_per_s": len(latents) / wall, "wall_s": wall, "latency_ms": timing.latency_ms(times)}


def run(*, latent: int, requests: int, clients: int, rounds: int, threads: int) -> dict:
    from safetensors.torch import save_file

    from ssdd_runtime import SSDD
    from ssdd_runtime.serve import Client, TritonServer, write_serve_repo
    from ssdd_runtime.testing import test_state_dict

    torch.set_num_threads(threads)
    env = timing.environment("cpu")
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(1, 4, latent, latent, generator=g) for _ in range(requests)]
    seeds = list(range(requests))
    rows = []
    with tempfile.TemporaryDirectory(prefix="ssdd_serve_bench_") as tmp:
        ckpt = Path(tmp) / "S.safetensors"
        save_file(test_state_dict(None, "S", 0), str(ckpt), metadata={"format": "pt"})
        model = SSDD.from_pretrained(ckpt)
        model.decode(latents[0], generator=torch.Generator().manual_seed(0))  # warm-up
        repo = Path(tmp) / "repo"
        write_serve_repo(repo, checkpoint=ckpt, threads=threads, max_batch=clients, max_queue_delay_us=1000)
        t0 = time.perf_counter()
        with TritonServer(repo, log_path=Path(tmp) / "tritonserver.log") as server:
            start_s = time.perf_counter() - t0
            with Client(server.http_url) as c:  # warm-up
                c.decode(latents[0], seeds=[0])
            for r in range(rounds):
                for arm in ("direct", "served"):
                    load0 = timing.env_cpu_load()
                    res = (direct_arm(model, latents, seeds) if arm == "direct"
                           else served_arm(server.http_url, latents, seeds, clients))
                    rows.append({"round": r, "arm": arm, **res, "loadavg_start": load0,
                                 "loadavg_end": timing.env_cpu_load()})
                    print(f"round {r} {arm:6s}: {res['images_per_s']:.2f} img/s, p50 {res['latency_ms']['p50']:.0f} "
                          f"ms, p99 {res['latency_ms']['p99']:.0f} ms, load {rows[-1]['loadavg_end']}", flush=True)
    env["loadavg_end"] = timing.env_cpu_load()
    summary = {}
    for arm in ("direct", "served"):
        ips = [x["images_per_s"] for x in rows if x["arm"] == arm]
        p50 = [x["latency_ms"]["p50"] for x in rows if x["arm"] == arm]
        p99 = [x["latency_ms"]["p99"] for x in rows if x["arm"] == arm]
        summary[arm] = {"images_per_s_min": min(ips), "images_per_s_median": statistics.median(ips),
                        "p50_ms_median": statistics.median(p50), "p99_ms_median": statistics.median(p99)}
    ratios = [s["images_per_s"] / d["images_per_s"] for d, s in zip(rows[0::2], rows[1::2])]
    summary["served_over_direct_images_per_s"] = {"per_round": ratios, "min": min(ratios),
                                                  "median": statistics.median(ratios)}
    data = {"model": "SSDD-S f8c4 (test weights)", "dtype": "fp32", "steps": 1, "batch_per_request": 1,
            "height": latent * 8, "width": latent * 8, "requests_per_round": requests, "clients": clients,
            "threads": threads, "server_start_s": start_s, "rounds": rows, "summary": summary}
    notes = ["machine shared with other agents' jobs while measured: see the load averages per arm",
             "served and direct arms ran on the same cores, alternating; the served arm includes the clients, "
             "HTTP (binary tensors, loopback) and Triton's queueing"]
    return schema.other_kind("serve", env, __doc__.split("\n\n", 2)[1].strip() + " " + __doc__.split("\n\n")[2],
                             data, notes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latent", type=int, default=8, help="latent side (image side = 8x; default 8 -> 64 px)")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("-o", "--output", default=None)
    args = p.parse_args(argv)
    report = run(latent=args.latent, requests=args.requests, clients=args.clients, rounds=args.rounds,
                 threads=args.threads)
    out = args.output or str(RESULTS / f"serve_cpu_{report['env']['date_utc'][:10]}.json")
    schema.write_json(report, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
