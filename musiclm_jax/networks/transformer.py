"""Decoder-only Transformer (T5.1.1 style) used by the three MusicLM stages.

Pre-norm (RMS norm) blocks of self-attention and a gated-GELU MLP, no biases, T5 relative position bias shared
by all layers (the paper's choice) or rotary embeddings. Prefix-LM: positions flagged in `prefix_mask` may
attend to each other in both directions when `bidirectional_prefix` is set; everything else is causal.

Memory options: `remat_policy` (rematerialise each layer in the backward pass) and `scan_layers` (one
compiled layer body run by `nn.scan`; parameters gain a leading 'layers' axis).

Decoding: call with `decode=True` on a module whose 'cache' collection was created by an `init` at the cache
capacity (see `init_cache` in models.py). Each call writes its tokens' keys/values at the current cache index
and advances it, so a prompt of P tokens can be fed at once (prefill) and then one token per step.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from musiclm_jax import layers
from musiclm_jax.partitioning import constrain

BLE = ("activation_batch", "activation_length", "activation_embed")
BLHD = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
BLKD = ("activation_batch", "activation_length", "activation_kv_heads", "activation_kv")
CACHE = ("cache_batch_heads", "cache_length", "cache_kv")
CACHE_GROUPED = ("cache_batch_kv_heads", "cache_length", "cache_kv")

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "minimal": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes and options of the decoder-only Transformer.

    Attributes:
      vocab_size: size of the single embedding table (all stage vocabularies, offset, plus specials);
        None lets TokenLMModel fill it in from its TokenLayout.
      embed_dim, num_layers, num_heads, head_dim, mlp_dim: the usual sizes.
      num_kv_heads: key/value heads (grouped-query attention; 1 = multi-query); None = num_heads (multi-head).
      gated_mlp: gated GELU (T5.1.1) if True, plain GELU if False.
      dropout_rate: dropout after attention and MLP blocks, on attention weights and on embeddings.
      position_encoding: 'relative' (T5 bias; num/max distance below) or 'rope'.
      bidirectional_prefix: prefix positions (prefix_mask) attend to each other both ways.
      dtype: compute dtype, 'float32' or 'bfloat16'; param_dtype: storage dtype of parameters.
      remat_policy: one of REMAT_POLICIES ('none', 'full', 'dots', 'minimal').
      scan_layers: run the layers with nn.scan (parameters get a leading 'layers' axis).
      tie_embeddings: output logits through the embedding table instead of a separate projection.
      causal_query_blocks: in training (causal attention without a bidirectional prefix), split the queries
        into this many blocks so each attends only to the keys it can see (see layers.dot_product_attention);
        4 makes CPU training ~1.3x faster. Keep 1 for TPU: libtpu 0.0.42 crashes compiling the blocked form of
        the paper model for v5e:16x16.
      vocab_multiple: the embedding table and logits are padded to a multiple of this many ids so that the
        vocabulary dimension shards evenly over the 'model' mesh axis; padded ids get -1e9 logits.
    """

    vocab_size: Optional[int] = None
    embed_dim: int = 512
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: Optional[int] = None
    head_dim: int = 64
    mlp_dim: int = 2048
    gated_mlp: bool = True
    dropout_rate: float = 0.0
    position_encoding: str = "relative"
    relative_num_buckets: int = 32
    relative_max_distance: int = 128
    rope_max_wavelength: float = 10_000.0
    bidirectional_prefix: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = False
    tie_embeddings: bool = False
    causal_query_blocks: int = 1
    vocab_multiple: int = 128

    def __post_init__(self):
        if self.position_encoding not in ("relative", "rope"):
            raise ValueError(f"position_encoding={self.position_encoding!r}: expected 'relative' or 'rope'")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}: expected one of {sorted(REMAT_POLICIES)}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected 'float32' or 'bfloat16'")

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding table: vocab_size rounded up to a multiple of vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self):
        return jnp.dtype(self.param_dtype)

    def num_params(self) -> int:
        """Number of parameters (analytic; equals the initialised count)."""
        attention = 2 * self.embed_dim * (self.num_heads + self.kv_heads) * self.head_dim
        mlp = (3 if self.gated_mlp else 2) * self.embed_dim * self.mlp_dim
        per_layer = attention + mlp + 2 * self.embed_dim
        output = 0 if self.tie_embeddings else self.embed_dim * self.padded_vocab_size
        relpos = self.relative_num_buckets * self.num_heads if self.position_encoding == "relative" else 0
        return self.num_layers * per_layer + self.padded_vocab_size * self.embed_dim + output + self.embed_dim + relpos

    def matmul_params(self) -> int:
        """Parameters used in matrix multiplies (all but the embedding lookup, norms and relative bias)."""
        attention = 2 * self.embed_dim * (self.num_heads + self.kv_heads) * self.head_dim
        mlp = (3 if self.gated_mlp else 2) * self.embed_dim * self.mlp_dim
        return self.num_layers * (attention + mlp) + self.embed_dim * self.padded_vocab_size

    def train_flops_per_token(self, sequence_length: int) -> float:
        """Model FLOPs of one training token (forward + backward): 6 * matmul params + 12 * layers * (heads *
        head_dim) * sequence_length for the attention scores and values (PaLM's formula, no remat)."""
        return 6.0 * self.matmul_params() + 12.0 * self.num_layers * self.num_heads * self.head_dim * sequence_length


class SelfAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention with an optional KV cache."""

    config: TransformerConfig
    deterministic: bool
    decode: bool

    @nn.compact
    def __call__(self, x, bias, mask, positions, cache_index):
        """bias: [1, heads|1, q, k] additive (relative positions, and the causal mask folded in) or None;
        mask: [batch, 1, q, k] bool for a bidirectional prefix, else None. k is the cache capacity when
        decoding, else the sequence length."""
        cfg = self.config
        dense = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype)
        grouped = cfg.kv_heads != cfg.num_heads
        # Multi-head K/V projections shard over heads like the queries; grouped ones are small and replicated.
        kv_names = ("embed", "kv_heads" if grouped else "heads", "kv")
        kv_activation = BLKD if grouped else BLHD
        query = constrain(layers.DenseGeneral((cfg.num_heads, cfg.head_dim), ("embed", "heads", "kv"),
                                              name="query", **dense)(x), BLHD)
        key, value = (constrain(layers.DenseGeneral((cfg.kv_heads, cfg.head_dim), kv_names, name=name, **dense)(x),
                                kv_activation) for name in ("key", "value"))
        if cfg.position_encoding == "rope":
            query = layers.apply_rope(query, positions, cfg.rope_max_wavelength)
            key = layers.apply_rope(key, positions, cfg.rope_max_wavelength)

        dropout_rng = None
        if not self.deterministic and cfg.dropout_rate > 0:
            dropout_rng = self.make_rng("dropout")
        if self.decode:
            # Cache layout [batch * kv_heads, capacity, head_dim] for keys and values, with the first axis dropped
            # when it is 1: the per-step products are plain (batched) matmuls, and XLA's CPU backend updates the
            # cache in place (with a size-1 axis it copies the whole cache every step). Each call writes its
            # tokens first, then attends over the cache.
            initialized = self.has_variable("cache", "cached_key")
            batch, length = key.shape[:2]
            rows = batch * cfg.kv_heads
            cache_names = (CACHE_GROUPED if grouped else CACHE)[(1 if rows == 1 else 0):]

            def merge(x):  # [b, l, kv_heads, d] -> [b * kv_heads, l, d] (or [l, d])
                x = jnp.transpose(x, (0, 2, 1, 3)).reshape(rows, length, cfg.head_dim)
                return x[0] if rows == 1 else x

            new_keys, new_values = merge(key), merge(value)
            cached_key = self.variable("cache", "cached_key", jnp.zeros, new_keys.shape, new_keys.dtype)
            cached_value = self.variable("cache", "cached_value", jnp.zeros, new_values.shape, new_values.dtype)
            if initialized:
                start = (0, cache_index, 0)[(1 if rows == 1 else 0):]
                cached_key.value = constrain(jax.lax.dynamic_update_slice(cached_key.value, new_keys, start),
                                             cache_names)
                cached_value.value = constrain(
                    jax.lax.dynamic_update_slice(cached_value.value, new_values, start), cache_names)
                out = layers.cached_attention(query, cached_key.value, cached_value.value, bias=bias, mask=mask,
                                              dtype=cfg.compute_dtype)
            else:  # the init call that sizes the cache: plain attention over this block
                out = layers.dot_product_attention(query, key, value, bias=bias, mask=mask, dtype=cfg.compute_dtype)
        else:
            out = layers.dot_product_attention(
                query, key, value, bias=bias, mask=mask, dropout_rate=cfg.dropout_rate, dropout_rng=dropout_rng,
                dtype=cfg.compute_dtype, causal_query_blocks=cfg.causal_query_blocks if mask is None else 1)
        out = constrain(out, BLHD)
        out = layers.DenseGeneral((cfg.embed_dim,), ("heads", "kv", "embed"), num_contract=2, name="out",
                                  **dense)(out)
        return constrain(out, BLE)


class MLPBlock(nn.Module):
    """Gated-GELU (T5.1.1: wi_0 gate, wi_1 linear) or GELU feed-forward block."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype)
        if cfg.gated_mlp:
            gate = layers.DenseGeneral((cfg.mlp_dim,), ("embed", "mlp"), name="wi_0", **dense)(x)
            linear = layers.DenseGeneral((cfg.mlp_dim,), ("embed", "mlp"), name="wi_1", **dense)(x)
            h = jax.nn.gelu(gate, approximate=True) * linear
        else:
            h = jax.nn.gelu(layers.DenseGeneral((cfg.mlp_dim,), ("embed", "mlp"), name="wi", **dense)(x),
                            approximate=True)
        h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        return constrain(layers.DenseGeneral((cfg.embed_dim,), ("mlp", "embed"), name="wo", **dense)(h), BLE)


class DecoderLayer(nn.Module):
    """One pre-norm block: x + Attention(Norm(x)), then x + MLP(Norm(x)). Returns (x, None) for nn.scan."""

    config: TransformerConfig
    deterministic: bool
    decode: bool

    @nn.compact
    def __call__(self, x, bias, mask, positions, cache_index):
        cfg = self.config
        norm = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype)
        h = layers.RMSNorm(name="pre_attention_norm", **norm)(x)
        h = SelfAttention(cfg, self.deterministic, self.decode, name="attention")(
            h, bias, mask, positions, cache_index)
        x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
        h = layers.RMSNorm(name="pre_mlp_norm", **norm)(x)
        h = MLPBlock(cfg, name="mlp")(h)
        x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
        return constrain(x, BLE), None


class DecoderOnlyTransformer(nn.Module):
    """tokens [batch, length] int32 -> logits [batch, length, padded_vocab_size] fp32."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, prefix_mask: Optional[jax.Array] = None,
                 positions: Optional[jax.Array] = None, *, deterministic: bool = True,
                 decode: bool = False) -> jax.Array:
        """Runs the decoder.

        Args:
          tokens: [batch, length] int32 input tokens (already shifted right for training).
          prefix_mask: [batch, length] bool/int, 1 on prefix positions (t5x's decoder_causal_attention);
            only used when config.bidirectional_prefix.
          positions: [batch, length] int32 per-example positions that the relative bias or the rotary embedding
            see (e.g. TokenLMModel's time-aligned positions), in place of the sequence index; attention stays
            causal in the sequence index. Keys may then lie after their queries, so the relative bias uses
            bidirectional buckets. When decoding, pass them to the `init` that sizes the cache (which then keeps
            every slot's position) and to the prefill; calls without them use the sequence index.
          deterministic: disables dropout.
          decode: use and advance the KV cache (see module docstring).
        Returns:
          logits [batch, length, padded_vocab_size] in fp32 (ids >= vocab_size get -1e9).
        """
        cfg = self.config
        batch, length = tokens.shape
        embedder = layers.Embed(cfg.padded_vocab_size, cfg.embed_dim, dtype=cfg.compute_dtype,
                                param_dtype=cfg.storage_dtype, name="token_embedder")
        x = embedder(tokens)
        x = constrain(nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic), BLE)

        if decode:
            initialized = self.has_variable("cache", "cache_index")
            index_var = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
            # A placeholder whose shape records the capacity chosen at init (the length of the init call).
            capacity_var = self.variable("cache", "capacity", lambda: jnp.zeros((length,), jnp.int8))
            capacity = capacity_var.value.shape[0]
            cache_index = index_var.value if initialized else jnp.zeros((), jnp.int32)
            if initialized:
                index_var.value = cache_index + length
        else:
            capacity, cache_index = length, jnp.zeros((), jnp.int32)
        # Keys are the cache slots when decoding (this call's tokens are written first), else the tokens.
        query_positions = cache_index + jnp.arange(length, dtype=jnp.int32)
        key_positions = jnp.arange(capacity, dtype=jnp.int32)
        causal = key_positions[None, :] <= query_positions[:, None]  # [q, k]
        explicit = positions is not None or (decode and self.has_variable("cache", "key_positions"))
        if explicit:  # per-example positions [b, q] and [b, k]
            if positions is None:
                positions = jnp.broadcast_to(query_positions[None], (batch, length))
            positions = positions.astype(jnp.int32)
            if decode:
                slot_var = self.variable("cache", "key_positions", lambda: positions)
                if initialized:
                    slot_var.value = jax.lax.dynamic_update_slice(slot_var.value, positions, (0, cache_index))
                key_positions = slot_var.value
            else:
                key_positions = positions
            query_positions = positions
        prefix_masked = cfg.bidirectional_prefix and prefix_mask is not None
        # Training with causal query blocks (layers.dot_product_attention): the bias is built per block, once.
        blocks = None if decode or prefix_masked else layers.causal_query_block_ranges(length,
                                                                                      cfg.causal_query_blocks)
        bias = None
        if cfg.position_encoding == "relative":
            relpos = layers.RelativePositionBias(
                cfg.num_heads, cfg.relative_num_buckets, cfg.relative_max_distance,
                bidirectional=cfg.bidirectional_prefix or explicit, name="relpos_bias")
            if blocks is not None and not explicit:  # the same bias for every example: gathered per layer
                bias = relpos.causal_blocks(blocks)
            else:
                bias = relpos(query_positions, key_positions)
        if prefix_masked:
            # Per-example mask [b, 1, q, k]: causal, plus prefix positions seeing each other (a prefix must be
            # fed in one call when decoding).
            query_prefix = prefix_mask.astype(bool)
            key_prefix = jax.lax.dynamic_update_slice(jnp.zeros((batch, capacity), bool), query_prefix,
                                                      (0, cache_index))
            mask = (causal[None] | (query_prefix[:, :, None] & key_prefix[:, None, :]))[:, None]
        else:
            mask = None
            if not isinstance(bias, layers.CausalBlockBias):  # (which holds the causal mask already)
                # The causal mask is the same for every example: fold it into the additive bias [1|b, h|1, q, k]
                # (per example with explicit positions), sliced into the query blocks once.
                base = bias if bias is not None else jnp.zeros((1, 1, length, capacity), jnp.float32)
                bias = layers.split_causal_bias(jnp.where(causal[None, None], base, layers.MASK_VALUE), blocks)
        if not explicit:
            positions = jnp.broadcast_to(query_positions[None], (batch, length))

        layer_cls = DecoderLayer
        policy = REMAT_POLICIES[cfg.remat_policy]
        if cfg.remat_policy != "none":
            layer_cls = nn.remat(DecoderLayer, policy=policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            scanned = nn.scan(layer_cls, variable_axes={"params": 0, "cache": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast,) * 4, length=cfg.num_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scanned(cfg, deterministic, decode, name="layers")(x, bias, mask, positions, cache_index)
        else:
            for i in range(cfg.num_layers):
                x, _ = layer_cls(cfg, deterministic, decode, name=f"layers_{i}")(
                    x, bias, mask, positions, cache_index)

        x = layers.RMSNorm(name="final_norm", dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype)(x)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        if cfg.tie_embeddings:
            logits = embedder.attend(x) / jnp.sqrt(cfg.embed_dim).astype(x.dtype)
        else:
            logits = layers.DenseGeneral((cfg.padded_vocab_size,), ("embed", "vocab"), name="logits_dense",
                                         dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype)(x)
        logits = logits.astype(jnp.float32)
        if cfg.padded_vocab_size != cfg.vocab_size:
            logits = jnp.where(jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size, logits, -1e9)
        return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
