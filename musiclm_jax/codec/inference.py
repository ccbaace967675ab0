"""The codec's inference class (as audiocraft's compression models); its command line is codec/__main__.py.

    codec = Codec.from_checkpoint("/path/to/MODEL_DIR")
    codes = codec.encode(audio)              # audio [batch, samples] at codec.sample_rate -> [batch, frames, n_q]
    audio = codec.decode(codes[..., :4])     # any number of the first levels (bitrate scalability)

A checkpoint directory is a training MODEL_DIR (config.gin + checkpoints/), e.g. from `python -m
musiclm_jax.train --gin_file=gin/codec/tiny.gin` or `python -m musiclm_jax.convert encodec`. Input audio is
mixed to mono and resampled to the codec's rate; codes.npy holds int32 [frames, n_q].
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class Codec:
    """Encode audio to RVQ codes and decode them back.

    Args:
      network: the generator, a SoundStream (networks/soundstream.py) or a SpectralCodec
        (networks/spectral_codec.py): a Flax module with `hop_length`, `rvq`, `encode(audio, num_levels)` and
        `decode(codes)`; variables: its Flax variables ('params' and 'quantizer').
      sample_rate: Hz.
    """

    def __init__(self, network: nn.Module, variables: dict, sample_rate: int):
        self.network = network
        self.variables = variables
        self.sample_rate = int(sample_rate)
        self._encode = jax.jit(partial(network.apply, method=type(network).encode), static_argnums=(2,))
        self._decode = jax.jit(partial(network.apply, method=type(network).decode))

    @property
    def hop_length(self) -> int:
        """Samples per frame."""
        return self.network.hop_length

    @property
    def frame_rate(self) -> float:
        """Frames (code vectors) per second."""
        return self.sample_rate / self.hop_length

    @property
    def causal(self) -> bool:
        """Whether no decoded sample depends on later frames (a SoundStream with causal SEANet padding), so a
        prefix of the codes decodes to the first samples of the whole (pipeline.MusicLM.generate_stream)."""
        return bool(getattr(getattr(self.network, "seanet", None), "causal", False))

    @property
    def num_quantizers(self) -> int:
        return self.network.rvq.num_quantizers

    @property
    def codebook_size(self) -> int:
        return self.network.rvq.codebook_size

    def bitrate_kbps(self, num_quantizers: Optional[int] = None) -> float:
        """kbit/s of `num_quantizers` levels (default all): levels * log2(codebook_size) * frame_rate / 1000."""
        n = self.num_quantizers if num_quantizers is None else num_quantizers
        return n * math.log2(self.codebook_size) * self.frame_rate / 1000.0

    def num_quantizers_for_bandwidth(self, kbps: float) -> int:
        """The most levels whose bitrate does not exceed `kbps` (at least 1), as EnCodec chooses them."""
        per_level = math.log2(self.codebook_size) * self.frame_rate / 1000.0
        n = max(1, int(math.floor(kbps / per_level + 1e-9)))
        if n > self.num_quantizers:
            raise ValueError(f"bandwidth {kbps} kbps needs {n} levels; this codec has {self.num_quantizers} "
                             f"({self.bitrate_kbps():.2f} kbps)")
        return n

    def encode(self, audio, num_quantizers: Optional[int] = None) -> np.ndarray:
        """audio [batch, samples] (or [samples]) at sample_rate -> codes [batch, ceil(samples / hop), n] int32.

        A jax.Array input keeps its sharding, so a batch laid out over several devices is encoded on all of them.
        """
        audio = audio.astype(jnp.float32) if isinstance(audio, jax.Array) else np.asarray(audio, np.float32)
        squeeze = audio.ndim == 1
        audio = audio[None] if squeeze else audio
        n = self.num_quantizers if num_quantizers is None else int(num_quantizers)
        if not 1 <= n <= self.num_quantizers:
            raise ValueError(f"num_quantizers={n}: this codec has 1 to {self.num_quantizers}")
        codes = np.asarray(self._encode(self.variables, jnp.asarray(audio), n))
        return codes[0] if squeeze else codes

    def decode(self, codes) -> np.ndarray:
        """codes [batch, frames, n] (or [frames, n]) of the first n levels -> audio [batch, frames * hop]."""
        codes = np.asarray(codes, np.int32)
        squeeze = codes.ndim == 2
        codes = codes[None] if squeeze else codes
        if codes.shape[-1] > self.num_quantizers or codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes of shape {codes.shape} with values in [{codes.min()}, {codes.max()}] do not fit "
                             f"{self.num_quantizers} levels of {self.codebook_size} codes")
        audio = np.asarray(self._decode(self.variables, jnp.asarray(codes)))
        return audio[0] if squeeze else audio

    def reconstruct(self, audio, num_quantizers: Optional[int] = None) -> np.ndarray:
        """decode(encode(audio)) trimmed back to the input's length: [batch, samples] (or [samples]) -> same shape.

        A length that is not a multiple of the hop is padded (with zeros, after the end) for the codec.
        """
        audio = np.asarray(audio, np.float32)
        return self.decode(self.encode(audio, num_quantizers))[..., :audio.shape[-1]]

    @classmethod
    def from_checkpoint(cls, model_dir: str, step: Optional[int] = None) -> "Codec":
        """Loads the codec of a training MODEL_DIR (its config.gin and latest, or `step`, checkpoint)."""
        from musiclm_jax import checkpoint_loading
        loaded = checkpoint_loading.load_model(model_dir, step)
        model = loaded.model
        if not hasattr(model, "generator"):
            raise ValueError(f"{model_dir} holds a {type(model).__name__}, not a codec")
        variables = jax.device_get(model.variables(loaded.params, loaded.flax_mutables))
        return cls(model.generator, variables, model.sample_rate)
