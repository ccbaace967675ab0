"""Building blocks shared by the networks: dense, embedding, RMS norm, position encodings, attention.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`) and every large
activation is constrained with logical names through `partitioning.constrain`, which refuses unknown names.
Parameters are stored in `param_dtype` (fp32 by default) and cast to the compute `dtype` (e.g. bf16) on use;
norms, softmax and logits are computed in fp32.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax import partitioning

DType = Any


def fan_in_normal(fan_in: int, scale: float = 1.0):
    """Normal initializer with stddev scale / sqrt(fan_in)."""
    return nn.initializers.normal(stddev=scale / math.sqrt(fan_in))


class DenseGeneral(nn.Module):
    """A bias-free dense layer contracting the trailing `num_contract` axes of x into `features`.

    The kernel has shape x.shape[-num_contract:] + features and logical names `kernel_axes`. The product is
    computed as one 2-D matmul on contiguous reshapes of x and the kernel (XLA's CPU backend runs 2-D matmuls
    far faster than multi-dimensional dot_generals; on TPU the reshapes are free, and the sharded dimension of
    a merged group must be its leading one, which holds for every layout used here: (heads, kv), (batch, length)).
    """

    features: Sequence[int]
    kernel_axes: Sequence[str]
    num_contract: int = 1
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = tuple(self.features)
        in_shape = tuple(x.shape[x.ndim - self.num_contract:])
        shape = in_shape + features
        if len(self.kernel_axes) != len(shape):
            raise ValueError(f"{self.name}: kernel_axes {tuple(self.kernel_axes)} do not match kernel shape {shape}")
        fan_in = int(np.prod(in_shape))
        kernel = self.param("kernel", nn.with_logical_partitioning(fan_in_normal(fan_in, self.init_scale),
                                                                   tuple(self.kernel_axes)),
                            shape, self.param_dtype)
        batch_shape = x.shape[:x.ndim - self.num_contract]
        y = jnp.dot(x.reshape((-1, fan_in)).astype(self.dtype),
                    kernel.reshape((fan_in, -1)).astype(self.dtype))
        return y.reshape(batch_shape + features)


class Embed(nn.Module):
    """Token embedding table [vocab, embed] with logical names ('vocab', 'embed')."""

    num_embeddings: int
    features: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
            (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [...] int32 -> embeddings [..., features] in `dtype`."""
        return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the table (tied output projection): x [..., features] -> [..., vocab]."""
        return jnp.einsum("...e,ve->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (T5): computed in fp32, scale with logical name ('norm',)."""

    epsilon: float = 1e-6
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


# ------------------------------------------------------------------------------------------ position encodings


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """T5's bucketing of (key position - query position) into `num_buckets` ids.

    Distances below num_buckets/2 (per direction) get a bucket each; larger ones share log-spaced buckets up
    to `max_distance`, beyond which everything falls in the last bucket.
    """
    buckets = jnp.zeros_like(relative_position)
    distance = -relative_position  # > 0 when the key lies before the query
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (distance < 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(distance)
    else:
        distance = jnp.maximum(distance, 0)
    max_exact = num_buckets // 2
    is_exact = distance < max_exact
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_exact, distance, large)


class RelativePositionBias(nn.Module):
    """T5 relative position bias: a learned scalar per (bucket, head), shared by all layers.

    Returns bias [1, heads, q_len, k_len] for query positions [q_len] and key positions [k_len].
    """

    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = False
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("relpos_buckets", "heads")),
            (self.num_buckets, self.num_heads), self.param_dtype)
        relative = key_positions[None, :] - query_positions[:, None]
        buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        bias = jnp.take(table, buckets, axis=0)  # [q, k, heads]
        return jnp.transpose(bias, (2, 0, 1))[None].astype(jnp.float32)


def apply_rope(x: jax.Array, positions: jax.Array, max_wavelength: float = 10_000.0) -> jax.Array:
    """Rotary position embedding on x [batch, length, heads, head_dim] at positions [batch, length]."""
    half = x.shape[-1] // 2
    freq = 1.0 / (max_wavelength ** (jnp.arange(half, dtype=jnp.float32) / half))
    angle = positions.astype(jnp.float32)[..., None, None] * freq  # [b, l, 1, half]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# -------------------------------------------------------------------------------------------------- attention

MASK_VALUE = -1e10


def _grouped_query(query: jax.Array, kv_heads: int) -> jax.Array:
    """[b, q, heads, d] -> [b, q, kv_heads, group, d]; query head h = kv_head * group + g."""
    b, q, h, d = query.shape
    return query.reshape(b, q, kv_heads, h // kv_heads, d)


def _masked_softmax(logits: jax.Array, bias: Optional[jax.Array], mask: Optional[jax.Array]) -> jax.Array:
    """softmax(logits + bias) over the last axis, with mask-False positions given no weight (fp32)."""
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = jnp.where(mask, logits, MASK_VALUE)
    return jax.nn.softmax(logits, axis=-1)


def _attend(query, key, value, bias, mask, dropout_rate, dropout_rng, dtype):
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    query = (query * (1.0 / math.sqrt(head_dim))).astype(dtype)
    if kv_heads == heads:  # multi-head: the 4-D form, which XLA's CPU backend runs fastest
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key.astype(dtype), preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("bqkgd,bskd->bkgqs", _grouped_query(query, kv_heads), key.astype(dtype),
                            preferred_element_type=jnp.float32).reshape(batch, heads, q_len, key.shape[1])
    weights = _masked_softmax(logits, bias, mask)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    weights = weights.astype(dtype)
    if kv_heads == heads:
        return jnp.einsum("bhqk,bkhd->bqhd", weights, value.astype(dtype))
    weights = weights.reshape(batch, kv_heads, heads // kv_heads, q_len, key.shape[1])
    out = jnp.einsum("bkgqs,bskd->bqkgd", weights, value.astype(dtype))
    return out.reshape(batch, q_len, heads, head_dim)


def _slice_qk(x: Optional[jax.Array], q_start: int, q_end: int, k_end: int) -> Optional[jax.Array]:
    if x is None:
        return None
    return x[..., q_start if x.shape[-2] > 1 else 0:q_end if x.shape[-2] > 1 else 1, :k_end]


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, bias: Optional[jax.Array],
                          mask: Optional[jax.Array], dropout_rate: float = 0.0,
                          dropout_rng: Optional[jax.Array] = None, dtype: DType = jnp.float32,
                          causal_query_blocks: int = 1) -> jax.Array:
    """Scaled dot-product attention.

    Args:
      query: [batch, q_len, heads, head_dim]; key, value: [batch, k_len, kv_heads, head_dim], where kv_heads
        divides heads (grouped-query attention; kv_heads == heads is multi-head attention).
      bias: added to the logits, broadcastable to [batch, heads, q_len, k_len] (relative position bias and,
        folded in, a -1e10 mask).
      mask: bool, broadcastable to [batch, heads, q_len, k_len]; False positions get no weight.
      causal_query_blocks: if > 1, the attention is known to be causal with q_len == k_len: queries are split
        into this many blocks and block i attends only to keys up to its last query, skipping the masked upper
        triangle (about 40% of the score and value FLOPs for 4 blocks). The result is the same.
    Returns:
      [batch, q_len, heads, head_dim] in `dtype`. Logits and softmax are computed in fp32.
    """
    length = query.shape[1]
    if causal_query_blocks <= 1 or length != key.shape[1] or length < 2 * causal_query_blocks:
        return _attend(query, key, value, bias, mask, dropout_rate, dropout_rng, dtype)
    block = -(-length // causal_query_blocks)
    outputs = []
    for i, start in enumerate(range(0, length, block)):
        end = min(start + block, length)
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
        outputs.append(_attend(query[:, start:end], key[:, :end], value[:, :end], _slice_qk(bias, start, end, end),
                               _slice_qk(mask, start, end, end), dropout_rate, rng, dtype))
    return jnp.concatenate(outputs, axis=1)


def cached_attention(query: jax.Array, cached_keys: jax.Array, cached_values: jax.Array, *,
                     bias: Optional[jax.Array], mask: Optional[jax.Array], dtype: DType = jnp.float32) -> jax.Array:
    """Attention of new queries over a KV cache that already holds their own keys (decoding; no dropout).

    Args:
      query: [batch, q_len, heads, head_dim].
      cached_keys, cached_values: [batch * kv_heads, capacity, head_dim], or [capacity, head_dim] when
        batch * kv_heads is 1.
      bias, mask: as in dot_product_attention, over [batch, heads, q_len, capacity]; slots not yet written
        must be masked (the causal mask does it).
    Returns:
      [batch, q_len, heads, head_dim].
    """
    batch, q_len, heads, head_dim = query.shape
    rows = 1 if cached_keys.ndim == 2 else cached_keys.shape[0]
    kv_heads = rows // batch
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim)
    # [b, q, kv, g, d] -> [b * kv, g * q, d]: one matmul per (example, kv head) covers its query group.
    q = jnp.transpose(_grouped_query(query * scale, kv_heads), (0, 2, 3, 1, 4))
    q = q.reshape(rows, group * q_len, head_dim).astype(dtype)
    keys, values = cached_keys.astype(dtype), cached_values.astype(dtype)
    if cached_keys.ndim == 2:
        logits = jnp.einsum("md,kd->mk", q[0], keys, preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("nmd,nkd->nmk", q, keys, preferred_element_type=jnp.float32)
    weights = _masked_softmax(logits.reshape(batch, heads, q_len, -1), bias, mask)
    weights = weights.reshape(rows, group * q_len, -1).astype(dtype)
    if cached_keys.ndim == 2:
        out = jnp.einsum("mk,kd->md", weights[0], values)
    else:
        out = jnp.einsum("nmk,nkd->nmd", weights, values)
    out = out.reshape(batch, kv_heads, group, q_len, head_dim)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, q_len, heads, head_dim)
