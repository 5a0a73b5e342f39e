"""Reward service load test: throughput and latency of `lpo reward serve` with dynamic batching, and without.

    python bench/bench_serve.py [--clients 8] [--requests 320] [--items 2] [--max-batch-size 8] [--batch-timeout-ms 5]

Writes tiny models (pickscore for /score/images, a tiny SD1.5 latent reward model for /score/latents) to a temporary
directory and starts the server on the CPU twice: with `--max-batch-size N` and with batching off (max batch size
1). In each, `--clients` concurrent clients (threads, one `RewardClient` each) send `--requests` requests per route,
each of `--items` images or latents, and every answer is checked against the in-process scores. Prints throughput,
p50/p99 latency, errors and the batch sizes the server ran (GET /stats) per run, and the batching gain (requests per
second with batching over without), all measured in this run. Tiny models make this a test of the serving overhead
and of how batching amortises it; with real models on a GPU the gain comes from fuller model calls as well.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lpo.reward.serve.client import RewardClient  # noqa: E402 - after the offline switch

REPO = Path(__file__).resolve().parents[1]


def tiny_models(root: Path) -> tuple[Path, Path]:
    from lpo.reward.lrm.model import LatentRewardModel
    from lpo.reward.toy.random_models import build_tiny_models

    build_tiny_models(root / "models", ["pickscore", "sd15"], seed=0)
    torch.manual_seed(0)
    LatentRewardModel.from_base(str(root / "models" / "sd15"), text_projection_init=None).save_pretrained(root / "lrm")
    return root / "models", root / "lrm"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(models: Path, lrm: Path, max_batch_size: int, batch_timeout_ms: float, log: Path,
                 ) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lpo", "reward", "serve", "--lrm", str(lrm), "--metrics", "pickscore",
             "--models-dir", str(models), "--device", "cpu", "--port", str(port), "--max-batch-size",
             str(max_batch_size), "--batch-timeout-ms", str(batch_timeout_ms)],
            cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        RewardClient(url).wait_until_ready(timeout=300)
    except Exception:
        stop_server(proc)
        raise SystemExit(f"the server did not start:\n{log.read_text()[-3000:]}") from None
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def workloads(items: int, seed: int = 0) -> dict:
    """Per route: a call that sends one request of `items` items, and what the in-process model returns for it."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(items)]
    latents = torch.from_numpy(rng.standard_normal((items, 4, 8, 8)).astype(np.float32))
    timesteps = torch.from_numpy(rng.integers(0, 1000, items))
    prompts = [f"a red circle number {i}" for i in range(items)]
    return {
        "/score/images": lambda client: client.score_images("pickscore", images, prompts),
        "/score/latents": lambda client: client.score_latents(latents, timesteps, prompts).numpy(),
    }


def load(url: str, route: str, call, expected: np.ndarray, clients: int, requests: int) -> dict:
    """`requests` calls from `clients` threads at once; latencies, errors and the server's batch sizes."""
    pool_clients = [RewardClient(url, retries=0, max_items_per_request=64, max_request_bytes=2**26)
                    for _ in range(clients)]
    for client in pool_clients:  # warm up connections and caches
        call(client)
    before = pool_clients[0].stats().get(route, {"batch_sizes": {}})

    def one(i: int) -> tuple[float, bool]:
        start = time.perf_counter()
        try:
            ok = np.allclose(call(pool_clients[i % clients]), expected, rtol=1e-4, atol=1e-5)
        except Exception:
            ok = False
        return time.perf_counter() - start, ok

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    elapsed = time.perf_counter() - start
    after = pool_clients[0].stats()[route]["batch_sizes"]
    sizes = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after.items()}
    sizes = {k: v for k, v in sorted(sizes.items()) if v}
    latencies = np.array([latency for latency, _ in results]) * 1000
    return {"rps": requests / elapsed, "p50": float(np.percentile(latencies, 50)),
            "p99": float(np.percentile(latencies, 99)), "errors": sum(not ok for _, ok in results),
            "mean_batch": sum(k * v for k, v in sizes.items()) / max(1, sum(sizes.values())), "sizes": sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=320, help="requests per route and run")
    parser.add_argument("--items", type=int, default=2, help="images or latents per request")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        models, lrm = tiny_models(Path(tmp))
        from lpo.curate.scorers import load_scorer
        from lpo.reward.lrm.model import LatentRewardModel

        calls = workloads(args.items)
        local = {"/score/images": load_scorer("pickscore", str(models / "pickscore")),
                 "/score/latents": LatentRewardModel.from_pretrained(lrm)}

        class InProcess:  # the client's two methods, answered by the local models
            def score_images(self, metric, images, prompts):
                return local["/score/images"].score(images, prompts)

            def score_latents(self, latents, timesteps, prompts):
                with torch.no_grad():
                    return local["/score/latents"].score(latents, timesteps, prompts)

        expected = {route: call(InProcess()) for route, call in calls.items()}
        runs = {}
        for batch in (args.max_batch_size, 1):
            proc, url = start_server(models, lrm, batch, args.batch_timeout_ms, Path(tmp) / f"server-{batch}.log")
            try:
                for route, call in calls.items():
                    runs[route, batch] = load(url, route, call, expected[route], args.clients, args.requests)
            finally:
                stop_server(proc)

    print(f"lpo reward serve on CPU ({os.cpu_count()} cores), tiny models: {args.clients} concurrent clients, "
          f"{args.requests} requests per route and run, {args.items} items per request, "
          f"batch timeout {args.batch_timeout_ms:g} ms")
    for route in calls:
        print(f"  {route}")
        for batch in (args.max_batch_size, 1):
            r = runs[route, batch]
            sizes = " ".join(f"{k}x{v}" for k, v in r["sizes"].items())
            print(f"    max batch {batch:2d}: {r['rps']:7.1f} req/s   p50 {r['p50']:7.1f} ms   "
                  f"p99 {r['p99']:7.1f} ms   errors {r['errors']}   mean batch {r['mean_batch']:.2f} ({sizes})")
        gain = runs[route, args.max_batch_size]["rps"] / runs[route, 1]["rps"]
        print(f"    batching gain (req/s, max batch {args.max_batch_size} over 1): {gain:.2f}x")


if __name__ == "__main__":
    main()
