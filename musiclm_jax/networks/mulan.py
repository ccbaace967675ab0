"""The MuLan network: an audio tower and a text tower projected into one L2-normalised embedding space.

    audio features [batch, frames, bands] -> audio tower -> pooled -> projection -> normalise -> [batch, embed_dim]
    tokens [batch, length], mask            -> text tower  -> pooled -> projection -> normalise -> [batch, embed_dim]

Towers: networks/audio_towers.py (ResNetConfig, the paper's; ViTConfig, AST-style) or networks/htsat.py
(HTSATConfig, the imported CLAP tower); networks/bert.py for text. Projection: 'linear' (MuLan: one dense layer)
or 'mlp' (CLAP: dense, ReLU, dense, all of width embed_dim), with biases. The learnable temperature is stored as
log(1 / temperature) ('logit_scale', as CLIP and CLAP), initialised to log(1 / init_temperature).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from musiclm_jax.layers import Dense
from musiclm_jax.networks.bert import Bert, BertConfig

PROJECTIONS = ("linear", "mlp")


@dataclasses.dataclass(frozen=True)
class MuLanConfig:
    """audio: a tower config (features/make/output_dim/sample_rate); text: BertConfig; embed_dim (paper: 128)."""

    audio: Any
    text: BertConfig
    embed_dim: int = 128
    projection: str = "linear"
    init_temperature: float = 0.07

    def __post_init__(self):
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection={self.projection!r}: expected one of {PROJECTIONS}")
        for name in ("features", "make", "output_dim", "sample_rate"):
            if not hasattr(self.audio, name):
                raise ValueError(f"audio tower config {type(self.audio).__name__} has no {name!r}")


class Projection(nn.Module):
    """pooled [batch, d] -> L2-normalised [batch, embed_dim] (fp32)."""

    embed_dim: int
    kind: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Dense((self.embed_dim,), ("embed", "mlp"), bias_axes=("mlp",), name="linear1")(x.astype(jnp.float32))
        if self.kind == "mlp":
            x = Dense((self.embed_dim,), ("mlp", "embed"), bias_axes=("embed",), name="linear2")(nn.relu(x))
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class MuLan(nn.Module):
    """See the module docstring. `__call__` (used for init and training) returns (audio embeddings, text
    embeddings, logit_scale)."""

    config: MuLanConfig

    def setup(self):
        cfg = self.config
        self.audio_tower = cfg.audio.make(name="audio_tower")
        self.text_tower = Bert(cfg.text, name="text_tower")
        self.audio_projection = Projection(cfg.embed_dim, cfg.projection)
        self.text_projection = Projection(cfg.embed_dim, cfg.projection)
        self.logit_scale = self.param("logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(math.log(1.0 / cfg.init_temperature)), ()), ())

    def embed_audio(self, features: jax.Array) -> jax.Array:
        """features [batch, frames, bands] (the tower's front end) -> [batch, embed_dim], unit norm."""
        return self.audio_projection(self.audio_tower(features))

    def embed_text(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """tokens, mask [batch, length] -> [batch, embed_dim], unit norm."""
        return self.text_projection(self.text_tower(tokens, mask)[1])

    def __call__(self, features: jax.Array, tokens: jax.Array, mask: jax.Array):
        return self.embed_audio(features), self.embed_text(tokens, mask), self.logit_scale
