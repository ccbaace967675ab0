"""PaSST (Koutini et al. 2022, arXiv 2110.05069): the AudioSet tagger audiocraft's KL metric is computed with.

The released `passt_s_swa_p16_128_ap476` as hear21passt's `get_basic_model(mode="logits")` runs it in eval mode:

    audio [batch, samples] at 32 kHz
      -> log-mel [batch, 128, frames]                     `log_mel` (hear21passt's AugmentMelSTFT in eval mode)
      -> conv 16x16, stride 10x10 (1 -> 768 channels): [batch, 12, time_patches, 768]
         + frequency positional embedding [12, 768] + time positional embedding [99, 768] (its first
           time_patches rows: a clip shorter than 10 s uses a prefix)
      -> flatten (frequency-major: patch f * time_patches + t) and prepend the cls and distillation tokens
         (each + its own positional embedding)
      -> 12 pre-norm ViT blocks (LayerNorm eps 1e-6; 12 heads; MLP 3072 with exact GELU) -> LayerNorm (1e-6)
      -> (cls + dist) / 2 -> LayerNorm (eps 1e-5) -> dense 527            `PaSST`: logits [batch, 527]

The distillation head (`head_dist`) of the checkpoint is not used for logits: the reference averages the two
tokens and applies the one head (hear21passt/models/passt.py, `PaSST.forward`). No patchout: eval mode has none.

Front end (hear21passt/models/preprocess.py with the arguments of hear21passt/base.py `get_basic_model`):
pre-emphasis y[n] = x[n + 1] - 0.97 x[n] (one sample shorter); STFT with n_fft 1024, a symmetric Hann window of
800 samples (torch.hann_window(800, periodic=False)) zero-padded to 1024 in the middle, hop 320, centred frames
(reflect padding of 512 each side); power (re^2 + im^2); 128 Kaldi mel bands (torchaudio's
compliance.kaldi.get_mel_banks: triangles on 1127 ln(1 + f / 700) between 0 and 15000 Hz, the Nyquist bin
weighted 0); ln(mel + 1e-5); then (x + 4.5) / 5. fmax is 15000 = sr // 2 - fmax_aug_range // 2 (fmax=None,
fmax_aug_range=2000); in eval mode the random fmin/fmax and the frequency/time masking are off.
Frames: 1 + (samples - 1) // 320, so 10 s (320000 samples) gives 1000 frames and 99 time patches.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class PaSSTConfig:
    """PaSST's front end and transformer. Defaults: the released passt_s_swa_p16_128_ap476.

    Attributes:
      sample_rate: Hz; n_fft, win_length, hop_length: the STFT in samples; num_bands, fmin, fmax: the Kaldi mel
      bands (Hz); preemphasis: the coefficient of x[n] in y[n] = x[n + 1] - c x[n]; log_offset: added to the mel
      power before ln; norm_shift, norm_scale: the log-mel is mapped to (x + norm_shift) / norm_scale;
      input_frames: the frames the model was built for (its time positional embedding covers
      input_frames // stride patches); patch_size, stride: of the patch convolution (both axes);
      embed_dim, depth, num_heads, mlp_ratio: the ViT; num_classes: 527 AudioSet classes; layer_norm_eps: of the
      blocks and the final norm; head_norm_eps: of the LayerNorm in the head (torch's default 1e-5).
    """

    sample_rate: int = 32000
    n_fft: int = 1024
    win_length: int = 800
    hop_length: int = 320
    num_bands: int = 128
    fmin: float = 0.0
    fmax: float = 15000.0
    preemphasis: float = 0.97
    log_offset: float = 1e-5
    norm_shift: float = 4.5
    norm_scale: float = 5.0
    input_frames: int = 998
    patch_size: int = 16
    stride: int = 10
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 527
    layer_norm_eps: float = 1e-6
    head_norm_eps: float = 1e-5

    @property
    def freq_positions(self) -> int:
        """Rows of the frequency positional embedding (the reference's num_bands // stride)."""
        return self.num_bands // self.stride

    @property
    def time_positions(self) -> int:
        """Rows of the time positional embedding (input_frames // stride): the most time patches a clip may have."""
        return self.input_frames // self.stride

    def num_frames(self, samples: int) -> int:
        """Log-mel frames of a clip of `samples` samples (pre-emphasis drops one; centred frames)."""
        return 1 + (samples - 1) // self.hop_length

    def num_patches(self, frames: int) -> tuple[int, int]:
        """(frequency, time) patches of the convolution over [num_bands, frames]."""
        return ((self.num_bands - self.patch_size) // self.stride + 1,
                (frames - self.patch_size) // self.stride + 1)

    @property
    def max_samples(self) -> int:
        """The longest clip (samples) whose time patches fit the time positional embedding (321600 = 10.05 s for
        the released model; audiocraft feeds at most 10 s)."""
        frames = (self.time_positions - 1) * self.stride + self.patch_size + self.stride - 1
        return (frames - 1) * self.hop_length + self.hop_length

    @property
    def min_samples(self) -> int:
        """The shortest clip (samples) that gives one patch in time (and exceeds the STFT's reflect padding): 4801
        for the released model, the same bound as audiocraft's `> 0.15 s` segment filter."""
        return max((self.patch_size - 1) * self.hop_length + 1, self.n_fft // 2 + 2)


def kaldi_mel_banks(config: PaSSTConfig) -> np.ndarray:
    """The mel filterbank [num_bands, n_fft // 2 + 1] float32 of torchaudio.compliance.kaldi.get_mel_banks
    (no VTLN warping), with the zero column for the Nyquist bin the reference appends."""
    mel = lambda f: 1127.0 * np.log1p(np.asarray(f, np.float64) / 700.0)  # noqa: E731
    low, high = mel(config.fmin), mel(config.fmax)
    delta = (high - low) / (config.num_bands + 1)
    band = np.arange(config.num_bands, dtype=np.float64)[:, None]
    left, center, right = low + band * delta, low + (band + 1.0) * delta, low + (band + 2.0) * delta
    bins = mel(config.sample_rate / config.n_fft * np.arange(config.n_fft // 2, dtype=np.float64))[None]
    weights = np.maximum(0.0, np.minimum((bins - left) / (center - left), (right - bins) / (right - center)))
    return np.pad(weights, ((0, 0), (0, 1))).astype(np.float32)


def stft_window(config: PaSSTConfig) -> np.ndarray:
    """The analysis window [n_fft] float32: a symmetric Hann window of win_length samples zero-padded on both sides
    to n_fft (torch.stft centres a shorter window: (n_fft - win_length) // 2 zeros on the left)."""
    n = np.arange(config.win_length, dtype=np.float64)
    hann = 0.5 - 0.5 * np.cos(2.0 * math.pi * n / (config.win_length - 1))
    left = (config.n_fft - config.win_length) // 2
    return np.pad(hann, (left, config.n_fft - config.win_length - left)).astype(np.float32)


def log_mel(audio: jax.Array, config: PaSSTConfig = PaSSTConfig()) -> jax.Array:
    """audio [batch, samples] float at config.sample_rate (range [-1, 1]) -> normalised log-mel
    [batch, num_bands, frames] float32, frames = config.num_frames(samples).

    hear21passt's AugmentMelSTFT in eval mode; needs samples > n_fft // 2 + 1 (the reflect padding)."""
    audio = jnp.asarray(audio, jnp.float32)
    if audio.ndim != 2:
        raise ValueError(f"log_mel takes audio [batch, samples]; got shape {audio.shape}")
    if audio.shape[1] - 1 <= config.n_fft // 2:
        raise ValueError(f"log_mel needs more than {config.n_fft // 2 + 1} samples; got {audio.shape[1]}")
    x = audio[:, 1:] - config.preemphasis * audio[:, :-1]
    pad = config.n_fft // 2
    x = jnp.pad(x, ((0, 0), (pad, pad)), mode="reflect")
    frames = 1 + (x.shape[1] - config.n_fft) // config.hop_length
    index = np.arange(frames)[:, None] * config.hop_length + np.arange(config.n_fft)[None]
    spectrum = jnp.fft.rfft(x[:, index] * stft_window(config), axis=-1)  # [batch, frames, n_fft // 2 + 1]
    power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
    mel = jnp.einsum("mk,btk->bmt", kaldi_mel_banks(config), power, precision=jax.lax.Precision.HIGHEST)
    return (jnp.log(mel + config.log_offset) + config.norm_shift) / config.norm_scale


class Block(nn.Module):
    """A pre-norm ViT block: x + attn(LN(x)), then + MLP(LN(x)). [batch, tokens, dim] -> same."""

    config: PaSSTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        b, n, d = x.shape
        head_dim = d // c.num_heads
        h = nn.LayerNorm(epsilon=c.layer_norm_eps, name="norm1")(x)
        qkv = nn.Dense(3 * d, name="qkv")(h).reshape(b, n, 3, c.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [b, n, heads, head_dim]
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim ** -0.5, axis=-1)
        h = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, d)
        x = x + nn.Dense(d, name="proj")(h)
        h = nn.LayerNorm(epsilon=c.layer_norm_eps, name="norm2")(x)
        h = nn.gelu(nn.Dense(int(d * c.mlp_ratio), name="fc1")(h), approximate=False)
        return x + nn.Dense(d, name="fc2")(h)


class PaSST(nn.Module):
    """PaSST's transformer: normalised log-mel [batch, num_bands, frames] (`log_mel`) -> logits
    [batch, num_classes] float32 (multi-label AudioSet logits; audiocraft's KL takes their softmax).

    `features=True` returns (logits, features [batch, embed_dim]) instead: the mean of the normed cls and
    distillation tokens, as the reference's `forward` returns them. Raises ValueError when the clip has more time
    patches than config.time_positions (longer than config.max_samples) or its band count differs."""

    config: PaSSTConfig

    @nn.compact
    def __call__(self, mel: jax.Array, features: bool = False):
        c = self.config
        if mel.ndim != 3 or mel.shape[1] != c.num_bands:
            raise ValueError(f"PaSST takes a log-mel [batch, {c.num_bands}, frames]; got shape {mel.shape}")
        freq_patches, time_patches = c.num_patches(mel.shape[2])
        if time_patches < 1 or time_patches > c.time_positions:
            raise ValueError(f"{mel.shape[2]} frames give {time_patches} time patches; PaSST takes 1 to "
                             f"{c.time_positions} (clips of {c.min_samples} to {c.max_samples} samples)")
        if freq_patches != c.freq_positions:
            raise ValueError(f"{c.num_bands} bands give {freq_patches} frequency patches but the frequency "
                             f"positional embedding has {c.freq_positions} rows")
        init = nn.initializers.truncated_normal(0.02)
        x = nn.Conv(c.embed_dim, (c.patch_size, c.patch_size), strides=(c.stride, c.stride), padding="VALID",
                    name="patch_embed")(mel[..., None].astype(jnp.float32))  # [b, freq, time, dim]
        time_pos = self.param("time_pos_embed", init, (c.time_positions, c.embed_dim))
        freq_pos = self.param("freq_pos_embed", init, (c.freq_positions, c.embed_dim))
        x = x + time_pos[None, None, :time_patches] + freq_pos[None, :, None]
        b = x.shape[0]
        x = x.reshape(b, freq_patches * time_patches, c.embed_dim)
        cls_token = self.param("cls_token", init, (c.embed_dim,))
        dist_token = self.param("dist_token", init, (c.embed_dim,))
        token_pos = self.param("token_pos_embed", init, (2, c.embed_dim))
        tokens = jnp.stack([cls_token + token_pos[0], dist_token + token_pos[1]])
        x = jnp.concatenate([jnp.broadcast_to(tokens[None], (b, 2, c.embed_dim)), x], axis=1)
        for i in range(c.depth):
            x = Block(c, name=f"block_{i}")(x)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="norm")(x)
        pooled = (x[:, 0] + x[:, 1]) / 2
        h = nn.LayerNorm(epsilon=c.head_norm_eps, name="head_norm")(pooled)
        logits = nn.Dense(c.num_classes, name="head")(h)
        return (logits, pooled) if features else logits
