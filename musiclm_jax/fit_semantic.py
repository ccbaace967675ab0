"""The semantic tokenizer's fit job: `python -m musiclm_jax.fit_semantic`, configured by gin as every job is.

    python -m musiclm_jax.fit_semantic --gin_file=gin/semantic/kmeans_tiny.gin \
        --gin.FEATURE_CHECKPOINT="'/tmp/w2v_bert_tiny'" --gin.OUTPUT_DIR="'/tmp/semantic_tok'" [--gin.AUDIO_DIR=...]

Streams training audio through the frozen feature model of FEATURE_CHECKPOINT (a w2v-BERT run directory, or a
converted HuBERT / MERT), fits the per-dimension normalisation and the mini-batch k-means (musiclm_jax.kmeans) and
writes the tokenizer directory that semantic.SemanticTokenizer.load reads (see musiclm_jax.semantic). Restartable;
under launch/tpu_run.sh each process takes its own rows of every batch.
"""
from __future__ import annotations

import os
import sys
from typing import Iterator, Optional, Sequence

import jax
import numpy as np

from musiclm_jax import distributed
from musiclm_jax.kmeans import MiniBatchKMeans
from musiclm_jax.semantic.inference import (KMEANS_FILE, NORMALIZATION_FILE, FeatureExtractor, SemanticTokenizer,
                                  load_feature_model)


def audio_batches(sample_rate: int, batch_size: int, clip_seconds: float, audio_dir: Optional[str] = None,
                  seed: int = 0, start_step: int = 0, musiccaps_dir: Optional[str] = None,
                  rows: Optional[range] = None) -> Iterator[np.ndarray]:
    """Batches [len(rows), clip samples] of training audio: rows `rows` (default all) of global batches of
    `batch_size` clips. Row r of batch s is fixed by (seed, s, r) alone, so processes that each take their own
    rows together see exactly the one-process batches. A row is the embedded synthetic music's train clip
    s * batch_size + r, or a random crop of a random train clip of AUDIO_DIR or of MUSICCAPS_DIR (its rows that
    are not is_audioset_eval). Starts at batch `start_step`."""
    from musiclm_jax.data import audio_io, captioned_audio, synthetic_music
    length = int(round(clip_seconds * sample_rate))
    paths = None
    if audio_dir and musiccaps_dir:
        raise ValueError(f"set AUDIO_DIR ({audio_dir!r}) or MUSICCAPS_DIR ({musiccaps_dir!r}), not both")
    if audio_dir is not None or musiccaps_dir is not None:
        scan = (captioned_audio.scan_audio_folder(audio_dir, sample_rate) if audio_dir is not None
                else captioned_audio.scan_musiccaps(musiccaps_dir, sample_rate))
        paths = scan.get("train", [])
        if not paths:
            raise ValueError(f"{'AUDIO_DIR' if audio_dir else 'MUSICCAPS_DIR'} {audio_dir or musiccaps_dir!r} has "
                             f"no decodable train files")
    rows = range(batch_size) if rows is None else rows
    step = start_step
    while True:
        batch = []
        for row in rows:
            rng = np.random.RandomState([seed, step, row])
            if paths is None:
                audio = synthetic_music.generate_clip(step * batch_size + row, seed=seed, seconds=clip_seconds,
                                                      sample_rate=sample_rate)["audio"]
            else:
                audio = audio_io.load_audio(paths[rng.randint(len(paths))], sample_rate)
            if len(audio) < length:
                audio = np.pad(audio, (0, length - len(audio)))
            start = rng.randint(len(audio) - length + 1)
            batch.append(audio[start:start + length])
        yield np.stack(batch).astype(np.float32)
        step += 1


def fit_semantic_tokenizer(feature_checkpoint: str, output_dir: str, layer: int, num_clusters: int = 1024,
                           frame_pooling: int = 1, audio_dir: Optional[str] = None, batch_size: int = 8,
                           clip_seconds: float = 10.0, num_steps: int = 1000, normalization_batches: int = 10,
                           save_every: int = 50, seed: int = 0, pitch_class_share: float = 0.0,
                           musiccaps_dir: Optional[str] = None) -> SemanticTokenizer:
    """Fits the tokenizer's normalisation and k-means by streaming audio through the frozen feature model.

    Normalisation (per-dimension mean and std) comes from the first `normalization_batches` batches.
    pitch_class_share > 0 makes the tokens keep the pitch class (melody): the frame's 12-dimensional pitch-class
    profile follows the layer's D dimensions (FeatureExtractor(pitch_classes=True)) and is scaled after
    normalisation to a per-dimension standard deviation of w = sqrt(share / (1 - share) * D / 12), so that it
    holds `share` of the points' total variance at any D (its std in normalization.npz is divided by w). k-means
    then splits by pitch class first: without it the clusters of a small or briefly trained model follow each
    clip's timbre (see gin/semantic/kmeans_tiny.gin for the figures). Then
    `num_steps` mini-batch k-means steps, one per audio batch (all frames of the batch are the points, sharded
    over the data axes). State is saved every `save_every` steps and at the end; a restart with the same
    arguments continues from the saved step and gives the same result as an uninterrupted fit.

    Several processes (launch/tpu_run.sh): each takes its own contiguous rows of every global batch of
    `batch_size` clips (rounded up to a multiple of the process count, with a line saying so) and runs the
    feature model on them alone; the normalisation's sums and every k-means statistic are sums over all
    processes' rows, so the fit equals one process's on the same batches up to float summation order. Process 0
    decides whether to resume and writes the files.
    """
    if not 0.0 <= pitch_class_share < 1.0:
        raise ValueError(f"pitch_class_share={pitch_class_share}: expected 0 <= share < 1")
    processes, index = jax.process_count(), jax.process_index()
    if batch_size % processes:
        rounded = -(-batch_size // processes) * processes
        print(f"semantic fit: fit_semantic_tokenizer.batch_size={batch_size} -> {rounded} clips, the next multiple "
              f"of the {processes} processes (each takes its own rows of every batch)", file=sys.stderr)
        batch_size = rounded
    per_process = batch_size // processes
    rows = range(index * per_process, (index + 1) * per_process)
    model, params = load_feature_model(feature_checkpoint)
    features = FeatureExtractor(model, params, layer, frame_pooling, pitch_classes=pitch_class_share > 0)
    os.makedirs(output_dir, exist_ok=True)
    norm_path = os.path.join(output_dir, NORMALIZATION_FILE)
    if distributed.value_of_process_0(os.path.exists(norm_path)):
        with np.load(norm_path) as norm:
            mean, std = norm["mean"], norm["std"]
    else:
        stats = [features(a) for a, _ in zip(audio_batches(features.sample_rate, batch_size, clip_seconds, audio_dir,
                                                           seed + 1, musiccaps_dir=musiccaps_dir, rows=rows),
                                             range(normalization_batches))]
        flat = np.concatenate([s.reshape(-1, s.shape[-1]) for s in stats]).astype(np.float64)
        # Two passes over global sums (mean, then squared deviations): with one process exactly numpy's mean/std.
        count = distributed.sum_over_processes(np.asarray([flat.shape[0]], np.float64))[0]
        mean = distributed.sum_over_processes(flat.sum(axis=0)) / count
        std = np.sqrt(distributed.sum_over_processes(((flat - mean) ** 2).sum(axis=0)) / count)
        mean, std = mean.astype(np.float32), (std + 1e-5).astype(np.float32)
        if pitch_class_share > 0:
            layer_dims = mean.shape[0] - 12
            std[layer_dims:] /= np.sqrt(pitch_class_share / (1.0 - pitch_class_share) * layer_dims / 12.0)
    tokenizer = SemanticTokenizer(features, mean, std, np.zeros((num_clusters, mean.shape[0]), np.float32),
                                  pitch_class_share)
    if index == 0:
        tokenizer.save(output_dir, feature_checkpoint)

    kmeans = MiniBatchKMeans(num_clusters, mean.shape[0], seed=seed)
    kmeans_path = os.path.join(output_dir, KMEANS_FILE)
    if distributed.value_of_process_0(os.path.exists(kmeans_path)):
        kmeans.restore(kmeans_path)
    start = int(kmeans.state_dict()["step"])
    if start:
        print(f"semantic fit: resuming at step {start} of {num_steps}", file=sys.stderr)
    batches = audio_batches(features.sample_rate, batch_size, clip_seconds, audio_dir, seed, start_step=start,
                            musiccaps_dir=musiccaps_dir, rows=rows)
    for step in range(start, num_steps):
        points = (features(next(batches)) - mean) / std
        metrics = kmeans.step(points.reshape(-1, points.shape[-1]))
        if (step + 1) % save_every == 0 or step + 1 == num_steps:
            kmeans.save(kmeans_path)
            print(f"semantic fit: step {step + 1}/{num_steps} "
                  f"{ {k: round(float(v), 4) for k, v in jax.device_get(metrics).items()} }", file=sys.stderr)
    kmeans.save(kmeans_path)
    return SemanticTokenizer(features, mean, std, kmeans.centroids, pitch_class_share)


def main(argv: Optional[Sequence[str]] = None) -> SemanticTokenizer:
    """Entry point: parses --gin_file / --gin.X flags (gin_utils) and runs the gin-bound fit_semantic_tokenizer."""
    import gin

    from musiclm_jax import gin_utils
    return gin_utils.run(lambda flags: gin.get_configurable(fit_semantic_tokenizer)(), argv=argv)


if __name__ == "__main__":
    from musiclm_jax import fit_semantic as _fit_semantic_module  # gin binds musiclm_jax.fit_semantic
    _fit_semantic_module.main()
