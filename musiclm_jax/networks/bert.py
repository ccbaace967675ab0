"""A BERT-style text encoder (MuLan's text tower): BERT (Devlin et al. 2019) or RoBERTa/CLAP as transformers
computes them at inference.

    tokens [batch, length] int32, mask [batch, length] (1 = real token)
      -> word + position (+ token type 0) embeddings, layer norm
      -> num_hidden_layers post-norm layers: x = LN(x + attention(x)), x = LN(x + MLP(x)), padding masked out
      -> hidden [batch, length, hidden_size] and pooled [batch, hidden_size]

Positions: 'absolute' (BERT: 0, 1, 2, ...) or 'roberta' (transformers' RoBERTa/CLAP: real tokens get
padding_idx + 1, + 2, ... counting only real tokens, padding gets padding_idx). Pooling: 'first_dense_tanh' (BERT
and CLAP's pooler: dense + tanh of the first token), 'first' (the first token) or 'mean' (over real tokens; for
SentencePiece vocabularies without a [CLS] token).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from musiclm_jax import layers
from musiclm_jax.layers import ACTIVATIONS, Dense, layer_norm
from musiclm_jax.partitioning import constrain

BLE = ("activation_batch", "activation_length", "activation_embed")
POSITIONS = ("absolute", "roberta")
POOLINGS = ("first_dense_tanh", "first", "mean")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Sizes of the text encoder; field names as transformers' BertConfig / ClapTextConfig (defaults: BERT-base
    with a 32k vocabulary). `max_length` is the tokens per caption the model is fed (<= max_position_embeddings,
    minus padding_idx + 1 for 'roberta' positions)."""

    vocab_size: int = 32000
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    position_style: str = "absolute"
    padding_idx: int = 0
    pooling: str = "first_dense_tanh"
    max_length: int = 64
    dtype: str = "float32"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.position_style not in POSITIONS:
            raise ValueError(f"position_style={self.position_style!r}: expected one of {POSITIONS}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}: expected one of {POOLINGS}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}: supported are {sorted(ACTIVATIONS)}")
        last = self.max_length + (self.padding_idx + 1 if self.position_style == "roberta" else 0)
        if last > self.max_position_embeddings:
            raise ValueError(f"max_length={self.max_length} needs {last} positions; max_position_embeddings="
                             f"{self.max_position_embeddings}")

    @property
    def output_dim(self) -> int:
        return self.hidden_size


class BertLayer(nn.Module):
    """One post-norm layer with a padding mask: x [batch, length, hidden], mask [batch, length] -> same."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        return layers.encoder_block(x, heads=cfg.num_attention_heads,
                                    head_dim=cfg.hidden_size // cfg.num_attention_heads,
                                    mlp_dim=cfg.intermediate_size, activation=cfg.hidden_act,
                                    epsilon=cfg.layer_norm_eps, pre_norm=False, dtype=jnp.dtype(cfg.dtype),
                                    mask=mask[:, None, None, :].astype(bool))  # [batch, heads, query, key]


class Bert(nn.Module):
    """tokens [batch, length], mask [batch, length] -> (hidden [batch, length, hidden_size], pooled
    [batch, hidden_size]), both fp32. See the module docstring."""

    config: BertConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        mask = mask.astype(jnp.int32)
        if cfg.position_style == "roberta":
            positions = jnp.cumsum(mask, axis=1) * mask + cfg.padding_idx
        else:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

        def table(name, rows):
            return self.param(name, nn.with_logical_partitioning(nn.initializers.normal(0.02), ("table_rows", "embed")),
                              (rows, cfg.hidden_size))
        words = table("word_embeddings", cfg.vocab_size)
        x = (jnp.take(words, tokens, axis=0) + jnp.take(table("position_embeddings", cfg.max_position_embeddings),
                                                        positions, axis=0)
             + table("token_type_embeddings", cfg.type_vocab_size)[0])
        x = constrain(layer_norm("embeddings_norm", cfg.layer_norm_eps)(x), BLE)
        for i in range(cfg.num_hidden_layers):
            x = BertLayer(cfg, name=f"layers_{i}")(x, mask)
        x = x.astype(jnp.float32)
        if cfg.pooling == "mean":
            weights = mask[..., None].astype(jnp.float32)
            pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        else:
            pooled = x[:, 0]
            if cfg.pooling == "first_dense_tanh":
                pooled = jnp.tanh(Dense((cfg.hidden_size,), ("embed", "mlp"), bias_axes=("mlp",), dtype=dtype,
                                        name="pooler")(pooled.astype(dtype))).astype(jnp.float32)
        return x, pooled
