"""Benchmark of an exported model and its service, as measured on this machine (a benchmark, not a test).

  python -m brivl_ds.bench.serving --model MODEL_DIR --shards EVAL_SHARDS [--requests 96] [--clients 1 8 32]

Prints, side by side in one run:
  1. the towers' embedding throughput in this process (texts/s, images/s at --batch-size, after a warm-up);
  2. the service (`python -m brivl_ds.serve`, a real uvicorn process on 127.0.0.1) with micro-batching on and off:
     for texts and for images, at each number of concurrent clients, --requests one-item /v1/embeddings requests:
     throughput, p50 and p99 latency, and the mean items per model call (from the service's /metrics).
The inputs are the shards' captions and images. --out writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def machine() -> str:
    import torch

    from brivl_ds.bench import cpu_model

    cpu = cpu_model()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}"


def offline_throughput(model, texts: list[str], images: list[bytes], batch_size: int, seconds: float) -> dict:
    """Items per second of the towers alone (images include decoding and resizing, as the service does)."""
    def rate(run, items) -> float:
        run(items[:batch_size])  # warm-up
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for start in range(0, len(items), batch_size):
                run(items[start:start + batch_size])
                done += len(items[start:start + batch_size])
        return done / (time.perf_counter() - t0)

    return {"texts_per_s": rate(model.embed_texts, texts), "images_per_s": rate(model.embed_images, images)}


class Service:
    """`python -m brivl_ds.serve` in a child process, ready to take requests."""

    def __init__(self, model_dir: Path, port: int, batching: bool, extra: list[str]):
        args = [sys.executable, "-m", "brivl_ds.serve", "--model", str(model_dir), "--port", str(port), *extra]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(args + ([] if batching else ["--no-batching"]), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> "Service":
        import httpx

        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise TimeoutError("the service did not become ready in 300 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)

    def batch_stats(self, modality: str) -> tuple[float, float]:
        """(model calls, items) so far for `modality`, from /metrics."""
        import httpx

        values = {}
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            for name in ("brivl_batch_size_count", "brivl_batch_size_sum"):
                if line.startswith(f'{name}{{modality="{modality}"}}'):
                    values[name] = float(line.split()[-1])
        return values.get("brivl_batch_size_count", 0.0), values.get("brivl_batch_size_sum", 0.0)


async def load(url: str, bodies: list[dict], clients: int) -> tuple[list[float], float]:
    """Send `bodies` with `clients` concurrent clients; every answer must be a 200. Latencies and wall time."""
    import httpx

    latencies: list[float] = []
    queue = list(reversed(bodies))
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients)) as client:
        async def client_loop():
            while queue:
                body = queue.pop()
                t0 = time.perf_counter()
                response = await client.post(f"{url}/v1/embeddings", json=body)
                latencies.append(time.perf_counter() - t0)
                if response.status_code != 200:
                    raise RuntimeError(f"{response.status_code}: {response.text[:300]}")

        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(clients)))
        return latencies, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--shards", required=True, help="Parquet shards whose captions and images are the inputs")
    parser.add_argument("--requests", type=int, default=96, help="requests per (batching, modality, clients) cell")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batch-size", type=int, default=32, help="batch of the in-process throughput")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per in-process throughput measurement")
    parser.add_argument("--port", type=int, default=8799)
    parser.add_argument("--serve-args", default="", help="extra arguments for brivl_ds.serve, e.g. '--device cuda'")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import brivl_ds
    from brivl_ds.data.shards import read_table

    rows = read_table(args.shards, columns=["image", "text"]).to_pylist()
    texts, images = [r["text"] for r in rows], [r["image"] for r in rows]
    print(f"machine: {machine()}")
    model = brivl_ds.load_model(args.model)
    report = {"machine": machine(), "model": str(args.model.resolve()), "inputs": len(rows),
              "offline": offline_throughput(model, texts, images, args.batch_size, args.seconds), "service": []}
    off = report["offline"]
    print(f"in-process towers, batch {args.batch_size}: {off['texts_per_s']:.0f} texts/s, "
          f"{off['images_per_s']:.0f} images/s")
    del model

    bodies = {"text": [{"input": [texts[i % len(texts)]]} for i in range(args.requests)],
              "image": [{"input": [base64.b64encode(images[i % len(images)]).decode()], "modality": "image"}
                        for i in range(args.requests)]}
    print(f"\nservice, {args.requests} one-item requests per row")
    print(f"{'batching':>8} {'modality':>8} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'items/call':>10}")
    for batching in (True, False):
        with Service(args.model, args.port, batching, args.serve_args.split()) as service:
            for modality in ("text", "image"):
                for clients in args.clients:
                    calls0, items0 = service.batch_stats(modality)
                    latencies, wall = asyncio.run(load(service.url, bodies[modality], clients))
                    calls1, items1 = service.batch_stats(modality)
                    ms = np.array(latencies) * 1e3
                    cell = {"batching": batching, "modality": modality, "clients": clients,
                            "requests": len(latencies), "requests_per_s": len(latencies) / wall,
                            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                            "items_per_call": (items1 - items0) / max(calls1 - calls0, 1)}
                    report["service"].append(cell)
                    print(f"{'on' if batching else 'off':>8} {modality:>8} {clients:>7} "
                          f"{cell['requests_per_s']:>8.1f} {cell['p50_ms']:>8.1f} {cell['p99_ms']:>8.1f} "
                          f"{cell['items_per_call']:>10.1f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
