"""A load test of `python -m musiclm_jax.serve`: starts the server on a bundle and drives it with concurrent
clients. A benchmark, not a test.

    python -m musiclm_jax.export --gin_file=gin/sample/musiclm.gin --output_dir /tmp/demo_bundle \
        --gin.MULAN_CHECKPOINT="'/tmp/musiclm_jax/demo/mulan'" ... (the demo's five run directories)
    python benchmarks/serve_load.py --bundle /tmp/demo_bundle --clients 4 --requests 32 [--duration 2]
        [--max_concurrent 1] [--max_queue 4] [--stream]

The server runs as its own process with --warm_durations set to --duration (so no request compiles) and the
given bounds. Each of --clients threads sends its share of --requests POST /generate requests back to back
(prompts cycled from the synthetic captions, seed = request index). Measured per request: latency (request sent
to last byte), time to first audio (request sent to the first byte of the WAV body; with --stream the server
sends the audio window by window, else the whole clip at once) and the status. Prints one JSON line:
p50/p99 latency and time to first audio of the 200s, throughput in audio seconds per wall second, the counts by
status, the server's peak RSS (VmHWM of its process) and `unexpected`: responses other than 200 and the 503s
the queue bound promises. Exits 1 if there is any.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ("calm piano in C major", "fast drums and bass", "a flute melody in A minor", "slow strings")


def peak_rss_bytes(pid: int) -> int:
    """VmHWM (the peak resident set) of a live process, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def one_request(host: str, port: int, index: int, duration: float, stream: bool) -> dict:
    """POSTs one /generate and reads the whole response: {status, latency_s, first_audio_s, audio_s}."""
    body = {"prompt": PROMPTS[index % len(PROMPTS)], "duration": duration, "seed": index}
    if stream:
        body["stream"] = True
    connection = http.client.HTTPConnection(host, port, timeout=600)
    start = time.perf_counter()
    try:
        connection.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        first = response.read(1)  # the first byte of the body (chunked bodies are decoded by http.client)
        first_s = time.perf_counter() - start
        rest = response.read()
        latency = time.perf_counter() - start
        data = first + rest
        audio_s = 0.0
        if response.status == 200:
            rate = int(response.getheader("X-Sample-Rate"))
            audio_s = (len(data) - 44) / 2 / rate  # 16-bit mono PCM after the 44-byte header
        return {"status": response.status, "latency_s": latency, "first_audio_s": first_s, "audio_s": audio_s}
    except OSError as e:
        return {"status": f"connection error: {type(e).__name__}", "latency_s": time.perf_counter() - start,
                "first_audio_s": None, "audio_s": 0.0}
    finally:
        connection.close()


def percentile(values, q):
    return float(np.percentile(values, q)) if values else None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", required=True, help="a bundle written by python -m musiclm_jax.export")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds of audio per request")
    parser.add_argument("--max_concurrent", type=int, default=1)
    parser.add_argument("--max_queue", type=int, default=4)
    parser.add_argument("--stream", action="store_true", help="ask for streamed responses")
    args = parser.parse_args()

    command = [sys.executable, "-m", "musiclm_jax.serve", "--bundle", args.bundle, "--port", "0",
               "--max_concurrent", str(args.max_concurrent), "--max_queue", str(args.max_queue),
               "--warm_durations", f"{args.duration:g}", "--max_duration", f"{args.duration:g}"]
    start = time.time()
    server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = server.stdout.readline().strip()
        if not url.startswith("http://"):
            raise SystemExit(f"serve_load: the server did not start ({' '.join(command)})")
        ready_s = time.time() - start
        host, port = url[len("http://"):].rsplit(":", 1)
        results, lock = [], threading.Lock()
        counter = iter(range(args.requests))

        def client():
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                r = one_request(host, int(port), index, args.duration, args.stream)
                with lock:
                    results.append(r)

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        wall = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - wall
        rss = peak_rss_bytes(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=120)
    ok = [r for r in results if r["status"] == 200]
    statuses = Counter(str(r["status"]) for r in results)
    unexpected = sum(n for s, n in statuses.items() if s not in ("200", "503"))
    print(json.dumps({
        "benchmark": "serve_load", "bundle": args.bundle, "clients": args.clients, "requests": args.requests,
        "duration_s": args.duration, "max_concurrent": args.max_concurrent, "max_queue": args.max_queue,
        "stream": args.stream, "server_ready_s": ready_s, "wall_s": wall,
        "latency_p50_s": percentile([r["latency_s"] for r in ok], 50),
        "latency_p99_s": percentile([r["latency_s"] for r in ok], 99),
        "first_audio_p50_s": percentile([r["first_audio_s"] for r in ok], 50),
        "first_audio_p99_s": percentile([r["first_audio_s"] for r in ok], 99),
        "audio_seconds_per_s": sum(r["audio_s"] for r in ok) / wall,
        "status_counts": dict(statuses), "server_peak_rss_bytes": rss, "unexpected": unexpected}))
    sys.exit(1 if unexpected else 0)


if __name__ == "__main__":
    main()
