"""Speed of MuLan's contrastive training step on this CPU: batch 8 x 10 s audio (16 kHz) + 128 caption tokens.

    python benchmarks/mulan.py [--repeats 3]

Two configurations on random weights (speed does not depend on the values), each through the project's train
step (AdamW, global-batch InfoNCE):
  matched  gin/mulan/paper_ast.gin sized like the peer's: an AST-style ViT audio tower (d=512, 6 layers, 8 heads,
           16 x 16 patches of the 64-band log-mel) and a text encoder (d=512, 6 layers, 8 heads), 128-d joint space;
  paper    gin/models/mulan_paper.gin: ResNet-50 (group norm) + BERT-base.
Peer (from the issue, measured on this machine): musiclm-pytorch's MuLaN (AST audio transformer and text
transformer, dim 512, depth 6, heads 8; 63M parameters; torch 2.13 CPU, 2 threads): 7.6 s per step, peak RSS
6.1 GiB. Prints the step medians, parameter counts and peak RSS, and one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import resource

import gin
import jax
import jax.numpy as jnp
import numpy as np

import common
from musiclm_jax import gin_utils, partitioning
from musiclm_jax import train as train_lib

PEER_STEP_S = 7.6
PEER_PARAMS = 63e6
BATCH, SECONDS, TEXT = 8, 10, 128
MATCHED = ["audio_towers.ViTConfig.hidden_size = 512", "audio_towers.ViTConfig.num_layers = 6",
           "audio_towers.ViTConfig.num_heads = 8", "audio_towers.ViTConfig.mlp_dim = 2048",
           "bert.BertConfig.hidden_size = 512", "bert.BertConfig.num_hidden_layers = 6",
           "bert.BertConfig.num_attention_heads = 8", "bert.BertConfig.intermediate_size = 2048"]


def measure(gin_file: str, bindings: list[str], repeats: int) -> dict:
    gin_utils.parse_gin([gin_file], ["MODEL_DIR = '/tmp/unused'", f"BATCH_SIZE = {BATCH}"] + bindings)
    args = gin_utils.bound_arguments("train", ["model", "optimizer"], {})
    gin.clear_config()
    model, optimizer = args["model"], args["optimizer"]
    partitioner = partitioning.Partitioner(partitioning.create_mesh())
    setup = train_lib.make_train_setup(model=model, optimizer=optimizer, batch_size=BATCH, partitioner=partitioner)
    state = setup.init_state(jax.random.key(0))
    rng = np.random.RandomState(0)
    batch = {"audio": jnp.asarray(0.1 * rng.randn(BATCH, SECONDS * model.sample_rate), jnp.float32),
             "text_tokens": jnp.asarray(rng.randint(3, 1000, (BATCH, TEXT)), jnp.int32)}
    step_s, times = common.train_step_seconds(setup, state, batch, partitioner, repeats)
    params = sum(x.size for x in jax.tree.leaves(state.params))
    return {"params": params, "train_step_s": step_s, "train_step_times": [round(t, 3) for t in times]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    matched = measure("gin/mulan/paper_ast.gin", MATCHED, args.repeats)
    speedup = PEER_STEP_S / matched["train_step_s"]
    print(f"matched (ViT + text, d=512 x 6): {matched['params'] / 1e6:.1f}M params, "
          f"{matched['train_step_s']:.2f} s per step (peer {PEER_STEP_S} s: x{speedup:.2f})")
    paper = measure("gin/mulan/paper.gin", [], args.repeats)
    print(f"paper (ResNet-50 + BERT-base): {paper['params'] / 1e6:.1f}M params, {paper['train_step_s']:.2f} s per step")
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"batch": BATCH, "audio_seconds": SECONDS, "text_tokens": TEXT, "matched": matched,
                      "paper": paper, "peer_step_s": PEER_STEP_S, "peer_params": PEER_PARAMS,
                      "speedup_vs_peer": PEER_STEP_S / matched["train_step_s"], "peak_rss_gib": peak_gib}))


if __name__ == "__main__":
    main()
