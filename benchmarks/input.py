"""Input pipeline throughput on this CPU: raw-audio examples/s and tokenized (stage) examples/s.

    python benchmarks/input.py [--clips 48] [--batches 30] [--repeats 3]

Raw audio: a folder of `--clips` 10 s stereo 44.1 kHz FLAC files (made here) is prepared once as the
`audio_folder` TFDS dataset at 24 kHz (preparation time reported), then the raw-audio task streams random 2 s
crops, loudness normalised, in batches of 8 (SeqioInputPipeline, as training reads it); the embedded synthetic
music task is measured the same way (rendered on the fly), and again in 1 s crops (the demo codec's segments) with
SYNTHETIC_CROPS_PER_CLIP crops per rendered clip against one. Nothing is cached in memory (as in training: the
cache would be saved with every input position), so every epoch reads the prepared records again. Baseline in the same run: a per-example Python loader doing what a PyTorch `Dataset.__getitem__` does
(decode the file, downmix, resample to 24 kHz, crop, normalise).
Tokenized: a paper-size token cache (30 s chunks: codec 1500 x 12, semantic 750, MuLan 12) of 512 chunks, read
through each stage task with the prefix-LM feature converter (batches of 8); baseline: parsing the same
TFRecords with no stage preprocessing. Medians over repeats; prints one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

import common
from musiclm_jax.data import audio_io, stages, token_cache
from musiclm_jax.data.dataset_config import DatasetConfig, raw_audio_task_name
from musiclm_jax.data.input_pipeline import SeqioInputPipeline
from musiclm_jax.tasks import tokenized


RATE, CROP, BATCH = 24000, 48000, 8
PAPER_TOKENIZERS = {
    "mulan": {"frames": 1, "levels": 12, "codebook_size": 1024, "frame_rate": 1 / 30, "sample_rate": 24000},
    "semantic": {"frames": 750, "levels": 1, "codebook_size": 1024, "frame_rate": 25.0, "sample_rate": 16000},
    "codec": {"frames": 1500, "levels": 12, "codebook_size": 1024, "frame_rate": 50.0, "sample_rate": 24000}}


def examples_per_second(make_pipeline, batches: int, repeats: int) -> float:
    """Median examples/s of `batches` batches (after one warm-up batch) over `repeats` fresh pipelines."""
    rates = []
    for _ in range(repeats):
        with make_pipeline() as pipeline:
            next(pipeline)
            start = time.perf_counter()
            for _ in range(batches):
                next(pipeline)
            rates.append(batches * BATCH / (time.perf_counter() - start))
    return statistics.median(rates)


class ShuffleBufferPipeline:
    """The baseline of the block shuffle: the raw-audio task through seqio's own get_dataset, shuffled by its
    buffer (the task's shuffle_buffer_size), batched as training batches it (what SeqioInputPipeline did before)."""

    def __init__(self, task_name: str, lengths: dict):
        from musiclm_jax.data import feature_converters
        from musiclm_jax.tasks import audio as audio_tasks
        task = audio_tasks.register_raw_audio_task(task_name)
        ds = task.get_dataset(lengths, split="train", shuffle=True, seed=0, num_epochs=None,
                              try_in_mem_cache=False)
        ds = feature_converters.get("audio")(ds, task_feature_lengths=lengths)
        self._iterator = iter(ds.batch(BATCH, drop_remainder=True).prefetch(2))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._iterator = None

    def __next__(self):
        return {k: v.numpy() for k, v in next(self._iterator).items()}


def baseline_loader_rate(paths: list[str], examples: int, repeats: int) -> float:
    """Examples/s of a per-example Python loader: decode, downmix, resample, crop, normalise."""
    rng = np.random.RandomState(0)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(examples):
            audio = audio_io.load_audio(paths[rng.randint(len(paths))], RATE)
            offset = rng.randint(len(audio) - CROP + 1)
            crop = audio[offset:offset + CROP]
            crop = crop * (0.1 / max(float(np.sqrt(np.mean(crop ** 2))), 1e-6))
        rates.append(examples / (time.perf_counter() - start))
    return statistics.median(rates)


def write_paper_cache(root: str, examples: int) -> None:
    import tensorflow as tf
    rng = np.random.RandomState(0)
    os.makedirs(os.path.join(root, "train"), exist_ok=True)
    base = os.path.join(root, token_cache.shard_name("train", 0, 1))
    with tf.io.TFRecordWriter(base + ".tfrecord") as writer:
        for i in range(examples):
            tokens = {n: rng.randint(0, t["codebook_size"], (t["frames"], t["levels"]))
                      for n, t in PAPER_TOKENIZERS.items()}
            writer.write(token_cache.encode_example(f"c{i}#0", "a caption", 30 * RATE, tokens))
    with open(base + ".json", "w") as f:
        json.dump({"examples": examples}, f)
    token_cache.write_manifest(root, {"source": "benchmark", "sample_rate": RATE, "chunk_seconds": 30.0,
                                      "tokenizers": PAPER_TOKENIZERS,
                                      "splits": {"train": {"num_shards": 1, "num_examples": examples}}})


def raw_record_rate(root: str, batches: int, repeats: int) -> float:
    import tensorflow as tf
    files = token_cache.completed_shards(root, "train", 1)
    description = tokenized.feature_description(token_cache.read_manifest(root))
    rates = []
    for _ in range(repeats):
        ds = tf.data.TFRecordDataset(files).repeat().map(lambda r: tf.io.parse_single_example(r, description),
                                                           num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH)
        it = iter(ds.prefetch(2))
        next(it)
        start = time.perf_counter()
        for _ in range(batches):
            {k: v.numpy() for k, v in next(it).items()}
        rates.append(batches * BATCH / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="input_bench_")
    os.environ["MUSICLM_TFDS_DIR"] = os.path.join(work, "tfds")
    folder = os.path.join(work, "clips")
    paths = common.write_flac_folder(folder, args.clips)

    results = {"clips": args.clips, "batch_size": BATCH, "crop_seconds": CROP / RATE}
    name = raw_audio_task_name(RATE, folder)
    start = time.perf_counter()
    from musiclm_jax.tasks import audio as audio_tasks
    audio_tasks.register_raw_audio_task(name)
    results["folder_prepare_clips_per_s"] = args.clips / (time.perf_counter() - start)

    def audio_pipeline(task):
        return lambda: SeqioInputPipeline(DatasetConfig(task, {"audio": CROP}, "train", BATCH, seed=0), "audio")
    results["folder_examples_per_s"] = examples_per_second(audio_pipeline(name), args.batches, args.repeats)
    results["synthetic_examples_per_s"] = examples_per_second(audio_pipeline(raw_audio_task_name(RATE)),
                                                              args.batches // 3, args.repeats)
    # The synthetic music at the demo codec's 1 s segments: crops per rendered clip as configured
    # (tasks/audio.SYNTHETIC_CROPS_PER_CLIP) against one crop per clip, in the same run.
    import seqio
    configured = audio_tasks.SYNTHETIC_CROPS_PER_CLIP
    for label, crops in (("one_crop", 1), ("crops", configured)):
        audio_tasks.SYNTHETIC_CROPS_PER_CLIP = crops
        if raw_audio_task_name(RATE) in seqio.TaskRegistry.names():
            seqio.TaskRegistry.remove(raw_audio_task_name(RATE))
        results[f"synthetic_1s_{label}_examples_per_s"] = examples_per_second(
            lambda: SeqioInputPipeline(DatasetConfig(raw_audio_task_name(RATE), {"audio": RATE}, "train", BATCH,
                                                     seed=0), "audio"), args.batches // 3, args.repeats)
    audio_tasks.SYNTHETIC_CROPS_PER_CLIP = configured
    if raw_audio_task_name(RATE) in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(raw_audio_task_name(RATE))
    # Training input shuffles in blocks (input_pipeline.block_shuffle: the saved position holds no examples);
    # the baseline is seqio's shuffle buffer of the same size, which the pipeline used before, in the same run.
    results["synthetic_1s_shuffle_buffer_examples_per_s"] = examples_per_second(
        lambda: ShuffleBufferPipeline(raw_audio_task_name(RATE), {"audio": RATE}), args.batches // 3, args.repeats)
    results["synthetic_1s_block_shuffle_vs_buffer"] = (results["synthetic_1s_crops_examples_per_s"]
                                                       / results["synthetic_1s_shuffle_buffer_examples_per_s"])
    print(f"synthetic music, 1 s crops: block shuffle {results['synthetic_1s_crops_examples_per_s']:.1f} "
          f"examples/s, seqio's shuffle buffer {results['synthetic_1s_shuffle_buffer_examples_per_s']:.1f}/s "
          f"(x{results['synthetic_1s_block_shuffle_vs_buffer']:.2f})", file=sys.stderr)
    results["synthetic_1s_crops_per_clip"] = configured
    results["synthetic_1s_crops_vs_one_crop"] = (results["synthetic_1s_crops_examples_per_s"]
                                                 / results["synthetic_1s_one_crop_examples_per_s"])
    print(f"synthetic music, 1 s crops: {configured} per rendered clip "
          f"{results['synthetic_1s_crops_examples_per_s']:.1f} examples/s, one per clip "
          f"{results['synthetic_1s_one_crop_examples_per_s']:.1f}/s (x{results['synthetic_1s_crops_vs_one_crop']:.2f})",
          file=sys.stderr)
    results["baseline_loader_examples_per_s"] = baseline_loader_rate(paths, args.batches * BATCH // 3, args.repeats)
    results["folder_vs_baseline"] = results["folder_examples_per_s"] / results["baseline_loader_examples_per_s"]
    print(f"raw audio: folder {results['folder_examples_per_s']:.1f} examples/s, synthetic "
          f"{results['synthetic_examples_per_s']:.1f}/s, per-example loader "
          f"{results['baseline_loader_examples_per_s']:.1f}/s (x{results['folder_vs_baseline']:.1f}); preparing "
          f"{results['folder_prepare_clips_per_s']:.1f} clips/s", file=sys.stderr)

    cache = os.path.join(work, "tokens")
    write_paper_cache(cache, 512)
    results["records_examples_per_s"] = raw_record_rate(cache, args.batches, args.repeats)
    for stage in stages.STAGES:
        task = f"{stage}_stage:{cache}"
        spec = stages.stage_spec_from_name(task)
        rate = examples_per_second(lambda: SeqioInputPipeline(DatasetConfig(
            task, spec.task_feature_lengths, "train", BATCH, seed=0), "prefix_lm"), args.batches, args.repeats)
        results[f"{stage}_stage_examples_per_s"] = rate
        results[f"{stage}_stage_vs_records"] = rate / results["records_examples_per_s"]
        print(f"{stage} stage: {rate:.1f} examples/s ({spec.input_length} + {spec.target_length} tokens; "
              f"x{rate / results['records_examples_per_s']:.2f} of bare record parsing)", file=sys.stderr)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
