"""Losses of the SoundStream codec: adversarial hinge losses, feature matching and multi-scale mel losses.

Discriminator outputs are what `musiclm_jax.networks.discriminators.Discriminators` returns: a list with one
(logits, features) pair per sub-discriminator, logits of any shape (e.g. [batch, frames, 1]) and features a list
of arrays. Every loss is a float32 scalar averaged with equal weight over the sub-discriminators (SoundStream,
Zeghidour et al. 2021, eqs. 1-3).

The multi-scale mel loss is the spectral reconstruction loss of Gritsenko et al. 2020 used by SoundStream:
L1 distance of mel magnitude spectrograms plus alpha_s times an L2 distance of their logarithms, summed over
window lengths s = 64 .. 2048 (hop s / 4, alpha_s = sqrt(s / 2)); or, with form='log_l1', DAC's (Kumar et al.
2023): the L1 distance of log10 mel magnitudes, summed over windows 32 .. 2048 with 5 .. 320 bands. Next to it:
the multi-scale STFT loss (DAC: L1 of log10 power spectra plus L1 of magnitudes, windows 2048 and 512) and the
waveform L1 distance, which is the only one of these that sees the DC offset and the phase.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.spectral import magnitude_spectrogram, mel_filterbank, safe_sqrt

DiscriminatorOutputs = Sequence[tuple[jax.Array, Sequence[jax.Array]]]


def _mean(x: jax.Array) -> jax.Array:
    return jnp.mean(jnp.asarray(x).astype(jnp.float32))


def _check_pairs(real_outputs: DiscriminatorOutputs, fake_outputs: DiscriminatorOutputs) -> None:
    if len(real_outputs) != len(fake_outputs):
        raise ValueError(f"{len(real_outputs)} real discriminator outputs but {len(fake_outputs)} fake ones")
    if not real_outputs:
        raise ValueError("no discriminator outputs")


# ---------------------------------------------------------------------------------------------- adversarial


def hinge_discriminator_loss(real_outputs: DiscriminatorOutputs, fake_outputs: DiscriminatorOutputs) -> jax.Array:
    """Hinge loss of the discriminators.

    Args:
      real_outputs: [(logits, features)] of the discriminators on real audio x (logits e.g. [batch, frames, 1]).
      fake_outputs: the same on decoded audio x̂ (usually stop-gradiented by the caller).
    Returns:
      float32 scalar: mean over discriminators k of mean(relu(1 - D_k(x))) + mean(relu(1 + D_k(x̂))), the means
      taken over every logit (batch and frames).
    """
    _check_pairs(real_outputs, fake_outputs)
    terms = [_mean(jax.nn.relu(1.0 - real[0].astype(jnp.float32)))
             + _mean(jax.nn.relu(1.0 + fake[0].astype(jnp.float32)))
             for real, fake in zip(real_outputs, fake_outputs)]
    return jnp.mean(jnp.stack(terms))


def hinge_generator_loss(fake_outputs: DiscriminatorOutputs) -> jax.Array:
    """SoundStream's adversarial loss of the generator.

    Args:
      fake_outputs: [(logits, features)] of the discriminators on decoded audio x̂.
    Returns:
      float32 scalar: mean over discriminators k of mean(relu(1 - D_k(x̂))) over every logit.
    """
    if not fake_outputs:
        raise ValueError("no discriminator outputs")
    return jnp.mean(jnp.stack([_mean(jax.nn.relu(1.0 - fake[0].astype(jnp.float32))) for fake in fake_outputs]))


def feature_matching_loss(real_outputs: DiscriminatorOutputs, fake_outputs: DiscriminatorOutputs) -> jax.Array:
    """L1 feature-matching loss between discriminator activations on real and decoded audio.

    Args:
      real_outputs: [(logits, features)] on real audio; the caller passes the features already
        stop-gradiented (no stop_gradient is added here).
      fake_outputs: [(logits, features)] on decoded audio, features with the same shapes as the real ones.
    Returns:
      float32 scalar: mean over discriminators k of (mean over layers l of mean |f_k^l(x) - f_k^l(x̂)|); the
      per-element means run over batch, time (frequency) and channels. Equals SoundStream's
      1/(K L) sum_k sum_l when every discriminator has the same number of layers L.
    """
    _check_pairs(real_outputs, fake_outputs)
    per_disc = []
    for k, ((_, real_features), (_, fake_features)) in enumerate(zip(real_outputs, fake_outputs)):
        if len(real_features) != len(fake_features) or not real_features:
            raise ValueError(f"discriminator {k}: {len(real_features)} real features vs {len(fake_features)} fake")
        layers = [_mean(jnp.abs(r.astype(jnp.float32) - f.astype(jnp.float32)))
                  for r, f in zip(real_features, fake_features)]
        per_disc.append(jnp.mean(jnp.stack(layers)))
    return jnp.mean(jnp.stack(per_disc))


# ------------------------------------------------------------------------------------------------- mel losses


MEL_FORMS = ("soundstream", "log_l1")


class MultiScaleMelLoss:
    """Multi-scale mel-spectrogram reconstruction loss (Gritsenko et al. 2020; SoundStream eq. 4; DAC).

    Args:
      sample_rate: audio sample rate in Hz (sets the mel scale).
      scales: STFT window lengths s in samples, hop s // 4 (periodic Hann, no centring).
      n_mels: mel bands, one number for every scale or one per scale (DAC: 5, 10, ..., 320 for windows 32 ..
        2048); reduced for short windows (see `mel_filterbank`).
      eps: added to mel magnitudes before the logarithm. (DAC clamps at eps instead; a clamp has no gradient
        below it, and a decoder whose output falls under it, as a young one does on quiet bins, never comes back.)
      form: 'soundstream' or 'log_l1' (below).

    `__call__(target, estimate)`, both [batch, samples] with samples >= max(scales), returns the float32 scalar
      soundstream: sum_s [ mean |M_s(x) - M_s(x̂)| + alpha_s * sqrt(mean (log(M_s(x) + eps) - log(M_s(x̂) + eps))^2) ],
        alpha_s = sqrt(s / 2);
      log_l1:      sum_s mean |log10(M_s(x) + eps) - log10(M_s(x̂) + eps)|,
    M_s the mel magnitude spectrogram [batch, frames, n_mels'] of window s; the means run over batch, frames and
    mel bands. It is exactly 0 for identical inputs and its gradient is finite there.
    `mel_distance(target, estimate)` is mean over scales of mean |M_s(x) - M_s(x̂)| (a metric; the same for both
    forms).
    """

    def __init__(self, sample_rate: int, scales: Sequence[int] = (64, 128, 256, 512, 1024, 2048),
                 n_mels: int | Sequence[int] = 64, eps: float = 1e-5, form: str = "soundstream"):
        self.sample_rate = int(sample_rate)
        self.scales = tuple(int(s) for s in scales)
        bands = (n_mels,) * len(self.scales) if isinstance(n_mels, int) else tuple(int(n) for n in n_mels)
        if len(bands) != len(self.scales):
            raise ValueError(f"MultiScaleMelLoss: {len(bands)} n_mels values for {len(self.scales)} scales")
        self.n_mels = bands
        self.eps = float(eps)
        if form not in MEL_FORMS:
            raise ValueError(f"MultiScaleMelLoss: form {form!r}: expected one of {MEL_FORMS}")
        self.form = form
        if not self.scales or any(s < 4 for s in self.scales):
            raise ValueError(f"MultiScaleMelLoss: scales {self.scales} must be window lengths >= 4 samples")
        # [freq, mels] per scale, so that M_s = |STFT| @ bank.
        self.filterbanks = tuple(mel_filterbank(self.sample_rate, s, n).T for s, n in zip(self.scales, bands))

    def __repr__(self) -> str:
        return (f"MultiScaleMelLoss(sample_rate={self.sample_rate}, scales={self.scales}, n_mels={self.n_mels}, "
                f"eps={self.eps}, form={self.form!r})")

    def hop(self, scale: int) -> int:
        """Hop length of window `scale`: scale // 4."""
        return max(1, scale // 4)

    def mel_spectrogram(self, audio: jax.Array, index: int) -> jax.Array:
        """Mel magnitude spectrogram of scale `index`: audio [batch, samples] -> float32 [batch, frames, n_mels']."""
        scale = self.scales[index]
        if audio.ndim != 2:
            raise ValueError(f"MultiScaleMelLoss expects audio [batch, samples], got shape {audio.shape}")
        if audio.shape[-1] < scale:
            raise ValueError(f"MultiScaleMelLoss: {audio.shape[-1]} samples are fewer than the window {scale}")
        mag = magnitude_spectrogram(audio, scale, self.hop(scale))
        return jnp.einsum("btf,fm->btm", mag, jnp.asarray(self.filterbanks[index]),
                          precision=jax.lax.Precision.HIGHEST)

    def _check(self, target: jax.Array, estimate: jax.Array) -> None:
        if target.shape != estimate.shape:
            raise ValueError(f"target {target.shape} and estimate {estimate.shape} differ in shape")

    def __call__(self, target: jax.Array, estimate: jax.Array) -> jax.Array:
        """The loss (see the class docstring): target, estimate [batch, samples] -> float32 scalar."""
        self._check(target, estimate)
        total = jnp.zeros((), jnp.float32)
        for i, scale in enumerate(self.scales):
            m_x = self.mel_spectrogram(target, i)
            m_y = self.mel_spectrogram(estimate, i)
            if self.form == "log_l1":
                total = total + jnp.mean(jnp.abs(jnp.log10(m_x + self.eps) - jnp.log10(m_y + self.eps)))
                continue
            l1 = jnp.mean(jnp.abs(m_x - m_y))
            log_diff = jnp.log(m_x + self.eps) - jnp.log(m_y + self.eps)
            l2 = safe_sqrt(jnp.mean(jnp.square(log_diff)))
            total = total + l1 + np.sqrt(scale / 2.0) * l2
        return total

    def mel_distance(self, target: jax.Array, estimate: jax.Array) -> jax.Array:
        """Mean over scales of mean |M_s(x) - M_s(x̂)|: target, estimate [batch, samples] -> float32 scalar."""
        self._check(target, estimate)
        terms = [jnp.mean(jnp.abs(self.mel_spectrogram(target, i) - self.mel_spectrogram(estimate, i)))
                 for i in range(len(self.scales))]
        return jnp.mean(jnp.stack(terms))


class MultiScaleSTFTLoss:
    """Multi-scale STFT loss on linear-frequency spectra (DAC's, after Yamamoto et al. 2020).

    Args:
      scales: STFT window lengths s in samples, hop s // 4 (periodic Hann, no centring).
      eps: added to the power before the logarithm (not a clamp: see MultiScaleMelLoss).
      magnitude_weight: weight of the magnitude L1 term.

    `__call__(target, estimate)`, both [batch, samples] with samples >= max(scales), returns the float32 scalar
      sum_s [ mean |log10(|X_s|^2 + eps) - log10(|X̂_s|^2 + eps)| + magnitude_weight * mean ||X_s| - |X̂_s|| ],
    the means over batch, frames and frequency bins. Unlike a mel loss its bins stay narrow at high frequencies
    and, at 2048 samples (11.7 Hz at 24 kHz), resolve a semitone down to about 200 Hz.
    """

    def __init__(self, scales: Sequence[int] = (2048, 512), eps: float = 1e-5, magnitude_weight: float = 1.0):
        self.scales = tuple(int(s) for s in scales)
        if not self.scales or any(s < 4 for s in self.scales):
            raise ValueError(f"MultiScaleSTFTLoss: scales {self.scales} must be window lengths >= 4 samples")
        self.eps = float(eps)
        self.magnitude_weight = float(magnitude_weight)

    def __repr__(self) -> str:
        return f"MultiScaleSTFTLoss(scales={self.scales}, eps={self.eps}, magnitude_weight={self.magnitude_weight})"

    def __call__(self, target: jax.Array, estimate: jax.Array) -> jax.Array:
        """The loss (see the class docstring): target, estimate [batch, samples] -> float32 scalar."""
        if target.shape != estimate.shape:
            raise ValueError(f"target {target.shape} and estimate {estimate.shape} differ in shape")
        total = jnp.zeros((), jnp.float32)
        for scale in self.scales:
            if target.shape[-1] < scale:
                raise ValueError(f"MultiScaleSTFTLoss: {target.shape[-1]} samples are fewer than the window {scale}")
            m_x = magnitude_spectrogram(target, scale, max(1, scale // 4))
            m_y = magnitude_spectrogram(estimate, scale, max(1, scale // 4))
            log_l1 = jnp.mean(jnp.abs(jnp.log10(jnp.square(m_x) + self.eps) - jnp.log10(jnp.square(m_y) + self.eps)))
            total = total + log_l1 + self.magnitude_weight * jnp.mean(jnp.abs(m_x - m_y))
        return total


def waveform_l1(target: jax.Array, estimate: jax.Array) -> jax.Array:
    """Mean |x - x̂| over every sample: target, estimate [batch, samples] -> float32 scalar."""
    if target.shape != estimate.shape:
        raise ValueError(f"target {target.shape} and estimate {estimate.shape} differ in shape")
    return jnp.mean(jnp.abs(target.astype(jnp.float32) - estimate.astype(jnp.float32)))
