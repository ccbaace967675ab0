"""The procedural music dataset: determinism, audio format, captions that match the parameters, and that the
captioned properties are audible (loudness, tempo, key, instrument timbre, reverb), measured with librosa."""
import dataclasses
import re

import librosa
import numpy as np
import pytest

from musiclm_jax.data import music_params as mp
from musiclm_jax.data import music_synthesis as synth
from musiclm_jax.data import synthetic_music as sm

SR = 24000
# Krumhansl-Kessler probe-tone profiles, tonic first.
KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def _params(stream: int, index: int, **overrides) -> mp.MusicParams:
    return dataclasses.replace(mp.sample_params(np.random.default_rng([stream, index])), **overrides)


def _render(params: mp.MusicParams, seconds: float = 10.0, seed=(0,)) -> np.ndarray:
    return synth.render(params, seconds, SR, np.random.default_rng(list(seed)))


# ---------------------------------------------------------------------------------------------- determinism

def test_same_index_and_seed_give_the_same_clip_and_other_indices_or_seeds_differ():
    first = sm.generate_clip(3, seed=1, seconds=2.0)
    synth.clear_caches()  # cached plucked strings, tables and reverbs must not change the result
    again = sm.generate_clip(3, seed=1, seconds=2.0)
    assert np.array_equal(first["audio"], again["audio"])
    assert first["caption"] == again["caption"] and first["params"] == again["params"]
    assert first["id"] == "synthetic-1-3"
    for other in (sm.generate_clip(4, seed=1, seconds=2.0), sm.generate_clip(3, seed=2, seconds=2.0)):
        assert not np.array_equal(first["audio"], other["audio"])
        assert np.sqrt(np.mean((first["audio"] - other["audio"]) ** 2)) > 0.01


def test_parameters_do_not_depend_on_length_or_rate():
    assert sm.generate_clip(7, seconds=1.0, sample_rate=8000)["params"] == sm.generate_clip(7)["params"]


# ---------------------------------------------------------------------------------------------- audio format

@pytest.mark.parametrize("seconds,sample_rate", [(10.0, 24000), (2.5, 16000), (0.37, 22050), (3.0, 48000),
                                                 (1.0, 8000)])
def test_audio_is_float32_finite_bounded_loud_enough_and_of_the_requested_length(seconds, sample_rate):
    for index in range(3):
        audio = sm.generate_clip(index, seed=5, seconds=seconds, sample_rate=sample_rate)["audio"]
        assert audio.dtype == np.float32 and audio.shape == (round(seconds * sample_rate),)
        assert np.all(np.isfinite(audio))
        assert 0.05 < np.max(np.abs(audio)) <= 1.0
        half = len(audio) // 2
        assert np.sqrt(np.mean(audio[:half] ** 2)) > 0.005 and np.sqrt(np.mean(audio[half:] ** 2)) > 0.005


def test_music_params_reject_unknown_values():
    good = _params(0, 0)
    for field, value in (("instrument", "kazoo"), ("drums", "jazz"), ("key", 12), ("mode", "dorian"),
                         ("rhythm", "march"), ("dynamics", "ff"), ("reverb", "plate"), ("texture", "solo")):
        with pytest.raises(ValueError, match=field):
            dataclasses.replace(good, **{field: value})


# ---------------------------------------------------------------------------------------------- captions

def test_tempo_word_boundaries():
    assert [mp.tempo_word(b) for b in (60, 89, 90, 130, 131, 180)] == [
        "slow", "slow", "medium", "medium", "fast", "fast"]


def test_captions_and_aspects_name_every_parameter_value_and_all_values_occur():
    clips = [sm.generate_clip(i, seed=11, seconds=0.2, sample_rate=8000) for i in range(200)]
    texture_words = {"melody": ["melody"], "chords": ["chord"], "both": ["melody", "chord"]}
    rhythm_words = {"straight": ["straight"], "syncopated": ["syncopated"], "waltz": ["waltz", "3/4"]}
    for clip in clips:
        p, text, aspects = clip["params"], clip["caption"], clip["aspects"]
        joined = " | ".join(aspects)
        assert p.instrument in text and p.instrument in aspects
        drums = f"{p.drums} drum" if p.drums else "no drums"
        assert drums in text and (f"{p.drums} drums" if p.drums else "no drums") in aspects
        assert f"{p.tempo_bpm:.0f} bpm" in text and f"{p.tempo_bpm:.0f} bpm" in aspects
        tempo = mp.tempo_word(p.tempo_bpm)
        assert re.search(rf"\b{tempo}\b", text) and f"{tempo} tempo" in aspects
        assert f"{mp.key_name(p.key)} {p.mode}" in text
        assert f"{p.mode} key" in aspects and f"{mp.key_name(p.key)} {p.mode}" in aspects
        assert all(w in text and w in joined for w in texture_words[p.texture])
        assert all(w in text for w in rhythm_words[p.rhythm]) and rhythm_words[p.rhythm][0] in joined
        assert p.dynamics in text and p.dynamics in joined
        assert p.reverb in text and p.reverb in joined
        assert "None" not in text and "None" not in joined
    for field, values in (("instrument", mp.INSTRUMENTS), ("mode", mp.MODES), ("dynamics", mp.DYNAMICS),
                          ("reverb", mp.REVERBS), ("texture", mp.TEXTURES), ("rhythm", mp.RHYTHMS),
                          ("drums", (None,) + mp.DRUM_STYLES)):
        seen = {getattr(c["params"], field) for c in clips}
        assert seen == set(values), field
    keys = {c["params"].key for c in clips}
    tempos = {mp.tempo_word(c["params"].tempo_bpm) for c in clips}
    assert len(keys) == 12 and tempos == {"slow", "medium", "fast"}
    # Several sentence shapes, not one template.
    assert len({c["caption"].split()[0] for c in clips}) >= 4
    assert len({c["caption"] for c in clips}) == len(clips)


def test_split_of_is_deterministic_and_80_10_10():
    splits = [sm.split_of(i, seed=3) for i in range(5000)]
    assert splits == [sm.split_of(i, seed=3) for i in range(5000)]
    counts = {name: splits.count(name) for name in ("train", "validation", "test")}
    assert counts == {"train": 4000, "validation": 500, "test": 500}
    assert splits != [sm.split_of(i, seed=4) for i in range(5000)]
    assert len(set(splits[:30])) == 3  # interleaved, not in long runs


# ---------------------------------------------------------------------------------------------- audible

def test_loud_clips_have_more_than_twice_the_rms_of_soft_ones():
    for index in range(6):
        base = _params(21, index)
        rms = {level: float(np.sqrt(np.mean(_render(dataclasses.replace(base, dynamics=level), 4.0) ** 2)))
               for level in mp.DYNAMICS}
        assert rms["loud"] / rms["soft"] > 2.0, (base, rms)
        assert rms["soft"] < rms["medium"] < rms["loud"]


def test_tempo_is_recoverable_from_onsets_of_drum_clips():
    """librosa's onset-strength autocorrelation tempo; a period within 8% of 60/bpm, or of twice or half it."""
    hits = []
    for index in range(20):
        params = _params(31, index)
        if params.drums is None:
            params = dataclasses.replace(params, drums=mp.DRUM_STYLES[index % 3])
        audio = _render(params, seed=(32, index))
        onset_env = librosa.onset.onset_strength(y=audio, sr=SR)
        bpm = float(librosa.feature.tempo(onset_envelope=onset_env, sr=SR)[0])
        period, true_period = 60.0 / bpm, 60.0 / params.tempo_bpm
        hits.append(any(abs(period / (true_period * f) - 1.0) < 0.08 for f in (0.5, 1.0, 2.0)))
    assert sum(hits) >= 16, hits


def _estimated_key(audio: np.ndarray) -> tuple[int, str]:
    """Best-correlating Krumhansl-Kessler key of the mean chroma (n_fft 8192 so that semitones of the bass
    line, ~4-7 Hz apart at 65-125 Hz, fall in different bins)."""
    chroma = librosa.feature.chroma_stft(y=audio, sr=SR, n_fft=8192).mean(axis=1)
    scores = {(key, mode): np.corrcoef(chroma, np.roll(profile, key))[0, 1]
              for key in range(12) for mode, profile in (("major", KK_MAJOR), ("minor", KK_MINOR))}
    return max(scores, key=scores.get)


def test_key_and_mode_are_recoverable_from_chroma_without_drums():
    hits = []
    for index in range(20):
        params = _params(41, index, drums=None)
        hits.append(_estimated_key(_render(params, seed=(42, index))) == (params.key, params.mode))
    assert sum(hits) >= 14, hits


def _note_features(instrument: str, midi: int) -> dict:
    """Envelope and spectrum of one rendered 1 s note: attack (s to 50% of the peak 5 ms-frame RMS), decay
    (RMS over 0.5-0.9 s / peak), even/odd (energy of harmonics 2,4..12 over 3,5..11, in 0.1-0.5 s) and
    h4 share (harmonic 4's share of the energy of harmonics 2..12, in 0.02-0.3 s)."""
    audio = synth.render_note(instrument, midi, 1.0, SR).astype(np.float64)
    frame = int(0.005 * SR)
    rms = np.sqrt(np.mean(audio[: len(audio) // frame * frame].reshape(-1, frame) ** 2, axis=1))
    peak = rms.max()

    def harmonic_energy(start_s, stop_s):
        segment = audio[int(start_s * SR):int(stop_s * SR)]
        power = np.abs(np.fft.rfft(segment * np.hanning(len(segment)))) ** 2
        freqs = np.fft.rfftfreq(len(segment), 1.0 / SR)
        f0 = synth.midi_to_hz(midi)
        return np.array([power[np.abs(freqs - k * f0) < 0.03 * k * f0].sum() for k in range(1, 13)])

    late = harmonic_energy(0.1, 0.5)
    early = harmonic_energy(0.02, 0.3)
    return dict(attack=np.argmax(rms >= 0.5 * peak) * 0.005,
                decay=rms[int(0.5 / 0.005):int(0.9 / 0.005)].mean() / peak,
                even_odd=late[1::2].sum() / late[2::2].sum(),
                h4_share=early[3] / early[1:].sum())


def test_instruments_differ_in_envelope_and_spectrum():
    """Each pair of instruments is told apart by at least one of: plucked/struck notes decay (decay < 0.35)
    while bowed/blown/synth notes sustain (> 0.45); bowed attacks slowly (>= 40 ms), blown moderately
    (15-40 ms), the rest at once (<= 10 ms); blown (clarinet-like) has weak even harmonics (even/odd < 0.1,
    others > 1); struck (marimba-like) puts most overtone energy in its 4th harmonic (> 0.5, others < 0.3)."""
    for midi in (57, 64, 72):
        f = {name: _note_features(name, midi) for name in mp.INSTRUMENTS}
        summary = {name: {k: round(float(v), 3) for k, v in feats.items()} for name, feats in f.items()}
        assert all(f[name]["decay"] < 0.35 for name in ("plucked", "struck")), summary
        assert all(f[name]["decay"] > 0.45 for name in ("bowed", "blown", "synth")), summary
        assert f["bowed"]["attack"] >= 0.04 and 0.015 <= f["blown"]["attack"] < 0.04, summary
        assert all(f[name]["attack"] <= 0.01 for name in ("plucked", "struck", "synth")), summary
        assert f["blown"]["even_odd"] < 0.1, summary
        assert all(f[name]["even_odd"] > 1.0 for name in ("plucked", "bowed", "synth")), summary
        assert f["struck"]["h4_share"] > 0.5, summary
        assert all(f[name]["h4_share"] < 0.3 for name in ("plucked", "bowed", "blown", "synth")), summary


def test_reverb_tails_last_as_long_as_their_names_say():
    """Energy-decay time of a click through each reverb: the time the backward-integrated energy (Schroeder)
    takes to fall from -5 dB to -25 dB, times 3 (a T60 estimate): ~0 dry, ~0.6 s room, ~2.2 s hall."""
    click = np.zeros(4 * SR, np.float32)
    click[SR // 10] = 1.0
    t60 = {}
    for kind in mp.REVERBS:
        tail = synth.apply_reverb(click, kind, SR)[SR // 10 + 1:].astype(np.float64)
        assert tail.shape == (4 * SR - SR // 10 - 1,)
        if kind == "dry":
            assert np.all(tail == 0.0)
            continue
        energy = np.cumsum(tail[::-1] ** 2)[::-1]
        level_db = 10 * np.log10(energy / energy[0] + 1e-30)
        t60[kind] = 3.0 * (np.argmax(level_db < -25) - np.argmax(level_db < -5)) / SR
    assert 0.3 < t60["room"] < 0.9 and 1.5 < t60["hall"] < 3.0, t60
