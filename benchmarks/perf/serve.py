"""Load test of `msakit serve` on loopback: throughput and latency of text-only and media requests.

    python benchmarks/perf/serve.py                   # the packaged default model, the MOSI clip
    python benchmarks/perf/serve.py --checkpoint run/seed-1111.pt --media clip.mp4 --media-requests 40

Starts `msakit serve` in a process of its own on a free loopback port, waits for /healthz, warms
the model up with one untimed request of each kind (the first loads Whisper and the text encoder),
then sends a fixed number of requests at a fixed concurrency, one kind after the other, and stops.
Media requests upload the clip as multipart/form-data with no transcript (speech recognition runs);
the server gets as many extraction slots as the media concurrency, so none is refused with a 429.
Latency is from sending the request to reading the whole answer; any answer other than 200 counts
as an error. Writes benchmarks/results/perf/serve.json and serve.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from msakit import __version__
from msakit.fileio import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parents[1] / "results" / "perf"
SENTENCES = ("the plot was thin but the actors were wonderful", "I did not like this film at all",
             "it was fine, nothing special", "an ambitious, weird and interesting failure")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(checkpoint: str | None, port: int, slots: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "msakit.cli", "serve", "--port", str(port),
               "--max-concurrent", str(slots)]
    if checkpoint:
        command += ["--checkpoint", checkpoint]
    with log.open("w") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)


def wait_until_up(base: str, server: subprocess.Popen, log: Path, limit: float = 600.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"msakit serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    sys.exit(f"msakit serve did not answer /healthz within {limit:.0f} s")


async def load(base: str, requests: int, concurrency: int, send: Any) -> dict[str, Any]:
    """`requests` calls of `send(client, i)` with at most `concurrency` in flight."""
    latencies: list[float] = []
    errors: list[str] = []
    server_seconds: list[float] = []
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        async def one(i: int) -> None:
            async with gate:
                start = time.perf_counter()
                try:
                    answer = await send(client, i)
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return
                latencies.append(time.perf_counter() - start)
                if answer.status_code != 200:
                    errors.append(f"{answer.status_code}: {answer.text[:200]}")
                else:
                    server_seconds.append(sum(answer.json()["seconds"].values()))

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {
        "requests": requests, "concurrency": concurrency, "errors": len(errors), "error_samples": errors[:5],
        "wall_seconds": wall, "throughput_per_second": requests / wall,
        "latency_ms": {**{f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)},
                       "mean": float(ms.mean())},
        "server_ms_median": float(np.median(server_seconds) * 1000) if server_seconds else None,
    }


def markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    lines = [f"# msakit serve under load ({machine['cpus']} CPU cores, {machine['cpu']})", "",
             f"Command: `{result['command']}`", "",
             f"Model: `{result['model']['checkpoint']}` ({result['model']['model']}); server and client on "
             f"one machine over loopback (OMP_NUM_THREADS {machine['OMP_NUM_THREADS']}); load average before "
             f"the run {machine['load_average']} (other jobs shared the cores). Media: "
             f"`{result['media']['file']}` ({result['media']['megabytes']:.2f} MB), uploaded without a "
             "transcript (speech recognition runs on the server). Latency is from sending the request to "
             "reading the whole answer; \"server\" is the extraction + model time the answer reports.", "",
             "| requests | count | concurrency | errors | throughput (req/s) | p50 ms | p95 ms | p99 ms | "
             "server ms (median) |", "|---|---|---|---|---|---|---|---|---|"]
    for kind, row in result["runs"].items():
        latency = row["latency_ms"]
        lines.append(f"| {kind} | {row['requests']} | {row['concurrency']} | {row['errors']} | "
                     f"{row['throughput_per_second']:.2f} | {latency['p50']:.0f} | {latency['p95']:.0f} | "
                     f"{latency['p99']:.0f} | {row['server_ms_median']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the packaged default model")
    parser.add_argument("--media", type=Path, default=Path("../shared/data/media/mosi_Oz06ZWiO20M_6.mp4"))
    parser.add_argument("--text-requests", type=int, default=200)
    parser.add_argument("--text-concurrency", type=int, default=8)
    parser.add_argument("--media-requests", type=int, default=20)
    parser.add_argument("--media-concurrency", type=int, default=2)
    args = parser.parse_args()
    if not args.media.is_file():
        sys.exit(f"--media {args.media}: not found")
    media = args.media.read_bytes()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkstemp(prefix="msakit-serve-benchmark-", suffix=".log")[1])
    load_average = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    server = start_server(args.checkpoint, port, args.media_concurrency, log)
    try:
        wait_until_up(base, server, log)
        card = httpx.get(f"{base}/v1/model", timeout=30).json()

        async def text(client: httpx.AsyncClient, i: int) -> httpx.Response:
            return await client.post("/v1/predict", json={"text": SENTENCES[i % len(SENTENCES)]})

        async def upload(client: httpx.AsyncClient, i: int) -> httpx.Response:
            return await client.post("/v1/predict", files={"file": (args.media.name, media)})

        runs = {}
        for kind, send, requests, concurrency in [
                ("text only (JSON)", text, args.text_requests, args.text_concurrency),
                ("media upload", upload, args.media_requests, args.media_concurrency)]:
            warm = asyncio.run(load(base, 1, 1, send))
            if warm["errors"]:
                sys.exit(f"{kind}: the warm-up request failed: {warm['error_samples']}")
            runs[kind] = asyncio.run(load(base, requests, concurrency, send))
    finally:
        server.terminate()
        server.wait(60)
        log.unlink(missing_ok=True)
    result = {
        "command": shlex.join(["python", "benchmarks/perf/serve.py", *sys.argv[1:]]),
        "msakit_version": __version__,
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_name(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average": load_average,
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset")},
        "model": {key: card.get(key) for key in ("checkpoint", "model", "family", "reads")},
        "media": {"file": args.media.name, "megabytes": len(media) / 1e6},
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "serve.json", result)
    atomic_write_text(RESULTS / "serve.md", markdown(result))
    print(markdown(result))
    errors = sum(run["errors"] for run in runs.values())
    if errors:
        sys.exit(f"{errors} request(s) failed: see benchmarks/results/perf/serve.json")


if __name__ == "__main__":
    main()
