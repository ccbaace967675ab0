"""Codec evaluation: reconstruct held-out clips and measure how close they come back.

Metrics (means over clips): `si_snr_db` (scale-invariant SNR, dB), `mel_distance` (the training metric: mean
over mel scales of the mean |mel(x) - mel(x̂)|, see codec_losses.MultiScaleMelLoss), `bitrate_kbps` of the
levels used, `num_examples`, and `num_skipped` (files that could not be decoded or are shorter than the longest
mel window; each is printed with its reason).

Clips: the `split` files of an audio folder (captions.jsonl `split` fields; files without one count as
'train'), or, with no folder, the embedded synthetic music's test clips. Each clip is mixed to mono, resampled
to the codec's rate, cut to its first `clip_seconds`, padded to whole frames for the codec and trimmed back.
"""
from __future__ import annotations

import sys
from typing import Optional

import jax
import numpy as np

from musiclm_jax.codec import Codec
from musiclm_jax.codec_losses import MultiScaleMelLoss
from musiclm_jax.data import audio_io, captioned_audio, synthetic_music
from musiclm_jax.evaluation.audio_metrics import si_snr_db

SYNTHETIC_TEST_SEED = 2  # the test split of the synthetic_music raw-audio tasks (tasks/audio.py)


def _clips(audio_dir: Optional[str], split: str, sample_rate: int, clip_seconds: float, max_examples: int,
           min_samples: int):
    """Yields (name, mono audio [samples]) and returns nothing; skipped files are reported on stderr."""
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
    for path in paths[:max_examples]:
        try:
            audio = audio_io.load_audio(path, sample_rate, max_seconds=clip_seconds)
        except audio_io.AudioDecodeError as e:
            yield path, e
            continue
        yield path, audio if len(audio) >= min_samples else ValueError(
            f"{path}: {len(audio)} samples, fewer than the longest mel window ({min_samples})")


def evaluate_codec(checkpoint_dir: str, audio_dir: Optional[str] = None, split: str = "test",
                   max_examples: int = 64, clip_seconds: float = 4.0, num_quantizers: Optional[int] = None,
                   batch_size: int = 8, step: Optional[int] = None) -> dict:
    """Evaluates the codec of run directory `checkpoint_dir` (see the module docstring); returns the metrics.

    num_quantizers: levels used (bitrate scalability); None uses all.
    """
    codec = Codec.from_checkpoint(checkpoint_dir, step)
    n_q = codec.num_quantizers if num_quantizers is None else int(num_quantizers)
    mel = MultiScaleMelLoss(codec.sample_rate)
    mel_distance = jax.jit(mel.mel_distance)
    window = int(round(clip_seconds * codec.sample_rate))  # every batch is [batch_size, window]: one compile

    si_snrs, mels, skipped = [], [], {}
    pending: list[tuple[str, np.ndarray]] = []

    def flush():
        batch = np.zeros((batch_size, window), np.float32)
        for row, (_, audio) in enumerate(pending):
            batch[row, :len(audio)] = audio
        recon = codec.reconstruct(batch, n_q)
        for row, (_, audio) in enumerate(pending):
            estimate = recon[row, :len(audio)]
            si_snrs.append(si_snr_db(audio, estimate))
            mels.append(float(mel_distance(audio[None], estimate[None])))
        pending.clear()

    for name, audio in _clips(audio_dir, split, codec.sample_rate, clip_seconds, max_examples, max(mel.scales)):
        if isinstance(audio, Exception):
            reason = type(audio).__name__
            skipped[reason] = skipped.get(reason, 0) + 1
            print(f"codec eval: skipping {audio}", file=sys.stderr)
            continue
        pending.append((name, audio))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    if not si_snrs:
        raise ValueError(f"codec eval: no clip could be evaluated (skipped: {skipped})")
    return {
        "si_snr_db": float(np.mean(si_snrs)),
        "mel_distance": float(np.mean(mels)),
        "bitrate_kbps": codec.bitrate_kbps(n_q),
        "num_quantizers": n_q,
        "num_examples": len(si_snrs),
        "num_skipped": int(sum(skipped.values())),
    }
