"""The musical parameters of a synthetic clip and their words: the vocabularies, `MusicParams`, `sample_params`,
and the captions and MusicCaps-style aspect lists that name every parameter value.

Tempo is in beats per minute (quarter notes), keys are tonic pitch classes 0-11 (0 = C); no audio here."""
from __future__ import annotations

import dataclasses
import zlib
from typing import Optional

import numpy as np

INSTRUMENTS = ("plucked", "bowed", "blown", "struck", "synth")
DRUM_STYLES = ("rock", "electronic", "shuffle")
MODES = ("major", "minor")
TEXTURES = ("melody", "chords", "both")
RHYTHMS = ("straight", "syncopated", "waltz")
DYNAMICS = ("soft", "medium", "loud")
REVERBS = ("dry", "room", "hall")
KEY_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
TEMPO_RANGE_BPM = (60, 180)  # inclusive, integers
NO_DRUMS_PROBABILITY = 0.3


@dataclasses.dataclass(frozen=True)
class MusicParams:
    """Everything a clip is rendered from.

    Attributes:
      instrument: one of INSTRUMENTS.
      drums: None (no drums) or one of DRUM_STYLES.
      tempo_bpm: beats per minute (quarter notes), e.g. 92.0.
      key: tonic pitch class, 0-11 (0 = C, 1 = C#, ..., 11 = B).
      mode: "major" or "minor".
      texture: "melody", "chords" (chords with a bass line) or "both".
      rhythm: "straight" (4/4), "syncopated" (4/4, off-beat onsets) or "waltz" (3/4).
      dynamics: "soft", "medium" or "loud".
      reverb: "dry", "room" or "hall".
    """

    instrument: str
    drums: Optional[str]
    tempo_bpm: float
    key: int
    mode: str
    texture: str
    rhythm: str
    dynamics: str
    reverb: str

    def __post_init__(self):
        checks = (("instrument", self.instrument, INSTRUMENTS), ("drums", self.drums, (None,) + DRUM_STYLES),
                  ("key", self.key, tuple(range(12))), ("mode", self.mode, MODES),
                  ("texture", self.texture, TEXTURES), ("rhythm", self.rhythm, RHYTHMS),
                  ("dynamics", self.dynamics, DYNAMICS), ("reverb", self.reverb, REVERBS))
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"MusicParams.{name}={value!r} is not one of {allowed}")
        if not 20.0 <= float(self.tempo_bpm) <= 300.0:
            raise ValueError(f"MusicParams.tempo_bpm={self.tempo_bpm!r} is outside 20-300 bpm")


def sample_params(rng: np.random.Generator) -> MusicParams:
    """Draws clip parameters: every field uniform over its values, except drums (None with probability 0.3,
    else a uniform style) and tempo_bpm (a uniform integer in TEMPO_RANGE_BPM, as a float)."""
    def pick(values):
        return values[int(rng.integers(len(values)))]

    instrument = pick(INSTRUMENTS)
    drums = None if rng.random() < NO_DRUMS_PROBABILITY else pick(DRUM_STYLES)
    tempo = float(rng.integers(TEMPO_RANGE_BPM[0], TEMPO_RANGE_BPM[1] + 1))
    return MusicParams(instrument=instrument, drums=drums, tempo_bpm=tempo, key=int(rng.integers(12)),
                       mode=pick(MODES), texture=pick(TEXTURES), rhythm=pick(RHYTHMS),
                       dynamics=pick(DYNAMICS), reverb=pick(REVERBS))


def tempo_word(bpm: float) -> str:
    """'slow' below 90 bpm, 'fast' above 130 bpm, else 'medium'."""
    if bpm < 90:
        return "slow"
    if bpm > 130:
        return "fast"
    return "medium"


def key_name(key: int) -> str:
    """The tonic's name for a pitch class 0-11 (0 = 'C'; sharps or flats as usually written)."""
    return KEY_NAMES[key % 12]


_INSTRUMENT_PHRASES = {
    "plucked": ("a plucked string instrument", "plucked guitar-like strings"),
    "bowed": ("bowed strings", "a bowed string instrument"),
    "blown": ("a blown woodwind", "a breathy blown wind instrument"),
    "struck": ("a struck mallet instrument", "struck marimba-like mallets"),
    "synth": ("a synth", "an analog-style synthesizer"),
}
_INSTRUMENT_ASPECTS = {"plucked": "string instrument", "bowed": "string instrument", "blown": "wind instrument",
                       "struck": "mallet percussion", "synth": "synthesizer"}
_DRUM_PHRASES = {
    None: ("no drums", "no drums at all"),
    "rock": ("rock drums", "a rock drum beat"),
    "electronic": ("electronic drums", "an electronic drum-machine beat"),
    "shuffle": ("shuffle drums", "a shuffle drum groove"),
}
_TEXTURE_PHRASES = {"melody": ("melody", "lead melody"), "chords": ("chord progression", "chord accompaniment"),
                    "both": ("melody over chords", "melody with backing chords")}
_RHYTHM_PHRASES = {"straight": ("a straight rhythm", "a steady straight rhythm"),
                   "syncopated": ("a syncopated rhythm", "a syncopated off-beat rhythm"),
                   "waltz": ("a waltz rhythm in 3/4", "3/4 waltz time")}
_DYNAMICS_PHRASES = {"soft": ("soft", "quiet, soft"), "medium": ("medium-volume", "moderate, medium-loudness"),
                     "loud": ("loud", "loud, energetic")}
_REVERB_PHRASES = {"dry": ("a dry mix without reverb", "a dry, reverb-free sound"),
                   "room": ("room reverb", "a small room reverb"),
                   "hall": ("hall reverb", "a large concert-hall reverb")}
_CAPTION_TEMPLATES = (
    "a {dyn} {key} {tex} on {instr} at {bpm} bpm ({tempo} tempo) in {rhythm}, with {drums} and {reverb}",
    "{instr} playing a {dyn} {tex} in {key}: {rhythm} at a {tempo} tempo of {bpm} bpm, {drums}, {reverb}",
    "{tempo}-tempo {key} music at {bpm} bpm, a {dyn} {tex} on {instr} with {drums}, {rhythm} and {reverb}",
    "{instr} with {drums}: a {dyn}, {tempo}-tempo {tex} in {key} at {bpm} bpm, {rhythm}, {reverb}",
    "a {tempo}-tempo piece in {key} ({bpm} bpm) where {instr} plays a {dyn} {tex} in {rhythm}; {drums}; {reverb}",
)


def _param_hash(params: MusicParams) -> int:
    """A stable (not per-process salted) hash of the parameters, for choosing wordings."""
    return zlib.crc32(repr(dataclasses.astuple(params)).encode())


def caption(params: MusicParams) -> str:
    """A one-sentence description naming every parameter value in words (instrument, drums or 'no drums',
    tempo word and bpm, key and mode, texture, rhythm, dynamics, reverb); the template and phrasings vary
    deterministically with the parameters."""
    h = _param_hash(params)

    def variant(phrases, bit):
        return phrases[(h >> bit) & 1]

    words = dict(
        dyn=variant(_DYNAMICS_PHRASES[params.dynamics], 8),
        key=f"{key_name(params.key)} {params.mode}",
        tex=variant(_TEXTURE_PHRASES[params.texture], 9),
        instr=variant(_INSTRUMENT_PHRASES[params.instrument], 10),
        bpm=f"{params.tempo_bpm:.0f}",
        tempo=tempo_word(params.tempo_bpm),
        rhythm=variant(_RHYTHM_PHRASES[params.rhythm], 11),
        drums=variant(_DRUM_PHRASES[params.drums], 12),
        reverb=variant(_REVERB_PHRASES[params.reverb], 13),
    )
    return _CAPTION_TEMPLATES[h % len(_CAPTION_TEMPLATES)].format(**words)


def aspects(params: MusicParams) -> list[str]:
    """MusicCaps-style aspect list, e.g. ['plucked', 'string instrument', 'minor key', 'A minor', 'slow tempo',
    '72 bpm', 'rock drums', 'room reverb', 'soft', 'melody', 'straight rhythm']."""
    out = [params.instrument, _INSTRUMENT_ASPECTS[params.instrument], f"{params.mode} key",
           f"{key_name(params.key)} {params.mode}", f"{tempo_word(params.tempo_bpm)} tempo",
           f"{params.tempo_bpm:.0f} bpm", f"{params.drums} drums" if params.drums else "no drums",
           "dry" if params.reverb == "dry" else f"{params.reverb} reverb",
           "medium volume" if params.dynamics == "medium" else params.dynamics]
    out += {"melody": ["melody"], "chords": ["chords"], "both": ["melody", "chords"]}[params.texture]
    out.append("waltz" if params.rhythm == "waltz" else f"{params.rhythm} rhythm")
    return out
