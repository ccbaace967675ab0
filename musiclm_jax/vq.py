"""Vector quantization arithmetic: nearest-code search and residual VQ encode/decode.

The one implementation behind every quantizer of the project: the codec's EMA residual VQ
(quantizers.ResidualVQ), k-means (kmeans.py, the semantic tokenizer's and the RVQ fits), MuLan's conditioning
RVQ (mulan.ConditioningRVQ) and the exported quantize function. Distances are float32 with HIGHEST-precision
matmuls (so a TPU's default bf16 passes do not change which code is nearest) and clamped at 0; ties go to the
lowest code index.

Shapes: points x [M, D]; a codebook [K, D]; a residual VQ's codebooks [N, K, D] (N levels of K codes).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def squared_distances(x: jax.Array, codebook: jax.Array) -> jax.Array:
    """||x_i - c_k||^2 for x [M, D] and codebook [K, D] -> [M, K] float32, >= 0."""
    x = jnp.asarray(x, jnp.float32)
    codebook = jnp.asarray(codebook, jnp.float32)
    d = (jnp.sum(x * x, axis=1, keepdims=True) - 2.0 * jnp.dot(x, codebook.T, precision=HIGHEST)
         + jnp.sum(codebook * codebook, axis=1)[None, :])
    return jnp.maximum(d, 0.0)


def nearest_code_and_distance(x: jax.Array, codebook: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(index of the nearest code [M] int32, its squared distance [M] float32) for each row of x [M, D]."""
    d = squared_distances(x, codebook)
    ids = jnp.argmin(d, axis=1).astype(jnp.int32)
    return ids, jnp.take_along_axis(d, ids[:, None], axis=1)[:, 0]


def nearest_code(x: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest code of codebook [K, D] for each row of x [M, D] -> [M] int32."""
    return nearest_code_and_distance(x, codebook)[0]


def _rvq_levels(x: jax.Array, codebooks: jax.Array, n: int, margins: bool) -> tuple[jax.Array, Optional[jax.Array]]:
    """The residual VQ loop of rvq_encode / rvq_encode_with_margins over the first n levels -> (codes [..., n],
    margins [..., n] or None)."""
    residual = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
    codes, gaps = [], []
    for level in range(n):
        book = jnp.asarray(codebooks[level], jnp.float32)
        if margins:
            d = squared_distances(residual, book)
            idx = jnp.argmin(d, axis=1).astype(jnp.int32)
            best = jnp.take_along_axis(d, idx[:, None], axis=1)[:, 0]
            gaps.append(jnp.min(jnp.where(jax.nn.one_hot(idx, d.shape[1], dtype=jnp.bool_), jnp.inf, d), axis=1)
                        - best)
        else:
            idx = nearest_code(residual, book)
        residual = residual - book[idx]
        codes.append(idx)
    shape = x.shape[:-1] + (n,)
    return (jnp.stack(codes, axis=-1).reshape(shape),
            jnp.stack(gaps, axis=-1).reshape(shape) if margins else None)


def rvq_encode(x: jax.Array, codebooks: jax.Array, num_levels: Optional[int] = None) -> jax.Array:
    """Residual VQ codes of x [..., D] with codebooks [N, K, D] -> [..., n] int32 (n = num_levels, default N):
    level l quantizes what levels 0..l-1 left."""
    n = codebooks.shape[0] if num_levels is None else int(num_levels)
    if not 0 < n <= codebooks.shape[0]:
        raise ValueError(f"num_levels={num_levels}: the residual VQ has {codebooks.shape[0]} levels")
    return _rvq_levels(x, codebooks, n, margins=False)[0]


def rvq_decode(codes: jax.Array, codebooks: jax.Array) -> jax.Array:
    """codes [..., n] (levels 0..n-1, n <= N) with codebooks [N, K, D] -> the sum of their code vectors [..., D]
    float32."""
    out = jnp.zeros(codes.shape[:-1] + (codebooks.shape[-1],), jnp.float32)
    for level in range(codes.shape[-1]):
        out = out + jnp.take(jnp.asarray(codebooks[level], jnp.float32), codes[..., level], axis=0)
    return out


def rvq_encode_with_margins(x: jax.Array, codebooks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """rvq_encode of x [..., D] with codebooks [N, K, D] (K >= 2), and each chosen code's margin: the squared
    distance of the second-nearest code minus the nearest's, at that level's residual -> (codes [..., N] int32,
    margins [..., N] float32 >= 0). A margin near 0 is a near tie, which float rounding elsewhere (another device
    layout, another batch shape) may resolve the other way."""
    return _rvq_levels(x, codebooks, codebooks.shape[0], margins=True)
