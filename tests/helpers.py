"""Small builders shared by tests (tiny models and meshes)."""
from __future__ import annotations

import jax
import numpy as np

from musiclm_jax import partitioning
from musiclm_jax.models import TokenLMModel
from musiclm_jax.networks.transformer import TransformerConfig
from musiclm_jax.token_layout import TokenLayout

TINY_LAYOUT = TokenLayout.from_tuples((("mulan", 12, 32), ("semantic", 1, 64)))


def tiny_model(prefix_length: int = 12, target_length: int = 20, layout: TokenLayout = TINY_LAYOUT,
               target_group: str = "semantic", prefix_groups=("mulan",), **network) -> TokenLMModel:
    cfg = dict(embed_dim=32, num_layers=2, num_heads=4, head_dim=8, mlp_dim=64)
    cfg.update(network)
    return TokenLMModel(TransformerConfig(**cfg), layout, prefix_groups, target_group, prefix_length,
                        target_length)


def init_params(model: TokenLMModel, seed: int = 0):
    return partitioning.unbox(model.get_initial_variables(jax.random.key(seed), model.input_shapes(2))["params"])


def random_batch(model: TokenLMModel, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A prefix-LM batch of random valid tokens in the feature converter's layout."""
    rng = np.random.RandomState(seed)
    layout = model.layout
    prefix = np.concatenate([rng.randint(lo, hi, (batch_size, 1))
                             for lo, hi in np.resize(layout.level_ranges(model.prefix_groups[0]),
                                                     (model.prefix_length, 2))], axis=1)
    ranges = np.resize(layout.level_ranges(model.target_group), (model.target_length, 2))
    targets = np.concatenate([rng.randint(lo, hi, (batch_size, 1)) for lo, hi in ranges], axis=1)
    seq = np.concatenate([prefix, targets], axis=1).astype(np.int32)
    inputs = np.concatenate([np.zeros((batch_size, 1), np.int32), seq[:, :-1]], axis=1)
    weights = np.concatenate([np.zeros((batch_size, model.prefix_length)), np.ones((batch_size, model.target_length))],
                             axis=1).astype(np.int32)
    causal = (np.arange(seq.shape[1]) <= model.prefix_length).astype(np.int32)[None].repeat(batch_size, 0)
    return {"decoder_input_tokens": inputs, "decoder_target_tokens": seq, "decoder_loss_weights": weights,
            "decoder_causal_attention": causal}


def mesh(data: int, model: int, fsdp: int = 1, devices=None):
    return partitioning.mesh_from_shape({"data": data, "fsdp": fsdp, "model": model}, devices)
