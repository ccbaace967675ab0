"""Speed of the metric models on this machine: VGGish (FAD), PaSST (KL) and CLAP (CLAP score) on a 10 s clip.

    python benchmarks/eval_embedders.py [--repeats 5] [--quick]

Each model at its released size with random weights (speed does not depend on the values), through the API the
metrics and `python -m musiclm_jax.eval embed` use:
  vggish  VGGishConfig() (72M): 10 s at 16 kHz -> 10 examples -> [10, 128]; batch 1 `VGGishEmbedder.embed`,
          batch 8 `VGGishEmbedder.embed_batch` on [8, 160000] (laid over the devices);
  passt   PaSSTConfig() (passt_s_swa_p16_128_ap476, 86M): 10 s at 32 kHz -> [527] probabilities; batch 1
          `PaSSTClassifier.probabilities`, batch 8 `PaSSTClassifier.__call__`;
  clap    gin/mulan/clap.gin (laion/clap-htsat-unfused: HTSAT-base audio tower, 48 kHz, MLP projection to 512):
          10 s at 48 kHz (one window) -> [512]; `MuLan.embed_audio` with batch_size 1 and 8 (its window batch).
          Only the audio side is initialised (tower, projection, logit scale): the RoBERTa text tower is not used
          to embed audio. Note that the command line's MuLan.from_checkpoint keeps MuLan's window batch of 8, so
          one 10 s clip there costs about what a batch of 8 costs here.
Timings are medians of --repeats calls after one warm-up call (which compiles), divided by the batch: seconds per
10 s clip. The baseline, measured in the same run: the model's own log-mel front end alone (jitted) on the same
batch; `ratio_to_frontend` says how much the network costs over it. `real_time_factor` = compute seconds per
audio second (below 1 is faster than real time). Prints one JSON line per model and a summary JSON line last.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np

import common
from musiclm_jax import gin_utils, partitioning

CLIP_SECONDS = 10
BATCHES = (1, 8)


def _clips(batch: int, sample_rate: int) -> np.ndarray:
    return (0.1 * np.random.RandomState(batch).randn(batch, CLIP_SECONDS * sample_rate)).astype(np.float32)


def _count(params) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def _measure(name: str, params: int, sample_rate: int, frontend, embed_batch, repeats: int,
             batches=BATCHES) -> dict:
    """frontend(audio [b, samples]) -> array; embed_batch(audio [b, samples]) -> numpy (blocks). Per batch size:
    seconds per clip of both, their ratio and the real-time factor."""
    jitted = jax.jit(frontend)
    result = {"benchmark": "eval_embedders", "model": name, "params": params, "sample_rate": sample_rate,
              "clip_seconds": CLIP_SECONDS, "repeats": repeats}
    for batch in batches:
        audio = _clips(batch, sample_rate)
        device_audio = jnp.asarray(audio)
        front_s, _ = common.median_seconds(lambda: jitted(device_audio).block_until_ready(), repeats)
        start = time.perf_counter()
        embed_batch(audio)  # the warm-up call, timed apart: mostly compilation
        first_s = time.perf_counter() - start
        model_s, times = common.median_seconds(lambda: embed_batch(audio), repeats, warmup=0)
        per_clip = model_s / batch
        result[f"batch_{batch}"] = {
            "seconds_per_clip": per_clip, "frontend_seconds_per_clip": front_s / batch,
            "ratio_to_frontend": model_s / front_s, "real_time_factor": per_clip / CLIP_SECONDS,
            "first_call_s": first_s, "times": [round(t, 4) for t in times]}
    print(json.dumps(result), flush=True)
    return result


def vggish(repeats: int) -> dict:
    from musiclm_jax.networks.vggish import log_mel_examples
    from musiclm_jax.evaluation.vggish_model import VGGishEmbedder, VGGishModel
    model = VGGishModel()
    params = partitioning.unbox(jax.jit(lambda k: model.get_initial_variables(k, None))(jax.random.key(0)))["params"]
    embedder = VGGishEmbedder(model, params)
    rate = model.sample_rate

    def embed(audio):
        return embedder.embed(audio[0], rate) if len(audio) == 1 else embedder.embed_batch(audio, rate)
    return _measure("vggish", _count(params), rate, lambda a: log_mel_examples(a, model.network), embed, repeats)


def passt(repeats: int) -> dict:
    from musiclm_jax.networks.passt import log_mel
    from musiclm_jax.evaluation.passt_model import PaSSTClassifier, PaSSTModel
    model = PaSSTModel()
    params = partitioning.unbox(jax.jit(lambda k: model.get_initial_variables(k, None))(jax.random.key(0)))["params"]
    classifier = PaSSTClassifier(model, params)
    rate = model.sample_rate

    def embed(audio):
        return classifier.probabilities(audio[0], rate) if len(audio) == 1 else classifier(audio, rate)
    return _measure("passt", _count(params), rate, lambda a: log_mel(a, model.network), embed, repeats)


def clap(repeats: int) -> dict:
    from musiclm_jax.mulan.inference import MuLan
    from musiclm_jax.networks.mulan import MuLan as MuLanNetwork
    gin_utils.parse_gin(["gin/mulan/clap.gin"], ["MODEL_DIR = '/tmp/unused'"])
    model = gin_utils.bound_arguments("train", ["model"], {})["model"]
    gin.clear_config()

    def init(key):
        features = jax.eval_shape(model.network.audio.features,
                                  jax.ShapeDtypeStruct((1, model.segment_samples), jnp.float32))
        return model.module.init({"params": key}, jnp.zeros(features.shape, features.dtype),
                                 method=MuLanNetwork.embed_audio)
    params = partitioning.unbox(jax.jit(init)(jax.random.key(0)))["params"]
    embedders = {b: MuLan(model, params, tokenizer=None, batch_size=b) for b in BATCHES}
    rate = model.sample_rate

    def embed(audio):
        return embedders[len(audio)].embed_audio(audio)
    return _measure("clap", _count(params), rate, model.network.audio.features, embed, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 repeat: checks that the script runs, no figures")
    parser.add_argument("--models", default="vggish,passt,clap")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    runners = {"vggish": vggish, "passt": passt, "clap": clap}
    results = {name: runners[name](repeats) for name in args.models.split(",")}
    summary = {name: {f"batch_{b}": {k: r[f"batch_{b}"][k] for k in ("seconds_per_clip", "ratio_to_frontend",
                                                                      "real_time_factor")} for b in BATCHES}
               for name, r in results.items()}
    print(json.dumps({"benchmark": "eval_embedders", "summary": summary, "clip_seconds": CLIP_SECONDS,
                      "repeats": repeats, "quick": args.quick, "device": str(jax.devices()[0]),
                      "device_count": jax.device_count(),
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


if __name__ == "__main__":
    main()
