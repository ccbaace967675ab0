"""Residual vector quantization (SoundStream / EnCodec) with EMA codebooks.

N levels of K codes each quantize a latent [batch, frames, dim] one residual at a time. Codebooks are not
trained by gradients: they live in the 'quantizer' Flax collection and follow exponential moving averages of
the vectors assigned to each code (VQ-VAE-2 / SoundStream), with

* k-means initialisation of each level from the first training batch,
* replacement of dead codes (EMA usage below `dead_code_threshold`) by random vectors of the current batch,
* quantizer dropout: each training example uses n_q levels, n_q uniform in [1, N] (bitrate scalability),
* a commitment loss ||residual - sg(quantized)||^2 per active level, and straight-through gradients.

Under data parallelism the statistics are sums over the *global* batch: the arrays are global jax.Arrays and
XLA reduces over the data axes, so every replica holds identical codebooks. The nearest-code search and the
encode/decode arithmetic are vq.py's.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from musiclm_jax import kmeans as kmeans_lib
from musiclm_jax.vq import nearest_code, rvq_decode, rvq_encode

STATE = "quantizer"


@dataclasses.dataclass(frozen=True)
class RVQConfig:
    """Residual VQ settings.

    Attributes:
      num_quantizers: levels N; codebook_size: codes per level K; dim: latent dimension.
      decay: EMA decay of the codebook statistics; epsilon: Laplace smoothing of code counts.
      kmeans_init, kmeans_iters: initialise each level by k-means on the first training batch.
      dead_code_threshold: codes whose EMA count falls below this are replaced (0 disables).
      quantizer_dropout: the probability (True: 1) that a training example draws its n_q uniformly in [1, N]
        (SoundStream's bitrate scalability); the others use all N levels. DAC trains with 0.5, having found
        that dropout on every example costs quality at the full bitrate (arXiv 2306.06546, section 3.3).
    """

    num_quantizers: int = 12
    codebook_size: int = 1024
    dim: int = 128
    decay: float = 0.99
    epsilon: float = 1e-5
    kmeans_init: bool = True
    kmeans_iters: int = 10
    dead_code_threshold: float = 2.0
    quantizer_dropout: float = 1.0

    def __post_init__(self):
        if not 0.0 <= float(self.quantizer_dropout) <= 1.0:
            raise ValueError(f"RVQConfig.quantizer_dropout {self.quantizer_dropout} must be a probability in [0, 1]")


def counts_perplexity(counts: jax.Array) -> jax.Array:
    """exp(entropy) of code histograms counts [..., K] -> [...] float32: 1 when one code has every count, K when
    all are used equally (no counts: 1)."""
    p = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1e-9)
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1))


def code_perplexity(idx: jax.Array, weights: jax.Array, codebook_size: int) -> jax.Array:
    """counts_perplexity of the code histogram of idx [M] (rows weighted by weights [M]) -> float32 scalar."""
    return counts_perplexity(jnp.sum(jax.nn.one_hot(idx, codebook_size, dtype=jnp.float32) * weights[:, None],
                                     axis=0))


class ResidualVQ(nn.Module):
    """Residual vector quantizer; state in the 'quantizer' collection (codebook, cluster_size, embed_sum,
    initialized), all with a leading [num_quantizers] axis."""

    config: RVQConfig

    def setup(self):
        cfg = self.config
        shape = (cfg.num_quantizers, cfg.codebook_size)
        # Random codebooks until k-means (or a converted checkpoint) replaces them; init functions only run when
        # the variables are created.
        self.codebook = self.variable(STATE, "codebook", lambda: jax.random.normal(
            self.make_rng("params"), shape + (cfg.dim,), jnp.float32))
        self.cluster_size = self.variable(STATE, "cluster_size", lambda: jnp.zeros(shape, jnp.float32))
        self.embed_sum = self.variable(STATE, "embed_sum", lambda: jnp.zeros(shape + (cfg.dim,), jnp.float32))
        self.initialized = self.variable(STATE, "initialized", lambda: jnp.zeros((cfg.num_quantizers,), jnp.float32))

    def decode(self, codes: jax.Array) -> jax.Array:
        """codes [batch, frames, n] (levels 0..n-1, n <= N) -> the sum of their code vectors [batch, frames, dim]."""
        return rvq_decode(codes, self.codebook.value)

    def encode(self, x: jax.Array, num_levels: Optional[int] = None) -> jax.Array:
        """x [batch, frames, dim] -> codes [batch, frames, num_levels] int32 (default: all levels)."""
        return rvq_encode(x, self.codebook.value, num_levels)

    def __call__(self, x: jax.Array, *, train: bool = False, num_levels: Optional[int] = None,
                 rng: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array, dict]:
        """Quantizes x [batch, frames, dim].

        Args:
          train: update the EMA statistics (the 'quantizer' collection must be mutable) and, if configured,
            apply quantizer dropout; needs `rng`.
          num_levels: levels to use when not dropping out (default all).
        Returns:
          (quantized [batch, frames, dim] with straight-through gradients to x,
           codes [batch, frames, N] int32 (levels beyond an example's n_q are still computed),
           {'commitment_loss': scalar, 'num_levels': [batch] int32 levels used per example,
            'perplexity': [N] float32 codebook perplexity per level over the rows that use it (code_perplexity)}).
        """
        cfg = self.config
        codebook_var, size_var, sum_var, init_var = self.codebook, self.cluster_size, self.embed_sum, self.initialized
        batch, frames, dim = x.shape
        flat = x.reshape(-1, dim).astype(jnp.float32)
        if train and cfg.quantizer_dropout:
            rng, sub = jax.random.split(rng)
            n_q = jax.random.randint(sub, (batch,), 1, cfg.num_quantizers + 1)
            if cfg.quantizer_dropout < 1.0:
                rng, sub = jax.random.split(rng)
                dropped = jax.random.uniform(sub, (batch,)) < cfg.quantizer_dropout
                n_q = jnp.where(dropped, n_q, cfg.num_quantizers)
        else:
            n_q = jnp.full((batch,), cfg.num_quantizers if num_levels is None else num_levels, jnp.int32)
        rows_n_q = jnp.repeat(n_q, frames)  # [batch * frames]

        codebooks, sizes, sums, inits = codebook_var.value, size_var.value, sum_var.value, init_var.value
        residual = flat
        quantized = jnp.zeros_like(flat)
        commitment = jnp.zeros((), jnp.float32)
        codes, perplexity = [], []
        new_codebooks, new_sizes, new_sums = [], [], []
        for level in range(cfg.num_quantizers):
            active = (rows_n_q > level).astype(jnp.float32)
            codebook, size, total = codebooks[level], sizes[level], sums[level]
            if train:
                rng, k_init, k_dead = jax.random.split(rng, 3)
                if cfg.kmeans_init:
                    def fresh(r=residual, key=k_init):
                        centroids, counts = kmeans_lib.lloyd(r, cfg.codebook_size, cfg.kmeans_iters, key)
                        return centroids, counts, centroids * counts[:, None]
                    codebook, size, total = jax.lax.cond(
                        inits[level] > 0, lambda c=codebook, s=size, t=total: (c, s, t), fresh)
            idx = nearest_code(residual, codebook)
            q = codebook[idx]
            weight = jnp.maximum(jnp.sum(active), 1.0)
            commitment = commitment + jnp.sum(jnp.sum(jnp.square(residual - jax.lax.stop_gradient(q)), axis=1)
                                              * active) / (weight * dim)
            quantized = quantized + q * active[:, None]
            codes.append(idx)
            perplexity.append(code_perplexity(idx, active, cfg.codebook_size))
            if train:
                codebook, size, total = self._ema_update(residual, idx, active, codebook, size, total, k_dead)
                new_codebooks.append(codebook)
                new_sizes.append(size)
                new_sums.append(total)
            residual = residual - q
        if train and self.is_mutable_collection(STATE):
            codebook_var.value = jnp.stack(new_codebooks)
            size_var.value = jnp.stack(new_sizes)
            sum_var.value = jnp.stack(new_sums)
            init_var.value = jnp.ones_like(inits)
        quantized = flat + jax.lax.stop_gradient(quantized - flat)  # straight-through
        codes = jnp.stack(codes, axis=-1).reshape(batch, frames, cfg.num_quantizers)
        return (quantized.reshape(x.shape).astype(x.dtype), codes,
                {"commitment_loss": commitment, "num_levels": n_q, "perplexity": jnp.stack(perplexity)})

    def _ema_update(self, residual, idx, active, codebook, size, total, rng):
        """One EMA step of a level's statistics from the rows assigned to its codes (inactive rows ignored).

        A level that no example uses in this batch (quantizer dropout) keeps its statistics.
        """
        cfg = self.config
        old = (codebook, size, total)
        residual = jax.lax.stop_gradient(residual)
        assign = jax.nn.one_hot(idx, cfg.codebook_size, dtype=jnp.float32) * active[:, None]
        size = cfg.decay * size + (1.0 - cfg.decay) * jnp.sum(assign, axis=0)
        total = cfg.decay * total + (1.0 - cfg.decay) * (assign.T @ residual)
        n = jnp.sum(size)
        smoothed = (size + cfg.epsilon) / (n + cfg.codebook_size * cfg.epsilon) * n
        codebook = total / smoothed[:, None]
        if cfg.dead_code_threshold > 0:
            dead = size < cfg.dead_code_threshold
            p = active / jnp.maximum(jnp.sum(active), 1.0)
            samples = residual[jax.random.choice(rng, residual.shape[0], (cfg.codebook_size,), p=p)]
            codebook = jnp.where(dead[:, None], samples, codebook)
            size = jnp.where(dead, cfg.dead_code_threshold, size)
            total = jnp.where(dead[:, None], samples * cfg.dead_code_threshold, total)
        used = jnp.sum(active) > 0
        return tuple(jnp.where(used, new, prev) for new, prev in zip((codebook, size, total), old))
