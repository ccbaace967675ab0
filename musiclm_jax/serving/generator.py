"""The model side of musiclm_jax.serve: Generator, the one loaded model behind admission control, warm-up and
duration buckets (durations in seconds, audio as float32 samples at the model's sample_rate in Hz).

Concurrency: max_concurrent generations, continuations and streams (a stream holds its model until its last chunk
is written) run at a time on the one loaded model (each with its own settings, passed per call: the model keeps no
per-request state), at most max_queue more wait for a slot (up to queue_timeout_s), and any request beyond that
gets 503 immediately; close() refuses new ones and waits for the admitted ones.
Warm durations: each is generated once at start-up with the model's default settings, and once more without
guidance when those have it, which compiles every function such a request runs (streamed or not), so the first
request costs what the second does. A request is then generated at the shortest warm duration that covers it and
cut to its own length; one longer than every warm duration gets 400 with the list. Temperature, top_k, top_p and
the guidance scale are arguments of the compiled samplers (stage_sampling.Stage.sample), so any of their values
runs without compiling; only guidance on (scale != 1) or off is a different program, and the warm-up compiles both.
Reranking (N times the batch) and continuation (the prompt's length is a shape) compile on their first request of
each shape.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Iterator, Optional, Sequence

import numpy as np

from musiclm_jax.serving.requests import WARM_UP_PROMPT, Limits, RequestError


def _prompt_errors(call):
    """call(), a prompt the pipeline cannot continue (generation_params.PromptError: too short, or not shorter than
    the duration) answered with 400."""
    from musiclm_jax.generation import params as generation_params
    try:
        return call()
    except generation_params.PromptError as e:
        raise RequestError(400, f"'audio': {e}") from None



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
