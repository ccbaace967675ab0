"""The SoundStream generator: SEANet encoder -> residual VQ -> SEANet decoder, on mono audio [batch, samples]."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from musiclm_jax.networks.seanet import SEANetConfig, SEANetDecoder, SEANetEncoder
from musiclm_jax.networks.quantizers import ResidualVQ, RVQConfig


class SoundStream(nn.Module):
    """Encoder, quantizer and decoder. Frames are hop_length = prod(strides) samples long."""

    seanet: SEANetConfig
    rvq: RVQConfig

    def setup(self):
        if self.seanet.dimension != self.rvq.dim:
            raise ValueError(f"SEANet dimension {self.seanet.dimension} != quantizer dim {self.rvq.dim}")
        self.encoder = SEANetEncoder(self.seanet)
        self.quantizer = ResidualVQ(self.rvq)
        self.decoder = SEANetDecoder(self.seanet)

    @property
    def hop_length(self) -> int:
        """Samples per latent frame."""
        return self.seanet.hop_length

    def __call__(self, audio: jax.Array, *, train: bool = False, num_levels: Optional[int] = None,
                 rng: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array, dict]:
        """audio [batch, samples] -> (reconstruction [batch, samples], codes [batch, frames, N], aux)."""
        latents = self.encoder(audio[..., None])
        quantized, codes, aux = self.quantizer(latents, train=train, num_levels=num_levels, rng=rng)
        reconstruction = self.decoder(quantized)[:, :audio.shape[1], 0]
        return reconstruction, codes, aux

    def encode(self, audio: jax.Array, num_levels: Optional[int] = None) -> jax.Array:
        """audio [batch, samples] -> codes [batch, ceil(samples / hop_length), num_levels] int32."""
        return self.quantizer.encode(self.encoder(audio[..., None]), num_levels)

    def decode(self, codes: jax.Array) -> jax.Array:
        """codes [batch, frames, n] (the first n levels) -> audio [batch, frames * hop_length]."""
        return self.decoder(self.quantizer.decode(codes).astype(jnp.dtype(self.seanet.dtype)))[..., 0]
