"""The spectral codec (networks/spectral_codec.py) as a trainable model (a codec_model.CodecModel).

Parameters are {'generator': ...} (as SoundStreamModel's, what the Codec interface runs); the quantizer's
codebooks are state (the 'quantizer' collection, EMA). The loss is computed on log-magnitude frames, not on
audio, so a training step never runs Griffin-Lim:

  loss = reconstruction + commitment_weight * commitment + mel_weight * log_mel_error,
  reconstruction = sum_f w_f mean_{batch, frames} (x̂_f - x_f)^2 / num_bins,
  w_f = 1 / max(f, weighting_min_hz), scaled to mean 1 over the bins,
  log_mel_error = mean_{batch, frames, bands} (log(M |X̂|^2 + log_eps^2) - log(M |X|^2 + log_eps^2))^2,

x = log(|STFT| + log_eps) of the input, x̂ the decoded one, |X̂| = max(exp(x̂) - log_eps, 0) the magnitudes that
Griffin-Lim receives, M the `mel_bands` Slaney mel filterbank (spectral.mel_filterbank). Three choices matter,
measured on the synthetic test clips with the tiny configuration (see gin/codec/spectral_tiny.gin for the figures):

* The squared error, not L1: where the partials of a note are uncertain (early in training, everywhere), L1's
  optimum is the median, the noise floor between partials, and the decoder learns the spectral envelope without
  any pitch (2% melody agreement, against 24% with the squared error after 600 steps).
* The 1/f weight gives each octave about equal weight; unweighted, the bins above 5 kHz, 60% of them, take most
  of the capacity, which pitch does not need.
* But under the 1/f weight a high partial, which covers as few bins as a low one, weighs ten times less at 4 kHz
  than at 400 Hz: pure tones above 3 kHz came back smeared, their peak anywhere from 3.7 to 7.3 kHz. The log-mel
  term weighs a band's error alike wherever the band lies, so a partial in the wrong band costs as much at 4 kHz
  as at 400 Hz; the linear bins still place it within its band.

`pitch_latent_weight` > 0 adds pitch_latent_weight * mean((z[..., :12] - pitch_latent_scale * p)^2): the first 12
dimensions of each code frame's encoder latent z are pulled towards the frame's pitch-class profile p
(spectral.pitch_class_profile, 128 ms window centred on the frame), scaled so that they hold most of the latent's
variance. The first RVQ level, whose k-means splits the largest variance first, then codes the pitch class, where
otherwise the spectral envelope takes it and the pitch is left to the residual levels (a coarse stage that must
infer the pitch from level 2 codes rarely does). A distillation of a known feature into the first level, as
Mimi's first level distils WavLM's.

`tone_fraction` > 0 replaces that fraction of the training examples, drawn per step, with a pure tone of random
frequency, amplitude (0.05 to 0.5) and phase: real music has isolated partials anywhere in that range, which a
small or synthetic training set may lack. The frequency is log-uniform over [tone_min_hz, tone_max_hz], or, for
`tone_linear_fraction` of the tones, uniform in Hz over it. The encoder's first layer holds separate weights for
each STFT bin, and a tone trains the few bins it covers. Log-uniform tones give each octave the same number of
tones. An octave at 4 kHz holds 64 times the bins of one at 62 Hz, so each high bin sees 64 times fewer tones,
and those weights learn last. Measured with the tiny configuration after 1,000 steps: log-uniform tones only
returned 4 kHz at 6.2 kHz. Half the tones uniform in Hz returned each of the eight sanity tones, 55 Hz to 4 kHz,
within 50 cents (figures in gin/codec/spectral_tiny.gin).
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax import spectral
from musiclm_jax.codec.model import CodecModel
from musiclm_jax.networks.spectral_codec import SpectralCodec, SpectralCodecConfig
from musiclm_jax.networks.quantizers import STATE, RVQConfig


class SpectralCodecModel(CodecModel):
    """Codec training and evaluation on batches {'audio': [batch, samples] float32 in [-1, 1]}.

    Args:
      network, rvq: the spectral codec and its residual VQ.
      sample_rate: Hz; segment_samples: samples per training example.
      commitment_weight: weight of the quantizer's commitment loss.
      weighting_min_hz: the loss weight of bin f is 1 / max(f, weighting_min_hz) (None: every bin weighs 1).
      tone_fraction, tone_min_hz, tone_max_hz, tone_linear_fraction: the tone augmentation (see the module
        docstring; tone_fraction 0: off).
      pitch_latent_weight, pitch_latent_scale: the pitch-class target of the latent's first 12 dimensions (see
        the module docstring; weight 0: off).
      mel_weight, mel_bands: the weight of the log-mel term and its bands (see the module docstring; 0: off).
    """

    def __init__(self, network: SpectralCodecConfig, rvq: RVQConfig, sample_rate: int, segment_samples: int,
                 commitment_weight: float = 1.0, weighting_min_hz: Optional[float] = 100.0,
                 tone_fraction: float = 0.0, tone_min_hz: float = 40.0, tone_max_hz: float = 8000.0,
                 tone_linear_fraction: float = 0.0,
                 pitch_latent_weight: float = 0.0, pitch_latent_scale: float = 1.0,
                 mel_weight: float = 0.0, mel_bands: int = 64):
        self.network, self.rvq = network, rvq
        self.sample_rate = int(sample_rate)
        self.segment_samples = int(segment_samples)
        self.commitment_weight = float(commitment_weight)
        self.generator = SpectralCodec(network, rvq)
        if self.segment_samples < network.hop_length:
            raise ValueError(f"SpectralCodecModel: segment_samples {segment_samples} is shorter than one code frame "
                             f"({network.hop_length} samples)")
        if not 0.0 <= tone_fraction <= 1.0:
            raise ValueError(f"SpectralCodecModel.tone_fraction {tone_fraction} must be in [0, 1]")
        if not 0 < tone_min_hz < tone_max_hz < self.sample_rate / 2:
            raise ValueError(f"SpectralCodecModel: tones from {tone_min_hz} to {tone_max_hz} Hz must lie in "
                             f"(0, {self.sample_rate / 2}) Hz")
        self.tone_fraction, self.tone_min_hz, self.tone_max_hz = float(tone_fraction), tone_min_hz, tone_max_hz
        if not 0.0 <= tone_linear_fraction <= 1.0:
            raise ValueError(f"SpectralCodecModel.tone_linear_fraction {tone_linear_fraction} must be in [0, 1]")
        self.tone_linear_fraction = float(tone_linear_fraction)
        if pitch_latent_weight < 0 or (pitch_latent_weight and network.dimension < 12):
            raise ValueError(f"SpectralCodecModel.pitch_latent_weight {pitch_latent_weight} must be >= 0 and needs a "
                             f"latent of at least 12 dimensions (dimension {network.dimension})")
        self.pitch_latent_weight, self.pitch_latent_scale = float(pitch_latent_weight), float(pitch_latent_scale)
        frequencies = network.bin_frequencies(self.sample_rate)
        if weighting_min_hz is None:
            weights = np.ones_like(frequencies)
        else:
            if weighting_min_hz <= 0:
                raise ValueError(f"SpectralCodecModel.weighting_min_hz {weighting_min_hz} must be > 0 (or None)")
            weights = 1.0 / np.maximum(frequencies, float(weighting_min_hz))
        self.bin_weights = (weights / weights.mean()).astype(np.float32)  # [bins], mean 1
        if mel_weight < 0:
            raise ValueError(f"SpectralCodecModel.mel_weight {mel_weight} must be >= 0")
        self.mel_weight = float(mel_weight)
        self.mel_bank = None
        if mel_weight:
            self.mel_bank = spectral.mel_filterbank(self.sample_rate, network.n_fft, mel_bands).T  # [bins, bands]
            if self.mel_bank.shape[1] != mel_bands:
                raise ValueError(f"SpectralCodecModel.mel_bands {mel_bands}: n_fft {network.n_fft} at "
                                 f"{self.sample_rate} Hz has only {self.mel_bank.shape[1]} non-empty mel bands")

    def get_initial_variables(self, rng, input_shapes):
        # Parameter shapes do not depend on the length: initialise on a short clip.
        length = min(input_shapes["audio"][1], 4 * self.network.hop_length)
        variables = self.generator.init({"params": rng}, jnp.zeros((input_shapes["audio"][0], length), jnp.float32))
        return {"params": {"generator": variables["params"]}, STATE: variables[STATE]}

    # ------------------------------------------------------------------------------------------ training
    def with_tones(self, audio: jax.Array, rng: jax.Array) -> jax.Array:
        """audio [batch, samples] with each row replaced, with probability tone_fraction, by a pure tone (its
        frequency log-uniform, or with probability tone_linear_fraction uniform in Hz)."""
        batch, samples = audio.shape
        k_pick, k_freq, k_amp, k_phase = jax.random.split(rng, 4)
        pick = jax.random.uniform(k_pick, (batch, 1)) < self.tone_fraction
        log_f = jax.random.uniform(k_freq, (batch, 1), minval=math.log(self.tone_min_hz),
                                   maxval=math.log(self.tone_max_hz))
        if self.tone_linear_fraction:  # a separate key: with 0, the tones are those drawn before this option
            k_linear, k_hz = jax.random.split(jax.random.fold_in(k_freq, 1))
            hz = jax.random.uniform(k_hz, (batch, 1), minval=self.tone_min_hz, maxval=self.tone_max_hz)
            linear = jax.random.uniform(k_linear, (batch, 1)) < self.tone_linear_fraction
            log_f = jnp.where(linear, jnp.log(hz), log_f)
        amplitude = jax.random.uniform(k_amp, (batch, 1), minval=0.05, maxval=0.5)
        phase = jax.random.uniform(k_phase, (batch, 1), maxval=2 * math.pi)
        t = jnp.arange(samples, dtype=jnp.float32)[None] / self.sample_rate
        tones = amplitude * jnp.sin(2 * math.pi * jnp.exp(log_f) * t + phase)
        return jnp.where(pick, tones, audio)

    def _losses(self, params, flax_mutables, audio, rng, train: bool):
        g_vars = {"params": params["generator"], STATE: flax_mutables[STATE]}
        if train:
            rng, k_tones = jax.random.split(rng)
            if self.tone_fraction:
                audio = self.with_tones(audio, k_tones)
            (decoded, _, aux), updated = self.generator.apply(g_vars, audio, train=True, rng=rng, mutable=[STATE])
        else:
            (decoded, _, aux), updated = self.generator.apply(g_vars, audio), {STATE: flax_mutables[STATE]}
        error = decoded - aux["log_magnitude"]
        reconstruction = jnp.mean(jnp.square(error) * jnp.asarray(self.bin_weights))
        commitment = aux["commitment_loss"]
        loss = reconstruction + self.commitment_weight * commitment
        extra = {}
        if self.mel_weight:
            mel = self._log_mel(decoded) - self._log_mel(aux["log_magnitude"])
            extra["log_mel_error"] = jnp.mean(jnp.square(mel))
            loss = loss + self.mel_weight * extra["log_mel_error"]
        if self.pitch_latent_weight:
            latents = aux["latents"].astype(jnp.float32)
            profile = spectral.pitch_class_profile(audio, self.sample_rate, latents.shape[1], self.network.hop_length)
            pitch = jnp.mean(jnp.square(latents[..., :12] - self.pitch_latent_scale * profile))
            loss = loss + self.pitch_latent_weight * pitch
            extra["pitch_latent_loss"] = pitch
        metrics = {
            "loss": loss,
            "reconstruction_loss": reconstruction,
            "log_magnitude_l1": jnp.mean(jnp.abs(error)),
            "commitment_loss": commitment,
            **{f"codebook_perplexity_{level}": aux["perplexity"][level] for level in range(self.rvq.num_quantizers)},
            "mean_levels": jnp.mean(aux["num_levels"].astype(jnp.float32)),
            "loss_weight": jnp.float32(audio.shape[0]),
            **extra,
        }
        return loss, metrics, updated

    def _log_mel(self, log_magnitude: jax.Array) -> jax.Array:
        """log(mel power + log_eps^2) [batch, frames, bands] of log-magnitudes [batch, frames, bins]."""
        eps = self.network.log_eps
        power = jnp.square(jnp.maximum(jnp.exp(log_magnitude) - eps, 0.0))
        mel = jnp.einsum("btf,fm->btm", power, jnp.asarray(self.mel_bank), precision=jax.lax.Precision.HIGHEST)
        return jnp.log(mel + eps * eps)

    # ------------------------------------------------------------------------------------------ inference
    def predict_batch_with_aux(self, params, batch, rng=None, *, flax_mutables=None, num_levels=None):
        """Reconstruction [batch, samples] of batch['audio'] through `num_levels` levels; aux: codes."""
        variables = self.variables(params, flax_mutables)
        audio = batch["audio"]
        codes = self.generator.apply(variables, audio, num_levels, method=SpectralCodec.encode)
        recon = self.generator.apply(variables, codes, method=SpectralCodec.decode)[:, :audio.shape[1]]
        return recon, {"codes": codes}

    def score_batch(self, params, batch, flax_mutables=None):
        """[batch] negative weighted log-magnitude error of each example's round trip (all levels)."""
        decoded, _, aux = self.generator.apply(self.variables(params, flax_mutables), batch["audio"])
        error = jnp.square(decoded - aux["log_magnitude"]) * jnp.asarray(self.bin_weights)
        return -jnp.mean(error, axis=(1, 2))
