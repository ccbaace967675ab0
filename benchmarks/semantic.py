"""Speed of semantic tokenization on this CPU: paper-size w2v-BERT and a HuBERT-base-size imported model.

    python benchmarks/semantic.py [--repeats 3] [--seconds 10]

Both tokenizers run on random weights (speed does not depend on the values): w2v-BERT XL (gin/models/
w2v_bert_paper.gin, fp32 here, features of hidden state 19) and HuBERT base (12 layers, 768, features of layer
9 pooled to 25 Hz), each followed by nearest-centre assignment to k = 1024 centres. Measured: tokens per second
of compute and seconds of audio tokenized per second (batch 1, `--seconds` of audio, median over repeats).
Baseline in the same run (with the `convert` extra installed): transformers' HubertModel (PyTorch, 2 threads)
computing the same HuBERT-base layer on the same audio. Prints one JSON line last.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import numpy as np

import common
from musiclm_jax import gin_utils
from musiclm_jax import train  # noqa: F401  (gin files bind train_lib.train)
from musiclm_jax.semantic.hubert_model import HubertFeatureModel
from musiclm_jax.networks.hubert import HubertConfig
from musiclm_jax.semantic.inference import FeatureExtractor, SemanticTokenizer

NUM_CLUSTERS = 1024


def tokenizer_for(model, layer: int, pooling: int, seconds: float) -> SemanticTokenizer:
    samples = int(seconds * model.sample_rate)
    variables = jax.jit(lambda rng: model.get_initial_variables(rng, {"audio": (1, samples)}))(jax.random.key(0))
    params = jax.tree.map(lambda x: getattr(x, "unbox", lambda: x)(), variables["params"],
                          is_leaf=lambda x: hasattr(x, "unbox"))
    features = FeatureExtractor(model, params, layer, pooling)
    dim = features(np.zeros((1, model.sample_rate), np.float32)).shape[-1]
    centroids = np.random.RandomState(0).randn(NUM_CLUSTERS, dim).astype(np.float32)
    return SemanticTokenizer(features, np.zeros(dim, np.float32), np.ones(dim, np.float32), centroids)


def measure(tokenizer: SemanticTokenizer, audio: np.ndarray, repeats: int) -> dict:
    seconds, _ = common.median_seconds(lambda: tokenizer.tokenize(audio), repeats, warmup=1)
    tokens = tokenizer.tokenize(audio).shape[-1]
    audio_seconds = audio.shape[-1] / tokenizer.sample_rate
    return {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds,
            "audio_seconds_per_second": audio_seconds / seconds}


def torch_hubert_seconds(audio: np.ndarray, layer: int, repeats: int):
    try:
        import torch
        from transformers import HubertConfig as HFConfig
        from transformers import HubertModel
    except ImportError:
        return None
    torch.set_num_threads(2)
    model = HubertModel(HFConfig()).eval()
    x = torch.from_numpy(audio)

    def run():
        with torch.no_grad():
            model(x, output_hidden_states=True).hidden_states[layer].numpy()
    return common.median_seconds(run, repeats, warmup=1)[0]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    audio = (np.random.RandomState(0).randn(1, int(args.seconds * 16000)) * 0.1).astype(np.float32)

    gin_utils.parse_gin(["gin/w2v_bert/paper.gin"], ["MODEL_DIR = '/tmp/unused'"])
    w2v = gin_utils.bound_arguments("train", ["model"], {})["model"]
    w2v.network = dataclasses.replace(w2v.network, dtype="float32", remat=False, dropout_rate=0.0)
    w2v.module = type(w2v.module)(w2v.network)
    results = {"w2v_bert_xl": measure(tokenizer_for(w2v, 19, 1, args.seconds), audio, args.repeats)}
    results["w2v_bert_xl"]["params"] = int(sum(x.size for x in jax.tree.leaves(
        jax.eval_shape(lambda: w2v.get_initial_variables(jax.random.key(0), {"audio": (1, 16000)}))["params"])))
    hubert = HubertFeatureModel(HubertConfig(), segment_samples=16000)
    results["hubert_base"] = measure(tokenizer_for(hubert, 9, 2, args.seconds), audio, args.repeats)
    torch_s = torch_hubert_seconds(audio, 9, args.repeats)
    out = {"benchmark": "semantic", "audio_seconds": args.seconds, "num_clusters": NUM_CLUSTERS, **results,
           "baseline": None if torch_s is None else {"name": "transformers HubertModel (torch, 2 threads), layer 9",
                                                      "seconds": torch_s},
           "hubert_speedup_vs_torch": None if torch_s is None else torch_s / results["hubert_base"]["seconds"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
