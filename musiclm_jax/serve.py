"""`python -m musiclm_jax.serve`: an HTTP server for a serving bundle (standard library http.server).

    python -m musiclm_jax.serve --bundle DIR [--host 127.0.0.1] [--port 8000] [--max_concurrent 1] [--max_queue 4]
        [--max_duration 30] [--max_prompt_bytes 1000] [--max_body_bytes 16384] [--queue_timeout 600] [--grace 60]
        [--warm_durations 4,10,30] [--max_prompt_audio_bytes 2000000] [--max_prompt_audio_s 10] [--max_rerank 8]

    curl -s localhost:8000/generate -d '{"prompt": "calm piano", "duration": 4, "seed": 0, "guidance": 3.0}' > a.wav
    curl -sN localhost:8000/generate -d '{"prompt": "calm piano", "duration": 10, "stream": true}' | ffplay -
    curl -s localhost:8000/continue -d "{\"prompt\": \"piano\", \"duration\": 10, \"audio\": \"$(base64 -w0 a.wav)\"}"

API:
  GET  /health    200 {"status": "ok" | "shutting_down", "sample_rate", "running", "waiting", "max_concurrent",
                  "max_queue", "max_duration_s", "warm_durations_s", "defaults": the bundle's generation
                  settings, "serves": {"continuation": bool, "rerank": bool}}
  POST /generate  a JSON object: "prompt" (string, required), "duration" (seconds), "seed" (int), "guidance",
                  "temperature" (one number or [semantic, coarse, fine]), "top_k", "top_p", "stream" (bool),
                  "rerank" (int N in [1, max_rerank]); fields left out take the bundle's defaults
                  (generation.json). 200: audio/wav, 16-bit PCM mono at the bundle's sample rate, exactly
                  duration * rate samples (headers X-Sample-Rate, X-Generation-Seconds).
                  "rerank": N > 1 samples N candidates (one batch) and returns the one whose MuLan audio embedding
                  is closest to the prompt's text embedding (MusicLM.generate(rerank=N); headers X-Rerank-Scores:
                  the N cosines as a JSON list, X-Rerank-Choice: the index returned). Needs the bundle's MuLan
                  audio tower; it cannot stream (400 with "stream").
  POST /continue  the fields of /generate but "rerank", plus "audio" (required): a prompt audio file (WAV, FLAC or
                  OGG; any rate and channels: mixed to mono and resampled to the bundle's rate), base64. 200: the
                  continuation, as MusicLM.generate_continuation: duration * rate samples, the prompt's whole
                  semantic frames first (the prompt must be at least one semantic frame and shorter than
                  duration). Needs the bundle's codec encoder and semantic tokenizer.
Streaming ("stream": true, both endpoints): HTTP/1.1 chunked transfer coding, the same bytes as without it for the
same seed and settings. The status line and headers are sent when the first audio is ready, with
X-Time-To-First-Audio-Ms (milliseconds from the parsed request to that audio), then one chunk holding the WAV
header (its sizes those of the whole duration * rate samples) and that audio's PCM, then one chunk per piece of
audio as the pipeline makes it (MusicLM.generate_stream: one per fine-stage window with a causal codec, else one),
then the last chunk with a trailer: X-Generation-Seconds and X-Time-To-First-Audio-Ms again. An error before the
first audio is the usual JSON error; a failure after it ends the connection without the last chunk (the client
sees a truncated chunked body).
Warm durations (--warm_durations 4,10,30): each is generated once at start-up, compiling what such a request
runs; a request is then generated at the shortest warm duration that covers it and cut to its own length (header
X-Generated-Duration); one longer than every warm duration gets 400 with the list (serve_generator.Generator).
Errors are JSON {"error": message, "status": code}: 400 malformed JSON, not an object, an unknown field, a missing,
non-string or empty prompt, a duration that is not a number in (0, max_duration], a bad seed or setting, a
non-boolean stream, a rerank out of [1, max_rerank] or with stream, a missing or non-base64 audio, audio that does
not decode or that the pipeline cannot continue (shorter than one semantic frame, not shorter than duration), or a
malformed chunked body; 404 another path; 405 another method (with Allow); 411 neither a Content-Length nor a
chunked body; 413 a body over max_body_bytes (/continue: plus the base64 of max_prompt_audio_bytes), a prompt over
max_prompt_bytes (UTF-8), audio over max_prompt_audio_bytes or max_prompt_audio_s; 501 continuation or rerank from
a bundle without the encoders they need (exported without them, or before they existed: the message names the
missing files); 503 busy (max_concurrent generations running and max_queue waiting: refused at once, with
Retry-After), a queue wait over queue_timeout, or shutting down; 500 a failed generation.

Concurrency: the bundle is loaded once; max_concurrent generations, continuations and streams run at a time on the
one loaded model (1 by default), at most max_queue more wait for a slot, and any request beyond that gets 503
immediately (serve_generator.Generator). Shutdown (SIGTERM, SIGINT): stop accepting, refuse new generations, let
the admitted ones finish (up to --grace seconds), exit 0.
Modules: serve_requests (request parsing, limits, errors, WAV bytes), serve_generator (the model side: Generator).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, Optional, Sequence

import numpy as np

from musiclm_jax.serving.generator import Generator
from musiclm_jax.serving.requests import (CONTINUE_FIELDS, FIELDS, Limits, RequestError, decode_prompt_audio,
                                        parse_request, pcm_bytes, wav_bytes, wav_header)


class Handler(BaseHTTPRequestHandler):
    server_version = "musiclm_jax.serve"
    protocol_version = "HTTP/1.1"  # chunked responses ("stream": true); every response closes its connection
    timeout = 60  # seconds a client may take to send its request

    # ------------------------------------------------------------------------------------------ responses
    def _send(self, status: int, body: bytes, content_type: str, headers: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: dict, headers: Optional[dict] = None) -> None:
        self._send(status, (json.dumps(payload) + "\n").encode(), "application/json", headers)

    def _error(self, e: RequestError) -> None:
        self._json(e.status, {"error": e.message, "status": e.status}, e.headers)

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's signature)
        if self.server.log is not None:
            print(f"serve: {self.address_string()} {format % args}", file=self.server.log, flush=True)

    # ------------------------------------------------------------------------------------------ routing
    ROUTES = {"/health": "GET", "/generate": "POST", "/continue": "POST"}

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path not in self.ROUTES:
                raise RequestError(404, f"no such path {path!r}; paths: GET /health, POST /generate, "
                                        f"POST /continue")
            if method != self.ROUTES[path]:
                raise RequestError(405, f"{method} {path}: use {self.ROUTES[path]}", {"Allow": self.ROUTES[path]})
            if path == "/health":
                self._json(200, self.server.generator.status())
            else:
                self._generate(path == "/continue")
        except RequestError as e:
            self.close_connection = True
            self._error(e)

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    def do_DELETE(self):
        self._route("DELETE")

    def do_PATCH(self):
        self._route("PATCH")

    def do_HEAD(self):
        self._route("HEAD")

    def _read_body(self, max_bytes: int) -> bytes:
        """The request body: Content-Length bytes, or a chunked body (HTTP/1.1 chunked transfer coding) decoded;
        either over max_bytes is refused with 413, a request with neither framing with 411."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(max_bytes)
        if self.headers.get("Content-Length") is None:
            raise RequestError(411, "a Content-Length header (or a chunked body) is required")
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            raise RequestError(400, f"bad Content-Length {self.headers['Content-Length']!r}") from None
        if length < 0:
            raise RequestError(400, f"bad Content-Length {length}")
        if length > max_bytes:
            raise RequestError(413, f"the body is {length} bytes; the limit is {max_bytes}")
        body = self.rfile.read(length)
        if len(body) != length:
            raise RequestError(400, f"the body ended after {len(body)} of {length} bytes")
        return body

    def _read_chunked(self, max_bytes: int) -> bytes:
        """Decodes a chunked body (chunk extensions and trailers are read and ignored)."""
        body = bytearray()
        while True:
            line = self.rfile.readline(1026)
            if not line.endswith(b"\n"):
                raise RequestError(400, "the chunked body ended early or has a chunk-size line over 1024 bytes")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise RequestError(400, f"bad chunk size {line.strip()[:40]!r}") from None
            if size < 0:
                raise RequestError(400, f"bad chunk size {size}")
            if size == 0:
                break
            if len(body) + size > max_bytes:
                raise RequestError(413, f"the chunked body passes {max_bytes} bytes, the limit")
            chunk = self.rfile.read(size)
            if len(chunk) != size or self.rfile.readline(3).strip():
                raise RequestError(400, "a chunk of the body is shorter than its size or not followed by CRLF")
            body += chunk
        for _ in range(100):  # trailer fields up to the empty line
            if self.rfile.readline(8192).strip() == b"":
                return bytes(body)
        raise RequestError(400, "more than 100 trailer lines after the chunked body")

    def _generate(self, continuation: bool = False) -> None:
        """POST /generate, or /continue (continuation: the body's 'audio' is the prompt)."""
        generator = self.server.generator
        limits = generator.limits
        body = self._read_body(limits.max_continue_body_bytes if continuation else limits.max_body_bytes)
        prompt, settings, options = parse_request(body, limits, CONTINUE_FIELDS if continuation else FIELDS)
        audio = None
        if continuation:
            audio = decode_prompt_audio(options["audio"], generator.sample_rate, limits)
        start = time.time()
        try:
            if options["stream"]:
                chunks, samples, generated = generator.stream(prompt, settings, audio)
                return self._stream(chunks, samples, generated, start)
            extra = {}
            if continuation:
                audio, generated = generator.continue_audio(prompt, settings, audio)
            else:
                audio, generated, extra = generator.generate(prompt, settings, options["rerank"])
        except RequestError:
            raise
        except Exception as e:  # a failed generation: the server keeps serving
            raise RequestError(500, f"generation failed: {type(e).__name__}: {e}") from None
        seconds = time.time() - start
        headers = {"X-Sample-Rate": str(generator.sample_rate), "X-Generation-Seconds": f"{seconds:.3f}", **extra}
        if generated is not None:
            headers["X-Generated-Duration"] = f"{generated:g}"
        self._send(200, wav_bytes(audio, generator.sample_rate), "audio/wav", headers)

    def _stream(self, chunks: Iterator[np.ndarray], samples: int, generated: Optional[float], start: float) -> None:
        """A chunked 200 response: sent when the first audio chunk is ready (an error before it is a JSON
        error as usual), the WAV header (with the final data size: samples) with that chunk's PCM, then each
        chunk's PCM as it comes, then the trailer (X-Generation-Seconds, X-Time-To-First-Audio-Ms). A failure
        after the headers ends the connection without the last chunk: the client sees a truncated body."""
        generator = self.server.generator
        try:
            first = next(chunks)
        except RequestError:
            raise
        except Exception as e:
            raise RequestError(500, f"generation failed: {type(e).__name__}: {e}") from None
        first_ms = f"{1000 * (time.time() - start):.1f}"
        self.send_response(200)
        headers = {"Content-Type": "audio/wav", "Transfer-Encoding": "chunked", "Connection": "close",
                   "X-Sample-Rate": str(generator.sample_rate), "X-Time-To-First-Audio-Ms": first_ms,
                   "Trailer": "X-Generation-Seconds, X-Time-To-First-Audio-Ms"}
        if generated is not None:
            headers["X-Generated-Duration"] = f"{generated:g}"
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self._chunk(wav_header(samples, generator.sample_rate) + pcm_bytes(first))
            for chunk in chunks:
                self._chunk(pcm_bytes(chunk))
        except Exception as e:  # the client went away, or the generation failed: no last chunk
            chunks.close()
            self.close_connection = True
            self.log_message("stream ended early: %s: %s", type(e).__name__, e)
            return
        self.wfile.write(f"0\r\nX-Generation-Seconds: {time.time() - start:.3f}\r\n"
                         f"X-Time-To-First-Audio-Ms: {first_ms}\r\n\r\n".encode())
        self.wfile.flush()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    """The HTTP server of one model (serving.ServingModel, or anything with sample_rate, generation_params(**settings)
    and generate(texts, params=...)). serve_forever() in one thread; shutdown_gracefully() from another."""

    daemon_threads = True
    allow_reuse_address = True
    # The listen backlog. socketserver's default of 5 is below what the queue bound admits; with it, one request
    # of 48 from 16 clients got a connection reset in a benchmarks/serve_load.py run (not seen again in 3 runs).
    # Refusing requests is the queue bound's job (503), not the kernel's.
    request_queue_size = 128

    def __init__(self, model, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(), log=sys.stderr,
                 warm_durations: Sequence[float] = ()):
        self.generator = Generator(model, limits, warm_durations, log)
        self.log = log
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def shutdown_gracefully(self, grace_s: float = 60.0) -> bool:
        """Stops serve_forever, refuses new generations, waits for the admitted ones (up to grace_s), closes the
        socket. True if every admitted generation finished."""
        self.shutdown()
        finished = self.generator.close(grace_s)
        self.server_close()
        return finished


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m musiclm_jax.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="a bundle written by python -m musiclm_jax.export")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    parser.add_argument("--max_concurrent", type=int, default=1, help="generations running at once")
    parser.add_argument("--max_queue", type=int, default=4, help="requests that may wait; more get 503 at once")
    parser.add_argument("--max_duration", type=float, default=30.0, help="longest duration a request may ask (s)")
    parser.add_argument("--max_prompt_bytes", type=int, default=1000)
    parser.add_argument("--max_body_bytes", type=int, default=16384, help="a /generate body (a /continue body "
                        "may hold the base64 of --max_prompt_audio_bytes more)")
    parser.add_argument("--max_prompt_audio_bytes", type=int, default=2_000_000,
                        help="a /continue prompt file (decoded); larger gets 413")
    parser.add_argument("--max_prompt_audio_s", type=float, default=10.0,
                        help="seconds of a /continue prompt; longer gets 413")
    parser.add_argument("--max_rerank", type=int, default=8, help="most candidates 'rerank' may ask for")
    parser.add_argument("--queue_timeout", type=float, default=600.0, help="longest wait for a free model (s)")
    parser.add_argument("--grace", type=float, default=60.0, help="seconds running generations get at shutdown")
    parser.add_argument("--no_verify", action="store_true", help="skip the bundle's SHA-256 checks at load")
    parser.add_argument("--warm_durations", default="",
                        help="comma-separated seconds, e.g. 4,10,30: generated once at start-up (compiling their "
                             "shapes); a request is then generated at the shortest that covers it and cut, and "
                             "one longer than all of them gets 400")
    args = parser.parse_args(argv)
    try:
        warm = tuple(float(d) for d in args.warm_durations.split(",") if d.strip())
    except ValueError:
        parser.error(f"--warm_durations={args.warm_durations!r}: give seconds separated by commas, e.g. 4,10,30")
    limits = Limits(max_duration_s=args.max_duration, max_prompt_bytes=args.max_prompt_bytes,
                    max_body_bytes=args.max_body_bytes, max_concurrent=args.max_concurrent,
                    max_queue=args.max_queue, queue_timeout_s=args.queue_timeout,
                    max_prompt_audio_bytes=args.max_prompt_audio_bytes, max_prompt_audio_s=args.max_prompt_audio_s,
                    max_rerank=args.max_rerank)

    from musiclm_jax.serving import bundle as serving
    start = time.time()
    model = serving.load(args.bundle, verify=not args.no_verify)
    server = Server(model, args.host, args.port, limits, warm_durations=warm)
    stopping = threading.Event()

    def stop(signum, frame):
        if not stopping.is_set():
            stopping.set()
            print(f"serve: {signal.Signals(signum).name}: shutting down", file=sys.stderr, flush=True)
            threading.Thread(target=server.shutdown, daemon=True).start()  # serve_forever runs in this thread
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"serve: {args.bundle} loaded in {time.time() - start:.1f} s; listening on {server.url} "
          f"(max_concurrent={limits.max_concurrent}, max_queue={limits.max_queue})", file=sys.stderr, flush=True)
    print(server.url, flush=True)  # the first stdout line: where to connect (useful with --port 0)
    server.serve_forever()
    finished = server.generator.close(args.grace)
    server.server_close()
    print(f"serve: stopped ({'all' if finished else 'not all'} running generations finished)", file=sys.stderr,
          flush=True)
    return 0 if finished else 1


if __name__ == "__main__":
    sys.exit(main())
