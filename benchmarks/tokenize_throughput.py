"""Tokenization throughput on this machine: audio seconds tokenized per wall second, tiny and paper sizes.

    python benchmarks/tokenize_throughput.py [--sizes tiny,paper] [--repeats 3] [--paper_batch 1]

(Not benchmarks/tokenize.py: every script of this directory has the directory first on its import path, and a
tokenize.py there would stand in for the standard library's `tokenize`, which numpy imports through inspect.)

Random weights (speed does not depend on the values), the tokenizers the job runs
(`python -m musiclm_jax.tokenize`):
  tiny   the demo's: the spectral codec (gin/models/codec_spectral_tiny.gin, 4 x 512), tiny w2v-BERT to the layer
         and cluster count of gin/semantic/kmeans_tiny.gin, tiny MuLan with a 12 x 32 RVQ; batches of 8 chunks
         of 4 s (gin/tokenize/tiny.gin);
  paper  SoundStream (gin/models/codec_paper.gin, 12 x 1024), w2v-BERT XL to layer 19 with 1,024 centres
         (gin/semantic/kmeans_w2v_bert.gin), MuLan's ResNet-50 audio tower with a 12 x 1024 RVQ; 30 s chunks
         (gin/tokenize/paper.gin), --paper_batch of them.
For each size it times every tokenizer as the job runs it (tokenize.TokenSource through the job's device
batcher: host resampling, one jitted call per tokenizer) and, in the same run, the one-function forward that
`python -m musiclm_jax.aot --job=tokenize` compiles (tokenize_forward), and prints medians, audio seconds per
wall second and the forward's speed-up over the job's path. The melody tokens (host numpy) are timed apart and
counted in the job's total. Not counted: decoding the audio files and writing the TFRecords (the job logs each
shard's wall time). The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json

import jax
import numpy as np

import common
from musiclm_jax import partitioning
from musiclm_jax import tokenize as tokenize_job
from musiclm_jax import tokenize_forward
from musiclm_jax.codec.inference import Codec
from musiclm_jax.data import audio_io, synthetic_music
from musiclm_jax.mulan.inference import ConditioningRVQ, MuLan
from musiclm_jax.semantic.inference import FeatureExtractor, SemanticTokenizer

SIZES = {
    "tiny": dict(codec="gin/models/codec_spectral_tiny.gin", semantic="gin/models/w2v_bert_tiny.gin",
                 fit="gin/semantic/kmeans_tiny.gin", mulan="gin/models/mulan_tiny.gin", rvq=(12, 32),
                 chunk_seconds=4.0, batch=8),
    "paper": dict(codec="gin/models/codec_paper.gin", semantic="gin/models/w2v_bert_paper.gin",
                  fit="gin/semantic/kmeans_w2v_bert.gin", mulan="gin/models/mulan_paper.gin", rvq=(12, 1024),
                  chunk_seconds=30.0, batch=1),
}


def _random_variables(model, seed: int) -> dict:
    variables = model.get_initial_variables(jax.random.key(seed), model.input_shapes(1))
    return jax.device_get(partitioning.unbox(variables))


def build_tokenizers(size: dict, seed: int = 0) -> tuple[Codec, SemanticTokenizer, MuLan]:
    """Random-init inference objects of one size (as the job loads trained ones)."""
    codec_model = tokenize_forward.model_from_gin(size["codec"])
    v = _random_variables(codec_model, seed)
    codec = Codec(codec_model.generator, codec_model.variables(v["params"], v), codec_model.sample_rate)

    fit = tokenize_forward.semantic_fit_settings(size["fit"])
    feature_model = tokenize_forward.model_from_gin(size["semantic"])
    features = FeatureExtractor(feature_model, _random_variables(feature_model, seed + 1)["params"], fit["layer"],
                                fit["frame_pooling"], pitch_classes=fit["pitch_class_share"] > 0)
    dim = features(np.zeros((1, features.sample_rate), np.float32)).shape[-1]
    rng = np.random.RandomState(seed)
    tokenizer = SemanticTokenizer(features, np.zeros(dim), np.ones(dim), rng.randn(fit["num_clusters"], dim))

    mulan_model = tokenize_forward.model_from_gin(size["mulan"])
    levels, codes = size["rvq"]
    codebooks = rng.randn(levels, codes, mulan_model.network.embed_dim) * 0.5 ** np.arange(levels)[:, None, None]
    mulan = MuLan(mulan_model, _random_variables(mulan_model, seed + 2)["params"], None,
                  ConditioningRVQ(codebooks / np.sqrt(mulan_model.network.embed_dim)))
    return codec, tokenizer, mulan


def measure(name: str, size: dict, repeats: int, batch: int) -> dict:
    codec, tokenizer, mulan = build_tokenizers(size)
    rate, chunk_seconds = codec.sample_rate, size["chunk_seconds"]
    audio = np.stack([synthetic_music.generate_clip(i, seed=1, seconds=chunk_seconds, sample_rate=rate)["audio"]
                      for i in range(batch)]).astype(np.float32)
    audio_seconds = batch * chunk_seconds
    batcher = tokenize_job.DeviceBatcher()
    sources = [tokenize_job.codec_token_source(codec), tokenize_job.semantic_token_source(tokenizer),
               tokenize_job.mulan_token_source(mulan, chunk_seconds), tokenize_job.melody_source(rate, 5.0)]
    per_source = {}
    for source in sources:
        median, times = common.median_seconds(lambda: batcher(source, audio, rate), repeats)
        per_source[source.name] = {"median_s": median, "times_s": times,
                                   "audio_seconds_per_second": audio_seconds / median}
    job_device_s = sum(per_source[n]["median_s"] for n in ("codec", "semantic", "mulan"))
    job_s = job_device_s + per_source["melody"]["median_s"]

    forward, variables = tokenize_forward.from_tokenizers(codec, tokenizer, mulan)
    fused = jax.jit(forward)

    def run_forward():  # the host resampling is part of it, as in the job
        inputs = {r: audio_io.resample(audio, rate, r).astype(np.float32) for r in forward.sample_rates}
        jax.block_until_ready(fused(variables, inputs))
    forward_s, forward_times = common.median_seconds(run_forward, repeats)
    report = {
        "size": name, "batch": batch, "chunk_seconds": chunk_seconds, "audio_seconds_per_batch": audio_seconds,
        "per_tokenizer": per_source,
        "job_seconds": job_s, "job_audio_seconds_per_second": audio_seconds / job_s,
        "job_path_seconds": job_device_s, "job_path_audio_seconds_per_second": audio_seconds / job_device_s,
        "forward_seconds": forward_s, "forward_times_s": forward_times,
        "forward_audio_seconds_per_second": audio_seconds / forward_s,
        "forward_speedup_over_job_path": job_device_s / forward_s,
    }
    print(f"{name}: batch of {batch} x {chunk_seconds:g} s; " + "; ".join(
        f"{n} {v['median_s']:.3f} s ({v['audio_seconds_per_second']:.1f} audio-s/s)" for n, v in per_source.items()))
    print(f"  all four as the job runs them: {job_s:.3f} s ({report['job_audio_seconds_per_second']:.1f} audio-s/s)")
    print(f"  codec + semantic + MuLan as the job runs them: {job_device_s:.3f} s "
          f"({report['job_path_audio_seconds_per_second']:.1f} audio-s/s); as one function: {forward_s:.3f} s "
          f"({report['forward_audio_seconds_per_second']:.1f} audio-s/s), "
          f"{report['forward_speedup_over_job_path']:.2f}x", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,paper")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny_batch", type=int, default=SIZES["tiny"]["batch"])
    parser.add_argument("--paper_batch", type=int, default=SIZES["paper"]["batch"])
    args = parser.parse_args()
    results = {"devices": [str(d) for d in jax.local_devices()]}
    for name in args.sizes.split(","):
        if name not in SIZES:
            parser.error(f"--sizes: unknown size {name!r} (tiny, paper)")
        batch = args.tiny_batch if name == "tiny" else args.paper_batch
        results[name] = measure(name, SIZES[name], args.repeats, batch)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
