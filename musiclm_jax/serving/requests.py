"""What a request to musiclm_jax.serve is and what its response body is (no HTTP server, no model).

Limits (durations in seconds, sizes in bytes), RequestError (an HTTP status and a JSON message), parse_request (a
/generate or /continue JSON body -> prompt, generation settings, options), decode_prompt_audio (a /continue prompt
file -> mono float32 samples at the bundle's rate in Hz) and the response bytes: wav_header, pcm_bytes, wav_bytes
(16-bit PCM mono WAV; one sample is 2 bytes).
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
import struct
import wave
from typing import Any, Optional, Sequence

import numpy as np

from musiclm_jax.data import audio_io

WARM_UP_PROMPT = "warm-up"
FIELDS = ("prompt", "duration", "seed", "guidance", "temperature", "top_k", "top_p", "stream", "rerank")
CONTINUE_FIELDS = tuple(f for f in FIELDS if f != "rerank") + ("audio",)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the server accepts: the longest clip (seconds), prompt and body sizes (bytes), generations at once,
    requests waiting, and how long one may wait (seconds)."""

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
    generation_params.GenerationParams fields, options: {'stream': bool, 'rerank': int, 'audio': the prompt file's bytes
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
