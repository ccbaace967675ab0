"""HTSAT, the audio tower of CLAP (Chen et al. 2022; Wu et al. 2023), as transformers' `ClapAudioModel` computes
its pooled output at inference, plus CLAP's log-mel front end (`ClapFeatureExtractor`, non-fusion path).

    audio [batch, samples] at sample_rate, repeat-padded to num_samples (max_length_s seconds)
      -> log-mel features [batch, frames, num_mel_bins] in dB (HTSATConfig.features): centred STFT (reflect
         padding of fft_window_size // 2 on both sides, periodic Hann window, hop hop_length), power spectrum,
         Slaney-style mel filters (librosa's default: Slaney mel scale, area-normalised), 10 * log10(max(., 1e-10))
      -> batch norm over the mel bins (inference: a per-bin scale and shift, 'bn0')
      -> time stretched to spec_size * freq_ratio frames by bicubic interpolation (align_corners, as torch's
         F.interpolate), freq_ratio = spec_size // num_mel_bins; then folded into a square spec_size x spec_size
         "image": the time axis is cut into freq_ratio chunks stacked along the frequency axis
      -> patch embedding (a strided 2-D convolution, then a layer norm)
      -> len(depths) Swin stages: windowed self-attention with a learned relative-position bias, every odd layer
         on windows shifted by window_size // 2 (a cyclic roll and a -100 logit penalty between tokens that the
         roll brought together), pre-norm MLP; stages are joined by 2x2 patch merging (layer norm, linear 4C -> 2C)
      -> layer norm, mean over all positions -> pooled [batch, output_dim].

Layout here is channels-last: the image is [batch, height, width, channels] with height the (chunk, mel bin)
axis and width the time axis within a chunk, as transformers' [batch, channels, height, width].

Sizes at the defaults (laion/clap-htsat-unfused): 48 kHz, 10 s -> 1001 frames x 64 mel bins -> 1024 frames ->
256 x 256 image -> 64 x 64 patches of 96 channels -> stages of 64, 32, 16, 8 patches per side and 96, 192, 384, 768
channels -> pooled [batch, 768].

Inference only: no dropout, no drop-path. Fused checkpoints (enable_fusion, the attentional feature fusion of
longer-than-10 s clips) are not supported; audio longer than max_length_s must be cropped by the caller.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax import layers
from musiclm_jax.layers import ACTIVATIONS, Dense, layer_norm
from musiclm_jax.partitioning import constrain

BLE = ("activation_batch", "activation_length", "activation_embed")
BLHD = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
BTF = ("activation_batch", "activation_time", "activation_freq")
IMAGE = ("activation_batch", "activation_freq", "activation_time", "activation_channels")

TORCH_LAYER_NORM_EPS = 1e-5  # transformers builds the patch-embedding, patch-merging and final norms with it
SHIFT_PENALTY = -100.0  # the logit penalty of shifted-window attention between tokens of different regions
MEL_FLOOR = 1e-10  # power floor before the dB conversion (-100 dB)


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class HTSATConfig:
    """Sizes of HTSAT and of its feature extraction; field names and model defaults are transformers'
    ClapAudioConfig's (laion/clap-htsat-unfused), feature defaults those of CLAP's ClapFeatureExtractor config.

    Attributes:
      window_size: side, in patches, of the square attention windows.
      num_mel_bins: mel bins of the input features.
      spec_size: side of the square image the model takes; spec_size // num_mel_bins (freq_ratio) time chunks of
        num_mel_bins bins are stacked to make its height, so num_mel_bins must divide it.
      hidden_act: activation of the MLPs.
      patch_size, patch_stride: kernel and stride (height, width; an int for both) of the patch embedding,
        padded by (patch_size - patch_stride) // 2 on each side.
      depths, num_attention_heads: layers and heads of each stage; stage i has
        patch_embeds_hidden_size * 2 ** i channels.
      enable_fusion: must be False (fused checkpoints are not supported).
      patch_embeds_hidden_size: channels of the patch embedding (of the first stage).
      enable_patch_layer_norm: layer norm after the patch embedding.
      qkv_bias: biases on the query, key and value projections.
      mlp_ratio: MLP width of a layer, as a multiple of its channels (int(mlp_ratio * channels)).
      layer_norm_eps: epsilon of the layer norms inside the Swin layers (the others use torch's default 1e-5).
      sample_rate: Hz of the input audio.
      fft_window_size, hop_length: STFT frame (and FFT) length and hop, samples.
      max_length_s: seconds of audio per example; shorter audio is repeat-padded to it.
      frequency_min, frequency_max: Hz range of the mel filters.
      dtype: compute dtype ('float32' or 'bfloat16'); norms, softmax and the features are computed in fp32.
    """

    window_size: int = 8
    num_mel_bins: int = 64
    spec_size: int = 256
    hidden_act: str = "gelu"
    patch_size: int | Sequence[int] = 4
    patch_stride: int | Sequence[int] = (4, 4)
    depths: Sequence[int] = (2, 2, 6, 2)
    num_attention_heads: Sequence[int] = (4, 8, 16, 32)
    enable_fusion: bool = False
    patch_embeds_hidden_size: int = 96
    enable_patch_layer_norm: bool = True
    qkv_bias: bool = True
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-5
    sample_rate: int = 48000
    fft_window_size: int = 1024
    hop_length: int = 480
    max_length_s: float = 10
    frequency_min: float = 50
    frequency_max: float = 14000
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("depths", "num_attention_heads"):  # gin and JSON give lists; keep it hashable
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ("patch_size", "patch_stride"):
            object.__setattr__(self, name, _pair(getattr(self, name)))
        if self.enable_fusion:
            raise ValueError("enable_fusion=True: fused CLAP checkpoints are not supported (use an unfused one, "
                             "e.g. laion/clap-htsat-unfused or laion/larger_clap_music)")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}: supported are {sorted(ACTIVATIONS)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}: expected 'float32' or 'bfloat16'")
        if not len(self.depths) == len(self.num_attention_heads) >= 1 or min(self.depths) < 1:
            raise ValueError(f"depths {self.depths} and num_attention_heads {self.num_attention_heads} must have the "
                             f"same non-zero length, with at least one layer per stage")
        for i, (dim, heads) in enumerate(zip(self.stage_dims, self.num_attention_heads)):
            if heads < 1 or dim % heads:
                raise ValueError(f"stage {i}: its {dim} channels (patch_embeds_hidden_size * 2 ** {i}) are not "
                                 f"divisible by num_attention_heads[{i}]={heads}")
        if self.num_mel_bins < 1 or self.spec_size < self.num_mel_bins or self.spec_size % self.num_mel_bins:
            raise ValueError(f"spec_size={self.spec_size} must be a multiple of num_mel_bins={self.num_mel_bins}")
        for k, s in zip(self.patch_size, self.patch_stride):
            if s < 1 or k < s or (k - s) % 2:
                raise ValueError(f"patch_size={self.patch_size}, patch_stride={self.patch_stride}: each size must be "
                                 f"at least its stride, by an even amount")
        scale = 2 ** (len(self.depths) - 1)
        grid = self.grid_size
        if grid[0] % scale or grid[1] % scale:
            raise ValueError(f"the {grid[0]} x {grid[1]} patches (spec_size={self.spec_size} / patch_stride="
                             f"{self.patch_stride}) do not halve evenly through {len(self.depths)} stages")
        for i, (h, w) in enumerate(self.stage_resolutions):
            if min(h, w) < self.window_size:
                raise ValueError(f"window_size={self.window_size} is larger than stage {i}'s {h} x {w} patches "
                                 f"(transformers cannot run this configuration either)")
        last = grid[0] // scale
        chunk = last // self.freq_ratio
        if chunk < 1 or last % chunk:
            raise ValueError(f"the last stage's {last} patch rows do not split into freq_ratio={self.freq_ratio} "
                             f"groups (transformers' pooling cannot reshape them)")
        if self.window_size < 1 or self.patch_embeds_hidden_size < 1 or self.mlp_ratio <= 0:
            raise ValueError("window_size, patch_embeds_hidden_size and mlp_ratio must be positive")
        # Feature extraction.
        if self.sample_rate < 1 or self.fft_window_size < 2 or self.hop_length < 1:
            raise ValueError(f"sample_rate={self.sample_rate}, fft_window_size={self.fft_window_size} and "
                             f"hop_length={self.hop_length} must be positive (fft_window_size at least 2)")
        samples = self.max_length_s * self.sample_rate
        if samples != int(samples) or samples <= self.fft_window_size // 2:
            raise ValueError(f"max_length_s * sample_rate = {samples} must be a whole number of samples, more than "
                             f"fft_window_size // 2 = {self.fft_window_size // 2}")
        if not 0 <= self.frequency_min <= self.frequency_max:
            raise ValueError(f"need 0 <= frequency_min ({self.frequency_min}) <= frequency_max "
                             f"({self.frequency_max})")
        if self.num_frames > self.spec_width:
            raise ValueError(f"max_length_s={self.max_length_s} gives {self.num_frames} frames of hop_length="
                             f"{self.hop_length}, more than the spec_size * freq_ratio = {self.spec_width} the model "
                             f"takes")

    # ---------------------------------------------------------------------------------------------- derived sizes

    @property
    def output_dim(self) -> int:
        """Width of the pooled output: the last stage's channels (transformers' `num_features`), 768 by default."""
        return self.stage_dims[-1]

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channels of each stage: patch_embeds_hidden_size * 2 ** i."""
        return tuple(self.patch_embeds_hidden_size * 2 ** i for i in range(len(self.depths)))

    @property
    def freq_ratio(self) -> int:
        """Time chunks stacked along the image height: spec_size // num_mel_bins (4 by default)."""
        return self.spec_size // self.num_mel_bins

    @property
    def spec_width(self) -> int:
        """Frames the model folds into its image (1024 by default); fewer are stretched to it."""
        return self.spec_size * self.freq_ratio

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches (height, width) after the patch embedding (64 x 64 by default)."""
        return self.spec_size // self.patch_stride[0], self.spec_size // self.patch_stride[1]

    @property
    def stage_resolutions(self) -> tuple[tuple[int, int], ...]:
        """Patches (height, width) in each stage."""
        return tuple((self.grid_size[0] // 2 ** i, self.grid_size[1] // 2 ** i) for i in range(len(self.depths)))

    @property
    def num_samples(self) -> int:
        """Samples per example: max_length_s * sample_rate (480000 by default)."""
        return int(self.max_length_s * self.sample_rate)

    @property
    def num_frames(self) -> int:
        """Feature frames per example (1001 by default): a centred STFT of num_samples samples."""
        padded = self.num_samples + 2 * (self.fft_window_size // 2)
        return 1 + (padded - self.fft_window_size) // self.hop_length

    # ---------------------------------------------------------------------------------------------- features

    def mel_filters(self) -> np.ndarray:
        """The Slaney mel filter bank [fft_window_size // 2 + 1, num_mel_bins] float64 (librosa.filters.mel's
        default, transformers' `mel_filters_slaney`): triangles evenly spaced on the Slaney mel scale between
        frequency_min and frequency_max, each scaled by 2 / (its width in Hz)."""
        bins = self.fft_window_size // 2 + 1
        edges_mel = np.linspace(_hz_to_slaney_mel(self.frequency_min), _hz_to_slaney_mel(self.frequency_max),
                                self.num_mel_bins + 2)
        edges = _slaney_mel_to_hz(edges_mel)
        fft_hz = np.linspace(0, self.sample_rate // 2, bins)
        lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
        rising = (fft_hz[:, None] - lower) / (centre - lower)
        falling = (upper - fft_hz[:, None]) / (upper - centre)
        triangles = np.maximum(0.0, np.minimum(rising, falling))
        return triangles * (2.0 / (upper - lower))

    def features(self, audio: jax.Array) -> jax.Array:
        """CLAP's log-mel input features of clips no longer than max_length_s (jittable).

        Equal to ClapFeatureExtractor(..., truncation='rand_trunc', padding='repeatpad').input_features[:, 0]:
        audio shorter than num_samples is tiled a whole number of times (num_samples // samples) and zero-padded
        to num_samples. The STFT runs in fp32 (transformers' in fp64): the dB values agree to ~1e-5 for broadband
        audio; bins far (> ~100 dB) below their frame's loudest can differ more.

        Args:
          audio: [batch, samples] float at sample_rate Hz, 1 <= samples <= num_samples.
        Returns:
          [batch, num_frames, num_mel_bins] float32, dB (10 log10 of the mel power, floored at -100).
        Raises:
          ValueError for audio longer than num_samples (crop it first) or not [batch, samples].
        """
        if audio.ndim != 2:
            raise ValueError(f"audio must be [batch, samples], got shape {audio.shape}")
        samples = audio.shape[1]
        if not 1 <= samples <= self.num_samples:
            raise ValueError(f"{samples} samples per clip: expected 1 to num_samples={self.num_samples} "
                             f"({self.max_length_s} s at {self.sample_rate} Hz); crop longer audio first")
        x = audio.astype(jnp.float32)
        if samples < self.num_samples:
            x = jnp.tile(x, (1, self.num_samples // samples))
            x = jnp.pad(x, ((0, 0), (0, self.num_samples - x.shape[1])))
        n_fft = self.fft_window_size
        x = jnp.pad(x, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
        starts = np.arange(self.num_frames) * self.hop_length
        frames = x[:, starts[:, None] + np.arange(n_fft)[None, :]]  # [batch, frames, n_fft]
        window = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)  # periodic Hann
        spectrum = jnp.fft.rfft(frames * window, axis=-1)
        power = jnp.square(spectrum.real) + jnp.square(spectrum.imag)
        mel = jnp.einsum("btk,km->btm", power, jnp.asarray(self.mel_filters(), jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
        return constrain(10.0 * jnp.log10(jnp.maximum(mel, MEL_FLOOR)), BTF)

    def make(self, name: str | None = None) -> "HTSAT":
        """The network of this config."""
        return HTSAT(self, name=name)


def _hz_to_slaney_mel(hz):
    """Slaney's mel scale: linear (3 mel per 200 Hz) below 1 kHz, logarithmic (27 mel per factor 6.4) above."""
    hz = np.asarray(hz, np.float64)
    return np.where(hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1e-12) / 1000.0) * 27.0 / np.log(6.4),
                    3.0 * hz / 200.0)


def _slaney_mel_to_hz(mel):
    mel = np.asarray(mel, np.float64)
    return np.where(mel >= 15.0, 1000.0 * np.exp((mel - 15.0) * np.log(6.4) / 27.0), 200.0 * mel / 3.0)


# ------------------------------------------------------------------------------------------------ static helpers


def bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """torch F.interpolate(mode='bicubic', align_corners=True) along one axis as 4 taps per output position.

    Returns (indices [4, out_size] int32 into the input, clamped to its ends; weights [4, out_size] float32):
    output o is sum_k weights[k, o] * input[indices[k, o]], the Keys cubic (a = -0.75) at source o * (in - 1) /
    (out - 1).
    """
    a = -0.75
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    source = scale * np.arange(out_size, dtype=np.float64)
    base = np.floor(source)
    t = source - base

    def near(x):  # |x| <= 1
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

    weights = np.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)])
    indices = np.clip(base[None, :].astype(np.int64) + np.arange(-1, 3)[:, None], 0, in_size - 1)
    return indices.astype(np.int32), weights.astype(np.float32)


def relative_position_index(window: int) -> np.ndarray:
    """[window ** 2, window ** 2] int: row of the (2 window - 1) ** 2-row bias table for each (query, key) pair of
    a window (tokens row-major), indexed by their (row, column) offset."""
    rows, cols = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    d_row = rows[:, None] - rows[None, :] + window - 1
    d_col = cols[:, None] - cols[None, :] + window - 1
    return d_row * (2 * window - 1) + d_col


def shifted_window_penalty(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """[num_windows, window ** 2, window ** 2] float32: SHIFT_PENALTY between tokens of a shifted window that come
    from different regions of the (padded) height x width grid before the cyclic roll, else 0."""
    def region(n):
        idx = np.arange(n)
        return (idx >= n - window).astype(np.int64) + (idx >= n - shift).astype(np.int64)

    labels = region(height)[:, None] * 3 + region(width)[None, :]
    labels = labels.reshape(height // window, window, width // window, window).transpose(0, 2, 1, 3)
    labels = labels.reshape(-1, window * window)
    return np.where(labels[:, None, :] != labels[:, :, None], SHIFT_PENALTY, 0.0).astype(np.float32)


def _partition(x: jax.Array, window: int) -> jax.Array:
    """[batch, H, W, C] -> [batch * (H / window) * (W / window), window ** 2, C], windows row-major per example."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def _merge(windows: jax.Array, window: int, height: int, width: int) -> jax.Array:
    """Inverse of _partition: [batch * windows, window ** 2, C] -> [batch, height, width, C]."""
    c = windows.shape[-1]
    x = windows.reshape(-1, height // window, width // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, height, width, c)


# ------------------------------------------------------------------------------------------------------- modules


class WindowAttention(nn.Module):
    """Multi-head self-attention within windows, with a learned relative-position bias.

    windows [batch * num_windows, window ** 2, dim] -> same shape. `penalty` [num_windows, N, N] (shifted windows)
    or None is added to the logits. Params: 'query', 'key', 'value' (kernels ('embed', 'heads', 'kv'), biases if
    qkv_bias), 'relative_position_bias' [(2 window - 1) ** 2, heads] ('relpos_buckets', 'heads'), 'attention_out'.
    """

    config: HTSATConfig
    dim: int
    heads: int

    @nn.compact
    def __call__(self, windows: jax.Array, penalty: np.ndarray | None) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        window, head_dim = cfg.window_size, self.dim // self.heads
        tokens = window * window

        def project(name):
            if cfg.qkv_bias:
                layer = Dense((self.heads, head_dim), ("embed", "heads", "kv"), bias_axes=("heads", "kv"),
                              dtype=dtype, name=name)
            else:
                layer = layers.DenseGeneral((self.heads, head_dim), ("embed", "heads", "kv"), dtype=dtype, name=name)
            return constrain(layer(windows), BLHD)

        q, k, v = project("query"), project("key"), project("value")
        table = self.param("relative_position_bias", nn.with_logical_partitioning(
            nn.initializers.truncated_normal(0.02), ("relpos_buckets", "heads")), ((2 * window - 1) ** 2, self.heads))
        bias = jnp.take(table, relative_position_index(window).reshape(-1), axis=0)
        bias = bias.reshape(tokens, tokens, self.heads).transpose(2, 0, 1).astype(jnp.float32)  # [heads, q, k]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(head_dim)
        logits = logits + bias
        if penalty is not None:
            num_windows = penalty.shape[0]
            logits = logits.reshape(-1, num_windows, self.heads, tokens, tokens) + jnp.asarray(penalty)[:, None]
            logits = logits.reshape(-1, self.heads, tokens, tokens)
        weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
        out = constrain(jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(dtype)), BLHD)
        return Dense((self.dim,), ("heads", "kv", "embed"), num_contract=2, bias_axes=("embed",), dtype=dtype,
                     name="attention_out")(out)


class SwinLayer(nn.Module):
    """One Swin layer: x + window attention(LN(x)), then x + MLP(LN(x)); x [batch, height * width, dim].

    `shifted`: attend within windows rolled by window_size // 2 (odd layers of a stage), unless the stage is
    only one window high or wide (transformers does not shift there; HTSATConfig refuses stages below a window).
    A stage that is not a whole number of windows is zero-padded (after the norm) at the bottom and right.
    """

    config: HTSATConfig
    dim: int
    heads: int
    resolution: tuple[int, int]
    shifted: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        height, width = self.resolution
        window = cfg.window_size
        shift = window // 2 if self.shifted and min(height, width) > window else 0
        batch = x.shape[0]
        h = layer_norm("layernorm_before", cfg.layer_norm_eps)(x).astype(dtype).reshape(batch, height, width, -1)
        pad_h, pad_w = -height % window, -width % window
        h = jnp.pad(h, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))  # zeros after the norm, as transformers
        padded = (height + pad_h, width + pad_w)
        if shift:
            h = jnp.roll(h, (-shift, -shift), axis=(1, 2))
        penalty = shifted_window_penalty(*padded, window, shift) if shift else None
        h = WindowAttention(cfg, self.dim, self.heads, name="attention")(_partition(h, window), penalty)
        h = _merge(h, window, *padded)
        if shift:
            h = jnp.roll(h, (shift, shift), axis=(1, 2))
        x = constrain(x + h[:, :height, :width].reshape(batch, height * width, -1), BLE)
        h = layer_norm("layernorm_after", cfg.layer_norm_eps)(x).astype(dtype)
        h = Dense((int(cfg.mlp_ratio * self.dim),), ("embed", "mlp"), bias_axes=("mlp",), dtype=dtype,
                  name="intermediate")(h)
        h = constrain(ACTIVATIONS[cfg.hidden_act](h), ("activation_batch", "activation_length", "activation_mlp"))
        h = Dense((self.dim,), ("mlp", "embed"), bias_axes=("embed",), dtype=dtype, name="output")(h)
        return constrain(x + h, BLE)


class PatchMerging(nn.Module):
    """2x2 patch merging: x [batch, height * width, dim] -> [batch, height / 2 * width / 2, 2 dim].

    Each output concatenates the patches (0, 0), (1, 0), (0, 1), (1, 1) (row, column) of its 2x2 block, then
    'norm' (layer norm over 4 dim) and 'reduction' (linear 4 dim -> 2 dim, no bias; kernel ('mlp', 'embed')).
    """

    config: HTSATConfig
    resolution: tuple[int, int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        height, width = self.resolution
        batch, _, dim = x.shape
        x = x.reshape(batch, height, width, dim)
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        x = x.reshape(batch, -1, 4 * dim)
        x = layer_norm("norm", TORCH_LAYER_NORM_EPS)(x).astype(jnp.dtype(self.config.dtype))
        x = layers.DenseGeneral((2 * dim,), ("mlp", "embed"), dtype=jnp.dtype(self.config.dtype), name="reduction")(x)
        return constrain(x, BLE)


class HTSAT(nn.Module):
    """CLAP's audio tower: log-mel features [batch, frames, num_mel_bins] (HTSATConfig.features; frames <=
    spec_width) -> pooled [batch, output_dim] float32, transformers' ClapAudioModel(...).pooler_output.

    Params: 'bn0_scale', 'bn0_bias' [num_mel_bins] ('norm',) (the input batch norm, folded), 'patch_embed_kernel'
    [patch_h, patch_w, 1, C0] ('conv_height', 'conv_width', 'conv_in', 'conv_out'), 'patch_embed_bias' [C0],
    'patch_norm' (if enable_patch_layer_norm), 'stage_{i}_layer_{j}' (SwinLayer), 'stage_{i}_merge' (PatchMerging,
    every stage but the last), 'final_norm'.
    """

    config: HTSATConfig

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if features.ndim != 3 or features.shape[2] != cfg.num_mel_bins:
            raise ValueError(f"features must be [batch, frames, num_mel_bins={cfg.num_mel_bins}], got shape "
                             f"{features.shape}")
        batch, frames, bins = features.shape
        if not 1 <= frames <= cfg.spec_width:
            raise ValueError(f"{frames} frames: the model takes 1 to spec_size * freq_ratio = {cfg.spec_width}")
        norm_init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
        scale = self.param("bn0_scale", norm_init, (bins,))
        shift = self.param("bn0_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (bins,))
        x = constrain(features.astype(jnp.float32) * scale + shift, BTF)
        if frames < cfg.spec_width:  # stretch the time axis (transformers: "to avoid bicubic zero error")
            indices, weights = bicubic_taps(frames, cfg.spec_width)
            x = sum(weights[k][None, :, None] * jnp.take(x, indices[k], axis=1) for k in range(4))
        ratio, chunk = cfg.freq_ratio, cfg.spec_width // cfg.freq_ratio
        # [batch, ratio * chunk, bins] -> image [batch, ratio * bins, chunk, 1]: chunk r gives rows r * bins + f.
        x = x.reshape(batch, ratio, chunk, bins).transpose(0, 1, 3, 2).reshape(batch, ratio * bins, chunk, 1)
        x = constrain(x, IMAGE)

        (kh, kw), (sh, sw) = cfg.patch_size, cfg.patch_stride
        dim = cfg.patch_embeds_hidden_size
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1, 2), out_axis=3)
        kernel = self.param("patch_embed_kernel", nn.with_logical_partitioning(
            init, ("conv_height", "conv_width", "conv_in", "conv_out")), (kh, kw, 1, dim))
        bias = self.param("patch_embed_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                          (dim,))
        x = jax.lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), (sh, sw),
                                         (((kh - sh) // 2,) * 2, ((kw - sw) // 2,) * 2),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = constrain(x + bias.astype(dtype), IMAGE)
        grid_h, grid_w = x.shape[1:3]
        x = x.reshape(batch, grid_h * grid_w, dim)
        if cfg.enable_patch_layer_norm:
            x = layer_norm("patch_norm", TORCH_LAYER_NORM_EPS)(x)
        x = constrain(x.astype(dtype), BLE)

        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_attention_heads)):
            resolution = cfg.stage_resolutions[i]
            for j in range(depth):
                x = SwinLayer(cfg, cfg.stage_dims[i], heads, resolution, shifted=j % 2 == 1,
                              name=f"stage_{i}_layer_{j}")(x)
            if i < len(cfg.depths) - 1:
                x = PatchMerging(cfg, resolution, name=f"stage_{i}_merge")(x)
        x = layer_norm("final_norm", TORCH_LAYER_NORM_EPS)(x)
        return jnp.mean(x, axis=1).astype(jnp.float32)
