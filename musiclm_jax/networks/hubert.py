"""HuBERT (Hsu et al. 2021) as transformers' `HubertModel` computes it at inference; also the MERT music models.

    audio [batch, samples] (16 kHz for HuBERT, 24 kHz for MERT-v1)
      -> feature encoder: len(conv_dim) valid 1-D convolutions (kernel 10 stride 5, then kernel 3/2 stride 2:
         320 samples per frame at the defaults), GELU; group norm (one group per channel, over time) after the
         first one ('group') or layer norm after every one ('layer')
      -> feature projection: [layer norm] -> linear to hidden_size
      -> encoder: x + GELU(grouped positional convolution of x), then a BERT-style transformer, post-norm
         (do_stable_layer_norm=False: LN after the block input, LN after attention and after the MLP) or pre-norm
         (do_stable_layer_norm=True: LN before attention and before the MLP, one LN after the last layer).

The positional convolution is weight-normalised as transformers does it: torch's weight_norm with dim=2 on a
Conv1d weight [out, in / groups, width], i.e. one gain per kernel tap and the norm over (out, in / groups) for
each tap (not the usual per-output-channel norm of layers.Conv1D). Its padding is width // 2 on both sides, then
the last frame is dropped for an even width: the output has as many frames as the input.

Hidden states (`Hubert.__call__` returns num_hidden_layers + 1 of them, [batch, frames, hidden_size]) follow
transformers' `output_hidden_states=True`: index 0 is the encoder input after the positional convolution (and,
post-norm, after the encoder's layer norm), index l the output of layer l. Pre-norm models get the final layer
norm on the last entry (it then equals `last_hidden_state`; transformers 4.x put it in the hidden states too,
5.x keeps the un-normalised output there).

Frames for `samples` input samples: the valid-convolution rule floor((n - kernel) / stride) + 1 per layer
(`HubertConfig.num_frames`); 49 frames for one second at 16 kHz, 50 Hz.
Inference only: no SpecAugment masking, no dropout, no attention mask (every frame is valid).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from musiclm_jax import layers
from musiclm_jax.layers import ACTIVATIONS, Dense, layer_norm
from musiclm_jax.partitioning import constrain

BLE = ("activation_batch", "activation_length", "activation_embed")
BTC = ("activation_batch", "activation_time", "activation_channels")

@dataclasses.dataclass(frozen=True)
class HubertConfig:
    """Sizes of a HuBERT/MERT model; the field names and defaults (hubert-base) are transformers' HubertConfig's.

    Attributes:
      hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: the transformer.
      conv_dim, conv_kernel, conv_stride, conv_bias: the feature encoder's convolutions (one entry per layer).
      feat_extract_norm: 'group' (group norm after the first convolution) or 'layer' (layer norm after each).
      feat_extract_activation: activation of the feature encoder and the positional convolution.
      num_conv_pos_embeddings, num_conv_pos_embedding_groups: width and groups of the positional convolution.
      do_stable_layer_norm: pre-norm transformer (True) or post-norm (False).
      layer_norm_eps: epsilon of the transformer's and the feature projection's layer norms (the feature
        encoder's norms use torch's default 1e-5, as transformers does).
      feat_proj_layer_norm: layer norm before the feature projection.
      hidden_act: activation of the transformer's MLP.
      sample_rate: Hz of the input audio (16000 for HuBERT, 24000 for MERT-v1); sets frame_rate only.
      dtype: compute dtype ('float32' or 'bfloat16'); norms and softmax are computed in fp32.
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: Sequence[int] = (512, 512, 512, 512, 512, 512, 512)
    conv_kernel: Sequence[int] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: Sequence[int] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_extract_norm: str = "group"
    feat_extract_activation: str = "gelu"
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False
    layer_norm_eps: float = 1e-5
    feat_proj_layer_norm: bool = True
    hidden_act: str = "gelu"
    sample_rate: int = 16000
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("conv_dim", "conv_kernel", "conv_stride"):  # gin and JSON give lists; keep it hashable
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride) >= 1:
            raise ValueError(f"conv_dim {self.conv_dim}, conv_kernel {self.conv_kernel} and conv_stride "
                             f"{self.conv_stride} must have the same (non-zero) length")
        if self.feat_extract_norm not in ("group", "layer"):
            raise ValueError(f"feat_extract_norm={self.feat_extract_norm!r}: expected 'group' or 'layer'")
        for name in ("hidden_act", "feat_extract_activation"):
            if getattr(self, name) not in ACTIVATIONS:
                raise ValueError(f"{name}={getattr(self, name)!r}: supported are {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_conv_pos_embedding_groups={self.num_conv_pos_embedding_groups}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def samples_per_frame(self) -> int:
        """The feature encoder's total stride (320 at the defaults)."""
        return math.prod(self.conv_stride)

    @property
    def receptive_field(self) -> int:
        """Input samples that make one frame (400 at the defaults): the fewest samples giving any output."""
        field, step = 1, 1
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            field += (kernel - 1) * step
            step *= stride
        return field

    @property
    def frame_rate(self) -> float:
        """Output frames per second (50 Hz for HuBERT at 16 kHz, 75 Hz for MERT-v1 at 24 kHz)."""
        return self.sample_rate / self.samples_per_frame

    def num_frames(self, samples: int) -> int:
        """Frames for `samples` input samples: floor((n - kernel) / stride) + 1 per convolution (0 if too short)."""
        n = int(samples)
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            n = (n - kernel) // stride + 1 if n >= kernel else 0
        return n


def num_frames(samples: int, config: HubertConfig = HubertConfig()) -> int:
    """Frames `config` (hubert-base by default) makes of `samples` input samples (see HubertConfig.num_frames)."""
    return config.num_frames(samples)


class ChannelNorm(nn.Module):
    """torch GroupNorm(num_groups=channels): each channel of each example normalised over time, with affine.

    x [batch, time, channels] -> same; computed in fp32; params 'scale', 'bias' ('norm',).
    """

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (channels,))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (channels,))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=1, keepdims=True)
        return (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class FeatureEncoder(nn.Module):
    """audio [batch, samples] -> features [batch, frames, conv_dim[-1]] (fp32 for the projection's norm)."""

    config: HubertConfig

    @nn.compact
    def __call__(self, audio: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        act = ACTIVATIONS[cfg.feat_extract_activation]
        x = audio.astype(jnp.float32)[..., None]
        for i, (dim, kernel, stride) in enumerate(zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride)):
            x = layers.Conv1D(dim, kernel, stride, padding="valid", use_bias=cfg.conv_bias, dtype=dtype,
                              name=f"conv_{i}")(x)
            if cfg.feat_extract_norm == "layer":
                x = layer_norm(f"norm_{i}", 1e-5)(x)
            elif i == 0:
                x = ChannelNorm(name="norm_0")(x)
            x = constrain(act(x.astype(dtype)), BTC)
        return x


class PositionalConv(nn.Module):
    """The grouped, weight-normalised positional convolution (see the module docstring) and its activation.

    x [batch, frames, hidden] -> same. Params: 'kernel_v' [width, hidden / groups, hidden] ('conv_width',
    'conv_in', 'conv_out'), 'kernel_g' [width] ('conv_width',) (kernel = g * v / ||v|| per tap), 'bias'.
    """

    config: HubertConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        width, groups, hidden = cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups, cfg.hidden_size
        shape = (width, hidden // groups, hidden)
        init = nn.initializers.variance_scaling(2.0, "fan_in", "normal", in_axis=(0, 1), out_axis=2)
        kernel = layers.conv_kernel(self, shape, ("conv_width", "conv_in", "conv_out"), weight_norm=True,
                                    gain_axis=0, init=init)  # one gain per tap: torch's dim=2 on [out, in, width]
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)), (hidden,))
        left = width // 2
        padded = layers.pad_time(x.astype(dtype), left, width - 1 - left)  # torch: pad w // 2, drop 1 if w even
        # XLA's own grouped convolution: with 48 channels per group it runs ~4x faster on CPU than the polyphase
        # matmuls of layers.grouped_conv1d (which win for the MelGAN discriminator's narrow groups).
        y = jax.lax.conv_general_dilated(padded, kernel.astype(dtype), (1,), "VALID",
                                         dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups)
        return ACTIVATIONS[cfg.feat_extract_activation](y + bias.astype(dtype))


class EncoderLayer(nn.Module):
    """One transformer layer, post-norm (transformers' HubertEncoderLayer) or pre-norm (…StableLayerNorm)."""

    config: HubertConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        return layers.encoder_block(x, heads=cfg.num_attention_heads, head_dim=cfg.head_dim,
                                    mlp_dim=cfg.intermediate_size, activation=cfg.hidden_act,
                                    epsilon=cfg.layer_norm_eps, pre_norm=cfg.do_stable_layer_norm,
                                    dtype=jnp.dtype(cfg.dtype), norm_names=("layer_norm", "final_layer_norm"))


class Hubert(nn.Module):
    """The HuBERT/MERT network: audio [batch, samples] -> tuple of num_hidden_layers + 1 hidden states
    [batch, frames, hidden_size] (fp32), as described in the module docstring.

    `num_layers_to_run` (embedding extraction) stops after that many layers: the tuple then has that many + 1
    entries (for a pre-norm model the final layer norm is applied only when every layer runs).
    """

    config: HubertConfig

    @nn.compact
    def __call__(self, audio: jax.Array, num_layers_to_run: int | None = None) -> tuple[jax.Array, ...]:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        run = cfg.num_hidden_layers if num_layers_to_run is None else int(num_layers_to_run)
        if not 0 <= run <= cfg.num_hidden_layers:
            raise ValueError(f"num_layers_to_run={run}: the model has {cfg.num_hidden_layers} layers")
        if audio.ndim != 2:
            raise ValueError(f"audio must be [batch, samples], got shape {audio.shape}")
        if cfg.num_frames(audio.shape[1]) < 1:
            raise ValueError(f"{audio.shape[1]} samples are fewer than the {cfg.receptive_field} that make a frame")
        features = FeatureEncoder(cfg, name="feature_extractor")(audio)
        if cfg.feat_proj_layer_norm:
            features = layer_norm("feature_projection_norm", cfg.layer_norm_eps)(features)
        x = Dense((cfg.hidden_size,), ("conv_out", "embed"), bias_axes=("embed",), dtype=dtype,
                  name="feature_projection")(features.astype(dtype))
        x = constrain(x, BLE)
        x = x + PositionalConv(cfg, name="pos_conv")(x)
        encoder_norm = layer_norm("encoder_norm", cfg.layer_norm_eps)
        if not cfg.do_stable_layer_norm:
            x = encoder_norm(x)
        x = constrain(x, BLE)
        hidden = [x]
        for layer in range(run):
            x = EncoderLayer(cfg, name=f"layers_{layer}")(x)
            hidden.append(x)
        if cfg.do_stable_layer_norm and run == cfg.num_hidden_layers:
            hidden[-1] = encoder_norm(x)
        elif cfg.do_stable_layer_norm and self.is_initializing():
            encoder_norm(x)  # create its params even if this init call stops early
        return tuple(h.astype(jnp.float32) for h in hidden)
