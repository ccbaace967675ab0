"""MuLan evaluation: text-to-audio and audio-to-text retrieval on held-out captioned clips.

Metrics: `text_to_audio_recall_at_{1,5,10}` (the fraction of captions whose own clip is among the k clips most
similar to the caption), `audio_to_text_recall_at_{1,5,10}`, the chance levels `chance_recall_at_{1,10}` (k / N),
`mean_positive_cosine` and `mean_negative_cosine` (cosine of matching and of non-matching pairs),
`num_examples` (N) and `num_skipped`. Clips whose captions are identical count as matches of each other.

Clips: the `split` of an audio folder (captions required; bad files counted and skipped), of a MusicCaps folder,
or, with neither, the first `max_examples` clips of the embedded synthetic music's test split. Each clip is
embedded with the windowed clip embedding (MuLan.embed_audio) over its first `clip_seconds`.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from musiclm_jax.data import captioned_audio, synthetic_music
from musiclm_jax.data.bad_input import BadInputReport
from musiclm_jax.mulan.inference import MuLan

SYNTHETIC_TEST_SEED = 2  # the test split of the synthetic_music raw-audio tasks (tasks/audio.py)


def retrieval_metrics(similarity: np.ndarray, captions: list[str], ks=(1, 5, 10)) -> dict:
    """Recall@k both ways of a [texts, clips] similarity matrix whose diagonal pairs match (and any pair with
    equal captions)."""
    n = similarity.shape[0]
    same = np.array([[a == b for b in captions] for a in captions])
    metrics = {}
    for direction, sim in (("text_to_audio", similarity), ("audio_to_text", similarity.T)):
        order = np.argsort(-sim, axis=1, kind="stable")
        for k in ks:
            hits = [np.any(same[i, order[i, :k]]) for i in range(n)]
            metrics[f"{direction}_recall_at_{k}"] = float(np.mean(hits))
    for k in (1, 10):
        metrics[f"chance_recall_at_{k}"] = min(k, n) / n
    off = ~np.eye(n, dtype=bool)
    metrics["mean_positive_cosine"] = float(np.mean(np.diagonal(similarity)))
    metrics["mean_negative_cosine"] = float(np.mean(similarity[off])) if n > 1 else 0.0
    metrics["num_examples"] = n
    return metrics


def _clips(sample_rate: int, clip_seconds: float, split: str, max_examples: int, audio_dir: Optional[str],
           musiccaps_dir: Optional[str], report: BadInputReport):
    if audio_dir is None and musiccaps_dir is None:
        if split != "test":
            raise ValueError(f"the synthetic evaluation clips are the test split; got split={split!r}")
        for i in range(max_examples):
            clip = synthetic_music.generate_clip(i, seed=SYNTHETIC_TEST_SEED, seconds=clip_seconds,
                                                 sample_rate=sample_rate)
            yield clip["caption"], clip["audio"]
        return
    checks = captioned_audio.AudioChecks(sample_rate, require_captions=True, max_seconds=clip_seconds)
    if audio_dir is not None:
        records = captioned_audio.read_audio_folder(audio_dir, checks, report)
    else:
        records = captioned_audio.read_musiccaps(os.path.join(musiccaps_dir, "musiccaps-public.csv"), musiccaps_dir,
                                                 checks, report)
    count = 0
    for record in records:
        if record.split != split or count >= max_examples:
            continue
        audio = captioned_audio.decode_record(record, checks, report)
        if audio is not None:
            count += 1
            yield record.caption, audio


def evaluate_mulan(checkpoint_dir: str, audio_dir: Optional[str] = None, musiccaps_dir: Optional[str] = None,
                   split: str = "test", max_examples: int = 200, clip_seconds: Optional[float] = None) -> dict:
    """Retrieval metrics of the MuLan at checkpoint_dir (see the module docstring)."""
    mulan = MuLan.from_checkpoint(checkpoint_dir)
    clip_seconds = clip_seconds or mulan.window_samples / mulan.sample_rate
    report = BadInputReport("skip", f"mulan eval {audio_dir or musiccaps_dir or 'synthetic test clips'}")
    captions, embeddings = [], []
    for caption, audio in _clips(mulan.sample_rate, clip_seconds, split, max_examples, audio_dir, musiccaps_dir,
                                 report):
        captions.append(caption)
        embeddings.append(mulan.embed_audio(audio))
    if len(captions) < 2:
        raise ValueError(f"MuLan evaluation needs at least 2 captioned clips in split {split!r}; found "
                         f"{len(captions)} (skipped: {report.summary()['skipped']})")
    similarity = mulan.embed_text(captions) @ np.stack(embeddings).T
    metrics = retrieval_metrics(similarity, captions)
    metrics["num_skipped"] = report.num_skipped
    return metrics
