"""Sound of a synthetic clip: `render(params, seconds, sample_rate, rng)` plays the clip's score (music_score)
as float32 mono audio [samples] at sample_rate Hz, peak <= 1.

  instruments  plucked = Karplus-Strong string; bowed, blown, struck, synth = wavetable additive synthesis
               (4096-sample tables) with their own harmonic spectra, attack/decay envelopes (seconds),
               brightness curves and vibrato (cents); `render_note` plays one note, `midi_to_hz` maps pitches
  drums        synthesized kick (pitch-swept sine), snare/clap (noise bursts) and hi-hats
  reverb       dry, or a convolution with an exponentially decaying noise tail (room ~0.6 s, hall ~2.2 s)
  mixing       part gains, then the clip's RMS set by its dynamics and a tanh limiter

The costly pieces (Karplus-Strong notes, wavetables, curves, reverb spectra) are cached per sample rate,
deterministically; `clear_caches` empties them."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import numpy as np

from musiclm_jax.data.music_params import REVERBS, MusicParams
from musiclm_jax.data.music_score import compose

# Target RMS of the whole clip (linear, full scale = 1) per dynamics level; a tanh limiter keeps the peak <= 1.
_DYNAMICS_RMS = {"soft": 0.045, "medium": 0.1, "loud": 0.22}
# How bright the notes are (0 = dull table, 1 = bright table) per dynamics level.
_DYNAMICS_BRIGHTNESS = {"soft": 0.25, "medium": 0.55, "loud": 0.9}

_TABLE_SIZE = 4096          # samples per wavetable cycle
_TABLE_MASK = _TABLE_SIZE - 1
_CURVE_SECONDS = 6.5        # length of the cached per-note curves (gate + release + ring)
_KS_SECONDS = 2.5           # length of a cached Karplus-Strong note
_PART_GAINS = {"melody": 0.5, "chords": 0.2, "bass": 0.2, "drums": 0.55}


# ----------------------------------------------------------------------------------------------------------
# Instruments
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Timbre:
    """A wavetable instrument: two spectra (bright, dull) mixed by a brightness curve, times an envelope.

    Spectra are (harmonic number, amplitude) pairs. Times in seconds; vibrato depth in cents."""

    bright: tuple[tuple[int, float], ...]
    dull: tuple[tuple[int, float], ...]
    attack_s: float
    release_s: float
    decay_s: Optional[float] = None       # None: sustained (attack, sustain, release); else exponential decay
    sustain: float = 1.0                  # sustained level after the attack's overshoot
    overshoot_s: float = 0.0              # attack peak decays to `sustain` with this time constant
    brightness_decay_s: Optional[float] = None  # bright -> dull with this time constant (else constant)
    brightness_floor: float = 0.0         # share of the brightness left after that decay
    ring_s: float = 0.0                   # how long a decaying note keeps sounding after its gate
    vibrato_hz: float = 0.0
    vibrato_cents: float = 0.0
    detune_cents: float = 0.0             # > 0: two oscillators, at +- this detune
    breath: float = 0.0                   # level of added high-passed noise (blown)


def _saw(n: int, power: float = 1.0, body: tuple[int, ...] = ()) -> tuple[tuple[int, float], ...]:
    return tuple((k, (1.0 / k ** power) * (1.8 if k in body else 1.0)) for k in range(1, n + 1))


_TIMBRES = {
    "bowed": _Timbre(bright=_saw(20, 1.0, body=(2, 4, 8)), dull=_saw(10, 1.6, body=(2, 4)), attack_s=0.11,
                     release_s=0.16, vibrato_hz=5.5, vibrato_cents=14.0),
    "blown": _Timbre(bright=((1, 1.0), (2, 0.04), (3, 0.33), (4, 0.03), (5, 0.2), (7, 0.12), (9, 0.07),
                             (11, 0.04)),
                     dull=((1, 1.0), (2, 0.03), (3, 0.15), (5, 0.05)), attack_s=0.06, release_s=0.08,
                     vibrato_hz=4.6, vibrato_cents=9.0, breath=0.05),
    "struck": _Timbre(bright=((1, 1.0), (2, 0.1), (4, 0.6), (8, 0.1), (10, 0.15)), dull=((1, 1.0), (4, 0.12)),
                      attack_s=0.002, release_s=0.05, decay_s=0.42, brightness_decay_s=0.05, ring_s=0.6),
    "synth": _Timbre(bright=_saw(28, 1.0), dull=_saw(6, 2.0), attack_s=0.006, release_s=0.06, sustain=0.8,
                     overshoot_s=0.18, brightness_decay_s=0.2, brightness_floor=0.6, detune_cents=9.0),
}


def midi_to_hz(midi: float) -> float:
    """Frequency in Hz of a MIDI note number (69 = A4 = 440 Hz)."""
    return 440.0 * 2.0 ** ((midi - 69) / 12.0)


@functools.lru_cache(maxsize=None)
def _wavetables(instrument: str, max_harmonic: int) -> tuple[np.ndarray, np.ndarray]:
    """(dull, bright - dull) one-cycle tables, float32 [_TABLE_SIZE], harmonics above max_harmonic dropped,
    each spectrum scaled to an RMS of 1/sqrt(2) (a unit sine's)."""
    timbre = _TIMBRES[instrument]
    phase = np.arange(_TABLE_SIZE) * (2 * np.pi / _TABLE_SIZE)
    tables = []
    for spectrum in (timbre.dull, timbre.bright):
        kept = [(k, a) for k, a in spectrum if k <= max_harmonic] or [spectrum[0]]
        table = sum(a * np.sin(k * phase) for k, a in kept)
        table *= (1.0 / np.sqrt(2)) / np.sqrt(np.mean(table ** 2))
        tables.append(table)
    return tables[0].astype(np.float32), (tables[1] - tables[0]).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _time_warp(vibrato_hz: float, vibrato_cents: float, sample_rate: int) -> np.ndarray:
    """Vibrato as warped time: float64 [_CURVE_SECONDS * rate] positions in samples (phase = f / rate * warp);
    the vibrato fades in over the first 0.3 s."""
    n = int(_CURVE_SECONDS * sample_rate)
    t = np.arange(n, dtype=np.float64)
    if vibrato_cents <= 0:
        return t
    depth = 2.0 ** (vibrato_cents / 1200.0) - 1.0  # relative frequency deviation
    seconds = t / sample_rate
    fade = np.minimum(1.0, seconds / 0.3)
    # d/dt of the added term is ~ depth * fade * cos(...) * rate: a relative frequency deviation of `depth`.
    return t + fade * depth * sample_rate / (2 * np.pi * vibrato_hz) * np.sin(2 * np.pi * vibrato_hz * seconds)


@functools.lru_cache(maxsize=None)
def _exp_curve(time_constant_s: float, sample_rate: int) -> np.ndarray:
    """exp(-t / time_constant), float32 [_CURVE_SECONDS * rate]."""
    t = np.arange(int(_CURVE_SECONDS * sample_rate), dtype=np.float32) / sample_rate
    return np.exp(-t / np.float32(time_constant_s)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _noise_table(sample_rate: int) -> np.ndarray:
    """High-passed white noise (breath), float32 [4 s of samples], unit RMS, from a fixed seed."""
    noise = np.random.default_rng(20240611).standard_normal(4 * sample_rate + 1)
    noise = np.diff(noise) + 0.5 * noise[1:]
    return (noise / np.std(noise)).astype(np.float32)


def _envelope(timbre: _Timbre, gate_n: int, total_n: int, sample_rate: int) -> np.ndarray:
    """Amplitude envelope of one note, float32 [total_n]: attack, then exponential decay (decaying timbres) or
    an overshoot settling on the sustain level, then a linear release starting at gate_n."""
    attack_n = max(1, min(int(timbre.attack_s * sample_rate), gate_n))
    if timbre.decay_s is not None:
        env = _exp_curve(timbre.decay_s, sample_rate)[:total_n].copy()
    elif timbre.overshoot_s > 0:
        env = timbre.sustain + (1 - timbre.sustain) * _exp_curve(timbre.overshoot_s, sample_rate)[:total_n]
    else:
        env = np.ones(total_n, np.float32)
    env[:attack_n] *= np.linspace(0.0, 1.0, attack_n, dtype=np.float32)
    release_start = gate_n if timbre.decay_s is None else min(total_n, gate_n + int(timbre.ring_s * sample_rate))
    release_n = total_n - release_start
    if release_n > 0:
        env[release_start:] *= np.linspace(1.0, 0.0, release_n, dtype=np.float32)
    return env


def _render_wavetable_note(instrument: str, pitches: tuple[int, ...], gate_n: int, brightness: float,
                           sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """One note (or chord) of a wavetable instrument, float32 [gate + release (+ ring) samples]; each pitch's
    oscillator has unit amplitude before the envelope."""
    timbre = _TIMBRES[instrument]
    tail_s = timbre.release_s + (timbre.ring_s if timbre.decay_s is not None else 0.0)
    total_n = min(gate_n + int(tail_s * sample_rate), int(_CURVE_SECONDS * sample_rate))
    gate_n = min(gate_n, total_n)
    freqs = [midi_to_hz(p) for p in pitches]
    if timbre.detune_cents:
        ratio = 2.0 ** (timbre.detune_cents / 1200.0)
        freqs = [f * r for f in freqs for r in (ratio, 1.0 / ratio)]
    max_harmonic = max(1, int(0.45 * sample_rate / (max(freqs) * 1.01)))
    dull, diff = _wavetables(instrument, max_harmonic)
    warp = _time_warp(timbre.vibrato_hz, timbre.vibrato_cents, sample_rate)[:total_n]
    offsets = rng.integers(0, _TABLE_SIZE, len(freqs))
    dull_sum = np.zeros(total_n, np.float32)
    diff_sum = np.zeros(total_n, np.float32)
    for f, offset in zip(freqs, offsets):
        index = (warp * (f * _TABLE_SIZE / sample_rate) + offset).astype(np.int64)
        index &= _TABLE_MASK
        dull_sum += dull[index]
        diff_sum += diff[index]
    if timbre.detune_cents:
        dull_sum *= 0.7
        diff_sum *= 0.7
    if timbre.brightness_decay_s is not None:  # bright attack fading to dull; louder = brighter for longer
        weight = _exp_curve(timbre.brightness_decay_s * (0.5 + brightness), sample_rate)[:total_n]
        floor = timbre.brightness_floor * brightness
        weight = np.float32(floor) + np.float32(0.15 + 0.85 * brightness - floor) * weight
    else:
        weight = np.float32(brightness)
    note = dull_sum + weight * diff_sum
    if timbre.breath:  # a random stretch of the (4 s) breath-noise table
        table = _noise_table(sample_rate)
        start = int(rng.integers(0, max(1, len(table) - total_n)))
        noise = table[start:start + total_n]
        note[:len(noise)] += np.float32(timbre.breath * len(pitches) * (0.5 + brightness)) * noise
    note *= _envelope(timbre, gate_n, total_n, sample_rate)
    return note


_KS_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def _karplus_strong(midi: int, brightness_level: int, sample_rate: int) -> np.ndarray:
    """A plucked string (Karplus-Strong), float32 [min(_KS_SECONDS, T60) * rate], peak ~1, fading to 0 over its
    last quarter (T60: 60 dB decay time of the fundamental, ~3 s at 220 Hz, shorter for higher notes); cached.

    A noise burst (smoothed more for lower brightness_level 0-2) circulates in a delay line of P samples with a
    two-point average (the string's loss, stronger for higher harmonics); the loop runs in blocks of P samples.
    The integer P gives a period of P + 0.5 samples, so the result is resampled to the exact pitch."""
    key = (midi, brightness_level, sample_rate)
    cached = _KS_CACHE.get(key)
    if cached is not None:
        return cached
    freq = midi_to_hz(midi)
    period = sample_rate / freq                       # wanted, in samples
    delay = max(2, int(math.floor(period - 0.5)))     # loop period delay + 0.5 <= wanted period
    ratio = (delay + 0.5) / period                    # read speed (<= 1) to stretch the loop to the pitch
    t60_s = float(np.clip(3.0 * math.sqrt(220.0 / freq), 0.6, 5.0))  # of the fundamental
    n_out = int(min(_KS_SECONDS, t60_s) * sample_rate)
    n_loop = int(n_out * ratio) + 2
    loss = 10.0 ** (-3.0 / (t60_s * freq)) / math.cos(math.pi * freq / sample_rate)
    gain = 0.5 * min(loss, 0.9999)
    # Initial string shape: a triangle (harmonics fall as 1/k^2) plucked nearer the bridge for brighter plucks,
    # plus a little noise for the pick's attack (more for brighter plucks); softer plucks are smoothed further.
    position = np.arange(delay) / delay
    pluck_at = (0.25, 0.17, 0.1)[brightness_level]
    shape = np.where(position < pluck_at, position / pluck_at, (1.0 - position) / (1.0 - pluck_at))
    burst_rng = np.random.default_rng([midi, brightness_level, 4021])
    burst = shape + (0.1 + 0.1 * brightness_level) * burst_rng.uniform(-1.0, 1.0, delay)
    width = 3 - brightness_level                      # moving-average width: softer plucks are duller
    if width > 1:
        burst = np.convolve(np.concatenate([burst, burst[:width - 1]]), np.ones(width) / width, mode="valid")
    burst -= burst.mean()
    line = np.zeros(n_loop + 1)                       # line[0] is y[-1] = 0
    line[1:delay + 1] = burst
    for start in range(delay + 1, n_loop + 1, delay):
        stop = min(start + delay, n_loop + 1)
        back = start - delay  # y[n] = gain * (y[n - delay] + y[n - delay - 1]), a whole block at once
        line[start:stop] = gain * (line[back:back + stop - start] + line[back - 1:back - 1 + stop - start])
    y = line[1:]
    out = np.interp(np.arange(n_out) * ratio, np.arange(len(y)), y)
    fade_n = n_out // 4
    out[-fade_n:] *= np.linspace(1.0, 0.0, fade_n)
    out /= max(1e-9, np.max(np.abs(out[: max(1, int(0.05 * sample_rate))])))
    result = out.astype(np.float32)
    _KS_CACHE[key] = result
    return result


def _render_plucked_note(pitches: tuple[int, ...], gate_n: int, brightness: float, sample_rate: int,
                         strum_s: float = 0.012) -> np.ndarray:
    """One plucked note or strummed chord, float32 [gate + 30 ms release samples] (at most _KS_SECONDS);
    strings rung out before that are silent."""
    level = 0 if brightness < 0.4 else (1 if brightness < 0.75 else 2)
    release_n = int(0.03 * sample_rate)
    total_n = min(gate_n + release_n, int(_KS_SECONDS * sample_rate))
    note = np.zeros(total_n, np.float32)
    strum_n = int(strum_s * sample_rate)
    for i, pitch in enumerate(pitches):
        offset = min(i * strum_n, total_n - 1)
        string = _karplus_strong(pitch, level, sample_rate)
        m = min(len(string), total_n - offset)
        note[offset:offset + m] += string[:m]
    gate_n = min(gate_n, total_n)
    note[gate_n:] *= np.linspace(1.0, 0.0, total_n - gate_n, dtype=np.float32)  # damped by the next note
    return note * np.float32(0.75)


def render_note(instrument: str, midi_pitch: int, seconds: float, sample_rate: int,
                brightness: float = 0.55, seed: int = 0) -> np.ndarray:
    """One dry note of an instrument held for `seconds`, float32 [samples] (gate plus the instrument's release
    or ring; plucked notes at most 2.5 s), unnormalized (peak ~1). For inspecting timbres and in tests."""
    gate_n = int(round(seconds * sample_rate))
    if instrument == "plucked":
        return _render_plucked_note((midi_pitch,), gate_n, brightness, sample_rate)
    return _render_wavetable_note(instrument, (midi_pitch,), gate_n, brightness, sample_rate,
                                  np.random.default_rng(seed))


# ----------------------------------------------------------------------------------------------------------
# Drums
# ----------------------------------------------------------------------------------------------------------

def _drum_kit(style: str, sample_rate: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One-shot drum sounds of a style, float32 [samples] each (peak ~1), slightly varied per clip."""
    sr = sample_rate

    def times(seconds):
        return np.arange(int(seconds * sr), dtype=np.float32) / sr

    def noise(seconds):
        return rng.standard_normal(int(seconds * sr)).astype(np.float32)

    electronic = style == "electronic"
    kit = {}
    t = times(0.6 if electronic else 0.35)
    low = rng.uniform(42, 55) if electronic else rng.uniform(50, 62)
    freq = low + low * 3.0 * np.exp(-t / (0.045 if electronic else 0.03))
    kick = np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.exp(-t / (0.28 if electronic else 0.13))
    kick[: int(0.003 * sr)] += noise(0.003) * 0.5
    kit["kick"] = kick

    t = times(0.25)
    hiss = noise(0.25)
    hiss = np.concatenate([[0.0], np.diff(hiss)]).astype(np.float32)  # brighter
    tone_hz = rng.uniform(170, 230)
    kit["snare"] = (0.55 * np.sin(2 * np.pi * tone_hz * t) * np.exp(-t / 0.05)
                    + 0.5 * hiss * np.exp(-t / rng.uniform(0.05, 0.09)))
    if electronic:
        t = times(0.3)
        bursts = sum(np.exp(-np.maximum(t - d, 0) / 0.006) * (t >= d) for d in (0.0, 0.011, 0.023))
        clap_noise = noise(0.3)
        clap_noise = clap_noise - np.concatenate([[0.0], clap_noise[:-1]])
        kit["clap"] = 0.5 * clap_noise * (bursts + 0.6 * np.exp(-t / 0.08) * (t >= 0.03))
    for name, seconds, decay in (("hat", 0.08, 0.018), ("open_hat", 0.35, 0.1)):
        t = times(seconds)
        metal = noise(seconds)
        metal = np.diff(np.diff(metal, prepend=0.0), prepend=0.0)  # strongly high-passed
        kit[name] = 0.3 * metal * np.exp(-t / decay)
    return {name: (s / max(1e-9, np.max(np.abs(s)))).astype(np.float32) for name, s in kit.items()}


_DRUM_LEVELS = {"kick": 1.0, "snare": 0.85, "clap": 0.7, "hat": 0.22, "open_hat": 0.2}


# ----------------------------------------------------------------------------------------------------------
# Reverb and mixing
# ----------------------------------------------------------------------------------------------------------

_REVERB_SETTINGS = {"room": dict(t60_s=0.6, predelay_s=0.008, wet=0.45),
                    "hall": dict(t60_s=2.2, predelay_s=0.03, wet=0.8)}


@functools.lru_cache(maxsize=None)
def _reverb_impulse_response(kind: str, sample_rate: int) -> np.ndarray:
    """Noise-tail impulse response, float32 [t60 * rate], unit energy: a predelay, then exponentially
    decaying noise whose high band dies out faster than its low band (as air and walls absorb highs)."""
    settings = _REVERB_SETTINGS[kind]
    n = int(settings["t60_s"] * sample_rate)
    rng = np.random.default_rng([REVERBS.index(kind), 99])
    noise = rng.standard_normal(n)
    width = max(1, sample_rate // 3000)  # ~1.5 kHz moving-average low band
    low = np.convolve(noise, np.ones(width) / width, mode="same") * np.sqrt(width)
    t = np.arange(n) / sample_rate
    decay = 6.9 / settings["t60_s"]  # -60 dB at t60
    ir = low * np.exp(-decay * t) + 0.5 * (noise - low / np.sqrt(width)) * np.exp(-2.5 * decay * t)
    ir[: int(settings["predelay_s"] * sample_rate)] = 0.0
    return (ir / np.sqrt(np.sum(ir ** 2))).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _fft_length(minimum: int) -> int:
    """Smallest 2^a 3^b 5^c >= minimum (fast for numpy's FFT)."""
    best = 1 << max(0, (minimum - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            value = p35
            while value < minimum:
                value *= 2
            best = min(best, value)
            p35 *= 3
        p5 *= 5
    return best


@functools.lru_cache(maxsize=32)
def _reverb_spectrum(kind: str, sample_rate: int, fft_length: int) -> np.ndarray:
    return np.fft.rfft(_reverb_impulse_response(kind, sample_rate), fft_length).astype(np.complex64)


def apply_reverb(audio: np.ndarray, kind: str, sample_rate: int) -> np.ndarray:
    """float32 [samples]: audio (float32 [samples] at sample_rate Hz) plus its convolution with the noise-tail
    impulse response of `kind` ('dry' returns audio unchanged; 'room' decays by 60 dB in ~0.6 s, 'hall' in
    ~2.2 s), cut to the input's length."""
    if kind == "dry" or len(audio) == 0:
        return audio
    ir_n = len(_reverb_impulse_response(kind, sample_rate))
    n_fft = _fft_length(len(audio) + ir_n)
    wet = np.fft.irfft(np.fft.rfft(audio, n_fft) * _reverb_spectrum(kind, sample_rate, n_fft), n_fft)
    return audio + np.float32(_REVERB_SETTINGS[kind]["wet"]) * wet[: len(audio)].astype(np.float32)


def _add(mix: np.ndarray, start: int, sound: np.ndarray, gain: float) -> None:
    """mix[start:start + len(sound)] += gain * sound, clipped to the mix."""
    if start >= len(mix):
        return
    stop = min(len(mix), start + len(sound))
    mix[start:stop] += np.float32(gain) * sound[: stop - start]


def render(params: MusicParams, seconds: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Renders a clip: float32 [round(seconds * sample_rate)] mono audio at sample_rate Hz, peak <= 1.

    The clip's RMS is set by params.dynamics (soft ~-27 dBFS, medium ~-20 dBFS, loud ~-13 dBFS) and a tanh
    limiter keeps the peak <= 1. `rng` draws the composition (progression, melody, onset jitter, velocities)
    and the drum sounds."""
    n = int(round(seconds * sample_rate))
    if n <= 0:
        return np.zeros(0, np.float32)
    score = compose(params, seconds, rng)
    brightness = _DYNAMICS_BRIGHTNESS[params.dynamics]
    mix = np.zeros(n, np.float32)
    for part, notes in score.parts.items():
        gain = _PART_GAINS[part]
        for note in notes:
            gate_n = max(1, int(note.gate_s * sample_rate))
            if params.instrument == "plucked":
                sound = _render_plucked_note(note.pitches, gate_n, brightness, sample_rate)
            else:
                sound = _render_wavetable_note(params.instrument, note.pitches, gate_n, brightness, sample_rate,
                                               rng)
            _add(mix, int(note.onset_s * sample_rate), sound, gain * note.velocity)
    if score.drum_hits:
        kit = _drum_kit(params.drums, sample_rate, rng)
        for onset_s, drum, velocity in score.drum_hits:
            _add(mix, int(onset_s * sample_rate), kit[drum], _PART_GAINS["drums"] * _DRUM_LEVELS[drum] * velocity)
    mix = apply_reverb(mix, params.reverb, sample_rate)
    rms = float(np.sqrt(np.mean(np.square(mix, dtype=np.float64))))
    if rms < 1e-9:
        return mix
    mix *= np.float32(_DYNAMICS_RMS[params.dynamics] / rms)
    return np.tanh(mix).astype(np.float32)


def clear_caches() -> None:
    """Empties the caches of rendered pieces (Karplus-Strong notes, wavetables, curves, breath noise, reverb
    spectra); what is rendered afterwards is identical, only slower until they fill again."""
    _KS_CACHE.clear()
    for cached in (_wavetables, _time_warp, _exp_curve, _noise_table, _reverb_impulse_response, _fft_length,
                   _reverb_spectrum):
        cached.cache_clear()
