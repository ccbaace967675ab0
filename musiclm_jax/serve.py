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
Warm durations (--warm_durations 4,10,30): each is generated once at start-up with the bundle's default settings,
and once more without guidance when those have it, which compiles every function such a request runs (streamed
or not), so the first request costs what the second does. A request is then generated at the shortest warm
duration that covers it and cut to its own length (header X-Generated-Duration); one longer than every warm
duration gets 400 with the list. Temperature, top_k, top_p and the guidance scale are arguments of the compiled
samplers (pipeline.Stage.sample), so any of their values runs without compiling; only guidance on (scale != 1) or
off is a different program, and the warm-up compiles both. Reranking (N times the batch) and continuation (the
prompt's length is a shape) compile on their first request of each shape.
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

Concurrency: the bundle is loaded once; max_concurrent generations, continuations and streams (a stream holds its
model until its last chunk is written) run at a time on the one loaded model (each with its own settings, passed
per call: the model keeps no per-request state; 1 by default), at most max_queue more wait for a slot, and any
request beyond that gets 503 immediately. Shutdown (SIGTERM, SIGINT): stop accepting, refuse new generations,
let the admitted ones finish (up to --grace seconds), exit 0.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import io
import json
import math
import signal
import struct
import sys
import threading
import time
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from musiclm_jax.data import audio_io

WARM_UP_PROMPT = "warm-up"
FIELDS = ("prompt", "duration", "seed", "guidance", "temperature", "top_k", "top_p", "stream", "rerank")
CONTINUE_FIELDS = tuple(f for f in FIELDS if f != "rerank") + ("audio",)


@dataclasses.dataclass(frozen=True)
class Limits:
    max_duration_s: float = 30.0
    max_prompt_bytes: int = 1000
    max_body_bytes: int = 16384
    max_concurrent: int = 1
    max_queue: int = 4
    queue_timeout_s: float = 600.0
    max_prompt_audio_bytes: int = 2_000_000  # a /continue prompt file, decoded from base64
    max_prompt_audio_s: float = 10.0
    max_rerank: int = 8

    @property
    def max_continue_body_bytes(self) -> int:
        """A /continue body: max_body_bytes of fields plus the base64 of the largest prompt file."""
        return self.max_body_bytes + 4 * -(-self.max_prompt_audio_bytes // 3)

    def __post_init__(self):
        if self.max_concurrent < 1 or self.max_queue < 0:
            raise ValueError(f"max_concurrent={self.max_concurrent} must be >= 1 and max_queue={self.max_queue} "
                             f">= 0")
        if not self.max_duration_s > 0:
            raise ValueError(f"max_duration={self.max_duration_s} must be positive")


class RequestError(Exception):
    """A request answered with `status` and a JSON message."""

    def __init__(self, status: int, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers or {})


def _number(body: dict, name: str, low: float, high: float, integer: bool = False, low_open: bool = False):
    value = body[name]
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise RequestError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got "
                                f"{type(value).__name__} {json.dumps(value)[:40]}")
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        raise RequestError(400, f"'{name}'={value} is out of range: it must be in {'(' if low_open else '['}{low}, "
                                f"{high}]")
    return value


def parse_request(body: bytes, limits: Limits, fields: Sequence[str] = FIELDS) -> tuple[str, dict[str, Any], dict]:
    """A /generate (or, with CONTINUE_FIELDS, /continue) body -> (prompt, generation settings given:
    pipeline.GenerationParams fields, options: {'stream': bool, 'rerank': int, 'audio': the prompt file's bytes
    (or None)})."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(400, f"malformed JSON body: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; known fields: {list(fields)}")
    if "prompt" not in data:
        raise RequestError(400, "missing field 'prompt' (a string)")
    prompt = data["prompt"]
    if not isinstance(prompt, str):
        raise RequestError(400, f"'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise RequestError(400, "'prompt' is empty")
    size = len(prompt.encode("utf-8"))
    if size > limits.max_prompt_bytes:
        raise RequestError(413, f"'prompt' is {size} bytes (UTF-8); the limit is {limits.max_prompt_bytes}")
    settings: dict[str, Any] = {}
    if "duration" in data:
        settings["duration_s"] = float(_number(data, "duration", 0.0, limits.max_duration_s, low_open=True))
    if "seed" in data:
        settings["seed"] = int(_number(data, "seed", 0, 2 ** 31 - 1, integer=True))
    if "guidance" in data:
        settings["guidance_scale"] = float(_number(data, "guidance", 0.0, 100.0))
    if "temperature" in data:
        t = data["temperature"]
        values = t if isinstance(t, list) else [t]
        if len(values) not in (1, 3):
            raise RequestError(400, "'temperature' must be a number or a list of 3 (semantic, coarse, fine)")
        settings["temperature"] = tuple(float(_number({"temperature": v}, "temperature", 0.0, 10.0))
                                        for v in (values * 3 if len(values) == 1 else values))
    if "top_k" in data:
        settings["top_k"] = int(_number(data, "top_k", 0, 1_000_000, integer=True))
    if "top_p" in data:
        settings["top_p"] = float(_number(data, "top_p", 0.0, 1.0, low_open=True))
    options = {"stream": False, "rerank": 1, "audio": None}
    if "stream" in data:
        if not isinstance(data["stream"], bool):
            raise RequestError(400, f"'stream' must be true or false, got {json.dumps(data['stream'])[:40]}")
        options["stream"] = data["stream"]
    if "rerank" in data:
        options["rerank"] = int(_number(data, "rerank", 1, limits.max_rerank, integer=True))
        if options["rerank"] > 1 and options["stream"]:
            raise RequestError(400, "'rerank' > 1 cannot stream: reranking needs every candidate's whole audio; "
                                    "leave out 'stream' or 'rerank'")
    if "audio" in fields:
        options["audio"] = _prompt_audio_bytes(data, limits)
    return prompt, settings, options


def _prompt_audio_bytes(data: dict, limits: Limits) -> bytes:
    """The 'audio' field of a /continue body: the prompt file, base64 (standard alphabet) -> its bytes."""
    if "audio" not in data:
        raise RequestError(400, "missing field 'audio' (the prompt audio file, base64-encoded)")
    if not isinstance(data["audio"], str):
        raise RequestError(400, f"'audio' must be a base64 string, got {type(data['audio']).__name__}")
    try:
        audio = base64.b64decode(data["audio"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"'audio' is not valid base64: {e}") from None
    if len(audio) > limits.max_prompt_audio_bytes:
        raise RequestError(413, f"'audio' is {len(audio)} bytes; the limit is {limits.max_prompt_audio_bytes} "
                                f"(--max_prompt_audio_bytes)")
    if not audio:
        raise RequestError(400, "'audio' is empty")
    return audio


def decode_prompt_audio(data: bytes, sample_rate: int, limits: Limits) -> np.ndarray:
    """A prompt file (WAV, FLAC, OGG: what libsndfile reads) -> mono float32 [samples] at sample_rate. 400 if it
    does not decode, 413 if it is longer than max_prompt_audio_s."""
    import soundfile
    try:
        audio, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError or TypeError by format
        raise RequestError(400, f"'audio' is not a decodable audio file (WAV, FLAC or OGG): {e}") from None
    seconds = audio.shape[0] / rate
    if seconds > limits.max_prompt_audio_s:
        raise RequestError(413, f"'audio' is {seconds:.2f} s long; the limit is {limits.max_prompt_audio_s:g} s "
                                f"(--max_prompt_audio_s)")
    if audio.shape[0] == 0:
        raise RequestError(400, "'audio' holds no samples")
    return audio_io.to_mono_at_rate(audio, rate, sample_rate)


def wav_header(num_samples: int, sample_rate: int) -> bytes:
    """The 44-byte header of a mono 16-bit PCM WAV file of num_samples samples (what wave writes, so
    wav_header(n, rate) + PCM == wav_bytes(audio of n samples, rate))."""
    data = 2 * int(num_samples)
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + data, b"WAVE", b"fmt ", 16, 1, 1, int(sample_rate),
                       2 * int(sample_rate), 2, 16, b"data", data)


def pcm_bytes(audio: np.ndarray) -> bytes:
    """Mono float audio in [-1, 1] -> little-endian 16-bit PCM (audio_io.pcm16: sample for sample, so chunks
    converted one by one concatenate to the whole's)."""
    return audio_io.pcm16(audio).astype("<i2").tobytes()


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """Mono float audio in [-1, 1] -> a 16-bit PCM WAV file, sample for sample what audio_io.save_audio writes."""
    pcm = audio_io.pcm16(audio).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return out.getvalue()


class Generator:
    """Admission control over the model instances: max_concurrent run, max_queue wait, the rest get 503."""

    def __init__(self, model, limits: Limits, warm_durations: Sequence[float] = (), log=None):
        self.limits = limits
        self.defaults = dict(getattr(model, "defaults", {}))
        self.sample_rate = int(model.sample_rate)
        self.warm_durations = tuple(sorted({float(d) for d in warm_durations}))
        for d in self.warm_durations:
            if not 0 < d <= limits.max_duration_s:
                raise ValueError(f"--warm_durations: {d} s is not in (0, max_duration={limits.max_duration_s}]")
        self._warm(model, log)
        self._model = model  # shared by the concurrent requests: settings go with each call (generation_params)
        self._slots = threading.BoundedSemaphore(limits.max_concurrent)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.running = self.waiting = 0
        self.closing = False

    def status(self) -> dict:
        with self._lock:
            return {"status": "shutting_down" if self.closing else "ok", "sample_rate": self.sample_rate,
                    "running": self.running, "waiting": self.waiting, "max_concurrent": self.limits.max_concurrent,
                    "max_queue": self.limits.max_queue, "max_duration_s": self.limits.max_duration_s,
                    "warm_durations_s": list(self.warm_durations), "defaults": self.defaults,
                    "serves": {f: hasattr(self._model, "missing") and not self._model.missing(f)
                               for f in ("continuation", "rerank")}}

    def _warm(self, model, log) -> None:
        """Generates one clip of each warm duration with the bundle's default settings (and again without
        guidance if they have it: the unguided samplers are other programs), so that every jitted function
        those requests run is compiled before the first request. A model that streams is warmed through
        generate_stream: its windows are generate's, and its codec decodes each prefix as well as the whole."""
        variants = [{}]
        if self.defaults.get("guidance_scale", 1.0) != 1.0:
            variants.append({"guidance_scale": 1.0})
        for d in self.warm_durations:
            start = time.time()
            for variant in variants:
                params = model.generation_params(**{**self.defaults, "duration_s": d, **variant})
                if hasattr(model, "generate_stream"):
                    for _ in model.generate_stream([WARM_UP_PROMPT], params=params):
                        pass
                else:
                    model.generate([WARM_UP_PROMPT], params=params)
            if log is not None:
                print(f"serve: warmed {d:g} s in {time.time() - start:.1f} s", file=log, flush=True)

    def bucket(self, duration_s: float) -> float:
        """The duration generated for a request of `duration_s`: itself without warm durations, else the
        shortest warm duration that covers it (the clip is then cut to duration_s). 400 if none does."""
        if not self.warm_durations:
            return duration_s
        for d in self.warm_durations:
            if d >= duration_s - 1e-9:
                return d
        raise RequestError(400, f"'duration'={duration_s:g} s is longer than the compiled durations "
                                f"{list(self.warm_durations)} s (--warm_durations)")

    def _settings(self, settings: dict) -> tuple[dict, int, Optional[float]]:
        """(the settings a request runs with: its own over the bundle's defaults, the duration bucketed; the samples
        it returns: the requested duration * sample_rate; the duration generated, None without warm durations)."""
        settings = {**self.defaults, **settings}
        duration = settings.get("duration_s")
        if duration is None:
            raise RequestError(400, "'duration' is required: the bundle names no default duration")
        if self.warm_durations:
            settings["duration_s"] = self.bucket(float(duration))
        return (settings, int(round(float(duration) * self.sample_rate)),
                settings["duration_s"] if self.warm_durations else None)

    @contextlib.contextmanager
    def _slot(self):
        """The model, for one request under the bound: 503 at once when max_concurrent run and max_queue wait, or
        after queue_timeout waiting; the slot is released (and waiters woken) when the block ends."""
        with self._lock:
            if self.closing:
                raise RequestError(503, "the server is shutting down")
            if self.running + self.waiting >= self.limits.max_concurrent + self.limits.max_queue:
                raise RequestError(503, f"busy: {self.running} generation(s) running and {self.waiting} waiting "
                                        f"(max_concurrent={self.limits.max_concurrent}, max_queue="
                                        f"{self.limits.max_queue}); retry later", {"Retry-After": "5"})
            self.waiting += 1
        if not self._slots.acquire(timeout=self.limits.queue_timeout_s):
            with self._lock:
                self.waiting -= 1
                self._idle.notify_all()
            raise RequestError(503, f"waited {self.limits.queue_timeout_s} s for a free slot; retry later",
                               {"Retry-After": "5"})
        with self._lock:
            self.waiting -= 1
            self.running += 1
        try:
            yield self._model
        finally:
            self._slots.release()
            with self._lock:
                self.running -= 1
                self._idle.notify_all()

    def _require(self, feature: str) -> None:
        """501 when the model cannot serve `feature` ('continuation', 'rerank'): a bundle without its encoders."""
        if not hasattr(self._model, "missing"):
            raise RequestError(501, f"this model does not serve {feature}")
        missing = self._model.missing(feature)
        if missing:
            raise RequestError(501, f"this bundle cannot serve {feature}: it has no "
                                    f"{', '.join(f'exported/{m}.jaxexp' for m in missing)} (export it again with "
                                    f"this musiclm_jax, without --no_encoders"
                                    f"{', with a SEMANTIC_TOKENIZER' if 'semantic_features' in missing else ''})")

    def generate(self, prompt: str, settings: dict, rerank: int = 1) -> tuple[np.ndarray, Optional[float], dict]:
        """(audio [duration_s * sample_rate] float32 of one prompt with `settings` over the bundle's defaults, the
        duration generated before the cut: the warm duration used, or None without warm durations, headers to
        add: with rerank = N > 1 the best of N candidates by MuLan score, X-Rerank-Scores (the N cosines, JSON)
        and X-Rerank-Choice (the index kept))."""
        if rerank > 1:
            self._require("rerank")
        settings, samples, generated = self._settings(settings)
        with self._slot() as model:
            params = model.generation_params(**settings)
            headers = {}
            if rerank > 1:
                result = model.generate([prompt], rerank=rerank, return_details=True, params=params)
                audio = result.audio
                headers = {"X-Rerank-Scores": json.dumps([round(float(x), 6) for x in result.scores[0]]),
                           "X-Rerank-Choice": str(int(result.choice[0]))}
            else:
                audio = model.generate([prompt], params=params)
            return np.asarray(audio[0], np.float32)[:samples], generated, headers

    def continue_audio(self, prompt: str, settings: dict, audio: np.ndarray) -> tuple[np.ndarray, Optional[float]]:
        """(audio [duration_s * sample_rate] float32: the prompt audio [samples] at sample_rate continued under
        the prompt, its whole semantic frames included, the duration generated before the cut)."""
        self._require("continuation")
        settings, samples, generated = self._settings(settings)
        with self._slot() as model:
            params = model.generation_params(**settings)
            out = _prompt_errors(lambda: model.generate_continuation(audio, [prompt], params=params))
            return np.asarray(out[0], np.float32)[:samples], generated

    def stream(self, prompt: str, settings: dict, audio: Optional[np.ndarray] = None) -> tuple[Iterator[np.ndarray],
                                                                                               int, Optional[float]]:
        """(an iterator of consecutive audio chunks [n] float32 of the generation (or, with `audio`, the
        continuation), the samples they add up to: duration * sample_rate, the duration generated). The model
        is held from the first next() until the iterator ends or is closed (a client that goes away)."""
        if audio is not None:
            self._require("continuation")
        settings, samples, generated = self._settings(settings)

        def chunks() -> Iterator[np.ndarray]:
            with self._slot() as model:
                params = model.generation_params(**settings)
                if audio is None:
                    parts = model.generate_stream([prompt], params=params)
                else:
                    parts = _prompt_errors(lambda: model.generate_continuation_stream(audio, [prompt], params=params))
                sent = 0
                for part in parts:
                    part = np.asarray(part[0], np.float32)[:samples - sent]
                    if part.size:
                        sent += part.size
                        yield part
        return chunks(), samples, generated

    def close(self, timeout: float) -> bool:
        """Refuses new generations and waits (up to timeout seconds) for the admitted ones: True if none is left."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self.closing = True
            while self.running or self.waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True


def _prompt_errors(call):
    """call(), a prompt the pipeline cannot continue (pipeline.PromptError: too short, or not shorter than the
    duration) answered with 400."""
    from musiclm_jax import pipeline
    try:
        return call()
    except pipeline.PromptError as e:
        raise RequestError(400, f"'audio': {e}") from None


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

    from musiclm_jax import serving
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
