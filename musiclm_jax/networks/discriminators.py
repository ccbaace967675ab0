"""The SoundStream codec's discriminators: a multi-scale waveform discriminator and a complex-STFT discriminator.

* `MultiScaleWaveDiscriminator` (MelGAN, Kumar et al. 2019, as used by SoundStream): `num_scales` identical
  networks applied to the audio, to the audio average-pooled 2x, 4x, ... Each network: Conv1D k15 (reflect
  padding) -> grouped strided Conv1Ds (kernel 10*stride+1) -> Conv1D k5 -> Conv1D k3 to one logit, LeakyReLU(0.2)
  after every layer but the last.
* `STFTDiscriminator` (SoundStream, Zeghidour et al. 2021, Fig. 4): complex STFT -> real and imaginary parts as
  two channels of a [time, frequency] image -> Conv2D 7x7 -> residual units (Conv2D 3x3, then a Conv2D with
  kernel (s_t+2, s_f+2) and strides (s_t, s_f) alternating (1, 2), (2, 2); a strided 1x1 Conv2D on the skip
  path) -> Conv2D (1, F') collapsing the remaining F' frequency bins to one logit per time frame.
* `Discriminators`: both, returning one flat list of (logits, features).

Layouts: audio [batch, samples]; 1-D activations [batch, time, channels]; 2-D activations
[batch, time, freq, channels]. Every parameter carries logical axis names (conv_width / conv_height / conv_in /
conv_out, all replicated by `partitioning.standard_logical_axis_rules`); activations are constrained with
activation_batch / activation_time / activation_freq / activation_channels. Logits are returned in float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax import layers
from musiclm_jax.spectral import num_stft_frames, stft
from musiclm_jax.partitioning import constrain

BTC = ("activation_batch", "activation_time", "activation_channels")
BTFC = ("activation_batch", "activation_time", "activation_freq", "activation_channels")

# (logits, features) of one sub-discriminator.
DiscriminatorOutput = tuple[jax.Array, list[jax.Array]]


# ------------------------------------------------------------------------------------------------ activations


def _activation(name: str, negative_slope: float):
    if name == "leaky_relu":
        return lambda x: nn.leaky_relu(x, negative_slope)
    if name == "elu":
        return nn.elu
    raise ValueError(f"activation {name!r}: expected 'leaky_relu' or 'elu'")


def _dtype(dtype: Any):
    return jnp.dtype(dtype)


# ------------------------------------------------------------------------------------- waveform discriminator


@dataclasses.dataclass(frozen=True)
class WaveDiscriminatorConfig:
    """MelGAN's multi-scale waveform discriminator.

    Attributes:
      num_scales: networks applied to the audio downsampled by 1, 2, 4, ... (average pooling between scales).
      channels: output channels of the first conv (channels[0]) and of each strided conv (channels[1:]); the
        post conv keeps channels[-1]. MelGAN / SoundStream: (16, 64, 256, 1024, 1024).
      first_kernel_size: kernel of the first conv (reflect padded), 15.
      strides: stride of each strided conv, one per channels[1:]; MelGAN: 4 each (256x in total).
      kernel_sizes: kernel of each strided conv; None = 10 * stride + 1 (41 for stride 4).
      groups: groups of each strided conv; None = gcd(in // group_size, in, out), which gives MelGAN's
        (4, 16, 64, 256) for the default channels and stays valid for small channel counts.
      group_size: input channels per group for the default `groups` (MelGAN: 4).
      post_kernel_size: kernel of the conv after the strided ones, 5.
      output_kernel_size: kernel of the final conv to one logit, 3.
      negative_slope: LeakyReLU slope, 0.2.
      pool_kernel_size, pool_stride: average pooling between scales (padding so that a scale of L samples
        gives ceil(L / stride); padded samples are not counted in the average).
      weight_norm: weight-normalised convs (as MelGAN).
      dtype: compute dtype; param_dtype: parameter storage dtype.

    Logits of scale k for N input samples: [batch, ceil(N / (pool_stride**k * prod(strides))), 1] (every conv
    is 'same'-padded to ceil(length / stride) frames); with the defaults ceil(N / (2**k * 256)).
    """

    num_scales: int = 3
    channels: Sequence[int] = (16, 64, 256, 1024, 1024)
    first_kernel_size: int = 15
    strides: Sequence[int] = (4, 4, 4, 4)
    kernel_sizes: Optional[Sequence[int]] = None
    groups: Optional[Sequence[int]] = None
    group_size: int = 4
    post_kernel_size: int = 5
    output_kernel_size: int = 3
    negative_slope: float = 0.2
    pool_kernel_size: int = 4
    pool_stride: int = 2
    weight_norm: bool = True
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    def __post_init__(self):
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"WaveDiscriminatorConfig: {len(self.strides)} strides for {len(self.channels) - 1} "
                             f"strided convs (channels={tuple(self.channels)})")
        for name in ("kernel_sizes", "groups"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.strides):
                raise ValueError(f"WaveDiscriminatorConfig: {name}={tuple(value)} needs one entry per stride")
        for i, (g, c_in, c_out) in enumerate(zip(self.layer_groups, self.channels[:-1], self.channels[1:])):
            if c_in % g or c_out % g:
                raise ValueError(f"WaveDiscriminatorConfig: strided conv {i} ({c_in} -> {c_out} channels) cannot "
                                 f"use {g} groups")

    @property
    def layer_kernel_sizes(self) -> tuple[int, ...]:
        if self.kernel_sizes is not None:
            return tuple(self.kernel_sizes)
        return tuple(10 * s + 1 for s in self.strides)

    @property
    def layer_groups(self) -> tuple[int, ...]:
        if self.groups is not None:
            return tuple(self.groups)
        return tuple(math.gcd(max(1, c_in // self.group_size), c_in, c_out)
                     for c_in, c_out in zip(self.channels[:-1], self.channels[1:]))

    @property
    def total_stride(self) -> int:
        return int(np.prod(self.strides))

    def num_logits(self, num_samples: int, scale: int) -> int:
        """Logit frames of scale `scale` (0 = full rate) for `num_samples` input samples."""
        return -(-num_samples // (self.pool_stride ** scale * self.total_stride))

    @classmethod
    def tiny(cls, **overrides) -> "WaveDiscriminatorConfig":
        """A small configuration for tests and CPU smoke runs (~60k parameters for 3 scales)."""
        return cls(**{"channels": (4, 8, 16, 32, 32), **overrides})


class WaveDiscriminator(nn.Module):
    """One MelGAN waveform discriminator: audio [batch, samples] -> (logits [batch, frames, 1], features).

    Features: the activations after every LeakyReLU, [batch, frames_l, channels_l] (len(channels) + 1 of them).
    """

    config: WaveDiscriminatorConfig

    @nn.compact
    def __call__(self, audio: jax.Array) -> DiscriminatorOutput:
        cfg = self.config
        act = _activation("leaky_relu", cfg.negative_slope)
        conv = dict(causal=False, weight_norm=cfg.weight_norm, dtype=_dtype(cfg.dtype),
                    param_dtype=_dtype(cfg.param_dtype))
        x = audio.astype(_dtype(cfg.dtype))[..., None]
        features = []
        x = layers.Conv1D(cfg.channels[0], cfg.first_kernel_size, pad_mode="reflect", name="conv_in", **conv)(x)
        x = constrain(act(x), BTC)
        features.append(x)
        for i, (channels, kernel, stride, groups) in enumerate(zip(
                cfg.channels[1:], cfg.layer_kernel_sizes, cfg.strides, cfg.layer_groups)):
            x = layers.Conv1D(channels, kernel, stride=stride, groups=groups, name=f"conv_down_{i}", **conv)(x)
            x = constrain(act(x), BTC)
            features.append(x)
        x = layers.Conv1D(cfg.channels[-1], cfg.post_kernel_size, name="conv_post", **conv)(x)
        x = constrain(act(x), BTC)
        features.append(x)
        logits = layers.Conv1D(1, cfg.output_kernel_size, name="conv_out", **conv)(x)
        return logits.astype(jnp.float32), features


def average_pool(audio: jax.Array, kernel_size: int, stride: int) -> jax.Array:
    """Average pooling of audio [batch, samples] -> [batch, ceil(samples / stride)], 'same'-like padding.

    The padding is split as in `layers.conv_padding` (non-causal) and padded samples are left out of the
    averages (torch's count_include_pad=False).
    """
    left, right = layers.conv_padding(audio.shape[-1], kernel_size, stride, 1, causal=False)
    pooled = nn.avg_pool(audio[..., None], (kernel_size,), strides=(stride,), padding=((left, right),),
                         count_include_pad=False)
    return pooled[..., 0]


class MultiScaleWaveDiscriminator(nn.Module):
    """MelGAN's multi-scale discriminator over audio [batch, samples].

    Returns one (logits [batch, frames_k, 1], features) per scale k = 0 .. num_scales - 1, scale k seeing the
    audio average-pooled k times; frames_k = `config.num_logits(samples, k)`.
    """

    config: WaveDiscriminatorConfig

    @nn.compact
    def __call__(self, audio: jax.Array) -> list[DiscriminatorOutput]:
        cfg = self.config
        outputs = []
        x = audio.astype(jnp.float32)
        for scale in range(cfg.num_scales):
            if scale:
                x = average_pool(x, cfg.pool_kernel_size, cfg.pool_stride)
            outputs.append(WaveDiscriminator(cfg, name=f"scale_{scale}")(x))
        return outputs


# ----------------------------------------------------------------------------------------- STFT discriminator


@dataclasses.dataclass(frozen=True)
class STFTDiscriminatorConfig:
    """SoundStream's STFT discriminator (Zeghidour et al. 2021, Fig. 4).

    Attributes:
      window, hop: STFT window (periodic Hann) and hop in samples, 1024 / 256.
      channels: C, the channels of the first 7x7 conv (SoundStream: 32).
      channel_multipliers: the first conv outputs C * m[0] channels and residual unit i maps C * m[i] -> C * m[i+1]
        (its 3x3 conv keeps C * m[i]); SoundStream: (1, 2, 4, 4, 8, 8, 16), i.e. units (N=C, m=2), (2C, 2),
        (4C, 1), (4C, 2), (8C, 1), (8C, 2).
      strides: (time, frequency) stride of each residual unit's second conv, kernel (s_t + 2, s_f + 2).
      first_kernel_size: the first conv's kernel, (7, 7).
      residual: add a strided 1x1 conv of the unit's input to its output (SoundStream's 'ResidualUnit').
      activation: 'leaky_relu' (slope `negative_slope`) or 'elu', after the first conv and every unit.
      dtype, param_dtype: compute and parameter dtypes (the STFT itself is always float32).

    All convs are 'SAME' padded, so each unit maps [T, F] to [ceil(T / s_t), ceil(F / s_f)]; the final conv has
    kernel (1, F') over the remaining F' bins (9 for window 1024), 'VALID', giving logits
    [batch, ceil(frames / prod(s_t)), 1] (frames = 1 + (samples - window) // hop, prod(s_t) = 8 by default).
    """

    window: int = 1024
    hop: int = 256
    channels: int = 32
    channel_multipliers: Sequence[int] = (1, 2, 4, 4, 8, 8, 16)
    strides: Sequence[tuple[int, int]] = ((1, 2), (2, 2), (1, 2), (2, 2), (1, 2), (2, 2))
    first_kernel_size: tuple[int, int] = (7, 7)
    residual: bool = True
    activation: str = "leaky_relu"
    negative_slope: float = 0.2
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    def __post_init__(self):
        if len(self.channel_multipliers) != len(self.strides) + 1:
            raise ValueError(f"STFTDiscriminatorConfig: {len(self.channel_multipliers)} channel multipliers for "
                             f"{len(self.strides)} residual units (need one more multiplier than units)")
        _activation(self.activation, self.negative_slope)

    @property
    def time_stride(self) -> int:
        return int(np.prod([s[0] for s in self.strides]))

    def num_logits(self, num_samples: int) -> int:
        """Logit frames for `num_samples` input samples."""
        return -(-num_stft_frames(num_samples, self.window, self.hop) // self.time_stride)

    @classmethod
    def tiny(cls, **overrides) -> "STFTDiscriminatorConfig":
        """A small configuration for tests and CPU smoke runs (window 256, hop 64, C=2: ~22k parameters)."""
        return cls(**{"window": 256, "hop": 64, "channels": 2, **overrides})


def _conv2d(features: int, kernel: Sequence[int], strides: Sequence[int], padding: Any, cfg: STFTDiscriminatorConfig,
            name: str) -> nn.Conv:
    return nn.Conv(
        features, tuple(kernel), strides=tuple(strides), padding=padding, dtype=_dtype(cfg.dtype),
        param_dtype=_dtype(cfg.param_dtype), name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 ("conv_height", "conv_width", "conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


class STFTResidualUnit(nn.Module):
    """x [batch, time, freq, in] -> [batch, ceil(time / s_t), ceil(freq / s_f), features] (before activation).

    Conv2D 3x3 (in channels) -> activation -> Conv2D (s_t + 2, s_f + 2) with strides (s_t, s_f) to `features`,
    plus a strided 1x1 Conv2D of the input when `config.residual`.
    """

    features: int
    strides: tuple[int, int]
    config: STFTDiscriminatorConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        act = _activation(cfg.activation, cfg.negative_slope)
        s_t, s_f = self.strides
        y = act(_conv2d(x.shape[-1], (3, 3), (1, 1), "SAME", cfg, "conv")(x))
        y = _conv2d(self.features, (s_t + 2, s_f + 2), (s_t, s_f), "SAME", cfg, "conv_down")(y)
        if cfg.residual:
            y = y + _conv2d(self.features, (1, 1), (s_t, s_f), "SAME", cfg, "skip")(x)
        return y


class STFTDiscriminator(nn.Module):
    """SoundStream's STFT discriminator over audio [batch, samples] (samples >= config.window).

    Returns (logits [batch, frames', 1], features): one logit per down-sampled STFT frame (the frequency axis
    is collapsed by the last conv), frames' = `config.num_logits(samples)`; features are the activations after
    the first conv and after every residual unit, [batch, time_l, freq_l, channels_l].
    """

    config: STFTDiscriminatorConfig

    @nn.compact
    def __call__(self, audio: jax.Array) -> DiscriminatorOutput:
        cfg = self.config
        act = _activation(cfg.activation, cfg.negative_slope)
        spec = stft(audio, cfg.window, cfg.hop)  # [b, frames, bins]
        x = jnp.stack([spec.real, spec.imag], axis=-1).astype(_dtype(cfg.dtype))  # [b, frames, bins, 2]
        x = constrain(x, BTFC)
        features = []
        x = _conv2d(cfg.channels * cfg.channel_multipliers[0], cfg.first_kernel_size, (1, 1), "SAME", cfg,
                    "conv_in")(x)
        x = constrain(act(x), BTFC)
        features.append(x)
        for i, (mult, strides) in enumerate(zip(cfg.channel_multipliers[1:], cfg.strides)):
            x = STFTResidualUnit(cfg.channels * mult, tuple(strides), cfg, name=f"unit_{i}")(x)
            x = constrain(act(x), BTFC)
            features.append(x)
        logits = _conv2d(1, (1, x.shape[2]), (1, 1), "VALID", cfg, "conv_out")(x)  # [b, frames', 1, 1]
        return logits[:, :, 0, :].astype(jnp.float32), features


# ------------------------------------------------------------------------------------------------- combined


class Discriminators(nn.Module):
    """All of the codec's discriminators: the multi-scale waveform one and the STFT one (either left out when None).

    __call__(audio [batch, samples]) -> list of (logits [batch, frames_k, 1], features list), the wave scales
    first (num_scales entries) and then the STFT discriminator; an empty list when both are None.
    """

    wave: Optional[WaveDiscriminatorConfig] = WaveDiscriminatorConfig()
    stft: Optional[STFTDiscriminatorConfig] = STFTDiscriminatorConfig()

    @nn.compact
    def __call__(self, audio: jax.Array) -> list[DiscriminatorOutput]:
        if audio.ndim != 2:
            raise ValueError(f"Discriminators expect audio [batch, samples], got shape {audio.shape}")
        outputs = []
        if self.wave is not None:
            outputs.extend(MultiScaleWaveDiscriminator(self.wave, name="wave")(audio))
        if self.stft is not None:
            outputs.append(STFTDiscriminator(self.stft, name="stft")(audio))
        return outputs
