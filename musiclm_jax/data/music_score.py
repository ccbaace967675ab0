"""Composition of a synthetic clip: `compose(params, seconds, rng) -> Score`, the notes (onsets and gates in
seconds, pitches as MIDI note numbers) of its melody, chords and bass, and its drum hits (onsets in seconds).

Holds the scale, progression, degree-stability and onset-pattern tables (patterns in beats within a bar):
melodies on the major / (harmonic-)minor scale over I-IV-V style progressions, and each drum style's pattern."""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from musiclm_jax.data.music_params import MusicParams

_SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
# Four-bar chord progressions as scale-degree roots (0 = tonic): all start on the tonic, and every prefix of
# them (a slow clip may hold only two or three bars) still implies its key rather than a neighbouring one.
_PROGRESSIONS = {
    "major": ((0, 3, 4, 0), (0, 3, 0, 4), (0, 0, 3, 4), (0, 3, 4, 5), (0, 0, 1, 4), (0, 0, 5, 3)),
    "minor": ((0, 3, 4, 0), (0, 5, 3, 4), (0, 3, 0, 4), (0, 0, 3, 4), (0, 5, 6, 0), (0, 3, 5, 4)),
}
# How stable each scale degree sounds in its key (the diatonic entries of the Krumhansl-Kessler probe-tone
# ratings): melodies pick degrees with these weights, so a melody alone states its key and mode.
_DEGREE_STABILITY = {"major": (6.35, 3.48, 4.38, 4.09, 5.19, 3.66, 2.88),
                     "minor": (6.33, 3.52, 5.38, 3.53, 4.75, 3.98, 3.34)}
# Weight of a melodic interval of 0, 1, 2, ... scale steps (steps and small leaps are common).
_INTERVAL_WEIGHTS = (0.35, 1.0, 0.8, 0.45, 0.35, 0.15, 0.1, 0.1)
# Melody onset patterns within one bar, in beats.
_MELODY_PATTERNS = {
    "straight": ((0, 1, 2, 3), (0, 0.5, 1, 2, 3), (0, 1, 1.5, 2, 3), (0, 1, 2, 2.5, 3, 3.5), (0, 2),
                 (0, 0.5, 1, 1.5, 2, 3)),
    "syncopated": ((0, 1.5, 3), (0, 0.5, 1.5, 2.5, 3), (0, 1.5, 2.5, 3.5), (0, 1, 1.5, 2.5), (0.5, 1.5, 3)),
    "waltz": ((0, 1, 2), (0, 2), (0,), (0, 1.5, 2), (0, 0.5, 1, 2)),
}
# Chord and bass onset patterns within one bar, in beats (one pattern per clip).
_CHORD_PATTERNS = {
    "straight": ((0, 1, 2, 3), (0, 2)),
    "syncopated": ((0, 1.5, 3), (0, 1.5, 2.5, 3.5)),
    "waltz": ((1, 2),),
}
_BASS_PATTERNS = {"straight": ((0, 2), (0,)), "syncopated": ((0, 1.5, 3), (0, 2.5)), "waltz": ((0,),)}
_BEATS_PER_BAR = {"straight": 4, "syncopated": 4, "waltz": 3}

_MAX_GATE_S = 4.5          # no note is held longer than this


@dataclasses.dataclass(frozen=True)
class Note:
    """One note or chord of a part: onset and gate in seconds, MIDI pitches, velocity (a gain)."""

    onset_s: float
    gate_s: float                 # how long the note is held (before its release)
    pitches: tuple[int, ...]      # MIDI note numbers sounding together
    velocity: float               # ~0.65-1.1 (accented downbeats)


@dataclasses.dataclass
class Score:
    """The notes of each part and the drum hits of a clip."""

    parts: dict[str, list[Note]]                  # 'melody', 'chords', 'bass'
    drum_hits: list[tuple[float, str, float]]     # (onset_s, drum name, velocity)


def _degree_to_midi(degree: int, tonic_midi: int, mode: str, raise_seventh: bool) -> int:
    """MIDI pitch of scale degree `degree` (0 = tonic, 7 = tonic an octave up, negative = below)."""
    octave, step = divmod(degree, 7)
    semitone = _SCALES[mode][step]
    if raise_seventh and mode == "minor" and step == 6:
        semitone = 11  # harmonic minor: the leading tone of the dominant chord
    return tonic_midi + 12 * octave + semitone


def _chord_pitch_classes(root: int, key: int, mode: str) -> list[int]:
    """Pitch classes (0-11) of the triad on scale degree `root` (V is major in minor keys)."""
    raise_seventh = root == 4
    return [_degree_to_midi(root + i, key, mode, raise_seventh) % 12 for i in (0, 2, 4)]


def _swing(beat: float, swung: bool) -> float:
    """Moves off-beat eighths (x.5) to the third triplet (x.667) when swung."""
    if swung and abs(beat % 1 - 0.5) < 1e-6:
        return beat + 1.0 / 6.0
    return beat


def compose(params: MusicParams, seconds: float, rng: np.random.Generator) -> Score:
    """The score of a clip `seconds` long: one chord per bar from a four-bar progression, the texture's parts
    (melody; chords and bass) on the rhythm's onset patterns, drum hits, with slight timing jitter (none with
    electronic drums) and accented downbeats."""
    beat_s = 60.0 / params.tempo_bpm
    beats_per_bar = _BEATS_PER_BAR[params.rhythm]
    bar_s = beat_s * beats_per_bar
    n_bars = max(1, int(math.ceil(seconds / bar_s)))
    progressions = _PROGRESSIONS[params.mode]
    progression = progressions[int(rng.integers(len(progressions)))]
    swung = params.drums == "shuffle"
    jitter_s = 0.0 if params.drums == "electronic" else 0.004  # seconds (standard deviation)
    chords = [progression[b % len(progression)] for b in range(n_bars)]
    parts: dict[str, list[Note]] = {"melody": [], "chords": [], "bass": []}

    def at(bar: int, beat: float) -> float:
        return bar * bar_s + _swing(beat, swung) * beat_s

    def humanize(t: float) -> float:
        return max(0.0, t + float(rng.normal(0.0, jitter_s))) if jitter_s else t

    def velocity(beat: float) -> float:
        accent = 1.0 if beat == 0 else (0.85 if float(beat).is_integer() else 0.72)
        return accent * float(rng.uniform(0.9, 1.1))

    def add_part(name: str, events: list[tuple[float, float, tuple[int, ...]]]):
        events.sort()
        for i, (onset, beat, pitches) in enumerate(events):
            next_onset = events[i + 1][0] if i + 1 < len(events) else n_bars * bar_s
            gate = min(_MAX_GATE_S, max(0.06, 0.92 * (next_onset - onset)))
            parts[name].append(Note(humanize(onset), gate, pitches, velocity(beat)))

    if params.texture in ("melody", "both"):
        add_part("melody", [(at(bar, beat), beat, (pitch,)) for bar, beat, pitch in
                            _compose_melody(params, chords, len(progression), rng)])

    if params.texture in ("chords", "both"):
        chord_patterns = _CHORD_PATTERNS[params.rhythm]
        chord_pattern = chord_patterns[int(rng.integers(len(chord_patterns)))]
        if params.tempo_bpm > 150 and params.rhythm == "straight":
            chord_pattern = (0, 2)
        bass_patterns = _BASS_PATTERNS[params.rhythm]
        bass_pattern = bass_patterns[int(rng.integers(len(bass_patterns)))]
        chord_events, bass_events = [], []
        for bar in range(n_bars):
            pcs = _chord_pitch_classes(chords[bar], params.key, params.mode)
            voicing = tuple(sorted(53 + (pc - 53) % 12 for pc in pcs))  # close voicing in F3..E4
            for beat in chord_pattern:
                chord_events.append((at(bar, beat), beat, voicing))
            root_pc = pcs[0]
            fifth_pc = pcs[2]
            for k, beat in enumerate(bass_pattern):
                pc = fifth_pc if (k == len(bass_pattern) - 1 and k > 0 and rng.random() < 0.5) else root_pc
                bass_events.append((at(bar, beat), beat, (36 + (pc - 36) % 12,)))  # C2..B2
        add_part("chords", chord_events)
        add_part("bass", bass_events)

    drum_hits = _drum_pattern(params, n_bars, beat_s, beats_per_bar, rng) if params.drums else []
    drum_hits = [(humanize(t), name, v) for t, name, v in drum_hits]
    return Score(parts=parts, drum_hits=drum_hits)


def _compose_melody(params: MusicParams, chords: list[int], phrase_bars: int,
                    rng: np.random.Generator) -> list[tuple[int, float, int]]:
    """(bar, beat, MIDI pitch) of a melody over the bar chords (scale-degree roots).

    Onsets come from the rhythm's bar patterns. Each pitch is drawn over the scale degrees within reach,
    weighted by interval size, by the degree's stability in the key, and (much more on strong beats) by being
    a tone of the bar's chord; phrases start and end on the tonic."""
    beats_per_bar = _BEATS_PER_BAR[params.rhythm]
    tonic = 60 + params.key - (12 if params.key > 8 else 0)  # tonic in A3..Ab4: melody ~G3..C6
    patterns = _MELODY_PATTERNS[params.rhythm]
    candidates = np.arange(-2, 10)  # scale degrees
    stability = np.array(_DEGREE_STABILITY[params.mode])[candidates % 7] ** 2
    interval_weights = np.array(_INTERVAL_WEIGHTS)
    degree = int(rng.choice([0, 0, 0, 2, 4]))
    notes = []
    for bar, root in enumerate(chords):
        pattern = patterns[int(rng.integers(len(patterns)))]
        if params.tempo_bpm > 150:  # keep the note rate below ~6 per second
            pattern = tuple(b for b in pattern if float(b).is_integer()) or (0,)
        in_chord = np.isin((candidates - root) % 7, (0, 2, 4))
        phrase_end = bar % phrase_bars == phrase_bars - 1 and root == 0
        for j, beat in enumerate(pattern):
            strong = beat == 0 or (beats_per_bar == 4 and beat == 2)
            if bar == 0 and j == 0:
                pass
            elif phrase_end and j == len(pattern) - 1:
                degree = 7 if degree >= 4 else 0  # cadence on the tonic
            else:
                distance = np.minimum(np.abs(candidates - degree), len(interval_weights) - 1)
                weights = interval_weights[distance] * stability * np.where(in_chord, 4.0 if strong else 1.5, 1.0)
                degree = int(candidates[rng.choice(len(candidates), p=weights / weights.sum())])
            notes.append((bar, beat, _degree_to_midi(degree, tonic, params.mode, raise_seventh=root == 4)))
    return notes


def _drum_pattern(params: MusicParams, n_bars: int, beat_s: float, beats_per_bar: int,
                  rng: np.random.Generator) -> list[tuple[float, str, float]]:
    """(onset_s, drum, velocity) hits of the clip's drum style, bar after bar."""
    style, waltz, syncopated = params.drums, beats_per_bar == 3, params.rhythm == "syncopated"
    beats = np.arange(beats_per_bar, dtype=np.float64)
    eighths = np.arange(0, beats_per_bar, 0.5)
    if style == "rock":
        kick = [0.0] if waltz else ([0.0, 1.5, 2.5] if syncopated else [0.0, 2.0, 2.5])
        pattern = {"kick": kick, "snare": [1.0, 2.0] if waltz else [1.0, 3.0], "hat": list(eighths)}
    elif style == "electronic":
        hats = np.arange(0, beats_per_bar, 0.25 if params.tempo_bpm < 125 else 0.5)
        pattern = {"kick": list(beats) if not waltz else [0.0], "clap": [1.0, 2.0] if waltz else [1.0, 3.0],
                   "hat": [h for h in hats if h % 1 != 0.5], "open_hat": list(beats + 0.5)}
    else:  # shuffle: swung triplet hats
        triplets = sorted(list(beats) + list(beats + 2.0 / 3.0))
        kick = [0.0] if waltz else ([0.0, 1.0 + 2.0 / 3.0, 2.0] if syncopated else [0.0, 2.0, 2.0 + 2.0 / 3.0])
        pattern = {"kick": kick, "snare": [2.0] if waltz else [1.0, 3.0], "hat": triplets}
    hits = []
    for bar in range(n_bars):
        for drum, drum_beats in pattern.items():
            for beat in drum_beats:
                accent = 1.0 if float(beat).is_integer() else 0.6
                hits.append(((bar * beats_per_bar + beat) * beat_s, drum, accent * float(rng.uniform(0.85, 1.0))))
    return hits
