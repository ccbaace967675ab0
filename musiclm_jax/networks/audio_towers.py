"""MuLan's audio towers on log-mel spectrograms: a ResNet (the paper's ResNet-50) and an AST-style ViT.

Each tower config has `features(audio [batch, samples]) -> [batch, frames, n_mels]` (the front end, jittable),
`make(name)` (the Flax module: features -> pooled [batch, output_dim] fp32), `output_dim` and `sample_rate`;
networks/htsat.py's HTSATConfig (the imported CLAP tower) has the same interface.

Front end (both towers): log(mel power + 1e-6) with a periodic Hann window of `n_fft` samples and hop `hop`
(MuLan: 64 bands, 25 ms / 10 ms at 16 kHz), then a fixed affine map (x - LOG_MEL_MEAN) / LOG_MEL_STD that brings
-20 dBFS music to roughly zero mean and unit variance while keeping level differences (the loudness words of
the captions are audible in the level and brightness of the bands).

ResNet: a 7x7 stride-2 stem and 3x3 stride-2 max pool, then bottleneck stages (ResNet-50: (3, 4, 6, 3) blocks of
widths 64..512 with 4x expansion: 2048 outputs), global average pool. Group norm (32 groups) replaces batch norm
so every example's embedding is independent of the rest of the batch and of the mesh.
ViT (AST): non-overlapping patches of `patch_frames` x `patch_bands` of the spectrogram, a learned [CLS] token
and learned positions, pre-norm transformer layers, final layer norm; the [CLS] output is the pooled embedding.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from musiclm_jax import layers, spectral
from musiclm_jax.layers import Dense, layer_norm
from musiclm_jax.partitioning import constrain

LOG_MEL_MEAN = -6.0
LOG_MEL_STD = 4.0
BTFC = ("activation_batch", "activation_time", "activation_freq", "activation_channels")
BLE = ("activation_batch", "activation_length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class LogMelFrontEnd:
    """The towers' input: sample_rate (Hz), n_fft and hop (samples), n_mels (bands)."""

    sample_rate: int = 16000
    n_fft: int = 400
    hop: int = 160
    n_mels: int = 64

    def features(self, audio: jax.Array) -> jax.Array:
        """audio [batch, samples] at sample_rate -> normalised log-mel [batch, frames, n_mels] float32."""
        mel = spectral.log_mel_spectrogram(audio.astype(jnp.float32), self.sample_rate, self.n_fft, self.hop,
                                           self.n_mels)
        return (mel - LOG_MEL_MEAN) / LOG_MEL_STD


def _conv(features: int, kernel: int, stride: int, name: str, dtype) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding="SAME", use_bias=False, dtype=dtype,
                   name=name, kernel_init=nn.with_logical_partitioning(
                       nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
                       ("conv_height", "conv_width", "conv_in", "conv_out")))


def _group_norm(name: str, groups: int, zero_init: bool = False) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, name=name, dtype=jnp.float32, epsilon=1e-5,
                        scale_init=nn.with_logical_partitioning(
                            nn.initializers.zeros if zero_init else nn.initializers.ones, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


@dataclasses.dataclass(frozen=True)
class ResNetConfig(LogMelFrontEnd):
    """A bottleneck ResNet on the log-mel (defaults: ResNet-50 with group norm)."""

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    width: int = 64
    norm_groups: int = 32
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "stage_sizes", tuple(int(s) for s in self.stage_sizes))
        if self.width % self.norm_groups:
            raise ValueError(f"width={self.width} is not divisible by norm_groups={self.norm_groups}")

    @property
    def output_dim(self) -> int:
        return self.width * 2 ** (len(self.stage_sizes) - 1) * 4

    def make(self, name=None) -> nn.Module:
        return ResNet(self, name=name)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (4x width) with group norms, ReLU, and a projected shortcut when shapes change."""

    width: int
    stride: int
    config: ResNetConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype, groups = jnp.dtype(self.config.dtype), self.config.norm_groups
        h = nn.relu(_group_norm("norm1", groups)(_conv(self.width, 1, 1, "conv1", dtype)(x)))
        h = nn.relu(_group_norm("norm2", groups)(_conv(self.width, 3, self.stride, "conv2", dtype)(h.astype(dtype))))
        h = _group_norm("norm3", groups, zero_init=True)(_conv(4 * self.width, 1, 1, "conv3", dtype)(h.astype(dtype)))
        if x.shape[-1] != 4 * self.width or self.stride != 1:
            x = _group_norm("shortcut_norm", groups)(_conv(4 * self.width, 1, self.stride, "shortcut", dtype)(x))
        return constrain(nn.relu(x + h).astype(dtype), BTFC)


class ResNet(nn.Module):
    """features [batch, frames, n_mels] -> pooled [batch, output_dim] fp32."""

    config: ResNetConfig

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        x = features.astype(dtype)[..., None]
        x = nn.relu(_group_norm("stem_norm", cfg.norm_groups)(_conv(cfg.width, 7, 2, "stem", dtype)(x)))
        x = nn.max_pool(x.astype(dtype), (3, 3), (2, 2), padding="SAME")
        for stage, blocks in enumerate(cfg.stage_sizes):
            for block in range(blocks):
                x = Bottleneck(cfg.width * 2 ** stage, 2 if block == 0 and stage > 0 else 1, cfg,
                               name=f"stage{stage}_block{block}")(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


@dataclasses.dataclass(frozen=True)
class ViTConfig(LogMelFrontEnd):
    """An AST-style ViT on the log-mel: patches of patch_frames x patch_bands, pre-norm layers, [CLS] pooling.
    `max_frames` bounds the spectrogram length the position table covers."""

    patch_frames: int = 16
    patch_bands: int = 16
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_frames: int = 1024
    hidden_act: str = "gelu"
    dtype: str = "float32"

    def __post_init__(self):
        if self.n_mels % self.patch_bands:
            raise ValueError(f"n_mels={self.n_mels} is not divisible by patch_bands={self.patch_bands}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")

    @property
    def output_dim(self) -> int:
        return self.hidden_size

    @property
    def max_patches(self) -> int:
        return (self.max_frames // self.patch_frames) * (self.n_mels // self.patch_bands)

    def make(self, name=None) -> nn.Module:
        return ViT(self, name=name)


class ViTLayer(nn.Module):
    """x = x + attention(LN(x)); x = x + MLP(LN(x)). x [batch, tokens, hidden] -> same."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        return layers.encoder_block(x, heads=cfg.num_heads, head_dim=cfg.hidden_size // cfg.num_heads,
                                    mlp_dim=cfg.mlp_dim, activation=cfg.hidden_act, epsilon=1e-6, pre_norm=True,
                                    dtype=jnp.dtype(cfg.dtype), norm_names=("attention_norm", "mlp_norm"),
                                    mlp_names=("mlp_in", "mlp_out"))


class ViT(nn.Module):
    """features [batch, frames, n_mels] -> pooled [batch, hidden_size] fp32 (frames beyond a whole number of
    patches are dropped; at most max_frames)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        batch, frames, bands = features.shape
        if frames > cfg.max_frames or frames < cfg.patch_frames:
            raise ValueError(f"ViT: {frames} spectrogram frames; the config takes {cfg.patch_frames} to "
                             f"max_frames={cfg.max_frames}")
        time_patches, band_patches = frames // cfg.patch_frames, bands // cfg.patch_bands
        x = features[:, :time_patches * cfg.patch_frames].reshape(
            batch, time_patches, cfg.patch_frames, band_patches, cfg.patch_bands)
        x = x.transpose(0, 1, 3, 2, 4).reshape(batch, time_patches * band_patches, cfg.patch_frames * cfg.patch_bands)
        x = Dense((cfg.hidden_size,), ("conv_in", "embed"), bias_axes=("embed",), dtype=dtype,
                  name="patch_embedding")(x.astype(dtype))
        cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                         (cfg.hidden_size,))
        positions = self.param("positions", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                         ("table_rows", "embed")),
                               (cfg.max_patches + 1, cfg.hidden_size))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (batch, 1, cfg.hidden_size)), x], axis=1)
        x = constrain(x + positions[:x.shape[1]].astype(dtype), BLE)
        for i in range(cfg.num_layers):
            x = ViTLayer(cfg, name=f"layers_{i}")(x)
        return layer_norm("final_norm", 1e-6)(x[:, 0]).astype(jnp.float32)
