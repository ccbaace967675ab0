"""Codec evaluation: reconstruct held-out clips and measure how close they come back.

Metrics (means over clips): `si_snr_db` (scale-invariant SNR, dB), `mel_distance` (mean over SoundStream's
six mel scales, 64 to 2048 samples with 64 bands, of the mean |mel(x) - mel(x̂)|; one fixed definition for every
codec, whatever its training loss), `pitch_class_agreement` (the melody tokens of the round trip against the
clip's, on the clip's pitched frames) and `chroma_cqt_agreement` (the same with librosa's chroma_cqt argmax on
frames with a clear maximum, an independent measure; see evaluation/pitch_metrics.py, both pooled over every
frame of every clip), `codebook_perplexity` (per level, over all frames of all clips: exp(entropy) of the code
histogram), `bitrate_kbps` of the levels used, `num_examples`, and `num_skipped` (files that could not be
decoded or are shorter than the longest mel window; each is printed with its reason).

`codec_sanity(codec)` is the signal-level check of a codec: pure tones, silence and the DC offset.

Clips: the `split` files of an audio folder (captions.jsonl `split` fields; files without one count as
'train'), the `split` clips of a MusicCaps folder (MUSICCAPS_DIR: is_audioset_eval rows are 'test'), or, with
neither, the embedded synthetic music's test clips. Each clip is mixed to mono, resampled
to the codec's rate, cut to its first `clip_seconds`, padded to whole frames for the codec and trimmed back.
"""
from __future__ import annotations

import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.codec.inference import Codec
from musiclm_jax.codec.losses import MultiScaleMelLoss
from musiclm_jax.data import audio_io, captioned_audio, synthetic_music
from musiclm_jax.evaluation import pitch_metrics
from musiclm_jax.evaluation.audio_metrics import si_snr_db
from musiclm_jax.networks.quantizers import counts_perplexity

SYNTHETIC_TEST_SEED = 2  # the test split of the synthetic_music raw-audio tasks (tasks/audio.py)


def evaluation_clips(audio_dir: Optional[str], split: str, sample_rate: int, clip_seconds: float,
                     max_examples: int, min_samples: int, musiccaps_dir: Optional[str] = None):
    """Held-out clips (see the module docstring): yields (name, mono audio [samples] at sample_rate), or
    (path, the exception) for a file that cannot be used, which the caller counts and reports."""
    if audio_dir and musiccaps_dir:
        raise ValueError(f"set AUDIO_DIR ({audio_dir!r}) or MUSICCAPS_DIR ({musiccaps_dir!r}), not both")
    if musiccaps_dir is not None:
        paths = captioned_audio.scan_musiccaps(musiccaps_dir, sample_rate).get(split, [])
        if not paths:
            raise ValueError(f"MUSICCAPS_DIR {musiccaps_dir!r} has no decodable clips in split {split!r}")
        yield from _load(paths[:max_examples], sample_rate, clip_seconds, min_samples)
        return
    if audio_dir is None:
        if split != "test":
            raise ValueError(f"the synthetic evaluation clips are the test split; got split={split!r}")
        for i in range(max_examples):
            clip = synthetic_music.generate_clip(i, seed=SYNTHETIC_TEST_SEED, seconds=clip_seconds,
                                                 sample_rate=sample_rate)
            yield f"synthetic_music/test/{i}", clip["audio"]
        return
    paths = captioned_audio.scan_audio_folder(audio_dir, sample_rate).get(split, [])
    if not paths:
        raise ValueError(f"AUDIO_DIR {audio_dir!r} has no decodable files in split {split!r}")
    yield from _load(paths[:max_examples], sample_rate, clip_seconds, min_samples)


def _load(paths, sample_rate: int, clip_seconds: float, min_samples: int):
    for path in paths:
        try:
            audio = audio_io.load_audio(path, sample_rate, max_seconds=clip_seconds)
        except audio_io.AudioDecodeError as e:
            yield path, e
            continue
        yield path, audio if len(audio) >= min_samples else ValueError(
            f"{path}: {len(audio)} samples, fewer than the longest mel window ({min_samples})")


def evaluation_batches(audio_dir: Optional[str], split: str, sample_rate: int, clip_seconds: float,
                       max_examples: int, min_samples: int, batch_size: int, skipped: dict, label: str,
                       *, musiccaps_dir: Optional[str] = None):
    """The clips of `evaluation_clips` in fixed-shape batches: yields (batch [batch_size, clip samples] float32,
    the clips [samples] it holds in its first rows, zero-padded to the window; the last batch may hold fewer).
    A file that cannot be used is counted in `skipped` by reason and printed on stderr after `label`. Every batch
    has one shape, so a jitted model compiles once."""
    window = int(round(clip_seconds * sample_rate))
    pending: list[np.ndarray] = []

    def pack():
        batch = np.zeros((batch_size, window), np.float32)
        for row, audio in enumerate(pending):
            batch[row, :len(audio)] = audio
        return batch, list(pending)

    for _, audio in evaluation_clips(audio_dir, split, sample_rate, clip_seconds, max_examples, min_samples,
                                     musiccaps_dir):
        if isinstance(audio, Exception):
            reason = type(audio).__name__
            skipped[reason] = skipped.get(reason, 0) + 1
            print(f"{label}: skipping {audio}", file=sys.stderr)
            continue
        pending.append(audio)
        if len(pending) == batch_size:
            yield pack()
            pending.clear()
    if pending:
        yield pack()


def evaluate_codec(checkpoint_dir: str, audio_dir: Optional[str] = None, split: str = "test",
                   max_examples: int = 64, clip_seconds: float = 4.0, num_quantizers: Optional[int] = None,
                   batch_size: int = 8, step: Optional[int] = None, musiccaps_dir: Optional[str] = None,
                   sanity: bool = True) -> dict:
    """Evaluates the codec of run directory `checkpoint_dir` (see the module docstring); returns the metrics.

    num_quantizers: levels used (bitrate scalability); None uses all.
    sanity: also report `codec_sanity` (pure tones and silence through all levels) as metrics['sanity'].
    """
    codec = Codec.from_checkpoint(checkpoint_dir, step)
    n_q = codec.num_quantizers if num_quantizers is None else int(num_quantizers)
    mel = MultiScaleMelLoss(codec.sample_rate)
    mel_distance = jax.jit(mel.mel_distance)
    si_snrs, mels, skipped = [], [], {}
    agreement = {"melody": [0, 0], "chroma_cqt": [0, 0]}
    histograms = np.zeros((n_q, codec.codebook_size), np.int64)
    for batch, clips in evaluation_batches(audio_dir, split, codec.sample_rate, clip_seconds, max_examples,
                                           max(mel.scales), batch_size, skipped, "codec eval",
                                           musiccaps_dir=musiccaps_dir):
        codes = codec.encode(batch, n_q)
        recon = codec.decode(codes)[..., :batch.shape[1]]
        for row, audio in enumerate(clips):
            estimate = recon[row, :len(audio)]
            si_snrs.append(si_snr_db(audio, estimate))
            mels.append(float(mel_distance(audio[None], estimate[None])))
            for name, measure in (("melody", pitch_metrics.melody_token_agreement),
                                  ("chroma_cqt", pitch_metrics.chroma_cqt_agreement)):
                agree, total = measure(audio[None], estimate[None], codec.sample_rate)
                agreement[name][0] += agree
                agreement[name][1] += total
            frames = -(-len(audio) // codec.hop_length)
            for level in range(n_q):
                histograms[level] += np.bincount(codes[row, :frames, level], minlength=codec.codebook_size)
    if not si_snrs:
        raise ValueError(f"codec eval: no clip could be evaluated (skipped: {skipped})")
    perplexity = np.asarray(counts_perplexity(jnp.asarray(histograms, jnp.float32)))
    return {
        "si_snr_db": float(np.mean(si_snrs)),
        "mel_distance": float(np.mean(mels)),
        "pitch_class_agreement": agreement["melody"][0] / max(agreement["melody"][1], 1),
        "pitched_frames": agreement["melody"][1],
        "chroma_cqt_agreement": agreement["chroma_cqt"][0] / max(agreement["chroma_cqt"][1], 1),
        "chroma_cqt_frames": agreement["chroma_cqt"][1],
        "codebook_perplexity": [round(float(x), 2) for x in perplexity],
        "bitrate_kbps": codec.bitrate_kbps(n_q),
        "num_quantizers": n_q,
        "num_examples": len(si_snrs),
        "num_skipped": int(sum(skipped.values())),
    } | ({"sanity": codec_sanity(codec)} if sanity else {})


SANITY_TONES_HZ = (55.0, 110.0, 220.0, 440.0, 880.0, 1760.0, 3520.0, 4000.0)


def codec_sanity(codec: Codec, tones_hz=SANITY_TONES_HZ, seconds: float = 2.0, amplitude: float = 0.3,
                 settle_seconds: float = 0.5) -> dict:
    """Round trips of pure tones and of silence through `codec` (all levels).

    Returns {'tones_hz', 'dominant_hz' (of each tone's round trip after `settle_seconds`, see
    pitch_metrics.dominant_frequency), 'cents' (their error), 'max_abs_cents' (the largest |error|),
    'silence_dbfs' (the level of the silence's round trip), 'dc_offset' (the largest |mean| of any round trip,
    tones and silence)}. A tone is a sine of `amplitude` (peak, full scale 1) lasting `seconds`.
    """
    rate = codec.sample_rate
    t = np.arange(int(seconds * rate)) / rate
    inputs = np.stack([amplitude * np.sin(2 * np.pi * f * t) for f in tones_hz] + [np.zeros_like(t)]).astype(np.float32)
    out = codec.reconstruct(inputs)
    settle = int(settle_seconds * rate)
    dominant = [pitch_metrics.dominant_frequency(y[settle:], rate) for y in out[:-1]]
    cents = [round(pitch_metrics.cents(d, f), 1) for d, f in zip(dominant, tones_hz)]
    return {"tones_hz": list(tones_hz), "dominant_hz": [round(d, 2) for d in dominant], "cents": cents,
            "max_abs_cents": max(abs(c) for c in cents),
            "silence_dbfs": round(pitch_metrics.level_dbfs(out[-1]), 2),
            "dc_offset": float(np.max(np.abs(out.mean(axis=1))))}
