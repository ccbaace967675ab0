"""VGGish (Hershey et al. 2017): the AudioSet VGG whose 128-d embeddings the field's FAD is computed on.

    audio [batch, samples] at 16 kHz
      -> log-mel examples [batch, examples, 96, 64]      `log_mel_examples` (the reference's front end, below)
      -> 4 VGG blocks: conv3x3 64, pool | conv 128, pool | conv 256 x 2, pool | conv 512 x 2, pool   (ReLU after
         each conv, 2x2 max pooling): [.., 6, 4, 512]
      -> flatten (time, band, channel order) -> dense 4096, ReLU -> dense 4096, ReLU -> dense 128
         [-> ReLU when `final_relu`]                     `VGGish`: embeddings [batch, examples, 128]
      [-> PCA with whitening, clipping to [-2, 2] and 8-bit quantization: `pca_postprocess`]

Front end, as the released model was trained (AudioSet's vggish_input / mel_features): frames of 25 ms (400
samples) every 10 ms (160), no padding (whole frames only); periodic Hann window; magnitude of a 512-point FFT;
64 HTK-mel bands from 125 to 7500 Hz (triangles between 66 edges equally spaced in mel, the DC bin weighted 0);
log(mel + 0.01); examples of 96 frames (0.96 s) every 96 frames, whole examples only. A clip shorter than 0.975 s
gives no example.

The embedding: the released TF model's `vggish/embedding` is the last dense layer without an activation; the
torchvggish port adds a ReLU there. FAD implementations use the former (Google's frechet_audio_distance, and
`frechet-audio-distance` with its default use_activation=False, which removes torchvggish's ReLU), and neither
applies the PCA postprocessor (`use_pca=False`). So `final_relu` defaults to False and the PCA is a separate,
optional step (the AudioSet release's embeddings are the PCA-ed, quantized ones).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax import spectral

CONV_CHANNELS = ((64,), (128,), (256, 256), (512, 512))  # convolutions per block; a 2x2 max pool ends each


@dataclasses.dataclass(frozen=True)
class VGGishConfig:
    """VGGish's front end and head. Sizes of the released model; only `final_relu` is a choice (see above).

    Attributes:
      sample_rate: Hz; window, hop, fft_size: the STFT in samples; num_bands, mel_min_hz, mel_max_hz: the mel
      bands; log_offset: added before the log; example_frames, example_hop: log-mel frames per example and
      between examples; hidden_size: of the two 4096-wide dense layers; embedding_size: 128;
      final_relu: a ReLU on the embedding (torchvggish's module output) or not (the TF embedding, FAD's).
    """

    sample_rate: int = 16000
    window: int = 400
    hop: int = 160
    fft_size: int = 512
    num_bands: int = 64
    mel_min_hz: float = 125.0
    mel_max_hz: float = 7500.0
    log_offset: float = 0.01
    example_frames: int = 96
    example_hop: int = 96
    hidden_size: int = 4096
    embedding_size: int = 128
    final_relu: bool = False

    @property
    def example_samples(self) -> int:
        """Samples one example needs: (example_frames - 1) * hop + window (15,600 = 0.975 s at the defaults)."""
        return (self.example_frames - 1) * self.hop + self.window

    def num_examples(self, samples: int) -> int:
        """Whole examples in `samples` samples (0 if fewer than example_samples)."""
        if samples < self.window:
            return 0
        frames = 1 + (samples - self.window) // self.hop
        return 0 if frames < self.example_frames else 1 + (frames - self.example_frames) // self.example_hop


def htk_mel_matrix(config: VGGishConfig) -> np.ndarray:
    """[fft_size // 2 + 1, num_bands] float32 weights (magnitude bins -> mel bands) of the front end above."""
    def to_mel(hz):
        return 1127.0 * np.log(1.0 + np.asarray(hz, np.float64) / 700.0)

    bins_mel = to_mel(np.linspace(0.0, config.sample_rate / 2.0, config.fft_size // 2 + 1))
    edges = np.linspace(to_mel(config.mel_min_hz), to_mel(config.mel_max_hz), config.num_bands + 2)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel[:, None] - lower) / (centre - lower)
    falling = (upper - bins_mel[:, None]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0] = 0.0
    return weights.astype(np.float32)


def log_mel_examples(audio: jax.Array, config: VGGishConfig = VGGishConfig()) -> jax.Array:
    """The front end (see the module docstring): audio [batch, samples] at config.sample_rate ->
    float32 [batch, examples, example_frames, num_bands] with examples = config.num_examples(samples)."""
    audio = jnp.asarray(audio, jnp.float32)
    examples = config.num_examples(audio.shape[-1])
    if examples == 0:
        raise ValueError(f"VGGish needs at least {config.example_samples} samples ("
                         f"{config.example_samples / config.sample_rate:.3f} s) for one example; got {audio.shape[-1]}")
    frames = spectral.frame(audio, config.window, config.hop) * jnp.asarray(spectral.hann_window(config.window))
    spectrum = jnp.fft.rfft(frames, n=config.fft_size, axis=-1)
    magnitude = jnp.sqrt(jnp.square(spectrum.real) + jnp.square(spectrum.imag))
    mel = jnp.einsum("btf,fm->btm", magnitude, jnp.asarray(htk_mel_matrix(config)),
                     precision=jax.lax.Precision.HIGHEST)
    log_mel = jnp.log(mel + config.log_offset)
    index = (np.arange(examples)[:, None] * config.example_hop + np.arange(config.example_frames)[None, :])
    return log_mel[:, index]


class VGGish(nn.Module):
    """Log-mel examples [n, example_frames, num_bands] -> embeddings [n, embedding_size] (see the module docstring)."""

    config: VGGishConfig = VGGishConfig()

    @nn.compact
    def __call__(self, examples: jax.Array) -> jax.Array:
        cfg = self.config
        x = examples[..., None].astype(jnp.float32)  # [n, time, band, 1]
        for block, channels in enumerate(CONV_CHANNELS):
            for i, width in enumerate(channels):
                x = nn.relu(nn.Conv(width, (3, 3), padding="SAME", name=f"conv{block + 1}_{i + 1}",
                                    precision=jax.lax.Precision.HIGHEST)(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)  # time, band, channel order, as the reference flattens
        for i in range(2):
            x = nn.relu(nn.Dense(cfg.hidden_size, name=f"fc1_{i + 1}", precision=jax.lax.Precision.HIGHEST)(x))
        x = nn.Dense(cfg.embedding_size, name="fc2", precision=jax.lax.Precision.HIGHEST)(x)
        return nn.relu(x) if cfg.final_relu else x


def pca_postprocess(embeddings: np.ndarray, eigen_vectors: np.ndarray, means: np.ndarray) -> np.ndarray:
    """The AudioSet release's postprocessor: embeddings [..., 128] -> PCA with whitening (eigen_vectors [128, 128]
    applied to embeddings - means [128]), clipped to [-2, 2] and quantized to 0..255 (float32 of whole numbers)."""
    projected = (np.asarray(embeddings, np.float64) - np.asarray(means, np.float64).reshape(-1)) @ np.asarray(
        eigen_vectors, np.float64).T
    clipped = np.clip(projected, -2.0, 2.0)
    return np.round((clipped + 2.0) * (255.0 / 4.0)).astype(np.float32)
