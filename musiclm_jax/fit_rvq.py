"""The MuLan conditioning RVQ's fit job: `python -m musiclm_jax.fit_rvq`, configured by gin as every job is.

    python -m musiclm_jax.fit_rvq --gin_file=gin/mulan/rvq_tiny.gin --gin.MULAN_CHECKPOINT="'/ckpt/mulan'" \
        [--gin.AUDIO_DIR="'/data/music'" | --gin.MUSICCAPS_DIR="'/data/musiccaps'"] [--gin.fit_rvq.fit_rvq.steps=20]

Embeds training clips with the frozen MuLan (or a converted CLAP) of MULAN_CHECKPOINT, one window each (every
whole window of a folder's files, in turn), fits mulan.ConditioningRVQ (RVQ_LEVELS x RVQ_CODES, the size of the
conditioning tokens: gin/mulan/rvq_tiny.gin, rvq_paper.gin) and writes MULAN_CHECKPOINT/mulan_rvq.npz, which
mulan.MuLan.from_checkpoint loads. Under launch/tpu_run.sh each process embeds its own shards of the clips.
"""
from __future__ import annotations

import os
import sys
from typing import Iterator, Optional, Sequence

import jax
import numpy as np

from musiclm_jax.mulan.inference import RVQ_FILE, ConditioningRVQ, MuLan, pad_to_window, process_rows


def training_clips(sample_rate: int, seconds: float, num_clips: int, audio_dir: Optional[str] = None,
                   musiccaps_dir: Optional[str] = None) -> Iterator[np.ndarray]:
    """Yields up to num_clips mono clips [samples] at sample_rate Hz of the train split: the embedded synthetic
    music, or every whole `seconds` window of AUDIO_DIR's (or MUSICCAPS_DIR's non-eval) train files in turn (a
    file shorter than one window gives itself; bad files counted and skipped), so a folder of long recordings fits
    the RVQ on all of its music."""
    from musiclm_jax.data import audio_io, captioned_audio, synthetic_music
    if audio_dir and musiccaps_dir:
        raise ValueError(f"set AUDIO_DIR ({audio_dir!r}) or MUSICCAPS_DIR ({musiccaps_dir!r}), not both")
    if audio_dir is None and musiccaps_dir is None:
        for i in range(num_clips):
            yield synthetic_music.generate_clip(i, seed=0, seconds=seconds, sample_rate=sample_rate)["audio"]
        return
    scan = (captioned_audio.scan_audio_folder(audio_dir, sample_rate) if audio_dir is not None
            else captioned_audio.scan_musiccaps(musiccaps_dir, sample_rate))
    window, count = int(round(seconds * sample_rate)), 0
    for path in scan.get("train", []):
        audio = audio_io.load_audio(path, sample_rate)
        for start in range(0, max(len(audio) - window, 0) + 1, window):
            if count == num_clips:
                return
            count += 1
            yield audio[start:start + window]


def fit_rvq(model_dir: str, audio_dir: Optional[str] = None, num_clips: int = 2048, levels: int = 12,
            codebook_size: int = 1024, steps: int = 50, seed: int = 0, num_shards: int = 8,
            musiccaps_dir: Optional[str] = None) -> ConditioningRVQ:
    """Fits the conditioning RVQ (levels x codebook_size) on audio embeddings of `num_clips` training clips
    (training_clips) and writes MODEL_DIR/mulan_rvq.npz.

    With several processes (launch/tpu_run.sh) each embeds only the clips of its shards (ConditioningRVQ.fit) and
    process 0 writes the file; the codebooks equal one process's up to float summation order. num_shards is
    rounded up to a multiple of the process count (printed), and must not exceed the clips found."""
    from musiclm_jax import distributed
    mulan = MuLan.from_checkpoint(model_dir)
    seconds = mulan.window_samples / mulan.sample_rate
    clips = list(training_clips(mulan.sample_rate, seconds, num_clips, audio_dir, musiccaps_dir))
    if num_shards % jax.process_count():
        rounded = -(-num_shards // jax.process_count()) * jax.process_count()
        print(f"fit_rvq: num_shards {num_shards} -> {rounded}, the next multiple of the {jax.process_count()} "
              f"processes (each embeds its own shards)", file=sys.stderr)
        num_shards = rounded
    if len(clips) < num_shards:
        raise ValueError(f"fit_rvq: {len(clips)} training clips cannot fill num_shards={num_shards}")
    first, count = process_rows(len(clips), num_shards)
    mine = clips[first:first + count]
    window, padding = mulan.window_samples, mulan.model.short_clip_padding
    embeddings = np.concatenate([mulan.embed_audio(np.stack(
        [pad_to_window(c[None, :window], window, padding)[0] for c in mine[i:i + 64]]))
        for i in range(0, len(mine), 64)])
    rvq = ConditioningRVQ.fit(embeddings, levels, codebook_size, steps=steps, seed=seed, num_shards=num_shards)
    squared = np.sum((embeddings - rvq.reconstruct(rvq.quantize(embeddings))) ** 2, axis=-1)
    error = distributed.sum_over_processes(np.asarray([squared.sum(dtype=np.float64)]))[0] / len(clips)
    if jax.process_index() == 0:
        rvq.save(os.path.join(model_dir, RVQ_FILE))
    print(f"fit_rvq: {levels} x {codebook_size} on {len(clips)} clips ({count} embedded by this process); "
          f"mean squared error {error:.4f} -> {os.path.join(model_dir, RVQ_FILE)}", file=sys.stderr)
    return rvq


def main(argv: Optional[Sequence[str]] = None) -> ConditioningRVQ:
    """Entry point: parses --gin_file / --gin.X flags (gin_utils) and runs the gin-bound fit_rvq."""
    import gin

    from musiclm_jax import gin_utils
    return gin_utils.run(lambda flags: gin.get_configurable(fit_rvq)(), argv=argv)


if __name__ == "__main__":
    from musiclm_jax import fit_rvq as _fit_rvq_module  # gin binds musiclm_jax.fit_rvq, not __main__
    _fit_rvq_module.main()
